"""A saved trace is untrusted input: ``validate_trace`` checks it as a checkpoint is checked.

``Trace.load`` reads only tensors, names and numbers (no code runs), but what it reads may still be
anything: NaN / Inf values, masks for another number of classes, tokens for three images beside
masks for one, label values no class has, names with path separators. Each would give numbers that
mean nothing (an mIoU from NaN logits, a rate of NaN) or a traceback deep in an analysis, or, for a
name, a file written outside the output folder. So a trace is refused, with one line naming the
first problem, unless

- every field has the type ``Trace`` declares (lists of tensors, strings, positive integers);
- every floating-point tensor is finite, and labels are integers in ``0 .. K-1`` or 255 (ignore);
- the shapes agree with each other and with the recorded model: B ≥ 1 images everywhere, K =
  ``model["n_cls"]`` classes, N = h·w tokens of the ``grid``, d = ``model["d_model"]`` at the input,
  masks on the grid, an ``image_size`` that ``grid`` patches of ``model["patch_size"]`` cover, full-size
  masks (when kept), pixels and labels of that size, one path per image;
- the names are those the model's decoder family gives (``<stage><layer>``, e.g. ``mssa2``;
  subspaces also ``block1.W_Q``), each once; attention maps and subspaces name layers of the trace;
- a recorded ``config`` describes the same model (classes, family, patch size, d) and its decoder
  has the same subspaces, of the same shapes (built on the ``meta`` device: nothing is allocated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from depict_analysis.foundation.errors import DepictError, InputError

if TYPE_CHECKING:
    from depict_analysis.tracing import Trace

IGNORE = 255  # the label value of unlabelled pixels
LAYER_NAME = re.compile(r"[a-z]+[1-9][0-9]{0,3}")  # what decoders name their layers: mssa1, msca3, cbsa2, block12
SUBSPACE_NAME = re.compile(r"[a-z]+[1-9][0-9]{0,3}(\.W_[QKV])?")  # and their projections: mssa1, block1.W_Q


class _Invalid(Exception):
    """One problem of a trace (turned into ``InputError("<source>: ...")``)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _tensors(value: Any, what: str) -> None:
    _require(isinstance(value, list) and all(isinstance(t, Tensor) for t in value), f"{what} must be a list of tensors")


def _names(value: Any, what: str) -> None:
    _require(isinstance(value, list) and all(isinstance(n, str) for n in value), f"{what} must be a list of strings")


def _finite(t: Tensor, what: str) -> None:
    _require(t.is_floating_point(), f"{what} must hold floating-point values, not {t.dtype}")
    bad = int((~torch.isfinite(t)).sum())
    _require(bad == 0, f"{what} holds {bad} NaN / Inf value(s) of {t.numel()}")


def _shape(t: Tensor, expected: Sequence[int | None], what: str) -> None:
    """``t``'s shape is ``expected`` (None: any size there)."""
    fits = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
    _require(fits, f"{what} has shape {tuple(t.shape)}, expected {shown}")


