"""``depict-analyze demo`` and ``depict-analyze report``: every analysis at once (``depict_analysis.suite``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    BUILTIN,
    CheckpointHelp,
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SeedOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    check_out_file,
    console,
    image_source_options,
    open_models,
    user_errors,
)
from depict_analysis.report import write_report
from depict_analysis.suite import SuiteModel, SuiteSettings, run_demo, run_suite
from depict_analysis.models.device import resolve_device
from depict_analysis.models.pretrained import DEFAULT_MODELS

NumImagesOption = typer.Option(64, "--num-images", min=1, help="Images per analysis.")
DrawsOption = typer.Option(3, "--draws", min=1, help="Noise draws per σ in the robustness sweep.")


def claims_table(summary: dict) -> Table:
    table = Table(title="The paper's claims on these numbers")
    table.add_column("claim")
    table.add_column("holds", justify="center")
    table.add_column("values", justify="right")
    for claim in summary["claims"]:
        values = ", ".join(f"{k} {'—' if v is None else f'{v:.3g}'}" for k, v in claim["values"].items())
        table.add_row(claim["claim"], "[green]yes" if claim["holds"] else "[red]no", values)
    return table


@user_errors
def demo(
    out: Path = typer.Option(Path("figures"), "--out", help="Output folder: one sub-folder per analysis, summary.json."),
    num_images: int = NumImagesOption,
    draws: int = DrawsOption,
    seed: int = SeedOption,
    device: str = DeviceOption,
):
    """All four analyses on the built-in models and the synthetic validation split (~15 s on 2 CPU cores).

    coding-rate and pca-seg on DEPICT-SA; orthogonality and robustness (Gaussian decoder noise)
    compare DEPICT-SA, DEPICT-CA and Segmenter. Writes every figure and summary.json.
    """
    check_out_dir(out)
    settings = SuiteSettings(num_images=num_images, draws=draws, seed=seed)
    summary = run_demo(out, resolve_device(device), settings)
    console.print(claims_table(summary))
    console.print(f"wrote {out}/{{coding-rate,pca-seg,orthogonality,robustness}}/ and {out}/summary.json "
                  f"in {summary['seconds']['total']:.0f} s")


@user_errors
def report(
    checkpoint: Optional[Path] = typer.Argument(None, help=CheckpointHelp),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML page to write."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Folder for the figures and numbers behind the page.", show_default="<out stem>_data beside it"
    ),
    compare: Optional[list[Path]] = typer.Option(
        None, "--compare", help="Checkpoints to show beside it in orthogonality and robustness (repeatable; builtin:NAME too)."
    ),
    images: Optional[list[Path]] = ImagesOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = NumImagesOption,
    draws: int = DrawsOption,
    seed: int = SeedOption,
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """One self-contained HTML page (figures embedded) with every analysis of a checkpoint and its numbers."""
    check_out_file(out)
    check_out_dir(data or out.with_name(f"{out.stem}_data"))
    paths = [checkpoint or Path(f"{BUILTIN}{DEFAULT_MODELS[0]}"), *(compare or [])]
    models = [SuiteModel(label, source, model, meta) for label, source, model, meta in open_models(paths, device, trust)]
    source = image_source_options(images, dataset, data_root, split, num_images)
    images_from = {k: v for k, v in source.items() if k != "num_images" and v is not None}
    settings = SuiteSettings(source=images_from, num_images=num_images, draws=draws, seed=seed)
    folder = data or out.with_name(f"{out.stem}_data")
    summary = run_suite(models[0], models, folder, settings)
    title = f"depict-analysis report: {models[0].label}"
    written = write_report(summary, folder, out, title)
    if summary["claims"]:
        console.print(claims_table(summary))
    console.print(f"wrote {written} (figures and numbers in {folder}/)")
