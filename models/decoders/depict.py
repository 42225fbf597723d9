"""DEPICT decoders: multi-head subspace self/cross-attention (SPEC §1.2–1.4), families ``depict_sa`` and ``depict_ca``.

Each layer owns one matrix ``proj: (h·p, d)``. Its rows, in h groups of p, are the bases of the
head subspaces; the same matrix projects tokens into the subspaces and maps the result back.
Initialisation as the official code: ``proj`` normal with std d^-1/2, step sizes standard normal,
``cls_emb`` trunc-normal (std 0.02), LayerNorms 1 / 0.
Official releases (QishuaiWen/DEPICT) keep a layer's weights under ``net.layers.<i>.fn.`` (SA) or
``snet.`` / ``cnet.`` (CA) and its LayerNorm under ``.norm.``; variant.yml does not say which mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.base import (
    DecoderConfig,
    Decoder,
    Family,
    Hooked,
    HookSite,
    Intermediates,
    JointDecoder,
    OfficialFormat,
    Step,
    Subspace,
    heads_of,
    layer_count,
    merge_heads,
    prenorm_renames,
    register_family,
    split_heads,
)


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


class _SubspaceLayer(Hooked, nn.Module):
    """Parameters shared by MSSA and MSCA: pre-LayerNorm, ``proj: (h·p, d)``, step size η.

    Head k's output (``hook("heads", ·)``: (B, h, T, p), row block k) contributes η P_k·(that output) to the update.
    """

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
        q = split_heads(queries @ self.proj.T, self.heads)
        k = q if keys is queries else split_heads(keys @ self.proj.T, self.heads)
        out, attention = subspace_attention(q, k, return_attention)
        return self.step_size * (merge_heads(self.hook("heads", out)) @ self.proj), attention


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


def _subspaces(stage: str, layers: nn.ModuleList, attribute: str, produces_tokens: bool) -> list[Subspace]:
    """One Subspace per layer: ``<stage><l>``, the parameter ``<attribute>.<l - 1>.proj``."""
    return [
        Subspace(f"{stage}{l}", l if produces_tokens else None, layer.subspaces(), f"{attribute}.{l - 1}.proj")
        for l, layer in enumerate(layers, 1)
    ]


class DepictSA(JointDecoder):
    """DEPICT-SA: ``[Z_0 ; cls_emb]`` -> L × MSSA -> LayerNorm -> split -> mask head."""

    family, role, stage = "depict_sa", "white-box", "mssa"

    def __init__(self, dim: int, n_cls: int, n_layers: int = 3, heads: int = 3, dim_head: int = 100):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.layers = nn.ModuleList(MSSA(dim, heads, dim_head) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def layer_step(self, layer: MSSA, x: Tensor, grid: tuple[int, int], attention: bool) -> Step:
        # The map comes from the explicit path; the output from the fused one, as in forward.
        return Step(layer(x), layer(x, return_attention=True)[1] if attention else None)

    def subspaces(self) -> list[Subspace]:
        return _subspaces("mssa", self.layers, "layers", True)


class DepictCA(Decoder):
    """DEPICT-CA: Z_0 -> L1 × MSSA -> LN = Z_L1; cls_emb -> L2 × MSCA(keys Z_L1) -> LN = Q; mask head."""

    family, role = "depict_ca", "white-box"

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

    def layer_names(self) -> tuple[list[str], list[str]]:
        """The MSSA layers' names and the MSCA layers'."""
        return [f"mssa{l}" for l in range(1, len(self.self_layers) + 1)], [f"msca{l}" for l in range(1, len(self.cross_layers) + 1)]

    def hook_sites(self) -> dict[str, HookSite]:
        self_names, cross_names = self.layer_names()
        sites = self.stage_sites(["input", *self_names], ["input", *cross_names])
        sites |= {f"heads/{name}": HookSite(layer, "heads") for name, layer in zip(self_names, self.self_layers)}
        return sites | {f"heads/{name}": HookSite(layer, "heads", self.n_cls) for name, layer in zip(cross_names, self.cross_layers)}

    def forward_intermediates(self, z: Tensor, grid: tuple[int, int], attention: bool = False) -> Intermediates:
        z = self.hook("tokens/input", z)
        tokens, maps = [z], {}
        self_names, cross_names = self.layer_names()
        for name, layer in zip(self_names, self.self_layers):
            if attention:
                maps[name] = layer(z, return_attention=True)[1]
            z = self.hook(f"tokens/{name}", layer(z))
            tokens.append(z)
        z = self.snorm(z)
        q = self.hook("classes/input", self.cls_emb.expand(z.shape[0], -1, -1))
        classes = [q]
        for name, layer in zip(cross_names, self.cross_layers):
            if attention:
                maps[name] = layer(q, z, return_attention=True)[1]
            q = self.hook(f"classes/{name}", layer(q, z))
            classes.append(q)
        class_embeddings, masks = self.mask_head(z, self.cnorm(q), grid)
        return Intermediates(tokens, self_names, classes, ["input", *cross_names], class_embeddings, z, masks, maps)

    def subspaces(self) -> list[Subspace]:
        return _subspaces("mssa", self.self_layers, "self_layers", True) + _subspaces(
            "msca", self.cross_layers, "cross_layers", False
        )


# ---------------------------------------------------------------------------------------- registration


@dataclass
class DepictSAConfig(DecoderConfig):
    name: ClassVar[str] = "depict_sa"
    n_layers: int = 3  # MSSA layers
    n_heads: int = 3
    dim_head: int = 100


@dataclass
class DepictCAConfig(DecoderConfig):
    name: ClassVar[str] = "depict_ca"
    n_layers: int = 3  # MSSA layers on the patch tokens
    n_heads: int = 3
    dim_head: int = 100
    n_cross_layers: int = 3  # MSCA layers on the class embeddings
    cross_dim_head: int = 50


def _official_sa(state: dict[str, Tensor], kwargs: dict) -> DepictSAConfig:
    width = kwargs.get("dim_head", 100)
    return DepictSAConfig(layer_count(state, "net.layers."), heads_of(state, "net.layers.0.fn.proj", width), width)


def _official_ca(state: dict[str, Tensor], kwargs: dict) -> DepictCAConfig:
    width, cross_width = kwargs.get("dim_head", 100), kwargs.get("cross_dim_head", 50)
    heads = heads_of(state, "snet.layers.0.fn.proj", width)
    return DepictCAConfig(layer_count(state, "snet.layers."), heads, width, layer_count(state, "cnet.layers."), cross_width)


# The paper's proportions at every size: 3 layers of 3 heads × 100 (CA: 3 MSCA layers × 3 heads × 50);
# tests use heads of 16 on d = 48 (tiny), the built-in models 2 × 24 on d = 64 (mini).
register_family(Family(
    DepictSAConfig,
    lambda c, dim, n_cls: DepictSA(dim, n_cls, c.n_layers, c.n_heads, c.dim_head),
    variant="depict-sa",
    sizes={"vit": DepictSAConfig(), "tiny": DepictSAConfig(n_heads=2, dim_head=16), "mini": DepictSAConfig(n_heads=2, dim_head=24)},
    official=OfficialFormat("net.layers.0.fn.proj", _official_sa, prenorm_renames("net", "layers")),
))
register_family(Family(
    DepictCAConfig,
    lambda c, dim, n_cls: DepictCA(dim, n_cls, c.n_layers, c.n_heads, c.dim_head, c.n_cross_layers, c.cross_dim_head),
    variant="depict-ca",
    sizes={
        "vit": DepictCAConfig(),
        "tiny": DepictCAConfig(n_heads=2, dim_head=16, cross_dim_head=8),
        "mini": DepictCAConfig(n_heads=2, dim_head=24, cross_dim_head=12),
    },
    official=OfficialFormat(
        "snet.layers.0.fn.proj", _official_ca, prenorm_renames("snet", "self_layers") + prenorm_renames("cnet", "cross_layers")
    ),
))
