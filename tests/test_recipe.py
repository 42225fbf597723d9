"""The official training recipe: decoder initialisation, weight-decay groups, iteration budgets of
the presets, the data stream of an epoch (no batch dropped) and the layering of budgets."""

import pytest
import torch
from torch import nn

from depict_analysis.models import create_model, variant_config
from depict_analysis.models.data import build_dataset
from depict_analysis.models.decoders.depict import DepictCA, DepictSA
from depict_analysis.models.decoders.linear import LinearDecoder
from depict_analysis.models.decoders.mask_transformer import MaskTransformer
from depict_analysis.models.registry import ModelConfig
from depict_analysis.models.train import (DistEnv, TrainConfig, build_config, build_optimizer, model_config_for,
                                          resolve_iterations, steps_per_epoch, train_loader, weight_decay_split)

# ---------------------------------------------------------------------------------- initialisation


def assert_normal(values: torch.Tensor, std: float, rel: float = 0.05) -> None:
    """Sample mean ~ 0 and standard deviation ~ ``std`` (within ``rel``) of many draws."""
    assert values.numel() >= 10_000
    assert abs(values.mean().item()) < 5 * std / values.numel() ** 0.5
    assert values.std().item() == pytest.approx(std, rel=rel)


def test_segmenter_decoders_are_initialised_as_the_official_init_weights():
    torch.manual_seed(0)
    decoder = MaskTransformer(384, 150, 384, n_layers=2, heads=6, dropout=0.1)  # Segmenter's on ViT-S
    linears = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 + 2 * 4  # proj_dec; qkv, proj, fc1, fc2 in each block
    for linear in linears:
        assert_normal(linear.weight, 0.02)
        assert linear.weight.abs().max() <= 2  # timm's / torch's trunc_normal_ cuts at ±2 (absolute)
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    norms = [m for m in decoder.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2  # norm1, norm2 per block; decoder_norm, mask_norm
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert_normal(decoder.cls_emb, 0.02)
    assert_normal(decoder.proj_patch, 384**-0.5)
    assert_normal(decoder.proj_classes, 384**-0.5)

    head = LinearDecoder(384, 150).head
    assert_normal(head.weight, 0.02)
    assert torch.equal(head.bias, torch.zeros(150))


def test_segmenter_blocks_drop_attention_weights_projections_and_mlp_as_configured():
    decoder = create_model("segmenter-vit-t16", n_cls=10).decoder  # the variants' dropout: 0.1 as config.yml
    for block in decoder.blocks:
        drops = [block.attn.attn_drop.p, block.attn.proj_drop.p, block.mlp.drop1.p, block.mlp.drop2.p]
        assert drops == [0.1] * 4
    x = torch.randn(1, 16, 192)
    decoder.train()
    torch.manual_seed(1)
    a = decoder(x, (4, 4))
    torch.manual_seed(2)
    assert not torch.allclose(a, decoder(x, (4, 4)))  # dropout acts in training
    decoder.eval()
    assert torch.equal(decoder(x, (4, 4)), decoder(x, (4, 4)))


@pytest.mark.parametrize("family", [DepictSA, DepictCA])
def test_depict_decoders_are_initialised_as_the_official_code(family):
    torch.manual_seed(0)
    decoder = family(384, 150)
    assert_normal(decoder.cls_emb, 0.02)
    projections = [layer.proj for layer in decoder.modules() if hasattr(layer, "proj")]
    assert len(projections) == (3 if family is DepictSA else 6)
    for proj in projections:
        assert_normal(proj, 384**-0.5)
    for norm in (m for m in decoder.modules() if isinstance(m, nn.LayerNorm)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(norm.bias, torch.zeros_like(norm.bias))


# ---------------------------------------------------------------------------------- weight decay

ENCODER_DECAYED = ["encoder.vit.patch_embed.proj.weight"] + [
    f"encoder.vit.blocks.{i}.{name}.weight" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
]
DECODER_DECAYED = {
    "depict-sa": [f"decoder.layers.{i}.proj" for i in range(3)],
    "depict-ca": [f"decoder.self_layers.{i}.proj" for i in range(3)] + [f"decoder.cross_layers.{i}.proj" for i in range(3)],
    "segmenter": ["decoder.proj_dec.weight"]
    + [f"decoder.blocks.{i}.{name}.weight" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    + ["decoder.proj_patch", "decoder.proj_classes"],
    "linear": ["decoder.head.weight"],
}


@pytest.mark.parametrize("family", list(DECODER_DECAYED))
@pytest.mark.parametrize("distilled", [False, True])
def test_weight_decay_groups_are_timms(family, distilled):
    # timm 0.4.12's add_weight_decay: decay every parameter of 2+ dimensions that is not a bias and
    # not in no_weight_decay: the weight matrices written out above, nothing else
    config = variant_config(f"{family}-tiny", n_cls=5)
    config.backbone.distilled = distilled
    model = create_model(config)
    exempt, decayed = weight_decay_split(model)
    assert sorted(decayed) == sorted(ENCODER_DECAYED + DECODER_DECAYED[family])
    names = [name for name, _ in model.named_parameters()]
    assert sorted(exempt + decayed) == sorted(names)
    tokens = {"encoder.vit.pos_embed", "encoder.vit.cls_token"} | ({"encoder.vit.reg_token"} if distilled else set())
    assert tokens <= set(exempt)  # 3-D tensors: exempt only by name, as Segmenter's no_weight_decay
    assert ("decoder.cls_emb" in exempt) == (family != "linear")


def test_optimizer_decays_the_decayed_group_only():
    model = create_model("segmenter-tiny", n_cls=5)
    one_group = build_optimizer(TrainConfig(weight_decay=0.0), model)
    assert len(one_group.param_groups) == 1 and len(one_group.param_groups[0]["params"]) == len(list(model.parameters()))
    config = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.5)
    optimizer = build_optimizer(config, model)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.0, 0.5]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    # a zero gradient: only weight decay moves a parameter. Nesterov's first step: d = wd p, buffer = d,
    # p -= lr (d + momentum buffer), a factor 1 - lr wd (1 + momentum)
    optimizer.step()
    exempt, decayed = weight_decay_split(model)
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 * 1.9 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)


