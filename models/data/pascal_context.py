"""Pascal Context (mmseg layout): 60 classes with background = class 0 (``pascal_context``, as the
paper and Segmenter score it), or 59 with background ignored (``pascal_context59``).

Layout under ``VOCdevkit/VOC2010``: ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``
(0 = background, 1..59 = classes), ``ImageSets/SegmentationContext/{train,val}.txt`` (one id per
line). ``root`` may be ``VOC2010``, ``VOCdevkit`` or the folder holding ``VOCdevkit``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (DatasetError, FileSegmentationDataset, Transform, reduce_zero_label,
                   require_dir, resolve_split)
from .classes import (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE,
                      PASCAL_CONTEXT60_CLASSES, PASCAL_CONTEXT60_PALETTE)

_SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}


def _voc2010(root: Path) -> Path:
    for candidate in (root / "VOCdevkit" / "VOC2010", root / "VOC2010", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(f"expected Pascal Context at {root} (a folder with VOCdevkit/VOC2010/"
                       "JPEGImages, SegmentationClassContext and ImageSets/SegmentationContext)")


class PascalContext(FileSegmentationDataset):
    """Pascal Context with 60 classes: raw values kept, 0 = background is a class."""

    name = "pascal_context"
    base_size, max_ratio = 520, 8  # Segmenter's test Resize(img_scale=(8 * 520, 520))
    _classes, _palette = PASCAL_CONTEXT60_CLASSES, PASCAL_CONTEXT60_PALETTE

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Transform | None = None) -> None:
        split_file_name = resolve_split(split, _SPLIT_FILES, self.name)
        base = _voc2010(Path(root))
        image_dir = base / "JPEGImages"
        label_dir = require_dir(base / "SegmentationClassContext", "Pascal Context masks")
        split_file = base / "ImageSets" / "SegmentationContext" / split_file_name
        if not split_file.is_file():
            raise DatasetError(f"expected the Pascal Context split list at {split_file}")
        samples = []
        for image_id in split_file.read_text().split():
            image, label = image_dir / f"{image_id}.jpg", label_dir / f"{image_id}.png"
            for path in (image, label):
                if not path.is_file():
                    raise DatasetError(f"{split_file} lists {image_id!r}, "
                                       f"but {path} does not exist")
            samples.append((image, label))
        super().__init__(split, samples, self._classes, self._palette, transform,
                         expected=f"image ids listed in {split_file}")


class PascalContext59(PascalContext):
    """Pascal Context with 59 classes: raw 0 (background) -> 255, v -> v - 1."""

    name = "pascal_context59"
    _classes, _palette = PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return reduce_zero_label(raw)
