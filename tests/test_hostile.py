"""Hostile and careless input (issue 19), by class of failure.

Every refused command is checked the same way (``refused``): exit code 2, exactly one line on
stderr that starts with ``error:`` and says what was wrong, no traceback, and every file under the
folders involved byte for byte as it was before (nothing written, changed, removed; no ``.tmp``).

1. numbers from broken weights or settings: non-finite weights from every source, non-finite
   training settings, a loss that turns non-finite during training;
2. options and files that make no sense: out-of-range options, wrongly typed variant.yml /
   checkpoint / training-config fields, corrupt or foreign weight files, a class-count mismatch;
3. files: outputs that would overwrite or be read as inputs, unusable --out paths, concurrent and
   resumed training runs, folders among images, atomic writes;
4. resources: the pixel limit, a config that claims a huge model, an output encoding without the
   characters printed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from PIL import Image

import depict_analysis.cli.analyze
import depict_analysis.cli.main
import depict_analysis.models.checkpoint as checkpoint_module
from depict_analysis.models import create_model, save_checkpoint, variant_config
from depict_analysis.models.checkpoint import read_checkpoint
from depict_analysis.outputs import save_csv, save_figure, save_json
from tests.conftest import invoke
from tests import official_layout as ref

DEPICT, ANALYZE = depict_analysis.cli.main.app, depict_analysis.cli.analyze.app
K = 8  # the synthetic dataset's classes: the default images of every analysis


# ------------------------------------------------------------------------------------------ helpers


def tree(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` (path -> content): the state of the disk a command may touch."""
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def refused(app, args, fragment: str, *roots: Path):
    """Run a command that must be refused: one-line error, exit 2, and no file under ``roots`` changed."""
    before = tree(*roots)
    result = invoke(app, *args)
    assert_one_line_error(result, fragment)
    assert tree(*roots) == before, "a refused command changed files"
    return result


def write_image(path: Path, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def poison(state: dict, name: str, value: float) -> dict:
    state = dict(state)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = value
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs: a tiny model of K classes (good, NaN and Inf weights), an official release with an
    Inf weight, images, and a folder dataset of 3 classes."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = create_model("depict-sa-tiny", n_cls=K)
    save_checkpoint(root / "good.pt", model)
    raw = torch.load(root / "good.pt", weights_only=True)
    torch.save({**raw, "model": poison(raw["model"], "decoder.cls_emb", float("nan"))}, root / "nan.pt")
    torch.save({**raw, "model": poison(raw["model"], "encoder.vit.blocks.1.mlp.fc2.weight", float("inf"))}, root / "inf.pt")
    ref.write_release(root / "release", "depict_sa")
    release = torch.load(root / "release" / "checkpoint.pth", weights_only=True)
    release["model"] = poison(release["model"], "decoder.net.layers.0.fn.proj", float("inf"))
    torch.save(release, root / "release" / "checkpoint.pth")
    write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.png", 36, 30, seed=1)
    folder = root / "three"  # a folder dataset of 3 classes
    (folder / "classes.yaml").parent.mkdir()
    (folder / "classes.yaml").write_text("classes: [{name: a}, {name: b}, {name: c}]\n")
    write_image(folder / "images" / "x.png")
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(folder / "masks" / "x.png")
    return root


# ------------------------------------------------------------- 1. numbers from broken weights or settings

COMMANDS = {  # every command that reads a model, as (app, arguments before the checkpoint, after it)
    "info": (DEPICT, ["info"], []),
    "eval": (DEPICT, ["eval"], ["--dataset", "synthetic", "--num-images", "1"]),
    "predict": (DEPICT, ["predict"], ["--images", "{images}/a.png", "--out", "{out}"]),
    "coding-rate": (ANALYZE, ["coding-rate"], ["--num-images", "1", "--out", "{out}"]),
    "pca-seg": (ANALYZE, ["pca-seg"], ["--num-images", "1", "--out", "{out}"]),
    "orthogonality": (ANALYZE, ["orthogonality"], ["--num-images", "1", "--out", "{out}"]),
    "robustness": (ANALYZE, ["robustness"], ["--num-images", "1", "--sigmas", "0.1", "--draws", "1", "--out", "{out}"]),
}


def command_args(command: str, checkpoint: Path, inputs: Path, out: Path) -> tuple:
    app, before, after = COMMANDS[command]
    fill = lambda a: a.format(images=inputs / "images", out=out)  # noqa: E731
    return app, [*map(fill, before), checkpoint, *map(fill, after)]


@pytest.mark.slow  # the command matrix
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("weights, fragment", [
    ("nan.pt", "weight decoder.cls_emb holds 1 NaN / Inf value(s)"),
    ("inf.pt", "weight encoder.vit.blocks.1.mlp.fc2.weight holds 1 NaN / Inf"),
    ("release", "weight decoder.net.layers.0.fn.proj holds 1 NaN / Inf"),
])
def test_non_finite_weights_are_refused_by_every_command(files, tmp_path, command, weights, fragment):
    app, args = command_args(command, files / weights, files, tmp_path / "out")
    refused(app, args, fragment, files, tmp_path)


@pytest.mark.parametrize("source", ["builtin", "zoo"])
def test_non_finite_weights_are_refused_from_the_builtin_and_zoo_sources_too(files, tmp_path, monkeypatch, source):
    import depict_analysis.models.pretrained as pretrained
    import depict_analysis.models.zoo as zoo

    if source == "builtin":
        monkeypatch.setattr(pretrained, "default_path", lambda name="depict-sa": files / "nan.pt")
        refused(DEPICT, ["info", "builtin:depict-sa"], "weight decoder.cls_emb holds", files, tmp_path)
        refused(DEPICT, ["eval", "--num-images", 1], "weight decoder.cls_emb holds", files, tmp_path)
    else:
        monkeypatch.setattr(zoo, "zoo_path", lambda name, **kwargs: files / "release")
        refused(DEPICT, ["info", "zoo:seg-t-mask-ade20k"], "weight decoder.net.layers.0.fn.proj holds", files, tmp_path)


TRAIN = ["train", "--set", "model=depict-sa-tiny", "--dataset", "synthetic", "--set", "dataset_kwargs={size: 32, length: 8}",
         "--batch-size", 4, "--num-workers", 0, "--eval-images", 2, "--no-progress"]


@pytest.mark.parametrize("args, fragment", [
    (["--set", "lr=nan"], "training option 'lr' must be a finite float, got 'nan'"),
    (["--set", "lr=.inf"], "training option 'lr' must be a finite float, got inf"),
    (["--lr", "inf"], "training option 'lr' must be a finite float, got inf"),
    (["--set", "min_lr=-.nan"], "training option 'min_lr' must be a finite float"),
    (["--set", "weight_decay=1e999"], "training option 'weight_decay' must be a finite float"),
])
def test_non_finite_training_settings_are_refused_before_anything_is_written(tmp_path, args, fragment):
    refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", tmp_path / "run", *args], fragment, tmp_path)
    assert not (tmp_path / "run").exists()


def test_non_finite_pretrained_and_resumed_weights_are_refused(files, tmp_path):
    vit = {k.removeprefix("encoder.vit."): v for k, v in torch.load(files / "good.pt", weights_only=True)["model"].items()
           if k.startswith("encoder.vit.")}
    torch.save(poison(vit, "pos_embed", float("nan")), tmp_path / "vit.pth")
    refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", tmp_path / "run", "--pretrained", tmp_path / "vit.pth"],
            "weight pos_embed holds NaN / Inf values", tmp_path, files)
    assert not (tmp_path / "run").exists()  # the run folder made for the lock is gone again
    raw = torch.load(files / "nan.pt", weights_only=True)
    torch.save({**raw, "optimizer": {"state": {}, "param_groups": []}, "iteration": 1, "rng": []}, tmp_path / "resume.pt")
    refused(DEPICT, [*TRAIN, "--iterations", 4, "--out", tmp_path / "run", "--resume", tmp_path / "resume.pt"],
            "weight decoder.cls_emb holds", tmp_path, files)


