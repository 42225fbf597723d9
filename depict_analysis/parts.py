"""An analysis in two steps, so that its images can be split over processes: one part per traced batch,
then the result of the parts.

A ``Parts`` subclass (``CodingRateParts``, ``PCAParts``, ...) holds an analysis's settings (checked when
it is made); ``part(tr)`` reads one ``Trace`` (a batch of images) and returns what the result needs of
it: per-image numbers and the few example images a figure draws, small and picklable; ``finish(parts)``
builds the ``Result`` from the parts of every batch, in image order. ``run(traces)`` is the analysis
of a stream in one process, what ``analyze_*`` calls. ``compare`` under ``torchrun`` gives each process
every ``world``-th batch, gathers the parts (``foundation.distributed.gather``) and finishes them in batch
order: the result of one process.

Examples: a part keeps them while this process has kept fewer than ``examples``; ``finish`` keeps the
first ``examples`` of all (``first_examples``). Each process's first ``examples`` include every one of
the run's first ``examples`` that it traced, so the result is the one-process result.

``per_batch(PartsClass)`` marks an ``analyze_*`` function as ``PartsClass(**settings).run(traces)``:
``analysis.parts`` is how ``compare`` finds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from depict_analysis.foundation.errors import InputError
from depict_analysis.tracing import Trace, as_traces

R = TypeVar("R")


class Parts(ABC, Generic[R]):
    """One analysis's settings, its per-batch step ``part`` and its ``finish`` (see the module docstring)."""

    examples: int = 0  # example images a result keeps (figures)

    def __init__(self) -> None:
        self.seen = 0  # images this process has read: names ``image<i>`` for traces without paths
        self.kept = 0  # examples this process has kept

    @abstractmethod
    def part(self, tr: Trace) -> Any:
        """What the result needs of one trace's images (small, picklable)."""

    @abstractmethod
    def finish(self, parts: Sequence[Any]) -> R:
        """The result of the parts of every batch, in image order (at least one)."""

    def parts(self, traces: Trace | Iterable[Trace]) -> list[Any]:
        """The part of every trace of ``traces``, each trace released before the next is read."""
        parts = []
        for tr in as_traces(traces):
            parts.append(self.part(tr))
            del tr  # memory stays one batch (and the parts)
        return parts

    def run(self, traces: Trace | Iterable[Trace]) -> R:
        """The analysis of ``traces`` in this process."""
        return self.finish(self.parts(traces))

    def names(self, tr: Trace) -> list[str]:
        """The images of ``tr``: their paths, else ``image<i>`` counted over this process's images."""
        names = list(tr.paths or []) or [f"image{self.seen + b}" for b in range(tr.num_images)]
        self.seen += tr.num_images
        return names

    def wanted(self, available: int) -> int:
        """How many of ``available`` images a part keeps as examples (and counts them as kept)."""
        take = max(0, min(available, self.examples - self.kept))
        self.kept += take
        return take

    def first_examples(self, parts: Sequence[Any], key: str = "examples") -> list:
        """The first ``examples`` of the parts' examples, in order."""
        return [e for p in parts for e in p[key]][: self.examples]


def require_parts(parts: Sequence[Any]) -> None:
    """Refuse to finish without a single batch."""
    if not parts:
        raise InputError("no images to analyse")


def per_batch(parts: type[Parts]) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Mark an analysis function as ``parts(**settings).run(traces)`` (its ``parts`` attribute)."""

    def mark(analysis: Callable[..., R]) -> Callable[..., R]:
        analysis.parts = parts  # type: ignore[attr-defined]
        return analysis

    return mark
