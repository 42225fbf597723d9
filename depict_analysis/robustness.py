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
``run_robustness(models, images, perturbation, sigmas, out)`` sweeps several models (sources or loaded
models, as ``compare`` takes them) into a ``Robustness``: per model and σ the mean
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
from PIL import Image
from torch import Tensor, nn
from torch.func import functional_call

from depict_analysis import plots
from depict_analysis.foundation.distributed import active, is_writer, rank_and_world, shard, sum_over_processes
from depict_analysis.foundation.errors import ConfigError, DatasetError, InputError
from depict_analysis.inputs import Batch, ImageSource, image_progress
from depict_analysis.models.data import IGNORE_INDEX, SegmentationDataset
from depict_analysis.models.data.transforms import img_scale_for
from depict_analysis.models.evaluate import check_classes, decode_labels, encode_image, eval_protocol, image_labels
from depict_analysis.outputs import save_csv, save_json
from depict_analysis.perturbations import Perturbation, draws_per_sigma, resolve_perturbation
from depict_analysis.results import Result
from depict_analysis.runs import ModelSource, loaded_models
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
    quiet_nan_mean,
    warn_sample_size,
)

# Perturbed parameter sets kept on the device for reuse over all the images (ParameterSets).
PARAMETER_BUDGET = 2**30
# "At the class prior": the clean mIoU is at most 25 % above the mIoU of predicting the most frequent
# label everywhere, at the upper end of its interval (a model stuck on its background class scores 1×).
PRIOR_MARGIN = 1.25


def draw_generator(seed: int, checkpoint: str, sigma: float, draw: int, image: int | None = None) -> torch.Generator:
    """A CPU generator seeded from (seed, checkpoint, σ, draw) alone (a stable hash, not Python's);
    with ``image``, one per image of that draw (input noise)."""
    key = f"{seed}|{checkpoint}|{float(sigma)!r}|{draw}{'' if image is None else f'|{image}'}".encode()
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
    """Pixels (B, 3, h, w) in [0, 1] -> normalised model input, with input noise of level σ applied.

    Noise is drawn on the CPU from ``generator`` (one call per batch, in batch order; a sweep calls
    it once per image and view, with the image's own generator).
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

NEEDS_LABELS = "robustness needs ground-truth labels: images with labels, or a dataset"
LABEL_ARGUMENTS = ("labels", "images", "dataset")  # the Python arguments it names (a command line: its flags)


class _Call(nn.Module):
    """Runs ``fn(*args)`` as its forward, so that ``functional_call`` swaps ``model``'s parameters for
    the whole call (``fn`` may call the model many times: every window of an image)."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]):
        super().__init__()
        self.model = model
        self.fn = (fn,)  # in a tuple: a module passed as ``fn`` must not register as a second path to the parameters

    def forward(self, *args):
        return self.fn[0](*args)


def with_parameters(model: nn.Module, parameters: dict[str, Tensor], fn: Callable[..., Tensor], *args) -> Tensor:
    """``fn(*args)`` with ``parameters`` (names as in ``model``) in place of the model's own, which
    are never modified (``torch.func.functional_call``), also when ``fn`` raises."""
    if not parameters:
        return fn(*args)
    return functional_call(_Call(model, fn), {f"model.{name}": value for name, value in parameters.items()}, args)


class ParameterSets:
    """The parameter replacements of every (σ, draw) of a sweep, each drawn once from its own
    ``draw_generator`` and kept on the model's device for all the images while the kept sets fit in
    ``budget`` bytes (decoder noise: every set; noise on a whole ViT may not fit); a set beyond it is
    drawn again for each image batch, with the same values."""

    def __init__(self, model: nn.Module, perturbation: Perturbation, label: str, seed: int, budget: int):
        self.model, self.perturbation, self.label, self.seed, self.budget = model, perturbation, label, seed, budget
        self.device = next(model.parameters()).device
        self.kept: dict[tuple[float, int], dict[str, Tensor]] = {}
        self.held = 0

    @torch.inference_mode()
    def __call__(self, sigma: float, draw: int) -> dict[str, Tensor]:
        if (sigma, draw) in self.kept:
            return self.kept[sigma, draw]
        generator = draw_generator(self.seed, self.label, sigma, draw)
        drawn = perturbed_parameters(self.model, self.perturbation, sigma, generator)
        drawn = {name: value.to(self.device) for name, value in drawn.items()}
        size = sum(value.numel() * value.element_size() for value in drawn.values())
        if self.held + size <= self.budget:
            self.kept[sigma, draw] = drawn
            self.held += size
        return drawn


