"""Ablation (SPEC §3.5): every unit of a decoder removed in turn, scored against the clean model.

A unit (``ablation_units``) is one of:

- ``head``: head k of a layer (``mssa1[0]``): its output contributes nothing (``zero``) or its mean
  (``mean``) to the layer's update (``interventions.HeadAblation``). For DEPICT this removes what the
  layer writes into the head's subspace span(P_k); for Segmenter one attention head of a block.
- ``subspace``: the tokens (and the class embeddings riding with them) after a layer projected out of
  one head's subspace span(P_{l,k}) (``Projection(keep=False)``; ``mean``: that part replaced by the
  mean's). Segmenter's "subspaces" are the row blocks of its query projections W_Q.
- ``class``: class k's embedding Q̂_k in the mask head zeroed or set to its mean (``ClassAblation``).

Every image is scored with the evaluation protocol (``robustness.EvaluationImages``: the dataset's test
resize, sliding windows, merged logits, labels at full resolution): the backbone runs once per window
(``models.evaluate.encode_image``) and the clean decoder and every ablated one decode those tokens
(``decode_labels``), so the clean mIoU equals ``depict eval`` on the same images. Mean ablation first
takes the means over the named images with one clean pass (``record_ablation_means``).

``Ablation`` holds, per model, the per-image counts (true positives, label and predicted pixels per
class) of the clean model and of every unit; its numbers are dataset-level IoUs with percentile
bootstrap intervals over images, paired (the same image resamples for the clean model, every unit and
every model). The *class concentration* of a unit is the Herfindahl index of its per-class IoU losses,
H = Σ_c d_c² / (Σ_c d_c)², d_c = max(0, IoU_c(clean) − IoU_c(ablated)): 1 when one class bears the
whole loss, 1/K when all K lose alike (1/H: the effective number of classes it matters for); NaN
for a unit whose removal costs no class anything. A model's is the mean of its units' weighted by
their total losses Σ_c d_c (``weighted_concentration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from depict_analysis import plots
from depict_analysis.claims import Finding, compare_replicates
from depict_analysis.foundation.distributed import is_writer, shard, sum_over_processes
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.interventions import (
    ClassAblation,
    Edit,
    HeadAblation,
    MeanRecorder,
    Means,
    Projection,
    edited,
    subspace_basis,
)
from depict_analysis.inputs import image_progress
from depict_analysis.models.evaluate import decode_labels, encode_image
from depict_analysis.models.pretrained import BUILTIN, DEFAULT_MODELS
from depict_analysis.results import Result
from depict_analysis.robustness import EvaluationImages, LabelIndex
from depict_analysis.runs import ModelSource, loaded_models
from depict_analysis.tracing import describe_model
from depict_analysis.uncertainty import Bootstrap, Interval, image_resamples, percentile_interval, quiet_nan_mean, warn_sample_size

UNITS = ("head", "subspace", "class")
MODES = ("zero", "mean")


# ------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """One part of a decoder and the edits that remove it."""

    name: str  # "mssa1[0]" (layer, head) or a class name
    edits: tuple[Edit, ...]


def head_counts(decoder: nn.Module) -> dict[str, int]:
    """``{layer: number of heads}`` of every layer with a ``heads/`` site, in decoder order."""
    sites = decoder.hook_sites()
    counts = {space.name.split(".")[0]: space.proj.shape[0] for space in decoder.subspaces()}
    return {layer: h for layer, h in counts.items() if f"heads/{layer}" in sites}


def mean_sites(model: nn.Module, unit: str) -> list[str]:
    """The hook sites whose means the ``mean`` mode of ``unit`` reads."""
    decoder = model.decoder
    if unit == "head":
        return [f"heads/{layer}" for layer in head_counts(decoder)]
    if unit == "subspace":
        sites = decoder.hook_sites()
        return [s for layer in head_counts(decoder) for s in (f"tokens/{layer}", f"classes/{layer}") if s in sites]
    return ["class_embeddings"]


def ablation_units(model: nn.Module, unit: str, class_names: Sequence[str], means: Means | None = None) -> list[Unit]:
    """Every unit of kind ``unit`` (head | subspace | class) of ``model``'s decoder; ``means``: mean
    ablation (``record_ablation_means``), else zero ablation."""
    decoder = model.decoder
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit == "class":
        if "class_embeddings" not in decoder.hook_sites():
            raise ConfigError(f"the {decoder.family} decoder has no class embeddings to ablate")
        return [Unit(name, (ClassAblation(k, means=means),)) for k, name in enumerate(class_names)]
    heads = head_counts(decoder)
    if not heads:
        raise ConfigError(f"the {decoder.family} decoder has no attention heads or subspaces to ablate")
    if unit == "head":
        return [Unit(f"{layer}[{k}]", (HeadAblation(layer, k, means),)) for layer, h in heads.items() for k in range(h)]
    sites, units = decoder.hook_sites(), []
    for space in decoder.subspaces():
        layer = space.name.split(".")[0]
        targets = [s for s in (f"tokens/{layer}", f"classes/{layer}") if s in sites]
        for k in range(space.proj.shape[0]):
            U = subspace_basis(decoder, space.name, k)
            units.append(Unit(f"{layer}[{k}]", tuple(Projection(s, U, keep=False, means=means) for s in targets)))
    return units


# ------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def record_ablation_means(model: nn.Module, images: EvaluationImages, sites: Sequence[str],
                          train_config: dict | None = None) -> Means:
    """The means of ``sites`` over every window of ``images`` under the clean model (one pass), with the
    images' names."""
    recorders = [MeanRecorder(site) for site in sites]
    protocol = images.protocol(model, train_config)
    with edited(model, *recorders):
        for i in range(len(images)):
            decode_labels(model, encode_image(model, images.dataset.load_raw(i)[0], **protocol))
    return Means({r.site: r.mean() for r in recorders}, [images.dataset.item_path(i) for i in range(len(images))])


