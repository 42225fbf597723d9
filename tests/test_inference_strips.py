"""Bounded-memory inference: the official protocol computed in strips of the output equals the full
computation (probabilities within 1e-6, identical labels), so large images never hold (K, H, W) maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import depict_analysis.models.segmentor as segmentor
from depict_analysis.cli.main import app
from depict_analysis.models import create_model, save_checkpoint
from depict_analysis.foundation.errors import InputError
from depict_analysis.models.evaluate import MULTISCALE_RATIOS, image_labels, image_probs
from depict_analysis.models.segmentor import inference, inference_labels, resize_rows


@pytest.mark.parametrize("source, target", [
    ((7, 9), (50, 31)),   # upsampling, the scale not a power of two
    ((64, 64), (10000 // 100, 100)),  # a small logit map to a large image
    ((50, 31), (7, 9)),   # downsampling (a 1.75 view resized back)
    ((12, 12), (12, 40)),  # rows unchanged: exact
    ((1, 5), (6, 5)),     # a single source row
])
def test_resize_rows_equals_the_full_bilinear_resize(source, target):
    logits = torch.randn(2, 5, *source, generator=torch.Generator().manual_seed(0)) * 10
    full = F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
    tolerance = 1e-6 * float(full.abs().max())  # float32 rounding: the kernel orders its products otherwise
    for rows in (1, 3, target[0]):
        for top in range(0, target[0], rows):
            bottom = min(top + rows, target[0])
            torch.testing.assert_close(resize_rows(logits, target, top, bottom), full[..., top:bottom, :], atol=tolerance, rtol=0)
    if source[0] == target[0]:
        assert torch.equal(resize_rows(logits, target, 0, target[0]), full)


def test_resize_rows_in_channels_last_memory():
    logits = torch.randn(1, 6, 9, 11, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    full = F.interpolate(logits, size=(40, 23), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_rows(logits, (40, 23), 13, 29), full[..., 13:29, :], atol=1e-6 * float(full.abs().max()), rtol=0)


def strip_probs(model, views, size, window, stride) -> torch.Tensor:
    """The strip path's probabilities (what inference_labels takes the argmax of), one row at a time."""
    logits = [(segmentor.sliding_window_logits(model, segmentor.window_resize(x, window), window, stride), flipped)
              for x, flipped in views]
    rows = []
    for top in range(size[0]):
        total = 0
        for view, flipped in logits:
            strip = resize_rows(view, size, top, top + 1)
            total = total + F.softmax(strip.flip(-1) if flipped else strip, dim=1)
        rows.append(total / len(logits))
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("family", ["depict-sa", "segmenter"])
def test_labels_in_strips_equal_the_argmax_of_the_full_probabilities(family):
    torch.manual_seed(0)
    model = create_model(f"{family}-tiny", n_cls=6).eval()
    image = torch.rand(1, 3, 45, 70, generator=torch.Generator().manual_seed(1))
    views = []
    for scale in (0.5, 1.0, 1.75):  # views smaller and larger than the output, plain and flipped
        x = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else image
        views += [(model.normalize(x), False), (model.normalize(x.flip(-1)), True)]
    with torch.inference_mode():
        full = inference(model, views, (45, 70), 32, 20)
        torch.testing.assert_close(strip_probs(model, views, (45, 70), 32, 20), full, atol=1e-6, rtol=0)
        strips = inference_labels(model, views, (45, 70), 32, 20, map_values=1)  # force strips
        whole = inference_labels(model, views, (45, 70), 32, 20)  # small enough to take whole
    assert strips.dtype == whole.dtype == torch.uint8
    assert torch.equal(strips, full.argmax(1).to(torch.uint8)) and torch.equal(whole, strips)


def test_evaluation_labels_match_with_and_without_strips(monkeypatch):
    torch.manual_seed(0)
    model = create_model("depict-ca-tiny", n_cls=5).eval()
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (37, 61, 3), dtype=np.uint8))
    kwargs = dict(window=32, stride=20, img_scale=(160, 40), scales=MULTISCALE_RATIOS, flip=True)
    with torch.inference_mode():
        expected = image_probs(model, image, **kwargs).argmax(0)
        monkeypatch.setattr(segmentor, "MAP_VALUES", 1)  # every output goes by strips
        labels = image_labels(model, image, **kwargs)
    assert torch.equal(labels.long(), expected)


def test_predict_on_an_image_in_strips_writes_the_same_labels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", create_model("depict-sa-tiny", n_cls=5))
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    args = ["predict", str(tmp_path / "m.pt"), "--images", str(tmp_path / "big.png"), "--short-side", "40"]
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    monkeypatch.setattr(segmentor, "MAP_VALUES", 1)
    monkeypatch.setattr(segmentor, "STRIP_VALUES", 5 * 130 * 7)  # 7 rows a strip
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "strips")]).exit_code == 0
    whole, strips = (np.asarray(Image.open(tmp_path / d / "big_label.png")) for d in ("whole", "strips"))
    np.testing.assert_array_equal(whole, strips)


def test_views_too_large_for_the_memory_bound_are_refused(monkeypatch):
    model = create_model("linear-tiny", n_cls=4).eval()
    monkeypatch.setattr(segmentor, "VIEW_VALUES", 4 * 64 * 64 - 1)
    with torch.inference_mode(), pytest.raises(InputError, match="need over"):
        inference_labels(model, [(torch.zeros(1, 3, 64, 64), False)], (64, 64), 32, 32, map_values=1)
