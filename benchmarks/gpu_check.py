"""Device check: the GPU path proven in one command, written to one JSON file and a short table.

Built for a rare, short loan of a GPU (one H100 / H200, minutes): it must run unattended, end in
time and keep what it measured if the machine goes away. Each section runs under try/except (an
error becomes a string in the JSON and the next section still runs), and so does each row inside a
section; the JSON is rewritten atomically after every row. No section or row starts after
``--budget`` seconds (default 420: with start-up and the last row, under 8 minutes on one H100), a
section starts no row after its own cap (``CAPS``), and a compiled row starts only with
``compile_row_s`` (60 s) left. ``--smoke`` runs the same code at tiny sizes on the CPU in under a
minute (``tests/test_gpu_check.py``), so the script is known to work before any device call.

Models: registry variants ``<family>-vit-s16`` (``*-tiny`` with ``--smoke``), 512² images (the
variant's training size), K = 150 (ADE20K's K), random weights from ``--seed`` with
the decoder made ``trained_like`` (distinct class embeddings: at init the K mask scores of a pixel
are nearly equal and the LayerNorm over K would amplify rounding into argmax flips). Images are
the procedural synthetic scenes (``depict_analysis.models.data.synthetic``), rendered once and held
in memory; labels 0..7 are valid class ids.

Row status: ``ok``; ``failed`` (it ran, but a check it makes did not hold: ``failures`` says which);
``error`` (an exception, in ``error``); ``skipped: time budget``. A section is ``error`` or
``failed`` if a row is, ``partial`` if a row was skipped.

Sections, in order (the expensive, least certain one last):

1. ``correctness``: DEPICT-SA, DEPICT-CA and Segmenter on the same weights and images: the device's
   float32 forward (TF32 off; and with torch's default TF32 flags) and its bf16-autocast forward
   against the CPU float32 forward: max |Δ logits|, max |Δ| / max |logits|, argmax agreement. The
   SDPA kernel each attention layer of the decoder actually ran (forward and backward, float32 and
   bf16), read from ``torch.profiler`` op names (flash / memory-efficient / cudnn / math), and which
   backends accept the layer's shapes when forced one at a time (``sdpa_kernel``), with torch's
   reasons for refusing. MSSA's head width p = 100 and MSCA's p = 50 are not multiples of 8,
   which fused kernels require or pad to: the check reports what torch chose.
2. ``training``: DEPICT-SA and Segmenter, our decoder and ``benchmarks/decoder.py``'s literal
   reference decoder (explicit attention matrices, same weights) on the same backbone, in float32
   and bf16 autocast: training steps (forward, cross-entropy, backward, the recipe's Nesterov SGD
   step; train mode, so Segmenter's decoder dropout runs, which the literal twin lacks) on one
   batch of ``batch`` 512² crops: images/s over ``steps`` timed steps after ``warmup`` steps, and
   peak allocated GPU memory (weights, gradients, optimizer state and activations; CUDA only).
   Pairs run back to back; each ours row gets the ratios ours ÷ literal (speed) and literal ÷ ours
   (memory).
3. ``evaluation``: ``evaluate()`` (the paper's protocol: short side → window, sliding windows)
   on 512 × 683 scenes, single-scale and multi-scale (0.5–1.75 with flips), images/s, at
   ``evaluate()``'s own precision.
4. ``analyses``: ``analyze_coding_rates``, ``analyze_pca`` and a decoder-noise robustness sweep
   (``robustness_records``, the 13 default σ × 3 draws) on 64 scenes of 512², DEPICT-SA: seconds each.
5. ``paper_sweep``: the paper's figure at dataset scale: the paper-preset sweep (``PAPER_SIGMAS``,
   20 σ × 3 draws of absolute Gaussian noise on every decoder parameter) on the evaluation
   protocol (``EvaluationImages``: sliding windows, merged logits; σ = 0 is ``depict eval``) over
   512 × 683 scenes (ADE20K's shape after its test resize), DEPICT-SA and Segmenter, image after
   image until ``sweep_images`` or the section's time is up; images/s, and the full figure (2,000
   ADE20K validation images, 4 models) projected from the mean seconds per image. Goal: ≤ 10
   minutes on one H100.
6. ``short_run``: ``train()`` on the synthetic dataset (DEPICT-SA, crop 512 from 256-px scenes,
   AdamW with warm-up) stopped part-way (``stop_after``), then resumed from its checkpoint to the
   end; it fails unless the first part stopped where asked, the resumed run completed at
   ``iterations`` and the last logged loss is below the first. Run folder: a temporary
   directory, deleted afterwards.
7. ``training_compiled``: section 2's rows in bf16 autocast + ``torch.compile`` (Inductor on the
   device; ``--smoke`` uses Dynamo's ``eager`` backend: the model is traced and its graphs run
   as they are, since code generation on a CPU takes minutes and even ``aot_eager`` doubles the
   smoke run). The first step's time (compilation) is recorded separately.

Usage::

    python benchmarks/gpu_check.py --out gpu_check.json          # the device run (CUDA if present)
    # on a bare machine whose python has the dependencies (torch, timm, ...), from the repository root:
    #   python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 \
    #   python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json --commit <sha>
    python benchmarks/gpu_check.py --smoke --device cpu --out smoke.json   # tiny sizes, CPU, < 1 minute
    python benchmarks/gpu_check.py --markdown gpu_check.json     # the README table from a JSON
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decoder import sync, trained_like  # noqa: E402
from benchmarks.inference import InMemorySet, analysis_batches, synthetic_scenes, with_literal_decoder  # noqa: E402
from depict_analysis.coding_rate_analysis import analyze_coding_rates  # noqa: E402
from depict_analysis.outputs import save_json  # noqa: E402
from depict_analysis.pca_analysis import analyze_pca  # noqa: E402
from depict_analysis.perturbations import PAPER_SIGMAS, resolve_perturbation  # noqa: E402
from depict_analysis.robustness import EvaluationImages, ModelSweep, robustness_records  # noqa: E402
from depict_analysis.tracing import trace_batches  # noqa: E402
from depict_analysis.models import create_model, variant_config  # noqa: E402
from depict_analysis.models.data import IGNORE_INDEX  # noqa: E402
from depict_analysis.foundation.device import resolve_device  # noqa: E402
from depict_analysis.models.evaluate import MULTISCALE_RATIOS, evaluate  # noqa: E402
from depict_analysis.models.segmentor import Segmentor  # noqa: E402
from depict_analysis.models.train import TrainConfig, build_optimizer, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"depict-sa": "DEPICT-SA", "depict-ca": "DEPICT-CA", "segmenter": "Segmenter"}
TRAINED_FAMILIES = ("depict-sa", "segmenter")  # sections 2 and 6
COMPILED = "bf16 + compile"


@dataclass(frozen=True)
class Sizes:
    """What each section runs on; ``PAPER`` on the device, ``SMOKE`` on the CPU."""

    backbone: str  # registry backbone of every variant
    classes: int = 150
    correctness_images: int = 2
    batch: int = 8  # training images per step (sections 2, 5, 6)
    warmup: int = 3  # untimed training steps per row (the first one compiles)
    steps: int = 20  # timed training steps per row
    eval_images: int = 32  # single-scale
    multiscale_images: int = 8
    analysis_images: int = 64
    analysis_batch: int = 8
    draws: int = 3
    sweep_images: int = 300  # section 5: at most this many images per model
    run_iterations: int = 300
    run_stop: int = 150  # the first part of the short run stops here; the resume goes on to run_iterations
    run_scene: int = 256  # side of the synthetic scenes the short run crops from
    run_lr: float = 5e-4
    run_warmup: int = 30
    run_log_every: int = 25
    run_eval_images: int = 16
    run_workers: int = max(1, min(8, (os.cpu_count() or 2) - 2))
    compile_row_s: float = 60.0  # a compiled row starts only with this much of the budget left


PAPER = Sizes("vit-s16")
SMOKE = Sizes("tiny", batch=2, warmup=1, steps=2, eval_images=2, multiscale_images=1, analysis_images=3,
              analysis_batch=2, sweep_images=2, run_iterations=40, run_stop=20, run_scene=32, run_lr=2e-3, run_warmup=5,
              run_log_every=5, run_eval_images=2, run_workers=0, compile_row_s=0.0)

# Seconds a section may start rows for (the whole run also stops at --budget); None: what is left.
CAPS = {"correctness": 60, "training": 90, "evaluation": 60, "analyses": 90, "paper_sweep": 90, "short_run": 120,
        "training_compiled": None}
# The paper's figure: ADE20K's validation split, four models (DEPICT-S, Segmenter-S and two more).
FIGURE_IMAGES, FIGURE_MODELS = 2000, 4

# SDPA kernels as torch names their ops (aten::_scaled_dot_product_<key>...), forward and backward.
SDPA_KERNELS = {"flash": "flash_attention", "memory-efficient": "efficient_attention", "cudnn": "cudnn_attention",
                "math": "attention_math", "overrideable": "fused_attention_overrideable"}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "memory-efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


# --------------------------------------------------------------------------------------------
# the run: budget, JSON document, guarded rows
# --------------------------------------------------------------------------------------------


def error_text(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".strip()


def free_memory(device: torch.device) -> None:
    """Return the last row's GPU memory (cycles included) to the device, so that the next row's peak is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class Run:
    """One device check: its settings, the JSON document (``data``) and the clock.

    ``deadline`` is the time (``time.perf_counter``) after which the current section starts no row.
    """

    def __init__(self, out: Path, device: torch.device, sizes: Sizes, seed: int, compile_backend: str, budget: float,
                 commit: str | None = None):
        self.out, self.device, self.sizes, self.seed = out, device, sizes, seed
        self.compile_backend = compile_backend
        self.start = time.perf_counter()
        self.end = self.start + budget
        self.deadline = self.end
        self.data: dict[str, Any] = {
            "settings": {"device": str(device), "sizes": asdict(sizes), "seed": seed,
                         "compile_backend": compile_backend, "budget_s": budget,
                         "image_size": variant_config(f"depict-sa-{sizes.backbone}").backbone.image_size[0]},
            "environment": environment(device) | ({"git_commit": commit} if commit else {}),
            "sections": {},
            "complete": False,
            "seconds": 0.0,
        }

    def save(self) -> None:
        self.data["seconds"] = time.perf_counter() - self.start
        save_json(self.out, self.data)

    def section(self, name: str, fn: Callable[["Run", dict], None]) -> None:
        """Run ``fn(run, section)``; record its status, error and seconds whatever happens."""
        section: dict[str, Any] = {"status": "running", "error": None, "seconds": None, "rows": []}
        self.data["sections"][name] = section
        now = time.perf_counter()
        if now >= self.end:
            section["status"] = "skipped: time budget"
            self.save()
            return
        cap = CAPS.get(name)
        self.deadline = self.end if cap is None else min(self.end, now + cap)
        self.save()
        try:
            fn(self, section)
            statuses = [row["status"] for row in section["rows"]]
            section["status"] = next((s for s in ("error", "failed") if s in statuses),
                                     "partial" if any(s.startswith("skipped") for s in statuses) else "ok")
        except Exception as e:  # noqa: BLE001 - a device session is precious: record and go on
            section["status"], section["error"] = "error", error_text(e)
            section["traceback"] = traceback.format_exc().splitlines()[-12:]
        finally:
            section["seconds"] = time.perf_counter() - now
            free_memory(self.device)
            self.save()

    def row(self, section: dict, row: dict, measure: Callable[[], dict], needs: float = 0.0) -> dict:
        """Append ``row`` updated with ``measure()`` (``failed`` if it lists ``failures``), or with the
        error it raised, or skipped when fewer than ``needs`` seconds are left before the deadline."""
        if self.deadline - time.perf_counter() <= needs:
            row["status"] = "skipped: time budget"
        else:
            try:
                row.update(measure())
                row["status"] = "failed" if row.get("failures") else "ok"
            except Exception as e:  # noqa: BLE001
                row["status"], row["error"] = "error", error_text(e)
                row["traceback"] = traceback.format_exc().splitlines()[-8:]
            finally:
                free_memory(self.device)
        section["rows"].append(row)
        self.save()
        return row

    def variant(self, family: str) -> str:
        return f"{family}-{self.sizes.backbone}"

    def image_size(self, family: str) -> int:
        """The variant's training size: the side of its square crops, its sliding window."""
        return variant_config(self.variant(family)).backbone.image_size[0]

    def model(self, family: str) -> Segmentor:
        """The family's variant with random weights from the seed and a ``trained_like`` decoder (CPU)."""
        torch.manual_seed(self.seed)
        model = create_model(self.variant(family), n_cls=self.sizes.classes)
        trained_like(model.decoder)
        return model


