"""The training losses: per-pixel cross-entropy (Segmenter, DEPICT, ...) and MaskFormer's set loss.

``step_loss(decoder, labels)`` gives the loss of one rank's share of a training step as a function of
its micro-batches: the micro-batches' losses sum to the share's loss, so ``grad_accum`` leaves the
gradient unchanged. Its normalisers come from the whole share's labels.

MaskFormer's loss, as the official ``mask_former/modeling/{matcher,criterion}.py`` on its semantic
targets (``mask_former_semantic_dataset_mapper.py``: one binary mask per class present in the label
map, ignored pixels 0 in every mask). For every decoder layer (deep supervision, each layer matched
on its own), per image:

- matching (``HungarianMatcher``): the targets' masks brought to the predictions' grid (nearest),
  cost(q, t) = mask_weight · focal(q, t) − p_q(class_t) + dice_weight · dice(q, t), with p the
  softmax over the K + 1 classes, focal the sigmoid focal loss (α = 0.25, γ = 2) averaged over the
  pixels and dice = 1 − (2 σ(m)·t + 1) / (Σσ(m) + Σt + 1); ``scipy.optimize.linear_sum_assignment``.
- loss (``SetCriterion``): the cross-entropy of every query's K + 1 logits against its matched class
  or "no object" (K), weighted by class (1, "no object" ``no_object_weight``) and divided by the sum of
  the weights; for the matched pairs the focal and dice losses with the predictions upsampled
  (bilinear) to the label size, summed and divided by the number of target masks (at least 1).
  Total: CE + mask_weight · focal + dice_weight · dice, summed over the layers.

The official code averages the number of target masks over the processes; here, as for the
cross-entropy, each rank normalises by its own share and DDP averages the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from depict_analysis.models.data import IGNORE_INDEX
from depict_analysis.models.decoders.maskformer import MaskFormerConfig, MaskPredictions

MicroLoss = Callable[[Callable, Tensor, Tensor], Tensor]  # (forward, images, labels) -> loss


# ------------------------------------------------------------------------------------------- targets


def class_targets(labels: Tensor, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """Label maps (B, H, W) -> per image the classes present (T,) (ascending, ``IGNORE_INDEX``
    left out) and their binary masks (T, H, W) of ``dtype``."""
    targets = []
    for label in labels:
        classes = label.unique()
        classes = classes[classes != IGNORE_INDEX]
        targets.append((classes, (label[None] == classes[:, None, None]).to(dtype)))
    return targets


def _precise(x: Tensor) -> Tensor:
    """x in float32 at least (bf16 / fp16 predictions under autocast are scored in float32)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class SetNormalizers:
    """What MaskFormer's loss divides by, over a rank's whole share of a step: the number of target
    masks (at least 1) and the sum of the class weights of all queries' targets."""

    masks: float
    class_weight: float

    @classmethod
    def of(cls, labels: Tensor, n_queries: int, no_object_weight: float) -> "SetNormalizers":
        """Each image matches min(T, Q) queries to its T classes (weight 1); the rest are "no object"."""
        counts = [int((label.unique() != IGNORE_INDEX).sum()) for label in labels]
        matched = sum(min(t, n_queries) for t in counts)
        return cls(max(sum(counts), 1), matched + (len(counts) * n_queries - matched) * no_object_weight)


# ------------------------------------------------------------------------------------------ matching


def focal_cost(mask_logits: Tensor, masks: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The sigmoid focal loss of every prediction against every target, mean over pixels.

    mask_logits: (Q, P), masks: (T, P) binary -> (Q, T).
    """
    prob = mask_logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(mask_logits, torch.ones_like(prob), reduction="none")
    negative = (1 - alpha) * prob**gamma * F.binary_cross_entropy_with_logits(mask_logits, torch.zeros_like(prob), reduction="none")
    return (positive @ masks.T + negative @ (1 - masks).T) / mask_logits.shape[1]


def dice_cost(mask_logits: Tensor, masks: Tensor) -> Tensor:
    """1 − (2 σ(m)·t + 1) / (Σσ(m) + Σt + 1) for every prediction and target: (Q, P), (T, P) -> (Q, T)."""
    prob = mask_logits.sigmoid()
    return 1 - (2 * prob @ masks.T + 1) / (prob.sum(-1)[:, None] + masks.sum(-1)[None, :] + 1)


@torch.no_grad()
def match(class_logits: Tensor, mask_logits: Tensor, classes: Tensor, masks: Tensor,
          mask_weight: float, dice_weight: float) -> tuple[Tensor, Tensor]:
    """One image's bipartite matching of queries to its targets (``HungarianMatcher``).

    class_logits: (Q, K + 1), mask_logits: (Q, h, w), classes: (T,), masks: (T, H, W) ->
    (query indices, target indices), min(Q, T) pairs, target indices in scipy's order.
    """
    logits = _precise(mask_logits).flatten(1)
    masks = F.interpolate(masks[:, None].to(logits.dtype), size=mask_logits.shape[-2:], mode="nearest")[:, 0].flatten(1)
    cost = (mask_weight * focal_cost(logits, masks) - _precise(class_logits).softmax(-1)[:, classes]
            + dice_weight * dice_cost(logits, masks))
    queries, targets = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- loss


def sigmoid_focal(mask_logits: Tensor, masks: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The sigmoid focal loss of each prediction against its own target, mean over pixels: (n, P), (n, P) -> (n,)."""
    prob = mask_logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(mask_logits, masks, reduction="none")
    p_t = prob * masks + (1 - prob) * (1 - masks)
    alpha_t = alpha * masks + (1 - alpha) * (1 - masks)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1)


