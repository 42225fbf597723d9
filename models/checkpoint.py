"""Checkpoints: our one-file format, and official DEPICT / Segmenter releases (SPEC §2).

Our format: ``{"format": "depict-analysis/1", "config": ModelConfig.to_dict(), "model": state_dict, ...}``.
Official: a folder with ``checkpoint.pth`` and ``variant.yml``; the decoder family is read off the
state-dict keys, since variant.yml calls every decoder ``mask_transformer``: each family registers
the key that identifies its releases and how their keys map onto its module
(``models/decoders/base.py:OfficialFormat``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from depict_analysis.models.backbone import BackboneConfig
from depict_analysis.models.errors import CheckpointError, ConfigError
from depict_analysis.models.decoders.base import DecoderConfig, Family, families
from depict_analysis.models.registry import ModelConfig, create_model
from depict_analysis.models.segmentor import Segmentor

FORMAT = "depict-analysis/1"


# ---------------------------------------------------------------------------------------------- files


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved file is for others to read too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict:
    """Load a checkpoint file onto the CPU, refusing pickled code unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; our own error says more
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: holds Python objects beyond tensors and numbers, and loading it could run code; "
                "if you trust its source, pass --trust-checkpoint"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, ValueError) as e:
        # the weights-only unpickler raises KeyError / IndexError on arbitrary bytes (e.g. a text file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


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


def read_variant(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        variant = yaml.load(path.read_text(), Loader=_VariantLoader)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not a valid variant.yml ({str(e).splitlines()[0]})") from None
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise CheckpointError(f"{path}: variant.yml has no net_kwargs section")
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
    return official_family(state).official.config(state, kwargs)


def split_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An official state dict -> (encoder keys, decoder keys), each with its prefix removed."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if not encoder or not decoder:
        raise CheckpointError("state dict lacks encoder.* or decoder.* keys: not a Segmenter/DEPICT checkpoint")
    return encoder, decoder


def official_config(variant: dict, decoder_state: dict[str, Tensor]) -> ModelConfig:
    """Our ModelConfig from variant.yml's net_kwargs and the (official-named) decoder keys."""
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
    n_cls = net.get("n_cls", decoder_kwargs.get("n_cls"))
    return ModelConfig(backbone, infer_decoder(decoder_state, decoder_kwargs), n_cls, name=f"official:{net.get('backbone')}")


def load_official(folder: Path, trust: bool = False) -> tuple[Segmentor, dict]:
    variant_path, ckpt_path = folder / "variant.yml", folder / "checkpoint.pth"
    if not variant_path.is_file():
        raise CheckpointError(f"{folder}: an official release needs variant.yml beside checkpoint.pth")
    variant = read_variant(variant_path)
    raw = read_checkpoint(ckpt_path, trust)
    encoder, decoder = split_official(raw.get("model", raw))
    config = official_config(variant, decoder)
    if config.n_cls is None:
        config.n_cls = raw.get("n_cls")
    model = create_model(config)
    try:
        model.encoder.load_vit_weights(encoder)
        model.decoder.load_state_dict(official_family(decoder).official.convert(decoder), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit the model ({_first_line(e)})") from None
    inference = variant.get("inference_kwargs", {})
    return model, {"source": "official", "variant": variant, "inference": inference, "epoch": raw.get("epoch")}


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


# ----------------------------------------------------------------------------------------------- entry


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", trust: bool = False) -> tuple[Segmentor, dict]:
    """Load any supported checkpoint -> (model in eval mode on ``device``, metadata).

    ``path`` is our ``.pt`` file, an official release folder, or its ``checkpoint.pth``.
    """
    path = Path(path)
    if path.is_dir():
        model, meta = load_official(path, trust)
    elif (path.parent / "variant.yml").is_file() and path.suffix == ".pth":
        model, meta = load_official(path.parent, trust)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    else:
        raw = read_checkpoint(path, trust)
        if raw.get("format") != FORMAT:
            if "model" in raw and "n_cls" in raw:
                raise CheckpointError(f"{path}: looks like an official checkpoint but variant.yml is missing beside it")
            raise CheckpointError(f"{path}: not a depict-analysis checkpoint (no format tag {FORMAT!r})")
        try:
            model = create_model(ModelConfig.from_dict(raw["config"]))
            model.load_state_dict({k: v.float() for k, v in raw["model"].items()}, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: config and weights do not fit ({_first_line(e)})") from None
        meta = {k: v for k, v in raw.items() if k not in ("model", "config", "optimizer")}
        meta["source"] = "depict-analysis"
    return model.to(device).eval(), meta
