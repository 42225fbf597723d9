"""Per-class coding rates and the rate reduction ΔR (``depict_analysis.class_rates``, ``depict-analyze class-rates``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from depict_analysis.class_rates import analyze_class_rates, patch_classes
from depict_analysis.cli.analyze import app
from depict_analysis.inputs import Batch
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.tracing import Trace, trace, trace_batches
from depict_analysis.uncertainty import Bootstrap

K = 4
EPS = 0.1


def tiny_model(name: str = "depict-sa-tiny"):
    torch.manual_seed(0)
    return create_model(name, n_cls=K).eval()


def blocky_batch(n: int = 3, size: int = 32) -> Batch:
    """Random images whose labels are 8 × 8 blocks of random classes, a few ignored pixels."""
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, K, (n, size // 8, size // 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[:, :3, :3] = 255
    return Batch(torch.rand(n, 3, size, size, generator=g), labels, [f"im{i}" for i in range(n)])


def literal_majority(labels: np.ndarray, patch: int) -> np.ndarray:
    """Majority label of each patch, by counting, ignoring 255 (ties: lower id), −1 if none; labels padded with 255."""
    B, H, W = labels.shape
    Hp, Wp = -(-H // patch) * patch, -(-W // patch) * patch
    padded = np.full((B, Hp, Wp), 255)
    padded[:, :H, :W] = labels
    out = []
    for b in range(B):
        row = []
        for i in range(0, Hp, patch):
            for j in range(0, Wp, patch):
                cell = padded[b, i : i + patch, j : j + patch].ravel()
                cell = cell[cell != 255]
                row.append(-1 if cell.size == 0 else int(np.bincount(cell, minlength=K).argmax()))
        out.append(row)
    return np.array(out)


def test_patch_classes_is_the_majority_label_ignoring_255():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, (2, 13, 10))
    labels[rng.random(labels.shape) < 0.3] = 255
    labels[0, :4, :4] = 255  # a patch with only ignored pixels
    got = patch_classes(torch.from_numpy(labels), 4, K)
    assert got.shape == (2, 4 * 3) and got.tolist() == literal_majority(labels, 4).tolist()
    assert got[0, 0] == -1


def literal_rate(Z: np.ndarray) -> float:
    """½ logdet(I_d + d/(N ε²) ZᵀZ) for tokens Z (N, d), in float64 numpy (the d × d form)."""
    N, d = Z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + d / (N * EPS**2) * Z.T @ Z)[1]


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny"])
def test_delta_r_against_a_literal_computation(name):
    model = tiny_model(name)
    batch = blocky_batch()
    tr = trace(model, batch)
    result = analyze_class_rates([tr], bootstrap=Bootstrap(resamples=50))
    classes = literal_majority(batch.labels.numpy(), model.patch_size)
    assert result.layers == tr.token_names and result.total.shape == (3, len(tr.tokens))
    for b in range(3):
        keep = classes[b] >= 0
        for j, tokens in enumerate(tr.tokens):
            Z = tokens[b].double().numpy()[keep]
            Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
            assigned = classes[b][keep]
            total = literal_rate(Z)
            within = sum((assigned == c).sum() / len(Z) * literal_rate(Z[assigned == c]) for c in np.unique(assigned))
            assert result.total[b, j] == pytest.approx(total, rel=1e-9)
            assert result.delta[b, j] == pytest.approx(total - within, rel=1e-9, abs=1e-9)
            for c in range(K):
                expected = literal_rate(Z[assigned == c]) if (assigned == c).any() else np.nan
                assert result.per_class[b, c, j] == pytest.approx(expected, rel=1e-9, nan_ok=True)
        assert result.tokens[b].tolist() == np.bincount(classes[b][keep], minlength=K).tolist()
    summary = result.summary()
    assert summary["delta_r"][0]["estimate"] == pytest.approx(result.delta[:, 0].mean())
    assert summary["delta_r_change"]["estimate"] == pytest.approx((result.delta[:, -1] - result.delta[:, 0]).mean())


def test_by_prediction_uses_the_models_argmax_and_one_class_has_no_reduction():
    model = tiny_model()
    batch = blocky_batch(2)
    tr = trace(model, batch)
    result = analyze_class_rates([tr], by="prediction", class_names=["bg", "a", "b", "c"], bootstrap=Bootstrap(resamples=20))
    predicted = literal_majority(tr.prediction.numpy(), model.patch_size)
    assert result.tokens.tolist() == [np.bincount(p, minlength=K).tolist() for p in predicted]
    # every token one class: the class rate is the whole rate and ΔR = 0
    tr.labels = torch.zeros_like(batch.labels)
    single = analyze_class_rates([tr], bootstrap=Bootstrap(resamples=20))
    np.testing.assert_allclose(single.delta, 0, atol=1e-9)
    np.testing.assert_allclose(single.per_class[:, 0], single.total, rtol=1e-12)


def test_saved_trace_gives_the_same_numbers(tmp_path):
    model = tiny_model("depict-ca-tiny")
    batches = [blocky_batch(2), blocky_batch(2)]
    result = analyze_class_rates(trace_batches(model, batches, progress=False))
    Trace.cat([trace(model, b) for b in batches]).save(tmp_path / "t.pt")
    again = analyze_class_rates(Trace.load(tmp_path / "t.pt"))
    np.testing.assert_array_equal(again.delta, result.delta)
    assert again.images == result.images == ["im0", "im1", "im0", "im1"]


def test_without_labels_by_ground_truth_is_one_clear_error():
    model = tiny_model()
    batch = blocky_batch(1)
    with pytest.raises(ValueError, match="by='prediction'"):
        analyze_class_rates([trace(model, Batch(batch.pixels, None, ["x"]))])


def test_cli_writes_figure_numbers_and_a_trace_to_analyse_again(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", create_model("depict-sa-tiny", n_cls=8))
    save_checkpoint(tmp_path / "seg.pt", create_model("segmenter-tiny", n_cls=8))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["class-rates", f"sa={tmp_path / 'sa.pt'}", str(tmp_path / "seg.pt"), "--num-images", "3",
                                      "--size", "32", "--resamples", "50", "--save-trace", str(tmp_path / "t.pt"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("class_rates.png", "class_rates.pdf", "class_rates.json", "class_rates.csv"):
        assert (out / name).stat().st_size > 0
    written = json.loads((out / "class_rates.json").read_text())["checkpoints"]
    assert [c["label"] for c in written] == ["sa", "seg"]
    assert written[0]["class_names"][0] == "background"  # the synthetic dataset's names
    assert "ΔR_j" in result.stdout and "too few" in result.stdout
    again = CliRunner().invoke(app, ["class-rates", "--trace", f"sa={tmp_path / 't_sa.pt'}", "--resamples", "50",
                                     "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    rerun = json.loads((tmp_path / "again" / "class_rates.json").read_text())["checkpoints"][0]
    assert rerun["delta_r"] == written[0]["delta_r"]
