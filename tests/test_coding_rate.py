"""Coding rates (SPEC §3.1) checked against independent numpy/scipy computations and identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from depict_analysis import coding_rate as cr
from depict_analysis.coding_rate import (
    class_rate,
    coding_rate,
    crate_rate,
    normalize_tokens,
    rate_table,
    span_basis,
    span_rate,
    subspace_rates,
    token_rate,
)

EPS = 0.1
TOL = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- independent numpy references


def np_rate(Y: np.ndarray, eps: float = EPS) -> float:
    """½ logdet(I_N + m/(N ε²) Y Yᵀ) for one image's tokens Y: (N, m) as rows — always N×N."""
    Y = np.asarray(Y, dtype=np.float64)
    N, m = Y.shape
    sign, logdet = np.linalg.slogdet(np.eye(N) + m / (N * eps**2) * Y @ Y.T)
    assert sign > 0
    return 0.5 * logdet


def np_unit(Y: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm (literal loop)."""
    out = np.array(Y, dtype=np.float64, copy=True)
    for i in range(out.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in out[i]))
        if norm > 0:
            out[i] /= norm
    return out


def np_subspace(Z: np.ndarray, proj: np.ndarray, normalize: str, eps: float = EPS):
    """Literal per-image transcription: (per-head rates (h,), whole rate) for Z: (N, d), proj: (h, p, d)."""
    h, p, d = proj.shape
    Z = np.asarray(Z, dtype=np.float64)
    if normalize == "l2":
        Z = np_unit(Z)  # unit norm in R^d, BEFORE projecting
    heads, blocks = [], []
    for k in range(h):
        Pk = proj[k].T.astype(np.float64)  # (d, p): the head's basis as columns
        Yk = Z @ Pk  # (N, p) = (P_kᵀ Z)ᵀ
        if normalize == "crate":
            Yk = np_unit(Yk)  # unit norm inside the head
        heads.append(np_rate(Yk, eps))  # m = p
        blocks.append(Yk)
    whole = np_rate(np.concatenate(blocks, axis=1), eps)  # m = h·p
    return np.array(heads), whole


def rand_orthogonal(n: int, seed: int) -> np.ndarray:
    return scipy.stats.ortho_group.rvs(n, random_state=seed)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- R(Z)


@pytest.mark.parametrize("N, m", [(7, 20), (40, 9), (12, 12)])
def test_coding_rate_matches_numpy_nxn_form(gen, N, m):
    Z = torch.randn(3, N, m, generator=gen, dtype=torch.float64)
    got = coding_rate(Z)
    want = [np_rate(Z[b].numpy()) for b in range(3)]
    np.testing.assert_allclose(got.numpy(), want, **TOL)


@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0])
def test_coding_rate_eps(gen, eps):
    Z = torch.randn(2, 30, 8, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(coding_rate(Z, eps).numpy(), [np_rate(z.numpy(), eps) for z in Z], **TOL)


def test_coding_rate_batched_equals_per_item(gen):
    Z = torch.randn(2, 3, 25, 10, generator=gen)  # any leading dims
    got = coding_rate(Z)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(got[a, b], coding_rate(Z[a, b]), **TOL)


@pytest.mark.parametrize("N, m", [(50, 8), (6, 30)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_coding_rate_closed_form_orthonormal(N, m, scale):
    # Q: (N, m) with orthonormal columns (N >= m) or orthonormal rows (N < m): the Gram
    # has k = min(N, m) eigenvalues equal to scale², so R = k/2 · log(1 + scale² m/(N ε²)).
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((max(N, m), min(N, m))))
    Z = scale * (Q if N >= m else Q.T)
    k = min(N, m)
    want = 0.5 * k * math.log(1 + scale**2 * m / (N * EPS**2))
    got = coding_rate(torch.from_numpy(Z)).item()
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_coding_rate_zero_tokens_is_zero():
    assert coding_rate(torch.zeros(4, 3)).item() == 0.0
    # l2 normalisation keeps zero tokens at zero (no nan)
    Z = torch.zeros(1, 5, 3)
    Z[0, 0, 0] = 2.0
    assert torch.isfinite(token_rate(Z)).all()
    np.testing.assert_allclose(token_rate(Z).numpy(), [np_rate(np_unit(Z[0].numpy()))], **TOL)


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
def test_token_rate_rotation_invariant(gen, normalize):
    Z = torch.randn(2, 30, 12, generator=gen, dtype=torch.float64)
    R = torch.from_numpy(rand_orthogonal(12, 3))
    rotated = token_rate(Z @ R, normalize=normalize)
    torch.testing.assert_close(rotated, token_rate(Z, normalize=normalize), **TOL)


def test_token_rate_normalisation_vs_numpy(gen):
    Z = torch.randn(2, 30, 12, generator=gen) * torch.rand(2, 30, 1, generator=gen) * 5
    raw = [np_rate(z.numpy()) for z in Z]
    np.testing.assert_allclose(token_rate(Z, normalize="none").numpy(), raw, **TOL)
    l2 = [np_rate(np_unit(z.numpy())) for z in Z]
    np.testing.assert_allclose(token_rate(Z).numpy(), l2, **TOL)
    np.testing.assert_allclose(token_rate(Z, normalize="crate").numpy(), l2, **TOL)


def test_class_rate_vs_numpy(gen):
    Q = torch.randn(3, 15, 40, generator=gen)  # K < d: the K×K Gram
    np.testing.assert_allclose(class_rate(Q).numpy(), [np_rate(np_unit(q.numpy())) for q in Q], **TOL)
    np.testing.assert_allclose(
        class_rate(Q, eps=0.3, normalize="none").numpy(), [np_rate(q.numpy(), 0.3) for q in Q], **TOL
    )


def test_normalize_tokens(gen):
    Z = torch.randn(2, 5, 4, generator=gen, dtype=torch.float32)
    out = normalize_tokens(Z, "l2")
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), 1.0, rtol=1e-12)
    torch.testing.assert_close(normalize_tokens(Z, "crate"), out)
    torch.testing.assert_close(normalize_tokens(Z, "none"), Z.double())


# ---------------------------------------------------------------- subspace rates


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
@pytest.mark.parametrize("N", [40, 9, 3])  # N > h·p ; p < N <= h·p ; N <= p
def test_subspace_rates_vs_numpy_transcription(gen, normalize, N):
    d, h, p = 16, 3, 5
    Z = torch.randn(2, N, d, generator=gen) * (1 + 3 * torch.rand(2, N, 1, generator=gen))
    proj = torch.randn(h, p, d, generator=gen) / math.sqrt(d)
    heads, whole = subspace_rates(Z, proj, normalize=normalize)
    assert heads.shape == (2, h) and whole.shape == (2,)
    for b in range(2):
        want_h, want_w = np_subspace(Z[b].numpy(), proj.numpy(), normalize)
        np.testing.assert_allclose(heads[b].numpy(), want_h, **TOL)
        np.testing.assert_allclose(whole[b].item(), want_w, **TOL)


@pytest.mark.parametrize("normalize", ["l2", "none"])
@pytest.mark.parametrize("N", [50, 6])
def test_orthonormal_full_span_subspace_equals_token_rate(gen, normalize, N):
    d, h, p = 12, 3, 4  # h·p = d
    Z = torch.randn(2, N, d, generator=gen, dtype=torch.float64)
    proj = torch.from_numpy(rand_orthogonal(d, 5)).reshape(h, p, d)
    _, whole = subspace_rates(Z, proj, normalize=normalize)
    torch.testing.assert_close(whole, token_rate(Z, normalize=normalize), **TOL)


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
def test_head_rotation_invariance(gen, normalize):
    d, h, p = 16, 3, 5
    Z = torch.randn(2, 30, d, generator=gen, dtype=torch.float64)
    proj = torch.randn(h, p, d, generator=gen, dtype=torch.float64)
    rotated = torch.stack([torch.from_numpy(rand_orthogonal(p, 10 + k)) @ proj[k] for k in range(h)])
    h0, w0 = subspace_rates(Z, proj, normalize=normalize)
    h1, w1 = subspace_rates(Z, rotated, normalize=normalize)
    torch.testing.assert_close(h1, h0, **TOL)
    torch.testing.assert_close(w1, w0, **TOL)


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
def test_orthonormalize_vs_numpy_qr(gen, normalize):
    d, h, p = 16, 3, 5
    Z = torch.randn(2, 30, d, generator=gen)
    proj = torch.randn(h, p, d, generator=gen) * torch.linspace(0.1, 3, d)  # far from orthonormal
    basis = np.stack([np.linalg.qr(proj[k].numpy().astype(np.float64).T)[0].T for k in range(h)])
    heads, whole = subspace_rates(Z, proj, normalize=normalize, orthonormalize=True)
    for b in range(2):
        want_h, want_w = np_subspace(Z[b].numpy(), basis, normalize)
        np.testing.assert_allclose(heads[b].numpy(), want_h, **TOL)
        np.testing.assert_allclose(whole[b].item(), want_w, **TOL)
    # a rescaled / mixed basis of the same spans gives the same orthonormalised rates
    mix = torch.randn(h, p, p, generator=gen, dtype=torch.float64)
    mixed = mix @ proj.double()  # float64, so the spans are exactly (to rounding) the same
    h2, w2 = subspace_rates(Z, mixed, normalize=normalize, orthonormalize=True)
    torch.testing.assert_close(h2, heads, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(w2, whole, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- span of a layer: the share


def np_span_rate(Z: np.ndarray, proj: np.ndarray, normalize: str, eps: float = EPS) -> float:
    """R(U_lᵀ Z) for one image, U_l from numpy's QR of the whole layer P_l = projᵀ (d, h·p), full rank."""
    h, p, d = proj.shape
    U, _ = np.linalg.qr(proj.reshape(h * p, d).T.astype(np.float64))  # (d, h·p), orthonormal columns
    Z = np_unit(Z) if normalize in ("l2", "crate") else np.asarray(Z, dtype=np.float64)
    return np_rate(Z @ U, eps)


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
@pytest.mark.parametrize("N", [40, 5])
def test_span_rate_vs_numpy_qr_of_the_whole_layer(gen, normalize, N):
    d, h, p = 16, 3, 4
    Z = torch.randn(2, N, d, generator=gen) * (1 + torch.rand(2, N, 1, generator=gen))
    proj = torch.randn(h, p, d, generator=gen) * torch.linspace(0.2, 2.0, d)
    got = span_rate(Z, proj, normalize=normalize)
    want = [np_span_rate(z.numpy(), proj.numpy(), normalize) for z in Z]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    # any basis of the same span gives the same rate: mix all h·p rows with an invertible matrix
    mix = torch.randn(h * p, h * p, generator=gen, dtype=torch.float64)
    mixed = (mix @ proj.double().reshape(h * p, d)).reshape(h, p, d)
    torch.testing.assert_close(span_rate(Z, mixed, normalize=normalize), got, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("normalize", ["l2", "none"])
@pytest.mark.parametrize("N", [60, 6])
def test_share_is_at_most_one_when_hp_le_d_and_raw_ratio_is_not(gen, normalize, N):
    d, h, p = 12, 2, 5  # h·p = 10 <= d
    Z = torch.randn(4, N, d, generator=gen) * torch.linspace(0.1, 3.0, d)  # anisotropic tokens
    proj = torch.randn(h, p, d, generator=gen) * 2.0  # large rows: the raw ratio exceeds 1
    table = rate_table({"input": Z}, {"l": proj}, normalize=normalize)
    share, raw = table["l"].share, table["l"].raw_ratio
    assert share.shape == (4, 1) and bool((share <= 1 + 1e-12).all()) and bool((share > 0).all())
    assert bool((raw > 1).any())  # P's scale alone pushes the raw ratio past 1
    torch.testing.assert_close(raw, table["l"].subspace_rate / table.token_rate, **TOL)
    assert table["l"].rank == h * p


def test_share_is_one_when_the_span_is_the_whole_space(gen):
    d = 8
    Z = torch.randn(2, 30, d, generator=gen)
    proj = torch.randn(3, 4, d, generator=gen)  # h·p = 12 > d: span(P) = R^d
    assert len(span_basis(proj)) == d
    torch.testing.assert_close(span_rate(Z, proj), token_rate(Z), **TOL)
    assert len(span_basis(torch.cat([proj[:1], 2 * proj[:1]]))) == 4  # repeated rows: the rank, not h·p


# ---------------------------------------------------------------- CRATE's per-head convention


def crate_reference(X: torch.Tensor, eps_sq: float) -> torch.Tensor:
    """CRATE's ``vis_utils/coding_rate.py:CodingRate`` as it behaves, written out on its own terms:
    X (b, h, n, p) = one layer's projected tokens split by head; every token unit norm inside its head;
    per head ½ logdet(I_n + p/(n·eps_sq) X Xᵀ) (eps_sq is ε²), summed over the heads -> (b,)."""
    b, h, n, p = X.shape
    out = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        for k in range(h):
            x = X[i, k].double()
            x = x / x.norm(dim=-1, keepdim=True)
            out[i] += 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + p / (n * eps_sq) * x @ x.T)
    return out


@pytest.mark.parametrize("N", [50, 4])
def test_crate_rate_equals_crates_coding_rate_on_the_projected_tokens(gen, N):
    d, h, p = 16, 3, 5
    Z = torch.randn(2, N, d, generator=gen, dtype=torch.float64) * 3
    proj = torch.randn(h, p, d, generator=gen, dtype=torch.float64)
    qkv_out = Z @ proj.reshape(h * p, d).T  # what CRATE's hook sees: the projection's output (b, n, h·p)
    X = qkv_out.unflatten(-1, (h, p)).transpose(1, 2)  # 'b n (h d) -> b h n d'
    want = crate_reference(X, eps_sq=EPS**2)
    torch.testing.assert_close(crate_rate(Z, proj, EPS), want, rtol=1e-10, atol=1e-10)
    table = rate_table({"a": Z, "b": 2 * Z}, {"l": proj}, normalize="none", orthonormalize=True)
    torch.testing.assert_close(table["l"].crate_rate[:, 0], want, rtol=1e-10, atol=1e-10)  # raw P, always
    torch.testing.assert_close(table["l"].crate_rate[:, 1], want, rtol=1e-10, atol=1e-10)  # scale-free tokens


# ---------------------------------------------------------------- rate_table


@pytest.mark.parametrize("normalize", ["l2", "none", "crate"])
@pytest.mark.parametrize("orthonormalize", [False, True])
@pytest.mark.parametrize("N", [45, 7])
def test_rate_table_matches_single_calls(gen, normalize, orthonormalize, N):
    B, d, J = 2, 16, 3
    tokens = {f"z{j}": torch.randn(B, N, d, generator=gen) for j in range(J)}
    subspaces = {"a": torch.randn(3, 4, d, generator=gen), "b": torch.randn(2, 6, d, generator=gen),
                 "c": torch.randn(3, 4, d, generator=gen)}
    kw = dict(normalize=normalize, orthonormalize=orthonormalize)
    t = rate_table(tokens, subspaces, **kw)
    assert t.token_names == list(tokens) and list(t.subspaces) == list(subspaces)
    assert t.token_rate.shape == (B, J)
    assert [t[name].head_rate.shape for name in subspaces] == [(B, 3, J), (B, 2, J), (B, 3, J)]
    for j, Z in enumerate(tokens.values()):
        torch.testing.assert_close(t.token_rate[:, j], token_rate(Z, normalize=normalize), **TOL)
        for name, proj in subspaces.items():
            heads, whole = subspace_rates(Z, proj, **kw)
            torch.testing.assert_close(t[name].subspace_rate[:, j], whole, **TOL)
            torch.testing.assert_close(t[name].head_rate[:, :, j], heads, **TOL)
            torch.testing.assert_close(t[name].span_rate[:, j], span_rate(Z, proj, normalize=normalize), **TOL)
            torch.testing.assert_close(t[name].crate_rate[:, j], crate_rate(Z, proj), **TOL)
            torch.testing.assert_close(t[name].input_rate, t.token_rate, rtol=0, atol=0)
    torch.testing.assert_close(t["b"].raw_ratio, t["b"].subspace_rate / t.token_rate, **TOL)
    torch.testing.assert_close(t["b"].share, t["b"].span_rate / t.token_rate, **TOL)


def test_rate_table_views_apply_to_their_subspace_only(gen):
    B, N, d = 2, 30, 10
    tokens = {"input": torch.randn(B, N, d, generator=gen), "l1": torch.randn(B, N, d, generator=gen)}
    subspaces = {"seen": torch.randn(2, 3, d, generator=gen), "plain": torch.randn(2, 3, d, generator=gen)}
    scale = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    view = lambda Z: Z * scale + 1.0  # noqa: E731  (an affine map, like a LayerNorm's)
    t = rate_table(tokens, subspaces, views={"seen": view})
    for j, Z in enumerate(tokens.values()):
        X = view(Z.double())
        torch.testing.assert_close(t["seen"].input_rate[:, j], token_rate(X), **TOL)
        torch.testing.assert_close(t["seen"].subspace_rate[:, j], subspace_rates(X, subspaces["seen"])[1], **TOL)
        torch.testing.assert_close(t["seen"].span_rate[:, j], span_rate(X, subspaces["seen"]), **TOL)
        torch.testing.assert_close(t["plain"].subspace_rate[:, j], subspace_rates(Z, subspaces["plain"])[1], **TOL)
    torch.testing.assert_close(t.token_rate[:, 0], token_rate(tokens["input"]), **TOL)  # R(Z_j) is the residual's


def test_rate_table_vs_numpy(gen):
    B, N, d = 2, 30, 10
    tokens = {"a": torch.randn(B, N, d, generator=gen), "b": torch.randn(B, N, d, generator=gen)}
    proj = torch.randn(2, 3, d, generator=gen)
    t = rate_table(tokens, {"l": proj})
    for b in range(B):
        for j, Z in enumerate(tokens.values()):
            z = Z[b].numpy()
            assert t.token_rate[b, j].item() == pytest.approx(np_rate(np_unit(z)), rel=1e-10)
            want_h, want_w = np_subspace(z, proj.numpy(), "l2")
            assert t["l"].subspace_rate[b, j].item() == pytest.approx(want_w, rel=1e-10)
            np.testing.assert_allclose(t["l"].head_rate[b, :, j].numpy(), want_h, **TOL)
            assert t["l"].span_rate[b, j].item() == pytest.approx(np_span_rate(z, proj.numpy(), "l2"), rel=1e-9)


def test_rate_table_without_subspaces(gen):
    t = rate_table({"input": torch.randn(2, 5, 4, generator=gen)}, {})
    assert t.token_rate.shape == (2, 1) and t.subspaces == {}


# ---------------------------------------------------------------- numerics, dtypes, modes


def test_cholesky_failure_falls_back_to_slogdet():
    # honest failure: a symmetric indefinite matrix with positive determinant (Cholesky fails,
    # slogdet is well defined), batched with a PD one that must take the Cholesky path,
    # and one with a negative determinant, which has no real log det -> nan.
    rot = torch.from_numpy(rand_orthogonal(3, 7))
    indefinite = rot @ torch.diag(torch.tensor([-1.0, -2.0, 3.0], dtype=torch.float64)) @ rot.T
    negative = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    spd = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    out = cr._logdet_pd(torch.stack([spd, indefinite, negative]))
    assert out[0].item() == pytest.approx(math.log(10.0), rel=1e-14)
    assert out[1].item() == pytest.approx(math.log(6.0), rel=1e-12)
    assert math.isnan(out[2].item())


def test_coding_rate_uses_fallback_when_cholesky_reports_failure(gen, monkeypatch):
    Z = torch.randn(2, 3, 20, 6, generator=gen, dtype=torch.float64)
    want = coding_rate(Z)
    real = torch.linalg.cholesky_ex
    calls = []

    def failing_cholesky_ex(M, *args, **kwargs):
        L, info = real(M, *args, **kwargs)
        calls.append(M.shape)
        info = torch.ones_like(info)  # report failure for every entry ...
        info[0, 1] = 0  # ... except one, which keeps its real Cholesky factor
        failed = (info != 0)[..., None, None]
        return torch.where(failed, torch.full_like(L, float("nan")), L), info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky_ex)
    got = coding_rate(Z)
    assert calls, "cholesky_ex was not used"
    torch.testing.assert_close(got, want, **TOL)
    np.testing.assert_allclose(got.numpy().ravel(), [np_rate(z.numpy()) for z in Z.reshape(6, 20, 6)], **TOL)


