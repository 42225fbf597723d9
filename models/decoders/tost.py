"""ToST decoder: DEPICT-SA with MSSA replaced by Token Statistics Self-Attention (Wu et al., ICLR 2025), family ``tost``.

ToST has no official segmentation decoder; this one is ours: DEPICT-SA's layout (the joint sequence
[Z ; Q], the same depth, heads, LayerNorms and mask head) with each MSSA layer replaced by TSSA
exactly as ``RobinWu218/ToST`` ``tost_vision/tost.py:AttentionTSSA`` computes it (bias-free
projection, its default), with a pre-LayerNorm and a residual. One layer on X (B, T, d):

    W  = LN(X) Uᵀ (per head (B, h, T, p))                U = ``qkv``: Linear, no bias
    Π  = softmax over the h heads of τ_k · ‖w̃_{k,i}‖²    w̃: W with every column L2-normalised over the T tokens;
                                                        τ = ``temp`` (h, 1): Π[k, i] = token i's share of group k
    g  = 1 / (1 + Σ_i π̄_{k,i} w_{k,i}²)                 π̄: Π normalised over tokens (+1e-8); (B, h, 1, p)
    X ← X + to_out(merge(−Π ⊙ W ⊙ g))

Its cost is linear in the number of tokens: no T × T map exists. ``Π`` is what the trace records
as the layer's attention, (B, h, T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.base import (
    DecoderConfig,
    Family,
    Hooked,
    JointDecoder,
    Step,
    Subspace,
    merge_heads,
    register_family,
    split_heads,
)
from depict_analysis.models.decoders.init import init_weights


class TSSA(Hooked, nn.Module):
    """Token statistics self-attention with its pre-LayerNorm and residual: X ← X + TSSA(LN(X)).

    Head k's output (``hook("heads", ·)``: −Π_k ⊙ W_k ⊙ g_k, (B, h, T, p)) enters ``to_out`` as row block k.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, heads * dim_head, bias=False)
        self.temp = nn.Parameter(torch.ones(heads, 1))
        self.to_out = nn.Linear(heads * dim_head, dim)

    def subspaces(self) -> Tensor:
        """The head bases as (h, p, d): ``subspaces()[k]`` holds U_kᵀ."""
        return self.qkv.weight.view(self.heads, self.dim_head, -1)

    def forward(self, x: Tensor, details: bool = False):
        """x: (B, T, d) -> (B, T, d); with ``details`` also the memberships Π (B, h, T)."""
        w = split_heads(self.qkv(self.norm(x)), self.heads)
        energy = F.normalize(w, dim=-2).square().sum(-1)  # (B, h, T)
        membership = torch.softmax(energy * self.temp, dim=1)  # over heads
        weights = membership / (membership.sum(-1, keepdim=True) + 1e-8)
        gain = 1 / (1 + weights.unsqueeze(-2) @ w.square())  # (B, h, 1, p)
        out = x + self.to_out(merge_heads(self.hook("heads", -(w * membership.unsqueeze(-1)) * gain)))
        return (out, membership) if details else out


class ToST(JointDecoder):
    """``[Z_0 ; cls_emb]`` -> L × TSSA -> LayerNorm -> split -> mask head."""

    family, role, stage = "tost", "white-box", "tssa"

    def __init__(self, dim: int, n_cls: int, n_layers: int = 3, heads: int = 3, dim_head: int = 100):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        self.layers = nn.ModuleList(TSSA(dim, heads, dim_head) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)
        self.apply(init_weights)  # trunc-normal (std 0.02) Linear weights, zero biases, as the official code
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The class embeddings and every layer's temperature, as ToST's own ``no_weight_decay``."""
        return super().no_weight_decay() | {f"layers.{l}.temp" for l in range(len(self.layers))}

    def layer_step(self, layer: TSSA, x: Tensor, grid: tuple[int, int], attention: bool) -> Step:
        out, membership = layer(x, details=True)
        return Step(out, membership if attention else None)

    def subspaces(self) -> list[Subspace]:
        return [
            Subspace(f"tssa{l}", l, layer.subspaces(), f"layers.{l - 1}.qkv.weight")
            for l, layer in enumerate(self.layers, 1)
        ]


@dataclass
class ToSTConfig(DecoderConfig):
    name: ClassVar[str] = "tost"
    n_layers: int = 3  # TSSA layers
    n_heads: int = 3
    dim_head: int = 100


# DEPICT-SA's sizes at every backbone.
register_family(Family(
    ToSTConfig,
    lambda c, dim, n_cls: ToST(dim, n_cls, c.n_layers, c.n_heads, c.dim_head),
    variant="tost",
    sizes={"vit": ToSTConfig(), "tiny": ToSTConfig(n_heads=2, dim_head=16), "mini": ToSTConfig(n_heads=2, dim_head=24)},
))
