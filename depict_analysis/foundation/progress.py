"""Progress on stderr: bars when stderr is a terminal; one line per stage, with the time elapsed, when it
is not (a pipe or a log file would get nothing from a bar, and a long run would look hung)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from rich.console import Console
from rich.progress import Progress, ProgressColumn

T = TypeVar("T")


def progress_bar(*columns: str | ProgressColumn, enabled: bool = True) -> Progress:
    """A rich ``Progress`` (default columns unless given) drawing on stderr, disabled off a terminal."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, disable=not (enabled and console.is_terminal))


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """``items``, advancing a bar labelled ``description`` as each is taken."""
    with progress_bar(enabled=enabled) as bar:
        yield from bar.track(items, total=total, description=description)


class StageLog:
    """``log("robustness")`` writes ``[  12.3 s] robustness`` (seconds since the log was made) to stderr
    when it is not a terminal, where ``progress_bar`` shows nothing; on a terminal it writes nothing."""

    def __init__(self, name: str, enabled: bool = True, stream: TextIO | None = None):
        self.name = name
        self.stream = stream or sys.stderr
        self.enabled = enabled and not Console(file=self.stream).is_terminal
        self.started = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            print(f"{self.name}: [{time.perf_counter() - self.started:6.1f} s] {stage}", file=self.stream, flush=True)
