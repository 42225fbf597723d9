"""The mask head shared by DEPICT and Segmenter: cosine similarity of patches and classes, LN over K."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def class_masks(patches: Tensor, classes: Tensor, mask_norm: nn.LayerNorm, grid: tuple[int, int]) -> Tensor:
    """``M = LN_K(Ẑ Q̂ᵀ)`` reshaped to the patch grid.

    patches: (B, N, d), classes: (B, K, d), grid = (h, w) with h·w = N -> masks (B, K, h, w).
    """
    return masks_from_embeddings(patches, F.normalize(classes, dim=-1), mask_norm, grid)


def masks_from_embeddings(patches: Tensor, class_embeddings: Tensor, mask_norm: nn.LayerNorm, grid: tuple[int, int]) -> Tensor:
    """``class_masks`` given Q̂ (B, K, d) already L2-normalised (what an edit of the class embeddings replaces)."""
    masks = mask_norm(F.normalize(patches, dim=-1) @ class_embeddings.transpose(1, 2))
    B, N, K = masks.shape
    return masks.transpose(1, 2).reshape(B, K, *grid)
