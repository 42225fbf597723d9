"""Device selection and mixed precision: CUDA when there is one, the CPU otherwise."""

from __future__ import annotations

import contextlib

import torch

from depict_analysis.foundation.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:i`` -> a torch.device (``auto`` picks CUDA when available)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
