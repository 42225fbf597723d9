"""Segmenter's weight initialisation of its decoders (``segm/model/utils.py:init_weights``)."""

from __future__ import annotations

from torch import nn


def init_weights(module: nn.Module) -> None:
    """For ``module.apply``: Linear weights trunc-normal (std 0.02, cut at ±2) and zero biases;
    LayerNorm weight 1 and bias 0. Other modules and bare parameters are left alone."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
