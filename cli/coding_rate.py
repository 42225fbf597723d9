"""``depict-analyze coding-rate``: R(Z_j), R(P_lᵀ Z_j), the share of the rate in each subspace, CRATE's R^c
and R(Q) through the decoder, for one or more models (SPEC §3.1)."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from depict_analysis.cli.common import console
from depict_analysis.cli.runs import RunOptions, trace_command
from depict_analysis.choices import NORMALIZE_MODES, VIEWS

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.coding_rate_analysis import CodingRates

Normalize = Enum("Normalize", {mode: mode for mode in NORMALIZE_MODES}, type=str)
View = Enum("View", {view: view for view in VIEWS}, type=str)


def rate_table_view(label: str, result: CodingRates) -> Table:
    """One column per token stage; rows R(Z_j), then each subspace's share and raw ratio, mean ± std."""
    table = Table(title=f"{label}: coding rates, mean ± std over {result.num_images} images")
    table.add_column("quantity", no_wrap=True)
    for name in result.token_names:
        table.add_column(name, justify="right", no_wrap=True)

    def cells(stat) -> list[str]:
        return [f"{m:.2f} ± {s:.2f}" for m, s in zip(stat.mean, stat.std)]

    table.add_row("R(Z_j) (nats)", *cells(result.token_rate))
    for space in result.subspaces:
        table.add_row(f"share in {space.name}", *cells(result.share[space.name]))
        table.add_row(f"raw ratio {space.name}", *cells(result.raw_ratio[space.name]))
    return table


@trace_command("figures/coding-rate", (32, "Images to analyse."), without=("labels",))
def coding_rate(
    run: RunOptions,
    eps: float = typer.Option(0.1, "--eps", help="Distortion ε of R(Z) = ½ logdet(I + m/(N ε²) ZᵀZ)."),
    normalize: Normalize = typer.Option(
        "l2", "--normalize", help="Unit tokens in R^d (l2), raw tokens (none), or unit tokens in each head (crate)."
    ),
    view: View = typer.Option(
        "residual", "--view", help="Tokens each subspace is applied to: the residual stream Z_j, or what the layer "
        "projects (layer: its LayerNorm applied to Z_j).",
    ),
    orthonormalize: bool = typer.Option(False, "--orthonormalize", help="Orthonormal basis of each head's span."),
    per_head: bool = typer.Option(False, "--per-head", help="Also record R(P_kᵀ Z_j) for every head k (JSON, CSV)."),
):
    """Coding rate of the patch tokens in each layer's subspace, of the tokens, and of the class embeddings."""
    from depict_analysis.coding_rate_analysis import analyze_coding_rates

    comparison = run.compare(analyze_coding_rates, description="coding rate", eps=eps, normalize=normalize.value, orthonormalize=orthonormalize, view=view.value,
                             per_head=per_head)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(rate_table_view(name, result))
    console.print("wrote " + ", ".join(map(str, comparison.files + comparison.trace_files)))
