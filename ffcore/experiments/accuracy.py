"""The machinery of the accuracy notebooks (05: Tables 2-3, 06: Tables 4-7, 08's suite table):
configurations, plans, runs, tables, comparisons and their verdict text. Each notebook's own module
(`nb05_accuracy`, `nb06_ablations`) names its tables' configurations and comparisons:

    S = settings(PROFILE, SEED)
    comps = load_components("gemma3-270m", PROFILE)            # model + predictor + compensators
    suite = build_suite(comps.tokenizer, S.suite)
    results = run_specs(comps, nb05.table_specs("table2", S.sparsities), suite, cache_dir(PROFILE), tasks=kept)
    rows = accuracy_rows("table2", comps.key, specs, results, kept)

A configuration is a `ConfigSpec` (sparsity, schedule, expert policy, compensator, which blocks
stay dense, whether decode is sparse too); `build_plan` turns it into a `SparsityPlan` with the
artifacts the earlier notebooks wrote (layer-wise schedules from 02, the predictor from 03, the
compensators from 04). Every table is "one factor at a time" around the full method
(`method(s)`: trained predictor + plain compensator + layer-wise schedule + dense first and
last block), so the 50 % row of Table 2 is the reference row of every ablation and is computed
once (the result cache is keyed by the plan and by digests of the trained objects).

Where the paper's own ablation rows differ in setup (its Tables 5-6 numbers match its uniform-
schedule row of Table 4, and its Table 7 keeps only the first block dense), the notebooks say so.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from statistics import fmean
from pathlib import Path
from typing import Any, Mapping, Sequence

from ffcore.evaluation.multiq import ITEM_BUILDERS, SHARES, build_items, evaluate_items
from ffcore.evaluation.scoring import clustered_gap, clusters_needed, gold_probability
from ffcore.config import StrictConfig
from ffcore.engine import SparsityPlan
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import (continuation_table, paired_gap, paired_metric_change, select_tasks, summarize,
                                       task_table)
from ffcore.evaluation.suite import SUITE_VERSION, SuiteConfig
from ffcore.experiments.nb02_calibration import load_schedule
from ffcore.experiments.nb03_predictor import load_profile_predictor
from ffcore.experiments.nb04_compensator import load_profile_compensator
from ffcore.experiments.profiles import models_for, pick
from ffcore.models import load_model
from ffcore.results import out_dirs, read_json

Records = Sequence[Mapping[str, Any]]

SCHEDULES = ("layerwise", "uniform", "layerwise_literal")  # layerwise: window-aware s_i; _literal: eq. 23 as written
POLICIES = ("dense", "predictor", "oracle", "first_block_static", "random")
COMPENSATORS = (None, "plain", "masked")
DENSE_LABEL = "dense"

# ------------------------------------------------------------------------------ configurations
@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """One row of an accuracy table: how the sparse model is configured (sparsity 0 = the dense model)."""

    label: str
    sparsity: float = 0.5
    schedule: str = "layerwise"
    policy: str = "predictor"
    compensator: str | None = "plain"
    dense_first: bool = True
    dense_last: bool = True
    dense_tail: str = "full"
    sparse_decode: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"{self.label}: sparsity must be in [0, 1), got {self.sparsity}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{self.label}: unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.policy not in POLICIES:
            raise ValueError(f"{self.label}: unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.compensator not in COMPENSATORS:
            raise ValueError(f"{self.label}: unknown compensator {self.compensator!r}; choose one of {COMPENSATORS}")

    @property
    def dense(self) -> bool:
        """True for the dense baseline."""
        return self.sparsity == 0.0

    def describe(self) -> dict[str, Any]:
        """The spec as flat fields (columns of the result tables)."""
        if self.dense:
            return {"config": self.label, "sparsity": 0.0, "schedule": "-", "policy": "dense", "compensator": "-",
                    "dense_first": "-", "dense_last": "-", "dense_tail": "-", "sparse_decode": False}
        return {"config": self.label, "sparsity": self.sparsity, "schedule": self.schedule, "policy": self.policy,
                "compensator": self.compensator or "none", "dense_first": self.dense_first,
                "dense_last": self.dense_last, "dense_tail": self.dense_tail, "sparse_decode": self.sparse_decode}


DENSE = ConfigSpec(DENSE_LABEL, sparsity=0.0, policy="dense", compensator=None)


def method(sparsity: float, label: str | None = None, **changes: Any) -> ConfigSpec:
    """The full FastForward configuration at `sparsity` (predictor + compensator + layer-wise + dense first/last)."""
    return ConfigSpec(label or f"{sparsity:.0%} sparsity", sparsity=sparsity, **changes)


# ------------------------------------------------------------------------------ settings
@dataclasses.dataclass
class AccuracySettings(StrictConfig):
    """Per-profile sizes and choices of notebooks 05 and 06.

    suite:              the local suite (samples per task, prompt lengths; see `SuiteConfig`).
    sparsities:         Table 2's sparsity levels (density = 1 - sparsity; 02 wrote schedules for them).
    ablation_sparsity:  the sparsity of Tables 3-7.
    select_by_ci:       keep a task only when its dense score's 95 % interval lies above chance + min_margin.
    min_margin:         keep a task when the dense score is at least chance + this (None: keep every
                        task; only for the smoke profile, whose tiny random models score at chance).
    ablation_models:    models of notebook 06 (the stronger model first; both where time allows).
    n_boot:             bootstrap resamples for confidence intervals.
    level:              confidence level of the intervals.
    run:                runner knobs (progress bars, KL top-k).
    """

    suite: SuiteConfig
    sparsities: tuple[float, ...] = (0.3, 0.4, 0.5)
    ablation_sparsity: float = 0.5
    min_margin: float | None = 0.15
    select_by_ci: bool = False
    ablation_models: tuple[str, ...] = ()
    n_boot: int = 2000
    level: float = 0.95
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if isinstance(self.suite, Mapping):
            self.suite = SuiteConfig.from_dict(self.suite)
        if isinstance(self.run, Mapping):
            self.run = RunConfig.from_dict(self.run)
        self.sparsities = tuple(float(s) for s in self.sparsities)
        self.ablation_models = tuple(self.ablation_models)
        for s in (*self.sparsities, self.ablation_sparsity):
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsities must lie in (0, 1), got {s}")
        if not 0.0 < self.level < 1.0 or self.n_boot < 100:
            raise ValueError("level must be in (0, 1) and n_boot >= 100")


def suite_config(profile: str, **overrides: Any) -> SuiteConfig:
    """The suite size of a run profile: smoke (tiny models, seconds), quick (3/task), full (5/task), ~1K-token prompts.

    On two CPU cores one sample costs about 3-5 s (a 1K-token prefill is 2.5-3.5 s, notebook 01, plus
    a short greedy decode), and notebooks 05-06 evaluate 17 model-configurations of up to 5 tasks, so
    the default profiles stay small: 5 samples per task at 1K tokens (8 blocks of 128, 6 of them
    sparse). On a faster machine pass n_per_task=24, context_tokens=(1024, 2048, 4096).
    """
    base = pick(
        profile,
        smoke=dict(n_per_task=2, context_tokens=(768,), continuation_tokens=16, continuation_greedy=4,
                   code_max_new_tokens=8),
        quick=dict(n_per_task=3, context_tokens=(1024,)),
        full=dict(n_per_task=5, context_tokens=(1024,)),
    )
    return SuiteConfig.from_dict({**base, **overrides})



def settings(profile: str, seed: int = 0, progress: bool = True, all_ablation_models: bool = False) -> AccuracySettings:
    """Notebook 05/06 settings of a profile (the suite of `suite_config(profile)`, seeded).

    Notebook 06 runs on the stronger model (gemma3-270m) only, unless `all_ablation_models`: on two
    idle CPU cores each ablation configuration costs about 100 s per model at the full profile's size.
    """
    models = models_for(profile)
    ablation = models if all_ablation_models else pick(profile, models[:1], ("gemma3-270m",), ("gemma3-270m",))
    return AccuracySettings(
        suite=suite_config(profile, seed=seed),
        min_margin=pick(profile, None, 0.0, 0.0), select_by_ci=True,  # dense CI low end above chance (issue 19)
        ablation_models=ablation,
        n_boot=pick(profile, 200, 2000, 2000),
        run=RunConfig(progress=progress),
    )


def cache_dir(profile: str) -> Path:
    """Where per-sample results are cached: `out_dirs(profile).artifacts/eval_cache` (shared by 05 and 06)."""
    path = out_dirs(profile).artifacts / "eval_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------ components and plans
@dataclasses.dataclass
class Components:
    """A model with the artifacts earlier notebooks trained for it (predictor, compensators)."""

    key: str
    model: Any
    tokenizer: Any
    profile: str
    predictor: Any = None
    compensators: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Decoder layers of the model."""
        return int(self.model.config.num_hidden_layers)


