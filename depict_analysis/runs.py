"""One path from models to an analysis: several models × one image source × one analysis -> a ``Comparison``.

``compare(models, images, analysis, **settings)`` is what every trace-based command, the suite and a
notebook call::

    from depict_analysis import ImageSource, analyze_coding_rates, compare

    result = compare(["builtin:depict-sa", "builtin:segmenter"], ImageSource(images=["photos/"]),
                     analyze_coding_rates, eps=0.2, out="figures/coding-rate")

For each model in turn (one in memory at a time: ``loaded_models``) it traces the images as that model
sees them (``ImageSource.batches``), runs ``analysis(traces, **settings)`` while the traces stream, and
collects the typed results, labels and sources into a ``Comparison`` (written to ``out`` when given).
An analysis that takes ``class_names`` / ``palette`` gets the model's own (``CheckpointInfo.classes``)
unless ``settings`` sets them. ``save_trace`` keeps each model's traces in a file (``Trace.save``);
``traces`` analyses such files instead of running models.

Under ``torchrun`` (a process group up: ``foundation.distributed.process_group``, as every command starts
one) an analysis made of parts (``depict_analysis.parts``: coding rates, class rates, attention, PCA
segmentation) is sharded: each process traces every ``world``-th batch of the images and computes their
parts, the parts of every process are gathered and finished in batch order, so that every process
returns the result of one process; only rank 0 writes ``out`` and the ``save_trace`` files (every
process's traces, gathered). Other analyses (orthogonality: the weights and a few images' Q̂) run
whole in every process, and rank 0 writes.

Models are sources (``[NAME=]SOURCE``: a ``.pt`` file, a release folder, ``builtin:NAME``, ``zoo:NAME``;
or a (label, source) pair) or ``LoadedModel`` records already in memory.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

import torch

from depict_analysis.foundation import distributed
from depict_analysis.foundation.device import resolve_device
from depict_analysis.foundation.errors import ConfigError
from depict_analysis.foundation.files import check_out_file, safe_name
from depict_analysis.inputs import ImageSource
from depict_analysis.models.pretrained import DEFAULT_MODELS
from depict_analysis.models.sources import BUILTIN, LoadedModel, labelled_sources, open_checkpoint
from depict_analysis.results import Comparison, Result
from depict_analysis.tracing import Trace, trace_batches

ModelSource = Union[str, os.PathLike, LoadedModel, tuple[str, str]]  # tuple: (label, source)
DEFAULT = (f"{BUILTIN}{DEFAULT_MODELS[0]}",)


def _labelled(model: ModelSource) -> tuple[str, str | None]:
    """(label, source) of a model: a loaded model's label, a (label, source) pair, a ``[NAME=]SOURCE``."""
    if isinstance(model, LoadedModel):
        return model.label, None
    if isinstance(model, tuple):
        return model
    return labelled_sources([model])[0]


def model_labels(models: Sequence[ModelSource]) -> list[str]:
    """The label of each model (``_labelled``); repeats get ``#i``."""
    names = [_labelled(m)[0] for m in models]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def loaded_models(
    models: Sequence[ModelSource] | None = None, device: str | torch.device = "auto", trust: bool = False
) -> Iterator[LoadedModel]:
    """Each model as a ``LoadedModel``, loaded when reached (one in memory at a time when given as sources);
    the built-in DEPICT-SA when ``models`` is empty. ``trust`` allows checkpoints with pickled objects."""
    models = list(models or DEFAULT)
    for label, entry in zip(model_labels(models), models):
        yield entry if isinstance(entry, LoadedModel) else open_checkpoint(_labelled(entry)[1], device, trust, label)


def _model_arguments(analysis: Callable[..., Result], loaded: LoadedModel, images: ImageSource) -> dict:
    """``class_names`` / ``palette`` of the model for an analysis that takes them."""
    accepted = inspect.signature(analysis).parameters
    names, palette = loaded.info.classes(images.dataset)
    return {key: value for key, value in (("class_names", names), ("palette", palette)) if key in accepted}


class _Kept:
    """The traces of one model as an analysis reads them, kept on the CPU when they are to be saved."""

    def __init__(self, traces: Iterable[Trace], keep: bool):
        self.traces, self.keep, self.kept = traces, keep, []

    def __iter__(self) -> Iterator[Trace]:
        for tr in self.traces:
            if self.keep:
                self.kept.append(tr.to("cpu"))
            yield tr
            del tr  # not alive while the next batch is traced

    def save(self, path: Path, sharded: bool) -> Path:
        """Every kept trace joined into ``path``; ``sharded``: every process's, in batch order, written by rank 0."""
        shares = distributed.gather(self.kept, everywhere=False) if sharded else [self.kept] if distributed.is_writer() else None
        if shares is not None:
            Trace.cat(distributed.interleave(shares)).save(path)
        return path


