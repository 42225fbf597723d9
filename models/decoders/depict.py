"""DEPICT decoders: multi-head subspace self/cross-attention (SPEC §1.2–1.4).

Each layer owns one matrix ``proj: (h·p, d)``. Its rows, in h groups of p, are the bases of the
head subspaces; the same matrix projects tokens into the subspaces and maps the result back.
Initialisation as the official code: ``proj`` normal with std d^-1/2, step sizes standard normal,
``cls_emb`` trunc-normal (std 0.02), LayerNorms 1 / 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.mask_head import class_masks


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, h·p) -> (B, h, T, p)."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, p) -> (B, T, h·p)."""
    B, h, T, p = x.shape
    return x.transpose(1, 2).reshape(B, T, h * p)


def subspace_attention(queries: Tensor, keys: Tensor, return_attention: bool = False):
    """softmax(V Wᵀ / sqrt(p)) W per head, with keys = values.

    queries: (B, h, T, p), keys: (B, h, S, p) -> (B, h, T, p), and the attention (B, h, T, S) on request.
    The fused kernel is used unless the attention map itself is wanted.
    """
    if not return_attention:
        return F.scaled_dot_product_attention(queries, keys, keys), None
    scale = queries.shape[-1] ** -0.5
    attention = torch.softmax(queries @ keys.transpose(-2, -1) * scale, dim=-1)
    return attention @ keys, attention


class _SubspaceLayer(nn.Module):
    """Parameters shared by MSSA and MSCA: pre-LayerNorm, ``proj: (h·p, d)``, step size η."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Parameter(torch.randn(heads * dim_head, dim) / dim**0.5)
        self.step_size = nn.Parameter(torch.randn(1))

    def subspaces(self) -> Tensor:
        """The head bases as (h, p, d): ``subspaces()[k]`` holds P_kᵀ."""
        return self.proj.view(self.heads, self.dim_head, -1)

    def _attend(self, queries: Tensor, keys: Tensor, return_attention: bool):
        """queries: (B, T, d) already in R^d, keys: (B, S, d) normalised -> update (B, T, d)."""
        # One (h·p)-wide matmul in, one out, heads as strided views: SDPA's CPU flash kernel reads
        # strided heads and writes its output in (B, T, h, p) order, so merging is free; making
        # the heads contiguous first gains nothing (benchmarks/decoder.py, README "Performance").
        q = _split_heads(queries @ self.proj.T, self.heads)
        k = q if keys is queries else _split_heads(keys @ self.proj.T, self.heads)
        out, attention = subspace_attention(q, k, return_attention)
        return self.step_size * (_merge_heads(out) @ self.proj), attention


class MSSA(_SubspaceLayer):
    """Multi-head subspace self-attention: ``X ← X + η · merge(softmax(W Wᵀ/√p) W) proj``, W = LN(X) projᵀ."""

    def forward(self, x: Tensor, return_attention: bool = False):
        """x: (B, T, d) -> (B, T, d); with ``return_attention`` also (B, h, T, T)."""
        x_hat = self.norm(x)
        update, attention = self._attend(x_hat, x_hat, return_attention)
        return (x + update, attention) if return_attention else x + update


class MSCA(_SubspaceLayer):
    """Multi-head subspace cross-attention: class queries attend to the (normalised) image tokens."""

    def forward(self, q: Tensor, z: Tensor, return_attention: bool = False):
        """q: (B, K, d) class embeddings, z: (B, N, d) image tokens -> (B, K, d) [, (B, h, K, N)]."""
        update, attention = self._attend(q, self.norm(z), return_attention)
        return (q + update, attention) if return_attention else q + update


class DepictSA(nn.Module):
    """DEPICT-SA: ``[Z_0 ; cls_emb]`` -> L × MSSA -> LayerNorm -> split -> mask head."""

    def __init__(self, dim: int, n_cls: int, n_layers: int = 3, heads: int = 3, dim_head: int = 100):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.layers = nn.ModuleList(MSSA(dim, heads, dim_head) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """z: (B, N, d) patch tokens on a grid (h, w) -> masks (B, K, h, w)."""
        x = torch.cat([z, self.cls_emb.expand(z.shape[0], -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.n_cls], x[:, -self.n_cls :]
        return class_masks(patches, classes, self.mask_norm, grid)


class DepictCA(nn.Module):
    """DEPICT-CA: Z_0 -> L1 × MSSA -> LN = Z_L1; cls_emb -> L2 × MSCA(keys Z_L1) -> LN = Q; mask head."""

    def __init__(
        self,
        dim: int,
        n_cls: int,
        n_layers: int = 3,
        heads: int = 3,
        dim_head: int = 100,
        n_cross_layers: int = 3,
        cross_dim_head: int = 50,
    ):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.self_layers = nn.ModuleList(MSSA(dim, heads, dim_head) for _ in range(n_layers))
        self.cross_layers = nn.ModuleList(MSCA(dim, heads, cross_dim_head) for _ in range(n_cross_layers))
        self.snorm = nn.LayerNorm(dim, eps=1e-5)
        self.cnorm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """z: (B, N, d) patch tokens on a grid (h, w) -> masks (B, K, h, w)."""
        for layer in self.self_layers:
            z = layer(z)
        z = self.snorm(z)
        q = self.cls_emb.expand(z.shape[0], -1, -1)
        for layer in self.cross_layers:
            q = layer(q, z)
        return class_masks(z, self.cnorm(q), self.mask_norm, grid)
