"""``depict``: inspect, train, evaluate and run segmentation models.

The heavy stack (torch, timm, the models) is imported inside the commands, so ``depict --help``
answers at once. Options are checked where they are declared (``min=`` / ``max=``); what depends
on the model or the data is checked by the library before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import depict_analysis.models
from depict_analysis.cli.common import (CheckpointHelp, DataRootOption, DatasetOption, DeviceOption, ImagesOption, SplitOption,
                                        TrustOption, console, fail, new_app, note_builtin_models, print_table, refuse_images,
                                        user_errors)
from depict_analysis.cli.zoo import app as zoo_app
from depict_analysis.foundation.files import check_out_dir, check_out_file

PRESETS = sorted(p.stem for p in (Path(depict_analysis.models.__file__).parent / "configs").glob("*.yaml"))

app = new_app("Inspect, train, evaluate and run DEPICT / Segmenter models.")
app.add_typer(zoo_app, name="zoo")


@app.command()
@user_errors
def info(
    checkpoint: Optional[Path] = typer.Argument(None, help=CheckpointHelp),
    variant: Optional[str] = typer.Option(None, help="Describe a registered variant instead (random weights)."),
    n_cls: int = typer.Option(150, min=1, max=65536, help="Classes, with --variant."),
    image_size: Optional[int] = typer.Option(
        None, min=1, max=16384, help="Image side for the decoder GFLOPs.", show_default="the model's training size"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Variant, classes, parameters (encoder / decoder) and decoder GFLOPs of a model."""
    from depict_analysis.models import create_model
    from depict_analysis.models.sources import open_checkpoint
    from depict_analysis.models.summary import model_summary

    refuse_images([checkpoint], "depict predict MODEL")  # info has no images: predict segments them
    model = create_model(variant, n_cls) if variant else open_checkpoint(checkpoint, device, trust).model
    image_size = image_size or max(model.config.backbone.image_size)
    summary = model_summary(model, (image_size, image_size))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    print_table(
        "depict info",
        [
            ("variant", summary["variant"]),
            ("decoder", summary["decoder"]),
            ("backbone", summary["backbone"]),
            ("classes", summary["n_cls"]),
            ("encoder params", f"{summary['params_encoder'] / 1e6:.2f} M"),
            ("decoder params", f"{summary['params_decoder'] / 1e6:.3f} M"),
            (f"decoder GFLOPs @ {image_size}²", f"{summary['decoder_gflops']:.2f}"),
        ],
    )


WindowOption = typer.Option(None, "--window", min=1, help="Sliding-window size.", show_default="the model's training size")
MultiscaleOption = typer.Option(False, "--multiscale", help="Average scales 0.5..1.75 and their flips.")
BatchOption = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass.")
AmpOption = typer.Option(False, "--amp", help="bf16 autocast on CUDA (default: float32).")
ShortSideOption = typer.Option(
    None, "--short-side", min=0,
    help="Resize images keeping their aspect ratio to this short side, the long side at most the dataset's max ratio "
    "times it, as mmseg's test Resize (0: keep their size).",
    show_default="the base size of the dataset (eval: evaluated on; predict: trained on): ADE20K 512, Pascal Context 520, "
    "Cityscapes 1024; else the run's training size; else 0",
)


