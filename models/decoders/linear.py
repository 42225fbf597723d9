"""Segmenter's linear decoder, family ``linear``: one linear classifier on every patch token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.init import init_weights
from depict_analysis.models.decoders.base import Decoder, DecoderConfig, Family, Intermediates, OfficialFormat, register_family


class LinearDecoder(Decoder):
    family, role = "linear", "linear"

    def __init__(self, dim: int, n_cls: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(dim, n_cls)
        self.apply(init_weights)

    def forward_intermediates(self, z: Tensor, grid: tuple[int, int], attention: bool = False) -> Intermediates:
        """z: (B, N, d) patch tokens on a grid (h, w) -> logits (B, K, h, w); the classifier rows play Q̂."""
        B = z.shape[0]
        masks = self.head(z).transpose(1, 2).reshape(B, self.n_cls, *grid)
        rows = F.normalize(self.head.weight, dim=-1).expand(B, -1, -1)
        return Intermediates([z], [], [], [], rows, z, masks)


@dataclass
class LinearConfig(DecoderConfig):
    name: ClassVar[str] = "linear"


register_family(Family(
    LinearConfig,
    lambda config, dim, n_cls: LinearDecoder(dim, n_cls),
    variant="linear",
    sizes={"vit": LinearConfig()},
    official=OfficialFormat("head.weight", lambda state, kwargs: LinearConfig()),
))
