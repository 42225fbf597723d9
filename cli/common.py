"""Pieces every command shares: one-line errors with exit code 2, checkpoint options, output files."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import matplotlib
import typer
from rich.console import Console
from rich.table import Table

from depict_analysis.models import CheckpointError, load_model
from depict_analysis.models.device import resolve_device
from depict_analysis.models.pretrained import DEFAULT_MODELS, LABELS, load_default
from depict_analysis.models.zoo import zoo_path

matplotlib.use("Agg")  # the commands write figures to files: no display is needed or assumed
console = Console()

# Errors that mean "bad input": reported as one line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ValueError, FileNotFoundError, KeyError)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def user_errors(command: Callable) -> Callable:
    """Turn the library's input errors into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            fail(str(message).splitlines()[0] if str(message) else type(e).__name__)

    return wrapper


def new_app(help: str) -> typer.Typer:
    app = typer.Typer(help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    # A callback keeps typer from collapsing a one-command app into that command.
    app.callback()(lambda: None)
    return app


TrustOption = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints with pickled Python objects (runs code).")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")


BUILTIN = "builtin:"  # `builtin:segmenter` names a built-in model wherever a checkpoint path goes
ZOO = "zoo:"  # `zoo:seg-s-mask-ade20k` names an official release, downloaded on first use
CheckpointHelp = (f"Our .pt file, an official release folder, {BUILTIN}NAME ({', '.join(DEFAULT_MODELS)}) or "
                  f"{ZOO}NAME (depict zoo list); default: the built-in {DEFAULT_MODELS[0]}.")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def open_model(checkpoint: Path | str | None, device: str = "auto", trust: bool = False):
    """(model, metadata) from a checkpoint path, ``builtin:NAME`` or ``zoo:NAME`` (downloaded if not
    cached); the built-in DEPICT-SA when none is given."""
    torch_device = resolve_device(device)
    if checkpoint is None:
        return load_default(DEFAULT_MODELS[0], torch_device)
    if str(checkpoint).startswith(BUILTIN):
        return load_default(str(checkpoint)[len(BUILTIN):], torch_device)
    if str(checkpoint).startswith(ZOO):
        return load_model(zoo_path(str(checkpoint)[len(ZOO):]), torch_device, trust)
    return load_model(checkpoint, torch_device, trust)


def split_checkpoint(paths: list[Path]) -> tuple[Path | None, list[Path]]:
    """``[CKPT] FILE...`` -> (checkpoint or None, files): the first path is the checkpoint when it is a
    folder, a .pt / .pth file, ``builtin:NAME`` or ``zoo:NAME``."""
    first = str(paths[0]) if paths else ""
    if paths and (paths[0].is_dir() or paths[0].suffix in CHECKPOINT_SUFFIXES or first.startswith((BUILTIN, ZOO))):
        return paths[0], list(paths[1:])
    return None, list(paths)


def open_models(
    checkpoints: list[Path] | None, device: str = "auto", trust: bool = False, builtins: Sequence[str] = DEFAULT_MODELS
):
    """(label, source, model, metadata) of each checkpoint, lazily (one model in memory at a time);
    the built-in models ``builtins`` when ``checkpoints`` is empty. ``source`` is what results record
    as the checkpoint (``checkpoint_name``)."""
    paths = checkpoints or [Path(f"{BUILTIN}{name}") for name in builtins]
    for label, path in zip(checkpoint_labels(paths), paths):
        model, meta = open_model(path, device, trust)
        yield label, checkpoint_name(path, meta), model, meta


def checkpoint_name(path: Path | None, meta: dict) -> str:
    """What results record as the checkpoint: its path, or ``builtin:<name>`` for a built-in model."""
    return f"{BUILTIN}{meta['builtin']}" if "builtin" in meta else str(path)


def _short_name(path: Path) -> str:
    if str(path).startswith(BUILTIN):
        return LABELS.get(str(path)[len(BUILTIN):], str(path))
    if str(path).startswith(ZOO):
        return str(path)[len(ZOO):].split("/")[-1]  # a Drive release: its folder name
    if path.name == "checkpoint.pth":
        return path.parent.name
    return path.name if path.is_dir() else path.stem


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Short unique names: a built-in model's label, a zoo model's name, a release folder's name, a
    file's stem (``checkpoint.pth``: its folder); repeats get ``#i``."""
    stems = [_short_name(p) for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(stems)]


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def image_source_options(
    images: list[Path] | None, dataset: str | None, data_root: Path | None, split: str, num_images: int | None
) -> dict:
    """The keyword arguments of ``depict_analysis.inputs.image_batches`` from the shared CLI options."""
    if images and dataset:
        fail("give --images or --dataset, not both")
    if not images and not dataset:
        dataset = "synthetic"  # the built-in default models were trained on it
    return {"images": images or None, "dataset": dataset, "data_root": data_root, "split": split, "num_images": num_images}


ImagesOption = typer.Option(None, "--images", help="Image files or folders (repeatable).")
DatasetOption = typer.Option(None, "--dataset", help="ade20k | pascal_context (60 classes) | pascal_context59 | cityscapes | folder | synthetic")
DataRootOption = typer.Option(None, "--data-root", help="The dataset's root folder.")
SplitOption = typer.Option("val", "--split", help="Dataset split.")
SeedOption = typer.Option(0, "--seed", help="Random seed: the same seed gives the same numbers.")
