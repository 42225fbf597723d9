"""``depict-analyze pca-seg``: PCA segmentation of Z_0 versus Z_L1, for one or more models (SPEC §3.2).

Two modes: ``pca-seg [CKPT...] --images IMAGE ... [--labels MASK ...]`` with image files writes one
figure per image (each at its own size, the short side capped at the model's training size; one row
per model; label maps matched by file stem); ``--images DIR`` / ``--dataset NAME`` scores many images,
plots the score distributions per layer and model, and writes a few example figures.
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
    "figures/pca-seg", (32, "Images to score (with an --images folder / --dataset)."),
    size_help="Image side with an --images folder / --dataset; cap on the short side of image files "
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
    examples: int = typer.Option(4, "--examples", min=0, help="Per-image figures to write (with --images / --dataset)."),
    seed: int = SeedOption,
):
    """PCA segmentation of the decoder's input tokens Z_0 versus the patch embeddings the mask head uses."""
    from depict_analysis.inputs import ImageSource, image_files, matching_labels
    from depict_analysis.pca import METHODS
    from depict_analysis.pca_analysis import analyze_pca, parse_layers

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    run.models()  # an image among the models is refused with where it goes
    layer_spec = parse_layers(layers)
    image = []
    if run.images and all(Path(p).is_file() for p in run.images):  # image files: one figure each, at their own size
        image = image_files(run.images)
        truth = matching_labels(image, run.labels) if run.labels else ()
        source = ImageSource(images=image, labels=truth, view="whole", size=run.size)
    else:
        source = run.source()
    comparison = run.compare(analyze_pca, source=source, scored=not image, description="PCA segmentation", layers=layer_spec,
                             k=k, method=method, seed=seed, examples=len(image) if image else examples, score_figure=not image)
    for name, result in zip(comparison.labels, comparison.results):
        console.print(summary_table(name, result))
    console.print("wrote " + ", ".join(map(str, comparison.files + comparison.trace_files)))
