"""DEPICT, CBSA and TSSA operators against literal float64 transcriptions of the formulas and official code."""

import math

import pytest
import torch
import torch.nn.functional as F

from depict_analysis.models.decoders.cbt import CBSA, CBT
from depict_analysis.models.decoders.depict import MSCA, MSSA, DepictCA, DepictSA
from depict_analysis.models.decoders.mask_transformer import MaskTransformer
from depict_analysis.models.decoders.tost import TSSA, ToST

torch.manual_seed(0)
FP32 = dict(atol=5e-5, rtol=5e-5)  # float32 forward vs float64 reference


def literal_mssa(x, norm_w, norm_b, proj, step, heads):
    """SPEC §1.2 in float64, head by head: X + η Σ_k P_k softmax(W_kᵀ... ) with W_k = LN(X) P_k."""
    x, proj = x.double(), proj.double()
    xn = F.layer_norm(x, x.shape[-1:], norm_w.double(), norm_b.double(), eps=1e-5)
    p = proj.shape[0] // heads
    out = torch.zeros_like(x)
    for k in range(heads):
        Pk = proj[k * p : (k + 1) * p].T  # (d, p): the head's basis as columns
        W = xn @ Pk  # (B, T, p)
        A = torch.softmax(W @ W.transpose(1, 2) / math.sqrt(p), dim=-1)
        out += (A @ W) @ Pk.T
    return x + step.double() * out


def literal_msca(q, z, norm_w, norm_b, proj, step, heads):
    """SPEC §1.3 in float64: only the image tokens are normalised."""
    q, z, proj = q.double(), z.double(), proj.double()
    zn = F.layer_norm(z, z.shape[-1:], norm_w.double(), norm_b.double(), eps=1e-5)
    p = proj.shape[0] // heads
    out = torch.zeros_like(q)
    for k in range(heads):
        Pk = proj[k * p : (k + 1) * p].T
        W, V = zn @ Pk, q @ Pk
        A = torch.softmax(V @ W.transpose(1, 2) / math.sqrt(p), dim=-1)
        out += (A @ W) @ Pk.T
    return q + step.double() * out


def randomize_norm(layer):
    with torch.no_grad():
        layer.norm.weight.normal_(1, 0.2)
        layer.norm.bias.normal_(0, 0.2)


def test_mssa_matches_literal_formula():
    layer = MSSA(dim=24, heads=3, dim_head=10)
    randomize_norm(layer)
    x = torch.randn(2, 17, 24)
    expected = literal_mssa(x, layer.norm.weight, layer.norm.bias, layer.proj, layer.step_size, 3)
    torch.testing.assert_close(layer(x).double(), expected, **FP32)


def test_msca_matches_literal_formula():
    layer = MSCA(dim=24, heads=3, dim_head=6)
    randomize_norm(layer)
    q, z = torch.randn(2, 5, 24), torch.randn(2, 17, 24)
    expected = literal_msca(q, z, layer.norm.weight, layer.norm.bias, layer.proj, layer.step_size, 3)
    torch.testing.assert_close(layer(q, z).double(), expected, **FP32)


@pytest.mark.parametrize("cross", [False, True])
def test_fused_path_equals_explicit_attention_path(cross):
    layer = (MSCA if cross else MSSA)(dim=16, heads=2, dim_head=8)
    x, z = torch.randn(3, 7, 16), torch.randn(3, 11, 16)
    args = (x, z) if cross else (x,)
    fused = layer(*args)
    explicit, attention = layer(*args, return_attention=True)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-6)
    assert attention.shape == (3, 2, 7, 11 if cross else 7)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 2, 7))


def test_initialisation_follows_spec():
    layer = MSSA(dim=400, heads=4, dim_head=100)
    assert layer.proj.shape == (400, 400)
    # randn / sqrt(d): entries have variance 1/d.
    assert abs(layer.proj.var().item() * 400 - 1) < 0.05
    sa = DepictSA(dim=64, n_cls=200)
    assert abs(sa.cls_emb.std().item() - 0.02) < 0.003


@pytest.mark.parametrize("cross", [False, True])
def test_in_head_rotation_of_P_leaves_the_layer_unchanged(cross):
    """P_k -> P_k R_k with R_k orthogonal: W_k W_kᵀ, A W_k P_kᵀ are all invariant (SPEC §3.4)."""
    layer = (MSCA if cross else MSSA)(dim=20, heads=2, dim_head=5)
    x, z = torch.randn(2, 9, 20), torch.randn(2, 13, 20)
    args = (x, z) if cross else (x,)
    before = layer(*args)
    with torch.no_grad():
        for k in range(2):
            R, _ = torch.linalg.qr(torch.randn(5, 5))
            rows = layer.proj[k * 5 : (k + 1) * 5]
            rows.copy_(R.T @ rows)  # proj rows are P_kᵀ, so P_k R_k has rows R_kᵀ P_kᵀ
    torch.testing.assert_close(layer(*args), before, **FP32)


