"""Named model variants with the paper's hyper-parameters, and ``create_model`` (SPEC §1.5).

A variant name reads ``<decoder>-<backbone>``: e.g. ``depict-sa-vit-s16`` is DEPICT-SA on ViT-S/16,
``segmenter-vit-b16`` Segmenter's mask transformer on ViT-B/16. ``tiny`` backbones are for tests;
``mini`` (patch 4 on 64 px: a 16 x 16 token grid) is the backbone of the built-in default models.
Each decoder family registers its own sizes per backbone in its file (``models/decoders/<family>.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from depict_analysis.models.backbone import BackboneConfig, ViTBackbone
from depict_analysis.models.decoders.base import DecoderConfig, build_decoder, decoder_config_from_dict, families
from depict_analysis.foundation.errors import ConfigError
from depict_analysis.models.segmentor import Segmentor


@dataclass
class ModelConfig:
    backbone: BackboneConfig
    decoder: DecoderConfig  # the family's own config (models/decoders/<family>.py)
    n_cls: int = 150
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.n_cls, int) or isinstance(self.n_cls, bool) or self.n_cls < 1:
            raise ConfigError(f"the number of classes must be a positive integer, got {self.n_cls!r}")

    def to_dict(self) -> dict:
        return {"backbone": asdict(self.backbone), "decoder": self.decoder.to_dict(), "n_cls": self.n_cls, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From ``to_dict``'s layout, or from a file written before families had their own configs."""
        return cls(
            backbone=BackboneConfig(**d["backbone"]),
            decoder=decoder_config_from_dict(d["decoder"]),
            n_cls=d["n_cls"],
            name=d.get("name", ""),
        )


BACKBONES: dict[str, BackboneConfig] = {
    "vit-t16": BackboneConfig(192, 12, 3, 16, (512, 512), timm_name="vit_tiny_patch16_384"),
    "vit-s16": BackboneConfig(384, 12, 6, 16, (512, 512), timm_name="vit_small_patch16_384"),
    "vit-b16": BackboneConfig(768, 12, 12, 16, (512, 512), timm_name="vit_base_patch16_384"),
    "vit-l16": BackboneConfig(1024, 24, 16, 16, (640, 640), timm_name="vit_large_patch16_384"),
    "tiny": BackboneConfig(48, 2, 2, 8, (32, 32), drop_path_rate=0.0),
    "mini": BackboneConfig(64, 4, 2, 4, (64, 64), drop_path_rate=0.0),
}


def list_variants() -> list[str]:
    return [f"{family.variant}-{bb}" for bb in BACKBONES for family in families()]


def variant_config(name: str, n_cls: int = 150) -> ModelConfig:
    """The ModelConfig of a registered variant, e.g. ``depict-sa-vit-s16``; its decoder's sizes come from
    the family's file."""
    for family in families():
        backbone = name.removeprefix(family.variant + "-")
        if backbone != name and backbone in BACKBONES:
            return ModelConfig(replace(BACKBONES[backbone]), replace(family.size(backbone)), n_cls, name)
    raise ConfigError(f"unknown variant {name!r}; known: {', '.join(list_variants())}")


def create_model(config: ModelConfig | str, n_cls: int | None = None) -> Segmentor:
    """Build a randomly initialised Segmentor from a ModelConfig or a variant name."""
    if isinstance(config, str):
        config = variant_config(config, n_cls or 150)
    elif n_cls is not None:
        config = replace(config, n_cls=n_cls)
    encoder = ViTBackbone(config.backbone)
    decoder = build_decoder(config.decoder, encoder.dim, config.n_cls)
    return Segmentor(encoder, decoder, config)
