"""ADE20K (SceneParsing / ADEChallengeData2016, mmseg layout), 150 classes.

Layout: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``ADEChallengeData2016/annotations/{training,validation}/<stem>.png``. ``root`` may be the
``ADEChallengeData2016`` folder or its parent. Raw label 0 ("other") -> 255, v -> v - 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import (DatasetError, FileSegmentationDataset, Transform, reduce_zero_label,
                   require_dir, resolve_split)
from .classes import ADE20K_CLASSES, ADE20K_PALETTE

_SPLIT_DIRS = {"train": "training", "val": "validation"}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class ADE20K(FileSegmentationDataset):
    """ADE20K scene parsing, 150 classes; items as described in ``depict_analysis.models.data.base``."""

    name = "ade20k"
    base_size, max_ratio = 512, 4  # the test Resize(img_scale=(2048, 512))

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Transform | None = None) -> None:
        folder = resolve_split(split, _SPLIT_DIRS, self.name)
        base = Path(root)
        if (base / "ADEChallengeData2016").is_dir():
            base = base / "ADEChallengeData2016"
        require_dir(base, "the ADE20K root (ADEChallengeData2016)")
        image_dir = require_dir(base / "images" / folder, "ADE20K images")
        label_dir = require_dir(base / "annotations" / folder, "ADE20K annotations")
        samples = []
        for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                raise DatasetError(f"image {image} has no annotation; expected {label}")
            samples.append((image, label))
        super().__init__(split, samples, ADE20K_CLASSES, ADE20K_PALETTE, transform,
                         expected=f"*.jpg files in {image_dir}")

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return reduce_zero_label(raw)
