"""Pieces every command shares: one-line errors with exit code 2, checkpoint options, output files."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from depict_analysis.foundation.errors import DepictError
from depict_analysis.foundation.files import check_out_dir, check_out_file  # noqa: F401 (every command's --out check)
from depict_analysis.models.pretrained import DEFAULT_MODELS, LABELS

if TYPE_CHECKING:  # the heavy stack is imported inside the commands: `--help` stays fast
    from depict_analysis.models.segmentor import Segmentor

os.environ.setdefault("MPLBACKEND", "Agg")  # the commands write figures to files: no display is needed or assumed
console = Console()

# "Bad input", reported as one line with exit code 2: the library's own errors, and files that cannot
# be read or written. Anything else (KeyError, a ValueError from deep inside torch, ...) is a bug and
# keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DepictError, OSError)


def warn(message: str) -> None:
    """A warning on the console (the message's brackets are text, not markup)."""
    console.print(f"[yellow]warning:[/] {escape(message)}")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def _message(error: BaseException) -> str:
    """One line for the user: an OSError names its file and reason, a DepictError is its message."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_errors(command: Callable) -> Callable:
    """Turn the library's input errors into a one-line message and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            fail(_message(e))

    return wrapper


def _tolerant_streams() -> None:
    """Characters the terminal's encoding lacks (``PYTHONIOENCODING=ascii``) print as ``?`` instead of
    failing a finished run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def _print_version(value: bool) -> None:
    if value:
        from depict_analysis import __version__

        typer.echo(f"depict-analysis {__version__}")
        raise typer.Exit()


# click's base of usage errors (typer may ship its own copy of click): reached through a public name
ClickException = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


class OneLineErrors(typer.core.TyperGroup):
    """A command line whose usage errors (an option out of range, a missing argument) print as one
    ``error:`` line with exit code 2, like the library's errors, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # no arguments at all: the help text
                e.show()
                sys.exit(e.exit_code)
            print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def new_app(help: str) -> typer.Typer:
    """A Typer app as every command line of the project: help text printed as written (no rich markup,
    which would eat ``[...]``), one-line usage errors, ``--version``, and output that survives any
    terminal encoding."""
    app = typer.Typer(help=help, cls=OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                      rich_markup_mode=None)

    # A callback also keeps typer from collapsing a one-command app into that command.
    @app.callback()
    def main(
        version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ) -> None:
        _tolerant_streams()

    return app


TrustOption = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints with pickled Python objects (runs code).")
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")


BUILTIN = "builtin:"  # `builtin:segmenter` names a built-in model wherever a checkpoint path goes
ZOO = "zoo:"  # `zoo:seg-s-mask-ade20k` names an official release, downloaded on first use
CheckpointHelp = (f"Our .pt file, an official release folder, {BUILTIN}NAME ({', '.join(DEFAULT_MODELS)}) or "
                  f"{ZOO}NAME (depict zoo list); default: the built-in {DEFAULT_MODELS[0]}.")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


def open_model(checkpoint: Path | str | None, device: str = "auto", trust: bool = False) -> tuple[Segmentor, dict]:
    """(model, metadata) from a checkpoint path, ``builtin:NAME`` or ``zoo:NAME`` (downloaded if not
    cached); the built-in DEPICT-SA when none is given."""
    from depict_analysis.models.checkpoint import load_model
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.models.pretrained import load_default
    from depict_analysis.models.zoo import zoo_path

    torch_device = resolve_device(device)
    if checkpoint is None:
        return load_default(DEFAULT_MODELS[0], torch_device)
    if str(checkpoint).startswith(BUILTIN):
        return load_default(str(checkpoint)[len(BUILTIN):], torch_device)
    if str(checkpoint).startswith(ZOO):
        return load_model(zoo_path(str(checkpoint)[len(ZOO):]), torch_device, trust)
    return load_model(checkpoint, torch_device, trust)


def is_release_folder(path: Path) -> bool:
    """Whether ``path`` is an official release folder (``checkpoint.pth`` / ``variant.yml``), not a folder of images."""
    return path.is_dir() and any((path / name).is_file() for name in ("checkpoint.pth", "variant.yml"))


def split_checkpoint(paths: list[Path]) -> tuple[Path | None, list[Path]]:
    """``[CKPT] IMAGE...`` -> (checkpoint or None, images): the first path is the checkpoint when it is
    a release folder, a .pt / .pth file, ``builtin:NAME`` or ``zoo:NAME``."""
    first = str(paths[0]) if paths else ""
    if paths and (is_release_folder(paths[0]) or paths[0].suffix in CHECKPOINT_SUFFIXES or first.startswith((BUILTIN, ZOO))):
        return paths[0], list(paths[1:])
    return None, list(paths)


def require_dataset_classes(model: Segmentor, source: dict | None) -> None:
    """Refuse to score ``model`` against the labels of ``source``'s dataset (``image_source_options``)
    when it predicts another number of classes: the scores would mean nothing."""
    if source and source.get("dataset"):
        from depict_analysis.models.data import build_dataset
        from depict_analysis.models.evaluate import check_classes

        check_classes(model, build_dataset(source["dataset"], source.get("data_root"), source.get("split", "val")))


def open_models(
    checkpoints: list[Path] | None, device: str = "auto", trust: bool = False, builtins: Sequence[str] = DEFAULT_MODELS,
    scored_on: dict | None = None,
):
    """(label, source, model, metadata) of each checkpoint, lazily (one model in memory at a time);
    the built-in models ``builtins`` when ``checkpoints`` is empty. ``source`` is what results record
    as the checkpoint (``checkpoint_name``). ``scored_on``: the image source (``image_source_options``)
    whose labels the models are scored against; when it names a dataset every model must predict its
    classes (``require_dataset_classes``)."""
    paths = checkpoints or [Path(f"{BUILTIN}{name}") for name in builtins]
    for label, path in zip(checkpoint_labels(paths), paths):
        model, meta = open_model(path, device, trust)
        require_dataset_classes(model, scored_on)
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
