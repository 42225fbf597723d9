"""``depict-analyze demo`` and ``depict-analyze report``: every analysis at once (``depict_analysis.suite``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
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
    warn,
)
from depict_analysis.cli.options import LevelOption, ResamplesOption

if TYPE_CHECKING:  # the model stack is imported inside the commands: `--help` stays fast
    from depict_analysis.suite import SuiteResult

NumImagesOption = typer.Option(64, "--num-images", min=1, help="Images per analysis.")
DrawsOption = typer.Option(3, "--draws", min=1, help="Noise draws per σ in the robustness sweep.")
VERDICT_STYLE = {"holds": "green", "does not hold": "red", "not decided": "yellow"}


def findings_table(result: SuiteResult, kind: str) -> Table:
    """The claims (or observations) with their verdicts, values and intervals."""
    title = "The paper's claims on these numbers" if kind == "claim" else "Observations (not the paper's claims)"
    table = Table(title=f"{title} [{100 * result.settings.level:g} % intervals]", show_lines=True)
    table.add_column("statement")
    table.add_column("verdict", justify="center")
    table.add_column("values [interval]", justify="right")
    table.add_column("difference", justify="right")
    for finding in (f for f in result.findings if f.kind == kind):  # escaped: "[central 95 %]" is no markup
        statement = escape(finding.statement) + "".join(f"\n[dim]{escape(note)}[/]" for note in finding.notes)
        values = "\n".join(f"{label} {value.text()}" for label, value in finding.values.items())
        style = VERDICT_STYLE[finding.verdict]
        difference = finding.difference.text() if finding.difference else "exact"
        table.add_row(statement, f"[{style}]{finding.verdict}", escape(values), escape(difference))
    return table


def print_findings(result: SuiteResult) -> None:
    console.print(findings_table(result, "claim"))
    if any(f.kind == "observation" for f in result.findings):
        console.print(findings_table(result, "observation"))
    for warning in result.warnings:
        warn(warning)


@user_errors
def demo(
    out: Path = typer.Option(Path("figures"), "--out", help="Output folder: one sub-folder per analysis, summary.json."),
    page: Optional[Path] = typer.Option(None, "--report", help="Also write the HTML report of the run to this file."),
    num_images: int = NumImagesOption,
    draws: int = DrawsOption,
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    device: str = DeviceOption,
):
    """All four analyses on the built-in models and the synthetic validation split, and the paper's claims judged on them.

    coding-rate and pca-seg on DEPICT-SA; orthogonality and robustness (Gaussian decoder noise)
    compare DEPICT-SA, DEPICT-CA and Segmenter. Writes every figure and summary.json (and with
    --report the HTML page of `depict-analyze report`).
    """
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.report import write_report
    from depict_analysis.suite import SuiteSettings, run_demo

    check_out_dir(out)
    if page is not None:
        check_out_file(page)
    settings = SuiteSettings(num_images=num_images, draws=draws, seed=seed, level=level, resamples=resamples)
    result = run_demo(out, resolve_device(device), settings)
    print_findings(result)
    if page is not None:
        console.print(f"wrote {write_report(result, out, page, 'depict-analysis demo: the built-in models')}")
    console.print(f"wrote {out}/{{coding-rate,pca-seg,orthogonality,robustness}}/ and {out}/summary.json "
                  f"in {result.seconds['total']:.0f} s")


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
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """One self-contained HTML page (figures embedded) with every analysis of a checkpoint, its numbers with
    intervals, and the paper's claims judged on them."""
    from depict_analysis.models.pretrained import DEFAULT_MODELS
    from depict_analysis.report import write_report
    from depict_analysis.suite import SuiteModel, SuiteSettings, run_suite

    paths = [checkpoint or Path(f"{BUILTIN}{DEFAULT_MODELS[0]}"), *(compare or [])]
    check_out_file(out, inputs=[*paths, *(images or [])])
    check_out_dir(data or out.with_name(f"{out.stem}_data"))
    models = [SuiteModel(label, source, model, meta) for label, source, model, meta in open_models(paths, device, trust)]
    source = image_source_options(images, dataset, data_root, split, num_images)
    images_from = {k: v for k, v in source.items() if k != "num_images" and v is not None}
    settings = SuiteSettings(source=images_from, num_images=num_images, draws=draws, seed=seed, level=level, resamples=resamples)
    folder = data or out.with_name(f"{out.stem}_data")
    result = run_suite(models, folder, settings)
    written = write_report(result, folder, out, f"depict-analysis report: {models[0].label}")
    print_findings(result)
    console.print(f"wrote {written} (figures and numbers in {folder}/)")
