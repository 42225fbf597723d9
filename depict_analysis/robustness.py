"""Perturbation robustness (SPEC §3.4): mIoU of a model under parameter, input and structured perturbations.

A :class:`Perturbation` names what is perturbed and how (``resolve_perturbation(noise, target, relative)``):

- parameter noise (``gaussian`` | ``uniform``, target ``decoder`` | ``encoder`` | ``all``): every
  parameter W of the target becomes ``W + σ·ε`` (``relative``: ``W + σ·std(W)·ε``, population std),
  ε i.i.d. N(0, 1) or uniform on [−√3, √3] (the same std);
- input noise (target ``input``): ``gaussian`` / ``uniform`` noise of std σ on the normalised
  image, ``salt-pepper`` (a fraction σ of the pixels set to black or white, all channels) and
  ``blur`` (Gaussian blur of std σ pixels, reflect padding);
- structured transforms of every head projection ``proj (h·p, d)`` a decoder owns (its subspaces
  with a ``parameter``: DEPICT's MSSA / MSCA ``proj``, CBT's and ToST's input projections), whose
  row blocks are P_kᵀ: ``head-rotation`` (P_k → P_k R_k, rows R_kᵀ P_kᵀ, random orthogonal R_k
  (p, p): MSSA and MSCA are exactly invariant), ``global-rotation`` (proj → Rᵀ proj, one orthogonal
  R (h·p, h·p) mixing the heads) and ``head-orthonormalize`` (P_k → an orthonormal basis of its span, QR).
  Their "σ" is 0 (clean) or 1 (transformed).

``robustness_records(model, label, batches, perturbation, sigmas, draws, seed)`` yields one record
per (σ, draw): ``{"checkpoint", "sigma", "draw", "miou", "pixel_acc", "mean_acc"}``. σ = 0 is the
clean model, evaluated once; deterministic perturbations (blur, head-orthonormalize) get one draw.
Every draw has its own ``torch.Generator`` seeded from (seed, checkpoint label, σ, draw), so the
numbers do not depend on the order of evaluation, the σ grid or the device (noise is drawn on the
CPU in float32). Parameters are swapped in with ``torch.func.functional_call``: the model itself is
never modified, also when a sweep fails half-way. When only decoder parameters change (decoder
noise, structured transforms) the backbone's Z_0 is computed once per image batch and kept on the
model's device (N·d floats per image); only ``decode`` runs per (σ, draw). The forward pass runs
in float32 without autocast: bf16 rounding would itself be a perturbation of relative size ~4e-3.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call

from depict_analysis.models.errors import ConfigError, InputError
from depict_analysis import plots
from depict_analysis.inputs import Batch
from depict_analysis.tracing import describe_model
from depict_analysis.outputs import save_csv, save_figure, save_json
from depict_analysis.models.evaluate import ConfusionMatrix, miou

PARAMETER_NOISES = ("gaussian", "uniform")
PIXEL_NOISES = ("salt-pepper", "blur")  # input-only
STRUCTURED_DESCRIPTIONS = {
    "head-rotation": "head rotation: each P_k → P_k R_k, random orthogonal R_k (p × p)",
    "global-rotation": "global rotation: proj → Rᵀ proj, one random orthogonal R (h·p × h·p) per layer",
    "head-orthonormalize": "head orthonormalisation: each P_k → an orthonormal basis of its span (QR)",
}
STRUCTURED = tuple(STRUCTURED_DESCRIPTIONS)
NOISES = (*PARAMETER_NOISES, *PIXEL_NOISES, *STRUCTURED)
PARAMETER_TARGETS = ("decoder", "encoder", "all")
TARGETS = (*PARAMETER_TARGETS, "input")

PARAMETER_SIGMAS = (0, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.2, 0.5, 1)  # SPEC §3.4
DEFAULT_SIGMAS: dict[str, tuple[float, ...]] = {
    "parameter": PARAMETER_SIGMAS,
    "input": (0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),  # std on the normalised image (range ~[-1, 1] or ±2.5)
    "salt-pepper": (0, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5),  # fraction of pixels
    "blur": (0, 0.5, 1, 1.5, 2, 3, 4, 6, 8),  # kernel std in pixels
    "structured": (0, 1),  # clean, transformed
}


@dataclass(frozen=True)
class Perturbation:
    """What a sweep perturbs: ``noise`` (one of ``NOISES``) applied to ``target`` (one of ``TARGETS``)."""

    noise: str
    target: str
    relative: bool = False

    @property
    def kind(self) -> str:
        """``parameter`` | ``input`` | ``structured``."""
        if self.noise in STRUCTURED:
            return "structured"
        return "input" if self.target == "input" else "parameter"

    @property
    def deterministic(self) -> bool:
        """Whether every draw would give the same result (one draw is enough)."""
        return self.noise in ("blur", "head-orthonormalize")

    @property
    def decoder_only(self) -> bool:
        """Whether only decoder parameters change, so the backbone's Z_0 can be cached."""
        return self.kind == "structured" or self.target == "decoder"

    def default_sigmas(self) -> tuple[float, ...]:
        return DEFAULT_SIGMAS[self.noise if self.noise in PIXEL_NOISES else self.kind]

    def description(self) -> str:
        """One line saying what σ means, for figure titles and JSON."""
        if self.kind == "structured":
            return STRUCTURED_DESCRIPTIONS[self.noise]
        if self.noise == "salt-pepper":
            return "salt-and-pepper: a fraction σ of the pixels set to black or white"
        if self.noise == "blur":
            return "Gaussian blur of the image, std σ pixels"
        law = "N(0, σ²)" if self.noise == "gaussian" else "uniform noise of std σ"
        if self.kind == "input":
            return f"{law} added to the normalised image"
        scale = ", σ × each tensor's std" if self.relative else ""
        what = "every parameter" if self.target == "all" else f"every {self.target} parameter"
        return f"{law} added to {what}{scale}"

    def sigma_label(self) -> str:
        """Axis label for σ."""
        if self.noise == "salt-pepper":
            return "σ (fraction of pixels)"
        if self.noise == "blur":
            return "σ (pixels)"
        return "σ (× tensor std)" if self.relative else "σ"


