"""PCA segmentation of token embeddings (SPEC.md §3.2).

Pure functions on tensors: no model, no plotting. Tokens are rows, ``Z: (N, d)`` for one image or
``Z: (B, N, d)`` for a batch; every image is analysed on its own (its own mean and directions).
The linear algebra runs in float64 on the input's device.

The segmentation rule mirrors the decoder's mask head: with the top-k principal directions
``p_1..p_k`` standing in for the class embeddings, token i gets ``argmax_c p_cᵀ (z_i − z̄)``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

from depict_analysis.foundation.errors import ConfigError, InputError

METHODS = ("argmax", "kmeans")


def _as_tokens(Z: Tensor) -> Tensor:
    """Validate ``Z: (N, d)`` or ``(B, N, d)`` and return it as float64."""
    if Z.ndim not in (2, 3):
        raise InputError(f"expected tokens of shape (N, d) or (B, N, d), got {tuple(Z.shape)}")
    return Z.to(torch.float64)


def _check_k(k: int, Z: Tensor) -> None:
    n, d = Z.shape[-2:]
    if not 1 <= k <= min(n, d):
        raise ConfigError(f"k must be in [1, min(N, d)] = [1, {min(n, d)}], got {k}")


def _centre(Z: Tensor) -> Tensor:
    """Subtract each image's mean token: (..., N, d) -> (..., N, d)."""
    return Z - Z.mean(dim=-2, keepdim=True)


def _fix_signs(V: Tensor) -> Tensor:
    """Flip each row of ``V: (..., k, d)`` so that its largest-|.| coordinate is positive.

    Ties in |.| go to the first coordinate (``argmax`` convention).
    """
    largest = V.gather(-1, V.abs().argmax(dim=-1, keepdim=True))
    return torch.where(largest < 0, -V, V)


def pca_directions(Z: Tensor, k: int) -> Tensor:
    """Top-k principal directions of each image's tokens.

    Z: (N, d) or (B, N, d). Returns (k, d) or (B, k, d), float64, orthonormal rows:
    the top-k right singular vectors of the centred tokens ``Z − z̄`` (exact SVD, descending
    singular values), each multiplied by ±1 so that its largest-magnitude coordinate is positive.
    The result is deterministic and invariant to permuting the tokens or negating ``Z``
    (up to the SVD's own freedom inside repeated singular values).
    """
    Z = _as_tokens(Z)
    _check_k(k, Z)
    _, _, Vh = torch.linalg.svd(_centre(Z), full_matrices=False)
    return _fix_signs(Vh[..., :k, :])


def _pca_coordinates(Z: Tensor, k: int) -> Tensor:
    """PCA coordinates ``(z_i − z̄)ᵀ p_c``: (..., N, d) -> (..., N, k), float64."""
    Z = _as_tokens(Z)
    return _centre(Z) @ pca_directions(Z, k).transpose(-1, -2)


def _kmeans_labels(coords: Tensor, k: int, seed: int) -> Tensor:
    """k-means (n_init=10, random_state=seed) on one image's coordinates (N, k) -> (N,)."""
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    labels = km.fit_predict(coords.cpu().numpy())
    return torch.from_numpy(labels.astype(np.int64)).to(coords.device)


def pca_segment(Z: Tensor, k: int, method: str = "argmax", seed: int = 0) -> Tensor:
    """Segment each image's tokens into at most k groups using its top-k principal directions.

    Z: (N, d) or (B, N, d). Returns labels (N,) or (B, N), int64 in [0, k).
    - ``"argmax"``: ``label_i = argmax_c p_cᵀ (z_i − z̄)`` — the decoder's rule with the PCA
      directions in place of Q (depends on the sign convention of :func:`pca_directions`).
    - ``"kmeans"``: scikit-learn KMeans (n_init=10, random_state=seed) on the k PCA coordinates,
      one image at a time.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    coords = _pca_coordinates(Z, k)
    if method == "argmax":
        return coords.argmax(dim=-1)
    if coords.ndim == 2:
        return _kmeans_labels(coords, k, seed)
    return torch.stack([_kmeans_labels(c, k, seed) for c in coords])


def pca_rgb(Z: Tensor) -> Tensor:
    """RGB view of the first three PCA coordinates: (N, d) -> (N, 3) or (B, N, d) -> (B, N, 3).

    Each coordinate is min-max scaled to [0, 1] per image; a constant coordinate maps to 0.
    Returns float64.
    """
    coords = _pca_coordinates(Z, 3)
    lo = coords.amin(dim=-2, keepdim=True)
    span = coords.amax(dim=-2, keepdim=True) - lo
    return (coords - lo) / torch.where(span > 0, span, 1.0)


MIN_SEGMENT_SHARE = 0.01  # the smallest share of an image a predicted class needs to count as a segment (choose_k)


def choose_k(predicted_labels: Tensor, lo: int = 2, hi: int = 8, min_share: float = MIN_SEGMENT_SHARE) -> int:
    """Number of classes covering at least ``min_share`` of ``predicted_labels`` (any shape), clamped to
    [lo, hi]: a class predicted on a few stray pixels is no segment for PCA to find."""
    if not 1 <= lo <= hi:
        raise ConfigError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    if not 0 <= min_share < 1:
        raise ConfigError(f"min_share is a share of the pixels in [0, 1), got {min_share}")
    _, counts = predicted_labels.unique(return_counts=True)
    return min(max(int((counts >= min_share * predicted_labels.numel()).sum()), lo), hi)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index of each output position: floor((i + ½) n_in / n_out), in exact integers."""
    i = torch.arange(n_out, device=device)
    return ((2 * i + 1) * n_in) // (2 * n_out)


