"""Edits of the decoder forward (SPEC §3.5) against references written out step by step."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depict_analysis.foundation.errors import ConfigError
from depict_analysis.inputs import Batch
from depict_analysis.interventions import (
    ClassAblation,
    ClassSwap,
    HeadAblation,
    HeadRotation,
    Projection,
    TokenPatch,
    edited,
    record_means,
    subspace_basis,
)
from depict_analysis.models.decoders.cbt import CBT
from depict_analysis.models.decoders.depict import DepictCA, DepictSA
from depict_analysis.models.decoders.mask_transformer import MaskTransformer
from depict_analysis.models.decoders.tost import ToST
from depict_analysis.models.registry import create_model
from depict_analysis.tracing import trace

K, D, GRID = 5, 48, (3, 4)
N = GRID[0] * GRID[1]


def randomized(decoder):
    """Every LayerNorm away from 1 / 0 and every step size away from its init, so no edit hides behind them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return decoder.eval()


def sa(heads=2, dim_head=16):
    torch.manual_seed(0)
    return randomized(DepictSA(D, K, n_layers=3, heads=heads, dim_head=dim_head))


def ca():
    torch.manual_seed(0)
    return randomized(DepictCA(D, K, n_layers=2, heads=2, dim_head=16, n_cross_layers=2, cross_dim_head=8))


def segmenter():
    torch.manual_seed(0)
    return randomized(MaskTransformer(D, K, D, n_layers=2, heads=3))


DECODERS = {"depict_sa": sa, "depict_ca": ca, "mask_transformer": segmenter}


def tokens(batch=2):
    return torch.randn(batch, N, D, generator=torch.Generator().manual_seed(7))


def mask_head(decoder, patches, classes):
    """M = LN_K(normalize(Z) normalize(Q)ᵀ) on the grid, written out."""
    scores = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)
    masks = F.layer_norm(scores, (K,), decoder.mask_norm.weight, decoder.mask_norm.bias, 1e-5)
    return masks.transpose(1, 2).reshape(len(patches), K, *GRID)


