"""The command lines themselves (issue 17): fast help that shows every default, --version, progress
on stderr, predict on folders with eval's resizing, EXIF orientation, palette label maps and the
overlay legend, retrain into a folder the user names."""

from __future__ import annotations

import enum
import json
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from typer.main import get_command
from typer.testing import CliRunner

import depict_analysis
import depict_analysis.cli.analyze
import depict_analysis.cli.main
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.models.data import load_image, make_palette
from depict_analysis.models.evaluate import image_labels
from depict_analysis.models.predict import legend_canvas, overlay
from depict_analysis.models.pretrained import WEIGHTS_DIR, main as pretrained_main
from depict_analysis.foundation.progress import track
from depict_analysis.models.train import TrainConfig

APPS = {"depict": depict_analysis.cli.main.app, "depict-analyze": depict_analysis.cli.analyze.app}
OPTION_START = re.compile(r"^  (--?[\w-]+)")


def leaf_commands(group, path=()):
    """(command path, click command) of every command under a click group, sub-groups included."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def option_blocks(help_text: str) -> dict[str, str]:
    """The help text of each option, whitespace collapsed: its first name -> its lines."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = OPTION_START.match(line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in blocks.items()}


def expected_default(option) -> str | None:
    """What ``[default: ...]`` must show for a click option, or None when it has no default to show."""
    if isinstance(option.show_default, str):
        return f"({' '.join(option.show_default.split())})"
    if option.is_flag and not option.secondary_opts:
        return None  # a plain switch: off unless given
    if option.is_flag:
        return (option.opts if option.default else option.secondary_opts)[0].lstrip("-")
    if option.default is None or option.required:
        return None
    value = option.default.value if isinstance(option.default, enum.Enum) else option.default
    return str(value)


@pytest.mark.parametrize("program", list(APPS))
def test_every_command_shows_the_default_of_every_option(program):
    group = get_command(APPS[program])
    checked = 0
    for path, command in leaf_commands(group):
        result = CliRunner().invoke(APPS[program], [*path, "--help"], env={"COLUMNS": "100"})
        assert result.exit_code == 0, result.output
        blocks = option_blocks(result.stdout)
        for option in command.params:
            if option.param_type_name != "option" or option.name == "help" or expected_default(option) is None:
                continue
            expected = expected_default(option)
            block = blocks[option.opts[0]]
            assert f"[default: {expected}" in block, (program, path, option.opts[0], block)
            checked += 1
    assert checked > 20


def test_brackets_in_help_texts_are_printed_as_written():
    result = CliRunner().invoke(APPS["depict-analyze"], ["pca-seg", "--help"], env={"COLUMNS": "200"})
    assert "Segments [default: classes the model predicts on at least 1 % of the image, 2..8]." in " ".join(result.stdout.split())  # rich markup ate it


@pytest.mark.parametrize("program", list(APPS))
def test_version(program):
    result = CliRunner().invoke(APPS[program], ["--version"])
    assert result.exit_code == 0 and result.stdout == f"depict-analysis {depict_analysis.__version__}\n"


