"""The coding-rate analysis (runner, JSON / CSV, figures) and ``depict-analyze coding-rate``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from depict_analysis.cli.analyze import app
from depict_analysis.coding_rate import class_rate, rate_table
from depict_analysis.coding_rate_analysis import analyze_coding_rates, rate_rows
from depict_analysis.inputs import Batch, image_batches
from depict_analysis.outputs import save_json
from depict_analysis.plots import plot_subspace_rates, plot_token_class_rates
from depict_analysis.tracing import trace
from depict_analysis.models import create_model, load_model, save_checkpoint
from tests.official_layout import write_release

FILES = [f"coding_rate{name}" for name in (".png", ".pdf", "_tokens.png", "_tokens.pdf", ".json", ".csv")]
QUANTITIES = ["token_rate", "subspace_rate", "ratio", "class_rate"]


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, n_cls=4).eval()


def batches_of(pixels: torch.Tensor, sizes: list[int]):
    """Batches of the given (unequal) sizes over ``pixels`` (n, 3, S, S)."""
    start = 0
    for n in sizes:
        yield Batch(pixels[start : start + n], None, [f"image{i}" for i in range(start, start + n)])
        start += n


def direct_rates(model, pixels, eps, normalize, orthonormalize) -> dict[str, np.ndarray]:
    """Every rate for all images in one traced batch, computed with the coding_rate functions by hand."""
    tr = trace(model, model.normalize(pixels))
    table = rate_table(tr.tokens, [s.proj for s in tr.subspaces], eps, normalize, orthonormalize)
    stages = [class_rate(Q, eps, normalize) for Q in tr.classes + [tr.class_embeddings]]
    rates = {key: table[key].numpy() for key in QUANTITIES[:3]}
    rates["class_rate"] = torch.stack(stages, dim=1).numpy()
    rates |= {s.name: heads.numpy() for s, heads in zip(tr.subspaces, table["head_rate"])}
    return rates


def assert_matches(stat: dict, per_image: np.ndarray, rtol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.asarray(stat["per_image"]), per_image, rtol=rtol)
    np.testing.assert_allclose(np.asarray(stat["mean"]), per_image.mean(axis=0), rtol=rtol)
    np.testing.assert_allclose(np.asarray(stat["std"]), per_image.std(axis=0), rtol=rtol, atol=1e-9)


def numbers(tree) -> list:
    """Every leaf number of a JSON tree (None for a non-finite value written as null)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if tree is None or isinstance(tree, float) else []


@pytest.mark.parametrize(
    "name, normalize, orthonormalize, owners",
    [("depict-sa-tiny", "l2", False, [1, 2, 3]), ("depict-ca-tiny", "crate", True, [1, 2, 3, None, None, None])],
)
def test_runner_aggregates_unequal_batches_like_a_direct_computation(name, normalize, orthonormalize, owners):
    model = tiny_model(name)
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = analyze_coding_rates(
        model, batches_of(pixels, [2, 3]), eps=0.2, normalize=normalize, orthonormalize=orthonormalize,
        per_head=True, progress=False,
    )
    expected = direct_rates(model, pixels, 0.2, normalize, orthonormalize)
    for key in QUANTITIES:
        assert_matches(result[key], expected[key])
    for space in result["subspaces"]:
        assert_matches(result["head_rate"][space["name"]], expected[space["name"]])
    assert [s["layer"] for s in result["subspaces"]] == owners
    assert result["layers"] == [0, 1, 2, 3]
    assert result["images"] == [f"image{i}" for i in range(5)]
    settings = result["settings"]
    assert (settings["eps"], settings["normalize"], settings["orthonormalize"]) == (0.2, normalize, orthonormalize)
    assert settings["num_images"] == 5 and settings["model"]["variant"] == name


