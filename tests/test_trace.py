"""trace() records exactly the decoder's residual stream (that it is the forward pass: tests/test_families.py)."""

import pytest
import torch
import torch.nn.functional as F

from depict_analysis.models import create_model
from depict_analysis.models.decoders.cbt import CBSA
from depict_analysis.trace import trace

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
    """The decoder run layer by layer by hand: (tokens per layer, classes per stage, final Q̂)."""
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
            return tokens, classes, F.normalize(dec.cnorm(q), dim=-1)
        if hasattr(dec, "head"):  # linear
            return tokens, [], F.normalize(dec.head.weight, dim=-1).expand(z.shape[0], -1, -1)
        layers = dec.layers if hasattr(dec, "layers") else dec.blocks
        x = dec.proj_dec(z) if hasattr(dec, "proj_dec") else z
        x = torch.cat([x, dec.cls_emb.expand(z.shape[0], -1, -1)], 1)
        classes.append(x[:, N:])
        for layer in layers:
            x = layer(x, grid) if isinstance(layer, CBSA) else layer(x)
            tokens.append(x[:, :N])
            classes.append(x[:, N:])
        q = dec.decoder_norm(x)[:, N:]
        if hasattr(dec, "proj_classes"):
            q = q @ dec.proj_classes
        return tokens, classes, F.normalize(q, dim=-1)


@pytest.mark.parametrize("name", FAMILIES)
def test_trace_records_the_manual_residual_stream(name):
    model, images = model_and_images(name)
    t = trace(model, images)
    tokens, classes, q_hat = manual_stream(model, images)
    assert len(t.tokens) == len(tokens) and len(t.classes) == len(classes)
    for ours, ref in zip(t.tokens + t.classes, tokens + classes):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(t.class_embeddings, q_hat, atol=1e-6, rtol=1e-6)
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
    torch.testing.assert_close(t.attention[0], expected, atol=1e-6, rtol=1e-6)
    seg = trace(*model_and_images("segmenter-tiny"), attention=True)
    torch.testing.assert_close(seg.attention[1].sum(-1), torch.ones_like(seg.attention[1][..., 0]))
