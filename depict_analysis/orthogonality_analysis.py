"""Orthogonality of a model's head subspaces (PᵀP) and class embeddings (Q̂ᵀQ̂), SPEC.md §3.3, beside
the same statistics at initialisation.

``analyze_orthogonality(traces)`` returns ``Orthogonality``, one :class:`GramPanel` per matrix:

- ``P``: every projection the decoder owns (``Trace.subspaces``: DEPICT's MSSA / MSCA ``proj``, CBT's
  and ToST's projections, Segmenter's per-block query projection W_Q): raw ``PᵀP`` with per head
  ‖P_kᵀP_k − I‖_F/√p and the mean |P_kᵀP_j| entry across heads (these scale with ‖P‖²), and the
  scale-free cosines between basis vectors: mean |cos| across heads, within heads, and the coherence;
- ``final_Q``: the final L2-normalised class embeddings Q̂ the mask head uses (Segmenter: after
  ``proj_classes``; linear: the classifier rows), every statistic taken per image, then averaged;
- ``cls_emb``: the learned class queries (``Trace.classes`` at stage "input") where the decoder has them.

Every statistic is also measured at initialisation (``baseline``): a fresh decoder of the same config
(``Trace.config``, or ``config=``), built after ``torch.manual_seed(seed)`` for each of
``baseline_seeds`` (the caller's random state is left as it was), run on the same images' decoder
input Z_0; mean ± std over seeds. ``random_level`` is the mean |cos| of two random directions in R^d.
Compare models on the cosine statistics and against their baselines, not on raw Gram entries.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from depict_analysis import plots
from depict_analysis.models.decoders.base import Decoder, build_decoder
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.models.registry import ModelConfig
from depict_analysis.orthogonality import class_summary, random_cosine_level, subspace_summary
from depict_analysis.results import Result, Stat
from depict_analysis.tracing import Subspace, Trace, as_traces, class_labels

FINAL_Q = "final_Q"
LEARNED_Q = "cls_emb"
P_STATISTICS = ("cross_head_mean_abs_cos", "within_head_mean_abs_cos", "coherence",  # scale-free
                "head_orthonormality_mean", "cross_head_mean_abs", "row_norm_min", "row_norm_max")  # raw
Q_STATISTICS = ("mean_abs_offdiag", "mean_abs_offdiag_centred", "coherence")
HEADLINE = {  # summary key -> (panel kind or name, statistic): what models are compared on
    "P_cross_head_mean_abs_cos": ("P", "cross_head_mean_abs_cos"),
    "P_coherence": ("P", "coherence"),
    "final_Q_mean_abs_offdiag": (FINAL_Q, "mean_abs_offdiag"),
    "final_Q_mean_abs_offdiag_centred": (FINAL_Q, "mean_abs_offdiag_centred"),
    "final_Q_coherence": (FINAL_Q, "coherence"),
    "cls_emb_mean_abs_offdiag": (LEARNED_Q, "mean_abs_offdiag"),
}


@dataclass
class GramPanel:
    """One matrix of a model: its Gram, its statistics and theirs at initialisation.

    kind "P": a subspace with ``heads`` blocks of ``dim_head`` basis vectors (head k owns rows/cols
    k·p … (k+1)·p − 1): ``gram = proj projᵀ`` (raw), ``cosines`` between the basis vectors. Kind "Q":
    ``gram`` the Gram of the normalised class embeddings (mean over images for final Q̂), ``cosines`` its
    |entries| (mean over images of |Q̂_bᵀQ̂_b|). ``values``: each statistic (final Q̂: its mean over
    images, whose per-image values are ``per_image``); ``baseline``: each statistic at initialisation,
    one value per seed.
    """

    name: str
    kind: str  # "P" | "Q"
    gram: np.ndarray  # (n, n) float64
    cosines: np.ndarray  # (n, n) float64: what the figures show
    values: dict[str, float]
    per_image: dict[str, Stat] = field(default_factory=dict)
    baseline: dict[str, Stat] = field(default_factory=dict)
    heads: int = 1
    dim_head: int = 0
    layer: int | None = None  # the token stage its layer produces (None: updates classes only, or Q)
    head_orthonormality: list[float] = field(default_factory=list)  # P: per head

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without the matrices."""
        info: dict[str, Any] = {"name": self.name, "kind": self.kind, "size": len(self.gram), "layer": self.layer}
        if self.kind == "P":
            p = self.dim_head
            info |= {"heads": self.heads, "dim_head": p, "head_orthonormality": self.head_orthonormality,
                     "head_rows": [{"head": k, "rows": [k * p, (k + 1) * p]} for k in range(self.heads)]}
        info["values"] = self.values
        if self.per_image:
            info["per_image"] = {key: stat.to_json() for key, stat in self.per_image.items()}
        info["at_init"] = {key: {"mean": stat.mean, "std": stat.std, "per_seed": stat.per_image}
                           for key, stat in self.baseline.items()}
        return info


