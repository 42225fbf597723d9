"""One self-contained HTML page from a ``run_suite`` folder: figures embedded as PNG data, numbers as tables.

``write_report(summary, folder, path)`` reads the figures ``run_suite`` wrote under ``folder`` and
writes ``path``; the page needs no other file and no network.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

from depict_analysis.outputs import atomic_write_text

# How to read each figure: the same words as the README's gallery.
READING = {
    "coding-rate": (
        "First figure: R(P_lᵀZ_j), the coding rate of the patch tokens inside layer l's subspace (one line per "
        "layer l) after decoder layer j (j = 0 is the backbone output); CRATE's per-head sum R^c; the raw ratio "
        "R(P_lᵀZ_j)/R(Z_j), which also measures P's row norms and can exceed 1 (not a share); and the share "
        "R(U_lᵀZ_j)/R(Z_j) with U_l an orthonormal basis of span(P_l), the part of the tokens' rate that lies in "
        "subspace l (at most 1). Second figure: R(Z_j) and R(Q) of the class embeddings per stage. DEPICT's MSSA "
        "layers are derived as compression steps, so the rates should fall through the layers while the tokens "
        "gather into the learned subspaces."
    ),
    "pca-seg": (
        "Each token is labelled by its largest principal component, at the decoder input Z_0 and at Z_L1, the "
        "patch embeddings the mask head compares with the classes (after the final LayerNorm), and the segments are compared with the model's prediction and the ground truth "
        "(ARI, NMI, Hungarian-matched mIoU). If the decoder compresses tokens into class subspaces, "
        "PCA of Z_L1 should recover the segmentation better than PCA of Z_0."
    ),
    "orthogonality": (
        "Mean |cosine| between the basis vectors of different heads of every projection P, and between the "
        "final normalised class embeddings Q̂ (per image, then averaged) and the learned cls_emb, per model "
        "(filled), beside the same for freshly initialised decoders (hollow, mean ± std over seeds) and for "
        "random directions (dashed); then |Q̂ᵀQ̂| and the bases' |cosines|. Cosines, not raw PᵀP entries, which "
        "scale with ‖P‖². The paper argues that DEPICT's classes become near-orthogonal: small off-diagonal "
        "entries of Q̂ᵀQ̂. The mask head's LayerNorm over classes ignores any direction all classes share, so "
        "the centred value (class mean removed; floor 1/(K−1)) measures the orthogonality the masks use."
    ),
    "robustness": (
        "mIoU when Gaussian noise of std σ is added to every decoder parameter (mean over draws, band: ±1 std). "
        "A curve that stays flat to larger σ belongs to the more robust decoder; σ½ is where the mIoU "
        "falls to half its clean value."
    ),
}
TITLES = {"coding-rate": "Coding rates", "pca-seg": "PCA segmentation", "orthogonality": "Orthogonality",
          "robustness": "Robustness to decoder-parameter noise"}
FIGURES = {"coding-rate": ["coding_rate", "coding_rate_tokens"], "orthogonality": ["orthogonality", "orthogonality_P"],
           "robustness": ["robustness"]}
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.holds { color: #17702a; } .fails { color: #a11; }
"""


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _numbers(name: str, summary: dict) -> str:
    """The tables of one analysis."""
    if name == "coding-rate":
        rates = summary["coding_rate"]
        rows = [["R(Z_j) (nats)", *rates["token_rate"].values()]]
        for space in rates["share"]:
            rows.append([f"share in {space}: R(U_{space}ᵀZ_j) / R(Z_j)", *rates["share"][space].values()])
            rows.append([f"raw ratio R(P_{space}ᵀZ_j) / R(Z_j) (not a share)", *rates["raw_ratio"][space].values()])
        classes = _table(["class stage", "R(Q) (nats)"], rates["class_rate"].items())
        return _table(["", *rates["token_rate"]], rows) + classes
    if name == "pca-seg":
        pca = summary["pca_seg"]["mean_scores"]
        rows = [[ref.replace("_", " "), source, s["ari"], s["nmi"], s["miou"]]
                for ref, by_source in pca.items() for source, s in by_source.items()]
        return _table(["against", "segmentation", "ARI", "NMI", "mIoU"], rows)
    if name == "orthogonality":
        keys = ["final_Q_mean_abs_offdiag", "final_Q_mean_abs_offdiag_centred", "final_Q_coherence", "P_cross_head_mean_abs_cos"]
        rows = [[label, *(f"{_fmt(o[key])} ({_fmt(o[f'{key}_at_init'])})" for key in keys)]
                for label, o in summary["orthogonality"].items()]
        header = ["model (at init)", "Q̂ mean |cos|, i≠j", "centred (class mean removed)", "Q̂ coherence",
                  "P mean |cos| across heads"]
        return _table(header, rows)
    curves = summary["robustness"]
    labels = list(curves)
    sigmas = curves[labels[0]]["sigma"]
    rows = [[f"{sigma:g}", *(100 * curves[label]["miou"][i] for label in labels)] for i, sigma in enumerate(sigmas)]
    rows.append(["σ½", *(curves[label]["sigma_half"] for label in labels)])
    return _table(["σ", *(f"{label} mIoU (%)" for label in labels)], rows)


def render_report(summary: dict, folder: str | Path, title: str) -> str:
    """The HTML text of the report of the ``run_suite`` output in ``folder``."""
    folder = Path(folder)
    settings = summary["settings"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    source = ", ".join(f"{k} = {v}" for k, v in settings["source"].items() if v)
    parts.append(f"<p>Images: {html.escape(source)}; {settings['num_images']} per analysis.</p>")
    parts.append(_table(["model", "checkpoint", "decoder", "variant", "clean mIoU (%)"],
                        [[m["label"], m["source"], m["decoder"], m["variant"], 100 * summary["robustness"][m["label"]]["clean"]]
                         for m in summary["models"]]))
    if summary["claims"]:
        parts.append("<h2>The paper's claims on these numbers</h2><ul>")
        for claim in summary["claims"]:
            verdict = "holds" if claim["holds"] else "does not hold"
            values = ", ".join(f"{k}: {_fmt(v)}" for k, v in claim["values"].items())
            parts.append(f"<li class='{'holds' if claim['holds'] else 'fails'}'>{html.escape(claim['claim'])}: "
                         f"<b>{verdict}</b> ({values})</li>")
        parts.append("</ul>")
    for name, heading in TITLES.items():
        model = summary.get(name.replace("-", "_"), {}).get("model")
        parts.append(f"<h2>{heading}{f' — {html.escape(model)}' if isinstance(model, str) else ''}</h2>")
        parts.append(f"<p>{html.escape(READING[name])}</p>")
        figures = FIGURES.get(name) or sorted(p.stem for p in (folder / name).glob("pca-seg*.png"))
        parts += [_image(folder / name / f"{figure}.png") for figure in figures]
        parts.append(_numbers(name, summary))
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items())
    parts.append(f"<p><small>Time: {seconds}. Every number is in {html.escape(str(folder))}/*/*.json.</small></p></body></html>")
    return "\n".join(parts)


def write_report(summary: dict, folder: str | Path, path: str | Path, title: str = "depict-analysis report") -> Path:
    path = Path(path)
    atomic_write_text(path, render_report(summary, folder, title))
    return path
