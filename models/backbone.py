"""ViT backbone: timm's VisionTransformer run the Segmenter way (SPEC §1.1).

Differences from timm's own forward that official checkpoints need: LayerNorm eps 1e-5, and
position embeddings resized bilinearly without antialiasing for any input grid. A distillation
token (DeiT-distilled backbones) is timm's register token: same place in the sequence, same
position-embedding slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from depict_analysis.models.errors import ConfigError

# Image normalisation of each backbone family, (mean, std) in [0, 1] units, as Segmenter applies it:
# it rounds 255 x the pre-training statistics to two decimals (segm/data/base.py), so DeiT's ImageNet
# mean (0.485, 0.456, 0.406) becomes (123.68, 116.28, 103.53) / 255 and its std (58.4, 57.12, 57.38) / 255.
NORMALIZATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "deit": (tuple(v / 255 for v in (123.68, 116.28, 103.53)), tuple(v / 255 for v in (58.4, 57.12, 57.38))),
}


@dataclass
class BackboneConfig:
    d_model: int = 384
    n_layers: int = 12
    n_heads: int = 6
    patch_size: int = 16
    image_size: tuple[int, int] = (384, 384)
    mlp_ratio: float = 4.0
    distilled: bool = False
    normalization: str = "vit"
    drop_path_rate: float = 0.1
    timm_name: str | None = None  # only used to fetch pretrained weights when asked

    def __post_init__(self):
        self.image_size = tuple(self.image_size)
        if self.normalization not in NORMALIZATION:
            raise ConfigError(f"normalization must be one of {sorted(NORMALIZATION)}, got {self.normalization!r}")


class ViTBackbone(nn.Module):
    """Image -> patch tokens after the final LayerNorm, prefix tokens removed."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.vit = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.d_model,
            depth=config.n_layers,
            num_heads=config.n_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            reg_tokens=1 if config.distilled else 0,
            dynamic_img_size=True,
            drop_path_rate=config.drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
        )
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.train_grid = tuple(self.vit.patch_embed.grid_size)

    @property
    def dim(self) -> int:
        return self.config.d_model

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay, as Segmenter's ViT lists them: the position
        embeddings, the class token and (distilled backbones) the distillation token."""
        return {"vit.pos_embed", "vit.cls_token"} | ({"vit.reg_token"} if self.config.distilled else set())

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings (1, prefix + h·w, d) for a grid, resized bilinearly from the training grid."""
        if grid == self.train_grid:
            return self.vit.pos_embed
        return resample_abs_pos_embed(
            self.vit.pos_embed,
            new_size=list(grid),
            old_size=list(self.train_grid),
            num_prefix_tokens=self.num_prefix_tokens,
            interpolation="bilinear",
            antialias=False,
        )

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images: (B, 3, H, W), H and W multiples of the patch size -> (Z_0 (B, N, d), grid (H/P, W/P))."""
        x = self.vit.patch_embed(images)  # (B, h, w, d)
        B, h, w, d = x.shape
        prefix = [self.vit.cls_token.expand(B, -1, -1)]
        if self.vit.reg_token is not None:
            prefix.append(self.vit.reg_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x.reshape(B, h * w, d)], dim=1) + self.position_embedding((h, w))
        x = self.vit.pos_drop(x)
        x = self.vit.norm_pre(x)
        for block in self.vit.blocks:
            x = block(x)
        x = self.vit.norm(x)
        return x[:, self.num_prefix_tokens :], (h, w)

    def load_vit_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load ViT weights in timm / Segmenter key layout, resizing position embeddings to our grid."""
        state = {k: v for k, v in state_dict.items() if not k.startswith(("head", "pre_logits"))}
        if "dist_token" in state:
            state["reg_token"] = state.pop("dist_token")
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != self.vit.pos_embed.shape:
            old = int(round((pos.shape[1] - self.num_prefix_tokens) ** 0.5))
            state["pos_embed"] = resample_abs_pos_embed(
                pos, list(self.train_grid), [old, old], self.num_prefix_tokens, "bilinear", antialias=False
            )
        self.vit.load_state_dict(state, strict=True)


def load_pretrained(backbone: ViTBackbone, source: str) -> None:
    """Initialise from a local weights file, or from timm's hub when ``source`` is a timm model name.

    Only this explicit call downloads anything (timm name, at the user's request).
    """
    if Path(source).exists():
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    else:
        import timm

        state = timm.create_model(source, pretrained=True, num_classes=0).state_dict()
    backbone.load_vit_weights(state)
