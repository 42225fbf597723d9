"""Where a model comes from, and what it says about itself: ``open_checkpoint(source)``.

A source is one of:

- our ``.pt`` file, or an official DEPICT / CBT / Segmenter release folder (or its ``checkpoint.pth``);
- ``builtin:NAME``, a model shipped with the package (``depict-sa``, ``depict-ca``, ``segmenter``);
- ``zoo:NAME``, an official release by name, downloaded on first use (``depict zoo list``).

``CheckpointInfo`` is what the metadata says about the model, in one place: the dataset it was
trained on (and so its class names and colours), the iteration, and the inference protocol an
official release records.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depict_analysis.models.checkpoint import load_model
from depict_analysis.models.data import DatasetError, class_info, make_palette
from depict_analysis.models.segmentor import Segmentor

BUILTIN = "builtin:"
ZOO = "zoo:"
RUN_CHECKPOINTS = ("checkpoint.pt", "checkpoint.pth")  # named after their folder: a run, a release


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
        return self._classes()[0]

    @property
    def palette(self) -> np.ndarray:
        """Class colours (n_cls, 3) uint8: the training dataset's, else ``make_palette(n_cls)``."""
        return self._classes()[1]

    def _classes(self) -> tuple[list[str], np.ndarray]:
        if self.dataset is not None:
            try:
                names, palette = class_info(self.dataset)
            except DatasetError:  # a dataset without fixed classes (folder)
                names = []
            if len(names) == self.n_cls:
                return list(names), np.asarray(palette)
        return [f"class {i}" for i in range(self.n_cls)], make_palette(self.n_cls)


def trained_dataset(meta: dict[str, Any]) -> str | None:
    """The dataset a checkpoint was trained on: our run's ``train_config``, or an official variant.yml's."""
    ours = (meta.get("train_config") or {}).get("dataset")
    official = ((meta.get("variant") or {}).get("dataset_kwargs") or {}).get("dataset")
    name = ours or official
    return name if isinstance(name, str) else None


def source_label(source: str | os.PathLike) -> str:
    """A short name for a source: a built-in model's label, a zoo release's name, a run's or release's
    folder (for ``checkpoint.pt`` / ``checkpoint.pth`` and release folders), else the file's stem."""
    from depict_analysis.models.pretrained import LABELS  # the package data, only when a label is asked for

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


def open_checkpoint(
    source: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trust: bool = False,
    label: str | None = None,
) -> tuple[Segmentor, CheckpointInfo]:
    """(model in eval mode on ``device``, its ``CheckpointInfo``) of any source (see the module
    docstring); the built-in DEPICT-SA when ``source`` is None. ``label`` names the model in figures
    and tables (default: ``source_label``). A zoo release is downloaded only here, the first time it
    is named."""
    from depict_analysis.models.pretrained import DEFAULT_MODELS, load_default

    text = f"{BUILTIN}{DEFAULT_MODELS[0]}" if source is None else str(source)
    if text.startswith(BUILTIN):
        name = text[len(BUILTIN):]
        model, meta = load_default(name, device)
        origin = "builtin"
    elif text.startswith(ZOO):
        from depict_analysis.models.zoo import zoo_path

        model, meta = load_model(zoo_path(text[len(ZOO):]), device, trust)
        origin = "zoo"
    else:
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
    return model, info
