"""Coding rates of token embeddings: ``R(Z)``, ``R(P^T Z)`` and ``R(Q)`` (SPEC.md §3.1).

For one image's tokens ``Z ∈ R^{m×N}`` (columns = tokens, ``m`` = dimension of the space
they live in) the coding rate is::

    R(Z) = ½ logdet(I_N + m/(N ε²) ZᵀZ) = ½ logdet(I_m + m/(N ε²) Z Zᵀ)

In code tokens are rows, ``Z: (..., N, m)``. Both forms are equal (Sylvester's determinant
identity); we always factorise the smaller Gram matrix, in float64, with a batched Cholesky
(``logdet = 2 Σ log diag L``) and ``slogdet`` as a fallback for the entries where Cholesky fails.

Subspace rates use a layer's projection ``proj: (h, p, d)`` — the official ``(h·p, d)`` matrix
with its rows grouped by head, so that ``P_{l,k} = proj[k].T ∈ R^{d×p}``:

- head ``k``: ``R(P_{l,k}ᵀ Z)`` with ``m = p``;
- whole layer: ``R(P_lᵀ Z)`` with ``m = h·p`` (all heads concatenated).

- the span of the layer: ``R(U_lᵀ Z)`` with ``U_l`` an orthonormal basis of span(P_l) (all heads
  together, m = its rank). Divided by ``R(Z)`` this is the *share* of the rate that lies in the
  subspace, ≤ 1 (m ≤ d and Cauchy interlacing); the *raw ratio* ``R(P_lᵀ Z)/R(Z)`` also measures P's
  row norms and the overlap of its heads, and can exceed 1: it is not a share.
- CRATE's per-head sum ``R^c(Z) = Σ_k R(P_{l,k}ᵀ Z)``, m = p, each projected token scaled to unit norm
  inside its head: what CRATE's ``vis_utils/coding_rate.py:CodingRate`` computes on a layer's
  projections, always with the raw P and this normalisation.

Token normalisation (``normalize``):

- ``"l2"`` (default): each token scaled to unit L2 norm in R^d, before any projection;
- ``"none"``: raw tokens;
- ``"crate"``: CRATE's convention, each *projected* token scaled to unit norm inside its head
  (for rates without heads, such as ``R(Z)``, ``R(U_lᵀ Z)`` or ``R(Q)``, this is the same as ``"l2"``).

All functions are pure: they accept any floating dtype on any device, compute in float64 on the
input's device, return float64, and never modify their inputs (safe inside and outside
``torch.inference_mode``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from depict_analysis.choices import NORMALIZE_MODES
from depict_analysis.foundation.errors import ConfigError, InputError

__all__ = [
    "NORMALIZE_MODES",
    "RateTable",
    "SubspaceRates",
    "class_rate",
    "coding_rate",
    "crate_rate",
    "normalize_tokens",
    "rate_table",
    "span_basis",
    "span_rate",
    "subspace_rates",
    "token_rate",
]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be a finite number > 0, got {eps!r}")


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")


def _check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name} must have a floating dtype, got {x.dtype}")


def _check_tokens(Z: Tensor, name: str = "Z") -> None:
    """Z must be a float tensor of shape (B, N, d) with N >= 1."""
    _check_float(Z, name)
    if Z.ndim != 3:
        raise InputError(f"{name} must have shape (B, N, d), got {tuple(Z.shape)}")
    if Z.shape[-2] < 1:
        raise InputError(f"{name} must hold at least one token, got shape {tuple(Z.shape)}")


def _check_proj(proj: Tensor, d: int, name: str = "proj") -> None:
    """proj must be a float tensor of shape (h, p, d)."""
    _check_float(proj, name)
    if proj.ndim != 3:
        raise InputError(
            f"{name} must have shape (heads, dim_head, d), got {tuple(proj.shape)}; "
            "reshape an official (h*p, d) matrix with proj.reshape(h, p, d)"
        )
    if proj.shape[-1] != d:
        raise InputError(
            f"{name} last dim must equal the token width d = {d}, got shape {tuple(proj.shape)}"
        )
    if proj.shape[0] < 1 or proj.shape[1] < 1:
        raise InputError(f"{name} must have at least one head of width >= 1, got {tuple(proj.shape)}")


# --------------------------------------------------------------------------------------------
# log-determinant and rate kernels
# --------------------------------------------------------------------------------------------


def _logdet_pd(M: Tensor) -> Tensor:
    """log det of symmetric positive-definite matrices ``M: (..., n, n)`` -> ``(...)``.

    Batched Cholesky (``logdet = 2 Σ log diag L``); the entries where Cholesky reports failure
    are recomputed with ``slogdet`` (``nan`` where the determinant is not positive).
    """
    L, info = torch.linalg.cholesky_ex(M)
    logdet = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    failed = info != 0
    if failed.any():  # one host sync; rare path
        sign, logabs = torch.linalg.slogdet(M[failed])
        fallback = torch.where(sign > 0, logabs, torch.full_like(logabs, float("nan")))
        logdet = logdet.index_put((failed,), fallback)
    return logdet


def _rate_from_gram(G: Tensor, m: int, N: int, eps: float) -> Tensor:
    """``½ logdet(I + m/(N ε²) G)`` for Gram matrices ``G: (..., n, n)`` (float64) -> ``(...)``.

    ``G`` is either ``Z Zᵀ`` (n = N) or ``Zᵀ Z`` (n = m) for tokens ``Z: (N, m)`` as rows.
    """
    n = G.shape[-1]
    if N * eps * eps == 0 or not math.isfinite(m / (N * eps * eps)):
        raise ConfigError(f"eps = {eps:g} is too small: m / (N ε²) is not a finite number")
    scale = m / (N * eps * eps)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    return 0.5 * _logdet_pd(eye + scale * G)


def _smaller_gram(Z: Tensor) -> Tensor:
    """Gram of tokens ``Z: (..., N, m)``: ``Z Zᵀ (N×N)`` if N <= m else ``Zᵀ Z (m×m)``."""
    N, m = Z.shape[-2], Z.shape[-1]
    return Z @ Z.mT if N <= m else Z.mT @ Z


def _diagonal_blocks(G: Tensor, h: int, p: int) -> Tensor:
    """Diagonal ``p×p`` blocks of ``G: (..., h·p, h·p)`` -> ``(..., h, p, p)``."""
    blocks = G.unflatten(-1, (h, p)).unflatten(-3, (h, p))  # (..., h, p, h, p)
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # (..., h, p, p)


def _orthonormal_basis(proj: Tensor) -> Tensor:
    """Replace each head's rows ``proj[k]: (p, d)`` by an orthonormal basis of their span.

    QR of ``P_k = proj[k].T`` (float64); returns ``Q_kᵀ`` stacked, ``(h, p, d)``.
    """
    h, p, d = proj.shape
    if p > d:
        raise ConfigError(f"orthonormalize needs dim_head <= d, got dim_head = {p}, d = {d}")
    Q, _ = torch.linalg.qr(proj.mT)  # (h, d, p), reduced
    return Q.mT


def _as64(x: Tensor, device: torch.device | None = None) -> Tensor:
    return x.to(device=x.device if device is None else device, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def coding_rate(Z: Tensor, eps: float = 0.1) -> Tensor:
    """Coding rate of each token set, no normalisation.

    ``Z: (..., N, m)`` (N tokens as rows in R^m) -> ``(...)`` float64::

        R(Z) = ½ logdet(I_N + m/(N ε²) Z Zᵀ) = ½ logdet(I_m + m/(N ε²) Zᵀ Z)

    (row convention; the smaller of the two Gram matrices is factorised).
    """
    _check_float(Z, "Z")
    _check_eps(eps)
    if Z.ndim < 2:
        raise InputError(f"Z must have shape (..., N, m), got {tuple(Z.shape)}")
    N, m = Z.shape[-2], Z.shape[-1]
    if N < 1:
        raise InputError(f"Z must hold at least one token, got shape {tuple(Z.shape)}")
    if m == 0:
        return torch.zeros(Z.shape[:-2], dtype=torch.float64, device=Z.device)
    return _rate_from_gram(_smaller_gram(_as64(Z)), m, N, eps)


def normalize_tokens(Z: Tensor, mode: str) -> Tensor:
    """Normalise tokens ``Z: (..., N, d)`` in R^d -> float64 ``(..., N, d)``.

    ``"l2"`` and ``"crate"``: each token scaled to unit L2 norm (zero tokens stay zero);
    ``"none"``: unchanged. (CRATE's per-head normalisation of *projected* tokens is applied by
    :func:`subspace_rates` / :func:`rate_table`; without a projection it equals ``"l2"``.)
    """
    _check_mode(mode)
    _check_float(Z, "Z")
    Z = _as64(Z)
    return Z if mode == "none" else F.normalize(Z, dim=-1)


def token_rate(Z: Tensor, eps: float = 0.1, normalize: str = "l2") -> Tensor:
    """``R(Z_j)`` per image with m = d. ``Z: (B, N, d)`` -> ``(B,)`` float64."""
    _check_tokens(Z)
    _check_mode(normalize)
    return coding_rate(normalize_tokens(Z, normalize), eps)


def _subspace_rates64(
    Z: Tensor, P: Tensor, eps: float, crate: bool, C: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-head and whole-layer rates for several same-shaped subspaces at once.

    ``Z: (*b, N, d)`` float64, already normalised in R^d; ``P: (S, h, p, d)`` float64;
    optional ``C = Zᵀ Z: (*b, d, d)``. Returns ``per_head (*b, S, h)``, ``whole (*b, S)``.

    Linear case with N > h·p: the feature-side Gram of the projected tokens is
    ``P C Pᵀ (h·p × h·p)``, and the head Grams ``P_k C P_kᵀ`` are its diagonal blocks, so the
    ``d×d`` covariance ``C`` is the only O(N) product. Otherwise (CRATE normalisation is not
    linear, or few tokens) the tokens are projected explicitly and :func:`coding_rate` picks
    the smaller Gram.
    """
    S, h, p, d = P.shape
    N, m = Z.shape[-2], h * p
    W = P.reshape(S, m, d)
    if not crate and N > m:
        C = Z.mT @ Z if C is None else C
        G = (W.flatten(0, 1) @ C).unflatten(-2, (S, m)) @ W.mT  # (*b, S, m, m)
        whole = _rate_from_gram(G, m, N, eps)
        heads = _rate_from_gram(_diagonal_blocks(G, h, p), p, N, eps)
        return heads, whole
    Y = (Z.unsqueeze(-3) @ W.mT).unflatten(-1, (h, p))  # (*b, S, N, h, p)
    if crate:
        Y = F.normalize(Y, dim=-1)
    whole = coding_rate(Y.flatten(-2), eps)  # m = h·p
    heads = coding_rate(Y.movedim(-2, -3), eps)  # (*b, S, h, N, p) -> m = p
    return heads, whole


