"""Benchmark: a decoder-noise robustness sweep on the evaluation protocol, and peak memory at 8 vs 64 images.

**Speed.** Both sides run ``depict_analysis.robustness.robustness_records`` on the same model,
images and σ × draws (decoder noise, float32, ``torch.inference_mode``), with the evaluation
protocol of ``depict eval`` (ADE20K's test resize, 512-px windows at stride 480, merged logits):

- ``full forward``: ``cache_z0=False`` — every (σ, draw) runs the whole model (backbone + decoder)
  on every window of every image, as "perturb, then ``depict eval``" would;
- ``sweep``: the default for decoder-only noise — the backbone runs once per window, then every
  (σ, draw) only decodes (``ModelSweep``: images outer, perturbations inner): the decoder, the
  upsampling into buffers reused by every decode of the image (a fresh 150-class map at full
  resolution costs more in page faults than the bilinear kernel itself), the arg-max of the merged
  windows cell by cell (``merged_labels``: no merged map is built) and one ``bincount`` per image.

The records must agree (the script prints the largest mIoU difference). Defaults: the paper's 13-σ
grid × 3 draws at ViT-S/16 on 512 × 683 images (two windows each), DEPICT-SA; weights are
random (no download), images random (timing does not depend on the content).

**Memory.** Peak resident memory (``ru_maxrss``) of a fresh process running the sweep, and
``coding-rate`` / ``pca-seg`` on 512² crops (``--crop``) (``trace_batches`` in batches of 8), at
``--memory-images`` 8 and 64 images: bounded memory means the same peak within ~10 %.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/robustness.py --images 1 --repeats 3 --threads 2 --skip-memory
    python benchmarks/robustness.py --variant segmenter-vit-s16 --images 4 --device cuda
    python benchmarks/robustness.py --skip-speed --memory-images 8,64 --memory-sigmas 0,0.01
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depict_analysis.inputs import Batch  # noqa: E402
from depict_analysis.models import create_model  # noqa: E402
from depict_analysis.models.data import SegmentationDataset  # noqa: E402
from depict_analysis.perturbations import PARAMETER_SIGMAS, resolve_perturbation  # noqa: E402
from depict_analysis.robustness import EvaluationImages, robustness_records  # noqa: E402


class RandomImages(SegmentationDataset):
    """``n`` random RGB images of (height, width) with random labels, shaped like ADE20K validation images."""

    name = "random"
    base_size, max_ratio = 512, 4  # ADE20K's test resize: Resize((2048, 512), keep_ratio=True)

    def __init__(self, n: int, height: int, width: int, n_cls: int, seed: int = 0):
        super().__init__("val", [f"c{i}" for i in range(n_cls)], np.zeros((n_cls, 3), np.uint8))
        self.n, self.size, self.seed = n, (height, width), seed

    def __len__(self) -> int:
        return self.n

    def item_path(self, i: int) -> str:
        return f"random{i}"

    def _load(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        image = Image.fromarray(rng.integers(0, 256, (*self.size, 3), dtype=np.uint8))
        return image, rng.integers(0, self.n_cls, self.size)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def speed(args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = create_model(args.variant, n_cls=args.n_cls).eval().to(device)
    images = EvaluationImages(RandomImages(args.images, args.height, args.width, args.n_cls, args.seed),
                              short_side=args.short_side, batch_size=args.batch)
    sigmas = [float(s) for s in args.sigmas.split(",")] if args.sigmas else list(PARAMETER_SIGMAS)
    noise = resolve_perturbation("gaussian", "decoder")
    n_evals = sum(1 if s == 0 else args.draws for s in sigmas)

    def sweep(cache: bool):
        return lambda: robustness_records(model, "bench", images, noise, sigmas, args.draws, args.seed, cache_z0=cache)

    sweep(True)()  # warm-up (allocator, kernels)
    runs = {"sweep": [], "full": []}
    for _ in range(args.repeats):  # alternating: load drifting on a shared machine hits both alike
        runs["sweep"].append(timed(sweep(True)))
        runs["full"].append(timed(sweep(False)))
    (sweep_s, fast), (full_s, full) = min(runs["sweep"], key=lambda r: r[0]), min(runs["full"], key=lambda r: r[0])
    n_params = sum(p.numel() for p in model.decoder.parameters())
    protocol = images.protocol(model)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} | {args.variant} "
          f"(decoder {n_params / 1e6:.2f} M params), {args.images} images of {args.width} x {args.height} "
          f"(evaluation protocol: window {protocol['window']}, stride {protocol['stride']}, test resize "
          f"{protocol['img_scale']}), {len(sigmas)} σ × {args.draws} draws = {n_evals} evaluations; "
          f"min of {args.repeats} alternating runs; load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'method':<38}  {'seconds':>8}  {'per image and (σ, draw)':>24}")
    for label, seconds in (("full forward per (σ, draw)", full_s), ("sweep (backbone once per window)", sweep_s)):
        print(f"{label:<38}  {seconds:>8.2f}  {seconds / n_evals / args.images:>23.3f}s")
    diff = max(abs(a.miou - b.miou) for a, b in zip(full, fast))
    print(f"speed-up of the sweep: {full_s / sweep_s:.2f}x (goal for DEPICT-SA at ViT-S/16, 512 x 683: ≥ 4x); "
          f"max |ΔmIoU| sweep vs full forward: {diff:.1e}")
    return {"full": full_s, "sweep": sweep_s, "max_miou_diff": diff}


def memory_child(args) -> None:
    """Run one workload in this (fresh) process and print its peak resident memory in MiB as JSON."""
    torch.manual_seed(args.seed)
    n = args.child_images
    if args.child == "sweep":
        model = create_model(args.variant, n_cls=args.n_cls).eval()
        images = EvaluationImages(RandomImages(n, args.height, args.width, args.n_cls, args.seed), short_side=args.short_side,
                                  batch_size=args.batch)
        sigmas = [float(s) for s in args.memory_sigmas.split(",")]
        robustness_records(model, "bench", images, resolve_perturbation("gaussian", "decoder"), sigmas, args.draws)
    else:
        from depict_analysis.coding_rate_analysis import analyze_coding_rates
        from depict_analysis.pca_analysis import analyze_pca
        from depict_analysis.tracing import trace_batches

        model = create_model(args.variant, n_cls=args.n_cls).eval()

        def batches():
            for start in range(0, n, 8):
                g = torch.Generator().manual_seed(start)
                b = min(8, n - start)
                size = (b, args.crop, args.crop)
                yield Batch(torch.rand(b, 3, *size[1:], generator=g), torch.randint(0, args.n_cls, size, generator=g),
                            [f"im{start + i}" for i in range(b)])

        traces = trace_batches(model, batches(), progress=False)
        analyze_coding_rates(traces) if args.child == "coding-rate" else analyze_pca(traces, examples=1)
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args) -> None:
    counts = [int(n) for n in args.memory_images.split(",")]
    print(f"peak resident memory (MiB), fresh process per run; {args.variant}; sweep: {args.width} x {args.height} images, "
          f"σ = {args.memory_sigmas} × {args.draws} draws; coding-rate / pca-seg: {args.crop}² crops in batches of 8")
    print(f"{'workload':<12}" + "".join(f"{f'{n} images':>12}" for n in counts) + f"{'ratio':>8}")
    for workload in args.workloads.split(","):
        peaks = []
        for n in counts:
            command = [sys.executable, __file__, "--child", workload, "--child-images", str(n), "--variant", args.variant,
                       "--n-cls", str(args.n_cls), "--height", str(args.height), "--width", str(args.width),
                       "--memory-sigmas", args.memory_sigmas, "--draws", str(args.draws), "--batch", str(args.batch),
                       "--crop", str(args.crop), *(["--short-side", str(args.short_side)] if args.short_side is not None else [])]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            peaks.append(json.loads(out.strip().splitlines()[-1])["peak_mib"])
        print(f"{workload:<12}" + "".join(f"{p:>12.0f}" for p in peaks) + f"{peaks[-1] / peaks[0]:>7.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="depict-sa-vit-s16")
    ap.add_argument("--n-cls", type=int, default=150)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=683)
    ap.add_argument("--images", type=int, default=2, help="images of the speed comparison")
    ap.add_argument("--short-side", type=int, default=None, help="test resize (default: ADE20K's 512; 0: none)")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--crop", type=int, default=512, help="square crops of coding-rate / pca-seg")
    ap.add_argument("--sigmas", default="", help="comma-separated σ (default: the 13 of SPEC §3.4)")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each side (the minimum is shown)")
    ap.add_argument("--memory-images", default="8,64", help="image counts of the memory comparison")
    ap.add_argument("--memory-sigmas", default="0,0.001,0.01,0.1", help="σ of the memory comparison's sweep")
    ap.add_argument("--workloads", default="sweep,coding-rate,pca-seg")
    ap.add_argument("--skip-speed", action="store_true", help="only the memory section")
    ap.add_argument("--skip-memory", action="store_true", help="only the speed section")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i (speed comparison)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-images", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return memory_child(args)
    if not args.skip_speed:
        speed(args, torch.device(args.device))
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
