"""Benchmark: images/s of sliding-window evaluation and of the coding-rate analysis, against baselines.

Everything runs on procedurally drawn synthetic scenes (``depict_analysis.models.data.synthetic``), rendered once
and held in memory so that drawing them is not timed. Models have random weights and
K = ``--classes`` (150, ADE20K's K) output classes; the scenes' labels (0..7) are valid class ids.

Evaluation (``depict_analysis.models.evaluate.evaluate``, single scale): Segmenter's protocol — a view
whose short side is below the window (the model's training size) enlarged to it, sliding windows
with stride window − 32 (tiny models: window / 2), logits averaged over overlaps, resized back to
the label's resolution, softmax, argmax, dataset-level confusion matrix. Scenes are (15/16 ×
window) × (5/4 × window), e.g. 480 × 640 for a 512 window (enlarged to 512 × 682: 2 windows each,
like most ADE20K images). Rows, in one run:

- ``evaluate()``: what ships — class maps upsampled and averaged in channels-last memory,
  accumulated in place, soft-maxed there, under ``torch.inference_mode``;
- ``reference protocol``: the same loop with the straightforward NCHW implementation (upsample
  NCHW logits, zero-initialised accumulators, out-of-place averaging, ``softmax(dim=1)``); its
  probabilities and mIoU are compared with ours;
- ``loop, no_grad`` vs ``loop, inference_mode``: evaluate()'s loop under ``torch.no_grad`` instead
  of ``torch.inference_mode`` (both written out here, so only the grad mode differs);
- ``channels-last backbone``: model weights (the patch-embedding conv) in channels-last;
- ``literal decoder``: the decoder swapped for ``benchmarks/decoder.py``'s literal reference
  (explicit attention matrices), same weights — the end-to-end effect of the fused decoder.

Analysis (``depict_analysis.coding_rate_analysis.analyze_coding_rates``: ``trace`` + every rate
R(Z_j), R(P_lᵀ Z_j) (+ per head, in span(P_l), CRATE's R^c), R(Q), float64, batched Cholesky on the smaller Gram) on square
scenes of the model's training size, ``--batch`` images per batch. Rows:

- ``analyze_coding_rates``: what ships;
- ``naive float64 N×N``: ``trace``, then every rate the result holds computed as written in the
  formula, ``½ logdet(I_N + m/(N ε²) Z Zᵀ)`` with one float64 N×N ``slogdet`` per image, layer and
  subspace (no Gram trick, no batching) — its rates are compared with ours (max relative diff);
- ``forward only``: ``model(x)`` under ``torch.inference_mode``, to show what the analysis adds.

Times: one warm-up call each, then ``--repeats`` rounds calling every row once in turn (load
drifting on a shared machine hits all rows alike); median and min. Ratios are taken within the
run: ``time ÷ base`` = the row's time / its base row's time (> 1: the row is slower than what
ships). mIoU values are of random weights: they only show that every path scores the same.

Usage::

    python benchmarks/inference.py --threads 1                       # ViT-T/16 + tiny variants, CPU
    python benchmarks/inference.py --backbone s --images 4           # ViT-S/16
    python benchmarks/inference.py --variants depict-sa-vit-t16 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decoder import literal_twin, time_interleaved  # noqa: E402
from depict_analysis.coding_rate_analysis import CodingRates, analyze_coding_rates  # noqa: E402
from depict_analysis.inputs import Batch  # noqa: E402
from depict_analysis.tracing import Trace, trace, trace_batches  # noqa: E402
from depict_analysis.models import create_model  # noqa: E402
from depict_analysis.models.data.base import image_to_tensor  # noqa: E402
from depict_analysis.models.data.synthetic import render_scene  # noqa: E402
from depict_analysis.models.evaluate import ConfusionMatrix, eval_protocol, evaluate, miou  # noqa: E402
from depict_analysis.models.segmentor import _window_starts, predict_probs, window_resize  # noqa: E402

FAMILIES = ("depict-sa", "depict-ca", "segmenter")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class InMemorySet:
    """The part of a ``SegmentationDataset`` that ``evaluate`` reads, over pre-rendered items."""

    name = "synthetic (in memory)"
    base_size, max_ratio = None, 4  # no test resize: views below the window are enlarged to it

    def __init__(self, items: list[tuple[Image.Image, np.ndarray]], n_cls: int):
        self.items, self.n_cls = items, n_cls

    def __len__(self) -> int:
        return len(self.items)

    def load_raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        return self.items[i]


def synthetic_scenes(n: int, height: int, width: int, seed: int = 0) -> list[tuple[Image.Image, np.ndarray]]:
    """``n`` synthetic scenes cropped to (height, width): (RGB image, int64 label) pairs."""
    items = []
    for i in range(n):
        image, label = render_scene(np.random.default_rng([seed, i]), max(height, width))
        items.append((Image.fromarray(image[:height, :width]), label[:height, :width]))
    return items


def analysis_batches(n: int, size: int, batch: int, seed: int = 0) -> list[Batch]:
    """``n`` square scenes of ``size`` as ``depict_analysis`` Batches of ``batch`` images."""
    items = synthetic_scenes(n, size, size, seed)
    pixels = torch.stack([image_to_tensor(image) for image, _ in items])
    labels = torch.stack([torch.from_numpy(label) for _, label in items])
    return [
        Batch(pixels[i : i + batch], labels[i : i + batch], [f"synthetic://{j}" for j in range(i, min(i + batch, n))])
        for i in range(0, n, batch)
    ]


# --------------------------------------------------------------------------------------------
# evaluation baselines
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_sliding_window_logits(model: nn.Module, images: Tensor, window: int, stride: int, batch_size: int = 8):
    """The straightforward implementation: NCHW logits summed over windows, out-of-place average."""
    B, _, H, W = images.shape
    crops, anchors = [], []
    for b in range(B):
        for top in _window_starts(H, window, stride):
            for left in _window_starts(W, window, stride):
                crops.append(images[b, :, top : top + window, left : left + window])
                anchors.append((b, top, left))
    logits = images.new_zeros(B, model.n_cls, H, W)
    count = images.new_zeros(B, 1, H, W)
    for i in range(0, len(crops), batch_size):
        out = model(torch.stack(crops[i : i + batch_size])).float()
        for p, (b, top, left) in zip(out, anchors[i : i + batch_size]):
            h, w = p.shape[-2:]
            logits[b, :, top : top + h, left : left + w] += p
            count[b, :, top : top + h, left : left + w] += 1
    return logits / count


@torch.no_grad()
def reference_predict_probs(
    model: nn.Module,
    images: Tensor,
    window: int,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
) -> Tensor:
    """``depict_analysis.models.segmentor.predict_probs`` written the straightforward way (NCHW, zero-initialised sum)."""
    H, W = images.shape[-2:]
    total = images.new_zeros(images.shape[0], model.n_cls, H, W)
    views = [(s, f) for s in scales for f in ([False, True] if flip else [False])]
    for scale, flipped in views:
        size = (max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5)))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if size != (H, W) else images
        if flipped:
            x = x.flip(-1)
        x = window_resize(x, window)
        logits = reference_sliding_window_logits(model, x, window, stride or window, batch_size)
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        if flipped:
            logits = logits.flip(-1)
        total += logits.softmax(dim=1)
    return total / len(views)


def evaluate_loop(model: nn.Module, dataset, predict: Callable, grad_mode: Callable, **protocol) -> dict:
    """``depict_analysis.models.evaluate.evaluate`` (single process, single scale) with a swappable predictor and grad mode."""
    device = next(model.parameters()).device
    confusion = ConfusionMatrix(model.n_cls, device)
    with grad_mode():
        for i in range(len(dataset)):
            image, label = dataset.load_raw(i)
            x = model.normalize(image_to_tensor(image)[None].to(device))
            probs = predict(model, x, protocol["window"], protocol["stride"], (1.0,), False, 8)[0]
            confusion.update(probs.argmax(0), torch.from_numpy(label).to(device))
    return miou(confusion)


# --------------------------------------------------------------------------------------------
# analysis baselines
# --------------------------------------------------------------------------------------------


def _naive_rate(Z: Tensor, eps: float) -> float:
    """½ logdet(I_N + m/(N ε²) Z Zᵀ) for one token set Z: (N, m), float64, one N×N slogdet."""
    N, m = Z.shape
    eye = torch.eye(N, dtype=Z.dtype, device=Z.device)
    return 0.5 * torch.linalg.slogdet(eye + m / (N * eps**2) * Z @ Z.T).logabsdet.item()


def naive_rates(tr: Trace, eps: float = 0.1) -> dict[str, np.ndarray]:
    """The rates ``analyze_coding_rates`` reports (l2 normalisation), as written in the formula.

    ``token_rate (B, J)``, ``subspace_rate (B, S, J)``, ``class_rate (B, T)`` (T = class stages + final).
    """
    B, J, S = tr.tokens[0].shape[0], len(tr.tokens), len(tr.subspaces)
    classes = tr.classes + [tr.class_embeddings]
    tok, sub, cls = np.empty((B, J)), np.empty((B, S, J)), np.empty((B, len(classes)))
    for b in range(B):
        for j, Zj in enumerate(tr.tokens):
            Z = F.normalize(Zj[b].double(), dim=-1)
            tok[b, j] = _naive_rate(Z, eps)
            for s, space in enumerate(tr.subspaces):
                h, p, d = space.proj.shape
                sub[b, s, j] = _naive_rate(Z @ space.proj.double().reshape(h * p, d).T, eps)
        for t, Q in enumerate(classes):
            cls[b, t] = _naive_rate(F.normalize(Q[b].double(), dim=-1), eps)
    return {"token_rate": tok, "subspace_rate": sub, "class_rate": cls}


def naive_analysis(model: nn.Module, batches: list[Batch], eps: float = 0.1) -> dict[str, np.ndarray]:
    """``trace`` + ``naive_rates`` over the batches, per-image values concatenated."""
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for batch in batches:
            tr = trace(model, model.normalize(batch.pixels.to(device)))
            for key, value in naive_rates(tr, eps).items():
                chunks.setdefault(key, []).append(value)
    return {key: np.concatenate(v) for key, v in chunks.items()}


def forward_only(model: nn.Module, batches: list[Batch]) -> None:
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in batches:
            model(model.normalize(batch.pixels.to(device)))


def rates_rel_diff(ours: CodingRates, naive: dict[str, np.ndarray]) -> float:
    """max relative difference between ``analyze_coding_rates``' per-image rates and the naive ones."""
    subspace = np.stack([ours.subspace_rate[space.name].per_image for space in ours.subspaces], axis=1)
    values = {"token_rate": ours.token_rate.per_image, "subspace_rate": subspace, "class_rate": ours.class_rate.per_image}
    return max(float(np.max(np.abs(values[key] - naive[key]) / np.abs(naive[key]))) for key in values)


