"""MaskFormer (family ``maskformer``, ``models/decoders/maskformer.py``) and its set loss (``models/losses.py``)
against references written plainly from the official code's behaviour (facebookresearch/MaskFormer)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.models import create_model
from depict_analysis.models.decoders.maskformer import MaskFormerConfig, MaskPredictions, semantic_inference, sine_position
from depict_analysis.models.losses import SetNormalizers, dice_cost, focal_cost, match, set_loss, step_loss
from depict_analysis.models.evaluate import decode_labels, encode_image, image_probs
from depict_analysis.models.segmentor import decoder_outputs, inference_labels, predict_probs, view_labels
from depict_analysis.models.train import TrainConfig, train

K = 8


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("maskformer-tiny", n_cls=K).eval().double()


# ------------------------------------------------------------------------------- plain references


def ref_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def ref_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def ref_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def n(t):
    return t.detach().double().numpy()


def ref_attention(mha, query, key, value):
    """nn.MultiheadAttention by hand: per head softmax(q kᵀ / √p) v, then the output projection.
    query (B, T, D), key / value (B, S, D) -> output (B, T, D), maps (B, h, T, S)."""
    W, b, h = n(mha.in_proj_weight), n(mha.in_proj_bias), mha.num_heads
    D = W.shape[1]
    q, k, v = (x @ W[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i, x in enumerate((query, key, value)))
    B, T, S, p = q.shape[0], q.shape[1], k.shape[1], D // h
    out, maps = np.zeros((B, T, D)), np.zeros((B, h, T, S))
    for head in range(h):
        cols = slice(head * p, (head + 1) * p)
        a = ref_softmax(q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(p))
        maps[:, head] = a
        out[..., cols] = a @ v[..., cols]
    return out @ n(mha.out_proj.weight).T + n(mha.out_proj.bias), maps


def ref_decoder_layer(layer, x, memory, pos, query_pos):
    """The official ``TransformerDecoderLayer.forward_post`` (eval: no dropout)."""
    norm = lambda m, y: ref_layer_norm(y, n(m.weight), n(m.bias))  # noqa: E731
    x = norm(layer.norm1, x + ref_attention(layer.self_attn, x + query_pos, x + query_pos, x)[0])
    update, maps = ref_attention(layer.multihead_attn, x + query_pos, memory + pos, memory)
    x = norm(layer.norm2, x + update)
    hidden = np.maximum(x @ n(layer.linear1.weight).T + n(layer.linear1.bias), 0)
    return norm(layer.norm3, x + hidden @ n(layer.linear2.weight).T + n(layer.linear2.bias)), maps


def ref_position(h, w, dim):
    """DETR's ``PositionEmbeddingSine(dim / 2, normalize=True)`` of an unpadded h × w grid, element by element."""
    half, pos = dim // 2, np.zeros((h * w, dim))
    for i, j, k in itertools.product(range(h), range(w), range(half)):
        freq = 10000 ** (2 * (k // 2) / half)
        y, x = (i + 1) / (h + 1e-6) * 2 * math.pi / freq, (j + 1) / (w + 1e-6) * 2 * math.pi / freq
        pos[i * w + j, k] = math.sin(y) if k % 2 == 0 else math.cos(y)
        pos[i * w + j, half + k] = math.sin(x) if k % 2 == 0 else math.cos(x)
    return pos


def ref_semantic(class_logits, mask_logits):
    """``semantic_inference`` pixel by pixel: S[c, y, x] = Σ_q softmax(class)_{q,c} sigmoid(mask)_{q,y,x}."""
    probs = ref_softmax(class_logits)[:, :-1]
    Q, C = probs.shape
    S = np.zeros((C, *mask_logits.shape[1:]))
    for c, y, x in itertools.product(range(C), *map(range, mask_logits.shape[1:])):
        S[c, y, x] = sum(probs[q, c] * ref_sigmoid(mask_logits[q, y, x]) for q in range(Q))
    return S


# ------------------------------------------------------------------------------------------ decoder


def test_sine_position_is_detrs():
    np.testing.assert_allclose(sine_position((3, 5), 8).numpy(), ref_position(3, 5, 8), atol=1e-6)


def test_decoder_layer_is_the_official_post_norm_layer():
    model = tiny()
    layer = model.decoder.layers[0]
    g = torch.Generator().manual_seed(0)
    x, memory = torch.randn(2, 12, 32, generator=g, dtype=torch.float64), torch.randn(2, 20, 32, generator=g, dtype=torch.float64)
    pos, query_pos = torch.randn(20, 32, generator=g, dtype=torch.float64), torch.randn(12, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out, maps = layer(x, memory, pos, query_pos, attention=True)
    expected, expected_maps = ref_decoder_layer(layer, n(x), n(memory), n(pos), n(query_pos))
    np.testing.assert_allclose(n(out), expected, atol=1e-10)
    np.testing.assert_allclose(n(maps), expected_maps, atol=1e-12)


def test_decoder_is_the_official_pixel_decoder_transformer_and_head():
    """The whole pipeline by hand: BasePixelDecoder on one level, input_proj, the transformer decoder
    from zero content with deep supervision, class / mask heads, semantic inference."""
    model = tiny()
    dec = model.decoder
    for p in dec.parameters():  # non-trivial norms and biases
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    grid, B = (4, 5), 2
    z = torch.randn(B, 20, 48, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = dec.forward_intermediates(z, grid, attention=True)
        predictions = dec.predictions(z, grid)
    # pixel decoder: ReLU(GN(conv3x3)) then conv3x3, on the (B, d, h, w) map
    x = z.transpose(1, 2).reshape(B, 48, *grid)
    conv = torch.nn.functional.conv2d
    y = conv(x, dec.pixel_conv.weight.detach(), padding=1).numpy()
    G = dec.pixel_norm.num_groups
    groups = y.reshape(B, G, -1)
    y = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)).reshape(y.shape)
    y = np.maximum(y * n(dec.pixel_norm.weight)[:, None, None] + n(dec.pixel_norm.bias)[:, None, None], 0)
    E = conv(torch.from_numpy(y), dec.mask_features.weight.detach(), dec.mask_features.bias.detach(), padding=1).numpy()  # (B, m, h, w)
    # transformer decoder
    memory = n(z) @ n(dec.input_proj.weight)[:, :, 0, 0].T + n(dec.input_proj.bias)
    pos, query_pos = ref_position(*grid, 32), n(dec.query_embed.weight)
    content, outputs = np.zeros((B, 12, 32)), []
    for l, layer in enumerate(dec.layers, 1):
        content, maps = ref_decoder_layer(layer, content, memory, pos, query_pos)
        np.testing.assert_allclose(n(out.classes[l]), content, atol=1e-10)
        hidden = ref_layer_norm(content, n(dec.decoder_norm.weight), n(dec.decoder_norm.bias))
        logits = hidden @ n(dec.class_embed.weight).T + n(dec.class_embed.bias)
        a = hidden
        for i, lin in enumerate(dec.mask_embed.layers):
            a = a @ n(lin.weight).T + n(lin.bias)
            a = np.maximum(a, 0) if i < 2 else a
        masks = np.einsum("bqm,bmhw->bqhw", a, E)
        outputs.append((logits, a, masks, maps))
    np.testing.assert_allclose(n(predictions.class_logits), np.stack([o[0] for o in outputs]), atol=1e-10)
    np.testing.assert_allclose(n(predictions.mask_logits), np.stack([o[2] for o in outputs]), atol=1e-9)
    logits, embeddings, masks, _ = outputs[-1]
    for b in range(B):
        np.testing.assert_allclose(n(out.masks[b]), ref_semantic(logits[b], masks[b]), atol=1e-10)
    np.testing.assert_allclose(n(out.class_embeddings), embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(n(out.embeddings), E.reshape(B, -1, 20).transpose(0, 2, 1), atol=1e-12)
    # attention per class: the queries' maps weighted by their class probabilities, normalised over queries
    weights = ref_softmax(logits)[..., :-1]
    weights = weights / weights.sum(1, keepdims=True)
    np.testing.assert_allclose(n(out.attention["layer2"]), np.einsum("bhqn,bqc->bhcn", outputs[-1][3], weights), atol=1e-12)
    assert out.class_stages == ["input", "layer1", "layer2"] and out.tokens[0] is z


def test_semantic_inference_by_hand():
    # one pixel, two queries, K = 2: S_c = Σ_q softmax_q[c] σ(m_q)
    class_logits = torch.tensor([[[0.0, math.log(3.0), 0.0], [math.log(2.0), 0.0, math.log(1.0)]]])
    mask_logits = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])  # σ = 1/2, 3/4
    S = semantic_inference(class_logits, mask_logits)
    expected = [1 / 5 * 1 / 2 + 2 / 4 * 3 / 4, 3 / 5 * 1 / 2 + 1 / 4 * 3 / 4]  # query 0 softmax (1,3,1)/5, query 1 (2,1,1)/4
    torch.testing.assert_close(S[0, :, 0, 0], torch.tensor(expected))
    g = torch.Generator().manual_seed(2)
    c, m = torch.randn(1, 5, 4, generator=g, dtype=torch.float64), torch.randn(1, 5, 3, 2, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(n(semantic_inference(c, m)[0]), ref_semantic(n(c[0]), n(m[0])), atol=1e-12)


# -------------------------------------------------------------------------------------- matching & loss


def ref_focal(logit, target, alpha=0.25, gamma=2.0):
    """The official ``sigmoid_focal_loss`` of one mask, mean over its pixels."""
    p = ref_sigmoid(logit)
    ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    p_t = p * target + (1 - p) * (1 - target)
    return float(np.mean((alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma))


def ref_dice(logit, target):
    p = ref_sigmoid(logit)
    return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)


def ref_cost(class_logits, mask_logits, classes, masks, mask_weight=20.0, dice_weight=1.0):
    """``HungarianMatcher``'s cost, entry by entry: (Q, T)."""
    probs = ref_softmax(class_logits)
    return np.array([[mask_weight * ref_focal(m.ravel(), t.ravel()) - probs[q, c] + dice_weight * ref_dice(m.ravel(), t.ravel())
                      for c, t in zip(classes, masks)] for q, m in enumerate(mask_logits)])


def brute_force(cost):
    """The assignment of min(Q, T) pairs of least total cost, by enumeration: {query: target}."""
    Q, T = cost.shape
    if Q >= T:
        best = min(itertools.permutations(range(Q), T), key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
        return {q: t for t, q in enumerate(best)}
    best = min(itertools.permutations(range(T), Q), key=lambda ts: sum(cost[q, t] for q, t in enumerate(ts)))
    return dict(enumerate(best))


def ref_set_loss(layers, labels, n_classes, eos=0.1, mask_weight=20.0, dice_weight=1.0):
    """``SetCriterion`` with deep supervision on label maps at the predictions' size: for every layer,
    match, weighted CE over all queries, focal + dice over the matched pairs / number of target masks."""
    targets = []
    for label in labels:
        classes = sorted(set(label.ravel().tolist()) - {255})
        targets.append((classes, [(label == c).astype(float) for c in classes]))
    num_masks = max(sum(len(c) for c, _ in targets), 1)
    total = 0.0
    for class_logits, mask_logits in layers:
        ce_sum = weight_sum = focal = dice = 0.0
        for b, (classes, masks) in enumerate(targets):
            pairs = brute_force(ref_cost(class_logits[b], mask_logits[b], classes, masks)) if classes else {}
            for q in range(class_logits.shape[1]):
                target = classes[pairs[q]] if q in pairs else n_classes
                w = 1.0 if q in pairs else eos
                ce_sum += -w * np.log(ref_softmax(class_logits[b, q])[target])
                weight_sum += w
                if q in pairs:
                    focal += ref_focal(mask_logits[b, q].ravel(), masks[pairs[q]].ravel())
                    dice += ref_dice(mask_logits[b, q].ravel(), masks[pairs[q]].ravel())
        total += ce_sum / weight_sum + mask_weight * focal / num_masks + dice_weight * dice / num_masks
    return total


LOSS_CONFIG = MaskFormerConfig(n_queries=3)  # the official weights: no object 0.1, mask 20, dice 1


def hand_made_case(seed=3, L=2, B=2, Q=3, K=3, size=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(L, B, Q, K + 1, generator=g, dtype=torch.float64)
    mask_logits = 2 * torch.randn(L, B, Q, *size, generator=g, dtype=torch.float64)
    labels = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 2], [255, 255, 2, 2]],  # 2 classes for 3 queries: one "no object"
                           [[0, 1, 1, 2], [0, 1, 1, 2], [0, 0, 2, 2]]])  # 3 classes, each query matched
    return MaskPredictions(class_logits, mask_logits), labels