def _analyse(analysis: Callable[..., Result], traces: Iterable[Trace], settings: dict, sharded: bool) -> Result:
    """``analysis(traces, **settings)``; ``sharded``: in parts (``depict_analysis.parts``), this process's
    batches, then every process's parts finished in batch order."""
    if not sharded:
        return analysis(traces, **settings)
    parts = analysis.parts(**settings)
    return parts.finish(distributed.interleave(distributed.gather(parts.parts(traces))))


def _input_files(sources: Sequence[str], images: ImageSource | None) -> list[Path]:
    """Every file a run reads: its checkpoints or trace files (a release folder's files), its image and label files."""
    named = [Path(s) for s in sources] + ([*images.images, *images.labels] if images is not None else [])
    return [f for path in named for f in ([p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path])]


def _trace_targets(path: str | os.PathLike, labels: Sequence[str], sources: Sequence[str],
                   images: ImageSource | None) -> list[Path]:
    """The ``save_trace`` file of each model (``<stem>_<label><suffix>`` when several, the label made a safe
    file name), each checked as an output before any work: never an input of the run."""
    path = Path(path)
    targets = [path.with_name(f"{path.stem}_{safe_name(label)}{path.suffix}") for label in labels] if len(labels) > 1 \
        else [path] * len(labels)
    read = _input_files(sources, images)
    for target in targets:
        check_out_file(target, "save_trace", inputs=read)
    return targets


def compare(
    models: Sequence[ModelSource] | None = None,
    images: ImageSource | None = None,
    analysis: Callable[..., Result] | None = None,
    *,
    traces: Sequence[str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    save_trace: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    trust: bool = False,
    attention: bool = False,
    scored: bool = False,
    progress: bool = True,
    description: str | None = None,
    record: dict | None = None,
    **settings,
) -> Comparison:
    """``analysis(traces, **settings)`` of every model on ``images`` (see the module docstring).

    ``models``: sources or ``LoadedModel``s (default: the built-in DEPICT-SA); ``traces``: files written
    with ``save_trace`` (``[NAME=]FILE``), analysed instead of models and images. ``out``: write the
    comparison there (``Comparison.files``). ``save_trace``: a file for each model's traces, joined
    (several models: ``<stem>_<label><suffix>``; ``Comparison.trace_files``), checked before any work.
    ``attention``: record the attention maps (``analyze_attention`` reads them). ``scored``: the analysis
    scores the models against the images' labels, so each must predict the dataset's classes.
    ``record``: the comparison's ``settings`` (default: the input, ``ImageSource.describe()``, or the
    trace files).
    """
    if analysis is None:
        raise ConfigError("compare needs an analysis, e.g. analyze_coding_rates")
    if traces and (models or images is not None):
        raise ConfigError("give traces, or models and images, not both: a saved trace holds its images")
    if not traces and images is None:
        raise ConfigError("compare needs images (an ImageSource) or traces")
    sharded = distributed.active() and not traces and hasattr(analysis, "parts")
    if traces:
        pairs = labelled_sources(traces)
        runs = _saved_runs(pairs, device)
    else:
        models = list(models or DEFAULT)
        pairs = [(label, _labelled(m)[1] or m.source) for label, m in zip(model_labels(models), models)]
        runs = _model_runs(models, images, analysis, device, trust, attention, scored, progress and distributed.is_writer(),
                           description, sharded)
    labels, sources = [label for label, _ in pairs], [source for _, source in pairs]
    targets = _trace_targets(save_trace, labels, sources, images) if save_trace is not None else [None] * len(pairs)
    results, saved = [], []
    for (source, stream, arguments), target in zip(runs, targets):
        kept = _Kept(stream, target is not None)
        results.append(_analyse(analysis, kept, arguments | settings, sharded))
        if target is not None:
            saved.append(kept.save(target, sharded))
    if record is None:
        record = {"traces": sources} if traces else {"input": images.describe()}
    comparison = Comparison(labels, sources, results, record)
    comparison.trace_files = saved
    if out is not None and distributed.is_writer():
        comparison.files = comparison.save(out)
    return comparison


def _model_runs(models, images: ImageSource, analysis, device, trust, attention, scored, progress, description,
                sharded: bool) -> Iterator:
    """(source, traces, the model's own arguments of the analysis) of each model, loaded when reached;
    ``sharded``: this process's batches."""
    for loaded in loaded_models(models, device, trust):
        if scored:
            images.require_classes(loaded.model)
        total, batches = images.batches(loaded.model, shard=sharded)
        stream = trace_batches(loaded.model, batches, attention=attention, total=total, progress=progress,
                               description=f"{description or analysis.__name__}: {loaded.label}", source=loaded.label)
        yield loaded.source, stream, _model_arguments(analysis, loaded, images)


def _saved_runs(pairs: Sequence[tuple[str, str]], device) -> Iterator:
    """(file, its trace on ``device``, no arguments) of each saved trace."""
    torch_device = resolve_device(device) if isinstance(device, str) else device
    for _, source in pairs:
        yield source, [Trace.load(source).to(torch_device)], {}
