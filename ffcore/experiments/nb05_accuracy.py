"""Notebook 05 (accuracy vs sparsity, paper Tables 2-3): the two tables' configurations and comparisons,
and the verdict on the gap to dense. The machinery (settings, plans, runs, rows) is `accuracy`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from ffcore.config import StrictConfig
from ffcore.engine import SparsityPlan
from ffcore.engine.plan import check_decode_context
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import paired_difference
from ffcore.evaluation.suite import kl_windows, window_family
from ffcore.experiments import nb03_predictor
from ffcore.experiments.accuracy import (DENSE, DENSE_LABEL, AccuracySettings, Components, ConfigSpec, TableResult,
                                        fmt_ci, method, run_table)
from ffcore.experiments.nb02_calibration import load_schedule
from ffcore.experiments.profiles import pick

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


# ------------------------------------------------------------------------------ decode-time sparsity (issue 18 item 4)
# Where does the continuation loss of sparse decode come from, and does a wider decode-time context help?
#
# How decode sparsity reaches the numbers: `ffcore.evaluation.runner.evaluate` scores a continuation row
# by one prefill of the context under the plan, then (plans with `sparse_decode`) feeds the true
# continuation ONE TOKEN AT A TIME inside the plan (`teacher_forced(..., stepwise=True)`), so every
# scored token goes through a sparse decode step exactly as in a decode loop, with the plan's
# `decode_context`; the greedy continuation compared with the dense one is decoded the same way from
# its own copy of the prefilled cache (the decode window travels with the cache). Plans without
# `sparse_decode` ("prefill only") score the continuation in one dense suffix forward. The records'
# `kl` / `nll` (to the dense model, mean over the continuation's tokens) therefore measure prefill +
# decode sparsity for the sparse-decode configurations and prefill sparsity alone for the others, so
# "<policy>, token" minus "<policy>, prefill only" (paired over windows) is what decode sparsity adds.

DECODE_POLICIES = ("predictor", "oracle", "first_block_static")
DECODE_REFERENCE = "predictor, token"


def decode_label(policy: str, context: str | None) -> str:
    """A diagnosis configuration's label: '<policy>, prefill only' or '<policy>, <decode_context>'."""
    return f"{policy}, {'prefill only' if context is None else context}"


def decode_diagnosis_plans(
    densities: float | Sequence[float] = 0.5, predictor: Any = None, compensator: Any = None,
    block_size: int | None = None, dense_tail: str = "full", seed: int = 0,
    prefill_only: Sequence[str] | None = None, contexts: Sequence[str] = ("window", "reuse"),
) -> dict[str, Any]:
    """The configurations that locate the loss of sparse generation, labelled by `decode_label` (dense first).

    * '<policy>, prefill only' (sparse_decode False): the prefill's own share of the loss, for each
      policy in `prefill_only` (default: every policy run);
    * '<policy>, token' for the predictor (when given), the per-block oracle and first-block static
      experts: sparse decode as the paper runs it, each token its own one-token span;
    * '<policy>, window' / '<policy>, reuse' (`contexts`) for the predictor and the oracle: experts from
      the last `block_size` FFN inputs at every step, or chosen every `block_size` steps and reused.

    Every plan shares the densities (a float or a per-layer schedule), the compensator (None: the
    selection alone), the block size and the dense tail. Without a predictor its rows are left out and
    the table's reference falls back to 'oracle, token'. 'dense' maps to None (the runner's reference).
    """

    for c in contexts:
        if check_decode_context(c) == "token":
            raise ValueError("contexts lists the extra decode contexts; 'token' is always run")
    policies: dict[str, Any] = {"oracle": "oracle", "first_block_static": "first_block_static"}
    if predictor is not None:
        policies = {"predictor": predictor, **policies}
    pre = list(policies) if prefill_only is None else list(prefill_only)
    unknown = sorted(set(pre) - set(policies))
    if unknown:
        raise ValueError(f"prefill_only names {unknown}, not among the policies run {sorted(policies)}")
    extra = {} if block_size is None else {"block_size": block_size}

    def plan(policy: str, context: str | None) -> SparsityPlan:
        return SparsityPlan(densities=densities, policy=policies[policy], compensator=compensator, dense_tail=dense_tail,
                            seed=seed, sparse_decode=context is not None, decode_context=context or "token", **extra)

    out: dict[str, Any] = {DENSE_LABEL: None}
    out.update({decode_label(p, None): plan(p, None) for p in pre})
    out.update({decode_label(p, "token"): plan(p, "token") for p in policies})
    out.update({decode_label(p, c): plan(p, c) for c in contexts for p in ("predictor", "oracle") if p in policies})
    return out


