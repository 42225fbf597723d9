"""Options and helpers of the analyses that report intervals or read labels (robustness, class-rates,
attention, demo, report)."""

from __future__ import annotations

import typer

LevelOption = typer.Option(0.95, "--level", min=0.5, max=0.999, help="Coverage of the bootstrap confidence intervals.")
ResamplesOption = typer.Option(1000, "--resamples", min=10, help="Bootstrap resamples behind every interval.")
LabelsOption = typer.Option(
    None, "--labels", help="Label maps (class ids, 255 = ignore) or folders, matched to --images by file stem."
)
