"""Benchmark: our DEPICT-SA / DEPICT-CA / Segmenter decoders vs literal reference implementations.

For each decoder the same weights (``load_state_dict`` of ours, strict, so the parameter layout
is checked too) run through

- ``ours``: ``depict_analysis.models.decoders`` (``F.scaled_dot_product_attention``, heads split by views);
- ``literal``: the operators written the way a researcher transcribes them from the paper —
  float32, explicit attention matrices ``softmax(Q Kᵀ / √p)`` of shape (B, h, T, S) built with
  reshapes/permutes, an explicit ``A @ V``, no fused kernels (the CRATE / Segmenter style);
- ``literal, per-head loop`` (skip with ``--no-loop``): the SPEC formula read literally,
  ``X + η Σ_k P_k softmax(...)``, one matmul chain per head in a Python loop.

Both references compute W = LN(X) Pᵀ once for MSSA (q = k = v), as anyone would; nothing in them
is deliberately slow. Sizes: ``--backbone t`` (ViT-T/16, d = 192, the CPU default) or ``s``
(ViT-S/16, d = 384, the paper size), a 512² image -> N = 1024 patch tokens, K = 150 classes,
batch 8, the registry's decoder hyper-parameters (DEPICT: 3 MSSA layers, 3 heads × 100; CA adds
3 MSCA layers × 3 heads × 50; Segmenter: 2 ViT blocks, d/64 heads, MLP 4d).

Weights are random (``--seed``) with LayerNorm affines perturbed and class embeddings drawn with
std 1 (distinct classes, as after training; see ``trained_like``). Decoders are in eval mode
(dropout off) so that outputs are deterministic and comparable; the forward+backward pass
back-propagates a fixed random cotangent of the masks into the decoder input and every parameter
(``masks.sum()`` would give LayerNorm-over-K zero gradients).

Measured:
- time: one warm-up call each, then ``--repeats`` rounds calling every implementation once in
  turn (load drifting on a shared machine hits all alike); median and min per implementation.
  Forward runs under ``torch.inference_mode`` (as evaluation and the analyses do).
- peak memory: the extra memory one call needs beyond its inputs and weights. On CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call. On the CPU,
  PyTorch keeps no allocator statistics and ``tracemalloc`` does not see tensor memory, so the call
  is run once under ``torch.profiler`` with ``profile_memory=True``: the profiler records every
  allocation and free of PyTorch's CPU allocator with a timestamp, and the peak of their running
  sum is the largest amount of tensor memory alive at once during the call. This is exact for
  tensors (outputs, saved activations, gradients, temporaries, kernels' tensor workspaces); it
  does not see BLAS-internal packing buffers (a few MB, alike for both sides). ``--rss`` adds a
  cross-check that is independent of PyTorch: every (decoder, implementation, pass) runs once in
  a fresh subprocess and reports the growth of the process's peak resident set size (``VmHWM``,
  reset just before the call) over its resident size — coarser (page granularity, allocator
  caching, thread stacks), but it sees everything the process touches.
- agreement: max |ours − literal| of the masks (float32; the check is ≤ ``--tol``, default 1e-5),
  and, for forward+backward, max |Δ grad| / max |grad| over the input and all parameters. Each side
  is also compared with the literal reference run in float64 (``vs f64``).

On a CPU shared with other jobs pass ``--threads 1``: OpenMP threads that wait on a core another
process holds make multi-threaded timings erratic (tens of times slower, in both columns).

On CUDA, bf16 autocast rows and ``torch.compile`` rows are added (ours vs literal in the same
mode; the diff columns are then against the float32 literal and not checked against ``--tol``).

Usage::

    python benchmarks/decoder.py --threads 1               # ViT-T sizes, CPU
    python benchmarks/decoder.py --backbone s --repeats 7  # ViT-S/16, the paper size
    python benchmarks/decoder.py --device cuda             # + bf16 autocast and torch.compile rows
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depict_analysis.models.registry import build_decoder, variant_config  # noqa: E402

DECODERS = {"depict-sa": "DEPICT-SA", "depict-ca": "DEPICT-CA", "segmenter": "Segmenter"}
BACKBONES = {"t": "vit-t16", "s": "vit-s16"}


# --------------------------------------------------------------------------------------------
# literal references (same parameter names as ours, so ours' state dict loads strictly)
# --------------------------------------------------------------------------------------------


def literal_mask_head(patches: Tensor, classes: Tensor, mask_norm: nn.LayerNorm, grid) -> Tensor:
    """M = LN_K(Ẑ Q̂ᵀ) with explicit L2 normalisation; (B, N, d), (B, K, d) -> (B, K, h, w)."""
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
    B, N, K = masks.shape
    return masks.transpose(1, 2).reshape(B, K, grid[0], grid[1])


class LiteralSubspaceLayer(nn.Module):
    """MSSA / MSCA written out: explicit (B, h, T, S) attention, or a per-head loop."""

    def __init__(self, dim: int, heads: int, dim_head: int, loop: bool):
        super().__init__()
        self.heads, self.dim_head, self.loop = heads, dim_head, loop
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Parameter(torch.empty(heads * dim_head, dim))
        self.step_size = nn.Parameter(torch.empty(1))

    def attend(self, queries: Tensor, keys: Tensor) -> Tensor:
        """η · merge(softmax(V Wᵀ/√p) W) proj, V = queries projᵀ, W = keys projᵀ (keys = values)."""
        h, p = self.heads, self.dim_head
        if self.loop:  # X + η Σ_k P_k softmax((P_kᵀ Q)ᵀ (P_kᵀ Z) / √p) ..., head by head
            out = torch.zeros_like(queries)
            for k in range(h):
                P_k = self.proj[k * p : (k + 1) * p]  # (p, d): rows = the head's basis
                W = keys @ P_k.T
                V = W if keys is queries else queries @ P_k.T
                A = torch.softmax(V @ W.transpose(1, 2) / math.sqrt(p), dim=-1)
                out = out + (A @ W) @ P_k
            return self.step_size * out
        B, T, _ = queries.shape
        S = keys.shape[1]
        W = (keys @ self.proj.T).reshape(B, S, h, p).permute(0, 2, 1, 3)  # (B, h, S, p)
        V = W if keys is queries else (queries @ self.proj.T).reshape(B, T, h, p).permute(0, 2, 1, 3)
        A = torch.softmax(V @ W.transpose(-2, -1) / math.sqrt(p), dim=-1)  # (B, h, T, S)
        out = (A @ W).permute(0, 2, 1, 3).reshape(B, T, h * p)
        return self.step_size * (out @ self.proj)


class LiteralMSSA(LiteralSubspaceLayer):
    def forward(self, x: Tensor) -> Tensor:
        x_hat = self.norm(x)
        return x + self.attend(x_hat, x_hat)


class LiteralMSCA(LiteralSubspaceLayer):
    def forward(self, q: Tensor, z: Tensor) -> Tensor:
        return q + self.attend(q, self.norm(z))


class LiteralDepictSA(nn.Module):
    def __init__(self, dim: int, n_cls: int, n_layers: int, heads: int, dim_head: int, loop: bool):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        self.layers = nn.ModuleList(LiteralMSSA(dim, heads, dim_head, loop) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def forward(self, z: Tensor, grid) -> Tensor:
        x = torch.cat([z, self.cls_emb.expand(z.shape[0], -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        return literal_mask_head(x[:, : -self.n_cls], x[:, -self.n_cls :], self.mask_norm, grid)


class LiteralDepictCA(nn.Module):
    def __init__(self, dim, n_cls, n_layers, heads, dim_head, n_cross_layers, cross_dim_head, loop):
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        self.self_layers = nn.ModuleList(LiteralMSSA(dim, heads, dim_head, loop) for _ in range(n_layers))
        self.cross_layers = nn.ModuleList(
            LiteralMSCA(dim, heads, cross_dim_head, loop) for _ in range(n_cross_layers)
        )
        self.snorm = nn.LayerNorm(dim, eps=1e-5)
        self.cnorm = nn.LayerNorm(dim, eps=1e-5)
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def forward(self, z: Tensor, grid) -> Tensor:
        for layer in self.self_layers:
            z = layer(z)
        z = self.snorm(z)
        q = self.cls_emb.expand(z.shape[0], -1, -1)
        for layer in self.cross_layers:
            q = layer(q, z)
        return literal_mask_head(z, self.cnorm(q), self.mask_norm, grid)


class LiteralAttention(nn.Module):
    """Multi-head self-attention with an explicit (B, h, T, T) attention matrix (or a head loop)."""

    def __init__(self, dim: int, heads: int, loop: bool):
        super().__init__()
        self.heads, self.loop = heads, loop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        h, p = self.heads, d // self.heads
        q, k, v = self.qkv(x).reshape(B, T, 3, h, p).permute(2, 0, 3, 1, 4)  # each (B, h, T, p)
        if self.loop:
            out = torch.cat(
                [torch.softmax(q[:, i] @ k[:, i].transpose(1, 2) / math.sqrt(p), dim=-1) @ v[:, i] for i in range(h)],
                dim=-1,
            )  # (B, T, h·p), heads side by side
        else:
            A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(p), dim=-1)
            out = (A @ v).transpose(1, 2).reshape(B, T, d)
        return self.proj(out)


class LiteralMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LiteralBlock(nn.Module):
    def __init__(self, dim: int, heads: int, loop: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn = LiteralAttention(dim, heads, loop)
        self.mlp = LiteralMlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LiteralMaskTransformer(nn.Module):
    def __init__(self, dim_encoder: int, n_cls: int, dim: int, n_layers: int, heads: int, loop: bool):
        super().__init__()
        self.n_cls = n_cls
        self.proj_dec = nn.Linear(dim_encoder, dim)
        self.cls_emb = nn.Parameter(torch.empty(1, n_cls, dim))
        self.blocks = nn.ModuleList(LiteralBlock(dim, heads, loop) for _ in range(n_layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj_patch = nn.Parameter(torch.empty(dim, dim))
        self.proj_classes = nn.Parameter(torch.empty(dim, dim))
        self.mask_norm = nn.LayerNorm(n_cls, eps=1e-5)

    def forward(self, z: Tensor, grid) -> Tensor:
        x = torch.cat([self.proj_dec(z), self.cls_emb.expand(z.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.n_cls] @ self.proj_patch, x[:, -self.n_cls :] @ self.proj_classes
        return literal_mask_head(patches, classes, self.mask_norm, grid)


def literal_twin(decoder: nn.Module, loop: bool = False) -> nn.Module:
    """A literal reference with ``decoder``'s hyper-parameters and a copy of its weights (strict)."""
    from depict_analysis.models.decoders.depict import DepictCA, DepictSA
    from depict_analysis.models.decoders.mask_transformer import MaskTransformer

    if isinstance(decoder, DepictSA):
        first = decoder.layers[0]
        twin = LiteralDepictSA(
            first.proj.shape[1], decoder.n_cls, len(decoder.layers), first.heads, first.dim_head, loop
        )
    elif isinstance(decoder, DepictCA):
        s, c = decoder.self_layers[0], decoder.cross_layers[0]
        twin = LiteralDepictCA(
            s.proj.shape[1], decoder.n_cls, len(decoder.self_layers), s.heads, s.dim_head,
            len(decoder.cross_layers), c.dim_head, loop,
        )
    elif isinstance(decoder, MaskTransformer):
        block = decoder.blocks[0]
        twin = LiteralMaskTransformer(
            decoder.proj_dec.in_features, decoder.n_cls, decoder.proj_dec.out_features,
            len(decoder.blocks), block.attn.num_heads, loop,
        )
    else:
        raise TypeError(f"no literal reference for {type(decoder).__name__}")
    twin.load_state_dict(decoder.state_dict(), strict=True)
    return twin.to(next(decoder.parameters()).device).train(decoder.training)