def test_a_loss_that_becomes_nan_stops_training_before_the_step_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    original = torch.nn.functional.cross_entropy

    def loss_turning_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", loss_turning_nan_at_step_3)
    run = tmp_path / "run"
    result = invoke(DEPICT, *TRAIN, "--iterations", 6, "--save-every", 2, "--set", "log_every=1", "--out", run)
    assert_one_line_error(result, "the loss became nan at iteration 3")
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (iteration 2)" in result.stderr
    saved = read_checkpoint(run / "checkpoint.pt")
    assert saved["iteration"] == 2 and all(bool(torch.isfinite(v).all()) for v in saved["model"].values())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["iter"]) for r in log] == [("train", 1), ("train", 2), ("diverged", 3)]
    assert not (run / "metrics.json").exists() and not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------ 2. options and files that make no sense


@pytest.mark.parametrize("app, args, fragment", [
    (DEPICT, ["eval", "{good}", "--batch-size", "-1"], "Invalid value for '--batch-size'"),
    (DEPICT, ["predict", "{good}", "--images", "{images}/a.png", "--out", "{out}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (DEPICT, ["eval", "{good}", "--short-side", "-10"], "Invalid value for '--short-side'"),
    (DEPICT, ["predict", "{good}", "--images", "{images}/a.png", "--out", "{out}", "--short-side", "-10"], "Invalid value for '--short-side'"),
    (DEPICT, ["eval", "{good}", "--window", "-5"], "Invalid value for '--window'"),
    (DEPICT, ["predict", "{good}", "--images", "{images}/a.png", "--out", "{out}", "--window", "3"],
     "the window (3) must be at least the model's patch size, 8 px"),
    (DEPICT, ["eval", "{good}", "--dataset", "synthetic", "--stride", "40"], "the stride (40) must be between 1 and the window (32)"),
    (DEPICT, ["info", "--n-cls", "-1", "--variant", "depict-sa-tiny"], "Invalid value for '--n-cls'"),
    (DEPICT, ["info", "--n-cls", "0", "--variant", "depict-sa-tiny"], "Invalid value for '--n-cls'"),
    (DEPICT, ["info", "{good}", "--image-size", "-5"], "Invalid value for '--image-size'"),
    (DEPICT, ["predict", "{good}", "--images", "{images}/a.png", "--out", "{out}", "--alpha", "5"], "Invalid value for '--alpha'"),
    (DEPICT, ["eval", "{good}", "--num-images", "-3"], "Invalid value for '--num-images'"),
    (DEPICT, ["eval", "{good}", "--dataset", "nope"], "unknown dataset 'nope'"),
    (ANALYZE, ["coding-rate", "{good}", "--eps", "1e-300", "--num-images", "1", "--out", "{out}"], "eps = 1e-300 is too small"),
    (ANALYZE, ["coding-rate", "{good}", "--eps", "nan", "--num-images", "1", "--out", "{out}"], "eps must be a finite number > 0"),
    (ANALYZE, ["robustness", "{good}", "--sigmas", "nan", "--out", "{out}"], "σ values must be finite numbers ≥ 0"),
    (ANALYZE, ["pca-seg", "{good}", "--k", "1", "--out", "{out}"], "Invalid value for '--k'"),
    (ANALYZE, ["pca-seg", "--k", "100", "--num-images", "1", "--out", "{out}"], "k must be in [1, min(N, d)] = [1, 64], got 100"),
    (DEPICT, ["predict", "{good}", "--images", "{images}/a.png", "--out", "{out}", "--window", "100000", "--short-side", "0"],
     "a 120000 x 100000 view of this image exceeds 100 megapixels"),
])
def test_options_out_of_range_are_refused(files, tmp_path, app, args, fragment):
    fill = lambda a: a.format(good=files / "good.pt", images=files / "images", out=tmp_path / "out")  # noqa: E731
    refused(app, [fill(a) for a in args], fragment, files, tmp_path)


def test_a_blur_narrower_than_float32_can_hold_changes_nothing():
    from depict_analysis.robustness import gaussian_blur

    images = torch.rand(1, 3, 12, 15, generator=torch.Generator().manual_seed(0))
    for sigma in (1e-50, 1e-300, 5e-324):  # σ² underflows: the kernel used to be 0 / 0
        assert torch.equal(gaussian_blur(images, sigma), images)


@pytest.mark.parametrize("args, fragment", [
    (["--set", "crop_size=3"], "crop_size 3 must be a multiple of the model's patch size, 8"),
    (["--crop-size", "20"], "crop_size 20 must be a multiple of the model's patch size, 8"),
    (["--batch-size", "-1"], "training option 'batch_size' must be at least 1, got -1"),
    (["--set", "save_every='8'"], "training option 'save_every' must be int, got '8'"),
    (["--set", "momentum=2"], "training option 'momentum' must be at most 1"),
    (["--set", "lr=1e-6"], "'min_lr' (1e-05) must not exceed 'lr' (1e-06)"),
    (["--set", "optimizer=adam"], "training option 'optimizer' must be one of sgd, adamw"),
    (["--set", "seed=-1"], "training option 'seed' must be at least 0"),
    (["--set", "bogus=1"], "unknown training option 'bogus'"),
    (["--set", "lr"], "--set expects key=value"),
    (["--set", "dataset_kwargs={size: big}"], "dataset 'synthetic' does not take the options"),
    (["--set", "model={backbone: [1], decoder: 2}"], "training option 'model' is neither a variant name nor a ModelConfig dict"),
    (["--variant", "depict-sa-huge"], "unknown variant 'depict-sa-huge'"),
    (["--pretrained", "missing.pth"], "--pretrained missing.pth: no such file"),
])
def test_training_options_are_checked_before_any_file_is_written(tmp_path, args, fragment):
    refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", tmp_path / "run", *args], fragment, tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_training_config_file_with_wrong_types_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- lr: 0.1\n")
    refused(DEPICT, [*TRAIN, "--config", tmp_path / "list.yaml", "--out", tmp_path / "run"], "expected a mapping of training options",
            tmp_path)
    (tmp_path / "typed.yaml").write_text("iterations: ten\n")
    refused(DEPICT, [*TRAIN, "--config", tmp_path / "typed.yaml", "--out", tmp_path / "run"],
            "training option 'iterations' must be int or null, got 'ten'", tmp_path)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    refused(DEPICT, [*TRAIN, "--config", tmp_path / "binary.yaml", "--out", tmp_path / "run"], "binary.yaml", tmp_path)


def release_with(folder: Path, edit) -> Path:
    """A healthy official release whose variant.yml went through ``edit(dict) -> dict``."""
    ref.write_release(folder, "depict_sa")
    variant = json.loads(json.dumps(yaml.load((folder / "variant.yml").read_text(), Loader=checkpoint_module._VariantLoader)))
    (folder / "variant.yml").write_text(yaml.safe_dump(edit(variant)))
    return folder


@pytest.mark.parametrize("edit, fragment", [
    (lambda v: {**v, "net_kwargs": [1, 2]}, "variant.yml has no net_kwargs section"),
    (lambda v: {**v, "inference_kwargs": {"window_size": "big", "window_stride": 24}},
     "inference_kwargs.window_size must be a positive integer, got 'big'"),
    (lambda v: {**v, "inference_kwargs": {"window_size": 32, "window_stride": -24}},
     "inference_kwargs.window_stride must be a positive integer, got -24"),
    (lambda v: {**v, "inference_kwargs": {"window_size": 32, "window_stride": 48}}, "window_stride exceeds window_size"),
    (lambda v: {**v, "inference_kwargs": [32]}, "inference_kwargs must be a mapping"),
    (lambda v: {**v, "net_kwargs": {**v["net_kwargs"], "image_size": "512"}},
     "net_kwargs.image_size must be a positive integer or a pair of them, got '512'"),
    (lambda v: {**v, "net_kwargs": {**v["net_kwargs"], "d_model": 0}}, "net_kwargs.d_model must be a positive integer, got 0"),
    (lambda v: {**v, "net_kwargs": {**v["net_kwargs"], "normalization": "imagenet"}}, "normalization must be one of"),
    (lambda v: {**v, "net_kwargs": {**v["net_kwargs"], "n_heads": 3}}, "d_model 64 is not a multiple of its 3 heads"),
    (lambda v: {**v, "net_kwargs": {**v["net_kwargs"], "d_model": 128, "n_cls": 5}},
     "weights and config do not fit: encoder.vit.cls_token is (1, 1, 64), the config needs (1, 1, 128)"),
])
def test_variant_yml_fields_are_checked(tmp_path, edit, fragment):
    folder = release_with(tmp_path / "release", edit)
    refused(DEPICT, ["info", folder], fragment, tmp_path)


def our_checkpoint_with(path: Path, edit) -> Path:
    model = create_model("depict-sa-tiny", n_cls=K)
    raw = {"format": checkpoint_module.FORMAT, "config": model.config.to_dict(), "model": model.state_dict()}
    torch.save(edit(raw), path)
    return path


def big_config(raw: dict) -> dict:
    config = json.loads(json.dumps(raw["config"]))
    config["backbone"].update(d_model=4096, n_heads=64)
    return {**raw, "config": config}


@pytest.mark.parametrize("edit, fragment", [
    (lambda raw: {**raw, "model": list(raw["model"].values())}, "its weights are a list, not a mapping of names to tensors"),
    (lambda raw: {**raw, "model": {**raw["model"], "decoder.cls_emb": "x"}}, "weight 'decoder.cls_emb' is a str, not a tensor"),
    (lambda raw: {**raw, "config": "depict-sa-tiny"}, "its config is not a mapping with backbone and decoder sections"),
    (lambda raw: {**raw, "config": {**raw["config"], "n_cls": -2}}, "the number of classes must be a positive integer, got -2"),
    (lambda raw: {**raw, "config": {**raw["config"], "decoder": {"family": "depict_sa", "n_heads": "two"}}},
     "decoder depict_sa n_heads must be an integer of at least 1, got 'two'"),
    (lambda raw: {**raw, "config": {**raw["config"], "decoder": {"family": "depict_sa", "heads": 2}}}, "depict_sa has no setting 'heads'"),
    (big_config, "weights and config do not fit: encoder.vit.cls_token is (1, 1, 48), the config needs (1, 1, 4096)"),
    (lambda raw: {**raw, "model": {k: v for k, v in raw["model"].items() if k != "decoder.cls_emb"}},
     "the weights lack decoder.cls_emb"),
])
def test_our_checkpoint_fields_are_checked_before_the_model_is_built(tmp_path, edit, fragment):
    refused(DEPICT, ["info", our_checkpoint_with(tmp_path / "m.pt", edit)], fragment, tmp_path)


def test_random_bytes_are_called_corrupt_and_pickled_code_untrusted(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    result = refused(DEPICT, ["info", tmp_path / "random.pt"], "not a PyTorch file", tmp_path)
    assert "--trust-checkpoint" not in result.stderr
    (tmp_path / "text.pt").write_text("hello")
    refused(DEPICT, ["info", tmp_path / "text.pt"], "not a PyTorch file", tmp_path)

    class Code:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Code()}, tmp_path / "code.pt")
    refused(DEPICT, ["info", tmp_path / "code.pt"], "if you trust its source, pass --trust-checkpoint", tmp_path)


