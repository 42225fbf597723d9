"""benchmarks/gpu_check.py works before any device call: its ``--smoke`` run on the CPU, checked by value.

One smoke run (tiny models, CPU, well under a minute) feeds most tests; no timing is asserted.
"""

import copy
import json
import math

import pytest
import torch

from benchmarks import gpu_check
from depict_analysis.models import create_model
from depict_analysis.perturbations import PAPER_SIGMAS, PARAMETER_SIGMAS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0  # 0: every section ok
    return json.loads(out.read_text())


def rows(data: dict, section: str, **match) -> list[dict]:
    return [r for r in data["sections"][section]["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_smoke_runs_every_section_without_error(smoke):
    assert list(smoke["sections"]) == list(gpu_check.SECTIONS)
    assert smoke["complete"] is True
    for name, section in smoke["sections"].items():
        assert section["status"] == "ok" and section["error"] is None, name
        assert section["rows"] and all(r["status"] == "ok" for r in section["rows"]), name
    env = smoke["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert smoke["settings"]["sizes"]["backbone"] == "tiny" and smoke["settings"]["image_size"] == 32


def test_cpu_against_cpu_forward_is_exact_and_bf16_really_runs(smoke):
    for family in gpu_check.FAMILIES:
        (row,) = rows(smoke, "correctness", check="forward", family=family)
        for mode in ("fp32", "fp32_tf32_defaults"):  # the "device" is the CPU: the same computation
            assert row[mode]["max_abs_diff"] == 0.0 and row[mode]["argmax_agreement"] == 1.0
        assert 0 < row["bf16"]["max_abs_diff"] < 1.0  # CPU bf16 autocast ran: rounding shows, but little
        assert 0.9 <= row["bf16"]["argmax_agreement"] < 1.0


def test_sdpa_kernels_are_read_per_layer(smoke):
    """Tiny ViT: 32² / patch 8 = 16 tokens, K = 150; the CPU has only flash and math kernels."""
    layers = {family: rows(smoke, "correctness", check="sdpa", family=family)[0]["layers"]
              for family in gpu_check.FAMILIES}
    shapes = {family: [(l["layer"], l["heads"], l["head_dim"], l["queries"], l["keys"]) for l in found]
              for family, found in layers.items()}
    assert shapes == {
        "depict-sa": [("MSSA", 2, 16, 16 + 150, 16 + 150)],
        "depict-ca": [("MSSA", 2, 16, 16, 16), ("MSCA", 2, 8, 150, 16)],
        "segmenter": [("BLOCK", 2, 24, 16 + 150, 16 + 150)],
    }
    for found in layers.values():
        for layer in found:
            for precision in ("fp32", "bf16"):
                assert layer[precision]["forward"] == layer[precision]["backward"] == ["flash"]
                assert layer[precision]["kernel_width"] == layer["head_dim"]  # the CPU kernel does not pad
                eligible = layer[precision]["eligible"]
                assert eligible["flash"] == eligible["math"] == "ok"
                assert eligible["memory-efficient"].startswith("RuntimeError")


def test_sdpa_op_names_map_to_kernels():
    label = gpu_check.sdpa_kernel_label
    assert label("aten::_scaled_dot_product_flash_attention") == "flash"
    assert label("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "flash"
    assert label("aten::_scaled_dot_product_efficient_attention_backward") == "memory-efficient"
    assert label("aten::_scaled_dot_product_cudnn_attention") == "cudnn"
    assert label("aten::_scaled_dot_product_attention_math") == "math"
    assert label("aten::scaled_dot_product_attention") is None  # the dispatcher, not a kernel
    assert label("aten::bmm") is None


def test_padded_kernel_widths_map_to_their_layer():
    """Flash on CUDA pads p to a multiple of 8: MSSA's 100 shows as 104, MSCA's 50 as 56."""
    widths = {100: "MSSA", 50: "MSCA"}
    assert [gpu_check.layer_width(w, widths) for w in (100, 104, 50, 56)] == [100, 100, 50, 50]
    assert gpu_check.layer_width(64, {64: "MHSA"}) == 64 and gpu_check.layer_width(7, {64: "MHSA"}) == 7


def test_attention_layers_of_the_paper_models():
    """What the device run reads: MSSA p = 100, MSCA p = 50 (3 heads), Segmenter's blocks 6 heads of 64."""
    layers = {family: gpu_check.attention_layers(create_model(f"{family}-vit-s16")) for family in gpu_check.FAMILIES}
    assert layers == {"depict-sa": (3, {100: "MSSA"}), "depict-ca": (3, {100: "MSSA", 50: "MSCA"}),
                      "segmenter": (6, {64: "BLOCK"})}


def test_training_rows_pair_ours_with_the_literal_decoder(smoke):
    batch = smoke["settings"]["sizes"]["batch"]
    for section, modes in (("training", ("fp32", "bf16")), ("training_compiled", (gpu_check.COMPILED,))):
        assert smoke["sections"][section]["batch"] == batch
        for family in gpu_check.TRAINED_FAMILIES:
            for mode in modes:
                (ours,) = rows(smoke, section, family=family, mode=mode, decoder="ours")
                (literal,) = rows(smoke, section, family=family, mode=mode, decoder="literal")
                for row in (ours, literal):
                    assert row["images_per_s"] > 0 and math.isfinite(row["loss"])
                    assert row["peak_bytes"] is None  # CUDA only
                assert ours["speedup_vs_literal"] == pytest.approx(ours["images_per_s"] / literal["images_per_s"])
                # same weights, batch and optimizer: the literal twin trains like ours (tiny Segmenter: no dropout)
                assert abs(ours["loss"] - literal["loss"]) <= (1e-5 if mode == "fp32" else 1e-2)
    # the smoke run compiles with Dynamo's eager backend: the traced graphs reach the same loss
    for family in gpu_check.TRAINED_FAMILIES:
        eager = rows(smoke, "training", family=family, mode="bf16", decoder="ours")[0]["loss"]
        compiled = rows(smoke, "training_compiled", family=family, decoder="ours")[0]["loss"]
        assert compiled == pytest.approx(eager, abs=1e-3)


def test_evaluation_rows(smoke):
    section = smoke["sections"]["evaluation"]
    assert section["image_size"] == [32, round(32 * 683 / 512)] and section["flip"] is True
    for family in gpu_check.FAMILIES:
        (row,) = rows(smoke, "evaluation", family=family)
        assert row["protocol"] == {"window": 32, "stride": 16, "short_side": 0}  # no dataset base size: images keep their size
        assert row["single_scale_images_per_s"] > 0 and row["multiscale_images_per_s"] > 0
        assert 0.0 <= row["single_scale_miou"] <= 1.0 and 0.0 <= row["multiscale_miou"] <= 1.0


def test_analyses_rows(smoke):
    by_name = {r["analysis"]: r for r in smoke["sections"]["analyses"]["rows"]}
    assert list(by_name) == ["coding-rate", "pca-seg", "robustness"]
    assert by_name["coding-rate"]["images"] == by_name["pca-seg"]["images"] == 3
    assert math.isfinite(by_name["coding-rate"]["final_token_rate"])
    robustness = by_name["robustness"]
    assert robustness["sigmas"] == len(PARAMETER_SIGMAS) == 13 and robustness["draws"] == 3
    assert robustness["evaluations"] == 1 + 12 * 3  # the clean model once, each σ > 0 three times
    assert all(r["seconds"] > 0 for r in by_name.values())


def test_short_run_stops_resumes_and_learns(smoke):
    (row,) = smoke["sections"]["short_run"]["rows"]
    sizes = smoke["settings"]["sizes"]
    assert (row["stopped_at"], row["stopped_completed"]) == (sizes["run_stop"], False)
    assert (row["resumed_to"], row["completed"]) == (sizes["run_iterations"], True)
    every = sizes["run_log_every"]
    assert [it for it, _ in row["losses"]] == list(range(every, sizes["run_iterations"] + 1, every))
    assert row["loss_fell"] and row["loss_last"] < row["loss_first"] == row["losses"][0][1]
    assert row["failures"] == []
    assert row["eval_miou"] is not None


def test_markdown_table_reads_the_json(smoke):
    text = gpu_check.render_markdown(smoke)
    assert "| tiny ViT, 32², K = 150 | DEPICT-SA | DEPICT-CA | Segmenter |" in text
    assert "| 0.0e+00 · 1.0000 | 0.0e+00 · 1.0000 | 0.0e+00 · 1.0000 |" in text
    ours = [rows(smoke, s, family="depict-sa", mode=m, decoder="ours")[0]["images_per_s"]
            for s, m in (("training", "fp32"), ("training", "bf16"), ("training_compiled", gpu_check.COMPILED))]
    assert " · ".join(f"{v:.1f}" for v in ours) in text
    assert "MSCA (p = 8): flash → flash" in text
    assert "37 evaluations" in text and "stopped at 20, resumed to 40 (complete)" in text
    assert "Problems" not in text


def test_markdown_table_shows_the_cuda_only_numbers(smoke):
    """Peak memory exists on CUDA only: fake it into a copy of the smoke JSON and read it back."""
    data = copy.deepcopy(smoke)
    data["environment"] |= {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    for section in ("training", "training_compiled"):
        for row in data["sections"][section]["rows"]:
            row["peak_bytes"] = int((1.5 if row["decoder"] == "ours" else 3.0) * 2**30)
        section_rows = data["sections"][section]["rows"]
        for ours, literal in zip(section_rows[::2], section_rows[1::2]):
            gpu_check.add_ratios(ours, literal)
            assert ours["memory_literal_over_ours"] == 2.0
    text = gpu_check.render_markdown(data)
    assert text.startswith("**NVIDIA H100 80GB HBM3**, torch ")
    assert "| training peak GiB: fp32 · bf16 · bf16 + compile | 1.50 · 1.50 · 1.50 | – | 1.50 · 1.50 · 1.50 |" \
        in text
    assert "| 2.00 · 2.00 · 2.00 | – | 2.00 · 2.00 · 2.00 |" in text
    assert "| CUDA fp32 (TF32 off) vs CPU fp32" in text


def test_markdown_table_of_nothing_says_not_measured():
    text = gpu_check.render_markdown({})
    assert text.startswith("**GPU: not measured yet.**")
    table = [line for line in text.splitlines() if line.startswith("| ") and "DEPICT-SA" not in line]
    assert len(table) == 10 and all(line.endswith("| – | – | – |") for line in table)


def test_errors_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken_section(run, section):
        raise RuntimeError("boom\nsecond line")

    def mixed_section(run, section):
        run.row(section, {"name": "raises"}, lambda: 1 / 0)
        run.row(section, {"name": "works"}, lambda: {"value": 1})

    def failing_section(run, section):
        run.row(section, {"analysis": "check"}, lambda: {"failures": ["the loss did not fall"]})

    monkeypatch.setitem(gpu_check.SECTIONS, "correctness", broken_section)
    monkeypatch.setitem(gpu_check.SECTIONS, "training", mixed_section)
    monkeypatch.setitem(gpu_check.SECTIONS, "analyses", failing_section)
    out = tmp_path / "check.json"
    argv = ["--smoke", "--device", "cpu", "--out", str(out), "--sections", "correctness", "training", "analyses"]
    assert gpu_check.main(argv) == 1
    data = json.loads(out.read_text())
    broken, mixed, failing = (data["sections"][name] for name in ("correctness", "training", "analyses"))
    assert (broken["status"], broken["error"]) == ("error", "RuntimeError: boom")
    assert mixed["status"] == "error" and failing["status"] == "failed" and data["complete"] is False
    assert [(r["name"], r["status"], r.get("error")) for r in mixed["rows"]] == [
        ("raises", "error", "ZeroDivisionError: division by zero"), ("works", "ok", None)]
    assert ("Problems: correctness: RuntimeError: boom; training: ZeroDivisionError: division by zero; "
            "analyses (check): failed: the loss did not fall") in gpu_check.render_markdown(data)


def test_the_budget_stops_sections_and_rows(tmp_path, monkeypatch):
    data = gpu_check.run_check(tmp_path / "none.json", CPU, gpu_check.SMOKE, budget=0)
    assert {s["status"] for s in data["sections"].values()} == {"skipped: time budget"}
    assert json.loads((tmp_path / "none.json").read_text())["complete"] is False

    def slow_rows(run, section):
        run.row(section, {"name": "first"}, lambda: {})
        run.deadline = 0.0  # the section's cap has passed
        run.row(section, {"name": "second"}, lambda: {})

    monkeypatch.setitem(gpu_check.SECTIONS, "evaluation", slow_rows)
    data = gpu_check.run_check(tmp_path / "cap.json", CPU, gpu_check.SMOKE, sections=["evaluation"])
    section = data["sections"]["evaluation"]
    assert section["status"] == "partial"
    assert [r["status"] for r in section["rows"]] == ["ok", "skipped: time budget"]


def test_paper_sweep_rows_score_the_evaluation_protocol_and_project_the_figure(smoke):
    section = smoke["sections"]["paper_sweep"]
    assert section["sigmas"] == list(PAPER_SIGMAS) and len(PAPER_SIGMAS) == 20 and section["draws"] == 3
    by_family = {r["family"]: r for r in section["rows"]}
    assert list(by_family) == ["depict-sa", "segmenter"]
    for row in by_family.values():
        assert 1 <= row["images"] <= 2 and row["evaluations_per_image"] == 1 + 19 * 3
        assert row["protocol"] == {"window": 32, "stride": 16} and 0.0 <= row["clean_miou"] <= 1.0
    per_image = sum(1 / r["images_per_s"] for r in by_family.values()) / 2
    assert section["projected_figure_s"] == pytest.approx(2000 * 4 * per_image)
    assert "Paper-preset sweep (evaluation protocol, 20 σ × 3 draws" in gpu_check.render_markdown(smoke)
