"""All four analyses in one go, for ``depict-analyze demo`` and ``depict-analyze report``.

``run_suite(primary, comparison, out)`` writes, under ``out``::

    coding-rate/     R(Z_j), R(P_lᵀZ_j), shares, R^c, R(Q) of the primary model  (coding_rate_analysis)
    pca-seg/         PCA segmentation of Z_0 vs Z_L1 of the primary model          (pca_analysis)
    orthogonality/   PᵀP and Q̂ᵀQ̂ of every comparison model, and at init          (orthogonality_analysis)
    robustness/      mIoU under Gaussian decoder-parameter noise, one curve per comparison model
    summary.json     the headline numbers below, and the seconds each analysis took

and returns the summary: per model its clean mIoU on the images used; the primary model's
``CodingRates.summary()`` and ``PCASegmentation.summary()``; per model its ``Orthogonality.summary()``; per model
the mIoU at each σ and ``sigma_half`` (where the mIoU falls to half its clean value); and ``claims``,
the paper's three claims checked on these numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from depict_analysis.coding_rate_analysis import analyze_coding_rates
from depict_analysis.inputs import image_batches, image_progress
from depict_analysis.orthogonality_analysis import analyze_orthogonality
from depict_analysis.outputs import save_json
from depict_analysis.pca_analysis import analyze_pca
from depict_analysis.results import Comparison
from depict_analysis.robustness import PARAMETER_SIGMAS, draws_per_sigma, resolve_perturbation, run_robustness
from depict_analysis.models.pretrained import LABELS, load_default
from depict_analysis.models.sources import CheckpointInfo, trained_dataset
from depict_analysis.tracing import trace_batches


@dataclass
class SuiteModel:
    label: str  # how figures and tables name it, e.g. "DEPICT-SA"
    source: str  # what the numbers record as its checkpoint (a path or builtin:NAME)
    model: nn.Module
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.model.decoder.family

    @property
    def role(self) -> str:
        """``white-box`` | ``black-box`` | ``linear`` (``Decoder.role``)."""
        return self.model.decoder.role

    @property
    def info(self) -> CheckpointInfo:
        """What its metadata says: the class names and colours of the dataset it was trained on."""
        return CheckpointInfo(self.label, self.source, "", self.model.n_cls, trained_dataset(self.meta), meta=self.meta)


@dataclass
class SuiteSettings:
    source: dict = field(default_factory=lambda: {"dataset": "synthetic", "split": "val"})  # image_batches arguments
    num_images: int = 64  # per analysis
    examples: int = 4  # PCA example figures
    sigmas: Sequence[float] = PARAMETER_SIGMAS  # Gaussian decoder-parameter noise
    draws: int = 3
    seed: int = 0
    batch_size: int = 16


def sigma_half(sigmas: Sequence[float], relative: Sequence[float]) -> float | None:
    """The noise level at which the mIoU (``relative`` = mIoU / clean mIoU, ascending ``sigmas``) first
    falls to 0.5, interpolated linearly in log σ between grid points; None if it never does."""
    for i, (sigma, value) in enumerate(zip(sigmas, relative)):
        if value <= 0.5:
            if i == 0 or sigmas[i - 1] <= 0:
                return float(sigma)
            s0, v0 = math.log(sigmas[i - 1]), relative[i - 1]
            t = (v0 - 0.5) / (v0 - value)
            return float(math.exp(s0 + t * (math.log(sigma) - s0)))
    return None


def _robustness_summary(result: dict) -> dict:
    by_model: dict[str, dict] = {}
    for row in sorted(result["summary"], key=lambda r: r["sigma"]):
        entry = by_model.setdefault(row["checkpoint"], {"sigma": [], "miou": [], "relative": []})
        for key, value in (("sigma", row["sigma"]), ("miou", row["mean"]), ("relative", row["relative"])):
            entry[key].append(value)
    for entry in by_model.values():
        entry["clean"] = entry["miou"][0]
        entry["sigma_half"] = sigma_half(entry["sigma"], entry["relative"])
    return by_model


def check_claims(summary: dict, roles: dict[str, str], primary: str) -> list[dict]:
    """The paper's claims on the summary's numbers: one record each with ``holds`` and the numbers it used.

    ``roles`` maps each compared model's label to its decoder's role: every white-box decoder is
    compared with every black-box one (Segmenter's mask transformer).
    """
    claims = []
    pca = summary["pca_seg"]
    scores = pca["mean_scores"]["prediction"]
    first, last = scores[pca["first"]]["ari"], scores[pca["last"]]["ari"]
    claims.append({"claim": f"PCA of {pca['last']} segments better than PCA of {pca['first']} ({primary}, ARI vs prediction)",
                   "holds": last > first, "values": {pca["first"]: first, pca["last"]: last}})
    baselines = [label for label, role in roles.items() if role == "black-box"]
    white_boxes = [label for label, role in roles.items() if role == "white-box"]
    for white in white_boxes:
        for base in baselines:
            for key, how in (("final_Q_mean_abs_offdiag", "mean |off-diagonal cosine|"),
                             ("final_Q_mean_abs_offdiag_centred", "the same with the class mean removed, as the masks see Q̂")):
                a, b = summary["orthogonality"][white][key], summary["orthogonality"][base][key]
                claims.append({"claim": f"{white}'s Q̂ is closer to orthogonal than {base}'s ({how})",
                               "holds": a < b, "values": {white: a, base: b}})
            r = summary["robustness"]
            a, b = r[white]["sigma_half"], r[base]["sigma_half"]
            holds = (a is None and b is not None) or (a is not None and b is not None and a > b)
            claims.append({"claim": f"{white} keeps its mIoU to a larger σ of decoder-parameter noise than {base} "
                                    "(σ at half the clean mIoU)", "holds": holds, "values": {white: a, base: b}})
    return claims


def run_suite(
    primary: SuiteModel, comparison: Sequence[SuiteModel], out: str | Path, settings: SuiteSettings | None = None,
    progress: bool = True,
) -> dict:
    """Run the four analyses (see the module docstring), write their outputs and ``summary.json`` under ``out``."""
    settings = settings or SuiteSettings()
    out = Path(out)
    source = settings.source
    seconds: dict[str, float] = {}

    def batches_for(side: int):
        return image_batches(side, **source, num_images=settings.num_images, batch_size=settings.batch_size)

    def batches(model: nn.Module):
        return batches_for(max(model.config.backbone.image_size))

    def traces(entry: SuiteModel, description: str):
        total, stream = batches(entry.model)
        return trace_batches(entry.model, stream, total=total, progress=progress, description=description)

    clock = time.perf_counter()
    rates = analyze_coding_rates(traces(primary, "coding rate"))
    Comparison([primary.label], [primary.source], [rates], {"input": source}).save(out / "coding-rate")
    seconds["coding_rate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    info = primary.info
    pca = analyze_pca(traces(primary, "PCA segmentation"), seed=settings.seed, examples=settings.examples,
                      class_names=info.class_names, palette=info.palette)
    Comparison([primary.label], [primary.source], [pca], {"input": source}).save(out / "pca-seg")
    seconds["pca_seg"] = time.perf_counter() - clock

    clock = time.perf_counter()
    orthogonality = [analyze_orthogonality(traces(entry, "orthogonality"), class_names=entry.info.class_names)
                     for entry in comparison]
    labels = [entry.label for entry in comparison]
    Comparison(labels, [entry.source for entry in comparison], orthogonality, {"input": source}).save(out / "orthogonality")
    seconds["orthogonality"] = time.perf_counter() - clock

    clock = time.perf_counter()
    noise = resolve_perturbation("gaussian", "decoder")
    n_evaluations = len(comparison) * sum(draws_per_sigma(noise, sigma, settings.draws) for sigma in settings.sigmas)
    with image_progress(n_evaluations, "robustness", progress, unit="evaluations") as advance:
        robustness = run_robustness(
            ((entry.label, entry.source, entry.model) for entry in comparison),
            batches_for, noise, settings.sigmas, out / "robustness", draws=settings.draws, seed=settings.seed,
            settings={"input": source, "batch_size": settings.batch_size}, advance=advance,
        )
    if not robustness["complete"]:  # Ctrl-C: the partial sweep is on disk; stop as asked, without a summary
        raise KeyboardInterrupt
    seconds["robustness"] = time.perf_counter() - clock

    summary = {
        "settings": asdict(settings) | {"primary": primary.label},
        "models": [{"label": e.label, "source": e.source, "decoder": e.family, "role": e.role, "variant": e.model.config.name}
                   for e in comparison],
        "coding_rate": {**rates.summary(), "model": primary.label},
        "pca_seg": {**pca.summary(), "model": primary.label},
        "orthogonality": {label: result.summary() for label, result in zip(labels, orthogonality)},
        "robustness": _robustness_summary(robustness),
        "seconds": seconds,
    }
    summary["claims"] = check_claims(summary, {e.label: e.role for e in comparison}, primary.label)
    save_json(out / "summary.json", summary)
    return summary


def default_suite_models(device: str = "cpu") -> list[SuiteModel]:
    """The built-in models (DEPICT-SA first: the primary of the demo), loaded on ``device``."""
    return [SuiteModel(label, f"builtin:{name}", *load_default(name, device)) for name, label in LABELS.items()]


def run_demo(out: str | Path = "figures", device: str = "cpu", settings: SuiteSettings | None = None, progress: bool = True) -> dict:
    """``run_suite`` on the built-in models: DEPICT-SA for the single-model analyses, all three compared;
    ``summary.json`` also records the wall time (``seconds.total``)."""
    clock = time.perf_counter()
    models = default_suite_models(device)
    summary = run_suite(models[0], models, out, settings, progress)
    summary["seconds"]["total"] = time.perf_counter() - clock
    save_json(Path(out) / "summary.json", summary)
    return summary
