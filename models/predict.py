"""Segment image files: a label map and a colour overlay per image (``depict predict``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from depict_analysis.models.data import DatasetError, class_info, load_image, make_palette
from depict_analysis.models.data.transforms import img_scale_for
from depict_analysis.models.evaluate import image_probs
from depict_analysis.models.segmentor import Segmentor


def palette_for(meta: dict, n_cls: int) -> np.ndarray:
    """Colours ``(n_cls, 3)`` uint8: those of the dataset the checkpoint was trained on when it is a
    built-in one with ``n_cls`` classes (ours: ``train_config``; official: ``dataset_kwargs``),
    otherwise ``make_palette(n_cls)``."""
    official = (meta.get("variant") or {}).get("dataset_kwargs") or {}
    name = (meta.get("train_config") or {}).get("dataset") or official.get("dataset")
    try:
        palette = class_info(name)[1]
    except DatasetError:
        return make_palette(n_cls)
    return palette if len(palette) == n_cls else make_palette(n_cls)


def overlay(image: Image.Image, label: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """RGB image (H, W) blended with the class colours of ``label`` (H, W): ``(1 - alpha) image + alpha colour``."""
    blend = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * palette[label].astype(np.float32)
    return Image.fromarray(np.round(blend).astype(np.uint8))


def predict_files(
    model: Segmentor,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    palette: np.ndarray,
    window: int,
    stride: int,
    short_side: int = 0,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    alpha: float = 0.5,
    batch_size: int = 8,
    progress: bool = False,
    amp: bool = False,
) -> list[dict]:
    """Write ``<stem>_label.png`` (uint8 class ids, the image's size) and ``<stem>_overlay.png`` for each image.

    Images of any mode are read with ``load_image`` (RGB, alpha dropped, 16-bit scaled) and
    segmented by ``image_probs`` with windows of ``window`` px every ``stride`` (images whose short
    side is below the window are first enlarged to it); ``short_side`` > 0 first resizes as
    ``evaluate`` does, to ``img_scale_for(short_side)``. Float32 unless ``amp``. Returns one record
    per image: paths written, size and classes present.
    """
    paths = [Path(p) for p in paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):
        duplicate = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"two input images share the name {duplicate!r}; their outputs would overwrite each other")
    if model.n_cls > 256:
        raise ValueError(f"label PNGs hold 8-bit class ids; this model has {model.n_cls} classes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with torch.inference_mode():
        for path in track(paths, description="predicting", disable=not progress):
            image = load_image(path)
            probs = image_probs(
                model, image, window=window, stride=stride, img_scale=img_scale_for(short_side), scales=scales, flip=flip,
                batch_size=batch_size, amp=amp,
            )
            label = probs.argmax(0).to(torch.uint8).cpu().numpy()
            label_path, overlay_path = out_dir / f"{path.stem}_label.png", out_dir / f"{path.stem}_overlay.png"
            Image.fromarray(label).save(label_path)
            overlay(image, label, palette, alpha).save(overlay_path)
            records.append(
                {
                    "image": str(path),
                    "label": str(label_path),
                    "overlay": str(overlay_path),
                    "size": [image.width, image.height],
                    "classes": np.unique(label).tolist(),
                }
            )
    return records