# ------------------------------------------------------------------------------- budgets and presets

# training-set sizes of the official datasets, and the iteration counts of segm/train.py
OFFICIAL = {"ade20k": (20_210, 161_728), "pascal_context": (4_996, 80_128), "cityscapes": (2_975, 80_352)}


@pytest.mark.parametrize("preset", list(OFFICIAL))
def test_preset_iteration_counts_are_segmenters(preset):
    n_train, iterations = OFFICIAL[preset]
    config = build_config(config_file=preset)
    assert config.iterations is None and not config.amp
    assert resolve_iterations(config, n_train).iterations == iterations


def test_synthetic_presets_keep_their_iteration_counts():
    assert resolve_iterations(build_config(config_file="synthetic-mini"), 128_000).iterations == 8_000
    assert resolve_iterations(build_config(config_file="synthetic-tiny"), 1_000).iterations == 40_000


@pytest.mark.parametrize("n_items, batch, steps", [(20_210, 8, 2527), (16, 4, 4), (17, 4, 5), (3, 8, 1)])
def test_steps_per_epoch_keep_the_last_batch(n_items, batch, steps):
    assert steps_per_epoch(n_items, batch) == steps


def test_an_epoch_budget_set_later_replaces_an_iteration_count(tmp_path):
    assert build_config(config_file="synthetic-mini", overrides=["epochs=3"]).iterations is None
    assert build_config(config_file="ade20k", iterations=100).iterations == 100  # iterations win over epochs
    assert resolve_iterations(TrainConfig(epochs=2, batch_size=4), 10).iterations == 6
    with pytest.raises(ValueError, match="warmup_iters"):
        resolve_iterations(TrainConfig(epochs=1, batch_size=4, warmup_iters=3), 10)


