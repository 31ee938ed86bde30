"""ffcore: block-wise predictive FFN sparsity for LLM prefill (FastForward, arXiv 2602.00397)."""
from __future__ import annotations

__version__ = "0.1.0"

from ffcore.engine import sparsify  # noqa: E402
from ffcore.models import load_model, model_fingerprint  # noqa: E402
from ffcore.plan import SparsityPlan, dense_plan  # noqa: E402

__all__ = ["load_model", "model_fingerprint", "sparsify", "SparsityPlan", "dense_plan", "__version__"]
