"""Padding, sliding windows, Segmenter's resize and multi-scale inference (SPEC §1.5) on models whose output is known."""

import torch
import torch.nn.functional as F
from torch import nn

from depict_analysis.models import create_model, predict_probs
from depict_analysis.models.segmentor import _window_starts, pad_to_multiple, sliding_window_logits, window_resize


class PixelModel(nn.Module):
    """Logits that depend only on each pixel's value (linearly): windowing must give them back."""

    n_cls = 3

    def forward(self, x):
        return torch.stack([x[:, 0], 2 * x[:, 0], -x[:, 0]], dim=1)


class CropMeanModel(nn.Module):
    """Logits constant over a crop (its mean): overlaps must average the windows' logits."""

    n_cls = 2

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)[:, :, None, None].expand(-1, -1, *x.shape[-2:])


class RunningSumModel(nn.Module):
    """Logits that depend on a pixel's position (running sums along the width): flips show."""

    n_cls = 2

    def forward(self, x):
        s = x[:, 0].cumsum(-1)
        return torch.stack([s, -s], dim=1)


def test_window_starts_cover_the_image_and_end_flush():
    assert _window_starts(10, 4, 3) == [0, 3, 6]
    assert _window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert _window_starts(4, 4, 3) == [0]
    assert _window_starts(3, 4, 3) == [0]


def test_window_resize_enlarges_the_short_side_to_the_window_with_int_truncation():
    assert window_resize(torch.zeros(1, 3, 21, 50), 32).shape[-2:] == (32, 76)  # 50 / 21 * 32 = 76.19
    assert window_resize(torch.zeros(1, 3, 50, 21), 32).shape[-2:] == (76, 32)
    assert window_resize(torch.zeros(1, 3, 13, 13), 32).shape[-2:] == (32, 32)
    x = torch.randn(1, 3, 32, 40)
    assert window_resize(x, 32) is x  # short side not below the window: untouched
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    expected = F.interpolate(ramp, size=(4, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(window_resize(ramp, 4), expected)


def test_pixelwise_model_is_unchanged_by_sliding_windows_and_flips():
    x = torch.randn(2, 3, 21, 34)
    logits = PixelModel()(x)
    torch.testing.assert_close(sliding_window_logits(PixelModel(), x, window=8, stride=5), logits)
    torch.testing.assert_close(predict_probs(PixelModel(), x, window=8, stride=5, flip=True), logits.softmax(1))


def test_overlapping_windows_average_their_logits_not_their_probabilities():
    x = torch.zeros(1, 3, 4, 6)
    x[..., 3:] = 1.0  # right half bright
    logits = sliding_window_logits(CropMeanModel(), x, window=4, stride=2)  # windows at columns 0, 2
    torch.testing.assert_close(logits[0, :, 0, 0], torch.tensor([0.25, -0.25]))  # crop [0, 4): 1 of 4 columns bright
    torch.testing.assert_close(logits[0, :, 0, 2], torch.tensor([0.5, -0.5]))  # mean of 0.25 and 0.75
    torch.testing.assert_close(logits[0, :, 0, 5], torch.tensor([0.75, -0.75]))  # crop [2, 6)
    probs = predict_probs(CropMeanModel(), x, window=4, stride=2)
    torch.testing.assert_close(probs[0, :, 0, 2], torch.tensor([0.5, -0.5]).softmax(0))


def test_flipped_views_are_unflipped_before_the_softmax():
    x = torch.randn(1, 3, 8, 8)
    model = RunningSumModel()
    plain, mirrored = model(x), model(x.flip(-1)).flip(-1)
    expected = (plain.softmax(1) + mirrored.softmax(1)) / 2
    torch.testing.assert_close(predict_probs(model, x, window=8, flip=True), expected)
    assert (expected - plain.softmax(1)).abs().max() > 0.1  # the flipped view does change the result


def test_segmentor_pads_to_the_patch_size_and_crops_back():
    torch.manual_seed(0)
    model = create_model("linear-tiny", n_cls=4).eval()
    x = torch.randn(1, 3, 19, 13)
    assert pad_to_multiple(x, 8).shape[-2:] == (24, 16)
    with torch.no_grad():
        out = model(x)
        full = model.decode(*model.encode(x), (24, 16))
    assert out.shape == (1, 4, 19, 13)
    torch.testing.assert_close(out, full[..., :19, :13])


def test_other_scales_resize_logits_back_before_the_softmax():
    x = torch.randn(1, 3, 16, 16)
    # PixelModel is linear in the pixel, so at scale 0.5 its logits are the resized logits of x.
    half = F.interpolate(PixelModel()(x), size=(8, 8), mode="bilinear", align_corners=False)
    back = F.interpolate(half, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict_probs(PixelModel(), x, window=8, scales=(0.5,)), back.softmax(1))
    multi = predict_probs(PixelModel(), x, window=8, scales=(0.5, 1.0))
    torch.testing.assert_close(multi, (back.softmax(1) + PixelModel()(x).softmax(1)) / 2)
