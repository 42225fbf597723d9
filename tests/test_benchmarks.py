"""The benchmarks' baselines stay correct: the literal references compute what our code computes.

No timing is asserted here; these run the benchmarks' own correctness checks at tiny sizes.
"""

import pytest
import torch

from benchmarks import decoder as bench_decoder
from benchmarks import inference as bench_inference


@pytest.mark.parametrize("loop", [False, True], ids=["explicit-attention", "per-head-loop"])
@pytest.mark.parametrize("name", ["depict-sa", "depict-ca", "segmenter"])
def test_literal_reference_equals_our_decoder(name, loop):
    d = bench_decoder.check_decoder(name, backbone="tiny", batch=2, image_size=64, n_cls=6, loop=loop)
    assert d["forward"] <= 1e-5  # inference_mode forward, float32
    assert d["train_forward"] <= 1e-5
    assert d["grad"] <= 1e-4  # max |Δ grad| / max |grad| over the input and every parameter
    assert d["f64"] <= 1e-5  # ours vs the literal reference in float64


def test_literal_twin_copies_every_weight_and_rejects_other_decoders():
    ours = bench_decoder.make_decoder("depict-ca", "tiny", 5, torch.device("cpu"))
    twin = bench_decoder.literal_twin(ours)
    assert twin.state_dict().keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key
    with pytest.raises(TypeError, match="no literal reference"):
        bench_decoder.literal_twin(torch.nn.Linear(2, 2))


def test_decoder_peak_memory_sees_the_attention_matrix():
    """The CPU peak-memory method counts tensors alive at once: an explicit (B, h, T, T) matrix shows."""
    x = torch.randn(2, 3, 256, 16)
    explicit = bench_decoder.peak_memory(lambda: torch.softmax(x @ x.mT, dim=-1) @ x, torch.device("cpu"))
    assert explicit >= 2 * 3 * 256 * 256 * 4  # at least one float32 attention matrix
    assert bench_decoder.peak_memory(lambda: None, torch.device("cpu")) == 0


def test_decoder_benchmark_runs_end_to_end(capsys):
    argv = ["--batch", "1", "--image-size", "64", "--classes", "5", "--repeats", "1", "--decoders", "depict-sa"]
    assert bench_decoder.main(argv) == 0
    out = capsys.readouterr().out
    assert "literal (explicit A)" in out and "agreement" in out and "OK" in out


@pytest.mark.parametrize("variant", ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny"])
def test_evaluation_reference_protocol_equals_ours(variant):
    d = bench_inference.check_evaluation(variant, n_cls=6, images=2)
    assert d["probs"] <= 1e-6  # channels-last / in-place path vs the NCHW one (single and multi-scale + flip)
    assert d["miou"] == d["ref_miou"]


@pytest.mark.parametrize("variant", ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny"])
def test_analysis_naive_rates_equal_ours(variant):
    assert bench_inference.check_analysis(variant, n_cls=6, images=2) <= 1e-9


def test_robustness_benchmark_compares_equal_records(capsys):
    """The sweep (backbone once per window) and the full forward per (σ, draw) score the same records."""
    from benchmarks import robustness as bench_robustness

    args = bench_robustness.argparse.Namespace(
        variant="depict-sa-tiny", n_cls=4, height=40, width=60, short_side=0, images=2, batch=4, sigmas="0,0.1",
        draws=2, seed=0, repeats=1)
    result = bench_robustness.speed(args, torch.device("cpu"))
    assert result["max_miou_diff"] <= 1e-12 and "window 32, stride 16" in capsys.readouterr().out