@dataclasses.dataclass
class DecodeSettings(StrictConfig):
    """Sizes of notebook 05's decode diagnosis.

    windows_per_family: continuation windows per corpus family (eval split; notebook 03's families).
    ctx / cont:         context tokens prefilled, continuation tokens scored (one decode step each).
    sparsity:           the FFN sparsity of every plan (layer-wise schedule of notebook 02).
    prefill_only:       the policies also run without sparse decode (what decode sparsity adds).
    """

    windows_per_family: int
    ctx: int
    cont: int
    sparsity: float = 0.5
    prefill_only: tuple[str, ...] = ("predictor", "oracle")

    def __post_init__(self) -> None:
        self.prefill_only = tuple(self.prefill_only)
        if self.windows_per_family < 1 or self.ctx < 1 or self.cont < 1 or not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"windows_per_family, ctx, cont must be >= 1 and 0 < sparsity < 1: {self}")


def decode_settings(profile: str) -> DecodeSettings:
    """Per-profile sizes (full: one window of each of the ten families, 1K context, 64 scored tokens)."""
    return pick(profile, DecodeSettings(1, 384, 16), DecodeSettings(1, 1024, 32), DecodeSettings(1, 1024, 64))


def decode_windows(tokenizer: Any, cfg: DecodeSettings, profile: str, seed: int = 0) -> list[dict[str, Any]]:
    """The diagnosis windows: `cfg.windows_per_family` of every notebook-03 family, each tagged `out_of_domain`."""
    s3 = nb03_predictor.settings(profile, seed)
    rows = kl_windows(tokenizer, s3.families, cfg.windows_per_family, cfg.ctx, cfg.cont, seed)
    return [{**r, "out_of_domain": window_family(r) in s3.held_out} for r in rows]


