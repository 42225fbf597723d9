"""Segment image files: a label map and a colour overlay per image (``depict predict``).

``<stem>_label.png`` is a palette PNG (mode ``P``): its values are the class ids, its palette the
class colours, as mmseg and VOC write label maps. ``<stem>_overlay.png`` is the image blended with
the class colours, with a legend of the classes present on its right. Both are written atomically,
an existing file is replaced only on request, and an output that is one of the inputs never.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from depict_analysis.models.data import DatasetError, class_info, load_image, make_palette
from depict_analysis.models.errors import ConfigError, InputError
from depict_analysis.models.evaluate import image_labels, require_positive, trained_dataset
from depict_analysis.models.files import atomic_write, refuse_overwrite
from depict_analysis.models.progress import track
from depict_analysis.models.segmentor import Segmentor

BLEND_PIXELS = 1 << 22  # pixels blended at a time: large images never hold a float copy of themselves


def classes_for(meta: dict, n_cls: int) -> tuple[list[str], np.ndarray]:
    """(names, colours ``(n_cls, 3)`` uint8) of the classes: those of the dataset the checkpoint was
    trained on when it is a built-in one with ``n_cls`` classes, otherwise ``class <i>`` and
    ``make_palette(n_cls)``."""
    try:
        names, palette = class_info(trained_dataset(meta))
    except DatasetError:
        names, palette = [], np.zeros((0, 3), np.uint8)
    if len(palette) != n_cls:
        return [f"class {i}" for i in range(n_cls)], make_palette(n_cls)
    return names, palette


def palette_for(meta: dict, n_cls: int) -> np.ndarray:
    """The class colours ``(n_cls, 3)`` uint8 of ``classes_for``."""
    return classes_for(meta, n_cls)[1]


def overlay(image: Image.Image, label: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """RGB image (H, W) blended with the class colours of ``label`` (H, W): ``(1 - alpha) image + alpha
    colour``, rounded; computed a band of rows at a time."""
    pixels = np.asarray(image)
    out = np.empty_like(pixels)
    rows = max(1, BLEND_PIXELS // pixels.shape[1])
    for top in range(0, pixels.shape[0], rows):
        band = slice(top, top + rows)
        blend = (1 - alpha) * pixels[band].astype(np.float32) + alpha * palette[label[band]].astype(np.float32)
        out[band] = np.round(blend)
    return Image.fromarray(out)


def with_legend(image: Image.Image, classes: Sequence[int], names: Sequence[str], palette: np.ndarray) -> Image.Image:
    """``image`` with a white panel on its right listing ``classes``: a colour swatch and a name each,
    in a font that grows with the image (as many as fit its height, then ``+N more``)."""
    size = max(10, min(48, image.height // 25))
    font = ImageFont.load_default(size=size)
    line, pad = round(1.5 * size), size // 2
    fits = max(1, (max(image.height, 4 * line) - 2 * pad) // line)
    shown = list(classes) if len(classes) <= fits else list(classes)[: fits - 1]
    texts = [names[c] for c in shown] + ([f"+{len(classes) - len(shown)} more"] if len(shown) < len(classes) else [])
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = pad + size + pad + max(int(measure.textlength(t, font=font)) for t in texts) + pad
    height = max(image.height, 2 * pad + line * len(texts))
    canvas = Image.new("RGB", (image.width + width, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = image.width + pad
    for i, text in enumerate(texts):
        top = pad + i * line
        if i < len(shown):
            draw.rectangle((left, top, left + size, top + size), fill=tuple(int(v) for v in palette[shown[i]]), outline=(0, 0, 0))
        draw.text((left + size + pad, top), text, fill=(0, 0, 0), font=font)
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
    palette (default ``classes_for({}, K)``). Every output is checked before any work: none may be
    an input, and none may exist unless ``overwrite``. Float32 unless ``amp``. Returns one record
    per image: paths written, size and classes present (most pixels first).
    """
    paths = [Path(p) for p in paths]
    if model.n_cls > 256:
        raise ConfigError(f"label PNGs hold 8-bit class ids; this model has {model.n_cls} classes")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    require_positive(batch_size=batch_size)
    names, palette = classes or classes_for({}, model.n_cls)
    outputs = output_paths(paths, Path(out_dir))
    refuse_overwrite([p for pair in outputs for p in pair], paths, overwrite)
    records = []
    with torch.inference_mode():
        for path, (label_path, overlay_path) in zip(track(paths, "predicting", enabled=progress), outputs):
            image = load_image(path)
            label = image_labels(
                model, image, window=window, stride=stride, img_scale=img_scale, scales=scales, flip=flip,
                batch_size=batch_size, amp=amp,
            ).cpu().numpy()
            counts = np.bincount(label.ravel(), minlength=model.n_cls)
            present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]]
            atomic_write(label_path, lambda f: label_png(label, palette).save(f, format="PNG"))
            blended = with_legend(overlay(image, label, palette, alpha), present, names, palette)
            atomic_write(overlay_path, lambda f: blended.save(f, format="PNG"))
            records.append(
                {"image": str(path), "label": str(label_path), "overlay": str(overlay_path), "size": [image.width, image.height],
                 "classes": present}
            )
    return records
