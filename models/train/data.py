"""The training data stream: step s of a run is a pure function of (seed, s).

Epoch e visits the dataset in ``DistributedSampler``'s order for (seed, e): shuffled, padded with its
own first items to a multiple of the number of ranks, rank r taking every r-th item. Each step takes
the next batch_size / ranks items of every rank's list (fewer in the epoch's last step), and item i of
epoch e is augmented with a numpy generator seeded by (seed, e, i). A resumed run starts the stream at
the step where its checkpoint stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.models.data import DatasetError, SegmentationDataset, TrainTransform, normalization_stats
from depict_analysis.models.registry import ModelConfig
from depict_analysis.models.train.config import TrainConfig
from depict_analysis.models.train.processes import DistEnv


class AugmentedItems(Dataset):
    """Key ``(epoch, i)`` -> item i of ``dataset`` through ``transform`` with a generator seeded by (seed, epoch, i).

    Returns image FloatTensor (3, h, w) and label LongTensor (h, w), both of the crop size.
    """

    def __init__(self, dataset: SegmentationDataset, transform: TrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        epoch, index = key
        image, label = self.dataset.load_raw(index)
        return self.transform(image, label, np.random.default_rng([self.seed, epoch, index]))


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by (seed, epoch), padded with its first items to a multiple of
    the ranks, split across them) that yields ``(epoch, index)`` keys and starts ``start`` positions
    into the epoch (for resuming)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return self.num_samples - self.start


def step_batches(loader: DataLoader, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (images (b, 3, h, w), labels (b, h, w)): this rank's share of every step from step
    ``start`` on; b is the loader's batch size, less in an epoch's last step.

    ``loader`` batches an ``EpochSampler``, keeping the last partial batch.
    """
    sampler, size = loader.sampler, loader.batch_size
    epoch, skip = divmod(start, math.ceil(sampler.num_samples / size))
    while True:
        sampler.set_epoch(epoch)
        sampler.start = skip * size
        yield from loader
        epoch, skip = epoch + 1, 0


def train_loader(
    dataset: SegmentationDataset, model_config: ModelConfig, config: TrainConfig, env: DistEnv, pin_memory: bool
) -> DataLoader:
    """This rank's shares of the steps (batch_size / ranks augmented crops of the model's training
    size), in the order the module docstring describes (``step_batches`` streams them across epochs)."""
    if config.batch_size % (env.world_size * config.grad_accum):
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of ranks x grad_accum = {env.world_size * config.grad_accum}")
    crop = model_config.backbone.image_size
    mean, std = normalization_stats(model_config.backbone.normalization)
    transform = TrainTransform(crop, mean, std, ratio_range=tuple(config.ratio_range), base_size=config.base_size or crop[0],
                               max_ratio=config.max_ratio)
    items = AugmentedItems(dataset, transform, config.seed)
    return DataLoader(
        items,
        batch_size=config.batch_size // env.world_size,
        sampler=EpochSampler(items, env.rank, env.world_size, config.seed),
        drop_last=False,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        persistent_workers=config.num_workers > 0,
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
    )


def worker_error(error: DatasetError) -> DatasetError:
    """A DataLoader worker's DatasetError comes back with a traceback as message: keep its last line."""
    message = str(error)
    if message.startswith("Caught "):
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return DatasetError(message)
