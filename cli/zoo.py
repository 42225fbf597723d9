"""``depict zoo``: the official Segmenter / DEPICT releases by name (``zoo:NAME`` in any command)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from depict_analysis.cli.common import console, new_app, user_errors

FAMILY_LABELS = {"depict_sa": "DEPICT-SA", "depict_ca": "DEPICT-CA", "mask_transformer": "mask", "linear": "linear"}

app = new_app("Official Segmenter / DEPICT releases by name: use zoo:NAME wherever a checkpoint goes.")


@app.command("list")
@user_errors
def list_models():
    """The zoo's models, their published mIoU, and which are in the cache (nothing is downloaded)."""
    from depict_analysis.models import zoo

    table = Table(title=f"depict zoo (cache: {zoo.cache_root() / 'zoo'})", box=None, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style="bold underline")  # no frame: the table fits 80 columns
    for column in ("name", "decoder", "backbone", "dataset", "mIoU SS/MS"):
        table.add_column(column, justify="right" if column.startswith("mIoU") else "left", no_wrap=True)
    table.add_column("cached")  # a DEPICT folder lists the releases cached from it
    for name, entry in zoo.REGISTRY.items():
        cached = zoo.cached_releases(name)
        if entry.drive_folder is not None:  # a folder of releases: which of them are here
            cached_text = ", ".join(cached) or "no"
        else:
            cached_text = "yes" if cached else "no"
        miou = f"{entry.miou[0]:.1f}/{entry.miou[1]:.1f}" if entry.miou else "-"
        table.add_row(name, FAMILY_LABELS[entry.family], entry.backbone, entry.dataset, miou, cached_text)
    console.print(table)


@app.command()
@user_errors
def fetch(
    name: str = typer.Argument(..., help="A zoo name (depict zoo list); a DEPICT release as depict-sa/FOLDER."),
    force: bool = typer.Option(False, "--force", help="Download again, replacing the cached files."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr, when it is a terminal)."),
):
    """Download a zoo model into the cache (resuming a cut download) and verify it; print its files and folder."""
    from depict_analysis.models import zoo

    folder = zoo.zoo_path(name, progress=progress, force=force)
    table = Table(title=f"zoo:{name}")
    for column in ("file", "MB", "sha256"):
        table.add_column(column, justify="right" if column == "MB" else "left")
    for path, record in zoo.release_records(name).items():
        table.add_row(path, f"{record['size'] / 1e6:.1f}", record["sha256"][:16])
    console.print(table)
    typer.echo(folder)  # alone on the last line, for scripts


@app.command("import")
@user_errors
def import_(
    name: str = typer.Argument(..., help="A zoo name (depict zoo list); for a DEPICT release, depict-sa (the folder's name is the release) or depict-sa/FOLDER."),
    path: Path = typer.Argument(..., help="The release downloaded elsewhere: its folder (checkpoint.pth + variant.yml) or its checkpoint.pth."),
    force: bool = typer.Option(False, "--force", help="Replace cached files that differ from these."),
):
    """Register a release downloaded elsewhere (no network here): copy it into the zoo cache, checked against
    the published sha256 where there is one and what the cache recorded before; print its folder."""
    from depict_analysis.models import zoo

    folder = zoo.import_release(name, path, force=force)
    named = name if "/" in name or zoo.REGISTRY[name].drive_folder is None else f"{name}/{folder.name}"
    console.print(f"imported {path}: use it as zoo:{named}")
    typer.echo(folder)  # alone on the last line, for scripts
