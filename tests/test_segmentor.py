"""Padding, sliding-window and multi-scale inference (SPEC §1.5) on models whose output is known."""

import torch
from torch import nn

from depict_analysis.models import create_model, predict_probs
from depict_analysis.models.segmentor import _window_starts, pad_to_multiple, sliding_window_probs


class PixelModel(nn.Module):
    """Logits that depend only on each pixel's value: any windowing must give back softmax(pixel)."""

    n_cls = 3

    def forward(self, x):
        return torch.stack([x[:, 0], 2 * x[:, 0], -x[:, 0]], dim=1)


class CropMeanModel(nn.Module):
    """Logits constant over a crop (its mean): overlaps must average the per-window softmaxes."""

    n_cls = 2

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)[:, :, None, None].expand(-1, -1, *x.shape[-2:])


def test_window_starts_cover_the_image_and_end_flush():
    assert _window_starts(10, 4, 3) == [0, 3, 6]
    assert _window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert _window_starts(3, 4, 3) == [0]


def test_pixelwise_model_is_unchanged_by_sliding_windows_scales_and_flips():
    x = torch.randn(2, 3, 21, 34)
    expected = PixelModel()(x).softmax(1)
    torch.testing.assert_close(sliding_window_probs(PixelModel(), x, window=8, stride=5), expected)
    torch.testing.assert_close(predict_probs(PixelModel(), x, window=8, stride=5, flip=True), expected)


def test_overlapping_windows_average_their_softmaxes():
    x = torch.zeros(1, 3, 4, 6)
    x[..., 3:] = 1.0  # right half bright
    probs = sliding_window_probs(CropMeanModel(), x, window=4, stride=2)  # windows at columns 0, 2
    p_left = torch.tensor([0.25, -0.25]).softmax(0)  # crop [0, 4): 1 of 4 columns bright
    p_right = torch.tensor([0.75, -0.75]).softmax(0)  # crop [2, 6): 3 of 4 columns bright
    torch.testing.assert_close(probs[0, :, 0, 0], p_left)
    torch.testing.assert_close(probs[0, :, 0, 2], (p_left + p_right) / 2)
    torch.testing.assert_close(probs[0, :, 0, 5], p_right)


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


def test_multiscale_resizes_back_and_averages():
    x = torch.randn(1, 3, 16, 16)
    # A pixel-wise model on a resized image: the result is the average of resized softmax maps,
    # close to (not equal to) the single-scale map because resizing smooths.
    single = predict_probs(PixelModel(), x)
    multi = predict_probs(PixelModel(), x, scales=(0.5, 1.0, 2.0))
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 16, 16))
    assert (multi - single).abs().max() > 1e-4
    # short_side: evaluation at a fixed short side returns the input resolution.
    assert predict_probs(PixelModel(), x[..., :12], short_side=24).shape == (1, 3, 16, 12)
