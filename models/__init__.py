"""The segmentation stack: ViT backbones, decoder families (DEPICT, CBT, ToST, Segmenter, linear), checkpoints.

Names below are imported on first use, so importing a light submodule (``registry``) does not
load the whole stack. The error hierarchy, atomic files, the device and progress bars live in
``depict_analysis.foundation``, which both this stack and the analyses import.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it
_EXPORTS = {
    "BackboneConfig": "depict_analysis.models.backbone",
    "CheckpointError": "depict_analysis.foundation.errors",
    "DecoderConfig": "depict_analysis.models.registry",
    "ModelConfig": "depict_analysis.models.registry",
    "Segmentor": "depict_analysis.models.segmentor",
    "create_model": "depict_analysis.models.registry",
    "list_variants": "depict_analysis.models.registry",
    "load_model": "depict_analysis.models.checkpoint",
    "predict_probs": "depict_analysis.models.segmentor",
    "save_checkpoint": "depict_analysis.models.checkpoint",
    "variant_config": "depict_analysis.models.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'depict_analysis.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
