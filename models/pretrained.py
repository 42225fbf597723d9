"""The built-in default models, shipped in ``models/weights``: no file to fetch, no network.

DEPICT-SA, DEPICT-CA and Segmenter's mask transformer on the mini ViT (d 64, 4 layers, patch 4,
64 px), trained from scratch by ``depict train`` on the synthetic dataset with one recipe, the preset
``configs/synthetic-mini.yaml``. ``weights/manifest.json`` records, per model, its file, variant,
recipe and mIoU on the synthetic validation split (``VALIDATION``).

Retrain all three and pack their weights into a folder you name (a CPU hour or so; minutes on a
GPU); nothing is ever written into the installed package::

    python -m depict_analysis.models.pretrained retrain --runs runs/defaults --weights my-weights/

This module's names are light (no torch) until a model is loaded, packed or trained.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depict_analysis.foundation.errors import CheckpointError, ConfigError, DepictError
from depict_analysis.foundation.files import atomic_write_text

if TYPE_CHECKING:
    import torch

    from depict_analysis.models.segmentor import Segmentor

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
RECIPE = "synthetic-mini"
DEFAULT_MODELS = ("depict-sa", "depict-ca", "segmenter")  # the first is the default of every command
LABELS = {"depict-sa": "DEPICT-SA", "depict-ca": "DEPICT-CA", "segmenter": "Segmenter"}  # in figures and tables
VALIDATION = {"dataset": "synthetic", "split": "val", "num_images": 200}  # where the recorded mIoU comes from
# How a source names a model wherever a checkpoint path goes (models.sources), importable without torch
BUILTIN = "builtin:"  # a built-in model: builtin:segmenter
ZOO = "zoo:"  # an official release, downloaded on first use: zoo:seg-s-mask-ade20k
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def toy_model_note(labels: Sequence[str]) -> str:
    """One line for when built-in models (``labels``) run on images other than the synthetic task's."""
    which = " and ".join(labels) if labels else "the built-in models"
    return (f"{which}: built-in toy model{'s' if len(labels) != 1 else ''} of the synthetic task (64-px scenes of 8 "
            "textured shapes: square, disc, ring, ...); on other images their classes mean nothing. For real images "
            "use an official release: zoo:NAME (depict zoo list) or a release folder (checkpoint.pth + variant.yml)")


def read_manifest() -> dict[str, dict[str, Any]]:
    """``{name: {"file", "variant", "recipe", "iterations", "miou", ...}}`` of the shipped models."""
    if not MANIFEST.is_file():
        raise CheckpointError(f"{MANIFEST}: missing; the built-in models are not installed (reinstall depict-analysis)")
    return json.loads(MANIFEST.read_text())["models"]


def default_path(name: str = DEFAULT_MODELS[0]) -> Path:
    """The weight file of a built-in model: ``depict-sa``, ``depict-ca`` or ``segmenter``."""
    models = read_manifest()
    if name not in models:
        raise CheckpointError(f"no built-in model {name!r}; built-in: {', '.join(models)}")
    return WEIGHTS_DIR / models[name]["file"]


def load_default(name: str = DEFAULT_MODELS[0], device: str | torch.device = "cpu") -> tuple[Segmentor, dict]:
    """(model in eval mode, float32, on ``device``; its metadata) of a built-in model."""
    from depict_analysis.models.checkpoint import load_model

    model, meta = load_model(default_path(name), device)
    return model, meta | {"builtin": name}


def validation_miou(model: Segmentor) -> float:
    """mIoU on the split ``VALIDATION`` names, at the model's training size (single scale)."""
    from depict_analysis.models.data import build_dataset
    from depict_analysis.models.evaluate import evaluate

    data = build_dataset(VALIDATION["dataset"], None, VALIDATION["split"])
    return evaluate(model, data, num_images=VALIDATION["num_images"])["miou"]


