"""Per-class coding rates and the rate reduction ΔR through the decoder (MCR², Yu et al. 2020; SPEC §3.1 conventions).

Each patch token gets a class: the majority label of its p × p pixels in the ground truth (pixels
labelled 255 ignored; a patch with none left gets no class) or in the model's prediction (``by``;
ties go to the lower class id). For one image's tokens Z_j after decoder layer j (rows, normalised
as the coding-rate analysis does, ``normalize``) and the tokens Z_{j,c} of each class c::

    R(Z_j)     = ½ logdet(I + d/(N ε²) Z_jᵀ Z_j)            over the N tokens that have a class
    R(Z_{j,c}) = ½ logdet(I + d/(N_c ε²) Z_{j,c}ᵀ Z_{j,c})   over the N_c tokens of class c
    ΔR_j       = R(Z_j) − Σ_c (N_c / N) R(Z_{j,c})

(``depict_analysis.coding_rate.coding_rate``: the same ε and normalisation as ``coding-rate``).
ΔR is the rate reduction a white-box decoder is derived to increase: the classes' tokens spread
over the whole space while each class compresses. Every quantity is per image; the result holds
them per image and reports means over images with bootstrap intervals (``uncertainty``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from depict_analysis import plots
from depict_analysis.choices import CLASS_BY
from depict_analysis.coding_rate import coding_rate, normalize_tokens
from depict_analysis.models.data import IGNORE_INDEX
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.parts import Parts, per_batch, require_parts
from depict_analysis.results import Result
from depict_analysis.tracing import Trace, class_labels
from depict_analysis.uncertainty import Bootstrap, Interval, intervals, mean_interval, quiet_nan_mean, warn_sample_size

NORMALIZE = ("l2", "none")  # "crate" normalises inside heads: there are no heads here


def patch_classes(labels: Tensor, patch: int, n_cls: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The majority class of each patch: label maps (B, H, W) -> (B, N) int64, −1 for a patch whose
    pixels are all ignored. The maps are padded (ignored) to a multiple of ``patch`` on the right and
    bottom, as the model pads its input; patches are in row-major order, as the tokens. Ties go to
    the lower class id."""
    B, H, W = labels.shape
    padded = F.pad(labels.long(), (0, -W % patch, 0, -H % patch), value=ignore_index)
    padded = torch.where((padded >= 0) & (padded < n_cls), padded, n_cls)  # ignored pixels -> bin K
    h, w = padded.shape[1] // patch, padded.shape[2] // patch
    cells = padded.view(B, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(B, h * w, patch * patch)
    votes = F.one_hot(cells, n_cls + 1).sum(2)[..., :n_cls]  # (B, N, K)
    return torch.where(votes.sum(-1) > 0, votes.argmax(-1), -1)


def image_class_rates(tokens: Tensor, classes: Tensor, n_cls: int, eps: float, normalize: str) -> dict[str, np.ndarray]:
    """The rates of one image. ``tokens`` (J, N, d) (every layer), ``classes`` (N,) with −1 = none.

    Returns ``total (J,)`` = R(Z_j), ``per_class (K, J)`` = R(Z_{j,c}) (NaN for an absent class),
    ``tokens (K,)`` = N_c and ``delta (J,)`` = ΔR_j, float64 (NaN everywhere when no token has a class).
    """
    J, K = tokens.shape[0], n_cls
    Z = normalize_tokens(tokens, normalize)[:, classes >= 0]  # (J, N, d) float64
    counts = torch.bincount(classes[classes >= 0], minlength=K).cpu().numpy()
    per_class = np.full((K, J), np.nan)
    if Z.shape[1] == 0:
        return {"total": np.full(J, np.nan), "per_class": per_class, "tokens": counts, "delta": np.full(J, np.nan)}
    assigned = classes[classes >= 0]
    for c in np.flatnonzero(counts):
        per_class[c] = coding_rate(Z[:, assigned == c], eps).cpu().numpy()
    total = coding_rate(Z, eps).cpu().numpy()
    weights = counts / counts.sum()
    within = (weights[:, None] * np.nan_to_num(per_class)).sum(0)
    return {"total": total, "per_class": per_class, "tokens": counts, "delta": total - within}


def trace_class_rates(tr: Trace, by: str, eps: float, normalize: str) -> dict[str, np.ndarray]:
    """``image_class_rates`` of every image of a traced batch, stacked: ``total (B, J)``,
    ``per_class (B, K, J)``, ``tokens (B, K)``, ``delta (B, J)``."""
    K = tr.model["n_cls"]
    if by == "ground_truth":
        if tr.labels is None:
            raise InputError("per-class rates by ground truth need labels: images with labels, a dataset, or by='prediction'",
                             arguments=("labels", "images", "dataset", "by='prediction'"))
        maps = tr.labels
    else:
        maps = tr.prediction
    classes = patch_classes(maps.to(tr.tokens[0].device), tr.model["patch_size"], K)
    layers = torch.stack(tr.tokens, dim=1)  # (B, J, N, d)
    per_image = [image_class_rates(layers[b], classes[b], K, eps, normalize) for b in range(len(layers))]
    return {key: np.stack([rates[key] for rates in per_image]) for key in per_image[0]}


@dataclass
class ClassRates(Result):
    """Per-class coding rates and ΔR of one model over n images at J = L + 1 token stages (see the module docstring).

    ``summary()`` keys: ``model`` (variant), ``num_images``, ``by``, ``statistic``, ``layers``; ``rate``,
    ``within``, ``delta_r`` (one interval per token stage: mean over images), ``delta_r_change`` (ΔR at the
    last stage minus at the input, per image, averaged), ``classes`` {name: {images, tokens, rate}}, ``warnings``.
    """

    name: ClassVar[str] = "class_rates"
    model: dict[str, Any]
    settings: dict
    images: list[str]
    layers: list[str]  # the token stages: "input", then the layer names
    class_names: list[str]
    total: np.ndarray  # (n, J) R(Z_j)
    per_class: np.ndarray  # (n, K, J) R(Z_{j,c}), NaN where class c has no token
    tokens: np.ndarray  # (n, K) N_c
    delta: np.ndarray  # (n, J) ΔR_j
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    @property
    def label(self) -> str:
        return self.model["variant"]

    @property
    def within(self) -> np.ndarray:
        """Σ_c (N_c / N) R(Z_{j,c}) per image, (n, J)."""
        return self.total - self.delta

    @property
    def present(self) -> np.ndarray:
        """The classes with tokens in at least one image, (K',) ids."""
        return np.flatnonzero(self.tokens.sum(0))

    def interval(self, per_image: np.ndarray) -> list[Interval]:
        """Mean over images of each stage's value with its interval: (n, J) -> J intervals."""
        return intervals(per_image, self.bootstrap)

    def change(self, per_image: np.ndarray) -> Interval:
        """The change from the decoder input to the last stage, per image then averaged: (n, J) -> Interval."""
        return mean_interval(per_image[:, -1] - per_image[:, 0], self.bootstrap)

    def warnings(self) -> list[str]:
        return warn_sample_size(len(self.images), self.bootstrap.level, what=f"class rates of {self.label}")

    def summary(self) -> dict[str, Any]:
        level = self.bootstrap.level
        classes = {}
        for c in self.present:
            rows = ~np.isnan(self.per_class[:, c, 0])
            classes[self.class_names[c]] = {"images": int(rows.sum()), "tokens": int(self.tokens[:, c].sum()),
                                            "rate": [i.to_json() for i in self.interval(self.per_class[rows, c])]}
        return {
            "model": self.label,
            "num_images": len(self.images),
            "by": self.settings["by"],
            "statistic": f"per image, then mean over the images ({100 * level:g} % bootstrap intervals)",
            "layers": self.layers,
            "rate": [i.to_json() for i in self.interval(self.total)],
            "within": [i.to_json() for i in self.interval(self.within)],
            "delta_r": [i.to_json() for i in self.interval(self.delta)],
            "delta_r_change": self.change(self.delta).to_json(),
            "classes": classes,
            "warnings": self.warnings(),
        }

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "images": self.images, "class_names": self.class_names,
                "summary": self.summary(), "total": self.total, "per_class": self.per_class, "tokens": self.tokens,
                "delta_r": self.delta}

    def rows(self) -> list[dict]:
        """One row per (image, stage, quantity[, class]): quantity rate | within | delta_r | class_rate."""
        rows = []
        for i, image in enumerate(self.images):
            for j, layer in enumerate(self.layers):
                for quantity, values in (("rate", self.total), ("within", self.within), ("delta_r", self.delta)):
                    rows.append({"image": image, "layer": layer, "quantity": quantity, "class": None, "tokens": None,
                                 "value": values[i, j]})
                for c in np.flatnonzero(self.tokens[i]):
                    rows.append({"image": image, "layer": layer, "quantity": "class_rate", "class": self.class_names[c],
                                 "tokens": int(self.tokens[i, c]), "value": self.per_class[i, c, j]})
        return rows

    def panel(self, name: str) -> plots.ClassRatePanel:
        """What ``plots.plot_class_rates`` draws of this model."""
        lines = {"rate": self.interval(self.total), "within": self.interval(self.within), "delta": self.interval(self.delta)}
        present = self.present
        with quiet_nan_mean():
            heat = np.nanmean(self.per_class[:, present], axis=0)  # (K', J)
        images = (~np.isnan(self.per_class[:, present, 0])).sum(0)
        names = [f"{self.class_names[c]} (n = {n})" for c, n in zip(present, images)]
        return plots.ClassRatePanel(name, self.layers, lines, heat, names)

    def figures(self) -> dict[str, Figure]:
        return self.compare_figures([self.label], [self])

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["ClassRates"]) -> dict[str, Figure]:
        """``class_rates``: R(Z_j), the class-weighted rate and ΔR_j per stage (one colour per model) and each
        model's class × stage heatmap."""
        s, first = results[0].settings, results[0]
        caption = (f"{len(first.images)} images, classes by {s['by'].replace('_', ' ')}, ε = {s['eps']:g}, tokens "
                   f"{s['normalize']}-normalised; bands: {100 * first.bootstrap.level:g} % bootstrap intervals")
        panels = [r.panel(f"{label} ({r.model['decoder']})") for label, r in zip(labels, results)]
        return {cls.name: plots.plot_class_rates(panels, plots.model_colours([p.name for p in panels]), caption)}