def test_cost_terms_against_plain_references():
    g = torch.Generator().manual_seed(4)
    logits, masks = torch.randn(4, 6, generator=g, dtype=torch.float64), (torch.rand(3, 6, generator=g) > 0.5).double()
    focal = np.array([[ref_focal(n(l), n(m)) for m in masks] for l in logits])
    dice = np.array([[ref_dice(n(l), n(m)) for m in masks] for l in logits])
    np.testing.assert_allclose(n(focal_cost(logits, masks)), focal, atol=1e-12)
    np.testing.assert_allclose(n(dice_cost(logits, masks)), dice, atol=1e-12)


@pytest.mark.parametrize("b", [0, 1])
def test_matching_is_the_least_cost_assignment(b):
    predictions, labels = hand_made_case()
    c, m = predictions.class_logits[-1, b], predictions.mask_logits[-1, b]
    classes = labels[b].unique()
    classes = classes[classes != 255]
    masks = (labels[b][None] == classes[:, None, None]).double()
    queries, targets = match(c, m, classes, masks, 20.0, 1.0)
    expected = brute_force(ref_cost(n(c), n(m), classes.tolist(), n(masks)))
    assert dict(zip(queries.tolist(), targets.tolist())) == expected
    assert len(queries) == min(3, len(classes))  # image 0: one query left to "no object"


