"""Run a model and keep what every analysis reads: a named cache of the decoder's internals.

``trace(model, images)`` -> ``Trace`` (one batch; TransformerLens' ``run_with_cache`` in spirit):

- ``tokens[j]``: patch tokens after decoder layer j, ``tokens[0]`` = the decoder input Z_0, (B, N, d);
  layer j is named ``layer_names[j - 1]`` ("mssa1", "cbsa2", "block1", ...)
- ``classes[i]``: class embeddings at stage ``class_stages[i]`` ("input", then after each layer that
  updates them), (B, K, d)
- ``embeddings``: the patch embeddings the mask head compares with Q̂ (after the decoder's final
  LayerNorm; SPEC's Z_L1), (B, N, d); ``class_embeddings``: the final L2-normalised Q̂, (B, K, d)
- ``masks``: the decoder's mask logits on the patch grid, (B, K, h, w) with (h, w) = ``grid``; ``logits(b)``
  upsamples image b's to its ``image_size`` (H, W), equal to ``model(images)[b]``, and ``prediction`` is
  their argmax (B, H, W), computed one image at a time. ``full_masks``: the logits of every image,
  (B, K, H, W) = ``model(images)``, kept only on request (``trace(..., full_masks=True)``): at 512² and
  150 classes they take 1.2 GB per batch of eight, 256 times the masks on a 16-pixel patch grid
- ``subspaces``: every projection P_l the decoder owns, ``Subspace(name, layer, proj (h, p, d))``, with
  the LayerNorm its layer applies before projecting (``Subspace.layer_input``)
- ``attention[name]`` per layer on request; ``representatives[l]`` per layer for decoders that
  contract onto a few tokens (CBT), (B, h, R, p)
- ``pixels`` (B, 3, H, W) in [0, 1], ``labels`` (B, H, W) and ``paths`` when traced from ``Images``
- ``config``: the model's ``ModelConfig.to_dict()``, enough to build a fresh model of the same kind
  (the orthogonality analysis's at-initialisation baseline) from a saved trace
- ``weights``: a fingerprint of the model's weights and ``source``: the model's name where it was
  traced through a loaded model; an analysis refuses to pool traces of different models (``as_traces``)

``trace["tokens/mssa2"]``, ``trace["classes/input"]``, ``trace["attention/mssa1"]`` read entries by
name (``trace.keys()`` lists them). ``trace_batches`` runs the one loop every analysis shares over a
stream of image batches. Each decoder family computes these itself (``models/decoders/<family>.py``);
nothing here knows about families.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from depict_analysis.inputs import Batch, image_progress
from depict_analysis.models.decoders.base import Subspace
from depict_analysis.foundation.device import autocast
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.foundation.reprs import dataclass_repr
from depict_analysis.models.data.base import IGNORE_INDEX

__all__ = ["Subspace", "Trace", "as_traces", "trace", "trace_batches"]

TRACE_FORMAT = "depict-analysis-trace/2"  # /2: masks on the patch grid, image_size, full_masks on request
OLD_FORMATS = ("depict-analysis-trace/1",)


@dataclass(repr=False)
class Trace:
    """The decoder internals of one batch of images (see the module docstring for every field)."""

    __repr__ = dataclass_repr  # model, layers and shapes, not the tensors' values

    model: dict[str, Any]  # what the model is (outputs.describe_model): variant, decoder, role, d, patch, K
    grid: tuple[int, int]
    image_size: tuple[int, int]  # (H, W) of the traced images
    layer_names: list[str]
    tokens: list[Tensor]
    class_stages: list[str]
    classes: list[Tensor]
    embeddings: Tensor
    class_embeddings: Tensor
    masks: Tensor
    subspaces: list[Subspace]
    full_masks: Tensor | None = None
    attention: dict[str, Tensor] = field(default_factory=dict)
    representatives: list[Tensor] = field(default_factory=list)
    pixels: Tensor | None = None
    labels: Tensor | None = None
    paths: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    weights: str | None = None
    source: str | None = None

    @property
    def family(self) -> str:
        return self.model["decoder"]

    @property
    def num_layers(self) -> int:
        """L: the number of token-updating decoder layers (``tokens`` has L + 1 entries)."""
        return len(self.tokens) - 1

    @property
    def num_images(self) -> int:
        return len(self.embeddings)

    @property
    def token_names(self) -> list[str]:
        """The name of every ``tokens[j]``: "input", then the layer names."""
        return ["input", *self.layer_names]

    @property
    def model_name(self) -> str:
        """How an error names the traced model: its source, else its variant and weight fingerprint."""
        return self.source or f"{self.model['variant']} (weights {(self.weights or 'unknown')[:8]})"

    def same_model(self, other: "Trace") -> bool:
        """Whether ``other`` was traced from the same model (description, and weights where both record them)."""
        return _Identity.of(self).matches(other)

    def logits(self, b: int) -> Tensor:
        """Image b's class logits (K, H, W) at its full size, equal to ``model(images)[b]``: ``full_masks[b]``
        when kept, else its ``masks`` upsampled as the model upsamples them."""
        from depict_analysis.models.segmentor import upsample_masks

        if self.full_masks is not None:
            return self.full_masks[b]
        return upsample_masks(self.masks[b : b + 1], self.grid, self.model["patch_size"], self.image_size)[0]

    @property
    def prediction(self) -> Tensor:
        """The model's class map (B, H, W): the argmax of the logits, one image at a time (the logits of
        one image are held at once, not the batch's)."""
        return torch.stack([self.logits(b).argmax(0) for b in range(self.num_images)])

    # ------------------------------------------------------------------------------ named access

    def _entries(self) -> dict[str, Tensor]:
        entries = {f"tokens/{name}": z for name, z in zip(self.token_names, self.tokens)}
        entries |= {f"classes/{stage}": q for stage, q in zip(self.class_stages, self.classes)}
        entries |= {"embeddings": self.embeddings, "class_embeddings": self.class_embeddings, "masks": self.masks}
        entries |= {"full_masks": self.full_masks} if self.full_masks is not None else {}
        entries |= {f"subspace/{space.name}": space.proj for space in self.subspaces}
        entries |= {f"attention/{name}": a for name, a in self.attention.items()}
        return entries

    def keys(self) -> list[str]:
        """Every name ``trace[name]`` accepts, e.g. ``tokens/input``, ``tokens/mssa1``, ``classes/msca2``."""
        return list(self._entries())

    def __getitem__(self, name: str) -> Tensor:
        entries = self._entries()
        if name not in entries:
            raise KeyError(f"no entry {name!r} in this trace; entries: {', '.join(entries)}")
        return entries[name]

    # ------------------------------------------------------------------------------ several batches

    def to(self, device: torch.device | str) -> "Trace":
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            tokens=[move(t) for t in self.tokens],
            classes=[move(q) for q in self.classes],
            embeddings=move(self.embeddings),
            class_embeddings=move(self.class_embeddings),
            masks=move(self.masks),
            full_masks=move(self.full_masks),
            subspaces=[replace(s, proj=move(s.proj), norm=None if s.norm is None else (*map(move, s.norm[:2]), s.norm[2]))
                       for s in self.subspaces],
            attention={name: move(a) for name, a in self.attention.items()},
            representatives=[move(r) for r in self.representatives],
            pixels=move(self.pixels),
            labels=move(self.labels),
        )

    @staticmethod
    def cat(traces: Iterable["Trace"]) -> "Trace":
        """One trace of several batches of the same model and image size (batch dimension concatenated)."""
        if isinstance(traces, Trace):
            raise InputError("Trace.cat takes a list of traces, got one Trace")
        traces = list(traces)
        if not traces:
            raise InputError("no traces to concatenate")
        if not all(isinstance(t, Trace) for t in traces):
            raise InputError(f"Trace.cat joins Trace objects, got {', '.join(sorted({type(t).__name__ for t in traces}))}")
        first = traces[0]
        for t in traces[1:]:
            if t.model != first.model or t.config != first.config or t.layer_names != first.layer_names:
                raise InputError(f"traces of different models cannot be concatenated ({_model_text(first)} and {_model_text(t)})")
            if t.grid != first.grid or t.image_size != first.image_size or t.masks.shape[1:] != first.masks.shape[1:]:
                raise InputError(f"traces of different image sizes cannot be concatenated ({first.image_size} "
                                 f"and {t.image_size} pixels)")
            if any(not torch.equal(a.proj.cpu(), b.proj.cpu()) for a, b in zip(t.subspaces, first.subspaces)):
                raise InputError(f"traces of different models cannot be concatenated (two {_model_text(t)} with different weights)")
            if (t.pixels is None) != (first.pixels is None) or (t.labels is None) != (first.labels is None) \
                    or (t.full_masks is None) != (first.full_masks is None) or set(t.attention) != set(first.attention):
                raise InputError("traces with and without images, labels, full-size masks or attention maps cannot be concatenated")
        identity = _Identity.of(first)
        for t in traces:
            identity.require(t)
        cat = lambda get: torch.cat([get(t) for t in traces])  # noqa: E731
        optional = lambda get: None if get(first) is None else cat(get)  # noqa: E731
        return replace(
            first,
            tokens=[cat(lambda t, j=j: t.tokens[j]) for j in range(len(first.tokens))],
            classes=[cat(lambda t, i=i: t.classes[i]) for i in range(len(first.classes))],
            embeddings=cat(lambda t: t.embeddings),
            class_embeddings=cat(lambda t: t.class_embeddings),
            masks=cat(lambda t: t.masks),
            full_masks=optional(lambda t: t.full_masks),
            attention={name: cat(lambda t, n=name: t.attention[n]) for name in first.attention},
            representatives=[cat(lambda t, l=l: t.representatives[l]) for l in range(len(first.representatives))],
            pixels=optional(lambda t: t.pixels),
            labels=optional(lambda t: t.labels),
            paths=[p for t in traces for p in t.paths],
        )

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write the trace to one file (tensors, names and numbers only: ``Trace.load`` reads it back
        with ``torch.load(weights_only=True)``), atomically."""
        from depict_analysis.models.checkpoint import atomic_save

        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["subspaces"] = [vars(space) for space in self.subspaces]
        state["grid"], state["image_size"] = list(self.grid), list(self.image_size)
        atomic_save({"format": TRACE_FORMAT, **state}, path)

    @staticmethod
    def load(path: str | os.PathLike) -> "Trace":
        """A trace written by ``Trace.save`` (no code is run from the file), checked as untrusted input:
        finite, its shapes consistent with each other and its model, its names the model's own
        (``depict_analysis.trace_validation``); anything else is an ``InputError``."""
        from depict_analysis.models.checkpoint import read_checkpoint
        from depict_analysis.trace_validation import validate_trace

        state = read_checkpoint(path)
        tag = state.pop("format", None)
        if tag in OLD_FORMATS:
            raise InputError(f"{path}: a trace saved by an older version ({tag}, full-size masks only); trace the images again")
        if tag != TRACE_FORMAT:
            raise InputError(f"{path}: not a saved trace (no format tag {TRACE_FORMAT!r})")
        try:
            state["subspaces"] = [Subspace(**space) for space in state["subspaces"]]
            state["grid"], state["image_size"] = tuple(state["grid"]), tuple(state["image_size"])
            loaded = Trace(**state)
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: a saved trace with missing or unknown entries ({e})") from None
        return validate_trace(loaded, str(path))


def class_labels(class_names: Any, n_cls: int) -> list[str]:
    """The K names of a model's classes for figures and tables: ``class_names`` checked (a sequence of
    ``n_cls`` strings), or ``class i`` when None."""
    if class_names is None:
        return [f"class {i}" for i in range(n_cls)]
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence) \
            or not all(isinstance(name, str) for name in class_names):
        raise ConfigError(f"class_names must be a list of strings, got {type(class_names).__name__}")
    if len(class_names) != n_cls:
        raise ConfigError(f"{len(class_names)} class names for a model of {n_cls} classes")
    return list(class_names)


def _model_text(tr: Trace) -> str:
    return f"{tr.model.get('variant')} with {tr.model.get('n_cls')} classes"


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What results record about a model: variant, decoder family and role, d, patch size, K."""
    config = model.config
    return {
        "variant": (config.name if config is not None else "") or "custom",
        "decoder": model.decoder.family,
        "role": model.decoder.role,
        "d_model": model.encoder.dim,
        "patch_size": model.patch_size,
        "n_cls": model.n_cls,
    }


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter's float64 sum: equal for the same weights, different (almost surely)
    for two checkpoints of one variant."""
    import hashlib

    with torch.inference_mode():
        sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).cpu().numpy()
    return hashlib.sha256(sums.tobytes()).hexdigest()[:16]


def trace(
    model: nn.Module, images: Batch | Tensor, attention: bool = False, amp: bool = False, source: str | None = None,
    full_masks: bool = False,
) -> Trace:
    """Run ``model`` on ``images`` and record the decoder's internals.

    ``images``: an ``Images`` batch (``load_images``; pixels in [0, 1], normalised here and kept in
    the trace with labels and paths), or a tensor (B, 3, H, W) already normalised with
    ``model.normalize``. The same computation as ``model(images)``: ``logits(b)`` equal it, and
    ``full_masks`` (kept only when asked: (B, K, H, W), large) are it. Runs under
    ``torch.inference_mode``, in float32 unless ``amp`` (bf16 autocast on CUDA); the subspaces are
    copies, independent of later changes to the model. ``source`` names the model in error messages
    (``LoadedModel.label``).
    """
    device = _check_inputs(model, images)
    batch = images if isinstance(images, Batch) else None
    x = model.normalize(batch.pixels.to(device)) if batch is not None else images
    with torch.inference_mode(), autocast(device, amp):
        z0, grid = model.encode(x)
        out = model.decoder.forward_intermediates(z0, grid, attention=attention)
        full = model.upsample(out.masks, grid, x.shape[-2:]).float() if full_masks else None
        subspaces = [_copy(s, model.decoder.input_norm(s)) for s in model.decoder.subspaces()]
    return Trace(
        model=describe_model(model),
        grid=grid,
        image_size=tuple(x.shape[-2:]),
        layer_names=list(out.layer_names),
        tokens=_float(out.tokens),
        class_stages=list(out.class_stages),
        classes=_float(out.classes),
        embeddings=out.embeddings.detach().float(),
        class_embeddings=out.class_embeddings.detach().float(),
        masks=out.masks.detach().float(),
        subspaces=subspaces,
        full_masks=full,
        attention=dict(zip(out.attention, _float(out.attention.values()))),
        representatives=_float(out.representatives),
        pixels=batch.pixels if batch is not None else None,
        labels=_labels_of(batch, model.n_cls) if batch is not None else None,
        paths=list(batch.paths) if batch is not None else [],
        config=model.config.to_dict() if model.config is not None else None,
        weights=weights_fingerprint(model),
        source=source,
    )


def _check_inputs(model: Any, images: Any) -> torch.device:
    """The front door of ``trace``: a segmentation model, and finite images (B, 3, H, W) of floats on its
    device (an ``Images`` batch: its labels in the model's classes or 255); returns the model's device."""
    if not isinstance(model, nn.Module) or not all(hasattr(model, a) for a in ("encode", "decoder", "normalize", "n_cls")):
        raise InputError(f"trace needs a segmentation model (create_model, load_model), got {type(model).__name__}")
    device = next(model.parameters()).device
    if not isinstance(images, (Batch, Tensor)):
        raise InputError(f"images must be an Images batch (load_images) or a tensor (B, 3, H, W), got {type(images).__name__}")
    pixels = images.pixels if isinstance(images, Batch) else images
    if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise InputError(f"images must be a tensor (B, 3, H, W) of at least one image, got shape {tuple(getattr(pixels, 'shape', ()))}")
    dtype = next(model.parameters()).dtype
    if pixels.dtype != dtype:
        raise InputError(f"images must hold {dtype} values like the model, got {pixels.dtype} (load_images gives [0, 1] floats)")
    if isinstance(images, Tensor) and images.device != device:
        raise InputError(f"images are on {images.device} but the model is on {device}; move one of them (.to(device))")
    bad = int((~torch.isfinite(pixels)).sum())
    if bad:
        raise InputError(f"images hold {bad} NaN / Inf value(s); every pixel must be a finite number")
    labels = _labels_of(images, model.n_cls) if isinstance(images, Batch) else None
    if labels is not None:
        wrong = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= model.n_cls))
        if wrong.any():
            b = int(wrong.flatten(1).any(1).nonzero()[0])
            name = images.paths[b] if b < len(images.paths) else f"image {b}"
            raise InputError(f"the label map of {name} holds the value {int(labels[b][wrong[b]][0])}, no class of "
                             f"this model (classes 0..{model.n_cls - 1}, {IGNORE_INDEX} = ignore)")
    return device


def _labels_of(batch: Batch, n_cls: int) -> Tensor | None:
    """The labels a trace of a model of ``n_cls`` classes keeps: a dataset's labels of another class set
    are not this model's ground truth (an analysis that reads none may still run on its images), so
    none; label files of the user's are kept, and checked by ``_check_inputs``."""
    if batch.labels is None or batch.label_classes is not None and batch.label_classes != n_cls:
        return None
    return batch.labels


def _copy(space: Subspace, norm: nn.LayerNorm | None) -> Subspace:
    """A copy of ``space`` independent of the model, with its layer's input LayerNorm ``norm``."""
    copy = lambda t: t.detach().float().clone()  # noqa: E731
    recorded = (copy(norm.weight), copy(norm.bias), norm.eps) if norm is not None else None
    return Subspace(space.name, space.layer, space.proj.detach().clone(), space.parameter, recorded)


def trace_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    attention: bool = False,
    amp: bool = False,
    total: int | None = None,
    progress: bool = True,
    description: str = "tracing",
    source: str | None = None,
    full_masks: bool = False,
) -> Iterator[Trace]:
    """One ``Trace`` per batch of ``batches``, with a progress bar over ``total`` images on stderr."""
    with image_progress(total, description, progress) as advance:
        for batch in batches:
            yield trace(model, batch, attention=attention, amp=amp, source=source, full_masks=full_masks)
            advance(len(batch.paths))


