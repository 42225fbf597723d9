"""Learning curves of training runs: loss and validation mIoU against the optimizer step, read from
each run's ``log.jsonl`` and ``config.yaml`` (``depict curves RUN...``).

``read_curves(runs)`` returns ``LearningCurves``: per run (named after its folder, or ``NAME=RUN``)
its variant, the train records (iter, loss, lr, images_per_s) and eval records (iter, miou,
pixel_acc). ``summary()`` gives per run the steps done, the last and best mIoU and the training
seconds the log implies (each log window's images over its images/s: the time of the training
steps, without the evaluations).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from matplotlib.figure import Figure

from depict_analysis import plots
from depict_analysis.foundation.errors import InputError
from depict_analysis.models.sources import parse_labelled
from depict_analysis.results import Result

TRAIN_KEYS = ("iter", "loss", "lr", "images_per_s")
EVAL_KEYS = ("iter", "miou", "pixel_acc")


@dataclass
class RunCurve:
    """One run's records, in the order they were logged."""

    variant: str
    batch_size: int
    train: list[dict[str, float]]
    eval: list[dict[str, float]]

    def seconds(self) -> float:
        """Training time implied by the log: each window's images divided by its images/s."""
        total, done = 0.0, 0
        for record in self.train:
            total += (record["iter"] - done) * self.batch_size / record["images_per_s"]
            done = record["iter"]
        return total


@dataclass
class LearningCurves(Result):
    """The learning curves of several runs (see the module docstring)."""

    name: ClassVar[str] = "training_curves"

    runs: dict[str, RunCurve]  # by label
    caption: str = ""

    def summary(self) -> dict[str, Any]:
        return {label: {"variant": run.variant, "steps": run.train[-1]["iter"] if run.train else 0,
                        "last_miou": run.eval[-1]["miou"] if run.eval else None,
                        "best_miou": max((r["miou"] for r in run.eval), default=None),
                        "training_seconds": run.seconds()} for label, run in self.runs.items()}

    def to_json(self) -> dict[str, Any]:
        return {"caption": self.caption, "summary": self.summary(),
                "runs": {label: {"variant": run.variant, "batch_size": run.batch_size, "train": run.train, "eval": run.eval}
                         for label, run in self.runs.items()}}

    def rows(self) -> list[dict[str, Any]]:
        """One row per log record: run, kind (train | eval), iter, loss, lr, images_per_s, miou, pixel_acc."""
        keys = dict.fromkeys(TRAIN_KEYS + EVAL_KEYS)
        return [{"run": label, "kind": kind, **keys, **record} for label, run in self.runs.items()
                for kind, records in (("train", run.train), ("eval", run.eval)) for record in records]

    def figures(self) -> dict[str, Figure]:
        return {self.name: plots.plot_training_curves(
            {label: (run.train, run.eval) for label, run in self.runs.items()}, self.caption)}


def read_run(run: str | Path) -> RunCurve:
    """The ``RunCurve`` of one training run folder (``depict train --out``)."""
    from depict_analysis.foundation.yaml_text import load_yaml

    run = Path(run)
    if not (run / "log.jsonl").is_file() or not (run / "config.yaml").is_file():
        raise InputError(f"{run}: not a training run (no log.jsonl and config.yaml)")
    config = load_yaml((run / "config.yaml").read_text(), str(run / "config.yaml"))
    records: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}  # other record types are skipped
    keys = {"train": TRAIN_KEYS, "eval": EVAL_KEYS}
    for number, line in enumerate((run / "log.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["type"] in records:
                records[record["type"]].append({k: record[k] for k in keys[record["type"]]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{run / 'log.jsonl'}, line {number}: not a training log record ({e})") from None
    return RunCurve(str(config.get("model")), int(config.get("batch_size") or 1), records["train"], records["eval"])


def read_curves(runs: Sequence[str | Path], caption: str = "") -> LearningCurves:
    """``LearningCurves`` of run folders given as ``RUN`` or ``NAME=RUN`` (default name: the folder's)."""
    curves = {}
    for text in runs:
        label, path = parse_labelled(str(text))
        curves[label or Path(path).name] = read_run(path)
    return LearningCurves(curves, caption)
