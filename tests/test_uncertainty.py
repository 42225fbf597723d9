"""Bootstrap intervals and verdicts (``depict_analysis.uncertainty``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.uncertainty import (
    Bootstrap,
    Interval,
    class_prior_miou,
    decide,
    draw_resamples,
    image_resamples,
    intervals,
    mean_interval,
    miou_from_counts,
    percentile_interval,
    warn_sample_size,
)


def test_mean_interval_is_the_percentile_interval_of_resampled_means():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=50)
    bootstrap = Bootstrap(resamples=400, level=0.9, seed=7)
    interval = mean_interval(values, bootstrap)
    means = np.sort([values[pick].mean() for pick in image_resamples(50, bootstrap)])
    # order statistics rounded outwards: the 5 % and 95 % of 400 sorted replicates
    assert interval == Interval(values.mean(), means[math.floor(0.05 * 399)], means[math.ceil(0.95 * 399)], 0.9)
    # and about the width the normal approximation gives: 2 · 1.645 · s / √n
    assert interval.high - interval.low == pytest.approx(2 * 1.645 * values.std() / math.sqrt(50), rel=0.15)


def test_intervals_per_column_and_nan_images_left_out():
    values = np.array([[1.0, np.nan], [2.0, 4.0], [3.0, 6.0]])
    (first, second) = intervals(values, Bootstrap(resamples=100))
    assert first.estimate == 2.0 and second.estimate == 5.0
    assert 1.0 <= first.low <= first.high <= 3.0 and 4.0 <= second.low <= second.high <= 6.0


def test_resamples_are_seeded_by_what_they_resample_alone():
    b = Bootstrap(resamples=20, seed=1)
    assert np.array_equal(image_resamples(10, b), image_resamples(10, b))
    assert not np.array_equal(image_resamples(10, b), image_resamples(10, Bootstrap(resamples=20, seed=2)))
    assert np.array_equal(draw_resamples(3, b, "m", 0.1), draw_resamples(3, b, "m", 0.1))
    assert not np.array_equal(draw_resamples(3, b, "m", 0.1), draw_resamples(3, b, "n", 0.1))
    with pytest.raises(ConfigError, match="level"):
        Bootstrap(level=1.0)


def test_infinite_replicates_give_an_infinite_bound():
    interval = percentile_interval(np.array([0.1, 0.2, np.inf, np.inf, np.nan]), 0.2, 0.5)
    assert interval.low == pytest.approx(0.1) and interval.high == math.inf
    assert Interval(0.2, 0.1, math.inf, 0.95).text() == "0.2 [0.1, ∞]"


def test_decide_reads_the_verdict_off_paired_replicates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=1000)
    assert decide(1.0, 0.0, base + 1.0, base, "larger", 0.95).verdict == "holds"  # paired: the difference is exactly 1
    assert decide(0.0, 1.0, base, base + 1.0, "larger", 0.95).verdict == "does not hold"
    assert decide(0.0, 1.0, base, base + 1.0, "smaller", 0.95).verdict == "holds"
    noisy = decide(0.1, 0.0, base + 0.1 + rng.normal(size=1000), base, "larger", 0.95)
    assert noisy.verdict == "not decided" and noisy.difference.low < 0 < noisy.difference.high
    # σ½ beyond the grid (inf) beats any finite σ½
    assert decide(math.inf, 0.1, np.full(100, math.inf), np.full(100, 0.1), "larger", 0.95).verdict == "holds"


def test_miou_from_counts_and_the_class_prior():
    # two classes: tp, label, predicted
    counts = np.array([[8, 1], [10, 2], [9, 3]])
    assert miou_from_counts(counts) == pytest.approx((8 / 11 + 1 / 4) / 2)
    absent = np.array([[8, 0], [10, 0], [10, 0]])  # class 1 neither labelled nor predicted: left out
    assert miou_from_counts(absent) == pytest.approx(8 / 12)
    assert class_prior_miou(np.array([70, 20, 10, 0])) == pytest.approx(0.7 / 3)
    assert class_prior_miou(np.array([[70, 20, 10, 0], [0, 5, 5, 0]])) == pytest.approx([0.7 / 3, 0.5 / 2])


def test_sample_size_warnings_depend_on_the_level():
    assert warn_sample_size(40, 0.95) == [] and len(warn_sample_size(39, 0.95)) == 1
    assert warn_sample_size(20, 0.9) == [] and "200" in warn_sample_size(64, 0.99)[0]
    assert "ignore" in warn_sample_size(64, 0.95, draws=1)[0] and warn_sample_size(64, 0.95, draws=3) == []
