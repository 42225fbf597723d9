"""PCA segmentation runner and ``depict-analyze pca-seg`` (SPEC §3.2): numbers equal the pure functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import depict_analysis.pca_analysis as pa
from depict_analysis.cli.analyze import app
from depict_analysis.pca import choose_k, match_segments, pca_segment, segmentation_scores, upsample_labels
from depict_analysis.pca_analysis import (
    analyze_pca,
    colour_ids,
    parse_layers,
    pca_figure,
    pca_results,
    resolve_layers,
    segment_tokens,
    summarize,
)
from depict_analysis.inputs import Batch, image_batches
from depict_analysis.tracing import Trace, trace
from depict_analysis.models import create_model, load_model, save_checkpoint
from depict_analysis.models.data import make_palette
from tests.official_layout import write_release

PERFECT = {"ari": 1.0, "nmi": 1.0, "miou": 1.0}


def tiny_model(name: str = "depict-sa-tiny", n_cls: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, n_cls=n_cls).eval()


# ---------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny"])
def test_runner_equals_the_pure_functions_on_a_traced_batch(name):
    model = tiny_model(name)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 37, 45, generator=g)  # not a multiple of the patch: padded, then cropped
    labels = torch.randint(0, 4, (2, 37, 45), generator=g)
    labels[:, :3] = 255
    results = pca_results(model, pixels, labels, ["a.png", "b.png"], method="argmax")

    tr = trace(model, model.normalize(pixels))
    assert tr.num_layers == 3  # L1: the last MSSA layer, for CA the output of the MSSA stack
    padded = (tr.grid[0] * 8, tr.grid[1] * 8)
    for b, result in enumerate(results):
        prediction = tr.masks[b].argmax(0)
        k = choose_k(prediction)
        assert result.layers == [0, 3] and result.k == k and result.path == "ab"[b] + ".png"
        assert torch.equal(result.prediction, prediction)
        for i, j in enumerate([0, 3]):
            seg = upsample_labels(pca_segment(tr.tokens[j][b], k), tr.grid, padded)[:37, :45]
            assert torch.equal(result.segments[i], seg)
            assert result.scores["prediction"][f"Z_{j}"] == segmentation_scores(seg, prediction)
            assert result.scores["ground_truth"][f"Z_{j}"] == segmentation_scores(seg, labels[b])
        assert result.scores["ground_truth"]["prediction"] == segmentation_scores(prediction, labels[b])
        assert result.rgb.shape == (2, 3, 37, 45) and 0 <= result.rgb.min() and result.rgb.max() <= 1


def _separated_trace(prediction: torch.Tensor, noise: torch.Tensor) -> Trace:
    """A Trace on a 4x4 grid whose Z_1 tokens sit on one point per predicted class (plus tiny noise)."""
    token_class = prediction[::8, ::8].reshape(-1)  # (16,): the class of each 8x8 patch
    z_l = 10.0 * torch.eye(12)[token_class] + 1e-3 * noise
    masks = torch.nn.functional.one_hot(prediction, 12).permute(2, 0, 1).float()[None]
    return Trace(model={"decoder": "depict_sa"}, grid=(4, 4), layer_names=["mssa1"], tokens=[noise[None], z_l[None]],
                 class_stages=[], classes=[], embeddings=z_l[None], class_embeddings=torch.zeros(1, 3, 12), masks=masks,
                 subspaces=[])


@pytest.mark.parametrize("method, n_classes", [("argmax", 2), ("kmeans", 3)])
def test_separated_clusters_at_z_l1_score_perfectly(monkeypatch, method, n_classes):
    prediction = torch.zeros(32, 32, dtype=torch.long)
    prediction[:, 16:] = 1
    if n_classes == 3:
        prediction[:8, :8] = 2
    noise = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(pa, "trace", lambda model, images: _separated_trace(prediction, noise))
    ground_truth = prediction.clone()
    ground_truth[24:] = 255  # ignored rows do not count
    (result,) = pca_results(tiny_model(), torch.rand(1, 3, 32, 32), ground_truth[None], method=method)
    assert result.k == n_classes and result.layers == [0, 1]
    assert result.scores["prediction"]["Z_1"] == pytest.approx(PERFECT)
    assert result.scores["ground_truth"]["Z_1"] == pytest.approx(PERFECT)
    assert result.scores["prediction"]["Z_0"]["ari"] < 0.9
    # matched segments are drawn in their class's colour: a perfect segmentation looks like the prediction
    assert torch.equal(colour_ids(result.segments, result.prediction, 12)[1], prediction)
    fig = pca_figure(result, [f"c{i}" for i in range(12)], make_palette(12), method)
    assert len(fig.axes) == 2 * 5 and "ground truth" in [ax.get_title() for ax in fig.axes]


def test_match_segments_is_the_miou_matching_without_empty_pairs():
    ref = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 255, 255]])
    pred = torch.tensor([[7, 7, 3, 3], [7, 7, 3, 5], [9, 9, 9, 9]])  # 9 only in the ignored row
    assert match_segments(pred, ref) == {7: 0, 3: 1}
    assert match_segments(torch.tensor([[4, 4]]), torch.tensor([[2, 2]])) == {4: 2}
    assert match_segments(pred, torch.full_like(ref, 255)) == {}


def test_segment_tokens_needs_enough_tokens():
    with pytest.raises(ValueError, match="only 2 patch tokens"):
        segment_tokens(torch.randn(2, 2, 8), (1, 2), (8, 16), (8, 16), k=2)


def test_layers_and_summary():
    assert parse_layers("0, 2,L1") == [0, 2, "L1"] and resolve_layers([0, 2, "L1"], 3) == [0, 2, 3]
    assert resolve_layers(None, 0) == [0]  # linear decoder: only Z_0
    for bad in ([4], [-1], []):
        with pytest.raises(ValueError):
            resolve_layers(bad, 3)
    with pytest.raises(ValueError):
        parse_layers("0,last")
    rows = [{"reference": "prediction", "source": "Z_0", "ari": a, "nmi": 0.5, "miou": 1.0} for a in (0.2, 0.4)]
    stats = summarize(rows)["prediction"]["Z_0"]
    assert stats["ari"] == pytest.approx({"mean": 0.3, "std": 0.1, "n": 2}) and stats["nmi"]["std"] == 0


def test_analyze_pca_keeps_examples_and_rows():
    model = tiny_model()
    batches = [Batch(torch.rand(2, 3, 32, 32), None, ["x", "y"]), Batch(torch.rand(1, 3, 40, 24), None, ["z"])]
    result = analyze_pca(model, batches, examples=1, progress=False)
    assert [e.path for e in result["examples"]] == ["x"] and len(result["images"]) == 3
    assert len(result["rows"]) == 3 * 2  # no ground truth: two layers against the prediction
    assert result["summary"]["prediction"]["Z_3"]["ari"]["n"] == 3 and "ground_truth" not in result["summary"]


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return CliRunner().invoke(app, ["pca-seg", *map(str, args)])


def test_cli_dataset_mode_on_our_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", tiny_model())
    out = tmp_path / "out"
    result = run_cli("--ckpt", tmp_path / "sa.pt", "--dataset", "synthetic", "--num-images", 3, "--examples", 2,
                     "--size", 48, "--out", out)
    assert result.exit_code == 0, result.output
    assert "ground truth" in result.stdout
    for name in ("pca-seg.png", "pca-seg.pdf", "pca-seg.json", "pca-seg.csv"):
        assert (out / name).stat().st_size > 0
    assert len(list(out.glob("pca-seg_*.png"))) == 2
    written = json.loads((out / "pca-seg.json").read_text())
    assert written["settings"]["layers"] == [0, 3] and len(written["images"]) == 3
    assert set(written["summary"]) == {"prediction", "ground_truth"}
    first = written["images"][0]["scores"]
    _, batches = image_batches(48, dataset="synthetic", num_images=1)
    library = analyze_pca(load_model(tmp_path / "sa.pt")[0], batches, progress=False)
    assert first == library["images"][0]["scores"]  # JSON keeps floats exactly
    csv_lines = (out / "pca-seg.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,k,reference,source,ari,nmi,miou") and len(csv_lines) == 1 + 3 * 5


@pytest.mark.parametrize("family", ["depict_sa", "mask_transformer"])
def test_cli_image_mode_on_official_releases(tmp_path, family):
    write_release(tmp_path / "release", family)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 44, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (40, 36)).astype(np.uint16)).save(tmp_path / "deep.png")
    gts = []
    for name, shape in (("rgba", (30, 44)), ("deep", (40, 36))):
        Image.fromarray(rng.integers(0, 5, shape, dtype=np.uint8)).save(tmp_path / f"{name}_gt.png")
        gts += ["--gt", tmp_path / f"{name}_gt.png"]
    out = tmp_path / "out"
    result = run_cli(tmp_path / "rgba.png", tmp_path / "deep.png", *gts, "--ckpt", tmp_path / "release",
                     "--method", "kmeans", "--k", 3, "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("pca-seg_rgba.png", "pca-seg_rgba.pdf", "pca-seg_deep.png", "pca-seg.json", "pca-seg.csv"):
        assert (out / name).stat().st_size > 0
    assert not (out / "pca-seg.png").exists()  # the score plot is for dataset mode
    written = json.loads((out / "pca-seg.json").read_text())
    L = 2 if family == "mask_transformer" else 3
    assert [im["k"] for im in written["images"]] == [3, 3] and written["settings"]["layers"] == [0, L]
    assert set(written["images"][1]["scores"]["ground_truth"]) == {"Z_0", f"Z_{L}", "prediction"}


@pytest.mark.parametrize("problem", ["not an image", "bad checkpoint", "gt count", "bad method"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model())
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ok.png")
    args = {
        "not an image": [tmp_path / "notes.png", "--ckpt", tmp_path / "sa.pt"],
        "bad checkpoint": [tmp_path / "ok.png", "--ckpt", tmp_path / "notes.png"],
        "gt count": [tmp_path / "ok.png", "--gt", tmp_path / "ok.png", "--gt", tmp_path / "ok.png", "--ckpt", tmp_path / "sa.pt"],
        "bad method": [tmp_path / "ok.png", "--method", "svd", "--ckpt", tmp_path / "sa.pt"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
