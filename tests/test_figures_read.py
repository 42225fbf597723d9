"""Figures that do not mislead: shared axes across models, one colour scale with its bar, σ½ marked
with its interval, legends outside the data, PCA segments counted above a minimum size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from depict_analysis import analyze_attention, analyze_class_rates, analyze_coding_rates, trace
from depict_analysis.inputs import image_batches
from depict_analysis.models.pretrained import load_default
from depict_analysis.pca import MIN_SEGMENT_SHARE, choose_k
from depict_analysis.models.sources import LoadedModel
from depict_analysis.perturbations import resolve_perturbation
from depict_analysis.plots import plot_subspace_rates
from depict_analysis.robustness import run_robustness


def batch(n: int = 3):
    return next(image_batches(64, dataset="synthetic", split="val", num_images=n, batch_size=n)[1])


@pytest.fixture(scope="module")
def traces():
    return {name: trace(load_default(name)[0], batch(), attention=True) for name in ("depict-sa", "depict-ca")}


def bbox(artist, fig):
    return artist.get_window_extent(fig.canvas.get_renderer())


def test_models_compared_in_coding_rate_share_each_columns_y_axis(traces):
    rates = [analyze_coding_rates(t) for t in traces.values()]
    fig = plot_subspace_rates(["SA", "CA"], rates)
    rows = [sub.axes for sub in fig.subfigs]
    assert len(rows) == 2 and len(rows[0]) == len(rows[1]) == 4
    for top, bottom in zip(rows[0], rows[1]):
        assert top.get_ylim() == bottom.get_ylim()
        # and the shared range holds both models' lines (means ± std bands)
        for ax in (top, bottom):
            for line in ax.get_lines():  # the data lines (axvline / axhline use axes coordinates)
                y = np.asarray(line.get_ydata(), dtype=float)
                if line.get_marker() not in (None, "None", ""):
                    assert top.get_ylim()[0] <= y.min() and y.max() <= top.get_ylim()[1]
    plt.close(fig)


def test_attention_maps_of_a_figure_share_one_colour_scale_with_a_colour_bar(traces):
    maps = analyze_attention(traces["depict-ca"], examples=1)
    name = next(n for n in maps.figures() if "msca3" in n)  # the class queries of the last layer
    plt.close("all")
    fig = maps.figures()[name]
    overlays = [image for ax in fig.axes for image in ax.images if image.get_cmap().name == "inferno"]
    assert len(overlays) > 2
    limits = {image.get_clim() for image in overlays}
    assert len(limits) == 1  # one scale for every panel
    low, high = limits.pop()
    assert low == 0 and high == pytest.approx(max(float(np.max(image.get_array())) for image in overlays), rel=1e-6)
    peaks = [float(np.max(image.get_array())) for image in overlays]
    assert min(peaks) < high  # the panels are not each stretched to their own maximum
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "attention weight" in bars[0].get_ylabel()
    plt.close(fig)


def test_robustness_marks_sigma_half_with_its_interval():
    model = load_default("depict-sa")[0]

    def batches_for(side):
        return image_batches(side, dataset="synthetic", split="val", num_images=3, batch_size=3)

    result = run_robustness([LoadedModel.of(model, "SA", "builtin:depict-sa")], batches_for, resolve_perturbation("gaussian", "decoder"),
                            (0, 0.01, 0.1, 1.0), None, draws=1)
    half = result.curve("SA").sigma_half(result.bootstrap.level)
    assert np.isfinite(half.estimate)
    fig = result.figures()["robustness"]
    ax = fig.axes[0]
    ticks = [line for line in ax.get_lines() if line.get_gid() == "sigma_half"]
    assert len(ticks) == 1
    x, y = ticks[0].get_xdata()[0], ticks[0].get_ydata()[0]
    assert x == pytest.approx(half.estimate)
    assert y == pytest.approx(100 * result.curve("SA").mean[0] / 2)  # at half the clean mIoU (%)
    bars = [line for line in ax.get_lines() if list(line.get_ydata()) == [y, y]]
    assert any(line.get_xdata()[0] == pytest.approx(half.low) for line in bars)
    fig.canvas.draw()  # the constrained layout places the legend when drawn
    assert fig.legends and not fig.legends[0].get_window_extent(fig.canvas.get_renderer()).overlaps(bbox(ax, fig))
    plt.close(fig)


def test_class_rates_legend_stays_outside_the_curves(traces):
    rates = analyze_class_rates(traces["depict-sa"])
    fig = rates.figures()["class_rates"]
    fig.canvas.draw()
    left = fig.axes[0]
    assert not left.get_legend()
    (legend,) = fig.legends
    assert not bbox(legend, fig).overlaps(bbox(left, fig))
    plt.close(fig)


def test_pca_counts_only_classes_above_a_minimum_size():
    prediction = torch.zeros(64, 64, dtype=torch.long)
    prediction[:, 32:] = 1
    prediction[:20, :20] = 2
    prediction[0, 0] = 5  # one stray pixel: no segment
    prediction[63, :10] = 6  # 10 pixels, 0.24 % of the image
    assert choose_k(prediction) == 3
    assert choose_k(prediction, min_share=0) == 5
    share = (prediction == 2).float().mean().item()
    assert choose_k(prediction, min_share=share) == 3 and choose_k(prediction, min_share=share + 1e-3) == 2
    assert MIN_SEGMENT_SHARE == 0.01
