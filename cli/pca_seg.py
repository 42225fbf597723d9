"""``depict-analyze pca-seg``: PCA segmentation of Z_0 versus Z_L1 (SPEC §3.2).

Two modes: ``pca-seg IMAGE... [--gt MASK...]`` writes one figure per image (each at its own size,
the short side capped at the model's training size); ``--images DIR`` / ``--dataset NAME`` scores
many images, plots the score distributions per layer, and writes a few example figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    check_out_dir,
    checkpoint_name,
    console,
    fail,
    image_source_options,
    open_model,
    require_dataset_classes,
    user_errors,
)
from depict_analysis.inputs import image_batches
from depict_analysis.pca import METHODS
from depict_analysis.pca_analysis import (
    REFERENCES,
    SCORES,
    analyze_pca,
    checkpoint_dataset,
    class_legend,
    parse_layers,
    single_images,
    write_pca,
)

SHORT_REFERENCE = {"prediction": "prediction", "ground_truth": "ground truth"}


def summary_table(summary: dict, n: int) -> Table:
    """Mean ± std of each score, one row per (reference, source)."""
    table = Table(title=f"PCA segmentation agreement, mean ± std over {n} image(s)")
    for header in ("against", "segmentation"):
        table.add_column(header, no_wrap=True)
    for header in ("ARI", "NMI", "mIoU"):
        table.add_column(header, justify="right", no_wrap=True)
    for ref in REFERENCES:
        for source, stats in summary.get(ref, {}).items():
            table.add_row(SHORT_REFERENCE[ref], source, *(f"{stats[s]['mean']:.3f} ± {stats[s]['std']:.3f}" for s in SCORES))
    return table


@user_errors
def pca_seg(
    image: Optional[list[Path]] = typer.Argument(None, help="Images, one figure each (any size or mode)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help=CheckpointHelp),
    k: Optional[int] = typer.Option(None, "--k", min=2, help="Segments [default: classes the model predicts, 2..8]."),
    method: str = typer.Option("argmax", "--method", help="argmax (decoder's rule, sign-dependent) | kmeans (more robust)."),
    layers: str = typer.Option("0,L1", "--layers", help="Token layers to compare: numbers, L1 = last MSSA layer."),
    gt: Optional[list[Path]] = typer.Option(None, "--gt", help="Ground-truth label map per IMAGE, in order (class ids, 255 = ignore)."),
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(32, "--num-images", min=1, help="Images to score (with --images / --dataset)."),
    examples: int = typer.Option(4, "--examples", min=0, help="Per-image figures to write (with --images / --dataset)."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1,
        help="Image side with --images / --dataset; cap on the short side of IMAGEs [default: the model's training size].",
    ),
    out: Path = typer.Option(Path("figures/pca-seg"), "--out", help="Output folder."),
    seed: int = SeedOption,
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """PCA segmentation of the decoder's input tokens Z_0 versus the tokens after the last MSSA layer."""
    check_out_dir(out)
    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if image and (images or dataset):
        fail("give IMAGE arguments or --images / --dataset, not both")
    if gt and not image:
        fail("--gt goes with IMAGE arguments (dataset mode takes the dataset's labels)")
    layer_spec = parse_layers(layers)
    model, meta = open_model(ckpt, device, trust)
    size = size or max(model.config.backbone.image_size)
    if image:
        total, batches = single_images(image, size, gt)
        source, examples = {"images": image, "ground_truth": gt}, total
    else:
        source = image_source_options(images, dataset, data_root, split, num_images)
        require_dataset_classes(model, source)
        total, batches = image_batches(size, **source)
    result = analyze_pca(model, batches, layers=layer_spec, k=k, method=method, seed=seed, examples=examples, total=total)
    names, palette = class_legend(model.n_cls, [source.get("dataset"), checkpoint_dataset(meta)])
    settings = {"checkpoint": checkpoint_name(ckpt, meta), "input": {key: value for key, value in source.items() if value}}
    written = write_pca(result, out, names, palette, settings=settings, score_figure=not image)
    console.print(summary_table(result["summary"], len(result["images"])))
    console.print("wrote " + ", ".join(map(str, written)))
