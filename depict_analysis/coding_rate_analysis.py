"""The coding-rate analysis (SPEC §3.1): every rate of a model's traces, per image, named by layer.

``analyze_coding_rates(traces)`` reads ``Trace``s (one, ``Trace.load(path)``, or a stream,
``trace_batches(model, batches)``) and returns ``CodingRates``: for the token stages j = 0..L
(``token_names``: "input", "mssa1", ...) and every subspace P_l the decoder owns (by name):

- ``token_rate``     R(Z_j) of the patch tokens, m = d;
- ``subspace_rate``  R(P_lᵀ X_j), m = h·p, P as the layer uses it (raw; ``orthonormalize``: each head's
                     basis orthonormalised);
- ``raw_ratio``      R(P_lᵀ X_j) / R(X_j): includes P's row norms and head overlap, may exceed 1; **not a share**;
- ``span_rate``      R(U_lᵀ X_j), U_l an orthonormal basis of span(P_l) (all heads), m = its rank;
- ``share``          R(U_lᵀ X_j) / R(X_j) ≤ 1: the share of the rate that lies in the subspace;
- ``crate_rate``     R^c(X_j) = Σ_k R(P_{l,k}ᵀ X_j), CRATE's per-head convention (unit norm in each head);
- ``head_rate``      R(P_{l,k}ᵀ X_j) per head (``per_head``);
- ``class_rate``     R(Q) of the class embeddings at each class stage, then the final Q̂ ("final").

X_j is what the subspace is applied to (``view``): ``"residual"``, the residual stream Z_j itself, or
``"layer"``, what layer l projects, its LayerNorm applied to Z_j (``Subspace.layer_input``, as
CRATE's tools hook the projection's input); in that view ``input_rate`` holds R(X_j) per subspace.
Every quantity is a ``Stat`` over images (rates in nats, std with ddof = 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure

from depict_analysis import plots
from depict_analysis.choices import VIEWS
from depict_analysis.coding_rate import NORMALIZE_MODES, RateTable, class_rate, rate_table
from depict_analysis.foundation.errors import ConfigError
from depict_analysis.parts import Parts, per_batch, require_parts
from depict_analysis.results import Result, Stat
from depict_analysis.tracing import Trace

FINAL_STAGE = "final"
SUBSPACE_QUANTITIES = ("subspace_rate", "raw_ratio", "span_rate", "share", "crate_rate", "input_rate")  # (n, J) each


@dataclass
class SubspaceInfo:
    """One subspace P_l: its layer's name, the token stage j its layer produces (None: it updates the
    class embeddings only), its heads h × width p and dim span(P_l)."""

    name: str
    layer: int | None
    heads: int
    dim_head: int
    rank: int


@dataclass
class CodingRates(Result):
    """Coding rates of one model over n images (see the module docstring for each quantity).

    Per-subspace quantities are ``{subspace name: Stat (n, J)}`` (``head_rate``: (n, h, J)); the J axis
    is ``token_names``, the T axis of ``class_rate (n, T)`` is ``class_stages``.

    ``summary()`` keys: ``model`` (variant), ``view``, ``num_images``; ``token_rate`` {token name: mean};
    ``class_rate`` {stage: mean}; ``share``, ``raw_ratio``, ``crate_rate``, ``subspace_rate``
    {subspace: {token name: mean}}.
    """

    name: ClassVar[str] = "coding_rate"

    model: dict[str, Any]
    settings: dict[str, Any]
    images: list[str]
    token_names: list[str]
    subspaces: list[SubspaceInfo]
    class_stages: list[str]
    token_rate: Stat
    class_rate: Stat
    subspace_rate: dict[str, Stat]
    raw_ratio: dict[str, Stat]
    span_rate: dict[str, Stat]
    share: dict[str, Stat]
    crate_rate: dict[str, Stat]
    input_rate: dict[str, Stat] = field(default_factory=dict)  # "layer" view only: R(X_j) per subspace
    head_rate: dict[str, Stat] = field(default_factory=dict)  # per_head only

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def label(self) -> str:
        return self.model["variant"]

    def summary(self) -> dict[str, Any]:
        by_token = lambda stat: dict(zip(self.token_names, stat.mean.tolist()))  # noqa: E731
        return {
            "model": self.label,
            "view": self.settings["view"],
            "num_images": self.num_images,
            "token_rate": by_token(self.token_rate),
            "class_rate": dict(zip(self.class_stages, self.class_rate.mean.tolist())),
            **{key: {name: by_token(stat) for name, stat in getattr(self, key).items()}
               for key in ("share", "raw_ratio", "crate_rate", "subspace_rate")},
        }

    def to_json(self) -> dict[str, Any]:
        stats = lambda by_name: {name: stat.to_json() for name, stat in by_name.items()}  # noqa: E731
        quantities = {key: stats(getattr(self, key)) for key in SUBSPACE_QUANTITIES if getattr(self, key)}
        return {
            "model": self.model,
            "settings": self.settings,
            "images": self.images,
            "layers": list(range(len(self.token_names))),
            "token_names": self.token_names,
            "subspaces": [asdict(space) for space in self.subspaces],
            "token_rate": self.token_rate.to_json(),
            **quantities,
            **({"head_rate": stats(self.head_rate)} if self.head_rate else {}),
            "class_rate": {"stages": self.class_stages, **self.class_rate.to_json()},
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per (image, quantity, subspace[, head], token stage or class stage): columns image,
        quantity, subspace, head, layer (j), layer_name, stage, value; the ones that do not apply empty."""
        rows: list[dict[str, Any]] = []

        def add(i: int, quantity: str, values: np.ndarray, subspace=None, head=None) -> None:
            for j, (name, value) in enumerate(zip(self.token_names, values)):
                rows.append({"image": self.images[i], "quantity": quantity, "subspace": subspace, "head": head,
                             "layer": j, "layer_name": name, "stage": None, "value": float(value)})

        for i in range(self.num_images):
            add(i, "token_rate", self.token_rate.per_image[i])
            for space in self.subspaces:
                for key in SUBSPACE_QUANTITIES:
                    if space.name in getattr(self, key):
                        add(i, key, getattr(self, key)[space.name].per_image[i], space.name)
                for k, values in enumerate(self.head_rate[space.name].per_image[i] if self.head_rate else []):
                    add(i, "head_rate", values, space.name, k)
            for stage, value in zip(self.class_stages, self.class_rate.per_image[i]):
                rows.append({"image": self.images[i], "quantity": "class_rate", "subspace": None, "head": None,
                             "layer": None, "layer_name": None, "stage": stage, "value": float(value)})
        return rows

    def figures(self) -> dict[str, Figure]:
        return self.compare_figures([self.label], [self])

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["CodingRates"]) -> dict[str, Figure]:
        """``coding_rate``: the subspace rates and both ratios per model; ``coding_rate_tokens``: R(Z_j) and R(Q)."""
        return {"coding_rate": plots.plot_subspace_rates(labels, results),
                "coding_rate_tokens": plots.plot_token_class_rates(labels, results)}