@dataclass(frozen=True)
class LabelIndex:
    """The labelled pixels of a batch of label maps (B, H, W), read once for any number of
    predictions (``counts``): ``valid`` (B, H, W) bool, None when every pixel is labelled, and each
    labelled pixel's row of its image's confusion matrix, ``(image · K + label) · K`` (int64)."""

    valid: Tensor | None
    rows: Tensor
    batch: int
    n_cls: int

    @staticmethod
    def of(target: Tensor, n_cls: int, ignore_index: int = IGNORE_INDEX) -> "LabelIndex":
        """A label outside 0..K-1 (other than ``ignore_index``) is refused, as ``ConfusionMatrix`` refuses it."""
        B, K = target.shape[0], n_cls
        valid = target != ignore_index
        image = torch.arange(B, device=target.device).view(B, *([1] * (target.ndim - 1))).expand_as(target)
        valid = None if bool(valid.all()) else valid
        t, image = (target.long(), image) if valid is None else (target[valid].long(), image[valid])
        bad = t[(t < 0) | (t >= K)]
        if bad.numel():
            raise DatasetError(f"label value {int(bad[0])} is not a class index 0..{K - 1} (or {ignore_index} = ignore)")
        return LabelIndex(valid, ((image * K + t) * K).reshape(-1), B, K)

    def counts(self, pred: Tensor) -> Tensor:
        """Per image and class of the predictions ``pred`` (B, H, W): true positives, label pixels,
        predicted pixels (B, 3, K) int64, from one ``bincount`` of each image's confusion matrix
        (its diagonal, row sums and column sums)."""
        B, K = self.batch, self.n_cls
        p = pred.to(self.rows.device)
        p = p.reshape(-1) if self.valid is None else p[self.valid]
        confusion = torch.bincount(self.rows + p, minlength=B * K * K).view(B, K, K)
        return torch.stack([confusion.diagonal(dim1=1, dim2=2), confusion.sum(2), confusion.sum(1)], dim=1)


