"""Official Segmenter / DEPICT releases built by hand, and a literal float64 forward pass over them.

Nothing here imports the package: the state-dict keys and shapes are written from SPEC §2, and the
forward pass from SPEC §1, so a test comparing our loader against it checks both independently.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

D, DEPTH, HEADS, PATCH, GRID, K = 64, 2, 2, 8, 4, 5  # tiny ViT: 32x32 training images
SA_WIDTH, CA_WIDTH = 100, 50  # official head widths of MSSA and MSCA


def _ln(prefix: str, dim: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=g), f"{prefix}.bias": 0.1 * torch.randn(dim, generator=g)}


def _block(prefix: str, dim: int, g: torch.Generator) -> dict:
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    return {
        **_ln(f"{prefix}.norm1", dim, g),
        f"{prefix}.attn.qkv.weight": r(3 * dim, dim),
        f"{prefix}.attn.qkv.bias": r(3 * dim),
        f"{prefix}.attn.proj.weight": r(dim, dim),
        f"{prefix}.attn.proj.bias": r(dim),
        **_ln(f"{prefix}.norm2", dim, g),
        f"{prefix}.mlp.fc1.weight": r(4 * dim, dim),
        f"{prefix}.mlp.fc1.bias": r(4 * dim),
        f"{prefix}.mlp.fc2.weight": r(dim, 4 * dim),
        f"{prefix}.mlp.fc2.bias": r(dim),
    }


def encoder_state(g: torch.Generator, distilled: bool = False) -> dict:
    n_prefix = 2 if distilled else 1
    state = {
        "encoder.cls_token": torch.randn(1, 1, D, generator=g) * 0.2,
        "encoder.pos_embed": torch.randn(1, n_prefix + GRID * GRID, D, generator=g) * 0.2,
        "encoder.patch_embed.proj.weight": torch.randn(D, 3, PATCH, PATCH, generator=g) * 0.1,
        "encoder.patch_embed.proj.bias": torch.randn(D, generator=g) * 0.1,
        **{k.replace("B.", "encoder."): v for i in range(DEPTH) for k, v in _block(f"B.blocks.{i}", D, g).items()},
        **_ln("encoder.norm", D, g),
        "encoder.head.weight": torch.randn(1000, D, generator=g),
        "encoder.head.bias": torch.zeros(1000),
    }
    if distilled:
        state["encoder.dist_token"] = torch.randn(1, 1, D, generator=g) * 0.2
    return state


def _subspace_layers(prefix: str, n: int, width: int, g: torch.Generator) -> dict:
    state = {}
    for l in range(n):
        state.update(_ln(f"{prefix}.layers.{l}.norm", D, g))
        state[f"{prefix}.layers.{l}.fn.proj"] = torch.randn(HEADS * width, D, generator=g) / math.sqrt(D)
        state[f"{prefix}.layers.{l}.fn.step_size"] = torch.randn(1, generator=g)
    return state


def decoder_state(family: str, g: torch.Generator) -> dict:
    common = {"decoder.cls_emb": torch.randn(1, K, D, generator=g), **_ln("decoder.mask_norm", K, g)}
    if family == "depict_sa":
        return {**common, **_subspace_layers("decoder.net", 3, SA_WIDTH, g), **_ln("decoder.decoder_norm", D, g)}
    if family == "depict_ca":
        return {
            **common,
            **_subspace_layers("decoder.snet", 3, SA_WIDTH, g),
            **_subspace_layers("decoder.cnet", 3, CA_WIDTH, g),
            **_ln("decoder.snorm", D, g),
            **_ln("decoder.cnorm", D, g),
        }
    if family == "mask_transformer":
        return {
            **common,
            "decoder.proj_dec.weight": torch.randn(D, D, generator=g) * 0.2,
            "decoder.proj_dec.bias": torch.randn(D, generator=g) * 0.1,
            **{f"decoder.{k[2:]}": v for i in range(2) for k, v in _block(f"B.blocks.{i}", D, g).items()},
            **_ln("decoder.decoder_norm", D, g),
            "decoder.proj_patch": torch.randn(D, D, generator=g) / math.sqrt(D),
            "decoder.proj_classes": torch.randn(D, D, generator=g) / math.sqrt(D),
        }
    if family == "linear":
        return {"decoder.head.weight": torch.randn(K, D, generator=g), "decoder.head.bias": torch.randn(K, generator=g)}
    raise ValueError(family)


VARIANT_YML = """\
algorithm_kwargs: {{batch_size: 8, eval_freq: 2, num_epochs: 64, start_epoch: 0}}
amp: false
dataset_kwargs: {{batch_size: 8, crop_size: 32, dataset: ade20k, image_size: 32, normalization: vit, split: train}}
inference_kwargs: {{im_size: 32, window_size: 32, window_stride: 24}}
log_dir: seg_tiny
net_kwargs:
  backbone: vit_tiny_patch8_32
  d_model: {D}
  decoder: {{drop_path_rate: 0.0, dropout: 0.1, n_cls: {K}, n_layers: 2, name: {name}}}
  distilled: {distilled}
  drop_path_rate: 0.1
  dropout: 0.0
  image_size: !!python/tuple
  - 32
  - 32
  n_cls: {K}
  n_heads: {HEADS}
  n_layers: {DEPTH}
  normalization: vit
  patch_size: {PATCH}
