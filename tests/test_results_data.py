"""Results are data: plain JSON, loaded back from what ``save`` wrote, a tidy table, short reprs, help by the public name."""

from __future__ import annotations

import json
import pydoc

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import depict_analysis
from depict_analysis import (
    Comparison,
    Result,
    Trace,
    analyze_attention,
    analyze_class_rates,
    analyze_coding_rates,
    analyze_orthogonality,
    analyze_pca,
    trace,
)
from depict_analysis.foundation.errors import InputError
from depict_analysis.inputs import image_batches
from depict_analysis.outputs import plain_json
from depict_analysis.models.pretrained import load_default
from depict_analysis.models.sources import LoadedModel
from depict_analysis.perturbations import resolve_perturbation
from depict_analysis.robustness import run_robustness


@pytest.fixture(scope="module")
def model():
    return load_default("depict-ca")[0]


@pytest.fixture(scope="module")
def traced(model) -> Trace:
    _, batches = image_batches(64, dataset="synthetic", split="val", num_images=3, batch_size=3)
    return trace(model, next(batches), attention=True)


@pytest.fixture(scope="module")
def results(model, traced) -> dict[str, Result]:
    def batches_for(side):
        return image_batches(side, dataset="synthetic", split="val", num_images=3, batch_size=3)

    robustness = run_robustness([LoadedModel.of(model, "CA", "builtin:depict-ca")], batches_for, resolve_perturbation("gaussian", "decoder"),
                                (0, 0.1), None, draws=2)
    rates = analyze_coding_rates(traced, per_head=True)
    return {
        "coding_rate": rates,
        "pca": analyze_pca(traced, examples=2),
        "orthogonality": analyze_orthogonality(traced, baseline_seeds=(0, 1)),
        "class_rates": analyze_class_rates(traced),
        "attention": analyze_attention(traced, examples=1),
        "robustness": robustness,
        "comparison": Comparison(["a", "b"], ["builtin:depict-ca", "x.pt"], [rates, rates], {"input": {"dataset": "synthetic"}}),
    }


KINDS = ["coding_rate", "pca", "orthogonality", "class_rates", "attention", "robustness", "comparison"]


@pytest.mark.parametrize("kind", KINDS)
def test_to_json_is_plain_json(results, kind):
    data = results[kind].to_json()
    text = json.dumps(data, allow_nan=False)  # no numpy value, no NaN: strict JSON as it is
    assert json.loads(text) == data


@pytest.mark.parametrize("kind", KINDS)
def test_every_result_loads_back_from_what_save_wrote(results, kind, tmp_path):
    result = results[kind]
    written = result.save(tmp_path)
    assert tmp_path / f"{result.name}.result.npz" in written
    loaded = Result.load(tmp_path)
    assert type(loaded) is type(result)
    assert loaded.to_json() == result.to_json()
    assert plain_json(loaded.summary()) == plain_json(result.summary())
    assert plain_json(loaded.rows()) == plain_json(result.rows())
    figures = loaded.figures()
    assert set(figures) == set(result.figures())
    plt.close("all")
    again = tmp_path / "again"
    loaded.save(again)  # what was loaded saves the same files again
    assert (again / f"{result.name}.json").read_text() == (tmp_path / f"{result.name}.json").read_text()
    assert (again / f"{result.name}.csv").read_text() == (tmp_path / f"{result.name}.csv").read_text()


def test_load_by_type_and_by_file(results, tmp_path):
    results["coding_rate"].save(tmp_path / "rates")
    results["pca"].save(tmp_path / "rates")  # two results in one folder
    from depict_analysis import CodingRates, PCASegmentation

    assert isinstance(CodingRates.load(tmp_path / "rates"), CodingRates)
    assert isinstance(PCASegmentation.load(tmp_path / "rates" / "pca-seg.result.npz"), PCASegmentation)
    with pytest.raises(InputError, match="2 saved results"):
        Result.load(tmp_path / "rates")
    with pytest.raises(InputError, match="not a CodingRates"):
        CodingRates.load(tmp_path / "rates" / "pca-seg.result.npz")


def test_loaded_arrays_and_tensors_keep_their_values_and_types(results, tmp_path):
    pca = results["pca"]
    pca.save(tmp_path)
    loaded = Result.load(tmp_path)
    assert isinstance(loaded.examples[0].segments, torch.Tensor)
    assert torch.equal(loaded.examples[0].segments, pca.examples[0].segments)
    np.testing.assert_array_equal(loaded.k, pca.k)
    robustness = results["robustness"]
    robustness.save(tmp_path / "r")
    again = Result.load(tmp_path / "r")
    assert {e.sigma for e in again.evaluations} == {0.0, 0.1}
    assert again.curve("CA").sigma_half(0.95) == robustness.curve("CA").sigma_half(0.95)


def test_a_saved_result_never_builds_anything_but_our_dataclasses(tmp_path):
    from depict_analysis.result_state import FORMAT

    for tag in ("os:system", "subprocess:Popen", "depict_analysis.foundation.files:atomic_write"):
        state = json.dumps({"format": FORMAT, "result": {"$dataclass": tag, "fields": {"command": "true"}}})
        np.savez(tmp_path / "evil.result.npz", state=np.array(state))
        with pytest.raises(InputError, match="not a depict_analysis class|not a result part"):
            Result.load(tmp_path / "evil.result.npz")
    (tmp_path / "junk.result.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a saved result"):
        Result.load(tmp_path / "junk.result.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no saved result"):
        Result.load(tmp_path / "empty")


@pytest.mark.parametrize("kind", KINDS)
def test_to_frame_is_the_rows_as_a_tidy_table(results, kind):
    result = results[kind]
    frame = result.to_frame()
    rows = result.rows()
    assert len(frame) == len(rows) and list(frame.columns) == list(dict.fromkeys(k for r in rows for k in r))


def test_coding_rate_frame_answers_a_groupby(results):
    rates = results["coding_rate"]
    frame = rates.to_frame()
    share = frame[frame.quantity == "share"].groupby(["subspace", "layer_name"])["value"].mean()
    for name, stat in rates.share.items():
        for j, token in enumerate(rates.token_names):
            assert share[(name, token)] == pytest.approx(stat.mean[j], rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_reprs_are_short_and_say_what_the_result_is(results, kind):
    text = repr(results[kind])
    assert len(text) < 1200 and "\n" not in text, text
    assert type(results[kind]).__name__ in text


def test_trace_repr_names_model_layers_and_shapes(traced):
    text = repr(traced)
    assert len(text) < 1500, len(text)
    assert "depict-ca-mini" in text and "mssa1" in text and "Tensor(3, 8, 16, 16) float32" in text  # masks on the token grid (B, K, h, w)
    assert "image_size=(64, 64)" in text
    assert "4 × Tensor(3, 256, 64) float32" in text  # tokens: input + 3 layers, (B, N, d)


def test_help_is_titled_with_the_public_name():
    text = pydoc.render_doc(depict_analysis.load_model, renderer=pydoc.plaintext)
    assert text.splitlines()[0].endswith("function load_model in module depict_analysis")
    assert "open_checkpoint" not in text
    assert "CheckpointInfo" in text  # the docstring is the function's own
    model, info = depict_analysis.load_model("builtin:segmenter")
    assert info.label == "Segmenter"