def test_rotation_mixing_heads_changes_the_layer():
    """The invariance above is specific to in-head rotations: a global one must change the output."""
    layer = MSSA(dim=20, heads=2, dim_head=5)
    x = torch.randn(2, 9, 20)
    before = layer(x)
    with torch.no_grad():
        R, _ = torch.linalg.qr(torch.randn(10, 10))
        layer.proj.copy_(R.T @ layer.proj)
    assert (layer(x) - before).abs().max() > 1e-3


def test_depict_sa_is_mssa_stack_then_mask_head():
    dec = DepictSA(dim=16, n_cls=4, n_layers=2, heads=2, dim_head=8)
    z = torch.randn(2, 6, 16)
    x = torch.cat([z, dec.cls_emb.expand(2, -1, -1)], 1).double()
    for layer in dec.layers:
        x = literal_mssa(x, layer.norm.weight, layer.norm.bias, layer.proj, layer.step_size, 2)
    x = F.layer_norm(x, (16,), dec.decoder_norm.weight.double(), dec.decoder_norm.bias.double(), eps=1e-5)
    m = F.normalize(x[:, :6], dim=-1) @ F.normalize(x[:, 6:], dim=-1).transpose(1, 2)
    m = F.layer_norm(m, (4,), dec.mask_norm.weight.double(), dec.mask_norm.bias.double(), eps=1e-5)
    expected = m.transpose(1, 2).reshape(2, 4, 2, 3)
    torch.testing.assert_close(dec(z, (2, 3)).double(), expected, **FP32)


def test_depict_ca_classes_attend_to_refined_tokens():
    dec = DepictCA(dim=16, n_cls=3, n_layers=2, heads=2, dim_head=8, n_cross_layers=2, cross_dim_head=4)
    z = torch.randn(1, 4, 16)
    zz = z.double()
    for layer in dec.self_layers:
        zz = literal_mssa(zz, layer.norm.weight, layer.norm.bias, layer.proj, layer.step_size, 2)
    zz = F.layer_norm(zz, (16,), dec.snorm.weight.double(), dec.snorm.bias.double(), eps=1e-5)
    q = dec.cls_emb.double()
    for layer in dec.cross_layers:
        q = literal_msca(q, zz, layer.norm.weight, layer.norm.bias, layer.proj, layer.step_size, 2)
    q = F.layer_norm(q, (16,), dec.cnorm.weight.double(), dec.cnorm.bias.double(), eps=1e-5)
    m = F.normalize(zz, dim=-1) @ F.normalize(q, dim=-1).transpose(1, 2)
    m = F.layer_norm(m, (3,), dec.mask_norm.weight.double(), dec.mask_norm.bias.double(), eps=1e-5)
    torch.testing.assert_close(dec(z, (2, 2)).double(), m.transpose(1, 2).reshape(1, 3, 2, 2), **FP32)


def test_mask_transformer_matches_literal_segmenter_decoder():
    from tests.official_layout import K, decoder_forward

    dec = MaskTransformer(dim_encoder=48, n_cls=K, dim=128, n_layers=2, heads=2).eval()
    state = {f"decoder.{k}": v.double() for k, v in dec.state_dict().items()}
    z = torch.randn(2, 12, 48)
    # The reference uses d // 64 heads for decoder blocks: 128 // 64 = 2.
    expected = decoder_forward(z.double(), state, "mask_transformer", (3, 4))
    torch.testing.assert_close(dec(z, (3, 4)).double(), expected, **FP32)


# --------------------------------------------------------------------------------------- CBT and ToST


def official_cbt_state(dim, n_cls, heads, width, seed=0):
    """A CBT decoder state dict in the official layout (``decoder.net.layers.<l>.fn.proj.weight``, ...)."""
    from tests.official_layout import _ln, cbsa_layers

    g = torch.Generator().manual_seed(seed)
    return {
        "decoder.cls_emb": torch.randn(1, n_cls, dim, generator=g),
        **_ln("decoder.mask_norm", n_cls, g),
        **cbsa_layers("decoder.net", 3, heads, width, dim, g),
        **_ln("decoder.decoder_norm", dim, g),
    }


def cbt_from_official(state, dim, n_cls, heads, width, rep_grid):
    from depict_analysis.models.decoders.base import get_family

    dec = CBT(dim, n_cls, n_layers=3, heads=heads, dim_head=width, rep_grid=rep_grid)
    decoder_keys = {k.removeprefix("decoder."): v for k, v in state.items()}
    dec.load_state_dict(get_family("cbt").official.convert(decoder_keys), strict=True)
    return dec.eval()