optimizer_kwargs: {{clip_grad: null, epochs: 64, lr: 0.001, momentum: 0.9, opt: sgd, poly_power: 0.9, sched: polynomial, weight_decay: 0.0}}
resume: true
version: normal
"""


def write_release(folder: Path, family: str, seed: int = 0, distilled: bool = False) -> dict:
    """Write checkpoint.pth + variant.yml as the official code does; return the state dict (float64)."""
    g = torch.Generator().manual_seed(seed)
    state = {**encoder_state(g, distilled), **decoder_state(family, g)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "n_cls": K,
         "lr_scheduler": {"last_epoch": 10, "base_lrs": [0.001]}, "epoch": 3},
        folder / "checkpoint.pth",
    )
    name = "linear" if family == "linear" else "mask_transformer"
    (folder / "variant.yml").write_text(
        VARIANT_YML.format(D=D, K=K, HEADS=HEADS, DEPTH=DEPTH, PATCH=PATCH, name=name, distilled=str(distilled).lower())
    )
    return {k: v.double() for k, v in state.items()}


# ------------------------------------------------------------------------------- reference forward pass


def layer_norm(x, s, prefix):
    return F.layer_norm(x, x.shape[-1:], s[f"{prefix}.weight"], s[f"{prefix}.bias"], eps=1e-5)


def vit_block(x, s, p):
    """Pre-norm ViT block with explicit attention (no fused kernels)."""
    B, T, d = x.shape
    h = d // 64 if p.startswith("decoder") else HEADS
    qkv = layer_norm(x, s, f"{p}.norm1") @ s[f"{p}.attn.qkv.weight"].T + s[f"{p}.attn.qkv.bias"]
    q, k, v = qkv.reshape(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    x = x + (a @ v).transpose(1, 2).reshape(B, T, d) @ s[f"{p}.attn.proj.weight"].T + s[f"{p}.attn.proj.bias"]
    y = layer_norm(x, s, f"{p}.norm2") @ s[f"{p}.mlp.fc1.weight"].T + s[f"{p}.mlp.fc1.bias"]
    y = F.gelu(y) @ s[f"{p}.mlp.fc2.weight"].T + s[f"{p}.mlp.fc2.bias"]
    return x + y


def encoder_forward(image, s):
    """Normalised, padded image (B, 3, H, W) -> patch tokens after the final LN, prefix removed."""
    x = F.conv2d(image, s["encoder.patch_embed.proj.weight"], s["encoder.patch_embed.proj.bias"], stride=PATCH)
    B, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    n_prefix = 2 if "encoder.dist_token" in s else 1
    pos = s["encoder.pos_embed"]
    grid = pos[:, n_prefix:].reshape(1, GRID, GRID, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:, :n_prefix], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)
    prefix = [s["encoder.cls_token"]] + ([s["encoder.dist_token"]] if n_prefix == 2 else [])
    x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [x], dim=1) + pos
    for i in range(DEPTH):
        x = vit_block(x, s, f"encoder.blocks.{i}")
    return layer_norm(x, s, "encoder.norm")[:, n_prefix:], (gh, gw)


def subspace_step(queries, keys, s, p):
    """One MSSA (queries = keys) or MSCA update, head by head: q + η Σ_k P_k softmax(P_kᵀq (P_kᵀz)ᵀ/√p) P_kᵀz."""
    proj = s[f"{p}.fn.proj"]
    width = proj.shape[0] // HEADS
    out = torch.zeros_like(queries)
    for k in range(HEADS):
        Pk = proj[k * width : (k + 1) * width].T  # (d, p)
        wq, wk = queries @ Pk, keys @ Pk
        a = torch.softmax(wq @ wk.transpose(-1, -2) / math.sqrt(width), dim=-1)
        out = out + (a @ wk) @ Pk.T
    return s[f"{p}.fn.step_size"] * out


def class_masks(patches, classes, s, grid):
    m = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
    m = layer_norm(m, s, "decoder.mask_norm")
    return m.transpose(1, 2).reshape(m.shape[0], -1, *grid)


def decoder_forward(z, s, family, grid):
    if family == "depict_sa":
        x = torch.cat([z, s["decoder.cls_emb"].expand(z.shape[0], -1, -1)], dim=1)
        for l in range(3):
            xn = layer_norm(x, s, f"decoder.net.layers.{l}.norm")
            x = x + subspace_step(xn, xn, s, f"decoder.net.layers.{l}")
        x = layer_norm(x, s, "decoder.decoder_norm")
        return class_masks(x[:, :-K], x[:, -K:], s, grid)
    if family == "depict_ca":
        for l in range(3):
            zn = layer_norm(z, s, f"decoder.snet.layers.{l}.norm")
            z = z + subspace_step(zn, zn, s, f"decoder.snet.layers.{l}")
        z = layer_norm(z, s, "decoder.snorm")
        q = s["decoder.cls_emb"].expand(z.shape[0], -1, -1)
        for l in range(3):
            q = q + subspace_step(q, layer_norm(z, s, f"decoder.cnet.layers.{l}.norm"), s, f"decoder.cnet.layers.{l}")
        return class_masks(z, layer_norm(q, s, "decoder.cnorm"), s, grid)
    if family == "mask_transformer":
        x = z @ s["decoder.proj_dec.weight"].T + s["decoder.proj_dec.bias"]
        x = torch.cat([x, s["decoder.cls_emb"].expand(z.shape[0], -1, -1)], dim=1)
        for i in range(2):
            x = vit_block(x, s, f"decoder.blocks.{i}")
        x = layer_norm(x, s, "decoder.decoder_norm")
        return class_masks(x[:, :-K] @ s["decoder.proj_patch"], x[:, -K:] @ s["decoder.proj_classes"], s, grid)
    logits = z @ s["decoder.head.weight"].T + s["decoder.head.bias"]
    return logits.transpose(1, 2).reshape(z.shape[0], K, *grid)


def segmenter_forward(image, s, family):
    """The official Segmenter.forward: pad, encode, decode, upsample bilinearly, un-pad."""
    H, W = image.shape[-2:]
    padded = F.pad(image, (0, -W % PATCH, 0, -H % PATCH))
    z, grid = encoder_forward(padded, s)
    masks = decoder_forward(z, s, family, grid)
    masks = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return masks[..., :H, :W]
