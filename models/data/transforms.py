"""Training and evaluation transforms (mmseg / Segmenter semantics), in plain torch + numpy + PIL.

A transform maps ``(image: PIL RGB (H, W), label: int64 (H, W))`` to
``(FloatTensor (3, h, w) normalised, LongTensor label)``; label 255 = ignore.

Randomness (``TrainTransform``): every call takes an optional ``numpy.random.Generator``. Without
one, a fresh generator is seeded from ``torch``'s global RNG (one ``torch.randint`` draw per call).
PyTorch seeds that RNG differently in every DataLoader worker (``base_seed + worker_id``, with
``base_seed`` drawn from the main process's RNG each epoch), so workers draw different
augmentations, and ``torch.manual_seed(s)`` in the main process makes a run reproducible for a
fixed ``num_workers``. No ``worker_init_fn`` is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from depict_analysis.models.backbone import NORMALIZATION

from .base import IGNORE_INDEX


def normalization_stats(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` in [0, 1] units: ``"vit"`` -> 0.5 / 0.5, ``"deit"`` -> ImageNet."""
    if kind not in NORMALIZATION:
        raise ValueError(f"unknown normalization {kind!r}; expected one of: {', '.join(NORMALIZATION)}")
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


def _linear_taps(src: int, dst: int, *, pin_edges: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's bilinear taps along one axis (half-pixel centres), for ``dst`` output positions:
    source indices ``i0, i1`` and their weights ``w0, w1`` in units of 1/2048 (int32).

    The position is computed in float32 as OpenCV does. Columns outside the image are pinned to the
    edge pixel (``pin_edges``); rows are not, their indices are only clamped, which changes the
    rounding of the first and last rows as in OpenCV.
    """
    pos = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0.astype(np.float32)
    if pin_edges:
        outside = (i0 < 0) | (i0 >= src - 1)
        frac[outside], i0[outside] = 0, np.clip(i0[outside], 0, src - 1)
    weight = lambda f: np.round(f * np.float32(2048)).astype(np.int32)  # noqa: E731  (cvRound: half to even)
    return (np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1),
            weight(np.float32(1) - frac), weight(frac))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize exactly as ``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)``,
    the backend of mmcv / mmseg: fixed-point weights (1/2048), OpenCV's vectorised rounding.

    ``image``: uint8 ``(H, W, 3)``; ``size``: ``(h, w)``; returns uint8 ``(h, w, 3)``.
    """
    if image.shape[:2] == tuple(size):
        return image
    rows0, rows1, b0, b1 = _linear_taps(image.shape[0], size[0], pin_edges=False)
    cols0, cols1, a0, a1 = _linear_taps(image.shape[1], size[1], pin_edges=True)
    pixels = image.astype(np.int32)
    across = pixels[:, cols0] * a0[:, None] + pixels[:, cols1] * a1[:, None]  # (H, w, 3), x 2048
    across >>= 4
    top, bottom = across[rows0], across[rows1]  # (h, w, 3); in place below: as fast as torch's float resize
    top *= b0[:, None, None]
    top >>= 16
    bottom *= b1[:, None, None]
    bottom >>= 16
    top += bottom + 2
    top >>= 2
    return top.astype(np.uint8)  # at most (1020 + 2) >> 2 = 255


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``(H, W)`` -> ``(h, w)``: values are only copied."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * label.shape[0] / size[0]).astype(np.int64),
                      label.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * label.shape[1] / size[1]).astype(np.int64),
                      label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


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
    """mmseg's ``PhotoMetricDistortion`` on uint8 ``(H, W, 3)``.

    Each step fires with probability 1/2: brightness (add U(-32, 32)), contrast (multiply by
    U(0.5, 1.5)) either first or last, saturation (scale HSV saturation by U(0.5, 1.5)), hue
    (shift by an integer in [-18, 18) in OpenCV units of 2 degrees). HSV via PIL (hue 0..255).
    """
    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    do_saturation, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if do_saturation or do_hue:
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        if do_saturation:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        if do_hue:
            shift_degrees = 2 * int(rng.integers(-hue_delta, hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(shift_degrees * 256 / 360)) % 256
        image = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first:
        image = contrast(image)
    return image


def _crop_box(label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator,
              cat_max_ratio: float) -> tuple[int, int]:
    """Top-left corner of a random crop; with ``cat_max_ratio < 1``, up to 10 tries (mmseg) to
    find one where at least two classes show and none covers ``>= cat_max_ratio`` of the
    non-ignored pixels; otherwise the last try is kept."""
    margin_h, margin_w = max(label.shape[0] - crop[0], 0), max(label.shape[1] - crop[1], 0)
    for _ in range(10 if cat_max_ratio < 1.0 else 1):
        top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
        window = label[top:top + crop[0], left:left + crop[1]]
        counts = np.bincount(window.ravel(), minlength=IGNORE_INDEX)[:IGNORE_INDEX]
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


class TrainTransform:
    """Random resize -> random crop (cat_max_ratio) -> flip -> photometric -> normalise -> pad.

    Output: image FloatTensor ``(3, crop_h, crop_w)`` (pad value 0, after normalisation), label
    LongTensor ``(crop_h, crop_w)`` (pad value 255). Resize ratio r ~ U(ratio_range): with
    ``base_size`` the image is rescaled (aspect kept) to fit inside ``(4 * base_size * r,
    base_size * r)`` (long, short side), as mmseg's ``img_scale=(2048, 512)`` for base 512;
    without it, both sides are multiplied by r. Images bilinear, labels nearest.
    """

    def __init__(self, crop_size: int | tuple[int, int], mean: Sequence[float],
                 std: Sequence[float], ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 base_size: int | None = None) -> None:
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ratio_range, self.cat_max_ratio = ratio_range, cat_max_ratio
        self.flip_prob, self.photometric, self.base_size = flip_prob, photometric, base_size

    def _scale(self, height: int, width: int, ratio: float) -> float:
        if self.base_size is None:
            return ratio
        short = self.base_size * ratio
        return min(4 * short / max(height, width), short / min(height, width))

    def __call__(self, image: Image.Image, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,)).item()))
        img = np.array(image.convert("RGB"))
        if img.shape[:2] != label.shape:
            raise ValueError(f"image {img.shape[:2]} and label {label.shape} sizes differ")

        scale = self._scale(*label.shape, rng.uniform(*self.ratio_range))
        size = _scaled_size(label.shape, scale)
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
