"""A robustness sweep's decode path: labels from merged windows cell by cell (``merged_labels``), buffers
reused across decodes of one image, confusion counts from one bincount (``LabelIndex``); every one the
same numbers as the plain computation."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from depict_analysis.foundation.errors import DatasetError
from depict_analysis.models.evaluate import decode_labels, encode_image, image_labels
from depict_analysis.models.segmentor import merge_windows, merged_labels, window_anchors
from depict_analysis.robustness import LabelIndex, noisy_parameters, with_parameters
from depict_analysis.perturbations import resolve_perturbation
from tests.conftest import tiny_model


def numpy_merged_argmax(windows: np.ndarray, anchors, batch: int, size: tuple[int, int]) -> np.ndarray:
    """Segmenter's merge (sum over windows / windows per pixel), then the first maximal class, in float64."""
    K, h, w = windows.shape[1:]
    total, count = np.zeros((batch, K, *size)), np.zeros((batch, 1, *size))
    for o, (b, top, left) in zip(windows, anchors):
        total[b, :, top : top + h, left : left + w] += o
        count[b, :, top : top + h, left : left + w] += 1
    return (total / count).argmax(1)


@pytest.mark.parametrize("size, window, stride, K, channels_last", [
    ((40, 60), 32, 16, 5, True),   # up to 2 x 3 windows over a pixel: counts 1, 2, 3, 4, 6
    ((70, 33), 32, 7, 4, False),   # NCHW logits, counts up to 25
    ((32, 32), 32, 16, 300, True),  # one window, more than 256 classes (int64 labels)
])
def test_merged_labels_equal_the_merged_maps_argmax(size, window, stride, K, channels_last):
    batch = 2
    anchors = window_anchors(batch, *size, window, stride)
    g = torch.Generator().manual_seed(0)
    # small integers: float32 sums and quotients order them as float64 does, and many ties (first class wins)
    logits = torch.randint(-3, 4, (len(anchors), K, window, window), generator=g).float()
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    chunks = [(logits[i : i + 3], anchors[i : i + 3]) for i in range(0, len(anchors), 3)]
    expected = numpy_merged_argmax(logits.double().numpy(), anchors, batch, size)
    scratch: dict = {}
    for _ in range(2):  # the second call reuses the scratch of the first
        labels = merged_labels(chunks, batch, size, K, scratch)
        assert labels.dtype == (torch.uint8 if K <= 256 else torch.int64)
        np.testing.assert_array_equal(labels.numpy(), expected)
    torch.testing.assert_close(labels.long(), merge_windows(chunks, batch, size, K, torch.device("cpu")).argmax(1), rtol=0, atol=0)


def test_upsample_into_a_buffer_equals_a_new_tensor():
    model = tiny_model("depict-sa-tiny", 6)
    masks = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(1))
    padded = (4 * model.patch_size, 5 * model.patch_size)
    out = torch.full((2, 6, *padded), float("nan")).contiguous(memory_format=torch.channels_last)
    fresh = model.upsample(masks, (4, 5), (padded[0] - 3, padded[1]), torch.channels_last)
    into = model.upsample(masks, (4, 5), (padded[0] - 3, padded[1]), torch.channels_last, out)
    assert torch.equal(fresh, into) and into.data_ptr() == out.data_ptr() and into.stride() == fresh.stride()


def test_decoding_again_with_other_parameters_reuses_no_stale_values():
    """An image decoded clean, perturbed, then clean again (the buffers of the first decode reused): each equals
    ``image_labels`` of that model; windows overlap (a 45 x 70 image, 32-px windows at stride 16)."""
    model = tiny_model("depict-sa-tiny", 6)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    protocol = {"window": 32, "stride": 16, "batch_size": 2}
    noise = noisy_parameters(model, resolve_perturbation("gaussian", "decoder"), 0.5, torch.Generator().manual_seed(2))
    with torch.inference_mode():
        encoded = encode_image(model, image, **protocol)
        clean = image_labels(model, image, **protocol)
        noisy = with_parameters(model, noise, partial(image_labels, model, image, **protocol))
        assert not torch.equal(clean, noisy)
        for parameters, expected in (({}, clean), (noise, noisy), ({}, clean)):
            assert torch.equal(with_parameters(model, parameters, decode_labels, model, encoded), expected)
        assert len(encoded.buffers) == 5 and "merge" in encoded.buffers  # 2 x 4 windows in 4 batches, the merge scratch


def test_label_index_counts_are_per_image_confusions_without_ignored_pixels():
    g = torch.Generator().manual_seed(3)
    K = 4
    target = torch.randint(0, K, (3, 5, 6), generator=g)
    target[0, :2] = 255
    pred = torch.randint(0, K, (3, 5, 6), generator=g).to(torch.uint8)
    index = LabelIndex.of(target, K)
    counts = index.counts(pred)
    for b in range(3):  # hand count: true positives, label pixels, predicted pixels among the labelled ones
        t, p = target[b].numpy().ravel(), pred[b].numpy().ravel().astype(int)
        keep = t != 255
        t, p = t[keep], p[keep]
        assert counts[b].tolist() == [[int(((t == c) & (p == c)).sum()) for c in range(K)],
                                      [int((t == c).sum()) for c in range(K)], [int((p == c).sum()) for c in range(K)]]
    assert LabelIndex.of(target[1:], K).valid is None  # nothing ignored: no mask
    with pytest.raises(DatasetError, match="label value 7"):
        LabelIndex.of(torch.full((1, 2, 2), 7), K)
