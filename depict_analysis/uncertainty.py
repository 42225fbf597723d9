"""Confidence intervals and verdicts by the bootstrap: how sure a headline number or a comparison is.

Every interval here is a percentile bootstrap (Efron & Tibshirani, ch. 13): resample the images
with replacement ``resamples`` times, recompute the statistic on each resample, and take the
(1 − level)/2 and (1 + level)/2 quantiles of the replicates. Where a number also depends on
random noise draws (robustness), the draws are resampled too, independently of the images.

- A mean over images: ``mean_interval(per_image)``.
- A dataset-level statistic such as mIoU, which is not a mean of per-image values: resample the
  images' confusion counts and recompute (``miou_replicates``).
- A comparison "A > B": the replicates of A and B are paired (the same image resample for both:
  ``image_resamples`` depends on the seed and the number of images only), and the verdict is read
  off the replicates of the difference (``decide``): ``holds`` when the interval lies on A's side,
  ``does not hold`` when it lies on the other, ``not decided`` when it straddles no difference.

Resamples are seeded from (seed, what is resampled) by a stable hash, so an interval does not
depend on the order in which intervals are computed. ``warn_sample_size`` says when there are too
few images or draws for the interval asked for.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from depict_analysis.foundation.errors import ConfigError

RESAMPLES = 1000
LEVEL = 0.95
VERDICTS = ("holds", "does not hold", "not decided")
METHOD = "percentile bootstrap over images"


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are taken: ``resamples`` bootstrap resamples, coverage ``level``, ``seed``."""

    resamples: int = RESAMPLES
    level: float = LEVEL
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.level < 1:
            raise ConfigError(f"the confidence level must lie strictly between 0 and 1, got {self.level!r}")
        if self.resamples < 1:
            raise ConfigError(f"the bootstrap needs at least one resample, got {self.resamples!r}")

    def rng(self, *key: Any) -> np.random.Generator:
        """A generator seeded from (seed, key) alone (sha256, not Python's salted hash)."""
        text = "|".join(map(str, (self.seed, *key))).encode()
        return np.random.default_rng(int.from_bytes(hashlib.sha256(text).digest()[:8], "little"))

    def describe(self) -> dict[str, Any]:
        return {"method": METHOD, "resamples": self.resamples, "level": self.level, "seed": self.seed}


@dataclass(frozen=True)
class Interval:
    """A number with its confidence interval [low, high]; ``low``/``high`` may be ±inf (σ½ beyond the grid)."""

    estimate: float
    low: float
    high: float
    level: float

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def text(self, scale: float = 1.0, digits: int = 3) -> str:
        """``"0.3 [0.27, 0.33]"``, every number times ``scale``, ``digits`` significant digits; an exact
        value (low = high = estimate) without brackets."""
        def show(x: float) -> str:
            if x is None or (isinstance(x, float) and math.isnan(x)):
                return "—"
            if math.isinf(x):
                return "∞" if x > 0 else "−∞"
            return f"{x * scale:.{digits}g}"

        if self.low == self.high == self.estimate:
            return show(self.estimate)
        return f"{show(self.estimate)} [{show(self.low)}, {show(self.high)}]"


def percentile_interval(replicates: np.ndarray, estimate: float, level: float) -> Interval:
    """The percentile interval of bootstrap ``replicates`` (R,): the order statistics at (1 − level)/2
    and (1 + level)/2, rounded outwards (NaN replicates are left out)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Interval(float(estimate), math.nan, math.nan, level)
    tail = (1 - level) / 2
    # Order statistics, rounded outwards (no interpolation: replicates may be infinite).
    low, high = np.quantile(values, tail, method="lower"), np.quantile(values, 1 - tail, method="higher")
    return Interval(float(estimate), float(low), float(high), level)


def image_resamples(n: int, bootstrap: Bootstrap) -> np.ndarray:
    """Image indices (resamples, n) drawn with replacement; the same for every statistic on n images."""
    if n < 1:
        raise ConfigError("a bootstrap needs at least one image")
    return bootstrap.rng("images", n).integers(0, n, size=(bootstrap.resamples, n))


def draw_resamples(draws: int, bootstrap: Bootstrap, *key: Any) -> np.ndarray:
    """Draw indices (resamples, draws) drawn with replacement, seeded from ``key`` (e.g. model and σ)."""
    return bootstrap.rng("draws", draws, *key).integers(0, draws, size=(bootstrap.resamples, draws))


def mean_replicates(per_image: np.ndarray, bootstrap: Bootstrap) -> np.ndarray:
    """Bootstrap replicates (resamples, ...) of the NaN-mean over images of ``per_image`` (n, ...)."""
    values = np.asarray(per_image, dtype=np.float64)
    resampled = values[image_resamples(len(values), bootstrap)]  # (R, n, ...)
    with np.errstate(invalid="ignore"), quiet_nan_mean():
        return np.nanmean(resampled, axis=1)


def mean_interval(per_image: np.ndarray, bootstrap: Bootstrap) -> Interval:
    """The NaN-mean over images of ``per_image`` (n,) with its bootstrap interval."""
    values = np.asarray(per_image, dtype=np.float64)
    with quiet_nan_mean():
        estimate = float(np.nanmean(values))
    return percentile_interval(mean_replicates(values, bootstrap), estimate, bootstrap.level)


def intervals(per_image: np.ndarray, bootstrap: Bootstrap) -> list:
    """``mean_interval`` of every column of ``per_image`` (n, *shape), as nested lists of ``Interval`` of that shape."""
    values = np.asarray(per_image, dtype=np.float64)
    with quiet_nan_mean():
        estimates = np.nanmean(values, axis=0)
    replicates = mean_replicates(values, bootstrap)  # (R, *shape)

    def build(index: tuple) -> Any:
        if len(index) == values.ndim - 1:
            return percentile_interval(replicates[(slice(None), *index)], float(estimates[index]), bootstrap.level)
        return [build((*index, i)) for i in range(values.shape[len(index) + 1])]

    return build(())


# ----------------------------------------------------------------------------------------- mIoU


def miou_from_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU of summed per-class counts ``(..., 3, K)`` = (true positives, label pixels, predicted pixels).

    ``iou[c] = TP / (label + predicted − TP)``; classes with an empty union (neither labelled nor
    predicted) are left out of the mean, as ``models.evaluate.miou`` does. Returns ``(...)`` float64.
    """
    counts = np.asarray(counts, dtype=np.float64)
    tp, label, predicted = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = label + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"), quiet_nan_mean():
        return np.nanmean(np.where(union > 0, tp / union, np.nan), axis=-1)


