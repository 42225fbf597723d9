"""``depict-analyze robustness``: mIoU under parameter, input and structured perturbations (SPEC §3.4).

Results are written after every evaluation, so an interrupted sweep (Ctrl-C, SIGTERM) leaves what
it finished on disk (``"complete": false`` in the JSON) and exits with code 130.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from depict_analysis.cli.common import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    ImagesOption,
    SeedOption,
    SplitOption,
    TrustOption,
    check_out_dir,
    console,
    fail,
    image_source,
    user_errors,
    warn,
)
from depict_analysis.cli.options import LabelsOption, LevelOption, ResamplesOption
from depict_analysis.perturbations import NOISES, TARGETS, parse_sigmas, resolve_perturbation

if TYPE_CHECKING:  # the model stack is imported inside the command: `--help` stays fast
    from depict_analysis.robustness import Robustness

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
Noise = Enum("Noise", {name: name for name in NOISES}, type=str)
Target = Enum("Target", {name: name for name in TARGETS}, type=str)
Protocol = Enum("Protocol", {name: name for name in ("evaluation", "crops")}, type=str)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (like Ctrl-C), so partial results get written."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary_table(result: Robustness) -> Table:
    """mIoU (%) with its interval: one row per σ, one column per model; σ½ and warnings below."""
    settings, level = result.settings, result.bootstrap.level
    structured = settings["kind"] == "structured"
    curves = {label: result.curve(label) for label in result.labels}
    sigmas = sorted({sigma for curve in curves.values() for sigma in curve.sigma})
    table = Table(title=f"mIoU (%), mean over draws [{100 * level:g} % bootstrap interval]", caption=settings["description"])
    table.add_column(settings["noise"] if structured else settings["sigma_label"], justify="right")
    for label in curves:
        table.add_column(label, justify="right", no_wrap=True)
    for sigma in sigmas:
        name = ("transformed" if sigma else "clean") if structured else f"{sigma:g}"
        cells = [c.interval[c.sigma.index(sigma)].text(100) if sigma in c.sigma else "—" for c in curves.values()]
        table.add_row(name, *cells)
    if not structured and len(sigmas) > 1:
        table.add_row("σ½", *(c.sigma_half(level).text() for c in curves.values()))
    return table


@user_errors
def robustness(
    checkpoints: Optional[list[Path]] = typer.Argument(
        None, help="Our .pt files and/or official release folders, one curve each (builtin:NAME too); "
        "default: the built-in DEPICT-SA, DEPICT-CA and Segmenter (for structured transforms those with subspace projections)."
    ),
    noise: Noise = typer.Option("gaussian", "--noise", help="What to apply (structured transforms: decoders with subspace projections)."),
    target: Optional[Target] = typer.Option(
        None, "--target", help="What gaussian / uniform noise perturbs.", show_default="decoder; input for salt-pepper, blur"
    ),
    sigmas: Optional[str] = typer.Option(
        None, "--sigmas", help="Comma-separated noise levels; 0 (the clean model) is always added.",
        show_default="per noise, see above",
    ),
    relative: bool = typer.Option(False, "--relative", help="Parameter noise σ × each tensor's std."),
    draws: int = typer.Option(3, "--draws", min=1, help="Random draws per σ > 0 (rotations for structured transforms)."),
    seed: int = SeedOption,
    level: float = LevelOption,
    resamples: int = ResamplesOption,
    images: Optional[list[Path]] = ImagesOption,
    labels: Optional[list[Path]] = LabelsOption,
    dataset: Optional[str] = DatasetOption,
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    protocol: Protocol = typer.Option(
        "evaluation", "--protocol", help="evaluation: every image scored as depict eval scores it (σ = 0 is its mIoU); "
        "crops: square crops at the training size (faster, not depict eval's numbers)."),
    num_images: Optional[int] = typer.Option(
        None, "--num-images", min=1, help="Images to evaluate every (σ, draw) on (the first N).",
        show_default="all (evaluation protocol), 32 (crops)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows (evaluation) or crops per forward pass."),
    size: Optional[int] = typer.Option(
        None, "--size", min=1, help="Side of the square crops, in pixels (--protocol crops).", show_default="each model's training size"
    ),
    out: Path = typer.Option(Path("figures/robustness"), "--out", help="Output folder."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """mIoU against noise level σ: Gaussian / uniform parameter noise, input noise, or structured transforms of the subspaces.

    Default σ: parameter noise (absolute or --relative) 0, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2,
    5e-2, 0.1, 0.2, 0.5, 1; noise on the normalised input (--target input) std 0.01 … 2;
    salt-pepper a fraction 1e-3 … 0.5 of the pixels; blur std 0.5 … 8 pixels. head-rotation,
    global-rotation and head-orthonormalize (decoders with subspace projections: DEPICT, CBT, ToST)
    compare clean with transformed.
    """
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.foundation.distributed import is_writer, process_group
    from depict_analysis.robustness import NAME, run_robustness
    from depict_analysis.uncertainty import Bootstrap

    check_out_dir(out)
    if size is not None and protocol.value == "evaluation":
        fail("--size sets the square crops of --protocol crops; the evaluation protocol scores whole images")
    crops = protocol.value == "crops"
    perturbation = resolve_perturbation(noise.value, target.value if target else None, relative)
    grid = parse_sigmas(sigmas, perturbation) if sigmas is not None else perturbation.default_sigmas()
    source = image_source(images, dataset, data_root, split, num_images or (32 if crops else None), labels, size=size,
                          batch_size=batch_size, view="crop" if crops else "evaluation")
    with sigterm_as_interrupt(), process_group(resolve_device(device)) as run_device:  # torchrun: each process its share
        result = run_robustness(checkpoints, source, perturbation, grid, out, draws=draws, seed=seed,
                                bootstrap=Bootstrap(resamples, level, seed), device=run_device, trust=trust)
        writer = is_writer()
    if not writer:
        return
    if not result.complete:
        fail(f"interrupted: partial results on {result.num_images} images in {out}/", INTERRUPTED)
    console.print(summary_table(result))
    for warning in result.warnings():
        warn(warning)
    console.print(f"wrote {out}/{NAME}.png, .pdf, .json, .csv, .npz")
