"""A result's whole state in one file, read back without running code: ``<name>.result.npz``.

``Result.save`` writes it beside the JSON, CSV and figures; ``Result.load`` reads it. The file is a
numpy ``.npz`` (read with ``allow_pickle=False``) holding ``state``, the result as JSON text, and one
entry per array. The JSON is the result's dataclass tree, field by field, with tags for what JSON
has no word for::

    {"$dataclass": "depict_analysis.pca_analysis:PCAExample", "fields": {...}}
    {"$array": "a3"}   {"$tensor": "a4"}   {"$tuple": [...]}   {"$dict": [[key, value], ...]}

A ``$dataclass`` tag may only name a dataclass defined in a ``depict_analysis`` module (that module
is imported to build it), so a file can make the reader build nothing else. Floats keep NaN and ±inf.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from depict_analysis.foundation.errors import InputError
from depict_analysis.foundation.files import atomic_write

FORMAT = "depict-analysis-result/1"
SUFFIX = ".result.npz"
PACKAGE = "depict_analysis"


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a result holding tensors was made with torch imported
    return torch is not None and isinstance(value, torch.Tensor)


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, array: np.ndarray) -> str:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = array
        return key

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float, np.integer, np.floating, np.bool_)):
            return value.item() if isinstance(value, np.generic) else value
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise InputError("a result holding an array of Python objects cannot be saved as data")
            return {"$array": self._store(value)}
        if _is_tensor(value):
            return {"$tensor": self._store(value.detach().cpu().numpy())}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return {"$tuple": [self(v) for v in value]}
        if isinstance(value, dict):
            return {"$dict": [[self(k), self(v)] for k, v in value.items()]}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            if not cls.__module__.startswith(PACKAGE):
                raise InputError(f"a {cls.__name__} is not a depict_analysis result part and cannot be saved as data")
            fields = {f.name: self(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
            return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        raise InputError(f"a result holding a {type(value).__name__} cannot be saved as data")


def _dataclass(tag: str) -> type:
    module, _, name = tag.partition(":")
    if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
        raise InputError(f"a saved result names {tag!r}, which is not a depict_analysis class")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise InputError(f"a saved result names {tag!r}, which this version does not have") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise InputError(f"a saved result names {tag!r}, which is not a result part")
    return cls


class _Decoder:
    def __init__(self, arrays: Any) -> None:
        self.arrays = arrays

    def _array(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise InputError(f"a saved result refers to an array {key!r} the file does not hold")
        return self.arrays[key]

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "$array" in value:
            return self._array(value["$array"])
        if "$tensor" in value:
            import torch

            return torch.from_numpy(self._array(value["$tensor"]).copy())
        if "$tuple" in value:
            return tuple(self(v) for v in value["$tuple"])
        if "$dict" in value:
            return {_hashable(self(k)): self(v) for k, v in value["$dict"]}
        if "$dataclass" in value:
            cls = _dataclass(value["$dataclass"])
            try:
                return cls(**{name: self(v) for name, v in value["fields"].items()})
            except TypeError as e:
                raise InputError(f"a saved {cls.__name__} with missing or unknown fields ({e})") from None
        raise InputError(f"a saved result holds an untagged mapping with keys {sorted(value)[:5]}")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def write_state(path: str | Path, value: Any) -> Path:
    """Write ``value`` (a result dataclass) to ``path`` (see the module docstring), atomically."""
    path = Path(path)
    encode = _Encoder()
    state = json.dumps({"format": FORMAT, "result": encode(value)})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, state=np.array(state), **encode.arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def read_state(path: str | Path) -> Any:
    """The result ``write_state`` wrote to ``path``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a saved result ({e})") from None
    try:
        state = json.loads(str(arrays.pop("state")))
    except (KeyError, ValueError):
        raise InputError(f"{path}: not a saved result (no readable state)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a saved result (no format tag {FORMAT!r})")
    return _Decoder(arrays)(state.get("result"))
