"""``depict-analyze ablate``: remove each head, subspace or class embedding in turn and re-score (SPEC §3.5)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    DataRootOption,
    DeviceOption,
    SeedOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    console,
    sharded,
    user_errors,
    warn,
)
from depict_analysis.cli.options import LevelOption, ResamplesOption

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.ablation import Ablation

UnitKind = Enum("UnitKind", {name: name for name in ("head", "subspace", "class")}, type=str)
Mode = Enum("Mode", {name: name for name in ("zero", "mean")}, type=str)


def ablation_table(result: Ablation) -> Table:
    """Per model the clean mIoU, then one row per unit: mIoU change (points) with its interval and the
    class concentration of its losses."""
    level = result.bootstrap.level
    table = Table(title=f"{result.settings['mode']}-ablation of each {result.settings['unit']}: mIoU change (points) "
                        f"[{100 * level:g} % paired bootstrap interval]")
    for column in ("model", "unit", "mIoU (%)", "change (points)", "class concentration"):
        table.add_column(column, justify="left" if column in ("model", "unit") else "right", overflow="fold")
    for label in result.labels:
        table.add_row(label, "clean", result.clean(label).text(100), "", result.model_concentration(label).text())
        for row in result.unit_rows(label):
            table.add_row("", row["unit"], row["miou"].text(100), row["change"].text(100), row["concentration"].text())
        table.add_section()
    return table


@user_errors
def ablate(
    checkpoints: Optional[list[Path]] = typer.Argument(
        None, help="Our .pt files and/or official release folders (builtin:NAME too); default: the built-in DEPICT-SA, "
        "DEPICT-CA and Segmenter."
    ),
    unit: UnitKind = typer.Option("head", "--unit", help="What to remove: each attention head, each head's subspace "
                                  "(tokens projected out of it after its layer), or each class embedding of the mask head."),
    mode: Mode = typer.Option("zero", "--mode", help="zero: remove it; mean: replace it by its mean over the images."),
    dataset: str = typer.Option("synthetic", "--dataset", help="ade20k | pascal_context | pascal_context59 | cityscapes | folder | synthetic"),
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(64, "--num-images", min=1, help="Images scored with every unit removed (the first N; the demo's number)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sliding windows per forward pass."),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    out: Path = typer.Option(Path("figures/ablation"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """mIoU and per-class IoU with each unit of the decoder removed, against the clean model, with paired
    bootstrap intervals over images; a unit × class heatmap of the IoU change per model.

    Images are scored as depict eval scores them (test resize, sliding windows, merged logits): the
    clean mIoU is depict eval's on the same images. The backbone runs once per window; the decoder
    runs once per unit. --mode mean takes the means over the same images first (one more clean pass).
    """
    from depict_analysis.ablation import NAME, run_ablation
    from depict_analysis.foundation.distributed import is_writer
    from depict_analysis.models.data import build_dataset
    from depict_analysis.robustness import EvaluationImages
    from depict_analysis.uncertainty import Bootstrap

    check_out_dir(out)
    images = EvaluationImages(build_dataset(dataset, data_root, split), num_images=num_images, batch_size=batch_size)
    with sharded(device) as run_device:  # under torchrun: each process its share, rank 0 writes and prints
        result = run_ablation(checkpoints, images, unit=unit.value, mode=mode.value, bootstrap=Bootstrap(resamples, level, seed),
                              device=run_device, trust=trust)
        if not is_writer():
            return
    result.save(out)
    console.print(ablation_table(result))
    for warning in result.warnings():
        warn(warning)
    console.print(f"wrote {out}/{NAME}.png, .pdf, .json, .csv, .npz")
