"""Notebook 08 on the evaluation suite: SpecPrefill, FastForward and their combination, with FLOP speedups.

Each configuration pairs a prefill method (the full prompt, or SpecPrefill's kept tokens) with a
FastForward configuration of `tables` (dense, or the full method: trained predictor + compensator +
layer-wise schedule + dense first/last). Both run through `evaluate`, so the dense and FastForward
rows are the very records notebook 05 cached. The compute-bound speedup of a configuration is the
mean over its samples of `specprefill_flops` on that sample's kept positions (speculator included).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from ffcore.evaluation.prefill import FULL, PrefillMethod, SpecPrefillMethod, ranges_to_positions
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import summarize
from ffcore.evaluation.tables import DENSE, DENSE_LABEL, Components, ConfigSpec, build_plan, method, plan_tag, subset

SPECULATORS = ("first", "same")  # the first-N-layers self-speculator, the main model itself


@dataclasses.dataclass(frozen=True)
class TokenDropSpec:
    """One configuration of the suite table: a SpecPrefill setting (keep_rate None = full prompt) and a FastForward one."""

    label: str
    keep_rate: float | None = None
    speculator: str = "first"
    keep_last: bool = True
    fastforward: ConfigSpec = DENSE

    def __post_init__(self) -> None:
        if self.keep_rate is not None and not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"{self.label}: keep_rate must be in (0, 1], got {self.keep_rate}")
        if self.speculator not in SPECULATORS:
            raise ValueError(f"{self.label}: speculator must be one of {SPECULATORS}, got {self.speculator!r}")

    @property
    def method(self) -> str:
        """Series name: dense, specprefill, fastforward, specprefill+fastforward (last chunk not forced: its own)."""
        if self.keep_rate is None:
            return "dense" if self.fastforward.dense else "fastforward"
        base = "specprefill" if self.fastforward.dense else "specprefill+fastforward"
        return base if self.keep_last else f"{base}, last chunk not forced"


def suite_specs(
    keep_rates: Sequence[float], sparsities: Sequence[float], same_model_keep_rates: Sequence[float] = (),
    no_last_keep_rates: Sequence[float] = (), combos: Sequence[Sequence[float]] = (),
) -> list[TokenDropSpec]:
    """Dense, FastForward at each sparsity, SpecPrefill (self-speculator, and same-model), without the forced last chunk, combinations."""
    specs = [TokenDropSpec(DENSE_LABEL)]
    specs += [TokenDropSpec(f"FastForward {s:.0%}", fastforward=method(s)) for s in sparsities]
    specs += [TokenDropSpec(f"SpecPrefill p={p:g}", keep_rate=p) for p in keep_rates]
    specs += [TokenDropSpec(f"SpecPrefill p={p:g} [same model]", keep_rate=p, speculator="same")
              for p in same_model_keep_rates]
    specs += [TokenDropSpec(f"SpecPrefill p={p:g}, last chunk not forced", keep_rate=p, keep_last=False)
              for p in no_last_keep_rates]
    for combo in combos:
        if len(combo) != 2:
            raise ValueError(f"a combination is (keep_rate, sparsity), got {combo!r}")
        p, s = combo
        specs.append(TokenDropSpec(f"SpecPrefill p={p:g} + FastForward {s:.0%}", keep_rate=p,
                                   fastforward=method(s)))
    return specs


@dataclasses.dataclass
class Speculators:
    """The speculator models of one main model, with FLOP specs, and a shared score cache per speculator."""

    models: dict[str, Any]
    specs: dict[str, Any]
    names: dict[str, str]
    scores: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: Any, prefix_fraction: float) -> "Speculators":
        """The main model itself and its first-N-layers view (N = `prefix_layers(model, prefix_fraction)`)."""
        from ffcore import specprefill as sp
        from ffcore.flops import spec_from_model

        n = sp.prefix_layers(model, prefix_fraction)
        view = sp.layer_prefix_view(model, n)
        return cls(models={"first": view, "same": model},
                   specs={"first": spec_from_model(view), "same": spec_from_model(model)},
                   names={"first": f"first {n} layers", "same": "same model"})


def prefill_method(spec: TokenDropSpec, speculators: Speculators, config: Any) -> PrefillMethod:
    """The runner's prefill method of a configuration (scores shared across keep rates of one speculator)."""
    if spec.keep_rate is None:
        return FULL
    cfg = config.replace(keep_last=spec.keep_last)
    cache = speculators.scores.setdefault(spec.speculator, {})
    return SpecPrefillMethod(speculators.models[spec.speculator], spec.keep_rate, cfg,
                             name=speculators.names[spec.speculator], scores_cache=cache)


