"""Notebook 05 (accuracy vs sparsity, paper Tables 2-3): the two tables' configurations and comparisons,
and the verdict on the gap to dense. The machinery (settings, plans, runs, rows) is `accuracy`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ffcore.experiments.accuracy import (DENSE, DENSE_LABEL, AccuracySettings, Components, ConfigSpec, TableResult,
                                        fmt_ci, method, run_table)

TABLES: dict[str, str] = {
    "table2": "Accuracy vs FFN sparsity (paper Table 2)",
    "table3": "Sparsity in prefill only vs also in generation (paper Table 3)",
}


def table_specs(table: str, sparsities: Sequence[float] = (0.3, 0.4, 0.5), ablation: float = 0.5) -> list[ConfigSpec]:
    """The configurations of Table 2 (the full method at each sparsity) or Table 3 (decode sparse too), dense first."""
    a = ablation
    specs = {
        "table2": [method(s) for s in sparsities],
        "table3": [method(a, f"{a:.0%} prefill only"), method(a, f"{a:.0%} prefill + generation", sparse_decode=True)],
    }
    if table not in specs:
        raise ValueError(f"unknown table {table!r}; notebook 05 runs {sorted(specs)}")
    return [DENSE, *specs[table]]


def comparison_pairs(table: str, ablation: float = 0.5) -> list[tuple[str, str, str]]:
    """The paper's claims of a table as (reference, other, expectation) triples (expectation: 'worse', 'similar', 'none')."""
    a = f"{ablation:.0%}"
    pairs = {"table2": [], "table3": [(f"{a} prefill only", f"{a} prefill + generation", "worse")]}
    if table not in pairs:
        raise ValueError(f"unknown table {table!r}; notebook 05 runs {sorted(pairs)}")
    return pairs[table]


def run(table: str, components: Mapping[str, Components], suites: Mapping[str, Any],
        kept: Mapping[str, Sequence[str]], cfg: AccuracySettings, cache: Any, seed: int = 0) -> TableResult:
    """Run one of notebook 05's tables for every model."""
    return run_table(table, table_specs(table, cfg.sparsities, cfg.ablation_sparsity),
                     comparison_pairs(table, cfg.ablation_sparsity), components, suites, kept, cfg, cache, seed)


def gap_verdict(rows: Sequence[Mapping[str, Any]], sparsity: float = 0.5, target_pct: float = 3.0) -> str:
    """Markdown: per model, the relative gap at `sparsity` with its CI, against the target (computed from rows)."""
    lines = []
    dense = {r["model"]: r["average"] for r in rows if r["config"] == DENSE_LABEL}
    for r in rows:
        if r["config"] == DENSE_LABEL or abs(r["sparsity"] - sparsity) > 1e-9 or r.get("sparse_decode"):
            continue
        gap, lo, hi = r["rel_gap_pct"], r["rel_gap_ci_low"], r["rel_gap_ci_high"]
        if math.isnan(gap):
            lines.append(f"- **{r['model']}** at {sparsity:.0%}: the dense average is 0, no relative gap.")
            continue
        within = gap >= -target_pct
        sure = "" if math.isnan(lo) else (
            " (the whole interval is inside the target)" if lo >= -target_pct else
            " (the interval reaches beyond the target)" if within else
            " (the interval still reaches the target)" if hi >= -target_pct else " (the whole interval is beyond it)")
        lines.append(
            f"- **{r['model']}** at {sparsity:.0%} sparsity: average {r['average']:.1f} vs dense "
            f"{dense.get(r['model'], float('nan')):.1f}; relative gap "
            f"**{gap:+.2f} %** (95 % CI {fmt_ci(lo, hi)}, {r['n_samples']} samples over {r['n_tasks']} tasks): "
            + ("within" if within else "**outside**") + f" our {target_pct:.0f} % target{sure}."
        )
    return "\n".join(lines)
