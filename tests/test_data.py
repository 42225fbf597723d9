"""Tests for depict_analysis.models.data: on-disk layouts, label mappings, bad input, synthetic data, transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from depict_analysis.models.data import (DATASETS, DatasetError, EvalTransform, TrainTransform, build_dataset,
                         class_info, load_image, load_label, make_palette, normalization_stats)
from depict_analysis.models.data.transforms import (img_scale_for, multiscale_views, normalize, photometric_distortion,
                                                    rescale_size, resize_image, resize_label)

MEAN, STD = normalization_stats("deit")


# ----------------------------------------------------------------------------- fixture helpers
def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(values: list[int], h: int = 6, w: int = 8) -> np.ndarray:
    """A (h, w) uint8 mask cycling through ``values`` row-major."""
    return np.resize(np.array(values, dtype=np.uint8), h * w).reshape(h, w)


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    base = tmp_path / "ADEChallengeData2016"
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            _save(base / "images" / split / f"ADE_{split}_{i}.jpg", _image(i))
            _save(base / "annotations" / split / f"ADE_{split}_{i}.png", _mask([0, 1, 2, 150]))
    return tmp_path


@pytest.fixture
def pascal_root(tmp_path: Path) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    for image_id in ("2008_000001", "2008_000002", "2008_000003"):
        _save(voc / "JPEGImages" / f"{image_id}.jpg", _image(1))
        _save(voc / "SegmentationClassContext" / f"{image_id}.png", _mask([0, 1, 30, 59]))
    lists = voc / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2008_000001\n2008_000002\n")
    (lists / "val.txt").write_text("2008_000003\n")
    return tmp_path


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    for split, city in (("train", "aachen"), ("train", "bochum"), ("val", "frankfurt")):
        prefix = f"{city}_000000_000019"
        _save(tmp_path / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", _image(2))
        _save(tmp_path / "gtFine" / split / city / f"{prefix}_gtFine_labelTrainIds.png",
              _mask([0, 7, 18, 255]))
    return tmp_path


def _classes_yaml(root: Path, n: int = 3) -> None:
    entries = "\n".join(f"  - {{name: c{i}, color: [{10 * i}, 20, 30]}}" for i in range(n))
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(f"classes:\n{entries}\n")


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    _classes_yaml(root)
    _save(root / "images" / "a.png", _image(3))
    _save(root / "masks" / "a.png", _mask([0, 1, 2, 255]))
    _save(root / "images" / "b.jpg", _image(4))  # no mask: predict-only
    return root


# ----------------------------------------------------------------------------- label mappings
def test_ade20k_shifts_labels_and_ignores_zero(ade_root: Path) -> None:
    for root in (ade_root, ade_root / "ADEChallengeData2016"):
        train = build_dataset("ade20k", root, "train")
        assert len(train) == 2 and len(build_dataset("ade20k", root, "val")) == 1
        item = train[0]
        expected = _mask([255, 0, 1, 149]).astype(np.int64)
        assert torch.equal(item["label"], torch.from_numpy(expected))
        assert item["label"].dtype == torch.long
        assert item["path"].endswith("ADE_training_0.jpg")
    assert train.n_cls == 150 and len(train.class_names) == 150 and train.palette.shape == (150, 3)
    assert train.class_names[0] == "wall" and train.ignore_index == 255


def test_pascal_context_60_keeps_background_59_ignores_it(pascal_root: Path) -> None:
    ds60 = build_dataset("pascal_context", pascal_root / "VOCdevkit", "train")  # the paper's and Segmenter's
    ds59 = build_dataset("pascal_context59", pascal_root, "train")
    assert len(ds59) == len(ds60) == 2
    assert len(build_dataset("pascal_context", pascal_root, "val")) == 1
    assert np.array_equal(ds59.load_raw(0)[1], _mask([255, 0, 29, 58]).astype(np.int64))
    assert np.array_equal(ds60.load_raw(0)[1], _mask([0, 1, 30, 59]).astype(np.int64))
    assert (ds59.n_cls, ds60.n_cls) == (59, 60)
    assert ds60.class_names[0] == "background" and ds59.class_names[0] == "aeroplane"
    assert np.array_equal(ds59.palette, ds60.palette[1:])


def test_cityscapes_train_ids_pass_through(cityscapes_root: Path) -> None:
    ds = build_dataset("cityscapes", cityscapes_root, "train")
    assert len(ds) == 2 and ds.n_cls == 19
    assert np.array_equal(ds.load_raw(1)[1], _mask([0, 7, 18, 255]).astype(np.int64))
    assert "bochum" in ds[1]["path"]
    assert ds.palette[0].tolist() == [128, 64, 128] and ds.class_names[-1] == "bicycle"


def test_folder_dataset_with_and_without_masks(folder_root: Path) -> None:
    ds = build_dataset("folder", folder_root, "train")
    assert ds.class_names == ["c0", "c1", "c2"] and ds.palette[2].tolist() == [20, 20, 30]
    assert [Path(ds.item_path(i)).name for i in range(len(ds))] == ["a.png", "b.jpg"]
    assert np.array_equal(ds.load_raw(0)[1], _mask([0, 1, 2, 255]).astype(np.int64))
    assert (ds[1]["label"] == 255).all() and ds[1]["label"].shape == (6, 8)


def test_folder_dataset_split_subfolders(tmp_path: Path) -> None:
    _classes_yaml(tmp_path, n=2)
    _save(tmp_path / "images" / "train" / "x.png", _image(5))
    _save(tmp_path / "masks" / "train" / "x.png", _mask([1]))
    _save(tmp_path / "images" / "val" / "y.png", _image(6))
    _save(tmp_path / "masks" / "val" / "y.png", _mask([0]))
    train, val = (build_dataset("folder", tmp_path, s) for s in ("train", "val"))
    assert len(train) == len(val) == 1
    assert (train.load_raw(0)[1] == 1).all() and (val.load_raw(0)[1] == 0).all()


def test_item_without_transform_is_unnormalised_float(folder_root: Path) -> None:
    ds = build_dataset("folder", folder_root, "train")
    item = ds[0]
    expected = torch.from_numpy(_image(3)).permute(2, 0, 1).float() / 255
    assert item["image"].dtype == torch.float32 and torch.allclose(item["image"], expected)
    assert torch.equal(ds[-2]["image"], item["image"])
    with pytest.raises(IndexError):
        ds[2]


# ----------------------------------------------------------------------------- bad input
def test_missing_root_and_wrong_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for name in ("ade20k", "pascal_context", "cityscapes", "folder"):
        with pytest.raises(DatasetError, match="nowhere"):
            build_dataset(name, missing, "train")
    (tmp_path / "ADEChallengeData2016" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"images.training"):
        build_dataset("ade20k", tmp_path, "train")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"gtFine.val"):
        build_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(DatasetError, match="classes.yaml"):
        build_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match="needs a root"):
        build_dataset("ade20k", None, "train")
    with pytest.raises(DatasetError, match="expected one of: .*synthetic"):
        build_dataset("imagenet", tmp_path, "train")


def test_bad_split_and_empty_split(ade_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'test'.*train, val"):
        build_dataset("ade20k", ade_root, "test")
    for f in (ade_root / "ADEChallengeData2016" / "images" / "validation").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"no images found for split 'val'.*validation"):
        build_dataset("ade20k", ade_root, "val")


def test_missing_annotation_and_split_list(ade_root: Path, pascal_root: Path) -> None:
    (ade_root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_training_1.png").unlink()
    with pytest.raises(DatasetError, match=r"expected .*ADE_training_1\.png"):
        build_dataset("ade20k", ade_root, "train")
    lists = pascal_root / "VOCdevkit" / "VOC2010" / "ImageSets" / "SegmentationContext"
    (lists / "val.txt").write_text("2008_999999\n")
    with pytest.raises(DatasetError, match=r"2008_999999\.jpg does not exist"):
        build_dataset("pascal_context", pascal_root, "val")
    (lists / "train.txt").unlink()
    with pytest.raises(DatasetError, match=r"split list at .*train\.txt"):
        build_dataset("pascal_context", pascal_root, "train")


@pytest.mark.parametrize("name, bad_value, good", [
    ("ade20k", 151, [0, 150]), ("cityscapes", 19, [0, 255]), ("pascal_context", 60, [0, 59]),
    ("pascal_context59", 255, [0, 59]),
])
def test_label_out_of_range_names_file_and_value(request: pytest.FixtureRequest, name: str,
                                                 bad_value: int, good: list[int]) -> None:
    fixture = {"ade20k": "ade_root", "cityscapes": "cityscapes_root"}.get(name, "pascal_root")
    ds = build_dataset(name, request.getfixturevalue(fixture), "val")
    _save(Path(ds.samples[0][1]), _mask(good + [bad_value]))
    with pytest.raises(DatasetError) as err:
        ds[0]
    message = str(err.value)
    assert Path(ds.samples[0][1]).name in message and f"value {bad_value}" in message
    assert "\n" not in message


def test_corrupt_and_non_image_files(folder_root: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt: not an image file"):
        load_image(text)
    png = (folder_root / "images" / "a.png").read_bytes()
    (folder_root / "images" / "a.png").write_bytes(png[: len(png) // 2])  # truncated
    ds = build_dataset("folder", folder_root, "train")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png: corrupt"):
        ds[0]
    (folder_root / "images" / "b.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DatasetError, match=r"b\.jpg"):
        ds[1]
    with pytest.raises(DatasetError, match="image file not found"):
        load_image(tmp_path / "missing.png")


def test_bad_masks_and_classes_yaml(folder_root: Path) -> None:
    _save(folder_root / "masks" / "a.png", np.zeros((6, 8, 3), np.uint8))
    ds = build_dataset("folder", folder_root, "train")
    with pytest.raises(DatasetError, match="mode RGB; expected a single-channel"):
        ds[0]
    _save(folder_root / "masks" / "a.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DatasetError, match="8x5 but image .* is 8x6"):
        ds[0]
    (folder_root / "classes.yaml").write_text("classes:\n  - {name: a, color: [1, 2]}\n")
    with pytest.raises(DatasetError, match="class entry 0"):
        build_dataset("folder", folder_root, "train")
    (folder_root / "classes.yaml").write_text("classes: [unclosed\n")
    with pytest.raises(DatasetError, match="cannot parse"):
        build_dataset("folder", folder_root, "train")


# ----------------------------------------------------------------------------- image modes
def test_image_modes_load_as_rgb(tmp_path: Path) -> None:
    grey16 = np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 100], [255, 7]]
    assert (out[..., 0] == out[..., 2]).all()

    _save(tmp_path / "grey.png", np.array([[0, 50], [200, 255]], np.uint8))
    assert np.asarray(load_image(tmp_path / "grey.png"))[..., 1].tolist() == [[0, 50], [200, 255]]

    rgba = np.dstack([_image(7, 2, 2), np.array([[0, 255], [128, 9]], np.uint8)])
    _save(tmp_path / "rgba.png", rgba)
    im = load_image(tmp_path / "rgba.png")
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgba[..., :3])

    pal = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.save(tmp_path / "pal.png")
    assert np.asarray(load_image(tmp_path / "pal.png")).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    assert load_label(tmp_path / "pal.png").tolist() == [[0, 1]]  # labels keep palette indices


# ----------------------------------------------------------------------------- synthetic
def _synthetic(split: str = "train", **kwargs):
    return build_dataset("synthetic", None, split, **{"length": 48, **kwargs})


def test_synthetic_is_deterministic_and_order_independent() -> None:
    a, b = _synthetic(), _synthetic()
    first = a[5]
    for _ in range(2):
        a[3], a[11]
    assert torch.equal(a[5]["image"], first["image"]) and torch.equal(b[5]["label"], first["label"])
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2, shuffle=False)
    batch = next(iter(loader))
    assert torch.equal(batch["image"][3], a[3]["image"])
    assert batch["image"].shape == (4, 3, 64, 64) and a.item_path(3) in batch["path"]


def test_synthetic_splits_and_seeds_differ() -> None:
    train, val, other = _synthetic("train"), _synthetic("val"), _synthetic("train", seed=1)
    train_imgs = {train.load_raw(i)[0].tobytes() for i in range(len(train))}
    assert not train_imgs & {val.load_raw(i)[0].tobytes() for i in range(len(val))}
    assert not train_imgs & {other.load_raw(i)[0].tobytes() for i in range(len(other))}
    assert len(_synthetic("val", length=None)) == 200 and len(_synthetic(length=None)) == 1000


def test_synthetic_classes_all_appear_background_is_a_class() -> None:
    ds = _synthetic(size=48)
    assert ds.n_cls == 8 and ds.class_names[0] == "background" and ds.palette.shape == (8, 3)
    labels = np.stack([ds.load_raw(i)[1] for i in range(36)])
    assert labels.shape == (36, 48, 48)
    counts = np.bincount(labels.ravel(), minlength=9)
    assert counts[8:].sum() == 0 and (counts[:8] > 100).all()  # no 255, every class present


def _colour_classifier_accuracy(train: list, test: list, bins: int = 6) -> tuple[float, float]:
    """Fit P(class | quantised RGB) on ``train`` (image, label) pairs; return (accuracy on
    ``test``, accuracy of always answering the most frequent class)."""
    def codes(image: np.ndarray) -> np.ndarray:
        q = (image.astype(np.int64) * bins) // 256
        return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]

    table = np.zeros((bins**3, 8))
    for image, label in train:
        np.add.at(table, (codes(image).ravel(), label.ravel()), 1)
    predict, majority = table.argmax(1), table.sum(0).argmax()
    correct = total = correct_majority = 0
    for image, label in test:
        correct += (predict[codes(image)] == label).sum()
        correct_majority += (label == majority).sum()
        total += label.size
    return correct / total, correct_majority / total


def test_synthetic_colour_alone_does_not_predict_class() -> None:
    def pairs(split: str) -> list:
        ds = _synthetic(split, length=60)
        return [(np.asarray(im), lbl) for im, lbl in map(ds.load_raw, range(len(ds)))]

    train, test = pairs("train"), pairs("val")
    accuracy, majority = _colour_classifier_accuracy(train, test)
    assert accuracy < majority + 0.02, (accuracy, majority)
    # Control: the same classifier is near perfect when colour does depend on the class.
    palette = make_palette(8)
    coloured = [(palette[lbl], lbl) for _, lbl in train]
    assert _colour_classifier_accuracy(coloured, coloured)[0] > 0.95


# ----------------------------------------------------------------------------- transforms
def _arange_image(h: int, w: int) -> Image.Image:
    """An image whose every pixel is different (so flips/crops are checkable by value)."""
    values = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) % 251
    return Image.fromarray(values.astype(np.uint8))


def _normalised(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_train_transform_pads_image_with_zero_and_label_with_255() -> None:
    image, label = _arange_image(10, 12), _mask([0, 1, 2], 10, 12).astype(np.int64)
    t = TrainTransform(16, MEAN, STD, ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    img, lbl = t(image, label, np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and lbl.shape == (16, 16) and lbl.dtype == torch.long
    assert (img[:, 10:] == 0).all() and (img[:, :, 12:] == 0).all()
    assert (lbl[10:] == 255).all() and (lbl[:, 12:] == 255).all()
    assert torch.allclose(img[:, :10, :12], _normalised(np.asarray(image)), atol=1e-6)
    assert torch.equal(lbl[:10, :12], torch.from_numpy(label))


def test_train_transform_crop_is_a_window_of_the_input() -> None:
    image, label = _arange_image(12, 20), np.arange(12 * 20).reshape(12, 20)  # unique labels
    t = TrainTransform((8, 12), MEAN, STD, ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                       flip_prob=0.0, photometric=False)
    img, lbl = t(image, label, np.random.default_rng(3))
    assert img.shape == (3, 8, 12)
    top, left = np.argwhere(label == lbl[0, 0].item())[0]
    assert torch.equal(lbl, torch.from_numpy(label[top:top + 8, left:left + 12]))
    assert torch.allclose(img, _normalised(np.asarray(image)[top:top + 8, left:left + 12]),
                          atol=1e-6)


def test_flip_flips_image_and_label_together() -> None:
    image, label = _arange_image(8, 8), np.arange(64).reshape(8, 8)
    t = TrainTransform(8, MEAN, STD, ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False)
    img, lbl = t(image, label, np.random.default_rng(0))
    assert torch.equal(lbl, torch.from_numpy(label[:, ::-1].copy()))
    assert torch.allclose(img, _normalised(np.asarray(image)[:, ::-1]), atol=1e-6)
    # Random crop + flip: the pixel colour still encodes the label at every position.
    palette = make_palette(19)
    label = np.random.default_rng(1).integers(0, 19, (32, 32))
    t = TrainTransform(24, (0, 0, 0), (1, 1, 1), ratio_range=(1.0, 1.0), photometric=False)
    windows = {"plain": label, "flipped": label[:, ::-1]}
    seen = set()
    for seed in range(8):
        img, lbl = t(Image.fromarray(palette[label]), label, np.random.default_rng(seed))
        expected = torch.from_numpy(palette[lbl.numpy()]).permute(2, 0, 1) / 255
        assert torch.allclose(img, expected, atol=1e-6)
        seen |= {kind for kind, source in windows.items() for top in range(9) for left in range(9)
                 if np.array_equal(lbl.numpy(), source[top:top + 24, left:left + 24])}
    assert seen == {"plain", "flipped"}


def test_cat_max_ratio_is_respected_when_possible() -> None:
    # 16x36 label: class 1 in columns 0..13, class 0 elsewhere; 16x16 crops. Only a third of
    # the crop positions keep every class under 75%, so without retries most crops fail.
    label = np.zeros((16, 36), np.int64)
    label[:, :14] = 1
    image = Image.fromarray(np.zeros((16, 36, 3), np.uint8))

    def fraction_ok(ratio: float) -> float:
        t = TrainTransform(16, MEAN, STD, ratio_range=(1.0, 1.0), cat_max_ratio=ratio,
                           flip_prob=0.0, photometric=False)
        ok = 0
        for seed in range(60):
            lbl = t(image, label, np.random.default_rng(seed))[1]
            ok += int(lbl.float().mean().item() in {x / 16 for x in range(5, 12)})
        return ok / 60

    assert fraction_ok(0.75) > 0.9 and fraction_ok(1.0) < 0.6


def test_resize_never_interpolates_labels() -> None:
    rng = np.random.default_rng(0)
    label = rng.choice([3, 7, 255], size=(13, 17))
    image = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    t = TrainTransform(20, MEAN, STD, base_size=16)
    for seed in range(10):
        lbl = t(image, label, np.random.default_rng(seed))[1]
        assert set(lbl.unique().tolist()) <= {3, 7, 255}
    assert np.array_equal(resize_label(label, (26, 34)), label.repeat(2, 0).repeat(2, 1))


def test_base_size_rescale_is_mmseg_style() -> None:
    # 50x100 image, base 20, ratio 1: fits inside (long 80, short 20) -> 20x40.
    image, label = Image.fromarray(np.zeros((50, 100, 3), np.uint8)), np.zeros((50, 100), np.int64)
    t = TrainTransform(64, MEAN, STD, ratio_range=(1.0, 1.0), base_size=20, photometric=False)
    lbl = t(image, label, np.random.default_rng(0))[1]
    assert (lbl[:20, :40] == 0).all() and (lbl[20:] == 255).all() and (lbl[:, 40:] == 255).all()


def test_train_transform_rng_reproducible_and_seeded_from_torch() -> None:
    image, label = _arange_image(20, 20), _mask([0, 1], 20, 20).astype(np.int64)
    t = TrainTransform(12, MEAN, STD)
    a, b = t(image, label, np.random.default_rng(5)), t(image, label, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)
    c = t(image, label)
    torch.manual_seed(0)
    d = t(image, label)
    e = t(image, label)
    assert torch.equal(c[0], d[0]) and not torch.equal(d[0], e[0])


def test_photometric_distortion_changes_colours_but_keeps_grey_grey() -> None:
    grey = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    colour = _image(8, 8, 8)
    changed = 0
    for seed in range(20):
        out = photometric_distortion(grey, np.random.default_rng(seed)).astype(int)
        assert np.abs(out[..., 0] - out[..., 1]).max() <= 2
        changed += int(not np.array_equal(photometric_distortion(
            colour, np.random.default_rng(seed)), colour))
    assert changed >= 15


def test_eval_transform_is_one_mmseg_test_view() -> None:
    image = Image.fromarray(np.full((30, 40, 3), (255, 0, 128), np.uint8))
    label = _mask([0, 5, 255], 30, 40).astype(np.int64)
    img, lbl = EvalTransform(MEAN, STD, scale=(240, 60))(image, label)  # factor min(240 / 40, 60 / 30) = 2
    assert img.shape == (3, 60, 80) and torch.equal(lbl, torch.from_numpy(label))
    expected = [(255 - 123.68) / 58.4, (0 - 116.28) / 57.12, (128 - 103.53) / 57.38]  # Segmenter's DeiT statistics
    assert torch.allclose(img.mean((1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(img.std((1, 2)), torch.zeros(3), atol=1e-5)
    img, _ = EvalTransform(*normalization_stats("vit"))(image, label)
    assert img.shape == (3, 30, 40)
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, -1.0, 1 / 255]), atol=1e-6)
    ramp = np.arange(30 * 40 * 3, dtype=np.int64).reshape(30, 40, 3) % 251
    img, _ = EvalTransform(MEAN, STD, scale=(50, 40), flip=True)(Image.fromarray(ramp.astype(np.uint8)), label)
    resized = resize_image(ramp.astype(np.uint8), (38, 50))  # the long side binds: factor 50 / 40
    assert torch.equal(img, normalize(resized[:, ::-1], MEAN, STD))


def test_test_time_sizes_follow_mmcv_and_multiscaleflipaug() -> None:
    assert rescale_size((375, 500), (2048, 512)) == (512, 683)  # an ADE20K image: 500 * 512 / 375 = 682.7
    assert rescale_size((30, 50), (160, 40)) == (40, 67)
    assert rescale_size((20, 90), (160, 40)) == (36, 160)  # capped by the long side: 90 * 16 / 9 = 160
    assert rescale_size((10, 15), 0.75) == (8, 11)  # a factor: int(7.5 + 0.5), int(11.25 + 0.5)
    assert img_scale_for(512) == (2048, 512) and img_scale_for(520, 8) == (4160, 520) and img_scale_for(0) is None
    assert multiscale_views((2048, 512), (0.5, 0.75), flip=True) == [
        ((1024, 256), False), ((1024, 256), True), ((1536, 384), False), ((1536, 384), True)]
    assert multiscale_views((4160, 520), (0.75, 1.75)) == [((3120, 390), False), ((7280, 910), False)]
    assert multiscale_views(None, (1.0, 1.5), flip=True) == [(1.0, False), (1.0, True), (1.5, False), (1.5, True)]


# cv2.resize(IMAGE, (w, h), interpolation=cv2.INTER_LINEAR), OpenCV 5.0.0 (mmcv's bilinear backend)
IMAGE = [[139, 74, 229, 241, 169], [65, 6, 160, 149, 106], [38, 175, 188, 205, 175], [229, 98, 249, 10, 148]]
OPENCV_7x9 = [
    [139, 117, 81, 143, 229, 236, 233, 193, 169], [112, 91, 56, 118, 204, 206, 201, 167, 146],
    [70, 50, 17, 79, 165, 160, 150, 126, 110], [52, 64, 86, 127, 174, 175, 173, 153, 141],
    [52, 91, 156, 180, 192, 192, 189, 179, 173], [161, 149, 129, 171, 227, 145, 88, 132, 157],
    [229, 185, 112, 165, 249, 116, 25, 102, 148],
]
OPENCV_3x3 = [[105, 217, 181], [64, 174, 153], [168, 239, 116]]


def test_resize_image_is_opencvs_fixed_point_bilinear() -> None:
    image = np.array(IMAGE, dtype=np.uint8)[..., None]
    assert np.array_equal(resize_image(image, (7, 9))[..., 0], OPENCV_7x9)
    assert np.array_equal(resize_image(image, (3, 3))[..., 0], OPENCV_3x3)
    # halving: each output pixel is its 2 x 2 block's mean, rounded half up as OpenCV does
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    blocks = (big.astype(np.int64).reshape(3, 2, 4, 2, 3).sum((1, 3)) + 2) >> 2
    assert np.array_equal(resize_image(big, (3, 4)), blocks)
    # within one grey level of exact bilinear interpolation
    x = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for size in ((50, 71), (20, 31), (37, 90)):
        exact = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None].double(), size=size, mode="bilinear",
                              align_corners=False)[0].permute(1, 2, 0).numpy()
        assert np.abs(resize_image(x, size) - exact).max() <= 1.0


def test_resize_image_equals_opencv_on_random_sizes() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = rng.integers(1, 120, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        factor = np.exp(rng.uniform(np.log(0.1), np.log(6)))
        size = (max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1))
        expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(resize_image(image, size), expected), (h, w, size)


def test_normalization_stats_and_class_info() -> None:
    assert normalization_stats("vit") == ((0.5,) * 3, (0.5,) * 3)
    mean, std = normalization_stats("deit")  # ImageNet's, x 255 rounded to 2 decimals as Segmenter does
    assert np.allclose(np.array(mean) * 255, (123.68, 116.28, 103.53), rtol=0, atol=1e-9)
    assert np.allclose(np.array(std) * 255, (58.4, 57.12, 57.38), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="vit, deit"):
        normalization_stats("clip")
    for name in DATASETS:
        if name != "folder":
            names, palette = class_info(name)
            assert len(names) == len(set(names)) == palette.shape[0]
    assert len(np.unique(make_palette(200), axis=0)) == 200
