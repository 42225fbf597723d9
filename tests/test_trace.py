"""trace() records exactly the decoder's residual stream (that it is the forward pass: tests/test_families.py)."""

import pytest
import torch
import torch.nn.functional as F

from depict_analysis.models import create_model
from depict_analysis.models.decoders.cbt import CBSA
from depict_analysis.tracing import Subspace, Trace, trace

FAMILIES = ["depict-sa-tiny", "depict-ca-tiny", "segmenter-tiny", "linear-tiny", "cbt-tiny", "tost-tiny"]


def model_and_images(name, seed=0):
    torch.manual_seed(seed)
    model = create_model(name, n_cls=4).eval()
    with torch.no_grad():  # non-trivial LayerNorms and step sizes
        for n, p in model.decoder.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model, torch.randn(2, 3, 37, 30)


def manual_stream(model, images):
    """The decoder run layer by layer by hand: (tokens per layer, classes per stage, final Q̂, the patch
    embeddings that enter the mask head's dot product)."""
    dec = model.decoder
    with torch.no_grad():
        z, grid = model.encode(images)
        N = z.shape[1]
        tokens, classes = [z], []
        if hasattr(dec, "self_layers"):  # DEPICT-CA
            for layer in dec.self_layers:
                z = layer(z)
                tokens.append(z)
            q = dec.cls_emb.expand(z.shape[0], -1, -1)
            classes.append(q)
            zn = dec.snorm(z)
            for layer in dec.cross_layers:
                q = layer(q, zn)
                classes.append(q)
            return tokens, classes, F.normalize(dec.cnorm(q), dim=-1), zn
        if hasattr(dec, "head"):  # linear
            return tokens, [], F.normalize(dec.head.weight, dim=-1).expand(z.shape[0], -1, -1), z
        layers = dec.layers if hasattr(dec, "layers") else dec.blocks
        x = dec.proj_dec(z) if hasattr(dec, "proj_dec") else z
        x = torch.cat([x, dec.cls_emb.expand(z.shape[0], -1, -1)], 1)
        classes.append(x[:, N:])
        for layer in layers:
            x = layer(x, grid) if isinstance(layer, CBSA) else layer(x)
            tokens.append(x[:, :N])
            classes.append(x[:, N:])
        patches, q = dec.decoder_norm(x)[:, :N], dec.decoder_norm(x)[:, N:]
        if hasattr(dec, "proj_classes"):
            patches, q = patches @ dec.proj_patch, q @ dec.proj_classes
        return tokens, classes, F.normalize(q, dim=-1), patches


