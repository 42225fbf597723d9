"""One function per figure: data in, ``matplotlib.figure.Figure`` out (written by ``outputs.save_figure``).

Figures are sized for a paper column or page and share one seaborn style, set for the duration of
each plotting call (``styled``): importing this module changes no global matplotlib state.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler

LINE_COLORS = sns.color_palette("colorblind")


def model_colours(labels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per model of a run, by its position in the run's model list: the same model has the
    same colour in every figure of the run (colour-blind-safe palette, cycled past 10 models)."""
    return {label: LINE_COLORS[i % len(LINE_COLORS)] for i, label in enumerate(dict.fromkeys(labels))}


def styled(plot: Callable[..., plt.Figure]) -> Callable[..., plt.Figure]:
    """Run a figure function inside the project's seaborn style (paper context, white grid)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs) -> plt.Figure:
        theme = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.1),
                 "axes.prop_cycle": cycler(color=sns.color_palette("deep"))}
        with plt.rc_context(theme):
            return plot(*args, **kwargs)

    return wrapper


def palette_image(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) of ids -> RGB (H, W, 3) uint8; ids beyond the palette (e.g. 255) are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette[:256]
    return lut[np.asarray(labels).clip(0, 255)]


# ------------------------------------------------------------------------ coding rate (SPEC §3.1)

LAYER_AXIS_LABEL = r"decoder layer $j$  (0 = input $Z_0$)"


def _band(ax: plt.Axes, x: np.ndarray, mean: np.ndarray, std: np.ndarray, color, **line) -> matplotlib.lines.Line2D:
    """A mean line over a ±std band of the same colour; returns the line (for legends)."""
    mean, std = np.asarray(mean), np.asarray(std)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
    return ax.plot(x, mean, color=color, markersize=4, **line)[0]


def _rate_caption(result: dict) -> str:
    s = result["settings"]
    basis = ", orthonormalised $P$" if s["orthonormalize"] else ""
    return (
        f"{s['model']['variant']} ({s['model']['decoder']}): mean ± std over {s['num_images']} images, "
        f"ε = {s['eps']:g}, token normalisation: {s['normalize']}{basis}"
    )


def _legend_row_major(fig: plt.Figure, handles: list, max_columns: int = 4) -> None:
    """A legend below the axes whose entries read left to right (matplotlib fills columns first)."""
    ncol = min(len(handles), max_columns)
    nrows = -(-len(handles) // ncol)
    ordered = [handles[i] for c in range(ncol) for i in range(c, nrows * ncol, ncol) if i < len(handles)]
    fig.legend(handles=ordered, loc="outside lower center", ncol=ncol, frameon=False)


@styled
def plot_subspace_rates(result: dict) -> plt.Figure:
    """The paper's coding-rate figure, from an ``analyze_coding_rates`` result.

    Left: R(P_lᵀ Z_j) against the decoder layer j, one line per subspace l (mean ± std band) and a
    dashed vertical line of the same colour at the layer that owns P_l; subspaces that update only
    the class embeddings (DEPICT-CA's MSCA) are dotted and have no such line. Right: the ratio
    R(P_lᵀ Z_j) / R(Z_j).
    """
    layers = np.asarray(result["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2), sharex=True, layout="constrained")
    owned, unowned = [], []
    for s, space in enumerate(result["subspaces"]):
        color = LINE_COLORS[s % len(LINE_COLORS)]
        is_owned = space["layer"] is not None
        style = {"marker": "o", "linestyle": "-"} if is_owned else {"marker": "s", "linestyle": ":"}
        for ax, key in zip(axes, ("subspace_rate", "ratio")):
            line = _band(ax, layers, result[key]["mean"][s], result[key]["std"][s], color, label=space["name"], **style)
            if is_owned:
                ax.axvline(space["layer"], color=color, linestyle="--", linewidth=1.0, alpha=0.7)
        (owned if is_owned else unowned).append(line)
    def key(**style) -> matplotlib.lines.Line2D:  # a legend entry explaining a line style
        return matplotlib.lines.Line2D([], [], color="0.35", linewidth=1.0, markersize=4, **style)

    if owned:
        owned.append(key(linestyle="--", label=r"layer that owns $P_\ell$"))
    if unowned:
        unowned.append(key(linestyle=":", marker="s", label="updates $Q$ only: no owner layer"))
    axes[0].set(title="Rate in each layer's subspace", ylabel=r"$R(P_\ell^\top Z_j)$  (nats)")
    axes[1].set(title="Relative to the rate in $\\mathbb{R}^d$", ylabel=r"$R(P_\ell^\top Z_j)\ /\ R(Z_j)$  (ratio)")
    for ax in axes:
        ax.set(xticks=layers, xlabel=LAYER_AXIS_LABEL)
    if owned or unowned:
        _legend_row_major(fig, owned + unowned)
    fig.suptitle(_rate_caption(result), fontsize="small")
    return fig


@styled
def plot_token_class_rates(result: dict) -> plt.Figure:
    """R(Z_j) against the decoder layer j (left); R(Q) at each class stage, then the final Q̂ (right).

    Both from an ``analyze_coding_rates`` result, as mean ± std over images.
    """
    layers = np.asarray(result["layers"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0), layout="constrained")
    tokens = result["token_rate"]
    _band(left, layers, tokens["mean"], tokens["std"], LINE_COLORS[0], marker="o")
    left.set(xticks=layers, title="Patch tokens $Z_j$", xlabel=LAYER_AXIS_LABEL, ylabel="$R(Z_j)$  (nats)")

    classes = result["class_rate"]
    x, color = np.arange(len(classes["stages"])), LINE_COLORS[1]
    _band(right, x[:-1], classes["mean"][:-1], classes["std"][:-1], color, marker="o")
    right.errorbar(x[-1], classes["mean"][-1], yerr=classes["std"][-1], color=color, marker="D", capsize=3)
    right.set_xticks(x, [*classes["stages"][:-1], r"final $\hat{Q}$"], rotation=30 if len(x) > 6 else 0)
    right.set(xlim=(-0.5, len(x) - 0.5), title="Class embeddings $Q$", xlabel="stage (after layer)")
    right.set_ylabel("$R(Q)$  (nats)")
    fig.suptitle(_rate_caption(result), fontsize="small")
    return fig


# ----------------------------------------------------------------- per-class rates and ΔR


@styled
def plot_class_rates(
    layers: Sequence[str], bands: dict[str, list], per_class: np.ndarray, class_names: Sequence[str], caption: str
) -> plt.Figure:
    """Left: each of ``bands`` (legend text -> one ``Interval`` per layer) against the token stage,
    mean with its interval band. Right: ``per_class`` (K', J) mean rate of each class (rows, named
    ``class_names``) at each stage, as a heatmap with the values written in."""
    x = np.arange(len(layers))
    height = max(3.2, 0.32 * len(class_names) + 1.4)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, height), layout="constrained", width_ratios=(1, 1.15))
    for color, (name, values) in zip(LINE_COLORS, bands.items()):
        low, high = [v.low for v in values], [v.high for v in values]
        left.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
        left.plot(x, [v.estimate for v in values], color=color, marker="o", markersize=4, label=name)
    left.set_xticks(x, layers, rotation=30 if len(x) > 5 else 0)
    left.set(xlabel="token stage (after layer)", ylabel="nats", title="Rate, class-weighted rate, rate reduction")
    left.legend(loc="best", frameon=True, fontsize="small")
    image = right.imshow(per_class, aspect="auto", cmap="viridis")
    right.set_xticks(x, layers, rotation=30 if len(x) > 5 else 0)
    right.set_yticks(np.arange(len(class_names)), class_names)
    right.grid(False)
    if per_class.size <= 200:
        middle = np.nanmean(per_class) if np.isfinite(per_class).any() else 0.0
        for (r, c), value in np.ndenumerate(per_class):
            if np.isfinite(value):
                right.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                           color="black" if value > middle else "white")
    right.set(xlabel="token stage (after layer)", title="$R(Z_{j,c})$ per class (n: images with the class)")
    fig.colorbar(image, ax=right, label="nats", shrink=0.85)
    fig.suptitle(caption, fontsize="small")
    return fig


# ------------------------------------------------------------------------------- attention maps


def upsample_map(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map on the patch grid (gh, gw) -> (H, W), bilinear (the grid cells' centres at the patch centres)."""
    import torch  # plots stay importable without it; attention figures come from traced models anyway

    values = torch.from_numpy(np.ascontiguousarray(grid_map, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(values, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@styled
def attention_figure(
    image: np.ndarray, columns: list[tuple[str, np.ndarray]], heads: Sequence[int], marker: Sequence[int] | None, title: str
) -> plt.Figure:
    """One row per head: the image, then each query's map over it (bilinear, ``inferno``, each panel
    scaled to its own maximum, shown as "max …").

    image: (H, W, 3) in [0, 1]; columns: (title, maps (h, gh, gw)) per query, e.g. a class name and
    its query's maps; marker: the queried pixel (y, x), drawn as a cross, or None.
    """
    H, W = image.shape[:2]
    rows, cols = len(heads), 1 + len(columns)
    side = 1.9
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows * H / W + 0.8), layout="constrained", squeeze=False)
    grey = image.mean(-1, keepdims=True).repeat(3, -1)
    for r, head in enumerate(heads):
        _show(axes[r, 0], image, "image" if r == 0 else "")
        axes[r, 0].set_ylabel(f"head {head}")
        for c, (name, maps) in enumerate(columns, start=1):
            values = upsample_map(maps[r], (H, W))
            top = float(values.max()) or 1.0
            ax = axes[r, c]
            ax.imshow(0.55 * grey)
            ax.imshow(values / top, cmap="inferno", alpha=0.75, vmin=0, vmax=1, interpolation="bilinear")
            ax.set(xticks=[], yticks=[], title=name if r == 0 else "")
            ax.set_xlabel(f"max {top:.2g}", fontsize="x-small")
            ax.grid(False)
            if marker is not None:
                ax.plot([marker[1]], [marker[0]], marker="+", color="cyan", markersize=9, markeredgewidth=1.5)
        if marker is not None:
            axes[r, 0].plot([marker[1]], [marker[0]], marker="+", color="cyan", markersize=9, markeredgewidth=1.5)
    fig.suptitle(title, fontsize="small")
    return fig


@styled
def plot_attention_shares(
    per_head: dict[str, list], heads: dict[str, Sequence[int]], means: list, chance, caption: str
) -> plt.Figure:
    """Share of each class query's attention on its own class's patches, per layer: a dot per head and
    the mean over heads with their intervals (``Interval``s), and what uniform attention would give."""
    layers = list(per_head)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(layers) + 2.0), 3.4), layout="constrained")
    x = np.arange(len(layers))
    most = max(len(heads[layer]) for layer in layers)
    for k in range(most):
        xs = [i + 0.08 * (k - (most - 1) / 2) for i, layer in enumerate(layers) if k < len(heads[layer])]
        values = [per_head[layer][k] for layer in layers if k < len(heads[layer])]
        ax.errorbar(xs, [100 * v.estimate for v in values],
                    yerr=[[100 * (v.estimate - v.low) for v in values], [100 * (v.high - v.estimate) for v in values]],
                    fmt="o", markersize=3, color=LINE_COLORS[k % len(LINE_COLORS)], alpha=0.7, capsize=2, label=f"head {k}")
    ax.errorbar(x, [100 * m.estimate for m in means], yerr=[[100 * (m.estimate - m.low) for m in means],
                [100 * (m.high - m.estimate) for m in means]], fmt="D-", color="0.15", capsize=3, label="mean over heads")
    ax.axhspan(100 * chance.low, 100 * chance.high, color="0.6", alpha=0.25, linewidth=0)
    ax.axhline(100 * chance.estimate, color="0.4", linestyle="--", linewidth=1.0, label="uniform attention (chance)")
    ax.set_xticks(x, layers)
    ax.set(xlabel="layer", ylabel="attention on own class's patches (%)", ylim=(0, 100))
    ax.legend(loc="best", fontsize="x-small", frameon=True)
    ax.set_title(caption, fontsize="small")
    return fig


