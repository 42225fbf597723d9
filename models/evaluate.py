"""Dataset-level mIoU and the official evaluation protocol (SPEC §1.5, Segmenter's ``segm/eval/miou.py``).

Every image goes through mmseg's test pipeline: each view (``MultiScaleFlipAug``: scales x flips)
is the uint8 image resized keeping its aspect ratio to the dataset's ``img_scale`` (e.g. (2048,
512) for ADE20K) times the scale's ratio, flipped, normalised; ``segmentor.inference`` turns the
views into class probabilities at the image's original size, where the label is scored.
Intersections and unions are summed over the whole dataset (one confusion matrix, all-reduced
across ranks under DDP) before the per-class IoUs are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from depict_analysis.models.data import IGNORE_INDEX, SegmentationDataset, test_scale
from depict_analysis.models.data.base import MAX_PIXELS, image_array, image_to_tensor
from depict_analysis.models.data.transforms import eval_view, img_scale_for, multiscale_views, rescale_size
from depict_analysis.foundation.device import autocast
from depict_analysis.foundation.errors import ConfigError, DatasetError, InputError
from depict_analysis.foundation.progress import track
from depict_analysis.models.segmentor import (
    Anchor,
    MAP_VALUES,
    Segmentor,
    decoder_outputs,
    inference,
    inference_labels,
    merge_windows,
    merged_labels,
    view_labels,
    window_anchors,
    window_crops,
    window_resize,
    window_size,
)
from depict_analysis.models.sources import trained_dataset

MULTISCALE_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class ConfusionMatrix:
    """Pixel counts ``(K, K)``: row = ground-truth class, column = predicted class (int64).

    Pixels whose label is ``ignore_index`` are skipped.
    """

    def __init__(self, n_cls: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX):
        self.n_cls, self.ignore_index = n_cls, ignore_index
        self.counts = torch.zeros(n_cls, n_cls, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` are integer tensors of the same shape, e.g. (B, H, W)."""
        if pred.shape != target.shape:
            raise DatasetError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long().to(target.device)
        K = self.n_cls
        for name, values in (("label", t), ("prediction", p)):
            bad = values[(values < 0) | (values >= K)]
            if bad.numel():
                raise DatasetError(f"{name} value {int(bad[0])} is not a class index 0..{K - 1} (or {self.ignore_index} = ignore)")
        self.counts += torch.bincount(t * K + p, minlength=K * K).view(K, K).to(self.counts.device)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over all ranks (a no-op outside ``torch.distributed``)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)
        return self


def miou(confusion: ConfusionMatrix | Tensor) -> dict[str, Any]:
    """Scores of a confusion matrix ``(K, K)`` (rows = ground truth).

    ``iou[c] = TP / (TP + FP + FN)``, NaN for a class with an empty union (neither in the labels nor
    predicted); ``miou`` is the mean over the other classes. ``acc[c] = TP / #label pixels`` (NaN when
    the class never occurs), ``mean_acc`` its NaN-mean, ``pixel_acc`` = correct / labelled pixels.
    """
    counts = confusion.counts if isinstance(confusion, ConfusionMatrix) else confusion
    c = counts.double().cpu()
    tp, in_label, in_pred = c.diag(), c.sum(1), c.sum(0)
    iou = tp / (in_label + in_pred - tp)  # 0 / 0 = NaN for absent classes
    acc = tp / in_label
    return {
        "miou": float(iou.nanmean()),
        "pixel_acc": float(tp.sum() / c.sum()),
        "mean_acc": float(acc.nanmean()),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
        "n_pixels": int(c.sum()),
    }


