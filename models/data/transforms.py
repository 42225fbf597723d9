"""Training and evaluation transforms with mmseg 0.x / Segmenter semantics, in numpy + OpenCV.

A transform maps ``(image: PIL RGB (H, W), label: int64 (H, W))`` to
``(FloatTensor (3, h, w) normalised, LongTensor label)``; label 255 = ignore.

The image operations are OpenCV's because mmseg's are (through mmcv): its uint8 bilinear resize
works in fixed point and its HSV has 180 hue levels, and neither is reproduced exactly by a float
implementation (torch's bilinear resize differs by one grey level on about 13 % of the values, and
a nearest-neighbour rule at pixel centres picks a neighbouring pixel on about half of them).

Randomness (``TrainTransform``): every call takes an optional ``numpy.random.Generator``. Without
one, a fresh generator is seeded from ``torch``'s global RNG (one ``torch.randint`` draw per call).
PyTorch seeds that RNG differently in every DataLoader worker (``base_seed + worker_id``, with
``base_seed`` drawn from the main process's RNG each epoch), so workers draw different
augmentations, and ``torch.manual_seed(s)`` in the main process makes a run reproducible for a
fixed ``num_workers``. No ``worker_init_fn`` is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from depict_analysis.models.backbone import NORMALIZATION
from depict_analysis.foundation.errors import ConfigError

from .base import IGNORE_INDEX, DatasetError


def normalization_stats(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` in [0, 1] units of a backbone family (``backbone.NORMALIZATION``)."""
    if kind not in NORMALIZATION:
        raise ConfigError(f"unknown normalization {kind!r}; expected one of: {', '.join(NORMALIZATION)}")
    return NORMALIZATION[kind]


def _scaled_size(size: tuple[int, ...], scale: float) -> tuple[int, int]:
    """``(h, w) * scale``, rounded half up as mmcv does, at least 1 pixel."""
    return max(int(size[0] * scale + 0.5), 1), max(int(size[1] * scale + 0.5), 1)


