"""Training as Segmenter's ``segm/train.py`` and ``segm/engine.py`` (SPEC §1.5): Nesterov SGD (or
AdamW) with timm's weight-decay groups, Segmenter's per-iteration poly schedule (with a warm-up of its
shape on request), float32 (bf16 autocast on request), torchrun DDP, exact resume.

Budget: ``epochs`` x ceil(len(train set) / batch_size) optimizer steps, Segmenter's ``len(train_loader)
x epochs`` (no batch is dropped: an epoch's last one is smaller), unless ``iterations`` is given.

Data stream: step s of a run is a pure function of (seed, s). Epoch e visits the dataset in
``DistributedSampler``'s order for (seed, e): shuffled, padded with its own first items to a multiple
of the number of ranks, rank r taking every r-th item. Each step takes the next batch_size / ranks
items of every rank's list (fewer in the epoch's last step), and item i of epoch e is augmented with
a numpy generator seeded by (seed, e, i). A resumed run starts the stream at the step where its
checkpoint stopped and restores the optimizer and RNG states, so N + N iterations with a resume in
between give the weights of 2N straight.

Loss, as the official engine: each process averages the cross-entropy over the labelled pixels
(label != 255) of its share of the step, and DDP averages the gradients over processes, so a step's
gradient is the mean over ranks of the per-rank mean losses (pixels weigh equally only when the ranks
have as many labelled pixels; MaskFormer trains with its set loss instead: ``models/losses.py``). ``grad_accum`` splits a rank's share into micro-batches without
changing its gradient. A share without labelled pixels contributes zero (the official loss is NaN).

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
import math
import os
import random
import signal
import threading
import time
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from filelock import FileLock, Timeout
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from depict_analysis.models.backbone import load_pretrained
from depict_analysis.models.checkpoint import FORMAT, CheckpointError, model_from, read_checkpoint, save_checkpoint
from depict_analysis.models.data import (DatasetError, SegmentationDataset, TrainTransform, build_dataset,
                         normalization_stats)
from depict_analysis.foundation.device import autocast, resolve_device
from depict_analysis.foundation.errors import ConfigError, DepictError
from depict_analysis.models.evaluate import eval_protocol, evaluate, jsonable
from depict_analysis.models.losses import step_loss
from depict_analysis.foundation.files import atomic_write_text, check_out_dir
from depict_analysis.foundation.yaml_text import load_yaml
from depict_analysis.foundation.progress import progress_bar
from depict_analysis.models.registry import ModelConfig, create_model, variant_config
from depict_analysis.models.segmentor import Segmentor

PRESETS_DIR = Path(__file__).parent / "configs"
OPTIMIZERS = ("sgd", "adamw")
MODEL_FIELDS = ("model", "crop_size")  # the training options that define the model: fixed once a run has a checkpoint


class TrainingDiverged(DepictError):
    """The loss became NaN / Inf; the run stopped before applying that step."""


# ---------------------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a run depends on. Field types are checked (and ints accepted for floats) on creation."""

    model: str | dict = "depict-sa-vit-s16"  # variant name, or a ModelConfig dict; n_cls comes from the dataset
    dataset: str = "ade20k"
    data_root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)  # extra dataset arguments, e.g. synthetic {size: 64}
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int | None = None  # training crop, made the backbone's image size; None: the variant's (ViT-L: 640)
    base_size: int | None = None  # short side images are scaled to (x U(0.5, 2) in training); None: crop
    max_ratio: int = 4  # long-side cap of that resize in base sizes (mmseg img_scale = (max_ratio x base, base))
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # the resize ratio's range (mmseg's)
    batch_size: int = 8  # images per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 64  # the budget when iterations is None: epochs x ceil(len(train set) / batch_size) steps
    iterations: int | None = None  # optimizer steps (wins over epochs when both are set); None: from epochs
    optimizer: str = "sgd"  # "sgd" (Nesterov, SPEC §1.5) or "adamw" (faster from scratch: the built-in models)
    lr: float = 1e-3
    min_lr: float = 1e-5
    poly_power: float = 0.9
    warmup_iters: int = 0  # Segmenter's warm-up: linear rise to the poly rate of step warmup_iters (see learning_rate)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    amp: bool = False  # bf16 autocast, CUDA only (the official recipe trains in float32)
    compile: bool = False  # torch.compile the training forward
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate at the end only
    eval_images: int | None = None  # evaluate on the first N validation images; None: all
    eval_stride: int | None = None  # sliding-window stride; None: max(crop - 32, crop / 2)
    save_every: int = 1000  # 0: save at the end (and on SIGINT / SIGTERM) only
    stop_after: int | None = None  # save and stop at this iteration; the schedule still runs to `iterations`
    num_workers: int = 4
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "auto"
    pretrained: str | None = None  # backbone weights: a local file, or a timm model name (downloads)

    def __post_init__(self) -> None:
        """Every constraint on the options, checked once whatever their source (defaults, YAML, --set,
        command-line options, a resumed checkpoint): types, ranges, finite numbers."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, getattr(self, f.name), hints[f.name]))
        for name, low in {**dict.fromkeys(("batch_size", "grad_accum", "epochs", "iterations", "log_every", "crop_size",
                                           "base_size", "max_ratio", "eval_stride", "stop_after", "eval_images"), 1),
                          **dict.fromkeys(("eval_every", "save_every", "num_workers", "warmup_iters", "seed", "lr",
                                           "min_lr", "momentum", "weight_decay", "poly_power"), 0)}.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"training option {name!r} must be at least {low}, got {getattr(self, name)}")
        if self.momentum > 1:
            raise ConfigError(f"training option 'momentum' must be at most 1, got {self.momentum}")
        if self.min_lr > self.lr:
            raise ConfigError(f"training option 'min_lr' ({self.min_lr}) must not exceed 'lr' ({self.lr})")
        low, high = self.ratio_range
        if not 0 < low <= high:
            raise ConfigError(f"training option 'ratio_range' must be [low, high] with 0 < low <= high, got {self.ratio_range}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"training option 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.iterations is not None and self.warmup_iters >= self.iterations:
            raise ConfigError(f"warmup_iters ({self.warmup_iters}) must be less than iterations ({self.iterations})")
        if not self.out_dir:
            raise ConfigError("training option 'out_dir' must name a folder")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown training option {unknown[0]!r}; known: {', '.join(f.name for f in fields(cls))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a field type such as ``int | None`` (ints and numeric strings pass as floats:
    YAML reads ``1e-3`` as a string; a float must be finite); ``list[float]`` is a pair of numbers."""
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"training option {name!r} must be a pair [low, high], got {value!r}")
        return [_typed(name, item, typing.get_args(hint)[0]) for item in value]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in options:
        if kind is type(None) and value is None:
            return value
        if kind in (bool, str, dict) and isinstance(value, kind):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError, OverflowError):
                if math.isfinite(float(value)):
                    return float(value)
    expected = " or ".join("null" if kind is type(None) else "a finite float" if kind is float else kind.__name__
                           for kind in options)
    raise ConfigError(f"training option {name!r} must be {expected}, got {value!r}")