# ----------------------------------------------------------------- PCA segmentation (SPEC §3.2)

SCORE_TITLES = {"ari": "adjusted Rand index", "nmi": "normalised mutual information", "miou": "mIoU (Hungarian-matched)"}


@dataclass
class PCAPanel:
    """One layer's column of the PCA figure."""

    title: str
    segments: np.ndarray  # (H, W, 3) uint8: the coloured PCA segmentation
    components: np.ndarray  # (H, W, 3) float in [0, 1]: first three PCA coordinates as RGB
    caption: str  # scores, shown under the segmentation


def _show(ax: plt.Axes, image: np.ndarray, title: str, caption: str = "") -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set(xticks=[], yticks=[], title=title)
    ax.set_xlabel(caption, fontsize="x-small")
    ax.grid(False)


@styled
def pca_segmentation_figure(
    image: np.ndarray,
    panels: list[PCAPanel],
    prediction: np.ndarray,
    ground_truth: np.ndarray | None,
    prediction_caption: str,
    legend: list[tuple[str, np.ndarray]],
    title: str,
    note: str,
) -> plt.Figure:
    """image | one PCA segmentation per layer | model prediction (| ground truth); below each layer its
    PCA-RGB view, below the prediction a legend of the classes shown.

    image: (H, W, 3) float in [0, 1]; prediction / ground_truth: (H, W, 3) uint8 (palette-coloured);
    legend: (class name, RGB uint8) pairs; note: a footnote on how to read the figure.
    """
    cols = 2 + len(panels) + (ground_truth is not None)
    H, W = image.shape[:2]
    side = 2.3
    height = side * float(np.clip(H / W, 0.5, 2.0))
    fig, axes = plt.subplots(2, cols, figsize=(side * cols, 2 * height + 1.4), layout="constrained", squeeze=False)
    _show(axes[0, 0], image, "image")
    for i, panel in enumerate(panels, start=1):
        _show(axes[0, i], panel.segments, panel.title, panel.caption)
        _show(axes[1, i], panel.components, "PCA components 1–3 as RGB")
    _show(axes[0, len(panels) + 1], prediction, "model prediction", prediction_caption)
    if ground_truth is not None:
        _show(axes[0, -1], ground_truth, "ground truth")
    for ax in (axes[1, 0], *axes[1, len(panels) + 1 :]):
        ax.set_axis_off()
    handles = [matplotlib.patches.Patch(facecolor=np.asarray(c) / 255, edgecolor="0.3", label=n) for n, c in legend]
    if handles:
        axes[1, len(panels) + 1].legend(handles=handles, loc="upper left", frameon=False, fontsize="small",
                                        ncol=1 + len(handles) // 9, title="classes shown")
    fig.suptitle(title)
    fig.supxlabel(note, fontsize="x-small")
    return fig


@styled
def pca_scores_figure(rows: list[dict], sources: dict[str, str], references: dict[str, str], title: str) -> plt.Figure:
    """Box plots (mean as a white diamond, images as dots) of each score, per reference and source.

    rows: long-format dicts with ``reference``, ``source`` and the scores ``ari``, ``nmi``, ``miou``;
    ``sources`` / ``references``: key -> display label, in plotting order (keys absent from rows are skipped).
    """
    frame = pd.DataFrame(rows)
    frame = frame[frame["source"].isin(sources) & frame["reference"].isin(references)]
    hue_order = [sources[s] for s in sources if s in set(frame["source"])]
    order = [references[r] for r in references if r in set(frame["reference"])]
    frame = frame.assign(source=frame["source"].map(sources), reference=frame["reference"].map(references))
    colors = dict(zip(hue_order, LINE_COLORS))
    fig, axes = plt.subplots(1, len(SCORE_TITLES), figsize=(3.0 * len(SCORE_TITLES), 3.2), layout="constrained")
    for ax, (score, score_title) in zip(axes, SCORE_TITLES.items()):
        common = {"data": frame, "x": "reference", "y": score, "hue": "source", "order": order,
                  "hue_order": hue_order, "ax": ax}
        with warnings.catch_warnings():  # seaborn passes matplotlib >= 3.11 a deprecated `vert`; not ours to fix
            warnings.filterwarnings("ignore", "vert: bool was deprecated", matplotlib.MatplotlibDeprecationWarning)
            sns.boxplot(**common, palette=colors, showfliers=False, showmeans=True, width=0.7,
                        meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "0.2", "markersize": 4})
        sns.stripplot(**common, dodge=True, palette=dict.fromkeys(hue_order, "0.25"), size=2.5, alpha=0.5, legend=False)
        ax.set(title=score_title, xlabel="", ylabel="")
        ax.tick_params(axis="x", labelsize="small")
        ax.get_legend().remove()
    handles = [matplotlib.patches.Patch(facecolor=colors[h], label=h) for h in hue_order]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{title}\nboxes: quartiles, ◇: mean, dots: images", fontsize="medium")
    return fig