def p_statistics(proj: Tensor) -> tuple[dict[str, Any], dict[str, float]]:
    """``subspace_summary`` of one projection (h, p, d) and its scalar statistics (``P_STATISTICS``)."""
    summary = subspace_summary(proj)
    values = {key: summary[key] for key in P_STATISTICS if key in summary}
    values["head_orthonormality_mean"] = float(np.mean(summary["head_orthonormality"]))
    return summary, {key: values[key] for key in P_STATISTICS}


@dataclass
class Orthogonality(Result):
    """P and Q panels of one model over n images, each beside its at-initialisation baseline.

    ``summary()`` keys: ``model`` (variant), ``num_images``, ``random_level``, ``baseline_seeds``, and
    for each of ``HEADLINE`` (``P_cross_head_mean_abs_cos`` and ``P_coherence``: means over the P panels;
    ``final_Q_mean_abs_offdiag``, ``final_Q_mean_abs_offdiag_centred``, ``final_Q_coherence``: per image,
    then the mean; ``cls_emb_mean_abs_offdiag``) its value and ``<key>_at_init`` (mean over seeds);
    None where the model has no such matrix or no baseline was measured.
    """

    name: ClassVar[str] = "orthogonality"

    model: dict[str, Any]
    settings: dict[str, Any]
    images: list[str]
    panels: list[GramPanel]
    random_level: float
    class_names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.model["variant"]

    def panel(self, name: str) -> GramPanel | None:
        return next((p for p in self.panels if p.name == name), None)

    def headline(self, key: str) -> tuple[float | None, Stat | None]:
        """One ``HEADLINE`` statistic and its baseline (per seed): P statistics averaged over the P panels."""
        where, statistic = HEADLINE[key]
        panels = [p for p in self.panels if (p.kind if where == "P" else p.name) == where]
        chosen = [p for p in panels if not math.isnan(p.values[statistic])]  # nan: e.g. no second head
        if not chosen:
            return None, None
        per_seed = [p.baseline[statistic].per_image for p in chosen if statistic in p.baseline]
        baseline = Stat(np.mean(per_seed, axis=0)) if per_seed and len(per_seed) == len(chosen) else None
        return float(np.mean([p.values[statistic] for p in chosen])), baseline

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"model": self.label, "num_images": len(self.images), "random_level": self.random_level,
                                   "baseline_seeds": self.settings["baseline_seeds"]}
        for key in HEADLINE:
            value, baseline = self.headline(key)
            summary[key] = value
            summary[f"{key}_at_init"] = float(baseline.mean) if baseline is not None else None
        return summary

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "images": self.images,
                "random_level": self.random_level, "panels": [panel.summary() for panel in self.panels]}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (matrix, statistic): family, name, kind, layer, statistic, value, at_init_mean,
        at_init_std, random_level (per-image values: the JSON)."""
        rows = []
        for panel in self.panels:
            for statistic, value in panel.values.items():
                baseline = panel.baseline.get(statistic)
                rows.append({"family": self.model["decoder"], "name": panel.name, "kind": panel.kind, "layer": panel.layer,
                             "statistic": statistic, "value": value,
                             "at_init_mean": float(baseline.mean) if baseline is not None else None,
                             "at_init_std": float(baseline.std) if baseline is not None else None,
                             "random_level": self.random_level})
        return rows

    def arrays(self) -> dict[str, np.ndarray]:
        """``<matrix name>``: its Gram (P raw; Q̂ mean over images) and ``<matrix name>/cosines``."""
        return {key: array for p in self.panels for key, array in ((p.name, p.gram), (f"{p.name}/cosines", p.cosines))}

    def figures(self) -> dict[str, Figure]:
        return self.compare_figures([self.label], [self])

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["Orthogonality"]) -> dict[str, Figure]:
        """``orthogonality``: the headline statistics of every model beside their baselines, and the class
        embeddings' |cos|; ``orthogonality_P``: the cosines of every subspace's basis vectors."""
        figures = {cls.name: plots.orthogonality_overview(labels, results)}
        if any(p.kind == "P" for r in results for p in r.panels):
            figures[f"{cls.name}_P"] = plots.subspace_cosines_figure(labels, results)
        return figures


# ------------------------------------------------------------------------------------------ analysis


def fresh_decoder(config: ModelConfig, dim_encoder: int, seed: int, device: torch.device) -> Decoder:
    """A freshly initialised decoder of ``config`` (its init after ``torch.manual_seed(seed)``, on the CPU,
    then moved), in eval mode; the caller's random state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = build_decoder(config.decoder, dim_encoder, config.n_cls)
    return decoder.to(device).eval()