def environment(device: torch.device) -> dict:
    """Versions, the device and the float32 settings every number depends on."""
    import timm

    env = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "timm": timm.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
        "device": str(device), "device_name": cpu_name(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
                "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])}
    return env


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _command(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """HEAD of the repository this script is in, ``+dirty`` with uncommitted changes; None without git."""
    commit = _command(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if commit and _command(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return commit


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def bf16(device: torch.device):
    """bf16 autocast on ``device`` (CPU autocast too: the smoke run exercises the real thing)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@functools.lru_cache(maxsize=4)
def scene_batch(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` synthetic scenes of ``size``²: pixels (n, 3, S, S) in [0, 1] and labels (n, S, S), on the CPU.

    Rendered once per arguments (rows share them): never modify them in place.
    """
    batch = analysis_batches(n, size, n, seed)[0]
    return batch.pixels, batch.labels


# --------------------------------------------------------------------------------------------
# 1. correctness and SDPA backends
# --------------------------------------------------------------------------------------------


def compare(out: Tensor, ref: Tensor) -> dict:
    """Logits (B, K, H, W) against the reference: max |Δ|, max |Δ| / max |ref|, argmax agreement."""
    out, ref = out.float().cpu(), ref.float().cpu()
    diff = (out - ref).abs().max().item()
    return {"max_abs_diff": diff, "max_rel_diff": diff / ref.abs().max().item(),
            "argmax_agreement": (out.argmax(1) == ref.argmax(1)).double().mean().item()}


def forward_agreement(run: Run, family: str) -> dict:
    """The device's float32 (TF32 off / torch's TF32 defaults) and bf16 forwards vs the CPU float32 one."""
    model = run.model(family).eval()
    pixels, _ = scene_batch(run.sizes.correctness_images, run.image_size(family), run.seed)
    x = model.normalize(pixels)
    with torch.inference_mode():
        reference = model(x)
    model.to(run.device)
    x = x.to(run.device)
    with torch.inference_mode():
        with tf32(False):
            fp32 = model(x)
        fp32_default = model(x)
        with bf16(run.device):
            half = model(x)
    return {"fp32": compare(fp32, reference), "fp32_tf32_defaults": compare(fp32_default, reference),
            "bf16": compare(half, reference)}


def sdpa_kernel_label(op: str) -> str | None:
    """The SDPA kernel an aten op name belongs to (None for other ops and the dispatcher op itself)."""
    if "scaled_dot_product" not in op:
        return None
    return next((label for label, key in SDPA_KERNELS.items() if key in op), None)


def attention_layers(model: Segmentor) -> tuple[int, dict[int, str]]:
    """The decoder's number of heads, and head width p -> the kind of layer that attends with it
    (``MSSA``, ``MSCA``, ``BLOCK``...: its subspaces' names without the layer number)."""
    spaces = model.decoder.subspaces()
    kinds = {space.proj.shape[1]: space.name.split(".")[0].rstrip("0123456789").upper() for space in spaces}
    return spaces[0].proj.shape[0], kinds


def sdpa_kernels_run(model: Segmentor, z: Tensor, grid: tuple[int, int], precision) -> dict[int, dict]:
    """{width: {"queries", "keys", "forward": [kernels], "backward": [kernels]}} of one decoder forward +
    backward, by the head width the kernels saw (flash on CUDA pads p to a multiple of 8 first).

    Read from the op names ``torch.profiler`` records; a math forward has no backward op of its own
    (autograd differentiates its matmuls and softmax), recorded as ``math``.
    """
    from torch.profiler import ProfilerActivity, profile

    z = z.detach().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with precision():
            masks = model.decoder(z, grid)
        masks.backward(torch.randn_like(masks))
    seen: dict[int, dict] = {}
    for event in prof.events():
        label = sdpa_kernel_label(event.name)
        if label is None or not event.input_shapes or len(event.input_shapes[0]) != 4:
            continue
        p = event.input_shapes[0][-1]
        entry = seen.setdefault(p, {"queries": None, "keys": None, "forward": [], "backward": []})
        kind = "backward" if "backward" in event.name else "forward"
        if kind == "forward":
            entry["queries"], entry["keys"] = event.input_shapes[0][2], event.input_shapes[1][2]
        if label not in entry[kind]:
            entry[kind].append(label)
    for entry in seen.values():
        if not entry["backward"] and "math" in entry["forward"]:
            entry["backward"] = ["math"]
    return seen


def sdpa_eligible(batch: int, heads: int, queries: int, keys: int, p: int, device: torch.device, precision) -> dict:
    """Each SDPA backend forced alone on q (B, h, T, p), k = v (B, h, S, p) laid out as the decoders
    do (heads as strided views of (B, T, h·p)): ``"ok"``, or torch's error and warnings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, queries, heads * p, device=device).view(batch, queries, heads, p).transpose(1, 2)
    k = torch.randn(batch, keys, heads * p, device=device).view(batch, keys, heads, p).transpose(1, 2)
    result = {}
    for label, backend in SDPA_BACKENDS.items():
        with warnings.catch_warnings(record=True) as caught, precision(), torch.no_grad():
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    F.scaled_dot_product_attention(q, k, k)
                result[label] = "ok"
            except RuntimeError as e:
                reasons = "; ".join(str(w.message).strip().replace("\n", " ")[:200] for w in caught)
                result[label] = error_text(e) + (f" ({reasons})" if reasons else "")
    return result


def layer_width(width: int, widths: Iterable[int]) -> int:
    """The layer head width p that a kernel saw as ``width`` (p itself, or p padded up)."""
    return min((p for p in widths if p <= width), key=lambda p: width - p, default=width)


def sdpa_report(run: Run, family: str) -> dict:
    """For each attention layer kind of the family's decoder: kernels run and backends eligible, fp32 and bf16."""
    model = run.model(family).to(run.device).eval()
    heads, names = attention_layers(model)
    pixels, _ = scene_batch(run.sizes.batch, model.config.backbone.image_size[0], run.seed)
    with torch.no_grad():
        z, grid = model.encode(model.normalize(pixels.to(run.device)))
    layers: dict[int, dict] = {}
    for precision_name, precision in (("fp32", nullcontext), ("bf16", lambda: bf16(run.device))):
        for width, seen in sdpa_kernels_run(model, z, grid, precision).items():
            p = layer_width(width, names)
            layer = layers.setdefault(p, {"layer": names.get(p, "?"), "heads": heads, "head_dim": p,
                                          "queries": seen["queries"], "keys": seen["keys"]})
            eligible = sdpa_eligible(len(z), heads, seen["queries"], seen["keys"], p, run.device, precision)
            layer[precision_name] = {"forward": seen["forward"], "backward": seen["backward"], "kernel_width": width,
                                     "eligible": eligible}
    return {"layers": list(layers.values())}


def section_correctness(run: Run, section: dict) -> None:
    for family in FAMILIES:
        run.row(section, {"check": "forward", "family": family, "variant": run.variant(family)},
                lambda: forward_agreement(run, family))
    for family in FAMILIES:
        run.row(section, {"check": "sdpa", "family": family}, lambda: sdpa_report(run, family))


# --------------------------------------------------------------------------------------------
# 2 and 7. training throughput
# --------------------------------------------------------------------------------------------


def train_step(forward: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
               precision) -> Tensor:
    """One optimizer step on normalised images (B, 3, S, S) and labels (B, S, S); returns the loss."""
    with precision():
        loss = F.cross_entropy(forward(images), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def training_throughput(run: Run, family: str, impl: str, mode: str) -> dict:
    """images/s and peak memory of ``steps`` timed training steps after ``warmup`` untimed ones."""
    sizes, device = run.sizes, run.device
    model = run.model(family)
    if impl == "literal":
        model = with_literal_decoder(model)
    model.to(device).train()
    forward = torch.compile(model, backend=run.compile_backend) if mode == COMPILED else model
    optimizer = build_optimizer(TrainConfig(), model)  # the recipe's Nesterov SGD
    pixels, labels = scene_batch(sizes.batch, model.config.backbone.image_size[0], run.seed)
    images, labels = model.normalize(pixels.to(device)), labels.to(device)
    precision = nullcontext if mode == "fp32" else (lambda: bf16(device))

    def steps(n: int) -> Tensor | None:
        losses = [train_step(forward, optimizer, images, labels, precision) for _ in range(n)]
        return losses[-1] if losses else None

    first_s, _ = timed(lambda: steps(1), device)
    steps(sizes.warmup - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, loss = timed(lambda: steps(sizes.steps), device)
    return {
        "images_per_s": sizes.steps * sizes.batch / seconds,
        "step_ms": 1e3 * seconds / sizes.steps,
        "first_step_s": first_s,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "loss": loss.item(),
    }


def add_ratios(ours: dict, literal: dict) -> None:
    """Speed ours ÷ literal (images/s) and memory literal ÷ ours, on the ours row, when both ran."""
    if ours["status"] == literal["status"] == "ok":
        ours["speedup_vs_literal"] = ours["images_per_s"] / literal["images_per_s"]
        if ours["peak_bytes"]:
            ours["memory_literal_over_ours"] = literal["peak_bytes"] / ours["peak_bytes"]


def training_rows(run: Run, section: dict, modes: tuple[str, ...]) -> None:
    section["batch"] = run.sizes.batch
    needs = run.sizes.compile_row_s if COMPILED in modes else 0.0
    for family in TRAINED_FAMILIES:
        for mode in modes:
            pair = [run.row(section, {"family": family, "decoder": impl, "mode": mode},
                            lambda: training_throughput(run, family, impl, mode), needs)
                    for impl in ("ours", "literal")]
            add_ratios(*pair)
        run.save()


def section_training(run: Run, section: dict) -> None:
    training_rows(run, section, ("fp32", "bf16"))


def section_training_compiled(run: Run, section: dict) -> None:
    try:
        training_rows(run, section, (COMPILED,))
    finally:
        torch._dynamo.reset()  # drop the compiled graphs and their caches


# --------------------------------------------------------------------------------------------
# 3. evaluation throughput
# --------------------------------------------------------------------------------------------


def evaluation_throughput(run: Run, family: str, data: InMemorySet) -> dict:
    """images/s of ``evaluate()`` single-scale and multi-scale (+ flips), after one warm-up image."""
    sizes = run.sizes
    model = run.model(family).to(run.device).eval()
    evaluate(model, data, num_images=1)  # the protocol of `depict eval`, resolved by evaluate() itself
    single_s, single = timed(lambda: evaluate(model, data, num_images=sizes.eval_images), run.device)
    multi_s, multi = timed(lambda: evaluate(model, data, scales=MULTISCALE_RATIOS, flip=True,
                                            num_images=sizes.multiscale_images), run.device)
    return {"protocol": {key: single[key] for key in ("window", "stride", "short_side")}, "single_scale_images_per_s": sizes.eval_images / single_s,
            "multiscale_images_per_s": sizes.multiscale_images / multi_s,
            "single_scale_miou": single["miou"], "multiscale_miou": multi["miou"]}


def section_evaluation(run: Run, section: dict) -> None:
    window = run.image_size("depict-sa")
    height, width = window, round(window * 683 / 512)
    n = max(run.sizes.eval_images, run.sizes.multiscale_images)
    data = InMemorySet(synthetic_scenes(n, height, width, run.seed), run.sizes.classes)
    section |= {"image_size": [height, width], "scales": list(MULTISCALE_RATIOS), "flip": True}
    for family in FAMILIES:
        run.row(section, {"family": family}, lambda: evaluation_throughput(run, family, data))


# --------------------------------------------------------------------------------------------
# 4. analyses
# --------------------------------------------------------------------------------------------


def section_analyses(run: Run, section: dict) -> None:
    sizes = run.sizes
    model = run.model("depict-sa").to(run.device).eval()
    size = model.config.backbone.image_size[0]
    batches = analysis_batches(sizes.analysis_images, size, sizes.analysis_batch, run.seed)
    with torch.inference_mode():  # CUDA context, cuBLAS and kernels warm before any clock starts
        model(model.normalize(batches[0].pixels.to(run.device)))
    section |= {"variant": run.variant("depict-sa"), "images": sizes.analysis_images, "image_size": size,
                "batch": sizes.analysis_batch}

    def coding_rate() -> dict:
        seconds, result = timed(lambda: analyze_coding_rates(trace_batches(model, batches, progress=False)), run.device)
        return {"seconds": seconds, "images": result.num_images, "final_token_rate": float(result.token_rate.mean[-1])}

    def pca_seg() -> dict:
        seconds, result = timed(lambda: analyze_pca(trace_batches(model, batches, progress=False), examples=0), run.device)
        return {"seconds": seconds, "images": result.num_images}

    def robustness() -> dict:
        noise = resolve_perturbation("gaussian", "decoder")
        sigmas = noise.default_sigmas()
        seconds, records = timed(lambda: list(robustness_records(model, "gpu-check", batches, noise, sigmas,
                                                                 sizes.draws, run.seed)), run.device)
        return {"seconds": seconds, "images": sizes.analysis_images, "sigmas": len(sigmas), "draws": sizes.draws,
                "evaluations": len(records), "clean_miou": records[0].miou}

    for name, measure in (("coding-rate", coding_rate), ("pca-seg", pca_seg), ("robustness", robustness)):
        run.row(section, {"analysis": name}, measure)


# --------------------------------------------------------------------------------------------
# 5. the paper's figure: the paper-preset sweep on the evaluation protocol
# --------------------------------------------------------------------------------------------


class LazyScenes(InMemorySet):
    """``n`` synthetic scenes of (height, width), rendered when read (a few hundred stay out of memory)."""

    def __init__(self, n: int, height: int, width: int, n_cls: int, seed: int):
        super().__init__([], n_cls)
        self.n, self.height, self.width, self.seed = n, height, width, seed

    def __len__(self) -> int:
        return self.n

    def load_raw(self, i: int):
        return synthetic_scenes(1, self.height, self.width, self.seed + i)[0]


def paper_sweep(run: Run, family: str, data: LazyScenes, until: float) -> dict:
    """The paper-preset sweep of one model, image after image until ``data`` is done or ``until``."""
    model = run.model(family).to(run.device).eval()
    images = EvaluationImages(data)
    sweep = ModelSweep(model, family, resolve_perturbation("gaussian", "decoder"), PAPER_SIGMAS, run.sizes.draws, run.seed)
    protocol = images.protocol(model)
    image, label = data.load_raw(0)
    sweep.score_image(image, label, 0, protocol)  # warm-up: kernels, the parameter sets drawn once
    sweep.counts.clear()
    sync(run.device)
    start, scored = time.perf_counter(), 0
    while scored < len(data) and (scored == 0 or time.perf_counter() < until):
        image, label = data.load_raw(scored)
        sweep.score_image(image, label, scored, protocol)
        scored += 1
    sync(run.device)
    seconds = time.perf_counter() - start
    evaluations, _ = sweep.evaluations(scored)
    return {"variant": run.variant(family), "images": scored, "seconds": seconds, "images_per_s": scored / seconds,
            "evaluations_per_image": len(sweep.draws), "protocol": {k: protocol[k] for k in ("window", "stride")},
            "clean_miou": evaluations[0].miou, "parameter_sets_mib": sweep.parameters.held / 2**20}


def section_paper_sweep(run: Run, section: dict) -> None:
    window = run.image_size("depict-sa")
    height, width = window, round(window * 683 / 512)
    data = LazyScenes(run.sizes.sweep_images, height, width, run.sizes.classes, run.seed)
    section |= {"image_size": [height, width], "sigmas": list(PAPER_SIGMAS), "draws": run.sizes.draws,
                "figure": {"images": FIGURE_IMAGES, "models": FIGURE_MODELS}}
    families = ("depict-sa", "segmenter")
    for i, family in enumerate(families):
        share = (run.deadline - time.perf_counter()) / (len(families) - i)  # the section's time, split between the rows
        run.row(section, {"family": family}, lambda: paper_sweep(run, family, data, time.perf_counter() + share))
    per_image = [1 / r["images_per_s"] for r in section["rows"] if r["status"] == "ok"]
    if per_image:
        section["projected_figure_s"] = FIGURE_IMAGES * FIGURE_MODELS * sum(per_image) / len(per_image)


# --------------------------------------------------------------------------------------------
# 6. a short training run, stopped and resumed
# --------------------------------------------------------------------------------------------


def short_run(run: Run, folder: Path) -> dict:
    """``train()`` to ``run_stop``, then resumed from its checkpoint to ``run_iterations``."""
    sizes = run.sizes
    config = TrainConfig(
        model=run.variant("depict-sa"), dataset="synthetic",
        dataset_kwargs={"size": sizes.run_scene, "length": 100_000},
        batch_size=sizes.batch, iterations=sizes.run_iterations, stop_after=sizes.run_stop, optimizer="adamw",
        lr=sizes.run_lr, warmup_iters=sizes.run_warmup, weight_decay=0.01, log_every=sizes.run_log_every,
        eval_images=sizes.run_eval_images, save_every=0, num_workers=sizes.run_workers, seed=run.seed,
        out_dir=str(folder), device=str(run.device),
    )
    first_s, first = timed(lambda: train(config, progress=False), run.device)
    second_s, second = timed(lambda: train(replace(config, stop_after=None), resume=first["checkpoint"],
                                           progress=False), run.device)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    losses = [(r["iter"], r["loss"]) for r in log if r["type"] == "train"]
    speeds = sorted(r["images_per_s"] for r in log if r["type"] == "train")
    checks = {
        f"the first part stopped at {first['iteration']}, not {sizes.run_stop}":
            first["iteration"] == sizes.run_stop and not first["completed"],
        f"the resumed run ended at {second['iteration']} of {sizes.run_iterations}":
            second["iteration"] == sizes.run_iterations and second["completed"],
        "the loss did not fall": losses[-1][1] < losses[0][1],
    }
    return {
        "failures": [message for message, holds in checks.items() if not holds],
        "variant": config.model, "crop": run.image_size("depict-sa"),
        "scene": sizes.run_scene, "batch": sizes.batch, "amp": config.amp, "optimizer": config.optimizer,
        "lr": config.lr, "stopped_at": first["iteration"], "stopped_completed": first["completed"],
        "resumed_to": second["iteration"], "completed": second["completed"],
        "seconds": [first_s, second_s], "losses": losses,
        "loss_first": losses[0][1], "loss_last": losses[-1][1], "loss_fell": losses[-1][1] < losses[0][1],
        "median_images_per_s": speeds[len(speeds) // 2], "eval_miou": (second["eval"] or {}).get("miou"),
    }


def section_short_run(run: Run, section: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu_check_run_") as folder:
        run.row(section, {"check": "train, stop, resume"}, lambda: short_run(run, Path(folder)))


SECTIONS: dict[str, Callable[[Run, dict], None]] = {
    "correctness": section_correctness,
    "training": section_training,
    "evaluation": section_evaluation,
    "analyses": section_analyses,
    "paper_sweep": section_paper_sweep,
    "short_run": section_short_run,
    "training_compiled": section_training_compiled,
}


# --------------------------------------------------------------------------------------------
# the table (markdown: the README's GPU table, and what a run prints at the end)
# --------------------------------------------------------------------------------------------

DASH = "–"
BACKBONE_NAMES = {"vit-s16": "ViT-S/16", "tiny": "tiny ViT"}


def _rows(data: dict, section: str, **match: Any) -> list[dict]:
    rows = (data.get("sections", {}).get(section) or {}).get("rows", [])
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _value(data: dict, section: str, key: str, fmt: str, scale: float = 1.0, **match: Any) -> str:
    """``fmt`` of ``scale × row[key]`` (a dotted path) of the first matching row that ran; else why not."""
    rows = _rows(data, section, **match)
    if not rows:
        return DASH
    if rows[0]["status"] not in ("ok", "failed"):
        return "error" if rows[0]["status"] == "error" else "skipped"
    value: Any = rows[0]
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return DASH if value is None else format(value * scale, fmt)


def _kernels(data: dict, family: str, precision: str) -> str:
    rows = _rows(data, "correctness", check="sdpa", family=family)
    if not rows or rows[0]["status"] != "ok":
        return DASH if not rows else rows[0]["status"].split(":")[0]
    cells = []
    for layer in rows[0]["layers"]:
        seen = layer.get(precision) or {}
        width = seen.get("kernel_width", layer["head_dim"])
        padded = f" (p padded to {width})" if width != layer["head_dim"] else ""
        cells.append(f"{layer['layer']} (p = {layer['head_dim']}): {'/'.join(seen.get('forward', [])) or DASH} → "
                     f"{'/'.join(seen.get('backward', [])) or DASH}{padded}")
    return "; ".join(cells)


def _joined(cells: list[str]) -> str:
    return DASH if all(c == DASH for c in cells) else " · ".join(cells)


def render_markdown(data: dict) -> str:
    """The GPU table of a check's JSON (``{}``: the empty table, 'not measured yet')."""
    env, settings = data.get("environment", {}), data.get("settings", {})
    sizes = settings.get("sizes", {})
    if env:
        card = env.get("device_name") if env.get("device", "").startswith("cuda") else f"CPU ({env.get('device_name')})"
        head = (f"**{card}**, torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
                f"timm {env.get('timm')}, commit {str(env.get('git_commit'))[:12]}; "
                f"{data.get('seconds', 0):.0f} s{'' if data.get('complete') else ' (incomplete)'}")
    else:
        head = "**GPU: not measured yet.**"
    device = "CUDA" if not env or env.get("device", "").startswith("cuda") else env.get("device", "device")
    title = (f"{BACKBONE_NAMES.get(sizes.get('backbone'), sizes.get('backbone', 'ViT-S/16'))}, "
             f"{settings.get('image_size', 512)}², K = {sizes.get('classes', 150)}")
    modes = ("fp32", "bf16", COMPILED)
    sections = {mode: "training_compiled" if mode == COMPILED else "training" for mode in modes}

    def per_mode(key: str, fmt: str, family: str, scale: float = 1.0) -> str:
        """Our decoder's row in each training mode."""
        if family not in TRAINED_FAMILIES:
            return DASH
        return _joined([_value(data, sections[mode], key, fmt, scale, family=family, decoder="ours", mode=mode)
                        for mode in modes])

    lines = [
        (f"{device} fp32 (TF32 off) vs CPU fp32: max abs diff · argmax agreement",
         lambda f: _joined([_value(data, "correctness", "fp32.max_abs_diff", ".1e", check="forward", family=f),
                            _value(data, "correctness", "fp32.argmax_agreement", ".4f", check="forward", family=f)])),
        ("fp32 with torch's TF32 defaults: max abs diff · argmax agreement",
         lambda f: _joined([
             _value(data, "correctness", "fp32_tf32_defaults.max_abs_diff", ".1e", check="forward", family=f),
             _value(data, "correctness", "fp32_tf32_defaults.argmax_agreement", ".4f", check="forward", family=f)])),
        ("bf16 autocast vs CPU fp32: argmax agreement",
         lambda f: _value(data, "correctness", "bf16.argmax_agreement", ".4f", check="forward", family=f)),
        ("SDPA kernel, fp32: forward → backward", lambda f: _kernels(data, f, "fp32")),
        ("SDPA kernel, bf16: forward → backward", lambda f: _kernels(data, f, "bf16")),
        (f"training img/s, batch {sizes.get('batch', 8)}: fp32 · bf16 · bf16 + compile",
         lambda f: per_mode("images_per_s", ".1f", f)),
        ("training peak GiB: fp32 · bf16 · bf16 + compile", lambda f: per_mode("peak_bytes", ".2f", f, scale=2**-30)),
        ("training speed, our decoder ÷ literal: fp32 · bf16 · bf16 + compile",
         lambda f: per_mode("speedup_vs_literal", ".2f", f)),
        ("training peak memory, literal ÷ ours: fp32 · bf16 · bf16 + compile",
         lambda f: per_mode("memory_literal_over_ours", ".2f", f)),
        ("`evaluate()` img/s, {}: single-scale · multi-scale + flip".format(
            " × ".join(map(str, (data.get("sections", {}).get("evaluation") or {}).get("image_size", [512, 683])))),
         lambda f: _joined([_value(data, "evaluation", "single_scale_images_per_s", ".2f", family=f),
                            _value(data, "evaluation", "multiscale_images_per_s", ".2f", family=f)])),
    ]
    out = [head, "", f"| {title} | " + " | ".join(FAMILIES.values()) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(cell(f) for f in FAMILIES) + " |" for label, cell in lines]
    out += ["", _analyses_line(data), _paper_sweep_line(data), _short_run_line(data)]
    problems = _problems(data)
    if problems:
        out += ["", "Problems: " + "; ".join(problems)]
    return "\n".join(out) + "\n"


def _analyses_line(data: dict) -> str:
    sizes, size = data.get("settings", {}).get("sizes", {}), data.get("settings", {}).get("image_size", 512)
    parts = []
    for name in ("coding-rate", "pca-seg", "robustness"):
        seconds = _value(data, "analyses", "seconds", ".1f", analysis=name)
        parts.append(f"`{name}` {seconds}{' s' if seconds[0].isdigit() else ''}")
    robustness = _rows(data, "analyses", analysis="robustness")
    if robustness and robustness[0]["status"] == "ok":
        r = robustness[0]
        parts[-1] += f" ({r['sigmas']} σ × {r['draws']} draws = {r['evaluations']} evaluations)"
    what = f"DEPICT-SA, {sizes.get('analysis_images', 64)} images of {size}²"
    return f"Analyses ({what}): " + ", ".join(parts) + "."


def _paper_sweep_line(data: dict) -> str:
    section = data.get("sections", {}).get("paper_sweep") or {}
    rows = [r for r in section.get("rows", []) if r["status"] == "ok"]
    if not rows:
        return "Paper-preset sweep (evaluation protocol): " + (section.get("status") or DASH) + "."
    rates = ", ".join(f"{FAMILIES[r['family']]} {r['images_per_s']:.2f} img/s ({r['images']} images)" for r in rows)
    figure = section.get("figure", {})
    return (f"Paper-preset sweep (evaluation protocol, {len(section['sigmas'])} σ × {section['draws']} draws, "
            f"{section['image_size'][1]} × {section['image_size'][0]}): {rates}; the figure ({figure.get('images')} images, "
            f"{figure.get('models')} models) projected at {section['projected_figure_s'] / 60:.1f} min.")


def _short_run_line(data: dict) -> str:
    rows = _rows(data, "short_run")
    if not rows or rows[0]["status"] not in ("ok", "failed"):
        return "Short training run (`train()`, stopped, `--resume`d): " + (rows[0]["status"] if rows else DASH) + "."
    r = rows[0]
    failed = f" **Failed: {'; '.join(r['failures'])}.**" if r["failures"] else ""
    return (f"Short training run (`train()` {r['variant']}, crop {r['crop']}, batch {r['batch']}, {r['optimizer']}, "
            f"amp {r['amp']}): stopped at {r['stopped_at']}, resumed to {r['resumed_to']} "
            f"({'complete' if r['completed'] else 'incomplete'}); loss {r['loss_first']:.3f} → {r['loss_last']:.3f} "
            f"({'fell' if r['loss_fell'] else 'did not fall'}); {r['median_images_per_s']:.1f} img/s with data loading."
            + failed)


def _problems(data: dict) -> list[str]:
    """Every error and failed check, one line each: ``section (row): what``."""
    problems = []
    for name, section in data.get("sections", {}).items():
        if section.get("error"):
            problems.append(f"{name}: {section['error']}")
        for row in section.get("rows", []):
            what = ", ".join(str(row[k]) for k in ("check", "family", "decoder", "mode", "analysis") if k in row)
            where = f"{name} ({what})" if what else name
            problems += [f"{where}: {row['error']}"] if row.get("error") else []
            problems += [f"{where}: failed: {failure}" for failure in row.get("failures") or []]
    return problems


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run_check(out: Path, device: torch.device, sizes: Sizes, *, seed: int = 0, compile_backend: str = "inductor",
              budget: float = 420.0, sections: list[str] | None = None, commit: str | None = None) -> dict:
    """Run the sections (all, in order, by default), writing ``out`` after every row; returns the JSON data."""
    run = Run(out, device, sizes, seed, compile_backend, budget, commit)
    run.save()
    for name in sections or SECTIONS:
        run.section(name, SECTIONS[name])
    run.data["complete"] = all(s["status"] == "ok" for s in run.data["sections"].values())
    run.save()
    return run.data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:i")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes (the CPU check of the script)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                    help="the JSON file (rewritten after every row)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no section or row starts")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="run only these (default: all, in order)")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager with --smoke)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0: leave as is; 1 for --smoke on the CPU, where tiny ops spin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", help="the commit to record where the copy of the code has no .git")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print the table of an existing JSON and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(render_markdown(json.loads(args.markdown.read_text())), end="")
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.smoke and device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    data = run_check(args.out, device, SMOKE if args.smoke else PAPER, seed=args.seed, compile_backend=backend,
                     budget=args.budget, sections=args.sections, commit=args.commit)
    print(render_markdown(data), end="")
    print(f"wrote {args.out}")
    return 0 if data["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
