"""Run a model with forward hooks on its decoder layers and return what every analysis reads.

``trace(model, images)`` -> ``Trace``:
- ``tokens[j]``: patch tokens after decoder layer j, ``tokens[0]`` = decoder input Z_0, (B, N, d)
- ``classes[i]``: class embeddings at stage ``class_stages[i]`` ("input", then after each layer that
  updates them: every MSSA layer for DEPICT-SA, every MSCA layer for DEPICT-CA), (B, K, d)
- ``subspaces``: every projection P_l the decoder owns, as ``Subspace(name, layer, proj (h, p, d))``
- ``class_embeddings``: the final L2-normalised class embeddings Q̂ the mask head uses, (B, K, d)
- ``masks``: the model's output logits, (B, K, H, W); ``attention[l]`` on request, (B, h, T, S)

Where these live differs per decoder family; each family has one small adapter below that names
its layers, so the analyses never look at model classes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depict_analysis.models.decoders.depict import MSCA, MSSA, DepictCA, DepictSA
from depict_analysis.models.decoders.linear import LinearDecoder
from depict_analysis.models.decoders.mask_transformer import MaskTransformer


@dataclass
class Subspace:
    """A projection P the decoder owns: ``proj[k]`` holds P_kᵀ, rows = basis vectors of head k."""

    name: str  # e.g. "mssa1", "msca2", "block1.W_Q"
    layer: int | None  # the j whose tokens[j] this layer produces (None: it updates classes only)
    proj: Tensor  # (h, p, d)


@dataclass
class Trace:
    family: str
    grid: tuple[int, int]
    tokens: list[Tensor]
    classes: list[Tensor]
    class_stages: list[str]
    subspaces: list[Subspace]
    class_embeddings: Tensor
    masks: Tensor
    attention: list[Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """L: the number of token-updating decoder layers (``tokens`` has L + 1 entries)."""
        return len(self.tokens) - 1


def _head_attention(module: nn.Module, inputs: tuple) -> Tensor:
    """Attention probabilities of a layer, recomputed from its inputs (forward() skips the hooks)."""
    if isinstance(module, (MSSA, MSCA)):
        return module.forward(*inputs, return_attention=True)[1]
    x = inputs[0]  # timm Attention: softmax(q kᵀ / sqrt(p))
    B, T, d = x.shape
    q, k, _ = module.qkv(x).reshape(B, T, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(q), module.k_norm(k)
    return torch.softmax(q @ k.transpose(-2, -1) * module.scale, dim=-1)


class _Adapter:
    """Where one decoder family keeps its layers. Subclasses fill in the four hooks below."""

    family = ""
    joint = False  # token layers output [patches ; classes] in one sequence
    stage = "layer"  # name of a class-updating layer, numbered from 1

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder

    def token_layers(self) -> list[nn.Module]:
        return []

    def class_layers(self) -> list[nn.Module]:
        return []

    def attention_modules(self) -> list[nn.Module]:
        return []

    def subspaces(self) -> list[Subspace]:
        return []

    def final_module(self) -> nn.Module | None:
        """The module whose output holds the final class embeddings (before the mask head)."""
        return None

    def final_classes(self, output: Tensor, n_tokens: int) -> Tensor:
        return output


class _DepictSA(_Adapter):
    family, joint, stage = "depict_sa", True, "mssa"

    def token_layers(self):
        return list(self.decoder.layers)

    attention_modules = token_layers

    def subspaces(self):
        return [Subspace(f"mssa{l + 1}", l + 1, m.subspaces()) for l, m in enumerate(self.decoder.layers)]

    def final_module(self):
        return self.decoder.decoder_norm

    def final_classes(self, output, n_tokens):
        return output[:, n_tokens:]


class _DepictCA(_Adapter):
    family, stage = "depict_ca", "msca"

    def token_layers(self):
        return list(self.decoder.self_layers)

    def class_layers(self):
        return list(self.decoder.cross_layers)

    def attention_modules(self):
        return list(self.decoder.self_layers) + list(self.decoder.cross_layers)

    def subspaces(self):
        own = [Subspace(f"mssa{l + 1}", l + 1, m.subspaces()) for l, m in enumerate(self.decoder.self_layers)]
        cross = [Subspace(f"msca{l + 1}", None, m.subspaces()) for l, m in enumerate(self.decoder.cross_layers)]
        return own + cross

    def final_module(self):
        return self.decoder.cnorm


class _MaskTransformer(_Adapter):
    family, joint, stage = "mask_transformer", True, "block"

    def token_layers(self):
        return list(self.decoder.blocks)

    def attention_modules(self):
        return [block.attn for block in self.decoder.blocks]

    def subspaces(self):
        """Segmenter's counterpart of P: each block's query projection W_Q = qkv.weight[:d] (SPEC §3.3)."""
        spaces = []
        for i, block in enumerate(self.decoder.blocks):
            d, h = block.attn.qkv.in_features, block.attn.num_heads
            spaces.append(Subspace(f"block{i + 1}.W_Q", i + 1, block.attn.qkv.weight[:d].view(h, d // h, d)))
        return spaces

    def final_module(self):
        return self.decoder.decoder_norm

    def final_classes(self, output, n_tokens):
        return output[:, n_tokens:] @ self.decoder.proj_classes


class _Linear(_Adapter):
    family = "linear"


ADAPTERS: dict[type, type[_Adapter]] = {
    DepictSA: _DepictSA,
    DepictCA: _DepictCA,
    MaskTransformer: _MaskTransformer,
    LinearDecoder: _Linear,
}


def adapter_for(decoder: nn.Module) -> _Adapter:
    for cls, adapter in ADAPTERS.items():
        if isinstance(decoder, cls):
            return adapter(decoder)
    raise TypeError(f"no trace adapter for decoder {type(decoder).__name__}")


def trace(model: nn.Module, images: Tensor, attention: bool = False) -> Trace:
    """Run ``model`` on normalised ``images`` (B, 3, H, W) and record the decoder's internals.

    The hooks only read: the returned ``masks`` equal ``model(images)``. They are removed on return
    and on error. Runs under ``torch.inference_mode``.
    """
    adapter = adapter_for(model.decoder)
    seen: dict[str, list] = {"input": [], "grid": [], "tokens": [], "classes": [], "final": [], "attention": []}
    n_tokens = []

    def on_input(module, args):  # decoder(z, grid)
        seen["input"].append(args[0])
        seen["grid"].append(tuple(args[1]))
        n_tokens.append(args[0].shape[1])

    def on_token_layer(module, args, output):
        if adapter.joint:
            seen["tokens"].append(output[:, : n_tokens[0]])
            seen["classes"].append(output[:, n_tokens[0] :])
        else:
            seen["tokens"].append(output)

    handles = [model.decoder.register_forward_pre_hook(on_input)]
    handles += [m.register_forward_hook(on_token_layer) for m in adapter.token_layers()]
    handles += [m.register_forward_hook(lambda m, a, out: seen["classes"].append(out)) for m in adapter.class_layers()]
    if adapter.final_module() is not None:
        handles.append(adapter.final_module().register_forward_hook(lambda m, a, out: seen["final"].append(out)))
    if attention:
        handles += [
            m.register_forward_hook(lambda m, a, out: seen["attention"].append(_head_attention(m, a)))
            for m in adapter.attention_modules()
        ]
    try:
        with torch.inference_mode():
            masks = model(images)
            z0 = seen["input"][0]
            if seen["final"]:
                final = adapter.final_classes(seen["final"][0], n_tokens[0])
            else:  # linear: the classifier rows play the role of Q
                final = model.decoder.head.weight.expand(z0.shape[0], -1, -1)
            class_embeddings = F.normalize(final, dim=-1)
            subspaces = [Subspace(s.name, s.layer, s.proj.detach().clone()) for s in adapter.subspaces()]
    finally:
        for handle in handles:
            handle.remove()
    tokens = [z0] + seen["tokens"]
    classes, stages = [], []
    if hasattr(model.decoder, "cls_emb"):
        classes = [model.decoder.cls_emb.detach().expand(z0.shape[0], -1, -1)] + seen["classes"]
        stages = ["input"] + [f"{adapter.stage}{i}" for i in range(1, len(classes))]
    return Trace(
        adapter.family, seen["grid"][0], tokens, classes, stages, subspaces, class_embeddings, masks, seen["attention"]
    )

