"""`depict predict`: label maps and overlays for images of any mode and size."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.models import create_model, load_model, predict_probs, save_checkpoint
from depict_analysis.models.data import class_info, load_image, make_palette
from depict_analysis.models.data.base import image_to_tensor
from depict_analysis.models.predict import overlay
from depict_analysis.models.sources import CheckpointInfo, trained_dataset

K = 5


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", create_model("depict-sa-tiny", n_cls=K))  # trained size: 32 px
    return tmp_path / "m.pt"


def write_images(folder) -> dict[str, tuple[int, int]]:
    """One image per mode; sizes (w, h) below and above the 32-px window."""
    rng = np.random.default_rng(0)
    arrays = {
        "rgb": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (24, 30, 4), dtype=np.uint8),
        "grey": rng.integers(0, 256, (90, 20), dtype=np.uint8),
        "deep": rng.integers(0, 65536, (33, 47), dtype=np.uint16),
    }
    folder.mkdir()
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    return {name: (a.shape[1], a.shape[0]) for name, a in arrays.items()}


def images_options(paths) -> list[str]:
    """``--images P`` for each path (the option repeats)."""
    return [arg for path in paths for arg in ("--images", str(path))]


def test_predict_writes_labels_and_overlays_for_every_image_mode(tmp_path, checkpoint):
    sizes = write_images(tmp_path / "in")
    paths = [str(tmp_path / "in" / f"{name}.png") for name in sizes]
    result = CliRunner().invoke(app, ["predict", str(checkpoint), *images_options(paths), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    palette = make_palette(K)  # a checkpoint without a dataset: the generated colours
    for name, size in sizes.items():
        label, blended = Image.open(tmp_path / "out" / f"{name}_label.png"), Image.open(tmp_path / "out" / f"{name}_overlay.png")
        # a palette PNG, as mmseg and VOC write label maps: values are class ids, colours the classes'
        assert (label.mode, label.size) == ("P", size) and blended.mode == "RGB"
        ids = np.asarray(label)
        assert ids.max() < K
        np.testing.assert_array_equal(np.asarray(label.getpalette()[: 3 * K]).reshape(K, 3), palette)
        # the overlay: the blend at the image's size, then a legend panel on its right
        assert blended.height >= size[1] and blended.width > size[0]
        expected = overlay(load_image(tmp_path / "in" / f"{name}.png"), ids, palette, 0.5)
        np.testing.assert_array_equal(np.asarray(blended)[: size[1], : size[0]], np.asarray(expected))


def test_large_images_go_through_sliding_windows(tmp_path, checkpoint):
    write_images(tmp_path / "in")
    result = CliRunner().invoke(app, ["predict", str(checkpoint), "--images", str(tmp_path / "in" / "rgb.png"), "--out", str(tmp_path / "out"), "--stride", "16"])
    assert result.exit_code == 0, result.stderr
    model, _ = load_model(checkpoint)
    x = model.normalize(image_to_tensor(load_image(tmp_path / "in" / "rgb.png"))[None])
    expected = predict_probs(model, x, window=32, stride=16).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rgb_label.png")), expected)


def test_images_go_after_images_and_the_model_is_positional(tmp_path, checkpoint):
    write_images(tmp_path / "in")
    (tmp_path / "more").mkdir()
    (tmp_path / "in" / "grey.png").rename(tmp_path / "more" / "grey.png")
    out = tmp_path / "out"
    # a named source, an image file and a folder (--images repeats), the protocol pinned: windows of 32 every 16, own size
    result = CliRunner().invoke(app, ["predict", f"mine={checkpoint}", "--images", str(tmp_path / "in" / "rgb.png"),
                                      "--images", str(tmp_path / "more"), "--out", str(out), "--stride", "16", "--short-side", "0"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{s}_{kind}.png" for s in ("grey", "rgb") for kind in ("label", "overlay")]
    model, _ = load_model(checkpoint)
    for image in (tmp_path / "in" / "rgb.png", tmp_path / "more" / "grey.png"):
        x = model.normalize(image_to_tensor(load_image(image))[None])
        with torch.inference_mode():
            expected = predict_probs(model, x, window=32, stride=16).argmax(1)[0].numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{image.stem}_label.png")), expected)


@pytest.mark.parametrize("where", ["file", "folder", "after the model"])
def test_an_image_where_the_model_goes_says_images_go_after_images(tmp_path, checkpoint, where):
    write_images(tmp_path / "in")
    image = tmp_path / "in" if where == "folder" else tmp_path / "in" / "rgb.png"
    given = [str(checkpoint), str(image)] if where == "after the model" else [str(image)]
    result = CliRunner().invoke(app, ["predict", *given, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{image} is {'a folder of images' if where == 'folder' else 'an image'}, not a model: images go after --images" in result.stderr
    assert f"depict predict MODEL --images {image}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_predict_runs_one_model_and_needs_images(tmp_path, checkpoint):
    write_images(tmp_path / "in")
    two = CliRunner().invoke(app, ["predict", str(checkpoint), "builtin:segmenter", "--images", str(tmp_path / "in"),
                                   "--out", str(tmp_path / "out")])
    assert two.exit_code == 2 and "predict runs one model, got 2" in two.stderr
    none = CliRunner().invoke(app, ["predict", str(checkpoint), "--out", str(tmp_path / "out")])
    assert none.exit_code == 2 and "--images" in none.stderr
    assert not (tmp_path / "out").exists()


def test_overlay_blends_class_colours_and_palette_follows_the_dataset():
    image = Image.fromarray(np.full((2, 3, 3), 100, dtype=np.uint8))
    palette = np.array([[0, 0, 0], [255, 0, 50]], dtype=np.uint8)
    label = np.array([[0, 1, 1], [1, 0, 0]])
    out = np.asarray(overlay(image, label, palette, alpha=0.5))
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])
    np.testing.assert_array_equal(out[0, 1], [178, 50, 75])  # round((100 + 255) / 2) = 178 (half to even)
    info = lambda meta, n_cls: CheckpointInfo("m", "m.pt", "depict-analysis", n_cls, trained_dataset(meta), meta=meta)  # noqa: E731
    np.testing.assert_array_equal(info({"train_config": {"dataset": "synthetic"}}, 8).palette, class_info("synthetic")[1])
    assert info({"variant": {"dataset_kwargs": {"dataset": "ade20k"}}}, 150).palette.shape == (150, 3)
    np.testing.assert_array_equal(info({}, 4).palette, make_palette(4))
    assert info({"train_config": {"dataset": "synthetic"}}, 5).class_names == [f"class {i}" for i in range(5)]  # other classes


@pytest.mark.parametrize("case, fragment", [
    ("corrupt", "corrupt image"),
    ("not an image", "not an image file"),
    ("missing", "no such image file"),
    ("duplicate names", "share the name"),
])
def test_bad_images_are_one_line_errors_with_exit_2(tmp_path, checkpoint, case, fragment):
    write_images(tmp_path / "in")
    bad = tmp_path / "bad.png"
    if case == "corrupt":
        bad.write_bytes((tmp_path / "in" / "rgb.png").read_bytes()[:200])
    elif case == "not an image":
        bad.write_text("hello")
    paths = [str(bad)] if case != "duplicate names" else [str(tmp_path / "in" / "rgb.png"), str(tmp_path / "in" / "rgb.png")]
    result = CliRunner().invoke(app, ["predict", str(checkpoint), *images_options(paths), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, (result.stdout, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
