"""Short ``repr``s for objects that hold arrays: what they are (model, images, layers, shapes), never the values.

A one-image ``Trace`` printed by the dataclass default is tens of kilobytes of numbers; ``dataclass_repr``
prints each field in a few words: arrays and tensors by type, shape and dtype, long lists and dicts by
length (and keys), a ``model`` description by its variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

WIDTH = 80  # the most characters one field's value takes


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def short_repr(value: Any, width: int = WIDTH) -> str:
    """One field in a few words: ``Tensor(2, 256, 64) float32``, ``4 × Tensor(2, 256, 64) float32``,
    ``['input', 'mssa1']``, ``<64 items>``, ``<3 entries: a, b, c>``."""
    if _is_array(value):
        return f"{type(value).__name__}{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)) and value and all(_is_array(v) for v in value):
        shapes = {(type(v).__name__, tuple(v.shape), str(v.dtype)) for v in value}
        return f"{len(value)} × {short_repr(value[0])}" if len(shapes) == 1 else f"<{len(value)} arrays>"
    if isinstance(value, (list, tuple, dict)):
        plain = all(isinstance(v, (str, int, float, bool, type(None))) for v in (value.values() if isinstance(value, dict) else value))
        text = repr(value) if plain else ""
        if text and len(text) <= width:
            return text
        if isinstance(value, dict):
            keys = ", ".join(map(str, list(value)[:6])) + (", ..." if len(value) > 6 else "")
            return f"<{len(value)} entries: {keys}>"
        return f"<{len(value)} items>"
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def dataclass_repr(obj: Any) -> str:
    """``Name(field=short value, ...)`` of a dataclass, readable whatever its size; a ``model`` field that
    describes a model (a dict with its ``variant``) is shown as the variant."""
    parts = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if f.name == "model" and isinstance(value, dict) and "variant" in value:
            value = value["variant"]
        parts.append(f"{f.name}={short_repr(value)}")
    return f"{type(obj).__name__}({', '.join(parts)})"