# ---------------------------------------------------------------------- orthogonality (SPEC §3.3)


@dataclass
class GramCell:
    """One heatmap of a Gram matrix (n, n); ``block`` = head size p outlines the diagonal head blocks."""

    matrix: np.ndarray
    title: str
    block: int | None = None


@styled
def gram_grid_figure(
    cells: list[list[GramCell | None]], columns: list[str], scale_labels: list[str], title: str
) -> plt.Figure:
    """A grid of Gram heatmaps: rows of cells (None leaves a gap), one column per model.

    Each row shares one colour scale, symmetric about 0 (diverging ``RdBu_r``: red > 0, blue < 0),
    with its colour bar (labelled ``scale_labels[row]``) on the right; ``columns`` head the first row.
    """
    n_rows, n_cols = len(cells), len(columns)
    figsize = (2.5 * n_cols + 1.0, 2.4 * n_rows + 0.6)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, layout="constrained", squeeze=False)
    for r, row in enumerate(cells):
        vmax = max((float(np.abs(c.matrix).max()) for c in row if c is not None), default=1.0) or 1.0
        image = None
        for ax, cell in zip(axes[r], row):
            ax.set(xticks=[], yticks=[])
            ax.grid(False)
            if cell is None:
                ax.set_axis_off()
                continue
            image = ax.imshow(cell.matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="antialiased")
            n = len(cell.matrix)
            if cell.block and cell.block < n:
                for start in range(0, n, cell.block):
                    ax.add_patch(matplotlib.patches.Rectangle((start - 0.5, start - 0.5), cell.block, cell.block,
                                                              fill=False, edgecolor="black", linewidth=0.8))
            ax.set_title(cell.title, fontsize="small")
        if image is not None:
            fig.colorbar(image, ax=list(axes[r]), shrink=0.85, pad=0.02, label=scale_labels[r])
    for ax, column in zip(axes[0], columns):
        ax.set_title(f"{column}\n{ax.get_title()}", fontsize="small")
    fig.suptitle(title, fontsize="medium")
    return fig


