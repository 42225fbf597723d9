"""Segmenter's mask transformer (Strudel et al., 2021), the baseline DEPICT replaces (SPEC §1.4), family ``mask_transformer``.

Official Segmenter releases use our module names as they are (``blocks.<i>.attn.qkv``, ``proj_patch``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from depict_analysis.models.decoders.base import (
    DecoderConfig,
    Family,
    Hooked,
    HookSite,
    JointDecoder,
    OfficialFormat,
    Step,
    Subspace,
    layer_count,
    merge_heads,
    register_family,
    split_heads,
)
from depict_analysis.models.decoders.init import init_weights


def block_attention(block: Block, x: Tensor) -> Tensor:
    """The attention probabilities softmax(q kᵀ / √p) of a timm ``Block`` on its input x: (B, T, d) -> (B, h, T, T)."""
    attn = block.attn
    B, T, _ = x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)


def _edit_heads(attn: nn.Module, proj: nn.Module, args: tuple[Tensor]) -> tuple[Tensor] | None:
    """A forward pre-hook of a timm ``Attention``'s output projection: its input, the merged head outputs
    (B, T, h·p), run through ``attn``'s ``heads`` site as (B, h, T, p) when an edit is attached there."""
    if not attn.__dict__.get("edits"):
        return None
    return (merge_heads(Hooked.hook(attn, "heads", split_heads(args[0], attn.num_heads))),)


class MaskTransformer(JointDecoder):
    """``proj_dec`` -> ``[Z ; cls_emb]`` -> ViT blocks -> LN -> patch/class projections -> mask head.

    Initialised as Segmenter's: ``init_weights`` on every Linear / LayerNorm, ``cls_emb``
    trunc-normal (std 0.02), ``proj_patch`` / ``proj_classes`` normal with std d^-1/2. ``dropout``
    acts where Segmenter's blocks apply it: on the attention weights, after the attention
    projection and after both MLP layers.
    """

    family, role, stage = "mask_transformer", "black-box", "block"

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
        drop_path = torch.linspace(0, drop_path_rate, n_layers, device="cpu").tolist()  # also when built on "meta"
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
        for block in self.blocks:  # the heads' outputs are merged inside timm's Attention: edited where they leave it
            block.attn.proj.register_forward_pre_hook(partial(_edit_heads, block.attn))

    def token_layers(self) -> nn.ModuleList:
        return self.blocks

    def layer_step(self, layer: Block, x: Tensor, grid: tuple[int, int], attention: bool) -> Step:
        return Step(layer(x), block_attention(layer, x) if attention else None)

    def head_site(self, layer: Block) -> HookSite:
        """Head k's output, row block k of the input of ``attn.proj`` (B, h, T, p): it contributes
        ``attn.proj.weight[:, block k]`` times it to the update (the bias is shared by all heads)."""
        return HookSite(layer.attn, "heads", self.n_cls)

    def embed(self, z: Tensor) -> Tensor:
        return self.proj_dec(z)

    def project(self, patches: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        return patches @ self.proj_patch, classes @ self.proj_classes

    def subspaces(self) -> list[Subspace]:
        """Segmenter's counterpart of P: each block's query projection W_Q = qkv.weight[:d] (SPEC §3.3)."""
        spaces = []
        for l, block in enumerate(self.blocks, 1):
            d, h = block.attn.qkv.in_features, block.attn.num_heads
            spaces.append(Subspace(f"block{l}.W_Q", l, block.attn.qkv.weight[:d].view(h, d // h, d)))
        return spaces


# ---------------------------------------------------------------------------------------- registration


@dataclass
class MaskTransformerConfig(DecoderConfig):
    name: ClassVar[str] = "mask_transformer"
    n_layers: int = 2  # ViT blocks
    n_heads: int = 0  # 0: d / 64
    d_model: int = 0  # 0: the encoder's width
    drop_path_rate: float = 0.0
    dropout: float = 0.0


def _build(config: MaskTransformerConfig, dim_encoder: int, n_cls: int) -> MaskTransformer:
    dim = config.d_model or dim_encoder
    return MaskTransformer(
        dim_encoder, n_cls, dim, config.n_layers, config.n_heads or dim // 64, config.drop_path_rate, config.dropout
    )


def _official(state: dict[str, Tensor], kwargs: dict) -> MaskTransformerConfig:
    dim = state["proj_patch"].shape[0]
    return MaskTransformerConfig(
        layer_count(state, "blocks."),
        kwargs.get("n_heads") or dim // 64,
        d_model=dim,
        drop_path_rate=kwargs.get("drop_path_rate", 0.0),
        dropout=kwargs.get("dropout", 0.0),
    )


register_family(Family(
    MaskTransformerConfig,
    _build,
    variant="segmenter",
    sizes={
        "vit": MaskTransformerConfig(n_layers=2, n_heads=0, dropout=0.1),
        "tiny": MaskTransformerConfig(n_layers=2, n_heads=2),
        "mini": MaskTransformerConfig(n_layers=2, n_heads=2),
    },
    official=OfficialFormat("blocks.0.attn.qkv.weight", _official),
))
