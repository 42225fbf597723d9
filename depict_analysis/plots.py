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

LAYER_AXIS_LABEL = r"tokens $Z_j$ after decoder layer $j$"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def shades(colour, n: int) -> list[tuple[float, float, float]]:
    """n shades of one model's colour, dark to light: its lines stay recognisably that model's."""
    base = np.asarray(colour, dtype=float)
    steps = np.linspace(-0.4, 0.45, n) if n > 1 else [0.0]
    return [tuple(base * (1 + t) if t < 0 else base + (1 - base) * t) for t in steps]


def _band(ax: plt.Axes, x: np.ndarray, mean: np.ndarray, std: np.ndarray, color, **line) -> matplotlib.lines.Line2D:
    """A mean line over a ±std band of the same colour; returns the line (for legends)."""
    mean, std = np.asarray(mean), np.asarray(std)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)
    return ax.plot(x, mean, color=color, markersize=4, **line)[0]


def _rate_caption(label: str, result) -> str:
    s = result.settings
    basis = "; orthonormalised head bases" if s["orthonormalize"] else ""
    view = "residual stream $Z_j$" if s["view"] == "residual" else r"what layer $\ell$ projects, LN$_\ell(Z_j)$"
    return (f"{label}: {result.model['variant']} ({result.model['decoder']}), mean ± std over {result.num_images} "
            f"images; ε = {s['eps']:g}, normalisation {s['normalize']}{basis}; tokens $X_j$: {view}")


SUBSPACE_PANELS = (  # quantity, title, y label
    ("subspace_rate", r"$R(P_\ell^\top X_j)$", "nats"),
    ("crate_rate", r"CRATE's $R^c = \sum_k R(P_{\ell,k}^\top X_j)$", "nats"),
    ("raw_ratio", r"raw ratio $R(P_\ell^\top X_j) / R(X_j)$", "includes P's scale: not a share"),
    ("share", r"share $R(U_\ell^\top X_j) / R(X_j)$", r"$U_\ell$: orthonormal basis of span$(P_\ell)$; ≤ 1"),
)


@styled
def plot_subspace_rates(labels: Sequence[str], results: Sequence) -> plt.Figure:
    """The paper's coding-rate figure, one row per model (``CodingRates`` results, named by ``labels``).

    Columns: R(P_lᵀX_j), CRATE's per-head sum R^c, the raw ratio R(P_lᵀX_j)/R(X_j) (not a share: it
    includes P's row norms) and the share R(U_lᵀX_j)/R(X_j) (U_l an orthonormal basis of span(P_l)),
    against the token stage j. One line per subspace l (mean ± std band) in shades of the model's
    colour, with a dashed vertical line at the layer that owns P_l; subspaces that update only the class
    embeddings (DEPICT-CA's MSCA) are dotted, with no such line. Models share each column's y axis,
    so their rows compare by eye.
    """
    colours = model_colours(labels)
    fig = plt.figure(figsize=(11.2, 2.9 * len(results) + 0.3), layout="constrained")  # 11.2 in: fits the report's page
    rows = np.atleast_1d(fig.subfigures(len(results), 1))
    columns: list[list[plt.Axes]] = [[] for _ in SUBSPACE_PANELS]
    for row, label, result in zip(rows, labels, results):
        row.suptitle(_rate_caption(label, result), fontsize="small")
        if not result.subspaces:
            row.text(0.5, 0.5, f"{label}: no subspace projections", ha="center", va="center")
            continue
        axes = row.subplots(1, len(SUBSPACE_PANELS), sharex=True)
        for column, ax in zip(columns, axes):
            column.append(ax)
        x = np.arange(len(result.token_names))
        handles = []
        for space, colour, marker in zip(result.subspaces, shades(colours[label], len(result.subspaces)), MARKERS * 8):
            owned = space.layer is not None
            style = {"marker": marker, "linestyle": "-" if owned else ":"}
            for ax, (key, _, _) in zip(axes, SUBSPACE_PANELS):
                stat = getattr(result, key)[space.name]
                line = _band(ax, x, stat.mean, stat.std, colour, label=space.name, **style)
                if owned:
                    ax.axvline(space.layer, color=colour, linestyle="--", linewidth=1.0, alpha=0.7)
            handles.append(line)
        for ax, (key, title, unit) in zip(axes, SUBSPACE_PANELS):
            if key in ("raw_ratio", "share"):
                ax.axhline(1.0, color="0.5", linewidth=0.8)
            ax.set_title(title, fontsize="small")
            ax.set_ylabel(unit, fontsize="x-small")
            ax.set_xticks(x, result.token_names, rotation=30 if len(x) > 4 else 0, fontsize="x-small")
            ax.set_xlabel(LAYER_AXIS_LABEL, fontsize="x-small")
        key = matplotlib.lines.Line2D([], [], color="0.35", linestyle="--", label=r"layer that owns $P_\ell$")
        row.legend(handles=[*handles, key], loc="outside right center", frameon=False, fontsize="small", title=label)
    for column in columns:
        share_y(column)
    return fig


