"""Backbone + decoder -> per-pixel class logits, and the paper's inference protocols (SPEC §1.4–1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.backbone import NORMALIZATION, ViTBackbone


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) on the right/bottom so that H and W are multiples of ``multiple``."""
    H, W = images.shape[-2:]
    return F.pad(images, (0, -W % multiple, 0, -H % multiple))


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
        self, masks: Tensor, grid: tuple[int, int], size: tuple[int, int], memory_format=torch.contiguous_format
    ) -> Tensor:
        """The decoder's masks (B, K, h, w) on ``grid`` -> logits (B, K, H, W): bilinear to the padded
        image, then cropped to ``size`` = (H, W)."""
        padded = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        masks = masks.contiguous(memory_format=memory_format)
        masks = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)
        return masks[..., : size[0], : size[1]]

    def forward(self, images: Tensor, memory_format=torch.contiguous_format) -> Tensor:
        """Normalised images (B, 3, H, W), any H, W -> logits (B, K, H, W) (see ``decode``)."""
        z, grid = self.encode(images)
        return self.decode(z, grid, images.shape[-2:], memory_format)


def class_probs(model: nn.Module, images: Tensor) -> Tensor:
    """softmax over classes of ``model(images)``: (B, K, H, W) float.

    For a ``Segmentor`` the full-resolution class maps are built in channels-last memory, where
    the bilinear upsampling, the softmax over K (a contiguous last-dimension softmax on the
    permuted view) and a later ``argmax`` over K run several times faster on the CPU than on
    NCHW maps; the result is a (B, K, H, W) tensor with channels-last strides.
    """
    if isinstance(model, Segmentor):
        logits = model(images, memory_format=torch.channels_last).float()
    else:
        logits = model(images).float()
    if _classes_innermost(logits):  # softmax over the contiguous last dim of a permuted view
        return logits.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


def _classes_innermost(maps: Tensor) -> bool:
    """Whether class maps (B, K, H, W) are laid out with K innermost (channels-last strides)."""
    return maps.shape[1] > 1 and maps.stride(1) == 1


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): every ``stride``, the last one flush with the end."""
    if length <= window:
        return [0]
    return [s for s in range(0, length - window, stride)] + [length - window]


@torch.no_grad()
def sliding_window_probs(
    model: nn.Module, images: Tensor, window: int, stride: int, batch_size: int = 8
) -> Tensor:
    """Class probabilities (B, K, H, W): softmax per window, averaged where windows overlap.

    For a ``Segmentor`` the result has channels-last strides (see ``class_probs``).
    """
    B, _, H, W = images.shape
    crops, anchors = [], []
    for b in range(B):
        for top in _window_starts(H, window, stride):
            for left in _window_starts(W, window, stride):
                crops.append(images[b, :, top : top + window, left : left + window])
                anchors.append((b, top, left))
    probs, count = None, images.new_zeros(B, 1, H, W)
    for i in range(0, len(crops), batch_size):
        out = class_probs(model, torch.stack(crops[i : i + batch_size]))
        if probs is None:  # accumulate in the layout the class maps come in (channels-last for a Segmentor)
            layout = torch.channels_last if _classes_innermost(out) else torch.contiguous_format
            probs = torch.empty(
                B, model.n_cls, H, W, dtype=images.dtype, device=images.device, memory_format=layout
            ).zero_()
        for p, (b, top, left) in zip(out, anchors[i : i + batch_size]):
            h, w = p.shape[-2:]
            probs[b, :, top : top + h, left : left + w] += p
            count[b, :, top : top + h, left : left + w] += 1
    if probs is None:  # no crops (an empty batch)
        return images.new_zeros(B, model.n_cls, H, W)
    return probs.div_(count)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    window: int | None = None,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    short_side: int | None = None,
    batch_size: int = 8,
) -> Tensor:
    """The evaluation protocol: normalised images (B, 3, H, W) -> class probabilities (B, K, H, W).

    The image is first resized so its short side is ``short_side`` (when given), then for every scale
    (and its horizontal flip when ``flip``) run through sliding windows (whole image when ``window``
    is None); the probability maps are resized back to (H, W) and averaged. For a ``Segmentor`` the
    maps are built and returned with channels-last strides (K innermost; see ``class_probs``).
    """
    H, W = images.shape[-2:]
    if short_side is not None:
        factor = short_side / min(H, W)
        base = (round(H * factor), round(W * factor))
    else:
        base = (H, W)
    total = None
    views = [(s, f) for s in scales for f in ([False, True] if flip else [False])]
    for scale, flipped in views:
        size = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if size != (H, W) else images
        if flipped:
            x = x.flip(-1)
        if window is None:
            p = class_probs(model, x)
        else:
            p = sliding_window_probs(model, x, window, stride or window, batch_size)
        if flipped:
            p = p.flip(-1)
        if size != (H, W):
            p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
        total = p.to(images.dtype) if total is None else total.add_(p)  # each p is fresh: add in place
    return total.div_(len(views)) if len(views) > 1 else total