def _check_types(tr: Trace) -> None:
    model = tr.model
    _require(isinstance(model, Mapping), "model must be a mapping")
    for key in ("variant", "decoder", "role"):
        _require(isinstance(model.get(key), str), f"model[{key!r}] must be a string")
    for key in ("d_model", "patch_size", "n_cls"):
        _require(_count(model.get(key)), f"model[{key!r}] must be a positive integer, got {model.get(key)!r}")
    for what in ("grid", "image_size"):
        value = getattr(tr, what)
        _require(isinstance(value, tuple) and len(value) == 2 and all(map(_count, value)),
                 f"{what} must be two positive integers, got {value!r}")
    _names(tr.layer_names, "layer_names")
    _names(tr.class_stages, "class_stages")
    _names(tr.paths, "paths")
    for what in ("tokens", "classes", "representatives"):
        _tensors(getattr(tr, what), what)
    for what in ("embeddings", "class_embeddings", "masks"):
        _require(isinstance(getattr(tr, what), Tensor), f"{what} must be a tensor")
    for what in ("full_masks", "pixels", "labels"):
        _require(getattr(tr, what) is None or isinstance(getattr(tr, what), Tensor), f"{what} must be a tensor or None")
    _require(isinstance(tr.attention, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tr.attention.items()),
             "attention must map layer names to tensors")
    _require(tr.config is None or isinstance(tr.config, Mapping), "config must be a mapping or None")
    for what in ("weights", "source"):
        _require(getattr(tr, what) is None or isinstance(getattr(tr, what), str), f"{what} must be a string or None")
    for space in tr.subspaces:
        _require(isinstance(space.name, str) and isinstance(space.proj, Tensor)
                 and (space.layer is None or _count(space.layer)) and (space.parameter is None or isinstance(space.parameter, str)),
                 "every subspace needs a name, a layer (a positive integer or None) and a projection tensor")
        _require(space.norm is None or (isinstance(space.norm, tuple) and len(space.norm) == 3
                                        and all(isinstance(t, Tensor) for t in space.norm[:2])
                                        and isinstance(space.norm[2], float)),
                 f"subspace {space.name!r}: its norm must be (weight, bias, eps)")


def _check_names(tr: Trace) -> None:
    from depict_analysis.models.decoders.base import get_family

    try:
        get_family(tr.model["decoder"])
    except DepictError:
        raise _Invalid(f"model['decoder'] {tr.model['decoder']!r} is no decoder family") from None
    stages = tr.class_stages[1:]
    for name in [*tr.layer_names, *stages]:
        _require(LAYER_NAME.fullmatch(name) is not None, f"{name!r} is not a layer name (letters, then the layer number)")
    _require(len(set(tr.layer_names)) == len(tr.layer_names) and len(set(stages)) == len(stages), "a layer is named twice")
    _require(not tr.class_stages or tr.class_stages[0] == "input", "class_stages must start with 'input'")
    vocabulary = {*tr.layer_names, *stages}
    for name in tr.attention:
        _require(name in vocabulary, f"attention map {name!r} names no layer of the trace")
    for space in tr.subspaces:
        _require(SUBSPACE_NAME.fullmatch(space.name) is not None and space.name.split(".")[0] in vocabulary,
                 f"subspace {space.name!r} names no layer of the trace")
        _require(space.layer is None or space.layer <= len(tr.layer_names), f"subspace {space.name!r}: no layer {space.layer}")


