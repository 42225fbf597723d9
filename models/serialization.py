"""Reading PyTorch files without running code: ``torch.load(weights_only=True)``, with its failures
told apart (pickled Python objects, which would run code, versus bytes that are no checkpoint)."""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
from typing import Any

import torch


class PickledObjects(Exception):
    """The file holds pickled Python objects (classes, functions): loading it could run code."""


class NotAPyTorchFile(Exception):
    """The file is truncated, corrupt, or no PyTorch file at all; ``str()`` says why, in one line."""


def _names_globals(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain pickle that names Python globals, read from its opcodes without
    running any (the weights-only unpickler stops earlier on protocol 4 framing)."""
    try:
        with open(path, "rb") as f:
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(f))
    except Exception:  # not a pickle: genops fails on the first opcode it does not know
        return False


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[-1][:300]


def load(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load`` onto the CPU; unless ``trust``, only tensors, numbers and containers.

    Raises ``PickledObjects`` when the file names Python globals, ``NotAPyTorchFile`` when it cannot
    be read at all.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; our own error says more
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "allowlisted" in str(e) or _names_globals(path):
            raise PickledObjects(str(path)) from None
        raise NotAPyTorchFile(f"corrupt: not a PyTorch file ({_one_line(e)})") from None
    except Exception as e:  # the unpickler raises anything on arbitrary bytes: a text file, a cut download
        raise NotAPyTorchFile(f"truncated or not a PyTorch file ({_one_line(e)})") from None
