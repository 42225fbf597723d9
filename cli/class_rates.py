"""``depict-analyze class-rates``: coding rate of each class's tokens and the rate reduction ΔR per layer."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    CheckpointHelp,
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SeedOption,
    SplitOption,
    TrustOption,
    console,
    fail,
    image_source_options,
    user_errors,
)
from depict_analysis.cli.options import LabelsOption, LevelOption, ResamplesOption, SaveTraceOption, class_names

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.class_rates import ClassRatesResult

By = Enum("By", {"ground_truth": "ground_truth", "prediction": "prediction"}, type=str)
Normalize = Enum("Normalize", {"l2": "l2", "none": "none"}, type=str)


def rates_table(result: ClassRatesResult) -> Table:
    """One row per token stage: R(Z_j), the class-weighted rate and ΔR_j, each mean [interval]."""
    summary = result.summary()
    level = 100 * result.bootstrap.level
    table = Table(title=f"coding rates (nats), mean over {len(result.images)} images [{level:g} % interval]",
                  caption=f"classes by {summary['by'].replace('_', ' ')}")
    for header in ("stage", "R(Z_j)", "Σ_c N_c/N R(Z_j,c)", "ΔR_j"):
        table.add_column(header, justify="right" if header != "stage" else "left", no_wrap=True)
    for j, layer in enumerate(result.layers):
        table.add_row(layer, *(result.interval(values)[j].text(digits=4) for values in (result.total, result.within, result.delta)))
    return table


@user_errors
def class_rates(
    checkpoint: Optional[Path] = typer.Argument(None, help=CheckpointHelp),
    images: Optional[list[Path]] = ImagesOption,
    labels: Optional[list[Path]] = LabelsOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    by: By = typer.Option("ground_truth", "--by", help="Class of each patch: majority ground-truth label, or the model's prediction."),
    num_images: int = typer.Option(32, "--num-images", min=1, help="Images to analyse."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    eps: float = typer.Option(0.1, "--eps", min=1e-12, help="Distortion ε of R(Z) = ½ logdet(I + m/(N ε²) ZᵀZ)."),
    normalize: Normalize = typer.Option("l2", "--normalize", help="Unit tokens in R^d (l2) or raw tokens (none)."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1, help="Side of the square crops, in pixels.", show_default="the model's training size"
    ),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    save_trace: Optional[Path] = SaveTraceOption,
    out: Path = typer.Option(Path("figures/class-rates"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Per class: the coding rate of its tokens at every layer, and ΔR = R(Z) − Σ_c (N_c/N)·R(Z_c) (MCR²).

    Writes class_rates.png / .pdf (the rates per layer and a class × layer heatmap), class_rates.json
    (per image and summarised, with bootstrap intervals) and class_rates.csv.
    """
    from depict_analysis.class_rates import analyze_class_rates
    from depict_analysis.inputs import image_batches
    from depict_analysis.models.device import resolve_device
    from depict_analysis.models.sources import open_checkpoint
    from depict_analysis.uncertainty import Bootstrap

    if labels and not images:
        fail("--labels goes with --images (a dataset brings its own labels)")
    model, info = open_checkpoint(str(checkpoint) if checkpoint else None, resolve_device(device), trust)
    source = image_source_options(images, dataset, data_root, split, num_images) | ({"labels": labels} if labels else {})
    total, batches = image_batches(size or max(model.config.backbone.image_size), **source, batch_size=batch_size)
    result = analyze_class_rates(
        model, batches, by=by.value, eps=eps, normalize=normalize.value, class_names=class_names(info, source["dataset"]),
        bootstrap=Bootstrap(resamples, level, seed), save_trace=save_trace, total=total,
    )
    result.settings |= {"checkpoint": info.source, "input": {k: v for k, v in source.items() if v}}
    written = result.save(out)
    console.print(rates_table(result))
    for warning in result.warnings():
        console.print(f"[yellow]warning:[/] {warning}")
    console.print("wrote " + ", ".join(map(str, written + ([save_trace] if save_trace else []))))