def share_y(axes: Sequence[plt.Axes]) -> None:
    """One y range for ``axes`` (the union of their ranges): panels of different models read alike."""
    if len(axes) > 1:
        limits = np.array([ax.get_ylim() for ax in axes])
        for ax in axes:
            ax.set_ylim(limits[:, 0].min(), limits[:, 1].max())


def _stage_ticks(results: Sequence) -> list[str]:
    """Class-stage tick labels: the stage names when every model has the same, else positions."""
    stages = [r.class_stages for r in results]
    longest = max(stages, key=len)
    if all(s == stages[0] for s in stages):
        return [*longest[:-1], r"final $\hat{Q}$"]
    return ["input", *map(str, range(1, len(longest) - 1)), r"final $\hat{Q}$"]


@styled
def plot_token_class_rates(labels: Sequence[str], results: Sequence) -> plt.Figure:
    """R(Z_j) against the token stage j (left); R(Q) at each class stage, then the final Q̂ (right); one
    line per model in its colour, mean ± std over images."""
    colours = model_colours(labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2), layout="constrained")
    for label, result in zip(labels, results):
        x = np.arange(len(result.token_names))
        _band(left, x, result.token_rate.mean, result.token_rate.std, colours[label], marker="o", label=label)
        stages = result.class_rate
        t, final = np.arange(len(result.class_stages) - 1), len(_stage_ticks(results)) - 1
        if len(t):
            _band(right, t, stages.mean[:-1], stages.std[:-1], colours[label], marker="o")
        right.errorbar(final, stages.mean[-1], yerr=stages.std[-1], color=colours[label], marker="D", capsize=3)
    longest = max(results, key=lambda r: len(r.token_names))
    left.set_xticks(np.arange(len(longest.token_names)),
                    longest.token_names if len(results) == 1 else np.arange(len(longest.token_names)))
    left.set(title="Patch tokens $Z_j$", xlabel=LAYER_AXIS_LABEL if len(results) == 1 else "decoder layer $j$",
             ylabel="$R(Z_j)$  (nats)")
    ticks = _stage_ticks(results)
    right.set_xticks(np.arange(len(ticks)), ticks, rotation=30 if len(ticks) > 5 else 0)
    right.set(xlim=(-0.5, len(ticks) - 0.5), title="Class embeddings $Q$", xlabel="stage (after layer)",
              ylabel="$R(Q)$  (nats)")
    fig.legend(loc="outside right center", frameon=False, fontsize="small")
    first = results[0].settings
    fig.suptitle(f"mean ± std over images; ε = {first['eps']:g}, normalisation {first['normalize']}", fontsize="small")
    return fig


# ----------------------------------------------------------------- per-class rates and ΔR