def _check_values_and_shapes(tr: Trace) -> None:
    K, d, patch = tr.model["n_cls"], tr.model["d_model"], tr.model["patch_size"]
    gh, gw = tr.grid
    N = gh * gw
    _shape(tr.masks, (None, K, gh, gw), "masks")
    B = len(tr.masks)
    H, W = tr.image_size
    _require(B >= 1, "it holds no images")
    _require((gh - 1) * patch < H <= gh * patch and (gw - 1) * patch < W <= gw * patch,
             f"images of {H}x{W} pixels do not fit the {gh}x{gw} grid of {patch}-pixel patches")
    if tr.full_masks is not None:
        _shape(tr.full_masks, (B, K, H, W), "full_masks")
    _require(len(tr.tokens) == len(tr.layer_names) + 1, f"{len(tr.tokens)} token tensors for {len(tr.layer_names)} layers "
             "(expected one more: the input)")
    _require(len(tr.classes) == len(tr.class_stages), f"{len(tr.classes)} class tensors for {len(tr.class_stages)} class stages")
    for name, z in zip(tr.token_names, tr.tokens):
        _shape(z, (B, N, d if name == "input" else None), f"tokens/{name}")
    for stage, q in zip(tr.class_stages, tr.classes):
        _shape(q, (B, K, None), f"classes/{stage}")
    _shape(tr.embeddings, (B, N, None), "embeddings")
    _shape(tr.class_embeddings, (B, K, tr.embeddings.shape[-1]), "class_embeddings")
    for name, a in tr.attention.items():
        _require(a.dim() in (3, 4) and a.shape[0] == B, f"attention/{name} has shape {tuple(a.shape)}, expected ({B}, heads, ...)")
    for l, r in enumerate(tr.representatives):
        _shape(r, (B, None, None, None), f"representatives[{l}]")
    if tr.pixels is not None:
        _shape(tr.pixels, (B, 3, H, W), "pixels")
        _require(bool(((tr.pixels >= 0) & (tr.pixels <= 1)).all()), "pixels must lie in [0, 1]")
    if tr.labels is not None:
        _shape(tr.labels, (B, H, W), "labels")
        _require(not tr.labels.is_floating_point() and not tr.labels.is_complex(), f"labels must be integers, not {tr.labels.dtype}")
        bad = (tr.labels != IGNORE) & ((tr.labels < 0) | (tr.labels >= K))
        if bad.any():
            raise _Invalid(f"labels hold the value {int(tr.labels[bad][0])}, no class of this model "
                           f"(classes 0..{K - 1}, {IGNORE} = ignore)")
    _require(len(tr.paths) in (0, B), f"{len(tr.paths)} image paths for {B} images")
    for space in tr.subspaces:
        _require(space.proj.dim() == 3, f"subspace/{space.name} has shape {tuple(space.proj.shape)}, expected (heads, p, d)")
    floats = [("masks", tr.masks), ("embeddings", tr.embeddings), ("class_embeddings", tr.class_embeddings),
              *((f"tokens/{n}", z) for n, z in zip(tr.token_names, tr.tokens)),
              *((f"classes/{s}", q) for s, q in zip(tr.class_stages, tr.classes)),
              *((f"attention/{n}", a) for n, a in tr.attention.items()),
              *((f"representatives[{l}]", r) for l, r in enumerate(tr.representatives)),
              *((f"subspace/{s.name}", s.proj) for s in tr.subspaces),
              *((f"subspace/{s.name} norm", t) for s in tr.subspaces if s.norm is not None for t in s.norm[:2])]
    floats += [(what, t) for what, t in (("full_masks", tr.full_masks), ("pixels", tr.pixels)) if t is not None]
    for what, t in floats:
        _finite(t, what)


def _check_config(tr: Trace) -> None:
    """The recorded config describes the traced model: its decoder has the trace's subspaces."""
    from depict_analysis.models.decoders.base import build_decoder
    from depict_analysis.models.registry import ModelConfig

    if tr.config is None:
        return
    try:
        config = ModelConfig.from_dict(tr.config)
    except (DepictError, KeyError, TypeError) as e:
        raise _Invalid(f"its model config cannot be read ({e})") from None
    model = tr.model
    for what, recorded, expected in [("classes", config.n_cls, model["n_cls"]), ("decoder", config.decoder.name, model["decoder"]),
                                     ("patch size", config.backbone.patch_size, model["patch_size"]),
                                     ("width", config.backbone.d_model, model["d_model"])]:
        _require(recorded == expected, f"its config says {what} {recorded!r} but the traced model has {expected!r}")
    with torch.device("meta"):  # shapes only: a config claiming a huge decoder allocates nothing
        decoder = build_decoder(config.decoder, config.backbone.d_model, config.n_cls)
    expected = {space.name: tuple(space.proj.shape) for space in decoder.subspaces()}
    found = {space.name: tuple(space.proj.shape) for space in tr.subspaces}
    _require(found == expected, "its subspaces do not match its config's decoder: "
             f"{sorted(found.items())[:3]} vs {sorted(expected.items())[:3]}")


def validate_trace(tr: Trace, source: str = "the trace") -> Trace:
    """``tr`` if it is a consistent trace of its recorded model (see the module docstring), else an
    ``InputError`` that starts with ``source`` and names the first problem."""
    try:
        _check_types(tr)
        _check_names(tr)
        _check_values_and_shapes(tr)
        _check_config(tr)
    except _Invalid as e:
        raise InputError(f"{source}: not a valid trace: {e}") from None
    return tr
