"""What a decoder family is, and the registry of families (timm's ``register_model`` pattern).

A family lives in one file, ``models/decoders/<family>.py``, which holds:

- its config, a ``DecoderConfig`` dataclass whose ``name`` is the family's tag in checkpoints;
- its module, a ``Decoder`` whose ``forward_intermediates(z, grid)`` returns everything the
  analyses read (``Intermediates``: tokens per layer, class embeddings per stage, final Q̂, masks,
  attention maps on request) and whose ``forward`` is that call's masks; ``subspaces()`` names the
  head projections it owns, ``hook_sites()`` the values an edit can replace (the trace's names:
  ``tokens/mssa1``, ``classes/input``, ``class_embeddings``, and ``heads/mssa1`` for each layer's
  per-head outputs), and ``role`` says whether it is a white-box decoder;
- one ``register_family(Family(...))`` call: the builder, the sizes of its registry variants per
  backbone, and for families with official releases the key that identifies them and the
  conversion of their keys to ours.

The package imports every module in it (``decoders/__init__.py``), so a new file is all it takes.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.mask_head import masks_from_embeddings
from depict_analysis.foundation.errors import CheckpointError, ConfigError

ROLES = ("white-box", "black-box", "linear")


# ------------------------------------------------------------------------------------ what one decoder is


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, h·p) -> (B, h, T, p), a view."""
    B, T, _ = x.shape
    return x.view(B, T, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, p) -> (B, T, h·p)."""
    B, h, T, p = x.shape
    return x.transpose(1, 2).reshape(B, T, h * p)


# ------------------------------------------------------------------------------------- edit hooks


class Hooked:
    """A module whose forward runs values through ``self.hook(key, value)``, so that an edit can replace
    them (TransformerLens' hook points; ``depict_analysis.interventions`` attaches the edits).

    The edits of a call live in the plain attribute ``edits`` (``{key: [function, ...]}``), set and
    removed by ``interventions.edited``: never a parameter, buffer or submodule, so ``state_dict`` is
    unaffected. With none attached a site returns its value unchanged (the same tensor).
    """

    def hook(self, key: str, value: Tensor) -> Tensor:
        for edit in self.__dict__.get("edits", {}).get(key, ()):
            value = edit(value)
        return value


@dataclass(frozen=True)
class HookSite:
    """Where the value a trace name denotes passes through a ``Hooked.hook``: ``module.hook(key, ·)``.

    ``class_rows``: how many trailing rows (axis −2) of its value are class embeddings, the rest being
    patch tokens: K for ``classes/`` and ``class_embeddings`` (B, K, d) and for the ``heads/`` (B, h, T, p)
    of a layer on the joint sequence or on MSCA's queries; 0 for ``tokens/`` and heads on patches alone.
    """

    module: nn.Module
    key: str
    class_rows: int = 0


@dataclass
class Subspace:
    """A projection P a decoder owns: ``proj[k]`` holds P_kᵀ, whose rows are the basis of head k."""

    name: str  # e.g. "mssa1", "msca2", "block1.W_Q"
    layer: int | None  # the j whose tokens[j] this layer produces (None: it updates classes only)
    proj: Tensor  # (h, p, d)
    # The decoder parameter, (h·p, d), whose rows these are; None when P is only part of one (Segmenter's W_Q).
    # Structured robustness transforms act on exactly these parameters.
    parameter: str | None = None
    # The LayerNorm the layer applies to its input before projecting it, as (weight, bias, eps): recorded
    # by ``trace`` from ``Decoder.input_norm``; None where the layer has none or it was not recorded.
    norm: tuple[Tensor, Tensor, float] | None = None

    def layer_input(self, Z: Tensor) -> Tensor:
        """What this layer projects when its input is Z: its LayerNorm applied to each token, (..., d) -> (..., d)."""
        if self.norm is None:
            raise ConfigError(f"subspace {self.name!r} has no recorded input LayerNorm")
        weight, bias, eps = self.norm
        return F.layer_norm(Z, weight.shape, weight.to(Z.dtype), bias.to(Z.dtype), eps)


@dataclass
class Step:
    """What one token-updating layer returns to ``forward_intermediates``."""

    out: Tensor  # the layer's output sequence (B, T, d)
    attention: Tensor | None = None  # its attention map, when asked for
    representatives: Tensor | None = None  # tokens it contracts the sequence onto (CBT), (B, h, R, p)


@dataclass
class Intermediates:
    """Everything a decoder computes on the way to its masks, for one batch.

    ``tokens[j]``: patch tokens after layer j, ``tokens[0]`` = the decoder input Z_0, (B, N, d_j);
    ``layer_names[j - 1]`` names layer j. ``classes[i]``: class embeddings at ``class_stages[i]``
    ("input", then after every layer that updates them), (B, K, d) — a query decoder's Q queries in
    place of the K classes (MaskFormer). ``class_embeddings``: the final
    L2-normalised Q̂ of the mask head (linear: the classifier rows), (B, K, d). ``embeddings``: the
    patch embeddings the mask head compares with Q̂, before their L2 normalisation, (B, N, d) — after
    the decoder's final LayerNorm (and Segmenter's ``proj_patch``): SPEC's Z_L1. ``masks``: (B, K, h, w)
    on the patch grid. ``attention``: ``{layer name: map}`` when asked for; ``representatives``: one
    (B, h, R, p) per layer, for decoders that have them.
    """

    tokens: list[Tensor]
    layer_names: list[str]
    classes: list[Tensor]
    class_stages: list[str]
    class_embeddings: Tensor
    embeddings: Tensor
    masks: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)
    representatives: list[Tensor] = field(default_factory=list)


class Decoder(Hooked, nn.Module):
    """A decoder family's module: patch tokens Z_0 (B, N, d) on a grid (h, w) -> masks (B, K, h, w)."""

    family: ClassVar[str] = ""  # the family's tag (its config's ``name``)
    role: ClassVar[str] = ""  # one of ROLES: "white-box" decoders are derived from an objective (rate reduction)
    # What the masks are: "logits" (soft-maxed over classes by the inference protocol) or "probabilities"
    # (per-class scores already, e.g. MaskFormer's semantic inference; the protocol averages them as they are).
    outputs: ClassVar[str] = "logits"
    n_cls: int

    def forward_intermediates(self, z: Tensor, grid: tuple[int, int], attention: bool = False) -> Intermediates:
        raise NotImplementedError

    def forward(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        """z: (B, N, d) patch tokens on a grid (h, w) -> masks (B, K, h, w)."""
        return self.forward_intermediates(z, grid).masks

    def subspaces(self) -> list[Subspace]:
        """The head projections the decoder owns, in layer order (views of its parameters)."""
        return []

    def hook_sites(self) -> dict[str, HookSite]:
        """Every value an edit can replace, by its trace name (``tokens/<stage>`` (B, N, d),
        ``classes/<stage>`` (B, K, d), ``class_embeddings`` Q̂ (B, K, d), ``heads/<layer>`` (B, h, T, p))."""
        return {}

    def mask_head(self, patches: Tensor, classes: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """patches (B, N, d), classes (B, K, d) -> Q̂ (B, K, d), run through the ``class_embeddings``
        site, and the masks (B, K, h, w) it gives (``mask_norm`` over the class scores)."""
        class_embeddings = self.hook("class_embeddings", F.normalize(classes, dim=-1))
        return class_embeddings, masks_from_embeddings(patches, class_embeddings, self.mask_norm, grid)

    def stage_sites(self, token_stages: Sequence[str], class_stages: Sequence[str]) -> dict[str, HookSite]:
        """The decoder's own sites: ``tokens/<stage>``, ``classes/<stage>`` and ``class_embeddings``."""
        sites = {f"tokens/{stage}": HookSite(self, f"tokens/{stage}") for stage in token_stages}
        classes = [f"classes/{stage}" for stage in class_stages] + ["class_embeddings"]
        return sites | {name: HookSite(self, name, self.n_cls) for name in classes}

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the official recipe trains without weight decay: the class embeddings."""
        return {"cls_emb"} if hasattr(self, "cls_emb") else set()

    def input_norm(self, space: Subspace) -> nn.LayerNorm | None:
        """The LayerNorm that ``space``'s layer applies to its input before projecting it, or None.

        Found from the module tree, for every family alike: the innermost module around the parameter
        that holds ``space.proj`` with a LayerNorm ``norm`` (CRATE-style PreNorm layers: DEPICT, CBT, ToST)
        or ``norm1`` (a timm ``Block``: Segmenter). ``space`` is one of ``subspaces()`` (a view of the parameter).
        """
        storage = space.proj.untyped_storage().data_ptr()
        owner = next((name for name, p in self.named_parameters() if p.untyped_storage().data_ptr() == storage), None)
        path = owner.split(".")[:-1] if owner is not None else []
        for depth in range(len(path), 0, -1):
            module = self.get_submodule(".".join(path[:depth]))
            norm = next((m for m in (getattr(module, "norm", None), getattr(module, "norm1", None))
                         if isinstance(m, nn.LayerNorm)), None)
            if norm is not None:
                return norm
        return None

    @property
    def is_white_box(self) -> bool:
        return self.role == "white-box"

    @property
    def has_subspaces(self) -> bool:
        return bool(self.subspaces())

    @property
    def parameter_subspaces(self) -> list[Subspace]:
        """The subspaces that are a whole parameter (h·p, d): what structured robustness transforms act on."""
        return [space for space in self.subspaces() if space.parameter is not None]

    @property
    def class_tokens(self) -> Tensor | None:
        """The learned class queries Q_0 (K, d) of a class-token decoder (``cls_emb``), else None."""
        cls_emb = getattr(self, "cls_emb", None)
        return None if cls_emb is None else cls_emb[0]


class JointDecoder(Decoder):
    """``[Z_0 ; Q_0]`` -> L layers -> LayerNorm -> split -> mask head: the class tokens ride along.

    DEPICT-SA, CBT, ToST and Segmenter's mask transformer are this; a subclass owns ``cls_emb``
    (1, K, d), ``decoder_norm`` and ``mask_norm``, and says what its layers are and how one runs.
    """

    stage: ClassVar[str] = "layer"  # layer l is called f"{stage}{l}", l from 1

    def token_layers(self) -> Sequence[nn.Module]:
        """The L layers, in order (``self.layers`` unless a subclass names them otherwise)."""
        return self.layers

    def layer_step(self, layer: nn.Module, x: Tensor, grid: tuple[int, int], attention: bool) -> Step:
        """One layer on the joint sequence x: (B, N + K, d)."""
        raise NotImplementedError

    def embed(self, z: Tensor) -> Tensor:
        """Z_0 (B, N, d_enc) -> the patch part of the joint sequence (B, N, d)."""
        return z

    def layer_names(self) -> list[str]:
        return [f"{self.stage}{l}" for l in range(1, len(self.token_layers()) + 1)]

    def head_site(self, layer: nn.Module) -> HookSite:
        """Where a layer's per-head outputs (B, h, N + K, p) pass: its own ``hook("heads", ·)``."""
        return HookSite(layer, "heads", self.n_cls)

    def hook_sites(self) -> dict[str, HookSite]:
        names = self.layer_names()
        heads = {f"heads/{name}": self.head_site(layer) for name, layer in zip(names, self.token_layers())}
        return self.stage_sites(["input", *names], ["input", *names]) | heads

    def _edit_stage(self, stage: str, x: Tensor, n: int) -> Tensor:
        """The joint sequence x (B, N + K, d) after ``stage``, its patches and classes run through their sites."""
        if not self.__dict__.get("edits"):  # the clean forward keeps its tensors as they are
            return x
        return torch.cat([self.hook(f"tokens/{stage}", x[:, :n]), self.hook(f"classes/{stage}", x[:, n:])], dim=1)

    def project(self, patches: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The normalised outputs -> what the mask head compares."""
        return patches, classes

    def forward_intermediates(self, z: Tensor, grid: tuple[int, int], attention: bool = False) -> Intermediates:
        n = z.shape[1]
        z = self.hook("tokens/input", z)
        x = torch.cat([self.embed(z), self.hook("classes/input", self.cls_emb.expand(z.shape[0], -1, -1))], dim=1)
        names = self.layer_names()
        tokens, classes, maps, representatives = [z], [x[:, n:]], {}, []
        for name, layer in zip(names, self.token_layers()):
            step = self.layer_step(layer, x, grid, attention)
            x = self._edit_stage(name, step.out, n)
            tokens.append(x[:, :n])
            classes.append(x[:, n:])
            if step.attention is not None:
                maps[name] = step.attention
            if step.representatives is not None:
                representatives.append(step.representatives)
        x = self.decoder_norm(x)
        patches, final = self.project(x[:, :n], x[:, n:])
        class_embeddings, masks = self.mask_head(patches, final, grid)
        return Intermediates(
            tokens, names, classes, ["input", *names], class_embeddings, patches, masks, maps, representatives
        )


# ------------------------------------------------------------------------------------------ configs


@dataclass
class DecoderConfig:
    """A family's hyper-parameters. Subclasses are dataclasses and set ``name`` to the family's tag."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Fields are checked against their types: an ``int`` is at least 1, or 0 where 0 is its default
        (a size chosen automatically); a ``float`` is a finite number at least 0."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value >= min(f.default, 1)):
                raise ConfigError(f"decoder {self.name} {f.name} must be an integer of at least {min(f.default, 1)}, got {value!r}")
            if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
                raise ConfigError(f"decoder {self.name} {f.name} must be a finite number of at least 0, got {value!r}")

    def to_dict(self) -> dict:
        """What a checkpoint stores: ``{"family": name, **fields}``."""
        return {"family": self.name, **asdict(self)}


def decoder_config_from_dict(values: Mapping) -> DecoderConfig:
    """A family config from a checkpoint's ``config["decoder"]``.

    New files: ``{"family": ..., **that family's fields}``. Files written before families were units
    hold one flat dict for every family, ``{"name": ..., n_layers, n_heads, dim_head, n_cross_layers,
    cross_dim_head, d_model, drop_path_rate, dropout}``: the family keeps the fields it has.
    """
    values = dict(values)
    if "family" in values:
        family = get_family(values.pop("family"))
        unknown = sorted(set(values) - {f.name for f in fields(family.config)})
        if unknown:
            raise ConfigError(f"decoder {family.name} has no setting {unknown[0]!r}")
        return family.config(**values)
    if "name" not in values:
        raise ConfigError("a decoder config needs a 'family' entry (one of " + ", ".join(_FAMILIES) + ")")
    config = get_family(values.pop("name")).config
    known = {f.name for f in fields(config)}
    return config(**{key: value for key, value in values.items() if key in known})


# ----------------------------------------------------------------------------------- official releases


def layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many ``<prefix><i>.`` layers an official state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for key in state if (m := pattern.match(key))), default=-1)


def heads_of(state: Mapping[str, Tensor], key: str, dim_head: int) -> int:
    """The head count of a projection whose rows are h blocks of ``dim_head``."""
    rows = state[key].shape[0]
    if rows % dim_head:
        raise CheckpointError(f"{key} has {rows} rows, not a multiple of the head width {dim_head}")
    return rows // dim_head


def prenorm_renames(net: str, ours: str) -> tuple[tuple[str, str], ...]:
    """The official names of CRATE-style ``PreNorm`` layers (DEPICT, CBSA) -> ours:
    ``<net>.layers.<i>.fn.x`` -> ``<ours>.<i>.x`` and ``<net>.layers.<i>.norm.x`` -> ``<ours>.<i>.norm.x``."""
    return ((rf"^{net}\.layers\.(\d+)\.fn\.", rf"{ours}.\1."), (rf"^{net}\.layers\.(\d+)\.norm\.", rf"{ours}.\1.norm."))


@dataclass(frozen=True)
class OfficialFormat:
    """How a family's official release is recognised and mapped onto our modules.

    Keys are those of the release's decoder, ``decoder.`` removed. ``config(state, kwargs)`` reads
    the hyper-parameters off the weights and variant.yml's ``decoder`` section; ``renames`` are
    (regex, replacement) pairs applied in order to every key.
    """

    signature: str  # a key only this family's releases have
    config: Callable[[Mapping[str, Tensor], dict], DecoderConfig]
    renames: tuple[tuple[str, str], ...] = ()

    def convert(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        converted = {}
        for key, value in state.items():
            for pattern, replacement in self.renames:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        return converted


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Family:
    """One registered decoder family.

    ``build(config, dim_encoder, n_cls)`` makes the module; ``variant`` prefixes its registry variants
    (``<variant>-<backbone>``); ``sizes[backbone]`` is the config of that variant, ``sizes["vit"]``
    the one for every ViT backbone not listed.
    """

    config: type[DecoderConfig]
    build: Callable[[DecoderConfig, int, int], Decoder]
    variant: str
    sizes: Mapping[str, DecoderConfig]
    official: OfficialFormat | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def size(self, backbone: str) -> DecoderConfig:
        return self.sizes.get(backbone, self.sizes["vit"])


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES or any(f.variant == family.variant for f in _FAMILIES.values()):
        raise ConfigError(f"decoder family {family.name!r} ({family.variant}) is registered twice")
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ConfigError(f"unknown decoder family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def build_decoder(config: DecoderConfig, dim_encoder: int, n_cls: int) -> Decoder:
    """The module of ``config``'s family, randomly initialised, on ``dim_encoder``-wide tokens."""
    return get_family(config.name).build(config, dim_encoder, n_cls)
