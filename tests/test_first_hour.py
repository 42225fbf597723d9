"""A researcher's first hour: demo and report on their own images (with or without label maps), one
convention for models / --images / --labels, a misplaced image said so, eval --json, the toy-model note."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from depict_analysis.cli.analyze import app as analyze
from depict_analysis.cli.main import app as depict
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.models.data.synthetic import render_scene
from depict_analysis.models.train import TrainConfig

FAST = ["--num-images", "2", "--draws", "1", "--resamples", "50"]


def run(app, *args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def photos(tmp_path):
    """Two 'photos' and their label maps (class ids of the synthetic task), as a researcher's folders."""
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("beach", "street"):
        image, label = render_scene(rng, 80)
        Image.fromarray(image).save(tmp_path / "photos" / f"{name}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    return tmp_path


def test_demo_on_own_images_without_labels_writes_its_own_folder_and_says_prediction_only(photos, monkeypatch):
    monkeypatch.chdir(photos)
    result = run(analyze, "demo", "builtin:depict-sa", "builtin:segmenter", "--images", "photos", *FAST)
    assert result.exit_code == 0, result.output
    out = photos / "depict-demo"
    assert (out / "report.html").is_file() and not (photos / "figures").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["files"]) == {"coding-rate", "pca-seg", "orthogonality", "class-rates", "attention"}  # no labels: no mIoU
    assert any("no ground truth" in w and "prediction only" in w for w in summary["warnings"])
    assert "prediction" in summary["claims"][0]["statistic"]  # the PCA claim says what it was judged against
    assert json.loads((out / "class-rates" / "class_rates.json").read_text())["checkpoints"][0]["settings"]["by"] == "prediction"
    page = (out / "report.html").read_text()
    assert 'id="attention"' in page and 'id="class-rates"' in page and 'id="robustness"' not in page
    assert "built-in toy models of the synthetic task" in " ".join(result.stdout.split())
    stages = [line for line in result.stderr.splitlines() if line.startswith("suite: [")]  # not a terminal: one line each
    assert [line.split("] ", 1)[1] for line in stages][:6] == [
        "coding rate", "PCA segmentation", "orthogonality", "class rates", "attention", stages[-1].split("] ", 1)[1]]
    assert stages[-1].split("] ", 1)[1].startswith("done in")


def test_report_on_a_named_run_with_labels_and_an_unnamed_run(photos, monkeypatch):
    monkeypatch.chdir(photos)
    torch.manual_seed(0)
    (photos / "runs" / "tiny").mkdir(parents=True)
    save_checkpoint(photos / "runs" / "tiny" / "checkpoint.pt", create_model("depict-sa-tiny", n_cls=8),
                    train_config=TrainConfig(model="depict-sa-tiny", dataset="synthetic").to_dict())
    result = run(analyze, "report", "mine=runs/tiny/checkpoint.pt", "runs/tiny/checkpoint.pt", "--images", "photos",
                 "--labels", "masks", "--out", "r.html", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((photos / "r_data" / "summary.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["mine", "tiny"]  # named, and named after its folder
    assert "robustness" in summary["files"] and summary["models"][0]["clean_miou"] is not None
    assert json.loads((photos / "r_data" / "class-rates" / "class_rates.json").read_text())["checkpoints"][0]["settings"]["by"] == "ground_truth"
    assert "toy model" not in result.stdout  # no built-in model here


@pytest.mark.parametrize("command", ["coding-rate", "pca-seg", "class-rates", "orthogonality", "attention", "report"])
def test_an_image_where_a_model_goes_says_where_it_goes(photos, command):
    result = run(analyze, command, photos / "photos" / "beach.jpg", "--out", photos / "o")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "beach.jpg is an image, not a model: images go after --images" in result.stderr
    info = run(depict, "info", photos / "photos" / "beach.jpg")
    assert info.exit_code == 2 and "images go after --images" in info.stderr


def test_pca_seg_takes_image_files_and_their_labels_by_the_convention(photos):
    out = photos / "pca"
    result = run(analyze, "pca-seg", "--images", photos / "photos" / "beach.jpg", "--labels", photos / "masks", "--out", out)
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "pca-seg.json").read_text())["checkpoints"][0]["images"][0]["scores"]
    assert set(scores) == {"prediction", "ground_truth"}  # the label map found by its stem
    assert (out / "pca-seg_beach.png").is_file()
    assert "built-in toy model" in " ".join(result.stdout.split())
    gone = run(analyze, "pca-seg", "--gt", photos / "masks" / "beach.png")
    assert gone.exit_code == 2 and "--gt" in gone.stderr


def test_eval_json_prints_what_out_writes(tmp_path):
    result = run(depict, "eval", "builtin:depict-sa", "--num-images", 2, "--json", "--out", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "s.json").read_text())
    assert printed["checkpoint"] == "builtin:depict-sa" and printed["n_images"] == 2 and 0 <= printed["miou"] <= 1
