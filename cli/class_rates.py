"""``depict-analyze class-rates``: coding rate of each class's tokens and the rate reduction ΔR per layer,
for one or more models (checkpoints or saved traces: ``cli/runs.py``)."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from depict_analysis.choices import CLASS_BY
from depict_analysis.cli.common import SeedOption, console, warn
from depict_analysis.cli.options import LevelOption, ResamplesOption
from depict_analysis.cli.runs import RunOptions, trace_command

if TYPE_CHECKING:  # the model stack is imported inside the command
    from depict_analysis.class_rates import ClassRates

By = Enum("By", {by: by for by in CLASS_BY}, type=str)
Normalize = Enum("Normalize", {mode: mode for mode in ("l2", "none")}, type=str)  # one norm over all d: no heads here


def rates_table(label: str, result: ClassRates) -> Table:
    """One row per token stage: R(Z_j), the class-weighted rate and ΔR_j, each mean [interval]."""
    level = 100 * result.bootstrap.level
    table = Table(title=f"{label}: coding rates (nats), mean over {len(result.images)} images [{level:g} % interval]",
                  caption=f"classes by {result.settings['by'].replace('_', ' ')}")
    for header in ("stage", "R(Z_j)", "Σ_c N_c/N R(Z_j,c)", "ΔR_j"):
        table.add_column(header, justify="left" if header == "stage" else "right", no_wrap=True)
    columns = [result.interval(values) for values in (result.total, result.within, result.delta)]
    for j, layer in enumerate(result.layers):
        table.add_row(layer, *(column[j].text(digits=4) for column in columns))
    return table


@trace_command("figures/class-rates", (32, "Images to analyse."))
def class_rates(
    run: RunOptions,
    by: By = typer.Option("ground_truth", "--by", help="Class of each patch: majority ground-truth label, or the model's prediction."),
    eps: float = typer.Option(0.1, "--eps", min=1e-12, help="Distortion ε of R(Z) = ½ logdet(I + m/(N ε²) ZᵀZ)."),
    normalize: Normalize = typer.Option("l2", "--normalize", help="Unit tokens in R^d (l2) or raw tokens (none)."),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
):
    """Per class: the coding rate of its tokens at every layer, and ΔR = R(Z) − Σ_c (N_c/N)·R(Z_c) (MCR²).

    Writes class_rates.png / .pdf (the rates per layer, one colour per model, and a class × layer
    heatmap per model), class_rates.json (per image and summarised, with bootstrap intervals) and
    class_rates.csv.
    """
    from depict_analysis.class_rates import analyze_class_rates
    from depict_analysis.uncertainty import Bootstrap

    comparison = run.compare(analyze_class_rates, description="class rates", by=by.value, eps=eps, normalize=normalize.value,
                             bootstrap=Bootstrap(resamples, level, seed))
    for name, result in zip(comparison.labels, comparison.results):
        console.print(rates_table(name, result))
        for warning in result.warnings():
            warn(warning)
    console.print("wrote " + ", ".join(map(str, comparison.files + comparison.trace_files)))
