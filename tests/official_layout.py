"""Official Segmenter / DEPICT / CBT releases built by hand, and a literal float64 forward pass over them.

Nothing here imports the package: the state-dict keys and shapes are written from SPEC §2 (CBT: from
the keys QishuaiWen/CBSA's ``segm/model/dec_blocks.py`` and ``decoder.py`` produce), and the forward
pass from SPEC §1 and from what CBSA's ``Attention`` / ``MaskTransformer`` compute, so a test
comparing our loader against it checks both independently.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

D, DEPTH, HEADS, PATCH, GRID, K = 64, 2, 2, 8, 4, 5  # tiny ViT: 32x32 training images
SA_WIDTH, CA_WIDTH = 100, 50  # official head widths of MSSA and MSCA (and CBSA: 100)
REP_GRID = 10  # CBSA's representatives: a 10 x 10 adaptive average pool


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


def cbsa_layers(prefix: str, n: int, heads: int, width: int, dim: int, g: torch.Generator) -> dict:
    """``<prefix>.layers.<l>``: PreNorm(dim, Attention) of CBSA, as its state dict names them."""
    state = {}
    for l in range(n):
        state.update(_ln(f"{prefix}.layers.{l}.norm", dim, g))
        fn = f"{prefix}.layers.{l}.fn"
        state[f"{fn}.proj.weight"] = torch.randn(heads * width, dim, generator=g) / math.sqrt(dim)
        state[f"{fn}.step_x"] = torch.randn(heads, 1, 1, generator=g)
        state[f"{fn}.step_rep"] = torch.randn(heads, 1, 1, generator=g)
        state[f"{fn}.to_out.weight"] = torch.randn(dim, heads * width, generator=g) / math.sqrt(heads * width)
        state[f"{fn}.to_out.bias"] = 0.1 * torch.randn(dim, generator=g)
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
    if family == "cbt":
        return {**common, **cbsa_layers("decoder.net", 3, HEADS, SA_WIDTH, D, g), **_ln("decoder.decoder_norm", D, g)}
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


def pooled_cells(patches, r):
    """Adaptive average pooling of (B, h, w, c) to r x r cells, as torch's AdaptiveAvgPool2d bins them:
    cell i spans rows floor(i h / r) .. ceil((i + 1) h / r) - 1 (the same for columns); row-major."""
    h, w = patches.shape[1:3]
    cells = []
    for i in range(r):
        for j in range(r):
            rows = slice(i * h // r, -(-(i + 1) * h // r))
            cols = slice(j * w // r, -(-(j + 1) * w // r))
            cells.append(patches[:, rows, cols].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def cbsa_step(x, s, p, grid, heads, r=REP_GRID):
    """One CBSA layer with its PreNorm and residual, head by head: contract, then broadcast.

    The official Attention on w = proj(LN(x)): representatives = pooled patch part of w; per head
    A = softmax(rep wᵀ/√p); rep += step_rep · A w; x gets step_x · Aᵀ softmax(rep repᵀ/√p) rep; to_out.
    """
    xn = layer_norm(x, s, f"{p}.norm")
    w = xn @ s[f"{p}.fn.proj.weight"].T
    B, T, hp = w.shape
    width = hp // heads
    reps = pooled_cells(w[:, : grid[0] * grid[1]].reshape(B, *grid, hp), r)
    out = torch.zeros_like(w)
    for k in range(heads):
        cols = slice(k * width, (k + 1) * width)
        wk, rk = w[..., cols], reps[..., cols]
        a = torch.softmax(rk @ wk.transpose(-1, -2) / math.sqrt(width), dim=-1)
        rk = rk + s[f"{p}.fn.step_rep"][k] * (a @ wk)
        mixed = torch.softmax(rk @ rk.transpose(-1, -2) / math.sqrt(width), dim=-1) @ rk
        out[..., cols] = s[f"{p}.fn.step_x"][k] * (a.transpose(-1, -2) @ mixed)
    return x + out @ s[f"{p}.fn.to_out.weight"].T + s[f"{p}.fn.to_out.bias"]


def cbt_decoder(z, s, grid, heads, n_cls, r=REP_GRID):
    """CBSA's MaskTransformer: [z ; cls_emb] -> CBSA layers -> decoder_norm -> x / ‖x‖ -> masks -> mask_norm."""
    x = torch.cat([z, s["decoder.cls_emb"].expand(z.shape[0], -1, -1)], dim=1)
    n_layers = len({k.split(".")[3] for k in s if k.startswith("decoder.net.layers.")})
    for l in range(n_layers):
        x = cbsa_step(x, s, f"decoder.net.layers.{l}", grid, heads, r)
    x = layer_norm(x, s, "decoder.decoder_norm")
    patches, classes = x[:, :-n_cls], x[:, -n_cls:]
    m = (patches / patches.norm(dim=-1, keepdim=True)) @ (classes / classes.norm(dim=-1, keepdim=True)).transpose(1, 2)
    m = layer_norm(m, s, "decoder.mask_norm")
    return m.transpose(1, 2).reshape(m.shape[0], n_cls, *grid)


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
    if family == "cbt":
        return cbt_decoder(z, s, grid, HEADS, K)
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