# ------------------------------------------------------------------------- robustness (SPEC §3.4)


@dataclass
class RobustnessCurve:
    """One model's mIoU (%) at each σ (ascending, 0 = clean first) and its interval [low, high]."""

    name: str  # legend text
    sigma: Sequence[float]
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _axis_break(ax: plt.Axes, x: float) -> None:
    """Two short slanted strokes across the bottom spine at data position ``x`` (log axis)."""
    transform = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for dx in (0.93, 1.07):
        ax.plot([x * dx / 1.06, x * dx * 1.06], [-0.025, 0.025], transform=transform, color="0.3",
                linewidth=1.0, clip_on=False, zorder=5)


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """(labelled, unlabelled) tick positions for a log axis over [lo, hi] (lo > 0).

    The decades in range are labelled; when fewer than three are, 2 × and 5 × each decade are
    labelled too (a grid of 0.5 … 8 gets 0.5, 1, 2, 5, not one lone tick). The other integer
    multiples of each decade are unlabelled minor ticks.
    """
    inside = lambda x: lo / 1.001 <= x <= hi * 1.001  # noqa: E731
    decades = [10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
    steps = (1,) if sum(inside(d) for d in decades) >= 3 else (1, 2, 5)
    labelled = sorted(m * d for d in decades for m in steps if inside(m * d))
    minor = [m * d for d in decades for m in range(1, 10) if inside(m * d) and m * d not in labelled]
    return labelled, minor


def _tick_text(x: float) -> str:
    exponent = np.log10(x)
    return f"$10^{{{round(exponent)}}}$" if abs(exponent - round(exponent)) < 1e-9 and abs(exponent) >= 2 else f"{x:g}"


def _log_sigma_axis(ax: plt.Axes, positive: list[float], x0: float) -> None:
    """Log x axis over the positive σ values, with "0" at ``x0`` and an axis break before the first σ."""
    ax.set_xscale("log")
    if not positive:
        ax.set_xticks([x0], ["0"])
        return
    labelled, minor = log_ticks(positive[0], positive[-1])
    ax.set_xticks([x0] + labelled, ["0"] + [_tick_text(x) for x in labelled])
    ax.xaxis.set_minor_locator(matplotlib.ticker.FixedLocator(minor))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", which="minor", length=2)
    ax.set_xlim(x0 / 10**0.3, positive[-1] * 10**0.3)
    _axis_break(ax, float(np.sqrt(x0 * positive[0])))


@styled
def plot_robustness_curves(curves: list[RobustnessCurve], colours: dict, sigma_label: str, caption: str) -> plt.Figure:
    """mIoU (%) against σ on a log axis, one curve per model (``colours[name]``) over its interval band.

    σ = 0 (the clean model) has no place on a log axis: it is drawn one decade left of the smallest
    σ, behind an axis break (//), as a diamond with its interval, joined to the curve by a dashed
    segment, with a dotted line at its level across the plot.
    """
    positive = sorted({s for c in curves for s in c.sigma if s > 0})
    x0 = positive[0] / 10 if positive else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for curve in curves:
        color = colours[curve.name]
        sigma = np.asarray(curve.sigma, dtype=np.float64)
        noisy, clean = sigma > 0, np.flatnonzero(sigma == 0)
        if noisy.any():
            ax.fill_between(sigma[noisy], curve.low[noisy], curve.high[noisy], color=color, alpha=0.18, linewidth=0)
            ax.plot(sigma[noisy], curve.mean[noisy], color=color, marker="o", markersize=4, label=curve.name)
        if clean.size:
            c = clean[0]
            ax.axhline(curve.mean[c], color=color, linestyle=":", linewidth=0.9, alpha=0.7)
            ax.errorbar([x0], [curve.mean[c]], yerr=[[curve.mean[c] - curve.low[c]], [curve.high[c] - curve.mean[c]]],
                        marker="D", markersize=7, color=color, capsize=3, label=None if noisy.any() else curve.name)
            if noisy.any():
                first = np.flatnonzero(noisy)[0]
                ax.plot([x0, sigma[first]], [curve.mean[c], curve.mean[first]], color=color, linestyle="--", linewidth=1.0)
    _log_sigma_axis(ax, positive, x0)
    ax.set_ylim(bottom=0)
    ax.set(xlabel=f"{sigma_label}  (log scale; 0 = clean model)", ylabel="mIoU (%)")
    clean_key = matplotlib.lines.Line2D([], [], color="0.4", marker="D", linestyle=":", label="clean model (σ = 0)")
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], clean_key], loc="lower left", frameon=True, fontsize="small")
    ax.set_title(caption, fontsize="small")
    return fig


