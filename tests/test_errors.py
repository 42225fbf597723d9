"""The CLI's error contract: the library's own errors (``DepictError`` and its kinds) are the user's
mistakes, shown as one line with exit code 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import depict_analysis.coding_rate_analysis as coding_rate_analysis
from depict_analysis.cli.analyze import app
from depict_analysis.foundation.errors import CheckpointError, ConfigError, DatasetError, DepictError, InputError


def raising(error: BaseException):
    def analysis_step(*args, **kwargs):
        raise error

    return analysis_step


def run_coding_rate(tmp_path):
    return CliRunner().invoke(app, ["coding-rate", "--num-images", "1", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("kind", [CheckpointError, DatasetError, ConfigError, InputError])
def test_each_depict_error_kind_is_one_line_and_exit_2(tmp_path, monkeypatch, kind):
    assert issubclass(kind, DepictError)
    monkeypatch.setattr(coding_rate_analysis, "rate_table", raising(kind("the tokens are wrong\nmore detail")))
    result = run_coding_rate(tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: the tokens are wrong\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("bug", [KeyError("token_rate"), ValueError("bad reshape"), TypeError("unexpected argument")])
def test_a_bug_inside_an_analysis_shows_its_traceback(tmp_path, monkeypatch, bug):
    monkeypatch.setattr(coding_rate_analysis, "rate_table", raising(bug))
    result = run_coding_rate(tmp_path)
    assert result.exit_code == 1 and result.exception is bug  # not caught: Python prints the traceback
    assert not result.stderr.startswith("error:")


def test_library_errors_name_arguments_and_the_cli_shows_its_flags(tmp_path):
    """A library message names the Python argument (a notebook has no flags); a command shows its own flag."""
    from depict_analysis.cli.main import app as depict
    from depict_analysis.models.train import parse_overrides

    with pytest.raises(ConfigError) as err:
        parse_overrides(["lr"])
    assert str(err.value) == "overrides expects key=value, got 'lr'" and err.value.arguments == ("overrides",)
    result = CliRunner().invoke(depict, ["train", "--set", "lr", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.strip() == "error: --set expects key=value, got 'lr'"
    (tmp_path / "folder.trace").mkdir()
    folder = CliRunner().invoke(app, ["coding-rate", "--num-images", "1", "--save-trace", str(tmp_path / "folder.trace"),
                                      "--out", str(tmp_path / "out")])
    assert folder.output.strip() == f"error: --save-trace {tmp_path / 'folder.trace'} is a folder; give a file name"
