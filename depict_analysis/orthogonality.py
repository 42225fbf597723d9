"""Gram matrices of the head subspaces (PᵀP) and class embeddings (QᵀQ), SPEC.md §3.3.

Pure functions on tensors, float64 on the input's device. Vectors are rows throughout:
one layer's ``proj: (h·p, d)`` (official layout) or ``(h, p, d)`` (heads split), so that in the
paper's column notation ``P = [P_1 … P_h] = projᵀ`` and ``P_k = proj[k]ᵀ``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gram(M: Tensor) -> Tensor:
    """Gram matrix of the rows: ``M: (..., n, d) -> M Mᵀ: (..., n, n)``, float64."""
    M = M.to(torch.float64)
    return M @ M.transpose(-1, -2)


def head_blocks(proj: Tensor, *, n_heads: int | None = None, dim_head: int | None = None) -> Tensor:
    """Split an official-layout ``proj: (h·p, d)`` into heads ``(h, p, d)``; row r -> head r // p.

    Give exactly one of ``n_heads`` (h) or ``dim_head`` (p). Returns a view (no copy, same dtype).
    """
    if (n_heads is None) == (dim_head is None):
        raise ValueError("give exactly one of n_heads or dim_head")
    if proj.ndim != 2:
        raise ValueError(f"expected proj of shape (h*p, d), got {tuple(proj.shape)}")
    rows = proj.shape[0]
    split = n_heads if n_heads is not None else dim_head
    if split < 1 or rows % split:
        raise ValueError(f"{rows} rows cannot be split into groups by {split}")
    p = dim_head if dim_head is not None else rows // n_heads
    return proj.reshape(rows // p, p, proj.shape[1])


def query_projection(qkv_weight: Tensor, n_heads: int) -> Tensor:
    """Segmenter's query projection as head subspaces: ``qkv.weight (3d, d) -> W_Q (h, d/h, d)``.

    ``W_Q = qkv.weight[:d]`` (timm's fused layout q | k | v); head k's queries are
    ``x @ W_Q[k]ᵀ``, so the result plays the role of a DEPICT ``proj`` in :func:`subspace_summary`.
    """
    if qkv_weight.ndim != 2 or qkv_weight.shape[0] != 3 * qkv_weight.shape[1]:
        raise ValueError(f"expected qkv weight of shape (3d, d), got {tuple(qkv_weight.shape)}")
    d = qkv_weight.shape[1]
    return head_blocks(qkv_weight[:d], n_heads=n_heads)


def _offdiag(G: Tensor) -> Tensor:
    """Off-diagonal entries of ``G: (..., n, n)`` as ``(..., n(n−1))``."""
    n = G.shape[-1]
    mask = ~torch.eye(n, dtype=torch.bool, device=G.device)
    return G[..., mask]


def _coherence(vectors: Tensor) -> Tensor:
    """Max |cosine| between distinct rows of ``(..., n, d)``: ``(...)``. Zero rows have cosine 0."""
    return _offdiag(gram(F.normalize(vectors.to(torch.float64), dim=-1))).abs().amax(dim=-1)


def subspace_summary(proj: Tensor) -> dict:
    """Orthogonality of one layer's head subspaces.

    proj: (h, p, d), rows = basis vectors, ``P_k = proj[k]ᵀ`` (use :func:`head_blocks` on the
    official (h·p, d) matrix). P is taken raw, as the layer uses it (not normalised). Returns
    - ``"gram"``: ``PᵀP = proj projᵀ`` (h·p, h·p) float64 tensor; head k owns rows/cols
      k·p … (k+1)·p−1;
    - ``"head_orthonormality"``: per head ``‖P_kᵀP_k − I_p‖_F / √p`` (list of h floats; 0 iff
      P_k has orthonormal columns);
    - ``"cross_head_mean_abs"``: mean |entry| of ``P_kᵀP_j`` over all ordered pairs k ≠ j
      (nan when h = 1);
    - ``"coherence"``: max |cos| between distinct basis vectors among all h·p (nan when h·p = 1).
    """
    if proj.ndim != 3:
        shape = tuple(proj.shape)
        raise ValueError(f"expected proj of shape (h, p, d), got {shape}; see head_blocks")
    h, p, d = proj.shape
    flat = proj.reshape(h * p, d)
    G = gram(flat)
    blocks = G.reshape(h, p, h, p).transpose(1, 2)  # blocks[k, j] = P_kᵀ P_j: (h, h, p, p)
    diag_blocks = blocks.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (h, p, p)
    eye = torch.eye(p, dtype=G.dtype, device=G.device)
    head_err = torch.linalg.matrix_norm(diag_blocks - eye) / math.sqrt(p)
    cross = _offdiag(blocks.abs().mean(dim=(-1, -2)))  # mean |entry| of each block k != j
    return {
        "gram": G,
        "head_orthonormality": head_err.tolist(),
        "cross_head_mean_abs": float(cross.mean()) if h > 1 else math.nan,
        "coherence": float(_coherence(flat)) if h * p > 1 else math.nan,
    }


def class_summary(Q: Tensor) -> dict:
    """Orthogonality of class embeddings, rows L2-normalised.

    Q: (K, d) or (B, K, d) (e.g. the final normalised Q of B images, or the learned ``cls_emb``).
    With ``Q̂ = Q / ‖Q‖`` row-wise and ``G_b = Q̂_b Q̂_bᵀ`` (unit diagonal), returns
    - ``"gram"``: the mean Gram ``Ḡ = mean_b G_b`` (K, K) float64 tensor;
    - ``"coherence"``: ``max_{i≠j} |Ḡ_ij|`` — of the *mean* Gram, so pairs whose cosine changes
      sign between images partly cancel;
    - ``"mean_abs_offdiag"``: ``mean_{i≠j} |Ḡ_ij|``, also of the mean Gram;
    - ``"coherence_per_image_mean"``: ``mean_b max_{i≠j} |G_b,ij|`` — no cancellation, ≥ coherence;
    - ``"mean_abs_offdiag_centred"``: ``mean_abs_offdiag`` of the rows ``Q̂_b − mean_k Q̂_b`` (normalised
      again). The mask head's LayerNorm over the K classes removes whatever all classes share, so
      this is the orthogonality the masks see. K centred vectors sum to zero and cannot be
      orthogonal: the floor is ``1/(K−1)``, reached by a regular simplex.
    For a single (K, d) input both coherences coincide.
    """
    if Q.ndim not in (2, 3) or Q.shape[-2] < 2:
        shape = tuple(Q.shape)
        raise ValueError(f"expected Q of shape (K, d) or (B, K, d) with K >= 2, got {shape}")
    Q_hat = F.normalize(Q.reshape(-1, *Q.shape[-2:]).to(torch.float64), dim=-1)
    grams = gram(Q_hat)  # (B, K, K)
    mean_offdiag = _offdiag(grams.mean(dim=0)).abs()
    centred = gram(F.normalize(Q_hat - Q_hat.mean(dim=-2, keepdim=True), dim=-1)).mean(dim=0)
    return {
        "gram": grams.mean(dim=0),
        "coherence": float(mean_offdiag.max()),
        "mean_abs_offdiag": float(mean_offdiag.mean()),
        "coherence_per_image_mean": float(_offdiag(grams).abs().amax(dim=-1).mean()),
        "mean_abs_offdiag_centred": float(_offdiag(centred).abs().mean()),
    }