@pytest.mark.parametrize("module, commands", [
    ("main", ["predict", "train", "eval", "info", "curves", "zoo"]),
    ("analyze", ["coding-rate", "pca-seg", "orthogonality", "robustness", "class-rates", "attention", "demo", "report"]),
])
def test_help_imports_no_heavy_module(module, commands):
    """`depict --help` and `depict-analyze --help` (and each command's) answer at once: no torch behind them."""
    code = (f"import sys\nfrom depict_analysis.cli.{module} import app\n"
            f"for args in [['--help'], *([c, '--help'] for c in {commands!r})]:\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'cv2', 'numpy', 'depict_analysis.models.segmentor') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_usage_errors_are_one_line(tmp_path):
    for args, fragment in [(["frobnicate"], "No such command 'frobnicate'"), (["predict", "--out", tmp_path], "give the images to segment: --images"),
                           (["eval", "--batch-size", "x"], "Invalid value for '--batch-size'")]:
        result = CliRunner().invoke(APPS["depict"], [str(a) for a in args])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert fragment in result.stderr and result.stdout == ""


def test_progress_bars_draw_on_stderr_and_only_on_a_terminal(monkeypatch, capsys):
    assert list(track(range(3), "working")) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")  # a pipe (pytest's capture) gets nothing
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats the stream as a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert list(track(range(3), "working")) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and "working" in err


def test_off_a_terminal_each_stage_is_one_line_with_its_elapsed_time(monkeypatch, capsys):
    from depict_analysis.foundation.progress import StageLog

    clock = iter([100.0, 103.25, 161.5, 200.0, 201.0])
    monkeypatch.setattr("depict_analysis.foundation.progress.time.perf_counter", lambda: next(clock))
    log = StageLog("demo")
    log("coding rate")
    log("robustness")
    out, err = capsys.readouterr()
    assert out == "" and err == "demo: [   3.2 s] coding rate\ndemo: [  61.5 s] robustness\n"
    monkeypatch.setenv("FORCE_COLOR", "1")  # a terminal: the bars show progress, no lines
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    StageLog("demo")("coding rate")
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------------------- predict


@pytest.fixture
def run_checkpoint(tmp_path):
    """A tiny model of 8 classes recorded as trained on synthetic scenes with base size 48."""
    torch.manual_seed(0)
    model = create_model("depict-sa-tiny", n_cls=8)
    run = TrainConfig(model="depict-sa-tiny", dataset="synthetic", base_size=48, eval_stride=16).to_dict()
    save_checkpoint(tmp_path / "m.pt", model, train_config=run)
    return tmp_path / "m.pt", model.eval()


def test_predict_takes_folders_and_resizes_as_eval_does(tmp_path, run_checkpoint):
    checkpoint, model = run_checkpoint
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for name, (h, w) in {"wide": (30, 90), "tall": (70, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(APPS["depict"], ["predict", str(checkpoint), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "tall_label.png", "tall_overlay.png", "wide_label.png", "wide_overlay.png"]
    for name in ("wide", "tall"):
        # as depict eval on the run's dataset: short side to the run's base size 48, long side at most 4 x 48
        with torch.inference_mode():
            expected = image_labels(model, load_image(tmp_path / "in" / f"{name}.png"), window=32, stride=16, img_scale=(192, 48))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}_label.png")), expected.numpy())


def test_exif_orientation_is_applied(tmp_path):
    stored = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored image is shown rotated 90° clockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "photo.png")), np.rot90(stored, k=-1))
    Image.fromarray(stored).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "plain.png")), stored)


def test_the_overlay_legend_lists_the_classes_present_with_their_colours():
    image = Image.fromarray(np.full((120, 80, 3), 90, dtype=np.uint8))
    palette = make_palette(5)
    label = np.zeros((120, 80), dtype=np.uint8)
    label[:, 50:] = 3
    blended = overlay(image, label, palette)
    canvas = overlay(image, label, palette, canvas=legend_canvas(image.size, [0, 3], [f"c{i}" for i in range(5)], palette))
    pixels = np.asarray(canvas)
    assert canvas.height == 120 and canvas.width > 80
    np.testing.assert_array_equal(pixels[:, :80], np.asarray(blended))  # the blended image, whole, at the left
    np.testing.assert_array_equal(np.asarray(blended)[0, 0], np.round(0.5 * 90 + 0.5 * palette[0]))
    size = max(10, 120 // 25)  # the swatch side: the font size for a 120-px image (10 at least)
    pad, line = size // 2, round(1.5 * size)
    for row, cls in enumerate([0, 3]):  # each swatch's centre has its class colour, in the order given
        top = pad + row * line
        np.testing.assert_array_equal(pixels[top + size // 2, 80 + pad + size // 2], palette[cls])
    assert (pixels[pad + 2 * line + size // 2, 80 + pad + size // 2] == 255).all()  # no third swatch


def test_retrain_writes_only_into_a_folder_the_user_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrained_main(["retrain", "--runs", str(tmp_path / "runs")])  # --weights is required
    assert exit_info.value.code == 2 and "--weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pretrained_main(["pack", "--runs", str(tmp_path / "runs"), "--weights", str(WEIGHTS_DIR)])
    assert exit_info.value.code == 2 and "installed package's weights folder" in capsys.readouterr().err
    assert json.loads((WEIGHTS_DIR / "manifest.json").read_text())["models"]  # untouched


def test_brackets_in_warnings_and_findings_are_text_not_markup(capsys):
    from rich.console import Console

    from depict_analysis.claims import Finding
    from depict_analysis.cli.common import warn
    from depict_analysis.cli.demo import findings_table
    from depict_analysis.uncertainty import Interval

    warn("σ½ beyond the grid [central 95 %] for [bold]")
    assert "σ½ beyond the grid [central 95 %] for [bold]" in capsys.readouterr().out
    finding = Finding("claim", "P [raw] is closer", "statistic", "data", "holds", {"A": Interval(0.1, 0.1, 0.1, 1.0)},
                      notes=("initialisation: mean [central 95 %] of 5 draws",))
    result = types.SimpleNamespace(findings=[finding], settings=types.SimpleNamespace(level=0.95))
    console = Console(record=True, width=300)
    console.print(findings_table(result, "claim"))
    text = console.export_text()
    assert "P [raw] is closer" in text and "initialisation: mean [central 95 %] of 5 draws" in text
