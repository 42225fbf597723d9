"""All analyses at once (``depict_analysis.suite``), the HTML report, and ``depict-analyze demo | report``."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from depict_analysis.cli.analyze import app
from depict_analysis.report import write_report
from depict_analysis.suite import SuiteModel, SuiteSettings, run_suite, sigma_half
from depict_analysis.models import create_model, save_checkpoint

K = 8  # the synthetic dataset's classes
FAST = SuiteSettings(num_images=4, examples=1, sigmas=(0, 0.05, 1.0), draws=1, batch_size=4)


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, n_cls=K).eval()


def test_sigma_half_interpolates_in_log_sigma():
    # falls from 0.7 at σ = 0.1 to 0.1 at σ = 1: a third of the way, in log σ: 0.1 · 10^(1/3)
    assert sigma_half([0, 0.01, 0.1, 1], [1, 0.9, 0.7, 0.1]) == pytest.approx(0.1 * 10 ** (1 / 3), rel=1e-12)
    assert sigma_half([0, 0.01, 0.1], [1, 0.5, 0.2]) == pytest.approx(0.01)  # reaches exactly 0.5 on the grid
    assert sigma_half([0, 0.01, 0.1], [1, 0.3, 0.2]) == pytest.approx(0.01)  # below 0.5 at once: no log 0
    assert sigma_half([0, 0.01, 0.1], [1, 0.9, 0.6]) is None


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    sa = SuiteModel("SA", "sa.pt", tiny("depict-sa-tiny"))
    seg = SuiteModel("Seg", "seg.pt", tiny("segmenter-tiny", seed=1))
    return out, run_suite(sa, [sa, seg], out, FAST, progress=False)


def test_suite_writes_every_analysis_and_a_summary(suite):
    out, summary = suite
    for path in ("coding-rate/coding_rate.png", "coding-rate/coding_rate_tokens.pdf", "pca-seg/pca-seg.png",
                 "orthogonality/orthogonality.png", "orthogonality/orthogonality.npz", "robustness/robustness.png",
                 "robustness/robustness.csv", "summary.json"):
        assert (out / path).stat().st_size > 0, path
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]
    assert [m["decoder"] for m in summary["models"]] == ["depict_sa", "mask_transformer"]


def test_summary_numbers_are_those_of_the_analyses(suite):
    out, summary = suite
    (rates,) = json.loads((out / "coding-rate" / "coding_rate.json").read_text())["checkpoints"]
    assert list(summary["coding_rate"]["token_rate"].values()) == pytest.approx(rates["token_rate"]["mean"])
    assert list(summary["coding_rate"]["share"]["mssa2"].values()) == pytest.approx(rates["share"]["mssa2"]["mean"])
    (pca,) = json.loads((out / "pca-seg" / "pca-seg.json").read_text())["checkpoints"]
    assert (summary["pca_seg"]["first"], summary["pca_seg"]["last"]) == ("input", "Z_L1")
    got = summary["pca_seg"]["mean_scores"]["prediction"]["Z_L1"]["ari"]
    assert got == pytest.approx(pca["summary"]["prediction"]["Z_L1"]["ari"]["mean"])
    checkpoints = json.loads((out / "orthogonality" / "orthogonality.json").read_text())["checkpoints"]
    for entry in checkpoints:
        final = next(p for p in entry["panels"] if p["name"] == "final_Q")
        ours = summary["orthogonality"][entry["label"]]
        assert ours["final_Q_mean_abs_offdiag"] == pytest.approx(final["values"]["mean_abs_offdiag"])
        assert ours["final_Q_mean_abs_offdiag_at_init"] == pytest.approx(final["at_init"]["mean_abs_offdiag"]["mean"])
    records = json.loads((out / "robustness" / "robustness.json").read_text())["records"]
    for label, curve in summary["robustness"].items():
        clean = next(r["miou"] for r in records if r["checkpoint"] == label and r["sigma"] == 0)
        assert curve["clean"] == clean and curve["sigma"] == [0, 0.05, 1.0]
        assert curve["relative"][0] == 1.0


def test_claims_follow_from_the_numbers(suite):
    _, summary = suite
    claims = {c["claim"].split(" ")[0]: c for c in summary["claims"]}
    assert len(summary["claims"]) == 4  # PCA, and Q̂ (raw, centred) / robustness for the one DEPICT-Segmenter pair
    pca = claims["PCA"]["values"]
    assert claims["PCA"]["holds"] == (pca["Z_L1"] > pca["input"])
    q = next(c for c in summary["claims"] if "orthogonal" in c["claim"])
    assert q["holds"] == (q["values"]["SA"] < q["values"]["Seg"])
    assert q["values"]["SA"] == summary["orthogonality"]["SA"]["final_Q_mean_abs_offdiag"]
    centred = next(c for c in summary["claims"] if "class mean removed" in c["claim"])
    assert centred["holds"] == (centred["values"]["SA"] < centred["values"]["Seg"])
    assert centred["values"]["Seg"] == summary["orthogonality"]["Seg"]["final_Q_mean_abs_offdiag_centred"]


def test_report_is_one_self_contained_page(suite, tmp_path):
    out, summary = suite
    page = write_report(summary, out, tmp_path / "report.html", title="tiny <models>").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 + 2 + 2 + 1  # coding rate ×2, PCA scores + 1 example, orthogonality ×2, robustness
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    assert "tiny &lt;models&gt;" in page  # text is escaped
    for claim in summary["claims"]:
        assert claim["claim"].replace("'", "&#x27;") in page
    clean = 100 * summary["robustness"]["Seg"]["clean"]
    assert f"{clean:.4g}" in page


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_report_cli_on_a_checkpoint_with_a_comparison(tmp_path):
    save_checkpoint(tmp_path / "ca.pt", tiny("depict-ca-tiny"))
    save_checkpoint(tmp_path / "seg.pt", tiny("segmenter-tiny"))
    result = run_cli("report", tmp_path / "ca.pt", "--compare", tmp_path / "seg.pt", "--num-images", 2, "--draws", 1,
                     "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").stat().st_size > 0
    summary = json.loads((tmp_path / "r_data" / "summary.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["ca", "seg"] and summary["coding_rate"]["model"] == "ca"
    assert summary["settings"]["source"] == {"dataset": "synthetic", "split": "val"}
    assert not math.isnan(summary["robustness"]["seg"]["clean"])


def test_report_cli_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("no")
    result = run_cli("report", tmp_path / "notes.pt", "--out", tmp_path / "r.html")
    assert result.exit_code == 2 and result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