def test_matching_with_more_classes_than_queries_leaves_targets_unmatched():
    predictions, labels = hand_made_case(Q=2)
    c, m = predictions.class_logits[0, 1], predictions.mask_logits[0, 1]
    classes = torch.tensor([0, 1, 2])
    masks = (labels[1][None] == classes[:, None, None]).double()
    queries, targets = match(c, m, classes, masks, 20.0, 1.0)
    assert dict(zip(queries.tolist(), targets.tolist())) == brute_force(ref_cost(n(c), n(m), [0, 1, 2], n(masks)))


def test_matching_brings_the_targets_to_the_prediction_grid_by_nearest():
    g = torch.Generator().manual_seed(5)
    c, m = torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)
    labels = torch.randint(0, 3, (4, 4), generator=g)
    classes = labels.unique()
    full = (labels[None] == classes[:, None, None]).float()
    sub = full[:, ::2, ::2]  # nearest from 4 × 4 to 2 × 2 takes every second pixel from the first
    assert [t.tolist() for t in match(c, m, classes, full, 20.0, 1.0)] == [t.tolist() for t in match(c, m, classes, sub, 20.0, 1.0)]


def test_set_loss_on_hand_made_images():
    predictions, labels = hand_made_case()
    loss = set_loss(LOSS_CONFIG, predictions, labels)
    layers = list(zip(n(predictions.class_logits), n(predictions.mask_logits)))
    assert loss.item() == pytest.approx(ref_set_loss(layers, labels.numpy(), 3), rel=1e-10)
    # more classes than queries: the unmatched target still counts in the number of masks
    predictions, labels = hand_made_case(Q=2)
    layers = list(zip(n(predictions.class_logits), n(predictions.mask_logits)))
    assert set_loss(MaskFormerConfig(n_queries=2), predictions, labels).item() == pytest.approx(ref_set_loss(layers, labels.numpy(), 3), rel=1e-10)