@app.command()
@user_errors
def train(
    config: Optional[str] = typer.Option(
        None, "--config", help=f"YAML file of training options, or a preset: {', '.join(PRESETS)}."
    ),
    overrides: list[str] = typer.Option([], "--set", help="key=value for any training option (repeatable).", show_default="none"),
    variant: Optional[str] = typer.Option(None, "--variant", help="Model variant, e.g. depict-sa-vit-s16.", show_default="depict-sa-vit-s16"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=DatasetOption.help, show_default="ade20k"),
    data_root: Optional[Path] = DataRootOption,
    crop_size: Optional[int] = typer.Option(None, "--crop-size", help="Training crop, a multiple of the patch size.",
                                            show_default="the variant's image size"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step, over all processes.", show_default="8"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step.", show_default="1"),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", help="Passes over the training set; steps = epochs x ceil(images / batch size).", show_default="64"
    ),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Optimizer steps, instead of epochs.",
                                             show_default="from --epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Initial learning rate of the poly schedule.", show_default="1e-3"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="bf16 autocast on CUDA (the recipe trains in float32).",
                                       show_default="off"),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model.", show_default="off"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps (0: at the end).", show_default="0"),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Evaluate on the first N images.", show_default="all"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps.", show_default="1000"),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data-loading processes.", show_default="4"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed.", show_default="0"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder: checkpoint.pt, log.jsonl, metrics.json.",
                                       show_default="runs/train"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N.", show_default="auto"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Backbone weights: a local file, or a timm name (downloads).",
                                             show_default="none"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from this checkpoint (its options are the defaults)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr, when it is a terminal)."),
):
    """Train a model with the paper's (Segmenter's) recipe; run under torchrun for several processes.

    Options given here override --set, which overrides --config, which overrides the resumed checkpoint's options
    (the defaults shown are the recipe's). Every option is checked before training starts. SIGINT / SIGTERM save a
    checkpoint and exit with 128 + the signal number; a loss that turns NaN / Inf stops the run (exit 2) keeping the
    last good checkpoint.
    """
    from depict_analysis.models.train import build_config, resume_point
    from depict_analysis.models.train import train as run_training

    options = dict(
        model=variant, dataset=dataset, data_root=data_root and str(data_root), crop_size=crop_size, batch_size=batch_size,
        grad_accum=grad_accum, epochs=epochs, iterations=iterations, lr=lr, amp=amp, compile=compile_model, eval_every=eval_every,
        eval_images=eval_images, save_every=save_every, num_workers=num_workers, seed=seed, out_dir=out_dir and str(out_dir),
        device=device, pretrained=pretrained,
    )
    point = resume_point(resume)  # the checkpoint is read once: for its options, then its state
    result = run_training(build_config(resume=point, config_file=config, overrides=overrides, **options), resume=point, progress=progress)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, one process reports
    if main:
        scores = result["eval"] or {}
        rows = [("iteration", result["iteration"]), ("checkpoint", result["checkpoint"])]
        print_table("depict train", rows + [(key, f"{100 * scores[key]:.2f}") for key in ("miou", "pixel_acc") if key in scores])
    if result["stopped_by"]:
        code = 128 + signal.Signals[result["stopped_by"]]
        if main:
            fail(f"stopped by {result['stopped_by']}; continue with --resume {result['checkpoint']}", code)
        raise typer.Exit(code)


@app.command()
@user_errors
def curves(
    runs: list[str] = typer.Argument(..., help="Training run folders (depict train --out), [NAME=]RUN."),
    out: Path = typer.Option(Path("figures/training"), "--out", help="Output folder."),
    caption: str = typer.Option("", "--caption", help="A line above the figure.", show_default="none"),
):
    """Learning curves of training runs: loss and validation mIoU against the step, one colour per run.

    Writes training_curves.png / .pdf, training_curves.json (with each run's steps, last and best mIoU and
    training seconds) and training_curves.csv (one row per log record).
    """
    from depict_analysis.curves import read_curves

    check_out_dir(out)
    result = read_curves(runs, caption)
    rows = [(label, f"{s['steps']} steps, mIoU {100 * s['last_miou']:.2f} % (best {100 * s['best_miou']:.2f} %), "
                    f"{s['training_seconds'] / 60:.0f} min" if s["last_miou"] is not None else f"{s['steps']} steps")
            for label, s in result.summary().items()]
    print_table("depict curves", rows)
    console.print("wrote " + ", ".join(map(str, result.save(out))))


