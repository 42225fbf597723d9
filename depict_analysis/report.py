"""One self-contained HTML page from a ``run_suite`` result: figures embedded as PNG data, numbers as tables.

``write_report(result, folder, path)`` renders ``templates/report.html.j2`` (Jinja2, every value
escaped) with: the package version, command, date and seed of the run; a table of contents; the
models with their clean mIoU; the warnings; the paper's claims and the other observations, each with
its statistic, data, verdict and intervals; and per analysis its figures and tables, every number
with its interval. Only the figures this run wrote (``result.files``) are shown, whatever else the
folder holds. Each figure is shown at its printed size, enlarged until its smallest text is 10.5 CSS
px (``display_width``); one wider than the page scrolls sideways. The page needs no other file and
no network.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import jinja2
import PIL.Image

from depict_analysis.claims import Finding
from depict_analysis.outputs import FIGURE_DPI, MIN_FONT_KEY, atomic_write_text
from depict_analysis.robustness import PROTOCOLS
from depict_analysis.suite import SuiteResult, p_cosine, q_offdiag, token_rates
from depict_analysis.uncertainty import Interval, intervals, mean_interval, percentile_interval

MIN_TEXT_PX = 10.5  # the smallest text a figure shows on the page, CSS px (10 px and a margin for rounding)
CSS_PX_PER_INCH = 96
DEFAULT_MIN_FONT_PT = 6.0  # a PNG that does not record its smallest font (not written by save_figure)

# How to read each figure: the same words as the README's gallery.
READING = {
    "coding-rate": (
        "First figure: for each subspace P_l, the share of the coding rate R(Z_j) of the patch tokens that lies in "
        "span(P_l) (an orthonormal basis of it: at most 1) after decoder layer j (j = 0 is the backbone output); the "
        "raw ratio R(P_lᵀZ_j) / R(Z_j), which includes P's row norms and is not a share, is in the JSON and CSV. "
        "Second figure: R(Z_j) and R(Q) of the class embeddings per stage. DEPICT's MSSA layers are derived as "
        "compression steps against the subspaces, so the tokens should gather into them through the layers."
    ),
    "pca-seg": (
        "Each token is labelled by its largest principal component, at the decoder input Z_0 and after the last "
        "layer, and the segments are compared with the ground truth and the model's prediction (ARI, NMI, "
        "Hungarian-matched mIoU). If the decoder compresses tokens into class subspaces, PCA of the last layer "
        "should recover the segmentation better than PCA of Z_0; the claim is judged against the ground truth."
    ),
    "orthogonality": (
        "Gram matrices of every layer's projection P (raw PᵀP, head blocks outlined) and of the final "
        "normalised class embeddings Q̂ (cosines), one column per model. The paper argues that DEPICT's classes "
        "and subspaces become near-orthogonal. The table gives scale-free statistics: mean |cosine| between "
        "distinct rows of Q̂ per image (and with the class mean removed, as the mask head's LayerNorm over "
        "classes sees them), and between distinct basis vectors of P, beside fresh initialisations of the same "
        "decoder."
    ),
    "robustness": (
        "mIoU when Gaussian noise of std σ is added to every decoder parameter (mean over draws; band: "
        "bootstrap interval over images and draws). A curve that stays flat to larger σ belongs to the more "
        "robust decoder; σ½ is where the mIoU falls to half its clean value."
    ),
    "attention": (
        "Where each class query looks: the share of its attention over the patches that lands on its own class's "
        "patches (majority label per patch: the ground truth where the images have labels, else the model's own "
        "prediction), per layer and head, against what uniform attention would give; then one example image per "
        "model and layer, each query's map over it, all maps of a figure on one colour scale."
    ),
    "class-rates": (
        "Per-class coding rates through the decoder (MCR²): R(Z_j) of the labelled tokens, the class-weighted "
        "Σ_c (N_c/N) R(Z_{j,c}) and the rate reduction ΔR_j, their difference, per token stage, with each class's "
        "rate as a heatmap. A decoder that separates classes into their own subspaces raises ΔR through its layers. "
        "Tokens take the majority label of their pixels: the ground truth where the images have labels, else the "
        "model's prediction."
    ),
    "ablation": (
        "Each head removed in turn (zero-ablation: it contributes nothing to its layer's update; for DEPICT, "
        "nothing is written into its subspace span(P_k)), scored on the same images as the clean model with the "
        "evaluation protocol: the change of every class's IoU, in points (red: the class loses). The class "
        "concentration of a head is the Herfindahl index of its per-class IoU losses: 1 when one class bears the "
        "whole loss, 1/K when all classes lose alike; a model's is the mean over its heads weighted by their losses."
    ),
}
TITLES = {"coding-rate": "Coding rates", "pca-seg": "PCA segmentation", "orthogonality": "Orthogonality",
          "robustness": "Robustness to decoder-parameter noise", "attention": "Attention on each class",
          "class-rates": "Per-class coding rates and ΔR", "ablation": "Ablation of each head"}


def _text(value: Interval | None, scale: float = 1.0) -> str:
    return "—" if value is None else value.text(scale)


def _table(header: list[str], rows: list[list[Any]], caption: str = "") -> dict[str, Any]:
    return {"header": header, "rows": [[cell if isinstance(cell, str) else _text(cell) for cell in row] for row in rows],
            "caption": caption}


def _finding(finding: Finding) -> dict[str, Any]:
    return {"statement": finding.statement, "verdict": finding.verdict, "statistic": finding.statistic,
            "data": finding.data, "notes": finding.notes, "difference": _text(finding.difference),
            "numbers": {label: value.text() for label, value in finding.values.items()}}


def _coding_rate_tables(result: SuiteResult) -> list[dict]:
    rates, bootstrap = result.rates, result.settings.bootstrap
    header = ["", *(f"j = {j} ({name})" for j, name in enumerate(rates.token_names))]
    rows = [["R(Z_j) (nats)", *intervals(token_rates(rates), bootstrap)]]
    for name in rates.share:
        rows.append([f"share: R(U_{name}ᵀZ_j) / R(Z_j)", *intervals(rates.share[name].per_image, bootstrap)])
        rows.append([f"raw ratio: R(P_{name}ᵀZ_j) / R(Z_j)", *intervals(rates.raw_ratio[name].per_image, bootstrap)])
    classes = _table(["class stage", *rates.class_stages],
                     [["R(Q) (nats)", *intervals(rates.class_rate.per_image, bootstrap)]])
    caption = (f"{result.primary.label}: mean over images [interval]; the share uses an orthonormal basis U of span(P) "
               "(≤ 1), the raw ratio P as the layer uses it (its row norms included: not a share)")
    return [_table(header, rows, caption), classes]


def _pca_table(result: SuiteResult) -> dict:
    bootstrap, pca = result.settings.bootstrap, result.pca
    rows = []
    for reference in ("ground_truth", "prediction"):
        for source in pca.scores.get(reference, {}):
            rows.append([reference.replace("_", " "), source,
                         *(mean_interval(pca.scores[reference][source][score].per_image, bootstrap)
                           for score in ("ari", "nmi", "miou"))])
    return _table(["against", "segmentation", "ARI", "NMI", "mIoU"], rows, "mean over images [interval]")


def _orthogonality_table(result: SuiteResult) -> dict:
    bootstrap, level = result.settings.bootstrap, result.settings.level
    rows = []
    for model in result.models:
        numbers = result.orthogonality[model.label]
        q, centred = (mean_interval(q_offdiag(numbers, c), bootstrap) for c in (False, True))
        p, init = p_cosine(numbers)
        rows.append([model.label, q, centred, "—" if p is None else f"{p:.3g}",
                     "—" if init is None else percentile_interval(init, float(init.mean()), level)])
    header = ["model", "Q̂ mean |cos|, per image", "class mean removed", "P mean |cos| across heads (exact)",
              "P at initialisation"]
    return _table(header, rows, "Q̂: mean over images [interval]; initialisation: mean [central range] of fresh decoders")


def _robustness_table(result: SuiteResult) -> dict:
    robustness = result.robustness
    curves = [robustness.curve(label) for label in robustness.labels]
    rows = [[f"{sigma:g}", *(c.interval[i].text(100) for c in curves)] for i, sigma in enumerate(curves[0].sigma)]
    rows.append(["σ½", *(c.sigma_half(result.settings.level).text() for c in curves)])
    return _table(["σ", *(f"{label} mIoU (%)" for label in robustness.labels)], rows,
                  f"mean over draws [interval]; images scored as {PROTOCOLS[robustness.settings['protocol']]}")


def _ablation_table(result: SuiteResult) -> dict:
    ablation = result.ablation
    rows = []
    for label in ablation.labels:
        rows.append([label, "clean", ablation.clean(label).text(100), "", ablation.model_concentration(label)])
        rows += [["", r["unit"], r["miou"].text(100), r["change"].text(100), r["concentration"]] for r in ablation.unit_rows(label)]
    return _table(["model", "head", "mIoU (%)", "change (points)", "class concentration"], rows,
                  "dataset-level mIoU [paired bootstrap interval over images]")


def display_width(png: Path) -> tuple[int, float]:
    """The width (CSS px) to show a figure at, and its smallest font size (pt).

    A figure is shown at its printed size (``FIGURE_DPI`` pixels of the PNG per inch, 96 CSS px per
    inch), enlarged where its smallest text would be under ``MIN_TEXT_PX``: so a narrow figure is not
    blown up to the page's width, and a wide one is not shrunk until its text is unreadable (the page
    scrolls it sideways instead).
    """
    with PIL.Image.open(png) as image:
        width, fields = image.width, getattr(image, "text", {})
    min_pt = float(fields.get(MIN_FONT_KEY, DEFAULT_MIN_FONT_PT))
    printed = width / FIGURE_DPI * CSS_PX_PER_INCH
    enlarge = max(1.0, MIN_TEXT_PX / (min_pt * CSS_PX_PER_INCH / 72))
    return math.ceil(printed * enlarge), min_pt


def _attention_table(result: SuiteResult) -> dict:
    rows = []
    for label, maps in result.attention.items():
        for layer in maps.class_layers:
            rows.append([label, layer, maps.share(layer).text(100), maps.share_chance().text(100), maps.lift(layer).text(100)])
    by = next(iter(result.attention.values())).settings["classes_by"] if result.attention else ""
    return _table(["model", "layer", "own-class share (%)", "uniform attention (%)", "lift (points)"], rows,
                  f"mean over images [interval]; patches labelled by {by.replace('_', ' ')}")


def _class_rates_table(result: SuiteResult) -> dict:
    rows = []
    stages = max(len(rates.layers) for rates in result.class_rates.values())
    for label, rates in result.class_rates.items():
        for quantity, values in (("R(Z_j)", rates.total), ("ΔR_j", rates.delta)):
            cells = [f"{name}: {value.text()}" for name, value in zip(rates.layers, intervals(values, rates.bootstrap))]
            rows.append([label, quantity, *cells, *["—"] * (stages - len(cells))])
    first = next(iter(result.class_rates.values()))
    header = ["model", "nats", *(f"j = {j}" for j in range(stages))]
    return _table(header, rows, f"mean over images [interval]; tokens labelled by {first.settings['by'].replace('_', ' ')}")


def _figures(result: SuiteResult, folder: Path, name: str) -> list[dict[str, Any]]:
    """This run's PNG figures of one analysis, as base64 data with the width to show them at."""
    pngs = [folder / path for path in result.files.get(name, []) if path.endswith(".png")]
    figures = []
    for path in pngs:
        width, min_pt = display_width(path)
        figures.append({"name": path.stem, "data": base64.b64encode(path.read_bytes()).decode("ascii"), "width": width,
                        "min_font_pt": f"{min_pt:g}"})
    return figures