def dice_loss(mask_logits: Tensor, masks: Tensor) -> Tensor:
    """``dice_cost`` of each prediction against its own target: (n, P), (n, P) -> (n,)."""
    prob = mask_logits.sigmoid()
    return 1 - (2 * (prob * masks).sum(-1) + 1) / (prob.sum(-1) + masks.sum(-1) + 1)


def layer_loss(config: MaskFormerConfig, class_logits: Tensor, mask_logits: Tensor, targets: list[tuple[Tensor, Tensor]],
               norms: SetNormalizers) -> Tensor:
    """One layer's loss: class_logits (B, Q, K + 1), mask_logits (B, Q, h, w), ``class_targets``."""
    B, Q, K1 = class_logits.shape
    target_classes = torch.full((B, Q), K1 - 1, dtype=torch.long, device=class_logits.device)
    matched, target_masks = [], []
    for b, (classes, masks) in enumerate(targets):
        queries, order = match(class_logits[b], mask_logits[b], classes, masks, config.mask_weight, config.dice_weight)
        queries, order = queries.to(classes.device), order.to(classes.device)
        target_classes[b, queries] = classes[order]
        matched.append(mask_logits[b, queries])
        target_masks.append(masks[order])
    class_logits = _precise(class_logits)
    weight = torch.ones(K1, dtype=class_logits.dtype, device=class_logits.device)
    weight[-1] = config.no_object_weight
    ce = F.cross_entropy(class_logits.transpose(1, 2), target_classes, weight, reduction="sum") / norms.class_weight
    predicted, truth = _precise(torch.cat(matched)), torch.cat(target_masks)
    truth = truth.to(predicted.dtype)
    predicted = F.interpolate(predicted[:, None], size=truth.shape[-2:], mode="bilinear", align_corners=False)
    predicted, truth = predicted.flatten(1), truth.flatten(1)
    focal = sigmoid_focal(predicted, truth).sum() / norms.masks
    dice = dice_loss(predicted, truth).sum() / norms.masks
    return ce + config.mask_weight * focal + config.dice_weight * dice


def set_loss(config: MaskFormerConfig, predictions: MaskPredictions, labels: Tensor,
             norms: SetNormalizers | None = None) -> Tensor:
    """MaskFormer's loss of ``predictions`` (every layer's) against label maps (B, H, W), summed over
    layers, with ``config``'s weights; ``norms`` default to those of ``labels`` (the official loss of one batch)."""
    norms = norms or SetNormalizers.of(labels, config.n_queries, config.no_object_weight)
    targets = class_targets(labels)
    return sum(layer_loss(config, c, m, targets, norms) for c, m in zip(predictions.class_logits, predictions.mask_logits))


def step_loss(decoder: nn.Module, labels: Tensor) -> MicroLoss:
    """The training loss of a rank's share of a step whose labels are ``labels`` (B, H, W), as a
    function ``(forward, images, labels) -> loss`` of each micro-batch (``forward``: the model's, DDP-wrapped).

    A decoder with ``predictions`` (MaskFormer) trains with ``set_loss`` and its config's weights;
    every other decoder with the cross-entropy over the labelled pixels (label != ``IGNORE_INDEX``)
    of the share, as Segmenter.
    """
    if hasattr(decoder, "predictions"):
        config = decoder.config
        norms = SetNormalizers.of(labels, config.n_queries, config.no_object_weight)
        return lambda forward, x, y: set_loss(config, forward(x, predictions=True), y, norms)
    labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return lambda forward, x, y: F.cross_entropy(forward(x), y, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
