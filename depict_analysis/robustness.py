"""Perturbation robustness (SPEC §3.4): mIoU of a model under parameter, input and structured perturbations.

What a sweep perturbs (``depict_analysis.perturbations``: ``Perturbation``, ``resolve_perturbation``):

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

``robustness_records(model, label, batches, perturbation, sigmas, draws, seed)`` yields one
``Evaluation`` per (σ, draw): the dataset-level mIoU, pixel and mean accuracy, and the per-image
counts behind them (true positives, label and predicted pixels per class). σ = 0 is the clean
model, evaluated once; deterministic perturbations (blur, head-orthonormalize) get one draw.
``run_robustness`` sweeps several models into a ``Robustness``: per model and σ the mean
mIoU over draws with a bootstrap interval over images and draws (``depict_analysis.uncertainty``),
σ½ (where the mIoU falls to half its clean value) with its interval, and sanity warnings (a model
at its class prior; too few images or draws for the intervals).

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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call

from depict_analysis import plots
from depict_analysis.inputs import Batch
from depict_analysis.models.data import IGNORE_INDEX
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.models.evaluate import ConfusionMatrix, miou
from depict_analysis.outputs import save_csv, save_json
from depict_analysis.perturbations import Perturbation, draws_per_sigma, resolve_perturbation
from depict_analysis.results import Result
from depict_analysis.tracing import describe_model
from depict_analysis.uncertainty import (
    Bootstrap,
    Interval,
    class_prior_miou,
    draw_resamples,
    image_resamples,
    miou_from_counts,
    miou_replicates,
    percentile_interval,
    warn_sample_size,
)
# "At the class prior": the clean mIoU is at most 25 % above the mIoU of predicting the most frequent
# label everywhere, at the upper end of its interval (a model stuck on its background class scores 1×).
PRIOR_MARGIN = 1.25


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


def per_image_counts(pred: Tensor, target: Tensor, n_cls: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per image and class: true positives, label pixels, predicted pixels; (B, H, W) -> (B, 3, K) int64.

    Pixels labelled ``ignore_index`` are left out, as in ``ConfusionMatrix``: summed over images these
    are its diagonal, row sums and column sums, all that the mIoU needs (``uncertainty.miou_from_counts``).
    """
    B, K = pred.shape[0], n_cls
    valid = target != ignore_index
    image = torch.arange(B, device=target.device).view(B, *([1] * (target.ndim - 1))).expand_as(target)[valid] * K
    t, p = target[valid].long(), pred.to(target.device)[valid].long()

    def count(index: Tensor) -> Tensor:
        return torch.bincount(index, minlength=B * K).view(B, K)

    return torch.stack([count((image + t)[t == p]), count(image + t), count(image + p)], dim=1)


@dataclass(frozen=True)
class Evaluation:
    """One (σ, draw) of one model: dataset-level scores and the per-image counts behind them.

    ``counts`` (n, 3, K) int64: per image and class the true positives, label pixels and predicted
    pixels; the bootstrap resamples them (``uncertainty.miou_replicates``).
    """

    checkpoint: str
    sigma: float
    draw: int
    miou: float
    pixel_acc: float
    mean_acc: float
    counts: np.ndarray = field(compare=False, repr=False)

    def record(self) -> dict:
        """The row of ``robustness.csv``: checkpoint, sigma, draw, miou, pixel_acc, mean_acc."""
        return {key: getattr(self, key) for key in ("checkpoint", "sigma", "draw", "miou", "pixel_acc", "mean_acc")}


