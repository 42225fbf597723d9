"""Benchmark: batched coding rates (depict_analysis.coding_rate) vs the naive N×N slogdet loop.

Both sides compute, for B images × J token layers × S subspaces at ViT-S sizes
(d = 384, N = 1024 patches + 150 classes, each subspace h·p = 3 × 100):

    R(Z_j)      = ½ logdet(I_N + d/(N ε²) Z Zᵀ)
    R(P_lᵀ Z_j) = ½ logdet(I_N + hp/(N ε²) (Z P_l)(Z P_l)ᵀ)

- ``naive``: what a user would write from the formula — a Python loop over images, layers and
  subspaces, one float64 ``torch.linalg.slogdet`` of the N×N matrix each, no Gram trick.
- ``ours: per-call``: ``token_rate`` / ``subspace_rates`` called per layer (batched over images).
- ``ours: rate_table``: one ``rate_table`` call (it also returns every per-head rate, which the
  naive loop does not compute unless ``--with-heads``, and the span rates and CRATE's R^c, which it
  never computes).

Times are medians over ``--repeats`` interleaved rounds after one warm-up; the baseline is measured in the
same run on the same tokens. Usage::

    python benchmarks/coding_rate.py --device cpu --repeats 5 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from depict_analysis.coding_rate import rate_table, subspace_rates, token_rate


def make_inputs(
    args: argparse.Namespace, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clustered float32 tokens (low-rank signal + noise) and raw-like projections."""
    g = torch.Generator().manual_seed(args.seed)
    B, N, d = args.batch, args.tokens, args.dim
    tokens = []
    for _ in range(args.layers):
        signal = torch.randn(B, N, 32, generator=g) @ torch.randn(32, d, generator=g)
        tokens.append((signal + 0.5 * torch.randn(B, N, d, generator=g)).to(device))
    subspaces = [
        (torch.randn(args.heads, args.dim_head, d, generator=g) / d**0.5).to(device)
        for _ in range(args.subspaces)
    ]
    return tokens, subspaces


def naive(tokens: list[torch.Tensor], subspaces: list[torch.Tensor], eps: float, with_heads: bool) -> dict:
    """Literal loop: float64, N×N slogdet per (image, layer[, subspace[, head]])."""
    B, N, d = tokens[0].shape
    J, S = len(tokens), len(subspaces)
    tok = torch.empty(B, J, dtype=torch.float64)
    sub = torch.empty(B, S, J, dtype=torch.float64)
    heads = [torch.empty(B, P.shape[0], J, dtype=torch.float64) for P in subspaces]

    def rate(Y: torch.Tensor) -> float:
        n, m = Y.shape
        eye = torch.eye(n, dtype=Y.dtype, device=Y.device)
        return 0.5 * torch.linalg.slogdet(eye + m / (n * eps**2) * Y @ Y.T).logabsdet.item()

    for b in range(B):
        for j, Zj in enumerate(tokens):
            Z = F.normalize(Zj[b].double(), dim=-1)  # l2, before projecting
            tok[b, j] = rate(Z)
            for l, proj in enumerate(subspaces):
                h, p, _ = proj.shape
                Y = Z @ proj.double().reshape(h * p, d).T
                sub[b, l, j] = rate(Y)
                if with_heads:
                    for k in range(h):
                        heads[l][b, k, j] = rate(Y[:, k * p : (k + 1) * p])
    return {"token_rate": tok, "subspace_rate": sub, "head_rate": heads if with_heads else None}


def per_call(tokens: list[torch.Tensor], subspaces: list[torch.Tensor], eps: float) -> dict:
    tok = torch.stack([token_rate(Z, eps) for Z in tokens], dim=-1)
    sub = torch.stack(
        [torch.stack([subspace_rates(Z, P, eps)[1] for Z in tokens], dim=-1) for P in subspaces], dim=1
    )
    return {"token_rate": tok.cpu(), "subspace_rate": sub.cpu()}


