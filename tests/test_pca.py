"""PCA segmentation maths (SPEC.md §3.2) against numpy / scikit-learn / hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from depict_analysis.pca import (
    choose_k,
    pca_directions,
    pca_rgb,
    pca_segment,
    segmentation_scores,
    upsample_labels,
)


def _numpy_directions(Z: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: numpy SVD of the centred tokens + the sign rule."""
    _, _, Vt = np.linalg.svd(Z - Z.mean(0), full_matrices=False)
    V = Vt[:k]
    largest = V[np.arange(k), np.abs(V).argmax(1)]
    return V * np.sign(largest)[:, None]


def _anisotropic_tokens(seed: int, n: int = 60, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, d, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ mixing + 1.5


def _clusters(k: int, seed: int, n_per: int = 25, d: int = 16, noise: float = 0.05):
    """k Gaussian clusters on distinct coordinate axes with distinct radii (shuffled tokens).

    Axis-aligned so that each cluster's axis is its principal direction's largest coordinate,
    which is what makes the sign-fixed argmax rule pick the cluster (distinct radii keep the
    principal directions non-degenerate).
    """
    rng = np.random.default_rng(seed)
    axes = rng.permutation(d)[:k]
    means = np.zeros((k, d))
    means[np.arange(k), axes] = 4.0 + np.arange(k)
    truth = rng.permutation(np.repeat(np.arange(k), n_per))
    Z = means[truth] + noise * rng.standard_normal((truth.size, d))
    return torch.from_numpy(Z), truth


# ----------------------------------------------------------------------------- directions


def test_directions_equal_numpy_svd_with_sign_rule():
    Z = _anisotropic_tokens(0)
    D = pca_directions(Z, 5)
    assert D.dtype == torch.float64
    np.testing.assert_allclose(D.numpy(), _numpy_directions(Z.numpy(), 5), atol=1e-10)


def test_directions_equal_sklearn_pca_components_up_to_sign():
    Z = _anisotropic_tokens(1).numpy()
    D = pca_directions(torch.from_numpy(Z), 4).numpy()
    C = PCA(n_components=4, svd_solver="full").fit(Z).components_
    signs = np.sign(np.sum(D * C, axis=1))
    np.testing.assert_allclose(D, C * signs[:, None], atol=1e-10)


def test_directions_orthonormal_and_largest_coordinate_positive():
    D = pca_directions(_anisotropic_tokens(2), 6).numpy()
    np.testing.assert_allclose(D @ D.T, np.eye(6), atol=1e-12)
    largest = D[np.arange(6), np.abs(D).argmax(1)]
    assert (largest > 0).all()


def test_directions_deterministic_under_negation_and_token_permutation():
    Z = _anisotropic_tokens(3)
    D = pca_directions(Z, 4)
    assert torch.equal(D, pca_directions(Z, 4))
    torch.testing.assert_close(pca_directions(-Z, 4), D, atol=1e-10, rtol=0)
    perm = torch.randperm(Z.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pca_directions(Z[perm], 4), D, atol=1e-10, rtol=0)
    torch.testing.assert_close(pca_directions(Z.float(), 4), D, atol=1e-5, rtol=0)


def test_directions_batch_equals_per_image():
    Z = torch.stack([_anisotropic_tokens(s) for s in range(3)])
    D = pca_directions(Z, 3)
    for b in range(3):
        torch.testing.assert_close(D[b], pca_directions(Z[b], 3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [0, -1, 13])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError, match="k must be"):
        pca_directions(_anisotropic_tokens(0, n=60, d=12), k)


def test_k_limited_by_token_count():
    with pytest.raises(ValueError, match="k must be"):
        pca_segment(torch.randn(3, 10), 4)


def test_bad_shapes_and_method_raise():
    with pytest.raises(ValueError, match="shape"):
        pca_directions(torch.randn(10), 1)
    with pytest.raises(ValueError, match="method"):
        pca_segment(torch.randn(10, 4), 2, method="spectral")


# ----------------------------------------------------------------------------- segmentation


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("method", ["argmax", "kmeans"])
def test_segment_recovers_separated_clusters(k, method):
    Z, truth = _clusters(k, seed=k)
    labels = pca_segment(Z, k, method=method)
    assert labels.dtype == torch.int64 and labels.shape == (truth.size,)
    assert adjusted_rand_score(truth, labels.numpy()) == pytest.approx(1.0)


def test_argmax_rule_equals_numpy():
    Z = _anisotropic_tokens(4).numpy()
    expected = ((Z - Z.mean(0)) @ _numpy_directions(Z, 4).T).argmax(1)
    np.testing.assert_array_equal(pca_segment(torch.from_numpy(Z), 4).numpy(), expected)


def test_kmeans_equals_sklearn_on_numpy_coordinates():
    Z, _ = _clusters(4, seed=11, noise=1.0)  # overlapping clusters: k-means has work to do
    Zn = Z.numpy()
    coords = (Zn - Zn.mean(0)) @ _numpy_directions(Zn, 4).T
    expected = KMeans(n_clusters=4, n_init=10, random_state=7).fit_predict(coords)
    labels = pca_segment(Z, 4, method="kmeans", seed=7).numpy()
    assert adjusted_rand_score(expected, labels) == pytest.approx(1.0)
    np.testing.assert_array_equal(labels, pca_segment(Z, 4, method="kmeans", seed=7).numpy())


@pytest.mark.parametrize("method", ["argmax", "kmeans"])
def test_segment_batch_equals_per_image(method):
    Z = torch.stack([_clusters(3, seed=s)[0] for s in range(2)])
    labels = pca_segment(Z, 3, method=method)
    assert labels.shape == (2, Z.shape[1])
    for b in range(2):
        torch.testing.assert_close(labels[b], pca_segment(Z[b], 3, method=method))


def test_rgb_is_min_max_scaled_first_three_coordinates():
    Z = _anisotropic_tokens(5).numpy()
    coords = (Z - Z.mean(0)) @ _numpy_directions(Z, 3).T
    expected = (coords - coords.min(0)) / (coords.max(0) - coords.min(0))
    rgb = pca_rgb(torch.from_numpy(Z))
    assert rgb.shape == (Z.shape[0], 3)
    np.testing.assert_allclose(rgb.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(rgb.numpy().min(0), 0.0, atol=0)
    np.testing.assert_allclose(rgb.numpy().max(0), 1.0, atol=1e-12)


def test_rgb_constant_component_maps_to_zero():
    Z = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    rgb = pca_rgb(Z)  # third component has zero variance
    assert torch.isfinite(rgb).all()
    assert torch.equal(rgb[:, 2], torch.zeros(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- choose_k / upsample


@pytest.mark.parametrize(
    ("labels", "kwargs", "expected"),
    [
        ([3, 3, 3], {}, 2),
        ([0, 1, 2, 4, 4], {}, 4),
        (list(range(12)), {}, 8),
        ([5, 6, 7], {"lo": 4}, 4),
        ([5, 6, 7], {"hi": 2}, 2),
        (list(range(10)), {"lo": 1, "hi": 20}, 10),
    ],
)
def test_choose_k_counts_and_clamps(labels, kwargs, expected):
    assert choose_k(torch.tensor(labels).reshape(1, -1), **kwargs) == expected


def test_choose_k_rejects_bad_bounds():
    with pytest.raises(ValueError):
        choose_k(torch.tensor([1, 2]), lo=5, hi=3)


def test_upsample_integer_factor_is_block_repeat():
    labels = torch.arange(6)
    up = upsample_labels(labels, grid=(2, 3), size=(4, 9))
    expected = np.kron(np.arange(6).reshape(2, 3), np.ones((2, 3), dtype=np.int64))
    np.testing.assert_array_equal(up.numpy(), expected)
    assert up.dtype == labels.dtype


def test_upsample_non_integer_factor_by_hand():
    # rows: floor((y + 1/2) * 2 / 3) = 0, 1, 1 ; cols: floor((x + 1/2) * 2 / 5) = 0, 0, 1, 1, 1
    up = upsample_labels(torch.tensor([1, 2, 3, 4]), grid=(2, 2), size=(3, 5))
    expected = [[1, 1, 2, 2, 2], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]
    np.testing.assert_array_equal(up.numpy(), expected)


@pytest.mark.parametrize(
    ("grid", "size"), [((3, 4), (7, 13)), ((5, 5), (24, 17)), ((4, 6), (4, 6))]
)
def test_upsample_matches_nearest_exact_and_batches(grid, size):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (2, grid[0] * grid[1]), generator=g)
    up = upsample_labels(labels, grid, size)
    ref = F.interpolate(labels.reshape(2, 1, *grid).double(), size=size, mode="nearest-exact")
    np.testing.assert_array_equal(up.numpy(), ref[:, 0].long().numpy())


def test_upsample_rejects_wrong_length():
    with pytest.raises(ValueError, match="grid"):
        upsample_labels(torch.arange(5), grid=(2, 3), size=(4, 6))


# ----------------------------------------------------------------------------- scores

# pred segments: 5 = top row, 7 = bottom row.
# ref classes: 0 = {(0,0),(0,1)}, 1 = {(0,2),(1,0),(1,1)}, 2 = {(1,2)}.
# IoU(5,0)=2/3, IoU(5,1)=1/5, IoU(5,2)=0, IoU(7,0)=0, IoU(7,1)=2/4, IoU(7,2)=1/3.
# Best matching 5->0, 7->1 (total 7/6); class 2 unmatched -> mIoU = (2/3 + 1/2 + 0) / 3 = 7/18.
PRED = torch.tensor([[5, 5, 5], [7, 7, 7]])
REF = torch.tensor([[0, 0, 1], [1, 1, 2]])


def _hand_ari() -> float:
    # contingency [[2,1,0],[0,2,1]]: sum C(n_ij,2) = 2, rows C(3,2)*2 = 6,
    # cols C(2,2)+C(3,2) = 4, C(6,2) = 15
    expected = 6 * 4 / 15
    return (2 - expected) / ((6 + 4) / 2 - expected)  # = 2/17


def _hand_nmi() -> float:
    mi = (
        (1 / 3) * math.log(2)
        + (1 / 6) * math.log(2 / 3)
        + (1 / 3) * math.log(4 / 3)
        + (1 / 6) * math.log(2)
    )
    h_pred = math.log(2)
    h_ref = -sum(q * math.log(q) for q in (1 / 3, 1 / 2, 1 / 6))
    return mi / ((h_pred + h_ref) / 2)


def test_scores_hand_computed_example():
    s = segmentation_scores(PRED, REF)
    assert set(s) == {"ari", "nmi", "miou"}
    assert s["ari"] == pytest.approx(_hand_ari(), abs=1e-12)
    assert s["nmi"] == pytest.approx(_hand_nmi(), abs=1e-12)
    assert s["miou"] == pytest.approx(7 / 18, abs=1e-12)


def test_scores_exclude_ignored_pixels():
    pred = torch.cat([PRED, torch.tensor([[9, 5, 7]])])
    ref = torch.cat([REF, torch.full((1, 3), 255)])
    expected = segmentation_scores(PRED, REF)
    assert segmentation_scores(pred, ref) == pytest.approx(expected, abs=1e-12)
    ref_custom = torch.cat([REF, torch.full((1, 3), -1)])
    assert segmentation_scores(pred, ref_custom, ignore_index=-1) == pytest.approx(
        segmentation_scores(PRED, REF), abs=1e-12
    )


def test_scores_invariant_to_segment_id_permutation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 4, (8, 9), generator=g)
    pred = torch.randint(0, 5, (8, 9), generator=g)
    renamed = torch.tensor([40, 3, 17, 0, 8])[pred]
    expected = segmentation_scores(pred, ref)
    assert segmentation_scores(renamed, ref) == pytest.approx(expected, abs=1e-12)


def test_scores_perfect_and_one_segment():
    ref = torch.tensor([[0, 0, 3], [3, 3, 3]])
    perfect = {"ari": 1.0, "nmi": 1.0, "miou": 1.0}
    assert segmentation_scores(ref + 10, ref) == pytest.approx(perfect)
    # one segment: matched to class 3 (IoU 4/6 > 2/6), class 0 unmatched -> (4/6 + 0) / 2
    assert segmentation_scores(torch.zeros_like(ref), ref)["miou"] == pytest.approx(1 / 3)


def _brute_force_miou(pred: np.ndarray, ref: np.ndarray) -> float:
    segs, classes = np.unique(pred), np.unique(ref)
    iou = {
        (s, c): np.sum((pred == s) & (ref == c)) / np.sum((pred == s) | (ref == c))
        for s in segs
        for c in classes
    }
    best = 0.0
    n = min(len(segs), len(classes))
    for chosen in itertools.permutations(segs, n):
        for targets in itertools.combinations(classes, n):
            best = max(best, sum(iou[s, c] for s, c in zip(chosen, targets)))
    return best / len(classes)


@pytest.mark.parametrize(("n_seg", "n_cls", "seed"), [(3, 3, 0), (2, 4, 1), (5, 3, 2), (4, 4, 3)])
def test_hungarian_miou_equals_brute_force(n_seg, n_cls, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, n_cls, (6, 7), generator=g)
    pred = (ref + torch.randint(0, 2, (6, 7), generator=g)) % n_seg  # correlated with ref
    expected = _brute_force_miou(pred.numpy(), ref.numpy())
    assert segmentation_scores(pred, ref)["miou"] == pytest.approx(expected, abs=1e-12)


def test_scores_validation():
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="ignore_index"):
        segmentation_scores(torch.zeros(2, 2), torch.full((2, 2), 255))
