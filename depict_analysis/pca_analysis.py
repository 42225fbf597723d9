"""PCA segmentation of a model's patch tokens, Z_0 (decoder input) versus Z_L1 (SPEC.md §3.2).

``pca_results(model, pixels)`` traces one batch and returns a :class:`PCAResult` per image: the PCA
segmentation of the tokens at each chosen layer (default: 0 and L1 = the last MSSA layer, which for
DEPICT-CA is the output of the MSSA stack), the first-three-components RGB view, the model's
prediction, and ARI / NMI / Hungarian-matched mIoU of every segmentation against the prediction and
the ground truth. The paper's claim is that Z_L1 segments far better than Z_0; :func:`summarize`
turns many images' scores into mean ± std per layer.

The ``"argmax"`` rule labels a token by its largest PCA coordinate, so it depends on the sign
convention of the principal directions (see :func:`depict_analysis.pca.pca_directions`);
``"kmeans"`` on the PCA coordinates is more robust.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from depict_analysis.models.errors import ConfigError, InputError
from depict_analysis import plots
from depict_analysis.inputs import Batch
from depict_analysis.pca import (
    METHODS,
    choose_k,
    match_segments,
    pca_rgb,
    pca_segment,
    segmentation_scores,
    upsample_labels,
)
from depict_analysis.inputs import image_progress
from depict_analysis.outputs import save_csv, save_figure, save_json
from depict_analysis.tracing import describe_model, trace
from depict_analysis.models.data import IGNORE_INDEX, DatasetError, class_info, load_image, load_label, make_palette
from depict_analysis.models.data.base import image_to_tensor
from depict_analysis.models.data.transforms import resize_image, resize_label
from depict_analysis.models.device import autocast

SCORES = ("ari", "nmi", "miou")
REFERENCES = ("prediction", "ground_truth")
LAST = "L1"  # stands for the last token-updating layer in a layer list


@dataclass
class PCAResult:
    """PCA segmentations of one image's tokens at several decoder layers.

    ``scores[reference][source] = {"ari", "nmi", "miou"}`` with reference "prediction" (the model's
    argmax) or "ground_truth" (when given and not all ignored); source ``layer_name(j)`` for each
    layer, and — against the ground truth only — "prediction" itself as a yardstick.
    """

    path: str
    image: Tensor  # (3, H, W) in [0, 1]
    k: int
    layers: list[int]  # indices into Trace.tokens
    num_layers: int  # L: the last token-updating layer
    segments: Tensor  # (n_layers, H, W) int64 PCA segment ids in [0, k)
    rgb: Tensor  # (n_layers, 3, H, W) float64 in [0, 1]: first three PCA coordinates
    prediction: Tensor  # (H, W) int64 class ids
    ground_truth: Tensor | None  # (H, W) int64, IGNORE_INDEX = ignored
    scores: dict[str, dict[str, dict[str, float]]]

    def rows(self) -> list[dict]:
        """Long-format score rows: one per (reference, source) with path, k, ari, nmi, miou."""
        return [
            {"path": self.path, "k": self.k, "reference": ref, "source": source, **values}
            for ref, by_source in self.scores.items()
            for source, values in by_source.items()
        ]


def layer_name(j: int) -> str:
    return f"Z_{j}"


def resolve_layers(layers: Sequence[int | str] | None, num_layers: int) -> list[int]:
    """Layer indices into ``Trace.tokens``: ints in [0, L], or "L1" for L; None -> [0, L] (deduplicated)."""
    spec = [0, LAST] if layers is None else list(layers)
    chosen = [num_layers if j == LAST else j for j in spec]
    bad = [j for j in chosen if not isinstance(j, int) or not 0 <= j <= num_layers]
    if bad or not chosen:
        raise ConfigError(f"layers must be integers in 0..{num_layers} or {LAST!r}, got {list(spec)}")
    return list(dict.fromkeys(chosen))


def parse_layers(text: str) -> list[int | str]:
    """``"0,L1"`` -> ``[0, "L1"]`` (the CLI's ``--layers``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not all(t == LAST or t.isdigit() for t in items):
        raise ConfigError(f"--layers takes comma-separated layer numbers or {LAST}, got {text!r}")
    return [t if t == LAST else int(t) for t in items]


def segment_tokens(
    tokens: Tensor, grid: tuple[int, int], padded: tuple[int, int], size: tuple[int, int],
    k: int, method: str = "argmax", seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """PCA segmentation and RGB view of one image's tokens at several layers, as pixel maps.

    tokens: (n_layers, N, d) with N = h·w on ``grid``; ``padded``: the (padded) pixel size the grid
    covers; ``size`` = (H, W) <= padded. Returns segments (n_layers, H, W) int64 and
    rgb (n_layers, 3, H, W) float64, on the CPU.
    """
    n = tokens.shape[1]
    if n < max(k, 3):
        raise InputError(f"the image gives only {n} patch tokens ({grid[0]}x{grid[1]}); need at least "
                         f"{max(k, 3)} for k={k} and the RGB view — use a larger image")
    H, W = size

    def to_pixels(values: Tensor) -> Tensor:  # (..., N) -> (..., H, W)
        return upsample_labels(values, grid, padded)[..., :H, :W].cpu()

    segments = to_pixels(pca_segment(tokens, k, method, seed))
    rgb = torch.stack([to_pixels(c.T) for c in pca_rgb(tokens)])
    return segments, rgb


def score_segments(
    segments: Tensor, layers: Sequence[int], prediction: Tensor, ground_truth: Tensor | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores of each layer's segmentation (n_layers, H, W) against the prediction and the ground truth.

    See :class:`PCAResult` for the layout. A ground truth that is entirely ignored is left out.
    """
    refs = {"prediction": prediction}
    if ground_truth is not None and bool((ground_truth != IGNORE_INDEX).any()):
        refs["ground_truth"] = ground_truth
    scores = {
        ref: {layer_name(j): segmentation_scores(seg, target) for j, seg in zip(layers, segments)}
        for ref, target in refs.items()
    }
    if "ground_truth" in scores:
        scores["ground_truth"]["prediction"] = segmentation_scores(prediction, ground_truth)
    return scores


def pca_results(
    model: nn.Module,
    pixels: Tensor,
    labels: Tensor | None = None,
    paths: Sequence[str] | None = None,
    *,
    layers: Sequence[int | str] | None = None,
    k: int | None = None,
    method: str = "argmax",
    seed: int = 0,
    amp: bool = False,
) -> list[PCAResult]:
    """Trace a batch and PCA-segment every image's tokens at ``layers`` (see :func:`resolve_layers`).

    pixels: (B, 3, H, W) in [0, 1], any H, W (the model pads); labels: (B, H, W) ground truth or None.
    ``k`` defaults per image to ``choose_k`` of the model's prediction (2..8), the same k for
    every layer. The forward pass runs on the model's device (float32; bf16 autocast with ``amp`` on
    CUDA); results live on the CPU.
    """
    device = next(model.parameters()).device
    with autocast(device, amp):
        tr = trace(model, model.normalize(pixels.to(device)))
    chosen = resolve_layers(layers, tr.num_layers)
    predictions = tr.masks.argmax(dim=1).cpu()
    size = tuple(pixels.shape[-2:])
    padded = (tr.grid[0] * model.patch_size, tr.grid[1] * model.patch_size)
    paths = list(paths) if paths is not None else [f"image{b}" for b in range(len(pixels))]
    results = []
    for b, path in enumerate(paths):
        kb = k or choose_k(predictions[b])
        tokens = torch.stack([tr.tokens[j][b] for j in chosen])
        segments, rgb = segment_tokens(tokens, tr.grid, padded, size, kb, method, seed)
        gt = labels[b].cpu() if labels is not None else None
        scores = score_segments(segments, chosen, predictions[b], gt)
        results.append(
            PCAResult(path, pixels[b].cpu(), kb, chosen, tr.num_layers, segments, rgb, predictions[b], gt, scores)
        )
    return results


def summarize(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Mean, (population) std and count of each score: ``{reference: {source: {score: {mean, std, n}}}}``."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["reference"], row["source"]), []).append(row)
    summary: dict = {}
    for (ref, source), group in groups.items():
        values = {s: np.array([row[s] for row in group]) for s in SCORES}
        summary.setdefault(ref, {})[source] = {
            s: {"mean": float(v.mean()), "std": float(v.std()), "n": len(v)} for s, v in values.items()
        }
    return summary


def analyze_pca(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    layers: Sequence[int | str] | None = None,
    k: int | None = None,
    method: str = "argmax",
    seed: int = 0,
    examples: int = 4,
    total: int | None = None,
    progress: bool = True,
    amp: bool = False,
) -> dict:
    """PCA segmentation scores over a stream of image batches (any sizes; see :func:`pca_results`).

    Returns ``{"settings", "images": [{path, k, scores}], "rows": long-format score rows,
    "summary": summarize(rows), "examples": the first ``examples`` PCAResults (for figures)}``.
    ``total`` (number of images) sizes the progress bar.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    images, rows, kept = [], [], []
    with image_progress(total, "PCA segmentation", progress) as advance:
        for batch in batches:
            results = pca_results(
                model, batch.pixels, batch.labels, batch.paths, layers=layers, k=k, method=method, seed=seed, amp=amp
            )
            for result in results:
                images.append({"path": result.path, "k": result.k, "scores": result.scores})
                rows += result.rows()
            kept += results[: max(0, examples - len(kept))]
            advance(len(results))
    if not images:
        raise InputError("no images to analyse")
    settings = {
        "method": method, "k": k or "auto (classes predicted, 2..8)", "layers": results[0].layers,
        "num_layers": results[0].num_layers, "seed": seed, "num_images": len(images),
        "model": describe_model(model),
    }
    return {"settings": settings, "images": images, "rows": rows, "summary": summarize(rows), "examples": kept}


# ------------------------------------------------------------------------------------------ inputs


def image_at_scale(path: str | Path, max_short_side: int, gt: str | Path | None = None) -> Batch:
    """One image (any size and mode) as a Batch of one, with its ground truth when given.

    Images whose short side exceeds ``max_short_side`` are resized (aspect kept) so that it equals it
    — the short-side resize of the evaluation protocol, and a bound on the token count; smaller
    images keep their size. The label map must have the image's size (nearest-neighbour resize).
    """
    image = np.array(load_image(path))
    label = load_label(gt) if gt is not None else None
    if label is not None and label.shape != image.shape[:2]:
        raise DatasetError(f"ground truth {gt} is {label.shape[1]}x{label.shape[0]} but image {path} "
                           f"is {image.shape[1]}x{image.shape[0]}")
    H, W = image.shape[:2]
    if min(H, W) > max_short_side:
        scale = max_short_side / min(H, W)
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        image = resize_image(image, size)
        label = resize_label(label, size) if label is not None else None
    pixels = image_to_tensor(image)[None]
    labels = torch.from_numpy(label)[None] if label is not None else None
    return Batch(pixels, labels, [str(path)])


def single_images(
    paths: Sequence[str | Path], max_short_side: int, gts: Sequence[str | Path] | None = None
) -> tuple[int, Iterator[Batch]]:
    """(number of images, iterator of one-image Batches at their own scale), like ``image_batches``."""
    if gts and len(gts) != len(paths):
        raise InputError(f"got {len(gts)} ground-truth maps for {len(paths)} images; give one --gt per image, in order")
    pairs = list(zip(paths, gts or [None] * len(paths)))
    return len(pairs), (image_at_scale(p, max_short_side, g) for p, g in pairs)


# ------------------------------------------------------------------------------------------ figures


def checkpoint_dataset(meta: dict) -> str | None:
    """The dataset a checkpoint was trained on, when its metadata says (ours or an official variant.yml)."""
    official = (meta.get("variant") or {}).get("dataset_kwargs") or {}
    name = meta.get("dataset") or (meta.get("train_config") or {}).get("dataset") or official.get("dataset")
    return name if isinstance(name, str) else None


def class_legend(n_cls: int, datasets: Iterable[str | None] = ()) -> tuple[list[str], np.ndarray]:
    """Class names and palette (n_cls, 3) uint8 of the first dataset with exactly ``n_cls`` classes,
    else ``class 0 …`` with ``make_palette``."""
    for name in filter(None, datasets):
        try:
            names, palette = class_info(name)
        except DatasetError:
            continue
        if len(names) == n_cls:
            return names, palette
    return [f"class {i}" for i in range(n_cls)], make_palette(n_cls)


def colour_ids(segments: Tensor, prediction: Tensor, n_cls: int) -> Tensor:
    """Give every PCA segment a display id: its Hungarian-matched predicted class, or n_cls + i.

    segments: (n_layers, H, W); returns the same shape. The i-th unmatched segment of a layer gets
    ``n_cls + i``, so a palette of n_cls class colours followed by k extra colours shows them all.
    """
    out = torch.empty_like(segments)
    for layer, seg in enumerate(segments):
        match = match_segments(seg, prediction)
        extra = iter(range(n_cls, n_cls + int(seg.max()) + 1))
        for s in seg.unique().tolist():
            out[layer][seg == s] = match[s] if s in match else next(extra)
    return out


def _caption(scores: dict, source: str) -> str:
    short = {"prediction": "pred", "ground_truth": "GT"}
    return "\n".join(
        f"vs {short[ref]}: ARI {v['ari']:.2f} NMI {v['nmi']:.2f} mIoU {v['miou']:.2f}"
        for ref, by_source in scores.items()
        if (v := by_source.get(source))
    )


def pca_figure(result: PCAResult, class_names: Sequence[str], palette: np.ndarray, method: str) -> Figure:
    """The per-image figure: image | PCA segmentation per layer (RGB view below) | prediction | GT.

    PCA segments are coloured like the predicted class they are Hungarian-matched to (unmatched:
    light greys).
    """
    n_cls = len(class_names)
    extra = np.linspace(235, 160, result.k).round().astype(np.uint8)[:, None].repeat(3, axis=1)
    full_palette = np.concatenate([palette, extra])
    ids = colour_ids(result.segments, result.prediction, n_cls)

    def title(j: int) -> str:
        where = "decoder input" if j == 0 else f"after layer {j}" + (" = L1" if j == result.num_layers else "")
        return f"$Z_{{{j}}}$ ({where})"

    panels = [
        plots.PCAPanel(title(j), plots.palette_image(ids[i].numpy(), full_palette),
                       result.rgb[i].permute(1, 2, 0).numpy(), _caption(result.scores, layer_name(j)))
        for i, j in enumerate(result.layers)
    ]
    gt = result.ground_truth
    present = torch.cat([result.prediction.flatten()] + ([gt.flatten()] if gt is not None else [])).unique().tolist()
    legend = [(class_names[c], palette[c]) for c in present if c < n_cls]
    legend += [("ignored", np.zeros(3, dtype=np.uint8))] if IGNORE_INDEX in present else []
    note = ("PCA segments take the colour of the predicted class they match (Hungarian); "
            "unmatched segments are light grey. "
            + ("Rule: argmax of PCA coordinates (sign-dependent; --method kmeans is more robust)."
               if method == "argmax" else "Rule: k-means on the PCA coordinates."))
    return plots.pca_segmentation_figure(
        image=result.image.permute(1, 2, 0).numpy(),
        panels=panels,
        prediction=plots.palette_image(result.prediction.numpy(), palette),
        ground_truth=plots.palette_image(gt.numpy(), palette) if gt is not None else None,
        prediction_caption=_caption(result.scores, "prediction"),
        legend=legend,
        title=f"{Path(result.path).name}: {result.k} PCA segments per layer ({method})",
        note=note,
    )


def scores_figure(result: dict) -> Figure:
    """Score distributions of an :func:`analyze_pca` result: each layer's PCA segmentation side by side,
    against the prediction and the ground truth (with the prediction itself as a yardstick)."""
    settings = result["settings"]
    sources = {layer_name(j): f"$Z_{{{j}}}$ PCA" for j in settings["layers"]} | {"prediction": "model prediction"}
    references = {"prediction": "vs model prediction", "ground_truth": "vs ground truth"}
    title = (f"PCA segmentation ({settings['method']}) over {settings['num_images']} images: "
             f"{settings['model']['variant']}")
    return plots.pca_scores_figure(result["rows"], sources, references, title)


# ------------------------------------------------------------------------------------------ files

NAME = "pca-seg"


def unique_names(paths: Sequence[str]) -> list[str]:
    """File stems, with ``-2``, ``-3`` … appended to repeats."""
    seen: dict[str, int] = {}
    names = []
    for stem in (Path(p).stem for p in paths):
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def write_pca(
    result: dict, out: str | Path, class_names: Sequence[str], palette: np.ndarray, *, settings: dict, score_figure: bool = True
) -> list[Path]:
    """``pca-seg_<image>.png/.pdf`` per example, ``pca-seg.png/.pdf`` (score distributions, when
    ``score_figure``), ``pca-seg.json`` (settings updated with ``settings``, summary, per-image scores)
    and ``pca-seg.csv`` (score rows) in ``out``."""
    out = Path(out)
    written = []
    for name, example in zip(unique_names([e.path for e in result["examples"]]), result["examples"]):
        written += save_figure(pca_figure(example, class_names, palette, result["settings"]["method"]), out, f"{NAME}_{name}")
    if score_figure:
        written += save_figure(scores_figure(result), out, NAME)
    report = {"settings": result["settings"] | settings, "summary": result["summary"], "images": result["images"]}
    return written + [save_json(out / f"{NAME}.json", report), save_csv(out / f"{NAME}.csv", result["rows"])]