def per_image_counts(pred: Tensor, target: Tensor, n_cls: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per image and class: true positives, label pixels, predicted pixels; (B, H, W) -> (B, 3, K) int64.

    Pixels labelled ``ignore_index`` are left out, as in ``ConfusionMatrix``: summed over images these
    are its diagonal, row sums and column sums, all that the mIoU needs (``uncertainty.miou_from_counts``).
    A label outside 0..K-1 (other than ``ignore_index``) is refused, as ``ConfusionMatrix`` refuses it.
    ``LabelIndex`` reads the labels once for many predictions.
    """
    return LabelIndex.of(target, n_cls, ignore_index).counts(pred)


def scores_from_counts(counts: np.ndarray) -> dict[str, float]:
    """``models.evaluate.miou``'s mIoU, pixel and mean accuracy from summed counts (3, K) (TP, label, predicted)."""
    tp, label = counts[0].astype(np.float64), counts[1].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"), quiet_nan_mean():  # no labelled pixel: NaN, as miou() gives
        mean_acc, pixel_acc = float(np.nanmean(tp / label)), float(tp.sum() / label.sum())
    return {"miou": float(miou_from_counts(counts)), "pixel_acc": pixel_acc, "mean_acc": mean_acc}


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

    @staticmethod
    def of(checkpoint: str, sigma: float, draw: int, counts: np.ndarray) -> "Evaluation":
        """The evaluation whose per-image counts (n, 3, K) are ``counts``."""
        return Evaluation(checkpoint, float(sigma), draw, **scores_from_counts(counts.sum(axis=0)), counts=counts)

    def record(self) -> dict:
        """The row of ``robustness.csv``: checkpoint, sigma, draw, miou, pixel_acc, mean_acc."""
        return {key: getattr(self, key) for key in ("checkpoint", "sigma", "draw", "miou", "pixel_acc", "mean_acc")}


@dataclass(frozen=True)
class EvaluationImages:
    """Images scored with the evaluation protocol (SPEC §1.5) exactly as ``models.evaluate.evaluate``
    scores them: the first ``num_images`` items of ``dataset`` (all by default) at their own size,
    the dataset's test resize, sliding windows (``batch_size`` at a time) with the window, stride
    and short side of ``eval_protocol`` (explicit values win; ``train_config`` of a run as ``depict
    eval`` reads it), logits merged, labels scored at the label's resolution. Single scale, no flip.
    """

    dataset: SegmentationDataset
    num_images: int | None = None
    window: int | None = None
    stride: int | None = None
    short_side: int | None = None
    batch_size: int = 8

    def __len__(self) -> int:
        return len(self.dataset) if self.num_images is None else min(self.num_images, len(self.dataset))

    def protocol(self, model: nn.Module, train_config: dict | None = None) -> dict[str, Any]:
        """``window``, ``stride``, ``img_scale`` and ``batch_size`` of ``image_labels`` for ``model``."""
        check_classes(model, self.dataset)
        protocol = eval_protocol(model, self.dataset, train_config, window=self.window, stride=self.stride,
                                 short_side=self.short_side)
        return {"window": protocol["window"], "stride": protocol["stride"], "batch_size": self.batch_size,
                "img_scale": img_scale_for(protocol["short_side"], self.dataset.max_ratio)}

    def describe(self, model: nn.Module, train_config: dict | None = None) -> dict[str, Any]:
        """What a result records about the protocol: its name and settings for ``model``."""
        protocol = self.protocol(model, train_config)
        return {"name": "evaluation", "window": protocol["window"], "stride": protocol["stride"],
                "img_scale": protocol["img_scale"] and list(protocol["img_scale"]), "scales": [1.0], "flip": False}


#: ``crops(side)`` -> (number of images, batches of ``side``-pixel square crops): the faster protocol.
CropImages = Callable[[int], tuple[int, Iterable[Batch]]]
SweepImages = EvaluationImages | CropImages


class ModelSweep:
    """One model's sweep, images outer and every (σ, draw) inner.

    Each image (or batch of square crops) is read once and, for a decoder-only perturbation, encoded
    once (every window of every view); every (σ, draw) is then decoded from those tokens before the
    next image is read, so memory is bounded by one image (or batch) whatever the number of images.
    Parameter sets come from one ``ParameterSets``; input noise is drawn per image from
    ``draw_generator(seed, label, σ, draw, image index)``, so no number depends on the batch size,
    the order of the images or how they are split across processes. ``counts[i]`` (E, 3, K) holds
    image i's counts under each of ``draws`` once scored.
    """

    def __init__(self, model: nn.Module, label: str, perturbation: Perturbation, sigmas: Sequence[float], draws: int,
                 seed: int, cache_z0: bool | None = None, parameter_budget: int = PARAMETER_BUDGET):
        if perturbation.kind == "structured":
            transformable_subspaces(model)  # a clear error before any work for a decoder without subspaces
        if draws < 1:
            raise ConfigError(f"draws must be ≥ 1, got {draws}")
        cache_z0 = perturbation.decoder_only if cache_z0 is None else cache_z0
        if cache_z0 and not perturbation.decoder_only:
            raise ConfigError(f"cannot cache Z_0 when the {perturbation.target} is perturbed")
        self.model, self.label, self.perturbation, self.seed, self.cache_z0 = model, label, perturbation, seed, cache_z0
        self.draws = [(float(s), d) for s in sigmas for d in range(draws_per_sigma(perturbation, s, draws))]
        self.parameters = ParameterSets(model, perturbation, label, seed, parameter_budget)
        self.device = next(model.parameters()).device
        self.counts: dict[int, np.ndarray] = {}

    def _inputs(self, sigma: float, draw: int, index: int) -> Callable[[Tensor], Tensor] | None:
        """Pixels (B, 3, h, w) in [0, 1] -> the perturbed model input of image ``index`` (None: clean)."""
        if self.perturbation.kind != "input" or sigma == 0:
            return None
        generator = draw_generator(self.seed, self.label, sigma, draw, index)
        return partial(perturbed_images, self.model, perturbation=self.perturbation, sigma=sigma, generator=generator)

    @torch.inference_mode()
    def score_crops(self, batch: Batch, indices: Sequence[int]) -> None:
        """Score a batch of square crops (pixels (B, 3, S, S), labels (B, S, S)), image i = ``indices[i]``."""
        model, pixels, labels = self.model, batch.pixels.to(self.device), batch.labels.to(self.device)
        size, counts, target = labels.shape[-2:], [], LabelIndex.of(labels, model.n_cls)
        if self.cache_z0:
            z0, grid = model.encode(model.normalize(pixels))
        for sigma, draw in self.draws:
            parameters = self.parameters(sigma, draw)
            if self.cache_z0:
                logits = with_parameters(model, parameters, model.decode, z0, grid, size, torch.channels_last)
            else:
                x = torch.cat([(self._inputs(sigma, draw, i) or model.normalize)(pixels[j : j + 1])
                               for j, i in enumerate(indices)])
                logits = with_parameters(model, parameters, model, x, torch.channels_last)
            counts.append(target.counts(logits.argmax(1)))
        for j, image_counts in enumerate(torch.stack(counts, dim=1).cpu().numpy()):  # (B, E, 3, K)
            self.counts[indices[j]] = image_counts

    @torch.inference_mode()
    def score_image(self, image: Image.Image, label: np.ndarray, index: int, protocol: dict[str, Any]) -> None:
        """Score one image with the evaluation protocol (``EvaluationImages.protocol``) under every draw."""
        model, target = self.model, LabelIndex.of(torch.from_numpy(label).to(self.device)[None], self.model.n_cls)
        encoded = encode_image(model, image, **protocol) if self.cache_z0 else None
        counts = []
        for sigma, draw in self.draws:
            parameters = self.parameters(sigma, draw)
            if encoded is not None:
                labels = with_parameters(model, parameters, decode_labels, model, encoded)
            else:
                labels = with_parameters(model, parameters, partial(image_labels, model, image, inputs=self._inputs(
                    sigma, draw, index), **protocol))
            counts.append(target.counts(labels[None])[0])
        self.counts[index] = torch.stack(counts).cpu().numpy()

    def run(self, images: SweepImages, train_config: dict | None = None,
            advance: Callable[[int], None] | None = None) -> int:
        """Score this process's share of ``images`` (``foundation.distributed.shard``); returns the
        number of images in all. ``advance(n)`` after every n images scored here."""
        was_training = self.model.training
        self.model.eval()
        try:
            if isinstance(images, EvaluationImages):
                protocol = images.protocol(self.model, train_config)
                for i in shard(len(images)):
                    image, label = images.dataset.load_raw(i)
                    self.score_image(image, label, i, protocol)
                    if advance is not None:
                        advance(1)
                return len(images)
            side = max(self.model.config.backbone.image_size)
            _, batches = images(side)
            rank, world = rank_and_world()
            total = 0
            for b, batch in enumerate(batches):
                if batch.labels is None:
                    raise InputError(NEEDS_LABELS, arguments=LABEL_ARGUMENTS)
                indices = range(total, total + len(batch.labels))
                total += len(indices)
                if b % world == rank:
                    self.score_crops(batch, indices)
                    if advance is not None:
                        advance(len(indices))
            return total
        finally:
            self.model.train(was_training)

    def evaluations(self, n: int) -> tuple[list[Evaluation], np.ndarray]:
        """One ``Evaluation`` per draw over the images scored by any process, and their indices (sorted).

        Under ``torchrun`` a collective call: every process's counts are summed into each."""
        if not self.counts and not active():
            raise InputError("no images to evaluate")
        E, K = len(self.draws), self.model.n_cls
        counts = torch.zeros(n, E, 3, K, dtype=torch.int64)
        scored = torch.zeros(n, dtype=torch.int64)
        for i, image_counts in self.counts.items():
            counts[i], scored[i] = torch.from_numpy(image_counts), 1
        sum_over_processes(counts), sum_over_processes(scored)
        done = scored.nonzero()[:, 0].numpy()
        if not len(done):
            raise InputError("no images to evaluate")
        per_draw = counts[done].numpy().transpose(1, 0, 2, 3)  # (E, n, 3, K)
        return [Evaluation.of(self.label, sigma, draw, c) for (sigma, draw), c in zip(self.draws, per_draw)], done


def robustness_records(
    model: nn.Module,
    label: str,
    images: SweepImages | Iterable[Batch],
    perturbation: Perturbation,
    sigmas: Sequence[float],
    draws: int = 3,
    seed: int = 0,
    *,
    cache_z0: bool | None = None,
    train_config: dict | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[Evaluation]:
    """One ``Evaluation`` per (σ, draw) of ``model`` (called ``label``) under ``perturbation``, σ in the given order.

    ``images``: ``EvaluationImages`` (the evaluation protocol: σ = 0 equals ``evaluate``), a
    ``CropImages`` callable, or the square-crop ``Batch``es themselves (pixels (B, 3, S, S) in
    [0, 1], labels (B, S, S)). With ``cache_z0`` (by default whenever the perturbation is
    decoder-only) the backbone runs once per image. σ = 0 is the clean model, evaluated once;
    deterministic perturbations get one draw. ``advance(n)`` after every n images. The model is left
    untouched (its train / eval mode is restored). Under ``torchrun`` each process scores its share
    and every process returns all the records.
    """
    sweep = ModelSweep(model, label, perturbation, sigmas, draws, seed, cache_z0)
    if not isinstance(images, EvaluationImages) and not callable(images):
        batches = list(images)
        images = lambda side: (None, batches)  # noqa: E731
    n = sweep.run(images, train_config, advance)
    return sweep.evaluations(n)[0]


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
        protocol = PROTOCOLS.get(s.get("protocol", "crops"))
        caption = (f"{s['description']}\n{self.num_images} images, {protocol}; {draws}; band: {100 * self.bootstrap.level:g} % "
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


PROTOCOLS = {
    "evaluation": "evaluation protocol (test resize, sliding windows, merged logits), as depict eval",
    "crops": "square crops at the training size (faster; not the evaluation protocol)",
}


def default_models(perturbation: Perturbation) -> list[str]:
    """The built-in models a sweep compares when given none: all of them, or for a structured transform
    those whose decoders own subspace projections."""
    from depict_analysis.models.pretrained import BUILTIN, DEFAULT_MODELS, load_default

    if perturbation.kind != "structured":
        return [f"{BUILTIN}{name}" for name in DEFAULT_MODELS]
    return [f"{BUILTIN}{name}" for name in DEFAULT_MODELS if load_default(name)[0].decoder.parameter_subspaces]


def run_robustness(
    models: Sequence[ModelSource] | None,
    images: ImageSource | SweepImages,
    perturbation: Perturbation,
    sigmas: Sequence[float],
    out: str | Path | None,
    *,
    draws: int = 3,
    seed: int = 0,
    settings: dict | None = None,
    bootstrap: Bootstrap | None = None,
    device: str | torch.device = "auto",
    trust: bool = False,
    progress: bool = True,
) -> Robustness:
    """Sweep every model of ``models`` (sources or ``LoadedModel``s as ``compare`` takes them, one in memory
    at a time; default ``default_models``); with ``out``, write the result there.

    ``images``: an ``ImageSource`` with labels (square crops of ``images.size`` or each model's training
    size; a dataset's classes must be the model's), ``EvaluationImages`` (the evaluation protocol, each
    model's window and stride as ``depict eval`` takes them from its ``train_config``), or
    ``crops(side)`` -> (number of images, batches of ``side``-pixel square crops). Images are outer
    and (σ, draw) inner (``ModelSweep``). With ``out`` the records are rewritten after every model
    (``write_progress``) and the whole result (``Robustness.save``) at the end. A KeyboardInterrupt
    ends the sweep with what is done (``complete = False``): the models swept, and in one process the
    images the interrupted model scored, every model restricted to those. Under ``torchrun`` every
    process scores its share of the images, every process returns the whole result and only rank 0
    writes. ``bootstrap`` (default ``Bootstrap(seed=seed)``) sets the intervals; ``progress`` shows a
    bar over the images on stderr.
    """
    if 0 not in sigmas:
        raise ConfigError("a sweep needs σ = 0, the clean model every other σ is compared with")
    source = images if isinstance(images, ImageSource) else None
    size = source.size if source is not None else None
    crops = not isinstance(images, EvaluationImages) and (source is None or source.view != "evaluation")
    protocol = "crops" if crops else "evaluation"
    if source is not None and source.images and not source.labels:
        raise InputError(NEEDS_LABELS, arguments=LABEL_ARGUMENTS)
    models = list(models or default_models(perturbation))
    count = len(images) if isinstance(images, EvaluationImages) else source.count() if source is not None else None
    total = None if count is None else len(models) * len(shard(count))  # this process's images, for the bar's ETA
    recorded = {"input": source.describe(), "batch_size": source.batch_size} if source is not None else {}
    settings = sweep_settings(perturbation, sigmas, draws, seed) | recorded | (settings or {}) | {
        "size": size, "protocol": protocol, "protocol_description": PROTOCOLS[protocol]}
    writes = out is not None and is_writer()
    described: list[dict] = []
    evaluations: list[Evaluation] = []
    sweep, complete = None, False
    with image_progress(total, NAME, progress and is_writer()) as advance:
        try:
            for loaded in loaded_models(models, device, trust):
                model = loaded.model
                side = size or max(model.config.backbone.image_size)
                if source is not None:
                    source.require_classes(model)
                if source is not None and not crops:
                    sweep_images = EvaluationImages(source.labelled_dataset(model.n_cls), source.num_images,
                                                    batch_size=source.batch_size)
                elif source is not None:
                    sweep_images = lambda _, side=side: source.crops(side)  # noqa: E731
                else:
                    sweep_images = (lambda _, side=side: images(side)) if crops else images
                described.append({"label": loaded.label, "path": loaded.source, "size": side, "model": describe_model(model),
                                  "protocol": {"name": "crops", "size": side} if crops
                                  else sweep_images.describe(model, loaded.info.train_config)})
                sweep = ModelSweep(model, loaded.label, perturbation, sigmas, draws, seed)
                n = sweep.run(sweep_images, loaded.info.train_config, advance)
                evaluations += sweep.evaluations(n)[0]
                settings["num_images"], sweep = n, None
                if writes:
                    write_progress(out, settings, described, evaluations)
                del model, loaded  # before the next one loads
            complete = True
        except KeyboardInterrupt:
            if sweep is not None and sweep.counts and not active():  # keep the images the interrupted model scored
                done = np.array(sorted(sweep.counts))
                evaluations = [Evaluation.of(e.checkpoint, e.sigma, e.draw, e.counts[done]) for e in evaluations]
                evaluations += sweep.evaluations(int(done[-1]) + 1)[0]
                settings["num_images"] = len(done)
            elif sweep is not None:
                described.pop()
    result = Robustness(settings, described, evaluations, complete, bootstrap or Bootstrap(seed=seed))
    if evaluations and writes:
        result.save(out)
    return result
