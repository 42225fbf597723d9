"""depict-analysis: train DEPICT / Segmenter models, load anybody's checkpoint, and look inside it.

The package is the front door; the segmentation stack lives in ``depict_analysis.models`` and the
command-line tools in ``depict_analysis.cli``. Names below are imported on first use, so
``import depict_analysis`` is quick and changes no global state.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("depict-analysis")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# public name -> module that defines it
_EXPORTS = {
    "DepictError": "depict_analysis.foundation.errors",
    "CheckpointError": "depict_analysis.foundation.errors",
    "DatasetError": "depict_analysis.foundation.errors",
    "ConfigError": "depict_analysis.foundation.errors",
    "InputError": "depict_analysis.foundation.errors",
    "load_model": "depict_analysis.models.sources",
    "CheckpointInfo": "depict_analysis.models.sources",
    "LoadedModel": "depict_analysis.models.sources",
    "load_images": "depict_analysis.inputs",
    "ImageSource": "depict_analysis.inputs",
    "compare": "depict_analysis.runs",
    "trace": "depict_analysis.tracing",
    "trace_batches": "depict_analysis.tracing",
    "Trace": "depict_analysis.tracing",
    "Result": "depict_analysis.results",
    "Stat": "depict_analysis.results",
    "Comparison": "depict_analysis.results",
    "analyze_coding_rates": "depict_analysis.coding_rate_analysis",
    "CodingRates": "depict_analysis.coding_rate_analysis",
    "analyze_pca": "depict_analysis.pca_analysis",
    "PCASegmentation": "depict_analysis.pca_analysis",
    "analyze_orthogonality": "depict_analysis.orthogonality_analysis",
    "Orthogonality": "depict_analysis.orthogonality_analysis",
    "analyze_class_rates": "depict_analysis.class_rates",
    "ClassRates": "depict_analysis.class_rates",
    "analyze_attention": "depict_analysis.attention",
    "AttentionMaps": "depict_analysis.attention",
    "run_robustness": "depict_analysis.robustness",
    "resolve_perturbation": "depict_analysis.perturbations",
    "Robustness": "depict_analysis.robustness",
    "edited": "depict_analysis.interventions",
    "run_ablation": "depict_analysis.ablation",
    "Ablation": "depict_analysis.ablation",
    "Bootstrap": "depict_analysis.uncertainty",
    "Interval": "depict_analysis.uncertainty",
}
_ALIASES = {"load_model": "open_checkpoint"}  # public name -> the defining module's name

__all__ = ["__version__", *_EXPORTS]


def _public(function, name: str):
    """``function`` under its public name, so that ``help(depict_analysis.load_model)`` and tracebacks say
    ``load_model``; the defining module keeps its own name."""

    @functools.wraps(function)
    def public(*args, **kwargs):
        return function(*args, **kwargs)

    public.__name__ = public.__qualname__ = name
    public.__module__ = __name__
    return public


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), _ALIASES.get(name, name))
        if name in _ALIASES:
            value = _public(value, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'depict_analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