def make_decoder(name: str, backbone: str, n_cls: int, device: torch.device, seed: int = 0) -> nn.Module:
    """Our decoder of registry variant ``<name>-<backbone>``, random weights (``seed``), eval mode."""
    config = variant_config(f"{name}-{backbone}", n_cls)
    torch.manual_seed(seed)
    decoder = build_decoder(config.decoder, config.backbone.d_model, n_cls)
    return trained_like(decoder).to(device).eval()


def trained_like(decoder: nn.Module) -> nn.Module:
    """``decoder`` with LayerNorm affines perturbed and class embeddings drawn with std 1, in place
    (from the global torch RNG)."""
    with torch.no_grad():
        for module in decoder.modules():  # non-trivial LayerNorm affines, so that a mix-up would show
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        # Distinct classes, as after training. At init (std 0.02) the K class embeddings are nearly
        # equal, so are the K mask scores of a pixel, and the LayerNorm over K (mask_norm) divides
        # by their tiny spread: float32 rounding is then amplified to ~1e-4 in *any* implementation
        # (both sides differ from float64 alike), which would hide what this benchmark compares.
        decoder.cls_emb.normal_(0.0, 1.0)
    return decoder


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_fn(decoder: nn.Module, z: Tensor, grid, ctx: Callable = nullcontext) -> Callable[[], Tensor]:
    """Inference: masks under ``torch.inference_mode``."""

    def run() -> Tensor:
        with torch.inference_mode(), ctx():
            return decoder(z, grid)

    return run


