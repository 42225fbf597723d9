"""``depict-analyze ablate``: every unit removed in turn, scored as ``depict eval`` scores (SPEC §3.5)."""

import json

import numpy as np
import pytest
import torch

from depict_analysis.ablation import (
    Ablation,
    ablation_units,
    class_iou,
    concentration_finding,
    concentration,
    resample_weights,
    run_ablation,
    weighted_concentration,
)
from depict_analysis.interventions import edited
from depict_analysis.models.data import build_dataset
from depict_analysis.models.evaluate import eval_protocol, evaluate
from depict_analysis.models.pretrained import LABELS
from depict_analysis.models.sources import open_checkpoint
from depict_analysis.robustness import EvaluationImages
from depict_analysis.uncertainty import Bootstrap, image_resamples

N_IMAGES = 6


@pytest.fixture(scope="module")
def dataset():
    return build_dataset("synthetic", None, "val")


@pytest.fixture(scope="module")
def builtin():
    return [open_checkpoint(f"builtin:{name}") for name in LABELS]  # LoadedModel: (model, info)


@pytest.fixture(scope="module")
def heads(builtin, dataset):
    return run_ablation(builtin, EvaluationImages(dataset, num_images=N_IMAGES), unit="head", bootstrap=Bootstrap(200))


def depict_eval(model, meta, dataset, n=N_IMAGES):
    """What `depict eval` computes on the first n images (its protocol from the checkpoint's train_config)."""
    return evaluate(model, dataset, num_images=n, **eval_protocol(model, dataset, meta.get("train_config")))


def test_the_clean_miou_of_every_builtin_model_equals_depict_eval_on_the_same_images(heads, builtin, dataset):
    for model, info in builtin:
        label, reference = info.label, depict_eval(model, info.meta, dataset)
        np.testing.assert_array_equal(heads.scores(label)[0].iou, np.array(reference["iou"]))  # every class exactly
        assert heads.clean(label).estimate == pytest.approx(reference["miou"], rel=1e-14)  # (numpy's nanmean sums in another order)


def test_one_row_per_unit_for_every_model(heads):
    expected = {
        "DEPICT-SA": [f"mssa{l}[{k}]" for l in (1, 2, 3) for k in (0, 1)],
        "DEPICT-CA": [f"{s}{l}[{k}]" for s in ("mssa", "msca") for l in (1, 2, 3) for k in (0, 1)],
        "Segmenter": [f"block{l}[{k}]" for l in (1, 2) for k in (0, 1)],
    }
    for label, units in expected.items():
        assert [row["unit"] for row in heads.unit_rows(label)] == units
    saved = heads.to_json()
    assert [len(m["units"]) for m in saved["checkpoints"]] == [6, 12, 4]
    assert all(len(u["iou"]) == 8 and {"name", "miou", "change"} <= u.keys() for m in saved["checkpoints"] for u in m["units"])


def test_each_units_miou_equals_a_full_forward_with_that_unit_edited(heads, builtin, dataset):
    """The ablated decoder reads the tokens the backbone gave once; a full `evaluate` under the same edit agrees."""
    model, info = builtin[1]  # DEPICT-CA: MSSA and MSCA heads
    label, meta = info.label, info.meta
    units = ablation_units(model, "head", dataset.class_names)
    for u in (0, 7):
        with edited(model, *units[u].edits):
            reference = depict_eval(model, meta, dataset)
        row = heads.unit_rows(label)[u]
        assert row["unit"] == units[u].name
        np.testing.assert_array_equal(row["iou"], np.array(reference["iou"]))
        assert row["change"].estimate == pytest.approx(reference["miou"] - heads.clean(label).estimate, abs=1e-14)


def test_the_heatmap_names_every_class_and_every_unit(heads, dataset):
    figure = heads.figures()["ablation"]
    panels = [ax for ax in figure.axes if ax.get_yticklabels() and ax.get_images()]
    assert len(panels) == 3
    for ax, label in zip(panels, heads.labels):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["mIoU", *dataset.class_names]
        assert [t.get_text() for t in ax.get_yticklabels()] == [r["unit"] for r in heads.unit_rows(label)]
        assert ax.get_title().startswith(label)


