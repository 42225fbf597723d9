"""PCA segmentation of a model's patch tokens, Z_0 (decoder input) versus Z_L1 (SPEC.md §3.2).

``analyze_pca(traces)`` segments every traced image's tokens at a few layers by PCA alone and scores
each segmentation against the model's prediction and the ground truth (ARI, NMI, Hungarian-matched
mIoU). The layers (``sources``) are named:

- ``"Z_L1"`` (``--layers L1``): the patch embeddings the mask head compares with Q̂ (``Trace.embeddings``:
  after ``decoder_norm`` for DEPICT-SA, ``snorm`` for DEPICT-CA; after ``proj_patch`` for Segmenter);
- a token stage of the residual stream, by number j or name: ``0`` = ``"input"`` (Z_0), ``3`` =
  ``"mssa3"`` (the tokens after layer 3, *before* the final LayerNorm), ...

Default ``[0, "L1"]``: Z_0 against Z_L1. The paper's claim is that Z_L1 segments far better than Z_0;
judge it against the ground truth, since the prediction is computed from Z_L1 itself.

The ``"argmax"`` rule labels a token by its largest PCA coordinate, so it depends on the sign
convention of the principal directions (see :func:`depict_analysis.pca.pca_directions`);
``"kmeans"`` on the PCA coordinates is more robust.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from depict_analysis import plots
from depict_analysis.models.data import IGNORE_INDEX, make_palette
from depict_analysis.models.evaluate import require_positive
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.pca import (
    METHODS,
    choose_k,
    match_segments,
    pca_rgb,
    pca_segment,
    segmentation_scores,
    upsample_labels,
)
from depict_analysis.parts import Parts, per_batch, require_parts
from depict_analysis.results import Result, Stat
from depict_analysis.tracing import Trace, class_labels

SCORES = ("ari", "nmi", "miou")
REFERENCES = ("prediction", "ground_truth")
LAST = "L1"  # in a layer list: the mask head's patch embeddings
EMBEDDINGS = "Z_L1"  # their source name


# ------------------------------------------------------------------------------------------ layers


def parse_layers(text: str) -> list[int | str]:
    """``"0,L1"`` -> ``[0, "L1"]``; names stay names: ``"input,mssa3"`` (the CLI's ``--layers``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"layers takes comma-separated layer numbers, names or {LAST}, got {text!r}", arguments="layers")
    return [int(t) if t.isdigit() else t for t in items]


def resolve_layers(layers: Sequence[int | str] | None, token_names: Sequence[str]) -> list[str]:
    """Source names of ``layers``: j -> ``token_names[j]``, a token name as is, ``"L1"`` -> ``"Z_L1"``
    (None: ``[0, "L1"]``); repeats dropped."""
    spec = [0, LAST] if layers is None else list(layers)
    names = []
    for layer in spec:
        if layer == LAST:
            names.append(EMBEDDINGS)
        elif isinstance(layer, int) and 0 <= layer < len(token_names):
            names.append(token_names[layer])
        elif isinstance(layer, str) and layer in token_names:
            names.append(layer)
        else:
            raise ConfigError(f"layers must be numbers in 0..{len(token_names) - 1}, names "
                              f"({', '.join(token_names)}) or {LAST!r}, got {layer!r}")
    if not names:
        raise ConfigError("layers must name at least one layer")
    return list(dict.fromkeys(names))


def source_tokens(tr: Trace, source: str) -> Tensor:
    """The tokens (B, N, d) a source names: the mask head's embeddings, or a token stage by name."""
    return tr.embeddings if source == EMBEDDINGS else tr[f"tokens/{source}"]


def source_title(source: str, token_names: Sequence[str]) -> str:
    """How a figure names a source: $Z_0$ (decoder input), $Z_{L1}$ (mask head's input), or the stage."""
    if source == EMBEDDINGS:
        return "$Z_{L1}$ (mask head's input)"
    j = token_names.index(source)
    return "$Z_0$ (decoder input)" if j == 0 else f"$Z_{{{j}}}$ = {source} (pre-norm)"


# ------------------------------------------------------------------------------------------ one image


@dataclass
class PCAExample:
    """PCA segmentations of one image's tokens at several sources, kept for its figure.

    ``scores[reference][source] = {"ari", "nmi", "miou"}`` with reference "prediction" (the model's
    argmax) or "ground_truth" (when given and not all ignored); against the ground truth the
    prediction itself is also scored, as a yardstick (source "prediction").
    """

    path: str
    image: Tensor | None  # (3, H, W) in [0, 1]
    k: int
    sources: list[str]
    segments: Tensor  # (n_sources, H, W) int64 PCA segment ids in [0, k)
    rgb: Tensor  # (n_sources, 3, H, W) float64 in [0, 1]: first three PCA coordinates
    prediction: Tensor  # (H, W) int64 class ids
    ground_truth: Tensor | None  # (H, W) int64, IGNORE_INDEX = ignored
    scores: dict[str, dict[str, dict[str, float]]]


def segment_tokens(
    tokens: Tensor, grid: tuple[int, int], padded: tuple[int, int], size: tuple[int, int],
    k: int, method: str = "argmax", seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """PCA segmentation and RGB view of one image's tokens at one source, as pixel maps.

    tokens: (N, d) with N = h·w on ``grid``; ``padded``: the (padded) pixel size the grid covers;
    ``size`` = (H, W) <= padded. Returns segments (H, W) int64 and rgb (3, H, W) float64, on the CPU.
    """
    n = tokens.shape[0]
    if n < max(k, 3):
        raise InputError(f"the image gives only {n} patch tokens ({grid[0]}x{grid[1]}); need at least "
                         f"{max(k, 3)} for k={k} and the RGB view — use a larger image")
    H, W = size

    def to_pixels(values: Tensor) -> Tensor:  # (..., N) -> (..., H, W)
        return upsample_labels(values, grid, padded)[..., :H, :W].cpu()

    return to_pixels(pca_segment(tokens, k, method, seed)), to_pixels(pca_rgb(tokens).T)


def score_segments(
    segments: Tensor, sources: Sequence[str], prediction: Tensor, ground_truth: Tensor | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores of each source's segmentation (n_sources, H, W) against the prediction and the ground truth.

    See :class:`PCAExample` for the layout. A ground truth that is entirely ignored is left out.
    """
    refs = {"prediction": prediction}
    if ground_truth is not None and bool((ground_truth != IGNORE_INDEX).any()):
        refs["ground_truth"] = ground_truth
    scores = {ref: {source: segmentation_scores(seg, target) for source, seg in zip(sources, segments)}
              for ref, target in refs.items()}
    if "ground_truth" in scores:
        scores["ground_truth"]["prediction"] = segmentation_scores(prediction, ground_truth)
    return scores


def trace_examples(
    tr: Trace, sources: Sequence[str], k: int | None, method: str, seed: int, first_index: int = 0
) -> Iterator[PCAExample]:
    """The PCA segmentations of every image of one trace (``k`` None: ``choose_k`` of its prediction); an
    image without a path is called ``image<i>``, i counted from ``first_index``."""
    predictions = tr.prediction.cpu()
    size = tr.image_size
    patch = tr.model["patch_size"]
    padded = (tr.grid[0] * patch, tr.grid[1] * patch)
    tokens = {source: source_tokens(tr, source) for source in sources}
    for b in range(tr.num_images):
        kb = k or choose_k(predictions[b])
        maps = [segment_tokens(tokens[s][b], tr.grid, padded, size, kb, method, seed) for s in sources]
        segments, rgb = torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps])
        truth = tr.labels[b].cpu().clone() if tr.labels is not None else None
        yield PCAExample(
            path=tr.paths[b] if tr.paths else f"image{first_index + b}",
            image=tr.pixels[b].cpu().clone() if tr.pixels is not None else None,  # copies: a kept example holds one image, not the batch
            k=kb, sources=list(sources), segments=segments, rgb=rgb, prediction=predictions[b].clone(),
            ground_truth=truth, scores=score_segments(segments, sources, predictions[b], truth),
        )


# ------------------------------------------------------------------------------------------ the result


@dataclass
class PCASegmentation(Result):
    """PCA segmentation scores of one model over n images.

    ``scores[reference][source][score]`` is a ``Stat`` over the images scored against that reference
    (``scored[reference]``: their indices; the ground truth only where an image has one), for the
    sources ``sources`` (and, against the ground truth, "prediction"). ``examples``: the first few
    images' segmentations, for the per-image figures.

    ``summary()`` keys: ``model`` (variant), ``num_images``, ``first`` and ``last`` (the first and last
    source, by default "input" and "Z_L1"), ``mean_scores`` {reference: {source: {score: mean}}}.
    """

    name: ClassVar[str] = "pca-seg"

    model: dict[str, Any]
    settings: dict[str, Any]
    sources: list[str]
    token_names: list[str]
    images: list[str]
    k: np.ndarray  # (n,) segments per image
    scored: dict[str, list[int]]
    scores: dict[str, dict[str, dict[str, Stat]]]
    examples: list[PCAExample] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    palette: np.ndarray | None = None  # (K, 3) uint8
    score_figure: bool = True  # draw the score distributions (not when every image has a figure of its own)

    @property
    def label(self) -> str:
        return self.model["variant"]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def summary(self) -> dict[str, Any]:
        means = {ref: {source: {score: float(stat.mean) for score, stat in by_score.items()}
                       for source, by_score in by_source.items()} for ref, by_source in self.scores.items()}
        return {"model": self.label, "num_images": self.num_images, "first": self.sources[0],
                "last": self.sources[-1], "mean_scores": means}

    def image_scores(self) -> list[dict[str, dict[str, dict[str, float]]]]:
        """Every image's scores, laid out as ``PCAExample.scores``."""
        found: list[dict] = [{} for _ in self.images]
        for ref, indices in self.scored.items():
            for at, i in enumerate(indices):
                found[i][ref] = {source: {score: float(stat.per_image[at]) for score, stat in by_score.items()}
                                 for source, by_score in self.scores[ref].items()}
        return found

    def to_json(self) -> dict[str, Any]:
        summary = {ref: {source: {score: {"mean": float(stat.mean), "std": float(stat.std), "n": len(stat.per_image)}
                                  for score, stat in by_score.items()} for source, by_score in by_source.items()}
                   for ref, by_source in self.scores.items()}
        images = [{"path": path, "k": int(k), "scores": scores}
                  for path, k, scores in zip(self.images, self.k, self.image_scores())]
        return {"model": self.model, "settings": self.settings, "summary": summary, "images": images}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (image, reference, source): path, k, reference, source, ari, nmi, miou."""
        return [{"path": image["path"], "k": image["k"], "reference": ref, "source": source, **values}
                for image in self.to_json()["images"] for ref, by_source in image["scores"].items()
                for source, values in by_source.items()]

    def figures(self) -> dict[str, Figure]:
        return self.compare_figures([self.label], [self])

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["PCASegmentation"]) -> dict[str, Figure]:
        """``pca-seg``: the score distributions of every model (``score_figure``); ``pca-seg_<image>``:
        each example image, one row per model."""
        figures = {}
        if results[0].score_figure:
            figures[cls.name] = scores_figure(labels, results)
        for i, stem in enumerate(unique_names([e.path for e in results[0].examples])):
            rows = [(label, r, r.examples[i]) for label, r in zip(labels, results) if i < len(r.examples)]
            figures[f"{cls.name}_{stem}"] = pca_figure(rows)
        return figures


class PCAParts(Parts[PCASegmentation]):
    """``analyze_pca`` in parts (``depict_analysis.parts``): a part holds a batch's scores per image and
    the examples this process still keeps."""

    def __init__(self, layers: Sequence[int | str] | None = None, k: int | None = None, method: str = "argmax",
                 seed: int = 0, examples: int = 4, class_names: Sequence[str] | None = None,
                 palette: np.ndarray | None = None, score_figure: bool = True):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        require_positive(k=k)
        self.layers, self.k, self.method, self.seed, self.examples = layers, k, method, seed, examples
        self.class_names, self.palette, self.score_figure = class_names, palette, score_figure

    def part(self, tr: Trace) -> dict[str, Any]:
        sources = resolve_layers(self.layers, tr.token_names)
        take, images, kept = self.wanted(tr.num_images), [], []
        for b, example in enumerate(trace_examples(tr, sources, self.k, self.method, self.seed, self.seen)):
            images.append((example.path, example.k, example.scores))
            if b < take:
                kept.append(example)
        self.seen += tr.num_images
        return {"images": images, "examples": kept, "sources": sources, "model": tr.model, "token_names": tr.token_names}

    def finish(self, parts: Sequence[dict[str, Any]]) -> PCASegmentation:
        require_parts(parts)
        first = parts[0]
        paths, ks, per_image = zip(*[image for p in parts for image in p["images"]])
        scored = {ref: [i for i, s in enumerate(per_image) if ref in s] for ref in REFERENCES}
        scored = {ref: indices for ref, indices in scored.items() if indices}
        scores = {ref: {source: {score: Stat(np.array([per_image[i][ref][source][score] for i in indices]))
                                 for score in SCORES} for source in per_image[indices[0]][ref]}
                  for ref, indices in scored.items()}
        n_cls, sources = first["model"]["n_cls"], first["sources"]
        settings = {"method": self.method, "k": self.k or "auto (classes predicted, 2..8)", "layers": sources,
                    "seed": self.seed, "num_images": len(paths)}
        return PCASegmentation(
            model=first["model"], settings=settings, sources=sources, token_names=first["token_names"], images=list(paths),
            k=np.array(ks), scored=scored, scores=scores, examples=self.first_examples(parts),
            class_names=class_labels(self.class_names, n_cls),
            palette=_palette(self.palette, n_cls), score_figure=self.score_figure,
        )


@per_batch(PCAParts)
def analyze_pca(
    traces: Trace | Iterable[Trace],
    *,
    layers: Sequence[int | str] | None = None,
    k: int | None = None,
    method: str = "argmax",
    seed: int = 0,
    examples: int = 4,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    score_figure: bool = True,
) -> PCASegmentation:
    """PCA-segment every traced image's tokens at ``layers`` (see the module docstring) and score them.

    ``k`` defaults per image to ``choose_k`` of the model's prediction: the classes it predicts on at
    least 1 % of the image, clamped to 2..8, the same k for every source. Ground truth comes from the traces' ``labels``. The first ``examples`` images keep their
    segmentations for figures, drawn with ``class_names`` and ``palette`` (K, 3) uint8 (default:
    ``class i`` and ``make_palette``); ``score_figure`` adds the box plot of every image's scores.
    """
    return PCAParts(layers, k, method, seed, examples, class_names, palette, score_figure).run(traces)


def _palette(palette: Any, n_cls: int) -> np.ndarray:
    """``palette`` as (K, 3) uint8 class colours, checked; ``make_palette(K)`` when None."""
    if palette is None:
        return make_palette(n_cls)
    colours = np.asarray(palette)
    if colours.shape != (n_cls, 3) or not np.issubdtype(colours.dtype, np.integer) or colours.min() < 0 or colours.max() > 255:
        raise ConfigError(f"palette must be ({n_cls}, 3) integers in 0..255 (one colour per class), got shape {colours.shape}")
    return colours.astype(np.uint8)


# ------------------------------------------------------------------------------------------ figures


def colour_ids(segments: Tensor, prediction: Tensor, n_cls: int) -> Tensor:
    """Give every PCA segment a display id: its Hungarian-matched predicted class, or n_cls + i.

    segments: (n_sources, H, W); returns the same shape. The i-th unmatched segment of a source gets
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


def _row(label: str, result: PCASegmentation, example: PCAExample) -> tuple[plots.PCARow, list[tuple[str, np.ndarray]]]:
    """One model's row of a per-image figure, and the (class name, colour) pairs it shows."""
    names, palette = result.class_names, result.palette
    n_cls = len(names)
    greys = np.linspace(235, 160, example.k).round().astype(np.uint8)[:, None].repeat(3, axis=1)  # unmatched segments
    segment_palette = np.concatenate([palette, greys])
    ids = colour_ids(example.segments, example.prediction, n_cls)
    panels = [plots.PCAPanel(source_title(source, result.token_names), plots.palette_image(ids[i].numpy(), segment_palette),
                             example.rgb[i].permute(1, 2, 0).numpy(), _caption(example.scores, source))
              for i, source in enumerate(example.sources)]
    truth = example.ground_truth
    grey = np.full((*example.prediction.shape, 3), 0.5)  # a trace of normalised tensors keeps no pixels
    image = example.image.permute(1, 2, 0).numpy() if example.image is not None else grey
    row = plots.PCARow(
        label=f"{label}\n{example.k} segments", image=image, panels=panels,
        prediction=plots.palette_image(example.prediction.numpy(), palette),
        prediction_caption=_caption(example.scores, "prediction"),
        ground_truth=plots.palette_image(truth.numpy(), palette) if truth is not None else None,
    )
    present = torch.cat([example.prediction.flatten()] + ([truth.flatten()] if truth is not None else [])).unique().tolist()
    legend = [(names[c], palette[c]) for c in present if c < n_cls]
    legend += [("ignored", np.zeros(3, dtype=np.uint8))] if IGNORE_INDEX in present else []
    return row, legend


def pca_figure(rows: Sequence[tuple[str, PCASegmentation, PCAExample]]) -> Figure:
    """The per-image figure, one row per model: image | PCA segmentation and RGB view per source |
    prediction | ground truth. PCA segments take the colour of the predicted class they are
    Hungarian-matched to (unmatched: light greys); the legend lists the classes shown."""
    drawn = [_row(label, result, example) for label, result, example in rows]
    legend = list({(name, tuple(colour)): (name, colour) for _, pairs in drawn for name, colour in pairs}.values())
    method = rows[0][1].settings["method"]
    note = ("PCA segments take the colour of the predicted class they match (Hungarian); unmatched segments are "
            "light grey. " + ("Rule: argmax of PCA coordinates (sign-dependent; --method kmeans is more robust)."
                              if method == "argmax" else "Rule: k-means on the PCA coordinates."))
    return plots.pca_segmentation_figure([row for row, _ in drawn], legend,
                                         title=f"{Path(rows[0][2].path).name}: PCA segmentation ({method})", note=note)


def scores_figure(labels: Sequence[str], results: Sequence[PCASegmentation]) -> Figure:
    """Score distributions of every model's PCA segmentations, per source, against the prediction and the
    ground truth (with the prediction itself as a yardstick); one colour per model."""
    rows = [{"model": label, **row} for label, result in zip(labels, results) for row in result.rows()]
    sources = {}
    for result in results:
        sources |= {source: source_title(source, result.token_names).replace(" (", "\n(") for source in result.sources}
    sources["prediction"] = "model\nprediction"
    title = f"PCA segmentation ({results[0].settings['method']}) over {results[0].num_images} images"
    references = {"prediction": "vs model prediction", "ground_truth": "vs ground truth"}
    return plots.pca_scores_figure(rows, labels, sources, references, title)


def unique_names(paths: Sequence[str]) -> list[str]:
    """File stems, with ``-2``, ``-3`` … appended to repeats."""
    seen: dict[str, int] = {}
    names = []
    for stem in (Path(p).stem for p in paths):
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names
