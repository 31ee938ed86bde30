"""Evaluation: the local long-context suite, an official-format LongBench runner, metrics and scoring.

    from ffcore.evaluation import SuiteConfig, build_suite, evaluate, select_tasks, summarize
    suite = build_suite(tokenizer, SuiteConfig(n_per_task=8, context_tokens=(1024, 2048)))
    results = {"dense": evaluate(model, tok, suite, None, cache_dir),
               "oracle 50%": evaluate(model, tok, suite, SparsityPlan(0.5, "oracle"), cache_dir)}
    keep = select_tasks(results["dense"]).kept
    table = summarize(results, dense="dense", tasks=keep)

Modules: `suite` (local tasks), `longbench` (official prompts/truncation/scorer),
`metrics` (LongBench's metrics reimplemented exactly, plus the local ones), `runner`
(sparse prefill + KV-cached greedy decode, on-disk cache), `prefill` (how a prompt is
prefilled: in full, or by SpecPrefill's kept tokens), `scoring` (per task/category,
average, relative gap to dense, paired bootstrap CIs, chance-level task filter). The
notebooks' tables are experiments: `ffcore.experiments.accuracy`, `nb05_accuracy`, ...
Names are imported lazily so `import ffcore.evaluation` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SuiteConfig": "ffcore.evaluation.suite",
    "TASKS": "ffcore.evaluation.suite",
    "SUITE_VERSION": "ffcore.evaluation.suite",
    "build_suite": "ffcore.evaluation.suite",
    "suite_overview": "ffcore.evaluation.suite",
    "RunConfig": "ffcore.evaluation.runner",
    "evaluate": "ffcore.evaluation.runner",
    "run_configs": "ffcore.evaluation.runner",
    "timing_summary": "ffcore.evaluation.runner",
    "config_key": "ffcore.evaluation.runner",
    "FullPrefill": "ffcore.decoding",
    "SpecPrefillMethod": "ffcore.evaluation.prefill",
    "LongBenchConfig": "ffcore.evaluation.longbench",
    "longbench_rows": "ffcore.evaluation.longbench",
    "longbench_summary": "ffcore.evaluation.longbench",
    "load_longbench": "ffcore.evaluation.longbench",
    "summarize": "ffcore.evaluation.scoring",
    "task_table": "ffcore.evaluation.scoring",
    "paired_gap": "ffcore.evaluation.scoring",
    "select_tasks": "ffcore.evaluation.scoring",
    "continuation_table": "ffcore.evaluation.scoring",
    "TaskSelection": "ffcore.evaluation.scoring",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ffcore.evaluation' has no attribute {name!r}")
