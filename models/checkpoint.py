"""Checkpoints: our one-file format, and official DEPICT / Segmenter releases (SPEC §2).

Our format: ``{"format": "depict-analysis/1", "config": ModelConfig.to_dict(), "model": state_dict, ...}``.
Official: a folder with ``checkpoint.pth`` and ``variant.yml``; the decoder family is read off the
state-dict keys, since variant.yml calls every decoder ``mask_transformer``: each family registers
the key that identifies its releases and how their keys map onto its module
(``models/decoders/base.py:OfficialFormat``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from depict_analysis.models.backbone import BackboneConfig, vit_state
from depict_analysis.foundation.errors import CheckpointError, ConfigError
from depict_analysis.models.decoders.base import DecoderConfig, Family, families
from depict_analysis.models import serialization
from depict_analysis.foundation.files import atomic_write
from depict_analysis.foundation.yaml_text import load_yaml
from depict_analysis.models.registry import ModelConfig, create_model
from depict_analysis.models.segmentor import Segmentor

FORMAT = "depict-analysis/1"


# ---------------------------------------------------------------------------------------------- files


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint file onto the CPU, refusing pickled code unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = serialization.load(path, trust)
    except serialization.PickledObjects:
        raise CheckpointError(
            f"{path}: holds Python objects beyond tensors and numbers, and loading it could run code; "
            "if you trust its source, pass trust=True", arguments="trust=True"
        ) from None
    except serialization.NotAPyTorchFile as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------ validation


def check_weights(state: Any, source: str | os.PathLike) -> dict[str, Tensor]:
    """``state`` if it is a mapping of names to tensors whose floating-point values are all finite;
    otherwise a CheckpointError naming the first entry that is not (numbers from NaN / Inf weights
    would be reported as if they meant something)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: its weights are a {type(state).__name__}, not a mapping of names to tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: weight {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: weight {name} holds {bad} NaN / Inf value(s) of {value.numel()}; the file is broken")
    return dict(state)


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """The shape of every weight of the model ``config`` describes, without allocating it (built on
    the ``meta`` device)."""
    with torch.device("meta"):
        model = create_model(config)
    return {name: value.shape for name, value in model.state_dict().items()}


def check_fits(config: ModelConfig, state: Mapping[str, Tensor], source: str | os.PathLike, resizable: tuple[str, ...] = ()) -> None:
    """Compare the weights' names and shapes with the model ``config`` builds, before building it: a
    config that claims another size is refused with the first difference, not allocated. Names in
    ``resizable`` (position embeddings) may differ in their token count but not in their width."""
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        detail = f"lack {missing[0]}" if missing else f"have {unexpected[0]}, which the model has not"
        raise CheckpointError(f"{source}: weights and config do not fit: the weights {detail} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for name, shape in expected.items():
        found = state[name].shape
        same = found[-1:] == shape[-1:] and len(found) == len(shape) if name in resizable else found == shape
        if not same:
            raise CheckpointError(
                f"{source}: weights and config do not fit: {name} is {tuple(found)}, the config needs {tuple(shape)}"
            )


def _config_from_dict(raw: Any, source: str | os.PathLike) -> ModelConfig:
    """Our file's ``config`` entry -> ModelConfig, or a CheckpointError saying what is wrong with it."""
    if not isinstance(raw, Mapping) or not all(isinstance(raw.get(k), Mapping) for k in ("backbone", "decoder")):
        raise CheckpointError(f"{source}: its config is not a mapping with backbone and decoder sections")
    try:
        config = ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{source}: invalid config ({e})") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: invalid config ({_first_line(e)})") from None
    return config


def save_checkpoint(path: str | os.PathLike, model: Segmentor, **state: Any) -> None:
    """Write our format: config + weights (+ any training state) in one file, atomically."""
    if model.config is None:
        raise ConfigError("the model has no ModelConfig; build it with depict_analysis.models.create_model")
    payload = {"format": FORMAT, "config": model.config.to_dict(), "model": model.state_dict(), **state}
    atomic_save(payload, path)


# ------------------------------------------------------------------------------------------- official


class _VariantLoader(yaml.SafeLoader):
    """A safe YAML loader that also reads Segmenter's ``!!python/tuple`` tag (and nothing else unsafe)."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _image_size(value: Any) -> bool:
    return _positive_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_positive_int, value)))


def _rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


# The variant.yml fields we read (section, field) -> (check, what it must be). Fields may be absent
# here; official_config says which it needs.
VARIANT_SCHEMA: dict[tuple[str, str], tuple[Any, str]] = {
    **{("net_kwargs", key): (_positive_int, "a positive integer") for key in ("d_model", "n_layers", "n_heads", "patch_size", "n_cls")},
    ("net_kwargs", "image_size"): (_image_size, "a positive integer or a pair of them"),
    ("net_kwargs", "distilled"): (lambda v: isinstance(v, bool), "true or false"),
    ("net_kwargs", "normalization"): (lambda v: isinstance(v, str), "a string"),
    ("net_kwargs", "backbone"): (lambda v: isinstance(v, str), "a string"),
    ("net_kwargs", "drop_path_rate"): (_rate, "a number in [0, 1)"),
    ("net_kwargs", "decoder"): (lambda v: isinstance(v, dict), "a mapping"),
    ("inference_kwargs", "window_size"): (_positive_int, "a positive integer"),
    ("inference_kwargs", "window_stride"): (_positive_int, "a positive integer"),
    ("dataset_kwargs", "dataset"): (lambda v: isinstance(v, str), "a string"),
}


def read_variant(path: str | os.PathLike) -> dict:
    """An official release's variant.yml, its fields checked against ``VARIANT_SCHEMA``."""
    path = Path(path)
    try:
        variant = load_yaml(path.read_text(), str(path), _VariantLoader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not a valid variant.yml ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({_first_line(e)})") from None
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise CheckpointError(f"{path}: variant.yml has no net_kwargs section")
    for section in ("inference_kwargs", "dataset_kwargs"):
        if not isinstance(variant.get(section, {}), dict):
            raise CheckpointError(f"{path}: {section} must be a mapping, found {type(variant[section]).__name__}")
    for (section, key), (valid, expected) in VARIANT_SCHEMA.items():
        value = variant.get(section, {}).get(key)
        if value is not None and not valid(value):
            raise CheckpointError(f"{path}: {section}.{key} must be {expected}, got {value!r}")
    inference = variant.get("inference_kwargs", {})
    if inference.get("window_stride", 0) > inference.get("window_size", math.inf):
        raise CheckpointError(f"{path}: inference_kwargs.window_stride exceeds window_size: windows would leave gaps")
    return variant


def official_family(state: dict[str, Tensor]) -> Family:
    """The family whose official releases have these decoder keys (prefix ``decoder.`` stripped)."""
    for family in families():
        if family.official is not None and family.official.signature in state:
            return family
    expected = ", ".join(f"{f.official.signature} for {f.name}" for f in families() if f.official is not None)
    raise CheckpointError(f"unrecognised decoder keys (expected {expected}; found e.g. {sorted(state)[:3]})")


def infer_decoder(state: dict[str, Tensor], kwargs: dict) -> DecoderConfig:
    """The decoder configuration from the official decoder keys and variant.yml's ``decoder`` section."""
    family = official_family(state)
    try:
        return family.official.config(state, kwargs)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{family.name} decoder weights lack what their layout needs ({_first_line(e)})") from None


def split_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An official state dict -> (encoder keys, decoder keys), each with its prefix removed."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if not encoder or not decoder:
        raise CheckpointError("state dict lacks encoder.* or decoder.* keys: not a Segmenter/DEPICT checkpoint")
    return encoder, decoder


def official_config(variant: dict, decoder_state: dict[str, Tensor], n_cls: int | None = None) -> ModelConfig:
    """Our ModelConfig from variant.yml's net_kwargs and the (official-named) decoder keys; ``n_cls``
    when variant.yml does not say."""
    net = variant["net_kwargs"]
    decoder_kwargs = net.get("decoder") or {}
    try:
        backbone = BackboneConfig(
            d_model=net["d_model"],
            n_layers=net["n_layers"],
            n_heads=net["n_heads"],
            patch_size=net["patch_size"],
            image_size=tuple(net["image_size"]) if not isinstance(net["image_size"], int) else (net["image_size"],) * 2,
            distilled=bool(net.get("distilled", False)),
            normalization=net.get("normalization", "vit"),
            drop_path_rate=net.get("drop_path_rate", 0.0),
            timm_name=net.get("backbone"),
        )
    except KeyError as e:
        raise CheckpointError(f"variant.yml net_kwargs lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"variant.yml net_kwargs: {e}") from None
    n_cls = net.get("n_cls", decoder_kwargs.get("n_cls", n_cls))
    if not _positive_int(n_cls):
        raise CheckpointError(f"the number of classes must be a positive integer, got {n_cls!r}")
    return ModelConfig(backbone, infer_decoder(decoder_state, decoder_kwargs), n_cls, name=f"official:{net.get('backbone')}")


def load_official(folder: Path, trust: bool = False) -> tuple[Segmentor, dict]:
    variant_path, ckpt_path = folder / "variant.yml", folder / "checkpoint.pth"
    if not variant_path.is_file():
        raise CheckpointError(f"{folder}: an official release needs variant.yml beside checkpoint.pth")
    variant = read_variant(variant_path)
    raw = read_checkpoint(ckpt_path, trust)
    encoder, decoder = split_official(check_weights(raw.get("model", raw), ckpt_path))
    config = official_config(variant, decoder, raw.get("n_cls"))
    family = official_family(decoder)
    converted = {f"encoder.vit.{k}": v for k, v in vit_state(encoder).items()}
    converted |= {f"decoder.{k}": v for k, v in family.official.convert(decoder).items()}
    check_fits(config, converted, ckpt_path, resizable=("encoder.vit.pos_embed",))
    model = create_model(config)
    try:
        model.encoder.load_vit_weights(encoder)
        model.decoder.load_state_dict(family.official.convert(decoder), strict=True)
    except (RuntimeError, ConfigError) as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the model ({_first_line(e)})") from None
    inference = variant.get("inference_kwargs", {})
    return model, {"source": "official", "variant": variant, "inference": inference, "epoch": raw.get("epoch")}


def _first_line(e: BaseException) -> str:
    """One line of an exception's message (its first two non-empty lines), at most 300 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2])[:300]


# ----------------------------------------------------------------------------------------------- entry


def model_from(raw: dict, source: str | os.PathLike) -> Segmentor:
    """The model of one of our checkpoint dicts, its weights and config checked (types, finite values,
    shapes) before it is built; float16 weights are read back as float32."""
    state = check_weights(raw.get("model"), source)
    config = _config_from_dict(raw.get("config"), source)
    check_fits(config, state, source)
    model = create_model(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def load_ours(path: Path, trust: bool = False) -> tuple[Segmentor, dict]:
    """Our one-file format -> (model, everything else the file holds but the optimizer state)."""
    raw = read_checkpoint(path, trust)
    if raw.get("format") != FORMAT:
        if "model" in raw and "n_cls" in raw:
            raise CheckpointError(f"{path}: looks like an official checkpoint but variant.yml is missing beside it")
        raise CheckpointError(f"{path}: not a depict-analysis checkpoint (no format tag {FORMAT!r})")
    meta = {k: v for k, v in raw.items() if k not in ("model", "config", "optimizer")}
    return model_from(raw, path), meta | {"source": "depict-analysis"}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False) -> tuple[Segmentor, dict]:
    """Load any supported checkpoint -> (model in eval mode on ``device``, metadata).

    ``path`` is our ``.pt`` file, an official release folder, or its ``checkpoint.pth``. Weights
    that are not finite, or that do not fit the config, are refused (``CheckpointError``).
    """
    path = Path(path)
    if path.is_dir():
        model, meta = load_official(path, trust)
    elif (path.parent / "variant.yml").is_file() and path.suffix == ".pth":
        model, meta = load_official(path.parent, trust)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    else:
        model, meta = load_ours(path, trust)
    return model.to(device).eval(), meta
