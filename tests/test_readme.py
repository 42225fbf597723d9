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


def notebook_example() -> str:
    section = README.read_text(encoding="utf-8").split("### In a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


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


def test_the_intervention_example_runs_and_changes_the_prediction(tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("### `ablate`", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    image, _ = render_scene(np.random.default_rng(0), 96)
    Image.fromarray(image).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert capsys.readouterr().out.endswith("of the pixels change class\n")
    assert scope["edited_masks"].shape == scope["clean"].masks.shape
    assert not any("edits" in m.__dict__ for m in scope["model"].modules())
