"""Image sources for the analyses: a list of files / folders, or a dataset split, in model-ready batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
import torch.nn.functional as F
from torch import Tensor

from models.data import DatasetError, build_dataset, load_image
from models.data.base import image_to_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


@dataclass
class Batch:
    pixels: Tensor  # (B, 3, S, S) in [0, 1], for figures
    labels: Tensor | None  # (B, S, S) with 255 = ignore, None without ground truth
    paths: list[str]


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus the image files inside named folders (sorted)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            files.append(source)
        else:
            raise DatasetError(f"{source}: no such image file or folder")
    if not files:
        raise DatasetError(f"no images found in {', '.join(map(str, sources))}")
    return files


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
) -> tuple[int, Iterator[Batch]]:
    """(number of images, iterator of Batches) from image files/folders or a dataset split.

    Every image is resized and centre-cropped to ``size`` × ``size`` so that a batch shares one token grid.
    """
    if (images is None) == (dataset is None):
        raise ValueError("give either images (files / folders) or a dataset, not both")
    if images is not None:
        files = image_files(images)[:num_images]
        items = ((image_to_tensor(load_image(f)), None, str(f)) for f in files)
        total = len(files)
    else:
        ds = build_dataset(dataset, data_root, split)
        total = min(len(ds), num_images or len(ds))
        items = ((it["image"], it["label"], it["path"]) for it in (ds[i] for i in range(total)))

    def batches() -> Iterator[Batch]:
        chunk: list = []
        for pixels, label, path in items:
            chunk.append((*square_crop(pixels, size, label), path))
            if len(chunk) == batch_size:
                yield _collate(chunk)
                chunk = []
        if chunk:
            yield _collate(chunk)

    return total, batches()


def _collate(chunk: list) -> Batch:
    pixels = torch.stack([c[0] for c in chunk])
    has_labels = chunk[0][1] is not None
    labels = torch.stack([c[1] for c in chunk]) if has_labels else None
    return Batch(pixels, labels, [c[2] for c in chunk])


@contextmanager
def image_progress(total: int | None, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over images on stderr; yields ``advance(n_images)``.

    Shown only on a terminal (a log file gets nothing) and removed when done.
    """
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
