"""The built-in default models: shipped files, recorded numbers, packing, and every command without a CKPT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import depict_analysis.cli.analyze
import depict_analysis.cli.main
from depict_analysis.models import create_model, load_model, save_checkpoint
from depict_analysis.models.checkpoint import CheckpointError, read_checkpoint
from depict_analysis.models.pretrained import (
    DEFAULT_MODELS,
    RECIPE,
    VALIDATION,
    WEIGHTS_DIR,
    default_path,
    load_default,
    main,
    pack_checkpoint,
    read_manifest,
    validation_miou,
)
from depict_analysis.models.train import load_yaml_config

FAMILIES = {"depict-sa": "depict_sa", "depict-ca": "depict_ca", "segmenter": "mask_transformer"}


def test_manifest_lists_the_three_models_in_small_half_precision_files():
    manifest = read_manifest()
    assert list(manifest) == list(DEFAULT_MODELS)
    for name, entry in manifest.items():
        path = WEIGHTS_DIR / entry["file"]
        assert path.stat().st_size <= 8 * 2**20
        raw = read_checkpoint(path)  # weights_only: plain tensors and numbers
        assert "optimizer" not in raw and "rng" not in raw
        assert {t.dtype for t in raw["model"].values() if t.is_floating_point()} == {torch.float16}
        assert entry["recipe"] == RECIPE and entry["validation"] == VALIDATION


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_shipped_weights_load_match_their_config_and_reach_their_recorded_miou(name):
    entry = read_manifest()[name]
    model, meta = load_default(name)
    assert meta["builtin"] == name and model.config.name == entry["variant"] == f"{name}-mini"
    assert model.config.decoder.name == FAMILIES[name] and model.n_cls == 8 and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    recipe = load_yaml_config(RECIPE)
    trained = meta["train_config"]
    assert {k: trained[k] for k in recipe if k != "model"} == {k: v for k, v in recipe.items() if k != "model"}
    assert trained["iterations"] == entry["iterations"] == meta["iteration"]
    assert 100 * validation_miou(model) == pytest.approx(100 * entry["miou"], abs=1.0)
    assert entry["miou"] > 0.2  # well above the all-background prior (≈ 9.5 %): the models learned something


def test_packing_drops_training_state_and_rounds_weights_to_half(tmp_path):
    torch.manual_seed(0)
    model = create_model("depict-sa-tiny", n_cls=8)
    save_checkpoint(tmp_path / "run.pt", model, optimizer={"state": {}}, iteration=7, rng=[{}], train_config={"lr": 1.0})
    entry = pack_checkpoint(tmp_path / "run.pt", tmp_path / "packed.pt")
    raw = read_checkpoint(tmp_path / "packed.pt")
    assert set(raw) == {"format", "config", "model", "iteration", "train_config"}
    for key, value in model.state_dict().items():
        assert torch.equal(raw["model"][key], value.half())
    assert entry["iterations"] == 7 and entry["variant"] == "depict-sa-tiny"
    assert entry["miou"] == validation_miou(load_model(tmp_path / "packed.pt")[0])


def test_retrain_command_trains_packs_and_writes_a_manifest(tmp_path, capsys):
    fast = ["iterations=2", "warmup_iters=1", "eval_images=2", "num_workers=0", "dataset_kwargs={length: 32}"]
    main(["retrain", "--runs", str(tmp_path / "runs"), "--weights", str(tmp_path / "w"), *(f"--set={o}" for o in fast)])
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())["models"]
    assert list(manifest) == list(DEFAULT_MODELS) and all(e["iterations"] == 2 for e in manifest.values())
    for name, entry in manifest.items():
        assert read_checkpoint(tmp_path / "runs" / name / "checkpoint.pt")["iteration"] == 2
        assert (tmp_path / "w" / entry["file"]).is_file() and f"{name}: {entry['file']}" in printed


def test_curves_command_writes_the_runs_learning_curves(tmp_path, capsys):
    logs = {}
    for k, name in enumerate(DEFAULT_MODELS):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"model: {name}-mini\neval_images: 200\n")
        logs[name] = [
            {"type": "train", "iter": 10, "epoch": 0.1, "loss": 2.0 - k, "lr": 1e-3, "images_per_s": 50.0 + k},
            {"type": "eval", "iter": 10, "miou": 0.1 * k, "pixel_acc": 0.5, "mean_acc": 0.2, "iou": [0.1] * 8},
            {"type": "train", "iter": 20, "epoch": 0.2, "loss": 1.5 - k, "lr": 5e-4, "images_per_s": 60.0},
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logs[name]))
    main(["curves", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")])
    written = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in written) == [f"builtin-training.{ext}" for ext in ("csv", "json", "pdf", "png")]
    curves = json.loads((tmp_path / "fig" / "builtin-training.json").read_text())
    assert curves["caption"] == f"{RECIPE} recipe; mIoU on 200 synthetic validation images"
    assert list(curves["models"]) == ["DEPICT-SA", "DEPICT-CA", "Segmenter"]
    segmenter = curves["models"]["Segmenter"]
    assert segmenter["variant"] == "segmenter-mini" and [r["loss"] for r in segmenter["train"]] == [0.0, -0.5]
    assert segmenter["eval"] == [{"iter": 10, "miou": 0.2, "pixel_acc": 0.5}]
    with open(tmp_path / "fig" / "builtin-training.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[0] == {"model": "DEPICT-SA", "iter": "10", "loss": "2.0", "lr": "0.001",
                                          "images_per_s": "50.0", "miou": "", "pixel_acc": ""}
    assert [(r["model"], r["iter"], r["miou"]) for r in rows if r["miou"]][1] == ("DEPICT-CA", "10", "0.1")
    assert (tmp_path / "fig" / "builtin-training.png").stat().st_size > 0


def test_curves_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["curves", "--runs", str(tmp_path), "--out", str(tmp_path / "fig")])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.startswith("error: ") and "no log.jsonl" in error and error.count("\n") == 1


def test_unknown_built_in_is_a_key_error():
    with pytest.raises(CheckpointError, match="built-in: depict-sa, depict-ca, segmenter"):
        default_path("segformer")


# -------------------------------------------------------------------------- commands with no checkpoint


def run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_depict_info_eval_and_predict_use_the_default_model(tmp_path):
    result = run(depict_analysis.cli.main.app, "info", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["variant"] == "depict-sa-mini"

    result = run(depict_analysis.cli.main.app, "eval", "--num-images", 8, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["checkpoint"] == "builtin:depict-sa" and scores["dataset"] == "synthetic" and scores["n_images"] == 8

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for args in ([tmp_path / "a.png"], ["builtin:segmenter", tmp_path / "a.png", "--overwrite"]):
        result = run(depict_analysis.cli.main.app, "predict", *args, "--out", tmp_path / "pred")
        assert result.exit_code == 0, result.output
        label = np.array(Image.open(tmp_path / "pred" / "a_label.png"))
        assert label.shape == (40, 52) and label.max() < 8


@pytest.mark.parametrize("command", ["coding-rate", "pca-seg", "orthogonality", "robustness"])
def test_every_analysis_runs_without_a_checkpoint(tmp_path, command):
    extra = {"robustness": ["--sigmas", "0.1", "--draws", "1"]}.get(command, [])
    result = run(depict_analysis.cli.analyze.app, command, "--num-images", 2, *extra, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    written = json.loads(next(tmp_path.glob("*.json")).read_text())
    text = json.dumps(written)
    assert "builtin:depict-sa" in text
    if command in ("orthogonality", "robustness"):  # comparisons show all three built-in models
        labels = [c["label"] for c in written["checkpoints"]]
        assert labels == ["DEPICT-SA", "DEPICT-CA", "Segmenter"] and "builtin:segmenter" in text


def test_structured_robustness_without_a_checkpoint_compares_the_depict_models_only(tmp_path):
    result = run(depict_analysis.cli.analyze.app, "robustness", "--noise", "head-rotation", "--num-images", 2, "--draws", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "robustness.json").read_text())
    assert [c["label"] for c in written["checkpoints"]] == ["DEPICT-SA", "DEPICT-CA"]
    for row in (r for r in written["table"] if r["sigma"] == 1):  # MSSA / MSCA are invariant to it
        assert row["relative"] == pytest.approx(1.0, abs=0.02)


def test_demo_writes_every_figure_and_a_summary(tmp_path):
    result = run(depict_analysis.cli.analyze.app, "demo", "--num-images", 2, "--draws", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    for path in ("coding-rate/coding_rate.png", "pca-seg/pca-seg.png", "orthogonality/orthogonality.png",
                 "robustness/robustness.png", "summary.json"):
        assert (tmp_path / path).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [m["source"] for m in summary["models"]] == [f"builtin:{name}" for name in DEFAULT_MODELS]
    # PCA; per white box (SA, CA) against Segmenter: Q̂ raw and centred, P against its init and W_Q, σ½
    assert len(summary["claims"]) == 1 + 2 * 5 and summary["seconds"]["total"] > 0
