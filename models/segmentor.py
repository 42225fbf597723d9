"""Backbone + decoder -> per-pixel class logits, and Segmenter's inference protocol (SPEC §1.4–1.5)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.backbone import NORMALIZATION, ViTBackbone
from depict_analysis.foundation.errors import ConfigError, InputError

# Memory bounds of ``inference_labels``: class-map values held at an image's full size (1 GiB of
# float32; larger outputs go in strips of about STRIP_VALUES values), and values of the views'
# logits held for those strips (4 GiB).
MAP_VALUES = 2**28
STRIP_VALUES = 2**22
VIEW_VALUES = 2**30


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) on the right/bottom so that H and W are multiples of ``multiple``."""
    H, W = images.shape[-2:]
    return F.pad(images, (0, -W % multiple, 0, -H % multiple))


def upsample_masks(
    masks: Tensor, grid: tuple[int, int], patch_size: int, size: tuple[int, int], memory_format=torch.contiguous_format,
    out: Tensor | None = None,
) -> Tensor:
    """Masks (B, K, h, w) on ``grid`` -> logits (B, K, H, W): bilinear to the padded image (``grid`` ×
    ``patch_size`` pixels), then cropped to ``size`` = (H, W). Each image's logits depend on its own
    masks only: upsampling one image of a batch gives the same values as upsampling the batch.
    ``out`` (B, K, padded H, padded W) in ``memory_format``: written in place of a new tensor, the
    same values (a caller decoding many times saves the page faults of a fresh full-resolution map,
    most of the upsampling's cost on the CPU)."""
    padded = (grid[0] * patch_size, grid[1] * patch_size)
    masks = masks.contiguous(memory_format=memory_format)
    if out is None:
        masks = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)
    else:  # F.interpolate's own kernel, with an output
        masks = torch.ops.aten.upsample_bilinear2d.out(masks, padded, False, None, None, out=out)
    return masks[..., : size[0], : size[1]]


