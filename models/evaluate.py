"""Dataset-level mIoU and the paper's evaluation protocol (SPEC §1.5).

Every image is resized so its short side is ``short_side``, run through sliding windows (optionally
at several scales and flipped), and the averaged class probabilities are compared with the label at
the label's original resolution. Intersections and unions are summed over the whole dataset (one
confusion matrix, all-reduced across ranks under DDP) before the per-class IoUs are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from rich.progress import track
from torch import Tensor

from depict_analysis.models.data import IGNORE_INDEX, SegmentationDataset
from depict_analysis.models.data.base import image_to_tensor
from depict_analysis.models.device import autocast
from depict_analysis.models.segmentor import Segmentor, predict_probs

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
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long().to(target.device)
        K = self.n_cls
        for name, values in (("label", t), ("prediction", p)):
            bad = values[(values < 0) | (values >= K)]
            if bad.numel():
                raise ValueError(f"{name} value {int(bad[0])} is not a class index 0..{K - 1} (or {self.ignore_index} = ignore)")
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
    """SPEC's ``window - 32``, but at least half a window (tiny test models train on 32-px crops)."""
    return max(window - 32, window // 2)


def inference_protocol(
    model: Segmentor,
    meta: dict | None = None,
    window: int | None = None,
    stride: int | None = None,
    short_side: int | None = None,
) -> dict[str, int]:
    """Resolve the sliding-window settings: explicit values, else the checkpoint's, else the paper's.

    Defaults: ``window`` = the model's training size (``meta["inference"]["window_size"]`` for an
    official release), ``stride`` = the release's ``window_stride`` or ``default_stride(window)``,
    ``short_side`` = the release's ``im_size`` or ``window``; ``short_side=0`` keeps the image size.
    """
    official = (meta or {}).get("inference") or {}
    window = window or official.get("window_size") or model.config.backbone.image_size[0]
    return {
        "window": window,
        "stride": stride or official.get("window_stride") or default_stride(window),
        "short_side": official.get("im_size", window) if short_side is None else short_side,
    }


def image_probs(
    model: Segmentor,
    image: Image.Image,
    *,
    window: int,
    stride: int,
    short_side: int = 0,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
) -> Tensor:
    """One RGB image (H, W) -> class probabilities (K, H, W) on the model's device (float32).

    ``short_side=0`` runs at the image's own size. Call under ``torch.inference_mode()``.
    """
    device = next(model.parameters()).device
    x = model.normalize(image_to_tensor(image)[None].to(device))
    with autocast(device):
        probs = predict_probs(model, x, window, stride, scales, flip, short_side or None, batch_size)
    return probs[0]


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
) -> dict[str, Any]:
    """mIoU of ``model`` on the first ``num_images`` items of ``dataset`` (all by default).

    Unset ``window`` / ``stride`` / ``short_side`` follow ``inference_protocol``. Images are read
    untransformed (``dataset.load_raw``) and scored at the label's resolution. Under DDP every rank
    takes every ``world_size``-th image and the confusion matrices are summed. Returns ``miou(...)``
    plus the protocol used and ``n_images``. The model is left in the mode it came in.
    """
    if dataset.n_cls != model.n_cls:
        raise ValueError(f"the model predicts {model.n_cls} classes but {dataset.name} has {dataset.n_cls}")
    protocol = inference_protocol(model, None, window, stride, short_side)
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    confusion = ConfusionMatrix(model.n_cls, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            indices = range(rank, n, world)
            for i in track(indices, description="evaluating", disable=not progress or rank != 0):
                image, label = dataset.load_raw(i)
                probs = image_probs(model, image, **protocol, scales=scales, flip=flip, batch_size=batch_size)
                confusion.update(probs.argmax(0), torch.from_numpy(label).to(device))
    finally:
        model.train(was_training)
    return {**miou(confusion.all_reduce()), **protocol, "scales": list(scales), "flip": flip, "n_images": n}


def jsonable(value: Any) -> Any:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
