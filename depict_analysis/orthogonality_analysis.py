"""Orthogonality of a model's head subspaces (PᵀP) and class embeddings (QᵀQ), SPEC.md §3.3.

``analyze_orthogonality(model, batches)`` returns one :class:`GramPanel` per matrix:
- ``P``: every projection the decoder owns (``Trace.subspaces``: DEPICT's MSSA / MSCA ``proj``,
  Segmenter's per-block query projection W_Q), raw ``PᵀP = proj projᵀ`` (h·p, h·p) with
  ``head_orthonormality`` (per head ‖P_kᵀP_k − I‖_F/√p), ``cross_head_mean_abs`` and ``coherence``;
- ``Q``: the final L2-normalised class embeddings Q̂ the mask head uses (Segmenter: after
  ``proj_classes``; linear: the classifier rows), Gram averaged over the images, and the learned
  ``cls_emb`` parameter (rows normalised) where the decoder has one; with ``coherence``,
  ``mean_abs_offdiag`` and ``coherence_per_image_mean``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from depict_analysis.models.errors import InputError
from depict_analysis import plots
from depict_analysis.inputs import image_progress
from depict_analysis.outputs import save_csv, save_figure, save_json
from depict_analysis.inputs import Batch
from depict_analysis.orthogonality import class_summary, subspace_summary
from depict_analysis.tracing import Subspace, describe_model, trace
from depict_analysis.models.device import autocast

FINAL_Q = "final_Q"
LEARNED_Q = "cls_emb"


@dataclass
class GramPanel:
    """One Gram matrix and its scalar summary.

    kind "P": ``gram = proj projᵀ`` of a subspace with ``heads`` blocks of ``dim_head`` rows (head k
    owns rows/cols k·p … (k+1)·p − 1); kind "Q": mean Gram of normalised class embeddings (heads = 1).
    """

    name: str
    kind: str  # "P" | "Q"
    gram: Tensor  # (n, n) float64
    stats: dict[str, float | list[float]]
    heads: int = 1
    dim_head: int = 0
    layer: int | None = None  # the decoder layer owning P (None: updates classes only, or Q)
    images: int = 0  # images the Q Gram is averaged over (0: image-independent)

    def layout(self) -> dict:
        """Head-block layout of the Gram rows: ``[{head, rows: [start, stop)}]``."""
        p = self.dim_head or len(self.gram)
        return {"heads": self.heads, "dim_head": p,
                "head_rows": [{"head": k, "rows": [k * p, (k + 1) * p]} for k in range(self.heads)]}

    def summary(self) -> dict:
        """JSON-ready description without the matrix."""
        info = {"name": self.name, "kind": self.kind, "size": len(self.gram), "layer": self.layer, **self.stats}
        if self.kind == "P":
            info |= self.layout()
        else:
            info["images"] = self.images
        return info


def subspace_panel(space: Subspace) -> GramPanel:
    """The P panel of one ``Trace`` subspace (proj (h, p, d))."""
    summary = subspace_summary(space.proj)
    gram = summary.pop("gram")
    h, p, _ = space.proj.shape
    stats = {"head_orthonormality_mean": float(np.mean(summary["head_orthonormality"])), **summary}
    return GramPanel(space.name, "P", gram.cpu(), stats, heads=h, dim_head=p, layer=space.layer)


def class_panel(name: str, Q: Tensor, images: int = 0) -> GramPanel:
    """The Q panel of class embeddings Q (K, d) or (B, K, d) (rows normalised, Gram averaged over B)."""
    summary = class_summary(Q)
    gram = summary.pop("gram")
    return GramPanel(name, "Q", gram.cpu(), summary, images=images)


def analyze_orthogonality(
    model: nn.Module, batches: Iterable[Batch], *, total: int | None = None, progress: bool = True, amp: bool = False
) -> dict:
    """P and Q Gram panels of a model, Q̂ averaged over the images of ``batches`` (any one size per batch).

    The forward passes run in float32 (bf16 autocast with ``amp`` on CUDA).

    Returns ``{"model": describe_model(...), "num_images", "panels": [GramPanel]}`` — P panels in
    the decoder's order, then the final Q̂, then ``cls_emb`` where it exists.
    """
    device = next(model.parameters()).device
    finals, first = [], None
    with image_progress(total, "orthogonality", progress) as advance:
        for batch in batches:
            with autocast(device, amp):
                tr = trace(model, model.normalize(batch.pixels.to(device)))
            finals.append(tr.class_embeddings.to(torch.float64))
            first = first or tr
            advance(len(batch.paths))
    if first is None:
        raise InputError("no images to analyse")
    Q = torch.cat(finals)
    panels = [subspace_panel(space) for space in first.subspaces]
    panels.append(class_panel(FINAL_Q, Q, images=len(Q)))
    if model.decoder.class_tokens is not None:
        panels.append(class_panel(LEARNED_Q, model.decoder.class_tokens.detach()))
    return {"model": describe_model(model), "num_images": len(Q), "panels": panels}


def summary_rows(label: str, result: dict) -> list[dict]:
    """CSV rows: one per panel, ``checkpoint`` first, per-head values as ``;``-joined text."""
    rows = []
    for panel in result["panels"]:
        info = {"checkpoint": label, "family": result["model"]["decoder"], **panel.summary()}
        info.pop("head_rows", None)
        if "head_orthonormality" in info:
            info["head_orthonormality"] = ";".join(f"{v:.6g}" for v in info["head_orthonormality"])
        rows.append(info)
    return rows


def grams(label: str, result: dict) -> dict[str, np.ndarray]:
    """The matrices behind the figure, keyed ``<label>/<panel name>`` (for ``numpy.savez``)."""
    return {f"{label}/{panel.name}": panel.gram.numpy() for panel in result["panels"]}


def _cell(panel: GramPanel) -> plots.GramCell:
    if panel.kind == "P":
        text = (f"{panel.name}: {panel.heads} heads × {panel.dim_head}\n"
                f"coh {panel.stats['coherence']:.2f}, "
                rf"$\|P_k^\top P_k - I\|/\sqrt{{p}}$ {panel.stats['head_orthonormality_mean']:.2f}")
        return plots.GramCell(panel.gram.numpy(), text, panel.dim_head)
    what = rf"final $\hat{{Q}}$, mean of {panel.images} images" if panel.images else f"learned {panel.name}"
    text = (f"{what}\ncoh {panel.stats['coherence']:.2f}, mean |off-diag| {panel.stats['mean_abs_offdiag']:.2f}"
            f" (centred {panel.stats['mean_abs_offdiag_centred']:.2f})")
    return plots.GramCell(panel.gram.numpy(), text)


def orthogonality_figure(labels: Sequence[str], results: Sequence[dict]) -> Figure:
    """Models side by side (columns); rows: the i-th P of every model, then final Q̂, then cls_emb.

    Each row shares one colour scale centred at 0; head blocks of P are outlined.
    """
    p_panels = [[p for p in r["panels"] if p.kind == "P"] for r in results]
    rows = [[ps[i] if i < len(ps) else None for ps in p_panels] for i in range(max(map(len, p_panels)))]
    for name in (FINAL_Q, LEARNED_Q):
        rows.append([next((p for p in r["panels"] if p.name == name), None) for r in results])
    rows = [row for row in rows if any(p is not None for p in row)]
    cells = [[_cell(p) if p is not None else None for p in row] for row in rows]
    kinds = [next(p.kind for p in row if p is not None) for row in rows]
    scale_labels = [r"entry of $P^\top P$" if kind == "P" else "cosine" for kind in kinds]
    columns = [f"{label} ({r['model']['decoder']})" for label, r in zip(labels, results)]
    title = (r"Gram matrices: raw $P^\top P$ per layer (head blocks outlined), normalised $\hat{Q}^\top\hat{Q}$"
             "; colour scale shared per row")
    return plots.gram_grid_figure(cells, columns, scale_labels, title)


NAME = "orthogonality"


def write_orthogonality(
    labels: Sequence[str], checkpoints: Sequence[str], results: Sequence[dict], out: str | Path, settings: dict
) -> list[Path]:
    """``orthogonality.png/.pdf`` (the models side by side), ``orthogonality.json`` (``settings``, per
    checkpoint its panels' summaries), ``orthogonality.csv`` (``summary_rows``) and the matrices in
    ``orthogonality_grams.npz`` (keys ``<label>/<panel name>``) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    matrices = {key: m for label, result in zip(labels, results) for key, m in grams(label, result).items()}
    np.savez_compressed(out / f"{NAME}_grams.npz", **matrices)
    report = {
        **settings,
        "checkpoints": [
            {"label": label, "path": path, "model": r["model"], "num_images": r["num_images"],
             "panels": [panel.summary() for panel in r["panels"]]}
            for label, path, r in zip(labels, checkpoints, results)
        ],
        "grams": f"{NAME}_grams.npz (keys <label>/<matrix name>)",
    }
    rows = [row for label, result in zip(labels, results) for row in summary_rows(label, result)]
    return [
        *save_figure(orthogonality_figure(labels, results), out, NAME),
        save_json(out / f"{NAME}.json", report),
        save_csv(out / f"{NAME}.csv", rows),
        out / f"{NAME}_grams.npz",
    ]
