"""Our inference and evaluation against the official protocol, written out step by step (SPEC §1.5).

The reference below is written from the behaviour of Segmenter's ``segm/model/utils.py`` (``resize``,
``sliding_window``, ``merge_windows``, ``inference``), ``segm/inference.py`` (``depict predict``),
``segm/eval/miou.py`` and mmseg 0.x's test pipeline (``MultiScaleFlipAug`` with ``img_ratios``,
``Resize(keep_ratio=True)`` through ``mmcv.imrescale``, ``RandomFlip``, ``Normalize``). It runs
one image at a time, NCHW, in the official order of operations; ours batches windows and works in
channels-last memory. The uint8 bilinear kernel (OpenCV's, which mmcv calls) is the one piece
taken from our code: ``test_data.py`` checks it against OpenCV's output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.models import create_model, load_model, predict_probs
from depict_analysis.models.backbone import NORMALIZATION
from depict_analysis.models.data import ADE20K, Cityscapes, PascalContext, PascalContext59, build_dataset
from depict_analysis.models.data.transforms import resize_image
from depict_analysis.models.evaluate import (MULTISCALE_RATIOS, ConfusionMatrix, eval_protocol, evaluate, image_probs, miou,
                                             predict_protocol)
from depict_analysis.models.train import TrainConfig, train
from tests import official_layout as ref_release

WINDOW = 32  # the tiny models' training size (patch 8)


# ------------------------------------------------------------------------ reference: mmcv / mmseg
def ref_rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size with a (long, short) tuple: the largest size inside it, aspect kept -> (w, h)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def ref_multiscale_flip_aug(img_scale: tuple[int, int], img_ratios: list[float] | None, flip: bool) -> list[dict]:
    """MultiScaleFlipAug: the scales (img_scale x ratio, int() of both edges) and flips, in its loop order."""
    scales = [img_scale] if img_ratios is None else [(int(img_scale[0] * r), int(img_scale[1] * r)) for r in img_ratios]
    return [{"scale": s, "flip": f} for s in scales for f in ([False, True] if flip else [False])]


def ref_test_pipeline(image: np.ndarray, meta: dict, normalization: str) -> torch.Tensor:
    """Resize(keep_ratio) -> RandomFlip -> Normalize -> ImageToTensor, on the uint8 (H, W, 3) image: (1, 3, h, w)."""
    h, w = image.shape[:2]
    new_w, new_h = ref_rescale_size(w, h, meta["scale"])
    img = resize_image(image, (new_h, new_w))  # mmcv.imresize(img, (new_w, new_h)), bilinear (OpenCV's kernel)
    if meta["flip"]:
        img = img[:, ::-1]
    return ref_normalize(img, normalization)


def ref_normalize(image: np.ndarray, normalization: str) -> torch.Tensor:
    """uint8 (h, w, 3) -> (1, 3, h, w): ``(x / 255 - mean) / std`` in float32, as segm/inference.py."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATION[normalization])
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return ((x - mean) / std)[None]


# ------------------------------------------------------------------------ reference: Segmenter
def ref_resize(im: torch.Tensor, smaller_size: int) -> torch.Tensor:
    """segm.model.utils.resize: enlarge so the short side is ``smaller_size`` (int() of the long side)."""
    h, w = im.shape[2:]
    if h < w:
        ratio = w / h
        h_res, w_res = smaller_size, ratio * smaller_size
    else:
        ratio = h / w
        h_res, w_res = ratio * smaller_size, smaller_size
    if min(h, w) < smaller_size:
        return F.interpolate(im, (int(h_res), int(w_res)), mode="bilinear", align_corners=False)
    return im


