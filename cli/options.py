"""Options and helpers of the analyses that report intervals or read labels (robustness, class-rates,
attention, demo, report)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from depict_analysis.models.sources import CheckpointInfo

LevelOption = typer.Option(0.95, "--level", min=0.5, max=0.999, help="Coverage of the bootstrap confidence intervals.")
ResamplesOption = typer.Option(1000, "--resamples", min=10, help="Bootstrap resamples behind every interval.")
LabelsOption = typer.Option(
    None, "--labels", help="Label maps (class ids, 255 = ignore) or folders, matched to --images by file stem."
)


def class_names(info: CheckpointInfo, dataset: str | None) -> list[str]:
    """The model's class names: its training dataset's, else those of the dataset the images come
    from when it has as many classes, else ``class i``."""
    from depict_analysis.models.data import DatasetError, class_info

    if info.dataset is None and dataset is not None:
        try:
            names = class_info(dataset)[0]
        except DatasetError:  # a dataset without fixed classes (folder)
            names = []
        if len(names) == info.n_cls:
            return names
    return info.class_names
