"""Writing files safely: atomic writes, and checks of output paths before any work is done.

Every file the project writes goes through ``atomic_write``: the content is written to a hidden
temporary file in the target's folder and renamed over the target only when complete, so a reader
never sees a half-written file and an interrupted write leaves nothing behind. ``check_out_dir`` /
``check_out_file`` refuse an output path that cannot work (a file where a folder is expected, a
folder under a file, no write permission) before a command starts computing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from depict_analysis.foundation.errors import InputError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (binary), then rename it to ``path``.

    Creates the folder if needed. On any error (or interruption) the temporary file is removed and
    ``path`` keeps its previous content. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved file is for others to read too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _check_folder_usable(folder: Path, target: Path, what: str) -> None:
    """Refuse ``target`` when the nearest existing one of ``folder`` and its parents is a file, or a
    folder this process cannot write into."""
    ancestor = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not ancestor.is_dir():
        raise InputError(f"{what} {target}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{what} {target}: cannot write into {ancestor} (permission denied)")


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an output folder: a folder, or one that can be created (nothing is created yet)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file; give a folder")
    _check_folder_usable(path, path, what)
    return path


def check_out_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an output file: not a folder, in a folder that exists or can be created."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    _check_folder_usable(path.parent, path, what)
    return path


def refuse_overwrite(outputs: Iterable[Path], inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Refuse to write any of ``outputs`` that is one of ``inputs`` (never, even with ``overwrite``),
    that exists as a folder, or (unless ``overwrite``) that exists at all: one line names the first clash."""
    sources = {Path(p).resolve() for p in inputs}
    for out in map(Path, outputs):
        if out.resolve() in sources:
            raise InputError(f"{out} is also an input; write the outputs to another folder")
        if out.is_dir():
            raise InputError(f"{out} exists and is a folder")
        if out.exists() and not overwrite:
            raise InputError(f"{out} exists; pass --overwrite to replace it, or pick another --out")
