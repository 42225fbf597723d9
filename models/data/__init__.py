"""Datasets, transforms, class names and palettes.

``build_dataset(name, root, split, transform=..., **kwargs)`` is the entry point; every dataset is a
``SegmentationDataset`` whose items are ``{"image": (3, H, W) float, "label": (H, W) long with
255 = ignore, "path": str}``.
"""

from __future__ import annotations

from pathlib import Path

from .ade20k import ADE20K
from .base import (IGNORE_INDEX, DatasetError, FileSegmentationDataset, SegmentationDataset,
                   Transform, load_image, load_label)
from .cityscapes import Cityscapes
from .classes import class_info, make_palette
from .folder import FolderDataset
from .pascal_context import PascalContext, PascalContext59
from .synthetic import SyntheticShapes
from .transforms import EvalTransform, TrainTransform, normalization_stats

_FILE_DATASETS: dict[str, type[FileSegmentationDataset]] = {
    "ade20k": ADE20K,
    "pascal_context": PascalContext,
    "pascal_context59": PascalContext59,
    "cityscapes": Cityscapes,
    "folder": FolderDataset,
}
DATASETS: tuple[str, ...] = (*_FILE_DATASETS, "synthetic")


def test_scale(name: str | None) -> tuple[int | None, int]:
    """``(base_size, max_ratio)`` of a dataset's test ``Resize`` by name, without its files:
    ``(None, 4)`` for a dataset without a base size, or an unknown name."""
    dataset = {**_FILE_DATASETS, "synthetic": SyntheticShapes}.get(name or "", SegmentationDataset)
    return dataset.base_size, dataset.max_ratio


def build_dataset(name: str, root: str | Path | None, split: str, *,
                  transform: Transform | None = None, **kwargs) -> SegmentationDataset:
    """Build dataset ``name`` (one of ``DATASETS``) for ``split`` ('train' / 'val').

    ``root`` is the dataset folder (ignored for ``synthetic``). ``kwargs`` go to the dataset
    class; ``synthetic`` takes ``size=64, length=None, seed=0``. Raises ``DatasetError`` for an
    unknown name, a missing root or a wrong layout.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if name != "synthetic" and root is None:
        raise DatasetError(f"dataset {name!r} needs a root folder")
    try:
        if name == "synthetic":
            return SyntheticShapes(split, transform, **kwargs)
        return _FILE_DATASETS[name](root, split, transform, **kwargs)
    except TypeError as e:  # options of the wrong name or type, e.g. from a training config's dataset_kwargs
        raise DatasetError(f"dataset {name!r} does not take the options {kwargs} ({e})") from None


__all__ = [
    "ADE20K", "DATASETS", "IGNORE_INDEX", "Cityscapes", "DatasetError", "EvalTransform",
    "FolderDataset", "PascalContext", "PascalContext59", "SegmentationDataset", "SyntheticShapes",
    "TrainTransform", "Transform", "build_dataset", "class_info", "load_image", "load_label",
    "make_palette", "normalization_stats", "test_scale",
]