@torch.inference_mode()
def ablation_counts(model: nn.Module, images: EvaluationImages, units: Sequence[Unit], train_config: dict | None = None,
                    advance: Callable[[int], None] | None = None) -> np.ndarray:
    """Per-image counts (1 + U, n, 3, K) int64 of the clean model (row 0) and of each unit removed:
    true positives, label pixels and predicted pixels per class. The backbone runs once per window.
    Under ``torchrun`` each process scores its share of the images (``foundation.distributed.shard``) and
    every process returns the counts of all (a collective call)."""
    protocol = images.protocol(model, train_config)
    device, K = next(model.parameters()).device, model.n_cls
    counts = np.zeros((len(units) + 1, len(images), 3, K), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for i in shard(len(images)):
            image, label = images.dataset.load_raw(i)
            target = LabelIndex.of(torch.from_numpy(label).to(device)[None], K)
            encoded = encode_image(model, image, **protocol)
            for u, edits in enumerate([(), *(unit.edits for unit in units)]):
                with edited(model, *edits):
                    labels = decode_labels(model, encoded)
                counts[u, i] = target.counts(labels[None])[0].cpu().numpy()
            if advance is not None:
                advance(1)
    finally:
        model.train(was_training)
    sum_over_processes(torch.from_numpy(counts))  # in place: each image was scored by one process
    return counts


# ------------------------------------------------------------------------------------------- statistics


def class_iou(counts: np.ndarray) -> np.ndarray:
    """IoU per class from summed counts (..., 3, K): TP / (label + predicted − TP), NaN for an empty union."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, label, predicted = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = label + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def nan_mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(invalid="ignore"), quiet_nan_mean():
        return np.nanmean(values, axis=axis)


def class_losses(clean: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """d_c = max(0, IoU_c(clean) − IoU_c(ablated)), 0 where either IoU is undefined; (..., K)."""
    return np.clip(np.nan_to_num(clean - ablated, nan=0.0), 0, None)


def concentration(clean: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """The Herfindahl index of the per-class IoU losses, Σ d_c² / (Σ d_c)²; (..., K) -> (...), NaN where
    no class loses anything."""
    loss = class_losses(clean, ablated)
    total = loss.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (loss**2).sum(-1) / total**2, np.nan)


def weighted_concentration(clean: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """The units' class concentrations averaged with weights = their total IoU losses Σ_c d_c (a unit whose
    removal costs nothing does not count; one that costs little, whose few losses are mostly noise, little):
    Σ_u (Σ_c d_uc²) / (Σ_c d_uc) / Σ_u Σ_c d_uc. clean (..., K), ablated (U, ..., K) -> (...), NaN without losses."""
    loss = class_losses(clean, ablated)
    total = loss.sum(-1)  # (U, ...)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_unit = np.where(total > 0, (loss**2).sum(-1) / np.where(total > 0, total, 1), 0.0)
        return np.where(total.sum(0) > 0, per_unit.sum(0) / total.sum(0), np.nan)


def resample_weights(n: int, bootstrap: Bootstrap) -> np.ndarray:
    """How often each image is drawn in each bootstrap resample, (R, n) float64 (``image_resamples``):
    resampled sums of per-image counts are then one matrix product."""
    resamples = image_resamples(n, bootstrap)
    weights = np.zeros((len(resamples), n))
    np.add.at(weights, (np.arange(len(resamples))[:, None], resamples), 1.0)
    return weights


@dataclass
class UnitScores:
    """One unit's (or the clean model's) numbers: estimates and their bootstrap replicates (R, ...)."""

    iou: np.ndarray  # (K,)
    iou_replicates: np.ndarray  # (R, K)

    @property
    def miou(self) -> float:
        return float(nan_mean(self.iou))

    @property
    def miou_replicates(self) -> np.ndarray:
        return nan_mean(self.iou_replicates)


@dataclass
class ModelAblation:
    """One model's ablation: ``counts`` (1 + U, n, 3, K), row 0 the clean model, row u + 1 unit ``units[u]``."""

    label: str
    source: str
    model: dict[str, Any]  # describe_model
    protocol: dict[str, Any]  # EvaluationImages.describe: window, stride, test resize
    units: list[str]
    counts: np.ndarray