def test_an_image_without_labelled_pixels_is_all_no_object():
    predictions, labels = hand_made_case(B=1)
    labels = torch.full((1, 3, 4), 255)
    norms = SetNormalizers.of(labels, 3, 0.1)
    assert (norms.masks, norms.class_weight) == (1, pytest.approx(0.3))
    logits = n(predictions.class_logits)
    expected = sum(-np.log(ref_softmax(layer[0])[:, 3]).mean() for layer in logits)  # every query "no object", equal weights
    assert set_loss(LOSS_CONFIG, predictions, labels).item() == pytest.approx(expected, rel=1e-10)


def test_micro_batches_sum_to_the_loss_of_the_share():
    model = tiny()
    g = torch.Generator().manual_seed(6)
    images, labels = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, K, (4, 32, 32), generator=g)
    labels[1, :20] = 255
    labels[2] = labels[2] % 2  # two classes
    share = step_loss(model.decoder, labels)
    whole = set_loss(model.decoder.config, model(images, predictions=True), labels)
    parts = share(model, images[:1], labels[:1]) + share(model, images[1:], labels[1:])
    torch.testing.assert_close(parts, whole, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- protocol and training


def test_inference_averages_probabilities_without_a_softmax():
    model = tiny().float()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        left, right, whole = model(images[..., :32]), model(images[..., 16:]), model(images)
    probs = predict_probs(model, images, window=32, stride=16)  # windows at 0 and 16 on the long side
    expected = torch.zeros_like(whole)
    expected[..., :32] += left
    expected[..., 16:] += right
    expected[..., 16:32] /= 2
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(probs.sum(1), torch.ones(1, 32, 48))  # S, not a distribution over classes
    strips = inference_labels(model, [(images, False)], (32, 48), 32, 16, map_values=1)  # the strip path
    torch.testing.assert_close(strips.long(), probs.argmax(1))
    segmenter = create_model("segmenter-tiny", n_cls=K).eval()  # a logits decoder is soft-maxed
    torch.testing.assert_close(predict_probs(segmenter, images[..., :32], window=32), segmenter(images[..., :32]).softmax(1))


def test_training_runs_with_the_set_loss(tmp_path):
    config = TrainConfig(model="maskformer-tiny", dataset="synthetic", dataset_kwargs={"size": 32, "length": 8},
                         batch_size=4, grad_accum=2, iterations=3, num_workers=0, eval_images=2, out_dir=str(tmp_path))
    result = train(config, progress=False)
    assert result["completed"] and math.isfinite(result["loss"]) and result["loss"] > 0


def test_config_rejects_sizes_the_modules_cannot_take():
    with pytest.raises(ConfigError, match="n_heads"):
        MaskFormerConfig(hidden=64, n_heads=3)
    with pytest.raises(ConfigError, match="norm_groups"):
        MaskFormerConfig(conv_dim=48, norm_groups=32)


def test_views_of_probabilities_are_averaged_as_they_are():
    # two views of one pixel: the mean of S picks class 2, the mean of softmax(S) class 1
    views = [(torch.tensor([3.0, 0.0, 3.0]).view(1, 3, 1, 1), False), (torch.tensor([0.0, 3.0, 1.5]).view(1, 3, 1, 1), False)]
    assert view_labels(views, 1, 3, (1, 1), outputs="probabilities").item() == 2
    assert view_labels(views, 1, 3, (1, 1)).item() == 1  # logits: soft-maxed per view
    assert view_labels(views, 1, 3, (1, 1), map_values=1, outputs="probabilities").item() == 2  # the strip path
    assert decoder_outputs(tiny()) == "probabilities" and decoder_outputs(create_model("segmenter-tiny", n_cls=K)) == "logits"


def test_dataset_evaluation_decodes_maskformer_as_image_probs():
    """``decode_labels`` (evaluate, robustness) passes the decoder's outputs on: with two views (flip)
    its labels are the arg-max of ``image_probs``, the views' mean of S."""
    from PIL import Image

    model = tiny().float()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    with torch.inference_mode():
        probs = image_probs(model, image, window=32, stride=16, flip=True)
        labels = decode_labels(model, encode_image(model, image, window=32, stride=16, flip=True))
    torch.testing.assert_close(labels.long(), probs.argmax(0))