@dataclass
class ClassRatePanel:
    """One model's per-class rates for ``plot_class_rates``: ``lines`` maps "rate" (R(Z_j)), "within"
    (Σ_c N_c/N R(Z_{j,c})) and "delta" (ΔR_j) to one ``Interval`` per token stage; ``heat`` (K', J) is each
    class's mean rate, its rows named ``class_names``."""

    name: str
    layers: Sequence[str]
    lines: dict[str, list]
    heat: np.ndarray
    class_names: Sequence[str]


CLASS_RATE_LINES = {"rate": ("-", "o", "$R(Z_j)$"), "within": (":", "s", r"$\sum_c \frac{N_c}{N} R(Z_{j,c})$"),
                    "delta": ("--", "D", r"$\Delta R_j$")}


@styled
def plot_class_rates(panels: Sequence[ClassRatePanel], colours: dict, caption: str) -> plt.Figure:
    """Left: per model (its colour) R(Z_j), the class-weighted rate and ΔR_j against the token stage j,
    means with their interval bands. Right: one heatmap per model of each class's rate (rows, named) at
    each stage, the values written in."""
    rows = max(len(p.class_names) for p in panels)
    height = max(3.4, 0.3 * rows + 1.6)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.6 + 4.4 * len(panels), height), layout="constrained",
                             squeeze=False, width_ratios=[1.1] + [1.0] * len(panels))
    left = axes[0, 0]
    for panel in panels:
        x = np.arange(len(panel.layers))
        for key, (style, marker, _) in CLASS_RATE_LINES.items():
            values = panel.lines[key]
            left.fill_between(x, [v.low for v in values], [v.high for v in values], color=colours[panel.name], alpha=0.15,
                              linewidth=0)
            left.plot(x, [v.estimate for v in values], color=colours[panel.name], linestyle=style, marker=marker, markersize=4)
    longest = max(panels, key=lambda p: len(p.layers))
    left.set_xticks(np.arange(len(longest.layers)), [f"{j}" for j in range(len(longest.layers))])
    left.set(xlabel="token stage j (0 = decoder input)", ylabel="nats", title="Rate, class-weighted rate, rate reduction")
    keys = [matplotlib.lines.Line2D([], [], color="0.3", linestyle=style, marker=marker, markersize=4, label=label)
            for style, marker, label in CLASS_RATE_LINES.values()]
    if len(panels) > 1:
        keys += [matplotlib.patches.Patch(color=colours[p.name], label=p.name) for p in panels]
    fig.legend(handles=keys, loc="outside lower center", ncol=min(len(keys), 6), frameon=False, fontsize="small")
    for ax, panel in zip(axes[0, 1:], panels):
        image = ax.imshow(panel.heat, aspect="auto", cmap="viridis")
        ax.set_xticks(np.arange(len(panel.layers)), panel.layers, rotation=30 if len(panel.layers) > 5 else 0)
        ax.set_yticks(np.arange(len(panel.class_names)), panel.class_names)
        ax.grid(False)
        if panel.heat.size <= 200 and np.isfinite(panel.heat).any():
            middle = np.nanmean(panel.heat)
            for (r, c), value in np.ndenumerate(panel.heat):
                if np.isfinite(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize="x-small",
                            color="black" if value > middle else "white")
        ax.set(xlabel="token stage (after layer)", title=f"{panel.name}: $R(Z_{{j,c}})$ per class (n: images with it)")
        fig.colorbar(image, ax=ax, label="nats", shrink=0.85)
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
    """One row per head: the image, then each query's map over it (bilinear, ``inferno``), all panels on
    one colour scale from 0 to the figure's largest attention weight, with its colour bar (each panel's
    own maximum is written under it: "max …").

    image: (H, W, 3) in [0, 1]; columns: (title, maps (h, gh, gw)) per query, e.g. a class name and
    its query's maps; marker: the queried pixel (y, x), drawn as a cross, or None.
    """
    H, W = image.shape[:2]
    rows, cols = len(heads), 1 + len(columns)
    side = 1.9
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows * H / W + 0.8), layout="constrained", squeeze=False)
    grey = image.mean(-1, keepdims=True).repeat(3, -1)
    upsampled = [[upsample_map(maps[r], (H, W)) for _, maps in columns] for r in range(rows)]
    scale = max((float(v.max()) for row in upsampled for v in row), default=0.0) or 1.0
    shown = None
    for r, head in enumerate(heads):
        _show(axes[r, 0], image, "image" if r == 0 else "")
        axes[r, 0].set_ylabel(f"head {head}")
        for c, (name, _) in enumerate(columns, start=1):
            values = upsampled[r][c - 1]
            top = float(values.max())
            ax = axes[r, c]
            ax.imshow(0.55 * grey)
            shown = ax.imshow(values, cmap="inferno", alpha=0.75, vmin=0, vmax=scale, interpolation="bilinear")
            ax.set(xticks=[], yticks=[], title=name if r == 0 else "")
            ax.set_xlabel(f"max {top:.2g}", fontsize="x-small")
            ax.grid(False)
            if marker is not None:
                ax.plot([marker[1]], [marker[0]], marker="+", color="cyan", markersize=9, markeredgewidth=1.5)
        if marker is not None:
            axes[r, 0].plot([marker[1]], [marker[0]], marker="+", color="cyan", markersize=9, markeredgewidth=1.5)
    if shown is not None:
        fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), shrink=0.8, label="attention weight (one scale for all panels)")
    fig.suptitle(title, fontsize="small")
    return fig


