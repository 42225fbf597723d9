"""The one error hierarchy of the library: what a user did wrong, as opposed to a bug.

Every error the library raises for bad input is a ``DepictError`` with a one-line message meant for
the user; the CLI prints exactly these as ``error: <message>`` and exits with code 2, and lets any
other exception (a bug) show its traceback. ``DepictError`` is a ``ValueError``, so code written
against plain ``ValueError`` keeps working.

Messages name the Python arguments they are about (``pretrained``, ``overrides``, ``out``), never a
command-line flag: ``arguments`` lists those names, so that a command line can show its own flag for
each (``depict train`` reports ``overrides`` as ``--set``).
"""

from __future__ import annotations

from collections.abc import Sequence


class DepictError(ValueError):
    """Bad input to the library; ``str(error)`` is one line that says what was expected. ``arguments``:
    the names of the Python arguments the message speaks of, as it writes them."""

    def __init__(self, message: str = "", *, arguments: str | Sequence[str] = ()):
        super().__init__(message)
        self.arguments = (arguments,) if isinstance(arguments, str) else tuple(arguments)


class CheckpointError(DepictError):
    """A checkpoint, release folder, built-in or zoo model that cannot be read or does not fit."""


class DatasetError(DepictError):
    """Bad dataset input: a missing folder, a wrong layout, an unreadable file, an invalid label value."""


class ConfigError(DepictError):
    """An option or setting out of range or of the wrong type: training configs, variants, analysis settings."""


class InputError(DepictError):
    """A file or folder given to a command that cannot be used: images, output paths, label maps."""
