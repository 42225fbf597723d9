"""Traces stay small and analyses stream: masks on the patch grid by default, every trace released after
use, and a stream of batches gives the numbers of one big batch."""

import weakref

import numpy as np
import pytest
import torch

from depict_analysis.attention import analyze_attention
from depict_analysis.class_rates import analyze_class_rates
from depict_analysis.coding_rate_analysis import analyze_coding_rates
from depict_analysis.inputs import Batch
from depict_analysis.orthogonality_analysis import FINAL_Q, analyze_orthogonality
from depict_analysis.pca_analysis import analyze_pca
from depict_analysis.tracing import Trace, trace
from tests.conftest import tiny_model

K = 6
ANALYSES = {
    "coding-rate": (analyze_coding_rates, {"per_head": True}),
    "pca-seg": (analyze_pca, {"examples": 3}),
    "class-rates": (analyze_class_rates, {}),
    "orthogonality": (analyze_orthogonality, {"baseline_seeds": (0, 1)}),
    "attention": (analyze_attention, {"examples": 3}),
}


def images(n: int = 6, size: tuple[int, int] = (37, 45)) -> Batch:
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, K, (n, *size), generator=g)
    labels[:, :4] = 255
    return Batch(torch.rand(n, 3, *size, generator=g), labels, [f"im{i}.png" for i in range(n)])


def part(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(batch.pixels[start:stop], batch.labels[start:stop], batch.paths[start:stop])


def tensor_bytes(tr: Trace) -> int:
    """Bytes of every tensor a trace holds apart from its input images and labels."""
    return sum(t.numel() * t.element_size() for t in tr._entries().values())


def test_a_trace_keeps_masks_on_the_patch_grid_unless_full_size_masks_are_asked_for():
    model = tiny_model("depict-sa-tiny", 150, norm_noise=0.1)
    batch = images(2, (64, 64))
    small, full = trace(model, batch), trace(model, batch, full_masks=True)
    logits = model(model.normalize(batch.pixels))  # (2, 150, 64, 64)
    assert small.full_masks is None and small.masks.shape == (2, 150, 8, 8) and small.image_size == (64, 64)
    assert "full_masks" not in small.keys()
    # the full-size logits are the one difference: a 150-class 64² image holds 64 times more logits than its 8² grid
    full_bytes = logits.numel() * logits.element_size()
    assert tensor_bytes(full) - tensor_bytes(small) == full_bytes > 4 * tensor_bytes(small)
    torch.testing.assert_close(full.full_masks, logits, atol=0, rtol=0)
    for b in range(2):  # upsampled from the grid one image at a time: the model's logits exactly
        torch.testing.assert_close(small.logits(b), logits[b], atol=0, rtol=0)
    assert torch.equal(small.prediction, logits.argmax(1)) and torch.equal(full.prediction, logits.argmax(1))


def _same(a, b, path="result"):
    """Two results' JSON trees are equal: floats to round-off, everything else exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.parametrize("name", list(ANALYSES))
def test_an_analysis_streamed_in_batches_equals_it_on_one_batch_and_releases_every_trace(name):
    analysis, settings = ANALYSES[name]
    model = tiny_model("depict-sa-tiny", K, norm_noise=0.1)
    batch = images()
    alive: list[weakref.ref] = []

    def stream():  # batches of 2; when the next is traced, no earlier trace may be alive anywhere
        for start in range(0, 6, 2):
            assert [ref() for ref in alive] == [None] * len(alive), f"a trace is still held when batch {start // 2} is traced"
            tr = trace(model, part(batch, start, start + 2), attention=True)
            alive.append(weakref.ref(tr))
            yield tr
            del tr

    streamed = analysis(stream(), **settings)
    whole = analysis(trace(model, batch, attention=True), **settings)
    assert len(alive) == 3 and len(streamed.images) == len(whole.images) == 6
    _same(streamed.to_json(), whole.to_json())


def test_streamed_orthogonality_accumulators_equal_a_float64_reference():
    model = tiny_model("depict-sa-tiny", K, norm_noise=0.1)
    batch = images(5)
    traces = [trace(model, part(batch, start, start + 2)) for start in range(0, 5, 2)]  # batches of 2, 2 and 1
    result = analyze_orthogonality(traces, baseline_seeds=())
    Q = np.concatenate([tr.class_embeddings.numpy() for tr in traces]).astype(np.float64)  # (5, K, d)
    Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
    grams = Q @ Q.transpose(0, 2, 1)  # (5, K, K)
    panel = next(p for p in result.panels if p.name == FINAL_Q)
    np.testing.assert_allclose(panel.gram, grams.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(panel.cosines, np.abs(grams).mean(0), rtol=1e-12, atol=1e-12)
    off = np.abs(grams[:, ~np.eye(K, dtype=bool)])  # (5, K (K - 1))
    np.testing.assert_allclose(panel.per_image["mean_abs_offdiag"].per_image, off.mean(1), rtol=1e-12)
    assert panel.values["coherence"] == pytest.approx(off.max(1).mean(), rel=1e-12)


def test_a_trace_saved_with_full_size_masks_only_is_refused_with_what_to_do(tmp_path):
    from depict_analysis.foundation.errors import InputError

    trace(tiny_model("depict-sa-tiny", K), images(1)).save(tmp_path / "t.trace")
    state = torch.load(tmp_path / "t.trace", weights_only=True)
    state["format"] = "depict-analysis-trace/1"
    torch.save(state, tmp_path / "old.trace")
    with pytest.raises(InputError, match=r"older version .*trace the images again"):
        Trace.load(tmp_path / "old.trace")
    assert Trace.load(tmp_path / "t.trace").image_size == (37, 45)