def upsample_labels(labels: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of a token label map.

    labels: (h*w,) or (B, h*w) in row-major token order; grid = (h, w); size = (H, W).
    Returns (H, W) or (B, H, W), same dtype. Output pixel (y, x) takes the label of token
    (⌊(y + ½)·h/H⌋, ⌊(x + ½)·w/W⌋) — pixel-centre aligned like ``mode="nearest-exact"`` and
    identical to repeating each label (H/h)×(W/w) times when the factors are integers.
    ``size`` is the area the grid covers: for a padded image pass the padded size, then crop.
    """
    h, w = grid
    if labels.shape[-1] != h * w or labels.ndim not in (1, 2):
        raise InputError(f"labels of shape {tuple(labels.shape)} do not match grid {grid}")
    H, W = size
    rows = _nearest_index(h, H, labels.device)
    cols = _nearest_index(w, W, labels.device)
    label_map = labels.reshape(*labels.shape[:-1], h, w)
    return label_map[..., rows[:, None], cols[None, :]]


def _iou_matching(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, ...]:
    """IoU of every segment with every reference class, and the one-to-one matching maximising it.

    pred, ref: 1-D arrays of ids. Returns ``(iou (n_seg, n_cls), rows, cols, segment ids, class ids)``
    where segment ``segment_ids[rows[i]]`` is matched to class ``class_ids[cols[i]]``
    (scipy ``linear_sum_assignment``, maximising the total IoU).
    """
    seg_ids, seg = np.unique(pred, return_inverse=True)
    cls_ids, cls = np.unique(ref, return_inverse=True)
    n_seg, n_cls = len(seg_ids), len(cls_ids)
    inter = np.bincount(seg * n_cls + cls, minlength=n_seg * n_cls).reshape(n_seg, n_cls)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = inter / union
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return iou, rows, cols, seg_ids, cls_ids


def _hungarian_miou(pred: np.ndarray, ref: np.ndarray) -> float:
    """mIoU over the reference classes after a one-to-one segment -> class matching.

    The matching maximises the total IoU (see :func:`_iou_matching`); reference classes left
    unmatched (fewer segments than classes) count IoU 0. Extra segments are unmatched and only
    lower the IoU of the classes they overlap.
    """
    iou, rows, cols, _, cls_ids = _iou_matching(pred, ref)
    return float(iou[rows, cols].sum() / len(cls_ids))


def match_segments(pred: Tensor, ref: Tensor, ignore_index: int = 255) -> dict[int, int]:
    """The Hungarian segment -> class matching behind the mIoU of :func:`segmentation_scores`.

    pred: segment ids (H, W); ref: class labels (H, W), pixels equal to ``ignore_index`` left out.
    Returns ``{segment id: class id}`` for the matched pairs that overlap (at most one segment per
    class; pairs with IoU 0 and segments lying wholly in the ignored area are absent).
    """
    keep = ref != ignore_index
    if not bool(keep.any()):
        return {}
    iou, rows, cols, seg_ids, cls_ids = _iou_matching(pred[keep].cpu().numpy(), ref[keep].cpu().numpy())
    return {int(seg_ids[r]): int(cls_ids[c]) for r, c in zip(rows, cols) if iou[r, c] > 0}


def segmentation_scores(pred: Tensor, ref: Tensor, ignore_index: int = 255) -> dict[str, float]:
    """Agreement of a segmentation with a reference, on pixels where ref != ignore_index.

    pred: segment ids (H, W) (any ids: only the partition matters); ref: class labels (H, W).
    Returns ``{"ari": adjusted Rand index, "nmi": normalized mutual information (sklearn, arithmetic
    normalisation), "miou": mIoU after Hungarian matching}`` (see :func:`_hungarian_miou`).
    All three are invariant to renaming segment ids.
    """
    if pred.shape != ref.shape:
        raise InputError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in shape")
    keep = ref != ignore_index
    if not bool(keep.any()):
        raise InputError("every reference pixel is ignore_index: nothing to score")
    p = pred[keep].cpu().numpy()
    r = ref[keep].cpu().numpy()
    return {
        "ari": float(adjusted_rand_score(r, p)),
        "nmi": float(normalized_mutual_info_score(r, p)),
        "miou": _hungarian_miou(p, r),
    }