@dataclass
class Ablation(Result):
    """Ablation of one or more models on the same images (``run_ablation``; see the module docstring)."""

    name: ClassVar[str] = "ablation"
    settings: dict
    class_names: list[str]
    models: list[ModelAblation]
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self) -> None:
        if not self.models:
            raise InputError("an ablation needs at least one model")
        self._scores: dict[str, list[UnitScores]] = {}

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]

    @property
    def num_images(self) -> int:
        return self.models[0].counts.shape[1]

    def model(self, label: str) -> ModelAblation:
        return next(m for m in self.models if m.label == label)

    def scores(self, label: str) -> list[UnitScores]:
        """The clean model's ``UnitScores`` then every unit's, all on the same image resamples (paired)."""
        if label not in self._scores:
            counts = self.model(label).counts
            weights = resample_weights(self.num_images, self.bootstrap)
            self._scores[label] = [
                UnitScores(class_iou(c.sum(0)), class_iou((weights @ c.reshape(len(c), -1)).reshape(-1, *c.shape[1:])))
                for c in counts
            ]
        return self._scores[label]

    def interval(self, estimate: float, replicates: np.ndarray) -> Interval:
        return percentile_interval(replicates, estimate, self.bootstrap.level)

    def clean(self, label: str) -> Interval:
        clean = self.scores(label)[0]
        return self.interval(clean.miou, clean.miou_replicates)

    def unit_rows(self, label: str) -> list[dict[str, Any]]:
        """Per unit: name, mIoU and its change against the clean model (paired intervals), per-class IoU and
        its change (intervals), and the class concentration of its IoU losses (interval)."""
        clean, *units = self.scores(label)
        rows = []
        for name, unit in zip(self.model(label).units, units):
            change = unit.iou - clean.iou
            change_replicates = unit.iou_replicates - clean.iou_replicates
            class_change = [self.interval(float(change[k]), change_replicates[:, k]) for k in range(len(change))]
            rows.append({
                "unit": name,
                "miou": self.interval(unit.miou, unit.miou_replicates),
                "change": self.interval(unit.miou - clean.miou, unit.miou_replicates - clean.miou_replicates),
                "iou": unit.iou,
                "iou_change": class_change,
                "concentration": self.interval(float(concentration(clean.iou, unit.iou)),
                                               concentration(clean.iou_replicates, unit.iou_replicates)),
            })
        return rows

    def concentration_replicates(self, label: str) -> tuple[float, np.ndarray]:
        """The loss-weighted class concentration of the model's units (``weighted_concentration``), and its
        bootstrap replicates (R,)."""
        clean, *units = self.scores(label)
        estimate = weighted_concentration(clean.iou, np.stack([u.iou for u in units]))
        replicates = weighted_concentration(clean.iou_replicates, np.stack([u.iou_replicates for u in units]))
        return float(estimate), replicates

    def model_concentration(self, label: str) -> Interval:
        return self.interval(*self.concentration_replicates(label))

    def warnings(self) -> list[str]:
        return warn_sample_size(self.num_images, self.bootstrap.level, what="ablation")

    # ------------------------------------------------------------------------------ Result

    def summary(self) -> dict[str, Any]:
        """Per model: the clean mIoU, the unit whose removal costs most, the mean class concentration."""
        models = {}
        for label in self.labels:
            rows = self.unit_rows(label)
            worst = min(rows, key=lambda r: r["change"].estimate)
            models[label] = {"clean": self.clean(label).to_json(), "units": len(rows),
                             "largest_drop": {"unit": worst["unit"], "change": worst["change"].to_json()},
                             "concentration": self.model_concentration(label).to_json()}
        return {"statistic": "dataset-level mIoU; change = ablated − clean, paired bootstrap over images",
                "unit": self.settings["unit"], "mode": self.settings["mode"], "num_images": self.num_images,
                "bootstrap": self.bootstrap.describe(), "models": models, "warnings": self.warnings()}

    def to_json(self) -> dict[str, Any]:
        models = []
        for m in self.models:
            clean = self.scores(m.label)[0]
            units = [{"name": r["unit"], "miou": r["miou"].to_json(), "change": r["change"].to_json(),
                      "iou": _listed(r["iou"]), "iou_change": [c.to_json() for c in r["iou_change"]],
                      "concentration": r["concentration"].to_json()} for r in self.unit_rows(m.label)]
            models.append({"label": m.label, "source": m.source, "model": m.model, "protocol": m.protocol, "clean_miou": self.clean(m.label).to_json(),
                           "clean_iou": _listed(clean.iou), "concentration": self.model_concentration(m.label).to_json(),
                           "units": units})
        return {"settings": self.settings, "classes": self.class_names, **self.summary(), "checkpoints": models}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (model, unit), the clean model first: mIoU, change with interval, concentration,
        and the IoU of every class (``iou:<class>``)."""
        rows = []
        for label in self.labels:
            clean = self.scores(label)[0]
            rows.append({"checkpoint": label, "unit": "clean", "miou": clean.miou, "change": 0.0, "change_low": 0.0,
                         "change_high": 0.0, "concentration": math.nan,
                         **{f"iou:{c}": v for c, v in zip(self.class_names, clean.iou)}})
            for r in self.unit_rows(label):
                rows.append({"checkpoint": label, "unit": r["unit"], "miou": r["miou"].estimate, "change": r["change"].estimate,
                             "change_low": r["change"].low, "change_high": r["change"].high,
                             "concentration": r["concentration"].estimate,
                             **{f"iou:{c}": v for c, v in zip(self.class_names, r["iou"])}})
        return rows

    def figures(self) -> dict[str, Figure]:
        """``ablation``: per model a unit × class heatmap of the IoU change (percentage points), mIoU change first."""
        panels = []
        for label in self.labels:
            rows = self.unit_rows(label)
            changes = np.array([[r["change"].estimate, *(c.estimate for c in r["iou_change"])] for r in rows])
            family = self.model(label).model["decoder"]
            panels.append(plots.AblationPanel(f"{label} ({family}): clean mIoU {self.clean(label).text(100)} %",
                                              [r["unit"] for r in rows], 100 * changes))
        unit, mode = self.settings["unit"], self.settings["mode"]
        caption = (f"{mode}-ablation of each {unit}: IoU change (percentage points) against the clean model; "
                   f"{self.num_images} images of {self.settings['images']['dataset']}, evaluation protocol")
        return {self.name: plots.plot_ablation(panels, ["mIoU", *self.class_names], caption)}

    def arrays(self) -> dict[str, np.ndarray]:
        """``<label>``: each model's per-image counts (1 + U, n, 3, K), row 0 the clean model."""
        return {m.label: m.counts for m in self.models}


