"""The coding-rate analysis (traces in, ``CodingRates`` out, JSON / CSV, figures) and ``depict-analyze coding-rate``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from depict_analysis import CodingRates, Comparison, analyze_coding_rates
from depict_analysis.cli.analyze import app
from depict_analysis.models.sources import is_checkpoint, labelled_sources
from depict_analysis.coding_rate import class_rate, rate_table, token_rate
from depict_analysis.inputs import Batch, image_batches
from depict_analysis.tracing import Trace, trace, trace_batches
from depict_analysis.models import create_model, load_model, save_checkpoint
from tests.official_layout import write_release

FILES = [f"coding_rate{name}" for name in (".png", ".pdf", "_tokens.png", "_tokens.pdf", ".json", ".csv")]
BY_SUBSPACE = ["subspace_rate", "raw_ratio", "span_rate", "share", "crate_rate"]
FAMILIES = ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny", "cbt-tiny", "tost-tiny"]


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name, n_cls=4).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so that the layer view differs from the residual one
        for n, p in model.decoder.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return model


def traces_of(model, pixels: torch.Tensor, sizes: list[int]) -> list[Trace]:
    """Traces of batches of the given (unequal) sizes over ``pixels`` (n, 3, S, S)."""
    starts = np.cumsum([0, *sizes])
    return [trace(model, Batch(pixels[a:b], None, [f"image{i}" for i in range(a, b)])) for a, b in zip(starts, starts[1:])]


def assert_stat(stat, per_image, rtol: float = 1e-9) -> None:
    np.testing.assert_allclose(stat.per_image, per_image, rtol=rtol)
    np.testing.assert_allclose(stat.mean, np.asarray(per_image).mean(axis=0), rtol=rtol)
    np.testing.assert_allclose(stat.std, np.asarray(per_image).std(axis=0), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name, normalize, orthonormalize, view, owners", [
    ("depict-sa-tiny", "l2", False, "residual", [1, 2, 3]),
    ("depict-ca-tiny", "crate", True, "layer", [1, 2, 3, None, None, None]),
])
def test_traces_of_unequal_batches_give_the_rates_of_one_trace_of_all_images(name, normalize, orthonormalize, view, owners):
    model = tiny_model(name)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = analyze_coding_rates(traces_of(model, pixels, [2, 3]), eps=0.2, normalize=normalize,
                                  orthonormalize=orthonormalize, view=view, per_head=True)
    whole = trace(model, Batch(pixels, None, [f"image{i}" for i in range(5)]))
    views = {s.name: s.layer_input for s in whole.subspaces} if view == "layer" else None
    table = rate_table(dict(zip(whole.token_names, whole.tokens)), {s.name: s.proj for s in whole.subspaces},
                       0.2, normalize, orthonormalize, views)
    assert isinstance(result, CodingRates) and result.token_names == ["input", "mssa1", "mssa2", "mssa3"]
    assert_stat(result.token_rate, table.token_rate.numpy())
    for space in result.subspaces:
        for key in BY_SUBSPACE + ["head_rate"]:
            assert_stat(getattr(result, key)[space.name], getattr(table[space.name], key).numpy())
    assert (view == "layer") == bool(result.input_rate)
    classes = torch.stack([class_rate(Q, 0.2, normalize) for Q in [*whole.classes, whole.class_embeddings]], 1)
    assert_stat(result.class_rate, classes.numpy())
    assert result.class_stages == [*whole.class_stages, "final"]
    assert [s.layer for s in result.subspaces] == owners and result.images == [f"image{i}" for i in range(5)]
    assert all(s.rank == s.heads * s.dim_head for s in result.subspaces)  # h·p <= d: P has full rank
    summary = result.summary()
    assert summary["share"]["mssa2"]["mssa1"] == pytest.approx(result.share["mssa2"].mean[1])
    assert summary["token_rate"] == dict(zip(result.token_names, result.token_rate.mean))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_layer_view_is_what_a_hook_on_the_layers_layernorm_captures(name):
    """Every token-producing layer's LayerNorm, hooked: ``layer_input`` of what it receives is what it
    returns; from layer 2 on it receives the residual stream Z_{l-1} (layer 1 may embed Z_0 first:
    Segmenter's proj_dec), so the view's input rate is the rate of what the hook caught."""
    model = tiny_model(name)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    captured = {}

    def catch(name: str):
        def hook(module, args, out) -> None:
            captured.setdefault(name, (args[0].detach(), out.detach()))
        return hook

    hooks = [model.decoder.input_norm(space).register_forward_hook(catch(space.name))
             for space in model.decoder.subspaces() if space.layer is not None]
    tr = trace(model, images)
    for hook in hooks:
        hook.remove()
    result = analyze_coding_rates(tr, view="layer")
    N = tr.tokens[0].shape[1]
    spaces = [s for s in tr.subspaces if s.layer is not None]
    assert spaces and set(captured) == {s.name for s in spaces}
    for space in spaces:
        received, projected = (x[:, :N] for x in captured[space.name])  # the patch part of the layer's sequence
        torch.testing.assert_close(space.layer_input(received), projected, atol=1e-5, rtol=1e-5)
        if space.layer >= 2:
            torch.testing.assert_close(received, tr.tokens[space.layer - 1], atol=0, rtol=0)
            rate = result.input_rate[space.name].per_image[:, space.layer - 1]
            np.testing.assert_allclose(rate, token_rate(projected.double()).numpy(), rtol=1e-6)
        np.testing.assert_allclose(result.share[space.name].per_image, result.span_rate[space.name].per_image
                                   / result.input_rate[space.name].per_image, rtol=1e-12)


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny", "linear-tiny"])
def test_every_family_gives_finite_rates_and_both_figures(name):
    model = tiny_model(name)
    result = analyze_coding_rates(trace(model, torch.rand(2, 3, 32, 32)))
    stats = [result.token_rate, result.class_rate] + [s for key in BY_SUBSPACE for s in getattr(result, key).values()]
    assert all(np.isfinite(stat.per_image).all() for stat in stats)
    assert result.class_stages[-1] == "final"
    figures = result.figures()
    assert list(figures) == ["coding_rate", "coding_rate_tokens"]
    assert len(figures["coding_rate_tokens"].axes) == 2


def test_json_and_csv_of_several_models_hold_every_number_per_image(tmp_path):
    pixels = torch.rand(3, 3, 32, 32)
    ca = analyze_coding_rates(traces_of(tiny_model("depict-ca-tiny"), pixels, [1, 2]), normalize="none", per_head=True)
    sa = analyze_coding_rates(trace(tiny_model("depict-sa-tiny"), pixels))
    Comparison(["ca", "sa"], ["ca.pt", "sa.pt"], [ca, sa], {"input": {"dataset": "synthetic"}}).save(tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in FILES)
    loaded = json.loads((tmp_path / "coding_rate.json").read_text())
    assert [(c["label"], c["source"]) for c in loaded["checkpoints"]] == [("ca", "ca.pt"), ("sa", "sa.pt")]
    first = loaded["checkpoints"][0]
    assert first["settings"]["normalize"] == "none" and first["token_names"][0] == "input"
    n, J, T = 3, len(first["layers"]), len(first["class_rate"]["stages"])
    assert np.shape(first["share"]["msca1"]["per_image"]) == (n, J)
    assert np.shape(first["head_rate"]["mssa2"]["per_image"]) == (n, 2, J)
    np.testing.assert_allclose(first["raw_ratio"]["mssa2"]["mean"], ca.raw_ratio["mssa2"].mean, rtol=1e-12)
    rows = (tmp_path / "coding_rate.csv").read_text().splitlines()
    assert rows[0] == "checkpoint,image,quantity,subspace,head,layer,layer_name,stage,value"
    S, heads = len(first["subspaces"]), sum(s["heads"] for s in first["subspaces"])
    assert len([r for r in rows[1:] if r.startswith("ca,")]) == n * (J + len(BY_SUBSPACE) * S * J + heads * J + T)
    shares = [float(r.split(",")[-1]) for r in rows if r.startswith("ca,image1,share,mssa1,")]
    assert shares == pytest.approx(ca.share["mssa1"].per_image[1])


def test_bad_settings_are_one_clear_error():
    tr = trace(tiny_model("depict-sa-tiny"), torch.rand(1, 3, 32, 32))
    for kwargs, message in (({"eps": 0}, "eps"), ({"normalize": "L2"}, "normalize"), ({"view": "norm"}, "view")):
        with pytest.raises(ValueError, match=message):
            analyze_coding_rates(tr, **kwargs)
    with pytest.raises(ValueError, match="no images"):
        analyze_coding_rates([])


# ------------------------------------------------------------------------------------------- CLI


def test_checkpoints_are_named_positionally_or_with_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # NAME=SOURCE names a source that exists
    for run in ("x", "y"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "variant.yml").write_text("{}")
    sources = ["a=runs/x/checkpoint.pt", "runs/y/checkpoint.pt", "builtin:segmenter", str(tmp_path / "release")]
    assert all(is_checkpoint(s) for s in sources) and not is_checkpoint(str(tmp_path / "photo.png"))
    assert not is_checkpoint(str(tmp_path))  # a folder of images
    assert labelled_sources(sources, ["seg=builtin:segmenter", "extra=zoo:seg-t-mask-ade20k"]) == [
        ("a", "runs/x/checkpoint.pt"), ("y", "runs/y/checkpoint.pt"), ("seg", "builtin:segmenter"),
        ("release", str(tmp_path / "release")), ("extra", "zoo:seg-t-mask-ade20k")]
    assert labelled_sources(["one/checkpoint.pt", "two/one.pt"]) == [("one#1", "one/checkpoint.pt"), ("one#2", "two/one.pt")]


def run_cli(*args: str):
    return CliRunner().invoke(app, ["coding-rate", *map(str, args)])


def written(out, label: str | None = None) -> dict:
    """The JSON entry of one checkpoint (the first without ``label``), every number finite."""
    entries = json.loads((out / "coding_rate.json").read_text())["checkpoints"]
    entry = next(e for e in entries if label is None or e["label"] == label)
    for key in BY_SUBSPACE:
        assert all(math.isfinite(v) for stat in entry[key].values() for v in np.ravel(stat["per_image"]))
    return entry


def test_cli_on_our_checkpoint_with_image_files(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    options = ["--batch-size", "2", "--normalize", "crate", "--view", "layer", "--per-head", "--out", out]
    result = run_cli(tmp_path / "sa.pt", "--images", folder, *options)
    assert result.exit_code == 0, result.output
    assert "R(Z_j)" in result.stdout and "share in mssa3" in result.stdout and "raw ratio mssa3" in result.stdout
    assert all((out / name).stat().st_size > 0 for name in FILES)
    model = load_model(tmp_path / "sa.pt")[0]
    _, batches = image_batches(32, images=[folder], batch_size=2)
    library = analyze_coding_rates(trace_batches(model, batches, progress=False), normalize="crate", view="layer")
    entry = written(out)
    assert entry["label"] == "sa" and entry["settings"]["view"] == "layer" and set(entry["head_rate"]) == {"mssa1", "mssa2", "mssa3"}
    for key in BY_SUBSPACE:
        np.testing.assert_allclose(entry[key]["mssa2"]["per_image"], getattr(library, key)["mssa2"].per_image, rtol=1e-6)
    assert entry["images"] == library.images


def test_cli_compares_labelled_models_and_reads_back_its_saved_traces(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    write_release(tmp_path / "release", "depict_ca")
    out, saved = tmp_path / "out", tmp_path / "run.trace"
    common = ["--num-images", "3", "--batch-size", "2"]
    result = run_cli(f"mine={tmp_path / 'sa.pt'}", tmp_path / "release", "--label", f"official={tmp_path / 'release'}",
                     *common, "--save-trace", saved, "--out", out)
    assert result.exit_code == 0, result.output
    entries = json.loads((out / "coding_rate.json").read_text())["checkpoints"]
    assert [e["label"] for e in entries] == ["mine", "official"]
    assert entries[1]["model"]["decoder"] == "depict_ca" and entries[1]["subspaces"][-1]["layer"] is None
    model = load_model(tmp_path / "release")[0]
    _, batches = image_batches(32, dataset="synthetic", num_images=3, batch_size=2)
    library = analyze_coding_rates(trace_batches(model, batches, progress=False))
    np.testing.assert_allclose(written(out, "official")["share"]["msca2"]["per_image"], library.share["msca2"].per_image, rtol=1e-6)

    files = [tmp_path / "run_mine.trace", tmp_path / "run_official.trace"]  # one per model
    assert Trace.load(files[1]).num_images == 3
    again = tmp_path / "again"
    result = run_cli("--trace", f"mine={files[0]}", "--trace", f"official={files[1]}", "--out", again)
    assert result.exit_code == 0, result.output
    for label in ("mine", "official"):
        first, second = written(out, label), written(again, label)
        for key in BY_SUBSPACE + ["token_rate", "class_rate"]:
            assert first[key] == second[key], key  # the same numbers, without a forward pass
    assert json.loads((again / "coding_rate.json").read_text())["settings"] == {"traces": [str(f) for f in files]}


@pytest.mark.parametrize("problem", ["missing checkpoint", "not an image", "bad eps", "trace and images", "bad label"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    (tmp_path / "notes.txt").write_text("not an image")
    args = {
        "missing checkpoint": [tmp_path / "nope.pt"],
        "not an image": [tmp_path / "sa.pt", "--images", tmp_path / "notes.txt"],
        "bad eps": [tmp_path / "sa.pt", "--eps", "0"],
        "trace and images": ["--trace", tmp_path / "x.trace", "--images", tmp_path / "notes.txt"],
        "bad label": [tmp_path / "sa.pt", "--label", "no-equals-sign"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
