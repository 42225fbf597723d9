"""Interventions (SPEC §3.5): change one named part of a decoder's forward pass for the duration of a call.

An ``Edit`` names what it changes with the trace's names (``depict_analysis.tracing``):

- ``HeadAblation("mssa2", 0)``: head 0 of layer mssa2 contributes nothing to the layer's update
  (zero-ablation); with ``means=`` it contributes its mean output instead (mean-ablation). Head k's
  output (the ``heads/<layer>`` site, (B, h, T, p)) is what the layer maps back with P_k: DEPICT's
  update η P_k·softmax(W_k W_kᵀ/√p) W_k, CBT's and ToST's row block k of ``to_out``, Segmenter's of
  ``attn.proj``. Ablating head k of a DEPICT layer removes everything the layer writes into span(P_k).
- ``Projection("tokens/mssa1", U)``: the tokens after mssa1 (= before mssa2) replaced by U Uᵀ z
  (onto span U) or, with ``keep=False``, by (I − U Uᵀ) z (out of it); ``subspace_basis`` gives U, an
  orthonormal basis of span(P_l) or of one head's span(P_{l,k}).
- ``ClassAblation(k)`` / ``ClassSwap(a, b)``: the class embeddings Q̂ the mask head compares with the
  patches (``class_embeddings``), or the class queries at any ``classes/<stage>`` (DEPICT-CA's MSCA
  inputs: ``classes/input``, ``classes/msca1``, ...), zeroed, mean-ablated or swapped (a swap also
  exchanges the two classes' γ, β of the mask head's LayerNorm over classes: their masks swap exactly).
- ``TokenPatch("tokens/mssa1", tokens)``: the tokens at a stage replaced by those of another image
  (``trace(model, other)["tokens/mssa1"]``; the same image size).
- ``HeadRotation("mssa1", 0, R)``: a parameter edit, P_k → P_k R with R (p, p) orthogonal (MSSA and
  MSCA are exactly invariant to it: a sanity check of the mechanism).

``with edited(model, *edits): model(x)`` applies them; the model itself is never changed: activation
edits attach to the decoder's hook sites (``Decoder.hook_sites``, a plain attribute removed on exit),
parameter edits put another tensor in the parameter's place and the original ``Parameter`` object
back on exit, also when the block raises. Mean-ablation reads ``Means`` recorded by ``record_means``
over images the caller names; ``Means.images`` keeps their names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.inputs import Batch
from depict_analysis.models.decoders.base import Decoder, HookSite, Subspace

__all__ = [
    "ClassAblation", "ClassSwap", "Edit", "HeadAblation", "HeadRotation", "Means", "Projection", "TokenPatch",
    "edited", "record_means", "subspace_basis",
]


class Edit:
    """One change of the forward pass. ``site``: the trace name of the value it replaces (``heads/mssa1``,
    ``tokens/input``, ``class_embeddings``, ...), or None for an edit of parameters alone."""

    site: str | None

    def apply(self, value: Tensor, site: HookSite) -> Tensor:
        """The value that continues the forward pass in place of ``value``."""
        raise NotImplementedError

    def parameters(self, decoder: Decoder) -> dict[str, Tensor]:
        """``{decoder parameter name: tensor used instead}`` for the duration of the edit."""
        return {}


# ------------------------------------------------------------------------------------------- means


@dataclass
class SiteMean:
    """The mean of one site's value over images: ``patches`` (..., w) also over the patch rows (a patch
    position means nothing across images), ``classes`` (..., C, w) per class row; None where the site has none."""

    patches: Tensor | None
    classes: Tensor | None

    def like(self, value: Tensor, class_rows: int) -> Tensor:
        """The mean laid out as one image's ``value`` (..., T, w): patch rows, then ``class_rows`` class rows."""
        T = value.shape[-2]
        parts = []
        if T > class_rows:
            parts.append(self.patches.to(value).unsqueeze(-2).expand(*value.shape[:-2], T - class_rows, value.shape[-1]))
        if class_rows:
            parts.append(self.classes.to(value))
        return torch.cat(parts, dim=-2)


@dataclass
class Means:
    """Per site name its ``SiteMean``, and the images the means were taken over (recorded with a result)."""

    sites: dict[str, SiteMean]
    images: list[str] = field(default_factory=list)

    def at(self, site: str) -> SiteMean:
        if site not in self.sites:
            raise ConfigError(f"no mean recorded at {site!r}; recorded: {', '.join(self.sites) or 'none'} "
                              "(record_means(model, images, sites=[...]))")
        return self.sites[site]


