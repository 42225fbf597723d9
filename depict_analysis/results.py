"""What every analysis returns: a typed result with per-image arrays and one way to use them.

An analysis (``analyze_coding_rates``, ``analyze_pca``, ...) returns a ``Result`` subclass, a
dataclass whose fields are the numbers it measured (per image where they vary by image). Every
result answers the same five calls:

- ``summary()``: the headline numbers, JSON-ready (what ``depict-analyze demo`` and ``report`` show);
- ``to_json()``: everything behind the figures, JSON-ready (``<name>.json``);
- ``rows()``: the same numbers in long format, one dict per value (``<name>.csv``);
- ``figures()``: ``{figure name: matplotlib Figure}``;
- ``save(out)``: all of the above into the folder ``out``, each file written atomically (and
  ``<name>.npz`` when the result has ``arrays()``, e.g. the orthogonality's Gram matrices), and the
  whole result as data, ``<name>.result.npz``, which ``Result.load(out)`` reads back (no code runs);
- ``to_frame()``: ``rows()`` as a pandas DataFrame (``pip install "depict-analysis[frames]"``).

``to_json()`` returns plain JSON types (``json.dumps`` takes it as it is; NaN and ±inf become None),
whatever a subclass's own ``to_json`` builds. ``repr`` names the model, the images, the layers and
the shapes of the arrays, never their values.

``Stat`` holds one quantity per image and summarises it over images. ``Comparison`` is several
models' results of one analysis side by side, itself a result: what a command writes for its
checkpoints, one colour per model in every figure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from matplotlib.figure import Figure

from depict_analysis.foundation.errors import InputError
from depict_analysis.foundation.files import atomic_write
from depict_analysis.foundation.reprs import dataclass_repr, short_repr
from depict_analysis.outputs import plain_json, save_csv, save_figure, save_json
from depict_analysis.result_state import SUFFIX, read_state, write_state

if TYPE_CHECKING:
    import pandas


@dataclass
class Stat:
    """A quantity measured on each of n images: ``per_image`` (n, ...) float64."""

    per_image: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.per_image.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation over images (ddof = 0)."""
        return self.per_image.std(axis=0)

    def to_json(self) -> dict[str, Any]:
        return plain_json({"mean": self.mean, "std": self.std, "per_image": self.per_image})

    def __repr__(self) -> str:
        return f"Stat(per_image={short_repr(self.per_image)})"


def _plain_json(to_json: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(to_json)
    def wrapped(self: "Result") -> Any:
        return plain_json(to_json(self))

    return wrapped


class Result:
    """Base of every analysis result (see the module docstring)."""

    name: ClassVar[str] = ""  # the stem of its files: "coding_rate" -> coding_rate.json, .csv, .png

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every result's to_json returns plain JSON types, and its repr stays short: set here, before
        # @dataclass runs on the subclass (which keeps a __repr__ the class already has).
        super().__init_subclass__(**kwargs)
        if "to_json" in cls.__dict__:
            cls.to_json = _plain_json(cls.__dict__["to_json"])
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = dataclass_repr

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def figures(self) -> dict[str, Figure]:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """Matrices too large for the JSON, saved as ``<name>.npz``; none by default."""
        return {}

    @classmethod
    def compare_figures(cls, labels: Sequence[str], results: Sequence["Result"]) -> dict[str, Figure]:
        """The figures of several models' results of this analysis drawn together (``Comparison``)."""
        raise NotImplementedError(f"{cls.__name__} has no figures comparing models")

    def to_frame(self) -> "pandas.DataFrame":
        """``rows()`` as a tidy table: one row per value, its coordinates (image, layer, ...) as columns."""
        try:
            import pandas
        except ImportError:
            raise InputError('to_frame needs pandas: pip install "depict-analysis[frames]"') from None
        return pandas.DataFrame(self.rows())

    def save(self, out: str | Path) -> list[Path]:
        """Write ``<name>.json``, ``<name>.csv`` (and ``<name>.npz``), the result as data
        (``<name>.result.npz``, for ``Result.load``), then ``figures()`` (PNG + PDF) into ``out``; returns
        the paths. The numbers come first: a run stopped while drawing leaves its data complete (each
        file is atomic), and a figure never exists without the numbers behind it."""
        out = Path(out)
        paths = [save_json(out / f"{self.name}.json", self.to_json()), save_csv(out / f"{self.name}.csv", self.rows())]
        if arrays := self.arrays():
            paths.append(atomic_write(out / f"{self.name}.npz", lambda f: np.savez_compressed(f, **arrays)))
        paths.append(write_state(out / f"{self.name}{SUFFIX}", self))
        paths += [path for name, figure in self.figures().items() for path in save_figure(figure, out, name)]
        return paths

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        """The result that ``save`` wrote: ``path`` is its folder or its ``<name>.result.npz``.

        ``CodingRates.load(folder)`` reads ``coding_rate.result.npz`` there (or a ``Comparison`` of
        coding rates); ``Result.load(folder)`` takes the folder's one saved result, whatever it is.
        """
        path = Path(path)
        if path.is_dir():
            stem = cls.name if isinstance(cls.name, str) and cls.name else "*"  # Comparison's name is per instance
            found = sorted(path.glob(f"{stem}{SUFFIX}"))
            if len(found) != 1:
                what = "no saved result" if not found else f"{len(found)} saved results ({', '.join(p.name for p in found)})"
                raise InputError(f"{path} holds {what}: give the path of one *{SUFFIX} file")
            path = found[0]
        result = read_state(path)
        kind = result.results[0] if isinstance(result, Comparison) else result
        if not isinstance(result, Result) or (cls not in (Result, Comparison) and not isinstance(kind, cls)):
            raise InputError(f"{path} holds a {type(kind).__name__}, not a {cls.__name__}")
        return result


@dataclass
class Comparison(Result):
    """One analysis of several models: ``results[i]`` is the result of the model ``labels[i]``, loaded from
    ``sources[i]`` (all of one type). ``settings``: what the run shares, e.g. its image source.

    ``summary()``: ``{label: that result's summary()}``; ``to_json()``: ``{"settings", "checkpoints":
    [{"label", "source", **that result's to_json()}]}``; ``rows()``: every result's rows with
    ``checkpoint`` (the label) first; ``figures()``: the result type's ``compare_figures``;
    ``arrays()``: every result's arrays as ``<label>/<key>``. ``files`` and ``trace_files``: what the run
    that made it (``depict_analysis.compare``) wrote.
    """

    labels: list[str]
    sources: list[str]
    results: list[Result]
    settings: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list, init=False, repr=False, compare=False)  # not part of the result's data
    trace_files: list[Path] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.results or len({type(r) for r in self.results}) != 1:
            raise InputError("a Comparison needs one or more results of one analysis")
        if not len(self.labels) == len(self.sources) == len(self.results):
            raise InputError("a Comparison needs one label and one source per result")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.results[0].name

    def summary(self) -> dict[str, Any]:
        return {label: result.summary() for label, result in zip(self.labels, self.results)}

    def to_json(self) -> dict[str, Any]:
        checkpoints = [{"label": label, "source": source, **result.to_json()}
                       for label, source, result in zip(self.labels, self.sources, self.results)]
        return {"settings": self.settings, "checkpoints": checkpoints}

    def rows(self) -> list[dict[str, Any]]:
        return [{"checkpoint": label, **row} for label, result in zip(self.labels, self.results) for row in result.rows()]

    def figures(self) -> dict[str, Figure]:
        return type(self.results[0]).compare_figures(self.labels, self.results)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{label}/{key}": array for label, result in zip(self.labels, self.results)
                for key, array in result.arrays().items()}
