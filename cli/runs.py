"""What the trace-based commands share (``coding-rate``, ``pca-seg``, ``orthogonality``): the models of a
run, each named, and its traces, from checkpoints or from saved traces.

- Checkpoints are given positionally, optionally named: ``NAME=SOURCE`` (``baseline=runs/a/checkpoint.pt``),
  or ``--label NAME=SOURCE`` to name one given positionally (a source not given positionally is added).
  A name defaults to the source's label (a run's folder, a release's folder, a built-in model's name).
- ``--trace FILE`` (repeatable, ``NAME=FILE`` too) analyses traces written by ``--save-trace`` instead
  of running a model: no checkpoint, no images, no forward pass.
- ``--save-trace FILE`` writes each model's traces, joined (``Trace.cat``), to FILE; with several
  models to ``<stem>_<label><suffix>``, one file each (the label reduced to a safe file name). Every
  such file is checked before the first model is loaded: not a folder nor a special file, in a
  writable folder, and never one of the run's inputs (a checkpoint, an image, a label map, a trace).

One model is in memory at a time; its forward passes run as the analysis reads the traces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from depict_analysis.foundation.errors import ConfigError

if TYPE_CHECKING:  # the model stack is imported where a run starts: `--help` stays fast
    from torch import nn

    from depict_analysis.inputs import Batch
    from depict_analysis.models.sources import CheckpointInfo
    from depict_analysis.results import Comparison, Result
    from depict_analysis.tracing import Trace

CHECKPOINT_SUFFIXES = (".pt", ".pth")

LabelOption = typer.Option(None, "--label", help="NAME=SOURCE: name a checkpoint in figures and tables (repeatable).")
TraceOption = typer.Option(
    None, "--trace", help="A trace written by --save-trace, analysed instead of checkpoint + images (repeatable; NAME=FILE)."
)


def checkpoints_argument(default: str = "the built-in DEPICT-SA"):
    """The positional checkpoints of a trace-based command."""
    return typer.Argument(None, help="Checkpoints, [NAME=]SOURCE: our .pt files, official release folders, builtin:NAME, "
                          f"zoo:NAME; default: {default}.")


SaveTraceOption = typer.Option(
    None, "--save-trace", help="Write each model's traces to FILE (several models: FILE_<label>), for --trace later."
)


@dataclass
class Run:
    """One model of a run: its name, where it comes from, what it says about itself (None for a saved
    trace) and its traces (produced lazily)."""

    label: str
    source: str
    info: CheckpointInfo | None
    traces: Iterable[Trace]

    @property
    def class_names(self) -> list[str] | None:
        """The training dataset's class names (``CheckpointInfo``); None for a saved trace."""
        return self.info.class_names if self.info is not None else None

    @property
    def palette(self):
        """The training dataset's class colours (K, 3) uint8; None for a saved trace."""
        return self.info.palette if self.info is not None else None


def is_checkpoint(argument: str) -> bool:
    """Whether a positional argument names a model rather than an image: ``NAME=SOURCE``, ``builtin:`` /
    ``zoo:`` names, ``.pt`` / ``.pth`` files and official release folders (with ``variant.yml``)."""
    from depict_analysis.models.sources import BUILTIN, ZOO, parse_labelled

    label, source = parse_labelled(argument)
    path = Path(source)
    return (label is not None or source.startswith((BUILTIN, ZOO)) or path.suffix in CHECKPOINT_SUFFIXES
            or (path / "variant.yml").is_file())