def test_bad_pretrained_files_are_one_line_errors(files, tmp_path):
    class Code:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"pos_embed": Code()}, f)
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    tiny = variant_config("depict-sa-tiny", 3)
    other = create_model(replace(tiny, backbone=replace(tiny.backbone, d_model=64)))  # a ViT of another width (64, not 48)
    torch.save({"model": {k.removeprefix("encoder.vit."): v for k, v in other.state_dict().items() if k.startswith("encoder.vit.")}},
               tmp_path / "wide.pth")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pth")
    for name, fragment in [("code.pth", "holds pickled Python objects (code); refused"),
                           ("random.pth", "not a PyTorch file"),
                           ("wide.pth", "cls_token is (1, 1, 64), this backbone needs (1, 1, 48)"),
                           ("foreign.pth", "not weights of this ViT")]:
        refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", tmp_path / "run", "--pretrained", tmp_path / name], fragment,
                tmp_path, files)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["eval", "robustness", "pca-seg"])
def test_a_model_is_never_scored_on_a_dataset_with_other_classes(files, tmp_path, command):
    app, args = {
        "eval": (DEPICT, ["eval", files / "good.pt"]),
        "robustness": (ANALYZE, ["robustness", files / "good.pt", "--sigmas", "0.1", "--draws", 1, "--out", tmp_path / "out"]),
        "pca-seg": (ANALYZE, ["pca-seg", files / "good.pt", "--out", tmp_path / "out"]),
    }[command]
    refused(app, [*args, "--dataset", "folder", "--data-root", files / "three", "--num-images", 1],
            "the model predicts 8 classes but folder has 3", files, tmp_path)


