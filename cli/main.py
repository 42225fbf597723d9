"""``depict``: inspect, train, evaluate and run segmentation models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import DeviceOption, TrustOption, new_app, open_model, print_table, user_errors
from models import create_model
from models.summary import model_summary

app = new_app("Inspect, train, evaluate and run DEPICT / Segmenter models.")


@app.command()
@user_errors
def info(
    checkpoint: Optional[Path] = typer.Argument(None, help="Our .pt file or an official release folder."),
    variant: Optional[str] = typer.Option(None, help="Describe a registered variant instead (random weights)."),
    n_cls: int = typer.Option(150, help="Classes, with --variant."),
    image_size: int = typer.Option(512, help="Image side for the decoder GFLOPs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str = DeviceOption,
    trust: bool = TrustOption,
):
    """Variant, classes, parameters (encoder / decoder) and decoder GFLOPs of a model."""
    model = create_model(variant, n_cls) if variant else open_model(checkpoint, device, trust)[0]
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


if __name__ == "__main__":
    app()