def state(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def assert_bit_identical(module, before, parameters):
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [p for _, p in module.named_parameters()] == parameters  # the same Parameter objects
    assert all(isinstance(p, torch.nn.Parameter) for p in parameters)
    assert not any("edits" in m.__dict__ for m in module.modules())  # no edit left attached


# ------------------------------------------------------------------------------------- head ablation


def test_zero_ablating_every_head_of_an_mssa_layer_is_a_forward_that_skips_its_update():
    decoder, z = sa(), tokens()
    with torch.no_grad(), edited(decoder, HeadAblation("mssa2", 0), HeadAblation("mssa2", 1)):
        edited_masks = decoder(z, GRID)
    with torch.no_grad():  # reference: X <- X + η·0 at layer 2
        x = torch.cat([z, decoder.cls_emb.expand(2, -1, -1)], dim=1)
        x = decoder.layers[0](x)
        x = decoder.layers[2](x)
        x = decoder.decoder_norm(x)
        reference = mask_head(decoder, x[:, :N], x[:, N:])
    torch.testing.assert_close(edited_masks, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoder(z, GRID), reference, atol=1e-3)  # the layer did matter


def test_zero_ablating_every_msca_head_leaves_the_class_queries_as_they_came():
    decoder, z = ca(), tokens()
    with torch.no_grad(), edited(decoder, HeadAblation("msca1", 0), HeadAblation("msca1", 1)):
        edited_masks = decoder(z, GRID)
    with torch.no_grad():
        for layer in decoder.self_layers:
            z = layer(z)
        z = decoder.snorm(z)
        q = decoder.cls_emb.expand(2, -1, -1)
        q = decoder.cross_layers[1](q, z)
        reference = mask_head(decoder, z, decoder.cnorm(q))
    torch.testing.assert_close(edited_masks, reference, rtol=1e-5, atol=1e-5)


def test_zero_ablating_every_segmenter_head_leaves_only_the_output_bias_of_the_attention():
    decoder, z = segmenter(), tokens()
    with torch.no_grad(), edited(decoder, *(HeadAblation("block1", k) for k in range(3))):
        edited_masks = decoder(z, GRID)
    with torch.no_grad():
        block = decoder.blocks[0]
        x = torch.cat([decoder.proj_dec(z), decoder.cls_emb.expand(2, -1, -1)], dim=1)
        x = x + block.attn.proj.bias  # attention output of zero heads: W_out·0 + b
        x = x + block.mlp(block.norm2(x))
        x = decoder.decoder_norm(decoder.blocks[1](x))
        reference = mask_head(decoder, x[:, :N] @ decoder.proj_patch, x[:, N:] @ decoder.proj_classes)
    torch.testing.assert_close(edited_masks, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [CBT, ToST])
def test_zero_ablating_every_cbsa_or_tssa_head_leaves_only_the_bias_of_the_output_map(family):
    torch.manual_seed(0)
    decoder = randomized(family(D, K, n_layers=2, heads=2, dim_head=16, **({"rep_grid": 2} if family is CBT else {})))
    z, name = tokens(), f"{decoder.stage}1"
    with torch.no_grad(), edited(decoder, HeadAblation(name, 0), HeadAblation(name, 1)):
        edited_masks = decoder(z, GRID)
    with torch.no_grad():
        x = torch.cat([z, decoder.cls_emb.expand(2, -1, -1)], dim=1)
        x = x + decoder.layers[0].to_out.bias  # to_out(0) of the merged zero heads
        x = decoder.decoder_norm(decoder.layers[1](x, GRID) if family is CBT else decoder.layers[1](x))
        reference = mask_head(decoder, x[:, :N], x[:, N:])
    torch.testing.assert_close(edited_masks, reference, rtol=1e-5, atol=1e-5)


def test_ablating_one_head_removes_exactly_its_term_of_the_literal_mssa_sum():
    decoder, z = sa(), tokens()
    layer = decoder.layers[0]
    x = torch.cat([z, decoder.cls_emb.expand(2, -1, -1)], dim=1)
    with torch.no_grad(), edited(decoder, HeadAblation("mssa1", 1)):
        out = layer(x)
    with torch.no_grad():  # η Σ_{k ≠ 1} P_k softmax(W_k W_kᵀ / √p) W_k, W_k = LN(X) P_k
        xn, p = layer.norm(x).double(), layer.dim_head
        P0 = layer.proj[:p].double().T
        W = xn @ P0
        reference = x.double() + layer.step_size.double() * (torch.softmax(W @ W.transpose(1, 2) / math.sqrt(p), -1) @ W) @ P0.T
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_mean_ablation_uses_the_mean_over_images_and_patch_tokens_and_per_class_means():
    model = create_model("depict-sa-tiny", n_cls=K).eval()
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    batch = Batch(pixels, None, ["a.png", "b.png", "c.png"])
    means = record_means(model, batch, ["heads/mssa1"])
    assert means.images == ["a.png", "b.png", "c.png"]
    # Reference: head outputs of layer 1 written out from the traced input of the layer.
    t = trace(model, batch)
    layer = model.decoder.layers[0]
    x = torch.cat([t["tokens/input"], t["classes/input"]], dim=1).double()
    xn = F.layer_norm(x, x.shape[-1:], layer.norm.weight.double(), layer.norm.bias.double(), 1e-5)
    p, heads = layer.dim_head, layer.heads
    outs = []
    for k in range(heads):
        W = xn @ layer.proj[k * p : (k + 1) * p].double().T
        outs.append(torch.softmax(W @ W.transpose(1, 2) / math.sqrt(p), -1) @ W)  # (B, T, p)
    out = torch.stack(outs, 1)  # (B, h, T, p)
    n = t.tokens[0].shape[1]
    torch.testing.assert_close(means.sites["heads/mssa1"].patches.double(), out[:, :, :n].mean(dim=(0, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(means.sites["heads/mssa1"].classes.double(), out[:, :, n:].mean(dim=0), rtol=1e-4, atol=1e-5)
    # With the mean in place of head 0 the layer's update is η (P_0 mean_0 + P_1 out_1).
    x32 = x.float()
    with torch.no_grad(), edited(model, HeadAblation("mssa1", 0, means)):
        edited_out = layer(x32)
    mean_rows = torch.cat([means.sites["heads/mssa1"].patches[0].double().expand(n, p),
                           means.sites["heads/mssa1"].classes[0].double()])  # (T, p)
    update = mean_rows @ layer.proj[:p].double() + out[:, 1] @ layer.proj[p:].double()
    torch.testing.assert_close(edited_out.double(), x + layer.step_size.double() * update, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- projections


def test_projecting_onto_the_whole_span_is_the_identity():
    decoder, z = sa(heads=3, dim_head=16), tokens()  # h·p = 48 = d: span(P_1) is all of R^d
    U = subspace_basis(decoder, "mssa1")
    assert U.shape == (D, D)
    np.testing.assert_allclose((U.double() @ U.double().T).numpy(), np.eye(D), atol=1e-5)
    with torch.no_grad(), edited(decoder, Projection("tokens/input", U), Projection("tokens/mssa1", U)):
        projected = decoder(z, GRID)
    torch.testing.assert_close(projected, decoder(z, GRID).detach(), rtol=1e-4, atol=1e-4)
    with torch.no_grad(), edited(decoder, Projection("tokens/mssa1", U, keep=False)):
        assert decoder.forward_intermediates(z, GRID).tokens[1].abs().max() < 1e-4  # out of everything: nothing left


def test_projection_onto_one_head_is_the_least_squares_projector_of_its_basis():
    decoder, z = sa(), tokens()
    P = decoder.layers[1].proj[16:32].detach().double().numpy()  # head 1 of mssa2: P_kᵀ, (p, d)
    projector = P.T @ np.linalg.inv(P @ P.T) @ P  # onto the row space of P_kᵀ, independent of any SVD
    with torch.no_grad(), edited(decoder, Projection("tokens/mssa1", subspace_basis(decoder, "mssa2", head=1))):
        out = decoder.forward_intermediates(z, GRID)
    clean = decoder.forward_intermediates(z, GRID).tokens[1].detach().double().numpy()
    np.testing.assert_allclose(out.tokens[1].double().numpy(), clean @ projector, atol=1e-4)
    with torch.no_grad(), edited(decoder, Projection("tokens/mssa1", subspace_basis(decoder, "mssa2", head=1), keep=False)):
        out = decoder.forward_intermediates(z, GRID)
    np.testing.assert_allclose(out.tokens[1].double().numpy(), clean - clean @ projector, atol=1e-4)


def test_mean_projection_keeps_the_mean_tokens_component_inside_the_subspace():
    model = create_model("depict-sa-tiny", n_cls=K).eval()
    batch = Batch(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)), None, ["a", "b", "c"])
    means = record_means(model, batch, ["tokens/mssa1"])
    reference = trace(model, batch).tokens[1].double()  # (B, N, d) after mssa1
    torch.testing.assert_close(means.sites["tokens/mssa1"].patches.double(), reference.mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)
    U = subspace_basis(model, "mssa2", head=1).double()
    with torch.no_grad(), edited(model, Projection("tokens/mssa1", U.float(), keep=False, means=means)):
        out = trace(model, batch).tokens[1].double()
    mu = reference.mean(dim=(0, 1))
    expected = reference - reference @ U @ U.T + (mu @ U @ U.T)  # (I − UUᵀ) z + UUᵀ μ, every token
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- rotations


def test_rotating_a_heads_basis_inside_its_span_leaves_the_decoder_unchanged():
    for decoder, name in ((sa(), "mssa2"), (ca(), "msca1")):
        z = tokens()
        p = decoder.subspaces()[0].proj.shape[1] if name == "mssa2" else 8
        R, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(5)))
        clean = decoder(z, GRID).detach()
        before = decoder.get_parameter({"mssa2": "layers.1.proj", "msca1": "cross_layers.0.proj"}[name]).detach().clone()
        with torch.no_grad(), edited(decoder, HeadRotation(name, 1, R)):
            inside = decoder.get_submodule({"mssa2": "layers.1", "msca1": "cross_layers.0"}[name]).proj
            assert not torch.allclose(inside, before)  # the forward really uses the rotated basis
            torch.testing.assert_close(inside[p:2 * p], (before[p:2 * p].T @ R).T)  # P_1 R
            rotated = decoder(z, GRID)
        torch.testing.assert_close(rotated, clean, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- class edits


@pytest.mark.parametrize("family", list(DECODERS))
def test_swapping_two_class_embeddings_swaps_exactly_their_masks(family):
    decoder, z = DECODERS[family](), tokens()
    with torch.no_grad():
        clean = decoder(z, GRID)
        with edited(decoder, ClassSwap(1, 3)):
            swapped = decoder(z, GRID)
    # equal up to the order in which the LayerNorm over classes sums its K scores (float rounding)
    torch.testing.assert_close(swapped[:, [1, 3]], clean[:, [3, 1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped[:, [0, 2, 4]], clean[:, [0, 2, 4]], rtol=1e-5, atol=1e-5)
    assert (clean[:, 1] - clean[:, 3]).abs().max() > 0.1


def test_zeroing_a_class_embedding_scores_that_class_zero_before_the_mask_norm():
    decoder, z = sa(), tokens()
    with torch.no_grad(), edited(decoder, ClassAblation(2)):
        out = decoder.forward_intermediates(z, GRID)
    with torch.no_grad():
        clean = decoder.forward_intermediates(z, GRID)
        scores = F.normalize(clean.embeddings, dim=-1) @ clean.class_embeddings.transpose(1, 2)
        scores[..., 2] = 0
        reference = F.layer_norm(scores, (K,), decoder.mask_norm.weight, decoder.mask_norm.bias, 1e-5)
    assert torch.equal(out.class_embeddings[:, 2], torch.zeros(2, D))
    torch.testing.assert_close(out.masks, reference.transpose(1, 2).reshape(2, K, *GRID), rtol=1e-5, atol=1e-5)


def test_swapping_the_msca_class_queries_swaps_the_masks():
    decoder, z = ca(), tokens()
    with torch.no_grad():
        clean = decoder(z, GRID)
        with edited(decoder, ClassSwap(0, 4, site="classes/input")):
            swapped = decoder(z, GRID)
    torch.testing.assert_close(swapped[:, [0, 4]], clean[:, [4, 0]], rtol=1e-4, atol=1e-4)  # MSCA treats every query alike


# ------------------------------------------------------------------------------------- patching


def test_patching_the_tokens_of_another_image_gives_that_images_masks_in_depict_ca():
    decoder = ca()
    a, b = tokens(1), torch.randn(1, N, D, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        donor = decoder.forward_intermediates(b, GRID)
        with edited(decoder, TokenPatch("tokens/mssa1", donor.tokens[1])):
            patched = decoder(a, GRID)
    torch.testing.assert_close(patched, donor.masks)  # the classes read nothing but the tokens
    assert not torch.allclose(decoder(a, GRID), donor.masks)


# ------------------------------------------------------------------------------------- the model is untouched


def every_edit(model):
    means = record_means(model, Batch(torch.rand(2, 3, 32, 32), None, ["x", "y"]), ["heads/mssa2", "class_embeddings"])
    U = subspace_basis(model, "mssa1", head=0)
    return [
        HeadAblation("mssa1", 0), HeadAblation("mssa2", 1, means), Projection("tokens/input", U),
        Projection("tokens/mssa1", U, keep=False), ClassAblation(1), ClassAblation(2, means=means), ClassSwap(0, 1),
        TokenPatch("tokens/mssa1", torch.zeros(1, 16, 48)), HeadRotation("mssa1", 0, torch.eye(16).flip(0)),
    ]


def test_parameters_are_bit_identical_after_every_edit_and_after_an_edit_interrupted_by_an_exception():
    model = create_model("depict-sa-tiny", n_cls=K).eval()
    x = torch.rand(2, 3, 32, 32)
    before, parameters = state(model), [p for _, p in model.named_parameters()]
    clean = model(x).detach()
    edits = every_edit(model)
    for edit in edits:
        with torch.no_grad(), edited(model, edit):
            model(x)
        assert_bit_identical(model, before, parameters)
    with pytest.raises(RuntimeError, match="half-way"), torch.no_grad(), edited(model, *edits):
        model(x)
        raise RuntimeError("stopped half-way")
    assert_bit_identical(model, before, parameters)
    # an edit that fails inside the forward pass (head 5 of a 2-head layer), after a parameter edit took hold
    with pytest.raises(ConfigError, match="head of mssa2"), torch.no_grad(), edited(model, edits[-1], HeadAblation("mssa2", 5)):
        model(x)
    assert_bit_identical(model, before, parameters)
    torch.testing.assert_close(model(x).detach(), clean, rtol=0, atol=0)


def test_edits_nest_and_unknown_sites_are_refused_by_name():
    decoder, z = sa(), tokens()
    with torch.no_grad():
        with edited(decoder, HeadAblation("mssa1", 0), HeadAblation("mssa1", 1)):
            both = decoder(z, GRID)
        with edited(decoder, HeadAblation("mssa1", 0)), edited(decoder, HeadAblation("mssa1", 1)):
            nested = decoder(z, GRID)
            assert len(decoder.layers[0].edits["heads"]) == 2
        assert "edits" not in decoder.layers[0].__dict__
    assert torch.equal(nested, both)
    with pytest.raises(ConfigError, match="no site 'heads/mssa9'.*heads/mssa1"):
        with edited(decoder, HeadAblation("mssa9", 0)):
            pass
    assert set(decoder.hook_sites()) >= {"tokens/input", "tokens/mssa3", "classes/mssa2", "class_embeddings", "heads/mssa3"}
