"""Notebook 06 (ablations, paper Tables 4-7): each table's configurations, varying one factor of the full
method at the ablation sparsity, and the comparisons the paper makes. The machinery is `accuracy`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ffcore.experiments.accuracy import DENSE, AccuracySettings, Components, ConfigSpec, TableResult, method, run_table

TABLES: dict[str, str] = {
    "table4": "Layer-wise vs uniform sparsity schedule (paper Table 4)",
    "table5": "Which blocks stay dense (paper Table 5)",
    "table6": "Error compensator: without, plain, mask-conditioned (paper Table 6)",
    "table7": "Expert selection: trained predictor vs per-block oracle vs first-block static (paper Table 7)",
}


def table_specs(table: str, ablation: float = 0.5) -> list[ConfigSpec]:
    """The configurations of one ablation table (dense first); each varies one factor of `method(ablation)`."""
    a = ablation
    specs = {
        "table4": [method(a, f"layer-wise {a:.0%}"), method(a, f"uniform {a:.0%}", schedule="uniform"),
                   method(a, f"layer-wise {a:.0%}, literal s_i", schedule="layerwise_literal")],
        "table5": [method(a, "all blocks sparse", dense_first=False, dense_last=False),
                   method(a, "+ dense first", dense_last=False), method(a, "+ dense first & last"),
                   method(a, "+ dense first & last (grid tail)", dense_tail="grid")],
        "table6": [method(a, "no compensator", compensator=None), method(a, "plain compensator"),
                   method(a, "mask-conditioned compensator", compensator="masked")],
        "table7": [method(a, "trained predictor"), method(a, "per-block oracle", policy="oracle"),
                   method(a, "first-block static", policy="first_block_static")],
    }
    if table not in specs:
        raise ValueError(f"unknown table {table!r}; notebook 06 runs {sorted(specs)}")
    return [DENSE, *specs[table]]


# The comparisons each ablation is about: (reference, other, what the paper found for other).
def comparison_pairs(table: str, ablation: float = 0.5) -> list[tuple[str, str, str]]:
    """The paper's claims of a table as (reference, other, expectation) triples (expectation: 'worse', 'similar', 'none')."""
    a = f"{ablation:.0%}"
    pairs = {
        "table4": [(f"layer-wise {a}", f"uniform {a}", "worse"),
                   (f"layer-wise {a}", f"layer-wise {a}, literal s_i", "none")],  # ours vs the paper's eq. 23
        "table5": [("+ dense first & last", "+ dense first", "worse"),
                   ("+ dense first & last", "+ dense first & last (grid tail)", "none"),  # our full-block tail
                   ("+ dense first & last", "all blocks sparse", "worse"),
                   ("+ dense first", "all blocks sparse", "worse")],
        "table6": [("plain compensator", "no compensator", "worse"),
                   ("plain compensator", "mask-conditioned compensator", "none")],
        "table7": [("trained predictor", "per-block oracle", "similar"),
                   ("trained predictor", "first-block static", "worse")],
    }
    if table not in pairs:
        raise ValueError(f"unknown table {table!r}; notebook 06 runs {sorted(pairs)}")
    return pairs[table]


def run(table: str, components: Mapping[str, Components], suites: Mapping[str, Any],
        kept: Mapping[str, Sequence[str]], cfg: AccuracySettings, cache: Any, seed: int = 0) -> TableResult:
    """Run one of notebook 06's tables for every model."""
    return run_table(table, table_specs(table, cfg.ablation_sparsity), comparison_pairs(table, cfg.ablation_sparsity),
                     components, suites, kept, cfg, cache, seed)
