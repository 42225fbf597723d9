"""Every analysis in one go, and what they conclude: ``depict-analyze demo`` and ``depict-analyze report``.

``run_suite(models, out, settings)`` analyses the first model (the primary) alone and compares all of
them, on the same images, writing under ``out``::

    coding-rate/     R(Z_j), R(P_lᵀZ_j), R(Q) of the primary model        (coding_rate_analysis)
    pca-seg/         PCA segmentation of Z_0 vs Z_L1 of the primary model   (pca_analysis)
    orthogonality/   PᵀP and Q̂ᵀQ̂ of every model, side by side            (orthogonality_analysis)
    robustness/      mIoU under Gaussian decoder-parameter noise, every model (robustness; square crops at the
                     training size, named in its figure, JSON, the report and the finding: the evaluation
                     protocol made this stage 4.4x slower on the demo's
                     synthetic images: 287 s against 65 s for 16 images, the same clean mIoU)
    ablation/        mIoU and per-class IoU with each head zero-ablated, every model with heads (ablation;
                     the evaluation protocol on a dataset's images, so only when the images are a dataset)
    summary.json     the run, the headline numbers with intervals, the findings, the warnings, the files

and returns a ``SuiteResult``. Its ``findings`` are the paper's claims and other observations, each
naming its statistic and data, with a verdict read off bootstrap intervals (``depict_analysis.claims``):

- PCA of Z_L1 segments better than PCA of Z_0 (ARI against the ground truth, where there is one);
- every white-box decoder's Q̂ is closer to orthogonal than every black-box decoder's (per image, paired);
- its P is closer to orthogonal than at its initialisation (fresh initialisations of the same
  variant) and than the black-box decoder's W_Q (a property of the weights: exact);
- it keeps its mIoU to a larger σ of decoder-parameter noise (σ½, paired bootstrap over images and draws);
- observation: R(Z_j) falls from the decoder input to its last layer (primary model);
- observation: each of its heads (what one layer writes into one subspace P_k) serves fewer classes than
  each of the black box's attention heads (loss-weighted class concentration of a head's zero-ablation,
  paired bootstrap over images).

Models are compared by their decoders' ``role`` (white-box against black-box), never by family.
A model at its class prior makes every finding about it ``not decided``; too few images or draws
for the intervals asked for are warned about. ``files`` lists what this run wrote, which is all the
report shows (a folder written into before may hold other runs' figures).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depict_analysis import __version__
from depict_analysis.attention import AttentionMaps, analyze_attention
from depict_analysis.ablation import Ablation, concentration_finding, head_counts, run_ablation
from depict_analysis.class_rates import ClassRates, analyze_class_rates
from depict_analysis.claims import Finding, compare_exact, compare_per_image, compare_replicates, compare_to_sample, trend
from depict_analysis.coding_rate_analysis import CodingRates, analyze_coding_rates
from depict_analysis.foundation.distributed import is_writer
from depict_analysis.foundation.progress import StageLog
from depict_analysis.inputs import ImageSource
from depict_analysis.models.data import build_dataset
from depict_analysis.models.pretrained import BUILTIN, DEFAULT_MODELS
from depict_analysis.models.sources import LoadedModel
from depict_analysis.orthogonality_analysis import FINAL_Q, Orthogonality, analyze_orthogonality
from depict_analysis.outputs import save_json
from depict_analysis.pca_analysis import PCASegmentation, analyze_pca
from depict_analysis.perturbations import PARAMETER_SIGMAS, resolve_perturbation
from depict_analysis.robustness import PROTOCOLS, EvaluationImages, Robustness, run_robustness
from depict_analysis.runs import ModelSource, compare, loaded_models
from depict_analysis.uncertainty import Bootstrap, warn_sample_size


P_STATISTIC = "P_cross_head_mean_abs_cos"  # the Orthogonality headline the P claims compare


@dataclass
class SuiteSettings:
    source: dict = field(default_factory=lambda: {"dataset": "synthetic", "split": "val"})  # ImageSource arguments
    num_images: int = 64  # per analysis
    examples: int = 4  # PCA example figures
    sigmas: Sequence[float] = PARAMETER_SIGMAS  # Gaussian decoder-parameter noise
    draws: int = 3
    seed: int = 0
    batch_size: int = 16
    level: float = 0.95  # of every interval
    resamples: int = 1000  # bootstrap resamples behind every interval
    baseline_seeds: int = 5  # fresh initialisations (seeds seed, seed + 1, ...) of every decoder: orthogonality at init
    attention_images: int = 16  # the attention analysis's images (the first of the run's), one example figure each model
    sweep_images: int | None = None  # robustness's and the ablation's images (each decoded per σ and draw, or per head): None = num_images
    threads: int | None = None  # torch's CPU threads during the run (None: as they are)

    @property
    def swept(self) -> int:
        """The images of the robustness sweep and the head ablation: the first ``sweep_images`` of the run's."""
        return min(self.sweep_images or self.num_images, self.num_images)

    @property
    def labelled(self) -> bool:
        """Whether the images come with ground truth (a dataset, or label maps for the image files)."""
        return bool(self.source.get("dataset") or self.source.get("labels"))

    @property
    def bootstrap(self) -> Bootstrap:
        return Bootstrap(self.resamples, self.level, self.seed)

    @property
    def image_source(self) -> ImageSource:
        """``num_images`` of ``source`` in batches of ``batch_size``, cropped to each model's training size."""
        return ImageSource(**self.source, num_images=self.num_images, batch_size=self.batch_size)

    def images(self, n: int) -> str:
        """What the images are, in words: "64 images of synthetic/val"."""
        source = self.source
        where = f"{source['dataset']}/{source.get('split', 'val')}" if source.get("dataset") else "the given image files"
        return f"{n} images of {where}"


