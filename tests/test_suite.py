"""All analyses at once (``depict_analysis.suite``), the findings, the HTML report, and ``depict-analyze demo | report``."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch

from depict_analysis import __version__
from depict_analysis.cli.analyze import app
from depict_analysis.models import save_checkpoint
from depict_analysis.models.pretrained import load_default
from depict_analysis.models.sources import CheckpointInfo, LoadedModel, open_checkpoint
from depict_analysis.report import write_report
from depict_analysis.suite import SuiteSettings, p_cosine, q_offdiag, run_suite
from depict_analysis.uncertainty import VERDICTS
from tests.conftest import invoke, tiny_model as seeded

K = 8  # the synthetic dataset's classes
FAST = SuiteSettings(num_images=6, examples=1, sigmas=(0, 0.05, 1.0), draws=1, batch_size=6, resamples=200, baseline_seeds=5)


def tiny(name: str, seed: int = 0):
    return seeded(name, K, seed)


def stuck_on_background():
    """The built-in Segmenter with constant masks: it predicts class 0 (the background) everywhere."""
    model, _ = load_default("segmenter")
    with torch.no_grad():
        model.decoder.mask_norm.weight.zero_()
        model.decoder.mask_norm.bias.copy_(torch.arange(K, 0, -1, dtype=torch.float32))
    return model


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    (out / "pca-seg").mkdir()
    (out / "pca-seg" / "pca-seg_from_another_run.png").write_bytes(b"\x89PNG\r\n\x1a\nstale")  # an earlier run's figure
    # trained models (the built-in ones: an untrained model is itself at its class prior) and a stuck one
    models = [open_checkpoint("builtin:depict-sa", label="SA"), open_checkpoint("builtin:segmenter", label="Seg"),
              LoadedModel(stuck_on_background(), CheckpointInfo("Stuck", "stuck", "python", K))]
    return out, run_suite(models, out, FAST, progress=False, command="pytest suite")


def test_suite_writes_every_analysis_and_a_summary(suite):
    out, result = suite
    for name, files in result.files.items():
        assert files and all((out / f).stat().st_size > 0 for f in files), name
    assert "pca-seg/pca-seg_from_another_run.png" not in result.files["pca-seg"]
    assert "robustness/robustness.npz" in result.files["robustness"]
    assert "ablation/ablation.png" in result.files["ablation"] and result.ablation.labels == ["SA", "Seg", "Stuck"]
    summary = json.loads((out / "summary.json").read_text())
    assert [m["decoder"] for m in summary["models"]] == ["depict_sa", "mask_transformer", "mask_transformer"]
    assert summary["run"] | {"date": None} == {"version": __version__, "command": "pytest suite", "date": None, "seed": 0}
    robustness = json.loads((out / "robustness" / "robustness.json").read_text())
    for model in summary["models"]:
        assert model["clean_miou"] == robustness["models"][model["label"]]["clean"]


def test_every_finding_names_its_statistic_and_data_and_follows_from_its_numbers(suite):
    _, result = suite
    claims = [f for f in result.findings if f.kind == "claim"]
    # PCA; per black box: Q̂ raw and centred, P against initialisation and W_Q, σ½
    assert len(claims) == 1 + 2 * 5
    observations = [f for f in result.findings if f.kind == "observation"]
    assert [f.statement for f in observations] == [
        *(f"Each of SA's subspaces serves fewer classes than each of {black}'s attention heads: removing one costs IoU "
          "on fewer classes" for black in ("Seg", "Stuck")),
        "The coding rate R(Z_j) of SA's patch tokens falls from the decoder input to its last layer"]
    heads = observations[0]
    assert heads.values["SA"].estimate == result.ablation.concentration_replicates("SA")[0]
    assert "Herfindahl" in heads.statistic and "zero-ablated" in heads.data
    for finding in result.findings:
        assert finding.verdict in VERDICTS and finding.statistic and finding.data, finding.statement
        if finding.verdict != "not decided" and finding.difference is not None:
            smaller = "orthogonal" in finding.statement or "falls" in finding.statement
            on_better_side = finding.difference.estimate < 0 if smaller else finding.difference.estimate > 0
            assert on_better_side == (finding.verdict == "holds"), finding.statement
    pca = claims[0]
    assert "ground truth" in pca.statistic and pca.data == "6 images of synthetic/val"
    sa = result.orthogonality["SA"]
    q = next(f for f in claims if f.statement == "SA's class embeddings Q̂ are closer to orthogonal than Seg's (as they are)")
    assert q.values["SA"].estimate == pytest.approx(q_offdiag(sa).mean())
    init = next(f for f in claims if "initialisation" in f.statement and "Seg" not in f.statement)
    p, at_init = p_cosine(sa)
    assert init.values["SA"].estimate == p and len(at_init) == 5


def test_a_model_at_its_class_prior_is_warned_about_and_holds_nothing(suite):
    _, result = suite
    assert result.robustness.at_class_prior("Stuck") and not result.robustness.at_class_prior("SA")
    assert any(w.startswith("Stuck is at its class prior") for w in result.warnings)
    about_stuck = [f for f in result.findings if "Stuck" in f.statement]
    assert len(about_stuck) == 5  # Q̂ raw and centred, P against W_Q, σ½, heads' class concentration
    for finding in about_stuck:
        assert finding.verdict == "not decided" and any("Stuck is at its class prior" in n for n in finding.notes)


def test_report_is_one_self_contained_page_of_this_run(suite, tmp_path):
    out, result = suite
    page = write_report(result, out, tmp_path / "report.html", title="tiny <models>").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == sum(f.endswith(".png") for files in result.files.values() for f in files)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)  # the stale one is not among them
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the file
    assert "tiny &lt;models&gt;" in page and "<models>" not in page  # text is escaped
    for heading in ("Contents", "The paper's claims", "Observations", "Warnings"):
        assert heading in page, heading
    for anchor in re.findall(r'href="#([^"]+)"', page):
        assert f'id="{anchor}"' in page
    assert __version__ in page and "pytest suite" in page and result.run["date"] in page
    for finding in result.findings:
        assert finding.statement.replace("'", "&#39;") in page
    clean = result.robustness.curve("Seg").clean
    assert clean.text(100) in page  # numbers with their intervals


def run_cli(*args):
    return invoke(app, *args)


def test_report_cli_on_a_checkpoint_with_a_comparison(tmp_path):
    save_checkpoint(tmp_path / "ca.pt", tiny("depict-ca-tiny"))
    save_checkpoint(tmp_path / "seg.pt", tiny("segmenter-tiny"))
    result = run_cli("report", tmp_path / "ca.pt", "--compare", tmp_path / "seg.pt", "--num-images", 2, "--draws", 1,
                     "--resamples", 50, "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").stat().st_size > 0
    summary = json.loads((tmp_path / "r_data" / "summary.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["ca", "seg"] and summary["settings"]["primary"] == "ca"
    assert summary["settings"]["source"] == {"dataset": "synthetic", "split": "val"}
    assert not math.isnan(summary["models"][1]["clean_miou"]["estimate"])
    assert "2 images are too few" in result.stdout and "not decided" in result.stdout


def test_report_cli_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "notes.pt").write_text("no")
    result = run_cli("report", tmp_path / "notes.pt", "--out", tmp_path / "r.html")
    assert result.exit_code == 2 and result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_demo_settings_sweep_fewer_images_on_the_threads_asked_and_restore_them():
    from depict_analysis.suite import torch_threads

    assert SuiteSettings(num_images=64, sweep_images=32).swept == 32
    assert SuiteSettings(num_images=8, sweep_images=32).swept == 8  # never more than the run's images
    assert SuiteSettings(num_images=64).swept == 64  # the full settings: every image
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
