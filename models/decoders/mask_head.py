"""The mask head shared by DEPICT and Segmenter: cosine similarity of patches and classes, LN over K."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def class_masks(patches: Tensor, classes: Tensor, mask_norm: nn.LayerNorm, grid: tuple[int, int]) -> Tensor:
    """``M = LN_K(Ẑ Q̂ᵀ)`` reshaped to the patch grid.

    patches: (B, N, d), classes: (B, K, d), grid = (h, w) with h·w = N -> masks (B, K, h, w).
    """
    patches = F.normalize(patches, dim=-1)
    classes = F.normalize(classes, dim=-1)
    masks = mask_norm(patches @ classes.transpose(1, 2))
    B, N, K = masks.shape
    return masks.transpose(1, 2).reshape(B, K, *grid)
