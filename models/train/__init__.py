"""Training with the paper's (Segmenter's) recipe, split as timm splits a training stack:

- ``config``: ``TrainConfig`` and its sources (``build_config``: defaults, a resumed checkpoint,
  YAML / preset, ``key=value`` overrides, options), the budget, and the model a config describes;
- ``optim``: the poly learning-rate schedule and the optimizer over timm's weight-decay groups;
- ``data``: the augmented, seeded, rank-sharded stream of training batches;
- ``processes``: torchrun ranks, stop signals, the random generators;
- ``run``: the loop, with checkpoints, exact resume, logs and evaluation (``train``).

Continue a run with ``point = ResumePoint(checkpoint)``, ``train(build_config(resume=point), resume=point)``:
the checkpoint is read once.
"""

from depict_analysis.models.train.config import (MODEL_FIELDS, OPTIMIZERS, PRESETS_DIR, ResumePoint, TrainConfig,
                                                 build_config, build_model, load_yaml_config, model_config_for,
                                                 parse_overrides, resolve_iterations, resume_point, steps_per_epoch)
from depict_analysis.models.train.data import AugmentedItems, EpochSampler, step_batches, train_loader
from depict_analysis.models.train.optim import build_optimizer, learning_rate, no_weight_decay, poly_lr, weight_decay_split
from depict_analysis.models.train.processes import (DistEnv, StopSignals, distributed, rng_state, seed_everything,
                                                    set_rng_state)
from depict_analysis.models.train.run import TrainingDiverged, run_lock, train

__all__ = [
    "MODEL_FIELDS", "OPTIMIZERS", "PRESETS_DIR", "AugmentedItems", "DistEnv", "EpochSampler", "ResumePoint", "StopSignals",
    "TrainConfig", "TrainingDiverged", "build_config", "build_model", "build_optimizer", "distributed", "learning_rate",
    "load_yaml_config", "model_config_for", "no_weight_decay", "parse_overrides", "poly_lr", "resolve_iterations",
    "resume_point", "rng_state", "run_lock", "seed_everything", "set_rng_state", "step_batches", "steps_per_epoch",
    "train", "train_loader", "weight_decay_split",
]