def report_page(result: SuiteResult, folder: str | Path, title: str) -> dict[str, Any]:
    """Everything the template shows, as strings (the template escapes them)."""
    folder = Path(folder)
    settings, robustness = result.settings, result.robustness
    scores = (lambda m: [robustness.curve(m.label).clean.text(100), robustness.curve(m.label).sigma_half(settings.level).text()]
              ) if robustness is not None else (lambda m: ["— (no labels)", "—"])
    models = _table(["model", "checkpoint", "decoder", "role", "variant", "clean mIoU (%)", "σ½"], [
        [m.label, m.source, m.family, m.role, m.model.config.name, *scores(m)] for m in result.models])
    tables = {"coding-rate": lambda: _coding_rate_tables(result), "pca-seg": lambda: [_pca_table(result)],
              "orthogonality": lambda: [_orthogonality_table(result)], "robustness": lambda: [_robustness_table(result)],
              "attention": lambda: [_attention_table(result)], "class-rates": lambda: [_class_rates_table(result)],
              "ablation": lambda: [_ablation_table(result)]}
    sections = [{"id": name, "title": TITLES[name] + (f" — {result.primary.label}" if name in ("coding-rate", "pca-seg") else ""),
                 "reading": READING[name], "figures": _figures(result, folder, name), "tables": tables[name]()}
                for name in TITLES if name in result.files]  # the analyses this run made
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    run = result.run | {
        "images": settings.images(result.num_images),
        "intervals": f"{100 * settings.level:g} % percentile bootstrap over images ({settings.resamples} resamples, "
                     f"seed {settings.seed}); robustness also over noise draws",
        "seconds": seconds, "folder": str(folder),
    }
    return {"title": title, "run": run, "models": models, "warnings": result.warnings,
            "claims": [_finding(f) for f in result.findings if f.kind == "claim"],
            "observations": [_finding(f) for f in result.findings if f.kind == "observation"], "sections": sections}


def render_report(result: SuiteResult, folder: str | Path, title: str) -> str:
    """The HTML text of the report of ``result``, whose files are under ``folder``."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("depict_analysis", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    return environment.get_template("report.html.j2").render(report_page(result, folder, title))


def write_report(result: SuiteResult, folder: str | Path, path: str | Path, title: str = "depict-analysis report") -> Path:
    path = Path(path)
    atomic_write_text(path, render_report(result, folder, title))
    return path
