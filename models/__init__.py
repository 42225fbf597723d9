"""The segmentation stack: ViT backbones, decoder families (DEPICT, CBT, ToST, Segmenter, linear), checkpoints."""

from depict_analysis.models.checkpoint import CheckpointError, load_model, save_checkpoint
from depict_analysis.models.registry import DecoderConfig, ModelConfig, create_model, list_variants, variant_config
from depict_analysis.models.backbone import BackboneConfig
from depict_analysis.models.segmentor import Segmentor, predict_probs

__all__ = [
    "BackboneConfig",
    "CheckpointError",
    "DecoderConfig",
    "ModelConfig",
    "Segmentor",
    "create_model",
    "list_variants",
    "load_model",
    "predict_probs",
    "save_checkpoint",
    "variant_config",
]
