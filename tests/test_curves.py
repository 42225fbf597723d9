"""Learning curves of training runs (``depict curves``): read from log.jsonl and config.yaml."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.curves import read_curves
from depict_analysis.foundation.errors import InputError


def write_run(folder, variant: str, records: list[dict], batch_size: int = 16):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: {variant}\nbatch_size: {batch_size}\n")
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def train(it: int, loss: float, speed: float) -> dict:
    return {"type": "train", "iter": it, "epoch": 0.1, "loss": loss, "lr": 1e-3, "images_per_s": speed}


def evaluation(it: int, miou: float) -> dict:
    return {"type": "eval", "iter": it, "miou": miou, "pixel_acc": 0.5, "mean_acc": 0.2, "iou": [0.1] * 8}


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path / "runs" / "sa", "depict-sa-mini",
                  [train(100, 1.0, 40.0), evaluation(100, 0.1), train(300, 0.5, 20.0), evaluation(300, 0.3),
                   {"type": "note", "text": "ignored"}])
    b = write_run(tmp_path / "runs" / "seg", "segmenter-mini", [train(100, 2.0, 16.0), evaluation(100, 0.2)], batch_size=8)
    return a, b


def test_curves_read_every_record_and_the_training_time_the_log_implies(runs):
    a, b = runs
    result = read_curves([str(a), f"black box={b}"])
    assert list(result.runs) == ["sa", "black box"]
    summary = result.summary()
    # 100 steps x 16 images at 40 img/s, then 200 x 16 at 20 img/s
    assert summary["sa"] == {"variant": "depict-sa-mini", "steps": 300, "last_miou": 0.3, "best_miou": 0.3,
                             "training_seconds": pytest.approx(100 * 16 / 40 + 200 * 16 / 20)}
    assert summary["black box"]["training_seconds"] == pytest.approx(100 * 8 / 16)
    rows = result.rows()
    assert len(rows) == 6 and rows[1] == {"run": "sa", "kind": "train", "iter": 300, "loss": 0.5, "lr": 1e-3,
                                          "images_per_s": 20.0, "miou": None, "pixel_acc": None}


def test_a_folder_without_a_log_or_with_a_broken_record_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a training run"):
        read_curves([str(tmp_path)])
    broken = write_run(tmp_path / "broken", "x", [train(1, 1.0, 1.0)])
    with open(broken / "log.jsonl", "a") as f:
        f.write('{"type": "eval", "iter": 2}\n')
    with pytest.raises(InputError, match="line 2: not a training log record"):
        read_curves([str(broken)])


def test_cli_writes_figure_json_and_csv(runs, tmp_path):
    a, b = runs
    result = CliRunner().invoke(app, ["curves", str(a), str(b), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    for suffix in ("png", "pdf", "json", "csv"):
        assert (tmp_path / "fig" / f"training_curves.{suffix}").stat().st_size > 0
    written = json.loads((tmp_path / "fig" / "training_curves.json").read_text())
    assert written["runs"]["seg"]["eval"] == [{"iter": 100, "miou": 0.2, "pixel_acc": 0.5}]
    with open(tmp_path / "fig" / "training_curves.csv") as f:
        assert [(r["run"], r["kind"], r["iter"]) for r in csv.DictReader(f)][-1] == ("seg", "eval", "100")
    missing = CliRunner().invoke(app, ["curves", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "not a training run" in missing.stderr
