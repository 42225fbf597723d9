"""Shared pieces of every dataset: the error type, image/label reading, the dataset base classes.

A dataset item is ``{"image": FloatTensor (3, H, W), "label": LongTensor (H, W), "path": str}``;
label 255 means "ignore". Without a transform the image is in [0, 1] (not normalised).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import warnings
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from depict_analysis.foundation.errors import DatasetError

IGNORE_INDEX = 255
# Images (and labels) above this many pixels are refused before they are decoded: 100 megapixels
# take 300 MB as RGB, and every command handles them in bounded memory.
MAX_PIXELS = 100_000_000
T = TypeVar("T")

#: ``transform(image: PIL RGB, label: int64 (H, W))``
#: ``-> (FloatTensor (3, h, w), LongTensor (h', w'))``
Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]

# Modes holding more than 8 bits per sample, with the value that maps to white.
_HIGH_BIT_DEPTH_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
                         "I": 65535, "F": 1.0}
_LABEL_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and decode an image file fully, turning every failure into a ``DatasetError``; images
    over ``MAX_PIXELS`` are refused from their header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}" if not path.is_dir() else f"{what} {path} is a folder, not a file")
    try:
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: MAX_PIXELS is the limit here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        try:
            if im.width * im.height > MAX_PIXELS:
                raise DatasetError(f"{what} {path} is {im.width} x {im.height} pixels, over the limit of "
                                   f"{MAX_PIXELS // 10**6} megapixels")
            im.load()
        except BaseException:
            im.close()
            raise
        if getattr(im, "n_frames", 1) > 1:  # a multi-frame file stays open once decoded: keep its first frame
            with im:
                return im.copy()
        return im  # PIL closed the single-frame file once decoded: no copy of a large image
    except UnidentifiedImageError:
        raise DatasetError(f"cannot read {what} {path}: not an image file") from None
    except Image.DecompressionBombError:
        raise DatasetError(f"{what} {path} is over the limit of {MAX_PIXELS // 10**6} megapixels") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read {what} {path}: corrupt image ({err})") from None


def load_image(path: str | Path) -> Image.Image:
    """Read any image file as 8-bit RGB, upright.

    The EXIF orientation is applied (as OpenCV's reader, hence mmseg's, does); RGB stays as is;
    grey, palette and CMYK images are converted; alpha is dropped (the stored colour is kept);
    16-bit / 32-bit integer images are scaled so that 65535 becomes 255, float images so that 1.0
    becomes 255. Raises ``DatasetError`` if the file is missing or not an image.
    """
    im = _open(path, "image")
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode in _HIGH_BIT_DEPTH_WHITE:
        white = _HIGH_BIT_DEPTH_WHITE[im.mode]
        grey = np.asarray(im, dtype=np.float64) * (255.0 / white)
        im = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as raw values, int64 ``(H, W)`` (palette images: indices)."""
    im = _open(path, "label")
    if im.mode not in _LABEL_MODES:
        raise DatasetError(
            f"label {path} has mode {im.mode}; expected a single-channel image of class indices "
            "(mode L, P or 16-bit)"
        )
    return np.asarray(im).astype(np.int64)