@pytest.mark.parametrize("name", FAMILIES)
def test_trace_records_the_manual_residual_stream(name):
    model, images = model_and_images(name)
    t = trace(model, images)
    tokens, classes, q_hat, embeddings = manual_stream(model, images)
    assert len(t.tokens) == len(tokens) and len(t.classes) == len(classes)
    for ours, ref in zip(t.tokens + t.classes, tokens + classes):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(t.class_embeddings, q_hat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(t.embeddings, embeddings, atol=1e-6, rtol=1e-6)  # Z_L1: post-norm, SPEC §3.2
    assert t.grid == (5, 4) and len(t.class_stages) == len(t.classes)


def test_subspaces_are_the_layers_projections_grouped_by_head():
    model, images = model_and_images("depict-ca-tiny")
    t = trace(model, images)
    names = [s.name for s in t.subspaces]
    assert names == ["mssa1", "mssa2", "mssa3", "msca1", "msca2", "msca3"]
    assert [s.layer for s in t.subspaces] == [1, 2, 3, None, None, None]
    proj = model.decoder.self_layers[1].proj
    p = model.config.decoder.dim_head
    torch.testing.assert_close(t.subspaces[1].proj[1], proj[p : 2 * p])  # head 1 = rows p..2p


def test_attention_maps_are_the_layers_softmax():
    model, images = model_and_images("depict-sa-tiny")
    t = trace(model, images, attention=True)
    layer = model.decoder.layers[0]
    x = torch.cat([t.tokens[0], t.classes[0]], 1)
    W = (layer.norm(x) @ layer.proj.T).view(2, x.shape[1], layer.heads, -1).transpose(1, 2)
    expected = torch.softmax(W @ W.transpose(-1, -2) / W.shape[-1] ** 0.5, dim=-1)
    assert list(t.attention) == ["mssa1", "mssa2", "mssa3"]
    torch.testing.assert_close(t.attention["mssa1"], expected, atol=1e-6, rtol=1e-6)
    seg = trace(*model_and_images("segmenter-tiny"), attention=True)
    torch.testing.assert_close(seg["attention/block2"].sum(-1), torch.ones_like(seg["attention/block2"][..., 0]))


def test_entries_are_named_by_layer_and_stage():
    model, images = model_and_images("depict-ca-tiny")
    t = trace(model, images, attention=True)
    assert t.token_names == ["input", "mssa1", "mssa2", "mssa3"]
    assert t.class_stages == ["input", "msca1", "msca2", "msca3"]
    assert t["tokens/mssa2"] is t.tokens[2] and t["classes/msca1"] is t.classes[1]
    assert t["attention/msca3"].shape == (2, 2, 4, 20)  # (B, h, K, N): class queries attend to the patches
    assert "subspace/msca1" in t.keys() and "embeddings" in t.keys()
    with pytest.raises(KeyError, match="tokens/mssa9.*entries: tokens/input"):
        t["tokens/mssa9"]


def test_traces_of_two_batches_concatenate_to_the_trace_of_both(tmp_path):
    model, images = model_and_images("cbt-tiny")
    both = trace(model, images, attention=True)
    halves = Trace.cat([trace(model, images[:1], attention=True), trace(model, images[1:], attention=True)])
    for name in both.keys():
        torch.testing.assert_close(halves[name], both[name], atol=1e-5, rtol=1e-5)
    assert len(halves.representatives) == len(both.representatives) == both.num_layers


def test_a_saved_trace_loads_back_equal_without_running_code(tmp_path):
    from depict_analysis.inputs import Batch

    model, _ = model_and_images("depict-sa-tiny")
    pixels = torch.rand(2, 3, 32, 32)
    batch = Batch(pixels, torch.randint(0, 4, (2, 32, 32)), ["a.png", "b.png"])
    t = trace(model, batch, attention=True, full_masks=True)
    torch.testing.assert_close(t.full_masks, model(model.normalize(pixels)), atol=0, rtol=0)
    t.save(tmp_path / "t.pt")
    back = Trace.load(tmp_path / "t.pt")
    assert back.keys() == t.keys() and back.paths == ["a.png", "b.png"] and back.grid == t.grid
    for name in t.keys():
        torch.testing.assert_close(back[name], t[name], atol=0, rtol=0)
    torch.testing.assert_close(back.labels, batch.labels)
    torch.testing.assert_close(back.pixels, pixels)
    assert back.subspaces[0].parameter == "layers.0.proj" and back.model == t.model and back.config == t.config
    for ours, theirs in zip(back.subspaces, t.subspaces):  # the layers' LayerNorms come back too
        torch.testing.assert_close(ours.layer_input(t.tokens[1]), theirs.layer_input(t.tokens[1]), atol=0, rtol=0)
    from depict_analysis.models.registry import ModelConfig

    assert ModelConfig.from_dict(back.config) == model.config  # enough to build a fresh model of the same kind


@pytest.mark.parametrize("name", FAMILIES)
def test_each_subspace_records_the_layernorm_its_layer_applies_before_projecting(name):
    model, images = model_and_images(name)
    dec = model.decoder
    expected = {  # by hand, per family: what each layer normalises its input with
        "depict-sa-tiny": lambda: [layer.norm for layer in dec.layers],
        "depict-ca-tiny": lambda: [layer.norm for layer in [*dec.self_layers, *dec.cross_layers]],
        "segmenter-tiny": lambda: [block.norm1 for block in dec.blocks],
        "linear-tiny": lambda: [],
        "cbt-tiny": lambda: [layer.norm for layer in dec.layers],
        "tost-tiny": lambda: [layer.norm for layer in dec.layers],
    }[name]()
    assert [dec.input_norm(space) for space in dec.subspaces()] == expected
    t = trace(model, images)
    Z = t.tokens[-1]
    for space, norm in zip(t.subspaces, expected):
        weight, bias, eps = space.norm
        assert eps == norm.eps and weight.data_ptr() != norm.weight.data_ptr()  # a copy, independent of the model
        with torch.no_grad():
            torch.testing.assert_close(space.layer_input(Z), norm(Z), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no recorded input LayerNorm"):
        Subspace("x", 1, torch.zeros(1, 2, 3)).layer_input(Z)
