"""The coding-rate analysis (SPEC §3.1): stream images through ``trace`` and ``coding_rate``, aggregate.

``analyze_coding_rates(model, batches)`` returns the result dict that ``coding_rate.json`` holds
(n images, J = L + 1 layers, S subspaces, T class stages; arrays are numpy float64, rates in nats)::

    settings       eps, normalize, orthonormalize, per_head, num_images, image_size, device,
                   forward_precision, std (how it is taken), unit, model {variant, decoder, ...}
    images         [n] image paths
    layers         [J] = 0..L (j = 0 is the decoder input Z_0)
    subspaces      [S] {name, layer (the j it produces; None for MSCA), heads, dim_head}
    token_rate     R(Z_j)                  mean, std (J,)      per_image (n, J)
    subspace_rate  R(P_lᵀ Z_j)             mean, std (S, J)    per_image (n, S, J)
    ratio          R(P_lᵀ Z_j) / R(Z_j)    mean, std (S, J)    per_image (n, S, J)
    head_rate      {name: R(P_{l,k}ᵀ Z_j)  mean, std (h, J)    per_image (n, h, J)}   (per_head only)
    class_rate     R(Q)                    mean, std (T,)      per_image (n, T)
                   stages [T]: trace's class stages ("input", "mssa1", ...) then "final" (Q̂)

Mean and std (ddof = 0) are taken over images. ``rate_rows(result)`` flattens it for CSV.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from depict_analysis.models.errors import ConfigError, InputError
from depict_analysis.coding_rate import NORMALIZE_MODES, class_rate, rate_table
from depict_analysis.inputs import Batch, image_progress
from depict_analysis.outputs import save_csv, save_figure, save_json
from depict_analysis.plots import plot_subspace_rates, plot_token_class_rates
from depict_analysis.tracing import Trace, describe_model, trace
from depict_analysis.models.device import autocast

FINAL_STAGE = "final"


def _check_settings(eps: float, normalize: str) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")


def batch_rates(tr: Trace, eps: float, normalize: str, orthonormalize: bool) -> dict[str, np.ndarray]:
    """Every rate of one traced batch of B images, float64 numpy, batch first.

    ``token_rate (B, J)``, ``subspace_rate`` and ``ratio (B, S, J)``, ``class_rate (B, T)`` and
    ``head_rate/<name> (B, h, J)`` for each subspace.
    """
    table = rate_table(tr.tokens, [s.proj for s in tr.subspaces], eps, normalize, orthonormalize)
    classes = tr.classes + [tr.class_embeddings]
    rates = {key: table[key] for key in ("token_rate", "subspace_rate", "ratio")}
    rates["class_rate"] = torch.stack([class_rate(Q, eps, normalize) for Q in classes], dim=1)
    rates |= {f"head_rate/{s.name}": heads for s, heads in zip(tr.subspaces, table["head_rate"])}
    return {key: value.cpu().numpy() for key, value in rates.items()}


def summarize(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image values ``(n, ...)`` -> mean and std (ddof = 0) over images ``(...)``, and the values."""
    return {"mean": values.mean(axis=0), "std": values.std(axis=0), "per_image": values}