def load_yaml_config(source: str | Path) -> dict[str, Any]:
    """TrainConfig fields from a YAML file, or from a preset in ``models/configs`` given by name."""
    path = Path(source)
    if not path.is_file():
        path = PRESETS_DIR / f"{source}.yaml"
        if not path.is_file():
            presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise ConfigError(f"{source}: no such config file or preset (presets: {presets})")
    try:
        values = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of training options, found {type(values).__name__}")
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.01", "dataset_kwargs={size: 32}"]`` -> ``{"lr": 0.01, ...}``: each value is read as YAML."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"overrides expects key=value, got {item!r}", arguments="overrides")
        try:
            values[key.strip()] = load_yaml(text, f"overrides {key.strip()}")
        except yaml.YAMLError:
            raise ConfigError(f"overrides {item!r}: the value is not valid YAML", arguments="overrides") from None
    return values


def build_config(
    *, resume: str | Path | None = None, config_file: str | Path | None = None, overrides: Sequence[str] = (), **options: Any
) -> TrainConfig:
    """Layer the sources of a run's settings, later ones winning: TrainConfig's defaults, the config of
    the checkpoint to ``resume`` (without its ``stop_after``), ``config_file`` (YAML or preset name),
    ``overrides`` (``key=value``) and ``options`` (None = not given). A layer that sets ``epochs``
    without ``iterations`` also clears the ``iterations`` of the layers before it. A resumed run
    keeps its model: the later layers may not change ``MODEL_FIELDS``."""
    layers: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}
    if resume is not None:
        trained = dict(read_checkpoint(resume).get("train_config") or {})
        trained.pop("stop_after", None)
    if config_file is not None:
        layers.append(load_yaml_config(config_file))
    layers.append(parse_overrides(overrides))
    layers.append({key: value for key, value in options.items() if value is not None})
    for layer in layers:
        changed = next((key for key in MODEL_FIELDS if key in layer and key in trained and layer[key] != trained[key]), None)
        if changed:
            raise ConfigError(f"resume {resume} continues a run of {changed} {trained[changed]!r}; "
                              f"it cannot change to {layer[changed]!r} (start a new run in another out_dir)",
                              arguments=("resume", "out_dir"))
    values: dict[str, Any] = {}
    for layer in [trained, *layers]:
        if "epochs" in layer and "iterations" not in layer:
            values.pop("iterations", None)
        values.update(layer)
    return TrainConfig.from_dict(values)


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ceil(n_items / batch_size), the last batch kept however small.

    The same for any number of ranks R dividing ``batch_size``: each rank's ceil(n_items / R) items
    in batches of batch_size / R give ceil(ceil(n_items / R) / (batch_size / R)) = this.
    """
    return math.ceil(n_items / batch_size)


def resolve_iterations(config: TrainConfig, n_train: int) -> TrainConfig:
    """``config`` with ``iterations`` counted from ``epochs`` on a training set of ``n_train`` items
    when it was not given (Segmenter's ``len(train_loader) * epochs``)."""
    if config.iterations is not None:
        return config
    return replace(config, iterations=config.epochs * steps_per_epoch(n_train, config.batch_size))


def poly_lr(iteration: int, iterations: int, lr: float, min_lr: float = 1e-5, power: float = 0.9) -> float:
    """SPEC's poly schedule at 0-based ``iteration``: ``(lr - min_lr)(1 - iteration/iterations)^power + min_lr``."""
    return (lr - min_lr) * (1 - iteration / iterations) ** power + min_lr


def learning_rate(iteration: int, config: TrainConfig) -> float:
    """The rate of 0-based ``iteration`` (of a resolved config), as Segmenter's ``PolynomialLR``
    (segm/optim/scheduler.py) sets it before that step: ``poly_lr`` over all ``iterations``; during a
    warm-up, ``(lr - min_lr) * iteration / warmup_iters * (1 - warmup_iters / iterations)^power +
    min_lr``, a straight line up to the poly rate of step ``warmup_iters``. Step 0 runs at ``lr``,
    warm-up or not: that scheduler's first rate is the optimizer's initial one (torch's scheduler
    steps once on construction, and the official scheduler keeps the rate at step 0).
    """
    warmup, iterations = config.warmup_iters, config.iterations
    if 0 < iteration < warmup:
        factor = iteration / warmup * (1 - warmup / iterations) ** config.poly_power
        return (config.lr - config.min_lr) * factor + config.min_lr
    return poly_lr(iteration, iterations, config.lr, config.min_lr, config.poly_power)


def no_weight_decay(model: Segmentor) -> set[str]:
    """Names (as ``model.named_parameters`` gives them) that the encoder and decoder exclude from weight
    decay, as Segmenter's ``Segmenter.no_weight_decay`` gathers them from its two halves."""
    return {f"encoder.{name}" for name in model.encoder.no_weight_decay()} | {
        f"decoder.{name}" for name in model.decoder.no_weight_decay()
    }


def weight_decay_split(model: Segmentor) -> tuple[list[str], list[str]]:
    """(names trained without weight decay, names with it), as timm 0.4.12's ``add_weight_decay``
    (which Segmenter's ``create_optimizer`` uses): no decay for 1-D parameters (LayerNorms, DEPICT's
    step sizes), biases and ``no_weight_decay`` names; frozen parameters in neither list."""
    skip = no_weight_decay(model)
    exempt, decayed = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_exempt = parameter.ndim == 1 or name.endswith(".bias") or name in skip
            (exempt if is_exempt else decayed).append(name)
    return exempt, decayed


def build_optimizer(config: TrainConfig, model: Segmentor) -> torch.optim.Optimizer:
    """timm's ``create_optimizer``: with weight decay, two groups (no decay, decay) split by
    ``weight_decay_split``; without, one group of every parameter."""
    if config.weight_decay:
        named = dict(model.named_parameters())
        exempt, decayed = weight_decay_split(model)
        parameters: Any = [
            {"params": [named[name] for name in exempt], "weight_decay": 0.0},
            {"params": [named[name] for name in decayed], "weight_decay": config.weight_decay},
        ]
    else:
        parameters = model.parameters()
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=0.0)