@dataclass
class AttentionSharePanel:
    """One model's own-class attention shares for ``plot_attention_shares``: per class-query layer the
    heads, one ``Interval`` per head and their mean's; ``chance``: what uniform attention gives."""

    name: str
    layers: Sequence[str]
    heads: Sequence[Sequence[int]]
    per_head: Sequence[Sequence]
    means: Sequence
    chance: object


@styled
def plot_attention_shares(panels: Sequence[AttentionSharePanel], caption: str) -> plt.Figure:
    """Share (%) of each class query's attention on its own class's patches, one panel per model: a dot
    per head and the mean over heads (the model's colour), with intervals, against uniform attention."""
    colours = model_colours([p.name for p in panels])
    width = sum(max(2.6, 1.0 * len(p.layers) + 1.2) for p in panels) + 0.8
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.6), layout="constrained", sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        x = np.arange(len(panel.layers))
        most = max(len(h) for h in panel.heads)
        for k in range(most):
            at = [i for i, heads in enumerate(panel.heads) if k < len(heads)]
            values = [panel.per_head[i][k] for i in at]
            ax.errorbar([i + 0.08 * (k - (most - 1) / 2) for i in at], [100 * v.estimate for v in values],
                        yerr=[[100 * (v.estimate - v.low) for v in values], [100 * (v.high - v.estimate) for v in values]],
                        fmt="o", markersize=3, color=LINE_COLORS[k % len(LINE_COLORS)], alpha=0.6, capsize=2,
                        label=f"head {k}")
        means = panel.means
        ax.errorbar(x, [100 * m.estimate for m in means], yerr=[[100 * (m.estimate - m.low) for m in means],
                    [100 * (m.high - m.estimate) for m in means]], fmt="D-", color=colours[panel.name], capsize=3,
                    label="mean over heads")
        chance = panel.chance
        ax.axhspan(100 * chance.low, 100 * chance.high, color="0.6", alpha=0.25, linewidth=0)
        ax.axhline(100 * chance.estimate, color="0.4", linestyle="--", linewidth=1.0, label="uniform attention")
        ax.set_xticks(x, panel.layers)
        ax.set(xlabel="layer", title=panel.name, ylim=(0, 100))
    axes[0, 0].set_ylabel("attention on own class's patches (%)")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize="x-small", frameon=False)
    fig.suptitle(caption, fontsize="small")
    return fig


# ----------------------------------------------------------------- PCA segmentation (SPEC §3.2)

SCORE_TITLES = {"ari": "adjusted Rand index", "nmi": "normalised mutual information", "miou": "mIoU (Hungarian-matched)"}