def train_fn(decoder: nn.Module, z: Tensor, grid, cotangent: Tensor, ctx: Callable = nullcontext):
    """Forward + backward of a fixed cotangent into z and every parameter; returns (masks, grads)."""
    z = z.detach().requires_grad_(True)
    params = {name: p for name, p in decoder.named_parameters() if p.requires_grad}

    def reset() -> None:  # drop the previous call's gradients
        z.grad = None
        for p in params.values():
            p.grad = None

    def run() -> tuple[Tensor, dict[str, Tensor]]:
        reset()
        with ctx():
            masks = decoder(z, grid)
        masks.backward(cotangent.to(masks.dtype))
        return masks.detach(), {"input": z.grad, **{name: p.grad for name, p in params.items()}}

    run.reset = reset  # peak_memory() calls it first, so that freeing old gradients is not counted
    return run


def time_interleaved(fns: dict[str, Callable], repeats: int, device: torch.device):
    """(median, min) seconds per name, and each function's warm-up output.

    One warm-up call each, then ``repeats`` rounds that call every function once in turn.
    """

    def once(fn: Callable):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - start, out

    outputs = {name: once(fn)[1] for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn)[0])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}, outputs


def peak_memory(fn: Callable, device: torch.device) -> int:
    """Bytes: the most memory alive at once during ``fn()`` beyond what was allocated before it.

    CUDA: ``max_memory_allocated``. CPU: the running sum of the allocation/free events that
    ``torch.profiler(profile_memory=True)`` records (see the module docstring).
    """
    if hasattr(fn, "reset"):
        fn.reset()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def rss_peak(args: argparse.Namespace, decoder: str, impl: str, mode: str) -> int | None:
    """Peak resident-set growth of one call, in a fresh subprocess (Linux; None if unavailable).

    Not ``ru_maxrss``: Linux carries the parent's high-water mark into a forked child. The child
    resets its own mark (``/proc/self/clear_refs``) just before the call and reads ``VmHWM`` after.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", json.dumps(
        {"decoder": decoder, "impl": impl, "mode": mode, "backbone": args.backbone, "batch": args.batch,
         "image_size": args.image_size, "classes": args.classes, "seed": args.seed,
         "threads": torch.get_num_threads()})]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
        return int(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _rss_child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    ours = make_decoder(spec["decoder"], BACKBONES[spec["backbone"]], spec["classes"], device, spec["seed"])
    model = ours if spec["impl"] == "ours" else literal_twin(ours, loop=spec["impl"] == "loop")
    z, grid, cotangent = make_inputs(ours, spec["batch"], spec["image_size"], spec["classes"], device)
    fn = forward_fn(model, z, grid) if spec["mode"] == "forward" else train_fn(model, z, grid, cotangent)
    before = _status_bytes("VmRSS")
    try:  # reset the high-water mark to the current resident size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM also holds the setup's peak: the delta can only over-state
    fn()
    print(max(0, _status_bytes("VmHWM") - before))


def make_inputs(decoder: nn.Module, batch: int, image_size: int, n_cls: int, device: torch.device, seed: int = 1):
    """Decoder input Z_0 (B, N, d_enc) like a backbone's (post-LN, unit-scale), its grid, a cotangent."""
    side = image_size // 16
    d = decoder.proj_dec.in_features if hasattr(decoder, "proj_dec") else decoder.cls_emb.shape[-1]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, side * side, d, generator=g).to(device)
    cotangent = torch.randn(batch, n_cls, side, side, generator=g).to(device)
    return z, (side, side), cotangent