def model_config_for(config: TrainConfig, n_cls: int) -> ModelConfig:
    """The ModelConfig ``config`` trains, with ``n_cls`` classes; ``crop_size`` becomes the backbone's image size."""
    if isinstance(config.model, str):
        model_config = variant_config(config.model, n_cls)
    else:
        try:
            model_config = ModelConfig.from_dict({**config.model, "n_cls": n_cls})
        except (KeyError, TypeError, ConfigError) as e:
            raise ConfigError(f"training option 'model' is neither a variant name nor a ModelConfig dict ({e})") from None
    if config.crop_size is not None:
        patch = model_config.backbone.patch_size
        if config.crop_size % patch:
            raise ConfigError(f"crop_size {config.crop_size} must be a multiple of the model's patch size, {patch}")
        model_config.backbone = replace(model_config.backbone, image_size=(config.crop_size, config.crop_size))
    return model_config


def build_model(config: TrainConfig, n_cls: int) -> Segmentor:
    """A fresh model for ``config`` with ``n_cls`` classes (``model_config_for``), with its pretrained backbone."""
    model = create_model(model_config_for(config, n_cls))
    if config.pretrained:
        load_pretrained(model.encoder, config.pretrained)
    return model


# ------------------------------------------------------------------------------------------------ data


class AugmentedItems(Dataset):
    """Key ``(epoch, i)`` -> item i of ``dataset`` through ``transform`` with a generator seeded by (seed, epoch, i).

    Returns image FloatTensor (3, h, w) and label LongTensor (h, w), both of the crop size.
    """

    def __init__(self, dataset: SegmentationDataset, transform: TrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = key
        image, label = self.dataset.load_raw(index)
        return self.transform(image, label, np.random.default_rng([self.seed, epoch, index]))


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by (seed, epoch), padded with its first items to a multiple of
    the ranks, split across them) that yields ``(epoch, index)`` keys and starts ``start`` positions
    into the epoch (for resuming)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