@dataclass
class PCAPanel:
    """One source's segmentation in a row of the PCA figure."""

    title: str
    segments: np.ndarray  # (H, W, 3) uint8: the coloured PCA segmentation
    components: np.ndarray  # (H, W, 3) float in [0, 1]: first three PCA coordinates as RGB
    caption: str  # scores, shown under the segmentation


@dataclass
class PCARow:
    """One model's row of the PCA figure of an image."""

    label: str  # the model's name (and the k used)
    image: np.ndarray  # (H, W, 3) float in [0, 1]
    panels: list[PCAPanel]
    prediction: np.ndarray  # (H, W, 3) uint8, palette-coloured
    prediction_caption: str
    ground_truth: np.ndarray | None


def _show(ax: plt.Axes, image: np.ndarray, title: str, caption: str = "") -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    ax.set_title(title, fontsize="small")
    ax.set_xlabel(caption, fontsize="x-small")
    ax.grid(False)


@styled
def pca_segmentation_figure(rows: list[PCARow], legend: list[tuple[str, np.ndarray]], title: str, note: str) -> plt.Figure:
    """One row per model: image | for each source its PCA segmentation and its first three PCA
    components as RGB | model prediction | ground truth (when any row has one); a legend of the classes
    shown (name, RGB uint8) and ``note`` on how to read it below."""
    has_truth = any(row.ground_truth is not None for row in rows)
    cols = 2 + 2 * max(len(row.panels) for row in rows) + has_truth
    H, W = rows[0].image.shape[:2]
    side = 1.6  # seven panels (two sources) fit the report's page
    height = side * float(np.clip(H / W, 0.5, 2.0))
    fig, axes = plt.subplots(len(rows), cols, figsize=(side * cols, (height + 0.75) * len(rows) + 1.2),
                             layout="constrained", squeeze=False)
    for ax_row, row in zip(axes, rows):
        _show(ax_row[0], row.image, "image")
        ax_row[0].set_ylabel(row.label, fontsize="small", fontweight="bold")
        for i, panel in enumerate(row.panels):
            _show(ax_row[1 + 2 * i], panel.segments, panel.title, panel.caption)
            _show(ax_row[2 + 2 * i], panel.components, "PCA 1–3 as RGB")
        _show(ax_row[1 + 2 * len(row.panels)], row.prediction, "model prediction", row.prediction_caption)
        if row.ground_truth is not None:
            _show(ax_row[-1], row.ground_truth, "ground truth")
        for ax in ax_row:
            if not ax.images:  # a model with fewer sources, or no ground truth
                ax.set_axis_off()
    handles = [matplotlib.patches.Patch(facecolor=np.asarray(c) / 255, edgecolor="0.3", label=n) for n, c in legend]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", frameon=False, fontsize="small",
                   ncol=min(len(handles), 8), title="classes shown")
    fig.suptitle(title)
    fig.supxlabel(note, fontsize="x-small")
    return fig