NAME = Ablation.name
CONCENTRATION = ("class concentration of a head's zero-ablation: the Herfindahl index Σ d_c² / (Σ d_c)² of the per-class "
                 "IoU losses d_c = max(0, IoU_c(clean) − IoU_c(head removed)) (1: one class bears the whole loss, 1/K: all "
                 "classes alike), averaged over the model's heads weighted by each head's total loss Σ d_c; dataset-level "
                 "IoUs, paired bootstrap over images")


def concentration_finding(result: Ablation, white: str, black: str, data: str, blockers: list[str] | None = None) -> Finding:
    """Observation: removing one of ``white``'s heads (what its layer writes into one subspace P_k) costs fewer
    classes than removing one of ``black``'s attention heads (``CONCENTRATION``, paired by image)."""
    if (result.settings["unit"], result.settings["mode"]) != ("head", "zero"):
        raise ConfigError("the concentration finding reads a zero-ablation of heads (unit='head', mode='zero')")
    return compare_replicates(
        "observation", f"Each of {white}'s subspaces serves fewer classes than each of {black}'s attention heads: "
        "removing one costs IoU on fewer classes",
        f"{CONCENTRATION}; difference {white} − {black}", data, "larger", result.bootstrap.level,
        (white, *result.concentration_replicates(white)), (black, *result.concentration_replicates(black)), blockers,
    )


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


