"""``depict-analyze orthogonality``: PᵀP per layer and QᵀQ of one or more checkpoints (SPEC §3.3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    console,
    image_source_options,
    open_models,
    user_errors,
)
from depict_analysis.inputs import image_batches
from depict_analysis.orthogonality_analysis import analyze_orthogonality, summary_rows, write_orthogonality

COLUMNS = {  # header -> the row keys it shows (the first present)
    "matrix": ("name",),
    "n": ("size",),
    "‖PₖᵀPₖ−I‖/√p": ("head_orthonormality_mean",),
    "mean |off|": ("cross_head_mean_abs", "mean_abs_offdiag"),
    "centred |off|": ("mean_abs_offdiag_centred",),
    "coherence": ("coherence",),
    "coh./image": ("coherence_per_image_mean",),
}


def _cell(value) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def summary_table(rows: list[dict]) -> Table:
    """One section per checkpoint, one row per matrix."""
    table = Table(
        title="Orthogonality: P raw, Q̂ and cls_emb with rows normalised",
        caption="mean |off|: mean |PₖᵀPⱼ| over head pairs k≠j (P) or mean |off-diagonal| (Q); "
        "centred: of Q̂ minus its class mean (what the mask LayerNorm sees; floor 1/(K−1)); "
        "coherence: max |cos| between distinct vectors",
    )
    table.add_column("checkpoint", no_wrap=True)
    for header in COLUMNS:
        table.add_column(header, justify="right", no_wrap=header == "matrix")
    for i, row in enumerate(rows):
        first = i == 0 or rows[i - 1]["checkpoint"] != row["checkpoint"]
        if first and i:
            table.add_section()
        values = [next((row[k] for k in keys if row.get(k) is not None), None) for keys in COLUMNS.values()]
        table.add_row(row["checkpoint"] if first else "", *map(_cell, values))
    return table


@user_errors
def orthogonality(
    checkpoints: Optional[list[Path]] = typer.Argument(
        None, help="Our .pt files and/or official release folders, side by side (builtin:NAME too); "
        "default: the built-in DEPICT-SA, DEPICT-CA and Segmenter.",
    ),
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = typer.Option(16, "--num-images", min=1, help="Images to average the final Q̂ over."),
    out: Path = typer.Option(Path("figures/orthogonality"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Gram matrices PᵀP of every layer's subspaces and QᵀQ of the class embeddings, with scalar summaries."""
    check_out_dir(out)
    source = image_source_options(images, dataset, data_root, split, num_images)
    labels, names, results = [], [], []
    for label, name, model, _ in open_models(checkpoints, device, trust):
        total, batches = image_batches(max(model.config.backbone.image_size), **source)
        results.append(analyze_orthogonality(model, batches, total=total))
        labels.append(label)
        names.append(name)
    settings = {"input": {key: value for key, value in source.items() if value}}
    written = write_orthogonality(labels, names, results, out, settings)
    rows = [row for label, result in zip(labels, results) for row in summary_rows(label, result)]
    console.print(summary_table(rows))
    console.print("wrote " + ", ".join(map(str, written)))
