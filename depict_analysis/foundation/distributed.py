"""Sharding a command over processes started by ``torchrun``: each scores its share of the images, one writes.

``torchrun --nproc-per-node N -m depict_analysis.cli.main eval ...`` (any command that calls
``process_group``) starts N copies of the command. Inside ``process_group(device)`` they form the
default ``torch.distributed`` group (gloo on the CPU, NCCL on CUDA, each process on GPU
``LOCAL_RANK``); ``shard(n)`` gives each process every ``world``-th image (or batch), ``sum_over_processes``
adds up what they counted, ``gather`` collects what each computed (picklable, on the CPU), and only
``is_writer()`` (rank 0) writes files or shows progress.
Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) all of this is a no-op: one
process, every image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a default process group is up (``process_group``, or a caller's own)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_writer() -> bool:
    """Whether this process writes outputs and shows progress: rank 0, or the only process."""
    return rank_and_world()[0] == 0


def shard(n: int) -> range:
    """The indices of ``n`` images this process scores: every ``world``-th, from its rank."""
    rank, world = rank_and_world()
    return range(rank, n, world)


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Within the block, the processes of a ``torchrun`` launch form the default process group.

    Yields the device this process runs on: ``device``, or on CUDA the GPU ``LOCAL_RANK`` (NCCL);
    the CPU uses gloo. Without ``torchrun`` nothing changes; a group already up (the caller's) is
    used as it is, and left up.
    """
    if not launched():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if active():
        yield device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def sum_over_processes(tensor: Tensor) -> Tensor:
    """``tensor`` summed element-wise over the processes (in place; returned); itself without a group.

    NCCL needs CUDA tensors: the sum runs on this process's GPU then, and the result comes back
    to ``tensor``'s device.
    """
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor)
    return tensor


def interleave(shares: list[list[T]]) -> list[T]:
    """The items of every process's share (``shares[rank]``, in ``shard`` order) back in the order of
    ``range(n)``: the k-th item of rank r is item r + k·world."""
    longest = max(map(len, shares), default=0)
    return [share[k] for k in range(longest) for share in shares if k < len(share)]


def gather(value: T, everywhere: bool = True) -> list[T] | None:
    """Every process's ``value`` in rank order, pickled through the group: on every process
    (``everywhere``), else on rank 0 only (None on the others). ``[value]`` without a group.

    ``value`` should hold CPU tensors and arrays; under NCCL the bytes travel through this process's GPU.
    """
    if not active():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    if everywhere:
        dist.all_gather_object(gathered, value)
        return gathered
    dist.gather_object(value, gathered if is_writer() else None, dst=0)
    return gathered if is_writer() else None
