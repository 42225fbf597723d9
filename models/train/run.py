"""The run: one training process from its first (or resumed) step to its last, as Segmenter's
``segm/train.py`` and ``segm/engine.py`` (SPEC §1.5), float32 (bf16 autocast on request), under
torchrun DDP, with exact resume: a resumed run restores the optimizer and RNG states and starts the
data stream (``data.py``) at the step where its checkpoint stopped, so N + N iterations with a resume
in between give the weights of 2N straight.

Loss, as the official engine: each process averages the cross-entropy over the labelled pixels
(label != 255) of its share of the step, and DDP averages the gradients over processes, so a step's
gradient is the mean over ranks of the per-rank mean losses (pixels weigh equally only when the ranks
have as many labelled pixels; MaskFormer trains with its set loss instead: ``models/losses.py``).
``grad_accum`` splits a rank's share into micro-batches without changing its gradient. A share without
labelled pixels contributes zero (the official loss is NaN).

Files in ``out_dir``: ``config.yaml`` (the effective TrainConfig), ``log.jsonl`` (one line per log
step and per evaluation), ``checkpoint.pt`` (latest; ``depict_analysis.models.load_model`` reads it) and, once the run
is complete, ``metrics.json``. A lock (``.lock``, released by the OS even after a SIGKILL) keeps a
second run out of the folder; a folder holding a checkpoint is only continued with ``resume``, and
a resumed run first cuts ``log.jsonl`` back to its checkpoint's iteration.

A loss that is not finite (NaN / Inf: too high a learning rate, broken data) stops the run before
that step's update, without saving: the last checkpoint written stays the last good one.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from depict_analysis.foundation.device import autocast
from depict_analysis.foundation.distributed import sum_over_processes
from depict_analysis.foundation.errors import ConfigError, DepictError
from depict_analysis.foundation.files import atomic_write_text, check_out_dir
from depict_analysis.foundation.progress import progress_bar
from depict_analysis.models.checkpoint import FORMAT, CheckpointError, model_from, save_checkpoint
from depict_analysis.models.data import DatasetError, build_dataset
from depict_analysis.models.evaluate import eval_protocol, evaluate, jsonable
from depict_analysis.models.losses import step_loss
from depict_analysis.models.segmentor import Segmentor
from depict_analysis.models.train.config import (ResumePoint, TrainConfig, build_model, resolve_iterations, resume_point,
                                                 steps_per_epoch)
from depict_analysis.models.train.data import step_batches, train_loader, worker_error
from depict_analysis.models.train.optim import build_optimizer, learning_rate
from depict_analysis.models.train.processes import (DistEnv, StopSignals, distributed, rng_state, seed_everything,
                                                    set_rng_state)


class TrainingDiverged(DepictError):
    """The loss became NaN / Inf; the run stopped before applying that step."""


def _model_from_checkpoint(raw: dict, path: Path) -> Segmentor:
    if raw.get("format") != FORMAT or "optimizer" not in raw or not isinstance(raw.get("iteration"), int):
        raise CheckpointError(f"{path}: not a training checkpoint of ours (no optimizer state); cannot resume from it")
    return model_from(raw, path)


def _cut_log(path: Path, iteration: int) -> None:
    """Keep the lines of a run's ``log.jsonl`` up to ``iteration`` (those after it are the steps a
    resumed run does again), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            if json.loads(line).get("iter", 0) <= iteration:
                kept.append(line)
    atomic_write_text(path, "".join(kept))


@contextlib.contextmanager
def run_lock(out_dir: Path, main: bool) -> Iterator[None]:
    """Hold ``out_dir/.lock`` while a run writes there (the main process): a second run into the same
    folder is refused. The lock is the OS's (flock): a killed run leaves no stale lock."""
    if not main:
        yield
        return
    check_out_dir(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{out_dir} is in use by another depict train; wait for it or pick another out_dir",
                          arguments="out_dir") from None
    try:
        yield
    except BaseException:
        if created and [p.name for p in out_dir.iterdir()] == [".lock"]:  # refused before writing: leave no trace
            (out_dir / ".lock").unlink()
            out_dir.rmdir()
        raise
    finally:
        lock.release()


