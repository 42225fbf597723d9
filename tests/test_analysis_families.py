"""Every analysis on every registered decoder family, through the one library path, checked by value.

``tests/test_families.py`` checks that each family builds, traces and runs the analyses; here each
analysis a family supports goes through ``compare`` (or ``run_robustness`` / ``run_ablation``) and one of
its numbers is recomputed independently: rates with a numpy float64 logdet (SPEC §3.1), Gram matrices
as products of the decoder's own parameters, PCA segments with numpy's SVD and scikit-learn's ARI, the
clean scores of a sweep with ``evaluate``. An analysis a family lacks is refused with a ``DepictError``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from depict_analysis import (DepictError, ImageSource, LoadedModel, analyze_attention, analyze_class_rates,
                             analyze_coding_rates, analyze_orthogonality, analyze_pca, compare, resolve_perturbation,
                             run_ablation, run_robustness)
from depict_analysis.models.data import build_dataset
from depict_analysis.models.decoders.base import families
from depict_analysis.models.evaluate import eval_protocol, evaluate
from depict_analysis.robustness import EvaluationImages
from depict_analysis.tracing import trace
from tests.conftest import tiny_model

FAMILIES = families()
IDS = [family.name for family in FAMILIES]
K, PATCH, EPS = 8, 8, 0.1  # the synthetic dataset's classes; the tiny backbones' patch size; SPEC's ε
NO_ATTENTION = {"linear"}  # no layer with an attention map
NO_HEADS = {"linear", "maskformer"}  # no attention heads or subspaces that head ablation removes
IMAGES = ImageSource(dataset="synthetic", num_images=2, batch_size=2)  # two 32-px crops with labels


def loaded(family) -> LoadedModel:
    return LoadedModel.of(tiny_model(f"{family.variant}-tiny", K, norm_noise=0.1), family.name)


def analysed(model: LoadedModel, analysis, **settings):
    """The one result of ``compare`` for ``model`` on ``IMAGES``, and the batch and trace it analysed."""
    result = compare([model], IMAGES, analysis, device="cpu", progress=False, **settings).results[0]
    _, batches = IMAGES.batches(model.model)
    (batch,) = batches
    return result, batch, trace(model.model, batch, attention=True)


# ------------------------------------------------------------------------------ independent references


def rate(Z: np.ndarray) -> float:
    """R(Z) = ½ logdet(I_m + m/(N ε²) ZᵀZ) of tokens Z (N, m) as rows, float64 (SPEC §3.1)."""
    N, m = Z.shape
    sign, logdet = np.linalg.slogdet(np.eye(m) + m / (N * EPS**2) * Z.T @ Z)
    assert sign > 0
    return 0.5 * logdet


def unit_rows(Z: torch.Tensor) -> np.ndarray:
    Z = Z.double().numpy()
    return Z / np.maximum(np.linalg.norm(Z, axis=-1, keepdims=True), 1e-12)


def majority_classes(labels: np.ndarray) -> np.ndarray:
    """The majority class of every PATCH × PATCH cell of a label map (H, W) in row-major order, −1 for a
    cell with no labelled pixel (255 ignored); ties to the lower class."""
    H, W = labels.shape
    classes = []
    for y in range(0, H, PATCH):
        for x in range(0, W, PATCH):
            cell = labels[y : y + PATCH, x : x + PATCH].ravel()
            votes = np.bincount(cell[cell < K], minlength=K)
            classes.append(int(votes.argmax()) if votes.sum() else -1)
    return np.array(classes)


def pca_argmax_segments(Z: torch.Tensor, k: int) -> np.ndarray:
    """Each token's largest coordinate on the top-k principal directions of the centred tokens (N, d),
    each direction signed so that its largest-|.| entry is positive."""
    Z = Z.double().numpy()
    centred = Z - Z.mean(0)
    directions = np.linalg.svd(centred, full_matrices=False)[2][:k]
    largest = directions[np.arange(k), np.abs(directions).argmax(1)]
    return (centred @ (directions * np.sign(largest)[:, None]).T).argmax(1)


def miou_from_counts(counts: np.ndarray) -> float:
    """mIoU of per-image counts (n, 3, K) (true positives, label pixels, predicted pixels)."""
    tp, label, predicted = counts.sum(0).astype(np.float64)
    union = label + predicted - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


# ------------------------------------------------------------------------------------------- analyses


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_coding_rates_are_the_logdet_formula(family):
    model = loaded(family)
    result, _, tr = analysed(model, analyze_coding_rates, eps=EPS)
    for b in range(2):
        tokens = [unit_rows(Z[b]) for Z in tr.tokens]
        np.testing.assert_allclose(result.token_rate.per_image[b], [rate(Z) for Z in tokens], rtol=1e-9)
        for space in model.model.decoder.subspaces():
            P = space.proj.detach().double().numpy()
            projected = [Z @ P.reshape(-1, P.shape[-1]).T for Z in tokens]  # m = h·p
            np.testing.assert_allclose(result.subspace_rate[space.name].per_image[b], [rate(X) for X in projected], rtol=1e-9)
        classes = [*tr.classes, tr.class_embeddings]
        np.testing.assert_allclose(result.class_rate.per_image[b], [rate(unit_rows(Q[b])) for Q in classes], rtol=1e-9)
    assert [s.name for s in result.subspaces] == [s.name for s in model.model.decoder.subspaces()]


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_class_rates_and_rate_reduction_are_the_logdet_formula(family):
    result, batch, tr = analysed(loaded(family), analyze_class_rates, eps=EPS)
    for b in range(2):
        classes = majority_classes(batch.labels[b].numpy())
        kept = classes[classes >= 0]
        counts = np.bincount(kept, minlength=K)
        np.testing.assert_array_equal(result.tokens[b], counts)
        for j, Z in enumerate(tr.tokens):
            X = unit_rows(Z[b])[classes >= 0]
            per_class = {c: rate(X[kept == c]) for c in np.flatnonzero(counts)}
            assert result.total[b, j] == pytest.approx(rate(X), rel=1e-9)
            for c in range(K):
                assert result.per_class[b, c, j] == pytest.approx(per_class.get(c, np.nan), rel=1e-9, nan_ok=True)
            within = sum(counts[c] / len(kept) * value for c, value in per_class.items())
            assert result.delta[b, j] == pytest.approx(rate(X) - within, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_pca_segments_score_as_numpy_svd_and_sklearn_ari(family):
    model = loaded(family)
    result, batch, tr = analysed(model, analyze_pca, k=3, examples=0, score_figure=False)
    with torch.no_grad():
        prediction = model.model(model.model.normalize(batch.pixels)).argmax(1).numpy()  # the forward pass itself
    assert result.sources == ["input", "Z_L1"]
    for source, tokens in zip(result.sources, (tr.tokens[0], tr.embeddings)):
        for b in range(2):
            segments = pca_argmax_segments(tokens[b], 3).reshape(tr.grid)
            pixels = segments.repeat(PATCH, 0).repeat(PATCH, 1)  # 32 / 4 = 8 pixels per token a side
            expected = adjusted_rand_score(prediction[b].ravel(), pixels.ravel())
            assert result.scores["prediction"][source]["ari"].per_image[b] == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_orthogonality_grams_are_the_parameters_products(family):
    model = loaded(family)
    result, _, tr = analysed(model, analyze_orthogonality, baseline_seeds=())
    subspaces = list(model.model.decoder.subspaces())
    assert [p.name for p in result.panels if p.kind == "P"] == [s.name for s in subspaces]
    for space in subspaces:
        P = space.proj.detach().double().numpy()
        rows = P.reshape(-1, P.shape[-1])  # (h·p, d): PᵀP in the column convention
        np.testing.assert_allclose(result.panel(space.name).gram, rows @ rows.T, rtol=1e-12, atol=1e-15)
    Q = unit_rows(tr.class_embeddings)  # (B, K, d)
    grams = Q @ Q.transpose(0, 2, 1)
    final = result.panel("final_Q")
    np.testing.assert_allclose(final.gram, grams.mean(0), rtol=1e-12, atol=1e-15)
    off = ~np.eye(grams.shape[-1], dtype=bool)
    np.testing.assert_allclose(final.per_image["mean_abs_offdiag"].per_image, [np.abs(g[off]).mean() for g in grams], rtol=1e-12)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_attention_own_class_share_by_hand(family):
    model = loaded(family)
    if family.name in NO_ATTENTION:
        with pytest.raises(DepictError, match="attention"):
            compare([model], IMAGES, analyze_attention, attention=True, device="cpu", progress=False)
        return
    result, batch, tr = analysed(model, analyze_attention, attention=True, examples=0)
    N = tr.grid[0] * tr.grid[1]
    class_maps = {name: a[:, :, N:, :N] if a.shape[-2:] == (N + K, N + K) else a
                  for name, a in tr.attention.items() if a.ndim == 4 and a.shape[-2:] in ((N + K, N + K), (K, N))}
    assert set(result.own_share) == set(class_maps)  # the layers whose maps have class queries (joint, cross)
    for b in range(2):
        classes = majority_classes(batch.labels[b].numpy())
        present = [c for c in range(K) if (classes == c).any()]
        assert result.chance[b] == pytest.approx(np.mean([(classes == c).sum() / N for c in present]), rel=1e-12)
        for name, a in class_maps.items():
            a = a[b].double().numpy()  # (h, K, N)
            own = [np.mean([a[k, c, classes == c].sum() / a[k, c].sum() for c in present]) for k in range(len(a))]
            np.testing.assert_allclose(result.own_share[name][b], own, rtol=1e-9)


# ------------------------------------------------------------------------- the evaluation protocol


def evaluation_images() -> EvaluationImages:
    return EvaluationImages(build_dataset("synthetic", None, "val", size=48, length=2))  # 48 px: sliding windows


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_robustness_at_sigma_zero_is_evaluate(family):
    model, images = loaded(family), evaluation_images()
    noise = resolve_perturbation("gaussian", "decoder")
    result = run_robustness([model], images, noise, (0,), None, draws=1, device="cpu", progress=False)
    (clean,) = result.evaluations
    scores = evaluate(model.model, images.dataset, **eval_protocol(model.model, images.dataset, None))
    assert (clean.sigma, clean.miou, clean.pixel_acc) == (0, scores["miou"], scores["pixel_acc"])
    assert miou_from_counts(clean.counts) == pytest.approx(scores["miou"], rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_head_ablation_keeps_the_clean_scores_and_the_labels(family):
    model, images = loaded(family), evaluation_images()
    if family.name in NO_HEADS:
        with pytest.raises(DepictError, match=family.name):
            run_ablation([model], images, unit="head", device="cpu", progress=False)
        return
    (scored,) = run_ablation([model], images, unit="head", device="cpu", progress=False).models
    scores = evaluate(model.model, images.dataset, **eval_protocol(model.model, images.dataset, None))
    assert miou_from_counts(scored.counts[0]) == pytest.approx(scores["miou"], rel=1e-12)  # row 0: the clean model
    labels = [np.asarray(images.dataset.load_raw(i)[1]) for i in range(len(images))]
    label_pixels = np.stack([np.bincount(y[y < K].ravel(), minlength=K) for y in labels])  # (n, K)
    heads = {name: a.shape[1] for name, a in trace(model.model, torch.zeros(1, 3, 32, 32), attention=True).attention.items()}
    assert len(scored.units) == sum(heads.values()) and len(scored.counts) == 1 + len(scored.units)
    for counts in scored.counts:  # an ablation changes the predictions, never the labels they are scored against
        np.testing.assert_array_equal(counts[:, 1], label_pixels)
