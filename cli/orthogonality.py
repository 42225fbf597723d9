"""``depict-analyze orthogonality``: PᵀP per layer and Q̂ᵀQ̂ of one or more models, beside the same
statistics at initialisation (SPEC §3.3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    BUILTIN,
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    console,
    fail,
    image_source_options,
    user_errors,
)
from depict_analysis.cli.runs import LabelOption, SaveTraceOption, TraceOption, checkpoints_argument, compare_runs, runs
from depict_analysis.models.pretrained import DEFAULT_MODELS

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


@user_errors
def orthogonality(
    checkpoints: Optional[list[str]] = checkpoints_argument("the built-in DEPICT-SA, DEPICT-CA and Segmenter"),
    label: Optional[list[str]] = LabelOption,
    trace_files: Optional[list[str]] = TraceOption,
    save_trace: Optional[Path] = SaveTraceOption,
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(16, "--num-images", min=1, help="Images to measure the final Q̂ on."),
    baseline_seeds: int = typer.Option(
        3, "--baseline-seeds", min=0, help="Fresh decoders (seeds 0..N-1) for the at-initialisation baseline; 0: none."
    ),
    out: Path = typer.Option(Path("figures/orthogonality"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Cosines between the basis vectors of every layer's subspaces and between the class embeddings, trained
    and at initialisation; the Gram matrices PᵀP and Q̂ᵀQ̂."""
    from depict_analysis.inputs import image_batches
    from depict_analysis.orthogonality_analysis import analyze_orthogonality

    check_out_dir(out)
    if trace_files and (images or dataset):
        fail("--trace files hold their images: give --trace or --images / --dataset, not both")
    source = image_source_options(images, dataset, data_root, split, num_images)

    def batches_for(model):
        return image_batches(max(model.config.backbone.image_size), **source)

    default = [f"{BUILTIN}{name}" for name in DEFAULT_MODELS]
    count, models = runs(checkpoints, label, trace_files, batches_for, default=default, device=device, trust=trust,
                         description="orthogonality")
    inputs = None if trace_files else {"input": {key: value for key, value in source.items() if value}}
    comparison, written, saved = compare_runs(
        count, models,
        lambda traces, run: analyze_orthogonality(traces, baseline_seeds=range(baseline_seeds), class_names=run.class_names),
        save_trace=save_trace, inputs=inputs, out=out,
    )
    console.print(summary_table(comparison.labels, comparison.results))
    console.print("wrote " + ", ".join(map(str, written + saved)))
