"""Attention maps over the image: where each class query and each head look (MSSA, MSCA, Segmenter, CBT, ToST).

``trace(model, images, attention=True)`` records every layer's map; its shape says how to read it
(N = h·w patches on the grid, K classes, T = N + K):

==============  ====================  ===================================================================
reading         map                   queries drawn over the patch grid
==============  ====================  ===================================================================
``joint``       (B, h, T, T)          rows N.. : each class token (DEPICT-SA's MSSA, Segmenter's blocks);
                                      with a pixel, also the row of the patch under it
``patch``       (B, h, N, N)          the row of the patch under the pixel (DEPICT-CA's MSSA)
``cross``       (B, h, K, N)          each class query (DEPICT-CA's MSCA)
``contract``    (B, h, R, T)          the representative of the pooled cell under the pixel (CBT, r × r cells)
``membership``  (B, h, T)             each head's membership of every patch (ToST; no query)
==============  ====================  ===================================================================

Maps are attention probabilities as the layer computes them (rows sum to 1 over all T keys; a
class token's row also spends some on the class tokens: ``patch_mass`` is its share on patches).
The figures upsample each grid map bilinearly to the image and overlay it, one row per head.

For each class query the result measures how much of its attention over the patches lands on the
patches of its own class (``own_share``: majority label per patch as in ``class_rates``, by ground
truth when there are labels, else by prediction), against the share those patches have of the
image (``chance``: what uniform attention would give); per image the mean over the classes present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from depict_analysis import plots
from depict_analysis.class_rates import patch_classes
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.parts import Parts, per_batch, require_parts
from depict_analysis.results import Result
from depict_analysis.tracing import Trace, class_labels
from depict_analysis.uncertainty import Bootstrap, Interval, intervals, mean_interval, warn_sample_size

SHOWN_CLASSES = 4  # classes drawn per example image unless chosen


@dataclass
class LayerAttention:
    """One layer's map of a batch, read over the patch grid (see the module docstring)."""

    reading: str
    classes: Tensor | None  # (B, h, K, N): each class query's attention on the patches
    point: Tensor | None  # (B, h, N): the pixel's query (or ToST's membership) on the patches


def reading_of(shape: Sequence[int], n_patches: int, n_cls: int) -> str:
    """Which reading a map of ``shape`` takes (the table in the module docstring)."""
    N, T = n_patches, n_patches + n_cls
    if len(shape) == 3 and shape[-1] in (N, T):
        return "membership"
    if len(shape) == 4:
        rows, cols = shape[-2:]
        if rows == cols == T:
            return "joint"
        if rows == cols == N:
            return "patch"
        if (rows, cols) == (n_cls, N):
            return "cross"
        if cols == T and round(rows**0.5) ** 2 == rows:
            return "contract"
    raise InputError(f"an attention map of shape {tuple(shape)} fits no reading for {N} patches and {n_cls} classes")


def pixel_patch(pixel: tuple[int, int], grid: tuple[int, int], patch: int) -> tuple[int, int]:
    """The (row, column) on the patch grid of the pixel (y, x)."""
    y, x = pixel
    row, col = y // patch, x // patch
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ConfigError(f"pixel {pixel} lies outside the {grid[0] * patch} × {grid[1] * patch} image")
    return row, col