def as_traces(traces: Trace | Iterable[Trace]) -> Iterator[Trace]:
    """What every analysis accepts: one ``Trace`` (e.g. ``Trace.load(path)``) or many (``trace_batches``),
    all of one model: a trace of another model raises ``InputError`` naming both (``compare`` analyses
    several models, each on its own)."""
    if isinstance(traces, Trace):
        return iter([traces])
    if isinstance(traces, (str, bytes, os.PathLike)) or not isinstance(traces, Iterable):
        raise InputError(f"traces must be a Trace or an iterable of them (Trace.load reads a file), got {type(traces).__name__}")
    return _of_one_model(traces)


def _of_one_model(traces: Iterable[Any]) -> Iterator[Trace]:
    first: _Identity | None = None  # not the first trace: its tensors would stay alive to the end
    for item in traces:
        tr = _a_trace(item)
        del item
        first = first or _Identity.of(tr)
        first.require(tr)
        yield tr
        del tr  # not alive while the next batch is traced


def _a_trace(item: Any) -> Trace:
    if not isinstance(item, Trace):
        raise InputError(f"traces must be Trace objects, got a {type(item).__name__}")
    return item


class _Identity(NamedTuple):
    """Which model a trace comes from: its description, weight fingerprint and name (``Trace.model_name``)."""

    model: dict[str, Any]
    weights: str | None
    name: str

    @staticmethod
    def of(tr: Trace) -> "_Identity":
        return _Identity(tr.model, tr.weights, tr.model_name)

    def matches(self, tr: Trace) -> bool:
        """The same description, and the same weights where both record them."""
        known = self.weights is not None and tr.weights is not None
        return self.model == tr.model and (not known or self.weights == tr.weights)

    def require(self, tr: Trace) -> None:
        if not self.matches(tr):
            raise InputError(f"traces of two models cannot be pooled into one result: {self.name} and "
                             f"{tr.model_name}; analyse each model on its own (depict_analysis.compare)")


def _float(tensors) -> list[Tensor]:
    """Detached float32 tensors: views of parameters (e.g. the expanded ``cls_emb``) keep requiring grad
    even under inference_mode, and bf16 activations (``amp``) are kept as float32."""
    return [t.detach().float() for t in tensors]