# ------------------------------------------------------------------------------------------- run


def run_ablation(
    models: Sequence[ModelSource] | None,
    images: EvaluationImages,
    *,
    unit: str = "head",
    mode: str = "zero",
    mean_images: EvaluationImages | None = None,
    bootstrap: Bootstrap | None = None,
    settings: dict | None = None,
    device: str | torch.device = "auto",
    trust: bool = False,
    progress: bool = True,
) -> Ablation:
    """Ablate every ``unit`` of each model in turn (sources or ``LoadedModel``s as ``compare`` takes them,
    one in memory at a time; default the built-in models), scoring ``images`` with the evaluation
    protocol (the run's ``train_config``, as ``depict eval`` reads it).

    ``mode="mean"`` takes the means over ``mean_images`` (default: ``images``) first; the result's
    settings name them. ``progress`` shows a bar over the images scored on stderr. Under ``torchrun``
    each process scores its share of the images (``ablation_counts``) and returns the whole result; the
    means of ``mode="mean"`` are taken over every image in each process (the same floating-point sums).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    models = list(models or [f"{BUILTIN}{name}" for name in DEFAULT_MODELS])
    mean_images = mean_images or images
    class_names = list(images.dataset.class_names)
    described = {"unit": unit, "mode": mode, "images": {"dataset": images.dataset.name, "split": images.dataset.split,
                                                        "num_images": len(images)}}
    scored: list[ModelAblation] = []
    with image_progress(len(models) * len(shard(len(images))), NAME, progress and is_writer()) as advance:
        for loaded in loaded_models(models, device, trust):
            model, train_config = loaded.model, loaded.info.train_config
            means = None
            if mode == "mean":
                means = record_ablation_means(model, mean_images, mean_sites(model, unit), train_config)
                described["mean_images"] = means.images
            units = ablation_units(model, unit, class_names, means)
            counts = ablation_counts(model, images, units, train_config, advance)
            scored.append(ModelAblation(loaded.label, loaded.source, describe_model(model),
                                        images.describe(model, train_config), [u.name for u in units], counts))
    return Ablation(described | (settings or {}), class_names, scored, bootstrap or Bootstrap())