def ref_sliding_window(im: torch.Tensor, flip: bool, ws: int, stride: int) -> dict:
    """segm.model.utils.sliding_window: anchors every stride below H - ws plus H - ws, both axes."""
    _, _, H, W = im.shape
    h_anchors = [h.item() for h in torch.arange(0, H, stride) if h < H - ws] + [H - ws]
    w_anchors = [w.item() for w in torch.arange(0, W, stride) if w < W - ws] + [W - ws]
    windows = {"crop": [], "anchors": [], "flip": flip, "shape": (H, W)}
    for ha in h_anchors:
        for wa in w_anchors:
            windows["crop"].append(im[:, :, ha : ha + ws, wa : wa + ws])
            windows["anchors"].append((ha, wa))
    return windows


def ref_merge_windows(windows: dict, ws: int, ori_shape: tuple[int, int]) -> torch.Tensor:
    """segm.model.utils.merge_windows: average the windows' logits, resize to ori_shape, un-flip, softmax."""
    seg_maps = windows["seg_maps"]
    C, (H, W) = seg_maps[0].shape[0], windows["shape"]
    logit, count = torch.zeros(C, H, W), torch.zeros(1, H, W)
    for window, (ha, wa) in zip(seg_maps, windows["anchors"]):
        logit[:, ha : ha + ws, wa : wa + ws] += window
        count[:, ha : ha + ws, wa : wa + ws] += 1
    logit = logit / count
    logit = F.interpolate(logit[None], ori_shape, mode="bilinear", align_corners=False)[0]
    if windows["flip"]:
        logit = torch.flip(logit, (2,))
    return F.softmax(logit, 0)


@torch.no_grad()
def ref_inference(model, ims, ims_metas, ori_shape, ws, stride, batch_size=4, log=None) -> torch.Tensor:
    """segm.model.utils.inference: (K, H, W) probabilities; ``log`` collects (resized view shape, windows)."""
    seg_map = torch.zeros(model.n_cls, *ori_shape)
    for im, meta in zip(ims, ims_metas):
        im = ref_resize(im, ws)
        windows = ref_sliding_window(im, meta["flip"], ws, stride)
        crops = torch.stack(windows.pop("crop"))[:, 0]
        seg_maps = torch.zeros(len(crops), model.n_cls, ws, ws)
        for i in range(0, len(crops), batch_size):
            seg_maps[i : i + batch_size] = model.forward(crops[i : i + batch_size])
        windows["seg_maps"] = seg_maps
        seg_map += ref_merge_windows(windows, ws, ori_shape)
        if log is not None:
            log.append((tuple(im.shape[2:]), len(crops)))
    return seg_map / len(ims)


def ref_predict(model, image: np.ndarray, ws: int, stride: int, log=None) -> torch.Tensor:
    """segm/inference.py on one image: normalise at its own size, one unflipped view."""
    im = ref_normalize(image, model.encoder.config.normalization)
    return ref_inference(model, [im], [{"flip": False}], image.shape[:2], ws, stride, log=log)


def ref_evaluate_image(model, image, img_scale, img_ratios, flip, ws, stride, log=None) -> torch.Tensor:
    """segm/eval/miou.py on one image: mmseg's test views, then inference at the original size."""
    metas = ref_multiscale_flip_aug(img_scale, img_ratios, flip)
    ims = [ref_test_pipeline(image, meta, model.encoder.config.normalization) for meta in metas]
    return ref_inference(model, ims, metas, image.shape[:2], ws, stride, log=log)