class MeanRecorder(Edit):
    """An edit that changes nothing and sums its site's value (float64) for ``SiteMean``."""

    def __init__(self, site: str):
        self.site = site
        self.patch_sum: Tensor | None = None
        self.class_sum: Tensor | None = None
        self.patch_count = self.class_count = 0

    def apply(self, value: Tensor, site: HookSite) -> Tensor:
        v = value.detach().double()
        split = v.shape[-2] - site.class_rows
        if split:
            part = v[..., :split, :].sum(dim=(0, v.ndim - 2))
            self.patch_sum = part if self.patch_sum is None else self.patch_sum + part
            self.patch_count += v.shape[0] * split
        if site.class_rows:
            part = v[..., split:, :].sum(dim=0)
            self.class_sum = part if self.class_sum is None else self.class_sum + part
            self.class_count += v.shape[0]
        return value

    def mean(self) -> SiteMean:
        if not self.patch_count and not self.class_count:
            raise InputError(f"no values reached {self.site!r} while recording means: no images?")
        patches = None if self.patch_sum is None else (self.patch_sum / self.patch_count).float()
        classes = None if self.class_sum is None else (self.class_sum / self.class_count).float()
        return SiteMean(patches, classes)


# ------------------------------------------------------------------------------------------- edits


def _index(i: int, size: int, what: str) -> int:
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < size:
        raise ConfigError(f"{what} must be an index 0..{size - 1}, got {i!r}")
    return i


@dataclass(frozen=True)
class HeadAblation(Edit):
    """Head ``head`` of layer ``layer`` contributes nothing (``means=None``) or its mean output."""

    layer: str
    head: int
    means: Means | None = None

    @property
    def site(self) -> str:
        return f"heads/{self.layer}"

    def apply(self, value: Tensor, site: HookSite) -> Tensor:  # value: (B, h, T, p)
        k = _index(self.head, value.shape[1], f"head of {self.layer}")
        out = value.clone()
        out[:, k] = 0 if self.means is None else self.means.at(self.site).like(value[0], site.class_rows)[k]
        return out


@dataclass(frozen=True)
class Projection(Edit):
    """The value at ``site`` (tokens (B, N, d) or classes (B, K, d)) projected onto span(``basis``)
    (U Uᵀ z) or, with ``keep=False``, out of it ((I − U Uᵀ) z). ``basis``: U (d, r), orthonormal columns.
    With ``means`` the part projected away is replaced by the mean's part (mean-ablation of a subspace)."""

    site: str
    basis: Tensor
    keep: bool = True
    means: Means | None = None

    def apply(self, value: Tensor, site: HookSite) -> Tensor:
        U = self.basis.to(value)
        if U.shape[0] != value.shape[-1]:
            raise ConfigError(f"a basis of R^{U.shape[0]} cannot project the {value.shape[-1]}-wide values at {self.site!r}")
        inside = (value @ U) @ U.T
        kept = inside if self.keep else value - inside
        if self.means is None:
            return kept
        mean = self.means.at(self.site).like(value[0], site.class_rows)
        mean_inside = (mean @ U) @ U.T
        return kept + (mean - mean_inside if self.keep else mean_inside)


@dataclass(frozen=True)
class ClassAblation(Edit):
    """Class ``index``'s row of the class embeddings at ``site`` zeroed (``means=None``) or set to its mean."""

    index: int
    site: str = "class_embeddings"
    means: Means | None = None

    def apply(self, value: Tensor, site: HookSite) -> Tensor:  # value: (B, K, d)
        k = _index(self.index, value.shape[-2], "class")
        out = value.clone()
        out[:, k] = 0 if self.means is None else self.means.at(self.site).like(value[0], site.class_rows)[k]
        return out


@dataclass(frozen=True)
class ClassSwap(Edit):
    """Classes ``a`` and ``b`` exchange their class side: their rows of the class embeddings at ``site``
    and their entries of the mask head's LayerNorm over classes (its per-class γ, β), so that the two
    classes' masks swap exactly (the normalisation itself does not depend on the order of the classes)."""

    a: int
    b: int
    site: str = "class_embeddings"

    def _order(self, K: int, device: torch.device) -> Tensor:
        order = torch.arange(K, device=device)
        a, b = _index(self.a, K, "class"), _index(self.b, K, "class")
        order[a], order[b] = b, a
        return order

    def apply(self, value: Tensor, site: HookSite) -> Tensor:  # value: (B, K, d)
        return value[:, self._order(value.shape[-2], value.device)]

    def parameters(self, decoder: Decoder) -> dict[str, Tensor]:
        norm = decoder.mask_norm
        order = self._order(norm.weight.shape[0], norm.weight.device)
        return {"mask_norm.weight": norm.weight.detach()[order], "mask_norm.bias": norm.bias.detach()[order]}


@dataclass(frozen=True)
class TokenPatch(Edit):
    """The value at ``site`` replaced by ``tokens`` recorded elsewhere (one image's (1, T, w) for every
    image of the batch, or one per image (B, T, w))."""

    site: str
    tokens: Tensor

    def apply(self, value: Tensor, site: HookSite) -> Tensor:
        if self.tokens.shape[1:] != value.shape[1:] or self.tokens.shape[0] not in (1, value.shape[0]):
            raise InputError(f"tokens of shape {tuple(self.tokens.shape)} cannot replace {tuple(value.shape)} at "
                             f"{self.site!r}: patch from an image of the same size")
        return self.tokens.to(value).expand_as(value)