def rescale_size(size: tuple[int, int], scale: tuple[int, int] | float) -> tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: image ``(h, w)`` -> its new ``(h, w)``.

    ``scale`` is either ``(long, short)`` edge limits, giving the factor
    ``min(long / max(h, w), short / min(h, w))``, or the factor itself; every side becomes
    ``int(side * factor + 0.5)``.
    """
    if isinstance(scale, tuple):
        h, w = size
        scale = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return _scaled_size(size, scale)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's bilinear resize (``INTER_LINEAR``: half-pixel centres, no antialias), as mmcv's.

    ``image``: uint8 ``(H, W, 3)``; ``size``: ``(h, w)``; returns uint8 ``(h, w, 3)``.
    """
    if image.shape[:2] == tuple(size):
        return image
    resized = cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return resized.reshape(*size, *image.shape[2:])  # OpenCV drops a channel axis of length 1


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's nearest-neighbour resize (``INTER_NEAREST``) of a label map ``(H, W)`` -> ``(h, w)``.

    Output row i copies input row ``min(floor(i * (1 / (h / H))), H - 1)`` (in double precision, so
    not always ``floor(i * H / h)``), and likewise for columns: values are only copied.
    """
    if label.shape == tuple(size):
        return label
    resized = cv2.resize(np.ascontiguousarray(label, dtype=np.int32), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(label.dtype)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> FloatTensor ``(3, H, W)``: ``(image / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: ``x * alpha + beta``, clipped to [0, 255], truncated to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` on uint8 RGB ``(H, W, 3)``, its steps and draws in its order.

    Each step fires with probability 1/2: brightness (add U(-32, 32)); contrast (multiply by
    U(0.5, 1.5)), second or last, by a coin drawn after the brightness step; saturation (OpenCV
    HSV, S scaled by U(0.5, 1.5)); hue (OpenCV HSV, H shifted by an integer in [-18, 18) modulo
    180). Saturation and hue each convert to HSV and back on their own, as mmseg does.
    """
    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    def in_hsv(img: np.ndarray, channel: int, change) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., channel] = change(hsv[..., channel])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        image = in_hsv(image, 1, lambda s: _convert(s, alpha=rng.uniform(*saturation_range)))
    if rng.integers(2):
        image = in_hsv(image, 0, lambda h: (h.astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180)
    if not contrast_first:
        image = contrast(image)
    return image


def _balanced(window: np.ndarray, cat_max_ratio: float) -> bool:
    """Whether at least two classes show in ``window`` and none covers ``>= cat_max_ratio`` of its
    non-ignored pixels (mmseg's ``RandomCrop`` test)."""
    counts = np.bincount(window.ravel(), minlength=IGNORE_INDEX)[:IGNORE_INDEX]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _crop_box(label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator,
              cat_max_ratio: float) -> tuple[int, int]:
    """Top-left corner of a random crop, as mmseg's ``RandomCrop``: with ``cat_max_ratio < 1`` a
    crop failing ``_balanced`` is redrawn, up to 10 times; the 11th draw is kept unchecked."""
    margin_h, margin_w = max(label.shape[0] - crop[0], 0), max(label.shape[1] - crop[1], 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if _balanced(label[top:top + crop[0], left:left + crop[1]], cat_max_ratio):
                break
            top, left = draw()
    return top, left


class TrainTransform:
    """mmseg's training pipeline: random resize -> random crop (cat_max_ratio) -> flip ->
    photometric distortion -> normalise -> pad.

    Output: image FloatTensor ``(3, crop_h, crop_w)`` (pad value 0, after normalisation), label
    LongTensor ``(crop_h, crop_w)`` (pad value 255). Resize ratio r ~ U(ratio_range). With
    ``base_size`` the image is rescaled (aspect kept) as large as fits inside ``(int(max_ratio *
    base_size * r), int(base_size * r))`` (long, short side): mmseg's ``Resize(img_scale=(max_ratio
    * base, base), ratio_range)``, whose scale is truncated to integers before rescaling. Without
    ``base_size`` both sides are multiplied by r. Images bilinear, labels nearest (OpenCV).
    """

    def __init__(self, crop_size: int | tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 base_size: int | None = None, max_ratio: int = 4) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric
        self.base_size, self.max_ratio = base_size, max_ratio

    def _resized_size(self, height: int, width: int, ratio: float) -> tuple[int, int]:
        """``(h, w)`` of the random resize with ratio ``ratio`` (mmcv's ``rescale_size``)."""
        if self.base_size is None:
            return _scaled_size((height, width), ratio)
        long_edge, short_edge = int(self.max_ratio * self.base_size * ratio), int(self.base_size * ratio)
        scale = min(long_edge / max(height, width), short_edge / min(height, width))
        return _scaled_size((height, width), scale)

    def __call__(self, image: Image.Image, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        img = np.array(image.convert("RGB"))
        if img.shape[:2] != label.shape:
            raise DatasetError(f"image {img.shape[:2]} and label {label.shape} sizes differ")

        size = self._resized_size(*label.shape, rng.uniform(*self.ratio_range))
        img, label = resize_image(img, size), resize_label(label, size)

        top, left = _crop_box(label, self.crop, rng, self.cat_max_ratio)
        img = img[top:top + self.crop[0], left:left + self.crop[1]]
        label = label[top:top + self.crop[0], left:left + self.crop[1]]

        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)

        out_img = torch.zeros(3, *self.crop)
        out_label = torch.full(self.crop, IGNORE_INDEX, dtype=torch.long)
        h, w = label.shape
        out_img[:, :h, :w] = normalize(img, self.mean, self.std)
        out_label[:h, :w] = torch.from_numpy(np.ascontiguousarray(label))
        return out_img, out_label


Scale = tuple[int, int] | float  # mmseg's (long, short) edge limits, or a factor of the image's size


def img_scale_for(short_side: int, max_ratio: int = 4) -> tuple[int, int] | None:
    """mmseg's test ``img_scale = (max_ratio * short_side, short_side)``; ``None`` for 0 (no resize)."""
    return (max_ratio * short_side, short_side) if short_side else None


def multiscale_views(img_scale: tuple[int, int] | None, ratios: Sequence[float] = (1.0,),
               flip: bool = False) -> list[tuple[Scale, bool]]:
    """The ``(scale, flip)`` of every view of mmseg's ``MultiScaleFlipAug``, in its order.

    Each ratio multiplies both edges of ``img_scale``, truncated by ``int()``; without an
    ``img_scale`` the ratio is a factor of the image's own size. With ``flip`` every scale comes
    unflipped, then flipped.
    """
    scales = ratios if img_scale is None else [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in ratios]
    return [(scale, flipped) for scale in scales for flipped in ((False, True) if flip else (False,))]


def eval_view(image: np.ndarray, scale: Scale, flip: bool = False) -> np.ndarray:
    """One test-time view of a uint8 image ``(H, W, 3)``: mmseg's keep-ratio ``Resize`` to
    ``scale`` (``rescale_size``, bilinear) then ``RandomFlip`` (horizontal). Returns uint8."""
    image = resize_image(image, rescale_size(image.shape[:2], scale))
    return image[:, ::-1] if flip else image


class EvalTransform:
    """One test-time view (``eval_view``), then normalise. The label is returned unchanged at the
    original resolution, LongTensor ``(H, W)``: predictions are resized back and compared there."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: Scale = 1.0,
                 flip: bool = False) -> None:
        self.mean, self.std, self.scale, self.flip = tuple(mean), tuple(std), scale, flip

    def __call__(self, image: Image.Image,
                 label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = eval_view(np.array(image.convert("RGB")), self.scale, self.flip)
        return normalize(img, self.mean, self.std), torch.tensor(label, dtype=torch.long)
