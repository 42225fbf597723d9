"""CBT, the Contract-and-Broadcast Transformer decoder (Wen et al., NeurIPS 2025), family ``cbt``.

The segmentation decoder of QishuaiWen/CBSA (``segm/model/decoder.py``) is DEPICT-SA with every
MSSA layer replaced by CBSA (``segm/model/dec_blocks.py:Attention``), wrapped in a pre-LayerNorm
and a residual. One CBSA layer on the joint sequence X = [Z ; Q] (B, T, d), heads of width p:

    W   = LN(X) projᵀ                                    (B, T, h·p)   proj: Linear, no bias
    R_0 = r × r adaptive average pool of W's patch part on its (h, w) grid   (B, r², h·p)
    per head k:
      A   = softmax(R_0 Wᵀ / √p)                         contract: the representatives attend to all tokens
      R   = R_0 + step_rep_k · A W                       (B, h, r², p)
      O   = step_x_k · Aᵀ softmax(R Rᵀ / √p) R           broadcast: tokens receive the representatives'
                                                        self-attention through the contract map
    X  ← X + to_out(merge(O))

The official code hard-codes K = 150 classes, h·p = 300 and a square grid; here K, h, p, the grid
and r (``rep_grid``, officially 10) are free, and the same numbers come out where they agree.
Its releases are Segmenter's (``checkpoint.pth`` + ``variant.yml``) with the decoder's layers under
``net.layers.<i>.fn.`` / ``.norm.``, as DEPICT's; ``step_rep`` tells them apart.
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
    OfficialFormat,
    Step,
    Subspace,
    layer_count,
    merge_heads,
    prenorm_renames,
    register_family,
    split_heads,
)
from depict_analysis.models.decoders.init import init_weights


class CBSA(Hooked, nn.Module):
    """Contract-and-broadcast self-attention with its pre-LayerNorm and residual: X ← X + CBSA(LN(X)).

    Head k's output (``hook("heads", ·)``: step_x_k · broadcast_k, (B, h, T, p)) enters ``to_out`` as row block k.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, rep_grid: int):
        super().__init__()
        self.heads, self.dim_head, self.rep_grid = heads, dim_head, rep_grid
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.step_x = nn.Parameter(torch.randn(heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(heads, 1, 1))
        self.to_out = nn.Linear(heads * dim_head, dim)

    def subspaces(self) -> Tensor:
        """The head bases as (h, p, d): ``subspaces()[k]`` holds P_kᵀ."""
        return self.proj.weight.view(self.heads, self.dim_head, -1)

    def forward(self, x: Tensor, grid: tuple[int, int], details: bool = False):
        """x: (B, T, d), its first h·w tokens the patches on ``grid`` -> (B, T, d).

        With ``details`` also the representatives after the contract step (B, h, r², p) and the
        contract attention A (B, h, r², T).
        """
        B, T, _ = x.shape
        w = self.proj(self.norm(x))
        patches = w[:, : grid[0] * grid[1]].transpose(1, 2).reshape(B, -1, *grid)
        rep = F.adaptive_avg_pool2d(patches, self.rep_grid).flatten(2).transpose(1, 2)  # (B, r², h·p), row-major cells
        w, rep = split_heads(w, self.heads), split_heads(rep, self.heads)
        contract = torch.softmax(rep @ w.transpose(-2, -1) * self.dim_head**-0.5, dim=-1)
        rep = rep + self.step_rep * (contract @ w)
        broadcast = contract.transpose(-2, -1) @ F.scaled_dot_product_attention(rep, rep, rep)
        out = x + self.to_out(merge_heads(self.hook("heads", self.step_x * broadcast)))
        return (out, rep, contract) if details else out


class CBT(JointDecoder):
    """CBT: ``[Z_0 ; cls_emb]`` -> L × CBSA -> LayerNorm -> split -> mask head (DEPICT-SA's mask head)."""

    family, role, stage = "cbt", "white-box", "cbsa"

    def __init__(self, dim: int, n_cls: int, n_layers: int = 3, heads: int = 3, dim_head: int = 100, rep_grid: int = 10):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        self.layers = nn.ModuleList(CBSA(dim, heads, dim_head, rep_grid) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)
        self.apply(init_weights)  # trunc-normal (std 0.02) Linear weights, zero biases, as the official code
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def layer_step(self, layer: CBSA, x: Tensor, grid: tuple[int, int], attention: bool) -> Step:
        out, representatives, contract = layer(x, grid, details=True)
        return Step(out, contract if attention else None, representatives)

    def subspaces(self) -> list[Subspace]:
        return [
            Subspace(f"cbsa{l}", l, layer.subspaces(), f"layers.{l - 1}.proj.weight")
            for l, layer in enumerate(self.layers, 1)
        ]


# ---------------------------------------------------------------------------------------- registration


@dataclass
class CBTConfig(DecoderConfig):
    name: ClassVar[str] = "cbt"
    n_layers: int = 3  # CBSA layers
    n_heads: int = 3
    dim_head: int = 100
    rep_grid: int = 10  # r: r × r representatives


def _official(state: dict[str, Tensor], kwargs: dict) -> CBTConfig:
    heads = state["net.layers.0.fn.step_rep"].shape[0]
    return CBTConfig(layer_count(state, "net.layers."), heads, state["net.layers.0.fn.proj.weight"].shape[0] // heads)


# CBSA's README gives decoder GFLOPs of 1.5 / 2.3 / 7.8 / 22.3 G for ViT-T / S / B / L (3 layers,
# 10 × 10 representatives, the mask head not counted): h·p = 300 / 300 / 600 / 900, i.e. 3, 3, 6
# and 9 heads of the official width 100. The small sizes follow DEPICT-SA's (tiny, mini) with r
# scaled like the grid (officially 32 → 10 at 512 px; mini 16 → 5, tiny 4 → 2).
register_family(Family(
    CBTConfig,
    lambda c, dim, n_cls: CBT(dim, n_cls, c.n_layers, c.n_heads, c.dim_head, c.rep_grid),
    variant="cbt",
    sizes={
        "vit": CBTConfig(),
        "vit-b16": CBTConfig(n_heads=6),
        "vit-l16": CBTConfig(n_heads=9),
        "tiny": CBTConfig(n_heads=2, dim_head=16, rep_grid=2),
        "mini": CBTConfig(n_heads=2, dim_head=24, rep_grid=5),
    },
    official=OfficialFormat("net.layers.0.fn.step_rep", _official, prenorm_renames("net", "layers")),
))