@dataclass(frozen=True)
class HeadRotation(Edit):
    """Head ``head``'s basis of subspace ``subspace`` rotated inside its span: P_k → P_k R, R (p, p)."""

    subspace: str
    head: int
    rotation: Tensor
    site = None  # no value is replaced: the layer computes with other parameters

    def parameters(self, decoder: Decoder) -> dict[str, Tensor]:
        space = named_subspace(decoder, self.subspace)
        if space.parameter is None:
            raise ConfigError(f"subspace {self.subspace!r} is part of a larger parameter; only whole projections rotate")
        h, p, d = space.proj.shape
        k = _index(self.head, h, f"head of {self.subspace}")
        if tuple(self.rotation.shape) != (p, p):
            raise ConfigError(f"a rotation of head {k} of {self.subspace!r} is ({p}, {p}), got {tuple(self.rotation.shape)}")
        proj = decoder.get_parameter(space.parameter).detach().clone()
        blocks = proj.view(h, p, d)
        blocks[k] = self.rotation.to(proj).T @ blocks[k]  # rows P_kᵀ -> (P_k R)ᵀ = Rᵀ P_kᵀ
        return {space.parameter: proj}


# ------------------------------------------------------------------------------------------- subspaces


def named_subspace(decoder: Decoder, name: str) -> Subspace:
    spaces = {space.name: space for space in decoder.subspaces()}
    if name not in spaces:
        raise ConfigError(f"no subspace {name!r} in this {decoder.family} decoder; subspaces: {', '.join(spaces) or 'none'}")
    return spaces[name]


def subspace_basis(model: nn.Module, subspace: str, head: int | None = None) -> Tensor:
    """U (d, r), float32: an orthonormal basis of span(P_l) of subspace ``subspace`` (all heads), or of
    one head's span(P_{l,k}); r = the rank (SVD in float64, the usual numerical rank tolerance)."""
    space = named_subspace(getattr(model, "decoder", model), subspace)
    h, p, d = space.proj.shape
    rows = space.proj.detach().double().cpu()
    rows = rows.reshape(h * p, d) if head is None else rows[_index(head, h, f"head of {subspace}")]
    U, S, _ = torch.linalg.svd(rows.T, full_matrices=False)  # (d, m): columns span the rows of P_kᵀ
    rank = int((S > S.max() * max(rows.shape) * torch.finfo(torch.float64).eps).sum())
    return U[:, :rank].float()


# ------------------------------------------------------------------------------------------- applying


@contextmanager
def edited(model: nn.Module, *edits: Edit) -> Iterator[nn.Module]:
    """Run ``model`` (a ``Segmentor`` or its decoder) with ``edits`` inside the block; yields ``model``.

    Edits at the same site apply in the order given; blocks nest. On exit every hook site and every
    parameter is as it was, also when the block raises.
    """
    decoder = getattr(model, "decoder", model)
    sites = decoder.hook_sites()
    attached: dict[nn.Module, dict[str, list]] = {}
    for edit in edits:
        if edit.site is None:
            continue
        if edit.site not in sites:
            raise ConfigError(f"no site {edit.site!r} in this {decoder.family} decoder; sites: {', '.join(sites)}")
        site = sites[edit.site]
        attached.setdefault(site.module, {}).setdefault(site.key, []).append(partial(edit.apply, site=site))
    replaced = {name: value for edit in edits for name, value in edit.parameters(decoder).items()}
    restore_edits: list[tuple[nn.Module, dict | None]] = []
    restore_parameters: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for name, value in replaced.items():
            owner, _, attribute = name.rpartition(".")
            module = decoder.get_submodule(owner)
            restore_parameters.append((module, attribute, module._parameters[attribute]))
            module._parameters[attribute] = value  # the Parameter object itself is never written
        for module, table in attached.items():
            previous = module.__dict__.get("edits")
            restore_edits.append((module, previous))
            merged = {key: list(functions) for key, functions in (previous or {}).items()}
            for key, functions in table.items():
                merged.setdefault(key, []).extend(functions)
            module.edits = merged
        yield model
    finally:
        for module, previous in reversed(restore_edits):
            if previous is None:
                del module.edits
            else:
                module.edits = previous
        for module, attribute, parameter in reversed(restore_parameters):
            module._parameters[attribute] = parameter


@torch.inference_mode()
def record_means(
    model: nn.Module, images: Batch | Iterable[Batch], sites: Sequence[str], names: Sequence[str] | None = None
) -> Means:
    """The mean of every site in ``sites`` over ``images`` (``load_images`` batches, or a stream of them),
    for mean-ablation. ``Means.images`` names the images (their paths, or ``names`` when given)."""
    recorders = [MeanRecorder(site) for site in sites]
    seen: list[str] = []
    with edited(model, *recorders):
        for batch in [images] if isinstance(images, Batch) else images:
            model(model.normalize(batch.pixels.to(next(model.parameters()).device)))
            seen += list(batch.paths)
    return Means({r.site: r.mean() for r in recorders}, list(names) if names is not None else seen)