def record_flops(
    record: Mapping[str, Any], main_spec: Any, spec: TokenDropSpec, speculators: Speculators, lookahead: int,
    plan: Any = None, window: str = "positions",
) -> dict[str, Any]:
    """`specprefill_flops` of one evaluated sample: its kept positions, the speculator, FastForward's plan."""
    import torch

    from ffcore.specprefill import specprefill_flops

    T = int(record["n_prompt_tokens"])
    kept = ranges_to_positions(record["kept_ranges"]) if "kept_ranges" in record else torch.arange(T)
    spec_spec = speculators.specs[spec.speculator] if spec.keep_rate is not None else None
    ff: dict[str, Any] = {}
    if plan is not None:
        ff = dict(densities=plan.densities, block_size=plan.block_size, dense_first=plan.dense_first,
                  dense_last=plan.dense_last)
    return specprefill_flops(main_spec, T, kept, spec_spec, lookahead if spec_spec is not None else 0,
                             window=window, **ff)


@dataclasses.dataclass
class SuiteTable:
    """What `run_suite_table` produced for one model."""

    rows: list[dict[str, Any]]  # one per configuration: accuracy, gap with CI, kept fraction, FLOP speedup
    records: dict[str, list[dict[str, Any]]]  # label -> per-sample records


def run_suite_table(
    comps: Components, dataset: Any, tasks: Sequence[str], specs: Sequence[TokenDropSpec], prefix_fraction: float,
    config: Any, cache: str | Path | None, run: RunConfig | None = None, seed: int = 0, n_boot: int = 2000,
    level: float = 0.95,
) -> SuiteTable:
    """Evaluate every configuration on `dataset` (restricted to `tasks`), then tabulate accuracy vs compute."""
    from ffcore.flops import spec_from_model

    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels) or DENSE_LABEL not in labels:
        raise ValueError(f"labels must be unique and include {DENSE_LABEL!r}, got {labels}")
    rows_ds = subset(dataset, tasks)
    speculators = Speculators.of(comps.model, prefix_fraction)
    main_spec = spec_from_model(comps.model)
    results, plans = {}, {}
    for spec in specs:
        plan = build_plan(spec.fastforward, comps, seed)
        plans[spec.label] = plan
        results[spec.label] = evaluate(comps.model, comps.tokenizer, rows_ds, plan, cache, plan_tag(plan), run,
                                       prefill_method(spec, speculators, config))
    summ = {r["config"]: r for r in summarize(results, dense=DENSE_LABEL, tasks=tasks, n_boot=n_boot, level=level,
                                              seed=seed)}
    out = []
    for spec in specs:
        recs = results[spec.label]
        fl = [record_flops(r, main_spec, spec, speculators, config.lookahead, plans[spec.label], config.window)
              for r in recs]
        s = summ[spec.label]
        out.append({
            "model": comps.key, "config": spec.label, "method": spec.method,
            "speculator": speculators.names[spec.speculator] if spec.keep_rate is not None else None,
            "keep_rate": spec.keep_rate, "sparsity": None if spec.fastforward.dense else spec.fastforward.sparsity,
            "keep_last": spec.keep_last, "n_samples": len(recs), "n_tasks": len(tasks),
            "kept_fraction": sum(f["kept_fraction"] for f in fl) / len(fl),
            "flops_speedup": sum(f["speedup"] for f in fl) / len(fl),
            "speculator_share": sum(f["speculator_share"] for f in fl) / len(fl),
            "average": 100 * s["average"], "average_ci_low": 100 * s["average_ci_low"],
            "average_ci_high": 100 * s["average_ci_high"], "rel_gap_pct": s["rel_gap_pct"],
            "rel_gap_ci_low": s["rel_gap_ci_low"], "rel_gap_ci_high": s["rel_gap_ci_high"],
            **{k: 100 * v for k, v in s.items() if k.startswith("task:")},
        })
    return SuiteTable(out, results)


