"""``depict-analyze orthogonality``: PᵀP per layer and Q̂ᵀQ̂ of one or more models, beside the same
statistics at initialisation (SPEC §3.3)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from depict_analysis.cli.common import console
from depict_analysis.cli.runs import RunOptions, checkpoints_argument, trace_command
from depict_analysis.models.pretrained import BUILTIN, DEFAULT_MODELS

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.orthogonality_analysis import Orthogonality

COLUMNS = {  # header -> Orthogonality.headline key
    "P |cos| across heads": "P_cross_head_mean_abs_cos",
    "P coherence": "P_coherence",
    "Q̂ |cos|": "final_Q_mean_abs_offdiag",
    "Q̂ centred": "final_Q_mean_abs_offdiag_centred",
    "cls_emb |cos|": "cls_emb_mean_abs_offdiag",
}


def _cell(value: float | None, baseline) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.3f}" + (f" ({baseline.mean:.3f})" if baseline is not None else "")


def summary_table(labels: list[str], results: list[Orthogonality]) -> Table:
    """One row per model: the scale-free statistics, at initialisation in brackets."""
    level = ", ".join(sorted({f"{r.random_level:.3f} (d = {r.settings['d']})" for r in results}))
    table = Table(
        title="Orthogonality: mean |cos| (lower = closer to orthogonal); at initialisation in brackets",
        caption=f"P: between basis vectors of different heads, coherence = max |cos|; Q̂: per image, then the mean; "
        f"centred: class mean removed (what the mask LayerNorm sees; floor 1/(K−1)); random directions: {level}",
    )
    table.add_column("model", no_wrap=True)
    for header in COLUMNS:
        table.add_column(header, justify="right")
    for label, result in zip(labels, results):
        table.add_row(label, *(_cell(*result.headline(key)) for key in COLUMNS.values()))
    return table


@trace_command("figures/orthogonality", (16, "Images to measure the final Q̂ on."),
               checkpoints=checkpoints_argument("the built-in DEPICT-SA, DEPICT-CA and Segmenter"),
               without=("labels", "batch_size", "size"))
def orthogonality(
    run: RunOptions,
    baseline_seeds: int = typer.Option(
        3, "--baseline-seeds", min=0, help="Fresh decoders (seeds 0..N-1) for the at-initialisation baseline; 0: none."
    ),
):
    """Cosines between the basis vectors of every layer's subspaces and between the class embeddings, trained
    and at initialisation; the Gram matrices PᵀP and Q̂ᵀQ̂."""
    from depict_analysis.orthogonality_analysis import analyze_orthogonality

    comparison = run.compare(analyze_orthogonality, models=[f"{BUILTIN}{name}" for name in DEFAULT_MODELS],
                             description="orthogonality", baseline_seeds=range(baseline_seeds))
    console.print(summary_table(comparison.labels, comparison.results))
    console.print("wrote " + ", ".join(map(str, comparison.files + comparison.trace_files)))
