"""Pieces every command shares: one-line errors with exit code 2, checkpoint options, output files."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from depict_analysis.foundation.errors import DepictError
from depict_analysis.foundation.files import check_out_dir, check_out_file  # noqa: F401 (every command's --out check)
from depict_analysis.models.pretrained import BUILTIN, CHECKPOINT_SUFFIXES, DEFAULT_MODELS, ZOO

if TYPE_CHECKING:  # the heavy stack is imported inside the commands: `--help` stays fast
    from depict_analysis.inputs import ImageSource

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


def _message(error: BaseException, options: dict[str, str]) -> str:
    """One line for the user: an OSError names its file and reason, a DepictError is its message with the
    Python arguments it names written as the command's ``options`` (``_flags``)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    text = str(error).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    return _flags(text, getattr(error, "arguments", ()), options)


def command_options(command: Callable) -> dict[str, str]:
    """``{parameter name: its long flag}`` of a typer command function (``overrides`` -> ``--set``)."""
    flags = {}
    for name, param in inspect.signature(command).parameters.items():
        if isinstance(param.default, typer.models.OptionInfo):
            declared = [d for d in param.default.param_decls or () if d.startswith("--")]
            flags[name] = declared[0].split("/")[0] if declared else f"--{name.replace('_', '-')}"
    return flags


def _flags(text: str, arguments: Sequence[str], options: dict[str, str]) -> str:
    """``text`` with the last mention of each argument it names (``name`` or ``name=value``) written as the
    command's option (``--flag`` or ``--flag value``; ``=True``: the bare flag), where the command has one."""
    for argument in arguments:
        name, _, value = argument.partition("=")
        if name in options:
            flag = options[name] if value in ("", "True") else f"{options[name]} {value.strip(chr(39))}"
            found = list(re.finditer(rf"(?<![\w/.\-]){re.escape(argument)}(?![\w/.\-])", text))
            if found:  # the last mention: an earlier one may be the word itself ("for 1 iterations (give iterations ...")
                text = text[:found[-1].start()] + flag + text[found[-1].end():]
    return text


@contextlib.contextmanager
def sharded(device: str) -> Iterator[Any]:
    """Under ``torchrun``: the processes' group (``foundation.distributed.process_group``: each scores its
    share of the images) and only rank 0's output on stdout. Yields the device this process runs on."""
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.foundation.distributed import is_writer, process_group

    with process_group(resolve_device(device)) as run_device:
        with contextlib.nullcontext() if is_writer() else contextlib.redirect_stdout(io.StringIO()):
            yield run_device


def user_errors(command: Callable) -> Callable:
    """Turn the library's input errors into a one-line message (with this command's flags) and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            fail(_message(e, command_options(command)))

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


CheckpointHelp = (f"Our .pt file, an official release folder, {BUILTIN}NAME ({', '.join(DEFAULT_MODELS)}) or "
                  f"{ZOO}NAME (depict zoo list); default: the built-in {DEFAULT_MODELS[0]}.")


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)


def image_source(
    images: list[Path] | None, dataset: str | None, data_root: Path | None, split: str, num_images: int | None,
    labels: list[Path] | None = None, **view,
) -> ImageSource:
    """The ``ImageSource`` of the shared options (``view``: its ``size``, ``batch_size``, ``view``); the
    synthetic validation split, which the built-in models were trained on, when neither images nor a dataset is given."""
    from depict_analysis.inputs import ImageSource

    if images and dataset:
        fail("give --images or --dataset, not both")
    if labels and not images:
        fail("--labels goes with --images (a dataset brings its own labels)")
    return ImageSource(images=images or (), labels=labels or (), dataset=None if images else dataset or "synthetic",
                       data_root=data_root, split=split, num_images=num_images, **view)


ImagesOption = typer.Option(None, "--images", help="Image files or folders (repeatable).")
DatasetOption = typer.Option(None, "--dataset", help="ade20k | pascal_context (60 classes) | pascal_context59 | cityscapes | folder | synthetic")
DataRootOption = typer.Option(None, "--data-root", help="The dataset's root folder.")
SplitOption = typer.Option("val", "--split", help="Dataset split.")
SeedOption = typer.Option(0, "--seed", help="Random seed: the same seed gives the same numbers.")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MODEL_FILES = ("checkpoint.pt", "checkpoint.pth", "variant.yml")  # a run's or an official release's folder holds one


def _image_folder(path: Path) -> bool:
    """A folder of image files that is not a run's or a release's folder (those are models)."""
    if not path.is_dir() or any((path / name).is_file() for name in MODEL_FILES):
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in path.iterdir())


def refuse_images(arguments: list | None, example: str) -> None:
    """One convention for every command: models are positional, images go after --images. An image file or
    a folder of images given where a model goes is one line saying so (``example``: the command line up to
    its models, e.g. ``depict-analyze coding-rate MODEL``)."""
    for argument in arguments or []:
        source = str(argument).partition("=")[2] if "=" in str(argument) and not Path(str(argument)).exists() else str(argument)
        folder = _image_folder(Path(source))
        if folder or Path(source).suffix.lower() in IMAGE_SUFFIXES:
            fail(f"{argument} is {'a folder of images' if folder else 'an image'}, not a model: images go after --images "
                 f"({example} --images {source}; label maps after --labels)")


def note_builtin_models(sources: list[str], labels: list[str], dataset: str | None, always: bool = False) -> None:
    """The one-line note when built-in (toy) models run on images other than the synthetic task's."""
    from depict_analysis.models.pretrained import toy_model_note

    builtin = [label for label, source in zip(labels, sources) if str(source).startswith(BUILTIN)]
    if builtin and (always or dataset != "synthetic"):
        warn(toy_model_note(builtin))
