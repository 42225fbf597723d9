"""Image sources for the analyses: a list of files / folders, or a dataset split, in model-ready batches.

``ImageSource`` is what a run reads: files / folders (with optional label maps) or a dataset split, how
many images, and the view each image is seen in:

- ``crop``: resized (short side) and centre-cropped to a square of the model's training size (or
  ``size``), so that images batch on one token grid;
- ``whole``: each image alone at its own aspect, the short side capped at that size (``pca-seg IMAGE``);
- ``evaluation``: each image as ``depict eval`` scores it (the dataset's test resize, sliding windows,
  merged logits; ``labelled_dataset`` gives the images to ``robustness.EvaluationImages``).

``ImageSource.batches(model)`` gives the number of images and their ``Batch``es for one model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
import torch.nn.functional as F
from torch import Tensor

from depict_analysis.foundation import distributed
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.models.data import (DatasetError, FileSegmentationDataset, SegmentationDataset, build_dataset, load_image,
                                         load_label, make_palette)
from depict_analysis.models.data.base import image_to_tensor
from depict_analysis.models.data.transforms import resize_image, resize_label

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class Batch:
    """Images of one size, ready for ``trace``: what ``load_images`` returns (a.k.a. ``Images``)."""

    pixels: Tensor  # (B, 3, S, S) in [0, 1], for figures
    labels: Tensor | None  # (B, S, S) with 255 = ignore, None without ground truth
    paths: list[str]
    # the classes of the dataset the labels come from (checked against them when read); None: label
    # files given by the user, which ``trace`` checks against the model's classes
    label_classes: int | None = None


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus the image files inside named folders (sorted)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            files.append(source)
        else:
            raise DatasetError(f"{source}: no such image file or folder")
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, sources))}")
    return files


def matching_labels(images: Sequence[Path], labels: Sequence[str | Path]) -> list[Path]:
    """For each image, the label file of the same stem among ``labels`` (files, or folders of them)."""
    by_stem: dict[str, Path] = {}
    for source in map(Path, labels):
        if not source.exists():
            raise DatasetError(f"{source}: no such label file or folder")
        for path in sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]:
            by_stem.setdefault(path.stem, path)
    missing = [f.name for f in images if f.stem not in by_stem]
    if missing:
        raise DatasetError(f"no label map named like {missing[0]} in {', '.join(map(str, labels))} ({len(missing)} missing)")
    return [by_stem[f.stem] for f in images]


def _read(image: Path, label: Path | None) -> tuple[Tensor, Tensor | None, str]:
    """(pixels (3, H, W), label (H, W) or None, path) of one image file and its optional label map."""
    pixels = image_to_tensor(load_image(image))
    if label is None:
        return pixels, None, str(image)
    target = torch.from_numpy(load_label(label))
    if target.shape != pixels.shape[1:]:
        raise DatasetError(f"label {label} is {tuple(target.shape)} but image {image} is {tuple(pixels.shape[1:])}")
    return pixels, target, str(image)


def square_crop(pixels: Tensor, size: int, label: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Resize the short side to ``size`` (bilinear; labels nearest) and take the centre square.

    pixels: (3, H, W), label: (H, W) -> (3, size, size), (size, size). Equal sizes let images batch.
    """
    H, W = pixels.shape[-2:]
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    top, left = (h - size) // 2, (w - size) // 2
    pixels = F.interpolate(pixels[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    pixels = pixels[:, top : top + size, left : left + size].clamp(0, 1)
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        label = label[top : top + size, left : left + size]
    return pixels, label


def image_batches(
    size: int,
    images: Sequence[str | Path] | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    split: str = "val",
    num_images: int | None = None,
    batch_size: int = 8,
    labels: Sequence[str | Path] | None = None,
    shard: bool = False,
) -> tuple[int, Iterator[Batch]]:
    """(number of images, iterator of Batches) from image files/folders or a dataset split.

    Every image is resized and centre-cropped to ``size`` × ``size`` so that a batch shares one token grid.
    ``labels`` (with ``images`` only): label maps or folders of them, matched to the images by file stem.
    ``shard``: only this process's batches under ``torchrun`` (every ``world``-th, ``foundation.distributed.shard``),
    the others not read; the number is then of this process's images. The batches are those of one process.
    """
    if (images is None) == (dataset is None):
        raise ConfigError("give either images (files / folders) or a dataset, not both")
    if labels is not None and images is None:
        raise ConfigError("label files go with image files; a dataset brings its own labels")
    if images is not None:
        files = image_files(images)[:num_images]
        label_paths = matching_labels(files, labels) if labels is not None else [None] * len(files)
        read: Callable[[int], tuple] = lambda i: _read(files[i], label_paths[i])  # noqa: E731
        total, label_classes = len(files), None
    else:
        ds = build_dataset(dataset, data_root, split)
        total, label_classes = min(len(ds), num_images or len(ds)), ds.n_cls
        read = lambda i: (lambda item: (item["image"], item["label"], item["path"]))(ds[i])  # noqa: E731
    starts = range(0, total, batch_size)
    chosen = [starts[b] for b in distributed.shard(len(starts))] if shard else list(starts)

    def batches() -> Iterator[Batch]:
        for start in chosen:
            chunk = [(*square_crop(pixels, size, label), path)
                     for pixels, label, path in map(read, range(start, min(start + batch_size, total)))]
            yield _collate(chunk, label_classes)

    return sum(min(batch_size, total - start) for start in chosen), batches()


def image_at_scale(path: str | Path, max_short_side: int, gt: str | Path | None = None) -> Batch:
    """One image (any size and mode) as a Batch of one, with its ground truth when given.

    Images whose short side exceeds ``max_short_side`` are resized (aspect kept) so that it equals it
    — the short-side resize of the evaluation protocol, and a bound on the token count; smaller
    images keep their size. The label map must have the image's size (nearest-neighbour resize).
    """
    image = np.array(load_image(path))
    label = load_label(gt) if gt is not None else None
    if label is not None and label.shape != image.shape[:2]:
        raise DatasetError(f"ground truth {gt} is {label.shape[1]}x{label.shape[0]} but image {path} "
                           f"is {image.shape[1]}x{image.shape[0]}")
    H, W = image.shape[:2]
    if min(H, W) > max_short_side:
        scale = max_short_side / min(H, W)
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        image = resize_image(image, size)
        label = resize_label(label, size) if label is not None else None
    pixels = image_to_tensor(image)[None]
    labels = torch.from_numpy(label)[None] if label is not None else None
    return Batch(pixels, labels, [str(path)])


VIEWS = ("crop", "whole", "evaluation")


@dataclass(frozen=True)
class ImageSource:
    """The images of a run (see the module docstring): ``images`` (files / folders) or a ``dataset`` split.

    ``labels``: label maps (class ids, 255 = ignore) for ``images``: with the ``crop`` view files or
    folders matched to the images by file stem; with the ``whole`` view one file per image, in order.
    ``num_images``: the first N images (all by default; the ``whole`` view takes every image given).
    ``size``: the crop side, or the ``whole`` view's cap on the short side (default: each model's
    training size). ``batch_size``: images per forward pass (``whole``: one).
    """

    images: tuple[Path, ...] = ()
    labels: tuple[Path, ...] = ()
    dataset: str | None = None
    data_root: Path | None = None
    split: str = "val"
    num_images: int | None = None
    view: str = "crop"
    size: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images or ()))
        object.__setattr__(self, "labels", tuple(Path(p) for p in self.labels or ()))
        if bool(self.images) == (self.dataset is not None):
            raise ConfigError("give either images (files / folders) or a dataset, not both")
        if self.labels and not self.images:
            raise ConfigError("label files go with image files; a dataset brings its own labels")
        if self.view not in VIEWS:
            raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got {self.view!r}")
        if self.view == "whole" and self.labels and len(self.labels) != len(self.images):
            raise InputError(f"got {len(self.labels)} ground-truth maps for {len(self.images)} images; "
                             "give one label map per image, in order")

    def side(self, model: torch.nn.Module) -> int:
        """The crop side (or short-side cap) for ``model``: ``size``, else its training size."""
        return self.size or max(model.config.backbone.image_size)

    def batches(self, model: torch.nn.Module, shard: bool = False) -> tuple[int, Iterator[Batch]]:
        """(number of images, iterator of ``Batch``es) as ``model`` sees them; ``shard``: only this
        process's batches under ``torchrun`` (every ``world``-th, as ``image_batches``), and their number of images."""
        side = self.side(model)
        if self.view == "whole":
            pairs = list(zip(self.images, self.labels or [None] * len(self.images)))
            pairs = [pairs[i] for i in distributed.shard(len(pairs))] if shard else pairs
            return len(pairs), (image_at_scale(path, side, label) for path, label in pairs)
        return self.crops(side, shard)

    def crops(self, side: int, shard: bool = False) -> tuple[int, Iterator[Batch]]:
        """(number of images, iterator of ``Batch``es) of ``side`` × ``side`` crops (``image_batches``)."""
        return image_batches(side, images=self.images or None, dataset=self.dataset, data_root=self.data_root,
                             split=self.split, num_images=self.num_images, batch_size=self.batch_size,
                             labels=self.labels or None, shard=shard)

    def count(self) -> int:
        """The number of images: the first ``num_images`` of the files or the split (all by default)."""
        total = len(image_files(self.images)) if self.images else len(build_dataset(self.dataset, self.data_root, self.split))
        return total if self.num_images is None else min(total, self.num_images)

    def labelled_dataset(self, n_cls: int) -> SegmentationDataset:
        """The images as a dataset read untransformed by the evaluation protocol: the split itself, or the
        image files with their label maps (matched by stem; ``n_cls`` classes named ``class i``, no test resize)."""
        if self.dataset is not None:
            return build_dataset(self.dataset, self.data_root, self.split)
        files = image_files(self.images)
        labels = matching_labels(files, self.labels) if self.labels else [None] * len(files)
        return FileSegmentationDataset(self.split, list(zip(files, labels)), [f"class {i}" for i in range(n_cls)],
                                       make_palette(n_cls), expected="image files")

    def require_classes(self, model: torch.nn.Module) -> None:
        """Refuse to score ``model`` against this dataset's labels when it predicts another number of
        classes: the scores would mean nothing. Image files carry no class list: nothing to check."""
        if self.dataset is not None:
            from depict_analysis.models.evaluate import check_classes

            check_classes(model, build_dataset(self.dataset, self.data_root, self.split))

    def describe(self) -> dict[str, Any]:
        """What results record as the run's input: the options given (``whole``: the images and their
        ground truth)."""
        if self.view == "whole":
            return {"images": list(self.images), "ground_truth": list(self.labels) or None}
        given = {"images": list(self.images), "dataset": self.dataset, "data_root": self.data_root, "split": self.split,
                 "num_images": self.num_images, "labels": list(self.labels)}
        return {key: value for key, value in given.items() if value}


