"""What ``depict info`` reports about a model: its variant, parameter counts and decoder cost."""

from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from depict_analysis.models.segmentor import Segmentor


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_gflops(model: Segmentor, image_size: tuple[int, int]) -> float:
    """Forward GFLOPs of the decoder alone for one image of ``image_size`` (multiply-add = 2 FLOPs).

    Runs a copy of the decoder on the ``meta`` device (shapes only: no memory and no time, whatever the
    image size), with autograd on: FlopCounterMode's module tracker breaks on parameter views made under
    no_grad. Attention runs on the math SDPA backend, whose matmuls every torch version counts (some
    count 0 FLOPs for the fused CPU kernels), so the number does not depend on the torch installed.
    """
    P = model.patch_size
    grid = (-(-image_size[0] // P), -(-image_size[1] // P))
    decoder = copy.deepcopy(model.decoder).to("meta")
    z = torch.zeros(1, grid[0] * grid[1], model.encoder.dim, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        decoder(z, grid)
    return counter.get_total_flops() / 1e9


def model_summary(model: Segmentor, image_size: tuple[int, int]) -> dict:
    config = model.config
    return {
        "variant": config.name or "custom",
        "decoder": config.decoder.name,
        "backbone": f"ViT d={config.backbone.d_model} L={config.backbone.n_layers} "
        f"h={config.backbone.n_heads} P={config.backbone.patch_size}",
        "n_cls": model.n_cls,
        "params_encoder": count_parameters(model.encoder),
        "params_decoder": count_parameters(model.decoder),
        "image_size": list(image_size),
        "decoder_gflops": decoder_gflops(model, image_size),
    }
