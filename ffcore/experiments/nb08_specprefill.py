"""Notebook 08 (SpecPrefill, FastForward and their combination): the settings per profile, the continuation
grid, the suite table, the measured time to first token, the passkey check and the headline numbers.

Every configuration is named by data, not by a label string: `Method` (dense, SpecPrefill, FastForward,
their combination, SpecPrefill with cache-slot windows) and its keep rate, sparsity and speculator.
The suite table pairs a prefill method (the full prompt, or SpecPrefill's kept tokens) with a
FastForward configuration of notebook 05 (`nb05_accuracy`: dense, or the full method); both run
through `evaluate`, so the dense and FastForward rows are the very records notebook 05 cached. The
compute-bound speedup of a configuration is the mean over its samples of `specprefill_flops` on that
sample's kept positions (speculator included).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ffcore.config import StrictConfig
from ffcore.data import token_samples
from ffcore.decoding import FULL, PrefillMethod, greedy_decode, teacher_forced, token_nll
from ffcore.engine import BLOCK_SIZE, SparsityPlan, sparsify
from ffcore.evaluation.prefill import SpecPrefillMethod, ranges_to_positions
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import summarize as summarize_scores
from ffcore.experiments.accuracy import DENSE, DENSE_LABEL, Components, ConfigSpec, build_plan, method, subset
from ffcore.experiments.profiles import pick
from ffcore.flops import ModelSpec, spec_from_model
from ffcore.specprefill import (POSITIONS, Method, PositionCache, SpecPrefillConfig, _windows, layer_prefix_view, prefill_at,
                                prefix_layers, score_tokens, select_tokens, specprefill_flops, speculative_prefill)
from ffcore.timing import interleaved


# ----------------------------------------------------------------------------- evaluation helpers
class Continuation(NamedTuple):
    """Teacher-forced scoring of the true continuation after a prefill."""

    nll: Tensor  # [C] negative log-likelihood of each continuation token
    argmax: Tensor  # [C] the model's top-1 prediction at each continuation position


@torch.no_grad()
def score_continuation(model: nn.Module, logits: Tensor, cache: PositionCache, cont_ids: Tensor) -> Continuation:
    """NLL and top-1 of the true continuation cont_ids [1, C], fed densely (teacher forcing) after a prefill."""
    all_logits = teacher_forced(model, logits[0], cache, cont_ids[0], POSITIONS).float()  # [C, V]
    return Continuation(token_nll(all_logits, cont_ids[0]).cpu(), all_logits.argmax(-1).cpu())


# ----------------------------------------------------------------------------- notebook experiments
@dataclasses.dataclass
class SpecPrefillRunConfig(StrictConfig):
    """Per-profile knobs of notebook 08 (SpecPrefill, FastForward and their combination).

    seq_len / cont_len: prompt tokens and scored continuation tokens per sample.
    n_samples:          eval-split samples per model (half prose, half code).
    keep_rates:         SpecPrefill keep rates with each speculator.
    prefix_fraction:    the self-speculator runs round(fraction * L) of the main model's layers.
    sparsities:         FastForward FFN sparsities (oracle experts, uniform, first/last block dense).
    combo_keep_rates / combo_sparsities: the grid of the combination (first-N speculator).
    timing_repeats:     timed repeats per TTFT measurement (median reported).
    passkey_samples / passkey_len: the passkey check (0 = skip).
    lookahead:          the speculators' look-ahead tokens.
    max_gap:            relative continuation-NLL gap allowed for the timed "best" points.
    block_size:         FastForward's block size (128 as in the paper; smaller for the tiny smoke prompts).
    suite_keep_rates:   SpecPrefill keep rates (self-speculator) evaluated on notebook 05's suite.
    suite_same_model_keep_rates: the same with the main model as its own speculator.
    suite_no_last_keep_rates:    keep rates evaluated without forcing the last chunk (the question) in.
    suite_combos:       (keep rate, FFN sparsity) pairs of the combination on the suite.
    """

    models: list[str]
    seq_len: int
    cont_len: int
    n_samples: int
    keep_rates: list[float]
    prefix_fraction: float
    sparsities: list[float]
    combo_keep_rates: list[float]
    combo_sparsities: list[float]
    timing_repeats: int
    passkey_samples: int
    passkey_len: int
    lookahead: int = 8
    max_gap: float = 0.05  # "best point" = highest FLOP speedup within this relative NLL gap
    block_size: int = BLOCK_SIZE
    suite_keep_rates: list[float] = dataclasses.field(default_factory=list)
    suite_same_model_keep_rates: list[float] = dataclasses.field(default_factory=list)
    suite_no_last_keep_rates: list[float] = dataclasses.field(default_factory=list)
    suite_combos: list[list[float]] = dataclasses.field(default_factory=list)


def run_config(profile: str) -> SpecPrefillRunConfig:
    """Notebook 08's knobs (smoke: tiny models in seconds; full: both real models, 1K-token prompts, few samples)."""
    return pick(
        profile,
        smoke=SpecPrefillRunConfig(
            models=["tiny-llama", "tiny-gemma3"], seq_len=192, cont_len=16, n_samples=2,
            keep_rates=[0.5, 0.9], prefix_fraction=0.5, sparsities=[0.5], combo_keep_rates=[0.5],
            combo_sparsities=[0.5], timing_repeats=1, passkey_samples=1, passkey_len=160, lookahead=2,
            block_size=32, suite_keep_rates=[0.5], suite_no_last_keep_rates=[0.5], suite_combos=[[0.5, 0.5]],
        ),
        quick=SpecPrefillRunConfig(
            models=["smollm2-135m", "gemma3-270m"], seq_len=512, cont_len=32, n_samples=2,
            keep_rates=[0.3, 0.5, 0.7], prefix_fraction=0.25, sparsities=[0.5], combo_keep_rates=[0.5],
            combo_sparsities=[0.5], timing_repeats=1, passkey_samples=1, passkey_len=384,
            suite_keep_rates=[0.3, 0.5], suite_no_last_keep_rates=[0.5], suite_combos=[[0.5, 0.5]],
        ),
        full=SpecPrefillRunConfig(
            models=["smollm2-135m", "gemma3-270m"], seq_len=1024, cont_len=64, n_samples=4,
            keep_rates=[0.3, 0.5, 0.7], prefix_fraction=0.25, sparsities=[0.3, 0.4, 0.5],
            combo_keep_rates=[0.5, 0.7], combo_sparsities=[0.5], timing_repeats=3, passkey_samples=2,
            passkey_len=768, suite_keep_rates=[0.3, 0.5], suite_no_last_keep_rates=[0.5],
            suite_combos=[[0.5, 0.5]],
        ),
    )