class SweepEvaluator:
    """mIoU of one model under any parameter replacement / input perturbation, over fixed image batches.

    With ``cache_z0`` the backbone runs once per batch here; ``evaluate`` then only decodes (valid only
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
    def evaluate(
        self,
        parameters: dict[str, Tensor],
        inputs: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[dict, np.ndarray]:
        """``models.evaluate.miou`` of the model with ``parameters`` swapped in (names as in the model),
        and the per-image counts (n, 3, K) behind it (``per_image_counts``).

        ``inputs`` maps a pixel batch (B, 3, S, S) in [0, 1] to the normalised model input
        (default ``model.normalize``); it needs uncached batches.
        """
        swapped = {f"model.{name}": value.to(self.device) for name, value in parameters.items()}
        confusion = ConfusionMatrix(self.model.n_cls, self.device)
        counts = []
        for item in self.items:
            size = item.labels.shape[-2:]
            if self.cache_z0:
                if inputs is not None:
                    raise ConfigError("input perturbations need the backbone: Z_0 cannot be cached")
                logits = functional_call(self._decode, swapped, (item.z0, item.grid, size, torch.channels_last))
            else:
                x = (inputs or self.model.normalize)(item.pixels)
                logits = functional_call(self._forward, swapped, (x, torch.channels_last))
            prediction = logits.argmax(1)
            confusion.update(prediction, item.labels)
            counts.append(per_image_counts(prediction, item.labels, self.model.n_cls))
        return miou(confusion), torch.cat(counts).cpu().numpy()


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
) -> Iterator[Evaluation]:
    """One ``Evaluation`` per (σ, draw) of ``model`` (called ``label``) under ``perturbation``, σ in the given order.

    ``batches`` yield ``Batch(pixels (B, 3, S, S) in [0, 1], labels (B, S, S))``; they are read once
    (and encoded once when ``cache_z0``, by default whenever the perturbation is decoder-only).
    ``advance(1)`` is called after each evaluation. The model is left untouched (its train/eval mode
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
                scores, counts = evaluator.evaluate(parameters, inputs)
                yield Evaluation(label, float(sigma), draw, scores["miou"], scores["pixel_acc"], scores["mean_acc"], counts)
                if advance is not None:
                    advance(1)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------- the typed result


def sigma_half(sigmas: Sequence[float], relative: np.ndarray) -> np.ndarray:
    """The noise level at which the mIoU first falls to half its clean value.

    ``sigmas`` (S,) ascending with σ_0 = 0; ``relative`` (..., S) = mIoU / clean mIoU. Between grid
    points σ½ is interpolated linearly in log σ; a curve that falls to 0.5 at the first σ > 0 gets
    that σ (no log 0); one that never does gets ``inf``, one without a clean mIoU (relative NaN) NaN.
    Returns (...) float64.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    rel = np.asarray(relative, dtype=np.float64)
    below = rel <= 0.5
    i = below.argmax(-1)
    before = np.maximum(i - 1, 0)
    v0, v1 = np.take_along_axis(rel, before[..., None], -1)[..., 0], np.take_along_axis(rel, i[..., None], -1)[..., 0]
    s0, s1 = s[before], s[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (v0 - 0.5) / (v0 - v1)
        between = np.exp(np.log(s0) + t * (np.log(s1) - np.log(s0)))
    value = np.where((i > 0) & (s0 > 0), between, s1)
    return np.where(below.any(-1), value, np.where(np.isnan(rel[..., 0]), np.nan, np.inf))


@dataclass
class Curve:
    """One model's sweep: per σ the mean mIoU over draws, its std over draws and its interval."""

    label: str
    sigma: list[float]  # ascending, 0 first
    draws: list[int]
    mean: np.ndarray  # (S,) mean over draws of the dataset mIoU
    std: np.ndarray  # (S,) over draws, ddof = 0
    interval: list[Interval]  # (S,) bootstrap over images and draws
    replicates: np.ndarray  # (resamples, S): the bootstrap replicates of ``mean``

    @property
    def clean(self) -> Interval:
        return self.interval[0]

    @property
    def relative(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.mean / self.mean[0]

    def sigma_half(self, level: float) -> Interval:
        """σ½ with its bootstrap interval (``inf``: beyond the σ grid)."""
        return percentile_interval(self.sigma_half_replicates(), float(sigma_half(self.sigma, self.relative)), level)

    def sigma_half_replicates(self) -> np.ndarray:
        """σ½ of each bootstrap replicate of the curve, (resamples,)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return sigma_half(self.sigma, self.replicates / self.replicates[:, :1])


@dataclass
class Robustness(Result):
    """A robustness sweep of one or more models (``run_robustness``), with bootstrap intervals.

    ``evaluations``: one per (model, σ, draw), in sweep order; ``complete`` is False for a sweep
    interrupted part-way. Intervals resample the images (the same resamples for every model, so
    comparisons are paired) and, for σ > 0 with several draws, the draws of each σ.
    """

    name: ClassVar[str] = "robustness"
    settings: dict
    checkpoints: list[dict]  # {"label", "path", "size", "model"}
    evaluations: list[Evaluation]
    complete: bool = True
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self) -> None:
        self._curves: dict[str, Curve] = {}  # computed on first use

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(e.checkpoint for e in self.evaluations))

    @property
    def num_images(self) -> int:
        return len(self.evaluations[0].counts) if self.evaluations else 0

    def counts(self, label: str) -> dict[float, np.ndarray]:
        """``{σ: (draws, n, 3, K) int64}`` of one model, σ ascending."""
        by_sigma: dict[float, list[np.ndarray]] = {}
        for e in sorted((e for e in self.evaluations if e.checkpoint == label), key=lambda e: (e.sigma, e.draw)):
            by_sigma.setdefault(e.sigma, []).append(e.counts)
        return {sigma: np.stack(values) for sigma, values in by_sigma.items()}

    def curve(self, label: str) -> Curve:
        """Mean mIoU over draws at each σ with intervals, resampling images and draws (``uncertainty``)."""
        if label not in self._curves:
            counts = self.counts(label)
            images = image_resamples(self.num_images, self.bootstrap)
            mean, std, replicates = [], [], []
            for sigma, per_draw in counts.items():  # (D, n, 3, K)
                mious = miou_from_counts(per_draw.sum(axis=1))  # (D,)
                draws = draw_resamples(len(per_draw), self.bootstrap, label, sigma)  # (R, D)
                per_draw_replicates = np.stack([miou_replicates(c, images) for c in per_draw], axis=1)  # (R, D)
                replicates.append(np.take_along_axis(per_draw_replicates, draws, axis=1).mean(axis=1))
                mean.append(mious.mean())
                std.append(mious.std())
            replicates_ = np.stack(replicates, axis=1)
            intervals = [percentile_interval(r, m, self.bootstrap.level) for r, m in zip(replicates_.T, mean)]
            self._curves[label] = Curve(label, list(counts), [len(c) for c in counts.values()], np.array(mean),
                                        np.array(std), intervals, replicates_)
        return self._curves[label]

    def class_prior(self, label: str) -> dict:
        """How the clean model compares with predicting the most frequent label everywhere.

        ``baseline``: that predictor's mIoU on these images (``uncertainty.class_prior_miou``);
        ``ratio``: clean mIoU / baseline with its interval (the same image resamples for both);
        ``dominant`` and ``dominant_share``: the class the model predicts most and its share of the
        predicted pixels.
        """
        per_image = self.counts(label)[0.0][0]  # (n, 3, K) of the clean model
        labels = per_image[:, 1]
        baseline = float(class_prior_miou(labels.sum(0)))
        replicates = class_prior_miou(labels[image_resamples(len(labels), self.bootstrap)].sum(1))  # (R,)
        clean = self.curve(label)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = percentile_interval(clean.replicates[:, 0] / replicates, clean.mean[0] / baseline, self.bootstrap.level)
        predicted = per_image[:, 2].sum(0)
        return {"baseline": baseline, "majority_class": int(labels.sum(0).argmax()), "ratio": ratio.to_json(),
                "dominant": int(predicted.argmax()), "dominant_share": float(predicted.max() / max(predicted.sum(), 1))}

    def at_class_prior(self, label: str) -> bool:
        """Whether the clean model cannot be told from its class prior: the upper bound of its mIoU over
        the majority predictor's is at most ``PRIOR_MARGIN``."""
        return self.class_prior(label)["ratio"]["high"] <= PRIOR_MARGIN

    def warnings(self) -> list[str]:
        """Sanity warnings: a model at its class prior, too few images or draws for the intervals."""
        found = []
        if not self.complete:
            found.append("interrupted sweep: partial results")
        draws = None if self.deterministic else self.settings["draws"]
        found += warn_sample_size(self.num_images, self.bootstrap.level, draws, "robustness")
        for label in self.labels:
            prior = self.class_prior(label)
            if prior["ratio"]["high"] <= PRIOR_MARGIN:
                ratio = Interval(**prior["ratio"])
                found.append(
                    f"{label} is at its class prior: clean mIoU {self.curve(label).clean.text(100)} % against "
                    f"{100 * prior['baseline']:.3g} % for predicting the most frequent label everywhere (ratio "
                    f"{ratio.text()}); {100 * prior['dominant_share']:.0f} % of its pixels are predicted as class {prior['dominant']}"
                )
        return found

    @property
    def deterministic(self) -> bool:
        return resolve_perturbation(self.settings["noise"], self.settings["target"], self.settings["relative"]).deterministic

    def summary(self) -> dict[str, Any]:
        """Per model: the clean mIoU and σ½ (``None``: beyond the grid) with intervals, the curve; and the warnings."""
        models = {}
        for label in self.labels:
            curve = self.curve(label)
            models[label] = {
                "clean": curve.clean.to_json(),
                "sigma_half": curve.sigma_half(self.bootstrap.level).to_json() if len(curve.sigma) > 1 else None,
                "sigma": curve.sigma,
                "miou": [i.to_json() for i in curve.interval],
                "relative": curve.relative,
                "at_class_prior": self.at_class_prior(label),
                "class_prior": self.class_prior(label),
            }
        return {"statistic": "mIoU over the images (dataset level), mean over draws", "num_images": self.num_images,
                "bootstrap": self.bootstrap.describe(), "models": models, "warnings": self.warnings()}

    def table(self) -> list[dict]:
        """One row per (model, σ): draws, mean / std / min / max over draws, relative, interval."""
        rows = []
        for label in self.labels:
            curve, counts = self.curve(label), self.counts(label)
            for s, sigma in enumerate(curve.sigma):
                mious = miou_from_counts(counts[sigma].sum(axis=1))
                rows.append({"checkpoint": label, "sigma": sigma, "draws": curve.draws[s], "mean": curve.mean[s],
                             "std": curve.std[s], "min": float(mious.min()), "max": float(mious.max()),
                             "relative": curve.relative[s], "low": curve.interval[s].low, "high": curve.interval[s].high})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "complete": self.complete, "checkpoints": self.checkpoints,
                **self.summary(), "table": self.table(), "records": self.rows()}

    def rows(self) -> list[dict]:
        return [e.record() for e in self.evaluations]

    def figures(self) -> dict[str, Figure]:
        """``robustness``: mIoU against σ (curves), or clean / transformed bars for structured transforms."""
        families = {c["label"]: c["model"]["decoder"] for c in self.checkpoints}
        curves = []
        for label in self.labels:
            curve = self.curve(label)
            name = f"{label} ({families[label]})" if label in families else label
            half = curve.sigma_half(self.bootstrap.level) if len(curve.sigma) > 1 else None
            curves.append(plots.RobustnessCurve(name, curve.sigma, 100 * curve.mean,
                                                100 * np.array([i.low for i in curve.interval]),
                                                100 * np.array([i.high for i in curve.interval]),
                                                None if half is None else (half.estimate, half.low, half.high)))
        colours = plots.model_colours([c.name for c in curves])
        s = self.settings
        draws = f"{s['draws']} draws" if s["draws"] > 1 and not self.deterministic else "one draw"
        caption = (f"{s['description']}\n{self.num_images} images, {draws}; band: {100 * self.bootstrap.level:g} % "
                   f"bootstrap interval over images{' and draws' if draws != 'one draw' else ''}; seed {s['seed']}"
                   f"{'  [interrupted: partial results]' if not self.complete else ''}")
        if s["kind"] == "structured":
            return {self.name: plots.plot_robustness_bars(curves, colours, caption)}
        return {self.name: plots.plot_robustness_curves(curves, colours, s["sigma_label"], caption)}

    def arrays(self) -> dict[str, np.ndarray]:
        """``<label>``: each model's per-image counts (evaluations, n, 3, K), in the order of its records."""
        return {label: np.stack([e.counts for e in self.evaluations if e.checkpoint == label]) for label in self.labels}

    def files(self, out: str | Path) -> list[Path]:
        """The files ``save(out)`` writes."""
        out = Path(out)
        return [out / f"{self.name}{suffix}" for suffix in (".png", ".pdf", ".json", ".csv", ".npz", ".result.npz")]


NAME = Robustness.name


def sweep_settings(perturbation: Perturbation, sigmas: Sequence[float], draws: int, seed: int) -> dict:
    """The ``settings`` block of a result: what was perturbed, how, and what σ means."""
    return {
        "noise": perturbation.noise, "target": perturbation.target, "relative": perturbation.relative,
        "kind": perturbation.kind, "description": perturbation.description(),
        "sigma_label": perturbation.sigma_label(), "sigmas": list(sigmas),
        "draws": 1 if perturbation.deterministic else draws, "seed": seed,
        "precision": "float32 (no autocast)", "std": "over draws, ddof = 0",
    }


def write_progress(out: str | Path, settings: dict, checkpoints: list[dict], evaluations: list[Evaluation]) -> None:
    """``robustness.json`` / ``.csv`` of a sweep in progress: what is done, no intervals (they come at the end)."""
    out = Path(out)
    records = [e.record() for e in evaluations]
    save_json(out / f"{NAME}.json", {"settings": settings, "complete": False, "checkpoints": checkpoints, "records": records})
    save_csv(out / f"{NAME}.csv", records)


def run_robustness(
    models: Iterable[tuple[str, str, nn.Module]],
    batches_for: Callable[[int], tuple[int, Iterable[Batch]]],
    perturbation: Perturbation,
    sigmas: Sequence[float],
    out: str | Path | None,
    *,
    draws: int = 3,
    seed: int = 0,
    size: int | None = None,
    settings: dict | None = None,
    bootstrap: Bootstrap | None = None,
    advance: Callable[[int], None] | None = None,
) -> Robustness:
    """Sweep every ``(label, source, model)`` of ``models``; with ``out``, write the result there.

    ``batches_for(side)`` gives (number of images, batches of ``side``-pixel crops); ``side`` is
    ``size`` or each model's training size. With ``out`` the records are rewritten after every
    evaluation (``write_progress``) and the whole result (``Robustness.save``) at the end. A
    KeyboardInterrupt ends the sweep with what is done: the result has ``complete = False``.
    ``bootstrap`` (default ``Bootstrap(seed=seed)``) sets the intervals.
    """
    if 0 not in sigmas:
        raise ConfigError("a sweep needs σ = 0, the clean model every other σ is compared with")
    settings = sweep_settings(perturbation, sigmas, draws, seed) | (settings or {}) | {"size": size}
    described: list[dict] = []
    evaluations: list[Evaluation] = []
    complete = False
    try:
        for label, source, model in models:
            side = size or max(model.config.backbone.image_size)
            total, batches = batches_for(side)
            settings["num_images"] = total
            described.append({"label": label, "path": source, "size": side, "model": describe_model(model)})
            for evaluation in robustness_records(model, label, batches, perturbation, sigmas, draws, seed, advance=advance):
                evaluations.append(evaluation)
                if out is not None:
                    write_progress(out, settings, described, evaluations)
            del model  # before the next one loads
        complete = True
    except KeyboardInterrupt:
        pass
    result = Robustness(settings, described, evaluations, complete, bootstrap or Bootstrap(seed=seed))
    if evaluations and out is not None:
        result.save(out)
    return result
