"""The installed package: its import names, its front door and that importing it changes nothing global."""

from __future__ import annotations

import json
import subprocess
import sys

import depict_analysis


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    assert depict_analysis.__version__ == version("depict-analysis")


def test_importing_every_module_leaves_matplotlib_state_alone():
    code = """
import json, matplotlib
before = (matplotlib.get_backend(), {k: str(v) for k, v in matplotlib.rcParams.items()})
import depict_analysis, depict_analysis.plots, depict_analysis.outputs, depict_analysis.suite, depict_analysis.report
after = (matplotlib.get_backend(), {k: str(v) for k, v in matplotlib.rcParams.items()})
print(json.dumps([before[0] == after[0], sorted(k for k in before[1] if before[1][k] != after[1].get(k))]))
"""
    same_backend, changed = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                      check=True).stdout)
    assert same_backend and changed == []


def test_figures_get_the_project_style_only_while_they_are_drawn():
    import matplotlib

    from depict_analysis.plots import styled

    grid_outside = matplotlib.rcParams["axes.grid"]
    seen = styled(lambda: (matplotlib.rcParams["axes.grid"], matplotlib.rcParams["axes.facecolor"]))()
    assert seen == (True, "white")  # seaborn's whitegrid while the figure is made
    assert matplotlib.rcParams["axes.grid"] == grid_outside  # and nothing left behind


def test_load_model_names_any_source_and_says_what_it_knows(tmp_path):
    from depict_analysis import CheckpointInfo, load_model
    from depict_analysis.models import create_model, save_checkpoint
    from depict_analysis.models.data.classes import SYNTHETIC_CLASSES

    model, info = load_model("builtin:segmenter")
    assert isinstance(info, CheckpointInfo) and model.decoder.family == "mask_transformer"
    assert (info.label, info.source, info.origin, info.dataset) == ("Segmenter", "builtin:segmenter", "builtin", "synthetic")
    assert info.class_names == list(SYNTHETIC_CLASSES) and info.palette.shape == (len(SYNTHETIC_CLASSES), 3)
    assert info.iteration == info.meta["iteration"] > 0
    default, default_info = load_model()
    assert default_info.source == "builtin:depict-sa" and default.decoder.family == "depict_sa"

    save_checkpoint(tmp_path / "run-7" / "checkpoint.pt", create_model("linear-tiny", n_cls=3))
    _, run = load_model(tmp_path / "run-7" / "checkpoint.pt")
    assert (run.label, run.origin, run.dataset) == ("run-7", "depict-analysis", None)  # a run is named after its folder
    assert run.class_names == ["class 0", "class 1", "class 2"]


def test_load_images_crops_every_image_to_the_models_grid(tmp_path):
    import numpy as np
    from PIL import Image

    from depict_analysis import load_images, load_model, trace

    Image.fromarray(np.full((40, 80, 3), 200, np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "grey.png")
    model, _ = load_model("builtin:depict-sa")
    images = load_images(tmp_path, model)
    assert images.pixels.shape == (2, 3, 64, 64) and images.paths == [str(tmp_path / n) for n in ("grey.png", "wide.png")]
    assert float(images.pixels[0].max()) == 0.0 and abs(float(images.pixels[1].mean()) - 200 / 255) < 1e-6
    t = trace(model, images)
    assert t.paths == images.paths and t.masks.shape == (2, model.n_cls, 16, 16) and t.grid == (16, 16) and t.image_size == (64, 64)


def test_labelled_sources_and_one_colour_per_model(tmp_path, monkeypatch):
    from depict_analysis.models.sources import parse_labelled
    from depict_analysis.plots import LINE_COLORS, model_colours

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "checkpoint.pt").write_bytes(b"")
    assert parse_labelled("base=runs/a/checkpoint.pt") == ("base", "runs/a/checkpoint.pt")
    assert parse_labelled("base=runs/b/checkpoint.pt") == (None, "base=runs/b/checkpoint.pt")  # no such source
    assert parse_labelled("runs/a=b/checkpoint.pt") == (None, "runs/a=b/checkpoint.pt")  # a path with "="
    assert parse_labelled("builtin:segmenter") == (None, "builtin:segmenter")
    assert parse_labelled("sa=builtin:depict-sa") == ("sa", "builtin:depict-sa")
    colours = model_colours(["DEPICT-SA", "Segmenter", "DEPICT-SA", "CBT"])
    assert list(colours) == ["DEPICT-SA", "Segmenter", "CBT"]
    assert colours["CBT"] == LINE_COLORS[2] and len(set(colours.values())) == 3


def test_the_analyses_are_at_the_front_door():
    import depict_analysis as da
    from depict_analysis.results import Result

    for analysis, result in (("analyze_coding_rates", "CodingRates"), ("analyze_pca", "PCASegmentation"),
                             ("analyze_orthogonality", "Orthogonality")):
        assert callable(getattr(da, analysis)) and issubclass(getattr(da, result), Result)
        assert analysis in da.__all__ and result in da.__all__
    assert issubclass(da.Comparison, Result) and da.Stat is not None


def test_the_foundation_imports_nothing_of_the_project_and_the_maths_no_model_stack():
    code = """
import json, sys
import depict_analysis.foundation.errors, depict_analysis.foundation.files
foundation = sorted(m for m in sys.modules if m.startswith("depict_analysis.") and not m.startswith("depict_analysis.foundation"))
import depict_analysis.coding_rate, depict_analysis.pca, depict_analysis.orthogonality, depict_analysis.uncertainty
maths = sorted(m for m in sys.modules if m.startswith("depict_analysis.models"))
print(json.dumps([foundation, maths, "torch" in sys.modules]))
"""
    foundation, maths, _ = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                     check=True).stdout)
    assert foundation == []  # errors and files load without the analyses or the model stack
    assert maths == []  # the pure maths raise DepictError without importing depict_analysis.models


def test_no_committed_file_records_a_path_of_the_machine_that_made_it():
    """The gallery's JSON, the shipped weights' metadata, ...: no absolute path of a home, work or temporary
    folder, nor of this checkout (what a generating machine leaks into the files it writes)."""
    import re
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    machine = re.compile(rb"(?<![\w.])/(?:home|Users|root|work|tmp|mnt|scratch|private/var)/[\w.-]+/"
                         + b"|" + re.escape(str(root).encode()) + b"|" + re.escape(str(Path.home()).encode()) + b"/")
    assert machine.search(b'{"out": "/home/alice/depict/figures"}') and not machine.search(b"see /usr/share/x/")
    tests = Path(__file__).resolve().parent
    shipped = [root / name for name in ("README.md", "pyproject.toml")] + [
        path for folder in ("depict_analysis", "models", "cli", "figures", "benchmarks") for path in (root / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts]
    if shutil.which("git") is not None and (root / ".git").exists():  # a checkout: exactly what is committed
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        shipped = [root / name.decode() for name in filter(None, listed.split(b"\0"))]
    assert any(path.name == "summary.json" for path in shipped)  # the gallery's numbers are among the files read
    leaking = [str(path.relative_to(root)) for path in shipped
               if path.is_file() and path.parent != tests and machine.search(path.read_bytes())]
    assert leaking == []
