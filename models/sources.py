"""Where a model comes from, and what it says about itself: ``open_checkpoint(source)`` -> ``LoadedModel``.

A source is one of:

- our ``.pt`` file, or an official DEPICT / CBT / Segmenter release folder (or its ``checkpoint.pth``);
- ``builtin:NAME``, a model shipped with the package (``depict-sa``, ``depict-ca``, ``segmenter``);
- ``zoo:NAME``, an official release by name, downloaded on first use (``depict zoo list``).

``CheckpointInfo`` is what the metadata says about the model, in one place: the dataset it was
trained on (and so its class names and colours), the iteration, and the inference protocol an
official release records. ``LoadedModel`` is the one record of a loaded model every command, the
suite, robustness and Python share: the model and its ``CheckpointInfo`` (label, source, classes).

A source may carry a name, ``NAME=SOURCE`` (``baseline=runs/a/checkpoint.pt``); ``labelled_sources``
names every source of a run (``source_label`` by default, repeats numbered).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from depict_analysis.foundation.device import resolve_device
from depict_analysis.foundation.errors import CheckpointError, ConfigError
from depict_analysis.models.checkpoint import load_model
from depict_analysis.models.data import DatasetError, class_info, make_palette
from depict_analysis.models.data.folder import IMAGE_SUFFIXES
from depict_analysis.models.pretrained import BUILTIN, CHECKPOINT_SUFFIXES, DEFAULT_MODELS, LABELS, ZOO, load_default
from depict_analysis.models.segmentor import Segmentor

RUN_CHECKPOINTS = ("checkpoint.pt", "checkpoint.pth")  # named after their folder: a run, a release


def trained_dataset(meta: dict[str, Any] | None) -> str | None:
    """The dataset a checkpoint was trained on: our run's ``train_config``, or an official variant.yml's."""
    meta = meta or {}
    ours = (meta.get("train_config") or {}).get("dataset")
    official = ((meta.get("variant") or {}).get("dataset_kwargs") or {}).get("dataset")
    name = ours or official
    return name if isinstance(name, str) else None


def dataset_classes(dataset: str | None, n_cls: int) -> tuple[list[str], np.ndarray] | None:
    """(names, colours (n_cls, 3) uint8) of ``dataset`` when it has exactly ``n_cls`` fixed classes, else None."""
    if dataset is None:
        return None
    try:
        names, palette = class_info(dataset)
    except DatasetError:  # a dataset without fixed classes (folder), or an unknown name
        return None
    return (list(names), np.asarray(palette)) if len(names) == n_cls else None


def generic_classes(n_cls: int) -> tuple[list[str], np.ndarray]:
    """``class i`` and ``make_palette(n_cls)``: the classes of a model nothing names."""
    return [f"class {i}" for i in range(n_cls)], make_palette(n_cls)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint says about its model."""

    label: str  # a short name for figures and tables: "DEPICT-SA", a run's or release's folder, a file's stem
    source: str  # what results record as the checkpoint: a path, builtin:NAME or zoo:NAME
    origin: str  # "builtin" | "zoo" | "official" | "depict-analysis"
    n_cls: int
    dataset: str | None = None  # the dataset it was trained on, when the metadata says
    iteration: int | None = None  # training iterations done (official releases: None; see meta["epoch"])
    inference: dict[str, Any] = field(default_factory=dict)  # official: variant.yml's inference_kwargs
    train_config: dict[str, Any] | None = None  # our runs: the TrainConfig they were trained with
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # everything the file holds besides weights

    @property
    def class_names(self) -> list[str]:
        """The training dataset's class names when it has exactly ``n_cls`` classes, else ``class i``."""
        return self.classes()[0]

    @property
    def palette(self) -> np.ndarray:
        """Class colours (n_cls, 3) uint8: the training dataset's, else ``make_palette(n_cls)``."""
        return self.classes()[1]

    def classes(self, images_dataset: str | None = None) -> tuple[list[str], np.ndarray]:
        """(names, colours (n_cls, 3) uint8) of the model's classes: its training dataset's; when the metadata
        names none, those of ``images_dataset`` (the dataset analysed) if it has ``n_cls`` classes; else
        ``generic_classes``."""
        if self.dataset is not None:
            return dataset_classes(self.dataset, self.n_cls) or generic_classes(self.n_cls)
        return dataset_classes(images_dataset, self.n_cls) or generic_classes(self.n_cls)

    def evaluation_dataset(self) -> tuple[str | None, str | None, dict[str, Any]]:
        """(name, root, extra arguments of ``build_dataset``) of the dataset the model was trained on, as
        far as the metadata says; a procedural dataset's ``length`` (training scenes) is left out."""
        trained = self.train_config
        if trained:
            kwargs = {k: v for k, v in (trained.get("dataset_kwargs") or {}).items() if k != "length"}
            return trained["dataset"], trained.get("data_root"), kwargs
        return self.dataset, None, {}


