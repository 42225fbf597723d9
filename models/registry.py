"""Named model variants with the paper's hyper-parameters, and ``create_model`` (SPEC §1.5).

A variant name reads ``<decoder>-<backbone>``: e.g. ``depict-sa-vit-s16`` is DEPICT-SA on ViT-S/16,
``segmenter-vit-b16`` Segmenter's mask transformer on ViT-B/16. ``tiny`` backbones are for tests;
``mini`` (patch 4 on 64 px: a 16 x 16 token grid) is the backbone of the built-in default models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from torch import nn

from depict_analysis.models.backbone import BackboneConfig, ViTBackbone
from depict_analysis.models.decoders.depict import DepictCA, DepictSA
from depict_analysis.models.decoders.linear import LinearDecoder
from depict_analysis.models.decoders.mask_transformer import MaskTransformer
from depict_analysis.models.segmentor import Segmentor

DECODER_FAMILIES = ("depict_sa", "depict_ca", "mask_transformer", "linear")


@dataclass
class DecoderConfig:
    name: str = "depict_sa"  # one of DECODER_FAMILIES
    n_layers: int = 3  # MSSA layers (DEPICT) or transformer blocks (Segmenter)
    n_heads: int = 3  # DEPICT heads; Segmenter: 0 means d/64
    dim_head: int = 100
    n_cross_layers: int = 3  # DEPICT-CA only
    cross_dim_head: int = 50  # DEPICT-CA only
    d_model: int = 0  # Segmenter width; 0 means the encoder's width
    drop_path_rate: float = 0.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.name not in DECODER_FAMILIES:
            raise ValueError(f"decoder name must be one of {DECODER_FAMILIES}, got {self.name!r}")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    n_cls: int = 150
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(
            backbone=BackboneConfig(**d["backbone"]),
            decoder=DecoderConfig(**d["decoder"]),
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

DECODERS: dict[str, DecoderConfig] = {
    "depict-sa": DecoderConfig("depict_sa"),
    "depict-ca": DecoderConfig("depict_ca"),
    "segmenter": DecoderConfig("mask_transformer", n_layers=2, n_heads=0, dropout=0.1),
    "linear": DecoderConfig("linear"),
}

# Tiny variants keep the structure (3 MSSA layers, CA's cross stack) at a size tests can afford.
TINY_DECODERS: dict[str, DecoderConfig] = {
    "depict-sa": DecoderConfig("depict_sa", n_heads=2, dim_head=16),
    "depict-ca": DecoderConfig("depict_ca", n_heads=2, dim_head=16, cross_dim_head=8),
    "segmenter": DecoderConfig("mask_transformer", n_layers=2, n_heads=2),
    "linear": DecoderConfig("linear"),
}

# Mini variants: the paper's proportions (heads x dim_head < d, cross heads half as wide) at d = 64.
MINI_DECODERS: dict[str, DecoderConfig] = {
    "depict-sa": DecoderConfig("depict_sa", n_heads=2, dim_head=24),
    "depict-ca": DecoderConfig("depict_ca", n_heads=2, dim_head=24, cross_dim_head=12),
    "segmenter": DecoderConfig("mask_transformer", n_layers=2, n_heads=2),
    "linear": DecoderConfig("linear"),
}

DECODERS_FOR_BACKBONE: dict[str, dict[str, DecoderConfig]] = {"tiny": TINY_DECODERS, "mini": MINI_DECODERS}


def list_variants() -> list[str]:
    return [f"{dec}-{bb}" for bb in BACKBONES for dec in DECODERS]


def variant_config(name: str, n_cls: int = 150) -> ModelConfig:
    """The ModelConfig of a registered variant, e.g. ``depict-sa-vit-s16``."""
    for dec in DECODERS:
        if name.startswith(dec + "-") and name[len(dec) + 1 :] in BACKBONES:
            backbone = name[len(dec) + 1 :]
            decoders = DECODERS_FOR_BACKBONE.get(backbone, DECODERS)
            return ModelConfig(replace(BACKBONES[backbone]), replace(decoders[dec]), n_cls, name)
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(list_variants())}")


def build_decoder(config: DecoderConfig, dim_encoder: int, n_cls: int) -> nn.Module:
    if config.name == "depict_sa":
        return DepictSA(dim_encoder, n_cls, config.n_layers, config.n_heads, config.dim_head)
    if config.name == "depict_ca":
        return DepictCA(
            dim_encoder,
            n_cls,
            config.n_layers,
            config.n_heads,
            config.dim_head,
            config.n_cross_layers,
            config.cross_dim_head,
        )
    if config.name == "mask_transformer":
        dim = config.d_model or dim_encoder
        return MaskTransformer(
            dim_encoder, n_cls, dim, config.n_layers, config.n_heads or dim // 64, config.drop_path_rate, config.dropout
        )
    return LinearDecoder(dim_encoder, n_cls)


def create_model(config: ModelConfig | str, n_cls: int | None = None) -> Segmentor:
    """Build a randomly initialised Segmentor from a ModelConfig or a variant name."""
    if isinstance(config, str):
        config = variant_config(config, n_cls or 150)
    elif n_cls is not None:
        config = replace(config, n_cls=n_cls)
    encoder = ViTBackbone(config.backbone)
    decoder = build_decoder(config.decoder, encoder.dim, config.n_cls)
    return Segmentor(encoder, decoder, config)
