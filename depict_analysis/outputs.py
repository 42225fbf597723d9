"""Writing an analysis's results: the figure (PNG + PDF) and the numbers behind it (JSON, CSV)."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved file is for others to read too
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """Tensors, numpy values and non-finite floats -> plain JSON (NaN / inf become null)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def save_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def save_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per dict; the columns are the union of keys in first-seen order."""
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _jsonable(v) for k, v in row.items()} for row in rows)
    return path


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` (150 dpi) and ``.pdf``, close the figure, return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