class LoadedModel(NamedTuple):
    """A model in memory and what its checkpoint says about it (``open_checkpoint``). Unpacks as
    ``model, info = load_model(...)``."""

    model: Segmentor
    info: CheckpointInfo

    @staticmethod
    def of(model: Segmentor, label: str, source: str | None = None) -> "LoadedModel":
        """A model built in Python (no checkpoint metadata), named ``label``; ``source`` (default ``label``)
        is what results record as where it came from."""
        return LoadedModel(model, CheckpointInfo(label, source or label, "python", model.n_cls))

    @property
    def label(self) -> str:
        return self.info.label

    @property
    def source(self) -> str:
        return self.info.source

    @property
    def family(self) -> str:
        return self.model.decoder.family

    @property
    def role(self) -> str:
        """``white-box`` | ``black-box`` | ``linear`` (``Decoder.role``)."""
        return self.model.decoder.role

    def describe(self) -> dict[str, str]:
        """What a run records about the model: label, source, decoder family and role, variant."""
        return {"label": self.label, "source": self.source, "decoder": self.family, "role": self.role,
                "variant": self.model.config.name}


def source_label(source: str | os.PathLike) -> str:
    """A short name for a source: a built-in model's label, a zoo release's name, a run's or release's
    folder (for ``checkpoint.pt`` / ``checkpoint.pth`` and release folders), else the file's stem."""
    text = str(source)
    if text.startswith(BUILTIN):
        return LABELS.get(text[len(BUILTIN):], text)
    if text.startswith(ZOO):
        return text[len(ZOO):].rstrip("/").split("/")[-1]
    path = Path(text)
    if path.name in RUN_CHECKPOINTS:
        return path.resolve().parent.name
    return path.name if path.is_dir() else path.stem


# a name for figures and tables ("baseline", "black box"), never a path: a letter, digit or _ first, then no
# separator, colon or control character
PLAIN_LABEL = re.compile(r"\w[^/\\:\x00-\x1f\x7f]*")


def parse_labelled(text: str) -> tuple[str | None, str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); a plain source -> (None, source). How the CLI reads
    ``--label`` and labelled checkpoint arguments, e.g. ``baseline=runs/seg/checkpoint.pt``.

    ``text`` is labelled only when NAME is a plain label (``PLAIN_LABEL``) and SOURCE
    exists (a file or folder, or a ``builtin:`` / ``zoo:`` name), and ``text`` itself is no existing
    file: a checkpoint named ``lr=0.1.pt`` is that file."""
    label, sep, source = text.partition("=")
    if not sep or PLAIN_LABEL.fullmatch(label) is None or not source or Path(text).exists():
        return None, text
    if not (source.startswith((BUILTIN, ZOO)) or Path(source).exists()):
        return None, text  # a missing file whose name holds "=": reported as missing under its own name
    return label, source


def is_checkpoint(argument: str) -> bool:
    """Whether a command-line argument names a model rather than an image: ``NAME=SOURCE``, ``builtin:`` /
    ``zoo:`` names, ``.pt`` / ``.pth`` files and official release folders (with ``variant.yml``)."""
    label, source = parse_labelled(argument)
    path = Path(source)
    return (label is not None or source.startswith((BUILTIN, ZOO)) or path.suffix in CHECKPOINT_SUFFIXES
            or (path / "variant.yml").is_file())


def labelled_sources(
    sources: Sequence[str | os.PathLike], labels: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(label, source) of each ``[NAME=]SOURCE``: the name given, else ``source_label``; repeated labels get
    ``#i``. ``labels`` (``NAME=SOURCE`` each) name sources among ``sources``, or add them."""
    pairs = [list(parse_labelled(str(s))) for s in sources]
    for text in labels or []:
        name, source = parse_labelled(text)
        if name is None:
            raise ConfigError(f"a label takes NAME=SOURCE, got {text!r}")
        match = next((pair for pair in pairs if pair[1] == source), None)
        if match is None:
            pairs.append([name, source])
        else:
            match[0] = name
    names = [name or source_label(source) for name, source in pairs]
    unique = [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]
    return list(zip(unique, [source for _, source in pairs]))


def open_checkpoint(
    source: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trust: bool = False,
    label: str | None = None,
) -> LoadedModel:
    """The model (in eval mode on ``device``: ``auto`` | ``cpu`` | ``cuda[:i]`` or a torch.device) and its
    ``CheckpointInfo`` of any source (see the module docstring); the built-in DEPICT-SA when ``source`` is None. ``label`` names the model in figures
    and tables (default: ``source_label``). A zoo release is
    downloaded only here, the first time it is named."""
    text = f"{BUILTIN}{DEFAULT_MODELS[0]}" if source is None else str(source)
    device = resolve_device(device) if isinstance(device, str) else device
    if text.startswith(BUILTIN):
        name = text[len(BUILTIN):]
        model, meta = load_default(name, device)
        origin = "builtin"
    elif text.startswith(ZOO):
        from depict_analysis.models.zoo import zoo_path

        model, meta = load_model(zoo_path(text[len(ZOO):]), device, trust)
        origin = "zoo"
    else:
        if Path(text).suffix.lower() in IMAGE_SUFFIXES:
            raise CheckpointError(f"{text} is an image, not a checkpoint: images go to the analysis (images=...), models here")
        model, meta = load_model(text, device, trust)
        origin = meta["source"]
    info = CheckpointInfo(
        label=label or source_label(text),
        source=text,
        origin=origin,
        n_cls=model.n_cls,
        dataset=trained_dataset(meta),
        iteration=meta.get("iteration"),
        inference=dict(meta.get("inference") or {}),
        train_config=meta.get("train_config"),
        meta=meta,
    )
    return LoadedModel(model, info)
