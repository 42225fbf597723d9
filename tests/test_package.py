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
