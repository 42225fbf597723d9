"""One function per figure: data in, ``matplotlib.figure.Figure`` out (written by ``outputs.save_figure``).

Figures are sized for a paper column or page and share one seaborn style, set for the duration of
each plotting call (``styled``): importing this module changes no global matplotlib state.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler

LINE_COLORS = sns.color_palette("colorblind")


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


def _checkpoint_names(result: dict) -> dict[str, str]:
    """``{label: legend text}`` in sweep order: the label and its decoder family."""
    families = {c["label"]: c["model"]["decoder"] for c in result["checkpoints"]}
    labels = dict.fromkeys(row["checkpoint"] for row in result["summary"])
    return {label: f"{label} ({families[label]})" if label in families else label for label in labels}


def _robustness_caption(result: dict) -> str:
    s = result["settings"]
    partial = "  [interrupted: partial results]" if not result.get("complete", True) else ""
    draws = f"mean ± std over {s['draws']} draws" if s["draws"] > 1 else "one draw"
    return f"{s['description']}\n{s['num_images']} images; {draws}, seed {s['seed']}{partial}"


def _axis_break(ax: plt.Axes, x: float) -> None:
    """Two short slanted strokes across the bottom spine at data position ``x`` (log axis)."""
    transform = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for dx in (0.93, 1.07):
        ax.plot([x * dx / 1.06, x * dx * 1.06], [-0.025, 0.025], transform=transform, color="0.3",
                linewidth=1.0, clip_on=False, zorder=5)


def _log_sigma_axis(ax: plt.Axes, positive: list[float], x0: float) -> None:
    """Log x axis over the positive σ values, with "0" at ``x0`` and an axis break before the first σ."""
    ax.set_xscale("log")
    if not positive:
        ax.set_xticks([x0], ["0"])
        return
    lo, hi = positive[0], positive[-1]
    decades = [10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)]
    majors = [d for d in decades if lo / 1.001 <= d <= hi * 1.001]
    minors = [m * d for d in decades for m in range(2, 10) if lo / 1.001 <= m * d <= hi * 1.001]
    ax.set_xticks([x0] + majors, ["0"] + [f"$10^{{{round(np.log10(d))}}}$" for d in majors])
    ax.xaxis.set_minor_locator(matplotlib.ticker.FixedLocator(minors))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", which="minor", length=2)
    ax.set_xlim(x0 / 10**0.3, hi * 10**0.3)
    _axis_break(ax, float(np.sqrt(x0 * lo)))


@styled
def plot_robustness_curves(result: dict) -> plt.Figure:
    """mIoU (%) against σ on a log axis, one curve per checkpoint with a ±std band over draws.

    σ = 0 (the clean model) has no place on a log axis: it is drawn one decade left of the smallest
    σ, behind an axis break (//), as a diamond joined to the curve by a dashed segment, with a
    dotted line at its level across the plot. ``result`` is what ``robustness.json`` holds.
    """
    rows = result["summary"]
    positive = sorted({r["sigma"] for r in rows if r["sigma"] > 0})
    x0 = positive[0] / 10 if positive else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for i, (label, name) in enumerate(_checkpoint_names(result).items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        mine = sorted((r for r in rows if r["checkpoint"] == label), key=lambda r: r["sigma"])
        noisy = [r for r in mine if r["sigma"] > 0]
        x = np.array([r["sigma"] for r in noisy])
        mean, std = 100 * np.array([r["mean"] for r in noisy]), 100 * np.array([r["std"] for r in noisy])
        if noisy:
            _band(ax, x, mean, std, color, marker="o", label=name)
        clean_row = next((r for r in mine if r["sigma"] == 0), None)
        if clean_row is not None:
            clean = 100 * clean_row["mean"]
            ax.axhline(clean, color=color, linestyle=":", linewidth=0.9, alpha=0.7)
            ax.plot([x0], [clean], marker="D", markersize=7, color=color, label=None if noisy else name)
            if noisy:
                ax.plot([x0, x[0]], [clean, mean[0]], color=color, linestyle="--", linewidth=1.0)
    _log_sigma_axis(ax, positive, x0)
    ax.set_ylim(bottom=0)
    ax.set(xlabel=f"{result['settings']['sigma_label']}  (log scale; 0 = clean model)", ylabel="mIoU (%)")
    clean_key = matplotlib.lines.Line2D([], [], color="0.4", marker="D", linestyle=":", label="clean model (σ = 0)")
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], clean_key], loc="lower left", frameon=True, fontsize="small")
    ax.set_title(_robustness_caption(result), fontsize="small")
    return fig


@styled
def plot_robustness_bars(result: dict) -> plt.Figure:
    """Structured transforms: grouped bars per checkpoint, clean vs transformed mIoU (%), ±std whiskers."""
    names = _checkpoint_names(result)
    fig, ax = plt.subplots(figsize=(max(3.6, 1.5 * len(names) + 1.6), 3.6), layout="constrained")
    width = 0.38
    for offset, sigma, color, legend in ((-width / 2, 0.0, "0.65", "clean"), (width / 2, 1.0, LINE_COLORS[0], "transformed")):
        picked = [(i, r) for i, label in enumerate(names) for r in result["summary"]
                  if r["checkpoint"] == label and r["sigma"] == sigma]
        if not picked:
            continue
        x = np.array([i for i, _ in picked]) + offset
        heights = [100 * r["mean"] for _, r in picked]
        bars = ax.bar(x, heights, width, yerr=[100 * r["std"] for _, r in picked], color=color, capsize=3, label=legend)
        ax.bar_label(bars, labels=[f"{h:.1f}" for h in heights], padding=2, fontsize="x-small")
    ax.set_xticks(range(len(names)), list(names.values()))
    ax.xaxis.grid(False)
    ax.set(ylabel="mIoU (%)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.legend(loc="lower right", frameon=True, fontsize="small")
    ax.set_title(_robustness_caption(result), fontsize="small")
    return fig


# ------------------------------------------------------------------- training of the built-in models


@styled
def plot_training_curves(curves: dict) -> plt.Figure:
    """Training loss (left) and validation mIoU (right) against the optimizer step, one line per model.

    ``curves``: ``{"models": {label: {"train": [{"iter", "loss"}...], "eval": [{"iter", "miou"}...]}},
    "caption": str}``, as ``depict_analysis.models.pretrained.training_curves`` gives it.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0), sharex=True, layout="constrained")
    for i, (label, curve) in enumerate(curves["models"].items()):
        color = LINE_COLORS[i % len(LINE_COLORS)]
        left.plot([r["iter"] for r in curve["train"]], [r["loss"] for r in curve["train"]], color=color, label=label)
        right.plot([r["iter"] for r in curve["eval"]], [100 * r["miou"] for r in curve["eval"]], color=color, marker="o",
                   markersize=3, label=label)
    left.set(title="Training loss", xlabel="step", ylabel="cross-entropy (mean of the log window)", yscale="log")
    right.set(title="Validation mIoU", xlabel="step", ylabel="mIoU (%)", ylim=(0, None))
    right.legend(loc="lower right", frameon=True, fontsize="small")
    fig.suptitle(curves["caption"], fontsize="small")
    return fig
