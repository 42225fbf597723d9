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

from depict_analysis.cli.common import SeedOption, console, fail
from depict_analysis.cli.runs import RunOptions, trace_command

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


@trace_command(
    "figures/pca-seg", (32, "Images to score (with --images / --dataset)."), without=("labels",),
    checkpoints=typer.Argument(
        None, help="Checkpoints ([NAME=]SOURCE: .pt files, release folders, builtin:NAME, zoo:NAME; default the "
        "built-in DEPICT-SA), then images, one figure each (any size or mode).",
    ),
    size_help="Image side with --images / --dataset; cap on the short side of images given as arguments "
    "[default: each model's training size].",
)
def pca_seg(
    run: RunOptions,
    k: Optional[int] = typer.Option(None, "--k", min=2, help="Segments [default: classes the model predicts on at least 1 % of the image, 2..8]."),
    method: str = typer.Option("argmax", "--method", help="argmax (decoder's rule, sign-dependent) | kmeans (more robust)."),
    layers: str = typer.Option(
        "0,L1", "--layers", help="Tokens to compare: L1 = the mask head's embeddings (after the final LayerNorm); "
        "numbers or names (input, mssa3, ...) = the residual stream after that layer (pre-norm).",
    ),
    gt: Optional[list[Path]] = typer.Option(None, "--gt", help="Ground-truth label map per image, in order (class ids, 255 = ignore)."),
    examples: int = typer.Option(4, "--examples", min=0, help="Per-image figures to write (with --images / --dataset)."),
    seed: int = SeedOption,
):
    """PCA segmentation of the decoder's input tokens Z_0 versus the patch embeddings the mask head uses."""
    from depict_analysis.inputs import ImageSource
    from depict_analysis.models.sources import is_checkpoint
    from depict_analysis.pca import METHODS
    from depict_analysis.pca_analysis import analyze_pca, parse_layers

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    checkpoints = [a for a in run.checkpoints or [] if is_checkpoint(a)]
    image = [Path(a) for a in run.checkpoints or [] if not is_checkpoint(a)]
    if image and (run.images or run.dataset):
        fail("give images as arguments or --images / --dataset, not both")
    if gt and not image:
        fail("--gt goes with images given as arguments (dataset mode takes the dataset's labels)")
    if run.trace_files and (image or run.images or run.dataset):
        fail("--trace files hold their images: give --trace or images, not both")
    layer_spec = parse_layers(layers)
    source = ImageSource(images=image, labels=gt or (), view="whole", size=run.size) if image else run.source()
    run.checkpoints = checkpoints
    comparison = run.compare(analyze_pca, source=source, scored=not image, description="PCA segmentation", layers=layer_spec,
                             k=k, method=method, seed=seed, examples=len(image) if image else examples, score_figure=not image)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(summary_table(name, result))
    console.print("wrote " + ", ".join(map(str, comparison.files + comparison.trace_files)))
