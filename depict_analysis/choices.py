"""The names the analyses accept for their options, importable without torch: the CLI builds its
``--help`` from them (the perturbations' names live in ``perturbations``)."""

from __future__ import annotations

NORMALIZE_MODES: tuple[str, ...] = ("l2", "none", "crate")  # tokens before a coding rate (coding_rate.normalize_tokens)
VIEWS: tuple[str, ...] = ("residual", "layer")  # which tokens a subspace projects (coding_rate_analysis)
CLASS_BY: tuple[str, ...] = ("ground_truth", "prediction")  # how patches get their class (class_rates)
