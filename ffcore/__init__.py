"""ffcore: block-wise predictive FFN sparsity for LLM prefill (FastForward, arXiv 2602.00397)."""
from __future__ import annotations

__version__ = "0.1.0"

from ffcore.models import load_model, model_fingerprint  # noqa: E402

__all__ = ["load_model", "model_fingerprint", "__version__"]
