"""Progress bars: on stderr only, and only when stderr is a terminal (a pipe or a log file gets nothing)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

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