# --------------------------------------------------------------------------------------------- 3. files


def test_predict_never_overwrites_a_file_it_did_not_write(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_label.png").write_bytes(b"the user's own file")
    refused(DEPICT, ["predict", files / "good.pt", "--images", files / "images" / "a.png", "--out", out],
            f"{out / 'a_label.png'} exists; pass --overwrite to replace it", files, tmp_path)
    result = invoke(DEPICT, "predict", files / "good.pt", "--images", files / "images" / "a.png", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert Image.open(out / "a_label.png").mode == "P" and sorted(p.name for p in out.iterdir()) == ["a_label.png", "a_overlay.png"]


def test_predict_never_writes_over_one_of_its_inputs(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "a_label.png", seed=2)  # an input that a.png's label map would replace
    for extra in ([], ["--overwrite"]):
        refused(DEPICT, ["predict", "--images", tmp_path / "a.png", "--images", tmp_path / "a_label.png", "--out", tmp_path, *extra],
                f"{tmp_path / 'a_label.png'} is also an input", tmp_path)


@pytest.mark.parametrize("case", ["file", "under a file"])
def test_unusable_output_folders_are_refused_before_any_work(files, tmp_path, case):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if case == "file" else tmp_path / "taken" / "sub"
    fragment = "is a file; give a folder" if case == "file" else f"{tmp_path / 'taken'} is a file, not a folder"
    for app, args in [(DEPICT, ["predict", files / "good.pt", "--images", files / "images" / "a.png"]),
                      (ANALYZE, ["coding-rate", files / "good.pt"]), (ANALYZE, ["pca-seg"]), (ANALYZE, ["orthogonality"]),
                      (ANALYZE, ["robustness"]), (ANALYZE, ["demo"]), (DEPICT, [*TRAIN, "--iterations", 2])]:
        refused(app, [*args, "--out", out], fragment, files, tmp_path)


def test_output_files_that_are_folders_or_under_files_are_refused(files, tmp_path):
    (tmp_path / "folder.json").mkdir()
    refused(DEPICT, ["eval", files / "good.pt", "--num-images", 1, "--out", tmp_path / "folder.json"], "is a folder; give a file name",
            files, tmp_path)
    (tmp_path / "file").write_text("x")
    refused(DEPICT, ["eval", files / "good.pt", "--num-images", 1, "--out", tmp_path / "file" / "s.json"],
            f"{tmp_path / 'file'} is a file, not a folder", files, tmp_path)
    refused(ANALYZE, ["report", "--out", tmp_path / "folder.json"], "is a folder; give a file name", files, tmp_path)


def train_briefly(out: Path, *extra) -> None:
    result = invoke(DEPICT, *TRAIN, "--out", out, "--set", "log_every=1", *extra)
    assert result.exit_code == 0, result.output


def test_a_run_folder_takes_one_run_and_keeps_its_model(tmp_path):
    run = tmp_path / "run"
    train_briefly(run, "--iterations", 2)
    ckpt = run / "checkpoint.pt"
    refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", run], "already holds a run; resume it with --resume", tmp_path)
    refused(DEPICT, [*TRAIN, "--iterations", 4, "--out", tmp_path / "run", "--resume", ckpt, "--variant", "segmenter-tiny"],
            "continues a run of model 'depict-sa-tiny'; it cannot change to 'segmenter-tiny'", tmp_path)
    refused(DEPICT, [*TRAIN, "--out", run, "--resume", ckpt, "--set", "crop_size=64"],
            "continues a run of crop_size None; it cannot change to 64", tmp_path)
    refused(DEPICT, [*TRAIN, "--out", run, "--resume", ckpt, "--iterations", 1], "is at iteration 2: nothing left to do for 1 iterations",
            tmp_path)
    refused(DEPICT, [*TRAIN, "--out", run, "--resume", ckpt], "is at iteration 2: nothing left to do for 2 iterations", tmp_path)
    train_briefly(tmp_path / "other", "--iterations", 2)
    refused(DEPICT, [*TRAIN, "--iterations", 4, "--out", tmp_path / "other", "--resume", ckpt],
            f"{tmp_path / 'other'} already holds a run", tmp_path)  # resuming one run over another


def test_a_second_training_into_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with FileLock(run / ".lock", timeout=0):  # another depict train holds the folder
        refused(DEPICT, [*TRAIN, "--iterations", 2, "--out", run], "is in use by another depict train", tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "FileLock(sys.argv[1], timeout=0).acquire(); print('held', flush=True); time.sleep(600)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    train_briefly(run, "--iterations", 1)  # the OS released the killed process's lock
    assert read_checkpoint(run / "checkpoint.pt")["iteration"] == 1


def test_a_resumed_run_logs_every_iteration_once(tmp_path):
    run = tmp_path / "run"
    train_briefly(run, "--iterations", 4, "--set", "stop_after=2")
    # a run killed after logging iteration 3, whose last checkpoint is iteration 2
    with (run / "log.jsonl").open("a") as f:
        f.write(json.dumps({"type": "train", "iter": 3, "loss": 1.0}) + "\n")
    train_briefly(run, "--resume", run / "checkpoint.pt")
    iterations = [json.loads(line)["iter"] for line in (run / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["type"] == "train"]
    assert iterations == [1, 2, 3, 4]


def test_folders_named_like_images_are_not_images(files, tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png")
    (images / "sub.png").mkdir()
    write_image(images / "sub.png" / "inner.png")
    result = invoke(DEPICT, "predict", files / "good.pt", "--images", images, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_label.png", "a_overlay.png"]
    result = invoke(ANALYZE, "coding-rate", files / "good.pt", "--images", images, "--out", tmp_path / "rates")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rates" / "coding_rate.json").read_text())["checkpoints"][0]["settings"]["num_images"] == 1
    refused(DEPICT, ["predict", files / "good.pt", "--images", images / "sub.png" / "nothing.png", "--out", tmp_path / "o2"],
            "no such image file or folder", tmp_path, files)


def test_every_output_is_written_atomically(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    path = tmp_path / "robustness.csv"
    rows = [{"sigma": s, "miou": 0.5} for s in range(200)]
    save_csv(path, rows)
    expected = path.read_text()
    seen, stop = [], threading.Event()

    def read_while_writing():
        while not stop.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for _ in range(100):
        save_csv(path, rows)
    stop.set()
    reader.join()
    assert seen and all(text == expected for text in seen), "a reader saw a partial CSV"

    save_json(tmp_path / "r.json", {"a": 1})
    fig = plt.figure()
    save_figure(fig, tmp_path, "fig")
    before = tree(tmp_path)
    fig = plt.figure()
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_figure(fig, tmp_path, "fig")
    assert tree(tmp_path) == before  # the old figure kept, no temporary file left


# ----------------------------------------------------------------------------------------- 4. resources


def test_images_over_the_pixel_limit_are_refused_from_their_header(files, tmp_path, monkeypatch):
    import depict_analysis.models.data.base as base

    monkeypatch.setattr(base, "MAX_PIXELS", 1000)
    refused(DEPICT, ["predict", files / "good.pt", "--images", files / "images" / "a.png", "--out", tmp_path / "out"],
            "is 48 x 40 pixels, over the limit", files, tmp_path)


def test_a_config_claiming_a_huge_model_is_refused_without_building_it(tmp_path, monkeypatch):
    devices = []
    real = checkpoint_module.create_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(0).device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "create_model", spy)
    path = our_checkpoint_with(tmp_path / "m.pt", big_config)
    refused(DEPICT, ["info", path], "the config needs (1, 1, 4096)", tmp_path)
    assert devices == ["meta"]  # only shapes were built, nothing allocated


def test_output_the_terminal_cannot_encode_does_not_fail_a_finished_run(files, tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([sys.executable, "-m", "depict_analysis.cli.main", "info", str(files / "good.pt")], capture_output=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"decoder GFLOPs @ 32?" in proc.stdout  # "²" replaced, not an error
    proc = subprocess.run([sys.executable, "-m", "depict_analysis.cli.main", "eval", str(files / "nan.pt")], capture_output=True,
                          env=env)
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1 and b"Traceback" not in proc.stderr


# ================================================================== issue 26: the hostile-input boundary, second pass
#
# 5. saved traces are untrusted input; 6. names never become paths; 7. output paths (--save-trace,
# special files, the run's own inputs, full disks, interrupted saves); 8. label files and YAML;
# 9. the Python API's front door; 10. ambiguities (NAME=SOURCE, eval without masks, batch predict).

TRACE_COMMANDS = ["coding-rate", "pca-seg", "orthogonality", "class-rates", "attention"]


@pytest.fixture(scope="module")
def traced(files, tmp_path_factory):
    """A saved trace of good.pt (K classes, depict-sa-tiny) on two images with label maps, and the model."""
    from depict_analysis.inputs import load_images
    from depict_analysis.models import load_model
    from depict_analysis.tracing import trace

    root = tmp_path_factory.mktemp("traced")
    for name, seed in (("a", 0), ("b", 1)):
        labels = np.random.default_rng(seed).integers(0, K, (40, 48), dtype=np.uint8)
        labels[:4] = 255
        (root / "labels").mkdir(exist_ok=True)
        Image.fromarray(labels).save(root / "labels" / f"{name}.png")
        write_image(root / "images" / f"{name}.png", seed=seed)
    model, _ = load_model(files / "good.pt")
    images = load_images(root / "images", model, labels=[root / "labels"])
    trace(model, images, attention=True).save(root / "good.trace")
    return root


def tampered(traced: Path, tmp_path: Path, edit) -> Path:
    """A copy of the saved trace with ``edit(state)`` applied (as anyone can, with torch.load / torch.save)."""
    state = torch.load(traced / "good.trace", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "tampered.trace")
    return tmp_path / "tampered.trace"


def _set(container, key, value):
    container[key] = value


TRACE_TAMPERING = {  # what is done to the file -> the one line that refuses it
    "NaN in tokens": (lambda s: s["tokens"][1].__setitem__((0, 0, 0), float("nan")), "tokens/mssa1 holds 1 NaN / Inf value(s)"),
    "Inf in the logits": (lambda s: s["masks"].__setitem__((0, 0, 0, 3), float("inf")), "masks holds 1 NaN / Inf value(s)"),
    "masks of fewer classes": (lambda s: _set(s, "masks", s["masks"][:, : K - 2]),
                               f"masks has shape (2, {K - 2}, 4, 4), expected (*, {K}, 4, 4)"),
    "masks off the grid": (lambda s: _set(s, "masks", s["masks"][..., :3]), f"masks has shape (2, {K}, 4, 3), expected (*, {K}, 4, 4)"),
    "an image larger than the grid": (lambda s: _set(s, "image_size", [40, 32]),
                                      "images of 40x32 pixels do not fit the 4x4 grid of 8-pixel patches"),
    "full-size masks of another size": (lambda s: _set(s, "full_masks", torch.zeros(2, K, 32, 31)),
                                        f"full_masks has shape (2, {K}, 32, 31), expected (2, {K}, 32, 32)"),
    "NaN in full-size masks": (lambda s: _set(s, "full_masks", torch.full((2, K, 32, 32), float("nan"))),
                               f"full_masks holds {2 * K * 32 * 32} NaN / Inf value(s)"),
    "masks of one image beside tokens of two": (lambda s: _set(s, "masks", s["masks"][:1]),
                                                "tokens/input has shape (2, 16, 48), expected (1, 16, 48)"),
    "labels out of range": (lambda s: s["labels"].fill_(200), f"labels hold the value 200, no class of this model (classes 0..{K - 1}"),
    "float labels": (lambda s: _set(s, "labels", s["labels"].float()), "labels must be integers, not torch.float32"),
    "zero images": (lambda s: _set(s, "masks", s["masks"][:0]), "it holds no images"),
    "a grid of text": (lambda s: _set(s, "grid", "ab"), "grid must be two positive integers, got ('a', 'b')"),
    "a class count of text": (lambda s: s["model"].__setitem__("n_cls", "8"), "model['n_cls'] must be a positive integer, got '8'"),
    "a layer named ../../x": (lambda s: s["layer_names"].__setitem__(0, "../../x"), "'../../x' is not a layer name"),
    "a map of no layer": (lambda s: _set(s["attention"], "block9", s["attention"]["mssa1"]), "attention map 'block9' names no layer"),
    "a config of another model": (lambda s: s["config"].__setitem__("n_cls", K - 1),
                                  f"its config says classes {K - 1} but the traced model has {K}"),
    "subspaces of another decoder": (lambda s: s["subspaces"][0].__setitem__("proj", s["subspaces"][0]["proj"][:1]),
                                     "its subspaces do not match its config's decoder"),
}


@pytest.mark.parametrize("case", list(TRACE_TAMPERING))
def test_a_tampered_saved_trace_is_refused_on_load(traced, tmp_path, case):
    from depict_analysis.foundation.errors import InputError
    from depict_analysis.tracing import Trace

    edit, fragment = TRACE_TAMPERING[case]
    path = tampered(traced, tmp_path, edit)
    out = tmp_path / "out"
    refused(ANALYZE, ["class-rates", "--trace", path, "--out", out], fragment, traced, tmp_path)
    assert not out.exists()
    with pytest.raises(InputError, match="not a valid trace"):
        Trace.load(path)


@pytest.mark.parametrize("command", TRACE_COMMANDS)
def test_every_command_reading_traces_refuses_a_non_finite_one_and_reads_a_sound_one(traced, tmp_path, command):
    path = tampered(traced, tmp_path, TRACE_TAMPERING["NaN in tokens"][0])
    refused(ANALYZE, [command, "--trace", path, "--out", tmp_path / "out"], "holds 1 NaN / Inf value(s)", traced, tmp_path)
    assert not (tmp_path / "out").exists()
    result = invoke(ANALYZE, command, "--trace", traced / "good.trace", "--out", tmp_path / "sound")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------- 6. names never become paths


def test_safe_name_keeps_every_name_one_plain_file_name():
    from depict_analysis.foundation.files import safe_name

    assert safe_name("mssa1") == "mssa1" and safe_name("attention_DEPICT-SA_mssa1_0") == "attention_DEPICT-SA_mssa1_0"
    for hostile in ("../../evil", "/etc/passwd", "..", ".", "", "a/b\\c", "x\x00y", "é" * 300):
        name = safe_name(hostile)
        assert name and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
        assert len(name) <= 100 and Path(name).name == name and name not in (".", "..")
    assert safe_name("../../evil") == "_.._evil"


def test_a_figure_named_by_a_file_is_written_inside_its_folder(tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "out"
    paths = save_figure(plt.figure(), out, "attention_../../../escaped")
    assert all(p.parent == out for p in paths) and sorted(p.name for p in out.iterdir()) == [
        "attention_.._.._.._escaped.pdf", "attention_.._.._.._escaped.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written or created beside or above it


# ------------------------------------------------------------------------------------------ 7. output paths


def no_model_loaded(monkeypatch):
    """Make loading any model fail the test: a refusal must come before any work."""
    import depict_analysis.models.sources as sources

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the outputs were checked")

    monkeypatch.setattr(sources, "open_checkpoint", loaded)


def test_save_trace_never_replaces_an_input_of_the_same_run(files, traced, tmp_path, monkeypatch):
    no_model_loaded(monkeypatch)
    images = traced / "images"
    refused(ANALYZE, ["coding-rate", files / "good.pt", "--images", images, "--save-trace", files / "good.pt", "--out", tmp_path / "o"],
            f"--save-trace {files / 'good.pt'} is also an input of this run", files, traced, tmp_path)
    refused(ANALYZE, ["attention", files / "good.pt", "--images", images, "--save-trace", images / "a.png", "--out", tmp_path / "o"],
            f"--save-trace {images / 'a.png'} is also an input of this run", files, traced, tmp_path)
    refused(ANALYZE, ["class-rates", files / "good.pt", "--images", images, "--labels", traced / "labels",
                      "--save-trace", traced / "labels" / "b.png", "--out", tmp_path / "o"], "is also an input of this run",
            files, traced, tmp_path)
    refused(ANALYZE, ["coding-rate", "--trace", traced / "good.trace", "--save-trace", traced / "good.trace", "--out", tmp_path / "o"],
            "is also an input of this run", traced, tmp_path)
    assert not (tmp_path / "o").exists()


def test_save_trace_targets_that_cannot_be_written_are_refused_before_any_work(files, tmp_path, monkeypatch):
    import depict_analysis.foundation.files as files_module

    no_model_loaded(monkeypatch)
    (tmp_path / "folder.trace").mkdir()
    refused(ANALYZE, ["coding-rate", files / "good.pt", "--save-trace", tmp_path / "folder.trace", "--out", tmp_path / "o"],
            f"--save-trace {tmp_path / 'folder.trace'} is a folder; give a file name", files, tmp_path)
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(files_module.os, "access", lambda p, mode: False if Path(p) == tmp_path / "locked" else real_access(p, mode))
    refused(ANALYZE, ["coding-rate", files / "good.pt", "--save-trace", tmp_path / "locked" / "t.trace", "--out", tmp_path / "o"],
            f"cannot write into {tmp_path / 'locked'} (permission denied)", files, tmp_path)
    # several models: one file each, named by the model's label, every one checked before the first model
    (tmp_path / "t_DEPICT-CA.trace").mkdir()
    refused(ANALYZE, ["coding-rate", "builtin:depict-sa", "builtin:depict-ca", "--save-trace", tmp_path / "t.trace",
                      "--out", tmp_path / "o"], f"{tmp_path / 't_DEPICT-CA.trace'} is a folder", files, tmp_path)
    assert not (tmp_path / "o").exists()


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, and a link to the system's /dev/null (a device node) in ``folder``."""
    import socket

    folder.mkdir(exist_ok=True)
    os.mkfifo(folder / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket"))
    server.close()
    (folder / "null").symlink_to("/dev/null")
    return {"FIFO": folder / "fifo", "socket": folder / "socket", "device": folder / "null"}


def kinds(paths) -> dict[str, int]:
    import stat

    return {str(p): stat.S_IFMT(os.stat(p).st_mode) for p in paths}


def test_special_files_are_refused_as_outputs_never_replaced(files, traced, tmp_path, monkeypatch):
    import depict_analysis.foundation.files as files_module

    special = special_files(tmp_path / "special")
    before = kinds([*special.values(), "/dev/null"])
    message = "is a special file (a device, FIFO or socket); give a regular file or folder"
    for kind, path in special.items():
        refused(DEPICT, ["eval", files / "good.pt", "--num-images", 1, "--out", path], f"--out {path} {message}", files)
        refused(ANALYZE, ["report", "--out", path], message, files)
        refused(ANALYZE, ["coding-rate", "--trace", traced / "good.trace", "--save-trace", path, "--out", tmp_path / "o"],
                f"--save-trace {path} {message}", traced)
        refused(ANALYZE, ["coding-rate", "--trace", traced / "good.trace", "--out", path], f"--out {path} {message}", traced)
    # an output named by the command itself (predict's <stem>_label.png) is refused too, before any work
    out = tmp_path / "predicted"
    out.mkdir()
    os.mkfifo(out / "a_label.png")
    refused(DEPICT, ["predict", files / "good.pt", "--images", files / "images" / "a.png", "--out", out, "--overwrite"], message, files)
    # and the last line of defence: the atomic writer itself
    with pytest.raises(files_module.InputError, match="special file"):
        save_json(special["device"], {"a": 1})
    assert kinds([*special.values(), "/dev/null"]) == before and not (tmp_path / "o").exists()


class DiskFull:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        import errno

        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))  # what fitted stays in the partial file
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_after(monkeypatch, room: int = 4096) -> None:
    import depict_analysis.foundation.files as files_module

    real = os.fdopen
    monkeypatch.setattr(files_module.os, "fdopen", lambda fd, mode="r", *a, **k: DiskFull(real(fd, mode, *a, **k), room))


def test_a_full_disk_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    save_json(tmp_path / "r.json", {"old": 1})
    before = tree(tmp_path)
    fill_disk_after(monkeypatch, room=10)
    with pytest.raises(OSError, match="No space left on device") as error:
        save_json(tmp_path / "r.json", {"new": list(range(100))})
    assert error.value.filename == str(tmp_path / "r.json")  # the target, not a temporary file
    with pytest.raises(OSError, match="No space left on device"):  # torch.save reports it as a RuntimeError
        checkpoint_module.atomic_save({"w": torch.zeros(10_000)}, tmp_path / "w.pt")
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["r.json"]


def test_a_full_disk_while_saving_a_trace_is_one_line_and_leaves_nothing(traced, tmp_path, monkeypatch):
    fill_disk_after(monkeypatch, room=4096)  # the trace, saved before the figures and numbers, does not fit
    target = tmp_path / "again.trace"
    before = tree(traced)
    result = invoke(ANALYZE, "coding-rate", "--trace", traced / "good.trace", "--save-trace", target, "--out", tmp_path / "o")
    assert_one_line_error(result, f"{target}: No space left on device")
    assert tree(traced) == before and not target.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_an_interrupted_save_leaves_the_numbers_complete(traced, tmp_path, monkeypatch):
    import depict_analysis.results as results
    from depict_analysis.coding_rate_analysis import analyze_coding_rates
    from depict_analysis.tracing import Trace

    result = analyze_coding_rates(Trace.load(traced / "good.trace"))
    complete = [path.read_bytes() for path in result.save(tmp_path / "complete")[:2]]  # JSON, CSV of a whole save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "save_figure", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        result.save(out)
    assert sorted(os.listdir(out)) == ["coding_rate.csv", "coding_rate.json", "coding_rate.result.npz"]  # no figure, no .tmp
    assert [(out / name).read_bytes() for name in ("coding_rate.json", "coding_rate.csv")] == complete


def test_eval_and_report_never_write_over_the_checkpoint_they_read(files, tmp_path):
    refused(DEPICT, ["eval", files / "good.pt", "--num-images", 1, "--out", files / "good.pt"],
            f"--out {files / 'good.pt'} is also an input of this run", files)
    refused(ANALYZE, ["report", files / "good.pt", "--out", files / "good.pt"], "is also an input of this run", files)


# ------------------------------------------------------------------------------------- 8. label files, YAML


def labels_of(value: int, folder: Path, names=("a", "b"), shape=(40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full(shape, value, np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("command", ["class-rates", "attention"])
def test_label_files_out_of_the_models_range_are_refused(files, tmp_path, command):
    bad = labels_of(200, tmp_path / "labels")
    refused(ANALYZE, [command, files / "good.pt", "--images", files / "images" / "a.png", "--labels", bad, "--out", tmp_path / "o"],
            f"the label map of {files / 'images' / 'a.png'} holds the value 200, no class of this model (classes 0..{K - 1}, 255 = ignore)",
            files, tmp_path)
    assert not (tmp_path / "o").exists()


def test_ground_truth_out_of_range_is_refused_and_255_is_ignored(files, tmp_path):
    bad = labels_of(200, tmp_path / "bad", names=("a",))
    refused(ANALYZE, ["pca-seg", files / "good.pt", "--images", files / "images" / "a.png", "--labels", bad / "a.png", "--out", tmp_path / "o"],
            "holds the value 200, no class of this model", files, tmp_path)
    ignored = labels_of(255, tmp_path / "ignored", names=("a",))
    Image.fromarray(np.where(np.arange(48)[None] < 24, 255, 3).repeat(40, 0).astype(np.uint8)).save(ignored / "a.png")
    result = invoke(ANALYZE, "pca-seg", files / "good.pt", "--images", files / "images" / "a.png", "--labels", ignored / "a.png", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))  # 9^9 nodes


def test_a_yaml_alias_bomb_is_refused_at_once_wherever_yaml_is_read(files, tmp_path):
    import time

    assert len(BOMB) < 500
    folder = tmp_path / "data"
    write_image(folder / "images" / "x.png")
    (folder / "classes.yaml").write_text(BOMB + "classes: [{name: *i}]\n")
    release = tmp_path / "release"
    ref.write_release(release, "depict_sa")
    (release / "variant.yml").write_text(BOMB + (release / "variant.yml").read_text())
    (tmp_path / "config.yaml").write_text(BOMB)
    start = time.monotonic()
    message = "aliases expand to more than 100,000 nodes; refused"
    refused(DEPICT, ["eval", files / "good.pt", "--dataset", "folder", "--data-root", folder], message, files, tmp_path)
    refused(DEPICT, ["info", release], message, tmp_path)
    refused(DEPICT, [*TRAIN, "--iterations", 1, "--out", tmp_path / "run", "--config", tmp_path / "config.yaml"], message, tmp_path)
    refused(DEPICT, [*TRAIN, "--iterations", 1, "--out", tmp_path / "run", "--set", "dataset_kwargs=" + BOMB.replace("\n", ", ")
                     .join("{}")], message, tmp_path)
    assert time.monotonic() - start < 30  # the loader hung for minutes before
    assert not (tmp_path / "run").exists()


def test_recursive_and_deeply_nested_yaml_is_refused(tmp_path):
    from depict_analysis.foundation.errors import InputError
    from depict_analysis.foundation.yaml_text import load_yaml

    with pytest.raises(InputError, match="recursive YAML document"):
        load_yaml("&a [*a]", "x.yaml")
    with pytest.raises(InputError, match="nested too deeply"):
        load_yaml("[" * 5000 + "]" * 5000, "x.yaml")
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "x.yaml") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases still work


# ---------------------------------------------------------------------------------- 9. the Python API's front door


@pytest.fixture(scope="module")
def model8(files):
    from depict_analysis.models import load_model

    return load_model(files / "good.pt")[0]


@pytest.mark.parametrize("images, fragment", [
    ("photo.png", "images must be an Images batch (load_images) or a tensor (B, 3, H, W), got str"),
    (torch.rand(3, 32, 32), "images must be a tensor (B, 3, H, W) of at least one image, got shape (3, 32, 32)"),
    (torch.rand(1, 4, 32, 32), "got shape (1, 4, 32, 32)"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "images must hold torch.float32 values like the model, got torch.uint8"),
    (torch.rand(1, 3, 32, 32, dtype=torch.float64), "images must hold torch.float32 values like the model, got torch.float64"),
    (torch.rand(1, 3, 32, 32, device="meta"), "images are on meta but the model is on cpu"),
    (torch.full((1, 3, 32, 32), float("nan")), "images hold 3072 NaN / Inf value(s)"),
])
def test_trace_refuses_bad_images_with_a_depict_error(model8, images, fragment):
    from depict_analysis.foundation.errors import DepictError
    from depict_analysis.tracing import trace

    with pytest.raises(DepictError) as error:
        trace(model8, images)
    assert fragment in str(error.value)


def test_the_analyses_refuse_wrong_arguments_with_a_depict_error(model8, traced):
    from depict_analysis import analyze_coding_rates, analyze_orthogonality, analyze_pca, load_images
    from depict_analysis.class_rates import analyze_class_rates
    from depict_analysis.foundation.errors import ConfigError, DepictError, InputError
    from depict_analysis.tracing import Trace, as_traces, trace

    tr = Trace.load(traced / "good.trace")
    with pytest.raises(InputError, match="trace needs a segmentation model"):
        trace("depict-sa", torch.rand(1, 3, 32, 32))
    for call, message in [(lambda: load_images(123, model8), "paths must be a file or folder, or a list of them, got int"),
                          (lambda: load_images(traced / "images", size="32"), "size must be a positive integer"),
                          (lambda: load_images(traced / "images", size=0), "size must be a positive integer"),
                          (lambda: load_images(traced / "images", "depict-sa"), "load_images takes a model of create_model"),
                          (lambda: analyze_pca(tr, k="3"), "k must be a positive integer, got '3'"),
                          (lambda: analyze_orthogonality(tr, baseline_seeds="ab"), "baseline_seeds must be a sequence of integers"),
                          (lambda: Trace.cat(tr), "Trace.cat takes a list of traces, got one Trace")]:
        with pytest.raises(DepictError, match=re.escape(message)):
            call()
    for analyze in (analyze_pca, analyze_class_rates, lambda t, **k: analyze_orthogonality(t, baseline_seeds=(), **k)):
        with pytest.raises(ConfigError, match=f"2 class names for a model of {K} classes"):
            analyze(tr, class_names=["road", "sky"])
        with pytest.raises(ConfigError, match="class_names must be a list of strings, got str"):
            analyze(tr, class_names="abcdefgh")  # K characters are not K names
    with pytest.raises(ConfigError, match=rf"palette must be \({K}, 3\) integers"):
        analyze_pca(tr, palette=np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError, match="traces must be a Trace or an iterable of them"):
        next(as_traces(str(traced / "good.trace")))
    with pytest.raises(InputError, match="traces must be Trace objects, got a Tensor"):
        analyze_coding_rates([tr.masks])


def test_trace_cat_refuses_traces_of_different_models(model8, traced):
    from depict_analysis.foundation.errors import InputError
    from depict_analysis.models import create_model
    from depict_analysis.tracing import Trace, trace

    tr = Trace.load(traced / "good.trace")
    torch.manual_seed(1)
    same_kind = create_model("depict-sa-tiny", n_cls=K).eval()  # the same config, other weights
    other_kind = create_model("depict-ca-tiny", n_cls=K).eval()
    x = model8.normalize(tr.pixels)
    with pytest.raises(InputError, match="traces of different models cannot be concatenated"):
        Trace.cat([tr, trace(same_kind, x)])
    with pytest.raises(InputError, match="traces of different models cannot be concatenated"):
        Trace.cat([tr, trace(other_kind, x)])
    with pytest.raises(InputError, match="Trace.cat joins Trace objects, got Trace, dict"):
        Trace.cat([tr, {}])
    assert Trace.cat([tr, tr]).num_images == 2 * tr.num_images  # one model's batches still join


# ------------------------------------------------------------------------------------------- 10. ambiguities


def test_a_checkpoint_whose_name_holds_an_equals_sign_is_that_file(files, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(files / "good.pt", tmp_path / "lr=0.1.pt")
    result = invoke(ANALYZE, "coding-rate", "lr=0.1.pt", "--num-images", 1, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "o" / "coding_rate.json").read_text())["checkpoints"][0]
    assert (record["label"], record["source"]) == ("lr=0.1", "lr=0.1.pt")
    result = invoke(ANALYZE, "coding-rate", "fast=lr=0.1.pt", "--num-images", 1, "--out", tmp_path / "o2")  # named explicitly
    assert result.exit_code == 0 and json.loads((tmp_path / "o2" / "coding_rate.json").read_text())["checkpoints"][0]["label"] == "fast"
    before = tree(tmp_path)
    refused(ANALYZE, ["coding-rate", "base=missing.pt", "--out", tmp_path / "o3"], "base=missing.pt: no such file or folder", tmp_path)
    refused(ANALYZE, ["coding-rate", "../up=lr=0.1.pt", "--out", tmp_path / "o3"], "../up=lr=0.1.pt: no such file or folder", tmp_path)
    assert tree(tmp_path) == before


def test_eval_on_a_folder_where_no_mask_matches_is_an_error(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "three.pt", create_model("depict-sa-tiny", n_cls=3))
    folder = tmp_path / "data"
    (folder / "masks").mkdir(parents=True)
    (folder / "classes.yaml").write_text("classes: [{name: a}, {name: b}, {name: c}]\n")
    write_image(folder / "images" / "x.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(folder / "masks" / "y.png")  # a mask of no image
    refused(DEPICT, ["eval", tmp_path / "three.pt", "--dataset", "folder", "--data-root", folder, "--out", tmp_path / "s.json"],
            "none of the 1 images of folder has a label map (no mask matches an image by name); nothing to score", tmp_path)
    Image.fromarray(np.full((40, 48), 255, np.uint8)).save(folder / "masks" / "x.png")  # a mask that ignores every pixel
    refused(DEPICT, ["eval", tmp_path / "three.pt", "--dataset", "folder", "--data-root", folder, "--out", tmp_path / "s.json"],
            "are all 255 (ignore): nothing to score", tmp_path)
    assert not (tmp_path / "s.json").exists()


def test_predict_reads_every_image_before_writing_and_a_rerun_finishes_without_overwrite(files, tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png")
    (images / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)  # a broken file among good ones
    write_image(images / "c.png", seed=2)
    out = tmp_path / "out"
    refused(DEPICT, ["predict", files / "good.pt", "--images", images, "--out", out], f"cannot read image {images / 'b.png'}", files, tmp_path)
    assert not out.exists() or not list(out.iterdir())  # nothing written for a.png either
    write_image(images / "b.png", seed=1)  # the file fixed, the same command again, no --overwrite
    result = invoke(DEPICT, "predict", files / "good.pt", "--images", images, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"{s}_{kind}.png" for s in "abc" for kind in ("label", "overlay")]