def miou_replicates(per_image_counts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """mIoU of each image resample: ``per_image_counts (n, 3, K)``, ``images (R, n)`` indices -> (R,)."""
    return miou_from_counts(per_image_counts[images].sum(axis=1))


def class_prior_miou(label_counts: np.ndarray) -> np.ndarray:
    """The mIoU of predicting the most frequent label everywhere, from label pixels per class (..., K) -> (...).

    That class's IoU is its share of the labelled pixels; every other labelled class scores 0, and
    classes never labelled are left out (NaN without any labelled pixel).
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    total, present = counts.sum(-1), (counts > 0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts.max(-1) / total / present, np.nan)


# -------------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """The outcome of "A is larger (or smaller) than B" on paired replicates, with the difference A − B."""

    verdict: str  # one of VERDICTS
    difference: Interval  # A − B with its interval
    share: float  # the share of replicates on A's side (A > B for "larger")

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "difference": self.difference.to_json(), "share": self.share}


def decide(a: float, b: float, a_replicates: np.ndarray, b_replicates: np.ndarray, better: str, level: float) -> Verdict:
    """Whether A is ``better`` (``"larger"`` | ``"smaller"``) than B, from paired bootstrap replicates (R,).

    ``holds`` when at least (1 + level)/2 of the replicates put A on the better side (the interval of
    A − B excludes 0 there), ``does not hold`` when as many put it on the other side, else
    ``not decided``. Infinite replicates (σ½ beyond the grid) compare as numbers; a NaN pair counts
    for neither side. The difference interval is taken over the finite differences.
    """
    if better not in ("larger", "smaller"):
        raise ConfigError(f"better must be 'larger' or 'smaller', got {better!r}")
    a_rep, b_rep = np.asarray(a_replicates, dtype=np.float64), np.asarray(b_replicates, dtype=np.float64)
    sign = 1.0 if better == "larger" else -1.0
    wins = float(np.mean(sign * a_rep > sign * b_rep))
    losses = float(np.mean(sign * a_rep < sign * b_rep))
    need = (1 + level) / 2
    verdict = "holds" if wins >= need else "does not hold" if losses >= need else "not decided"
    with np.errstate(invalid="ignore"):
        diff, estimate = a_rep - b_rep, float(np.float64(a) - np.float64(b))
    return Verdict(verdict, percentile_interval(diff[np.isfinite(diff)], estimate, level), wins)


def warn_sample_size(images: int, level: float, draws: int | None = None, what: str = "") -> list[str]:
    """Warnings when ``images`` (and noise ``draws``, where the numbers have draws) are too few for
    an interval at ``level``: fewer than 2/(1 − level) images leaves less than one image in each
    tail of the interval; one draw cannot show draw-to-draw variation, and under 3 it is barely seen."""
    about = f"{what}: " if what else ""
    found = []
    needed = math.ceil(2 / (1 - level) - 1e-9)
    if images < needed:
        found.append(f"{about}{images} images are too few for {100 * level:g} % intervals (at least {needed}): "
                        "the intervals are too narrow to trust")
    if draws is not None and draws < 3:
        found.append(f"{about}{draws} noise draw{'s' if draws > 1 else ''} per σ: the intervals "
                        f"{'ignore' if draws == 1 else 'barely see'} the variation between draws (use --draws 3 or more)")
    return found


@contextmanager
def quiet_nan_mean() -> Iterator[None]:
    """Silence numpy's "Mean of empty slice": a class absent from every resampled image is NaN, as meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        yield
