"""``depict-analyze attention``: where each class query and head look, drawn over the image, for one or more
models (checkpoints or saved traces: ``cli/runs.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import SeedOption, console, fail, warn
from depict_analysis.cli.options import LevelOption, ResamplesOption
from depict_analysis.cli.runs import RunOptions, trace_command

if TYPE_CHECKING:  # the model stack is imported inside the command
    from depict_analysis.attention import AttentionMaps


def parse_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def parse_ints(text: str | None, option: str) -> list[int] | None:
    try:
        return [int(part) for part in parse_list(text)] if text else None
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")


def shares_table(label: str, result: AttentionMaps) -> Table:
    level = 100 * result.bootstrap.level
    table = Table(title=f"{label}: class queries' attention on their own class's patches (%), mean over heads and "
                        f"{len(result.images)} images [{level:g} % interval]",
                  caption=f"uniform attention: {result.share_chance().text(100)} %; "
                          f"classes by {result.settings['classes_by'].replace('_', ' ')}")
    for header in ("layer", "reading", "own class", "minus chance"):
        table.add_column(header, justify="left" if header in ("layer", "reading") else "right", no_wrap=True)
    for layer in result.class_layers:
        table.add_row(layer, result.readings[layer], result.share(layer).text(100), result.lift(layer).text(100))
    return table


@trace_command("figures/attention", (16, "Images behind the own-class shares."))
def attention(
    run: RunOptions,
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layer names, e.g. mssa1,msca3.",
                                         show_default="every layer with a map"),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated head indices.", show_default="all"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class names or ids whose queries to draw.",
                                          show_default="each image's largest classes, up to 4"),
    pixel: Optional[str] = typer.Option(None, "--pixel", help="Pixel Y,X of the cropped image whose patch's attention to draw.",
                                        show_default="none for joint maps, the centre for the others"),
    examples: int = typer.Option(2, "--examples", min=0, help="Images drawn (one figure per layer each)."),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
):
    """Attention maps over the image: each class query (MSCA, and the class tokens of MSSA / Segmenter's
    joint attention), a pixel's patch (MSSA), CBT's representatives and ToST's memberships, per head.

    Writes attention[_<label>]_<layer>_<i>.png / .pdf per model, layer and example image (one row per
    head), attention.png / .pdf (per model and layer the share of each class query's attention on its
    own class's patches, per head, against uniform attention), attention.json / .csv and
    attention.npz (the example images' maps on the patch grid).
    """
    from depict_analysis.attention import analyze_attention
    from depict_analysis.uncertainty import Bootstrap

    point = parse_ints(pixel, "--pixel")
    if point is not None and len(point) != 2:
        fail(f"--pixel takes Y,X, got {pixel!r}")
    comparison = run.compare(analyze_attention, description="attention", attention=True, layers=parse_list(layers),
                             heads=parse_ints(heads, "--heads"), pixel=tuple(point) if point else None,
                             classes=parse_list(classes), examples=examples, bootstrap=Bootstrap(resamples, level, seed))
    for name, result in zip(comparison.labels, comparison.results):
        if result.class_layers:
            console.print(shares_table(name, result))
        for warning in result.warnings():
            warn(warning)
    console.print(f"wrote {len(comparison.files)} files in {run.out}/" + "".join(f" and {path}" for path in comparison.trace_files))
