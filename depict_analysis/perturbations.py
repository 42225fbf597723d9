"""What a robustness sweep perturbs (SPEC §3.4), without running anything: the noises, targets and σ grids.

A :class:`Perturbation` names what is perturbed and how; ``resolve_perturbation(noise, target,
relative)`` checks a combination and ``parse_sigmas`` a σ grid. This module needs no torch, so the
command line can offer its choices without loading the model stack; ``depict_analysis.robustness``
applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from depict_analysis.foundation.errors import ConfigError

PARAMETER_NOISES = ("gaussian", "uniform")
PIXEL_NOISES = ("salt-pepper", "blur")  # input-only
STRUCTURED_DESCRIPTIONS = {
    "head-rotation": "head rotation: each P_k → P_k R_k, random orthogonal R_k (p × p)",
    "global-rotation": "global rotation: proj → Rᵀ proj, one random orthogonal R (h·p × h·p) per layer",
    "head-orthonormalize": "head orthonormalisation: each P_k → an orthonormal basis of its span (QR)",
}
STRUCTURED = tuple(STRUCTURED_DESCRIPTIONS)
NOISES = (*PARAMETER_NOISES, *PIXEL_NOISES, *STRUCTURED)
PARAMETER_TARGETS = ("decoder", "encoder", "all")
TARGETS = (*PARAMETER_TARGETS, "input")

PARAMETER_SIGMAS = (0, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1, 0.2, 0.5, 1)  # SPEC §3.4
# The σ grid of the DEPICT README's noise plots (absolute Gaussian noise on every decoder parameter):
# {1..5}·1e-3, {1..5}·1e-2, 0.1 … 0.8, 1.0, and 0. ``parse_sigmas("paper", ...)`` names it.
PAPER_SIGMAS = (0, 1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 1e-2, 2e-2, 3e-2, 4e-2, 5e-2,
                0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
DEFAULT_SIGMAS: dict[str, tuple[float, ...]] = {
    "parameter": PARAMETER_SIGMAS,
    "input": (0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),  # std on the normalised image (range ~[-1, 1] or ±2.5)
    "salt-pepper": (0, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5),  # fraction of pixels
    "blur": (0, 0.5, 1, 1.5, 2, 3, 4, 6, 8),  # kernel std in pixels
    "structured": (0, 1),  # clean, transformed
}


@dataclass(frozen=True)
class Perturbation:
    """What a sweep perturbs: ``noise`` (one of ``NOISES``) applied to ``target`` (one of ``TARGETS``)."""

    noise: str
    target: str
    relative: bool = False

    @property
    def kind(self) -> str:
        """``parameter`` | ``input`` | ``structured``."""
        if self.noise in STRUCTURED:
            return "structured"
        return "input" if self.target == "input" else "parameter"

    @property
    def deterministic(self) -> bool:
        """Whether every draw would give the same result (one draw is enough)."""
        return self.noise in ("blur", "head-orthonormalize")

    @property
    def decoder_only(self) -> bool:
        """Whether only decoder parameters change, so the backbone's Z_0 can be cached."""
        return self.kind == "structured" or self.target == "decoder"

    def default_sigmas(self) -> tuple[float, ...]:
        return DEFAULT_SIGMAS[self.noise if self.noise in PIXEL_NOISES else self.kind]

    def description(self) -> str:
        """One line saying what σ means, for figure titles and JSON."""
        if self.kind == "structured":
            return STRUCTURED_DESCRIPTIONS[self.noise]
        if self.noise == "salt-pepper":
            return "salt-and-pepper: a fraction σ of the pixels set to black or white"
        if self.noise == "blur":
            return "Gaussian blur of the image, std σ pixels"
        law = "N(0, σ²)" if self.noise == "gaussian" else "uniform noise of std σ"
        if self.kind == "input":
            return f"{law} added to the normalised image"
        scale = ", σ × each tensor's std" if self.relative else ""
        what = "every parameter" if self.target == "all" else f"every {self.target} parameter"
        return f"{law} added to {what}{scale}"

    def sigma_label(self) -> str:
        """Axis label for σ."""
        if self.noise == "salt-pepper":
            return "σ (fraction of pixels)"
        if self.noise == "blur":
            return "σ (pixels)"
        return "σ (× tensor std)" if self.relative else "σ"


def resolve_perturbation(noise: str, target: str | None = None, relative: bool = False) -> Perturbation:
    """Check a (noise, target, relative) combination; ``target=None`` picks the natural one.

    Default target: ``input`` for salt-pepper / blur, ``decoder`` otherwise. Raises ``ValueError``
    for combinations that mean nothing (blur of parameters, a rotation of the encoder, ...).
    """
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; expected one of: {', '.join(NOISES)}")
    if target is not None and target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; expected one of: {', '.join(TARGETS)}")
    target = target or ("input" if noise in PIXEL_NOISES else "decoder")
    if noise in PIXEL_NOISES and target != "input":
        raise ConfigError(f"{noise} perturbs images: use target='input' (or leave it out), not {target}", arguments="target='input'")
    if noise in STRUCTURED and target != "decoder":
        raise ConfigError(f"{noise} transforms the decoder's subspace projections: target must be decoder, not {target}", arguments="target")
    if relative and (noise not in PARAMETER_NOISES or target == "input"):
        raise ConfigError("relative scales parameter noise by each tensor's std; it needs gaussian / uniform noise on parameters", arguments="relative")
    return Perturbation(noise, target, relative)


def parse_sigmas(text: str, perturbation: Perturbation) -> tuple[float, ...]:
    """``"0,1e-3,0.01"`` -> sorted unique σ values, always including 0 (the clean reference);
    ``"paper"``: ``PAPER_SIGMAS``, the grid of the DEPICT noise plots (parameter noise only)."""
    if perturbation.kind == "structured":
        raise ConfigError(f"{perturbation.noise} has no σ: it is either applied or not (use draws for more rotations)", arguments="draws")
    if text.strip() == "paper":
        if perturbation.kind != "parameter":
            raise ConfigError("the paper's σ grid is for parameter noise (target decoder, encoder or all)", arguments="target")
        return tuple(float(s) for s in PAPER_SIGMAS)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"sigmas must be comma-separated numbers, got {text!r}", arguments="sigmas") from None
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad or not values:
        raise ConfigError(f"σ values must be finite numbers ≥ 0, got {text!r}")
    if perturbation.noise == "salt-pepper" and max(values) > 1:
        raise ConfigError(f"salt-and-pepper σ is a fraction of pixels (0..1), got {max(values):g}")
    return tuple(sorted({0.0, *values}))


def draws_per_sigma(perturbation: Perturbation, sigma: float, draws: int) -> int:
    """1 for the clean model and deterministic perturbations, else ``draws``."""
    return 1 if sigma == 0 or perturbation.deterministic else draws
