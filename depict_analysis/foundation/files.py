"""Writing files safely: atomic writes, safe file names, and checks of output paths before any work.

Every file the project writes goes through ``atomic_write``: the content is written to a hidden
temporary file in the target's folder and renamed over the target only when complete, so a reader
never sees a half-written file and a failed or interrupted write (a full disk included) leaves
nothing behind. ``check_out_dir`` / ``check_out_file`` refuse an output path that cannot work
before a command starts computing: a file where a folder is expected, a folder under a file, no
write permission, one of the run's own inputs, or a special file (a device node, FIFO or socket:
refused, never replaced by a regular file nor written into). ``safe_name`` reduces a name read from
a file or a model (a layer, a label) to one plain file-name component, so that no output lands
outside its folder.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from depict_analysis.foundation.errors import InputError


SAFE_NAME_LENGTH = 100  # characters of a name kept in a file name (a file system allows 255 bytes)


def safe_name(text: str) -> str:
    """``text`` as one plain file-name component: every character but letters, digits, ``-``, ``_``,
    ``.`` and ``+`` becomes ``_`` (no separator, no ``..`` component), no leading dot, at most
    ``SAFE_NAME_LENGTH`` characters; ``_`` when nothing is left. ``"../../x"`` -> ``"_.._x"``."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(text)).lstrip(".")[:SAFE_NAME_LENGTH]
    return name if name.strip("._") else "_"


def is_special(path: Path) -> bool:
    """Whether ``path`` (links followed) exists and is neither a regular file nor a folder: a device
    node, a FIFO or a socket."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _refuse_special(path: Path, what: str) -> None:
    if is_special(path):
        raise InputError(f"{what} {path} is a special file (a device, FIFO or socket); give a regular file or folder",
                         arguments=what)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (binary), then rename it to ``path``.

    Creates the folder if needed. On any error (a full disk, an interruption) the temporary file is
    removed and ``path`` keeps its previous content; an error of the writer that reports a failed
    write as a RuntimeError (``torch.save``) becomes the OSError it was. A special file at ``path``
    is refused, never replaced. Returns ``path``.
    """
    path = Path(path)
    _refuse_special(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the target, not the temporary file that could not be made
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:
                cause = next((c for c in _causes(e) if isinstance(c, OSError)), None)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, str(path)) from None
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved file is for others to read too
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _causes(error: BaseException):
    """``error`` and the exceptions it was raised from or during."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _check_folder_usable(folder: Path, target: Path, what: str) -> None:
    """Refuse ``target`` when the nearest existing one of ``folder`` and its parents is a file, or a
    folder this process cannot write into."""
    ancestor = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not ancestor.is_dir():
        raise InputError(f"{what} {target}: {ancestor} is a file, not a folder", arguments=what)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{what} {target}: cannot write into {ancestor} (permission denied)", arguments=what)


def _refuse_inputs(path: Path, inputs: Iterable[str | os.PathLike], what: str) -> None:
    """Refuse ``path`` when it is one of ``inputs`` (links and relative paths resolved)."""
    target = path.resolve()
    if any(target == Path(source).resolve() for source in inputs):
        raise InputError(f"{what} {path} is also an input of this run; write it elsewhere", arguments=what)


def check_out_dir(path: str | os.PathLike, what: str = "out") -> Path:
    """``path`` as an output folder: a folder, or one that can be created (nothing is created yet);
    not a special file."""
    path = Path(path)
    _refuse_special(path, what)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file; give a folder", arguments=what)
    _check_folder_usable(path, path, what)
    return path


def check_out_file(path: str | os.PathLike, what: str = "out", inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as an output file: not a folder nor a special file, in a folder that exists or can be
    created and is writable, and not one of the run's ``inputs`` (a checkpoint, an image, ...)."""
    path = Path(path)
    _refuse_special(path, what)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name", arguments=what)
    _check_folder_usable(path.parent, path, what)
    _refuse_inputs(path, inputs, what)
    return path


def refuse_overwrite(outputs: Iterable[Path], inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Refuse to write any of ``outputs`` that is one of ``inputs`` (never, even with ``overwrite``),
    that exists as a folder, or (unless ``overwrite``) that exists at all: one line names the first clash."""
    sources = {Path(p).resolve() for p in inputs}
    for out in map(Path, outputs):
        _refuse_special(out, "output")
        if out.resolve() in sources:
            raise InputError(f"{out} is also an input; write the outputs to another folder")
        if out.is_dir():
            raise InputError(f"{out} exists and is a folder")
        if out.exists() and not overwrite:
            raise InputError(f"{out} exists; pass overwrite=True to replace it, or pick another out", arguments=("overwrite=True", "out"))
