"""The block-sparse FFN engine (paper section 3): plan, block layout, expert policies, sparse FFN, wrapper.

    from ffcore.engine import SparsityPlan, sparsify
    with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        logits = model(input_ids).logits

Modules: `layout` (block spans, which blocks stay dense, K and the trained parts' widths),
`plan` (`SparsityPlan`, `EngineOptions`), `policies` (how a block picks its experts),
`sparse_ffn` (the fused weight layout and the compute paths: torch, Triton), `sparsify`
(the context manager that swaps every layer's MLP for a block-sparse one).
"""
from __future__ import annotations

from ffcore.engine.layout import BLOCK_SIZE, block_spans, experts_for, split_blocks
from ffcore.engine.plan import EngineOptions, SparsityPlan, dense_plan
from ffcore.engine.policies import SelectContext, SelectionPolicy, make_policy
from ffcore.engine.sparsify import SparseMLP, add_corrections, sparsify

__all__ = [
    "BLOCK_SIZE", "EngineOptions", "SelectContext", "SelectionPolicy", "SparseMLP", "SparsityPlan",
    "add_corrections", "block_spans", "dense_plan", "experts_for", "make_policy", "sparsify", "split_blocks",
]