@pytest.mark.parametrize("name", ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny", "linear-tiny"])
def test_every_family_gives_finite_rates_and_both_figures(name):
    model = tiny_model(name)
    result = analyze_coding_rates(model, batches_of(torch.rand(2, 3, 32, 32), [2]), progress=False)
    assert all(np.isfinite(result[key]["per_image"]).all() for key in QUANTITIES)
    assert result["class_rate"]["stages"][-1] == "final"
    for figure in (plot_subspace_rates(result), plot_token_class_rates(result)):
        assert len(figure.axes) == 2


def test_json_and_csv_hold_every_number_per_image(tmp_path):
    model = tiny_model("depict-ca-tiny")
    result = analyze_coding_rates(
        model, batches_of(torch.rand(3, 3, 32, 32), [1, 2]), normalize="none", per_head=True, progress=False
    )
    loaded = json.loads(save_json(tmp_path / "r.json", result).read_text())
    assert loaded["settings"]["normalize"] == "none"
    values = numbers({k: loaded[k] for k in [*QUANTITIES, "head_rate"]})
    assert values and all(v is not None and math.isfinite(v) for v in values)
    n, J, S, T = 3, len(loaded["layers"]), len(loaded["subspaces"]), len(loaded["class_rate"]["stages"])
    assert np.shape(loaded["subspace_rate"]["per_image"]) == (n, S, J)
    assert np.shape(loaded["ratio"]["std"]) == (S, J)
    assert np.shape(loaded["class_rate"]["per_image"]) == (n, T)
    heads = sum(s["heads"] for s in loaded["subspaces"])
    rows = rate_rows(result)
    assert len(rows) == n * (J + 2 * S * J + heads * J + T)
    token_rows = [r["value"] for r in rows if r["quantity"] == "token_rate" and r["image"] == "image1"]
    assert token_rows == pytest.approx(loaded["token_rate"]["per_image"][1])


# ------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str):
    return CliRunner().invoke(app, ["coding-rate", *map(str, args)])


def check_outputs(out, model, batches, **settings) -> dict:
    """All files written, every JSON number finite and equal to the library's on the same images."""
    assert all((out / name).is_file() and (out / name).stat().st_size > 0 for name in FILES)
    written = json.loads((out / "coding_rate.json").read_text())
    assert all(v is not None and math.isfinite(v) for v in numbers({k: written[k] for k in QUANTITIES}))
    library = analyze_coding_rates(model, batches, progress=False, **settings)
    for key in QUANTITIES:
        np.testing.assert_allclose(written[key]["per_image"], library[key]["per_image"], rtol=1e-6)
        np.testing.assert_allclose(written[key]["mean"], library[key]["mean"], rtol=1e-6)
    assert written["images"] == library["images"]
    return written


def test_cli_on_our_checkpoint_with_image_files(tmp_path):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    options = ["--batch-size", "2", "--normalize", "crate", "--per-head", "--out", out]
    result = run_cli(tmp_path / "sa.pt", "--images", folder, *options)
    assert result.exit_code == 0, result.output
    assert "R(Z_j)" in result.stdout and "mssa3" in result.stdout
    model = load_model(tmp_path / "sa.pt")[0]
    _, batches = image_batches(32, images=[folder], batch_size=2)
    written = check_outputs(out, model, batches, normalize="crate")
    assert written["settings"]["normalize"] == "crate" and set(written["head_rate"]) == {"mssa1", "mssa2", "mssa3"}


def test_cli_on_an_official_release_with_a_dataset(tmp_path):
    write_release(tmp_path / "release", "depict_ca")
    out = tmp_path / "out"
    options = ["--num-images", "3", "--batch-size", "2", "--out", out]
    result = run_cli(tmp_path / "release", "--dataset", "synthetic", *options)
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "release")[0]
    _, batches = image_batches(32, dataset="synthetic", num_images=3, batch_size=2)
    written = check_outputs(out, model, batches)
    assert written["settings"]["normalize"] == "l2" and written["settings"]["model"]["decoder"] == "depict_ca"
    assert [s["layer"] for s in written["subspaces"]][-1] is None


@pytest.mark.parametrize("problem", ["missing checkpoint", "not an image", "bad eps"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, problem):
    save_checkpoint(tmp_path / "sa.pt", tiny_model("depict-sa-tiny"))
    (tmp_path / "notes.txt").write_text("not an image")
    args = {
        "missing checkpoint": [tmp_path / "nope.pt"],
        "not an image": [tmp_path / "sa.pt", "--images", tmp_path / "notes.txt"],
        "bad eps": [tmp_path / "sa.pt", "--eps", "0"],
    }[problem]
    result = run_cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert not (tmp_path / "out").exists()
