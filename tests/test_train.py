"""Training engine: poly schedule, typed config, exact resume, DDP equivalence, signals, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.models import load_model, variant_config
from depict_analysis.models.checkpoint import CheckpointError, read_checkpoint
from depict_analysis.models.evaluate import evaluate
from depict_analysis.models.data import TrainTransform, build_dataset, normalization_stats
from depict_analysis.models.train import (ResumePoint, TrainConfig, build_config, build_model, learning_rate, poly_lr,
                                          seed_everything, train)

# 20 synthetic 32-px scenes: one epoch is 5 steps of 4 images, so every multi-step run crosses epochs.
TINY = dict(dataset="synthetic", dataset_kwargs={"size": 32, "length": 20}, batch_size=4, num_workers=0, eval_images=4)


def tiny_config(out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{"model": "depict-sa-tiny", "out_dir": str(out_dir), **TINY, **overrides})


def weights(path) -> dict:
    return read_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def log_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_poly_schedule_values_by_hand():
    # (1e-3 - 1e-5) (1 - i/100)^0.9 + 1e-5, worked out by hand
    assert poly_lr(0, 100, 1e-3) == pytest.approx(1e-3, rel=1e-12)
    assert poly_lr(50, 100, 1e-3) == pytest.approx(0.00099 * 0.5**0.9 + 1e-5, rel=1e-12)
    assert poly_lr(50, 100, 1e-3) == pytest.approx(5.405279e-4, rel=1e-6)
    assert poly_lr(99, 100, 1e-3) == pytest.approx(2.569044e-5, rel=1e-6)
    assert poly_lr(100, 100, 1e-3) == pytest.approx(1e-5, rel=1e-12)
    assert poly_lr(30, 40, 1e-2, min_lr=0.0, power=1.0) == pytest.approx(2.5e-3, rel=1e-12)


class OfficialPolynomialLR(torch.optim.lr_scheduler.LRScheduler):
    """Segmenter's ``segm/optim/scheduler.py:PolynomialLR`` (step size 1), written from its behaviour:
    at scheduler step t, t = 0 keeps the optimizer's rate; t < warm-up: the poly factor of the
    warm-up's end scaled by t / warm-up; later (1 - t / iter_max)^power; all applied as
    (base - min_lr) * factor + min_lr."""

    def __init__(self, optimizer, iter_warmup: int, iter_max: int, power: float, min_lr: float):
        self.iter_warmup, self.iter_max, self.power, self.min_lr = iter_warmup, iter_max, power, min_lr
        super().__init__(optimizer)

    def get_lr(self):
        t = self.last_epoch
        if t == 0:
            return [group["lr"] for group in self.optimizer.param_groups]
        if t < self.iter_warmup:
            factor = t / self.iter_warmup * (1 - self.iter_warmup / self.iter_max) ** self.power
        else:
            factor = (1 - t / self.iter_max) ** self.power
        return [(base - self.min_lr) * factor + self.min_lr for base in self.base_lrs]


@pytest.mark.parametrize("warmup, power, min_lr", [(0, 0.9, 1e-5), (4, 1.0, 0.0), (30, 0.9, 1e-5)])
def test_learning_rate_is_the_official_schedulers(warmup, power, min_lr):
    config = TrainConfig(lr=1e-3, min_lr=min_lr, poly_power=power, warmup_iters=warmup, iterations=100)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = OfficialPolynomialLR(optimizer, warmup, config.iterations, power, min_lr)
    official = []
    for _ in range(config.iterations):  # the engine: the rate in force for a step, then step the scheduler
        official.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [learning_rate(i, config) for i in range(config.iterations)] == pytest.approx(official, rel=1e-12, abs=0)


def test_warmup_rises_to_the_poly_rate_of_its_end_by_hand():
    config = TrainConfig(lr=1e-3, min_lr=0.0, poly_power=1.0, warmup_iters=4, iterations=14)
    rates = [learning_rate(i, config) for i in range(14)]
    # step 0 at lr; then 1e-3 * k/4 * (1 - 4/14) for k = 1..3; then 1e-3 * (1 - k/14)
    assert rates[0] == 1e-3
    assert rates[1:4] == pytest.approx([1e-3 * k / 4 * 10 / 14 for k in (1, 2, 3)], rel=1e-12)
    assert rates[4] == pytest.approx(1e-3 * 10 / 14, rel=1e-12)  # the warm-up line ends on the poly curve
    assert rates[13] == pytest.approx(1e-3 / 14, rel=1e-12)
    no_warmup = TrainConfig(lr=1e-3, iterations=100)
    assert learning_rate(50, no_warmup) == poly_lr(50, 100, 1e-3)


@pytest.mark.parametrize("bad", [{"optimizer": "adam"}, {"warmup_iters": 10, "iterations": 10}, {"warmup_iters": -1}])
def test_bad_optimizer_settings_are_refused(bad):
    with pytest.raises(ValueError, match="optimizer|warmup_iters"):
        TrainConfig(**bad)


def test_adamw_with_warmup_logs_its_rates_and_resumes_exactly(tmp_path):
    common = dict(optimizer="adamw", lr=2e-3, weight_decay=0.01, warmup_iters=2, iterations=5, log_every=1)
    train(tiny_config(tmp_path / "straight", **common), progress=False)
    train(tiny_config(tmp_path / "split", stop_after=2, **common), progress=False)
    train(build_config(resume=tmp_path / "split" / "checkpoint.pt"), resume=tmp_path / "split" / "checkpoint.pt", progress=False)
    assert_same_weights(weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt"), atol=0)
    logged = [line["lr"] for line in log_lines(tmp_path / "straight") if line["type"] == "train"]
    config = tiny_config(tmp_path, **common)
    assert logged == pytest.approx([learning_rate(i, config) for i in range(5)], rel=1e-12)
    state = read_checkpoint(tmp_path / "straight" / "checkpoint.pt")["optimizer"]["state"]
    assert {"exp_avg", "exp_avg_sq"} <= set(state[0])  # AdamW's moments, not SGD's momentum buffer


def test_config_is_typed_and_layered(tmp_path):
    (tmp_path / "run.yaml").write_text("model: depict-ca-tiny\nlr: 1e-2\niterations: 50\nbatch_size: 4\n")
    config = build_config(config_file=tmp_path / "run.yaml", overrides=["iterations=70", "dataset_kwargs={size: 32}"], batch_size=2, lr=None)
    assert (config.model, config.iterations, config.batch_size) == ("depict-ca-tiny", 70, 2)
    assert config.lr == 0.01 and isinstance(config.lr, float)  # YAML reads 1e-2 as a string
    assert config.dataset_kwargs == {"size": 32}
    assert build_config(config_file="synthetic-tiny").dataset == "synthetic"  # a preset by name
    for bad, fragment in [
        (dict(overrides=["iterations=many"]), "'iterations' must be int"),
        (dict(overrides=["learning_rate=0.1"]), "unknown training option 'learning_rate'"),
        (dict(overrides=["lr"]), "key=value"),
        (dict(batch_size=0), "'batch_size' must be at least 1"),
        (dict(config_file="no-such-preset"), "no such config file or preset"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            build_config(**bad)


def test_a_run_logs_evaluates_and_writes_a_loadable_checkpoint(tmp_path):
    result = train(tiny_config(tmp_path / "run", iterations=4, log_every=2), progress=False)
    assert result["completed"] and result["iteration"] == 4 and result["stopped_by"] is None
    model, meta = load_model(tmp_path / "run" / "checkpoint.pt")
    assert meta["iteration"] == 4 and meta["train_config"]["model"] == "depict-sa-tiny" and model.n_cls == 8
    lines = log_lines(tmp_path / "run")
    train_lines = [line for line in lines if line["type"] == "train"]
    assert [line["iter"] for line in train_lines] == [2, 4]
    for line in train_lines:  # the lr of the step that ended the window
        assert line["lr"] == pytest.approx(poly_lr(line["iter"] - 1, 4, 1e-3))
        assert line["loss"] > 0 and line["images_per_s"] > 0
    assert lines[-1]["type"] == "eval" and 0 <= lines[-1]["miou"] <= 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval"]["miou"] == pytest.approx(result["eval"]["miou"])
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tmp_path / "run", iterations=4), progress=False)


def test_resume_continues_exactly(tmp_path):
    # drop-path draws from torch's RNG, and 10 scenes in steps of 4 make epochs of 4 + 4 + 2 (the short
    # step one micro-batch): the run stops inside the second epoch, and both must be restored exactly
    model = variant_config("depict-sa-tiny").to_dict()
    model["backbone"]["drop_path_rate"] = 0.2
    common = dict(model=model, epochs=2, grad_accum=2, log_every=1, dataset_kwargs={"size": 32, "length": 10})
    train(tiny_config(tmp_path / "straight", **common), progress=False)
    first = train(tiny_config(tmp_path / "split", stop_after=4, **common), progress=False)
    assert first["iteration"] == 4 and not first["completed"]
    config = build_config(resume=tmp_path / "split" / "checkpoint.pt")  # the run's own settings, stop_after dropped
    assert config.stop_after is None and config.grad_accum == 2
    second = train(config, resume=tmp_path / "split" / "checkpoint.pt", progress=False)
    assert second["completed"] and second["iteration"] == 6
    assert_same_weights(weights(tmp_path / "straight" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt"), atol=0)
    straight_losses = [line["loss"] for line in log_lines(tmp_path / "straight") if line["type"] == "train"]
    split_losses = [line["loss"] for line in log_lines(tmp_path / "split") if line["type"] == "train"]
    assert straight_losses == split_losses


def test_a_resumed_run_reads_its_checkpoint_once(tmp_path, monkeypatch):
    # the options (build_config) and the state (train) come from one read, from the command line and from Python
    train(tiny_config(tmp_path / "run", iterations=3, stop_after=1), progress=False)
    checkpoint = (tmp_path / "run" / "checkpoint.pt").resolve()
    reads, load = [], torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f).resolve())
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    result = CliRunner().invoke(app, ["train", "--resume", str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert reads == [checkpoint] and read_checkpoint(checkpoint)["iteration"] == 3
    reads.clear()
    point = ResumePoint(checkpoint)
    assert train(build_config(resume=point, iterations=4), resume=point, progress=False)["iteration"] == 4
    assert reads == [checkpoint]


def test_resume_with_other_weight_decay_groups_is_refused_in_one_line(tmp_path):
    train(tiny_config(tmp_path / "run", iterations=2, stop_after=1), progress=False)  # no decay: one group
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="1 parameter group\\(s\\), this run builds 2"):
        train(build_config(resume=checkpoint, overrides=["weight_decay=0.01"]), resume=checkpoint, progress=False)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # 6 scenes: steps of 4 then 2 images, split into micro-batches of 1 (4, then only 2 of them)
    common = dict(epochs=1, dataset_kwargs={"size": 32, "length": 6})
    train(tiny_config(tmp_path / "one", **common), progress=False)
    train(tiny_config(tmp_path / "accum", grad_accum=4, **common), progress=False)
    assert_same_weights(weights(tmp_path / "one" / "checkpoint.pt"), weights(tmp_path / "accum" / "checkpoint.pt"), atol=1e-6)


def official_ddp_reference(config: TrainConfig, world: int) -> dict:
    """The weights after one epoch of Segmenter's engine on ``world`` processes, written out by hand:
    DistributedSampler's order (randperm seeded seed + epoch, padded with its first items, rank r
    taking every r-th), batch_size / world items per rank and step (the last step shorter), each rank's
    cross-entropy averaged over its own labelled pixels, gradients averaged over ranks, Nesterov SGD."""
    seed_everything(config.seed)  # the run's initial weights: seeded, datasets built, then the model
    train_set = build_dataset(config.dataset, None, "train", **config.dataset_kwargs)
    build_dataset(config.dataset, None, "val", **config.dataset_kwargs)
    model = build_model(config, train_set.n_cls)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True)
    crop = model.config.backbone.image_size
    transform = TrainTransform(crop, *normalization_stats("vit"), base_size=crop[0])
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed)).tolist()
    order += order[: -len(order) % world]
    per_rank = config.batch_size // world
    for step in range(math.ceil(len(order) / world / per_rank)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        rank_losses = []
        for rank in range(world):
            items = order[rank::world][step * per_rank : (step + 1) * per_rank]
            pairs = [transform(*train_set.load_raw(i), np.random.default_rng([config.seed, 0, i])) for i in items]
            images, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            rank_losses.append(F.cross_entropy(model(images), labels, ignore_index=255))
        (sum(rank_losses) / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_two_process_ddp_is_the_official_engine(tmp_path):
    # 17 scenes, batch 4 on 2 ranks: the epoch is padded to 18, each rank takes 9 in steps of 2, 2, 2, 2, 1
    args = ["--variant", "depict-sa-tiny", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "4",
            "--num-workers", "0", "--eval-images", "5", "--no-progress", "--set", "dataset_kwargs={size: 32, length: 17}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "depict_analysis.cli.main", "train", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, meta = load_model(tmp_path / "ddp" / "checkpoint.pt")
    assert meta["iteration"] == 5 and meta["train_config"]["iterations"] == 5  # ceil(17 / 4) steps, the last kept
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2  # both ranks contributed their RNG state
    assert not torch.equal(meta["rng"][0]["torch"], meta["rng"][1]["torch"])

    reference = official_ddp_reference(tiny_config(tmp_path, iterations=5, dataset_kwargs={"size": 32, "length": 17}), world=2)
    assert_same_weights(weights(tmp_path / "ddp" / "checkpoint.pt"), reference, atol=1e-5)

    # the DDP run's evaluation (images split over ranks, confusion matrices all-reduced) = one process
    ddp_scores = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["eval"]
    val = build_dataset("synthetic", None, "val", size=32, length=17)
    scores = evaluate(model, val, window=32, short_side=32, num_images=5)
    assert ddp_scores["n_pixels"] == scores["n_pixels"] == 5 * 32 * 32
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert ddp_scores[key] == scores[key]
    assert ddp_scores["iou"] == [None if np.isnan(x) else x for x in scores["iou"]]


@pytest.mark.slow  # a training process and a signal
def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "depict_analysis.cli.main", "train", "--variant", "depict-sa-tiny", "--dataset", "synthetic",
         "--iterations", "100000", "--save-every", "0", "--num-workers", "0", "--no-progress", "--out", str(run_dir),
         "--set", "log_every=1", "--set", "dataset_kwargs={size: 32}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    while not (run_dir / "log.jsonl").is_file() or not (run_dir / "log.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    model, meta = load_model(run_dir / "checkpoint.pt")
    assert meta["iteration"] >= 1 and model.n_cls == 8
    assert meta["iteration"] == log_lines(run_dir)[-1]["iter"]
    assert not (run_dir / "metrics.json").exists()


def _folder_dataset(root, mask_value: int = 1, corrupt: bool = False):
    """A two-class folder dataset of two 40x40 images; one mask holds ``mask_value``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [{name: a}, {name: b}]\n")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(np.full((40, 40), mask_value if i else 0, dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    if corrupt:
        (root / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing root", "does not exist"),
        ("wrong layout", "expected ADE20K images"),
        ("label >= K", "contains value 7"),
        ("label >= K, workers", "contains value 7"),
        ("corrupt image", "corrupt image"),
        ("unknown variant", "unknown variant 'depict-xl'"),
        ("bad option", "'save_every' must be int"),
    ],
)
def test_train_cli_bad_input_is_one_line_and_exit_2(tmp_path, case, fragment):
    args = ["train", "--variant", "depict-sa-tiny", "--iterations", "2", "--batch-size", "2", "--num-workers", "0",
            "--no-progress", "--out", str(tmp_path / "run")]
    if case == "missing root":
        args += ["--dataset", "ade20k", "--data-root", str(tmp_path / "nowhere")]
    elif case == "wrong layout":
        (tmp_path / "ADEChallengeData2016" / "annotations" / "training").mkdir(parents=True)
        args += ["--dataset", "ade20k", "--data-root", str(tmp_path)]
    elif case.startswith("label"):
        args += ["--dataset", "folder", "--data-root", str(_folder_dataset(tmp_path / "d", mask_value=7))]
        args += ["--num-workers", "1"] if "workers" in case else []
    elif case == "corrupt image":
        args += ["--dataset", "folder", "--data-root", str(_folder_dataset(tmp_path / "d", corrupt=True))]
    elif case == "unknown variant":
        args += ["--dataset", "synthetic", "--variant", "depict-xl"]
    else:
        args += ["--dataset", "synthetic", "--set", "save_every=often"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