# ----------------------------------------------------------------------- numbers the claims read


def token_rates(rates: CodingRates) -> np.ndarray:
    """R(Z_j) per image and token stage, (n, J)."""
    return rates.token_rate.per_image


def pca_scores(pca: PCASegmentation, reference: str, source: str, score: str = "ari") -> np.ndarray:
    """One score of one PCA segmentation (or the prediction) per image, (n,); NaN where the image was not
    scored against ``reference`` (e.g. a ground truth that is all ignored)."""
    values = np.full(pca.num_images, np.nan)
    stat = pca.scores.get(reference, {}).get(source, {}).get(score)
    if stat is not None:
        values[pca.scored[reference]] = stat.per_image
    return values


def q_offdiag(orthogonality: Orthogonality, centred: bool = False) -> np.ndarray:
    """Per image the mean |cosine| between distinct rows of the final Q̂ (``centred``: class mean removed), (n,)."""
    key = "mean_abs_offdiag_centred" if centred else "mean_abs_offdiag"
    return orthogonality.panel(FINAL_Q).per_image[key].per_image


def p_cosine(orthogonality: Orthogonality) -> tuple[float | None, np.ndarray | None]:
    """The mean |cosine| between basis vectors of different heads, averaged over the decoder's projections,
    and the same per fresh initialisation (seed); None where the decoder has no projection or no baseline."""
    value, baseline = orthogonality.headline(P_STATISTIC)
    return value, (baseline.per_image if baseline is not None else None)


# ------------------------------------------------------------------------------------- findings


