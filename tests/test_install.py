"""The built wheel, installed into a fresh virtual environment: one namespace, package data, no shadowing.

The wheel is built and installed offline (no build isolation, no dependencies fetched); the fresh
environment sees this environment's dependencies (torch, timm, ...) through a ``.pth`` line, but not
its editable install of this project, so what is imported is the wheel alone.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh environment

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (plus a path to this environment's dependencies)."""
    root = tmp_path_factory.mktemp("install")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", REPO)
    (wheel,) = (root / "dist").glob("depict_analysis-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", root / "venv")
    python = root / "venv" / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    dependencies = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "dependencies.pth").write_text("\n".join(dict.fromkeys(dependencies)) + "\n")
    return root / "venv"


def test_wheel_installs_one_namespace_that_a_users_models_and_cli_do_not_shadow(fresh_env, tmp_path):
    user = tmp_path / "research-repo"  # a research repo with its own top-level models/ and cli/ packages
    for name in ("models", "cli"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    code = """
import json, models, cli
import depict_analysis
from depict_analysis import load_model
from depict_analysis.models import create_model
model, info = load_model("builtin:depict-sa")
print(json.dumps({"models": models.OWNER, "cli": cli.OWNER, "package": depict_analysis.__file__,
                  "version": depict_analysis.__version__, "label": info.label, "classes": model.n_cls}))
"""
    seen = json.loads(run(fresh_env / "bin" / "python", "-c", code, cwd=user))
    assert seen["models"] == "user models" and seen["cli"] == "user cli"  # the user's packages stay theirs
    assert seen["package"].startswith(str(fresh_env))  # the wheel, not this checkout
    assert seen["label"] == "DEPICT-SA" and seen["classes"] == 8  # the shipped weights came with the wheel
    info = json.loads(run(fresh_env / "bin" / "depict", "info", "--json", cwd=user))
    assert info["decoder"] == "depict_sa" and info["n_cls"] == 8


def test_wheel_holds_no_top_level_models_or_cli(fresh_env):
    purelib = Path(run(fresh_env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    assert not (purelib / "models").exists() and not (purelib / "cli").exists()
    assert (purelib / "depict_analysis" / "models" / "weights" / "manifest.json").is_file()
    assert (purelib / "depict_analysis" / "cli" / "main.py").is_file()
