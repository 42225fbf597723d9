"""The optimizer and its schedule, as Segmenter builds them (SPEC §1.5): Nesterov SGD (or AdamW) over
timm's weight-decay groups, and the per-iteration poly learning rate (with a warm-up of its shape on
request)."""

from __future__ import annotations

from typing import Any

import torch

from depict_analysis.models.segmentor import Segmentor
from depict_analysis.models.train.config import TrainConfig


def poly_lr(iteration: int, iterations: int, lr: float, min_lr: float = 1e-5, power: float = 0.9) -> float:
    """SPEC's poly schedule at 0-based ``iteration``: ``(lr - min_lr)(1 - iteration/iterations)^power + min_lr``."""
    return (lr - min_lr) * (1 - iteration / iterations) ** power + min_lr


def learning_rate(iteration: int, config: TrainConfig) -> float:
    """The rate of 0-based ``iteration`` (of a resolved config), as Segmenter's ``PolynomialLR``
    (segm/optim/scheduler.py) sets it before that step: ``poly_lr`` over all ``iterations``; during a
    warm-up, ``(lr - min_lr) * iteration / warmup_iters * (1 - warmup_iters / iterations)^power +
    min_lr``, a straight line up to the poly rate of step ``warmup_iters``. Step 0 runs at ``lr``,
    warm-up or not: that scheduler's first rate is the optimizer's initial one (torch's scheduler
    steps once on construction, and the official scheduler keeps the rate at step 0).
    """
    warmup, iterations = config.warmup_iters, config.iterations
    if 0 < iteration < warmup:
        factor = iteration / warmup * (1 - warmup / iterations) ** config.poly_power
        return (config.lr - config.min_lr) * factor + config.min_lr
    return poly_lr(iteration, iterations, config.lr, config.min_lr, config.poly_power)


def no_weight_decay(model: Segmentor) -> set[str]:
    """Names (as ``model.named_parameters`` gives them) that the encoder and decoder exclude from weight
    decay, as Segmenter's ``Segmenter.no_weight_decay`` gathers them from its two halves."""
    return {f"encoder.{name}" for name in model.encoder.no_weight_decay()} | {
        f"decoder.{name}" for name in model.decoder.no_weight_decay()
    }


def weight_decay_split(model: Segmentor) -> tuple[list[str], list[str]]:
    """(names trained without weight decay, names with it), as timm 0.4.12's ``add_weight_decay``
    (which Segmenter's ``create_optimizer`` uses): no decay for 1-D parameters (LayerNorms, DEPICT's
    step sizes), biases and ``no_weight_decay`` names; frozen parameters in neither list."""
    skip = no_weight_decay(model)
    exempt, decayed = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_exempt = parameter.ndim == 1 or name.endswith(".bias") or name in skip
            (exempt if is_exempt else decayed).append(name)
    return exempt, decayed


def build_optimizer(config: TrainConfig, model: Segmentor) -> torch.optim.Optimizer:
    """timm's ``create_optimizer``: with weight decay, two groups (no decay, decay) split by
    ``weight_decay_split``; without, one group of every parameter."""
    if config.weight_decay:
        named = dict(model.named_parameters())
        exempt, decayed = weight_decay_split(model)
        parameters: Any = [
            {"params": [named[name] for name in exempt], "weight_decay": 0.0},
            {"params": [named[name] for name in decayed], "weight_decay": config.weight_decay},
        ]
    else:
        parameters = model.parameters()
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=0.0)