# ------------------------------------------------------------------------------ diagnostics
def answer_kept(row: Mapping[str, Any], record: Mapping[str, Any], tokenizer: Any) -> float:
    """1.0 if every token of the answer (in at least one place it occurs in the prompt) was kept, else 0.0; NaN if unknown.

    For the retrieval tasks the answer string is in the prompt (the value of the queried key, the pass
    key): if SpecPrefill dropped it, no model can answer. Full prefills (no `kept_ranges`) keep it.
    """
    if "kept_ranges" not in record:
        return 1.0
    answer = row["answers"][0] if row["answers"] else ""
    try:
        offsets = tokenizer(row["prompt"], return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow / byte-level tokenizers: no offsets
        return float("nan")
    kept = set(ranges_to_positions(record["kept_ranges"]).tolist())
    start, found = row["prompt"].find(answer), False
    while answer and start >= 0:
        end = start + len(answer)
        toks = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        found = found or (bool(toks) and all(i in kept for i in toks))
        start = row["prompt"].find(answer, start + 1)
    return 1.0 if found else 0.0


def retrieval_rows(
    model_key: str, dataset: Any, records: Mapping[str, Sequence[Mapping[str, Any]]], tokenizer: Any,
    tasks: Sequence[str] = ("kv_retrieval", "passkey"),
) -> list[dict[str, Any]]:
    """Per configuration and retrieval task: score (0-100) and the fraction of prompts whose answer SpecPrefill kept."""
    by_uid = {r["uid"]: r for r in dataset if r["task"] in tasks}
    out = []
    for label, recs in records.items():
        for task in tasks:
            rs = [r for r in recs if r["task"] == task and r["uid"] in by_uid]
            if not rs:
                continue
            kept = [answer_kept(by_uid[r["uid"]], r, tokenizer) for r in rs]
            out.append({"model": model_key, "config": label, "task": task, "n": len(rs),
                        "score": 100 * sum(r["score"] for r in rs) / len(rs),
                        "answer_kept": sum(kept) / len(kept)})
    return out


def last_chunk_rows(model_key: str, specs: Sequence[TokenDropSpec], records: Mapping[str, Sequence[Mapping[str, Any]]],
                    chunk_size: int) -> list[dict[str, Any]]:
    """For each configuration without the forced last chunk: how often its selection differs from the forced one.

    Compares with the forced configuration of the same keep rate and FastForward setting (if evaluated),
    and counts the prompts whose last chunk was chosen on its score alone.
    """
    out = []
    for spec in specs:
        if spec.keep_rate is None or spec.keep_last:
            continue
        twin = next((s for s in specs if s.keep_last and s.keep_rate == spec.keep_rate
                     and s.speculator == spec.speculator and s.fastforward == spec.fastforward), None)
        recs = records[spec.label]
        forced = {r["uid"]: r for r in records[twin.label]} if twin else {}
        n_last = 0
        for r in recs:
            T = int(r["n_prompt_tokens"])
            last = set(range(((T - 1) // chunk_size) * chunk_size, T))
            n_last += last <= set(ranges_to_positions(r["kept_ranges"]).tolist())
        same = sum(forced[r["uid"]]["kept_ranges"] == r["kept_ranges"] for r in recs if r["uid"] in forced)
        out.append({"model": model_key, "config": spec.label, "compared_with": twin.label if twin else None,
                    "prompts": len(recs), "last_chunk_kept_on_its_score": n_last,
                    "same_selection_as_forced": same if twin else None})
    return out