@pytest.mark.parametrize(
    "preset, variant, crop, base, max_ratio",
    [
        ("ade20k", "depict-sa-vit-s16", 512, 512, 4),
        ("ade20k", "segmenter-vit-l16", 640, 640, 4),  # the paper's ViT-L rows
        ("pascal_context", "depict-sa-vit-l16", 480, 520, 8),
        ("cityscapes", "depict-ca-vit-b16", 768, 1024, 2),
    ],
)
def test_preset_sizes(preset, variant, crop, base, max_ratio):
    config = build_config(config_file=preset, model=variant)
    model_config = model_config_for(config, n_cls=10)
    assert model_config.backbone.image_size == (crop, crop)  # training crop and evaluation window
    assert (config.base_size or crop, config.max_ratio) == (base, max_ratio)


def test_the_resize_ratio_range_is_a_training_option():
    assert build_config(config_file="ade20k").ratio_range == [0.5, 2.0]  # mmseg's, the official recipe's
    data = build_dataset("synthetic", None, "train", size=32, length=6)
    model_config = ModelConfig.from_dict(variant_config("depict-sa-tiny", 8).to_dict())  # a 32-px crop
    for ratio_range, unchanged in (([1, 1], 6), ([2, 2], 0)):
        config = TrainConfig(ratio_range=ratio_range, batch_size=6, num_workers=0)
        loader = train_loader(data, model_config, config, DistEnv(), pin_memory=False)
        loader.sampler.set_epoch(0)
        keys, (_, labels) = next(iter(loader.batch_sampler)), next(iter(loader))
        scenes = [torch.from_numpy(data.load_raw(index)[1]) for _, index in keys]
        # ratio 1 crops the whole scene (flipped or not); ratio 2 crops a quarter of it, enlarged
        assert sum(torch.equal(y, s) or torch.equal(y, s.flip(-1)) for y, s in zip(labels, scenes)) == unchanged
    for bad, fragment in (([0, 1], "0 < low <= high"), ([2, 1], "0 < low <= high"), ([1], "a pair"), (1.0, "a pair")):
        with pytest.raises(ValueError, match=f"'ratio_range' must be .*{fragment}"):
            TrainConfig(ratio_range=bad)


def test_pascal_context_preset_trains_the_60_class_dataset():
    # the 60-class Pascal Context (background a class) is `pascal_context`, the 59-class one named apart
    assert build_config(config_file="pascal_context").dataset == "pascal_context"


# -------------------------------------------------------------------------------- the data stream


def epoch_keys(loader, epoch: int) -> list[list[tuple[int, int]]]:
    loader.sampler.set_epoch(epoch)
    return list(loader.batch_sampler)


@pytest.mark.parametrize("length, batch, world", [(10, 4, 1), (9, 4, 2), (17, 4, 2)])
def test_an_epoch_visits_every_item_and_drops_no_batch(length, batch, world):
    data = build_dataset("synthetic", None, "train", size=32, length=length)
    config = TrainConfig(batch_size=batch, seed=3, num_workers=0)
    model_config = ModelConfig.from_dict(variant_config("depict-sa-tiny", 8).to_dict())
    loaders = [train_loader(data, model_config, config, DistEnv(rank, world), pin_memory=False) for rank in range(world)]
    for epoch in (0, 1):
        # DistributedSampler's order written out: randperm seeded seed + epoch, padded with its head, rank r every r-th
        order = torch.randperm(length, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        order += order[: -length % world]
        per_rank = batch // world
        for rank, loader in enumerate(loaders):
            mine = order[rank::world]
            expected = [[(epoch, i) for i in mine[s : s + per_rank]] for s in range(0, len(mine), per_rank)]
            assert epoch_keys(loader, epoch) == expected
            assert len(expected) == steps_per_epoch(length, batch)
