"""Orthogonality summaries (SPEC.md §3.3) against numpy loops and closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from depict_analysis.orthogonality import (
    class_summary,
    gram,
    head_blocks,
    query_projection,
    random_cosine_level,
    subspace_summary,
)


def _orthonormal_proj(h: int, p: int, d: int, seed: int = 0) -> torch.Tensor:
    """(h, p, d) whose h*p rows are orthonormal (QR of a Gaussian matrix)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, h * p, generator=g, dtype=torch.float64))
    return basis.T.reshape(h, p, d)


def _two_vectors(cos: float) -> torch.Tensor:
    """Two unit vectors in R^3 at angle arccos(cos): (2, 3)."""
    return torch.tensor([[1.0, 0.0, 0.0], [cos, math.sqrt(1 - cos**2), 0.0]], dtype=torch.float64)


def _numpy_subspace_summary(proj: np.ndarray) -> dict:
    """Independent reference with explicit loops over heads."""
    h, p, _ = proj.shape
    heads = [proj[k].T for k in range(h)]  # P_k: (d, p)
    orth = [np.linalg.norm(P.T @ P - np.eye(p)) / np.sqrt(p) for P in heads]
    cross = [np.abs(heads[k].T @ heads[j]).mean() for k in range(h) for j in range(h) if k != j]
    flat = proj.reshape(h * p, -1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    cos = unit @ unit.T
    coherence = max(abs(cos[i, j]) for i in range(h * p) for j in range(h * p) if i != j)
    across = [abs(cos[i, j]) for i in range(h * p) for j in range(h * p) if i // p != j // p]
    within = [abs(cos[i, j]) for i in range(h * p) for j in range(h * p) if i // p == j // p and i != j]
    return {
        "gram": flat @ flat.T,
        "head_orthonormality": orth,
        "cross": np.mean(cross),
        "coherence": coherence,
        "across": np.mean(across),
        "within": np.mean(within),
    }


# ----------------------------------------------------------------------------- gram / layout


def test_gram_equals_numpy_in_float64():
    M = torch.randn(5, 7)
    G = gram(M)
    assert G.dtype == torch.float64
    Mn = M.double().numpy()
    np.testing.assert_allclose(G.numpy(), Mn @ Mn.T, rtol=1e-12, atol=1e-12)


def test_gram_batched():
    M = torch.randn(3, 4, 6, dtype=torch.float64)
    G = gram(M)
    for b in range(3):
        np.testing.assert_allclose(G[b].numpy(), M[b].numpy() @ M[b].numpy().T, atol=1e-12)


def test_head_blocks_layout_matches_proj_rows():
    h, p, d = 3, 4, 10
    proj = torch.randn(h * p, d)
    blocks = head_blocks(proj, dim_head=p)
    assert blocks.shape == (h, p, d)
    for k in range(h):
        for i in range(p):
            assert torch.equal(blocks[k, i], proj[k * p + i])
    assert torch.equal(head_blocks(proj, n_heads=h), blocks)


@pytest.mark.parametrize(
    "kwargs", [{}, {"n_heads": 3, "dim_head": 4}, {"dim_head": 5}, {"n_heads": 5}, {"n_heads": 0}]
)
def test_head_blocks_rejects_bad_split(kwargs):
    with pytest.raises(ValueError):
        head_blocks(torch.randn(12, 10), **kwargs)


def test_query_projection_is_per_head_query_weight():
    d, h = 12, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 * d, d, generator=g, dtype=torch.float64)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    WQ = query_projection(qkv, n_heads=h)
    assert WQ.shape == (h, d // h, d)
    # timm: q = (x @ qkv.weightᵀ)[:, :d] split into h heads of width d/h
    q = (x.numpy() @ qkv.numpy().T)[:, :d].reshape(5, h, d // h)
    for k in range(h):
        np.testing.assert_allclose(x.numpy() @ WQ[k].numpy().T, q[:, k], atol=1e-12)


def test_query_projection_validation():
    with pytest.raises(ValueError, match="3d, d"):
        query_projection(torch.randn(30, 12), n_heads=3)
    with pytest.raises(ValueError):
        query_projection(torch.randn(36, 12), n_heads=5)


# ----------------------------------------------------------------------------- subspace summary


def test_subspace_summary_zero_for_orthonormal_P():
    h, p, d = 3, 4, 16
    s = subspace_summary(_orthonormal_proj(h, p, d))
    torch.testing.assert_close(s["gram"], torch.eye(h * p, dtype=torch.float64), atol=1e-12, rtol=0)
    assert s["head_orthonormality"] == pytest.approx([0.0] * h, abs=1e-12)
    assert s["cross_head_mean_abs"] == pytest.approx(0.0, abs=1e-12)
    assert s["coherence"] == pytest.approx(0.0, abs=1e-12)


def test_subspace_summary_head_scaled_by_two():
    proj = _orthonormal_proj(3, 5, 20)
    proj[1] *= 2  # P_1ᵀP_1 = 4 I -> ‖4I − I‖_F / √p = 3√p / √p = 3
    s = subspace_summary(proj)
    assert s["head_orthonormality"] == pytest.approx([0.0, 3.0, 0.0], abs=1e-12)
    assert s["cross_head_mean_abs"] == pytest.approx(0.0, abs=1e-12)
    assert s["coherence"] == pytest.approx(0.0, abs=1e-12)  # scale does not change directions
    assert s["gram"][5:10, 5:10].diagonal().tolist() == pytest.approx([4.0] * 5)


@pytest.mark.parametrize("cos", [0.5, -0.8, 0.1])
def test_subspace_summary_two_vectors_known_angle(cos):
    v = _two_vectors(cos)
    # two heads of one vector: cross block entries are cos -> mean |.| = |cos|
    two_heads = subspace_summary(v.reshape(2, 1, 3))
    assert two_heads["coherence"] == pytest.approx(abs(cos), abs=1e-12)
    assert two_heads["cross_head_mean_abs"] == pytest.approx(abs(cos), abs=1e-12)
    assert two_heads["head_orthonormality"] == pytest.approx([0.0, 0.0], abs=1e-12)
    # one head of two vectors: ‖[[0, c], [c, 0]]‖_F / √2 = |c|
    one_head = subspace_summary(v.reshape(1, 2, 3))
    assert one_head["head_orthonormality"] == pytest.approx([abs(cos)], abs=1e-12)
    assert one_head["coherence"] == pytest.approx(abs(cos), abs=1e-12)
    assert math.isnan(one_head["cross_head_mean_abs"])


def test_subspace_summary_coherence_ignores_norms():
    v = _two_vectors(0.6) * torch.tensor([[3.0], [0.25]], dtype=torch.float64)
    assert subspace_summary(v.reshape(2, 1, 3))["coherence"] == pytest.approx(0.6, abs=1e-12)


def test_subspace_summary_random_matches_numpy_loops():
    proj = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(1)).float()
    s = subspace_summary(proj)
    ref = _numpy_subspace_summary(proj.double().numpy())
    np.testing.assert_allclose(s["gram"].numpy(), ref["gram"], atol=1e-12)
    np.testing.assert_allclose(s["head_orthonormality"], ref["head_orthonormality"], atol=1e-12)
    assert s["cross_head_mean_abs"] == pytest.approx(ref["cross"], abs=1e-12)
    assert s["coherence"] == pytest.approx(ref["coherence"], abs=1e-12)
    assert s["cross_head_mean_abs_cos"] == pytest.approx(ref["across"], abs=1e-12)
    assert s["within_head_mean_abs_cos"] == pytest.approx(ref["within"], abs=1e-12)
    norms = np.linalg.norm(proj.double().numpy().reshape(12, 9), axis=1)
    assert (s["row_norm_min"], s["row_norm_max"]) == pytest.approx((norms.min(), norms.max()), abs=1e-12)


def test_cosine_statistics_do_not_see_the_scale_of_P_and_raw_ones_do():
    proj = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scales = torch.rand(3, 4, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3 + 0.2
    a, b = subspace_summary(proj), subspace_summary(proj * scales)  # every basis vector rescaled on its own
    for key in ("cross_head_mean_abs_cos", "within_head_mean_abs_cos", "coherence"):
        assert b[key] == pytest.approx(a[key], abs=1e-12), key
    torch.testing.assert_close(b["cosines"], a["cosines"], atol=1e-12, rtol=0)
    assert b["cross_head_mean_abs"] != pytest.approx(a["cross_head_mean_abs"], rel=1e-3)  # raw entries scale with ‖P‖²
    assert subspace_summary(0.5 * proj)["cross_head_mean_abs"] == pytest.approx(0.25 * a["cross_head_mean_abs"], rel=1e-12)


def test_random_cosine_level_is_the_mean_abs_cosine_of_random_directions():
    assert random_cosine_level(2) == pytest.approx(2 / math.pi, rel=1e-12)  # uniform angle: E|cos θ| = 2/π
    assert random_cosine_level(3) == pytest.approx(0.5, rel=1e-12)  # cos θ uniform on [−1, 1] in R^3
    for d in (64, 384):
        x = torch.randn(2, 200_000, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
        sample = torch.nn.functional.cosine_similarity(x[0], x[1], dim=-1).abs().mean().item()
        assert sample == pytest.approx(random_cosine_level(d), rel=0.01)
        assert random_cosine_level(d) == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=2 / d)


def test_subspace_summary_of_official_layout_and_segmenter_query():
    proj = torch.randn(3 * 4, 9, dtype=torch.float64)
    s = subspace_summary(head_blocks(proj, dim_head=4))
    np.testing.assert_allclose(s["gram"].numpy(), proj.numpy() @ proj.numpy().T, atol=1e-12)
    qkv = torch.randn(3 * 12, 12, dtype=torch.float64)
    sq = subspace_summary(query_projection(qkv, n_heads=3))
    ref = _numpy_subspace_summary(qkv[:12].numpy().reshape(3, 4, 12))
    np.testing.assert_allclose(sq["head_orthonormality"], ref["head_orthonormality"], atol=1e-12)


def test_subspace_summary_rejects_flat_proj():
    with pytest.raises(ValueError, match="head_blocks"):
        subspace_summary(torch.randn(12, 9))


# ----------------------------------------------------------------------------- class summary


def test_class_summary_zero_for_orthonormal_Q():
    Q = _orthonormal_proj(1, 6, 10)[0] * torch.linspace(0.5, 3.0, 6, dtype=torch.float64)[:, None]
    s = class_summary(Q)
    torch.testing.assert_close(s["gram"], torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    for key in ("coherence", "mean_abs_offdiag"):
        assert s[key].shape == (1,) and s[key].item() == pytest.approx(0.0, abs=1e-12)


def test_class_summary_unit_diagonal_and_numpy_values():
    Q = torch.randn(7, 5, generator=torch.Generator().manual_seed(2)) * 4
    s = class_summary(Q)
    Qn = Q.double().numpy()
    unit = Qn / np.linalg.norm(Qn, axis=1, keepdims=True)
    G = unit @ unit.T
    off = np.abs(G[~np.eye(7, dtype=bool)])
    np.testing.assert_allclose(s["gram"].diagonal().numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(s["gram"].numpy(), G, atol=1e-12)
    np.testing.assert_allclose(s["abs_gram"].numpy(), np.abs(G), atol=1e-12)
    assert s["coherence"].item() == pytest.approx(off.max(), abs=1e-12)
    assert s["mean_abs_offdiag"].item() == pytest.approx(off.mean(), abs=1e-12)


def test_class_statistics_take_abs_per_image_before_any_mean():
    # image 0: cos = +0.5, image 1: cos = −0.5: the mean Gram is I (the signs cancel), yet each image's
    # classes are 60° apart: every per-image statistic is 0.5
    Q = torch.stack([_two_vectors(0.5), 2 * _two_vectors(-0.5)])
    s = class_summary(Q)
    torch.testing.assert_close(s["gram"], torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    np.testing.assert_allclose(s["mean_abs_offdiag"].numpy(), [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(s["coherence"].numpy(), [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(s["abs_gram"].numpy(), [[1, 0.5], [0.5, 1]], atol=1e-12)


def test_class_summary_batch_equals_single_images():
    Q = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s = class_summary(Q)
    singles = [class_summary(q) for q in Q]
    torch.testing.assert_close(s["gram"], torch.stack([x["gram"] for x in singles]).mean(0), atol=1e-12, rtol=0)
    for key in ("mean_abs_offdiag", "coherence", "mean_abs_offdiag_centred"):
        torch.testing.assert_close(s[key], torch.cat([x[key] for x in singles]), atol=1e-12, rtol=0)


def test_centred_orthogonality_sees_through_a_shared_component():
    # a regular simplex of K unit vectors (cosines −1/(K−1)) plus one large component all classes share:
    # raw cosines are near 1, centred ones are exactly the simplex's 1/(K−1), the floor for K centred vectors
    K, d = 5, 8
    simplex = torch.eye(K, dtype=torch.float64) - 1 / K  # rows sum to zero, pairwise cos −1/(K−1)
    Q = torch.cat([simplex, torch.zeros(K, d - K, dtype=torch.float64)], dim=1)
    Q[:, -1] = 10.0
    s = class_summary(Q)
    assert s["mean_abs_offdiag"].item() > 0.99
    assert s["mean_abs_offdiag_centred"].item() == pytest.approx(1 / (K - 1), abs=1e-12)


def test_centred_orthogonality_matches_numpy_per_image():
    Q = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 2.0
    expected = []
    for q in Q.numpy():
        unit = q / np.linalg.norm(q, axis=1, keepdims=True)
        c = unit - unit.mean(axis=0)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        expected.append(np.abs((c @ c.T)[~np.eye(6, dtype=bool)]).mean())
    np.testing.assert_allclose(class_summary(Q)["mean_abs_offdiag_centred"].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4), (2, 1, 4), (4,), (2, 2, 3, 4)])
def test_class_summary_rejects_bad_shapes(shape):
    with pytest.raises(ValueError):
        class_summary(torch.randn(shape))