@styled
def pca_scores_figure(
    rows: list[dict], labels: Sequence[str], sources: dict[str, str], references: dict[str, str], title: str
) -> plt.Figure:
    """Box plots (mean as a white diamond, images as dots) of each score: one row per reference, one
    column per score, the sources along x and one box per model in its colour.

    rows: long-format dicts with ``model``, ``reference``, ``source`` and the scores ``ari``, ``nmi``,
    ``miou``; ``sources`` / ``references``: key -> display label, in plotting order (absent keys skipped).
    """
    frame = pd.DataFrame(rows)
    frame = frame[frame["source"].isin(sources) & frame["reference"].isin(references)]
    present = [r for r in references if r in set(frame["reference"])]
    colours = model_colours(labels)
    fig, axes = plt.subplots(len(present), len(SCORE_TITLES), figsize=(3.4 * len(SCORE_TITLES), 2.9 * len(present) + 0.8),
                             layout="constrained", squeeze=False)
    for ax_row, ref in zip(axes, present):
        part = frame[frame["reference"] == ref]
        order = [sources[s] for s in sources if s in set(part["source"])]
        part = part.assign(source=part["source"].map(sources))
        for ax, (score, score_title) in zip(ax_row, SCORE_TITLES.items()):
            common = {"data": part, "x": "source", "y": score, "hue": "model", "order": order,
                      "hue_order": list(colours), "ax": ax}
            with warnings.catch_warnings():  # seaborn passes matplotlib >= 3.11 a deprecated `vert`; not ours to fix
                warnings.filterwarnings("ignore", "vert: bool was deprecated", matplotlib.MatplotlibDeprecationWarning)
                sns.boxplot(**common, palette=colours, showfliers=False, showmeans=True, width=0.7,
                            meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "0.2", "markersize": 4})
            sns.stripplot(**common, dodge=True, palette=dict.fromkeys(colours, "0.25"), size=2.5, alpha=0.5, legend=False)
            ax.set(title=f"{score_title}, {references[ref]}", xlabel="", ylabel="")
            ax.title.set_fontsize("small")
            ax.tick_params(axis="x", labelsize="x-small")
            ax.get_legend().remove()
    handles = [matplotlib.patches.Patch(facecolor=colours[label], label=label) for label in colours]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{title}\nboxes: quartiles, ◇: mean, dots: images", fontsize="medium")
    return fig


# ---------------------------------------------------------------------- orthogonality (SPEC §3.3)

ORTHOGONALITY_PANELS = (  # Orthogonality.headline key -> title
    ("P_cross_head_mean_abs_cos", "P: mean |cos| across heads"),
    ("P_coherence", "P: coherence (max |cos|)"),
    ("final_Q_mean_abs_offdiag", r"final $\hat{Q}$: mean |cos|, $i \neq j$"),
    ("final_Q_mean_abs_offdiag_centred", r"final $\hat{Q}$, class mean removed"),
    ("cls_emb_mean_abs_offdiag", "learned cls_emb: mean |cos|"),
)
COSINE_MAP = "mako_r"  # |cos| from 0 (light) to 1 (dark)


