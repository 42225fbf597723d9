"""One function per figure: data in, ``matplotlib.figure.Figure`` out (written by ``outputs.save_figure``).

Figures are sized for a paper column or page and share one seaborn style.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
LINE_COLORS = sns.color_palette("colorblind")


def palette_image(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) of ids -> RGB (H, W, 3) uint8; ids beyond the palette (e.g. 255) are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = palette[:256]
    return lut[np.asarray(labels).clip(0, 255)]
