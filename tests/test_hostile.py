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
from typer.testing import CliRunner

import depict_analysis.cli.analyze
import depict_analysis.cli.main
import depict_analysis.models.checkpoint as checkpoint_module
from depict_analysis.models import create_model, save_checkpoint, variant_config
from depict_analysis.models.checkpoint import read_checkpoint
from depict_analysis.outputs import save_csv, save_figure, save_json
from tests import official_layout as ref

DEPICT, ANALYZE = depict_analysis.cli.main.app, depict_analysis.cli.analyze.app
K = 8  # the synthetic dataset's classes: the default images of every analysis


# ------------------------------------------------------------------------------------------ helpers


def tree(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` (path -> content): the state of the disk a command may touch."""
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def invoke(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


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
    "predict": (DEPICT, ["predict"], ["{images}/a.png", "--out", "{out}"]),
    "coding-rate": (ANALYZE, ["coding-rate"], ["--num-images", "1", "--out", "{out}"]),
    "pca-seg": (ANALYZE, ["pca-seg"], ["--num-images", "1", "--out", "{out}"]),
    "orthogonality": (ANALYZE, ["orthogonality"], ["--num-images", "1", "--out", "{out}"]),
    "robustness": (ANALYZE, ["robustness"], ["--num-images", "1", "--sigmas", "0.1", "--draws", "1", "--out", "{out}"]),
}


def command_args(command: str, checkpoint: Path, inputs: Path, out: Path) -> tuple:
    app, before, after = COMMANDS[command]
    fill = lambda a: a.format(images=inputs / "images", out=out)  # noqa: E731
    return app, [*map(fill, before), checkpoint, *map(fill, after)]


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
    (DEPICT, ["predict", "{good}", "{images}/a.png", "--out", "{out}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (DEPICT, ["eval", "{good}", "--short-side", "-10"], "Invalid value for '--short-side'"),
    (DEPICT, ["predict", "{good}", "{images}/a.png", "--out", "{out}", "--short-side", "-10"], "Invalid value for '--short-side'"),
    (DEPICT, ["eval", "{good}", "--window", "-5"], "Invalid value for '--window'"),
    (DEPICT, ["predict", "{good}", "{images}/a.png", "--out", "{out}", "--window", "3"],
     "the window (3) must be at least the model's patch size, 8 px"),
    (DEPICT, ["eval", "{good}", "--dataset", "synthetic", "--stride", "40"], "the stride (40) must be between 1 and the window (32)"),
    (DEPICT, ["info", "--n-cls", "-1", "--variant", "depict-sa-tiny"], "Invalid value for '--n-cls'"),
    (DEPICT, ["info", "--n-cls", "0", "--variant", "depict-sa-tiny"], "Invalid value for '--n-cls'"),
    (DEPICT, ["info", "{good}", "--image-size", "-5"], "Invalid value for '--image-size'"),
    (DEPICT, ["predict", "{good}", "{images}/a.png", "--out", "{out}", "--alpha", "5"], "Invalid value for '--alpha'"),
    (DEPICT, ["eval", "{good}", "--num-images", "-3"], "Invalid value for '--num-images'"),
    (DEPICT, ["eval", "{good}", "--dataset", "nope"], "unknown dataset 'nope'"),
    (ANALYZE, ["coding-rate", "{good}", "--eps", "1e-300", "--num-images", "1", "--out", "{out}"], "eps = 1e-300 is too small"),
    (ANALYZE, ["coding-rate", "{good}", "--eps", "nan", "--num-images", "1", "--out", "{out}"], "eps must be a finite number > 0"),
    (ANALYZE, ["robustness", "{good}", "--sigmas", "nan", "--out", "{out}"], "σ values must be finite numbers ≥ 0"),
    (ANALYZE, ["pca-seg", "{good}", "--k", "1", "--out", "{out}"], "Invalid value for '--k'"),
    (ANALYZE, ["pca-seg", "--k", "100", "--num-images", "1", "--out", "{out}"], "k must be in [1, min(N, d)] = [1, 64], got 100"),
    (DEPICT, ["predict", "{good}", "{images}/a.png", "--out", "{out}", "--window", "100000", "--short-side", "0"],
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
    refused(DEPICT, ["predict", files / "good.pt", files / "images" / "a.png", "--out", out],
            f"{out / 'a_label.png'} exists; pass --overwrite to replace it", files, tmp_path)
    result = invoke(DEPICT, "predict", files / "good.pt", files / "images" / "a.png", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert Image.open(out / "a_label.png").mode == "P" and sorted(p.name for p in out.iterdir()) == ["a_label.png", "a_overlay.png"]


def test_predict_never_writes_over_one_of_its_inputs(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "a_label.png", seed=2)  # an input that a.png's label map would replace
    for extra in ([], ["--overwrite"]):
        refused(DEPICT, ["predict", tmp_path / "a.png", tmp_path / "a_label.png", "--out", tmp_path, *extra],
                f"{tmp_path / 'a_label.png'} is also an input", tmp_path)


@pytest.mark.parametrize("case", ["file", "under a file"])
def test_unusable_output_folders_are_refused_before_any_work(files, tmp_path, case):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if case == "file" else tmp_path / "taken" / "sub"
    fragment = "is a file; give a folder" if case == "file" else f"{tmp_path / 'taken'} is a file, not a folder"
    for app, args in [(DEPICT, ["predict", files / "good.pt", files / "images" / "a.png"]),
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
    result = invoke(DEPICT, "predict", files / "good.pt", images, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_label.png", "a_overlay.png"]
    result = invoke(ANALYZE, "coding-rate", files / "good.pt", "--images", images, "--out", tmp_path / "rates")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rates" / "coding_rate.json").read_text())["checkpoints"][0]["settings"]["num_images"] == 1
    refused(DEPICT, ["predict", files / "good.pt", images / "sub.png" / "nothing.png", "--out", tmp_path / "o2"],
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
    refused(DEPICT, ["predict", files / "good.pt", files / "images" / "a.png", "--out", tmp_path / "out"],
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