class Segmentor(nn.Module):
    """``encoder`` (ViT) + ``decoder`` (any family in ``depict_analysis.models.decoders``) -> logits (B, K, H, W)."""

    def __init__(self, encoder: ViTBackbone, decoder: nn.Module, config=None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = config
        self.n_cls = decoder.n_cls
        self.patch_size = encoder.patch_size
        mean, std = NORMALIZATION[encoder.config.normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1], (B, 3, H, W) -> normalised with the backbone's mean / std."""
        return (images - self.mean) / self.std

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images (B, 3, H, W) -> decoder input Z_0 (B, N, d) and its grid (h, w)."""
        return self.encoder(pad_to_multiple(images, self.patch_size))

    def decode(
        self, z: Tensor, grid: tuple[int, int], size: tuple[int, int], memory_format=torch.contiguous_format
    ) -> Tensor:
        """Z_0 (B, N, d) on ``grid`` -> logits (B, K, H, W) for an image of ``size`` = (H, W).

        ``memory_format=torch.channels_last`` upsamples the class maps in channels-last memory (K
        innermost): the same values up to float rounding, but much faster on the CPU for many
        classes, and the layout ``predict_probs`` works in. The default keeps NCHW logits (training).
        """
        return self.upsample(self.decoder(z, grid), grid, size, memory_format)

    def upsample(
        self, masks: Tensor, grid: tuple[int, int], size: tuple[int, int], memory_format=torch.contiguous_format,
        out: Tensor | None = None,
    ) -> Tensor:
        """The decoder's masks (B, K, h, w) on ``grid`` -> logits (B, K, H, W) (``upsample_masks``, ``out`` too)."""
        return upsample_masks(masks, grid, self.patch_size, size, memory_format, out)

    def forward(self, images: Tensor, memory_format=torch.contiguous_format, predictions: bool = False):
        """Normalised images (B, 3, H, W), any H, W -> logits (B, K, H, W) (see ``decode``).

        ``predictions``: the decoder's ``predictions`` instead (MaskFormer's per-layer class and mask
        logits, what its loss reads), through ``forward`` so that DDP sees the call.
        """
        z, grid = self.encode(images)
        if predictions:
            return self.decoder.predictions(z, grid)
        return self.decode(z, grid, images.shape[-2:], memory_format)


def _classes_innermost(maps: Tensor) -> bool:
    """Whether class maps (B, K, H, W) are laid out with K innermost (channels-last strides)."""
    return maps.shape[1] > 1 and maps.stride(1) == 1


def _class_logits(model: nn.Module, images: Tensor) -> Tensor:
    """``model(images)`` as float (B, K, H, W); a ``Segmentor`` builds them in channels-last memory
    (K innermost), where the bilinear resizing, the softmax over K and a later ``argmax`` over K run
    several times faster on the CPU than on NCHW maps."""
    if isinstance(model, Segmentor):
        return model(images, memory_format=torch.channels_last).float()
    return model(images).float()


def _softmax_classes(logits: Tensor) -> Tensor:
    """softmax over the class axis of (B, K, H, W) maps, in the layout they come in."""
    if _classes_innermost(logits):  # a contiguous last-dimension softmax on the permuted view
        return logits.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


def decoder_outputs(model: nn.Module) -> str:
    """What ``model``'s class maps are: its decoder's ``outputs``, "logits" (the default) or "probabilities"."""
    return getattr(getattr(model, "decoder", None), "outputs", "logits")


def _class_probabilities(maps: Tensor, outputs: str) -> Tensor:
    """A view's per-class maps (B, K, H, W) -> the probabilities the protocol averages over views.

    Logits are soft-maxed over classes (Segmenter). Maps that are "probabilities" already
    (MaskFormer's semantic scores S, each in [0, Q]) are taken as they are, as mmseg's MaskFormer
    head runs the sliding window: the windows' S averaged, then the arg-max. A softmax of S would
    reorder nothing within one view, but would flatten S's differences and so weigh views unlike
    the official scores do.
    """
    return maps if outputs == "probabilities" else _softmax_classes(maps)


def window_size(h: int, w: int, window: int) -> tuple[int, int]:
    """The size Segmenter's ``resize`` gives an image of (h, w): a short side below ``window`` becomes
    ``window`` and the long side ``int(ratio * window)``, ratio = long / short; else (h, w)."""
    if min(h, w) >= window:
        return h, w
    return (window, int(w / h * window)) if h < w else (int(h / w * window), window)


def window_resize(images: Tensor, window: int) -> Tensor:
    """Segmenter's ``resize``: images (B, C, h, w) resized (bilinear) to ``window_size``."""
    size = window_size(*images.shape[-2:], window)
    if size == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every ``stride`` below ``length - window``, then one
    flush with the end (Segmenter's anchors)."""
    if length <= window:
        return [0]
    return list(range(0, length - window, stride)) + [length - window]


Anchor = tuple[int, int, int]  # (image in the batch, top, left) of one window


def window_anchors(batch: int, height: int, width: int, window: int, stride: int) -> list[Anchor]:
    """Every sliding window of ``batch`` images of (height, width): (b, top, left), image-major."""
    return [
        (b, top, left)
        for b in range(batch)
        for top in _window_starts(height, window, stride)
        for left in _window_starts(width, window, stride)
    ]


def window_crops(images: Tensor, anchors: Sequence[Anchor], window: int) -> Tensor:
    """The crops (n, C, window, window) of images (B, C, H, W) at ``anchors`` (both sides ≥ window)."""
    return torch.stack([images[b, :, top : top + window, left : left + window] for b, top, left in anchors])


def merge_windows(chunks: Iterable[tuple[Tensor, Sequence[Anchor]]], batch: int, size: tuple[int, int], n_cls: int,
                  device: torch.device) -> Tensor:
    """Segmenter's ``merge_windows``: the logits (n, K, h, w) of windows at their anchors, summed and
    divided by the number of windows over each pixel -> (B, K, H, W) at ``size``, float, in the layout
    the windows' logits come in (channels-last for a ``Segmentor``)."""
    (H, W), logits = size, None
    count = torch.zeros(batch, 1, H, W, device=device)
    for out, anchors in chunks:
        if logits is None:  # accumulate in the layout the class maps come in
            layout = torch.channels_last if _classes_innermost(out) else torch.contiguous_format
            logits = torch.empty(batch, out.shape[1], H, W, device=device, memory_format=layout).zero_()
        for o, (b, top, left) in zip(out, anchors):
            h, w = o.shape[-2:]
            logits[b, :, top : top + h, left : left + w] += o
            count[b, :, top : top + h, left : left + w] += 1
    if logits is None:  # no windows (an empty batch)
        return torch.zeros(batch, n_cls, H, W, device=device)
    return logits.div_(count)


def _cells(starts: Iterable[int], ends: Iterable[int], length: int) -> list[tuple[int, int]]:
    """The intervals between consecutive window edges in [0, length)."""
    edges = sorted({0, length, *(min(max(e, 0), length) for e in (*starts, *ends))})
    return list(itertools.pairwise(edges))


def merged_labels(windows: Iterable[tuple[Tensor, Sequence[Anchor]]], batch: int, size: tuple[int, int], n_cls: int,
                  scratch: dict[str, Tensor] | None = None) -> Tensor:
    """``merge_windows(windows, ...).argmax(1)``: labels (B, H, W) (uint8 for at most 256 classes, else
    int64) of the windows' logits (n, K, h, w) at their anchors, without building the (B, K, H, W) map.

    The window edges cut each image into cells covered by the same windows: a cell under one window
    is arg-maxed in that window's logits; elsewhere its windows' logits are summed in anchor order
    and divided by their number, as ``merge_windows`` does (its zeros first add nothing, its count is
    that number), into ``scratch["merge"]`` (kept there for the next call). The same values, so the
    same labels (ties included: the first class)."""
    (H, W), placed = size, [(o, a) for out, anchors in windows for o, a in zip(out, anchors)]
    K = placed[0][0].shape[0] if placed else n_cls
    labels = torch.zeros(batch, H, W, dtype=torch.uint8 if n_cls <= 256 else torch.int64,
                         device=placed[0][0].device if placed else None)
    scratch = {} if scratch is None else scratch
    for b in range(batch):
        mine = [(o, top, left) for o, (i, top, left) in placed if i == b]
        rows = _cells((t for _, t, _ in mine), (t + o.shape[-2] for o, t, _ in mine), H)
        cols = _cells((l for _, _, l in mine), (l + o.shape[-1] for o, _, l in mine), W)
        for (y0, y1), (x0, x1) in itertools.product(rows, cols):
            cover = [o[:, y0 - t : y1 - t, x0 - l : x1 - l] for o, t, l in mine
                     if t <= y0 and y1 <= t + o.shape[-2] and l <= x0 and x1 <= l + o.shape[-1]]
            if not cover:  # 0 / 0 everywhere in merge_windows: NaN, whose argmax is class 0
                continue
            if len(cover) > 1:
                n = K * (y1 - y0) * (x1 - x0)
                held = scratch.get("merge")
                if held is None or held.numel() < n or held.dtype != cover[0].dtype or held.device != cover[0].device:
                    held = scratch["merge"] = torch.empty(n, dtype=cover[0].dtype, device=cover[0].device)
                total = torch.add(cover[0], cover[1], out=held[:n].view(y1 - y0, x1 - x0, K).permute(2, 0, 1))
                for more in cover[2:]:
                    total.add_(more)
                count = torch.full((1, 1, 1), float(len(cover)), dtype=total.dtype, device=total.device)
                cover = [total.div_(count.expand(1, y1 - y0, x1 - x0))]  # element-wise, as merge_windows divides
            labels[b, y0:y1, x0:x1] = cover[0].argmax(0)
    return labels


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module, images: Tensor, window: int, stride: int, batch_size: int = 8
) -> Tensor:
    """Logits (B, K, H, W) of images (B, 3, H, W): every window's logits summed and divided by the
    number of windows over each pixel (Segmenter's ``sliding_window`` + ``merge_windows``), float.

    Windows of all images go through the model ``batch_size`` at a time. For a ``Segmentor`` the
    result has channels-last strides (see ``_class_logits``).
    """
    B, _, H, W = images.shape
    anchors = window_anchors(B, H, W, window, stride)
    chunks = (anchors[i : i + batch_size] for i in range(0, len(anchors), batch_size))
    windows = ((_class_logits(model, window_crops(images, chunk, window)), chunk) for chunk in chunks)
    return merge_windows(windows, B, (H, W), model.n_cls, images.device)


def view_probs(view_logits: Iterable[tuple[Tensor, bool]], size: tuple[int, int], outputs: str = "logits") -> Tensor:
    """The end of Segmenter's ``inference``: each view's merged logits (B, K, h, w) resized (bilinear)
    to ``size``, un-flipped when ``flipped``, soft-maxed over classes (kept as they are when the
    ``outputs`` are "probabilities": ``_class_probabilities``); the mean over views (B, K, H, W)."""
    total, n_views = None, 0
    for logits, flipped in view_logits:
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        probs = _class_probabilities(logits.flip(-1) if flipped else logits, outputs)
        # a copy first: probabilities come as the caller's maps, which are not ours to change
        total = probs.clone() if total is None else total.add_(probs)
        n_views += 1
    if total is None:
        raise ConfigError("inference needs at least one view")
    return total.div_(n_views)


def _view_logits(model: nn.Module, views: Iterable[tuple[Tensor, bool]], window: int, stride: int,
                 batch_size: int) -> Iterator[tuple[Tensor, bool]]:
    """(merged sliding-window logits, flipped) of each view, ``window_resize``d first."""
    for images, flipped in views:
        yield sliding_window_logits(model, window_resize(images, window), window, stride, batch_size), flipped


@torch.no_grad()
def inference(
    model: nn.Module,
    views: Iterable[tuple[Tensor, bool]],
    size: tuple[int, int],
    window: int,
    stride: int,
    batch_size: int = 8,
) -> Tensor:
    """Segmenter's ``inference``: class probabilities (B, K, H, W) at ``size`` = (H, W), float.

    ``views``: ``(images, flipped)`` pairs, normalised images (B, 3, h, w) of any size, already
    flipped horizontally when ``flipped``. Each view is ``window_resize``d, its sliding-window
    logits are resized (bilinear) to ``size``, un-flipped and soft-maxed over classes (kept as they
    are for a decoder whose outputs are probabilities: ``_class_probabilities``); the views'
    probabilities are averaged. For a ``Segmentor`` the result has channels-last strides.
    """
    return view_probs(_view_logits(model, views, window, stride, batch_size), size, decoder_outputs(model))


def resize_rows(logits: Tensor, size: tuple[int, int], top: int, bottom: int) -> Tensor:
    """Rows ``top:bottom`` of ``F.interpolate(logits, size, mode="bilinear", align_corners=False)``,
    (B, K, bottom - top, W), from the few source rows they need.

    Output row y samples the source at ``s = max((y + 0.5) h / H - 0.5, 0)``, between rows
    ``floor(s)`` and the next (the last row repeated), as PyTorch's kernel does (in float32).
    Columns are resized by ``F.interpolate`` itself at an unchanged height (exact), rows are blended
    here: the values equal the full resize up to float rounding.
    """
    h, H = logits.shape[-2], size[0]
    y = torch.arange(top, bottom, dtype=torch.float32, device=logits.device)
    scale = torch.tensor(h, dtype=torch.float32, device=logits.device) / H
    source = ((y + 0.5) * scale - 0.5).clamp(min=0)
    upper_index = source.floor().long().clamp(max=h - 1)
    lower_index = (upper_index + 1).clamp(max=h - 1)
    weight = (source - upper_index).clamp(0, 1).view(-1, 1)
    first, last = int(upper_index[0]), int(lower_index[-1]) + 1
    rows = F.interpolate(logits[..., first:last, :], size=(last - first, size[1]), mode="bilinear", align_corners=False)
    upper, lower = rows[..., upper_index - first, :], rows[..., lower_index - first, :]
    return upper * (1 - weight) + lower * weight


@torch.no_grad()
def inference_labels(
    model: nn.Module,
    views: Iterable[tuple[Tensor, bool]],
    size: tuple[int, int],
    window: int,
    stride: int,
    batch_size: int = 8,
    map_values: int | None = None,
) -> Tensor:
    """``inference(...).argmax(1)``: class labels (B, H, W) at ``size``, uint8 for at most 256
    classes (else int64), in bounded memory (``view_labels``)."""
    views = iter(views)
    first = next(views, None)
    if first is None:
        raise ConfigError("inference needs at least one view")
    batch = first[0].shape[0]
    views = itertools.chain([first], views)
    return view_labels(_view_logits(model, views, window, stride, batch_size), batch, model.n_cls, size, map_values,
                       decoder_outputs(model))


def view_labels(
    view_logits: Iterable[tuple[Tensor, bool]], batch: int, n_cls: int, size: tuple[int, int], map_values: int | None = None,
    outputs: str = "logits",
) -> Tensor:
    """``view_probs(...).argmax(1)``: labels (B, H, W) of ``batch`` images at ``size`` from each view's
    merged logits (B, K, h, w), uint8 for at most 256 classes (else int64); ``outputs``: what the
    maps are (``decoder_outputs``). A single view's labels are the argmax of its resized maps (the
    softmax changes no argmax, and is a third of the cost of a robustness sweep's decode).

    When the probabilities at ``size`` would hold more than ``map_values`` values (default
    ``MAP_VALUES``), the views' logits are kept at their own size and the rest of the protocol (resize to
    ``size``, un-flip, softmax, mean over views, argmax) runs in horizontal strips of the output
    (``resize_rows``), so no (B, K, H, W) map is ever held. The views' logits may hold at most
    ``VIEW_VALUES`` values then (an ``InputError`` asks for a smaller image otherwise).
    """
    (H, W), K = size, n_cls
    dtype = torch.uint8 if K <= 256 else torch.int64
    if batch * K * H * W <= (MAP_VALUES if map_values is None else map_values):
        view_logits = iter(view_logits)
        first, second = next(view_logits, None), next(view_logits, None)
        if first is not None and second is None:  # one view: softmax is monotonic, its argmax is the maps'
            logits, flipped = first
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            return (logits.flip(-1) if flipped else logits).argmax(1).to(dtype)
        views = itertools.chain([view for view in (first, second) if view is not None], view_logits)
        return view_probs(views, size, outputs).argmax(1).to(dtype)
    logits, held = [], 0
    for view, flipped in view_logits:
        held += view.numel()
        if held > VIEW_VALUES:
            raise InputError(f"the views of this {W} x {H} image need over {VIEW_VALUES * 4 >> 30} GiB of class maps; "
                             "resize it smaller (e.g. short_side)", arguments="short_side")
        logits.append((view, flipped))
    if not logits:
        raise ConfigError("inference needs at least one view")
    labels = torch.empty(batch, H, W, dtype=dtype, device=logits[0][0].device)
    rows = max(1, STRIP_VALUES // (batch * K * W))
    for top in range(0, H, rows):
        bottom = min(top + rows, H)
        total = None
        for view, flipped in logits:
            strip = view[..., top:bottom, :] if tuple(view.shape[-2:]) == tuple(size) else resize_rows(view, size, top, bottom)
            probs = _class_probabilities(strip.flip(-1) if flipped else strip, outputs)
            total = probs.clone() if total is None else total.add_(probs)  # a strip of the views' maps: copy it
        labels[:, top:bottom] = total.div_(len(logits)).argmax(1)
    return labels


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    window: int,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
) -> Tensor:
    """Normalised images (B, 3, H, W) -> class probabilities (B, K, H, W) by ``inference``.

    One view per scale, the normalised images resized (bilinear) to ``int(side * scale + 0.5)``,
    and its horizontal flip when ``flip``; ``stride`` defaults to ``window``. At one scale without
    flip this is Segmenter's ``segm/inference.py``. Dataset evaluation makes its views from the
    uint8 image instead, as mmseg does (``depict_analysis.models.evaluate.image_probs``).
    """
    H, W = images.shape[-2:]

    def views() -> Iterator[tuple[Tensor, bool]]:
        for scale in scales:
            size = (max(int(H * scale + 0.5), 1), max(int(W * scale + 0.5), 1))
            x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                yield (x.flip(-1) if flipped else x), flipped

    return inference(model, views(), (H, W), window, stride or window, batch_size)
