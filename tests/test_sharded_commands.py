"""Every dataset-level analysis command under ``torchrun --nproc-per-node 2`` (gloo): each process reads
only its share of the images, rank 0 writes, and the files are those of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.test_robustness_protocol import SIZES, folder_dataset, tiny

IMAGES = len(SIZES) + 2  # 5 images in batches of 2: process 0 traces batches 0 and 2, process 1 batch 1

# Runs one command line in-process and records what this process read: the images of every batch it
# traced, or (ablate: the evaluation protocol) every image it loaded.
RUN = textwrap.dedent('''
    import json, os, sys
    import torch
    import depict_analysis.tracing as tracing
    from depict_analysis.cli.analyze import app
    from depict_analysis.models.data import build_dataset

    torch.set_num_threads(1)
    record, root, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    read = []
    trace = tracing.trace
    tracing.trace = lambda model, batch, **kw: read.extend(batch.paths) or trace(model, batch, **kw)
    folder = type(build_dataset("folder", root, "val"))
    load_raw = folder.load_raw
    folder.load_raw = lambda self, i: read.append(self.item_path(i)) or load_raw(self, i)
    app(argv, standalone_mode=False)
    with open(f"{record}{os.environ['RANK']}.json", "w") as f:
        json.dump({"world": int(os.environ["WORLD_SIZE"]), "read": read}, f)
''')

# command, its result file, its own options
COMMANDS = {
    "coding-rate": ("coding_rate.json", []),
    "pca-seg": ("pca-seg.json", ["--examples", "4"]),
    "class-rates": ("class_rates.json", []),
    "attention": ("attention.json", ["--examples", "3"]),
    "ablate": ("ablation.json", ["--resamples", "20"]),
}


def run(tmp_path: Path, world: int, command: str, arguments: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``torchrun --nproc-per-node world`` of one command line; (the run, what each process read)."""
    script = tmp_path / "run.py"
    script.write_text(RUN)
    record = tmp_path / f"read{world}_"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = 29620 + 10 * list(COMMANDS).index(command) + world
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port)]
    done = subprocess.run([*launch, str(script), str(record), str(tmp_path / "folder"), command, *arguments],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done, [json.loads(Path(f"{record}{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_two_processes_write_the_files_of_one(tmp_path, command):
    """The result JSON (and every file) of two processes is that of one; each image is read by one
    process, its share (every second batch; ablate: every second image)."""
    from depict_analysis.models import save_checkpoint

    folder_dataset(tmp_path / "folder", SIZES + [(33, 50), (50, 33)])
    save_checkpoint(tmp_path / "sa.pt", tiny("depict-sa-tiny"))
    name, own = COMMANDS[command]
    images = ["--dataset", "folder", "--data-root", str(tmp_path / "folder"), "--num-images", str(IMAGES)]
    batches = ["--batch-size", "2"] if command != "ablate" else []
    outs, reads, printed = {}, {}, {}
    for world in (1, 2):
        outs[world] = tmp_path / f"out{world}"
        saved = ["--save-trace", str(tmp_path / f"trace{world}.pt")] if command == "coding-rate" else []
        done, reads[world] = run(tmp_path, world, command,
                                 [str(tmp_path / "sa.pt"), *images, *batches, *own, *saved, "--device", "cpu", "--out", str(outs[world])])
        printed[world] = done.stdout
    one, two = reads[1][0]["read"], [r["read"] for r in reads[2]]
    assert len(one) == IMAGES and [r["world"] for r in reads[2]] == [2, 2]
    share = [[0, 1, 4], [2, 3]] if command != "ablate" else [[0, 2, 4], [1, 3]]
    assert two == [[one[i] for i in indices] for indices in share]  # each image read once, by one process
    assert printed[2].count("wrote") == printed[1].count("wrote") == 1  # rank 0 prints
    assert json.loads((outs[2] / name).read_text()) == json.loads((outs[1] / name).read_text())
    files = sorted(p.name for p in outs[1].iterdir())
    assert sorted(p.name for p in outs[2].iterdir()) == files
    for data in [f for f in files if f.endswith(".csv")]:
        assert (outs[2] / data).read_text() == (outs[1] / data).read_text()
    if command == "coding-rate":  # --save-trace: one file, every process's images, as one process writes it
        from depict_analysis.tracing import Trace

        traces = [Trace.load(tmp_path / f"trace{world}.pt") for world in (1, 2)]
        assert traces[1].paths == traces[0].paths == one
        assert traces[1].keys() == traces[0].keys()
        for key in traces[0].keys():
            np.testing.assert_array_equal(np.asarray(traces[1][key]), np.asarray(traces[0][key]))