def step_batches(loader: DataLoader, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images (b, 3, h, w), labels (b, h, w)): this rank's share of every step from step
    ``start`` on; b is the loader's batch size, less in an epoch's last step.

    ``loader`` batches an ``EpochSampler``, keeping the last partial batch.
    """
    sampler, size = loader.sampler, loader.batch_size
    epoch, skip = divmod(start, math.ceil(sampler.num_samples / size))
    while True:
        sampler.set_epoch(epoch)
        sampler.start = skip * size
        yield from loader
        epoch, skip = epoch + 1, 0


def train_loader(
    dataset: SegmentationDataset, model_config: ModelConfig, config: TrainConfig, env: DistEnv, pin_memory: bool
) -> DataLoader:
    """This rank's shares of the steps (batch_size / ranks augmented crops of the model's training
    size), in the order the module docstring describes (``step_batches`` streams them across epochs)."""
    if config.batch_size % (env.world_size * config.grad_accum):
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of ranks x grad_accum = {env.world_size * config.grad_accum}")
    crop = model_config.backbone.image_size
    mean, std = normalization_stats(model_config.backbone.normalization)
    transform = TrainTransform(crop, mean, std, ratio_range=tuple(config.ratio_range), base_size=config.base_size or crop[0],
                               max_ratio=config.max_ratio)
    items = AugmentedItems(dataset, transform, config.seed)
    return DataLoader(
        items,
        batch_size=config.batch_size // env.world_size,
        sampler=EpochSampler(items, env.rank, env.world_size, config.seed),
        drop_last=False,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )


def _worker_error(error: DatasetError) -> DatasetError:
    """A DataLoader worker's DatasetError comes back with a traceback as message: keep its last line."""
    message = str(error)
    if message.startswith("Caught "):
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return DatasetError(message)