def image_array(image: Image.Image) -> np.ndarray:
    """PIL RGB ``(H, W)`` -> uint8 ``(H, W, 3)``, copied a band of rows at a time: ``np.asarray``
    would hold the image's bytes twice over while joining them (600 MB for 100 megapixels)."""
    pixels = np.empty((image.height, image.width, 3), dtype=np.uint8)
    rows = max(1, (1 << 20) // max(image.width, 1))
    for top in range(0, image.height, rows):
        bottom = min(top + rows, image.height)
        pixels[top:bottom] = np.asarray(image.crop((0, top, image.width, bottom)))
    return pixels


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB ``(H, W)`` -> FloatTensor ``(3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise a ``DatasetError`` naming it as ``what``."""
    if not path.is_dir():
        raise DatasetError(f"expected {what} at {path}, but that folder does not exist")
    return path


def resolve_split(split: str, choices: Mapping[str, T], dataset: str) -> T:
    """What ``split`` ('train' / 'val') means in a layout (e.g. its folder name), or a
    ``DatasetError`` listing the valid splits."""
    if split not in choices:
        raise DatasetError(f"unknown split {split!r} for {dataset}; expected one of: "
                           f"{', '.join(choices)}")
    return choices[split]


class SegmentationDataset(Dataset):
    """Base class: a sequence of (RGB image, int64 label map) pairs, optionally transformed.

    Subclasses set ``name``, call ``__init__`` with their classes, and implement ``__len__``,
    ``_load(i)`` (valid, non-negative ``i``) and ``item_path(i)``.
    """

    name: str = "dataset"
    ignore_index: int = IGNORE_INDEX
    #: Evaluation resizes every image as mmseg's test ``Resize(img_scale=(max_ratio * base_size,
    #: base_size), keep_ratio=True)`` does (``transforms.eval_view``); ``None``: no base size.
    base_size: int | None = None
    max_ratio: int = 4

    def __init__(self, split: str, class_names: Sequence[str], palette: np.ndarray,
                 transform: Transform | None = None) -> None:
        if len(class_names) > IGNORE_INDEX:
            raise DatasetError(f"at most {IGNORE_INDEX} classes are supported (255 = ignore); "
                               f"got {len(class_names)}")
        self.split = split
        self.class_names = list(class_names)
        self.n_cls = len(self.class_names)
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(self.n_cls, 3)
        self.transform = transform

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        raise NotImplementedError

    def item_path(self, i: int) -> str:
        """A string identifying item ``i`` (its image file, for datasets on disk)."""
        raise NotImplementedError

    def load_raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Item ``i`` before any transform: PIL RGB image ``(H, W)``, int64 label ``(H, W)``.

        Labels are already mapped to ``0 .. n_cls-1`` with 255 = ignore. Negative ``i`` counts
        from the end; out of range raises ``IndexError``.
        """
        return self._load(range(len(self))[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        index = range(len(self))[i]
        image, label = self._load(index)
        if self.transform is not None:
            image_t, label_t = self.transform(image, label)
        else:
            image_t, label_t = image_to_tensor(image), torch.from_numpy(label)
        return {"image": image_t, "label": label_t, "path": self.item_path(index)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n_cls={self.n_cls}, len={len(self)})"


class FileSegmentationDataset(SegmentationDataset):
    """A dataset of ``(image file, label file or None)`` pairs; missing label = all ignore.

    Subclasses find the pairs for their layout and override ``map_label`` (raw file values ->
    ``0 .. n_cls-1`` / 255). Every loaded label is checked: a value outside that range raises a
    ``DatasetError`` naming the file and the raw value.
    """

    def __init__(self, split: str, samples: Sequence[tuple[Path, Path | None]],
                 class_names: Sequence[str], palette: np.ndarray,
                 transform: Transform | None = None, *, expected: str) -> None:
        """``expected`` describes where images should be, for the "no images found" error."""
        super().__init__(split, class_names, palette, transform)
        if not samples:
            raise DatasetError(f"no images found for split {split!r}: expected {expected}")
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def item_path(self, i: int) -> str:
        return str(self.samples[i][0])

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values (int64 ``(H, W)``) -> class indices with 255 = ignore."""
        return raw

    def _load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.samples[i]
        image = load_image(image_path)
        if label_path is None:
            return image, np.full((image.height, image.width), IGNORE_INDEX, dtype=np.int64)
        raw = load_label(label_path)
        if raw.shape != (image.height, image.width):
            raise DatasetError(f"label {label_path} is {raw.shape[1]}x{raw.shape[0]} but image "
                               f"{image_path} is {image.width}x{image.height}; "
                               "expected equal sizes")
        label = self.map_label(raw)
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.n_cls))
        if bad.any():
            raise DatasetError(
                f"label {label_path} contains value {int(raw[bad][0])}, which is not a valid "
                f"{self.name} label (classes 0..{self.n_cls - 1}, 255 = ignore)"
            )
        return image, label


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: 0 -> 255 (ignore), v -> v - 1. int64 ``(H, W)``."""
    return np.where(raw == 0, IGNORE_INDEX, raw - 1)
