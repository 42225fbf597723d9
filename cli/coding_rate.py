"""``depict-analyze coding-rate``: R(Z_j), R(P_lᵀ Z_j), the share of the rate in each subspace, CRATE's R^c
and R(Q) through the decoder, for one or more models (SPEC §3.1)."""

from __future__ import annotations

from enum import Enum
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
from depict_analysis.choices import NORMALIZE_MODES, VIEWS
from depict_analysis.models.pretrained import DEFAULT_MODELS

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


@user_errors
def coding_rate(
    checkpoints: Optional[list[str]] = checkpoints_argument(),
    label: Optional[list[str]] = LabelOption,
    trace_files: Optional[list[str]] = TraceOption,
    save_trace: Optional[Path] = SaveTraceOption,
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(32, "--num-images", min=1, help="Images to analyse."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
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
    size: Optional[int] = typer.Option(
        None, "--size", min=1, help="Side of the square crops, in pixels.", show_default="each model's training size"
    ),
    out: Path = typer.Option(Path("figures/coding-rate"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Coding rate of the patch tokens in each layer's subspace, of the tokens, and of the class embeddings."""
    from depict_analysis.coding_rate_analysis import analyze_coding_rates
    from depict_analysis.inputs import image_batches

    check_out_dir(out)
    if trace_files and (images or dataset):
        fail("--trace files hold their images: give --trace or --images / --dataset, not both")
    source = image_source_options(images, dataset, data_root, split, num_images)
    settings = {"eps": eps, "normalize": normalize.value, "orthonormalize": orthonormalize, "view": view.value,
                "per_head": per_head}

    def batches_for(model):
        return image_batches(size or max(model.config.backbone.image_size), **source, batch_size=batch_size)

    count, models = runs(checkpoints, label, trace_files, batches_for, default=[f"{BUILTIN}{DEFAULT_MODELS[0]}"],
                         device=device, trust=trust, description="coding rate")
    inputs = None if trace_files else {"input": {key: value for key, value in source.items() if value}}
    comparison, written, saved = compare_runs(count, models, lambda traces, run: analyze_coding_rates(traces, **settings),
                                              save_trace=save_trace, inputs=inputs, out=out)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(rate_table_view(name, result))
    console.print("wrote " + ", ".join(map(str, written + saved)))