@app.command("eval")
@user_errors
def evaluate_command(
    checkpoint: Optional[Path] = typer.Argument(None, help=CheckpointHelp),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=DatasetOption.help, show_default="the one the checkpoint was trained on"),
    data_root: Optional[Path] = DataRootOption,
    split: str = SplitOption,
    multiscale: bool = MultiscaleOption,
    window: Optional[int] = WindowOption,
    stride: Optional[int] = typer.Option(
        None, "--stride", min=1, help="Sliding-window stride, at most the window.",
        show_default="window - 32 (also for runs trained from a preset), at least window / 2",
    ),
    short_side: Optional[int] = ShortSideOption,
    num_images: Optional[int] = typer.Option(None, "--num-images", min=1, help="Evaluate the first N images only.", show_default="all"),
    batch_size: int = BatchOption,
    amp: bool = AmpOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores to this JSON file."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON (what --out writes) instead of a table."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """mIoU of a checkpoint on a dataset split, with the official protocol (Segmenter's segm/eval/miou.py):
    mmseg's test resize, sliding windows, optional multi-scale with flips, dataset-level IoU.
    Under torchrun each process scores its share of the images; rank 0 prints and writes."""
    from depict_analysis.foundation.device import resolve_device
    from depict_analysis.foundation.distributed import is_writer, process_group
    from depict_analysis.foundation.files import atomic_write_text
    from depict_analysis.models.data import build_dataset
    from depict_analysis.models.evaluate import MULTISCALE_RATIOS, check_classes, eval_protocol, evaluate, jsonable
    from depict_analysis.models.sources import open_checkpoint

    refuse_images([checkpoint], "depict predict MODEL")  # eval reads a --dataset: predict segments images
    if out is not None:
        check_out_file(out, inputs=[checkpoint] if checkpoint is not None else [])
    with process_group(resolve_device(device)) as run_device:  # one process, or this one's share under torchrun
        model, info = open_checkpoint(checkpoint, run_device, trust)
        trained_name, trained_root, trained_kwargs = info.evaluation_dataset()
        name = dataset or trained_name
        if name is None:
            fail("pass --dataset: the checkpoint does not say which dataset it was trained on")
        same = name == trained_name
        data = build_dataset(name, data_root or (trained_root if same else None), split, **(trained_kwargs if same else {}))
        check_classes(model, data)
        protocol = eval_protocol(model, data, info.train_config, window=window, stride=stride, short_side=short_side)
        scales = MULTISCALE_RATIOS if multiscale else (1.0,)
        scores = evaluate(
            model, data, **protocol, scales=scales, flip=multiscale, batch_size=batch_size, num_images=num_images, progress=True,
            amp=amp,
        )
        if not is_writer():
            return
    record = {"checkpoint": info.source, "dataset": data.name, "split": split, "classes": data.class_names, **scores}
    if out is not None:
        atomic_write_text(out, json.dumps(jsonable(record), indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(jsonable(record), indent=2))
        return
    table = Table(title=f"{data.name} {split}: {scores['n_images']} images")
    for column in ("class", "IoU", "accuracy"):
        table.add_column(column, justify="left" if column == "class" else "right")
    percent = lambda x: "-" if math.isnan(x) else f"{100 * x:.2f}"  # noqa: E731
    for cls, iou, acc in zip(data.class_names, scores["iou"], scores["acc"]):
        table.add_row(cls, percent(iou), percent(acc))
    table.add_section()
    table.add_row("[bold]mean", f"[bold]{percent(scores['miou'])}", f"[bold]{percent(scores['mean_acc'])}")
    table.add_row("pixel accuracy", "", percent(scores["pixel_acc"]))
    console.print(table)


@app.command()
@user_errors
def predict(
    sources: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL]", help=f"The model, [NAME=]SOURCE: {CheckpointHelp[0].lower()}{CheckpointHelp[1:]} One model per run.",
    ),
    images: Optional[list[Path]] = ImagesOption,
    out: Path = typer.Option(..., "--out", help="Folder for <stem>_label.png (palette PNG of class ids) and <stem>_overlay.png."),
    window: Optional[int] = WindowOption,
    stride: Optional[int] = typer.Option(
        None, "--stride", min=1, help="Sliding-window stride, at most the window.",
        show_default="a release's window_stride, else as depict eval",
    ),
    short_side: Optional[int] = ShortSideOption,
    multiscale: bool = MultiscaleOption,
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Opacity of the class colours in the overlay."),
    batch_size: int = BatchOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (never an input)."),
    amp: bool = AmpOption,
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Segment the --images (files or folders of them; any mode: RGB, RGBA, grey, 16-bit; EXIF orientation applied)
    with one model: a label map and a colour overlay with a legend for each, resized as depict eval resizes
    (Segmenter's segm/inference.py on mmseg's test views)."""
    from depict_analysis.foundation.files import refuse_overwrite
    from depict_analysis.inputs import image_files
    from depict_analysis.models.evaluate import MULTISCALE_RATIOS, predict_protocol
    from depict_analysis.models.predict import output_paths, predict_files
    from depict_analysis.models.sources import labelled_sources, open_checkpoint

    refuse_images(sources, "depict predict MODEL")
    if sources and len(sources) > 1:
        fail(f"predict runs one model, got {len(sources)}: run it once per model, each with its own --out")
    if not images:
        fail("give the images to segment: --images FILE_OR_FOLDER (repeatable)")
    label, source = labelled_sources(sources)[0] if sources else (None, None)
    check_out_dir(out)
    files = image_files(images)
    refuse_overwrite([p for pair in output_paths(files, out) for p in pair], files, overwrite)  # before loading anything
    model, info = open_checkpoint(source, device, trust, label=label)
    note_builtin_models([info.source], [info.label], None, always=True)
    protocol = predict_protocol(model, info.meta, window=window, stride=stride, short_side=short_side)
    records = predict_files(
        model, files, out, classes=info.classes(), **protocol, scales=MULTISCALE_RATIOS if multiscale else (1.0,),
        flip=multiscale, alpha=alpha, batch_size=batch_size, overwrite=overwrite, progress=True, amp=amp,
    )
    console.print(f"wrote {2 * len(records)} files to {out}")


if __name__ == "__main__":
    app()