PlanFactory = Callable[[float], Any]  # FFN sparsity -> the FastForward SparsityPlan to run


def _ff_plan(sparsity: float, block_size: int, policy: str = "oracle") -> SparsityPlan:
    return SparsityPlan(densities=1.0 - sparsity, policy=policy, block_size=block_size, dense_first=True, dense_last=True)


def _plan_factory(ff_plan: PlanFactory | None, block_size: int, policy: str = "oracle") -> PlanFactory:
    """The given factory, or uniform densities with `policy` experts and the first/last block dense."""
    return ff_plan or (lambda s: _ff_plan(s, block_size, policy))


def _split_sample(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """One [seq_len + cont_len] sample -> prompt [1, seq_len], continuation [1, cont_len]."""
    return ids[None, :seq_len], ids[None, seq_len:]


class _Speculator(NamedTuple):
    name: str
    model: nn.Module
    spec: ModelSpec


def _speculators(model: nn.Module, fraction: float) -> list[_Speculator]:
    """The two speculators of the notebook: the main model itself and its first-N-layers view."""
    n = prefix_layers(model, fraction)
    view = layer_prefix_view(model, n)
    return [_Speculator("same model", model, spec_from_model(model)),
            _Speculator(f"first {n} layers", view, spec_from_model(view))]


@torch.no_grad()
def quality_records(
    model: nn.Module, tokenizer: Any, cfg: SpecPrefillRunConfig, seed: int = 0, log: Callable[[str], None] | None = print,
    ff_plan: PlanFactory | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Continuation NLL / top-1 agreement of dense, SpecPrefill, FastForward and the combination on eval samples.

    For each eval-split sample the first `seq_len` tokens are the prompt and the next `cont_len`
    the true continuation, scored by a dense teacher-forced decode from each method's prefill
    cache. FastForward runs `ff_plan(sparsity)` (default: uniform densities, per-block oracle experts).
    Returns (one record per sample and method, {speculator name: TokenScores of sample 0}).
    """
    name = getattr(model, "ffcore_name", type(model).__name__)
    spec_main = spec_from_model(model)
    method_cfg = SpecPrefillConfig(lookahead=cfg.lookahead)
    specs = _speculators(model, cfg.prefix_fraction)
    view = specs[-1]
    plan_for = _plan_factory(ff_plan, cfg.block_size)
    sliding = any(w is not None for w in _windows(model))
    data = token_samples(tokenizer, "eval", cfg.seq_len + cfg.cont_len, cfg.n_samples, seed=seed)
    rows: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    t_start = time.perf_counter()
    for i, ids in enumerate(data["input_ids"]):
        prompt, cont = _split_sample(ids, cfg.seq_len)
        T = prompt.shape[1]
        base = {"model": name, "sample": i, "source": data["source"][i], "T": T}
        dense = score_continuation(model, *prefill_at(model, prompt), cont)

        def record(method: Method, res: Continuation, flops: dict[str, Any], **extra: Any) -> None:
            rows.append({
                **base, "method": method.value, "speculator": None, "keep_rate": None, "sparsity": None, **extra,
                "kept_tokens": flops["kept_tokens"], "nll": float(res.nll.mean()),
                "dense_nll": float(dense.nll.mean()), "top1_agree": float((res.argmax == dense.argmax).float().mean()),
                "first_agree": float(res.argmax[0] == dense.argmax[0]), "flops_speedup": flops["speedup"],
                "speculator_share": flops["speculator_share"],
            })

        all_pos = torch.arange(T)
        record(Method.DENSE, dense, specprefill_flops(spec_main, T, all_pos))
        for sp in specs:
            scores = score_tokens(sp.model, prompt, method_cfg)
            if i == 0:
                examples[sp.name] = scores
            for p in cfg.keep_rates:
                out = speculative_prefill(model, None, prompt, p, method_cfg, scores=scores)
                res = score_continuation(model, out.logits, out.cache, cont)
                fl = specprefill_flops(spec_main, T, out.kept, sp.spec, cfg.lookahead)
                record(Method.SPECPREFILL, res, fl, speculator=sp.name, keep_rate=p)
            if sp is view:
                view_scores = scores
        if sliding and cfg.combo_keep_rates:  # the window ablation: transformers' own (cache-slot) windows
            p = cfg.combo_keep_rates[0]
            cache_cfg = method_cfg.replace(window="cache")
            out = speculative_prefill(model, None, prompt, p, cache_cfg, scores=view_scores)
            fl = specprefill_flops(spec_main, T, out.kept, view.spec, cfg.lookahead, window="cache")
            record(Method.SPECPREFILL_CACHE_WINDOWS, score_continuation(model, out.logits, out.cache, cont), fl,
                   speculator=view.name, keep_rate=p)
        for s in cfg.sparsities:
            plan = plan_for(s)
            with sparsify(model, plan):
                logits, cache = prefill_at(model, prompt)
            fl = specprefill_flops(spec_main, T, all_pos, plan=plan)
            record(Method.FASTFORWARD, score_continuation(model, logits, cache, cont), fl, sparsity=s)
        for p in cfg.combo_keep_rates:
            for s in cfg.combo_sparsities:
                plan = plan_for(s)
                with sparsify(model, plan):
                    out = speculative_prefill(model, None, prompt, p, method_cfg, scores=view_scores)
                fl = specprefill_flops(spec_main, T, out.kept, view.spec, cfg.lookahead, plan=plan)
                record(Method.COMBINATION, score_continuation(model, out.logits, out.cache, cont), fl,
                       speculator=view.name, keep_rate=p, sparsity=s)
        if log:
            log(f"[{name}] sample {i + 1}/{len(data['input_ids'])} ({data['source'][i]}) done, "
                f"{time.perf_counter() - t_start:.0f}s")
    return rows, examples


GROUP_KEYS = ("model", "method", "speculator", "keep_rate", "sparsity")


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over samples per (model, method, speculator, keep rate, sparsity), with the relative NLL gap to dense.

    rel_nll_gap = mean NLL / mean dense NLL - 1 over the same samples (positive = worse than dense).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    out = []
    for key, rs in groups.items():
        nll = statistics.fmean(r["nll"] for r in rs)
        dense = statistics.fmean(r["dense_nll"] for r in rs)
        out.append({
            **dict(zip(GROUP_KEYS, key)), "n_samples": len(rs), "nll": nll, "dense_nll": dense,
            "rel_nll_gap": nll / dense - 1.0, "top1_agree": statistics.fmean(r["top1_agree"] for r in rs),
            "first_agree": statistics.fmean(r["first_agree"] for r in rs),
            "kept_fraction": statistics.fmean(r["kept_tokens"] / r["T"] for r in rs),
            "flops_speedup": statistics.fmean(r["flops_speedup"] for r in rs),
            "speculator_share": statistics.fmean(r["speculator_share"] for r in rs),
        })
    return out


def method_label(row: dict[str, Any], speculator: bool = True) -> str:
    """A short human-readable name of a summary row's configuration (with its speculator unless told not to)."""
    m = Method(row["method"])
    if m is Method.DENSE:
        return "dense"
    if m is Method.FASTFORWARD:
        return f"FastForward {row['sparsity']:.0%}"
    spec = f" [{row['speculator']}]" if speculator and row.get("speculator") else ""
    if m is Method.COMBINATION:
        return f"SpecPrefill p={row['keep_rate']} + FF {row['sparsity']:.0%}{spec}"
    if m is Method.SPECPREFILL:
        return f"SpecPrefill p={row['keep_rate']}{spec}"
    return f"{m.value} p={row['keep_rate']}{spec}"


def best_point(summary: Sequence[dict[str, Any]], model: str, method: Method, max_gap: float,
               speculator_prefix: str = "first") -> dict[str, Any] | None:
    """The configuration of a method to time: the highest FLOP speedup (> 1) whose relative NLL gap stays within
    `max_gap`; else the smallest gap among those faster than dense; else the fastest.

    Only speculators whose name starts with `speculator_prefix` (the cheap self-speculator) count.
    """
    cands = [r for r in summary if r["model"] == model and r["method"] == Method(method).value
             and (r["speculator"] is None or str(r["speculator"]).startswith(speculator_prefix))]
    if not cands:
        return None
    faster = [r for r in cands if r["flops_speedup"] > 1.0]
    ok = [r for r in faster if r["rel_nll_gap"] <= max_gap]
    if ok:
        return max(ok, key=lambda r: r["flops_speedup"])
    if faster:
        return min(faster, key=lambda r: r["rel_nll_gap"])
    return max(cands, key=lambda r: r["flops_speedup"])


@torch.no_grad()
def ttft_records(
    model: nn.Module, tokenizer: Any, cfg: SpecPrefillRunConfig, summary: Sequence[dict[str, Any]],
    max_gap: float = 0.05, seed: int = 0, ff_plan: PlanFactory | None = None,
) -> list[dict[str, Any]]:
    """Measured CPU time-to-first-token of dense, the best SpecPrefill and the best combination, interleaved.

    "Best" = `best_point` with `max_gap`. SpecPrefill's time is split into the speculator's scoring
    (prefill + look-ahead, shared by both configurations) and the main model's prefill of the kept
    tokens; all of them and the dense prefill are timed round-robin (`ffcore.timing.interleaved`). The
    combination runs `ff_plan(sparsity)`: pass the deployed method (trained predictor + compensator) to
    time what a user would run. The default uses *random* experts: every policy computes the same K
    experts per block, and the oracle's own dense scoring pass is not a deployable cost.
    """
    name = getattr(model, "ffcore_name", type(model).__name__)
    prompt = token_samples(tokenizer, "eval", cfg.seq_len, 1, seed=seed)["input_ids"]
    method_cfg = SpecPrefillConfig(lookahead=cfg.lookahead)
    view = _speculators(model, cfg.prefix_fraction)[-1]
    points = [best_point(summary, name, m, max_gap) for m in (Method.SPECPREFILL, Method.COMBINATION)]
    points = [p for p in points if p is not None]
    fns: dict[str, Callable[[], Any]] = {"dense": lambda: prefill_at(model, prompt)}
    if points:
        scores = score_tokens(view.model, prompt, method_cfg)
        fns["speculator"] = lambda: score_tokens(view.model, prompt, method_cfg)
    for i, point in enumerate(points):
        kept = select_tokens(scores, point["keep_rate"], method_cfg)
        plan = _plan_factory(ff_plan, cfg.block_size, "random")(point["sparsity"]) if point["sparsity"] else None

        def main(kept: Tensor = kept, plan: SparsityPlan | None = plan) -> Any:
            with contextlib.nullcontext() if plan is None else sparsify(model, plan):
                return prefill_at(model, prompt, kept)

        fns[f"main {i}"] = main
    rec = interleaved(fns, cfg.timing_repeats, warmup=1)

    def row(config: str, method: Method, component: str, key: str, point: dict[str, Any] | None) -> dict[str, Any]:
        return {"model": name, "config": config, "method": method.value, "component": component,
                "median_s": rec.median(key), "runs_s": [round(r, 4) for r in rec.wall_s[key]],
                "flops_speedup": point["flops_speedup"] if point else 1.0,
                "rel_nll_gap": point["rel_nll_gap"] if point else 0.0, "load_1min": rec.load_1min,
                "threads": rec.threads}

    rows = [row("dense", Method.DENSE, "main prefill", "dense", None)]
    for i, point in enumerate(points):
        config = method_label(point, speculator=False)
        rows.append(row(config, Method(point["method"]), "speculator", "speculator", point))
        rows.append(row(config, Method(point["method"]), "main prefill", f"main {i}", point))
    return rows


def ttft_totals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, config): total TTFT (sum of component medians) and measured speedup over dense."""
    tot: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        t = tot.setdefault((r["model"], r["config"]), {"model": r["model"], "config": r["config"],
                                                      "method": r["method"], "ttft_s": 0.0,
                                                      "flops_speedup": r["flops_speedup"],
                                                      "rel_nll_gap": r["rel_nll_gap"]})
        t["ttft_s"] += r["median_s"]
        t[f"{r['component'].replace(' ', '_')}_s"] = r["median_s"]
    out = list(tot.values())
    for t in out:
        dense = tot[(t["model"], "dense")]["ttft_s"]
        t["measured_speedup"] = dense / t["ttft_s"]
    return out


# ----------------------------------------------------------------------------- passkey retrieval
def passkey_prompt(tokenizer: Any, length: int, key: str, depth: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A passkey prompt of `length` tokens: eval-split prose with the key sentence at `depth`, ending in the question.

    Returns (input_ids [1, length], positions of the needle tokens [n]).
    """
    needle = tokenizer(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n", add_special_tokens=False)["input_ids"]
    question = tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    n_fill = length - len(needle) - len(question)
    if n_fill < 8:
        raise ValueError(f"passkey prompt of {length} tokens is too short for the needle and the question")
    filler = token_samples(tokenizer, "eval", n_fill, 1, sources=("prose",), seed=seed)["input_ids"][0].tolist()
    cut = max(1, int(depth * n_fill))
    ids = filler[:cut] + needle + filler[cut:] + question
    return torch.tensor([ids]), torch.arange(cut, cut + len(needle))


@torch.no_grad()
def passkey_records(model: nn.Module, tokenizer: Any, cfg: SpecPrefillRunConfig, seed: int = 0,
                    ff_plan: PlanFactory | None = None) -> list[dict[str, Any]]:
    """Passkey retrieval (exact digits in an 8-token greedy answer) for dense, SpecPrefill, FastForward and the combination."""
    name = getattr(model, "ffcore_name", type(model).__name__)
    method_cfg = SpecPrefillConfig(lookahead=cfg.lookahead)
    view = _speculators(model, cfg.prefix_fraction)[-1]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    s_max = max(cfg.sparsities) if cfg.sparsities else None
    for i in range(cfg.passkey_samples):
        key = str(int(torch.randint(10000, 99999, (1,), generator=gen)))
        depth = 0.2 + 0.6 * float(torch.rand(1, generator=gen))
        prompt, needle = passkey_prompt(tokenizer, cfg.passkey_len, key, depth, seed=seed + i)
        scores = score_tokens(view.model, prompt, method_cfg)
        runs: list[tuple[Method, float | None, float | None]] = [(Method.DENSE, None, None)]
        runs += [(Method.SPECPREFILL, p, None) for p in cfg.keep_rates if p <= 0.5]
        runs += [(Method.FASTFORWARD, None, s_max)] if s_max else []
        runs += [(Method.COMBINATION, cfg.combo_keep_rates[0], max(cfg.combo_sparsities))] \
            if cfg.combo_keep_rates and cfg.combo_sparsities else []
        for meth, p, s in runs:
            ctx = sparsify(model, _plan_factory(ff_plan, cfg.block_size)(s)) if s else contextlib.nullcontext()
            with ctx:
                if p is None:
                    logits, cache = prefill_at(model, prompt)
                    kept = torch.arange(prompt.shape[1])
                else:
                    logits, cache, kept = speculative_prefill(model, None, prompt, p, method_cfg, scores=scores)
            answer = tokenizer.decode(greedy_decode(model, logits[0], cache, 8, POSITIONS))
            rows.append({"model": name, "sample": i, "key": key, "depth": round(depth, 3), "method": meth.value,
                         "speculator": view.name if p is not None else None, "keep_rate": p, "sparsity": s,
                         "needle_kept": float(torch.isin(needle, kept).float().mean()),
                         "answer": answer, "correct": key in answer.replace(" ", "")})
    return rows


# ----------------------------------------------------------------------------- headline
def headline(
    summary: Sequence[dict[str, Any]], ttft_rows: Sequence[dict[str, Any]], passkey_rows: Sequence[dict[str, Any]],
    max_gap: float,
) -> list[dict[str, Any]]:
    """Per model: the best SpecPrefill / combination points, FastForward at its highest sparsity, TTFT and passkey."""
    out = []
    totals = ttft_totals(ttft_rows)
    for model in dict.fromkeys(r["model"] for r in summary):
        rec: dict[str, Any] = {"model": model}
        rows = [r for r in summary if r["model"] == model]
        rec["dense_nll"] = round(rows[0]["dense_nll"], 4)
        for key, meth in (("specprefill", Method.SPECPREFILL), ("combination", Method.COMBINATION)):
            b = best_point(summary, model, meth, max_gap)
            if b:
                rec[f"{key}_best"] = method_label(b)
                rec[f"{key}_flops_speedup"] = round(b["flops_speedup"], 3)
                rec[f"{key}_rel_nll_gap_%"] = round(100 * b["rel_nll_gap"], 2)
                rec[f"{key}_top1_agree"] = round(b["top1_agree"], 3)
        ff = [r for r in rows if r["method"] == Method.FASTFORWARD.value]
        if ff:
            f = max(ff, key=lambda r: r["sparsity"])
            rec["fastforward"] = method_label(f)
            rec["fastforward_flops_speedup"] = round(f["flops_speedup"], 3)
            rec["fastforward_rel_nll_gap_%"] = round(100 * f["rel_nll_gap"], 2)
        for name in ("same", "first"):
            at = [r for r in rows if r["method"] == Method.SPECPREFILL.value and str(r["speculator"]).startswith(name)
                  and r["keep_rate"] == 0.5]
            if at:
                rec[f"specprefill_p0.5_{name}_rel_nll_gap_%"] = round(100 * at[0]["rel_nll_gap"], 2)
        for t in totals:
            if t["model"] == model and t["method"] != Method.DENSE.value:
                tag = "combination" if Method(t["method"]).sparse_ffn else "specprefill"
                rec[f"{tag}_ttft_measured_speedup"] = round(t["measured_speedup"], 3)
        for meth in dict.fromkeys(r["method"] for r in passkey_rows if r["model"] == model):
            rs = [r for r in passkey_rows if r["model"] == model and r["method"] == meth]
            rec[f"passkey_{meth}"] = f"{sum(r['correct'] for r in rs)}/{len(rs)}"
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- the suite table
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
    def method(self) -> Method:
        """What the configuration runs (the last chunk not forced in is a method of its own)."""
        if self.keep_rate is None:
            return Method.DENSE if self.fastforward.dense else Method.FASTFORWARD
        if self.fastforward.dense:
            return Method.SPECPREFILL if self.keep_last else Method.SPECPREFILL_NO_LAST
        return Method.COMBINATION if self.keep_last else Method.COMBINATION_NO_LAST


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
        n = prefix_layers(model, prefix_fraction)
        view = layer_prefix_view(model, n)
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
    T = int(record["n_prompt_tokens"])
    kept = ranges_to_positions(record["kept_ranges"]) if "kept_ranges" in record else torch.arange(T)
    spec_spec = speculators.specs[spec.speculator] if spec.keep_rate is not None else None
    return specprefill_flops(main_spec, T, kept, spec_spec, lookahead if spec_spec is not None else 0,
                             plan=plan, window=window)


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
        results[spec.label] = evaluate(comps.model, comps.tokenizer, rows_ds, plan, cache, run,
                                       prefill_method(spec, speculators, config))
    summ = {r["config"]: r for r in summarize_scores(results, dense=DENSE_LABEL, tasks=tasks, n_boot=n_boot,
                                                     level=level, seed=seed)}
    out = []
    for spec in specs:
        recs = results[spec.label]
        fl = [record_flops(r, main_spec, spec, speculators, config.lookahead, plans[spec.label], config.window)
              for r in recs]
        s = summ[spec.label]
        out.append({
            "model": comps.key, "config": spec.label, "method": spec.method.value,
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


# ----------------------------------------------------------------------------- reading (Markdown from the numbers)
def _gap(lo: float, hi: float) -> str:
    return "resolved" if lo > 0 or hi < 0 else "not resolved"


def headline_reading(headline: Sequence[dict[str, Any]], suite_rows: Sequence[dict[str, Any]]) -> str:
    """Per model: the best SpecPrefill, FastForward and combined points (FLOPs, continuation NLL gap, measured TTFT),
    how the gaps add up, the suite's paired gaps and the passkey counts, all read from this run's tables."""
    out = []
    for h in headline:
        m = h["model"]
        lines = [f"**{m}**"]
        for key, name in (("specprefill", "SpecPrefill (best point)"), ("fastforward", "FastForward"),
                          ("combination", "the combination (best point)")):
            label = h.get(f"{key}_best") or h.get(key)
            if label is None:
                continue
            text = (f"- {name}, {label}: {h[f'{key}_flops_speedup']:.2f}x fewer FLOPs at "
                    f"{h[f'{key}_rel_nll_gap_%']:+.1f} % continuation NLL")
            if f"{key}_ttft_measured_speedup" in h:
                text += f"; measured TTFT {h[f'{key}_ttft_measured_speedup']:.2f}x"
            lines.append(text + ".")
        if all(f"{k}_rel_nll_gap_%" in h for k in ("combination", "fastforward")):
            p05 = h.get(f"specprefill_p0.5_{SPECULATORS[0]}_rel_nll_gap_%")
            if p05 is not None and "p=0.5" in str(h.get("combination_best", "")):
                total = p05 + h["fastforward_rel_nll_gap_%"]
                kind = "sub-additive" if h["combination_rel_nll_gap_%"] < total else "super-additive"
                lines.append(f"- The combination's NLL gap ({h['combination_rel_nll_gap_%']:+.1f} %) against the sum of "
                             f"its parts (SpecPrefill p=0.5 {p05:+.1f} %, FastForward {h['fastforward_rel_nll_gap_%']:+.1f} %): {kind}.")
        for r in suite_rows:
            if r["model"] == m and r["config"] != DENSE_LABEL:
                lo, hi = r["rel_gap_ci_low"], r["rel_gap_ci_high"]
                if any(math.isnan(x) for x in (r["rel_gap_pct"], lo, hi)):
                    lines.append(f"- Suite, {r['config']}: no relative gap (the dense average is 0).")
                    continue
                lines.append(f"- Suite, {r['config']}: {r['rel_gap_pct']:+.1f} % vs dense [{lo:+.1f}, {hi:+.1f}] "
                             f"({_gap(lo, hi)}; {r['flops_speedup']:.2f}x FLOPs).")
        pk = [f"{k.removeprefix('passkey_')} {v}" for k, v in h.items() if k.startswith("passkey_")]
        if pk:
            lines.append("- Passkey retrieved: " + ", ".join(pk) + ".")
        out.append("\n".join(lines))
    return "\n\n".join(out)