class ClassRateParts(Parts[ClassRates]):
    """``analyze_class_rates`` in parts (``depict_analysis.parts``): a part holds a batch's rates per image."""

    def __init__(self, by: str = "ground_truth", eps: float = 0.1, normalize: str = "l2",
                 class_names: Sequence[str] | None = None, bootstrap: Bootstrap | None = None):
        super().__init__()
        if by not in CLASS_BY:
            raise ConfigError(f"by must be one of {', '.join(CLASS_BY)}, got {by!r}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE)} (no heads here), got {normalize!r}")
        self.by, self.eps, self.normalize, self.class_names = by, eps, normalize, class_names
        self.bootstrap = bootstrap or Bootstrap()

    def part(self, tr: Trace) -> dict[str, Any]:
        return {"values": trace_class_rates(tr, self.by, self.eps, self.normalize), "paths": self.names(tr),
                "model": tr.model, "token_names": tr.token_names}

    def finish(self, parts: Sequence[dict[str, Any]]) -> ClassRates:
        require_parts(parts)
        first, paths = parts[0], [path for p in parts for path in p["paths"]]
        values = {key: np.concatenate([p["values"][key] for p in parts]) for key in first["values"]}
        names = class_labels(self.class_names, first["model"]["n_cls"])
        settings = {"by": self.by, "eps": self.eps, "normalize": self.normalize, "num_images": len(paths),
                    "tokens": "the residual stream Z_j (j = 0: decoder input)", "unit": "nats",
                    "bootstrap": self.bootstrap.describe()}
        return ClassRates(first["model"], settings, paths, first["token_names"], names, values["total"],
                          values["per_class"], values["tokens"], values["delta"], self.bootstrap)


@per_batch(ClassRateParts)
def analyze_class_rates(
    traces: Trace | Iterable[Trace],
    *,
    by: str = "ground_truth",
    eps: float = 0.1,
    normalize: str = "l2",
    class_names: Sequence[str] | None = None,
    bootstrap: Bootstrap | None = None,
) -> ClassRates:
    """Per-class rates and ΔR of one model's traces (``trace``, ``trace_batches``, ``Trace.load``).

    ``class_names``: K names for the class axes (default ``class i``); ``bootstrap``: the intervals.
    """
    return ClassRateParts(by, eps, normalize, class_names, bootstrap).run(traces)
