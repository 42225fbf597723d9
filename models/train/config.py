"""A run's settings: ``TrainConfig`` (every option, typed and range-checked once), layered from its
sources by ``build_config`` (defaults, a resumed checkpoint, a YAML file or preset, ``key=value``
overrides, options), and the model they describe.

Budget: ``epochs`` x ceil(len(train set) / batch_size) optimizer steps, Segmenter's ``len(train_loader)
x epochs`` (no batch is dropped: an epoch's last one is smaller), unless ``iterations`` is given.
"""

from __future__ import annotations

import contextlib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.foundation.yaml_text import load_yaml
from depict_analysis.models.backbone import load_pretrained
from depict_analysis.models.checkpoint import read_checkpoint
from depict_analysis.models.registry import ModelConfig, create_model, variant_config
from depict_analysis.models.segmentor import Segmentor

PRESETS_DIR = Path(__file__).parents[1] / "configs"
OPTIMIZERS = ("sgd", "adamw")
MODEL_FIELDS = ("model", "crop_size")  # the training options that define the model: fixed once a run has a checkpoint


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


class ResumePoint:
    """A training checkpoint to continue from, read from disk once, when first needed: ``build_config``
    takes its options, ``train`` its state (weights, optimizer, iteration, RNG). Pass the same
    ``ResumePoint`` to both (a path given to each is read by each)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._state: dict | None = None
        self._options: dict[str, Any] | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The run's TrainConfig as its checkpoint saved it."""
        if self._options is None:
            self._state = self._read()
        return self._options

    def take_state(self) -> dict:
        """The checkpoint's contents, handed over: this object keeps no copy of the weights and optimizer
        state while the run trains (taken a second time, the file is read again)."""
        state, self._state = self._state, None
        return state if state is not None else self._read()

    def _read(self) -> dict:
        state = read_checkpoint(self.path)
        self._options = dict(state.get("train_config") or {})
        return state


def resume_point(resume: str | Path | ResumePoint | None) -> ResumePoint | None:
    """``resume`` as a ``ResumePoint`` (nothing is read yet); None stays None."""
    return resume if resume is None or isinstance(resume, ResumePoint) else ResumePoint(resume)


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
    *, resume: str | Path | ResumePoint | None = None, config_file: str | Path | None = None, overrides: Sequence[str] = (),
    **options: Any,
) -> TrainConfig:
    """Layer the sources of a run's settings, later ones winning: TrainConfig's defaults, the config of
    the checkpoint to ``resume`` (without its ``stop_after``), ``config_file`` (YAML or preset name),
    ``overrides`` (``key=value``) and ``options`` (None = not given). A layer that sets ``epochs``
    without ``iterations`` also clears the ``iterations`` of the layers before it. A resumed run
    keeps its model: the later layers may not change ``MODEL_FIELDS``."""
    layers: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}
    point = resume_point(resume)
    if point is not None:
        trained = dict(point.options)
        trained.pop("stop_after", None)
    if config_file is not None:
        layers.append(load_yaml_config(config_file))
    layers.append(parse_overrides(overrides))
    layers.append({key: value for key, value in options.items() if value is not None})
    for layer in layers:
        changed = next((key for key in MODEL_FIELDS if key in layer and key in trained and layer[key] != trained[key]), None)
        if changed:
            raise ConfigError(f"resume {point.path} continues a run of {changed} {trained[changed]!r}; "
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