class _ClassStatistics:
    """Per-image Q̂ statistics and the Gram sums of a stream of batches."""

    def __init__(self):
        self.values: dict[str, list[Tensor]] = defaultdict(list)
        self.gram = self.abs_gram = 0.0
        self.count = 0

    def add(self, Q: Tensor) -> None:
        summary = class_summary(Q)
        for key in Q_STATISTICS:
            self.values[key].append(summary[key].cpu())
        self.gram = self.gram + len(Q) * summary["gram"].cpu()
        self.abs_gram = self.abs_gram + len(Q) * summary["abs_gram"].cpu()
        self.count += len(Q)

    def per_image(self) -> dict[str, np.ndarray]:
        return {key: torch.cat(values).numpy() for key, values in self.values.items()}


def _subspace_panel(space: Subspace, fresh: Sequence[Decoder]) -> GramPanel:
    """The P panel of one traced subspace, with the same subspace of each fresh decoder as its baseline."""
    summary, values = p_statistics(space.proj)
    at_init = [p_statistics(_named(decoder, space.name).proj.detach())[1] for decoder in fresh]
    h, p, _ = space.proj.shape
    return GramPanel(space.name, "P", summary["gram"].cpu().numpy(), summary["cosines"].cpu().numpy(), values,
                     baseline=_per_seed(at_init), heads=h, dim_head=p, layer=space.layer,
                     head_orthonormality=summary["head_orthonormality"])


def _final_panel(final: _ClassStatistics, fresh: Sequence[_ClassStatistics]) -> GramPanel:
    """The panel of the final Q̂: per-image statistics, their means, and each fresh decoder's means."""
    per_image = final.per_image()
    at_init = [{key: float(values.mean()) for key, values in statistics.per_image().items()} for statistics in fresh]
    return GramPanel(FINAL_Q, "Q", (final.gram / final.count).numpy(), (final.abs_gram / final.count).numpy(),
                     {key: float(per_image[key].mean()) for key in Q_STATISTICS},
                     per_image={key: Stat(values) for key, values in per_image.items()}, baseline=_per_seed(at_init))


