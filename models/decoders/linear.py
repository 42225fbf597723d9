"""Segmenter's linear decoder: one linear classifier on every patch token."""

from __future__ import annotations

from torch import Tensor, nn

from depict_analysis.models.decoders.init import init_weights


class LinearDecoder(nn.Module):
    def __init__(self, dim: int, n_cls: int):
        super().__init__()
        self.n_cls = n_cls
        self.head = nn.Linear(dim, n_cls)
        self.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """z: (B, N, d) patch tokens on a grid (h, w) -> logits (B, K, h, w)."""
        B = z.shape[0]
        return self.head(z).transpose(1, 2).reshape(B, self.n_cls, *grid)