def load_components(
    key: str, profile: str, compensators: Sequence[str] = ("plain", "masked"), model: Any = None,
    tokenizer: Any = None,
) -> Components:
    """Load `key` (unless given) with its trained predictor (notebook 03) and compensators (notebook 04)."""
    if model is None:
        model, tokenizer = load_model(key)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    pred = load_profile_predictor(key, profile, model).to(next(model.parameters()).device)
    comps = {variant: load_profile_compensator(key, profile, variant, model) for variant in compensators}
    return Components(key, model, tokenizer, profile, pred, comps)


def build_plan(spec: ConfigSpec, comps: Components, seed: int = 0) -> SparsityPlan | None:
    """The engine plan of a configuration (None for the dense baseline)."""
    if spec.dense:
        return None
    density = round(1.0 - spec.sparsity, 6)
    if spec.schedule.startswith("layerwise"):
        importance = "literal" if spec.schedule == "layerwise_literal" else "window"
        densities: float | list[float] = load_schedule(comps.model, density, comps.profile, importance=importance)
    else:
        densities = density
    if spec.policy == "predictor":
        if comps.predictor is None:
            raise ValueError(f"{spec.label}: needs the trained predictor, but {comps.key} was loaded without one")
        policy: Any = comps.predictor
    else:
        policy = spec.policy
    comp = None
    if spec.compensator is not None:
        if spec.compensator not in comps.compensators:
            raise ValueError(f"{spec.label}: needs the {spec.compensator!r} compensator (notebook 04), but "
                             f"{comps.key} was loaded with {sorted(comps.compensators) or 'none'}")
        comp = comps.compensators[spec.compensator]
    return SparsityPlan(densities=densities, policy=policy, dense_first=spec.dense_first, dense_last=spec.dense_last,
                        dense_tail=spec.dense_tail, sparse_decode=spec.sparse_decode, compensator=comp, seed=seed)