def representative_cell(row: int, col: int, grid: tuple[int, int], cells: int) -> int:
    """The r × r adaptive-pooling cell (row-major) whose window holds patch (row, col): the window of
    cell i along a side of g patches starts at ⌊i·g/r⌋, so patch k lies in cell ⌊k·r/g⌋."""
    r = round(cells**0.5)
    return (row * r // grid[0]) * r + col * r // grid[1]


def read_attention(a: Tensor, grid: tuple[int, int], n_cls: int, point: tuple[int, int] | None) -> LayerAttention:
    """One layer's map ``a`` -> its class queries' and point query's maps over the N patches.

    ``point``: (row, column) on the patch grid of the pixel to query, or None (then joint maps get no
    point map, and the others query the centre).
    """
    N = grid[0] * grid[1]
    reading = reading_of(a.shape, N, n_cls)
    row, col = point if point is not None else (grid[0] // 2, grid[1] // 2)
    index = row * grid[1] + col
    if reading == "joint":
        return LayerAttention(reading, a[:, :, N:, :N], a[:, :, index, :N] if point is not None else None)
    if reading == "patch":
        return LayerAttention(reading, None, a[:, :, index, :N])
    if reading == "cross":
        return LayerAttention(reading, a, None)
    if reading == "contract":
        return LayerAttention(reading, None, a[:, :, representative_cell(row, col, grid, a.shape[-2]), :N])
    return LayerAttention(reading, None, a[..., :N])


def own_class_share(classes: Tensor, patch_class: Tensor) -> Tensor:
    """Per image and head, the mean over the classes present of the share of class c's attention on
    the patches that are of class c. ``classes`` (B, h, K, N) maps, ``patch_class`` (B, N) with
    −1 = no class -> (B, h) float64 (NaN for an image without classes)."""
    onehot = _onehot(patch_class, classes.shape[2])  # (B, N, K)
    a = classes.double()
    own = torch.einsum("bhkn,bnk->bhk", a, onehot) / a.sum(-1)  # (B, h, K)
    present = onehot.sum(1) > 0  # (B, K)
    return (own * present[:, None]).sum(-1) / present.sum(-1)[:, None]


def chance_share(patch_class: Tensor, n_cls: int) -> Tensor:
    """What uniform attention would give ``own_class_share``: per image the mean over the classes
    present of their share of the patches, (B, N) -> (B,) float64."""
    onehot = _onehot(patch_class, n_cls)
    present = onehot.sum(1) > 0
    return (onehot.sum(1) / patch_class.shape[1] * present).sum(-1) / present.sum(-1)


def _onehot(patch_class: Tensor, n_cls: int) -> Tensor:
    """(B, N) class ids, −1 = none -> (B, N, K) float64 indicators."""
    return F.one_hot(patch_class.clamp(min=0), n_cls).double() * (patch_class >= 0)[..., None]


@dataclass
class Example:
    """An image shown in the figures, with the maps drawn for it."""

    path: str
    pixels: np.ndarray  # (H, W, 3) float in [0, 1]
    shown: list[int]  # the class ids drawn, in order
    classes: dict[str, np.ndarray]  # layer -> (h, K, gh, gw): every class query's map
    point: dict[str, np.ndarray]  # layer -> (h, gh, gw)


class LazyFigures(Mapping):
    """``{figure name: Figure}`` whose figures are drawn when looked up: ``Result.save`` saves and closes each
    before the next is drawn (an attention run has a figure per model, layer and example image)."""

    def __init__(self, builders: dict[str, Callable[[], Figure]]):
        self.builders = builders

    def __getitem__(self, name: str) -> Figure:
        return self.builders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.builders)

    def __len__(self) -> int:
        return len(self.builders)


@dataclass
class AttentionMaps(Result):
    """Attention maps of n images of one model at the chosen layers and heads (see the module docstring).

    ``summary()`` keys: ``model`` (variant), ``num_images``, ``statistic``, ``classes_by``, ``chance`` (an
    interval), ``layers`` {class-query layer: {reading, own_share, lift (own share − chance), per_head}},
    ``warnings``.
    """

    name: ClassVar[str] = "attention"
    model: dict[str, Any]
    settings: dict
    images: list[str]
    class_names: list[str]
    layers: list[str]
    readings: dict[str, str]  # layer -> reading
    heads: dict[str, list[int]]  # layer -> the heads analysed
    own_share: dict[str, np.ndarray]  # class-query layers: (n, h) mean share of a class's attention on its patches
    chance: np.ndarray  # (n,) mean share of the patches of the classes present
    examples: list[Example]
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    @property
    def label(self) -> str:
        return self.model["variant"]

    @property
    def class_layers(self) -> list[str]:
        return [layer for layer in self.layers if layer in self.own_share]

    def share(self, layer: str) -> Interval:
        """A layer's own-class share, mean over heads then over images, with its interval."""
        return mean_interval(self.own_share[layer].mean(axis=1), self.bootstrap)

    def lift(self, layer: str) -> Interval:
        """Own-class share minus chance, per image then averaged, with its interval."""
        return mean_interval(self.own_share[layer].mean(axis=1) - self.chance, self.bootstrap)

    def share_chance(self) -> Interval:
        """What uniform attention would give the own-class share, mean over images, with its interval."""
        return mean_interval(self.chance, self.bootstrap)

    def warnings(self) -> list[str]:
        if not self.class_layers:
            return []
        return warn_sample_size(len(self.images), self.bootstrap.level, what=f"attention of {self.label}")

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.label,
            "num_images": len(self.images),
            "statistic": "share of a class query's attention over the patches that lands on its own class's patches, "
                         "mean over the classes present and the heads, then over the images",
            "classes_by": self.settings["classes_by"],
            "chance": self.share_chance().to_json(),
            "layers": {layer: {"reading": self.readings[layer], "own_share": self.share(layer).to_json(),
                               "lift": self.lift(layer).to_json(),
                               "per_head": [i.to_json() for i in intervals(self.own_share[layer], self.bootstrap)]}
                       for layer in self.class_layers},
            "warnings": self.warnings(),
        }

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "images": self.images, "class_names": self.class_names,
                "readings": self.readings, "heads": self.heads, "summary": self.summary(),
                "own_share": self.own_share, "chance": self.chance,
                "examples": [{"path": e.path, "shown": [self.class_names[c] for c in e.shown]} for e in self.examples],
                "maps": f"{self.name}.npz: <layer>/classes (E, h, K, gh, gw), <layer>/point (E, h, gh, gw), pixels (E, H, W, 3)"}

    def rows(self) -> list[dict]:
        """One row per (image, class-query layer, head): own_share and chance."""
        return [{"image": image, "layer": layer, "head": head, "own_share": self.own_share[layer][i, k], "chance": self.chance[i]}
                for layer in self.class_layers for i, image in enumerate(self.images) for k, head in enumerate(self.heads[layer])]

    def arrays(self) -> dict[str, np.ndarray]:
        """The example images (``pixels``, uint8) and their maps on the patch grid, by layer."""
        if not self.examples:
            return {}
        arrays = {"pixels": np.stack([(255 * e.pixels).round().astype(np.uint8) for e in self.examples])}
        for layer in self.layers:
            for key in ("classes", "point"):
                maps = [getattr(e, key)[layer] for e in self.examples if layer in getattr(e, key)]
                if maps:
                    arrays[f"{layer}/{key}"] = np.stack(maps)
        return arrays

    def figures(self) -> Mapping[str, Figure]:
        return self.compare_figures([self.label], [self])

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["AttentionMaps"]) -> Mapping[str, Figure]:
        """``attention``: each model's own-class share per layer and head (models with class queries);
        ``attention[_<label>]_<layer>_<i>``: each example image at each layer, one row per head, one column
        per query. Drawn when looked up (``LazyFigures``)."""
        builders: dict[str, Callable[[], Figure]] = {}
        shown = [(label, r) for label, r in zip(labels, results) if r.class_layers]
        if shown:
            builders[cls.name] = lambda: plots.plot_attention_shares(
                [r.share_panel(label) for label, r in shown], results[0]._caption())
        for label, result in zip(labels, results):
            prefix = f"{cls.name}_{label}" if len(results) > 1 else cls.name
            for i, example in enumerate(result.examples):
                for layer in result.layers:
                    builders[f"{prefix}_{layer}_{i}"] = partial(result.example_figure, label, example, layer)
        return LazyFigures(builders)

    def share_panel(self, label: str) -> plots.AttentionSharePanel:
        """What ``plots.plot_attention_shares`` draws of this model."""
        return plots.AttentionSharePanel(
            f"{label} ({self.model['decoder']})", self.class_layers, [self.heads[layer] for layer in self.class_layers],
            [intervals(self.own_share[layer], self.bootstrap) for layer in self.class_layers],
            [self.share(layer) for layer in self.class_layers], self.share_chance())

    def example_figure(self, label: str, example: Example, layer: str) -> Figure:
        """One example image at one layer: one row per head, one column per query."""
        columns = []
        if layer in example.classes:
            columns += [(self.class_names[c], example.classes[layer][:, c]) for c in example.shown]
        if layer in example.point:
            columns.append((POINT_TITLES[self.readings[layer]], example.point[layer]))
        title = f"{label} {layer} ({self.readings[layer]}): {Path(example.path).name}"
        return plots.attention_figure(example.pixels, columns, self.heads[layer], self._marker(layer, example.pixels), title)

    def _marker(self, layer: str, pixels: np.ndarray) -> list[int] | None:
        """The pixel a layer's point map queries: the one asked for, else the centre; none for maps
        without a point query (joint maps have one only when a pixel is asked for)."""
        reading, pixel = self.readings[layer], self.settings["pixel"]
        if reading in ("cross", "membership") or (reading == "joint" and pixel is None):
            return None
        return pixel or [pixels.shape[0] // 2, pixels.shape[1] // 2]

    def _caption(self) -> str:
        return (f"{len(self.images)} images, classes by {self.settings['classes_by'].replace('_', ' ')}; "
                f"{100 * self.bootstrap.level:g} % bootstrap intervals")


POINT_TITLES = {"joint": "patch at pixel", "patch": "patch at pixel", "contract": "representative at pixel",
                "membership": "membership"}


def classes_to_show(patch_class: Tensor, chosen: Sequence[int] | None) -> list[int]:
    """The chosen classes, else those of the image's patches by area, the largest first (up to SHOWN_CLASSES).
    ``patch_class`` (N,) with −1 = none."""
    if chosen is not None:
        return list(chosen)
    counts = torch.bincount(patch_class[patch_class >= 0], minlength=1)
    return [int(c) for c in counts.argsort(descending=True) if counts[c] > 0][:SHOWN_CLASSES]


def example(tr: Trace, b: int, reads: dict[str, LayerAttention], heads: dict[str, list[int]], shown: list[int]) -> Example:
    """Image ``b`` of a traced batch with its maps at every layer read, on the (gh, gw) grid."""
    gh, gw = tr.grid

    def grid_maps(maps: Tensor, layer: str) -> np.ndarray:  # (h, [K,] N) -> (h', [K,] gh, gw)
        return maps[heads[layer]].unflatten(-1, (gh, gw)).cpu().numpy()

    return Example(
        tr.paths[b] if tr.paths else f"image {b}",
        tr.pixels[b].permute(1, 2, 0).cpu().numpy().copy(),  # a copy: a kept example holds one image, not the batch
        shown,
        {layer: grid_maps(r.classes[b], layer) for layer, r in reads.items() if r.classes is not None},
        {layer: grid_maps(r.point[b], layer) for layer, r in reads.items() if r.point is not None},
    )


class AttentionParts(Parts[AttentionMaps]):
    """``analyze_attention`` in parts (``depict_analysis.parts``): a part holds a batch's shares per image
    and the examples this process still keeps."""

    def __init__(self, layers: Sequence[str] | None = None, heads: Sequence[int] | None = None,
                 classes: Sequence[int | str] | None = None, pixel: tuple[int, int] | None = None, examples: int = 2,
                 class_names: Sequence[str] | None = None, bootstrap: Bootstrap | None = None):
        super().__init__()
        self.layers, self.heads, self.classes, self.pixel, self.examples = layers, heads, classes, pixel, examples
        self.class_names, self.bootstrap = class_names, bootstrap or Bootstrap()
        self.class_ids: list[int] | None = None

    def part(self, tr: Trace) -> dict[str, Any]:
        if not tr.attention:
            raise InputError("this trace has no attention maps: trace with attention=True")
        K, patch = tr.model["n_cls"], tr.model["patch_size"]
        names = list(self.layers) if self.layers is not None else list(tr.attention)
        missing = [name for name in names if name not in tr.attention]
        if missing:
            raise ConfigError(f"no attention map for layer {missing[0]}; layers with maps: {', '.join(tr.attention)}")
        if self.classes is not None and self.class_ids is None:
            self.class_ids = class_ids(self.classes, list(self.class_names) if self.class_names is not None
                                       else [f"class {c}" for c in range(K)])
        point = pixel_patch(self.pixel, tr.grid, patch) if self.pixel is not None else None
        patch_class = patch_classes((tr.labels if tr.labels is not None else tr.prediction).to(tr.masks.device), patch, K)
        reads = {name: read_attention(tr.attention[name], tr.grid, K, point) for name in names}
        readings, used, own = {}, {}, {}
        for name, read in reads.items():
            readings[name] = read.reading
            used[name] = _heads(name, (read.classes if read.classes is not None else read.point).shape[1], self.heads)
            if read.classes is not None:
                own[name] = own_class_share(read.classes[:, used[name]], patch_class).cpu().numpy()
        drawn = [example(tr, b, reads, used, classes_to_show(patch_class[b], self.class_ids))
                 for b in range(self.wanted(tr.num_images) if tr.pixels is not None else 0)]
        return {"own": own, "chance": chance_share(patch_class, K).cpu().numpy(), "examples": drawn,
                "paths": self.names(tr), "readings": readings, "heads": used, "model": tr.model,
                "labelled": tr.labels is not None}

    def finish(self, parts: Sequence[dict[str, Any]]) -> AttentionMaps:
        require_parts(parts)
        first, last = parts[0], parts[-1]
        paths, drawn = [path for p in parts for path in p["paths"]], self.first_examples(parts)
        readings, used = last["readings"], last["heads"]
        own = {name: np.concatenate([p["own"][name] for p in parts]) for name in first["own"]}
        settings = {"layers": list(readings), "heads": used, "pixel": list(self.pixel) if self.pixel is not None else None,
                    "examples": len(drawn), "classes_by": "ground_truth" if first["labelled"] else "prediction",
                    "num_images": len(paths), "bootstrap": self.bootstrap.describe()}
        return AttentionMaps(first["model"], settings, paths, class_labels(self.class_names, first["model"]["n_cls"]),
                             list(readings), readings, used, own, np.concatenate([p["chance"] for p in parts]), drawn,
                             self.bootstrap)


@per_batch(AttentionParts)
def analyze_attention(
    traces: Trace | Iterable[Trace],
    *,
    layers: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    classes: Sequence[int | str] | None = None,
    pixel: tuple[int, int] | None = None,
    examples: int = 2,
    class_names: Sequence[str] | None = None,
    bootstrap: Bootstrap | None = None,
) -> AttentionMaps:
    """Attention maps and own-class shares of one model's traces, recorded with ``attention=True``
    (``trace_batches(model, batches, attention=True)``, ``Trace.load``).

    ``layers`` (default: every layer with a map), ``heads`` (default: all), ``classes`` (ids or names of
    ``class_names``, any case, to draw; default per image its largest classes), ``pixel`` (y, x) to query (default: none for joint maps,
    the centre for the others), ``examples``: images drawn (traces with pixels only).
    """
    return AttentionParts(layers, heads, classes, pixel, examples, class_names, bootstrap).run(traces)


def class_ids(classes: Sequence[int | str], names: Sequence[str]) -> list[int] | None:
    """Class ids of ``classes``, each an id or a name of ``names`` (any case); None when empty."""
    lookup = {name.lower(): c for c, name in enumerate(names)}
    ids = []
    for part in classes:
        text = str(part).strip()
        if text.isdigit() and int(text) < len(names):
            ids.append(int(text))
        elif text.lower() in lookup:
            ids.append(lookup[text.lower()])
        else:
            raise ConfigError(f"classes: no class {text!r}; classes: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    return ids or None


def _heads(layer: str, available: int, chosen: Sequence[int] | None) -> list[int]:
    if chosen is None:
        return list(range(available))
    if not all(0 <= k < available for k in chosen):
        raise ConfigError(f"layer {layer} has heads 0 to {available - 1}")
    return list(chosen)