def _class_ticks(ax: plt.Axes, names: Sequence[str]) -> None:
    """Class names on both axes of a K × K heatmap (every ⌈K/40⌉-th name when there are many)."""
    step = max(1, -(-len(names) // 40))
    ticks = np.arange(0, len(names), step)
    size = "xx-small" if len(names) > 12 else "x-small"
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=size)


def _heatmap(ax: plt.Axes, matrix: np.ndarray, title: str) -> matplotlib.image.AxesImage:
    image = ax.imshow(matrix, cmap=COSINE_MAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.grid(False)
    return image


@styled
def orthogonality_overview(labels: Sequence[str], results: Sequence) -> plt.Figure:
    """Top: each headline statistic per model (filled: trained; hollow with a bar: at initialisation, mean
    ± std over seeds; grey dash: two random directions in R^d). Below, one column per model: |cos| of the
    final Q̂ (mean over images of |Q̂ᵀQ̂|, first row) and of the learned cls_emb (second row), class
    names on both axes.
    ``results``: ``Orthogonality`` results named by ``labels``."""
    colours = model_colours(labels)
    n = len(results)
    fig = plt.figure(figsize=(max(11.0, 2.6 * n + 1.5), 3.0 + 2 * 3.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.0, 6.0])
    axes = top.subplots(1, len(ORTHOGONALITY_PANELS))
    x = np.arange(n)
    for ax, (key, title) in zip(axes, ORTHOGONALITY_PANELS):
        for i, (label, result) in enumerate(zip(labels, results)):
            value, baseline = result.headline(key)
            if value is None:
                continue
            ax.plot(i - 0.12, value, marker="o", markersize=7, color=colours[label], linestyle="none")
            if baseline is not None:
                ax.errorbar(i + 0.12, baseline.mean, yerr=baseline.std, marker="o", markersize=6, capsize=3,
                            markerfacecolor="white", color=colours[label])
            ax.plot([i - 0.3, i + 0.3], [result.random_level] * 2, color="0.55", linestyle="--", linewidth=1.0)
        ax.set_xticks(x, labels, rotation=30 if n > 2 else 0, ha="right" if n > 2 else "center", fontsize="x-small")
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize="small")
    keys = [matplotlib.lines.Line2D([], [], color="0.3", marker="o", linestyle="none", label="trained"),
            matplotlib.lines.Line2D([], [], color="0.3", marker="o", markerfacecolor="white", label="at init (seeds)"),
            matplotlib.lines.Line2D([], [], color="0.55", linestyle="--", label="random directions")]
    top.legend(handles=keys, loc="outside right center", frameon=False, fontsize="small")
    seeds = results[0].settings["baseline_seeds"]
    top.suptitle(f"Scale-free orthogonality (|cos|; lower = closer to orthogonal); at init: fresh decoders, seeds "
                 f"{', '.join(map(str, seeds)) or '—'}", fontsize="small")

    grid = bottom.subplots(2, n, squeeze=False)
    image = None
    for column, label, result in zip(grid.T, labels, results):
        for ax, name in zip(column, ("final_Q", "cls_emb")):
            panel = result.panel(name)
            if panel is None:
                ax.set_axis_off()
                continue
            image = _heatmap(ax, panel.cosines, label)
            _class_ticks(ax, result.class_names)
    for ax, what in zip(grid[:, 0], (r"final $\hat{Q}$ (mean over images)", "learned cls_emb")):
        ax.set_ylabel(what, fontsize="small")
    if image is not None:
        bottom.colorbar(image, ax=grid.ravel().tolist(), shrink=0.6, label="|cos| between classes")
    return fig


@styled
def subspace_cosines_figure(labels: Sequence[str], results: Sequence) -> plt.Figure:
    """|cos| between every pair of basis vectors of each subspace: one row per model, one column per
    subspace, head blocks outlined (an orthonormal basis is the identity)."""
    rows = [[p for p in result.panels if p.kind == "P"] for result in results]
    n_cols = max(1, max(map(len, rows)))
    fig, axes = plt.subplots(len(results), n_cols, figsize=(2.3 * n_cols + 1.2, 2.5 * len(results) + 0.6),
                             layout="constrained", squeeze=False)
    image = None
    for ax_row, label, panels in zip(axes, labels, rows):
        for ax, panel in zip(ax_row, panels):
            image = _heatmap(ax, panel.cosines, f"{panel.name}: {panel.heads} × {panel.dim_head}")
            ax.set(xticks=[], yticks=[])
            size = len(panel.cosines)
            if panel.heads > 1:
                for start in range(0, size, panel.dim_head):
                    ax.add_patch(matplotlib.patches.Rectangle((start - 0.5, start - 0.5), panel.dim_head, panel.dim_head,
                                                              fill=False, edgecolor="tab:red", linewidth=0.8))
        ax_row[0].set_ylabel(label, fontsize="small", fontweight="bold")
        for ax in ax_row[len(panels):]:
            ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="|cos| between basis vectors")
    fig.suptitle("Subspace bases: |cos| between basis vectors (head blocks outlined)", fontsize="medium")
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
    sigma_half: tuple[float, float, float] | None = None  # σ½ (estimate, low, high); inf: beyond the grid


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
    segment, with a dotted line at its level across the plot. σ½, where a curve falls to half its
    clean mIoU, is marked on it (a vertical tick at half the clean level) with its interval as a
    horizontal bar; an interval reaching past the grid runs to the plot's edge.
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
                _mark_sigma_half(ax, curve, curve.mean[c] / 2, color, positive[-1] * 10**0.3)
    _log_sigma_axis(ax, positive, x0)
    ax.set_ylim(bottom=0)
    ax.set(xlabel=f"{sigma_label}  (log scale; 0 = clean model)", ylabel="mIoU (%)")
    clean_key = matplotlib.lines.Line2D([], [], color="0.4", marker="D", linestyle=":", label="clean model (σ = 0)")
    half_key = matplotlib.lines.Line2D([], [], color="0.4", marker="|", markersize=12, label="σ½ [interval]: half the clean mIoU")
    fig.legend(handles=[*ax.get_legend_handles_labels()[0], clean_key, half_key], loc="outside right center",
               frameon=False, fontsize="small")
    ax.set_title(caption, fontsize="small")
    return fig


