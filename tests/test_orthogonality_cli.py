"""Orthogonality runner and ``depict-analyze orthogonality`` (SPEC §3.3): numbers equal the pure functions,
and the at-initialisation baseline is a fresh decoder of the same config, reproducible from its seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from depict_analysis import Comparison, Orthogonality, analyze_orthogonality
from depict_analysis.cli.analyze import app
from depict_analysis.inputs import Batch
from depict_analysis.models import create_model, load_model, save_checkpoint
from depict_analysis.models.decoders.base import build_decoder
from depict_analysis.orthogonality import class_summary, query_projection, random_cosine_level, subspace_summary
from depict_analysis.orthogonality_analysis import P_STATISTICS, Q_STATISTICS
from depict_analysis.tracing import Trace, trace
from tests.official_layout import write_release


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, n_cls=4).eval()


def traces(model, pixels: torch.Tensor, size: int = 2) -> list[Trace]:
    return [trace(model, Batch(pixels[i : i + size], None, [f"im{j}" for j in range(i, min(i + size, len(pixels)))]))
            for i in range(0, len(pixels), size)]


@pytest.mark.parametrize("name", ["depict-ca-tiny", "segmenter-tiny"])
def test_runner_equals_the_pure_functions_on_traced_batches(name):
    model = tiny_model(name)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = analyze_orthogonality(traces(model, pixels), baseline_seeds=())
    (tr,) = traces(model, pixels, size=len(pixels))
    assert isinstance(result, Orthogonality) and result.images == [f"im{j}" for j in range(5)]
    panels = {p.name: p for p in result.panels}
    assert list(panels) == [s.name for s in tr.subspaces] + ["final_Q", "cls_emb"]
    for space in tr.subspaces:
        summary = subspace_summary(space.proj)
        np.testing.assert_array_equal(panels[space.name].gram, summary["gram"].numpy())
        np.testing.assert_array_equal(panels[space.name].cosines, summary["cosines"].numpy())
        for key in P_STATISTICS[:3]:
            assert panels[space.name].values[key] == pytest.approx(summary[key], nan_ok=True), key
    final = class_summary(tr.class_embeddings)  # batched vs one batch: rounding only
    for key in Q_STATISTICS:
        np.testing.assert_allclose(panels["final_Q"].per_image[key].per_image, final[key].numpy(), rtol=1e-6)
        assert panels["final_Q"].values[key] == pytest.approx(float(final[key].mean()), rel=1e-6)
    np.testing.assert_allclose(panels["final_Q"].cosines, final["abs_gram"].numpy(), rtol=1e-6)
    learned = class_summary(model.decoder.cls_emb[0].detach())
    assert panels["cls_emb"].values["mean_abs_offdiag"] == pytest.approx(learned["mean_abs_offdiag"].item())
    assert result.summary()["baseline_seeds"] == [] and result.summary()["final_Q_mean_abs_offdiag_at_init"] is None
    if name == "segmenter-tiny":  # P is each block's query projection W_Q
        block = model.decoder.blocks[1].attn
        expected = query_projection(block.qkv.weight.detach(), block.num_heads)
        np.testing.assert_array_equal(panels["block2.W_Q"].gram, subspace_summary(expected)["gram"].numpy())


def test_baseline_is_a_fresh_decoder_of_the_same_config_reproducible_from_its_seed():
    model = tiny_model("depict-sa-tiny")
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    state = torch.random.get_rng_state()
    result = analyze_orthogonality(traces(model, pixels), baseline_seeds=(3, 7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    again = analyze_orthogonality(traces(model, pixels), baseline_seeds=(3, 7))
    (tr,) = traces(model, pixels, size=len(pixels))
    for seed_index, seed in enumerate((3, 7)):
        torch.manual_seed(seed)  # what the baseline says it is: the decoder built right after this seed
        fresh = build_decoder(model.config.decoder, model.encoder.dim, model.n_cls).eval()
        for space in fresh.subspaces():
            expected = subspace_summary(space.proj.detach())
            panel = result.panel(space.name)
            for key in ("cross_head_mean_abs_cos", "coherence", "cross_head_mean_abs"):
                assert panel.baseline[key].per_image[seed_index] == pytest.approx(expected[key], rel=1e-12)
        with torch.no_grad():
            q_hat = fresh.forward_intermediates(tr.tokens[0], tr.grid).class_embeddings
        expected = class_summary(q_hat)["mean_abs_offdiag"].mean().item()
        assert result.panel("final_Q").baseline["mean_abs_offdiag"].per_image[seed_index] == pytest.approx(expected, rel=1e-6)
        expected = class_summary(fresh.cls_emb[0].detach())["coherence"].item()
        assert result.panel("cls_emb").baseline["coherence"].per_image[seed_index] == pytest.approx(expected, rel=1e-12)
    for a, b in zip(result.panels, again.panels):
        assert {k: s.per_image.tolist() for k, s in a.baseline.items()} == {k: s.per_image.tolist() for k, s in b.baseline.items()}
    summary = result.summary()
    assert summary["P_coherence_at_init"] == pytest.approx(np.mean([p.baseline["coherence"].mean for p in result.panels[:3]]))
    assert summary["random_level"] == random_cosine_level(48)  # d = 48


def test_baseline_needs_the_models_config():
    tr = trace(tiny_model("depict-sa-tiny"), torch.rand(1, 3, 32, 32))
    tr.config = None  # a trace of a model built without a ModelConfig
    with pytest.raises(ValueError, match="config"):
        analyze_orthogonality(tr)
    assert analyze_orthogonality(tr, config=tiny_model("depict-sa-tiny").config).panel("mssa1").baseline


def test_saved_layout_and_matrices(tmp_path):
    model = tiny_model("depict-sa-tiny")
    result = analyze_orthogonality(traces(model, torch.rand(2, 3, 32, 32)), baseline_seeds=(0,))
    linear = analyze_orthogonality(trace(tiny_model("linear-tiny"), torch.rand(2, 3, 32, 32)), baseline_seeds=(0,))
    assert [p.name for p in linear.panels] == ["final_Q"]
    paths = Comparison(["sa", "linear"], ["sa.pt", "linear.pt"], [result, linear]).save(tmp_path)
    assert sorted(p.name for p in paths) == sorted(["orthogonality.png", "orthogonality.pdf", "orthogonality_P.png",
                                                    "orthogonality_P.pdf", "orthogonality.json", "orthogonality.csv",
                                                    "orthogonality.npz", "orthogonality.result.npz"])
    proj = model.decoder.layers[0].subspaces().detach().double()  # (h, p, d)
    entry = json.loads((tmp_path / "orthogonality.json").read_text())["checkpoints"][0]
    panel = entry["panels"][0]
    assert (panel["heads"], panel["dim_head"], panel["size"]) == (2, 16, 32)
    matrices = np.load(tmp_path / "orthogonality.npz")
    for block in panel["head_rows"]:
        start, stop = block["rows"]
        head = proj[block["head"]]
        np.testing.assert_allclose(matrices["sa/mssa1"][start:stop, start:stop], (head @ head.T).numpy(), atol=1e-12)
    assert set(matrices) >= {"sa/final_Q", "sa/final_Q/cosines", "sa/cls_emb", "linear/final_Q"}
    assert set(panel["at_init"]["coherence"]) == {"mean", "std", "per_seed"}
    rows = (tmp_path / "orthogonality.csv").read_text().splitlines()
    assert rows[0] == "checkpoint,family,name,kind,layer,statistic,value,at_init_mean,at_init_std,random_level"
    assert sum(r.startswith("sa,depict_sa,mssa2,P,2,") for r in rows) == len(P_STATISTICS)


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args):
    return CliRunner().invoke(app, ["orthogonality", *map(str, args)])


def test_cli_side_by_side_on_ours_and_official_releases(tmp_path):
    save_checkpoint(tmp_path / "ours.pt", tiny_model("depict-sa-tiny"))
    write_release(tmp_path / "official-sa", "depict_sa")
    write_release(tmp_path / "official-seg", "mask_transformer")
    out = tmp_path / "out"
    args = [tmp_path / "ours.pt", f"dsa={tmp_path / 'official-sa'}", tmp_path / "official-seg" / "checkpoint.pth"]
    result = run_cli(*args, "--num-images", 4, "--baseline-seeds", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "coherence" in result.stdout and "dsa" in result.stdout
    for name in ("orthogonality.png", "orthogonality_P.png", "orthogonality.json", "orthogonality.csv", "orthogonality.npz"):
        assert (out / name).stat().st_size > 0
    written = json.loads((out / "orthogonality.json").read_text())
    entries = written["checkpoints"]
    assert [c["label"] for c in entries] == ["ours", "dsa", "official-seg"]
    assert [c["model"]["decoder"] for c in entries] == ["depict_sa", "depict_sa", "mask_transformer"]
    model = load_model(tmp_path / "official-seg")[0]
    library = analyze_orthogonality(traces(model, torch.rand(1, 3, 32, 32)), baseline_seeds=(0, 1))
    panel = entries[2]["panels"][0]
    assert panel["name"] == "block1.W_Q" and panel["values"]["coherence"] == pytest.approx(library.panels[0].values["coherence"])
    assert panel["at_init"]["coherence"]["per_seed"] == pytest.approx(library.panels[0].baseline["coherence"].per_image)
    final = next(p for p in entries[0]["panels"] if p["name"] == "final_Q")
    assert len(final["per_image"]["mean_abs_offdiag"]["per_image"]) == 4


def test_cli_reads_a_saved_trace(tmp_path):
    saved, out = tmp_path / "sa.trace", tmp_path / "out"
    assert run_cli("builtin:depict-sa", "--num-images", 2, "--save-trace", saved, "--out", out).exit_code == 0
    result = run_cli("--trace", f"again={saved}", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    first, second = (json.loads((o / "orthogonality.json").read_text())["checkpoints"][0]
                     for o in (out, tmp_path / "again"))
    assert second["label"] == "again" and first["panels"] == second["panels"]  # baseline rebuilt from the trace's config


@pytest.mark.parametrize("problem", ["unknown built-in", "bad checkpoint", "not an image", "trace and checkpoint"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    (tmp_path / "notes.png").write_text("not an image")
    args = {
        "unknown built-in": ["builtin:nope"],
        "bad checkpoint": [tmp_path / "notes.png"],
        "not an image": [tmp_path / "sa.pt", "--images", tmp_path / "notes.png"],
        "trace and checkpoint": [tmp_path / "sa.pt", "--trace", tmp_path / "sa.pt"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
