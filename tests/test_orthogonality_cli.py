"""Orthogonality runner and ``depict-analyze orthogonality`` (SPEC §3.3): numbers equal the pure functions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from depict_analysis.cli.analyze import app
from depict_analysis.inputs import Batch
from depict_analysis.orthogonality import class_summary, query_projection, subspace_summary
from depict_analysis.orthogonality_analysis import analyze_orthogonality, orthogonality_figure, summary_rows
from depict_analysis.tracing import trace
from depict_analysis.models import create_model, load_model, save_checkpoint
from tests.official_layout import write_release


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, n_cls=4).eval()


def batches(pixels: torch.Tensor, size: int = 2) -> list[Batch]:
    return [Batch(pixels[i : i + size], None, [f"im{j}" for j in range(i, i + size)]) for i in range(0, len(pixels), size)]


def assert_same_summary(panel, summary: dict) -> None:
    torch.testing.assert_close(panel.gram, summary.pop("gram"), rtol=0, atol=0)
    for key, value in summary.items():
        assert panel.stats[key] == pytest.approx(value, nan_ok=True), key


@pytest.mark.parametrize("name", ["depict-ca-tiny", "segmenter-tiny"])
def test_runner_equals_the_pure_functions_on_a_traced_batch(name):
    model = tiny_model(name)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = analyze_orthogonality(model, batches(pixels), progress=False)
    tr = trace(model, model.normalize(pixels))
    panels = {p.name: p for p in result["panels"]}
    assert list(panels) == [s.name for s in tr.subspaces] + ["final_Q", "cls_emb"]
    for space in tr.subspaces:
        assert_same_summary(panels[space.name], subspace_summary(space.proj))
    final = class_summary(tr.class_embeddings)
    assert panels["final_Q"].images == 5 == result["num_images"]
    torch.testing.assert_close(panels["final_Q"].gram, final.pop("gram"))  # batched vs whole: rounding only
    assert panels["final_Q"].stats == pytest.approx(final)
    assert_same_summary(panels["cls_emb"], class_summary(model.decoder.cls_emb[0].detach()))
    if name == "segmenter-tiny":  # P is each block's query projection W_Q
        block = model.decoder.blocks[1].attn
        expected = query_projection(block.qkv.weight.detach(), block.num_heads)
        assert_same_summary(panels["block2.W_Q"], subspace_summary(expected))


def test_head_block_layout_matches_proj_rows():
    model = tiny_model("depict-sa-tiny")
    result = analyze_orthogonality(model, batches(torch.rand(2, 3, 32, 32)), progress=False)
    proj = model.decoder.layers[0].subspaces().detach().double()  # (h, p, d)
    panel = result["panels"][0]
    layout = panel.summary()
    assert (layout["heads"], layout["dim_head"], layout["size"]) == (2, 16, 32)
    for block in layout["head_rows"]:
        start, stop = block["rows"]
        torch.testing.assert_close(panel.gram[start:stop, start:stop], proj[block["head"]] @ proj[block["head"]].T)
    rows = summary_rows("sa", result)
    assert [r["name"] for r in rows] == ["mssa1", "mssa2", "mssa3", "final_Q", "cls_emb"]
    assert rows[0]["head_orthonormality"].count(";") == 1 and rows[0]["checkpoint"] == "sa"


def test_linear_has_only_its_classifier_rows_and_the_figure_shares_a_scale_per_row():
    pixels = torch.rand(2, 3, 32, 32)
    sa = analyze_orthogonality(tiny_model("depict-sa-tiny"), batches(pixels), progress=False)
    linear = analyze_orthogonality(tiny_model("linear-tiny"), batches(pixels), progress=False)
    assert [p.name for p in linear["panels"]] == ["final_Q"]
    fig = orthogonality_figure(["sa", "linear"], [sa, linear])
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == 3 + 2 + 1  # 3 P layers and 2 Q panels of SA, 1 Q panel of linear
    q_row = [ax.images[0].get_clim() for ax in heatmaps if "final" in ax.get_title()]
    assert len(q_row) == 2 and q_row[0] == q_row[1] and q_row[0][0] == -q_row[0][1]


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return CliRunner().invoke(app, ["orthogonality", *map(str, args)])


def test_cli_side_by_side_on_ours_and_official_releases(tmp_path):
    save_checkpoint(tmp_path / "ours.pt", tiny_model("depict-sa-tiny"))
    write_release(tmp_path / "official-sa", "depict_sa")
    write_release(tmp_path / "official-seg", "mask_transformer")
    out = tmp_path / "out"
    args = [tmp_path / "ours.pt", tmp_path / "official-sa", tmp_path / "official-seg" / "checkpoint.pth"]
    result = run_cli(*args, "--num-images", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert "block1.W_Q" in result.stdout and "coherence" in result.stdout
    for name in ("orthogonality.png", "orthogonality.pdf", "orthogonality.json", "orthogonality.csv", "orthogonality_grams.npz"):
        assert (out / name).stat().st_size > 0
    written = json.loads((out / "orthogonality.json").read_text())
    assert [c["label"] for c in written["checkpoints"]] == ["ours", "official-sa", "official-seg"]
    assert [c["model"]["decoder"] for c in written["checkpoints"]] == ["depict_sa", "depict_sa", "mask_transformer"]
    grams = np.load(out / "orthogonality_grams.npz")
    for label, path in zip(["official-sa", "official-seg"], args[1:]):
        model = load_model(path)[0]
        entry = next(c for c in written["checkpoints"] if c["label"] == label)
        panel = entry["panels"][0]
        proj = model.decoder.layers[0].subspaces() if label == "official-sa" else query_projection(
            model.decoder.blocks[0].attn.qkv.weight, model.decoder.blocks[0].attn.num_heads)
        proj = proj.detach().double().numpy()
        assert (panel["heads"], panel["dim_head"]) == proj.shape[:2]
        gram = grams[f"{label}/{panel['name']}"]
        for block in panel["head_rows"]:
            start, stop = block["rows"]
            np.testing.assert_allclose(gram[start:stop, start:stop], proj[block["head"]] @ proj[block["head"]].T, atol=1e-10)
        assert panel["coherence"] == pytest.approx(subspace_summary(torch.from_numpy(proj))["coherence"])
    assert written["checkpoints"][0]["panels"][-2]["images"] == 4
    assert (out / "orthogonality.csv").read_text().splitlines()[0].startswith("checkpoint,family,name,kind")


@pytest.mark.parametrize("problem", ["unknown built-in", "bad checkpoint", "not an image"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    (tmp_path / "notes.png").write_text("not an image")
    args = {
        "unknown built-in": ["builtin:nope"],
        "bad checkpoint": [tmp_path / "notes.png"],
        "not an image": [tmp_path / "sa.pt", "--images", tmp_path / "notes.png"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
