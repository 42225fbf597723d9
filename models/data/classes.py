"""Class names and colour palettes for every built-in dataset.

Palettes are ``np.ndarray`` of shape ``(n_cls, 3)``, dtype ``uint8``. ADE20K and Pascal Context use
the standard mmsegmentation palettes, Cityscapes its official colours; anything else gets
``make_palette(n)``.
"""

from __future__ import annotations

import colorsys

import numpy as np

from depict_analysis.foundation.errors import DatasetError

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

ADE20K_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], dtype=np.uint8)

# Pascal Context with background at index 0 (60 classes); the 59-class variant drops it.
PASCAL_CONTEXT60_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor", "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth",
    "computer", "cup", "door", "fence", "floor", "flower", "food", "grass", "ground", "keyboard",
    "light", "mountain", "mouse", "curtain", "platform", "sign", "plate", "road", "rock",
    "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck", "wall", "water",
    "window", "wood",
)
PASCAL_CONTEXT60_PALETTE = ADE20K_PALETTE[:60].copy()
PASCAL_CONTEXT59_CLASSES = PASCAL_CONTEXT60_CLASSES[1:]
PASCAL_CONTEXT59_PALETTE = ADE20K_PALETTE[1:60].copy()

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32],
], dtype=np.uint8)

# Class 0 is a real class (the textured background), not ignored. See models/data/synthetic.py.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background", "disc", "square", "triangle", "ring", "cross", "star", "ellipse",
)
SYNTHETIC_PALETTE = np.array([
    [40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240],
], dtype=np.uint8)


def make_palette(n: int) -> np.ndarray:
    """Deterministic palette of ``n`` distinct colours, shape ``(n, 3)`` uint8.

    Hues step by the golden ratio (neighbouring indices get far-apart hues); saturation and
    value cycle through a few levels so that large ``n`` still gives distinguishable colours.
    """
    golden = 0.6180339887498949
    colours = [
        colorsys.hsv_to_rgb((i * golden) % 1.0, (0.95, 0.7, 0.5)[i % 3], (0.95, 0.75)[(i // 3) % 2])
        for i in range(n)
    ]
    return np.round(np.array(colours, dtype=np.float64).reshape(n, 3) * 255).astype(np.uint8)


CLASS_INFO: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
    "pascal_context": (PASCAL_CONTEXT60_CLASSES, PASCAL_CONTEXT60_PALETTE),
    "pascal_context59": (PASCAL_CONTEXT59_CLASSES, PASCAL_CONTEXT59_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "synthetic": (SYNTHETIC_CLASSES, SYNTHETIC_PALETTE),
}


def class_info(name: str) -> tuple[list[str], np.ndarray]:
    """``(class_names, palette (n_cls, 3) uint8)`` of a built-in dataset, without needing its files.

    Raises ``DatasetError`` for a name without fixed classes (e.g. ``folder``, whose classes live in
    its ``classes.yaml``).
    """
    if name not in CLASS_INFO:
        raise DatasetError(f"no built-in class list for dataset {name!r}; "
                       f"known: {', '.join(CLASS_INFO)}")
    names, palette = CLASS_INFO[name]
    return list(names), palette.copy()
