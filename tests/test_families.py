"""The contract every registered decoder family keeps (``models/decoders/base.py``), checked family by family.

Each family builds its registry sizes, round-trips through our checkpoint format, traces (the trace
is the forward pass), and runs every analysis and every robustness transform it declares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from depict_analysis.cli.analyze import app
from depict_analysis.coding_rate_analysis import analyze_coding_rates
from depict_analysis.inputs import Batch
from depict_analysis.models import load_model, save_checkpoint, variant_config
from depict_analysis.models.decoders.base import ROLES, build_decoder, families
from depict_analysis.foundation.errors import ConfigError
from depict_analysis.models.registry import BACKBONES
from depict_analysis.orthogonality_analysis import analyze_orthogonality
from depict_analysis.pca_analysis import analyze_pca
from depict_analysis.perturbations import STRUCTURED, resolve_perturbation
from depict_analysis.robustness import robustness_records
from depict_analysis.tracing import trace
from tests.conftest import invoke, tiny_model as seeded

FAMILIES = families()
IDS = [family.name for family in FAMILIES]
K = 8  # the synthetic dataset's classes


def tiny(family, seed: int = 0):
    return seeded(f"{family.variant}-tiny", K, seed, norm_noise=0.1)


def labelled_batches(n: int = 2, size: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(n, 3, size, size, generator=g)
    labels = torch.randint(0, K, (n, size, size), generator=g)
    return [Batch(pixels, labels, [f"image{i}" for i in range(n)])]


def test_the_registry_holds_the_seven_families():
    assert sorted(IDS) == ["cbt", "depict_ca", "depict_sa", "linear", "mask_transformer", "maskformer", "tost"]
    assert {f.name: f.official is not None for f in FAMILIES} == {
        "cbt": True, "depict_sa": True, "depict_ca": True, "linear": True, "mask_transformer": True, "maskformer": False,
        "tost": False}


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_builds_its_variants(family):
    model = tiny(family)
    assert model.config.decoder == family.size("tiny") and model.config.decoder.name == family.name
    assert model.decoder.family == family.name and model.decoder.role in ROLES
    for backbone, bb in BACKBONES.items():
        config = variant_config(f"{family.variant}-{backbone}").decoder
        assert config == family.size(backbone)
        assert sum(p.numel() for p in build_decoder(config, bb.d_model, 150).parameters()) > 0


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_round_trips_through_our_checkpoint_format(family, tmp_path):
    model = tiny(family)
    save_checkpoint(tmp_path / "m.pt", model)
    stored = torch.load(tmp_path / "m.pt", weights_only=True)["config"]["decoder"]
    assert stored["family"] == family.name  # tagged by family
    loaded, _ = load_model(tmp_path / "m.pt")
    assert loaded.config == model.config
    images = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_traces_its_forward_pass(family):
    model = tiny(family)
    images = torch.randn(2, 3, 37, 30)
    with torch.no_grad():
        expected = model(images)
    t = trace(model, images, attention=True)
    for b in range(2):  # the masks on the grid, upsampled one image at a time, are the model's logits
        torch.testing.assert_close(t.logits(b), expected[b], atol=0, rtol=0)
    assert t.masks.shape == (2, K, 5, 4) and t.image_size == (37, 30) and t.full_masks is None
    torch.testing.assert_close(trace(model, images, full_masks=True).full_masks, expected, atol=0, rtol=0)
    assert t.family == family.name and t.grid == (5, 4)
    assert len(t.tokens) == len(t.layer_names) + 1 and all(z.shape[:2] == (2, 20) for z in t.tokens)
    side = getattr(model.decoder, "n_queries", K)  # the class side: K classes, or a query decoder's queries
    assert len(t.classes) == len(t.class_stages) and all(q.shape[:2] == (2, side) for q in t.classes)
    torch.testing.assert_close(t.class_embeddings.norm(dim=-1), torch.ones(2, side))
    assert not any(x.requires_grad for x in [*t.tokens, *t.classes, t.class_embeddings, *t.attention.values()])
    assert set(t.attention) <= set(t.layer_names) | set(t.class_stages)
    assert bool(t.attention) == bool(t.layer_names or t.class_stages[1:])  # every family with layers maps its attention
    assert len(t.representatives) in (0, t.num_layers)
    parameters = dict(model.decoder.named_parameters())
    for space in t.subspaces:
        h, p, d = space.proj.shape
        if space.parameter is not None:  # the subspace is that parameter's rows, head by head
            torch.testing.assert_close(space.proj.reshape(h * p, d), parameters[space.parameter], atol=0, rtol=0)
    plain = trace(model, images)  # asking for attention changes nothing else
    for a, b in zip(plain.tokens + plain.classes, t.tokens + t.classes):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert plain.attention == {} and model.decoder.has_subspaces == bool(t.subspaces)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_family_runs_every_analysis_and_the_transforms_it_declares(family):
    model = tiny(family)
    batches = labelled_batches()
    traces = [trace(model, batch) for batch in batches]
    rates = analyze_coding_rates(traces, view="layer")
    assert rates.token_names == traces[0].token_names
    assert [s.name for s in rates.subspaces] == [s.name for s in model.decoder.subspaces()]
    analyze_pca(traces, examples=0)
    panels = [p.name for p in analyze_orthogonality(traces, baseline_seeds=(0,)).panels]
    assert ("cls_emb" in panels) == (model.decoder.class_tokens is not None)
    noise = resolve_perturbation("gaussian", "decoder")
    assert len(list(robustness_records(model, "m", batches, noise, (0, 0.1), draws=1))) == 2
    transformable = [s for s in model.decoder.subspaces() if s.parameter is not None]
    for transform in STRUCTURED:
        perturbation = resolve_perturbation(transform)
        if transformable:
            records = list(robustness_records(model, "m", batches, perturbation, (0, 1), draws=1))
            assert [r.sigma for r in records] == [0, 1]
        else:
            with pytest.raises(ConfigError, match=family.name):
                list(robustness_records(model, "m", batches, perturbation, (0, 1), draws=1))


def test_no_analysis_module_names_a_family():
    """Capabilities are properties of the decoder: the analyses never compare family names."""
    sources = (Path(__file__).parents[1] / "depict_analysis").glob("*.py")
    pattern = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in IDS))
    offending = {path.name: pattern.findall(path.read_text()) for path in sources}
    assert not {name: hits for name, hits in offending.items() if hits}


# -------------------------------------------------------------------------------- the new families' CLI


def run_cli(*args):
    return invoke(app, *args)


def test_analysis_commands_on_cbt_and_tost_checkpoints(tmp_path):
    by_name = {f.name: f for f in FAMILIES}
    for name in ("cbt", "tost"):
        save_checkpoint(tmp_path / f"{name}.pt", tiny(by_name[name]))
    ckpts = [tmp_path / "cbt.pt", tmp_path / "tost.pt"]
    common = ["--num-images", 2]

    result = run_cli("coding-rate", ckpts[0], *common, "--out", tmp_path / "rate")
    assert result.exit_code == 0, result.output
    (rates,) = json.loads((tmp_path / "rate" / "coding_rate.json").read_text())["checkpoints"]
    assert [s["name"] for s in rates["subspaces"]] == ["cbsa1", "cbsa2", "cbsa3"]
    assert rates["class_rate"]["stages"] == ["input", "cbsa1", "cbsa2", "cbsa3", "final"]

    result = run_cli("orthogonality", *ckpts, *common, "--out", tmp_path / "orth")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "orth" / "orthogonality.json").read_text())
    assert [c["model"]["decoder"] for c in written["checkpoints"]] == ["cbt", "tost"]
    assert [p["name"] for p in written["checkpoints"][1]["panels"]] == ["tssa1", "tssa2", "tssa3", "final_Q", "cls_emb"]

    for noise, sigmas in (("gaussian", ["--sigmas", "0.1"]), ("head-rotation", [])):  # rotations: clean, rotated
        out = tmp_path / noise
        result = run_cli("robustness", *ckpts, *common, "--noise", noise, "--draws", 1, *sigmas, "--out", out)
        assert result.exit_code == 0, result.output
        records = json.loads((out / "robustness.json").read_text())["records"]
        assert [(r["checkpoint"], r["sigma"]) for r in records] == [(c, s) for c in ("cbt", "tost") for s in (0, float(sigmas[-1]) if sigmas else 1)]
