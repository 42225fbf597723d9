"""What every analysis returns: a typed result with per-image arrays and one way to use them.

An analysis (``analyze_coding_rates``, ``analyze_pca``, ...) returns a ``Result`` subclass, a
dataclass whose fields are the numbers it measured (per image where they vary by image). Every
result answers the same five calls:

- ``summary()``: the headline numbers, JSON-ready (what ``depict-analyze demo`` and ``report`` show);
- ``to_json()``: everything behind the figures, JSON-ready (``<name>.json``);
- ``rows()``: the same numbers in long format, one dict per value (``<name>.csv``);
- ``figures()``: ``{figure name: matplotlib Figure}``;
- ``save(out)``: all of the above into the folder ``out``, each file written atomically.

``Stat`` holds one quantity per image and summarises it over images.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from matplotlib.figure import Figure

from depict_analysis.outputs import save_csv, save_figure, save_json


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

    def to_json(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "std": self.std, "per_image": self.per_image}


class Result:
    """Base of every analysis result (see the module docstring)."""

    name: ClassVar[str] = ""  # the stem of its files: "coding_rate" -> coding_rate.json, .csv, .png

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def figures(self) -> dict[str, Figure]:
        raise NotImplementedError

    def save(self, out: str | Path) -> list[Path]:
        """Write ``figures()`` (PNG + PDF), ``<name>.json`` and ``<name>.csv`` into ``out``; returns the paths."""
        out = Path(out)
        paths = [path for name, figure in self.figures().items() for path in save_figure(figure, out, name)]
        paths.append(save_json(out / f"{self.name}.json", self.to_json()))
        paths.append(save_csv(out / f"{self.name}.csv", self.rows()))
        return paths


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez_compressed`` of ``arrays`` (keys may contain "/"), written atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
