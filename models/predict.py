"""Segment image files: a label map and a colour overlay per image (``depict predict``).

``<stem>_label.png`` is a palette PNG (mode ``P``): its values are the class ids, its palette the
class colours, as mmseg and VOC write label maps. ``<stem>_overlay.png`` is the image blended with
the class colours, with a legend of the classes present on its right. Both are written atomically,
an existing file is replaced only on request, and an output that is one of the inputs never. Every
image is read before the first output is written: one broken file among many stops the run with
nothing written, so the rerun after fixing it needs no ``--overwrite``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from depict_analysis.models.data import load_image
from depict_analysis.foundation.errors import ConfigError, InputError
from depict_analysis.models.evaluate import image_labels, require_positive
from depict_analysis.foundation.files import atomic_write, refuse_overwrite
from depict_analysis.foundation.progress import track
from depict_analysis.models.segmentor import Segmentor
from depict_analysis.models.sources import generic_classes

BAND_PIXELS = 1 << 20  # pixels blended or counted at a time: a large image is never copied whole


def _bands(height: int, width: int) -> list[tuple[int, int]]:
    """(top, bottom) of the bands of rows that ``BAND_PIXELS`` pixels of an image cover."""
    rows = max(1, BAND_PIXELS // width)
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def overlay(
    image: Image.Image, label: np.ndarray, palette: np.ndarray, alpha: float = 0.5, canvas: Image.Image | None = None
) -> Image.Image:
    """RGB image (H, W) blended with the class colours of ``label`` (H, W): ``(1 - alpha) image + alpha
    colour``, rounded; drawn into the top-left of ``canvas`` when given (else a new image of the
    image's size), a band of rows at a time."""
    canvas = Image.new("RGB", image.size) if canvas is None else canvas
    for top, bottom in _bands(image.height, image.width):
        pixels = np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float32)
        blend = (1 - alpha) * pixels + alpha * palette[label[top:bottom]].astype(np.float32)
        canvas.paste(Image.fromarray(np.round(blend).astype(np.uint8)), (0, top))
    return canvas


def legend_canvas(size: tuple[int, int], classes: Sequence[int], names: Sequence[str], palette: np.ndarray) -> Image.Image:
    """A white image wider than an image of ``size`` (W, H), with a legend of ``classes`` on its right (a
    colour swatch and a name each, in a font that grows with the image; as many as fit its height,
    then ``+N more``); the image goes into its top-left corner (``overlay(..., canvas=)``)."""
    width, height = size
    font_size = max(10, min(48, height // 25))
    font = ImageFont.load_default(size=font_size)
    line, pad = round(1.5 * font_size), font_size // 2
    fits = max(1, (max(height, 4 * line) - 2 * pad) // line)
    shown = list(classes) if len(classes) <= fits else list(classes)[: fits - 1]
    texts = [names[c] for c in shown] + ([f"+{len(classes) - len(shown)} more"] if len(shown) < len(classes) else [])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    panel = pad + font_size + pad + max(int(measure.textlength(t, font=font)) for t in texts) + pad
    canvas = Image.new("RGB", (width + panel, max(height, 2 * pad + line * len(texts))), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = width + pad
    for i, text in enumerate(texts):
        top = pad + i * line
        if i < len(shown):
            swatch = (left, top, left + font_size, top + font_size)
            draw.rectangle(swatch, fill=tuple(int(v) for v in palette[shown[i]]), outline=(0, 0, 0))
        draw.text((left + font_size + pad, top), text, fill=(0, 0, 0), font=font)
    return canvas


def label_png(label: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Class ids uint8 (H, W) -> a palette image (mode ``P``) of the same values, coloured by ``palette``."""
    image = Image.fromarray(label)
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return image


def output_paths(images: Sequence[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """``(<stem>_label.png, <stem>_overlay.png)`` in ``out_dir`` for each image; two images with one stem are refused."""
    stems = [p.stem for p in images]
    duplicate = next((s for s in stems if stems.count(s) > 1), None)
    if duplicate is not None:
        raise InputError(f"two input images share the name {duplicate!r}; their outputs would overwrite each other")
    return [(out_dir / f"{stem}_label.png", out_dir / f"{stem}_overlay.png") for stem in stems]


def predict_files(
    model: Segmentor,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    window: int,
    stride: int,
    img_scale: tuple[int, int] | None = None,
    classes: tuple[list[str], np.ndarray] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    alpha: float = 0.5,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = False,
    amp: bool = False,
) -> list[dict]:
    """Write ``<stem>_label.png`` (class ids, the image's size, palette PNG) and ``<stem>_overlay.png``
    (with a legend) for each image.

    Images of any mode are read with ``load_image`` (RGB, upright, alpha dropped, 16-bit scaled) and
    segmented by ``image_labels`` with windows of ``window`` px every ``stride`` (images whose short
    side is below the window are first enlarged to it) after mmseg's test resize to ``img_scale``
    (None: their own size), in bounded memory. ``classes``: (names, colours) for the legend and
    palette (default ``generic_classes(K)``). Every output is checked before any work: none may be
    an input or a special file, and none may exist unless ``overwrite``; every image is decoded
    once before the first is segmented, so a broken one stops the run with nothing written. Float32 unless ``amp``. Returns one record
    per image: paths written, size and classes present (most pixels first).
    """
    paths = [Path(p) for p in paths]
    if model.n_cls > 256:
        raise ConfigError(f"label PNGs hold 8-bit class ids; this model has {model.n_cls} classes")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    require_positive(batch_size=batch_size)
    names, palette = classes or generic_classes(model.n_cls)
    outputs = output_paths(paths, Path(out_dir))
    refuse_overwrite([p for pair in outputs for p in pair], paths, overwrite)
    for path in paths:  # every image decodes, or nothing is written: a rerun never meets half the outputs
        load_image(path)
    records = []
    with torch.inference_mode():
        for path, (label_path, overlay_path) in zip(track(paths, "predicting", enabled=progress), outputs):
            image = load_image(path)
            label = image_labels(
                model, image, window=window, stride=stride, img_scale=img_scale, scales=scales, flip=flip,
                batch_size=batch_size, amp=amp,
            ).cpu().numpy()
            counts = sum(np.bincount(label[top:bottom].ravel(), minlength=model.n_cls) for top, bottom in _bands(*label.shape))
            present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]]
            atomic_write(label_path, lambda f: label_png(label, palette).save(f, format="PNG"))
            blended = overlay(image, label, palette, alpha, canvas=legend_canvas(image.size, present, names, palette))
            atomic_write(overlay_path, lambda f: blended.save(f, format="PNG"))
            records.append(
                {"image": str(path), "label": str(label_path), "overlay": str(overlay_path), "size": [image.width, image.height],
                 "classes": present}
            )
    return records
