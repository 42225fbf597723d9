"""Robustness on the evaluation protocol (SPEC §3.4 Protocol): σ = 0 is ``depict eval``; images outer,
(σ, draw) inner; per-image input noise; the same records whatever the batching or the sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import depict_analysis.robustness as rob
from depict_analysis.models import create_model
from depict_analysis.models.data import build_dataset
from depict_analysis.models.evaluate import decode_labels, encode_image, evaluate, image_labels
from depict_analysis.models.sources import LoadedModel
from depict_analysis.perturbations import resolve_perturbation
from depict_analysis.robustness import EvaluationImages, ModelSweep, draw_generator, robustness_records
from tests.test_evaluate import _folder

K = 4
WINDOW = 32  # the tiny models' training size
# (h, w): wider than the window (3 windows across at stride 16), taller (3 down), smaller (resized up
# to the window, then 2 windows across): every image takes several windows.
SIZES = [(40, 70), (75, 36), (20, 26)]


def folder_dataset(root: Path, sizes=SIZES):
    """A folder dataset of random images and labels (a quarter of each label ignored)."""
    return build_dataset("folder", _folder(root, sizes, K), "val")


def tiny(name: str):
    torch.manual_seed(0)
    return create_model(name, n_cls=K).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return folder_dataset(tmp_path_factory.mktemp("folder"))


def test_the_images_take_several_windows(dataset):
    """The folder dataset exercises the protocol: every image is scored through several windows."""
    for i in range(len(dataset)):
        image, _ = dataset.load_raw(i)
        encoded = encode_image(tiny("depict-sa-tiny"), image, window=WINDOW, stride=16)
        assert sum(len(anchors) for _, anchors in encoded.views[0].tokens) >= 2


@pytest.mark.parametrize("name", ["depict-sa-tiny", "segmenter-tiny"])
def test_decoding_encoded_windows_equals_image_labels(dataset, name):
    """The backbone half and the decoder half of ``image_labels``, also over several scales and flips."""
    model = tiny(name)
    protocol = {"window": WINDOW, "stride": 16, "img_scale": (160, 40), "scales": (0.75, 1.0), "flip": True, "batch_size": 2}
    for i in range(len(dataset)):
        image, _ = dataset.load_raw(i)
        with torch.inference_mode():
            assert torch.equal(decode_labels(model, encode_image(model, image, **protocol)), image_labels(model, image, **protocol))


@pytest.mark.parametrize("name", ["depict-sa-tiny", "segmenter-tiny"])
@pytest.mark.parametrize("noise,target", [("gaussian", "decoder"), ("gaussian", "encoder"), ("gaussian", "input"), ("blur", "input")])
def test_sigma_zero_equals_evaluate(dataset, name, noise, target):
    """σ = 0 of a sweep on the evaluation protocol is ``depict eval`` on the same images, to round-off."""
    model = tiny(name)
    expected = evaluate(model, dataset, batch_size=2)
    records = robustness_records(model, "m", EvaluationImages(dataset, batch_size=2), resolve_perturbation(noise, target),
                                 (0, 0.5), draws=2)
    clean = records[0]
    assert (clean.sigma, clean.draw) == (0.0, 0) and [r.sigma for r in records[1:]] == [0.5] * (len(records) - 1)
    for key in ("miou", "pixel_acc", "mean_acc"):
        assert getattr(clean, key) == pytest.approx(expected[key], rel=1e-12, abs=1e-15)
    assert clean.counts.shape == (len(dataset), 3, K) and clean.counts[:, 1].sum() == expected["n_pixels"]
    assert any(r.miou != clean.miou for r in records[1:])  # σ = 0.5 changes something


def test_a_perturbed_draw_equals_evaluate_on_the_perturbed_model(dataset):
    """A decoder-noise draw (Z_0 cached per window) scores as ``evaluate`` of a model holding those parameters."""
    model = tiny("depict-sa-tiny")
    perturbation = resolve_perturbation("gaussian", "decoder")
    records = robustness_records(model, "m", EvaluationImages(dataset), perturbation, (0, 0.05), draws=1)
    noisy = tiny("depict-sa-tiny")
    with torch.no_grad():
        parameters = rob.perturbed_parameters(model, perturbation, 0.05, draw_generator(0, "m", 0.05, 0))
        for name, value in parameters.items():
            noisy.get_parameter(name).copy_(value)
    assert records[1].miou == pytest.approx(evaluate(noisy, dataset)["miou"], rel=1e-12)


def test_input_noise_is_drawn_per_image(dataset):
    """Image i's noise comes from its own generator (seed, model, σ, draw, i): scoring one image alone
    gives the counts it gets in the sweep of all, whatever comes before it."""
    model = tiny("depict-sa-tiny")
    perturbation = resolve_perturbation("gaussian", "input")
    whole = ModelSweep(model, "m", perturbation, (0, 0.3), 2, seed=1)
    whole.run(EvaluationImages(dataset))
    alone = ModelSweep(model, "m", perturbation, (0, 0.3), 2, seed=1)
    image, label = dataset.load_raw(2)
    alone.score_image(image, label, 2, EvaluationImages(dataset).protocol(model))
    assert np.array_equal(alone.counts[2], whole.counts[2])
    assert not np.array_equal(whole.counts[2][1], whole.counts[2][2])  # two draws, two noises


def test_crop_records_do_not_depend_on_the_batch_size():
    """Square crops with input noise: the same records in batches of 1 and of 3 (per-image noise)."""
    model = tiny("depict-sa-tiny")
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.rand(3, 3, 32, 32, generator=g), torch.randint(0, K, (3, 32, 32), generator=g)
    perturbation = resolve_perturbation("gaussian", "input")

    def sweep(batch: int):
        batches = [rob.Batch(pixels[i : i + batch], labels[i : i + batch], [""] * batch) for i in range(0, 3, batch)]
        return robustness_records(model, "m", batches, perturbation, (0, 0.2), draws=2)

    for a, b in zip(sweep(1), sweep(3)):
        assert a == b and np.array_equal(a.counts, b.counts)


def test_parameter_sets_are_drawn_once_per_sigma_and_draw(dataset, monkeypatch):
    """Images outer, (σ, draw) inner: each parameter set is drawn once and reused for every image."""
    model = tiny("depict-sa-tiny")
    calls = []
    original = rob.perturbed_parameters
    monkeypatch.setattr(rob, "perturbed_parameters", lambda *a: calls.append(a[2:]) or original(*a))
    sweep = ModelSweep(model, "m", resolve_perturbation("gaussian", "decoder"), (0, 0.1, 0.2), 2, seed=0)
    sweep.run(EvaluationImages(dataset))
    assert len(calls) == 5 and sorted(sweep.counts) == [0, 1, 2]
    calls.clear()  # beyond the budget every image draws again, the same values
    small = ModelSweep(model, "m", resolve_perturbation("gaussian", "decoder"), (0, 0.1, 0.2), 2, seed=0, parameter_budget=0)
    small.run(EvaluationImages(dataset))
    assert len(calls) == 1 + 4 * len(dataset)  # the clean set is empty: kept at any budget
    assert all(np.array_equal(small.counts[i], sweep.counts[i]) for i in range(len(dataset)))


def test_an_interrupted_sweep_keeps_the_images_scored(dataset, monkeypatch):
    """Ctrl-C during the second model: both models on the images it finished, ``complete`` False."""
    models = [LoadedModel.of(tiny("depict-sa-tiny"), "a"), LoadedModel.of(tiny("segmenter-tiny"), "b")]
    scored = []
    original = ModelSweep.score_image

    def score(self, image, label, index, protocol):
        if self.label == "b" and index == 2:
            raise KeyboardInterrupt
        scored.append((self.label, index))
        return original(self, image, label, index, protocol)

    monkeypatch.setattr(ModelSweep, "score_image", score)
    noise = resolve_perturbation("gaussian", "decoder")
    result = rob.run_robustness(models, EvaluationImages(dataset), noise, (0, 0.1), None, draws=1)
    assert not result.complete and result.num_images == 2 and result.labels == ["a", "b"]
    full = robustness_records(models[0].model, "a", EvaluationImages(dataset, num_images=2), noise, (0, 0.1), draws=1)
    assert [e.miou for e in result.evaluations[:2]] == [e.miou for e in full]
    assert result.settings["protocol"] == "evaluation"


SHARDED = textwrap.dedent('''
    import json, sys
    import torch
    from depict_analysis.foundation.distributed import process_group, rank_and_world
    from depict_analysis.models import create_model
    from depict_analysis.models.data import build_dataset
    from depict_analysis.models.sources import LoadedModel
    from depict_analysis.perturbations import resolve_perturbation
    from depict_analysis.robustness import EvaluationImages, ModelSweep, run_robustness

    torch.set_num_threads(1)
    root, out = sys.argv[1], sys.argv[2]
    scored = []
    score = ModelSweep.score_image
    ModelSweep.score_image = lambda self, image, label, i, p: scored.append(i) or score(self, image, label, i, p)
    with process_group(torch.device("cpu")):
        torch.manual_seed(0)
        models = [LoadedModel.of(create_model("depict-sa-tiny", n_cls=4).eval(), "sa")]
        result = run_robustness(models, EvaluationImages(build_dataset("folder", root, "val")),
                                resolve_perturbation("gaussian", "input"), (0, 0.2), out, draws=2)
        rank, world = rank_and_world()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": world, "scored": scored, "records": result.rows()}, f)
''')


@pytest.mark.slow
def test_a_two_process_sweep_gives_the_records_of_one_process(tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo): each process scores its share, rank 0 writes, the records equal one process's."""
    root = tmp_path / "folder"
    folder_dataset(root, SIZES + [(33, 50), (50, 33)])
    script = tmp_path / "sweep.py"
    script.write_text(SHARDED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"out{world}"
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(29600 + world),
                   str(script), str(root), str(out)]
        subprocess.run(command, check=True, env=env, timeout=300, capture_output=True)
        runs[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    one, two = runs[1][0], runs[2]
    assert one["world"] == 1 and [r["world"] for r in two] == [2, 2]
    assert sorted(one["scored"]) == [0, 1, 2, 3, 4]
    assert two[0]["scored"] == [0, 2, 4] and two[1]["scored"] == [1, 3]  # each image scored once, by one process
    assert two[0]["records"] == one["records"] == two[1]["records"]
    written = json.loads((tmp_path / "out2" / "robustness.json").read_text())
    assert written["records"] == one["records"] and written["complete"]


@pytest.mark.slow
def test_depict_eval_under_torchrun_scores_each_image_once_and_writes_once(tmp_path):
    """``torchrun --nproc-per-node 2 -m depict_analysis.cli.main eval``: the scores of one process."""
    from depict_analysis.models import save_checkpoint

    root = tmp_path / "folder"
    folder_dataset(root)
    save_checkpoint(tmp_path / "sa.pt", tiny("depict-sa-tiny"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    scores = {}
    for world in (1, 2):
        out = tmp_path / f"scores{world}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                   str(29610 + world), "-m", "depict_analysis.cli.main", "eval", str(tmp_path / "sa.pt"), "--dataset",
                   "folder", "--data-root", str(root), "--device", "cpu", "--out", str(out)]
        done = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("pixel accuracy") == 1  # one table, from rank 0
        scores[world] = json.loads(out.read_text())
    assert scores[2] == scores[1] and scores[1]["n_images"] == len(SIZES)


def test_the_paper_grid_is_the_depict_noise_plots():
    """``--sigmas paper``: 0, {1..5}·1e-3, {1..5}·1e-2, 0.1..0.8, 1.0; parameter noise only."""
    from depict_analysis.foundation.errors import ConfigError
    from depict_analysis.perturbations import parse_sigmas

    expected = [0.0] + [k * 1e-3 for k in range(1, 6)] + [k * 1e-2 for k in range(1, 6)] + [k / 10 for k in range(1, 9)] + [1.0]
    grid = parse_sigmas("paper", resolve_perturbation("gaussian", "decoder"))
    assert grid == pytest.approx(expected, rel=1e-12) and len(grid) == 20
    with pytest.raises(ConfigError, match="parameter noise"):
        parse_sigmas("paper", resolve_perturbation("gaussian", "input"))