def _learned_panel(class_tokens: Tensor, fresh: Sequence[Decoder]) -> GramPanel:
    """The panel of the learned class queries (K, d), with each fresh decoder's as its baseline."""
    learned = class_summary(class_tokens)
    at_init = [{key: float(class_summary(decoder.class_tokens.detach())[key]) for key in Q_STATISTICS} for decoder in fresh]
    return GramPanel(LEARNED_Q, "Q", learned["gram"].cpu().numpy(), learned["abs_gram"].cpu().numpy(),
                     {key: float(learned[key]) for key in Q_STATISTICS}, baseline=_per_seed(at_init))


def _per_seed(values: list[dict[str, float]]) -> dict[str, Stat]:
    """[{statistic: value} per seed] -> {statistic: Stat over seeds}."""
    return {key: Stat(np.array([v[key] for v in values])) for key in values[0]} if values else {}


def analyze_orthogonality(
    traces: Trace | Iterable[Trace],
    *,
    baseline_seeds: Sequence[int] = (0, 1, 2),
    config: ModelConfig | None = None,
    class_names: Sequence[str] | None = None,
) -> Orthogonality:
    """P and Q panels of one model's traces, with the at-initialisation baseline (see the module docstring).

    ``baseline_seeds``: the seeds of the fresh decoders (empty: no baseline); ``config``: the model's
    config when the traces do not record one (``Trace.config``). ``class_names`` label the class axes
    of the figures (default ``class i``).
    """
    if isinstance(baseline_seeds, (str, bytes)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in baseline_seeds):
        raise ConfigError(f"baseline_seeds must be a sequence of integers, got {baseline_seeds!r}")
    final = _ClassStatistics()
    fresh: list[tuple[Decoder, _ClassStatistics]] = []
    first: dict[str, Any] | None = None  # what the result needs of the first trace (not the trace: memory)
    paths: list[str] = []
    for tr in as_traces(traces):
        if first is None:
            first = {"model": tr.model, "subspaces": tr.subspaces, "class_stages": tr.class_stages,
                     "learned": tr.classes[0][0].clone() if tr.classes else None, "rows": tr.class_embeddings.shape[-2], "d": tr.class_embeddings.shape[-1]}
            if baseline_seeds:
                config = config or _recorded_config(tr)
                z0 = tr.tokens[0]
                fresh = [(fresh_decoder(config, z0.shape[-1], seed, z0.device), _ClassStatistics()) for seed in baseline_seeds]
        final.add(tr.class_embeddings)
        with torch.inference_mode():
            for decoder, statistics in fresh:
                statistics.add(decoder.forward_intermediates(tr.tokens[0], tr.grid).class_embeddings)
        paths += tr.paths or [f"image{len(paths) + b}" for b in range(tr.num_images)]
        del tr  # release this batch before the next is traced
    if first is None:
        raise InputError("no images to analyse")

    decoders = [decoder for decoder, _ in fresh]
    panels = [_subspace_panel(space, decoders) for space in first["subspaces"]]
    panels.append(_final_panel(final, [statistics for _, statistics in fresh]))
    if first["class_stages"][:1] == ["input"]:  # the learned class queries, the same for every image
        panels.append(_learned_panel(first["learned"], decoders))
    d = first["d"]
    settings = {"num_images": len(paths), "baseline_seeds": list(baseline_seeds), "d": d,
                "at_init": "fresh decoders of the same config, one per seed, on the same Z_0"}
    n_cls, rows = first["model"]["n_cls"], first["rows"]
    # the class side of a query decoder (MaskFormer) is its queries, not the K classes
    names = class_labels(class_names, n_cls) if rows == n_cls else [f"query {i}" for i in range(rows)]
    return Orthogonality(
        model=first["model"], settings=settings, images=paths, panels=panels, random_level=random_cosine_level(d),
        class_names=names,
    )


def _recorded_config(tr: Trace) -> ModelConfig:
    if tr.config is None:
        raise ConfigError("the trace records no model config for the at-initialisation baseline; "
                          "pass config= or baseline_seeds=()")
    return ModelConfig.from_dict(tr.config)


def _named(decoder: Decoder, name: str):
    """The subspace ``name`` of a fresh decoder (the same names as the trained one's)."""
    return next(space for space in decoder.subspaces() if space.name == name)
