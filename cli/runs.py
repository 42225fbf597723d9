"""What the trace-based commands share (``coding-rate``, ``class-rates``, ``attention``, ``orthogonality``,
``pca-seg``): their options, declared once, and the one library call they make (``depict_analysis.compare``).

- Checkpoints are given positionally, optionally named: ``NAME=SOURCE`` (``baseline=runs/a/checkpoint.pt``),
  or ``--label NAME=SOURCE`` to name one given positionally (a source not given positionally is added).
  A name defaults to the source's label (a run's folder, a release's folder, a built-in model's name).
- ``--trace FILE`` (repeatable, ``NAME=FILE`` too) analyses traces written by ``--save-trace`` instead
  of running a model: no checkpoint, no images, no forward pass.
- ``--save-trace FILE`` writes each model's traces, joined (``Trace.cat``), to FILE; with several
  models to ``<stem>_<label><suffix>``, one file each (the label reduced to a safe file name). Every
  such file is checked before the first model is loaded: not a folder nor a special file, in a
  writable folder, and never one of the run's inputs (a checkpoint, an image, a label map, a trace).

``trace_command`` gives a command these options: the command receives them as one ``RunOptions``, inside
``sharded``: under ``torchrun`` each process traces its share of the images and only rank 0 prints and writes.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, get_type_hints

import typer

from depict_analysis.cli.common import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    fail,
    image_source,
    note_builtin_models,
    refuse_images,
    sharded,
    user_errors,
)
from depict_analysis.cli.options import LabelsOption

if TYPE_CHECKING:  # the model stack is imported where a run starts: `--help` stays fast
    import torch

    from depict_analysis.inputs import ImageSource
    from depict_analysis.results import Comparison

TRACES_HOLD_IMAGES = "--trace files hold their images: give --trace or --images / --dataset, not both"


def checkpoints_argument(default: str = "the built-in DEPICT-SA"):
    """The positional checkpoints of a trace-based command."""
    return typer.Argument(None, help="Checkpoints, [NAME=]SOURCE: our .pt files, official release folders, builtin:NAME, "
                          f"zoo:NAME; default: {default}.")


@dataclass
class RunOptions:
    """The options every trace-based command shares, as given."""

    out: Path
    num_images: int
    checkpoints: list[str] | None = None
    label: list[str] | None = None
    trace_files: list[str] | None = None
    save_trace: Path | None = None
    images: list[Path] | None = None
    labels: list[Path] | None = None
    dataset: str | None = None
    data_root: Path | None = None
    split: str = "val"
    batch_size: int = 8
    size: int | None = None
    device: str | torch.device = "auto"
    trust: bool = False
    command: str = "COMMAND"  # its name, for messages

    def models(self) -> list[tuple[str, str]]:
        """(label, source) of the positional checkpoints, named by ``--label``."""
        from depict_analysis.models.sources import labelled_sources

        refuse_images(self.checkpoints, f"depict-analyze {self.command} MODEL")
        return labelled_sources(self.checkpoints or [], self.label)

    def source(self) -> ImageSource | None:
        """The image source of ``--images`` / ``--labels`` / ``--dataset``; None with ``--trace``."""
        if self.labels and not self.images:
            fail("--labels goes with --images (a dataset brings its own labels)")
        if self.trace_files and (self.images or self.dataset):
            fail(TRACES_HOLD_IMAGES)
        if self.trace_files:
            return None
        return image_source(self.images, self.dataset, self.data_root, self.split, self.num_images, self.labels,
                            size=self.size, batch_size=self.batch_size)

    def compare(self, analysis: Callable, *, models: Sequence[str] = (), source: ImageSource | None = None,
                **settings) -> Comparison:
        """``depict_analysis.compare`` of these options: the checkpoints (``models`` when none is given, else the
        built-in DEPICT-SA) or the ``--trace`` files, on ``source`` (default ``self.source()``)."""
        from depict_analysis.runs import compare

        if self.trace_files and (self.checkpoints or self.label):
            fail("give checkpoints or --trace files, not both")
        images = source or self.source()
        if images is not None and not self.trace_files:
            named = self.models() or [(m, m) for m in models] or [("DEPICT-SA", "builtin:depict-sa")]
            note_builtin_models([s for _, s in named], [label for label, _ in named], images.dataset)
        return compare(None if self.trace_files else self.models() or list(models), images, analysis, traces=self.trace_files, out=self.out,
                       save_trace=self.save_trace, device=self.device, trust=self.trust, **settings)


def _option(name: str, kind, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)


def trace_command(
    out: str,
    num_images: tuple[int, str],
    *,
    checkpoints=None,
    size_help: str = "Side of the square crops, in pixels.",
    without: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Give a command the shared options (``RunOptions``): ``out`` is the default ``--out``, ``num_images``
    (default, help) its ``--num-images``, ``checkpoints`` its positional argument (default
    ``checkpoints_argument()``); options named in ``without`` are left out. The command is called with
    ``run: RunOptions`` and its own options, after ``--out`` is checked; it reports errors as one line."""
    shared = [
        _option("checkpoints", Optional[list[str]], checkpoints or checkpoints_argument()),
        _option("label", Optional[list[str]], typer.Option(None, "--label", help="NAME=SOURCE: name a checkpoint in figures and tables (repeatable).")),
        _option("trace_files", Optional[list[str]], typer.Option(
            None, "--trace", help="A trace written by --save-trace, analysed instead of checkpoint + images (repeatable; NAME=FILE).")),
        _option("save_trace", Optional[Path], typer.Option(
            None, "--save-trace", help="Write each model's traces to FILE (several models: FILE_<label>), for --trace later.")),
        _option("images", Optional[list[Path]], ImagesOption),
        _option("labels", Optional[list[Path]], LabelsOption),
        _option("dataset", Optional[str], DatasetOption),
        _option("data_root", Optional[Path], DataRootOption),
        _option("split", str, SplitOption),
        _option("num_images", int, typer.Option(num_images[0], "--num-images", min=1, help=num_images[1])),
        _option("batch_size", int, typer.Option(8, "--batch-size", min=1, help="Images per forward pass.")),
        _option("size", Optional[int], typer.Option(None, "--size", min=1, help=size_help, show_default="each model's training size")),
        _option("out", Path, typer.Option(Path(out), "--out", help="Output folder.")),
        _option("device", str, DeviceOption),
        _option("trust", bool, TrustOption),
    ]
    shared = [p for p in shared if p.name not in without]
    names = [p.name for p in shared]

    def decorate(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(command).parameters.values()
               if p.name != "run"]
        hints = {name: kind for name, kind in get_type_hints(command).items() if name not in ("run", "return")}

        @functools.wraps(command)
        def wrapper(**given):
            check_out_dir(given["out"])
            run = RunOptions(**{name: given.pop(name) for name in names}, command=command.__name__.replace("_", "-"))
            with sharded(run.device) as run.device:  # under torchrun: each process its share, rank 0 prints
                return command(run, **given)

        del wrapper.__wrapped__  # typer reads the signature below, not the command's
        wrapper.__signature__ = inspect.Signature(shared[:-3] + own + shared[-3:])
        wrapper.__annotations__ = {p.name: p.annotation for p in shared} | hints
        return user_errors(wrapper)

    return decorate