def labelled_sources(arguments: Sequence[str], labels: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(label, source) of each positional ``[NAME=]SOURCE``, with ``--label NAME=SOURCE`` naming one of them
    (or adding it); repeated labels get ``#i``."""
    from depict_analysis.models.sources import parse_labelled, source_label

    pairs = [list(parse_labelled(str(a))) for a in arguments]
    for text in labels or []:
        name, source = parse_labelled(text)
        if name is None:
            raise ConfigError(f"--label takes NAME=SOURCE, got {text!r}")
        match = next((pair for pair in pairs if pair[1] == source), None)
        if match is None:
            pairs.append([name, source])
        else:
            match[0] = name
    names = [name or source_label(source) for name, source in pairs]
    unique = [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]
    return list(zip(unique, [source for _, source in pairs]))


def model_runs(
    sources: Sequence[tuple[str, str]],
    batches_for: Callable[[nn.Module], tuple[int, Iterator[Batch]]],
    *,
    device: str = "auto",
    trust: bool = False,
    description: str = "tracing",
    attention: bool = False,
) -> Iterator[Run]:
    """A ``Run`` per (label, source), its model loaded when reached; its traces are ``trace_batches`` over
    ``batches_for(model)`` (number of images, batches), with a progress bar (and the attention maps with
    ``attention``)."""
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.models.sources import open_checkpoint
    from depict_analysis.tracing import trace_batches

    torch_device = resolve_device(device)
    for label, source in sources:
        model, info = open_checkpoint(source, torch_device, trust, label)
        total, batches = batches_for(model)
        traces = trace_batches(model, batches, attention=attention, total=total, description=f"{description}: {label}")
        yield Run(label, info.source, info, traces)


def trace_runs(sources: Sequence[tuple[str, str]], device: str = "auto") -> Iterator[Run]:
    """A ``Run`` per saved trace (label, file), moved to ``device``."""
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.tracing import Trace

    torch_device = resolve_device(device)
    for label, source in sources:
        yield Run(label, source, None, [Trace.load(source).to(torch_device)])


@dataclass
class Runs:
    """The models of a run: (label, source) of each, known at once, and their ``Run``s, produced
    (each model loaded) only as they are iterated."""

    sources: list[tuple[str, str]]
    produce: Iterator[Run]

    def __iter__(self) -> Iterator[Run]:
        return self.produce


def runs(
    checkpoints: Sequence[str] | None,
    labels: Sequence[str] | None,
    traces: Sequence[str] | None,
    batches_for: Callable[[nn.Module], tuple[int, Iterator[Batch]]],
    *,
    default: Sequence[str],
    **options,
) -> tuple[int, Runs]:
    """(number of models, their ``Runs``): of the ``--trace`` files, else of the checkpoints (``default``
    when none is given; see ``model_runs`` for ``options``)."""
    if traces and (checkpoints or labels):
        raise ConfigError("give checkpoints or --trace files, not both")
    if traces:
        sources = labelled_sources(traces)
        return len(sources), Runs(sources, trace_runs(sources, options.get("device", "auto")))
    sources = labelled_sources(list(checkpoints or []) or list(default), labels)
    return len(sources), Runs(sources, model_runs(sources, batches_for, **options))


def _input_files(sources: Sequence[tuple[str, str]], inputs: dict | None) -> list[Path]:
    """Every file a run reads: its checkpoints or trace files (a release folder's files), and its image
    and label files (those inside folders named)."""
    named = [Path(source) for _, source in sources]
    for value in (inputs or {}).get("input", {}).values():
        if isinstance(value, (list, tuple)):
            named += [Path(v) for v in value if isinstance(v, (str, Path))]
    files = []
    for path in named:
        files += [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    return files


def trace_targets(path: Path, models: Runs, inputs: dict | None) -> dict[str, Path]:
    """``--save-trace`` file of each model (by label), each checked as an output before any work."""
    from depict_analysis.foundation.files import check_out_file, safe_name

    labels = [label for label, _ in models.sources]
    targets = ({label: path.with_name(f"{path.stem}_{safe_name(label)}{path.suffix}") for label in labels} if len(labels) > 1
               else {label: path for label in labels})
    read = _input_files(models.sources, inputs)
    for target in targets.values():
        check_out_file(target, "--save-trace", inputs=read)
    return targets


def saving(run: Run, target: Path | None) -> tuple[Iterable[Trace], Callable[[], Path | None]]:
    """The run's traces, and a function that writes them (joined) to ``target`` once they have been
    read; without ``target`` the traces are not kept."""
    from depict_analysis.tracing import Trace

    if target is None:
        return run.traces, lambda: None
    kept: list[Trace] = []

    def record() -> Iterator[Trace]:
        for tr in run.traces:
            kept.append(tr.to("cpu"))
            yield tr

    def save() -> Path:
        Trace.cat(kept).save(target)
        return target

    return record(), save


def compare_runs(
    count: int,
    models: Runs,
    analyze: Callable[[Iterable[Trace], Run], Result],
    *,
    save_trace: Path | None,
    inputs: dict | None,
    out: Path,
) -> tuple[Comparison, list[Path], list[Path]]:
    """``analyze(traces, run)`` of every run, their ``Comparison`` saved under ``out``, and each run's traces
    written with ``--save-trace``: (comparison, its files, the trace files). ``inputs`` records where the
    images came from (None: the ``--trace`` files)."""
    from depict_analysis.results import Comparison

    targets = trace_targets(save_trace, models, inputs) if save_trace is not None else {}
    labels, sources, results, saved = [], [], [], []
    for run in models:
        traces, save = saving(run, targets.get(run.label))
        results.append(analyze(traces, run))
        labels.append(run.label)
        sources.append(run.source)
        if (path := save()) is not None:
            saved.append(path)
    comparison = Comparison(labels, sources, results, inputs if inputs is not None else {"traces": sources})
    return comparison, comparison.save(out), saved
