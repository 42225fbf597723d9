"""MaskFormer's mask-classification decoder (Cheng et al., NeurIPS 2021) on a plain ViT, family ``maskformer``.

The official code is facebookresearch/MaskFormer (``mask_former/modeling``). On our ViT, whose only
feature map is the stride-p patch grid Z_0 (B, N, d_enc), the model is:

- pixel decoder: ``BasePixelDecoder`` on that one map. With a single input level its FPN has no
  lateral branch: ``y = ReLU(GN(conv3×3(Z_0)))``, per-pixel embeddings ``E = conv3×3(y)`` (B, m, h, w)
  (``heads/pixel_decoder.py``: ``layer_<n>`` and ``mask_features``; convs without bias where a norm follows).
- transformer decoder (``transformer/transformer.py``, ``TransformerDecoder`` with no encoder layers,
  ``PRE_NORM: False``): memory ``M = input_proj(Z_0)`` (a 1×1 conv when d_enc ≠ hidden), its
  normalised sine position embedding ``pos`` (``position_encoding.py``), learned queries ``query_embed``
  (Q, D); the query content starts at ``X = 0`` and each of the L layers does, post-norm,

      X ← LN₁(X + SelfAttn(q = k = X + query_embed, v = X))
      X ← LN₂(X + CrossAttn(q = X + query_embed, k = M + pos, v = M))
      X ← LN₃(X + W₂ ReLU(W₁ X))

  and ``decoder_norm`` gives the output of every layer (deep supervision: H_l = LN(X_l), l = 1..L).
- mask-classification head (``transformer_predictor.py``): class logits ``class_embed(H_l)`` (B, Q, K + 1),
  the last column "no object"; mask embeddings ``mask_embed(H_l)`` (3-layer ReLU MLP, B, Q, m); mask
  logits ``m_l = mask_embed(H_l) · E`` (B, Q, h, w).
- semantic inference (``mask_former_model.py:semantic_inference``): per pixel and class
  ``S_c = Σ_q softmax(class logits)_{q,c} · sigmoid(m)_q``, the "no object" column dropped.

The decoder's masks are S (B, K, h, w) on the patch grid: class probabilities, not logits. It says
so with ``outputs = "probabilities"``, which the segmentor's inference protocol respects (the windows'
scores are averaged, not soft-maxed; ``models/segmentor.py``). Like every family's masks, S is
computed on the patch grid and the segmentor upsamples it (bilinear); the official model upsamples
the mask logits before the sigmoid instead. Training uses MaskFormer's set loss on
``predictions`` (``models/losses.py``).

For the analyses (black box): no layer updates the patch tokens (the pixel decoder is convolutional,
of another width), so ``tokens`` is Z_0 alone and ``embeddings`` = E; the class side are the
queries, which every layer updates: ``classes`` are
``query_embed`` ("input": the learned queries, what tells them apart; their content starts at 0)
and the content X_l after every layer, ``class_embeddings`` the L2-normalised final mask
embeddings (what E is compared with), (B, Q, m). The attention of layer l is its cross-attention
read per class: the queries' maps (B, h, Q, N) averaged with weights softmax(class logits)_{q,c}
normalised over q, the weights S gives each query's mask, (B, h, K, N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.models.decoders.base import Decoder, DecoderConfig, Family, Intermediates, register_family


def sine_position(grid: tuple[int, int], dim: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """DETR's normalised sine embedding of a (h, w) grid without padding -> (h·w, dim), row-major.

    Row and column positions are scaled to (0, 2π] (``(i + 1) / (h + 1e-6) · 2π``); each half of
    ``dim`` holds sin / cos pairs of one coordinate at frequencies 10000^(2⌊k/2⌋ / (dim/2)), the
    row half first.
    """
    half, (h, w) = dim // 2, grid
    rows = torch.arange(1, h + 1, dtype=dtype, device=device) / (h + 1e-6) * 2 * math.pi
    cols = torch.arange(1, w + 1, dtype=dtype, device=device) / (w + 1e-6) * 2 * math.pi
    freq = 10000 ** (2 * (torch.arange(half, dtype=dtype, device=device) // 2) / half)

    def embed(x: Tensor) -> Tensor:  # (n,) -> (n, half): sin on even, cos on odd frequencies, interleaved
        x = x[:, None] / freq
        return torch.stack((x[:, 0::2].sin(), x[:, 1::2].cos()), dim=2).flatten(1)

    y, x = embed(rows), embed(cols)
    return torch.cat((y[:, None].expand(h, w, half), x[None].expand(h, w, half)), dim=-1).reshape(h * w, dim)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_xavier_fill``: Kaiming-uniform weights with a = 1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class QueryLayer(nn.Module):
    """One post-norm DETR decoder layer (``TransformerDecoderLayer.forward_post``), batch first."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, attention: bool = False):
        """x: (B, Q, D) query content, memory: (B, N, D), pos: (N, D), query_pos: (Q, D) -> (B, Q, D)
        and, with ``attention``, the cross-attention per head (B, h, Q, N)."""
        q = x + query_pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x, need_weights=False)[0]))
        q, k = x + query_pos, memory + pos
        # The output always from the fused path, the map (if asked for) from the explicit one: asking
        # for attention changes nothing else.
        maps = self.multihead_attn(q, k, memory, average_attn_weights=False)[1] if attention else None
        x = self.norm2(x + self.dropout(self.multihead_attn(q, k, memory, need_weights=False)[0]))
        x = self.norm3(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, maps


class MLP(nn.Module):
    """MaskFormer's ``MLP``: Linear layers with ReLU between them (none after the last)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, n_layers: int):
        super().__init__()
        sizes = [dim_in] + [hidden] * (n_layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class MaskPredictions:
    """What MaskFormer's loss reads: every layer's predictions, the last layer last (deep supervision).

    ``class_logits``: (L, B, Q, K + 1), the last column "no object"; ``mask_logits``: (L, B, Q, h, w)
    on the patch grid.
    """

    class_logits: Tensor
    mask_logits: Tensor


def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """``S_c = Σ_q softmax(class_logits)_{q,c} sigmoid(mask_logits)_q``, "no object" dropped.

    class_logits: (B, Q, K + 1), mask_logits: (B, Q, h, w) -> S (B, K, h, w), each in [0, Q].
    """
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())


@dataclass
class MaskFormerConfig(DecoderConfig):
    """The official semantic-segmentation defaults (``configs/ade20k-150/maskformer_R50_bs16_160k.yaml``)."""

    name: ClassVar[str] = "maskformer"
    n_layers: int = 6  # DEC_LAYERS
    n_queries: int = 100  # NUM_OBJECT_QUERIES
    hidden: int = 256  # HIDDEN_DIM
    n_heads: int = 8  # NHEADS
    ffn: int = 2048  # DIM_FEEDFORWARD
    mask_dim: int = 256  # SEM_SEG_HEAD.MASK_DIM
    conv_dim: int = 256  # SEM_SEG_HEAD.CONVS_DIM
    norm_groups: int = 32  # SEM_SEG_HEAD.NORM "GN": detectron2's GroupNorm(32, ·)
    dropout: float = 0.1
    # The loss (MASK_FORMER.*): "no object" class weight, mask (focal) and dice weights; the class weight is 1.
    no_object_weight: float = 0.1
    mask_weight: float = 20.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden % self.n_heads or self.conv_dim % self.norm_groups:
            raise ConfigError(f"decoder maskformer needs n_heads dividing hidden and norm_groups dividing conv_dim, got "
                              f"{self.n_heads} / {self.hidden} and {self.norm_groups} / {self.conv_dim}")


class MaskFormer(Decoder):
    """MaskFormer's pixel decoder, transformer decoder and mask-classification head (module docstring)."""

    family, role = "maskformer", "black-box"
    outputs = "probabilities"

    def __init__(self, dim_encoder: int, n_cls: int, config: MaskFormerConfig | None = None):
        super().__init__()
        self.config = c = config or MaskFormerConfig()  # the loss (models/losses.py) reads its weights here
        self.n_cls, self.n_queries = n_cls, c.n_queries
        hidden = c.hidden
        # pixel decoder: BasePixelDecoder on one level
        self.pixel_conv = nn.Conv2d(dim_encoder, c.conv_dim, 3, padding=1, bias=False)
        self.pixel_norm = nn.GroupNorm(c.norm_groups, c.conv_dim)
        self.mask_features = nn.Conv2d(c.conv_dim, c.mask_dim, 3, padding=1)
        # transformer decoder
        self.input_proj = nn.Conv2d(dim_encoder, hidden, 1) if dim_encoder != hidden else nn.Identity()
        self.query_embed = nn.Embedding(c.n_queries, hidden)
        self.layers = nn.ModuleList(QueryLayer(hidden, c.n_heads, c.ffn, c.dropout) for _ in range(c.n_layers))
        self.decoder_norm = nn.LayerNorm(hidden)
        # mask-classification head
        self.class_embed = nn.Linear(hidden, n_cls + 1)
        self.mask_embed = MLP(hidden, hidden, c.mask_dim, 3)
        for conv in (self.pixel_conv, self.mask_features, self.input_proj):
            if isinstance(conv, nn.Conv2d):
                c2_xavier_fill(conv)
        for p in self.layers.parameters():  # the official Transformer's init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @property
    def class_tokens(self) -> Tensor:
        """The learned queries (Q, D): MaskFormer's counterpart of class tokens."""
        return self.query_embed.weight

    def no_weight_decay(self) -> set[str]:
        """The queries, as the class tokens of the other families (detectron2's WEIGHT_DECAY_EMBED = 0)."""
        return {"query_embed.weight"}

    def pixel_decoder(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """Z_0 (B, N, d_enc) on ``grid`` -> per-pixel embeddings E (B, m, h, w)."""
        x = z.transpose(1, 2).reshape(z.shape[0], -1, *grid)
        return self.mask_features(F.relu(self.pixel_norm(self.pixel_conv(x))))

    def queries(self, z: Tensor, grid: tuple[int, int], attention: bool = False):
        """The transformer decoder on Z_0 -> every layer's content X_l (list of L (B, Q, D)) and its
        cross-attention maps (B, h, Q, N) when asked for."""
        x = z.transpose(1, 2).reshape(z.shape[0], -1, *grid)
        memory = self.input_proj(x).flatten(2).transpose(1, 2)
        pos = sine_position(grid, memory.shape[-1], z.device, memory.dtype if memory.dtype == torch.float64 else torch.float32)
        query_pos = self.query_embed.weight
        content = torch.zeros(z.shape[0], self.n_queries, query_pos.shape[-1], dtype=memory.dtype, device=z.device)
        contents, maps = [], []
        for layer in self.layers:
            content, cross = layer(content, memory, pos, query_pos, attention)
            contents.append(content)
            maps.append(cross)
        return contents, maps

    def head(self, content: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One layer's content X (..., B, Q, D) and E (B, m, h, w) -> class logits (..., B, Q, K + 1),
        mask embeddings (..., B, Q, m) and mask logits (..., B, Q, h, w)."""
        hidden = self.decoder_norm(content)
        embeddings = self.mask_embed(hidden)
        return self.class_embed(hidden), embeddings, torch.einsum("...bqm,bmhw->...bqhw", embeddings, pixels)

    def predictions(self, z: Tensor, grid: tuple[int, int]) -> MaskPredictions:
        """Every layer's class and mask logits, for the loss."""
        contents, _ = self.queries(z, grid)
        class_logits, _, mask_logits = self.head(torch.stack(contents), self.pixel_decoder(z, grid))
        return MaskPredictions(class_logits, mask_logits)

    def forward_intermediates(self, z: Tensor, grid: tuple[int, int], attention: bool = False) -> Intermediates:
        pixels = self.pixel_decoder(z, grid)
        contents, cross = self.queries(z, grid, attention)
        class_logits, embeddings, mask_logits = self.head(contents[-1], pixels)
        masks = semantic_inference(class_logits, mask_logits)
        names = [f"layer{l}" for l in range(1, len(self.layers) + 1)]
        maps = {}
        if attention:  # per class: the queries' maps weighted by their final class probabilities
            weights = class_logits.softmax(-1)[..., :-1]
            weights = weights / weights.sum(1, keepdim=True)  # (B, Q, K), a mean over queries per class
            maps = {name: torch.einsum("bhqn,bqc->bhcn", a, weights) for name, a in zip(names, cross)}
        queries = self.query_embed.weight.expand(z.shape[0], -1, -1)
        return Intermediates(
            [z], [], [queries, *contents], ["input", *names], F.normalize(embeddings, dim=-1),
            pixels.flatten(2).transpose(1, 2), masks, maps,
        )


# ---------------------------------------------------------------------------------------- registration


# Every ViT gets the official decoder; the small sizes keep its shape at the widths of our tiny / mini
# backbones, with more queries than the synthetic sets' 8 classes and, as their other families, no dropout.
register_family(Family(
    MaskFormerConfig,
    lambda config, dim_encoder, n_cls: MaskFormer(dim_encoder, n_cls, config),
    variant="maskformer",
    sizes={
        "vit": MaskFormerConfig(),
        "tiny": MaskFormerConfig(n_layers=2, n_queries=12, hidden=32, n_heads=2, ffn=64, mask_dim=32, conv_dim=32,
                                 norm_groups=8, dropout=0.0),
        "mini": MaskFormerConfig(n_layers=3, n_queries=16, hidden=64, n_heads=4, ffn=256, mask_dim=64, conv_dim=64,
                                 norm_groups=8, dropout=0.0),
    },
))