# ------------------------------------------------------------------------ helpers
def tiny_model(family: str, n_cls: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(f"{family}-tiny", n_cls=n_cls).eval()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 image (h, w, 3): blocky colours plus noise, so resizing has work to do."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (max(h // 6, 1) + 1, max(w // 6, 1) + 1, 3)).repeat(6, 0).repeat(6, 1)[:h, :w]
    return np.clip(blocks + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Probabilities within 1e-5 and identical argmax labels."""
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert torch.equal(ours.argmax(0), reference.argmax(0))


# ------------------------------------------------------------------------ depict predict = segm/inference.py
@pytest.mark.parametrize("family", ["depict-sa", "segmenter"])
@pytest.mark.parametrize("size, stride, windows", [
    ((20, 45), 20, ((32, 72), 3)),  # short side below the window: enlarged, then windows at columns 0, 20, 40
    ((32, 32), 24, ((32, 32), 1)),  # exactly one window
    ((13, 13), 16, ((32, 32), 1)),  # both sides below the window
    ((77, 50), 20, ((77, 50), 8)),  # overlapping windows on both axes: rows 0, 20, 40, 45 x columns 0, 18
    ((40, 96), 24, ((40, 96), 8)),  # rows 0, 8 x columns 0, 24, 48, 64
])
def test_predict_matches_segmenter_inference(family, size, stride, windows):
    model, image = tiny_model(family), random_image(*size)
    log = []
    expected = ref_predict(model, image, WINDOW, stride, log)
    with torch.inference_mode():
        ours = image_probs(model, Image.fromarray(image), window=WINDOW, stride=stride)
    assert_same(ours, expected)
    assert log == [windows]  # (view after Segmenter's resize, number of windows)


def test_predict_probs_on_a_batch_and_a_window_off_the_patch_grid():
    """A batch of two images through predict_probs equals each image on its own; a 28-px window
    (not a multiple of the 8-px patch) is padded inside the model as in Segmenter."""
    model = tiny_model("depict-ca")
    images = [random_image(21, 50, seed=s) for s in (1, 2)]
    batch = torch.cat([ref_normalize(im, "vit") for im in images])
    with torch.inference_mode():
        ours = predict_probs(model, batch, window=28, stride=18)
    for b, image in enumerate(images):
        log = []
        assert_same(ours[b], ref_predict(model, image, 28, 18, log))
        assert log == [((28, 66), 4)]  # enlarged from 21 x 50, windows at columns 0, 18, 36, 38


# ------------------------------------------------------------------------ depict eval = segm/eval/miou.py
@pytest.mark.parametrize("size, view", [
    ((30, 50), (40, 67)),    # short side 30 -> 40 (base size)
    ((100, 37), (108, 40)),  # long side 100 -> 108, 3 x 2 windows
    ((20, 90), (36, 160)),   # the long-side cap binds: 160 / 90 < 40 / 20
    ((12, 100), (19, 160)),  # capped below the window: Segmenter then enlarges it to 32 x 269
])
def test_single_scale_evaluation_matches_mmseg_and_segmenter(size, view):
    model, image = tiny_model("depict-sa"), random_image(*size, seed=3)
    img_scale = (160, 40)  # e.g. ADE20K's (2048, 512) for base size 40
    w, h = ref_rescale_size(size[1], size[0], img_scale)
    assert (h, w) == view
    log = []
    expected = ref_evaluate_image(model, image, img_scale, None, False, WINDOW, 20, log)
    with torch.inference_mode():
        ours = image_probs(model, Image.fromarray(image), window=WINDOW, stride=20, img_scale=img_scale)
    assert_same(ours, expected)
    assert log[0][0] == (view if min(view) >= WINDOW else (WINDOW, int(view[1] / view[0] * WINDOW)))


@pytest.mark.parametrize("family", ["depict-sa", "segmenter"])
def test_multiscale_flip_evaluation_matches_mmseg_and_segmenter(family):
    """Ratios 0.5 .. 1.75 of img_scale, each flipped: the 0.5 and 0.75 views fall below the window
    and are enlarged back to it, as in the official code."""
    model, image = tiny_model(family), random_image(37, 61, seed=4)
    log = []
    expected = ref_evaluate_image(model, image, (160, 40), list(MULTISCALE_RATIOS), True, WINDOW, 20, log)
    with torch.inference_mode():
        ours = image_probs(
            model, Image.fromarray(image), window=WINDOW, stride=20, img_scale=(160, 40), scales=MULTISCALE_RATIOS, flip=True
        )
    assert_same(ours, expected)
    # 0.5: 20 x 33 and 0.75: 30 x 49, plain and flipped, both enlarged to 32 x 52 (int(33 / 20 * 32) = 52)
    assert len(log) == 12 and log[:4] == [((32, 52), 2)] * 4
    assert log[-1] == ((70, 115), 18)  # 1.75: img_scale (280, 70) -> 70 x 115, 3 x 6 windows


def write_folder(root, sizes, n_cls=6, seed=0):
    """A folder dataset: random images of ``sizes`` (h, w), random labels with ignored pixels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [" + ", ".join(f"{{name: c{i}}}" for i in range(n_cls)) + "]\n")
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(random_image(h, w, seed=seed + i)).save(root / "images" / f"{i}.png")
        mask = rng.integers(0, n_cls, (h, w)).astype(np.uint8)
        mask[: h // 5] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def test_evaluate_scores_the_official_predictions(tmp_path):
    """evaluate(): mmseg's resize to (max_ratio x short side, short side), multi-scale + flip, and
    the dataset-level mIoU of the reference's argmax labels."""
    data = build_dataset("folder", write_folder(tmp_path / "d", [(30, 50), (20, 90), (45, 33)]), "val")
    data.max_ratio = 2  # long side at most 80 px: binds for the 20 x 90 image
    model = tiny_model("depict-sa")
    scores = evaluate(model, data, window=WINDOW, stride=20, short_side=40, scales=(0.75, 1.0, 1.5), flip=True)
    confusion = ConfusionMatrix(6)
    for i in range(len(data)):
        image, label = data.load_raw(i)
        probs = ref_evaluate_image(model, np.asarray(image), (80, 40), [0.75, 1.0, 1.5], True, WINDOW, 20)
        confusion.update(probs.argmax(0), torch.from_numpy(label))
    expected = miou(confusion)
    for key in ("miou", "pixel_acc", "mean_acc", "n_pixels"):
        assert scores[key] == expected[key]
    assert scores["img_scale"] == [80, 40] and scores["amp"] is False and scores["scales"] == [0.75, 1.0, 1.5]


# ------------------------------------------------------------------------ which settings apply
def test_eval_and_predict_protocols_follow_the_official_scripts(tmp_path):
    assert (ADE20K.base_size, ADE20K.max_ratio) == (512, 4)  # Segmenter: im_size x max_ratio of its mmseg configs
    assert (PascalContext.base_size, PascalContext.max_ratio) == (520, 8)
    assert (Cityscapes.base_size, Cityscapes.max_ratio) == (1024, 2)
    ours = tiny_model("depict-sa")
    synthetic = build_dataset("synthetic", None, "val", length=1)
    ade = build_dataset("ade20k", write_ade(tmp_path / "ade", [(6, 8)]), "val")
    # a release: window = crop, stride = crop - 32 (not variant.yml's 24), the dataset's base size
    ref_release.write_release(tmp_path / "release", "depict_sa")
    release, meta = load_model(tmp_path / "release")
    assert eval_protocol(release, ade, meta.get("train_config")) == {"window": 32, "stride": 16, "short_side": 512}
    assert eval_protocol(release, synthetic) == {"window": 32, "stride": 16, "short_side": 0}
    assert eval_protocol(ours, ade, window=96) == {"window": 96, "stride": 64, "short_side": 512}  # 96 - 32
    # predict on a release: variant.yml's window and stride (segm/inference.py), resized as eval resizes
    # the dataset it was trained on (ADE20K: (2048, 512)); 0 keeps the images' size
    assert predict_protocol(release, meta) == {"window": 32, "stride": 24, "img_scale": (2048, 512)}
    assert predict_protocol(release, meta, short_side=0)["img_scale"] is None
    assert predict_protocol(ours, {}, stride=8, short_side=40) == {"window": 32, "stride": 8, "img_scale": (160, 40)}
    assert predict_protocol(ours, {})["img_scale"] is None  # no dataset, no run: images keep their size
    # our runs: crop - 32, not their (training-time) eval_stride; the dataset's base size, else the
    # run's base size, else its crop
    run = TrainConfig(model="depict-sa-tiny", dataset="synthetic", base_size=48, eval_stride=20).to_dict()
    assert eval_protocol(ours, ade, run) == {"window": 32, "stride": 16, "short_side": 512}
    assert eval_protocol(ours, synthetic, run) == {"window": 32, "stride": 16, "short_side": 48}
    assert eval_protocol(ours, synthetic, {**run, "base_size": None})["short_side"] == 32
    # predict resolves the same short side and stride as eval on the run's own dataset
    assert predict_protocol(ours, {"train_config": run}) == {"window": 32, "stride": 16, "img_scale": (192, 48)}
    assert predict_protocol(ours, {"train_config": {**run, "base_size": None}})["img_scale"] == (128, 32)


def write_ade(root, sizes, seed=0):
    """ADE20K layout with ``sizes`` (h, w) validation (and training) images, labels 0..6 (0 = ignore)."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(random_image(h, w, seed=seed + i)).save(base / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(rng.integers(0, 7, (h, w)).astype(np.uint8)).save(base / "annotations" / split / f"ADE_{split}_{i}.png")
    return root


def test_eval_cli_on_a_run_equals_its_metrics_json(tmp_path, monkeypatch):
    """Training's evaluation and `depict eval` of the checkpoint resolve one protocol: the dataset's
    base size (here 40, not the 32-px crop); training evaluates with its eval_stride (24, as the
    official training loop), `depict eval` with crop - 32 (16) unless told: the same scores to the last bit."""
    monkeypatch.setattr(ADE20K, "base_size", 40)  # ADE20K's 512 on 32-px test images would be slow
    root = write_ade(tmp_path / "ade", [(30, 44), (52, 36)])
    config = TrainConfig(model="depict-sa-tiny", dataset="ade20k", data_root=str(root), batch_size=2, num_workers=0,
                         iterations=2, eval_stride=24, out_dir=str(tmp_path / "run"))
    train(config, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]
    out = tmp_path / "scores.json"
    assert metrics["stride"] == 24
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text())["stride"] == 16
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "checkpoint.pt"), "--stride", "24", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    scores = json.loads(out.read_text())
    assert (scores["window"], scores["stride"], scores["short_side"], scores["img_scale"]) == (32, 24, 40, [160, 40])
    for key in ("miou", "pixel_acc", "mean_acc", "iou", "n_pixels", "n_images"):
        assert scores[key] == metrics[key], key


def test_official_pascal_context_release_evaluates_60_classes_without_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(PascalContext, "base_size", 40)
    monkeypatch.setattr(ref_release, "K", 60)
    ref_release.write_release(tmp_path / "release", "depict_sa")
    variant = tmp_path / "release" / "variant.yml"
    variant.write_text(variant.read_text().replace("dataset: ade20k", "dataset: pascal_context"))
    voc = tmp_path / "pc" / "VOCdevkit" / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (voc / folder).mkdir(parents=True)
    Image.fromarray(random_image(30, 41)).save(voc / "JPEGImages" / "2008_000001.jpg")
    label = np.random.default_rng(0).integers(0, 60, (30, 41)).astype(np.uint8)
    Image.fromarray(label).save(voc / "SegmentationClassContext" / "2008_000001.png")
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "release"), "--data-root", str(tmp_path / "pc"), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    scores = json.loads(out.read_text())
    assert scores["dataset"] == "pascal_context" and len(scores["iou"]) == 60 and scores["classes"][0] == "background"
    assert scores["n_pixels"] == 30 * 41  # background (0) is a class, nothing ignored
    assert (scores["window"], scores["stride"], scores["img_scale"]) == (32, 16, [320, 40])
    assert (PascalContext59.name, build_dataset("pascal_context59", tmp_path / "pc", "val").n_cls) == ("pascal_context59", 59)