def analyze_coding_rates(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    eps: float = 0.1,
    normalize: str = "l2",
    orthonormalize: bool = False,
    per_head: bool = False,
    total: int | None = None,
    progress: bool = True,
    amp: bool = False,
) -> dict:
    """Coding rates of the decoder's tokens and class embeddings over a stream of images.

    ``batches`` yields ``Batch(pixels (B, 3, S, S) in [0, 1], ...)`` (``inputs.image_batches``); every
    batch must share one image size. Pixels are normalised with ``model.normalize`` and run on the
    model's device (float32; bf16 autocast for the forward pass with ``amp`` on CUDA); the rates are computed there in
    float64 under ``torch.inference_mode``. ``total`` (number of images) sizes the progress bar.
    Returns the dict described in the module docstring.
    """
    _check_settings(eps, normalize)
    device = next(model.parameters()).device
    per_batch: dict[str, list[np.ndarray]] = defaultdict(list)
    paths: list[str] = []
    first: Trace | None = None
    with image_progress(total, "coding rate", progress) as advance, torch.inference_mode():
        for batch in batches:
            with autocast(device, amp):
                tr = trace(model, model.normalize(batch.pixels.to(device)))
            for key, value in batch_rates(tr, eps, normalize, orthonormalize).items():
                per_batch[key].append(value)
            paths += batch.paths
            first = first or tr
            advance(len(batch.paths))
    if first is None:
        raise InputError("no images to analyse")
    values = {key: np.concatenate(chunks) for key, chunks in per_batch.items()}
    result = {
        "settings": {
            "eps": eps,
            "normalize": normalize,
            "orthonormalize": orthonormalize,
            "per_head": per_head,
            "num_images": len(paths),
            "image_size": list(batch.pixels.shape[-2:]),
            "device": str(device),
            "forward_precision": "bfloat16 autocast" if amp and device.type == "cuda" else "float32",
            "std": "over images, ddof = 0",
            "unit": "nats",
            "model": describe_model(model),
        },
        "images": paths,
        "layers": list(range(first.num_layers + 1)),
        "subspaces": [
            {"name": s.name, "layer": s.layer, "heads": s.proj.shape[0], "dim_head": s.proj.shape[1]}
            for s in first.subspaces
        ],
        **{key: summarize(values[key]) for key in ("token_rate", "subspace_rate", "ratio")},
    }
    if per_head:
        result["head_rate"] = {s.name: summarize(values[f"head_rate/{s.name}"]) for s in first.subspaces}
    result["class_rate"] = {"stages": first.class_stages + [FINAL_STAGE], **summarize(values["class_rate"])}
    return result


def rate_rows(result: dict) -> list[dict]:
    """One CSV row per (image, quantity, subspace[, head], layer or class stage) of a result dict.

    Columns: image, quantity (token_rate | subspace_rate | ratio | head_rate | class_rate),
    subspace, head, layer, stage, value; the ones that do not apply are empty.
    """
    rows: list[dict] = []

    def add(image: str, quantity: str, values, subspace=None, head=None, stages=None) -> None:
        keys = stages if stages is not None else result["layers"]
        for key, value in zip(keys, values):
            layer, stage = (None, key) if stages is not None else (key, None)
            rows.append({"image": image, "quantity": quantity, "subspace": subspace, "head": head,
                         "layer": layer, "stage": stage, "value": float(value)})

    heads = result.get("head_rate", {})
    for i, image in enumerate(result["images"]):
        add(image, "token_rate", result["token_rate"]["per_image"][i])
        for s, space in enumerate(result["subspaces"]):
            name = space["name"]
            for quantity in ("subspace_rate", "ratio"):
                add(image, quantity, result[quantity]["per_image"][i, s], name)
            for k, values in enumerate(heads[name]["per_image"][i] if name in heads else []):
                add(image, "head_rate", values, name, k)
        add(image, "class_rate", result["class_rate"]["per_image"][i], stages=result["class_rate"]["stages"])
    return rows


def write_coding_rates(result: dict, out: str | Path) -> list[Path]:
    """``coding_rate.png/.pdf`` (subspace rates), ``coding_rate_tokens.png/.pdf`` (R(Z_j), R(Q)),
    ``coding_rate.json`` (the result) and ``coding_rate.csv`` (``rate_rows``) in ``out``."""
    out = Path(out)
    return [
        *save_figure(plot_subspace_rates(result), out, "coding_rate"),
        *save_figure(plot_token_class_rates(result), out, "coding_rate_tokens"),
        save_json(out / "coding_rate.json", result),
        save_csv(out / "coding_rate.csv", rate_rows(result)),
    ]