def _prepare_proj(proj: Tensor, device: torch.device, orthonormalize: bool) -> Tensor:
    P = _as64(proj, device)
    return _orthonormal_basis(P) if orthonormalize else P


def subspace_rates(
    Z: Tensor,
    proj: Tensor,
    eps: float = 0.1,
    normalize: str = "l2",
    orthonormalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Rates of the tokens projected onto one layer's subspaces.

    ``Z: (B, N, d)``, ``proj: (h, p, d)`` with ``P_k = proj[k].T``. Returns
    ``per_head: (B, h)`` = ``R(P_kᵀ Z)`` (m = p) and ``whole: (B,)`` = ``R(P_lᵀ Z)`` (m = h·p),
    float64. ``orthonormalize`` replaces each ``P_k`` by an orthonormal basis of its span (QR).
    """
    _check_tokens(Z)
    _check_proj(proj, Z.shape[-1])
    _check_mode(normalize)
    _check_eps(eps)
    P = _prepare_proj(proj, Z.device, orthonormalize)
    Zn = normalize_tokens(Z, normalize)
    heads, whole = _subspace_rates64(Zn, P.unsqueeze(0), eps, crate=normalize == "crate")
    return heads[:, 0], whole[:, 0]


def span_basis(proj: Tensor) -> Tensor:
    """An orthonormal basis of the span of all of a layer's head bases: ``proj (h, p, d)`` -> ``(r, d)`` float64.

    The right singular vectors of the ``(h·p, d)`` matrix whose singular values exceed the usual
    rank tolerance (``max(h·p, d) · eps_float64 · σ_max``); r = rank ≤ min(h·p, d).
    """
    P = _as64(proj).flatten(0, 1)
    _, S, Vh = torch.linalg.svd(P, full_matrices=False)
    tolerance = max(P.shape) * torch.finfo(torch.float64).eps * S.max()
    return Vh[: int((S > tolerance).sum())]


def span_rate(Z: Tensor, proj: Tensor, eps: float = 0.1, normalize: str = "l2") -> Tensor:
    """``R(U_lᵀ Z)`` with ``U_l = span_basis(proj)`` (m = its rank). ``Z: (B, N, d)`` -> ``(B,)`` float64.

    With the same ``normalize``, ``span_rate / token_rate`` ≤ 1: the share of the rate in span(P_l)
    (``"crate"`` normalises in R^d here, as ``"l2"``: the basis has no heads).
    """
    _check_tokens(Z)
    _check_proj(proj, Z.shape[-1])
    _check_mode(normalize)
    _check_eps(eps)
    U = span_basis(proj.to(Z.device))
    return _subspace_rates64(normalize_tokens(Z, normalize), U[None, None], eps, crate=False)[1][:, 0]


def crate_rate(Z: Tensor, proj: Tensor, eps: float = 0.1) -> Tensor:
    """CRATE's per-head coding rate ``R^c = Σ_k R(P_{l,k}ᵀ Z)``: m = p, each projected token scaled to unit
    norm inside its head, P raw. ``Z: (B, N, d)`` -> ``(B,)`` float64."""
    heads, _ = subspace_rates(Z, proj, eps, normalize="crate")
    return heads.sum(-1)


@dataclass
class SubspaceRates:
    """The rates of one subspace P_l (h heads) at every token stage j, for B images: all ``(B, J)`` or
    ``(B, h, J)``, float64. ``input_rate`` is R(X_j) of the tokens X_j this subspace is applied to: the
    residual stream Z_j, or what the layer projects (``rate_table``'s ``views``)."""

    input_rate: Tensor  # R(X_j), m = d
    subspace_rate: Tensor  # R(P_lᵀ X_j), m = h·p
    head_rate: Tensor  # (B, h, J): R(P_{l,k}ᵀ X_j), m = p
    span_rate: Tensor  # R(U_lᵀ X_j), U_l an orthonormal basis of span(P_l), m = rank
    crate_rate: Tensor  # R^c(X_j) = Σ_k R(P_{l,k}ᵀ X_j), CRATE's convention
    rank: int  # dim span(P_l)

    @property
    def raw_ratio(self) -> Tensor:
        """``R(P_lᵀ X_j) / R(X_j)``: P's scale and head overlap included, may exceed 1; not a share."""
        return self.subspace_rate / self.input_rate

    @property
    def share(self) -> Tensor:
        """``R(U_lᵀ X_j) / R(X_j)`` ≤ 1: the share of the tokens' rate that lies in span(P_l)."""
        return self.span_rate / self.input_rate


@dataclass
class RateTable:
    """Every coding rate of one batch, by name: ``token_rate (B, J)`` = R(Z_j) for the token stages
    ``token_names`` (J), and ``subspaces[name]`` the rates of each subspace at those stages."""

    token_names: list[str]
    token_rate: Tensor
    subspaces: dict[str, SubspaceRates]

    def __getitem__(self, name: str) -> SubspaceRates:
        return self.subspaces[name]


def rate_table(
    tokens: Mapping[str, Tensor],
    subspaces: Mapping[str, Tensor],
    eps: float = 0.1,
    normalize: str = "l2",
    orthonormalize: bool = False,
    views: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> RateTable:
    """All coding rates of the token stages ``tokens`` in every subspace of ``subspaces``.

    ``tokens[name]: (B, N, d)`` per stage j, e.g. ``dict(zip(trace.token_names, trace.tokens))``;
    ``subspaces[name]: (h, p, d)``, e.g. ``{s.name: s.proj for s in trace.subspaces}``. ``views[name]``,
    when given, maps the stage's tokens to what that subspace is applied to (``Subspace.layer_input``:
    the layer's LayerNorm), before ``normalize``; other subspaces see the tokens themselves.
    ``orthonormalize`` replaces each head basis P_{l,k} by an orthonormal basis of its span for
    ``subspace_rate`` and ``head_rate`` (``span_rate`` and ``crate_rate`` do not depend on it). Float64, on the tokens'
    device; the d × d covariance of the tokens is shared by every rate that can use it.
    """
    _check_mode(normalize)
    _check_eps(eps)
    names = list(tokens)
    raw = _stack_tokens(list(tokens.values()))  # (J, B, N, d)
    d = raw.shape[-1]
    for name, proj in subspaces.items():
        _check_proj(proj, d, name=f"subspaces[{name!r}]")
    residual = _RateInputs(normalize_tokens(raw, normalize), eps)
    table = {}
    for name, proj in subspaces.items():
        view = views.get(name) if views else None
        X = residual if view is None else _RateInputs(normalize_tokens(view(raw), normalize), eps)
        table[name] = X.subspace(_as64(proj, raw.device), eps, normalize == "crate", orthonormalize)
    return RateTable(names, residual.rate.T.contiguous(), table)


class _RateInputs:
    """Normalised tokens ``X: (J, B, N, d)`` float64 with their rate and, when N > d, covariance XᵀX."""

    def __init__(self, X: Tensor, eps: float):
        N, d = X.shape[-2:]
        self.X = X
        self.C = X.mT @ X if N > d else None
        self.rate = coding_rate(X, eps) if self.C is None else _rate_from_gram(self.C, d, N, eps)  # (J, B)

    def subspace(self, P: Tensor, eps: float, crate: bool, orthonormalize: bool) -> SubspaceRates:
        """The rates of one subspace ``P (h, p, d)`` float64 (``crate``: CRATE's normalisation for
        ``subspace_rate`` and ``head_rate``; ``crate_rate`` always uses it, and per-head normalisation makes it
        independent of any earlier scaling of the tokens)."""
        heads, whole = _subspace_rates64(self.X, (_orthonormal_basis(P) if orthonormalize else P)[None], eps, crate, self.C)
        U = span_basis(P)
        span = _subspace_rates64(self.X, U[None, None], eps, crate=False, C=self.C)[1][..., 0]
        crate_heads = heads if crate and not orthonormalize else _subspace_rates64(self.X, P[None], eps, crate=True)[0]
        by_stage = lambda rates: rates.movedim(0, -1).contiguous()  # noqa: E731  (J, B, ...) -> (B, ..., J)
        return SubspaceRates(
            input_rate=by_stage(self.rate),
            subspace_rate=by_stage(whole[..., 0]),
            head_rate=by_stage(heads[..., 0, :]),
            span_rate=by_stage(span),
            crate_rate=by_stage(crate_heads[..., 0, :].sum(-1)),
            rank=len(U),
        )


def _stack_tokens(tokens: list[Tensor]) -> Tensor:
    """Validate ``tokens`` (a non-empty list of same-shaped (B, N, d)) -> float64 ``(J, B, N, d)``."""
    if len(tokens) == 0:
        raise InputError("tokens must name at least one (B, N, d) tensor")
    for j, Z in enumerate(tokens):
        _check_tokens(Z, name=f"tokens[{j}]")
        if Z.shape != tokens[0].shape:
            raise InputError(
                f"all tokens must have the same shape; tokens[0] is {tuple(tokens[0].shape)}, "
                f"tokens[{j}] is {tuple(Z.shape)}"
            )
    device = tokens[0].device
    return torch.stack([_as64(Z, device) for Z in tokens])


def class_rate(Q: Tensor, eps: float = 0.1, normalize: str = "l2") -> Tensor:
    """``R(Q)`` of the class embeddings, m = d. ``Q: (B, K, d)`` -> ``(B,)`` float64.

    ``"crate"`` equals ``"l2"`` here (no projection).
    """
    _check_tokens(Q, name="Q")
    _check_mode(normalize)
    return coding_rate(normalize_tokens(Q, normalize), eps)