def test_float32_input_returns_float64_equal_to_float64_path(gen):
    Z = torch.randn(2, 30, 16, generator=gen, dtype=torch.float32)
    proj = torch.randn(3, 4, 16, generator=gen, dtype=torch.float32)
    Zd, Pd = Z.double(), proj.double()
    for normalize in ["l2", "none", "crate"]:
        a, b = token_rate(Z, normalize=normalize), token_rate(Zd, normalize=normalize)
        assert a.dtype == torch.float64 and a.device == Z.device
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        pairs = zip(subspace_rates(Z, proj, normalize=normalize), subspace_rates(Zd, Pd, normalize=normalize))
        for x, y in pairs:
            assert x.dtype == torch.float64
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    t32 = rate_table({"a": Z, "b": Z.half().float()}, {"l": proj})
    t64 = rate_table({"a": Zd, "b": Z.half().double()}, {"l": Pd})
    torch.testing.assert_close(t32["l"].share, t64["l"].share, rtol=0, atol=0)
    torch.testing.assert_close(t32["l"].raw_ratio, t64["l"].raw_ratio, rtol=0, atol=0)
    assert coding_rate(Z.half()).dtype == torch.float64


def test_inference_mode_safe(gen):
    Z = torch.randn(2, 20, 8, generator=gen)
    proj = torch.randn(2, 3, 8, generator=gen)
    want = rate_table({"a": Z, "b": Z}, {"l": proj}, normalize="crate", orthonormalize=True)
    with torch.inference_mode():
        inside = rate_table({"a": Z, "b": Z}, {"l": proj}, normalize="crate", orthonormalize=True)
        Zi, Pi = Z.clone(), proj.clone()  # inference tensors, used below outside the mode
    torch.testing.assert_close(inside["l"].raw_ratio, want["l"].raw_ratio)
    outside = rate_table({"a": Zi, "b": Zi}, {"l": Pi}, normalize="crate", orthonormalize=True)
    torch.testing.assert_close(outside["l"].share, want["l"].share)
    torch.testing.assert_close(subspace_rates(Zi, Pi)[1], subspace_rates(Z, proj)[1])


