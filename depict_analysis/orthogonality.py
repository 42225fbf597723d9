"""Gram matrices of the head subspaces (PᵀP) and class embeddings (QᵀQ), SPEC.md §3.3.

Pure functions on tensors, float64 on the input's device. Vectors are rows throughout:
one layer's ``proj: (h·p, d)`` (official layout) or ``(h, p, d)`` (heads split), so that in the
paper's column notation ``P = [P_1 … P_h] = projᵀ`` and ``P_k = proj[k]ᵀ``.

Two kinds of statistic: raw ones (entries of PᵀP, which scale with ‖P‖²: how the layer uses P) and
scale-free ones (cosines between vectors), which are the ones to compare across models. Random
vectors are not orthogonal either: ``random_cosine_level(d)`` is the mean |cosine| of two
independent random directions in R^d, ≈ √(2/(πd)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from depict_analysis.foundation.errors import ConfigError, InputError


def gram(M: Tensor) -> Tensor:
    """Gram matrix of the rows: ``M: (..., n, d) -> M Mᵀ: (..., n, n)``, float64."""
    M = M.to(torch.float64)
    return M @ M.transpose(-1, -2)


def head_blocks(proj: Tensor, *, n_heads: int | None = None, dim_head: int | None = None) -> Tensor:
    """Split an official-layout ``proj: (h·p, d)`` into heads ``(h, p, d)``; row r -> head r // p.

    Give exactly one of ``n_heads`` (h) or ``dim_head`` (p). Returns a view (no copy, same dtype).
    """
    if (n_heads is None) == (dim_head is None):
        raise ConfigError("give exactly one of n_heads or dim_head")
    if proj.ndim != 2:
        raise InputError(f"expected proj of shape (h*p, d), got {tuple(proj.shape)}")
    rows = proj.shape[0]
    split = n_heads if n_heads is not None else dim_head
    if split < 1 or rows % split:
        raise InputError(f"{rows} rows cannot be split into groups by {split}")
    p = dim_head if dim_head is not None else rows // n_heads
    return proj.reshape(rows // p, p, proj.shape[1])


def query_projection(qkv_weight: Tensor, n_heads: int) -> Tensor:
    """Segmenter's query projection as head subspaces: ``qkv.weight (3d, d) -> W_Q (h, d/h, d)``.

    ``W_Q = qkv.weight[:d]`` (timm's fused layout q | k | v); head k's queries are
    ``x @ W_Q[k]ᵀ``, so the result plays the role of a DEPICT ``proj`` in :func:`subspace_summary`.
    """
    if qkv_weight.ndim != 2 or qkv_weight.shape[0] != 3 * qkv_weight.shape[1]:
        raise InputError(f"expected qkv weight of shape (3d, d), got {tuple(qkv_weight.shape)}")
    d = qkv_weight.shape[1]
    return head_blocks(qkv_weight[:d], n_heads=n_heads)


def _offdiag(G: Tensor) -> Tensor:
    """Off-diagonal entries of ``G: (..., n, n)`` as ``(..., n(n−1))``."""
    n = G.shape[-1]
    mask = ~torch.eye(n, dtype=torch.bool, device=G.device)
    return G[..., mask]


def cosines(vectors: Tensor) -> Tensor:
    """Cosines between the rows of ``(..., n, d)``: ``(..., n, n)`` float64 (a zero row has cosine 0)."""
    return gram(F.normalize(vectors.to(torch.float64), dim=-1))


def random_cosine_level(d: int) -> float:
    """E|cos θ| of two independent isotropic random vectors in R^d: Γ(d/2) / (√π Γ((d+1)/2)) ≈ √(2/(πd)).

    (|cos θ| is distributed as |x_1| / ‖x‖ for x ~ N(0, I_d); d = 2 gives 2/π.)
    """
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def subspace_summary(proj: Tensor) -> dict:
    """Orthogonality of one layer's head subspaces.

    proj: (h, p, d), rows = basis vectors, ``P_k = proj[k]ᵀ`` (use :func:`head_blocks` on the
    official (h·p, d) matrix). Raw statistics take P as the layer uses it (not normalised):

    - ``"gram"``: ``PᵀP = proj projᵀ`` (h·p, h·p) float64 tensor; head k owns rows/cols k·p … (k+1)·p−1;
    - ``"head_orthonormality"``: per head ``‖P_kᵀP_k − I_p‖_F / √p`` (list of h floats; 0 iff P_k has
      orthonormal columns);
    - ``"cross_head_mean_abs"``: mean |entry| of ``P_kᵀP_j`` over all ordered pairs k ≠ j (nan when h = 1);
    - ``"row_norm_min"``, ``"row_norm_max"``: the extreme norms of the basis vectors.

    Scale-free statistics, on the cosines between basis vectors (what to compare across models):

    - ``"cosines"``: the (h·p, h·p) cosine matrix;
    - ``"cross_head_mean_abs_cos"``: mean |cos| between vectors of different heads (nan when h = 1);
    - ``"within_head_mean_abs_cos"``: mean |cos| between distinct vectors of one head (nan when p = 1);
    - ``"coherence"``: max |cos| between distinct basis vectors among all h·p (nan when h·p = 1).
    """
    if proj.ndim != 3:
        shape = tuple(proj.shape)
        raise InputError(f"expected proj of shape (h, p, d), got {shape}; see head_blocks")
    h, p, d = proj.shape
    flat = proj.reshape(h * p, d)
    G, C = gram(flat), cosines(flat)
    blocks = G.reshape(h, p, h, p).transpose(1, 2)  # blocks[k, j] = P_kᵀ P_j: (h, h, p, p)
    diag_blocks = blocks.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (h, p, p)
    eye = torch.eye(p, dtype=G.dtype, device=G.device)
    head_err = torch.linalg.matrix_norm(diag_blocks - eye) / math.sqrt(p)
    same_head = torch.block_diag(*[torch.ones(p, p, dtype=torch.bool, device=G.device)] * h)
    distinct = ~torch.eye(h * p, dtype=torch.bool, device=G.device)
    norms = flat.to(torch.float64).norm(dim=-1)
    mean_abs = lambda mask: float(C[mask].abs().mean()) if mask.any() else math.nan  # noqa: E731
    return {
        "gram": G,
        "head_orthonormality": head_err.tolist(),
        "cross_head_mean_abs": float(_offdiag(blocks.abs().mean(dim=(-1, -2))).mean()) if h > 1 else math.nan,
        "row_norm_min": float(norms.min()),
        "row_norm_max": float(norms.max()),
        "cosines": C,
        "cross_head_mean_abs_cos": mean_abs(~same_head),
        "within_head_mean_abs_cos": mean_abs(same_head & distinct),
        "coherence": float(C[distinct].abs().max()) if h * p > 1 else math.nan,
    }


def class_summary(Q: Tensor) -> dict:
    """Orthogonality of class embeddings, rows L2-normalised, per image.

    Q: (K, d) or (B, K, d) (e.g. the final normalised Q̂ of B images, or the learned ``cls_emb``).
    With ``Q̂ = Q / ‖Q‖`` row-wise and ``G_b = Q̂_b Q̂_bᵀ`` (unit diagonal), each statistic is taken on
    every image's own Gram (|·| before any mean over images, so cosines that change sign from image to
    image do not cancel), as a (B,) tensor:

    - ``"mean_abs_offdiag"``: ``mean_{i≠j} |G_b,ij|``;
    - ``"coherence"``: ``max_{i≠j} |G_b,ij|``;
    - ``"mean_abs_offdiag_centred"``: ``mean_abs_offdiag`` of the rows ``Q̂_b − mean_k Q̂_b`` (normalised
      again). The mask head's LayerNorm over the K classes removes whatever all classes share, so this
      is the orthogonality the masks see. K centred vectors sum to zero and cannot be orthogonal: the
      floor is ``1/(K−1)``, reached by a regular simplex.

    Also ``"gram"``: the mean over images of ``G_b`` and ``"abs_gram"``: of ``|G_b|`` ((K, K) float64).
    """
    if Q.ndim not in (2, 3) or Q.shape[-2] < 2:
        shape = tuple(Q.shape)
        raise InputError(f"expected Q of shape (K, d) or (B, K, d) with K >= 2, got {shape}")
    Q_hat = F.normalize(Q.reshape(-1, *Q.shape[-2:]).to(torch.float64), dim=-1)
    grams = gram(Q_hat)  # (B, K, K)
    off = _offdiag(grams).abs()
    centred = _offdiag(cosines(Q_hat - Q_hat.mean(dim=-2, keepdim=True))).abs()
    return {
        "gram": grams.mean(dim=0),
        "abs_gram": grams.abs().mean(dim=0),
        "mean_abs_offdiag": off.mean(dim=-1),
        "coherence": off.amax(dim=-1),
        "mean_abs_offdiag_centred": centred.mean(dim=-1),
    }