def default_stride(window: int) -> int:
    """Segmenter's ``window - 32``, but at least half a window (tiny test models train on 32-px crops)."""
    return max(window - 32, window // 2)


def default_short_side(base_size: int | None, train_config: dict | None, window: int) -> int:
    """The short side images are resized to before inference, one rule for ``depict eval`` and
    ``depict predict``: the dataset's base size (its mmseg test ``Resize``), else the training base of
    our run (its ``base_size``, else its crop = ``window``), else 0 (images keep their size)."""
    return base_size or (((train_config or {}).get("base_size") or window) if train_config else 0)


def check_classes(model: Segmentor, dataset: SegmentationDataset) -> None:
    """Refuse to score a model against a dataset whose classes it does not predict."""
    if dataset.n_cls != model.n_cls:
        raise ConfigError(f"the model predicts {model.n_cls} classes but {dataset.name} has {dataset.n_cls}; "
                          "score it on the dataset it was trained for")


def require_positive(**values: int | None) -> None:
    """Refuse a count (``batch_size=0``, ``num_images=-3``) below 1; None passes (not given)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _checked(model: Segmentor, window: int, stride: int, short_side: int) -> dict[str, int]:
    """The protocol if it can work: windows at least a patch, a stride that leaves no pixel uncovered."""
    if not isinstance(window, int) or window < model.patch_size:
        raise ConfigError(f"the window ({window}) must be at least the model's patch size, {model.patch_size} px")
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ConfigError(f"the stride ({stride}) must be between 1 and the window ({window}): wider strides leave pixels unseen")
    if not isinstance(short_side, int) or short_side < 0:
        raise ConfigError(f"the short side ({short_side}) must be a size in pixels, or 0 to keep the images' size")
    return {"window": window, "stride": stride, "short_side": short_side}


def eval_protocol(
    model: Segmentor,
    dataset: SegmentationDataset,
    train_config: dict | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    short_side: int | None = None,
) -> dict[str, int]:
    """The evaluation settings of ``depict eval``: explicit values, else the run's (``train_config``),
    else ``segm/eval/miou.py``'s.

    ``window`` = the model's training size (the crop); ``stride`` = ``default_stride(window)``
    (crop - 32, as ``segm/eval/miou.py`` scores every model, runs trained from a preset included:
    480 / 448 / 736 at crops 512 / 480 / 768); a training run's own evaluation passes its
    ``eval_stride`` (the preset's training-time stride, as the official training loop evaluates);
    ``short_side`` = ``default_short_side`` of the dataset (ADE20K 512, Pascal Context 520, Cityscapes 1024).
    """
    window = window or model.config.backbone.image_size[0]
    if short_side is None:
        short_side = default_short_side(dataset.base_size, train_config, window)
    stride = stride or default_stride(window)
    return _checked(model, window, stride, short_side)


def predict_protocol(
    model: Segmentor,
    meta: dict | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    short_side: int | None = None,
) -> dict[str, Any]:
    """The settings of ``depict predict``: explicit values, else an official release's
    ``inference_kwargs`` (as ``segm/inference.py``), else the model's training size and
    ``default_stride`` (as ``depict eval``). Images are resized as ``depict eval`` resizes them
    (``default_short_side``), to the test scale of the dataset the model was trained on; 0 keeps
    their size. Returns ``window``, ``stride`` and ``img_scale`` (None: no resize)."""
    official = (meta or {}).get("inference") or {}
    run = (meta or {}).get("train_config")
    window = window or official.get("window_size") or model.config.backbone.image_size[0]
    stride = stride or official.get("window_stride") or default_stride(window)
    base_size, max_ratio = test_scale(trained_dataset(meta))
    if short_side is None:
        short_side = default_short_side(base_size, run, window)
    protocol = _checked(model, window, stride, short_side)
    return {"window": window, "stride": stride, "img_scale": img_scale_for(protocol["short_side"], max_ratio)}


def _views(model: Segmentor, image: Image.Image, img_scale: tuple[int, int] | None, scales: Sequence[float], flip: bool,
           window: int, inputs: Callable[[Tensor], Tensor] | None = None):
    """mmseg's test views of a uint8 image, normalised on the model's device: (images (1, 3, h, w),
    flipped). ``inputs`` maps a view's pixels (1, 3, h, w) in [0, 1] to the model's input (default
    ``model.normalize``; a robustness sweep perturbs them there). A view that would exceed
    ``MAX_PIXELS`` once enlarged to the window is refused."""
    device = next(model.parameters()).device
    pixels = image_array(image)
    for scale, flipped in multiscale_views(img_scale, scales, flip):
        size = window_size(*rescale_size(pixels.shape[:2], scale), window)
        if size[0] * size[1] > MAX_PIXELS:
            raise InputError(f"a {size[1]} x {size[0]} view of this image exceeds {MAX_PIXELS // 10**6} megapixels; "
                             "use a smaller scale, short side or window")
        yield (inputs or model.normalize)(image_to_tensor(eval_view(pixels, scale, flipped))[None].to(device)), flipped


def image_probs(
    model: Segmentor,
    image: Image.Image,
    *,
    window: int,
    stride: int,
    img_scale: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
    amp: bool = False,
) -> Tensor:
    """One RGB image (H, W) -> class probabilities (K, H, W) on the model's device (float32).

    The views are mmseg's (``multiscale_views(img_scale, scales, flip)``, made from the uint8 image by
    ``eval_view``); ``img_scale=None`` keeps the image's size at scale 1. ``amp``: bf16 autocast
    for the forward passes (CUDA only). Call under ``torch.inference_mode()``.
    """
    device = next(model.parameters()).device
    with autocast(device, amp):
        views = _views(model, image, img_scale, scales, flip, window)
        probs = inference(model, views, (image.height, image.width), window, stride, batch_size)
    return probs[0]


def image_labels(
    model: Segmentor,
    image: Image.Image,
    *,
    window: int,
    stride: int,
    img_scale: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
    amp: bool = False,
    inputs: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``image_probs(...).argmax(0)``: class labels (H, W) (uint8 for at most 256 classes), in bounded
    memory for any image size (``segmentor.inference_labels``). ``inputs``: see ``_views``. Call
    under ``torch.inference_mode()``."""
    device = next(model.parameters()).device
    with autocast(device, amp):
        views = _views(model, image, img_scale, scales, flip, window, inputs)
        labels = inference_labels(model, views, (image.height, image.width), window, stride, batch_size)
    return labels[0]


@dataclass
class EncodedView:
    """One test view of an image with the backbone run once on its windows: Z_0 (n, N, d) of each
    batch of windows with their anchors, the token grid of a window, the view's size once
    ``window_resize``d, and whether it is flipped."""

    tokens: list[tuple[Tensor, list[Anchor]]]
    grid: tuple[int, int]
    size: tuple[int, int]
    flipped: bool


@dataclass
class EncodedImage:
    """An image's views encoded once (``encode_image``), decoded as often as needed (``decode_labels``)."""

    views: list[EncodedView]
    size: tuple[int, int]  # (H, W) of the image, where labels are scored
    window: int
    # reused by every decode: each batch of windows' upsampled logits, ``merged_labels``' scratch
    buffers: dict = field(default_factory=dict, repr=False)

    def buffer(self, view: int, batch: int, like: Tensor, size: tuple[int, int]) -> Tensor:
        """The reused channels-last buffer (n, K, *size) of one batch of windows' logits, dtype of ``like`` (n, K, h, w)."""
        shape = (*like.shape[:2], *size)
        held = self.buffers.get((view, batch))
        if held is None or held.shape != shape or held.dtype != like.dtype:
            held = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
            self.buffers[view, batch] = held
        return held


def encode_image(
    model: Segmentor,
    image: Image.Image,
    *,
    window: int,
    stride: int,
    img_scale: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
) -> EncodedImage:
    """The backbone half of ``image_labels``: every window of every view through ``model.encode``,
    ``batch_size`` windows at a time (the same batches as ``image_labels``). Call under
    ``torch.inference_mode()``."""
    views = []
    for pixels, flipped in _views(model, image, img_scale, scales, flip, window):
        pixels = window_resize(pixels, window)
        anchors = window_anchors(1, *pixels.shape[-2:], window, stride)
        tokens = []
        for i in range(0, len(anchors), batch_size):
            chunk = anchors[i : i + batch_size]
            z0, grid = model.encode(window_crops(pixels, chunk, window))
            tokens.append((z0, chunk))
        views.append(EncodedView(tokens, grid, tuple(pixels.shape[-2:]), flipped))
    return EncodedImage(views, (image.height, image.width), window)


def decode_labels(model: Segmentor, encoded: EncodedImage) -> Tensor:
    """The decoder half of ``image_labels``: class labels (H, W) of an ``encode_image``d image, equal to
    ``image_labels`` on it (the same windows, merging, resizing and softmax). Decoding with other
    decoder parameters (``torch.func.functional_call``) scores a perturbed decoder without the backbone."""
    device, window = next(model.parameters()).device, encoded.window

    def held(view: EncodedView) -> bool:
        """Whether a view's upsampled windows fit in ``MAP_VALUES`` values: then all of them are kept
        in the image's buffers, reused by every decode; else they come one batch at a time, as in ``image_labels``."""
        return sum(len(anchors) for _, anchors in view.tokens) * model.n_cls * window**2 <= MAP_VALUES

    def windows(v: int, view: EncodedView) -> Iterator[tuple[Tensor, list[Anchor]]]:
        """``model.decode`` of each batch of windows (the same logits), upsampled into reused buffers when ``held``."""
        reuse = held(view)
        for b, (z0, anchors) in enumerate(view.tokens):
            masks = model.decoder(z0, view.grid)
            padded = (view.grid[0] * model.patch_size, view.grid[1] * model.patch_size)
            buffer = encoded.buffer(v, b, masks, padded) if reuse else None
            yield model.upsample(masks, view.grid, (window, window), torch.channels_last, buffer).float(), anchors

    (only, *others) = encoded.views
    if not others and not only.flipped and only.size == encoded.size and held(only):  # no resize: no merged map
        return merged_labels(windows(0, only), 1, encoded.size, model.n_cls, encoded.buffers)[0]
    logits = ((merge_windows(windows(v, view), 1, view.size, model.n_cls, device), view.flipped)
              for v, view in enumerate(encoded.views))
    return view_labels(logits, 1, model.n_cls, encoded.size, outputs=decoder_outputs(model))[0]


def evaluate(
    model: Segmentor,
    dataset: SegmentationDataset,
    *,
    window: int | None = None,
    stride: int | None = None,
    short_side: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
    num_images: int | None = None,
    progress: bool = False,
    amp: bool = False,
) -> dict[str, Any]:
    """mIoU of ``model`` on the first ``num_images`` items of ``dataset`` (all by default).

    Unset ``window`` / ``stride`` / ``short_side`` follow ``eval_protocol``; images are resized as
    mmseg's test ``Resize(img_scale=(dataset.max_ratio * short_side, short_side), keep_ratio=True)``
    (``short_side=0``: no resize), times each of ``scales``, each also flipped when ``flip``. Images
    are read untransformed (``dataset.load_raw``) and scored at the label's resolution, float32
    unless ``amp``. Under DDP every rank takes every ``world_size``-th image and the confusion
    matrices are summed. Returns ``miou(...)`` plus the protocol used and ``n_images``. The model
    is left in the mode it came in.
    """
    check_classes(model, dataset)
    require_positive(batch_size=batch_size, num_images=num_images)
    protocol = eval_protocol(model, dataset, window=window, stride=stride, short_side=short_side)
    img_scale = img_scale_for(protocol["short_side"], dataset.max_ratio)
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    samples = getattr(dataset, "samples", None)  # (image, label file or None) of a dataset of files
    if samples is not None and all(label is None for _, label in samples[:n]):
        raise DatasetError(f"none of the {n} images of {dataset.name} has a label map (no mask matches an image by name); "
                           "nothing to score")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    confusion = ConfusionMatrix(model.n_cls, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            indices = range(rank, n, world)
            for i in track(indices, "evaluating", enabled=progress and rank == 0):
                image, label = dataset.load_raw(i)
                labels = image_labels(
                    model, image, window=protocol["window"], stride=protocol["stride"], img_scale=img_scale,
                    scales=scales, flip=flip, batch_size=batch_size, amp=amp,
                )
                confusion.update(labels, torch.from_numpy(label).to(device))
    finally:
        model.train(was_training)
    if int(confusion.all_reduce().counts.sum()) == 0:
        raise DatasetError(f"the labels of the {n} images of {dataset.name} are all 255 (ignore): nothing to score")
    settings = {**protocol, "img_scale": img_scale and list(img_scale), "scales": list(scales), "flip": flip, "amp": amp}
    return {**miou(confusion), **settings, "n_images": n}


def jsonable(value: Any) -> Any:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