def resolve_perturbation(noise: str, target: str | None = None, relative: bool = False) -> Perturbation:
    """Check a (noise, target, relative) combination; ``target=None`` picks the natural one.

    Default target: ``input`` for salt-pepper / blur, ``decoder`` otherwise. Raises ``ValueError``
    for combinations that mean nothing (blur of parameters, a rotation of the encoder, ...).
    """
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; expected one of: {', '.join(NOISES)}")
    if target is not None and target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")
    target = target or ("input" if noise in PIXEL_NOISES else "decoder")
    if noise in PIXEL_NOISES and target != "input":
        raise ConfigError(f"{noise} perturbs images: use --target input (or leave it out), not {target}")
    if noise in STRUCTURED and target != "decoder":
        raise ConfigError(f"{noise} transforms the decoder's subspace projections: --target must be decoder, not {target}")
    if relative and (noise not in PARAMETER_NOISES or target == "input"):
        raise ConfigError("--relative scales parameter noise by each tensor's std; it needs gaussian / uniform noise on parameters")
    return Perturbation(noise, target, relative)


def parse_sigmas(text: str, perturbation: Perturbation) -> tuple[float, ...]:
    """``"0,1e-3,0.01"`` -> sorted unique σ values, always including 0 (the clean reference)."""
    if perturbation.kind == "structured":
        raise ConfigError(f"{perturbation.noise} has no σ: it is either applied or not (use --draws for more rotations)")
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad or not values:
        raise ConfigError(f"σ values must be finite numbers ≥ 0, got {text!r}")
    if perturbation.noise == "salt-pepper" and max(values) > 1:
        raise ConfigError(f"salt-and-pepper σ is a fraction of pixels (0..1), got {max(values):g}")
    return tuple(sorted({0.0, *values}))


def draws_per_sigma(perturbation: Perturbation, sigma: float, draws: int) -> int:
    """1 for the clean model and deterministic perturbations, else ``draws``."""
    return 1 if sigma == 0 or perturbation.deterministic else draws


def draw_generator(seed: int, checkpoint: str, sigma: float, draw: int) -> torch.Generator:
    """A CPU generator seeded from (seed, checkpoint, σ, draw) alone (a stable hash, not Python's)."""
    key = f"{seed}|{checkpoint}|{float(sigma)!r}|{draw}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


# ------------------------------------------------------------------------------- parameter changes


def _noise(shape: torch.Size, noise: str, generator: torch.Generator) -> Tensor:
    """Unit-variance float32 noise on the CPU: N(0, 1) or uniform on [−√3, √3]."""
    if noise == "gaussian":
        return torch.randn(shape, generator=generator)
    return (torch.rand(shape, generator=generator) * 2 - 1) * math.sqrt(3)


def target_parameters(model: nn.Module, target: str) -> dict[str, Tensor]:
    """The parameters ``target`` names (decoder | encoder | all), in ``named_parameters`` order."""
    prefix = "" if target == "all" else f"{target}."
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix)}