# ------------------------------------------------------------------------------ processes and signals


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device_spec: str) -> Iterator[tuple[DistEnv, torch.device]]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, one GPU per ``LOCAL_RANK``;
    gloo on the CPU) and leave it afterwards; a single process otherwise. Yields (env, device)."""
    device = resolve_device(device_spec)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield DistEnv(), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield DistEnv(dist.get_rank(), dist.get_world_size()), device
    finally:
        if owned:
            dist.destroy_process_group()


class StopSignals:
    """While active (main thread only), SIGINT / SIGTERM just record ``signum``; a second signal acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopSignals":
        self.signum = 0
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if in_main else {}
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, numpy, torch CPU (and this device's CUDA) generator states, as plain tensors / numbers."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed(*entropy: int) -> None:
    """Seed python, numpy and torch from ``entropy`` (e.g. (seed, rank))."""
    value = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# --------------------------------------------------------------------------------------------- the run


def _model_from_checkpoint(raw: dict, path: str | Path) -> Segmentor:
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

    def __init__(self, config: TrainConfig, env: DistEnv, device: torch.device, resume: str | Path | None):
        self.env, self.device = env, device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        resuming_here = resume is not None and self.checkpoint_path.exists() and Path(resume).resolve() == self.checkpoint_path.resolve()
        if self.checkpoint_path.exists() and not resuming_here:
            raise ConfigError(f"{self.out_dir} already holds a run; resume it with resume={self.checkpoint_path} or pick another out_dir",
                              arguments=(f"resume={self.checkpoint_path}", "out_dir"))

        _seed(config.seed)  # the same initial weights on every rank
        train_set = build_dataset(config.dataset, config.data_root, config.train_split, **config.dataset_kwargs)
        self.val_set = build_dataset(config.dataset, config.data_root, config.val_split, **config.dataset_kwargs)
        self.config = config = resolve_iterations(config, len(train_set))
        self.steps_per_epoch = steps_per_epoch(len(train_set), config.batch_size)
        raw = read_checkpoint(resume) if resume is not None else None
        if raw is not None and isinstance(raw.get("iteration"), int) and raw["iteration"] >= config.iterations:
            raise ConfigError(f"{resume} is at iteration {raw['iteration']}: nothing left to do for {config.iterations} "
                              "iterations (give iterations above it to train on)", arguments="iterations")
        self.net = build_model(config, train_set.n_cls) if raw is None else _model_from_checkpoint(raw, resume)
        if self.net.n_cls != train_set.n_cls:
            raise ConfigError(f"the checkpoint predicts {self.net.n_cls} classes but {train_set.name} has {train_set.n_cls}")
        self.net.to(device).train()
        ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(self.net, device_ids=ids) if env.world_size > 1 else self.net
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = build_optimizer(config, self.net)
        self.iteration, self.saved = 0, None  # saved: the iteration of the last checkpoint written
        if raw is not None:
            self._restore_optimizer(raw["optimizer"], resume)
            self.iteration = self.saved = raw["iteration"]
            self._restore_rng(raw["rng"])
        else:
            _seed(config.seed, 1, env.rank)  # per-rank streams for drop-path / dropout

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

    def _restore_optimizer(self, state: dict, path: str | Path) -> None:
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
            _seed(self.config.seed, 1, self.env.rank, self.iteration)

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        try:
            images, labels = next(self.stream)
        except DatasetError as e:
            raise _worker_error(e) from None
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
                    if self.env.world_size > 1:
                        dist.all_reduce(loss_sum)
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


def train(config: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or continue, from the checkpoint ``resume``) the training ``config`` describes.

    Under torchrun every process calls this; the batch is split across them. SIGINT / SIGTERM make the
    run save a checkpoint and return early. Returns ``{"iteration", "completed", "stopped_by" (signal
    name or None), "checkpoint", "loss" (mean of the last log window), "eval" (the last evaluation's
    ``depict_analysis.models.evaluate.evaluate`` scores, or None)}``.
    """
    with distributed(config.device) as (env, device), StopSignals() as stop, run_lock(Path(config.out_dir), env.main):
        run = _Run(config, env, device, resume)
        try:
            return run.loop(stop, show=progress and env.main)
        finally:
            run.stream.close()  # stops the DataLoader's worker processes now, also after an error
