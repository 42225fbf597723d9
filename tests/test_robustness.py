"""Robustness sweeps (SPEC §3.4): noise semantics, invariances, seeding, caching, and ``depict-analyze robustness``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.func import functional_call

import depict_analysis.robustness as rob
from depict_analysis.cli.analyze import app
from depict_analysis.inputs import Batch
from depict_analysis.perturbations import resolve_perturbation
from depict_analysis.plots import log_ticks
from depict_analysis.robustness import (
    Evaluation,
    Robustness,
    draw_generator,
    noisy_parameters,
    perturbed_images,
    robustness_records,
    sigma_half,
    structured_parameters,
    sweep_settings,
)
from depict_analysis.uncertainty import Bootstrap, image_resamples, miou_from_counts, miou_replicates
from depict_analysis.models import save_checkpoint
from depict_analysis.models.evaluate import ConfusionMatrix, miou
from tests.conftest import invoke, tiny_model as seeded
from tests.official_layout import write_release

K = 4


def tiny_model(name: str = "depict-sa-tiny", seed: int = 0):
    return seeded(name, K, seed)


def make_batches(n: int = 6, size: int = 32, batch: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.rand(n, 3, size, size, generator=g), torch.randint(0, K, (n, size, size), generator=g)
    labels[:, :4] = 255  # some ignored pixels
    return [Batch(pixels[i : i + batch], labels[i : i + batch], [f"im{j}" for j in range(i, i + batch)])
            for i in range(0, n, batch)]


def direct_miou(model, batches) -> float:
    confusion = ConfusionMatrix(K)
    with torch.inference_mode():
        for b in batches:
            confusion.update(model(model.normalize(b.pixels)).argmax(1), b.labels)
    return miou(confusion)["miou"]


def sweep(model, noise="gaussian", target=None, sigmas=(0, 1e-2, 0.5), draws=2, seed=0, label="m", **kw) -> list[Evaluation]:
    perturbation = resolve_perturbation(noise, target, kw.pop("relative", False))
    return list(robustness_records(model, label, make_batches(), perturbation, sigmas, draws, seed, **kw))


def snapshot(model) -> dict:
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def assert_untouched(model, before: dict) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == before.keys()
    for name, (obj, value) in before.items():
        assert params[name] is obj and torch.equal(obj, value), name


def logits(model, parameters: dict, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return functional_call(model, parameters, (model.normalize(pixels),))


# --------------------------------------------------------------------------------- library


@pytest.mark.parametrize("target", ["decoder", "encoder", "input"])
def test_sigma_zero_is_the_clean_model_evaluated_once(target):
    model = tiny_model()
    records = sweep(model, target=target)
    clean = [r for r in records if r.sigma == 0]
    assert len(clean) == 1 and clean[0].draw == 0
    assert clean[0].miou == direct_miou(model, make_batches())
    assert [(r.sigma, r.draw) for r in records] == [(0, 0), (1e-2, 0), (1e-2, 1), (0.5, 0), (0.5, 1)]


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny"])
def test_head_rotation_leaves_depict_unchanged_and_global_rotation_does_not(name):
    model = tiny_model(name)
    pixels = make_batches()[0].pixels
    clean = logits(model, {}, pixels)
    rotated = structured_parameters(model, "head-rotation", torch.Generator().manual_seed(0))
    assert len(rotated) == (3 if name == "depict-sa-tiny" else 6)
    for key, value in rotated.items():
        assert not torch.allclose(value, dict(model.named_parameters())[key])  # the weights did change
    torch.testing.assert_close(logits(model, rotated, pixels), clean, atol=1e-4, rtol=1e-4)
    mixed = structured_parameters(model, "global-rotation", torch.Generator().manual_seed(0))
    assert (logits(model, mixed, pixels) - clean).abs().max() > 1e-2
    records = sweep(model, "head-rotation", sigmas=(0, 1), draws=3)
    assert len(records) == 4 and all(r.miou == pytest.approx(records[0].miou, abs=1e-6) for r in records)


@pytest.mark.parametrize("name, parameter", [("cbt-tiny", "proj.weight"), ("tost-tiny", "qkv.weight")])
def test_head_rotation_transforms_cbt_and_tost_subspaces_which_are_not_invariant(name, parameter):
    """Their projections are rotated like DEPICT's, but the output map ``to_out`` is a matrix of its own
    (and ToST normalises over tokens), so unlike MSSA / MSCA they are not invariant."""
    model = tiny_model(name)
    pixels = make_batches()[0].pixels
    rotated = structured_parameters(model, "head-rotation", torch.Generator().manual_seed(0))
    assert list(rotated) == [f"decoder.layers.{l}.{parameter}" for l in range(3)]
    assert (logits(model, rotated, pixels) - logits(model, {}, pixels)).abs().max() > 1e-3


def test_structured_transforms_keep_what_they_promise():
    model = tiny_model("depict-ca-tiny")
    layer = model.decoder.cross_layers[1]
    P = layer.subspaces().detach().transpose(-1, -2).double()  # (h, d, p): columns span head k
    for transform in ("head-rotation", "head-orthonormalize"):
        new = structured_parameters(model, transform, torch.Generator().manual_seed(3))["decoder.cross_layers.1.proj"]
        Q = new.view(layer.heads, layer.dim_head, -1).transpose(-1, -2).double()
        same_span = Q @ torch.linalg.lstsq(Q, P).solution  # P projected on span(Q)
        torch.testing.assert_close(same_span, P, atol=1e-5, rtol=0)
        if transform == "head-orthonormalize":
            eye = torch.eye(layer.dim_head, dtype=torch.float64).expand(layer.heads, -1, -1)
            torch.testing.assert_close(Q.transpose(-1, -2) @ Q, eye, atol=1e-5, rtol=0)
        else:  # P_k R_k: Gram PᵀP of each head rotates, its spectrum is kept
            torch.testing.assert_close(torch.linalg.svdvals(Q), torch.linalg.svdvals(P), atol=1e-5, rtol=0)


@pytest.mark.parametrize("noise", ["head-rotation", "global-rotation", "head-orthonormalize"])
def test_structured_transforms_need_subspaces(noise):
    with pytest.raises(ValueError, match="mask_transformer"):
        sweep(tiny_model("segmenter-tiny"), noise, sigmas=(0, 1))


def test_parameters_are_identical_after_a_sweep_and_after_a_failure_mid_sweep(monkeypatch):
    model = tiny_model("depict-ca-tiny")
    before = snapshot(model)
    sweep(model, target="all", relative=True)
    sweep(model, "global-rotation", sigmas=(0, 1))
    assert_untouched(model, before)

    calls = {"n": 0}
    forward = model.decoder.forward

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # inside functional_call, with noisy parameters swapped in
            raise RuntimeError("boom")
        return forward(*args)

    monkeypatch.setattr(model.decoder, "forward", failing)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        sweep(model)
    assert model.training  # its mode is restored too
    monkeypatch.undo()
    assert_untouched(model, before)


def test_same_seed_same_numbers_other_seed_other_numbers_any_order():
    model = tiny_model()
    first = sweep(model, seed=5)
    assert sweep(model, seed=5) == first
    backwards = sweep(model, seed=5, sigmas=(0.5, 1e-2, 0))
    assert sorted(backwards, key=lambda r: (r.sigma, r.draw)) == first
    other = sweep(model, seed=6)
    assert [r.miou for r in other[1:]] != [r.miou for r in first[1:]]
    assert other[0] == first[0]  # the clean model has no noise
    g1, g2 = draw_generator(5, "m", 0.01, 1), draw_generator(5, "m", 0.01, 1)
    assert torch.equal(torch.randn(8, generator=g1), torch.randn(8, generator=g2))
    reference = torch.randn(8, generator=draw_generator(5, "m", 0.01, 1))
    for key in [(5, "n", 0.01, 1), (5, "m", 0.02, 1), (5, "m", 0.01, 0), (6, "m", 0.01, 1)]:
        assert not torch.equal(torch.randn(8, generator=draw_generator(*key)), reference)


@pytest.mark.parametrize("relative", [False, True])
def test_parameter_noise_by_value(relative):
    model = tiny_model("linear-tiny")
    perturbation = resolve_perturbation("gaussian", "decoder", relative)
    noisy = noisy_parameters(model, perturbation, 0.1, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert list(noisy) == ["decoder.head.weight", "decoder.head.bias"]
    for name, value in noisy.items():
        param = dict(model.named_parameters())[name].detach()
        scale = 0.1 * (param.std(correction=0) if relative else 1)
        torch.testing.assert_close(value, param + scale * torch.randn(param.shape, generator=g))


def test_uniform_noise_has_std_sigma_and_targets_select_parameters():
    model = tiny_model()
    for target, prefix in (("encoder", "encoder."), ("decoder", "decoder."), ("all", "")):
        noisy = noisy_parameters(model, resolve_perturbation("uniform", target), 0.3, torch.Generator().manual_seed(0))
        assert list(noisy) == [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    params = dict(model.named_parameters())
    diff = torch.cat([(v - params[n]).flatten() for n, v in noisy.items()])
    assert diff.std().item() == pytest.approx(0.3, rel=0.02) and diff.abs().max() <= 0.3 * math.sqrt(3) + 1e-6


def test_cached_z0_equals_recomputing_the_backbone():
    model = tiny_model("depict-ca-tiny")
    cached = sweep(model, cache_z0=True, sigmas=(0, 3e-2, 0.3))
    uncached = sweep(model, cache_z0=False, sigmas=(0, 3e-2, 0.3))
    assert [r.miou for r in cached] == pytest.approx([r.miou for r in uncached], abs=1e-9)
    with pytest.raises(ValueError, match="cannot cache"):
        sweep(model, target="encoder", cache_z0=True)


def test_input_perturbations():
    model = tiny_model()
    pixels = make_batches()[0].pixels
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pepper = resolve_perturbation("salt-pepper")
    assert torch.equal(perturbed_images(model, pixels, pepper, 0, g()), model.normalize(pixels))
    all_hit = perturbed_images(model, pixels, pepper, 1.0, g()) * model.std + model.mean
    assert set(all_hit.unique().round(decimals=5).tolist()) <= {0.0, 1.0}
    blurred = perturbed_images(model, torch.full_like(pixels, 0.3), resolve_perturbation("blur"), 2.0, g())
    torch.testing.assert_close(blurred, model.normalize(torch.full_like(pixels, 0.3)))  # a constant image stays
    gauss = perturbed_images(model, pixels, resolve_perturbation("gaussian", "input"), 0.5, g()) - model.normalize(pixels)
    assert gauss.std().item() == pytest.approx(0.5, rel=0.05)
    records = sweep(model, "blur", sigmas=(0, 1, 2), draws=3)
    assert [(r.sigma, r.draw) for r in records] == [(0, 0), (1, 0), (2, 0)]  # deterministic: one draw


@pytest.mark.parametrize(
    "noise, target, relative, message",
    [("blur", "decoder", False, "target='input'"), ("head-rotation", "encoder", False, "must be decoder"),
     ("salt-pepper", None, True, "relative"), ("gaussian", "input", True, "relative"), ("wobble", None, False, "unknown noise")],
)
def test_meaningless_combinations_are_refused(noise, target, relative, message):
    with pytest.raises(ValueError, match=message):
        resolve_perturbation(noise, target, relative)


def result_of(evaluations, noise="gaussian", sigmas=(0, 1e-2, 0.5), draws=2, complete=True, **bootstrap):
    settings = sweep_settings(resolve_perturbation(noise), sigmas, draws, 0) | {"num_images": len(evaluations[0].counts)}
    checkpoints = [{"label": label, "model": {"decoder": "depict_sa"}} for label in dict.fromkeys(e.checkpoint for e in evaluations)]
    return Robustness(settings, checkpoints, evaluations, complete, Bootstrap(**bootstrap))


def test_per_image_counts_are_the_confusion_matrix_by_image():
    model = tiny_model()
    batches = make_batches()
    clean = sweep(model, sigmas=(0,))[0]
    confusions = []
    with torch.inference_mode():
        for b in batches:
            pred = model(model.normalize(b.pixels)).argmax(1)
            for p, t in zip(pred, b.labels):
                confusion = ConfusionMatrix(K)
                confusion.update(p, t)
                confusions.append(confusion.counts)
    for counts, confusion in zip(clean.counts, confusions):  # per image: diagonal, row sums, column sums
        assert counts.tolist() == [confusion.diag().tolist(), confusion.sum(1).tolist(), confusion.sum(0).tolist()]
    assert miou_from_counts(clean.counts.sum(0)) == pytest.approx(clean.miou, abs=1e-12)
    # a bootstrap replicate is the mIoU of the resampled images' summed confusion matrices
    picks = image_resamples(len(confusions), Bootstrap(resamples=5, seed=3))
    for pick, value in zip(picks, miou_replicates(clean.counts, picks)):
        assert value == pytest.approx(miou(sum(confusions[i] for i in pick))["miou"], abs=1e-12)


def test_result_means_intervals_and_sigma_half():
    model = tiny_model()
    evaluations = sweep(model, label="a", sigmas=(0, 1e-2, 0.5, 2.0), draws=3) + sweep(model, label="b", sigmas=(0, 1e-2, 0.5, 2.0), draws=3, seed=1)
    result = result_of(evaluations, sigmas=(0, 1e-2, 0.5, 2.0), draws=3, resamples=200)
    for label in ("a", "b"):
        curve = result.curve(label)
        by_sigma = {}
        for e in evaluations:
            if e.checkpoint == label:
                by_sigma.setdefault(e.sigma, []).append(e.miou)
        assert curve.sigma == [0, 1e-2, 0.5, 2.0] and curve.draws == [1, 3, 3, 3]
        assert curve.mean == pytest.approx([np.mean(v) for v in by_sigma.values()], abs=1e-12)
        assert curve.std == pytest.approx([np.std(v) for v in by_sigma.values()], abs=1e-12)
        for interval, mean in zip(curve.interval, curve.mean):
            assert interval.low <= interval.high and interval.estimate == mean
        half = curve.sigma_half(0.95)
        assert half.estimate == sigma_half(curve.sigma, curve.relative)
    # intervals are seeded: the same numbers again, and the images are resampled alike for every model
    again = result_of(evaluations, sigmas=(0, 1e-2, 0.5, 2.0), draws=3, resamples=200)
    assert again.curve("a").interval == result.curve("a").interval
    rows = result.table()
    assert len(rows) == 8 and rows[0]["draws"] == 1 and rows[0]["relative"] == 1.0


def test_sigma_half_interpolates_in_log_sigma():
    # falls from 0.7 at σ = 0.1 to 0.1 at σ = 1: a third of the way, in log σ: 0.1 · 10^(1/3)
    assert sigma_half([0, 0.01, 0.1, 1], [1, 0.9, 0.7, 0.1]) == pytest.approx(0.1 * 10 ** (1 / 3), rel=1e-12)
    assert sigma_half([0, 0.01, 0.1], [1, 0.5, 0.2]) == pytest.approx(0.01)  # reaches exactly 0.5 on the grid
    assert sigma_half([0, 0.01, 0.1], [1, 0.3, 0.2]) == pytest.approx(0.01)  # below 0.5 at once: no log 0
    assert sigma_half([0, 0.01, 0.1], [1, 0.9, 0.6]) == math.inf  # never: beyond the grid
    assert math.isnan(sigma_half([0, 0.01], [math.nan, math.nan]))  # no clean mIoU
    many = np.array([[1, 0.9, 0.7, 0.1], [1, 0.3, 0.2, 0.1], [1, 0.9, 0.9, 0.9]])
    assert sigma_half([0, 0.01, 0.1, 1], many).tolist() == [sigma_half([0, 0.01, 0.1, 1], row) for row in many]


def counts_of(label_pixels, predicted_pixels, correct):
    """(n, 3, K) counts of n identical images."""
    return np.array([[correct, label_pixels, predicted_pixels]] * 30)


def test_a_model_at_its_class_prior_is_flagged():
    labels = [700, 100, 100, 100]  # background is 70 % of the pixels
    constant = counts_of(labels, [1000, 0, 0, 0], [700, 0, 0, 0])  # predicts background everywhere
    good = counts_of(labels, [700, 100, 100, 100], [650, 80, 80, 80])
    evaluations = [Evaluation("stuck", 0.0, 0, miou_from_counts(constant.sum(0)), 0.7, 0.25, constant),
                   Evaluation("good", 0.0, 0, miou_from_counts(good.sum(0)), 0.9, 0.8, good)]
    result = result_of(evaluations, sigmas=(0,), draws=1)
    prior = result.class_prior("stuck")
    assert prior["baseline"] == pytest.approx(0.7 / 4) and prior["majority_class"] == 0
    assert prior["dominant"] == 0 and prior["dominant_share"] == 1.0
    assert prior["ratio"]["low"] == prior["ratio"]["high"] == pytest.approx(1.0)  # its mIoU is the prior's on every resample
    assert result.at_class_prior("stuck") and not result.at_class_prior("good")
    warnings = result.warnings()
    assert any(w.startswith("stuck is at its class prior") for w in warnings)
    assert not any(w.startswith("good") for w in warnings)
    assert result.summary()["models"]["stuck"]["at_class_prior"]


def test_figures_for_curves_bars_and_partial_results():
    model = tiny_model()
    evaluations = sweep(model, label="a") + sweep(model, label="b", sigmas=(0,))
    fig = result_of(evaluations, complete=False, resamples=50).figures()["robustness"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()][0] == "0"
    assert "partial" in ax.get_title() and "a (depict_sa)" in [t.get_text() for t in fig.legends[0].get_texts()]
    colours = {line.get_label(): line.get_color() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert len(set(map(str, colours.values()))) == len(colours)  # one colour per model
    bars = sweep(model, "head-rotation", sigmas=(0, 1), label="a")
    fig = result_of(bars, "head-rotation", sigmas=(0, 1), resamples=50).figures()["robustness"]
    assert len(fig.axes[0].patches) == 2


def test_every_log_axis_gets_several_labelled_ticks():
    assert log_ticks(0.5, 8)[0] == [0.5, 1, 2, 5]  # the blur grid: not one lone tick at 1
    labelled, minor = log_ticks(1e-3, 1)
    assert labelled == pytest.approx([1e-3, 1e-2, 0.1, 1]) and 2e-3 in [pytest.approx(m) for m in minor]
    model = tiny_model()
    blur = sweep(model, "blur", sigmas=(0, 0.5, 1, 2, 4, 8), draws=1)
    fig = result_of(blur, "blur", sigmas=(0, 0.5, 1, 2, 4, 8), draws=1, resamples=20).figures()["robustness"]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["0", "0.5", "1", "2", "5"]


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return invoke(app, "robustness", *args)


def write_labelled_images(folder, n: int = 3):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "images" / f"im{i}.jpg")
        Image.fromarray(rng.integers(0, K, (40, 48), dtype=np.uint8)).save(folder / "labels" / f"im{i}.png")
    return ["--images", folder / "images", "--labels", folder / "labels"]


def test_cli_on_ours_and_an_official_release(tmp_path):
    save_checkpoint(tmp_path / "ours.pt", tiny_model())
    write_release(tmp_path / "official-seg", "mask_transformer")
    out = tmp_path / "out"
    source = write_labelled_images(tmp_path)
    result = run_cli(tmp_path / "ours.pt", tmp_path / "official-seg", *source, "--sigmas", "0.01,0.1", "--draws", 2,
                     "--relative", "--out", out)
    assert result.exit_code == 0, result.output
    assert "ours" in result.stdout and "official-seg" in result.stdout
    for name in ("robustness.png", "robustness.pdf", "robustness.json", "robustness.csv"):
        assert (out / name).stat().st_size > 0
    written = json.loads((out / "robustness.json").read_text())
    assert written["complete"] and written["settings"]["relative"] and written["settings"]["num_images"] == 3
    assert written["settings"]["protocol"] == "evaluation"  # the default: every image as depict eval scores it
    assert [c["protocol"]["name"] for c in written["checkpoints"]] == ["evaluation"] * 2
    assert [c["model"]["decoder"] for c in written["checkpoints"]] == ["depict_sa", "mask_transformer"]
    assert len(written["records"]) == 2 * (1 + 2 * 2) and len(written["table"]) == 2 * 3
    ours = written["models"]["ours"]
    assert ours["clean"]["low"] <= ours["clean"]["estimate"] <= ours["clean"]["high"]
    assert any("too few" in w for w in written["warnings"])  # 3 images
    counts = np.load(out / "robustness.npz")
    assert counts["ours"].shape == (5, 3, 3, K)
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert len(rows) == 10 and list(rows[0])[:3] == ["checkpoint", "sigma", "draw"]


def test_cli_interrupt_keeps_partial_results(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "sa.pt", tiny_model())
    original = rob.ModelSweep.score_crops

    def interrupted(self, batch, indices):
        if indices[0] == 2:
            raise KeyboardInterrupt
        return original(self, batch, indices)

    monkeypatch.setattr(rob.ModelSweep, "score_crops", interrupted)
    out = tmp_path / "out"
    result = run_cli(tmp_path / "sa.pt", *write_labelled_images(tmp_path), "--protocol", "crops", "--size", 32, "--batch-size", 1,
                     "--out", out)
    assert result.exit_code == 130 and result.stderr.startswith("error: interrupted: partial results on 2 images")
    written = json.loads((out / "robustness.json").read_text())
    assert not written["complete"] and len(written["records"]) == 37 and written["num_images"] == 2
    assert len((out / "robustness.csv").read_text().splitlines()) == 38 and (out / "robustness.png").exists()


@pytest.mark.parametrize(
    "problem", ["bad checkpoint", "structured on segmenter", "blur of parameters", "no labels", "missing label", "bad sigmas"]
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "seg.pt", tiny_model("segmenter-tiny"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    source = write_labelled_images(tmp_path)
    if problem == "missing label":
        (tmp_path / "labels" / "im1.png").unlink()
    args = {
        "bad checkpoint": [tmp_path / "notes.pt", *source],
        "structured on segmenter": [tmp_path / "seg.pt", "--noise", "head-rotation", *source],
        "blur of parameters": [tmp_path / "seg.pt", "--noise", "blur", "--target", "decoder", *source],
        "no labels": [tmp_path / "seg.pt", "--images", tmp_path / "images"],
        "missing label": [tmp_path / "seg.pt", *source],
        "bad sigmas": [tmp_path / "seg.pt", "--sigmas", "0.1,-1", *source],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