# ------------------------------------------------------------------------------ running
def subset(dataset: Any, tasks: Sequence[str] | None) -> Any:
    """The rows of `dataset` whose task is in `tasks` (all rows for None)."""
    if tasks is None:
        return dataset
    keep = set(tasks)
    idx = [i for i, t in enumerate(dataset["task"]) if t in keep]
    return dataset.select(idx)


def run_specs(
    comps: Components, specs: Sequence[ConfigSpec], dataset: Any, cache: str | Path | None,
    tasks: Sequence[str] | None = None, run: RunConfig | None = None, seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Per-sample records of every configuration on `dataset` (restricted to `tasks`), through the cache."""
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configuration labels must be unique, got {labels}")
    rows = subset(dataset, tasks)
    if len(rows) == 0:
        raise ValueError(f"no suite rows for tasks {list(tasks or [])}")
    out = {}
    for spec in specs:
        plan = build_plan(spec, comps, seed)
        out[spec.label] = evaluate(comps.model, comps.tokenizer, rows, plan, cache, run)
    return out


def choose_tasks(dense_records: Records, min_margin: float | None, n_boot: int = 2000, seed: int = 0,
                 use_ci: bool = False) -> dict[str, Any]:
    """Task selection (kept tasks, dropped with reasons, per-task dense score vs chance); min_margin None keeps all.

    `use_ci`: keep a task only when the lower end of its dense score's interval lies above chance + min_margin."""
    sel = select_tasks(dense_records, min_margin=0.0 if min_margin is None else min_margin, use_ci=use_ci,
                       n_boot=n_boot, seed=seed)
    if min_margin is None:
        for r in sel.table:
            r["kept"] = True
        kept, dropped = [r["task"] for r in sel.table], {}
    else:
        kept, dropped = sel.kept, sel.dropped
    return {"kept": kept, "dropped": dropped, "table": sel.table, "min_margin": min_margin, "use_ci": use_ci}


# ------------------------------------------------------------------------------ tabulating
def _round(x: Any, digits: int = 5) -> Any:
    if isinstance(x, float):
        return x if math.isnan(x) else round(x, digits)
    return x


def accuracy_rows(
    table: str, model_key: str, specs: Sequence[ConfigSpec], results: Mapping[str, Records], tasks: Sequence[str],
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per configuration: spec fields, per-category/per-task scores, average and gap to dense with CIs.

    Scores are on a 0-100 scale (like the paper's tables); the gap is relative, in percent.
    """
    summ = {r["config"]: r for r in summarize(results, dense=DENSE_LABEL, tasks=tasks, n_boot=n_boot, level=level,
                                              seed=seed)}
    out = []
    for spec in specs:
        s = summ[spec.label]
        n = sum(1 for r in results[spec.label] if r["task"] in tasks)
        row: dict[str, Any] = {"table": table, "model": model_key, **spec.describe(), "n_samples": n,
                               "n_tasks": len(tasks)}
        for k, v in s.items():
            if k.startswith(("cat:", "task:")) or k in ("average", "average_ci_low", "average_ci_high"):
                row[k] = _round(100 * v, 3)
        for k in ("rel_gap_pct", "rel_gap_ci_low", "rel_gap_ci_high"):
            row[k] = _round(s[k], 3)
        out.append(row)
    return out


def task_rows(
    table: str, model_key: str, results: Mapping[str, Records], tasks: Sequence[str], n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Long format: one row per (configuration, task) with score, bootstrap CI and chance level (0-100 scale)."""
    out = []
    for label, recs in results.items():
        for r in task_table([x for x in recs if x["task"] in tasks], n_boot=n_boot, seed=seed):
            out.append({"table": table, "model": model_key, "config": label, "task": r["task"],
                        "category": r["category"], "n": r["n"], "score": _round(100 * r["score"], 3),
                        "ci_low": _round(100 * r["ci_low"], 3), "ci_high": _round(100 * r["ci_high"], 3),
                        "chance": _round(100 * r["chance"], 4)})
    return out


def continuation_rows(table: str, model_key: str, results: Mapping[str, Records]) -> list[dict[str, Any]]:
    """The continuation task's distribution metrics per configuration (NLL change, KL, agreement with dense)."""
    return [{"table": table, "model": model_key, **{k: _round(v) for k, v in r.items()}}
            for r in continuation_table(results)]


EXPECTATIONS = ("worse", "similar", "none")


def agrees_with_paper(expect: str, worse: bool, resolved: bool) -> bool | None:
    """Whether a paired comparison agrees with the paper's finding for `other`, or None when it cannot say.

    'worse' is consistent only when the interval excludes zero on the worse side, inconsistent when it
    excludes zero on the better side, and not resolved (None) when it includes zero: a point estimate
    with the paper's sign is not evidence. 'similar' is consistent when the interval includes zero.
    """
    if expect == "worse":
        return bool(worse) if resolved else None
    if expect == "similar":
        return not resolved
    return None


def paper_verdict(expect: str, agree: bool | None) -> str:
    """'consistent', '**not** consistent' or 'not resolved' against what the paper found ('' without a claim)."""
    if expect not in ("worse", "similar"):
        return ""
    return "not resolved" if agree is None else "consistent" if agree else "**not** consistent"


def comparisons(
    table: str, model_key: str, results: Mapping[str, Records], pairs: Sequence[tuple[str, ...]],
    tasks: Sequence[str], n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:
    """For each (reference, other[, paper expectation]) pair: other's average relative to reference's, paired CI.

    The expectation ('worse', 'similar' or 'none': what the paper found for `other`) gives
    `agrees_with_paper` (see `agrees_with_paper`: None where the interval cannot tell).
    """
    out = []
    for pair in pairs:
        ref, other = pair[0], pair[1]
        expect = pair[2] if len(pair) > 2 else "none"
        if expect not in EXPECTATIONS:
            raise ValueError(f"unknown expectation {expect!r}; choose one of {EXPECTATIONS}")
        g = paired_gap(results[ref], results[other], tasks, n_boot, level, seed)
        lo, hi = g["rel_gap_ci"]
        change, resolved = g["rel_gap_pct"], bool(lo > 0 or hi < 0)
        out.append({"table": table, "model": model_key, "reference": ref, "other": other,
                    "reference_avg": _round(100 * g["dense_avg"], 3), "other_avg": _round(100 * g["sparse_avg"], 3),
                    "rel_change_pct": _round(change, 3), "ci_low": _round(lo, 3), "ci_high": _round(hi, 3),
                    "resolved": resolved, "paper_expects": expect,
                    "agrees_with_paper": None if math.isnan(change) else agrees_with_paper(expect, change < 0, resolved)})
    return out


def kl_comparisons(
    table: str, model_key: str, results: Mapping[str, Records], pairs: Sequence[tuple[str, ...]], n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:
    """The same pairs as `comparisons`, judged by the continuation task's KL to dense (lower = closer to dense).

    A per-token distribution distance over 64 tokens per sample: far less noisy than exact-match scores.
    'worse' agrees with the paper when other's KL is higher. Empty if the continuation task was not run.
    """
    out = []
    for pair in pairs:
        ref, other = pair[0], pair[1]
        expect = pair[2] if len(pair) > 2 else "none"
        if not any(r["task"] == "continuation" for r in results[ref]):
            return []
        c = paired_metric_change(results[ref], results[other], "kl", "continuation", n_boot, level, seed)
        lo, hi = c["ci"]
        change, resolved = c["rel_change_pct"], bool(lo > 0 or hi < 0)
        agree = None if math.isnan(change) else agrees_with_paper(expect, change > 0, resolved)  # worse = more KL
        out.append({"table": table, "model": model_key, "reference": ref, "other": other, "n": c["n"],
                    "reference_kl": _round(c["reference_mean"]), "other_kl": _round(c["other_mean"]),
                    "kl_change_pct": _round(change, 3), "ci_low": _round(lo, 3), "ci_high": _round(hi, 3),
                    "resolved": resolved, "paper_expects": expect, "agrees_with_paper": agree})
    return out


def kl_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one line per `kl_comparisons` row (computed from the rows)."""
    lines = []
    for c in rows:
        d = c["kl_change_pct"]
        word = "closer to dense" if d < 0 else "further from dense" if d > 0 else "equal"
        res = "paired 95 % CI excludes 0" if c["resolved"] else "paired 95 % CI includes 0: not resolved"
        paper = {"worse": "the paper found it worse", "similar": "the paper found them similar"}.get(c["paper_expects"])
        tail = "" if paper is None else f" — {paper}: {paper_verdict(c['paper_expects'], c['agrees_with_paper'])}"
        lines.append(f"- **{c['model']}**: *{c['other']}* KL {c['other_kl']:.4f} vs {c['reference_kl']:.4f} for "
                     f"*{c['reference']}* ({d:+.1f} %, {word}; CI {fmt_ci(c['ci_low'], c['ci_high'])}, "
                     f"{c['n']} samples; {res}){tail}.")
    return "\n".join(lines)


def frame(rows: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> Any:
    """A compact pandas view of `accuracy_rows` output: categories, average [CI], gap [CI] per model and config."""
    import pandas as pd  # optional: only the notebooks' table views need it

    out = []
    for r in rows:
        d: dict[str, Any] = {"model": r["model"], "config": r["config"]}
        d.update({k[4:]: r[k] for k in r if k.startswith("cat:")})
        d.update({k: r[k] for k in extra})
        d["average"] = r["average"]
        d["95% CI"] = f"[{r['average_ci_low']:.1f}, {r['average_ci_high']:.1f}]"
        d["rel. gap %"] = r["rel_gap_pct"]
        d["gap 95% CI"] = (f"[{r['rel_gap_ci_low']:+.1f}, {r['rel_gap_ci_high']:+.1f}]"
                           if not math.isnan(r["rel_gap_ci_low"]) else "n/a")
        d["n"] = r["n_samples"]
        out.append(d)
    return pd.DataFrame(out).set_index(["model", "config"])


# ------------------------------------------------------------------------------ verdicts (computed text)
def fmt_ci(lo: float, hi: float) -> str:
    return "n/a" if math.isnan(lo) or math.isnan(hi) else f"[{lo:+.1f}, {hi:+.1f}]"


def comparison_verdict(comp_rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one line per comparison, saying whether its paired CI excludes zero (computed from rows)."""
    lines = []
    for c in comp_rows:
        d = c["rel_change_pct"]
        if isinstance(d, float) and math.isnan(d):
            lines.append(f"- {c['model']}: *{c['other']}* vs *{c['reference']}*: reference average is 0, no ratio.")
            continue
        word = "better" if d > 0 else "worse" if d < 0 else "equal"
        res = ("the paired 95 % CI excludes 0" if c["resolved"] else
               "the paired 95 % CI includes 0: not resolved at this sample size")
        paper = {"worse": "the paper found it worse", "similar": "the paper found them similar"}.get(
            c.get("paper_expects", "none"))
        tail = "" if paper is None else f" — {paper}: {paper_verdict(c.get('paper_expects', 'none'), c.get('agrees_with_paper'))}"
        lines.append(f"- **{c['model']}**: *{c['other']}* scores {c['other_avg']:.1f} vs {c['reference_avg']:.1f} for "
                     f"*{c['reference']}* ({d:+.2f} % relative, {word}; CI {fmt_ci(c['ci_low'], c['ci_high'])}; "
                     f"{res}){tail}.")
    return "\n".join(lines)


def suite_description(cfg: SuiteConfig) -> dict[str, Any]:
    """The suite settings recorded with every table (so 06 can check it evaluates 05's suite)."""
    return {"suite_version": SUITE_VERSION, **cfg.to_dict()}


# ------------------------------------------------------------------------------ whole tables
def selection_rows(selection: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per model and task: dense score and CI, chance, margin (0-100 scale) and whether the task is kept."""
    out = []
    for model_key, sel in selection.items():
        for r in sel["table"]:
            out.append({"model": model_key, "task": r["task"], "category": r["category"], "n": r["n"],
                        **{k: _round(100 * r[k], 3) for k in ("score", "ci_low", "ci_high", "margin")},
                        "chance": _round(100 * r["chance"], 4), "kept": bool(r["kept"]),
                        "reason": sel["dropped"].get(r["task"], "")})
    return out


@dataclasses.dataclass
class TableResult:
    """Everything one accuracy table produced, for all its models."""

    table: str
    rows: list[dict[str, Any]]  # accuracy_rows: one per (model, configuration)
    tasks: list[dict[str, Any]]  # task_rows: one per (model, configuration, task)
    continuation: list[dict[str, Any]]  # continuation_rows (models whose kept tasks include continuation)
    comparisons: list[dict[str, Any]]  # comparisons of comparison_pairs(table)
    kl: list[dict[str, Any]]  # kl_comparisons of the same pairs (continuation KL to dense)
    seconds: dict[str, float]  # wall time per model (cache hits make reruns fast)
    records: dict[str, dict[str, list[dict[str, Any]]]] = dataclasses.field(default_factory=dict)  # model -> config -> records


def fresh_seconds(*parts: "TableResult | Mapping[str, Mapping[str, Records]]") -> float:
    """What evaluations cost when first computed (sum of per-sample times, shared runs counted once).

    Each part is a `TableResult` or a mapping model -> configuration -> records.
    """
    seen: dict[tuple, float] = {}
    for t in parts:
        for model, by_config in (t.records if isinstance(t, TableResult) else t).items():
            for recs in by_config.values():
                for r in recs:  # a run shared by two tables is the same cached record: same uid and time
                    seen[(model, r["uid"], r["time_s"], r["prefill_s"])] = r["time_s"]
    return round(sum(seen.values()), 1)


def run_table(
    table: str, specs: Sequence[ConfigSpec], pairs: Sequence[tuple[str, ...]], components: Mapping[str, Components],
    suites: Mapping[str, Any], kept: Mapping[str, Sequence[str]], cfg: AccuracySettings, cache: str | Path | None,
    seed: int = 0,
) -> TableResult:
    """Run one table's configurations for every model (on that model's kept tasks) and tabulate them.

    `specs` are the table's configurations (dense first), `pairs` its (reference, other, paper
    expectation) comparisons; the notebook modules (`nb05_accuracy`, `nb06_ablations`) define both.
    """
    res = TableResult(table, [], [], [], [], [], {})
    for key, comps in components.items():
        tasks = list(kept[key])
        if not tasks:
            raise ValueError(f"{key}: no task is kept (the dense model is near chance on all of them)")
        t0 = time.time()
        results = run_specs(comps, specs, suites[key], cache, tasks, cfg.run, seed)
        res.seconds[key] = round(time.time() - t0, 1)
        res.records[key] = results
        res.rows += accuracy_rows(table, key, specs, results, tasks, cfg.n_boot, cfg.level, seed)
        res.tasks += task_rows(table, key, results, tasks, cfg.n_boot, seed)
        res.continuation += continuation_rows(table, key, results)
        res.comparisons += comparisons(table, key, results, pairs, tasks, cfg.n_boot, cfg.level, seed)
        if "continuation" in tasks:
            res.kl += kl_comparisons(table, key, results, pairs, cfg.n_boot, cfg.level, seed)
    return res


def load_selection(profile: str, cfg: AccuracySettings, name: str = "05_accuracy") -> dict[str, list[str]]:
    """Notebook 05's kept tasks per model, refusing them if 05 ran on a different suite."""
    doc = read_json(name, profile)
    mine = json.loads(json.dumps(suite_description(cfg.suite)))
    if doc.get("suite") != mine:
        diff = sorted(k for k in set(mine) | set(doc.get("suite", {})) if mine.get(k) != doc.get("suite", {}).get(k))
        raise ValueError(f"notebook 05 ran on a different suite (differs in {diff}); re-run notebook 05 first")
    return {k: list(v) for k, v in doc["kept_tasks"].items()}


# ------------------------------------------------------------------------------ many questions per context (issue 19)
@dataclasses.dataclass
class MultiQSettings(StrictConfig):
    """The multi-question evaluation of notebook 05 (`ffcore.evaluation.multiq`).

    tasks:           item builders (kv_retrieval, needle, classification, code_completion).
    n_items:         prefilled contexts per task; n_questions: questions asked of each.
    context_tokens:  the context budget per item.
    share:           'aligned' (default: every answer equals a one-prompt prefill of context + question under the
                     plan, so it is the suite's layout) or 'context' (the context prefilled once, the question alone
                     as the dense tail: cheaper, a different layout).
    half_width_pct:  the power calculation's target: the 95 % interval of the relative gap at most +- this.
    """

    tasks: tuple[str, ...] = ("kv_retrieval", "needle", "classification", "code_completion")
    n_items: int = 4
    n_questions: int = 8
    context_tokens: int = 1024
    share: str = "aligned"
    half_width_pct: float = 3.0

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = sorted(set(self.tasks) - set(ITEM_BUILDERS))
        if unknown:
            raise ValueError(f"unknown multi-question task(s) {unknown}; choose from {sorted(ITEM_BUILDERS)}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {self.share!r}")
        if min(self.n_items, self.n_questions) < 1 or self.half_width_pct <= 0:
            raise ValueError(f"n_items, n_questions must be >= 1 and half_width_pct > 0: {self}")


def multiq_settings(profile: str, **overrides: Any) -> MultiQSettings:
    """Per-profile sizes: about 1.3 s per question and configuration on two CPU cores (gemma3-270m, 1K context)."""
    cfg = pick(profile,
               smoke=MultiQSettings(n_items=2, n_questions=3, context_tokens=384),
               quick=MultiQSettings(n_items=2, n_questions=6),
               full=MultiQSettings(n_items=6, n_questions=8))
    return cfg.replace(**overrides) if overrides else cfg


def build_multiq_items(tokenizer: Any, cfg: MultiQSettings, seed: int = 0) -> list[dict[str, Any]]:
    """The items of every task of `cfg` (deterministic for a tokenizer and seed)."""
    per = {t: {"n_questions": cfg.n_questions} for t in cfg.tasks}
    return build_items(tokenizer, cfg.tasks, n_items=cfg.n_items, context_tokens=cfg.context_tokens, seed=seed, **per)


def run_multiq(comps: Components, specs: Sequence[ConfigSpec], items: Sequence[dict[str, Any]], cfg: MultiQSettings,
               cache: str | Path | None, seed: int = 0, progress: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Per-question records of every configuration on the items (through the cache)."""
    return {spec.label: evaluate_items(comps.model, comps.tokenizer, items, build_plan(spec, comps, seed), cache,
                                       progress=progress, share=cfg.share) for spec in specs}


def _score100(r: Mapping[str, Any]) -> float:
    return 100.0 * float(r["score"])


def multiq_rows(model: str, runs: Mapping[str, Records], reference: str = DENSE_LABEL, n_boot: int = 2000,
                seed: int = 0) -> list[dict[str, Any]]:
    """Per configuration and task (and all tasks pooled): exact-match style score and gold probability (0-100),
    their paired differences to `reference` with intervals that resample whole items, and the gold NLL change."""
    rows = []
    ref = runs[reference]
    tasks = list(dict.fromkeys(r["task"] for r in ref))
    for label, recs in runs.items():
        for task in [*tasks, "all"]:
            pick_ = (lambda rs: [r for r in rs if task == "all" or r["task"] == task])
            a, b = pick_(ref), pick_(recs)
            row: dict[str, Any] = {"model": model, "config": label, "task": task, "questions": len(b),
                                   "items": len({r["item_uid"] for r in b}),
                                   "score": round(fmean([_score100(r) for r in b]), 3),
                                   "gold_prob": round(fmean([gold_probability(r) for r in b]), 3),
                                   "gold_nll": round(fmean([r["gold_nll"] for r in b]), 5)}
            if label != reference:
                g = clustered_gap(a, b, gold_probability, n_boot=n_boot, seed=seed)
                e = clustered_gap(a, b, _score100, n_boot=n_boot, seed=seed)
                nll = clustered_gap(a, b, lambda r: float(r["gold_nll"]), n_boot=n_boot, seed=seed)
                row.update(gold_prob_rel_gap_pct=round(g["rel_gap_pct"], 3), gold_prob_rel_ci=_round(list(g["rel_ci"]), 3),
                           score_diff=round(e["diff"], 3), score_diff_ci=_round(list(e["ci"]), 3),
                           score_rel_gap_pct=round(e["rel_gap_pct"], 3), score_rel_ci=_round(list(e["rel_ci"]), 3),
                           gold_nll_diff=round(nll["diff"], 5), gold_nll_diff_ci=_round(list(nll["ci"]), 5))
            rows.append(row)
    return rows


def multiq_power(model: str, runs: Mapping[str, Records], config: str, half_width_pct: float = 3.0,
                 reference: str = DENSE_LABEL) -> list[dict[str, Any]]:
    """The power calculation from this run as a pilot: items needed for +-`half_width_pct` on the relative gap of
    the gold probability (and of the exact-match score) of `config` against `reference`, per task and pooled."""
    rows = []
    ref, oth = runs[reference], runs[config]
    for task in [*dict.fromkeys(r["task"] for r in ref), "all"]:
        a = [r for r in ref if task == "all" or r["task"] == task]
        b = [r for r in oth if task == "all" or r["task"] == task]
        row = {"model": model, "config": config, "task": task}
        for name, fn in (("gold_prob", gold_probability), ("score", _score100)):
            try:
                p = clusters_needed(a, b, fn, half_width_pct)
            except (ValueError, ZeroDivisionError) as err:  # e.g. a dense score of 0: no relative gap
                row[f"{name}_items_needed"] = None
                row[f"{name}_note"] = str(err)
                continue
            row.update({f"{name}_half_width_now": round(p["half_width_pct_now"], 2),
                        f"{name}_items_needed": p["clusters_needed"]})
            row["pilot_items"], row["questions_per_item"] = p["pilot_clusters"], round(p["records_per_cluster"], 2)
        rows.append(row)
    return rows


def multiq_verdict(rows: Sequence[Mapping[str, Any]], power: Sequence[Mapping[str, Any]], target_pct: float = 3.0
                   ) -> str:
    """Markdown reading of the pooled multi-question rows: each sparse configuration's gap on both scores, resolved
    or not, and what the power calculation asks for."""
    lines = []
    for r in rows:
        if r["task"] != "all" or "gold_prob_rel_ci" not in r:
            continue
        lo, hi = r["gold_prob_rel_ci"]
        res = "resolved" if lo > 0 or hi < 0 else "not resolved"
        slo, shi = r["score_rel_ci"]
        sres = "resolved" if slo > 0 or shi < 0 else "not resolved"
        lines.append(
            f"- **{r['model']}, {r['config']}** ({r['questions']} questions in {r['items']} contexts): gold-answer "
            f"probability {r['gold_prob']:.1f}, relative gap **{r['gold_prob_rel_gap_pct']:+.1f} %** "
            f"[{lo:+.1f}, {hi:+.1f}] ({res}; half-width {(hi - lo) / 2:.1f} points vs our +-{target_pct:g} target); "
            f"answer score {r['score']:.1f}, relative gap {r['score_rel_gap_pct']:+.1f} % [{slo:+.1f}, {shi:+.1f}] "
            f"({sres}).")
    for p in power:
        if p["task"] != "all":
            continue
        g, s = p.get("gold_prob_items_needed"), p.get("score_items_needed")
        lines.append(
            f"- Power ({p['model']}, {p['config']}): with {p.get('questions_per_item', '?')} questions per context, "
            f"+-{target_pct:g} points on the gold-probability gap needs about **{g}** contexts over all tasks "
            f"(this run: {p.get('pilot_items', '?')}); on the answer score it needs {s}.")
    return "\n".join(lines)
