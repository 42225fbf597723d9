"""Writing an analysis's results: the figure (PNG + PDF) and the numbers behind it (JSON, CSV).

Every file is written atomically (``depict_analysis.foundation.files.atomic_write``): a reader polling
a result never finds it empty or half written. ``check_out_dir`` / ``check_out_file`` check an
output path before a command starts computing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from depict_analysis.foundation.files import atomic_write, atomic_write_text, check_out_dir, check_out_file, safe_name  # noqa: F401


def plain_json(x: Any) -> Any:
    """Tensors, numpy values, tuples, paths and non-finite floats -> plain JSON types (NaN / inf become
    None), so that ``json.dumps`` takes the value as it is."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, Mapping):
        return {str(k): plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "to_json"):  # an Interval, a Finding, ...
        return plain_json(x.to_json())
    return x


def save_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(plain_json(data), indent=2) + "\n")
    return path


def save_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per dict; the columns are the union of keys in first-seen order."""
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: plain_json(v) for k, v in row.items()} for row in rows)
    atomic_write_text(path, text.getvalue())
    return path


FIGURE_DPI = 150  # of every PNG we write
MIN_FONT_KEY = "depict:min_font_pt"  # PNG text field: the smallest font size (points) of the figure's text


def min_font_size(fig: plt.Figure) -> float:
    """The smallest font size, in points, of any visible text in ``fig`` (what decides its legibility)."""
    import matplotlib.text

    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    return float(min(sizes, default=plt.rcParams["font.size"]))


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` (150 dpi; its smallest font size recorded as the PNG text field
    ``depict:min_font_pt``, which the HTML report sizes it by) and ``.pdf``, close the figure, return both paths.

    ``name`` often holds names read from a model or a saved trace (a layer, a label): it is reduced to
    one plain file name (``safe_name``), so the figure lands in ``out_dir`` whatever it says."""
    out_dir = Path(out_dir)
    name = safe_name(name)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    try:
        # Laid out and measured once for both files: "tight" would lay out and draw each file twice.
        fig.set_dpi(FIGURE_DPI)
        fig.draw_without_rendering()
        box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
        fig.set_layout_engine("none")
        atomic_write(paths[1], lambda f: fig.savefig(f, format="pdf", bbox_inches=box))
        metadata = {MIN_FONT_KEY: f"{min_font_size(fig):.2f}"}  # after a draw: tick labels exist only once drawn
        atomic_write(paths[0], lambda f: fig.savefig(f, format="png", dpi=FIGURE_DPI, bbox_inches=box, metadata=metadata))
    finally:
        plt.close(fig)
    return paths
