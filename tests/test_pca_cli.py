"""PCA segmentation runner and ``depict-analyze pca-seg`` (SPEC §3.2): numbers equal the pure functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from depict_analysis import Comparison, PCASegmentation, analyze_pca
from depict_analysis.cli.analyze import app
from depict_analysis.pca import choose_k, match_segments, pca_segment, segmentation_scores, upsample_labels
from depict_analysis.pca_analysis import colour_ids, parse_layers, resolve_layers, segment_tokens
from depict_analysis.inputs import Batch, image_batches
from depict_analysis.tracing import Trace, trace, trace_batches
from depict_analysis.models import load_model, save_checkpoint
from tests.conftest import invoke, tiny_model as seeded
from tests.official_layout import write_release

PERFECT = {"ari": 1.0, "nmi": 1.0, "miou": 1.0}


def tiny_model(name: str = "depict-sa-tiny", n_cls: int = 8, seed: int = 0):
    return seeded(name, n_cls, seed)


# ---------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny"])
def test_runner_equals_the_pure_functions_on_a_traced_batch(name):
    model = tiny_model(name)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 37, 45, generator=g)  # not a multiple of the patch: padded, then cropped
    labels = torch.randint(0, 4, (2, 37, 45), generator=g)
    labels[:, :3] = 255
    tr = trace(model, Batch(pixels, labels, ["a.png", "b.png"]))
    result = analyze_pca(tr, layers=[0, 3, "L1"], method="argmax", examples=2)
    assert isinstance(result, PCASegmentation) and result.sources == ["input", "mssa3", "Z_L1"]
    padded = (tr.grid[0] * 8, tr.grid[1] * 8)
    logits = model(model.normalize(pixels))
    for b, example in enumerate(result.examples):
        prediction = logits[b].argmax(0)
        k = choose_k(prediction)
        assert example.k == k == result.k[b] and example.path == "ab"[b] + ".png"
        assert torch.equal(example.prediction, prediction)
        # Z_L1 is the tokens that enter the mask head's dot product; the pre-norm stage stays a choice
        for i, tokens in enumerate([tr.tokens[0], tr.tokens[3], tr.embeddings]):
            seg = upsample_labels(pca_segment(tokens[b], k), tr.grid, padded)[:37, :45]
            assert torch.equal(example.segments[i], seg)
            source = result.sources[i]
            assert example.scores["prediction"][source] == segmentation_scores(seg, prediction)
            assert example.scores["ground_truth"][source] == segmentation_scores(seg, labels[b])
            assert result.scores["ground_truth"][source]["ari"].per_image[b] == example.scores["ground_truth"][source]["ari"]
        assert example.scores["ground_truth"]["prediction"] == segmentation_scores(prediction, labels[b])
        assert example.rgb.shape == (3, 3, 37, 45) and 0 <= example.rgb.min() and example.rgb.max() <= 1
    assert not torch.equal(tr.embeddings, tr.tokens[3])  # the final LayerNorm makes them differ


def _separated_trace(prediction: torch.Tensor, noise: torch.Tensor, ground_truth: torch.Tensor) -> Trace:
    """A Trace on a 4x4 grid whose mask-head embeddings sit on one point per predicted class (plus tiny
    noise); its residual tokens are the noise alone."""
    token_class = prediction[::8, ::8].reshape(-1)  # (16,): the class of each 8x8 patch
    z_l = 10.0 * torch.eye(12)[token_class] + 1e-3 * noise
    one_hot = lambda classes: torch.nn.functional.one_hot(classes, 12).permute(2, 0, 1).float()[None]  # noqa: E731
    model = {"variant": "toy", "decoder": "depict_sa", "patch_size": 8, "n_cls": 12}
    return Trace(model=model, grid=(4, 4), image_size=(32, 32), layer_names=["mssa1"], tokens=[noise[None], noise[None]],
                 class_stages=[], classes=[], embeddings=z_l[None], class_embeddings=torch.zeros(1, 3, 12),
                 masks=one_hot(token_class.reshape(4, 4)), full_masks=one_hot(prediction), subspaces=[],
                 labels=ground_truth[None], paths=["toy.png"])


@pytest.mark.parametrize("method, n_classes", [("argmax", 2), ("kmeans", 3)])
def test_separated_embeddings_score_perfectly_at_z_l1(method, n_classes):
    prediction = torch.zeros(32, 32, dtype=torch.long)
    prediction[:, 16:] = 1
    if n_classes == 3:
        prediction[:8, :8] = 2
    noise = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    ground_truth = prediction.clone()
    ground_truth[24:] = 255  # ignored rows do not count
    result = analyze_pca(_separated_trace(prediction, noise, ground_truth), method=method, examples=1, score_figure=False)
    (example,) = result.examples
    assert example.k == n_classes and result.sources == ["input", "Z_L1"]
    assert example.scores["prediction"]["Z_L1"] == pytest.approx(PERFECT)
    assert example.scores["ground_truth"]["Z_L1"] == pytest.approx(PERFECT)
    assert example.scores["prediction"]["input"]["ari"] < 0.9
    assert result.summary()["mean_scores"]["ground_truth"]["Z_L1"] == pytest.approx(PERFECT)
    # matched segments are drawn in their class's colour: a perfect segmentation looks like the prediction
    assert torch.equal(colour_ids(example.segments, example.prediction, 12)[1], prediction)
    figures = Comparison(["a", "b"], ["a", "b"], [result, result]).figures()
    assert list(figures) == ["pca-seg_toy"]  # no score distributions asked for
    axes = figures["pca-seg_toy"].axes
    assert len([ax for ax in axes if ax.images]) == 2 * 7  # two models: image, 2 × (segments, RGB), prediction, GT
    assert {ax.get_ylabel().split("\n")[0] for ax in axes if ax.get_ylabel()} == {"a", "b"}  # each row names its model


def test_match_segments_is_the_miou_matching_without_empty_pairs():
    ref = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 255, 255]])
    pred = torch.tensor([[7, 7, 3, 3], [7, 7, 3, 5], [9, 9, 9, 9]])  # 9 only in the ignored row
    assert match_segments(pred, ref) == {7: 0, 3: 1}
    assert match_segments(torch.tensor([[4, 4]]), torch.tensor([[2, 2]])) == {4: 2}
    assert match_segments(pred, torch.full_like(ref, 255)) == {}


def test_segment_tokens_needs_enough_tokens():
    with pytest.raises(ValueError, match="only 2 patch tokens"):
        segment_tokens(torch.randn(2, 8), (1, 2), (8, 16), (8, 16), k=2)


def test_layers_by_number_name_or_l1():
    names = ["input", "mssa1", "mssa2", "mssa3"]
    assert parse_layers("0, 2,L1") == [0, 2, "L1"] and parse_layers("input,mssa3") == ["input", "mssa3"]
    assert resolve_layers([0, 2, "L1"], names) == ["input", "mssa2", "Z_L1"]
    assert resolve_layers(None, names) == ["input", "Z_L1"] and resolve_layers(["mssa3", 3], names) == ["mssa3"]
    assert resolve_layers(None, ["input"]) == ["input", "Z_L1"]  # linear decoder: Z_L1 is Z_0 itself
    for bad in ([4], [-1], [], ["mssa9"]):
        with pytest.raises(ValueError):
            resolve_layers(bad, names)


def test_scores_over_batches_of_any_size_and_the_json_layout(tmp_path):
    model = tiny_model()
    batches = [Batch(torch.rand(2, 3, 32, 32), None, ["x", "y"]), Batch(torch.rand(1, 3, 40, 24), None, ["z"])]
    result = analyze_pca(trace_batches(model, batches, progress=False), examples=1)
    assert [e.path for e in result.examples] == ["x"] and result.images == ["x", "y", "z"]
    assert set(result.scores) == {"prediction"} and result.scored == {"prediction": [0, 1, 2]}
    ari = result.scores["prediction"]["Z_L1"]["ari"]
    assert ari.per_image.shape == (3,) and result.summary()["mean_scores"]["prediction"]["Z_L1"]["ari"] == ari.mean
    assert len(result.rows()) == 3 * 2  # no ground truth: two sources against the prediction
    Comparison(["sa"], ["sa.pt"], [result]).save(tmp_path)
    saved = json.loads((tmp_path / "pca-seg.json").read_text())["checkpoints"][0]
    assert saved["summary"]["prediction"]["Z_L1"]["ari"] == pytest.approx({"mean": ari.mean, "std": ari.std, "n": 3})
    assert [image["path"] for image in saved["images"]] == ["x", "y", "z"]
    assert (tmp_path / "pca-seg.png").is_file() and (tmp_path / "pca-seg_x.png").is_file()


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return invoke(app, "pca-seg", *args)


def test_cli_dataset_mode_compares_our_checkpoint_with_a_builtin(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", tiny_model())
    out = tmp_path / "out"
    result = run_cli(tmp_path / "sa.pt", "seg=builtin:segmenter", "--dataset", "synthetic", "--num-images", 3,
                     "--examples", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "ground truth" in result.stdout and "seg:" in result.stdout
    for name in ("pca-seg.png", "pca-seg.pdf", "pca-seg.json", "pca-seg.csv"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.glob("pca-seg_*.png"))) == 2
    entries = json.loads((out / "pca-seg.json").read_text())["checkpoints"]
    assert [e["label"] for e in entries] == ["sa", "seg"] and entries[1]["source"] == "builtin:segmenter"
    assert entries[0]["settings"]["layers"] == ["input", "Z_L1"] and len(entries[0]["images"]) == 3
    assert set(entries[0]["summary"]) == {"prediction", "ground_truth"}
    _, batches = image_batches(32, dataset="synthetic", num_images=1)  # each model at its own training size
    library = analyze_pca(trace_batches(load_model(tmp_path / "sa.pt")[0], batches, progress=False))
    assert entries[0]["images"][0]["scores"] == library.to_json()["images"][0]["scores"]  # JSON keeps floats exactly
    csv_lines = (out / "pca-seg.csv").read_text().splitlines()
    assert csv_lines[0].startswith("checkpoint,path,k,reference,source,ari,nmi,miou") and len(csv_lines) == 1 + 2 * 3 * 5


@pytest.mark.parametrize("family", ["depict_sa", "mask_transformer"])
def test_cli_image_mode_on_official_releases(tmp_path, family):
    write_release(tmp_path / "release", family)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 44, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 36)).astype(np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "gt").mkdir()
    for name, shape in (("rgba", (30, 44)), ("deep", (40, 36))):  # label maps matched to the images by file stem
        Image.fromarray(rng.integers(0, 5, shape, dtype=np.uint8)).save(tmp_path / "gt" / f"{name}.png")
    out = tmp_path / "out"
    result = run_cli(tmp_path / "release", "--images", tmp_path / "rgba.png", "--images", tmp_path / "deep.png",
                     "--labels", tmp_path / "gt",
                     "--method", "kmeans", "--k", 3, "--layers", "0,2,L1", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("pca-seg_rgba.png", "pca-seg_rgba.pdf", "pca-seg_deep.png", "pca-seg.json", "pca-seg.csv"):
        assert (out / name).stat().st_size > 0
    assert not (out / "pca-seg.png").exists()  # every image has its own figure
    entry = json.loads((out / "pca-seg.json").read_text())["checkpoints"][0]
    stage = "block2" if family == "mask_transformer" else "mssa2"
    assert [im["k"] for im in entry["images"]] == [3, 3] and entry["settings"]["layers"] == ["input", stage, "Z_L1"]
    assert set(entry["images"][1]["scores"]["ground_truth"]) == {"input", stage, "Z_L1", "prediction"}


def test_cli_saved_trace_gives_the_same_scores(tmp_path):
    out, saved = tmp_path / "out", tmp_path / "sa.trace"
    common = ["--num-images", "2", "--examples", "1"]
    assert run_cli("builtin:depict-sa", *common, "--save-trace", saved, "--out", out).exit_code == 0
    again = tmp_path / "again"
    result = run_cli("--trace", saved, "--examples", "1", "--out", again)
    assert result.exit_code == 0, result.output
    first, second = (json.loads((o / "pca-seg.json").read_text())["checkpoints"][0] for o in (out, again))
    assert first["images"] == second["images"] and second["label"] == "sa"
    assert (again / "pca-seg_0.png").is_file()  # the trace holds the pixels and labels for the figures


@pytest.mark.parametrize("problem", ["not an image", "bad checkpoint", "no label map", "bad method", "bad layer"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model())
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    args = {
        "not an image": [tmp_path / "sa.pt", "--images", tmp_path / "notes.png"],
        "bad checkpoint": [tmp_path / "notes.pt", "--images", tmp_path / "ok.png"],
        "no label map": [tmp_path / "sa.pt", "--images", tmp_path / "ok.png", "--labels", tmp_path / "notes.pt"],
        "bad method": [tmp_path / "sa.pt", "--images", tmp_path / "ok.png", "--method", "svd"],
        "bad layer": [tmp_path / "sa.pt", "--images", tmp_path / "ok.png", "--layers", "0,mssa9"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
