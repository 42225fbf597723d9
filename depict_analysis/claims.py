"""Claims and observations judged on numbers with intervals: what ``demo`` and ``report`` conclude.

A ``Finding`` states something about the models, names the statistic and the data it is judged
on, and gives its verdict with the values behind it:

- ``claim``: what the DEPICT paper claims (a white-box decoder's tokens segment better after its
  layers, its class embeddings and subspaces are closer to orthogonal, it keeps its mIoU under
  larger parameter noise);
- ``observation``: something else the numbers show (e.g. "R(Z_j) falls through the layers"),
  which the paper does not claim and which is reported, not judged against it.

A verdict is ``holds`` / ``does not hold`` when the interval of the difference lies on one side of
no difference, ``not decided`` when it straddles it, and also ``not decided`` whenever a model it
involves fails a sanity check (``blockers``: e.g. a model at its class prior, whose numbers mean
nothing). Numbers that are properties of the weights (no images, no noise) have no sampling
interval; they are compared as they are (``exact``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from depict_analysis.foundation.errors import InputError
from depict_analysis.uncertainty import Bootstrap, Interval, decide, mean_replicates, percentile_interval

@dataclass(frozen=True)
class Finding:
    """One claim or observation with its verdict (see the module docstring)."""

    kind: str  # "claim" | "observation"
    statement: str
    statistic: str  # what is compared, and how
    data: str  # the images / noise / weights it is judged on
    verdict: str  # "holds" | "does not hold" | "not decided"
    values: dict[str, Interval]  # each side's value
    difference: Interval | None = None  # A − B (or last − first) with its interval; None when exact
    notes: tuple[str, ...] = field(default_factory=tuple)  # why not decided, caveats

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "statement": self.statement, "statistic": self.statistic, "data": self.data,
                "verdict": self.verdict, "values": {k: v.to_json() for k, v in self.values.items()},
                "difference": self.difference.to_json() if self.difference else None, "notes": list(self.notes)}


def blocked(verdict: str, blockers: list[str]) -> tuple[str, tuple[str, ...]]:
    """A verdict stands unless a model it involves failed a sanity check: then it is not decided."""
    return ("not decided", tuple(blockers)) if blockers else (verdict, ())


def compare_replicates(
    kind: str, statement: str, statistic: str, data: str, better: str, level: float,
    a: tuple[str, float, np.ndarray], b: tuple[str, float, np.ndarray], blockers: list[str] | None = None,
) -> Finding:
    """"A is ``better`` (larger | smaller) than B" from paired bootstrap replicates: ``a``, ``b`` =
    (label, estimate, replicates (R,))."""
    (label_a, value_a, reps_a), (label_b, value_b, reps_b) = a, b
    outcome = decide(value_a, value_b, reps_a, reps_b, better, level)
    verdict, notes = blocked(outcome.verdict, blockers or [])
    values = {label_a: _interval(value_a, reps_a, level), label_b: _interval(value_b, reps_b, level)}
    return Finding(kind, statement, statistic, data, verdict, values, outcome.difference, notes)


def compare_per_image(
    kind: str, statement: str, statistic: str, data: str, better: str, bootstrap: Bootstrap,
    a: tuple[str, np.ndarray], b: tuple[str, np.ndarray], blockers: list[str] | None = None,
) -> Finding:
    """"The mean over images of A is ``better`` than that of B", paired by image: ``a``, ``b`` =
    (label, per-image values (n,)), the same images in the same order."""
    (label_a, per_a), (label_b, per_b) = a, b
    if len(per_a) != len(per_b):
        raise InputError(f"a paired comparison needs the same images on both sides, got {len(per_a)} and {len(per_b)}")
    reps_a, reps_b = mean_replicates(per_a, bootstrap), mean_replicates(per_b, bootstrap)
    return compare_replicates(kind, statement, statistic, data, better, bootstrap.level,
                              (label_a, float(np.nanmean(per_a)), reps_a), (label_b, float(np.nanmean(per_b)), reps_b),
                              blockers)


def compare_exact(
    kind: str, statement: str, statistic: str, data: str, better: str,
    a: tuple[str, float], b: tuple[str, float], blockers: list[str] | None = None,
) -> Finding:
    """"A is ``better`` than B" for numbers without sampling noise (properties of the weights)."""
    (label_a, value_a), (label_b, value_b) = a, b
    wins = value_a > value_b if better == "larger" else value_a < value_b
    verdict = "holds" if wins else "does not hold" if value_a != value_b else "not decided"
    verdict, notes = blocked(verdict, blockers or [])
    values = {label_a: Interval(value_a, value_a, value_a, 1.0), label_b: Interval(value_b, value_b, value_b, 1.0)}
    return Finding(kind, statement, statistic, data, verdict, values, None, ("exact: a property of the weights",) + notes)


def compare_to_sample(
    kind: str, statement: str, statistic: str, data: str, better: str, level: float,
    a: tuple[str, float], sample: tuple[str, np.ndarray], blockers: list[str] | None = None,
) -> Finding:
    """"A is ``better`` than what ``sample`` draws give" (e.g. a trained weight's statistic against
    fresh initialisations): holds when A lies beyond the sample's central ``level`` range on the
    better side, does not hold when beyond it on the other, else not decided."""
    (label_a, value_a), (label_s, values) = a, sample
    values = np.asarray(values, dtype=np.float64)
    range_ = percentile_interval(values, float(values.mean()), level)  # the sample's central range
    low, high = range_.low, range_.high
    if better == "smaller":
        verdict = "holds" if value_a < low else "does not hold" if value_a > high else "not decided"
    else:
        verdict = "holds" if value_a > high else "does not hold" if value_a < low else "not decided"
    verdict, notes = blocked(verdict, blockers or [])
    values_ = {label_a: Interval(value_a, value_a, value_a, 1.0), label_s: range_}
    return Finding(kind, statement, statistic, data, verdict, values_, None,
                   (f"{label_s}: mean [central {100 * level:g} %] of {len(values)} draws",) + notes)


def trend(
    kind: str, statement: str, statistic: str, data: str, better: str, bootstrap: Bootstrap,
    first: tuple[str, np.ndarray], last: tuple[str, np.ndarray], blockers: list[str] | None = None,
) -> Finding:
    """"``last`` is ``better`` than ``first``" for one model's per-image values at two stages: the
    same as ``compare_per_image``, with the difference last − first."""
    return compare_per_image(kind, statement, statistic, data, better, bootstrap, last, first, blockers)


def _interval(estimate: float, replicates: np.ndarray, level: float) -> Interval:
    return percentile_interval(replicates, estimate, level) if len(replicates) else Interval(estimate, math.nan, math.nan, level)