def _check_settings(eps: float, normalize: str, view: str) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")


def trace_rates(tr: Trace, eps: float, normalize: str, orthonormalize: bool, view: str) -> tuple[RateTable, torch.Tensor]:
    """The ``RateTable`` of one trace's tokens and subspaces, and R(Q) (B, T) at its class stages then Q̂."""
    views = {space.name: space.layer_input for space in tr.subspaces} if view == "layer" else None
    table = rate_table(dict(zip(tr.token_names, tr.tokens)), {s.name: s.proj for s in tr.subspaces},
                       eps, normalize, orthonormalize, views)
    classes = torch.stack([class_rate(Q, eps, normalize) for Q in [*tr.classes, tr.class_embeddings]], dim=1)
    return table, classes


class CodingRateParts(Parts[CodingRates]):
    """``analyze_coding_rates`` in parts (``depict_analysis.parts``): a part holds a batch's rates per image."""

    def __init__(self, eps: float = 0.1, normalize: str = "l2", orthonormalize: bool = False, view: str = "residual",
                 per_head: bool = False):
        super().__init__()
        _check_settings(eps, normalize, view)
        self.eps, self.normalize, self.orthonormalize, self.view, self.per_head = eps, normalize, orthonormalize, view, per_head

    def part(self, tr: Trace) -> dict[str, Any]:
        table, classes = trace_rates(tr, self.eps, self.normalize, self.orthonormalize, self.view)
        values = {"token_rate": table.token_rate.cpu().numpy(), "class_rate": classes.cpu().numpy()}
        for name, rates in table.subspaces.items():
            for key in (*SUBSPACE_QUANTITIES, "head_rate"):
                values[f"{key}/{name}"] = getattr(rates, key).cpu().numpy()
        return {"values": values, "paths": self.names(tr), "model": tr.model, "token_names": tr.token_names,
                "class_stages": tr.class_stages, "image_size": list(tr.image_size), "device": str(tr.masks.device),
                "subspaces": [SubspaceInfo(s.name, s.layer, s.proj.shape[0], s.proj.shape[1], table.subspaces[s.name].rank)
                              for s in tr.subspaces]}

    def finish(self, parts: Sequence[dict[str, Any]]) -> CodingRates:
        require_parts(parts)
        first, paths = parts[0], [path for p in parts for path in p["paths"]]
        stat = lambda key: Stat(np.concatenate([p["values"][key] for p in parts]))  # noqa: E731
        by_name = lambda key: {s.name: stat(f"{key}/{s.name}") for s in first["subspaces"]}  # noqa: E731
        settings = {
            "eps": self.eps, "normalize": self.normalize, "orthonormalize": self.orthonormalize, "view": self.view,
            "per_head": self.per_head, "num_images": len(paths), "image_size": first["image_size"],
            "device": first["device"], "std": "over images, ddof = 0", "unit": "nats",
        }
        return CodingRates(
            model=first["model"],
            settings=settings,
            images=paths,
            token_names=first["token_names"],
            subspaces=first["subspaces"],
            class_stages=[*first["class_stages"], FINAL_STAGE],
            token_rate=stat("token_rate"),
            class_rate=stat("class_rate"),
            subspace_rate=by_name("subspace_rate"),
            raw_ratio=by_name("raw_ratio"),
            span_rate=by_name("span_rate"),
            share=by_name("share"),
            crate_rate=by_name("crate_rate"),
            input_rate=by_name("input_rate") if self.view == "layer" else {},
            head_rate=by_name("head_rate") if self.per_head else {},
        )


@per_batch(CodingRateParts)
def analyze_coding_rates(
    traces: Trace | Iterable[Trace],
    *,
    eps: float = 0.1,
    normalize: str = "l2",
    orthonormalize: bool = False,
    view: str = "residual",
    per_head: bool = False,
) -> CodingRates:
    """Coding rates of the traced tokens and class embeddings, per image (see the module docstring).

    ``traces``: of one model, any number of images each (one image size per trace). The rates are
    computed in float64 on the traces' device. ``per_head`` also keeps every head's rate.
    """
    return CodingRateParts(eps, normalize, orthonormalize, view, per_head).run(traces)