def test_inputs_not_modified(gen):
    Z = torch.randn(2, 20, 8, generator=gen)
    proj = torch.randn(2, 3, 8, generator=gen)
    Z0, P0 = Z.clone(), proj.clone()
    rate_table({"a": Z}, {"l": proj}, normalize="crate", orthonormalize=True, views={"l": lambda x: x * 2})
    subspace_rates(Z, proj, orthonormalize=True)
    assert torch.equal(Z, Z0) and torch.equal(proj, P0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gen):
    Z = torch.randn(2, 40, 16, generator=gen)
    proj = torch.randn(3, 4, 16, generator=gen)
    cpu = rate_table({"a": Z}, {"l": proj})
    gpu = rate_table({"a": Z.cuda()}, {"l": proj.cuda()})
    assert gpu["l"].share.device.type == "cuda"
    for key in ("subspace_rate", "span_rate", "crate_rate", "head_rate"):
        torch.testing.assert_close(getattr(gpu["l"], key).cpu(), getattr(cpu["l"], key), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- validation


def test_validation_errors(gen):
    Z = torch.randn(2, 5, 8, generator=gen)
    proj = torch.randn(2, 3, 8, generator=gen)
    with pytest.raises(ValueError, match="normalize must be one of"):
        token_rate(Z, normalize="L2")
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_tokens(Z, "cbsa")
    with pytest.raises(ValueError, match="last dim must equal the token width d = 8"):
        subspace_rates(Z, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match=r"proj.reshape\(h, p, d\)"):
        subspace_rates(Z, proj.reshape(6, 8))
    with pytest.raises(ValueError, match="shape \\(B, N, d\\)"):
        token_rate(Z[0])
    with pytest.raises(ValueError, match="eps"):
        coding_rate(Z, eps=0.0)
    with pytest.raises(ValueError, match="floating dtype"):
        coding_rate(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one token"):
        token_rate(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="same shape"):
        rate_table({"a": Z, "b": torch.randn(2, 6, 8)}, {"l": proj})
    with pytest.raises(ValueError, match="at least one"):
        rate_table({}, {"l": proj})
    with pytest.raises(ValueError, match=r"subspaces\['m'\]"):
        rate_table({"a": Z}, {"l": proj, "m": torch.randn(2, 3, 9)})
    with pytest.raises(ValueError, match="dim_head <= d"):
        subspace_rates(Z, torch.randn(1, 9, 8), orthonormalize=True)
