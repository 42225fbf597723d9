"""ViT backbone: timm's VisionTransformer run the Segmenter way (SPEC §1.1).

Differences from timm's own forward that official checkpoints need: LayerNorm eps 1e-5, and
position embeddings resized bilinearly without antialiasing for any input grid. A distillation
token (DeiT-distilled backbones) is timm's register token: same place in the sequence, same
position-embedding slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from depict_analysis.models import serialization
from depict_analysis.foundation.errors import ConfigError

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
        for name in ("d_model", "n_layers", "n_heads", "patch_size"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"backbone {name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.image_size, (list, tuple)) or len(self.image_size) != 2 or not all(map(_positive_int, self.image_size)):
            raise ConfigError(f"backbone image_size must be two positive integers, got {self.image_size!r}")
        self.image_size = tuple(self.image_size)
        if min(self.image_size) < self.patch_size:
            raise ConfigError(f"backbone image_size {self.image_size} is smaller than its patch size {self.patch_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"backbone d_model {self.d_model} is not a multiple of its {self.n_heads} heads")
        if not (_number(self.mlp_ratio) and 0 < self.mlp_ratio < math.inf):
            raise ConfigError(f"backbone mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not (_number(self.drop_path_rate) and 0 <= self.drop_path_rate < 1):
            raise ConfigError(f"backbone drop_path_rate must be a number in [0, 1), got {self.drop_path_rate!r}")
        if self.normalization not in NORMALIZATION:
            raise ConfigError(f"normalization must be one of {sorted(NORMALIZATION)}, got {self.normalization!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        state = vit_state(state_dict)
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != self.vit.pos_embed.shape:
            old = math.isqrt(max(pos.shape[1] - self.num_prefix_tokens, 0))
            if old * old != pos.shape[1] - self.num_prefix_tokens:
                raise ConfigError(f"pos_embed holds {pos.shape[1]} tokens: not {self.num_prefix_tokens} + a square grid")
            state["pos_embed"] = resample_abs_pos_embed(
                pos, list(self.train_grid), [old, old], self.num_prefix_tokens, "bilinear", antialias=False
            )
        self.vit.load_state_dict(state, strict=True)


def vit_state(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """ViT weights in timm / Segmenter key layout -> the names of our ``vit`` module: the classifier
    head dropped, a DeiT distillation token renamed to timm's register token."""
    state = {k: v for k, v in state_dict.items() if not k.startswith(("head", "pre_logits"))}
    if "dist_token" in state:
        state["reg_token"] = state.pop("dist_token")
    return state


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # a --pretrained value ending so is a file, never a timm name


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    """A local backbone weights file -> its state dict (a ``model`` / ``state_dict`` entry, or the
    file itself), without running pickled code; ConfigError with one line for anything else."""
    try:
        state = serialization.load(path)
    except serialization.PickledObjects:
        raise ConfigError(f"pretrained {path}: holds pickled Python objects (code); refused", arguments="pretrained") from None
    except serialization.NotAPyTorchFile as e:
        raise ConfigError(f"pretrained {path}: {e}", arguments="pretrained") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"pretrained {path}: not a mapping of weight names to tensors", arguments="pretrained")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ConfigError(f"pretrained {path}: weight {bad} holds NaN / Inf values", arguments="pretrained")
    return state


def load_pretrained(backbone: ViTBackbone, source: str) -> None:
    """Initialise from a local weights file, or from timm's hub when ``source`` is a timm model name.

    Only this explicit call downloads anything (timm name, at the user's request). A file that is
    corrupt, holds pickled code, or whose weights do not fit the backbone is refused with one line.
    """
    path = Path(source)
    if path.exists() or path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"pretrained {source}: no such file", arguments="pretrained")
        state = _read_weights_file(path)
    else:
        import timm

        state = timm.create_model(source, pretrained=True, num_classes=0).state_dict()
    expected = backbone.vit.state_dict()
    found = vit_state(state)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        detail = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this ViT has not"
        raise ConfigError(f"pretrained {source}: not weights of this ViT: it {detail}", arguments="pretrained")
    for name, value in found.items():
        shape = expected[name].shape
        if name == "pos_embed" and value.ndim == 3 and value.shape[-1] == shape[-1]:
            continue  # resized to our grid
        if value.shape != shape:
            raise ConfigError(f"pretrained {source}: {name} is {tuple(value.shape)}, this backbone needs {tuple(shape)}",
                              arguments="pretrained")
    backbone.load_vit_weights(state)
