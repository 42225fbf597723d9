"""Attention maps over the image (``depict_analysis.attention``, ``depict-analyze attention``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import pyplot as plt
from typer.testing import CliRunner

from depict_analysis.attention import (
    analyze_attention,
    own_class_share,
    read_attention,
    reading_of,
    representative_cell,
)
from depict_analysis.cli.analyze import app
from depict_analysis.inputs import Batch
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.tracing import Trace, trace
from depict_analysis.uncertainty import Bootstrap
from tests.conftest import tiny_model as seeded

K = 4


def tiny_model(name: str):
    return seeded(name, K)


def batch(n: int = 3, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, K, (n, size // 8, size // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    return Batch(torch.rand(n, 3, size, size, generator=g), labels, [f"im{i}.png" for i in range(n)])


@pytest.mark.parametrize("name, readings", [
    ("depict-sa-tiny", ["joint"] * 3),
    ("depict-ca-tiny", ["patch"] * 3 + ["cross"] * 3),
    ("segmenter-tiny", ["joint"] * 2),
    ("cbt-tiny", ["contract"] * 3),
    ("tost-tiny", ["membership"] * 3),
])
def test_every_family_has_a_reading(name, readings):
    model = tiny_model(name)
    tr = trace(model, batch(), attention=True)
    assert [reading_of(a.shape, tr.grid[0] * tr.grid[1], K) for a in tr.attention.values()][: len(readings)] == readings
    result = analyze_attention([tr], examples=1, bootstrap=Bootstrap(resamples=20))
    assert list(result.readings.values()) == readings
    has_classes = any(r in ("joint", "cross") for r in readings)
    assert bool(result.class_layers) == has_classes
    figures = result.figures()
    assert len(figures) == has_classes + len(readings)  # the shares figure, and one per layer for the example
    plt.close("all")


def test_queries_are_the_rows_the_layer_computes():
    model = tiny_model("depict-ca-tiny")
    images = batch()
    tr = trace(model, images, attention=True)
    gh, gw = tr.grid
    N = gh * gw
    pixel = (13, 22)
    row, col = 13 // model.patch_size, 22 // model.patch_size
    result = analyze_attention([tr], pixel=pixel, examples=2, bootstrap=Bootstrap(resamples=20))
    mssa, msca = tr.attention["mssa2"], tr.attention["msca1"]
    for b, example in enumerate(result.examples):
        np.testing.assert_array_equal(example.point["mssa2"], mssa[b, :, row * gw + col].reshape(-1, gh, gw).numpy())
        np.testing.assert_array_equal(example.classes["msca1"], msca[b].reshape(-1, K, gh, gw).numpy())
    # a joint map's class rows are the class tokens' rows, over the patch columns
    sa = trace(tiny_model("depict-sa-tiny"), images, attention=True)
    joint = sa.attention["mssa1"]
    read = read_attention(joint, sa.grid, K, None)
    torch.testing.assert_close(read.classes, joint[:, :, N:, :N])
    assert read.point is None and (read.classes.sum(-1) < 1).all()  # some of it goes to the class tokens


def test_own_class_share_against_a_literal_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, K, 10, generator=g, dtype=torch.float64)
    patch_class = torch.tensor([[0, 0, 1, 1, 1, -1, 3, 3, 0, 1], [2] * 10])
    share = own_class_share(maps, patch_class)
    for b in range(2):
        present = [c for c in range(K) if (patch_class[b] == c).any()]
        for h in range(3):
            expected = np.mean([float(maps[b, h, c][patch_class[b] == c].sum() / maps[b, h, c].sum()) for c in present])
            assert share[b, h].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("side, cells", [(8, 3), (7, 3), (16, 10), (5, 5)])
def test_representative_cell_holds_the_patch_in_its_pooling_window(side, cells):
    # adaptive_avg_pool2d's window of cell i along a side of g: [⌊i·g/r⌋, ⌈(i+1)·g/r⌉)
    index = torch.arange(side * side, dtype=torch.float64).view(1, 1, side, side)
    for row in range(side):
        for col in range(side):
            cell = representative_cell(row, col, (side, side), cells * cells)
            i, j = divmod(cell, cells)
            top, bottom = math.floor(i * side / cells), math.ceil((i + 1) * side / cells)
            left, right = math.floor(j * side / cells), math.ceil((j + 1) * side / cells)
            assert top <= row < bottom and left <= col < right
    assert F.adaptive_avg_pool2d(index, cells).shape[-1] == cells


def test_the_cli_for_two_models_and_a_saved_trace(tmp_path):
    save_checkpoint(tmp_path / "ca.pt", create_model("depict-ca-tiny", n_cls=8))  # the synthetic dataset's classes
    save_checkpoint(tmp_path / "seg.pt", create_model("segmenter-tiny", n_cls=8))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["attention", str(tmp_path / "ca.pt"), "--num-images", "3", "--size", "32",
                                      "--layers", "mssa3,msca1", "--heads", "1", "--classes", "background,disc",
                                      "--examples", "1", "--resamples", "50", "--save-trace", str(tmp_path / "t.pt"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("attention.png", "attention_mssa3_0.pdf", "attention_msca1_0.png", "attention.json", "attention.npz"):
        assert (out / name).stat().st_size > 0, name
    written = json.loads((out / "attention.json").read_text())["checkpoints"][0]
    assert written["examples"][0]["shown"] == ["background", "disc"] and written["heads"] == {"mssa3": [1], "msca1": [1]}
    maps = np.load(out / "attention.npz")
    assert maps["ca/msca1/classes"].shape == (1, 1, 8, 4, 4) and maps["ca/mssa3/point"].shape == (1, 1, 4, 4)
    again = analyze_attention(Trace.load(tmp_path / "t.pt"), layers=["msca1"], heads=[1])
    assert again.own_share["msca1"].tolist() == written["own_share"]["msca1"]
    both = CliRunner().invoke(app, ["attention", str(tmp_path / "ca.pt"), f"segmenter={tmp_path / 'seg.pt'}", "--num-images",
                                    "2", "--size", "32", "--examples", "1", "--resamples", "20", "--out", str(tmp_path / "both")])
    assert both.exit_code == 0, both.output
    assert (tmp_path / "both" / "attention_segmenter_block2_0.png").exists() and (tmp_path / "both" / "attention_ca_msca3_0.png").exists()
    bad = CliRunner().invoke(app, ["attention", str(tmp_path / "ca.pt"), "--layers", "msca9", "--out", str(out)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: no attention map for layer msca9")
