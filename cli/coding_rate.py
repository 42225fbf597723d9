"""``depict-analyze coding-rate``: R(Z_j), R(P_lᵀ Z_j) and R(Q) through the decoder (SPEC §3.1)."""

from __future__ import annotations

from enum import Enum
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
    SplitOption,
    TrustOption,
    check_out_dir,
    checkpoint_name,
    console,
    image_source_options,
    open_model,
    user_errors,
)
from depict_analysis.coding_rate import NORMALIZE_MODES
from depict_analysis.coding_rate_analysis import analyze_coding_rates, write_coding_rates
from depict_analysis.inputs import image_batches

Normalize = Enum("Normalize", {mode: mode for mode in NORMALIZE_MODES}, type=str)


def rate_table_view(result: dict) -> Table:
    """One column per layer j; rows R(Z_j) and each subspace's R(P_lᵀ Z_j), mean ± std over images."""
    n = result["settings"]["num_images"]
    table = Table(title=f"coding rate (nats), mean ± std over {n} images")
    table.add_column("rate", no_wrap=True)
    for j in result["layers"]:
        table.add_column(f"j = {j}", justify="right", no_wrap=True)

    def cells(stat: dict, *index: int) -> list[str]:
        return [f"{m:.2f} ± {s:.2f}" for m, s in zip(stat["mean"][index], stat["std"][index])]

    table.add_row("R(Z_j)", *cells(result["token_rate"]))
    for s, space in enumerate(result["subspaces"]):
        table.add_row(f"R(P_{space['name']}ᵀ Z_j)", *cells(result["subspace_rate"], s))
    return table


@user_errors
def coding_rate(
    checkpoint: Optional[Path] = typer.Argument(None, help=CheckpointHelp),
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
    orthonormalize: bool = typer.Option(False, "--orthonormalize", help="Orthonormal basis of each head's span."),
    per_head: bool = typer.Option(False, "--per-head", help="Also record R(P_kᵀ Z_j) for every head k (JSON, CSV)."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1, help="Side of the square crops, in pixels.", show_default="the model's training size"
    ),
    out: Path = typer.Option(Path("figures/coding-rate"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Coding rate of the patch tokens in each layer's subspace, of the tokens, and of the class embeddings."""
    check_out_dir(out)
    model, meta = open_model(checkpoint, device, trust)
    size = size or max(model.config.backbone.image_size)
    source = image_source_options(images, dataset, data_root, split, num_images)
    total, batches = image_batches(size, **source, batch_size=batch_size)
    settings = {"eps": eps, "normalize": normalize.value, "orthonormalize": orthonormalize, "per_head": per_head}
    result = analyze_coding_rates(model, batches, **settings, total=total)
    result["settings"] |= {"checkpoint": checkpoint_name(checkpoint, meta), "input": {k: v for k, v in source.items() if v is not None}}
    written = write_coding_rates(result, out)
    console.print(rate_table_view(result))
    console.print("wrote " + ", ".join(map(str, written)))