def _mark_sigma_half(ax: plt.Axes, curve: RobustnessCurve, level: float, color, edge: float) -> None:
    """σ½ of one curve at height ``level`` (half its clean mIoU): a tick and its interval (to ``edge`` when open)."""
    if curve.sigma_half is None:
        return
    estimate, low, high = curve.sigma_half
    if not np.isfinite(low):
        return  # even the interval's lower end lies beyond the grid: nothing to mark inside it
    right = min(high, edge) if np.isfinite(high) else edge
    ax.plot([low, right], [level, level], color=color, linewidth=2.2, alpha=0.8, solid_capstyle="butt")
    if np.isfinite(estimate):
        ax.plot([estimate], [level], marker="|", markersize=14, markeredgewidth=2.2, color=color, gid="sigma_half")


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


# ------------------------------------------------------------------- training of the built-in models


@styled
def plot_training_curves(runs: dict[str, tuple[list[dict], list[dict]]], caption: str = "") -> plt.Figure:
    """Training loss (left) and validation mIoU (right) against the optimizer step, one colour per run.

    ``runs``: {label: (train records {"iter", "loss"}, eval records {"iter", "miou"})}.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.2, 3.0), sharex=True, layout="constrained")
    colours = model_colours(list(runs))
    for label, (train, evals) in runs.items():
        left.plot([r["iter"] for r in train], [r["loss"] for r in train], color=colours[label], label=label)
        right.plot([r["iter"] for r in evals], [100 * r["miou"] for r in evals], color=colours[label], marker="o",
                   markersize=3, label=label)
    left.set(title="Training loss", xlabel="step", ylabel="training loss (mean of the log window)", yscale="log")
    right.set(title="Validation mIoU", xlabel="step", ylabel="mIoU (%)", ylim=(0, None))
    right.legend(loc="lower right", frameon=True, fontsize="small")
    if caption:
        fig.suptitle(caption, fontsize="small")
    return fig


# ----------------------------------------------------------------------------- ablation (SPEC §3.5)


@dataclass
class AblationPanel:
    """One model's unit × class matrix of IoU changes (percentage points), mIoU change in column 0."""

    title: str
    units: list[str]
    change: np.ndarray  # (U, 1 + K)


@styled
def plot_ablation(panels: Sequence[AblationPanel], columns: Sequence[str], caption: str) -> plt.Figure:
    """One heatmap per model, units down, "mIoU" then the classes across; red = the IoU falls when the
    unit is removed, blue = it rises; one colour scale, symmetric about 0, for every panel; values printed
    when the matrix is small enough to read them."""
    limit = max(1e-9, max(float(np.nanmax(np.abs(p.change))) if np.isfinite(p.change).any() else 0 for p in panels))
    width = max(4.5, 0.42 * len(columns) + 2.2)
    heights = [max(1.2, 0.3 * len(p.units) + 0.9) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, sum(heights) + 0.8), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    image = None
    for ax, panel in zip(axes[:, 0], panels):
        image = ax.imshow(panel.change, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.grid(False)
        ax.set_yticks(range(len(panel.units)), panel.units, fontsize="x-small")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize="x-small")
        ax.axvline(0.5, color="0.2", linewidth=1)
        ax.set_title(panel.title, fontsize="small")
        if panel.change.size <= 400:
            for (u, c), value in np.ndenumerate(panel.change):
                if np.isfinite(value):
                    ax.text(c, u, f"{value:.1f}", ha="center", va="center", fontsize=5,
                            color="white" if abs(value) > 0.6 * limit else "0.15")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="IoU change (points)", shrink=0.8)
    fig.suptitle(caption, fontsize="small")
    return fig
