"""``depict-analyze demo`` and ``depict-analyze report``: every analysis at once (``depict_analysis.suite``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
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
    check_out_file,
    console,
    image_source,
    note_builtin_models,
    refuse_images,
    sharded,
    user_errors,
    warn,
)
from depict_analysis.cli.options import LevelOption, ResamplesOption
from depict_analysis.models.pretrained import BUILTIN, DEFAULT_MODELS

if TYPE_CHECKING:  # the model stack is imported inside the commands: `--help` stays fast
    from depict_analysis.suite import SuiteResult

NumImagesOption = typer.Option(64, "--num-images", min=1, help="Images per analysis.")
DrawsOption = typer.Option(3, "--draws", min=1, help="Noise draws per σ in the robustness sweep.")
DemoDrawsOption = typer.Option(2, "--draws", min=1, help="Noise draws per σ in the robustness sweep (robustness's own default: 3).")
SweepImagesOption = typer.Option(
    32, "--sweep-images", min=1, help="Images of the robustness sweep and the head ablation, the first of --num-images "
    "(the robustness and ablate commands keep their own defaults).")
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


ModelsArgument = typer.Argument(None, help="Models, [NAME=]SOURCE: our .pt files (a run is named after its folder), "
                                "official release folders, builtin:NAME, zoo:NAME; the first is the primary.")
LabelsOption = typer.Option(None, "--labels", help="Label maps for --images (class ids, 255 = ignore), files or folders "
                            "matched by file stem; without them the findings read the models' own predictions.")


def run_and_report(models: list[str], folder: Path, page: Path, title: str, images, labels, dataset, data_root, split,
                   num_images, draws, seed, level, resamples, device, trust=False, sweep_images=None, threads=None) -> None:
    """``run_suite`` of ``models`` on the images the options name, its files under ``folder``, its page at ``page``."""
    from depict_analysis.foundation.distributed import is_writer
    from depict_analysis.models.sources import labelled_sources
    from depict_analysis.report import write_report
    from depict_analysis.suite import SuiteSettings, run_suite

    refuse_images(models, "depict-analyze report MODEL")
    check_out_dir(folder)
    check_out_file(page, inputs=[*models, *(images or []), *(labels or [])])
    source = image_source(images, dataset, data_root, split, num_images, labels).describe()
    images_from = {key: value for key, value in source.items() if key != "num_images"}
    named = labelled_sources(models)
    note_builtin_models([s for _, s in named], [label for label, _ in named], images_from.get("dataset"))
    settings = SuiteSettings(source=images_from, num_images=num_images, draws=draws, seed=seed, level=level, resamples=resamples,
                             sweep_images=sweep_images, threads=threads)
    with sharded(device) as run_device:  # under torchrun: each process its share of the images, rank 0 writes
        result = run_suite(models, folder, settings, device=run_device, trust=trust)
        if not is_writer():
            return
    written = write_report(result, folder, page, title.format(primary=result.primary.label))
    print_findings(result)
    console.print(f"wrote {written} (figures and numbers in {folder}/, summary.json) in {result.seconds['total']:.0f} s")


@user_errors
def demo(
    models: Optional[list[str]] = ModelsArgument,
    out: Path = typer.Option(Path("depict-demo"), "--out", help="Output folder: one sub-folder per analysis, summary.json."),
    page: Optional[Path] = typer.Option(None, "--report", help="The HTML report of the run.", show_default="<out>/report.html"),
    images: Optional[list[Path]] = ImagesOption,
    labels: Optional[list[Path]] = LabelsOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    num_images: int = NumImagesOption,
    sweep_images: int = SweepImagesOption,
    draws: int = DemoDrawsOption,
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    device: str = DeviceOption,
):
    """Every analysis on the built-in models (or MODELS) and the synthetic validation split (or your --images,
    with or without --labels, or a --dataset), and the paper's claims judged on them.

    coding-rate and pca-seg on the first model; orthogonality, class-rates, attention and robustness (Gaussian
    decoder noise; needs labels) compare them all. Writes every figure, summary.json and the HTML report into a
    folder of its own (the README's gallery is regenerated by `python -m depict_analysis.gallery`).
    """
    chosen = models or [f"{BUILTIN}{name}" for name in DEFAULT_MODELS]
    run_and_report(chosen, out, page or out / "report.html", "depict-analysis demo: {primary} and the others", images,
                   labels, dataset, data_root, split, num_images, draws, seed, level, resamples, device,
                   sweep_images=sweep_images, threads=None if models else 1)  # the toy models are too small for 2 threads to pay


@user_errors
def report(
    models: Optional[list[str]] = ModelsArgument,
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML page to write."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Folder for the figures and numbers behind the page.", show_default="<out stem>_data beside it"
    ),
    compare: Optional[list[str]] = typer.Option(
        None, "--compare", help="More models to show beside the first (repeatable; [NAME=]SOURCE, builtin:NAME too)."
    ),
    images: Optional[list[Path]] = ImagesOption,
    labels: Optional[list[Path]] = LabelsOption,
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
    """One self-contained HTML page (figures embedded) with every analysis of the models (default: the built-in
    DEPICT-SA) on the synthetic validation split, a --dataset or your --images (with or without --labels), the
    numbers with intervals, and the paper's claims judged on them."""
    chosen = [*(models or [f"{BUILTIN}{DEFAULT_MODELS[0]}"]), *(compare or [])]
    run_and_report(chosen, data or out.with_name(f"{out.stem}_data"), out, "depict-analysis report: {primary}", images,
                   labels, dataset, data_root, split, num_images, draws, seed, level, resamples, device, trust)
