"""Cityscapes (fine annotations, 19 train ids, 255 = ignore).

Layout: ``leftImg8bit/{train,val}/<city>/<prefix>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<prefix>_gtFine_labelTrainIds.png`` (made by cityscapesScripts'
``createTrainIdLabelImgs``). Train ids pass through unchanged.
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError, FileSegmentationDataset, Transform, require_dir, resolve_split
from .classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

_SPLIT_DIRS = {"train": "train", "val": "val"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


class Cityscapes(FileSegmentationDataset):
    """Cityscapes semantic segmentation, 19 classes."""

    name = "cityscapes"
    base_size, max_ratio = 1024, 2  # the test Resize(img_scale=(2048, 1024))

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Transform | None = None) -> None:
        folder = resolve_split(split, _SPLIT_DIRS, self.name)
        base = require_dir(Path(root), "the Cityscapes root (holding leftImg8bit/ and gtFine/)")
        image_dir = require_dir(base / "leftImg8bit" / folder, "Cityscapes images")
        label_dir = require_dir(base / "gtFine" / folder, "Cityscapes fine annotations")
        samples = []
        for image in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
            prefix = image.name[: -len(_IMAGE_SUFFIX)]
            label = label_dir / image.parent.name / f"{prefix}{_LABEL_SUFFIX}"
            if not label.is_file():
                raise DatasetError(f"image {image} has no train-id label; expected {label} "
                                   "(create it with cityscapesscripts' createTrainIdLabelImgs)")
            samples.append((image, label))
        super().__init__(split, samples, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, transform,
                         expected=f"<city>/*{_IMAGE_SUFFIX} files in {image_dir}")
