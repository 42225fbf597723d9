"""Run a model and return what every analysis reads: the decoder's ``forward_intermediates``.

``trace(model, images)`` -> ``Trace``:
- ``tokens[j]``: patch tokens after decoder layer j, ``tokens[0]`` = decoder input Z_0, (B, N, d);
  ``layer_names[j - 1]`` names layer j ("mssa1", "cbsa2", "block1", ...)
- ``classes[i]``: class embeddings at stage ``class_stages[i]`` ("input", then after each layer that
  updates them), (B, K, d)
- ``subspaces``: every projection P_l the decoder owns, as ``Subspace(name, layer, proj (h, p, d))``
- ``class_embeddings``: the final L2-normalised class embeddings Q̂ the mask head uses, (B, K, d)
- ``masks``: the model's output logits, (B, K, H, W), equal to ``model(images)``
- ``attention[i]`` (named ``attention_names[i]``) on request; ``representatives[l]`` per layer for
  decoders that contract onto a few tokens (CBT), (B, h, R, p)

Each decoder family computes these itself (``models/decoders/<family>.py``); nothing here knows
about families.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from depict_analysis.models.decoders.base import Subspace

__all__ = ["Subspace", "Trace", "trace"]


@dataclass
class Trace:
    family: str
    grid: tuple[int, int]
    tokens: list[Tensor]
    classes: list[Tensor]
    class_stages: list[str]
    subspaces: list[Subspace]
    class_embeddings: Tensor
    masks: Tensor
    attention: list[Tensor] = field(default_factory=list)
    attention_names: list[str] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    representatives: list[Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """L: the number of token-updating decoder layers (``tokens`` has L + 1 entries)."""
        return len(self.tokens) - 1


def trace(model: nn.Module, images: Tensor, attention: bool = False) -> Trace:
    """Run ``model`` on normalised ``images`` (B, 3, H, W) and record the decoder's internals.

    The same computation as ``model(images)``: the returned ``masks`` equal it. Runs under
    ``torch.inference_mode``; the subspaces are copies, independent of later changes to the model.
    """
    with torch.inference_mode():
        z0, grid = model.encode(images)
        out = model.decoder.forward_intermediates(z0, grid, attention=attention)
        masks = model.upsample(out.masks, grid, images.shape[-2:])
        subspaces = [Subspace(s.name, s.layer, s.proj.detach().clone(), s.parameter) for s in model.decoder.subspaces()]
    return Trace(
        model.decoder.family, grid, _detached(out.tokens), _detached(out.classes), out.class_stages, subspaces,
        out.class_embeddings.detach(), masks, _detached(out.attention.values()), list(out.attention), out.layer_names,
        _detached(out.representatives),
    )


def _detached(tensors) -> list[Tensor]:
    """Views of parameters (e.g. the expanded ``cls_emb``) keep requiring grad even under inference_mode."""
    return [t.detach() for t in tensors]