def decode_diagnosis(comps: Components, cfg: DecodeSettings, windows: Sequence[Mapping[str, Any]], cache: Any = None,
                     run: RunConfig | None = None, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Run every diagnosis configuration of `comps` (deployed schedule, predictor, plain compensator) on `windows`."""
    densities = load_schedule(comps.model, round(1.0 - cfg.sparsity, 6), comps.profile)
    pre = tuple(p for p in cfg.prefill_only if p != "predictor" or comps.predictor is not None)
    plans = decode_diagnosis_plans(densities, predictor=comps.predictor, compensator=comps.compensators.get("plain"),
                                   seed=seed, prefill_only=pre)
    rows = [{k: v for k, v in r.items() if k != "out_of_domain"} for r in windows]
    return decode_diagnosis_runs(comps.model, comps.tokenizer, rows, plans, cache, run)


def restrict_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], uids: set[str]) -> dict[str, list[Mapping[str, Any]]]:
    """The records of `runs` whose uid is in `uids` (e.g. the out-of-domain windows)."""
    return {label: [r for r in recs if r["uid"] in uids] for label, recs in runs.items()}


def decode_diagnosis_runs(model: Any, tokenizer: Any, windows: Sequence[Mapping[str, Any]], plans: Mapping[str, Any],
                          cache: Any = None, run: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Continuation records of every configuration on `windows` (e.g. `nb03_predictor.kl_windows`), through the cache."""

    return {label: evaluate(model, tokenizer, list(windows), plan, cache, run) for label, plan in plans.items()}


def _split_label(label: str) -> tuple[str, str]:
    policy, _, context = label.rpartition(", ")
    return (policy, context) if policy else (label, "-")


def decode_diagnosis_table(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], reference: str | None = None, model: str | None = None,
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per configuration: mean KL and NLL to dense, and paired differences with bootstrap CIs.

    `runs`: label -> continuation records (`decode_diagnosis_runs`). Per row: n, kl, nll, dense_nll,
    nll_change_pct, top1_agree, greedy_agree; `kl_diff` / `nll_diff` (this config minus `reference`,
    default 'predictor, token', else 'oracle, token') with their CIs (`*_ci_low`, `*_ci_high`); and for a
    sparse-decode config whose policy also ran 'prefill only', `decode_kl` with its CI: the KL that
    decode sparsity adds (this config minus the same policy's prefill-only run). Paired over windows
    (matched by uid), resampling windows, not tokens. The dense row, when present, is skipped.
    """

    if reference is None:
        reference = next((r for r in (DECODE_REFERENCE, "oracle, token") if r in runs), None)
    if reference is None or reference not in runs:
        raise KeyError(f"the reference configuration {reference!r} is not among {sorted(runs)}")

    def cont(recs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [r for r in recs if r["task"] == "continuation"]

    def mean(ms: Sequence[Mapping[str, Any]], key: str) -> float:
        vals = [float(m[key]) for m in ms if key in m]
        return sum(vals) / len(vals) if vals else float("nan")

    ref = cont(runs[reference])
    rows = []
    for label, recs in runs.items():
        if label == DENSE_LABEL:
            continue
        recs = cont(recs)
        if not recs:
            continue
        ms = [r["metrics"] for r in recs]
        policy, context = _split_label(label)
        nll, dnll = mean(ms, "nll"), mean(ms, "dense_nll")
        row: dict[str, Any] = {
            **({"model": model} if model is not None else {}), "config": label, "policy": policy, "decode": context,
            "n": len(recs), "kl": mean(ms, "kl"), "nll": nll, "dense_nll": dnll,
            "nll_change_pct": (nll - dnll) / dnll * 100 if dnll else float("nan"),
            "top1_agree": mean(ms, "top1_agree"), "greedy_agree": mean(ms, "greedy_agree"), "reference": reference,
        }
        for metric in ("kl", "nll"):
            d = paired_difference(ref, recs, metric, n_boot=n_boot, level=level, seed=seed)
            row.update({f"{metric}_diff": d["diff"], f"{metric}_diff_ci_low": d["ci"][0],
                        f"{metric}_diff_ci_high": d["ci"][1]})
        base = decode_label(policy, None)
        if context not in ("prefill only", "-") and base in runs and cont(runs[base]):
            d = paired_difference(cont(runs[base]), recs, "kl", n_boot=n_boot, level=level, seed=seed)
            row.update({"decode_kl": d["diff"], "decode_kl_ci_low": d["ci"][0], "decode_kl_ci_high": d["ci"][1]})
        else:
            row.update({"decode_kl": None, "decode_kl_ci_low": None, "decode_kl_ci_high": None})
        rows.append(row)
    return rows


def _ci4(lo: float, hi: float) -> str:
    return "n/a" if math.isnan(lo) or math.isnan(hi) else f"[{lo:+.4f}, {hi:+.4f}]"


def _side(lo: float, hi: float, below: str, above: str) -> str:
    """'below' / 'above' when the interval excludes 0, else 'not resolved'."""
    return below if hi < 0 else above if lo > 0 else "not resolved"


def decode_diagnosis_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown, per model: what decode sparsity adds per policy, each configuration against the reference, the best.

    Every claim comes from the rows' numbers; a difference whose 95 % interval includes 0 is "not resolved".
    """
    lines = []
    for model in dict.fromkeys(r.get("model") for r in rows):
        sel = [r for r in rows if r.get("model") == model]
        if not sel:
            continue
        name = f"**{model}**" if model is not None else "This model"
        ref = sel[0]["reference"]
        ref_row = next((r for r in sel if r["config"] == ref), None)
        adds = [r for r in sel if r.get("decode_kl") is not None and r["decode"] == "token"]
        if adds:
            parts = []
            for r in adds:
                side = _side(r["decode_kl_ci_low"], r["decode_kl_ci_high"], "lowers the KL", "adds KL")
                parts.append(f"{r['policy']}: {r['decode_kl']:+.4f} (95 % CI {_ci4(r['decode_kl_ci_low'], r['decode_kl_ci_high'])}, "
                             f"{side})")
            lines.append(f"- {name} ({sel[0]['n']} windows): per-token sparse decode against the same policy's "
                         f"prefill-only run, KL change " + "; ".join(parts) + ".")
        if ref_row is not None:
            lines.append(f"- {name}: reference **{ref}**: KL {ref_row['kl']:.4f}, NLL {ref_row['nll']:.4f} "
                         f"({ref_row['nll_change_pct']:+.1f} % vs dense).")
        for r in sel:
            if r["config"] == ref:
                continue
            side = _side(r["kl_diff_ci_low"], r["kl_diff_ci_high"], "**below** the reference", "**above** the reference")
            nll_side = _side(r["nll_diff_ci_low"], r["nll_diff_ci_high"], "lower", "higher")
            lines.append(f"  - {r['config']}: KL {r['kl']:.4f} ({r['kl_diff']:+.4f}, 95 % CI "
                         f"{_ci4(r['kl_diff_ci_low'], r['kl_diff_ci_high'])}): {side}; NLL {r['nll']:.4f} "
                         f"({r['nll_change_pct']:+.1f} % vs dense; vs reference {r['nll_diff']:+.4f}, CI "
                         f"{_ci4(r['nll_diff_ci_low'], r['nll_diff_ci_high'])}: {nll_side}).")
        decoding = [r for r in sel if r["decode"] not in ("prefill only", "-")]
        if decoding:
            best = min(decoding, key=lambda r: r["kl"])
            sure = ("" if best["config"] == ref else
                    f" ({_side(best['kl_diff_ci_low'], best['kl_diff_ci_high'], 'resolved below the reference', 'resolved above the reference')})")
            lines.append(f"- {name}: lowest KL with sparse decode: **{best['config']}** ({best['kl']:.4f}){sure}.")
    return "\n".join(lines)