class _Run:
    """The state of one training process: data, model (DDP-wrapped under torchrun), optimizer, log."""

    def __init__(self, config: TrainConfig, env: DistEnv, device: torch.device, resume: ResumePoint | None):
        self.env, self.device = env, device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        resuming_here = resume is not None and self.checkpoint_path.exists() and resume.path.resolve() == self.checkpoint_path.resolve()
        if self.checkpoint_path.exists() and not resuming_here:
            raise ConfigError(f"{self.out_dir} already holds a run; resume it with resume={self.checkpoint_path} or pick another out_dir",
                              arguments=(f"resume={self.checkpoint_path}", "out_dir"))

        seed_everything(config.seed)  # the same initial weights on every rank
        train_set = build_dataset(config.dataset, config.data_root, config.train_split, **config.dataset_kwargs)
        self.val_set = build_dataset(config.dataset, config.data_root, config.val_split, **config.dataset_kwargs)
        self.config = config = resolve_iterations(config, len(train_set))
        self.steps_per_epoch = steps_per_epoch(len(train_set), config.batch_size)
        raw = resume.take_state() if resume is not None else None  # the checkpoint's one read
        if raw is not None and isinstance(raw.get("iteration"), int) and raw["iteration"] >= config.iterations:
            raise ConfigError(f"{resume.path} is at iteration {raw['iteration']}: nothing left to do for {config.iterations} "
                              "iterations (give iterations above it to train on)", arguments="iterations")
        self.net = build_model(config, train_set.n_cls) if raw is None else _model_from_checkpoint(raw, resume.path)
        if self.net.n_cls != train_set.n_cls:
            raise ConfigError(f"the checkpoint predicts {self.net.n_cls} classes but {train_set.name} has {train_set.n_cls}")
        self.net.to(device).train()
        ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(self.net, device_ids=ids) if env.world_size > 1 else self.net
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = build_optimizer(config, self.net)
        self.iteration, self.saved = 0, None  # saved: the iteration of the last checkpoint written
        if raw is not None:
            self._restore_optimizer(raw["optimizer"], resume.path)
            self.iteration = self.saved = raw["iteration"]
            self._restore_rng(raw["rng"])
        else:
            seed_everything(config.seed, 1, env.rank)  # per-rank streams for drop-path / dropout

        loader = train_loader(train_set, self.net.config, config, env, pin_memory=device.type == "cuda")
        self.stream = step_batches(loader, self.iteration)
        self.scores: dict | None = None
        self.log_path = self.out_dir / "log.jsonl"
        if env.main:
            atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
            if resume is None:
                atomic_write_text(self.log_path, "")
            else:
                _cut_log(self.log_path, self.iteration)

    def _restore_optimizer(self, state: dict, path: Path) -> None:
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError):  # e.g. one parameter group saved, two (weight-decay groups) built
            groups = len(state["param_groups"]) if isinstance(state, dict) and "param_groups" in state else 0
            raise CheckpointError(
                f"{path}: its optimizer state has {groups} parameter group(s), this run builds "
                f"{len(self.optimizer.param_groups)} (weight_decay {self.config.weight_decay}); cannot resume from it"
            ) from None

    def _restore_rng(self, states: list[dict]) -> None:
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank], self.device)
        else:
            warnings.warn(f"the checkpoint was written by {len(states)} processes, not {self.env.world_size}: random streams restart")
            seed_everything(self.config.seed, 1, self.env.rank, self.iteration)

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        try:
            images, labels = next(self.stream)
        except DatasetError as e:
            raise worker_error(e) from None
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def step(self) -> Tensor:
        """One optimizer step -> this rank's mean loss / ranks (summed over ranks: the mean of the ranks' losses)."""
        config, world = self.config, self.env.world_size
        lr = learning_rate(self.iteration, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self._next_batch()
        loss_of = step_loss(self.net.decoder, labels)
        micro = config.batch_size // (world * config.grad_accum)
        pieces = list(zip(images.split(micro), labels.split(micro)))  # fewer in an epoch's short last step
        total = torch.zeros((), device=self.device)
        for k, (x, y) in enumerate(pieces):
            last = k == len(pieces) - 1
            with self.model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                with autocast(self.device, config.amp):
                    loss = loss_of(self.forward, x, y)
                loss.backward()
            total += loss.detach()
        self._require_finite(total, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / world

    def _require_finite(self, loss: Tensor, lr: float) -> None:
        """Stop the run (``TrainingDiverged``) when this step's loss is NaN / Inf on any rank, before the
        optimizer applies it: nothing of the step is kept, nor saved."""
        bad = (~torch.isfinite(loss)).float()
        if self.env.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return
        self.optimizer.zero_grad(set_to_none=True)
        step = self.iteration + 1
        self.log({"type": "diverged", "iter": step, "loss": float(loss), "lr": lr})
        kept = f"the last good checkpoint is {self.checkpoint_path} (iteration {self.saved})" if self.saved is not None else "no checkpoint was written"
        raise TrainingDiverged(f"the loss became {float(loss)} at iteration {step} (lr {lr:.3g}); stopped without saving it: "
                               f"{kept}; lower the learning rate or check the data")

    def evaluate(self) -> dict:
        # as `depict eval` on the checkpoint, but with the training-time stride (the official training loop's)
        protocol = eval_protocol(self.net, self.val_set, self.config.to_dict(), stride=self.config.eval_stride)
        self.scores = evaluate(self.net, self.val_set, **protocol, num_images=self.config.eval_images)
        return self.scores

    def save(self) -> None:
        """Write the checkpoint (rank 0), with every rank's RNG state: a collective call."""
        state = rng_state(self.device)
        states = [state]
        if self.env.world_size > 1:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, state)
        if self.env.main:
            save_checkpoint(
                self.checkpoint_path,
                self.net,
                optimizer=self.optimizer.state_dict(),
                iteration=self.iteration,
                rng=states,
                train_config=self.config.to_dict(),
                world_size=self.env.world_size,
                metrics=self.scores,
            )
        self.saved = self.iteration

    def log(self, record: dict) -> None:
        if self.env.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(jsonable(record)) + "\n")

    def stop_requested(self, stop: StopSignals, log_step: bool) -> int:
        """The signal that asks to stop (0 if none). Under DDP the ranks agree at log steps only."""
        if self.env.world_size == 1:
            return stop.signum
        if not log_step:
            return 0
        flag = torch.tensor([stop.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def loop(self, stop: StopSignals, show: bool) -> dict:
        """Train to ``iterations`` (or ``stop_after``, or a stop signal), logging, evaluating and saving on the way."""
        config = self.config
        end = min(config.iterations, config.stop_after or config.iterations)
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        with progress_bar(*columns, enabled=show) as progress:
            task = progress.add_task("train", total=config.iterations, completed=self.iteration, stats="")
            loss_sum, steps, signum, last_loss = torch.zeros((), device=self.device), 0, 0, None
            clock = time.perf_counter()
            while self.iteration < end and not signum:
                loss_sum += self.step()
                self.iteration, steps = self.iteration + 1, steps + 1
                progress.advance(task)
                it = self.iteration
                log_step = it % config.log_every == 0 or it == end
                if log_step:
                    sum_over_processes(loss_sum)
                    last_loss, lr = float(loss_sum) / steps, self.optimizer.param_groups[0]["lr"]
                    speed = steps * config.batch_size / (time.perf_counter() - clock)
                    epoch = round(it / self.steps_per_epoch, 3)
                    self.log({"type": "train", "iter": it, "epoch": epoch, "loss": last_loss, "lr": lr, "images_per_s": speed})
                    progress.update(task, stats=f"loss {last_loss:.4f}  lr {lr:.2e}  {speed:.1f} img/s")
                    loss_sum, steps = torch.zeros((), device=self.device), 0
                if it == config.iterations or config.eval_every and it % config.eval_every == 0:
                    scores = self.evaluate()
                    self.log({"type": "eval", "iter": it, **{k: scores[k] for k in ("miou", "pixel_acc", "mean_acc", "iou")}})
                    if show:
                        progress.console.print(f"iteration {it}: mIoU {100 * scores['miou']:.2f}, pixel accuracy {100 * scores['pixel_acc']:.2f}")
                signum = self.stop_requested(stop, log_step) if it < end else 0
                if signum or it == end or config.save_every and it % config.save_every == 0:
                    self.save()
                if log_step:
                    clock = time.perf_counter()  # throughput counts training steps, not evaluation or saving
        completed = self.iteration >= config.iterations
        result = {
            "iteration": self.iteration,
            "completed": completed,
            "stopped_by": signal.Signals(signum).name if signum else None,
            "checkpoint": str(self.checkpoint_path),
            "loss": last_loss,
            "eval": self.scores,
        }
        if self.env.main and completed:
            atomic_write_text(self.out_dir / "metrics.json", json.dumps(jsonable(result), indent=2) + "\n")
        return result


def train(config: TrainConfig, *, resume: str | Path | ResumePoint | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or continue, from the checkpoint ``resume``) the training ``config`` describes. Give ``resume``
    as the ``ResumePoint`` that ``build_config`` took the options from: the checkpoint is then read once.

    Under torchrun every process calls this; the batch is split across them. SIGINT / SIGTERM make the
    run save a checkpoint and return early. Returns ``{"iteration", "completed", "stopped_by" (signal
    name or None), "checkpoint", "loss" (mean of the last log window), "eval" (the last evaluation's
    ``depict_analysis.models.evaluate.evaluate`` scores, or None)}``.
    """
    with distributed(config.device) as (env, device), StopSignals() as stop, run_lock(Path(config.out_dir), env.main):
        run = _Run(config, env, device, resume_point(resume))
        try:
            return run.loop(stop, show=progress and env.main)
        finally:
            run.stream.close()  # stops the DataLoader's worker processes now, also after an error
