"""``depict-analyze pca-seg``: PCA segmentation of Z_0 versus Z_L1, for one or more models (SPEC §3.2).

Two modes: ``pca-seg [CKPT...] IMAGE... [--gt MASK...]`` writes one figure per image (each at its own
size, the short side capped at the model's training size; one row per model); ``--images DIR`` /
``--dataset NAME`` scores many images, plots the score distributions per layer and model, and writes
a few example figures.
"""

from __future__ import annotations

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
    require_dataset_classes,
    user_errors,
)
from depict_analysis.cli.runs import LabelOption, SaveTraceOption, TraceOption, compare_runs, is_checkpoint, runs
from depict_analysis.models.pretrained import DEFAULT_MODELS

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.pca_analysis import PCASegmentation

SHORT_REFERENCE = {"prediction": "prediction", "ground_truth": "ground truth"}


def summary_table(label: str, result: PCASegmentation) -> Table:
    """Mean ± std of each score, one row per (reference, source)."""
    from depict_analysis.pca_analysis import REFERENCES, SCORES

    table = Table(title=f"{label}: PCA segmentation agreement, mean ± std over {result.num_images} image(s)")
    for header in ("against", "segmentation"):
        table.add_column(header, no_wrap=True)
    for header in ("ARI", "NMI", "mIoU"):
        table.add_column(header, justify="right", no_wrap=True)
    for ref in REFERENCES:
        for source, stats in result.scores.get(ref, {}).items():
            table.add_row(SHORT_REFERENCE[ref], source, *(f"{stats[s].mean:.3f} ± {stats[s].std:.3f}" for s in SCORES))
    return table


@user_errors
def pca_seg(
    arguments: Optional[list[str]] = typer.Argument(
        None, help="Checkpoints ([NAME=]SOURCE: .pt files, release folders, builtin:NAME, zoo:NAME; default the "
        "built-in DEPICT-SA), then images, one figure each (any size or mode).",
    ),
    label: Optional[list[str]] = LabelOption,
    trace_files: Optional[list[str]] = TraceOption,
    save_trace: Optional[Path] = SaveTraceOption,
    k: Optional[int] = typer.Option(None, "--k", min=2, help="Segments [default: classes the model predicts on at least 1 % of the image, 2..8]."),
    method: str = typer.Option("argmax", "--method", help="argmax (decoder's rule, sign-dependent) | kmeans (more robust)."),
    layers: str = typer.Option(
        "0,L1", "--layers", help="Tokens to compare: L1 = the mask head's embeddings (after the final LayerNorm); "
        "numbers or names (input, mssa3, ...) = the residual stream after that layer (pre-norm).",
    ),
    gt: Optional[list[Path]] = typer.Option(None, "--gt", help="Ground-truth label map per image, in order (class ids, 255 = ignore)."),
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(32, "--num-images", min=1, help="Images to score (with --images / --dataset)."),
    examples: int = typer.Option(4, "--examples", min=0, help="Per-image figures to write (with --images / --dataset)."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1,
        help="Image side with --images / --dataset; cap on the short side of images given as arguments "
        "[default: each model's training size].",
    ),
    out: Path = typer.Option(Path("figures/pca-seg"), "--out", help="Output folder."),
    seed: int = SeedOption,
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """PCA segmentation of the decoder's input tokens Z_0 versus the patch embeddings the mask head uses."""
    from depict_analysis.inputs import image_batches
    from depict_analysis.pca import METHODS
    from depict_analysis.pca_analysis import analyze_pca, parse_layers, single_images

    check_out_dir(out)
    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    checkpoints = [a for a in arguments or [] if is_checkpoint(a)]
    image = [Path(a) for a in arguments or [] if not is_checkpoint(a)]
    if image and (images or dataset):
        fail("give images as arguments or --images / --dataset, not both")
    if gt and not image:
        fail("--gt goes with images given as arguments (dataset mode takes the dataset's labels)")
    if trace_files and (image or images or dataset):
        fail("--trace files hold their images: give --trace or images, not both")
    layer_spec = parse_layers(layers)
    source = {} if image else image_source_options(images, dataset, data_root, split, num_images)

    def batches_for(model):
        side = size or max(model.config.backbone.image_size)
        if image:
            return single_images(image, side, gt)
        require_dataset_classes(model, source)  # scores against another dataset's labels would mean nothing
        return image_batches(side, **source)

    count, models = runs(checkpoints, label, trace_files, batches_for, default=[f"{BUILTIN}{DEFAULT_MODELS[0]}"],
                         device=device, trust=trust, description="PCA segmentation")
    inputs = None if trace_files else {
        "input": {"images": image, "ground_truth": gt} if image else {key: value for key, value in source.items() if value}}

    def analyze(traces, run):
        return analyze_pca(traces, layers=layer_spec, k=k, method=method, seed=seed,
                           examples=len(image) if image else examples, class_names=run.class_names,
                           palette=run.palette, score_figure=not image)

    comparison, written, saved = compare_runs(count, models, analyze, save_trace=save_trace, inputs=inputs, out=out)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(summary_table(name, result))
    console.print("wrote " + ", ".join(map(str, written + saved)))
