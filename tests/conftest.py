"""Test-wide settings and the helpers the test files share: tiny models run fastest on one thread (no
spinning, no oversubscription); ``tiny_model`` builds a small seeded model, ``invoke`` runs a command line."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

torch.set_num_threads(1)


def tiny_model(name: str, n_cls: int, seed: int = 0, norm_noise: float = 0.0) -> torch.nn.Module:
    """``create_model(name, n_cls)`` in eval mode from ``torch.manual_seed(seed)``; ``norm_noise`` adds that
    much Gaussian noise to the decoder's LayerNorms (non-trivial norms, so that views of them differ)."""
    from depict_analysis.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, n_cls=n_cls).eval()
    if norm_noise:
        with torch.no_grad():
            for parameter_name, p in model.decoder.named_parameters():
                if "norm" in parameter_name:
                    p.add_(norm_noise * torch.randn_like(p))
    return model


def invoke(app, *args):
    """Run a command line of ``app`` in-process (each argument as text); the click ``Result``."""
    return CliRunner().invoke(app, [str(a) for a in args])