# --------------------------------------------------------------------------------------------
# correctness checks (tests call these at tiny sizes)
# --------------------------------------------------------------------------------------------


def check_evaluation(variant: str = "depict-sa-tiny", n_cls: int = 6, images: int = 2, seed: int = 0) -> dict:
    """Ours vs the reference protocol on one model: max |Δ probs| (single and multi-scale + flip,
    padded sizes) and the mIoU of ``evaluate`` vs the reference loop."""
    torch.manual_seed(seed)
    model = create_model(variant, n_cls=n_cls).eval()
    data = InMemorySet(synthetic_scenes(images, model.config.backbone.image_size[0] * 15 // 16,
                                        model.config.backbone.image_size[0] * 5 // 4, seed), n_cls)
    protocol = eval_protocol(model, data)
    w = protocol["window"]
    x = model.normalize(image_to_tensor(data.load_raw(0)[0])[None])
    diffs = []
    with torch.inference_mode():
        for kwargs in ({}, {"scales": (0.75, 1.0, 1.3), "flip": True}):
            args = (model, x, w, protocol["stride"])
            ours = predict_probs(*args, **kwargs)
            ref = reference_predict_probs(*args, **kwargs)
            diffs.append((ours - ref).abs().max().item())
    ours_scores = evaluate(model, data, **protocol)
    ref_scores = evaluate_loop(model, data, reference_predict_probs, torch.inference_mode, **protocol)
    return {"probs": max(diffs), "miou": ours_scores["miou"], "ref_miou": ref_scores["miou"]}


def check_analysis(variant: str = "depict-sa-tiny", n_cls: int = 6, images: int = 2, seed: int = 0) -> float:
    """max relative diff of ``analyze_coding_rates`` vs the naive float64 N×N rates."""
    torch.manual_seed(seed)
    model = create_model(variant, n_cls=n_cls).eval()
    batches = analysis_batches(images, model.config.backbone.image_size[0], images, seed)
    ours = analyze_coding_rates(trace_batches(model, batches, progress=False))
    return rates_rel_diff(ours, naive_analysis(model, batches))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def with_literal_decoder(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose decoder is ``benchmarks/decoder.py``'s literal reference (same weights)."""
    twin = copy.deepcopy(model)
    twin.decoder = literal_twin(model.decoder)
    return twin


def bench_variant(variant: str, args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    torch.manual_seed(args.seed)
    model = create_model(variant, n_cls=args.classes).to(device).eval()
    w = model.config.backbone.image_size[0]
    data = InMemorySet(synthetic_scenes(args.images, w * 15 // 16, w * 5 // 4, args.seed), args.classes)
    protocol = eval_protocol(model, data)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    lit_model = with_literal_decoder(model)
    loop = evaluate_loop  # evaluate()'s loop with a swappable predictor / grad mode
    eval_rows = {  # name: (function, the row it is compared with)
        "evaluate()": (lambda: evaluate(model, data, **protocol), None),
        "reference protocol (NCHW)": (
            lambda: loop(model, data, reference_predict_probs, torch.inference_mode, **protocol), "evaluate()"),
        "loop, inference_mode": (lambda: loop(model, data, predict_probs, torch.inference_mode, **protocol), None),
        "loop, no_grad": (lambda: loop(model, data, predict_probs, torch.no_grad, **protocol), "loop, inference_mode"),
        "channels-last backbone": (lambda: evaluate(cl_model, data, **protocol), "evaluate()"),
        "literal decoder": (lambda: evaluate(lit_model, data, **protocol), "evaluate()"),
    }
    times, outs = time_interleaved({k: fn for k, (fn, _) in eval_rows.items()}, args.repeats, device)
    # agreement of the shipped path with the reference protocol on the first image
    x = model.normalize(image_to_tensor(data.load_raw(0)[0])[None].to(device))
    with torch.inference_mode():
        call = (model, x, w, protocol["stride"])
        probs_diff = (predict_probs(*call) - reference_predict_probs(*call)).abs().max().item()
    evals = []
    for name, (med, mn) in times.items():
        base = eval_rows[name][1]
        evals.append({
            "variant": variant, "row": name, "ips": (args.images / med, args.images / mn), "base": base,
            "x": None if base is None else (med / times[base][0], mn / times[base][1]),
            "miou": outs[name]["miou"],
            "note": f"max|Δprobs| {probs_diff:.1e}" if name.startswith("reference") else "",
        })

    size = model.config.backbone.image_size[0]
    batches = analysis_batches(args.images, size, args.batch, args.seed)
    ana_rows = {
        "analyze_coding_rates": lambda: analyze_coding_rates(trace_batches(model, batches, progress=False)),
        "naive float64 N×N": lambda: naive_analysis(model, batches),
        "forward only": lambda: forward_only(model, batches),
    }
    times, outs = time_interleaved(ana_rows, args.repeats, device)
    rel = rates_rel_diff(outs["analyze_coding_rates"], outs["naive float64 N×N"])
    base = "analyze_coding_rates"
    anas = []
    for name, (med, mn) in times.items():
        anas.append({
            "variant": variant, "row": name, "ips": (args.images / med, args.images / mn),
            "base": None if name == base else base,
            "x": None if name == base else (med / times[base][0], mn / times[base][1]),
            "note": f"max rel Δrate {rel:.1e}" if name.startswith("naive") else "",
        })
    return evals, anas


def print_rows(title: str, rows: list[dict], with_miou: bool) -> None:
    print(f"\n{title}")
    head = (f"{'variant':<19} {'path':<27} {'img/s med':>9} {'img/s best':>10} | {'time ÷ base med/min':>19} "
            f"{'base':<22}")
    head += f" {'mIoU':>7}" if with_miou else ""
    print(head + "  note")
    print("-" * (len(head) + 24))
    for r in rows:
        x = "-" if r["x"] is None else f"{r['x'][0]:.2f}/{r['x'][1]:.2f}"
        line = (f"{r['variant']:<19} {r['row']:<27} {r['ips'][0]:>9.2f} {r['ips'][1]:>10.2f} | {x:>19} "
                f"{r['base'] or '':<22}")
        line += f" {r['miou']:>7.4f}" if with_miou else ""
        print(line + ("  " + r["note"] if r["note"] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i")
    ap.add_argument("--backbone", "--size", choices=("t", "s"), default="t",
                    help="ViT-T/16 (CPU default) or ViT-S/16 variants, next to the *-tiny ones")
    ap.add_argument("--variants", nargs="+", help="registry variants (default: tiny + vit-<backbone>16 of each family)")
    ap.add_argument("--images", type=int, default=4, help="images per evaluation / analysis round")
    ap.add_argument("--batch", type=int, default=8, help="analysis batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--classes", type=int, default=150, help="K")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants or [f"{f}-tiny" for f in FAMILIES] + [f"{f}-vit-{args.backbone}16" for f in FAMILIES]
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} | K={args.classes}, "
          f"{args.images} images per round, repeats={args.repeats} | "
          "'time ÷ base' > 1: the row is slower than its base")
    evals, anas = [], []
    for variant in variants:
        e, a = bench_variant(variant, args, device)
        evals += e
        anas += a
    print_rows("evaluation: sliding window, single scale (scenes 15/16 × 5/4 of the window, enlarged to it)",
               evals, True)
    print_rows("analysis: trace + coding rates (square scenes of the training size)", anas, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
