"""The built-in default models: shipped files, recorded numbers, packing, and every command without a CKPT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

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
from tests.conftest import invoke

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


@pytest.mark.slow  # three trainings
def test_retrain_command_trains_packs_and_writes_a_manifest(tmp_path, capsys):
    fast = ["iterations=2", "warmup_iters=1", "eval_images=2", "num_workers=0", "dataset_kwargs={length: 32}"]
    main(["retrain", "--runs", str(tmp_path / "runs"), "--weights", str(tmp_path / "w"), *(f"--set={o}" for o in fast)])
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())["models"]
    assert list(manifest) == list(DEFAULT_MODELS) and all(e["iterations"] == 2 for e in manifest.values())
    for name, entry in manifest.items():
        assert read_checkpoint(tmp_path / "runs" / name / "checkpoint.pt")["iteration"] == 2
        assert (tmp_path / "w" / entry["file"]).is_file() and f"{name}: {entry['file']}" in printed


def test_unknown_built_in_is_a_key_error():
    with pytest.raises(CheckpointError, match="built-in: depict-sa, depict-ca, segmenter"):
        default_path("segformer")


# -------------------------------------------------------------------------- commands with no checkpoint


run = invoke


def test_depict_info_eval_and_predict_use_the_default_model(tmp_path):
    result = run(depict_analysis.cli.main.app, "info", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["variant"] == "depict-sa-mini"

    result = run(depict_analysis.cli.main.app, "eval", "--num-images", 8, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["checkpoint"] == "builtin:depict-sa" and scores["dataset"] == "synthetic" and scores["n_images"] == 8

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for args in (["--images", tmp_path / "a.png"], ["builtin:segmenter", "--images", tmp_path / "a.png", "--overwrite"]):
        result = run(depict_analysis.cli.main.app, "predict", *args, "--out", tmp_path / "pred")
        assert result.exit_code == 0, result.output
        label = np.array(Image.open(tmp_path / "pred" / "a_label.png"))
        assert label.shape == (40, 52) and label.max() < 8


@pytest.mark.slow  # the command matrix
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


@pytest.mark.slow  # every analysis of the demo
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