def load_images(
    paths: str | Path | Sequence[str | Path],
    model: torch.nn.Module | None = None,
    *,
    size: int | None = None,
    labels: Sequence[str | Path] | None = None,
) -> Batch:
    """Image files (or folders of them) as one batch ready for ``trace(model, images)``.

    Every image is resized and centre-cropped to ``size`` x ``size`` (default: the model's training
    size) so that the batch shares one token grid; pixels stay in [0, 1]. ``labels``: label maps (or
    folders of them) matched to the images by file stem.
    """
    if model is not None and getattr(model, "config", None) is None:
        raise ConfigError(f"load_images takes a model of create_model / load_model, got {type(model).__name__}")
    if size is None:
        if model is None:
            raise ConfigError("load_images needs a model or a size to crop the images to")
        size = max(model.config.backbone.image_size)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"size must be a positive integer (pixels), got {size!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not all(isinstance(p, (str, Path)) for p in paths):
        raise ConfigError(f"paths must be a file or folder, or a list of them, got {type(paths).__name__}")
    sources = list(paths)
    total, batches = image_batches(size, images=sources, labels=labels, batch_size=max(1, len(image_files(sources))))
    return next(batches)


def _collate(chunk: list, label_classes: int | None) -> Batch:
    pixels = torch.stack([c[0] for c in chunk])
    has_labels = chunk[0][1] is not None
    labels = torch.stack([c[1] for c in chunk]) if has_labels else None
    return Batch(pixels, labels, [c[2] for c in chunk], label_classes)


@contextmanager
def image_progress(
    total: int | None, description: str, enabled: bool = True, unit: str = "images"
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over images (or other ``unit``s) on stderr; yields ``advance(n)``.

    Shown only on a terminal (a log file gets nothing) and removed when done.
    """
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
