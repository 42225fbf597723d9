"""The README's notebook example runs as written, in at most 10 lines."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from depict_analysis.models.data.synthetic import render_scene

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str) -> str:
    """The first Python block after the README heading ``heading``."""
    section = README.read_text(encoding="utf-8").split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def notebook_example() -> str:
    return example("### In a notebook")


def test_notebook_example_runs_and_stays_short(tmp_path, monkeypatch, capsys):
    code = notebook_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    image, _ = render_scene(np.random.default_rng(0), 96)  # any RGB photo will do
    Image.fromarray(image).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert printed.startswith("{'input': ") and "'mssa1': " in printed
    assert scope["rates"].num_images == 1
    assert isinstance(scope["pca"].figures()["pca-seg_photo"], Figure)


def test_compare_example_runs_two_checkpoints_on_the_same_images(tmp_path, monkeypatch, capsys):
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(render_scene(rng, 80)[0]).save(tmp_path / "photos" / f"p{i}.png")
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")
    scope: dict = {}
    exec(compile(example("### Compare checkpoints"), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.labels == ["DEPICT-SA", "seg"] and result.sources == ["builtin:depict-sa", "builtin:segmenter"]
    assert [r.model["decoder"] for r in result.results] == ["depict_sa", "mask_transformer"]
    assert all(r.num_images == 3 and r.settings["eps"] == 0.2 for r in result.results)
    # the same images: each model's coding rate equals the one of tracing them by hand
    from depict_analysis import analyze_coding_rates, load_images, load_model, trace

    for label, source, got in zip(result.labels, result.sources, result.results):
        model, _ = load_model(source)
        by_hand = analyze_coding_rates(trace(model, load_images(sorted((tmp_path / "photos").iterdir()), model)), eps=0.2)
        np.testing.assert_allclose(got.token_rate.per_image, by_hand.token_rate.per_image, rtol=1e-6)
    assert (tmp_path / "rates" / "coding_rate.json").is_file() and (tmp_path / "rates" / "coding_rate.png").is_file()
    assert str(result.labels) in capsys.readouterr().out


def test_the_intervention_example_runs_and_changes_the_prediction(tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("### `ablate`", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    image, _ = render_scene(np.random.default_rng(0), 96)
    Image.fromarray(image).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert capsys.readouterr().out.endswith("of the pixels change class\n")
    clean = scope["clean"]
    assert scope["edited_masks"].shape == (len(clean.masks), clean.masks.shape[1], *clean.image_size)
    assert not any("edits" in m.__dict__ for m in scope["model"].modules())


def test_the_predict_line_of_the_quick_start_runs_as_written(tmp_path, monkeypatch):
    """The README's `depict predict` on your own image (the built-in model, images after --images)."""
    import shlex

    from typer.testing import CliRunner

    from depict_analysis.cli.main import app

    line = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("depict predict "))
    args = shlex.split(line.split("#")[0])[2:]
    assert args[:2] == ["--images", "photo.png"]
    Image.fromarray(render_scene(np.random.default_rng(0), 96)[0]).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    label = np.asarray(Image.open(tmp_path / "predictions" / "photo_label.png"))
    assert label.shape == (96, 96) and label.max() < 8 and (tmp_path / "predictions" / "photo_overlay.png").is_file()