@styled
def plot_robustness_bars(curves: list[RobustnessCurve], colours: dict, caption: str) -> plt.Figure:
    """Structured transforms: per model a pale bar (clean) and a bar in its colour (transformed),
    mIoU (%) with interval whiskers."""
    fig, ax = plt.subplots(figsize=(max(3.6, 1.5 * len(curves) + 1.6), 3.6), layout="constrained")
    width = 0.38
    for i, curve in enumerate(curves):
        for offset, sigma, alpha in ((-width / 2, 0.0, 0.35), (width / 2, 1.0, 1.0)):
            if sigma not in curve.sigma:
                continue
            s = list(curve.sigma).index(sigma)
            mean = curve.mean[s]
            bar = ax.bar([i + offset], [mean], width, color=colours[curve.name], alpha=alpha,
                         yerr=[[mean - curve.low[s]], [curve.high[s] - mean]], capsize=3, edgecolor="0.3")
            ax.bar_label(bar, labels=[f"{mean:.1f}"], padding=2, fontsize="x-small")
    ax.set_xticks(range(len(curves)), [c.name for c in curves])
    ax.xaxis.grid(False)
    ax.set(ylabel="mIoU (%)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    keys = [matplotlib.patches.Patch(facecolor="0.5", alpha=a, edgecolor="0.3", label=t)
            for a, t in ((0.35, "clean"), (1.0, "transformed"))]
    ax.legend(handles=keys, loc="lower right", frameon=True, fontsize="small")
    ax.set_title(caption, fontsize="small")
    return fig
