"""A user's own dataset in a plain folder.

Layout::

    root/classes.yaml          classes: [{name: cat, color: [255, 0, 0]}, ...]   (color optional)
    root/images[/<split>]/*.{jpg,jpeg,png,bmp,tif,tiff,webp}
    root/masks[/<split>]/<same stem>.png      single-channel class indices, 255 = ignore

Split subfolders are optional: without ``images/<split>`` every split reads ``images/`` itself.
A missing mask (predict-only use) gives a label of all 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from depict_analysis.foundation.yaml_text import load_yaml

from .base import DatasetError, FileSegmentationDataset, Transform, require_dir
from .classes import make_palette

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_rgb(colour: object) -> bool:
    return (isinstance(colour, list) and len(colour) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in colour))


def read_classes_yaml(path: Path) -> tuple[list[str], np.ndarray]:
    """Parse ``classes.yaml`` -> (names, palette ``(n, 3)`` uint8); missing colours get
    ``make_palette`` colours. Raises ``DatasetError`` with the expected format otherwise."""
    expected = "expected 'classes: [{name: str, color: [r, g, b]}, ...]'"
    if not path.is_file():
        raise DatasetError(f"expected the class list at {path}, written as "
                           "'classes: [{name: str, color: [r, g, b]}, ...]'")
    try:
        entries = (load_yaml(path.read_text(), str(path)) or {}).get("classes")
    except (yaml.YAMLError, AttributeError) as err:
        raise DatasetError(f"cannot parse {path}: {expected} ({type(err).__name__})") from None
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{path} has no class list: {expected}")
    names, palette = [], make_palette(len(entries))
    for i, entry in enumerate(entries):
        colour = entry.get("color") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and (colour is None or _is_rgb(colour))):
            raise DatasetError(f"{path}: class entry {i} is {repr(entry)[:80]}; {expected}")
        names.append(entry["name"])
        if colour is not None:
            palette[i] = colour
    return names, palette


class FolderDataset(FileSegmentationDataset):
    """Images + optional masks + ``classes.yaml`` (see the module docstring)."""

    name = "folder"

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Transform | None = None) -> None:
        base = require_dir(Path(root), "the dataset folder")
        class_names, palette = read_classes_yaml(base / "classes.yaml")
        image_dir = require_dir(base / "images", "the images folder")
        mask_dir = base / "masks"
        suffixes = ", ".join(IMAGE_SUFFIXES)
        expected = f"image files ({suffixes}) in {image_dir / split} or {image_dir}"
        if (image_dir / split).is_dir():
            image_dir, mask_dir = image_dir / split, mask_dir / split
        samples = [
            (image, mask if (mask := mask_dir / f"{image.stem}.png").is_file() else None)
            for image in sorted(image_dir.iterdir())
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES
        ]
        super().__init__(split, samples, class_names, palette, transform, expected=expected)
