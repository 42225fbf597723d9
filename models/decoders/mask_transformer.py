"""Segmenter's mask transformer (Strudel et al., 2021), the baseline DEPICT replaces (SPEC §1.4)."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from depict_analysis.models.decoders.init import init_weights
from depict_analysis.models.decoders.mask_head import class_masks


class MaskTransformer(nn.Module):
    """``proj_dec`` -> ``[Z ; cls_emb]`` -> ViT blocks -> LN -> patch/class projections -> mask head.

    Initialised as Segmenter's: ``init_weights`` on every Linear / LayerNorm, ``cls_emb``
    trunc-normal (std 0.02), ``proj_patch`` / ``proj_classes`` normal with std d^-1/2. ``dropout``
    acts where Segmenter's blocks apply it: on the attention weights, after the attention
    projection and after both MLP layers.
    """

    def __init__(
        self,
        dim_encoder: int,
        n_cls: int,
        dim: int,
        n_layers: int = 2,
        heads: int | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_cls = n_cls
        heads = heads or dim // 64
        self.proj_dec = nn.Linear(dim_encoder, dim)
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        drop_path = torch.linspace(0, drop_path_rate, n_layers).tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                proj_drop=dropout,
                attn_drop=dropout,
                drop_path=drop_path[i],
                norm_layer=partial(nn.LayerNorm, eps=1e-5),
            )
            for i in range(n_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """z: (B, N, d_enc) patch tokens on a grid (h, w) -> masks (B, K, h, w)."""
        x = self.proj_dec(z)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.n_cls], x[:, -self.n_cls :]
        return class_masks(patches @ self.proj_patch, classes @ self.proj_classes, self.mask_norm, grid)
