"""Options of the commands that report confidence intervals (``depict_analysis.uncertainty``)."""

from __future__ import annotations

import typer

LevelOption = typer.Option(0.95, "--level", min=0.5, max=0.999, help="Coverage of the bootstrap confidence intervals.")
ResamplesOption = typer.Option(1000, "--resamples", min=10, help="Bootstrap resamples behind every interval.")
