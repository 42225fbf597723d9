"""``depict-analyze class-rates``: coding rate of each class's tokens and the rate reduction ΔR per layer,
for one or more models (checkpoints or saved traces: ``cli/runs.py``)."""

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
    SeedOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    console,
    fail,
    image_source_options,
    user_errors,
    warn,
)
from depict_analysis.choices import CLASS_BY
from depict_analysis.cli.options import LabelsOption, LevelOption, ResamplesOption, class_names
from depict_analysis.cli.runs import LabelOption, SaveTraceOption, TraceOption, checkpoints_argument, compare_runs, runs
from depict_analysis.models.pretrained import DEFAULT_MODELS

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


@user_errors
def class_rates(
    checkpoints: Optional[list[str]] = checkpoints_argument(),
    label: Optional[list[str]] = LabelOption,
    trace_files: Optional[list[str]] = TraceOption,
    save_trace: Optional[Path] = SaveTraceOption,
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
        None, "--size", min=1, help="Side of the square crops, in pixels.", show_default="each model's training size"
    ),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    out: Path = typer.Option(Path("figures/class-rates"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Per class: the coding rate of its tokens at every layer, and ΔR = R(Z) − Σ_c (N_c/N)·R(Z_c) (MCR²).

    Writes class_rates.png / .pdf (the rates per layer, one colour per model, and a class × layer
    heatmap per model), class_rates.json (per image and summarised, with bootstrap intervals) and
    class_rates.csv.
    """
    from depict_analysis.class_rates import analyze_class_rates
    from depict_analysis.inputs import image_batches
    from depict_analysis.uncertainty import Bootstrap

    check_out_dir(out)
    if labels and not images:
        fail("--labels goes with --images (a dataset brings its own labels)")
    if trace_files and (images or dataset):
        fail("--trace files hold their images: give --trace or --images / --dataset, not both")
    source = image_source_options(images, dataset, data_root, split, num_images) | ({"labels": labels} if labels else {})

    def batches_for(model):
        return image_batches(size or max(model.config.backbone.image_size), **source, batch_size=batch_size)

    count, models = runs(checkpoints, label, trace_files, batches_for, default=[f"{BUILTIN}{DEFAULT_MODELS[0]}"],
                         device=device, trust=trust, description="class rates")
    def analyze(traces, run):
        return analyze_class_rates(
            traces, by=by.value, eps=eps, normalize=normalize.value, bootstrap=Bootstrap(resamples, level, seed),
            class_names=class_names(run.info, source["dataset"]) if run.info is not None else None,
        )

    inputs = None if trace_files else {"input": {key: value for key, value in source.items() if value}}
    comparison, written, saved = compare_runs(count, models, analyze, save_trace=save_trace, inputs=inputs, out=out)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(rates_table(name, result))
        for warning in result.warnings():
            warn(warning)
    console.print("wrote " + ", ".join(map(str, written + saved)))
