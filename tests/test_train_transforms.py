"""The training pipeline against mmseg 0.x / mmcv / Segmenter, each step checked against a reference
written here from the official code's behaviour."""

import cv2
import numpy as np
import pytest
from PIL import Image

from depict_analysis.models.backbone import NORMALIZATION
from depict_analysis.models.data import TrainTransform
from depict_analysis.models.data.transforms import photometric_distortion, resize_image, resize_label

# ------------------------------------------------------------------------------------------ resizing


def opencv_nearest_rows(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST source index of each output index (resize.cpp: the scale is the
    double 1 / (n_out / n_in), the index its product with the output index, floored, kept inside)."""
    scale = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)


SIZES = [*range(1, 40), 98, 196, 480, 512, 520, 683, 1024]


def test_label_resize_copies_the_rows_and_columns_opencv_picks():
    for n_in in SIZES:
        label = np.arange(n_in, dtype=np.int64)[:, None] * 1000 + np.arange(3)  # rows of unique values, 3 columns
        for n_out in SIZES:
            resized = resize_label(label, (n_out, 3))
            assert resized.dtype == np.int64
            assert np.array_equal(resized, label[opencv_nearest_rows(n_in, n_out)]), (n_in, n_out)
            assert np.array_equal(resize_label(label.T, (3, n_out)), label.T[:, opencv_nearest_rows(n_in, n_out)])
    # OpenCV's rule is not the exact floor(i * in / out): from 2 rows to 98, row 49 copies row 0, not 1
    assert opencv_nearest_rows(2, 98)[49] == 0 and 49 * 2 // 98 == 1
    assert resize_label(np.array([[3], [7]]), (98, 1))[49, 0] == 3


def bilinear_reference(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Exact bilinear interpolation at half-pixel centres, edges clamped, no antialiasing (float64)."""
    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x0 = np.floor(x).astype(np.int64)
        frac = x - x0
        frac[x0 < 0], x0[x0 < 0] = 0.0, 0
        frac[x0 >= n_in - 1], x0[x0 >= n_in - 1] = 0.0, n_in - 1
        return x0, frac

    (r0, fr), (c0, fc) = taps(image.shape[0], size[0]), taps(image.shape[1], size[1])
    r1, c1 = np.minimum(r0 + 1, image.shape[0] - 1), np.minimum(c0 + 1, image.shape[1] - 1)
    x = image.astype(np.float64)
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


@pytest.mark.parametrize("shape, size", [((37, 53), (80, 21)), ((64, 48), (21, 16)), ((30, 40), (60, 80)), ((9, 7), (9, 30))])
def test_image_resize_is_bilinear_at_half_pixel_centres_in_fixed_point(shape, size):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    resized = resize_image(image, size).astype(np.int64)
    assert resized.shape == (*size, 3)
    # OpenCV rounds its 11-bit fixed-point weights: within one grey level of the exact value
    assert np.abs(resized - bilinear_reference(image, size)).max() <= 1.0
    assert resize_image(image, shape) is image


# --------------------------------------------------------------------------------- random resize


@pytest.mark.parametrize(
    "shape, base, max_ratio, ratio, expected",
    [
        # short edge int(20 * 1.23) = 24, long int(160 * 1.23) = 196: scale min(196/100, 24/37) -> 24 x 65
        # (scaling by the untruncated 24.6 / 37 would give 25 x 67)
        ((37, 100), 20, 8, 1.23, (24, 65)),
        # an elongated image meets the long-side cap: 8 x base (Pascal Context) allows 160, 4 x base only 80
        ((10, 200), 20, 8, 1.0, (8, 160)),
        ((10, 200), 20, 4, 1.0, (4, 80)),
    ],
)
def test_random_resize_is_mmsegs_ratio_scale(shape, base, max_ratio, ratio, expected):
    image = Image.fromarray(np.zeros((*shape, 3), np.uint8))
    label = np.zeros(shape, np.int64)
    t = TrainTransform(200, (0, 0, 0), (1, 1, 1), ratio_range=(ratio, ratio), cat_max_ratio=1.0, flip_prob=0.0,
                       photometric=False, base_size=base, max_ratio=max_ratio)
    out = t(image, label, np.random.default_rng(0))[1].numpy()
    rows, cols = np.nonzero(out != 255)
    assert (rows.max() + 1, cols.max() + 1) == expected and (out != 255).sum() == expected[0] * expected[1]


# ------------------------------------------------------------------------------------------ cropping


def mmseg_crop_boxes(rng: np.random.Generator, margins: tuple[int, int], tries: int) -> list[tuple[int, int]]:
    """The crop corners mmseg's RandomCrop draws, in order: (top, left) = randint(margin + 1) each."""
    return [(int(rng.integers(margins[0] + 1)), int(rng.integers(margins[1] + 1))) for _ in range(tries)]


@pytest.mark.parametrize("seed", range(5))
def test_crop_after_ten_rejections_is_the_eleventh_unchecked_draw(seed):
    # one class everywhere: every crop is rejected, mmseg draws 11 boxes and keeps the last
    image = np.arange(30 * 40 * 3).reshape(30, 40, 3) % 251
    label = np.zeros((30, 40), np.int64)
    t = TrainTransform((8, 12), (0, 0, 0), (1, 1, 1), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    out = t(Image.fromarray(image.astype(np.uint8)), label, np.random.default_rng(seed))[0].numpy()
    reference = np.random.default_rng(seed)
    reference.uniform(1.0, 1.0)  # the resize ratio is drawn first
    top, left = mmseg_crop_boxes(reference, (30 - 8, 40 - 12), 11)[-1]
    assert np.array_equal(np.rint(out * 255).astype(np.int64), image[top:top + 8, left:left + 12].transpose(2, 0, 1))


def test_crop_accepted_at_once_is_the_first_draw():
    image = np.arange(30 * 40 * 3).reshape(30, 40, 3) % 251
    label = np.indices((30, 40)).sum(0) % 2  # a checkerboard: every crop holds two classes half and half
    t = TrainTransform((8, 12), (0, 0, 0), (1, 1, 1), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    out = t(Image.fromarray(image.astype(np.uint8)), label, np.random.default_rng(7))[0].numpy()
    reference = np.random.default_rng(7)
    reference.uniform(1.0, 1.0)
    top, left = mmseg_crop_boxes(reference, (30 - 8, 40 - 12), 1)[0]
    assert np.array_equal(np.rint(out * 255).astype(np.int64), image[top:top + 8, left:left + 12].transpose(2, 0, 1))


# ------------------------------------------------------------------------------- colour distortion


def opencv_rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV (color_hsv: 12-bit fixed point): V = max, S = 255 diff / V,
    H = 30 (sector + offset / diff) in 180 levels, each product rounded through its division table."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    shift, levels = 12, np.arange(1, 256)
    sdiv = np.concatenate([[0], np.round((255 << shift) / levels)]).astype(np.int64)
    hdiv = np.concatenate([[0], np.round((180 << shift) / (6.0 * levels))]).astype(np.int64)
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * sdiv[v] + (1 << (shift - 1))) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + (1 << (shift - 1))) >> shift
    return np.stack([np.where(h < 0, h + 180, h), s, v], axis=-1)


def test_opencv_hsv_has_180_hue_levels_as_the_official_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    assert np.array_equal(hsv, opencv_rgb_to_hsv(rgb)) and hsv[..., 0].max() < 180
    # mmseg converts its BGR images: the same HSV
    assert np.array_equal(hsv, cv2.cvtColor(np.ascontiguousarray(rgb[..., ::-1]), cv2.COLOR_BGR2HSV))


def mmseg_photometric_distortion(bgr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, set[str]]:
    """mmseg's PhotoMetricDistortion on a BGR image, step by step (with mmcv's cv2 colour conversions),
    drawing from ``rng`` in its order; also the names of the steps that fired."""
    fired = set()

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img):
        if rng.integers(2):
            fired.add("contrast")
            return convert(img, alpha=rng.uniform(0.5, 1.5))
        return img

    img = bgr
    if rng.integers(2):
        fired.add("brightness")
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        fired.add("saturation")
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        fired.add("hue")
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img, fired


def test_photometric_distortion_is_mmsegs_step_by_step():
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    all_fired = []
    for seed in range(40):
        ours = photometric_distortion(rgb.copy(), np.random.default_rng(seed))
        reference, fired = mmseg_photometric_distortion(np.ascontiguousarray(rgb[..., ::-1]), np.random.default_rng(seed))
        assert np.array_equal(ours, reference[..., ::-1]), (seed, fired)
        all_fired.append(fired)
    assert set().union(*all_fired) == {"brightness", "contrast", "saturation", "hue"}
    assert any({"saturation", "hue"} <= fired for fired in all_fired)  # two conversions in one call


# ------------------------------------------------------------------------------------- normalisation


def test_deit_statistics_are_rounded_as_segmenter_rounds_them():
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    segmenter = {key: np.round(255 * np.array(value), 2) for key, value in imagenet.items()}  # segm/data/base.py
    mean, std = NORMALIZATION["deit"]
    np.testing.assert_allclose(np.array(mean) * 255, segmenter["mean"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.array(std) * 255, segmenter["std"], rtol=0, atol=1e-9)
    assert NORMALIZATION["vit"] == ((0.5,) * 3, (0.5,) * 3)