def batched(tokens: list[torch.Tensor], subspaces: list[torch.Tensor], eps: float) -> dict:
    t = rate_table({str(j): Z for j, Z in enumerate(tokens)}, {str(l): P for l, P in enumerate(subspaces)}, eps)
    rates = list(t.subspaces.values())
    return {"token_rate": t.token_rate.cpu(), "subspace_rate": torch.stack([r.subspace_rate for r in rates], 1).cpu(),
            "head_rate": [r.head_rate.cpu() for r in rates]}


def time_interleaved(fns: dict[str, Callable[[], dict]], repeats: int, device: torch.device):
    """(median, min) seconds per method and each method's output.

    One warm-up call each, then ``repeats`` rounds that call every method once in turn, so
    that load drifting over time (shared CPUs) hits all methods alike.
    """

    def once(fn: Callable[[], dict]) -> tuple[float, dict]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    outputs = {name: once(fn)[1] for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn)[0])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}, outputs


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs()).max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="images")
    ap.add_argument("--layers", type=int, default=4, help="token layers J (Z_0..Z_L)")
    ap.add_argument("--subspaces", type=int, default=3)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--dim-head", type=int, default=100)
    ap.add_argument("--dim", type=int, default=384, help="token width d (ViT-S: 384)")
    ap.add_argument("--tokens", type=int, default=1024 + 150, help="N")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--with-heads", action="store_true", help="naive loop also computes per-head rates")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens, subspaces = make_inputs(args, device)
    B, J, S = args.batch, args.layers, args.subspaces
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} | "
        f"B={B} images x J={J} layers x S={S} subspaces, N={args.tokens}, d={args.dim}, "
        f"h*p={args.heads}x{args.dim_head}, eps={args.eps}, l2, repeats={args.repeats}"
    )

    with torch.inference_mode():
        med, outs = time_interleaved(
            {
                "naive": lambda: naive(tokens, subspaces, args.eps, args.with_heads),
                "per_call": lambda: per_call(tokens, subspaces, args.eps),
                "table": lambda: batched(tokens, subspaces, args.eps),
            },
            args.repeats,
            device,
        )
    t_naive, t_call, t_table = med["naive"], med["per_call"], med["table"]
    ref, out_call, out_table = outs["naive"], outs["per_call"], outs["table"]

    def diff(out: dict) -> float:
        d = max(max_rel_diff(out["token_rate"], ref["token_rate"]),
                max_rel_diff(out["subspace_rate"], ref["subspace_rate"]))
        if args.with_heads and "head_rate" in out:
            d = max(d, *(max_rel_diff(a, b) for a, b in zip(out["head_rate"], ref["head_rate"])))
        return d

    n_naive = B * J * (1 + S * (1 + (args.heads if args.with_heads else 0)))
    rows = [
        (f"naive: {n_naive} x N×N slogdet loop", t_naive, float("nan")),
        ("ours: token_rate/subspace_rates per layer", t_call, diff(out_call)),
        ("ours: rate_table (+ per-head rates)", t_table, diff(out_table)),
    ]
    w = max(len(r[0]) for r in rows)
    print(
        f"{'method':<{w}}  {'median s':>9}  {'speed-up':>9}  {'min s':>8}  {'speed-up':>9}  "
        f"{'max rel diff vs naive':>22}"
    )
    for name, (med_t, min_t), rel in rows:
        rel_s = "-" if rel != rel else f"{rel:.2e}"
        print(
            f"{name:<{w}}  {med_t:>9.4f}  {t_naive[0] / med_t:>8.1f}x  {min_t:>8.4f}  "
            f"{t_naive[1] / min_t:>8.1f}x  {rel_s:>22}"
        )
    r = out_table
    print(
        f"R(Z_j) mean {r['token_rate'].mean():.2f}, R(P^T Z_j) mean {r['subspace_rate'].mean():.2f}, "
        f"ratio mean {(r['subspace_rate'] / r['token_rate'][:, None]).mean():.3f}"
    )


if __name__ == "__main__":
    main()