@dataclass
class SuiteResult:
    """What ``run_suite`` measured and concluded (see the module docstring)."""

    settings: SuiteSettings
    models: list[LoadedModel]
    rates: CodingRates  # of the primary model
    pca: PCASegmentation  # of the primary model
    orthogonality: dict[str, Orthogonality]  # by model label
    robustness: Robustness | None  # None without ground truth: mIoU needs labels
    attention: dict[str, AttentionMaps] = field(default_factory=dict)  # by model label
    class_rates: dict[str, ClassRates] = field(default_factory=dict)  # by model label
    ablation: Ablation | None = None  # None when the images are not a dataset's, or no model has heads
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)  # analysis -> files this run wrote, relative to the folder
    run: dict[str, Any] = field(default_factory=dict)  # version, command, date, seed
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> LoadedModel:
        return self.models[0]

    @property
    def num_images(self) -> int:
        return self.rates.num_images

    def by_role(self, role: str) -> list[LoadedModel]:
        return [m for m in self.models if m.role == role]

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` holds: the run, settings, models (clean mIoU with its interval), the
        claims and observations, the warnings, the files and the time taken."""
        robustness = self.robustness.summary()["models"] if self.robustness is not None else {}
        models = [m.describe() | {key: robustness.get(m.label, {}).get(key) for key in ("clean", "sigma_half", "at_class_prior")}
                  for m in self.models]
        for model in models:
            model["clean_miou"] = model.pop("clean")
        return {
            "run": self.run, "settings": asdict(self.settings) | {"primary": self.primary.label}, "models": models,
            "claims": [f.to_json() for f in self.findings if f.kind == "claim"],
            "observations": [f.to_json() for f in self.findings if f.kind == "observation"],
            "warnings": self.warnings, "files": self.files, "seconds": self.seconds,
        }


def class_prior_blockers(result: SuiteResult, labels: Sequence[str]) -> list[str]:
    """Why a finding about ``labels`` cannot be decided: the models among them at their class prior."""
    return [f"{label} is at its class prior (see the warnings): its numbers say nothing about its decoder"
            for label in labels if result.robustness is not None and result.robustness.at_class_prior(label)]


def pca_finding(result: SuiteResult) -> Finding:
    """PCA of the last layer's tokens segments better than PCA of the decoder input (ARI, paired by image)."""
    settings, bootstrap = result.settings, result.settings.bootstrap
    pca = result.pca
    first, last = pca.sources[0], pca.sources[-1]
    truth = pca_scores(pca, "ground_truth", first)
    reference = "ground_truth" if not np.isnan(truth).all() else "prediction"
    a, b = pca_scores(pca, reference, last), pca_scores(pca, reference, first)
    keep = ~(np.isnan(a) | np.isnan(b))
    against = "the ground truth (255 ignored)" if reference == "ground_truth" else (
        "the model's prediction: there is no ground truth, and the prediction is computed from the last layer's tokens, "
        "which favours them")
    primary = result.primary
    return compare_per_image(
        "claim" if primary.role == "white-box" else "observation",
        f"PCA of {primary.label}'s {last} segments its images better than PCA of {first}",
        f"adjusted Rand index of the PCA segmentation against {against}, mean over images; paired difference {last} − {first}",
        settings.images(int(keep.sum())), "larger", bootstrap, (last, a[keep]), (first, b[keep]),
        class_prior_blockers(result, [primary.label]),
    )


def orthogonality_findings(result: SuiteResult, white: LoadedModel, black: LoadedModel) -> list[Finding]:
    """Q̂ (raw and centred, per image) and P (against its initialisation and the black box's W_Q) of one pair."""
    settings, bootstrap = result.settings, result.settings.bootstrap
    a, b = result.orthogonality[white.label], result.orthogonality[black.label]
    blockers = class_prior_blockers(result, [white.label, black.label])
    images = settings.images(len(a.images))
    findings = [
        compare_per_image("claim", f"{white.label}'s class embeddings Q̂ are closer to orthogonal than {black.label}'s ({what})",
                          f"mean |cosine| between distinct rows of the final Q̂{how}, per image then averaged; "
                          f"paired difference {white.label} − {black.label}",
                          images, "smaller", bootstrap, (white.label, q_offdiag(a, centred)), (black.label, q_offdiag(b, centred)),
                          blockers)
        for centred, what, how in ((False, "as they are", ""),
                                   (True, "class mean removed",
                                    " after removing the class mean (what the mask head's LayerNorm over classes sees; "
                                    "floor 1/(K − 1))"))
    ]
    statistic = ("mean |cosine| between basis vectors of different heads of each projection P, averaged over the "
                 "decoder's projections")
    (p_a, init_a), (p_b, _) = p_cosine(a), p_cosine(b)
    if p_a is not None and init_a is not None:
        seeds = a.settings["baseline_seeds"]
        findings.append(compare_to_sample(
            "claim", f"{white.label}'s subspaces P are closer to orthogonal than at their initialisation", statistic,
            f"the trained weights; {len(init_a)} fresh initialisations of the same decoder (seeds {seeds[0]}…{seeds[-1]})",
            "smaller", settings.level, (white.label, p_a), ("initialisation", init_a), blockers))
    if p_a is not None and p_b is not None:
        findings.append(compare_exact(
            "claim", f"{white.label}'s subspaces P are closer to orthogonal than {black.label}'s query projections W_Q",
            statistic + " (W_Q: each block's, split by head)", "the trained weights", "smaller",
            (white.label, p_a), (black.label, p_b), blockers))
    return findings


def robustness_finding(result: SuiteResult, white: LoadedModel, black: LoadedModel) -> Finding:
    """The white box keeps its mIoU to a larger σ of decoder-parameter noise (σ½, paired bootstrap)."""
    robustness, settings = result.robustness, result.settings
    a, b = robustness.curve(white.label), robustness.curve(black.label)
    draws = robustness.settings["draws"]
    return compare_replicates(
        "claim", f"{white.label} keeps its mIoU to a larger σ of decoder-parameter noise than {black.label}",
        "σ½: the σ at which the mIoU (over the images, mean over draws) falls to half its clean value, interpolated "
        "in log σ (∞: not within the grid); bootstrap over images and draws, paired by image",
        f"{settings.images(robustness.num_images)}, {PROTOCOLS[robustness.settings['protocol']]}; "
        f"Gaussian noise N(0, σ²) on every decoder parameter, "
        f"{len(a.sigma) - 1} σ from {a.sigma[1]:g} to {a.sigma[-1]:g}, {draws} draw{'s' if draws > 1 else ''} each",
        "larger", settings.level,
        (white.label, a.sigma_half(settings.level).estimate, a.sigma_half_replicates()),
        (black.label, b.sigma_half(settings.level).estimate, b.sigma_half_replicates()),
        class_prior_blockers(result, [white.label, black.label]),
    )


def rate_finding(result: SuiteResult) -> Finding:
    """Observation: R(Z_j) falls from the decoder input to the last layer (primary model, paired by image)."""
    rates = token_rates(result.rates)
    names = ["input", *result.rates.token_names[1:]]
    primary = result.primary
    return trend(
        "observation", f"The coding rate R(Z_j) of {primary.label}'s patch tokens falls from the decoder input to its last layer",
        f"R(Z_j) = ½ logdet(I + d/(N ε²) Z_jᵀZ_j), ε = {result.rates.settings['eps']:g}, tokens "
        f"{result.rates.settings['normalize']}-normalised, per image then averaged; paired difference last − input",
        result.settings.images(len(rates)), "smaller", result.settings.bootstrap,
        (names[0], rates[:, 0]), (names[-1], rates[:, -1]), class_prior_blockers(result, [primary.label]),
    )


def ablation_finding(result: SuiteResult, white: LoadedModel, black: LoadedModel) -> Finding:
    """Observation: each of the white box's heads serves fewer classes than each of the black box's heads."""
    ablation = result.ablation
    data = (f"{result.settings.images(ablation.num_images)}, scored with the evaluation protocol; each head "
            "zero-ablated in turn")
    return concentration_finding(ablation, white.label, black.label, data,
                                 class_prior_blockers(result, [white.label, black.label]))


def judge(result: SuiteResult) -> list[Finding]:
    """Every finding the suite's numbers allow: each white-box decoder against each black-box one."""
    findings = [pca_finding(result)]
    ablated = result.ablation.labels if result.ablation is not None else []
    for white in result.by_role("white-box"):
        for black in result.by_role("black-box"):
            findings += orthogonality_findings(result, white, black)
            if result.robustness is not None:
                findings.append(robustness_finding(result, white, black))
            if white.label in ablated and black.label in ablated:
                findings.append(ablation_finding(result, white, black))
    if len(result.rates.token_names) > 1:
        findings.append(rate_finding(result))
    return findings


def sanity_warnings(result: SuiteResult) -> list[str]:
    """Warnings about the whole run: too few images for the intervals, and the robustness sweep's own."""
    found = warn_sample_size(result.num_images, result.settings.level, what="every analysis")
    if result.robustness is None:
        return found + [NO_LABELS]
    return found + [w for w in result.robustness.warnings() if "too few" not in w]


NO_LABELS = ("the images have no ground truth: robustness (mIoU) was not measured, and PCA, attention and class rates "
             "are read against the models' own predictions (prediction only)")


# ------------------------------------------------------------------------------------------- run


def suite_ablation(models: Sequence[LoadedModel], settings: SuiteSettings, progress: bool) -> Ablation | None:
    """Each head of every model with heads zero-ablated on ``swept`` images of the settings' dataset, scored
    with the evaluation protocol; None when the images are not a dataset's or no model has heads."""
    source, headed = settings.source, [m for m in models if head_counts(m.model.decoder)]
    if not source.get("dataset") or not headed:
        return None
    dataset = build_dataset(source["dataset"], source.get("data_root"), source.get("split", "val"))
    return run_ablation(headed, EvaluationImages(dataset, num_images=settings.swept), unit="head",
                        bootstrap=settings.bootstrap, progress=progress)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (None: left as they are) for the block, then restored."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_suite(
    models: Sequence[ModelSource], out: str | Path, settings: SuiteSettings | None = None, progress: bool = True,
    command: str | None = None, device: str | torch.device = "auto", trust: bool = False,
) -> SuiteResult:
    """Run the four analyses on ``models`` (sources or ``LoadedModel``s; the first is the primary), judge the
    findings, and write every analysis's files and ``summary.json`` under ``out`` (see the module docstring).

    ``command`` is recorded as how the run was made (default: this process's command line); ``seconds``
    the time of each analysis and of the whole run (``total``). Under ``torchrun`` (a process group up)
    every analysis that reads images splits them over the processes (``compare``, ``run_robustness``,
    ``run_ablation``); each process returns the whole result and rank 0 writes.
    """
    settings = settings or SuiteSettings()
    with torch_threads(settings.threads):
        return _suite(models, Path(out), settings, progress, command, device, trust)


def _suite(models: Sequence[ModelSource], out: Path, settings: SuiteSettings, progress: bool, command: str | None,
           device: str | torch.device, trust: bool) -> SuiteResult:
    total = time.perf_counter()
    models = list(loaded_models(models, device, trust))  # all in memory: every analysis reads them
    primary, images = models[0], settings.image_source
    shared = {"images": images, "progress": progress, "record": {"input": settings.source}}
    seconds: dict[str, float] = {}
    files: dict[str, list[Path]] = {}
    started = datetime.now(timezone.utc)
    progress = progress and is_writer()
    log = StageLog("suite", progress)

    log("coding rate")
    clock = time.perf_counter()
    rates = compare([primary], analysis=analyze_coding_rates, out=out / "coding-rate", description="coding rate", **shared)
    files["coding-rate"] = rates.files
    seconds["coding_rate"] = time.perf_counter() - clock

    log("PCA segmentation")
    clock = time.perf_counter()
    pca = compare([primary], analysis=analyze_pca, out=out / "pca-seg", description="PCA segmentation", seed=settings.seed,
                  examples=settings.examples, **shared)
    files["pca-seg"] = pca.files
    seconds["pca_seg"] = time.perf_counter() - clock

    log("orthogonality")
    clock = time.perf_counter()
    seeds = range(settings.seed, settings.seed + settings.baseline_seeds)
    orthogonality = compare(models, analysis=analyze_orthogonality, out=out / "orthogonality", description="orthogonality",
                            baseline_seeds=seeds, **shared)
    files["orthogonality"] = orthogonality.files
    seconds["orthogonality"] = time.perf_counter() - clock

    log("class rates")
    clock = time.perf_counter()
    by = "ground_truth" if settings.labelled else "prediction"
    class_rates = compare(models, analysis=analyze_class_rates, out=out / "class-rates", description="class rates", by=by,
                          bootstrap=settings.bootstrap, **shared)
    files["class-rates"] = class_rates.files
    seconds["class_rates"] = time.perf_counter() - clock

    log("attention")
    clock = time.perf_counter()
    few = replace(images, num_images=min(settings.attention_images, settings.num_images))
    attention = compare(models, analysis=analyze_attention, out=out / "attention", description="attention", attention=True,
                        examples=1, bootstrap=settings.bootstrap, **(shared | {"images": few}))
    files["attention"] = attention.files
    seconds["attention"] = time.perf_counter() - clock

    robustness = None
    if settings.labelled:
        log("robustness")
        clock = time.perf_counter()
        robustness = run_robustness(models, replace(images, num_images=settings.swept), resolve_perturbation("gaussian", "decoder"),
                                    settings.sigmas, out / "robustness", draws=settings.draws, seed=settings.seed, bootstrap=settings.bootstrap,
                                    settings={"input": settings.source}, progress=progress)
        if not robustness.complete:  # Ctrl-C: the partial sweep is on disk; stop as asked, without a summary
            raise KeyboardInterrupt
        files["robustness"] = robustness.files(out / "robustness")
        seconds["robustness"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if settings.source.get("dataset"):
        log("ablation")
    ablation = suite_ablation(models, settings, progress)
    if ablation is not None:
        files["ablation"] = ablation.save(out / "ablation") if is_writer() else []
        seconds["ablation"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - total  # loading the models included

    run = {"version": __version__, "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "date": started.isoformat(timespec="seconds"), "seed": settings.seed}
    result = SuiteResult(settings, models, rates.results[0], pca.results[0], dict(zip(orthogonality.labels, orthogonality.results)),
                         robustness, dict(zip(attention.labels, attention.results)),
                         dict(zip(class_rates.labels, class_rates.results)), ablation, run=run, seconds=seconds,
                         files={name: sorted(str(p.relative_to(out)) for p in paths) for name, paths in files.items()})
    result.findings = judge(result)
    result.warnings = sanity_warnings(result)
    if is_writer():
        save_json(out / "summary.json", result.summary())
    log(f"done in {seconds['total']:.0f} s")
    return result


def run_demo(
    out: str | Path = "figures", device: str = "cpu", settings: SuiteSettings | None = None, progress: bool = True,
    command: str | None = None,
) -> SuiteResult:
    """``run_suite`` on the built-in models: DEPICT-SA for the single-model analyses, all compared."""
    return run_suite([f"{BUILTIN}{name}" for name in DEFAULT_MODELS], out, settings, progress, command, device)