def noisy_parameters(
    model: nn.Module, perturbation: Perturbation, sigma: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """``{name: W + σ·[std(W)·]ε}`` for every parameter of the target; ε drawn in parameter order."""
    out = {}
    for name, param in target_parameters(model, perturbation.target).items():
        scale = sigma * (param.detach().float().std(correction=0).item() if perturbation.relative else 1.0)
        out[name] = param.detach() + (scale * _noise(param.shape, perturbation.noise, generator)).to(param)
    return out


def random_orthogonal(n: int, batch: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrices (*batch, n, n), float64: QR of a Gaussian with signs fixed."""
    q, r = torch.linalg.qr(torch.randn(*batch, n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def transformed_projection(proj: Tensor, heads: int, transform: str, generator: torch.Generator) -> Tensor:
    """One layer's ``proj (h·p, d)`` (row block k = P_kᵀ) under a structured transform, same dtype."""
    hp, d = proj.shape
    p = hp // heads
    blocks = proj.detach().double().cpu().view(heads, p, d)  # P_kᵀ
    if transform == "head-rotation":  # P_k R_k  <=>  R_kᵀ P_kᵀ
        new = random_orthogonal(p, (heads,), generator).transpose(-1, -2) @ blocks
    elif transform == "global-rotation":
        new = random_orthogonal(hp, (), generator).T @ blocks.reshape(hp, d)
    elif transform == "head-orthonormalize":
        if p > d:
            raise ConfigError(f"cannot orthonormalise {p} basis vectors in R^{d}")
        new = torch.linalg.qr(blocks.transpose(-1, -2)).Q.transpose(-1, -2)  # rows: orthonormal basis of span(P_k)
    else:
        raise ConfigError(f"unknown structured transform {transform!r}")
    return new.reshape(hp, d).to(proj)


def transformable_subspaces(model: nn.Module) -> dict[str, int]:
    """``{parameter name: heads}`` of every head projection ``proj (h·p, d)`` the decoder owns, in its order."""
    spaces = {f"decoder.{s.parameter}": s.proj.shape[0] for s in model.decoder.parameter_subspaces}
    if not spaces:
        raise ConfigError(
            f"structured transforms act on a decoder's head subspaces; this model's {model.decoder.family} decoder has none"
        )
    return spaces


def structured_parameters(model: nn.Module, transform: str, generator: torch.Generator) -> dict[str, Tensor]:
    """``{name of proj: transformed proj}`` for every subspace projection, in decoder order."""
    parameters = dict(model.named_parameters())
    return {
        name: transformed_projection(parameters[name], heads, transform, generator)
        for name, heads in transformable_subspaces(model).items()
    }


def perturbed_parameters(
    model: nn.Module, perturbation: Perturbation, sigma: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """The parameter replacements of one (σ, draw); empty for σ = 0 and for input noise."""
    if sigma == 0 or perturbation.kind == "input":
        return {}
    if perturbation.kind == "structured":
        return structured_parameters(model, perturbation.noise, generator)
    return noisy_parameters(model, perturbation, sigma, generator)


# ------------------------------------------------------------------------------------ input changes


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), std ``sigma`` pixels, radius ⌈3σ⌉, reflect padding."""
    radius = min(math.ceil(3 * sigma), images.shape[-1] - 1, images.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=images.device)  # float64: a tiny σ gives (0, 1, 0), not 0 / 0
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype).repeat(images.shape[1], 1, 1, 1)  # (C, 1, 1, k)
    C = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel, groups=C)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.transpose(-1, -2), groups=C)


def perturbed_images(
    model: nn.Module, pixels: Tensor, perturbation: Perturbation, sigma: float, generator: torch.Generator
) -> Tensor:
    """Pixels (B, 3, S, S) in [0, 1] -> normalised model input, with input noise of level σ applied.

    Noise is drawn on the CPU from ``generator`` (one call per batch, in batch order).
    """
    if perturbation.kind != "input" or sigma == 0:
        return model.normalize(pixels)
    if perturbation.noise == "blur":
        return model.normalize(gaussian_blur(pixels, sigma))
    if perturbation.noise == "salt-pepper":
        B, _, H, W = pixels.shape
        hit = torch.rand(B, 1, H, W, generator=generator) < sigma
        white = (torch.rand(B, 1, H, W, generator=generator) < 0.5).float()
        return model.normalize(torch.where(hit.to(pixels.device), white.to(pixels), pixels))
    return model.normalize(pixels) + sigma * _noise(pixels.shape, perturbation.noise, generator).to(pixels)


# ------------------------------------------------------------------------------------- evaluation


class _Method(nn.Module):
    """Calls one method of ``model``, so that ``functional_call`` can swap parameters for any entry point."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


@dataclass
class _Item:
    """One image batch kept for the whole sweep: pixels (B, 3, S, S) or cached Z_0 (B, N, d); labels (B, S, S)."""

    pixels: Tensor | None
    z0: Tensor | None
    grid: tuple[int, int] | None
    labels: Tensor


class SweepEvaluator:
    """mIoU of one model under any parameter replacement / input perturbation, over fixed image batches.

    With ``cache_z0`` the backbone runs once per batch here; ``miou`` then only decodes (valid only
    when the replacements touch decoder parameters alone). Batches live on the model's device.
    Logits are upsampled in channels-last memory (``Segmentor.decode``): the same argmax, and the
    upsampling + argmax over K (most of a decode for many classes) run several times faster.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, batches: Iterable[Batch], cache_z0: bool):
        self.model, self.cache_z0 = model, cache_z0
        self.device = next(model.parameters()).device
        self.items: list[_Item] = []
        self._forward, self._decode = _Method(model, "forward"), _Method(model, "decode")
        for batch in batches:
            if batch.labels is None:
                raise InputError("robustness needs ground-truth labels: give --labels with --images, or a --dataset")
            pixels, labels = batch.pixels.to(self.device), batch.labels.to(self.device)
            if cache_z0:
                z0, grid = model.encode(model.normalize(pixels))
                self.items.append(_Item(None, z0, grid, labels))
            else:
                self.items.append(_Item(pixels, None, None, labels))
        if not self.items:
            raise InputError("no images to evaluate")

    @property
    def num_images(self) -> int:
        return sum(len(item.labels) for item in self.items)

    @torch.inference_mode()
    def miou(
        self,
        parameters: dict[str, Tensor],
        inputs: Callable[[Tensor], Tensor] | None = None,
    ) -> dict:
        """``depict_analysis.models.evaluate.miou`` of the model with ``parameters`` swapped in (names as in the model).

        ``inputs`` maps a pixel batch (B, 3, S, S) in [0, 1] to the normalised model input
        (default ``model.normalize``); it needs uncached batches.
        """
        swapped = {f"model.{name}": value.to(self.device) for name, value in parameters.items()}
        confusion = ConfusionMatrix(self.model.n_cls, self.device)
        for item in self.items:
            size = item.labels.shape[-2:]
            if self.cache_z0:
                if inputs is not None:
                    raise ConfigError("input perturbations need the backbone: Z_0 cannot be cached")
                logits = functional_call(self._decode, swapped, (item.z0, item.grid, size, torch.channels_last))
            else:
                x = (inputs or self.model.normalize)(item.pixels)
                logits = functional_call(self._forward, swapped, (x, torch.channels_last))
            confusion.update(logits.argmax(1), item.labels)
        return miou(confusion)


def robustness_records(
    model: nn.Module,
    label: str,
    batches: Iterable[Batch],
    perturbation: Perturbation,
    sigmas: Sequence[float],
    draws: int = 3,
    seed: int = 0,
    *,
    cache_z0: bool | None = None,
    advance: Callable[[int], None] | None = None,
) -> Iterator[dict]:
    """One record per (σ, draw) of ``model`` (called ``label``) under ``perturbation``, σ in the given order.

    ``batches`` yield ``Batch(pixels (B, 3, S, S) in [0, 1], labels (B, S, S))``; they are read once
    (and encoded once when ``cache_z0``, by default whenever the perturbation is decoder-only).
    ``advance(1)`` is called after each record. The model is left untouched (its train/eval mode
    is set to eval while the generator runs and restored after).
    """
    if perturbation.kind == "structured":
        transformable_subspaces(model)  # a clear error before any work for a decoder without subspaces
    if draws < 1:
        raise ConfigError(f"draws must be ≥ 1, got {draws}")
    cache_z0 = perturbation.decoder_only if cache_z0 is None else cache_z0
    if cache_z0 and not perturbation.decoder_only:
        raise ConfigError(f"cannot cache Z_0 when the {perturbation.target} is perturbed")
    was_training = model.training
    model.eval()
    try:
        evaluator = SweepEvaluator(model, batches, cache_z0)
        for sigma in sigmas:
            for draw in range(draws_per_sigma(perturbation, sigma, draws)):
                g = draw_generator(seed, label, sigma, draw)
                with torch.inference_mode():
                    parameters = perturbed_parameters(model, perturbation, sigma, g)
                inputs = None
                if perturbation.kind == "input" and sigma > 0:
                    inputs = partial(perturbed_images, model, perturbation=perturbation, sigma=sigma, generator=g)
                scores = evaluator.miou(parameters, inputs)
                yield {"checkpoint": label, "sigma": float(sigma), "draw": draw,
                       **{key: scores[key] for key in ("miou", "pixel_acc", "mean_acc")}}
                if advance is not None:
                    advance(1)
    finally:
        model.train(was_training)


def summarize(records: Sequence[dict]) -> list[dict]:
    """Per (checkpoint, σ): mIoU mean, std (ddof = 0), min, max over draws, and ``relative`` = mean / clean mean."""
    groups: dict[tuple[str, float], list[float]] = {}
    for r in records:
        groups.setdefault((r["checkpoint"], r["sigma"]), []).append(r["miou"])
    clean = {ckpt: values[0] for (ckpt, sigma), values in groups.items() if sigma == 0}
    rows = []
    for (ckpt, sigma), values in groups.items():
        v = np.asarray(values, dtype=np.float64)
        mean = float(v.mean())
        rows.append({"checkpoint": ckpt, "sigma": sigma, "draws": len(v), "mean": mean, "std": float(v.std()),
                     "min": float(v.min()), "max": float(v.max()),
                     "relative": mean / clean[ckpt] if clean.get(ckpt) else float("nan")})
    return rows


def sweep_settings(perturbation: Perturbation, sigmas: Sequence[float], draws: int, seed: int) -> dict:
    """The ``settings`` block of a result: what was perturbed, how, and what σ means."""
    return {
        "noise": perturbation.noise, "target": perturbation.target, "relative": perturbation.relative,
        "kind": perturbation.kind, "description": perturbation.description(),
        "sigma_label": perturbation.sigma_label(), "sigmas": list(sigmas),
        "draws": 1 if perturbation.deterministic else draws, "seed": seed,
        "precision": "float32 (no autocast)", "std": "over draws, ddof = 0",
    }


def robustness_result(settings: dict, checkpoints: list[dict], records: list[dict], complete: bool) -> dict:
    """What ``robustness.json`` holds: settings, checkpoints, per-(checkpoint, σ) summary, every record."""
    return {"settings": settings, "complete": complete, "checkpoints": checkpoints,
            "summary": summarize(records), "records": records}


def robustness_figure(result: dict) -> Figure:
    """Curves of mIoU against σ, or grouped bars (clean / transformed) for structured transforms."""
    if result["settings"]["kind"] == "structured":
        return plots.plot_robustness_bars(result)
    return plots.plot_robustness_curves(result)


NAME = "robustness"


def write_robustness_numbers(result: dict, out: str | Path) -> list[Path]:
    """``robustness.json`` (the result) and ``robustness.csv`` (one row per (checkpoint, σ, draw))."""
    out = Path(out)
    return [save_json(out / f"{NAME}.json", result), save_csv(out / f"{NAME}.csv", result["records"])]


def run_robustness(
    models: Iterable[tuple[str, str, nn.Module]],
    batches_for: Callable[[int], tuple[int, Iterable[Batch]]],
    perturbation: Perturbation,
    sigmas: Sequence[float],
    out: str | Path,
    *,
    draws: int = 3,
    seed: int = 0,
    size: int | None = None,
    settings: dict | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Sweep every ``(label, source, model)`` of ``models`` and write ``robustness.png/.pdf/.json/.csv`` to ``out``.

    ``batches_for(side)`` gives (number of images, batches of ``side``-pixel crops); ``side`` is
    ``size`` or each model's training size. The JSON / CSV are rewritten after every evaluation; a
    KeyboardInterrupt ends the sweep with what is done written out and ``"complete": false`` in the
    returned result (see ``robustness_result``), which is returned in every case.
    """
    settings = sweep_settings(perturbation, sigmas, draws, seed) | (settings or {}) | {"size": size}
    described, records = [], []
    complete = False
    try:
        for label, source, model in models:
            side = size or max(model.config.backbone.image_size)
            total, batches = batches_for(side)
            settings["num_images"] = total
            described.append({"label": label, "path": source, "size": side,
                              "model": describe_model(model)})
            for record in robustness_records(model, label, batches, perturbation, sigmas, draws, seed, advance=advance):
                records.append(record)
                write_robustness_numbers(robustness_result(settings, described, records, False), out)
            del model  # before the next one loads
        complete = True
    except KeyboardInterrupt:
        pass
    result = robustness_result(settings, described, records, complete)
    if records:
        save_figure(robustness_figure(result), out, NAME)
        write_robustness_numbers(result, out)
    return result
