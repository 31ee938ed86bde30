"""ffcore: block-wise predictive FFN sparsity for LLM prefill (FastForward, arXiv 2602.00397).

The top-level names are imported lazily so that `python -m ffcore.reproduce --help`
and other light entry points do not pay for importing torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "ffcore.models",
    "model_fingerprint": "ffcore.models",
    "model_slug": "ffcore.models",
    "sparsify": "ffcore.engine",
    "SparsityPlan": "ffcore.engine",
    "EngineOptions": "ffcore.engine",
    "dense_plan": "ffcore.engine",
    "fit": "ffcore.fitting",
    "FitConfig": "ffcore.fitting",
    "FastForward": "ffcore.bundle",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ffcore' has no attribute {name!r}")