def max_abs(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def grad_rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max over the input and every parameter (matched by name) of max |a − b| / max |b|."""
    assert a.keys() == b.keys(), "the implementations differ in their parameters"
    return max(max_abs(a[k], b[k]) / max(b[k].abs().max().item(), 1e-30) for k in b)


def check_decoder(name: str, backbone: str = "tiny", batch: int = 2, image_size: int = 64, n_cls: int = 6,
                  loop: bool = False, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float]:
    """Correctness only (no timing): ours vs its literal twin, forward and gradients, float32.

    Returns ``{"forward": max |Δ masks|, "grad": max relative grad diff, "f64": max |ours − literal f64|}``.
    """
    device = torch.device(device)
    ours = make_decoder(name, backbone, n_cls, device, seed)
    lit = literal_twin(ours, loop)
    z, grid, cotangent = make_inputs(ours, batch, image_size, n_cls, device)
    m_ours, g_ours = train_fn(ours, z, grid, cotangent)()
    m_lit, g_lit = train_fn(lit, z, grid, cotangent)()
    lit64 = literal_twin(ours, loop).double()
    with torch.no_grad():
        m64 = lit64(z.double(), grid)
    return {
        "forward": max_abs(forward_fn(ours, z, grid)(), forward_fn(lit, z, grid)()),
        "train_forward": max_abs(m_ours, m_lit),
        "grad": grad_rel_diff(g_ours, g_lit),
        "f64": max_abs(m_ours, m64),
    }


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _modes(device: torch.device, compile_rows: bool) -> list[tuple[str, Callable, Callable[[nn.Module], nn.Module]]]:
    """(label, autocast context, module wrapper) for each precision / compilation mode."""
    modes = [("fp32", nullcontext, lambda m: m)]
    if device.type == "cuda":
        modes.append(("bf16 autocast", lambda: torch.autocast("cuda", dtype=torch.bfloat16), lambda m: m))
    if compile_rows:
        modes.append(("compiled", nullcontext, torch.compile))
    return modes


def bench_decoder(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    ours = make_decoder(name, BACKBONES[args.backbone], args.classes, device, args.seed)
    impls = {"ours": ours, "literal": literal_twin(ours)}
    if args.loop:
        impls["loop"] = literal_twin(ours, loop=True)
    z, grid, cotangent = make_inputs(ours, args.batch, args.image_size, args.classes, device)
    with torch.no_grad():
        ref64 = literal_twin(ours).double()(z.double(), grid)
    rows = []
    ref = ref_grads = None  # the float32 literal reference's masks and gradients
    for mode, ctx, wrap in _modes(device, args.compile):
        models = {k: wrap(m) for k, m in impls.items()}
        fwd = {k: forward_fn(m, z, grid, ctx) for k, m in models.items()}
        trn = {k: train_fn(m, z, grid, cotangent, ctx) for k, m in models.items()}
        t_fwd, out_fwd = time_interleaved(fwd, args.repeats, device)
        t_trn, out_trn = time_interleaved(trn, args.repeats, device)
        m_fwd = {k: peak_memory(fn, device) for k, fn in fwd.items()}
        m_trn = {k: peak_memory(fn, device) for k, fn in trn.items()}
        if mode == "fp32":
            ref, ref_grads = out_fwd["literal"], out_trn["literal"][1]
        for k in models:
            row = {
                "decoder": DECODERS[name], "mode": mode, "impl": k,
                "fwd": t_fwd[k], "trn": t_trn[k], "mem_fwd": m_fwd[k], "mem_trn": m_trn[k],
                "diff": max_abs(out_fwd[k], ref), "grad": grad_rel_diff(out_trn[k][1], ref_grads),
                "f64": max_abs(out_fwd[k], ref64),
            }
            if args.rss and mode == "fp32" and device.type == "cpu":
                row["rss_fwd"] = rss_peak(args, name, k, "forward")
                row["rss_trn"] = rss_peak(args, name, k, "train")
            rows.append(row)
        # speed-ups of ours over each reference in this mode (same run, same inputs)
        base = next(r for r in rows if r["mode"] == mode and r["impl"] == "ours")
        for r in rows:
            if r["mode"] == mode:
                r["x_fwd"] = (r["fwd"][0] / base["fwd"][0], r["fwd"][1] / base["fwd"][1])
                r["x_trn"] = (r["trn"][0] / base["trn"][0], r["trn"][1] / base["trn"][1])
                r["x_mem_fwd"] = r["mem_fwd"] / max(base["mem_fwd"], 1)
                r["x_mem_trn"] = r["mem_trn"] / max(base["mem_trn"], 1)
    return rows


IMPL_NAMES = {"ours": "ours (SDPA)", "literal": "literal (explicit A)", "loop": "literal (per-head loop)"}


def print_table(rows: list[dict], tol: float) -> bool:
    """Print the table; returns whether every float32 row agrees within ``tol``."""
    mib = 2.0**20
    head = (
        f"{'decoder':<9} {'mode':<13} {'implementation':<23} | {'fwd ms med/min':>15} {'ours x':>11} | "
        f"{'f+b ms med/min':>15} {'ours x':>11} | {'peak MiB fwd/f+b':>17} {'mem ÷ ours':>11} | "
        f"{'max|Δ| fwd':>10} {'Δgrad rel':>9} {'vs f64':>8}"
    )
    print(head)
    print("-" * len(head))
    ok = True
    for r in rows:
        x_f = "-" if r["impl"] == "ours" else f"{r['x_fwd'][0]:.2f}/{r['x_fwd'][1]:.2f}"
        x_t = "-" if r["impl"] == "ours" else f"{r['x_trn'][0]:.2f}/{r['x_trn'][1]:.2f}"
        x_m = "-" if r["impl"] == "ours" else f"{r['x_mem_fwd']:.1f}/{r['x_mem_trn']:.1f}"
        diff = "ref" if (r["impl"] == "literal" and r["mode"] == "fp32") else f"{r['diff']:.1e}"
        grad = "ref" if (r["impl"] == "literal" and r["mode"] == "fp32") else f"{r['grad']:.1e}"
        line = (
            f"{r['decoder']:<9} {r['mode']:<13} {IMPL_NAMES[r['impl']]:<23} | "
            f"{r['fwd'][0] * 1e3:>7.1f}/{r['fwd'][1] * 1e3:<7.1f} {x_f:>11} | "
            f"{r['trn'][0] * 1e3:>7.1f}/{r['trn'][1] * 1e3:<7.1f} {x_t:>11} | "
            f"{r['mem_fwd'] / mib:>8.1f}/{r['mem_trn'] / mib:<8.1f} {x_m:>11} | "
            f"{diff:>10} {grad:>9} {r['f64']:>8.1e}"
        )
        if "rss_fwd" in r:
            fmt = lambda v: "n/a" if v is None else f"{v / mib:.0f}"  # noqa: E731
            line += f"  (RSS MiB {fmt(r['rss_fwd'])}/{fmt(r['rss_trn'])})"
        print(line)
        if r["mode"] == "fp32" and r["diff"] > tol:
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:i")
    ap.add_argument("--backbone", "--size", choices=sorted(BACKBONES), default="t",
                    help="t: ViT-T/16 (d = 192, CPU default); s: ViT-S/16 (d = 384, the paper size)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=512, help="N = (size/16)²")
    ap.add_argument("--classes", type=int, default=150, help="K")
    ap.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=list(DECODERS))
    ap.add_argument("--no-loop", dest="loop", action="store_false", help="skip the per-head-loop reference")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile rows (default: on for CUDA, off for CPU)")
    ap.add_argument("--rss", action="store_true", help="CPU: cross-check peak memory with peak-RSS subprocesses")
    ap.add_argument("--tol", type=float, default=1e-5, help="max |ours − literal| allowed (float32)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        _rss_child(json.loads(args.rss_child))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda"
    side = args.image_size // 16
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} | backbone "
        f"{BACKBONES[args.backbone]}, B={args.batch}, N={side * side}, K={args.classes}, repeats={args.repeats} | "
        "'ours x' = reference time / ours (median/min; > 1: ours faster), 'mem ÷ ours' = reference peak / ours"
    )
    rows = []
    for name in args.decoders:
        rows += bench_decoder(name, args, device)
    ok = print_table(rows, args.tol)
    print(f"agreement (float32, max |ours − literal| ≤ {args.tol:g}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