def test_class_concentration_against_a_hand_computation():
    clean = np.array([0.9, 0.5, 0.4, np.nan])
    one_class = np.array([0.9, 0.1, 0.4, np.nan])  # all the loss on class 1
    spread = np.array([0.8, 0.4, 0.3, 0.2])  # 0.1 on each of three classes (class 3 undefined before: left out)
    gain = np.array([0.95, 0.6, 0.4, np.nan])  # no class loses
    assert concentration(clean, one_class) == 1.0
    assert concentration(clean, spread) == pytest.approx(1 / 3)
    assert np.isnan(concentration(clean, gain))
    # weighted by the units' total losses 0.4 and 0.3: (0.4·1 + 0.3·⅓) / 0.7
    both = weighted_concentration(clean, np.stack([one_class, spread, gain]))
    assert both == pytest.approx((0.4 * 1 + 0.3 / 3) / 0.7)


def test_resampled_counts_are_the_sums_over_the_resampled_images():
    counts = np.random.default_rng(0).integers(0, 50, size=(7, 3, 4))
    bootstrap = Bootstrap(30, seed=3)
    weights = resample_weights(7, bootstrap)
    expected = counts[image_resamples(7, bootstrap)].sum(axis=1)  # (R, 3, K)
    np.testing.assert_array_equal((weights @ counts.reshape(7, -1)).reshape(-1, 3, 4), expected)
    np.testing.assert_allclose(class_iou(expected[0]), expected[0, 0] / (expected[0, 1] + expected[0, 2] - expected[0, 0]))


def test_mean_ablation_records_the_images_its_means_came_from(builtin, dataset):
    label, images = builtin[0].label, EvaluationImages(dataset, num_images=3)
    result = run_ablation(builtin[:1], images, unit="class", mode="mean", bootstrap=Bootstrap(50))
    assert result.settings["mean_images"] == [dataset.item_path(i) for i in range(3)]
    assert [r["unit"] for r in result.unit_rows(label)] == dataset.class_names
    zero = run_ablation(builtin[:1], images, unit="class", bootstrap=Bootstrap(50))
    assert zero.clean(label).estimate == result.clean(label).estimate
    assert [r["miou"].estimate for r in zero.unit_rows(label)] != [r["miou"].estimate for r in result.unit_rows(label)]


def test_subspace_units_project_each_heads_span_out_after_its_layer(builtin, dataset):
    model = builtin[0].model
    units = ablation_units(model, "subspace", dataset.class_names)
    assert [u.name for u in units] == [f"mssa{l}[{k}]" for l in (1, 2, 3) for k in (0, 1)]
    assert [e.site for e in units[2].edits] == ["tokens/mssa2", "classes/mssa2"]
    P = model.decoder.layers[1].proj[:24].detach().double()  # head 0 of mssa2, P_0ᵀ (p, d)
    U = units[2].edits[0].basis.double()
    torch.testing.assert_close(U @ U.T, P.T @ torch.linalg.inv(P @ P.T) @ P, rtol=0, atol=1e-5)


def saved_clean(out):
    return json.loads((out / "ablation.json").read_text())["checkpoints"][0]["clean_miou"]["estimate"]


def test_the_command_writes_the_table_the_json_and_the_figure(tmp_path):
    from typer.testing import CliRunner

    from depict_analysis.cli.analyze import app

    out = tmp_path / "ablation"
    result = CliRunner().invoke(app, ["ablate", "builtin:segmenter", "--num-images", "3", "--resamples", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {f"ablation.{s}" for s in ("png", "pdf", "json", "csv", "npz", "result.npz")}
    loaded = Ablation.load(out)  # the whole result, read back as data
    assert loaded.clean("Segmenter").estimate == saved_clean(out)
    saved = json.loads((out / "ablation.json").read_text())
    (model,) = saved["checkpoints"]
    assert model["source"] == "builtin:segmenter" and [u["name"] for u in model["units"]] == ["block1[0]", "block1[1]", "block2[0]", "block2[1]"]
    assert "clean_miou" in model and "block2[1]" in result.output


def test_the_concentration_finding_compares_the_models_on_paired_resamples(heads):
    finding = concentration_finding(heads, "DEPICT-SA", "Segmenter", "6 images")
    a, a_reps = heads.concentration_replicates("DEPICT-SA")
    b, b_reps = heads.concentration_replicates("Segmenter")
    assert finding.kind == "observation" and finding.verdict in ("holds", "does not hold", "not decided")
    assert finding.values["DEPICT-SA"].estimate == a and finding.difference.estimate == pytest.approx(a - b)
    wins = np.mean(a_reps > b_reps)
    assert (finding.verdict == "holds") == (wins >= 0.975)
    assert concentration_finding(heads, "DEPICT-SA", "Segmenter", "", ["at its class prior"]).verdict == "not decided"
