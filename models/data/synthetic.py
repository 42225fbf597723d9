"""Procedural "textured shapes" dataset: no files, every item a pure function of (seed, split, i).

Each image shows 2-5 overlapping objects (later ones occlude earlier ones; the label is the
top-most object) on a background of two-colour wavy blobs. A class is a fixed (shape, texture)
pair; texture period/orientation, size, position and rotation are random:

    0 background   wavy two-colour blobs      4 ring      solid
    1 disc         checker                    5 cross     stripes
    2 square       stripes                    6 star      checker
    3 triangle     dots                       7 ellipse   dots

Every colour (object, texture, background) is drawn uniformly from the RGB cube for every class
and every pixel shows one of them, so the colour of a pixel carries no information about its
class: a model must use shape and texture. A global lighting gradient and pixel noise are added.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from .base import DatasetError, SegmentationDataset, Transform, resolve_split
from .classes import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

_SPLIT_STREAMS = {"train": 0, "val": 1}  # independent random streams: splits never share an item
_DEFAULT_LENGTH = {"train": 1000, "val": 200}

Array = np.ndarray


def _triangle(u: Array, v: Array) -> Array:
    angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.all(u[..., None] * np.cos(angles) + v[..., None] * np.sin(angles) <= 0.55, axis=-1)


def _star(u: Array, v: Array) -> Array:
    phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0  # five points at phase 0
    return np.hypot(u, v) <= 0.45 + 0.55 * np.abs(2 * phase - 1)


# Shapes in the object's frame (u, v), where the object's radius is 1: (H, W) -> bool (H, W).
_SHAPES: dict[str, Callable[[Array, Array], Array]] = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _triangle,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.78) <= 0.22,
    "cross": lambda u, v: ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0))
    | ((np.abs(v) <= 0.28) & (np.abs(u) <= 1.0)),
    "star": _star,
    "ellipse": lambda u, v: u * u + 4.0 * v * v <= 1.0,
}

# Textures on (s, t) = pixel offsets rotated and divided by the period: -> bool (H, W), True
# where the second colour shows.
_TEXTURES: dict[str, Callable[[Array, Array], Array]] = {
    "solid": lambda s, t: np.zeros(s.shape, dtype=bool),
    "stripes": lambda s, t: (s % 1.0) < 0.5,
    "checker": lambda s, t: (np.floor(s) + np.floor(t)) % 2 == 0,
    "dots": lambda s, t: (s - np.round(s)) ** 2 + (t - np.round(t)) ** 2 < 0.32**2,
}

# Class index -> (shape, texture); index 0 is the background.
CLASS_STYLES: tuple[tuple[str, str], ...] = (
    ("disc", "checker"), ("square", "stripes"), ("triangle", "dots"), ("ring", "solid"),
    ("cross", "stripes"), ("star", "checker"), ("ellipse", "dots"),
)


def _rotate(dx: Array, dy: Array, angle: float) -> tuple[Array, Array]:
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _texture(rng: np.random.Generator, name: str, dx: Array, dy: Array, scale: float) -> Array:
    s, t = _rotate(dx, dy, rng.uniform(0, np.pi))
    period = rng.uniform(3.0, 6.0) * scale
    return _TEXTURES[name](s / period, t / period)


def render_scene(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """Draw one scene: image uint8 ``(size, size, 3)``, label int64 ``(size, size)``."""
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: sum of three random plane waves, thresholded -> two-colour wavy blobs.
    direction, phase = rng.uniform(0, 2 * np.pi, (2, 3, 1, 1))
    freq = 2 * np.pi / (rng.uniform(16.0, 40.0, (3, 1, 1)) * scale)
    field = np.cos(freq * (np.cos(direction) * xx + np.sin(direction) * yy) + phase)
    image = np.where((field.sum(0) > 0)[..., None], *rng.random((2, 1, 1, 3)))
    label = np.zeros((size, size), dtype=np.int64)

    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, len(CLASS_STYLES) + 1))
        shape, texture = CLASS_STYLES[cls - 1]
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(0.12, 0.3) * size
        dx, dy = xx - cx, yy - cy
        u, v = _rotate(dx, dy, rng.uniform(0, 2 * np.pi))
        mask = _SHAPES[shape](u / radius, v / radius)
        colours = rng.random((2, 3))
        pattern = _texture(rng, texture, dx, dy, scale)[mask]
        image[mask] = np.where(pattern[:, None], colours[1], colours[0])
        label[mask] = cls

    # Class-independent nuisances: a lighting gradient and pixel noise.
    gx, gy = rng.uniform(-0.2, 0.2, 2)
    image += (gx * (xx / size - 0.5) + gy * (yy / size - 0.5))[..., None]
    image += rng.normal(0.0, 0.03, image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), label


class SyntheticShapes(SegmentationDataset):
    """``len = length`` procedurally drawn ``size x size`` scenes, 8 classes (0 = background).

    Item ``i`` of split ``split`` is drawn from ``np.random.default_rng([seed, split_stream, i])``,
    so it does not depend on worker, order or what was drawn before; train and val use
    different streams. Default length: 1000 (train), 200 (val).
    """

    name = "synthetic"

    def __init__(self, split: str = "train", transform: Transform | None = None, *,
                 size: int = 64, length: int | None = None, seed: int = 0) -> None:
        self._stream = resolve_split(split, _SPLIT_STREAMS, self.name)
        super().__init__(split, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, transform)
        if size < 8 or (length is not None and length < 1):
            raise DatasetError(f"synthetic dataset needs size >= 8 and length >= 1; got "
                             f"size={size}, length={length}")
        self.size, self.seed = size, seed
        self.length = _DEFAULT_LENGTH[split] if length is None else length

    def __len__(self) -> int:
        return self.length

    def item_path(self, i: int) -> str:
        return f"synthetic://{self.split}/seed{self.seed}/{i}"

    def _load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        rng = np.random.default_rng([self.seed, self._stream, i])
        image, label = render_scene(rng, self.size)
        return Image.fromarray(image), label
