"""What a training process shares with the others and with the OS: its rank under torchrun (DDP),
the stop signals (SIGINT / SIGTERM) it turns into a clean stop, and its random generators, seeded per
rank and saved in checkpoints for an exact resume."""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from depict_analysis.foundation.device import resolve_device
from depict_analysis.foundation.distributed import process_group, rank_and_world


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device_spec: str) -> Iterator[tuple[DistEnv, torch.device]]:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, one GPU per ``LOCAL_RANK``;
    gloo on the CPU) and leave it afterwards; a single process otherwise. Yields (env, device)."""
    with process_group(resolve_device(device_spec)) as device:
        yield DistEnv(*rank_and_world()), device


class StopSignals:
    """While active (main thread only), SIGINT / SIGTERM just record ``signum``; a second signal acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopSignals":
        self.signum = 0
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if in_main else {}
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, numpy, torch CPU (and this device's CUDA) generator states, as plain tensors / numbers."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(*entropy: int) -> None:
    """Seed python, numpy and torch from ``entropy`` (e.g. (seed, rank))."""
    value = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