def pack_checkpoint(run_checkpoint: str | Path, target: str | Path) -> dict[str, Any]:
    """Copy a finished training checkpoint to ``target`` without optimizer and RNG state, weights in
    float16 (``load_model`` reads them back as float32), its run folder recorded by name only (no
    absolute path of the training machine). Returns the manifest entry of the model."""
    from depict_analysis.models.checkpoint import FORMAT, atomic_save, load_model, read_checkpoint

    raw = read_checkpoint(run_checkpoint)
    if raw.get("format") != FORMAT or "train_config" not in raw:
        raise CheckpointError(f"{run_checkpoint}: not a training checkpoint of ours")
    weights = {k: v.half() if v.is_floating_point() else v for k, v in raw["model"].items()}
    train_config = dict(raw["train_config"])
    if train_config.get("out_dir"):  # the run's folder by name: the machine that trained it is nobody's business
        train_config["out_dir"] = Path(train_config["out_dir"]).name
    packed = {"format": FORMAT, "config": raw["config"], "model": weights, "iteration": raw["iteration"],
              "train_config": train_config}
    atomic_save(packed, target)
    model, _ = load_model(target)
    return {"file": Path(target).name, "variant": raw["config"]["name"], "recipe": RECIPE, "iterations": raw["iteration"],
            "miou": validation_miou(model), "validation": VALIDATION}


def _weights_target(weights_dir: str | Path) -> Path:
    """``weights_dir`` as the folder packed weights go to: never the installed package's own."""
    weights_dir = Path(weights_dir)
    if weights_dir.resolve() == WEIGHTS_DIR.resolve():
        raise ConfigError(f"{weights_dir} is the installed package's weights folder; pack into a folder of your own")
    return weights_dir


def pack_runs(runs: str | Path, weights_dir: str | Path) -> dict[str, dict]:
    """Pack ``<runs>/<name>/checkpoint.pt`` of every default model into ``weights_dir`` (a folder of
    yours, not the installed package's) with its manifest."""
    from depict_analysis.models.evaluate import jsonable

    runs, weights_dir = Path(runs), _weights_target(weights_dir)
    entries = {name: pack_checkpoint(runs / name / "checkpoint.pt", weights_dir / f"{name}-mini.pt") for name in DEFAULT_MODELS}
    atomic_write_text(weights_dir / MANIFEST.name, json.dumps({"models": jsonable(entries)}, indent=2) + "\n")
    return entries


def retrain(
    runs: str | Path, weights_dir: str | Path, overrides: Sequence[str] = (), progress: bool = True
) -> dict[str, dict]:
    """Train the three default models with the recipe (plus ``key=value`` ``overrides``), continuing any
    unfinished run already in ``runs`` (a finished one is kept as it is), then pack them into
    ``weights_dir``."""
    from depict_analysis.models.train import ResumePoint, build_config, train  # training machinery only when retraining

    weights_dir = _weights_target(weights_dir)
    for name in DEFAULT_MODELS:
        run = Path(runs) / name
        if (run / "metrics.json").is_file():  # written once a run has done all its iterations
            continue
        checkpoint = run / "checkpoint.pt"
        resume = ResumePoint(checkpoint) if checkpoint.exists() else None
        config = build_config(resume=resume, config_file=RECIPE, overrides=overrides, model=f"{name}-mini", out_dir=str(run))
        train(config, resume=resume, progress=progress)
    return pack_runs(runs, weights_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m depict_analysis.models.pretrained", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("retrain", "pack"), help="retrain: train then pack; pack: pack finished runs")
    parser.add_argument("--runs", default="runs/defaults", help="folder of the three training runs")
    parser.add_argument("--weights", required=True,
                        help="folder of yours for the packed files and manifest.json (never the installed package's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe option when retraining (repeatable)")
    args = parser.parse_args(argv)
    try:
        if args.action == "retrain":
            entries = retrain(args.runs, args.weights, args.overrides)
        else:
            entries = pack_runs(args.runs, args.weights)
    except DepictError as e:
        parser.exit(2, f"error: {e}\n")
    for name, entry in entries.items():
        print(f"{name}: {entry['file']}  synthetic-val mIoU {100 * entry['miou']:.2f}")


if __name__ == "__main__":
    main()
