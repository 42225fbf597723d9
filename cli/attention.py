"""``depict-analyze attention``: where each class query and head look, drawn over the image, for one or more
models (checkpoints or saved traces: ``cli/runs.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
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
    console,
    fail,
    image_source_options,
    user_errors,
    warn,
)
from depict_analysis.cli.options import LabelsOption, LevelOption, ResamplesOption, class_names
from depict_analysis.cli.runs import LabelOption, SaveTraceOption, TraceOption, checkpoints_argument, compare_runs, runs
from depict_analysis.models.pretrained import DEFAULT_MODELS

if TYPE_CHECKING:  # the model stack is imported inside the command
    from depict_analysis.attention import AttentionMaps


def parse_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def parse_ints(text: str | None, option: str) -> list[int] | None:
    try:
        return [int(part) for part in parse_list(text)] if text else None
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")


def class_ids(text: str | None, names: list[str]) -> list[int] | None:
    """``"background,3"`` -> class ids: names (any case) or ids."""
    lookup = {name.lower(): c for c, name in enumerate(names)}
    ids = []
    for part in parse_list(text) or []:
        if part.isdigit() and int(part) < len(names):
            ids.append(int(part))
        elif part.lower() in lookup:
            ids.append(lookup[part.lower()])
        else:
            fail(f"--classes: no class {part!r}; classes: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    return ids or None


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


@user_errors
def attention(
    checkpoints: Optional[list[str]] = checkpoints_argument(),
    label: Optional[list[str]] = LabelOption,
    trace_files: Optional[list[str]] = TraceOption,
    save_trace: Optional[Path] = SaveTraceOption,
    images: Optional[list[Path]] = ImagesOption,
    labels: Optional[list[Path]] = LabelsOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layer names, e.g. mssa1,msca3.",
                                         show_default="every layer with a map"),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated head indices.", show_default="all"),
    classes: Optional[str] = typer.Option(None, "--classes", help="Class names or ids whose queries to draw.",
                                          show_default="each image's largest classes, up to 4"),
    pixel: Optional[str] = typer.Option(None, "--pixel", help="Pixel Y,X of the cropped image whose patch's attention to draw.",
                                        show_default="none for joint maps, the centre for the others"),
    examples: int = typer.Option(2, "--examples", min=0, help="Images drawn (one figure per layer each)."),
    num_images: int = typer.Option(16, "--num-images", min=1, help="Images behind the own-class shares."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1, help="Side of the square crops, in pixels.", show_default="each model's training size"
    ),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    out: Path = typer.Option(Path("figures/attention"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Attention maps over the image: each class query (MSCA, and the class tokens of MSSA / Segmenter's
    joint attention), a pixel's patch (MSSA), CBT's representatives and ToST's memberships, per head.

    Writes attention[_<label>]_<layer>_<i>.png / .pdf per model, layer and example image (one row per
    head), attention.png / .pdf (per model and layer the share of each class query's attention on its
    own class's patches, per head, against uniform attention), attention.json / .csv and
    attention.npz (the example images' maps on the patch grid).
    """
    from depict_analysis.attention import analyze_attention
    from depict_analysis.inputs import image_batches
    from depict_analysis.uncertainty import Bootstrap

    check_out_dir(out)
    if labels and not images:
        fail("--labels goes with --images (a dataset brings its own labels)")
    if trace_files and (images or dataset):
        fail("--trace files hold their images: give --trace or --images / --dataset, not both")
    point = parse_ints(pixel, "--pixel")
    if point is not None and len(point) != 2:
        fail(f"--pixel takes Y,X, got {pixel!r}")
    source = image_source_options(images, dataset, data_root, split, num_images) | ({"labels": labels} if labels else {})

    def batches_for(model):
        return image_batches(size or max(model.config.backbone.image_size), **source, batch_size=batch_size)

    count, models = runs(checkpoints, label, trace_files, batches_for, default=[f"{BUILTIN}{DEFAULT_MODELS[0]}"],
                         device=device, trust=trust, description="attention", attention=True)
    def analyze(traces, run):
        known = class_names(run.info, source["dataset"]) if run.info is not None else None
        return analyze_attention(
            traces, layers=parse_list(layers), heads=parse_ints(heads, "--heads"), pixel=tuple(point) if point else None,
            classes=class_ids(classes, known) if known is not None else parse_ints(classes, "--classes"),
            examples=examples, class_names=known, bootstrap=Bootstrap(resamples, level, seed),
        )

    inputs = None if trace_files else {"input": {key: value for key, value in source.items() if value}}
    comparison, written, saved = compare_runs(count, models, analyze, save_trace=save_trace, inputs=inputs, out=out)
    for name, result in zip(comparison.labels, comparison.results):
        if result.class_layers:
            console.print(shares_table(name, result))
        for warning in result.warnings():
            warn(warning)
    console.print(f"wrote {len(written)} files in {out}/" + "".join(f" and {path}" for path in saved))