@pytest.mark.parametrize(
    "dim, n_cls, heads, width, grid, rep_grid, tol",
    [(384, 150, 3, 100, (32, 32), 10, 1e-5),  # the official sizes: ViT-S, ADE20K, 3 x 100, 512 px
     (40, 7, 2, 12, (5, 7), 3, 1e-5),  # another K, heads, width, a non-square grid, fewer representatives
     # more representatives than patches (overlapping pooling cells); the LayerNorm over K = 4 scores
     # amplifies float32 rounding most
     (40, 4, 4, 6, (3, 2), 10, 5e-5)],
)
def test_cbt_matches_the_official_cbsa_decoder(dim, n_cls, heads, width, grid, rep_grid, tol):
    from tests.official_layout import cbt_decoder

    state = official_cbt_state(dim, n_cls, heads, width)
    dec = cbt_from_official(state, dim, n_cls, heads, width, rep_grid)
    z = torch.randn(2, grid[0] * grid[1], dim, generator=torch.Generator().manual_seed(1))
    expected = cbt_decoder(z.double(), {k: v.double() for k, v in state.items()}, grid, heads, n_cls, rep_grid)
    with torch.no_grad():
        ours = dec(z, grid)
    assert ours.shape == (2, n_cls, *grid)
    torch.testing.assert_close(ours.double(), expected, atol=tol, rtol=tol)


def test_cbsa_representatives_are_pooled_patch_projections_moved_by_the_contract_step():
    from tests.official_layout import pooled_cells

    layer = CBSA(dim=16, heads=2, dim_head=4, rep_grid=2)
    with torch.no_grad():
        layer.step_rep.zero_()  # no contract step: the representatives are the pooled projections
    x = torch.randn(1, 4 * 6 + 3, 16)  # a 4 x 6 grid and 3 class tokens
    _, reps, contract = layer(x, (4, 6), details=True)
    w = layer.proj(layer.norm(x))[:, :24].reshape(1, 4, 6, 8)
    expected = pooled_cells(w, 2).view(1, 4, 2, 4).transpose(1, 2)  # (B, h, r², p)
    torch.testing.assert_close(reps, expected)
    assert contract.shape == (1, 2, 4, 27)
    torch.testing.assert_close(contract.sum(-1), torch.ones(1, 2, 4))


def literal_tssa(x, layer):
    """AttentionTSSA on LN(x) in float64, head by head, plus the residual (bias-free qkv, its default)."""
    x = x.double()
    xn = F.layer_norm(x, x.shape[-1:], layer.norm.weight.double(), layer.norm.bias.double(), eps=1e-5)
    w = xn @ layer.qkv.weight.double().T
    h = layer.heads
    p = w.shape[-1] // h
    heads = [w[..., k * p : (k + 1) * p] for k in range(h)]
    # per token and head: squared norm of the token's row after L2-normalising every column over the tokens
    energy = torch.stack([(wk / wk.norm(dim=1, keepdim=True)).pow(2).sum(-1) for wk in heads], dim=1)  # (B, h, T)
    pi = torch.softmax(energy * layer.temp.double(), dim=1)  # nn.Softmax(dim=1): over the heads
    out = []
    for k, wk in enumerate(heads):
        weights = pi[:, k] / (pi[:, k].sum(-1, keepdim=True) + 1e-8)  # (B, T)
        dots = (weights.unsqueeze(-1) * wk.pow(2)).sum(1, keepdim=True)  # (B, 1, p)
        out.append(-(wk * pi[:, k].unsqueeze(-1)) / (1 + dots))
    return x + torch.cat(out, -1) @ layer.to_out.weight.double().T + layer.to_out.bias.double()


def randomize_tssa(layer):
    randomize_norm(layer)
    with torch.no_grad():
        layer.qkv.weight.normal_(0, 0.3)
        layer.temp.normal_(1, 0.5)
        layer.to_out.bias.normal_(0, 0.1)


def test_tssa_matches_literal_attention_tssa():
    layer = TSSA(dim=24, heads=3, dim_head=10)
    randomize_tssa(layer)
    x = torch.randn(2, 17, 24)
    torch.testing.assert_close(layer(x).double(), literal_tssa(x, layer), **FP32)
    _, membership = layer(x, details=True)
    torch.testing.assert_close(membership.sum(1), torch.ones(2, 17))  # Π: each token's shares over the heads


def test_tost_is_depict_sa_with_tssa_layers():
    dec = ToST(dim=16, n_cls=4, n_layers=2, heads=2, dim_head=8)
    for layer in dec.layers:
        randomize_tssa(layer)
    z = torch.randn(2, 6, 16)
    x = torch.cat([z, dec.cls_emb.expand(2, -1, -1)], 1)
    for layer in dec.layers:
        x = literal_tssa(x, layer)
    x = F.layer_norm(x, (16,), dec.decoder_norm.weight.double(), dec.decoder_norm.bias.double(), eps=1e-5)
    m = F.normalize(x[:, :6], dim=-1) @ F.normalize(x[:, 6:], dim=-1).transpose(1, 2)
    m = F.layer_norm(m, (4,), dec.mask_norm.weight.double(), dec.mask_norm.bias.double(), eps=1e-5)
    torch.testing.assert_close(dec(z, (2, 3)).double(), m.transpose(1, 2).reshape(2, 4, 2, 3), **FP32)
