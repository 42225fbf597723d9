"""Benchmark: a decoder-noise robustness sweep with Z_0 cached vs recomputing the backbone for every (σ, draw).

Both sides run ``depict_analysis.robustness.robustness_records`` on the same model, images and
σ × draws (decoder noise, float32, ``torch.inference_mode``):

- ``recompute``: ``cache_z0=False`` — every (σ, draw) runs the whole model (backbone + decoder)
  on every image batch, as a plain "perturb, then evaluate" loop would;
- ``cached Z_0``: ``cache_z0=True`` (the default for decoder-only noise) — the backbone runs once
  per image batch, then only ``decode`` runs per (σ, draw).

The sweep is 1 clean evaluation + (#σ > 0) × draws noisy ones, so the ideal ratio approaches
(backbone + decoder) / decoder as the sweep grows. Weights are random (no download). Times: one
warm-up sweep each, then ``--repeats`` rounds alternating the two (load drifting on a shared
machine hits both alike); median and min per side, ratios recompute / cached. Usage::

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --threads 1
    python benchmarks/robustness.py --variant depict-ca-vit-t16 --size 256 --draws 3 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coding_rate import time_interleaved  # noqa: E402
from depict_analysis.inputs import Batch  # noqa: E402
from depict_analysis.perturbations import resolve_perturbation  # noqa: E402
from depict_analysis.robustness import robustness_records  # noqa: E402
from depict_analysis.models import create_model  # noqa: E402


def make_batches(n: int, size: int, batch: int, n_cls: int, device: torch.device, seed: int) -> list[Batch]:
    """Random pixels (B, 3, S, S) and labels (B, S, S): timing does not depend on the content."""
    g = torch.Generator().manual_seed(seed)
    pixels, labels = torch.rand(n, 3, size, size, generator=g), torch.randint(0, n_cls, (n, size, size), generator=g)
    return [Batch(pixels[i : i + batch].to(device), labels[i : i + batch].to(device), [""] * len(pixels[i : i + batch]))
            for i in range(0, n, batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="depict-sa-vit-t16")
    ap.add_argument("--n-cls", type=int, default=150)
    ap.add_argument("--size", type=int, default=192, help="square image side (pixels)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="images per forward pass")
    ap.add_argument("--sigmas", default="0,0.01,0.1", help="comma-separated σ (0 = the clean model, one draw)")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(args.variant, n_cls=args.n_cls).eval().to(device)
    batches = make_batches(args.images, args.size, args.batch, args.n_cls, device, args.seed)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    perturbation = resolve_perturbation("gaussian", "decoder")
    n_evals = sum(1 if s == 0 else args.draws for s in sigmas)

    def sweep(cache: bool):
        return lambda: list(robustness_records(model, "bench", batches, perturbation, sigmas, args.draws,
                                               args.seed, cache_z0=cache))

    times, outputs = time_interleaved({"recompute": sweep(False), "cached": sweep(True)}, args.repeats, device)
    n_params = sum(p.numel() for p in model.decoder.parameters())
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} | {args.variant} "
        f"(decoder {n_params / 1e6:.2f} M params), {args.images} images of {args.size}² in batches of "
        f"{args.batch}, σ={sigmas} × {args.draws} draws = {n_evals} evaluations, repeats={args.repeats}"
    )
    print(f"{'method':<34}  {'median s':>9}  {'min s':>8}  {'per eval (median)':>17}")
    for name, label in (("recompute", "recompute backbone every (σ, draw)"), ("cached", "cached Z_0 (decode only)")):
        med, low = times[name]
        print(f"{label:<34}  {med:>9.3f}  {low:>8.3f}  {med / n_evals:>16.3f}s")
    (rec_med, rec_min), (cache_med, cache_min) = times["recompute"], times["cached"]
    diff = max(abs(a.miou - b.miou) for a, b in zip(outputs["recompute"], outputs["cached"]))
    print(f"speed-up of caching Z_0: {rec_med / cache_med:.2f}x (median), {rec_min / cache_min:.2f}x (min); "
          f"max |ΔmIoU| cached vs recomputed: {diff:.1e}")


if __name__ == "__main__":
    main()
