"""Notebook 02 (attention sinks and the layer-wise schedule): the calibration knobs per profile, and
the schedule files it writes (one JSON per model under the profile's results) that notebooks 05, 07
and 08 read through `load_schedule`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import paired_difference
from ffcore.calibration import CalibrationResult, calibrate, check_seq_len, sink_visible_queries
from ffcore.config import StrictConfig
from ffcore.engine import SparsityPlan
from ffcore.engine.layout import BLOCK_SIZE
from ffcore.experiments.profiles import pick
from ffcore.models import load_model, model_fingerprint
from ffcore.results import out_dirs, read_json, write_json
from ffcore.schedule import (DEFAULT_MIN_DENSITY, algorithm1, check_budget, layerwise_schedule, uniform_schedule)


@dataclasses.dataclass
class CalibrationConfig(StrictConfig):
    """Per-profile knobs of the attention-sink calibration (notebook 02)."""

    n_samples: int  # calibration samples per model
    seq_len: int  # tokens per sample (>= 2 blocks)
    block_size: int = BLOCK_SIZE  # tokens per key block (the paper's B = 128)
    chunk_size: int = 128  # queries per chunk: memory ~ chunk x seq_len x heads x 4 bytes
    sources: tuple[str, ...] = ("prose", "code")  # corpora the calibration split is drawn from
    budgets: tuple[float, ...] = (0.7, 0.6, 0.5)  # overall FFN densities to build schedules for
    min_density: float = 0.05  # floor of any layer's density (see ffcore.schedule)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.chunk_size < 1 or self.n_samples < 1:
            raise ValueError(f"block_size, chunk_size and n_samples must be >= 1: {self}")
        check_seq_len(self.seq_len, self.block_size)
        self.sources = tuple(self.sources)
        self.budgets = tuple(float(b) for b in self.budgets)


def calibration_config(profile: str, **overrides: Any) -> CalibrationConfig:
    """The calibration knobs of a run profile (smoke / quick / full), optionally overridden."""
    cfg = pick(
        profile,
        smoke=CalibrationConfig(n_samples=2, seq_len=256, chunk_size=96),
        quick=CalibrationConfig(n_samples=4, seq_len=2048),
        # full: sized so that both real models finish in ~5 min on a 2-core CPU (see notebook 02)
        full=CalibrationConfig(n_samples=4, seq_len=4096),
    )
    return cfg.replace(**overrides) if overrides else cfg



def calibrate_model(key: str, cfg: CalibrationConfig, seed: int = 0, progress: bool = True) -> CalibrationResult:
    """Load a model by key and calibrate it with a profile's `CalibrationConfig`."""
    model, tok = load_model(key)
    return calibrate(
        model, tok, cfg.n_samples, cfg.seq_len, block_size=cfg.block_size, chunk_size=cfg.chunk_size,
        sources=cfg.sources, seed=seed, progress=progress,
    )


def schedule_name(model_key: str) -> str:
    """Result name of a model's schedule file: `02_schedule_<key>` (a path key is reduced to a safe name)."""
    key = Path(str(model_key).rstrip("/")).name if "/" in str(model_key) else str(model_key)
    return "02_schedule_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


IMPORTANCE_KEYS = {"window": "s_i_window", "literal": "s_i"}  # which stored s_i each importance uses
DEFAULT_IMPORTANCE = "window"  # our schedules use the window-aware importance; "literal" is the paper's eq. 23


def save_schedules(
    calib: "CalibrationResult", profile: str, budgets: Sequence[float] = (0.7, 0.6, 0.5),
    min_density: float = DEFAULT_MIN_DENSITY, order: str = "sorted",
) -> Path:
    """Write one model's schedules for all `budgets`, by both importances (with the calibration's provenance), as JSON.

    `densities` is the default (window-aware) schedule; `densities_literal` the one from the paper's s_i.
    """
    info = calib.calibration_info()
    plans = []
    for b in budgets:
        b = check_budget(b)
        s, lit = info["s_i_window"], info["s_i"]
        plans.append({
            "budget": b, "sparsity": round(1.0 - b, 6),
            "densities": layerwise_schedule(s, b, min_density=min_density, order=order),
            "densities_literal": layerwise_schedule(lit, b, min_density=min_density, order=order),
            "literal_layer_order": algorithm1(lit, b, order="layer"),  # the paper's walk on its s_i, no floor
            "capped_layers": [i for i, x in enumerate(algorithm1(s, b)) if x >= 1.0 - 1e-12],
            "uniform": uniform_schedule(len(s), b),
        })
    payload = {
        "model": info["model"], "fingerprint": info["fingerprint"], "calibration": info, "importance": DEFAULT_IMPORTANCE,
        "min_density": min_density, "order": order, "schedules": plans,
    }
    return write_json(schedule_name(info["model"]), payload, profile,
                      model=info["model"], fingerprint=info["fingerprint"])


def load_schedule(
    model: nn.Module | str, budget: float, profile: str, fingerprint: str | None = None,
    importance: str = DEFAULT_IMPORTANCE,
) -> list[float]:
    """Per-layer densities for `model` at `budget`, refusing a file calibrated on another model.

    `model` is a loaded model (its key is `model.ffcore_name`, its fingerprint is computed), or a
    key string together with `fingerprint`. `importance` picks the window-aware (default) or the
    paper's literal s_i. A budget not stored in the file is recomputed from the stored s_i with the
    stored floor and order; budget 1.0 is all-dense.
    """
    if importance not in IMPORTANCE_KEYS:
        raise ValueError(f"unknown importance {importance!r}; choose one of {sorted(IMPORTANCE_KEYS)}")
    budget = check_budget(budget)
    if isinstance(model, nn.Module):
        key = getattr(model, "ffcore_name", None)
        if key is None:
            raise ValueError("model has no ffcore_name: load it with ffcore.models.load_model, or pass its key")
        fingerprint = model_fingerprint(model)
    else:
        key = str(model)
        if fingerprint is None:
            raise ValueError(
                f"load_schedule({key!r}, ...) with a key needs fingerprint=... (or pass the loaded model) "
                "so a schedule calibrated on another model is refused"
            )
    doc = read_json(schedule_name(key), profile)
    if doc.get("fingerprint") != fingerprint:
        raise ValueError(
            f"schedule file {out_dirs(profile).results / (schedule_name(key) + '.json')} was calibrated on "
            f"model {doc.get('model')!r} with fingerprint {doc.get('fingerprint')}, but this model "
            f"({key!r}) has fingerprint {fingerprint}: re-run notebook 02 for this model"
        )
    field = "densities" if importance == doc.get("importance", "literal") else f"densities_{importance}"
    for plan in doc["schedules"]:
        if abs(plan["budget"] - budget) < 1e-9 and field in plan:
            return list(plan[field])
    s = doc["calibration"].get(IMPORTANCE_KEYS[importance])
    if s is None:
        raise ValueError(f"{schedule_name(key)} has no {importance!r} importance: re-run notebook 02")
    if budget >= 1.0:
        return [1.0] * len(s)
    return layerwise_schedule(s, budget, min_density=doc["min_density"], order=doc["order"])


# ------------------------------------------------------------------------------ which schedule is closer to dense
SCHEDULES = ("uniform", "literal", "window")  # the plans compared: uniform, Algorithm 1 on the paper's s_i, on ours


@dataclasses.dataclass
class ScheduleKLSettings(StrictConfig):
    """How the schedules are judged end to end: continuation KL to the dense model, oracle experts
    (so the schedule is the only difference), on windows of every corpus family."""

    windows_per_family: int  # continuation windows per family (eval split)
    ctx: int  # context tokens per window (beyond a 512-token window, so the confound matters)
    cont: int  # continuation tokens scored
    budgets: tuple[float, ...] = (0.5,)  # overall densities compared
    policy: str = "oracle"  # expert selection in every plan (the schedule alone varies)

    def __post_init__(self) -> None:
        if min(self.windows_per_family, self.ctx, self.cont) < 1:
            raise ValueError(f"windows_per_family, ctx and cont must be >= 1: {self}")
        self.budgets = tuple(check_budget(b) for b in self.budgets)


def schedule_kl_settings(profile: str, **overrides: Any) -> ScheduleKLSettings:
    """The schedule-KL knobs of a run profile."""
    cfg = pick(profile,
               smoke=ScheduleKLSettings(windows_per_family=1, ctx=256, cont=8),
               quick=ScheduleKLSettings(windows_per_family=1, ctx=1024, cont=32),
               full=ScheduleKLSettings(windows_per_family=3, ctx=1024, cont=64))
    return cfg.replace(**overrides) if overrides else cfg


def schedule_plans(calib: CalibrationResult, budget: float, policy: str = "oracle",
                   min_density: float = DEFAULT_MIN_DENSITY, order: str = "sorted") -> dict[str, SparsityPlan]:
    """The three schedules at one budget as plans with the same expert policy: uniform, literal s_i, window-aware s_i."""
    info = calib.calibration_info()
    budget = check_budget(budget)
    return {
        "uniform": SparsityPlan(densities=budget, policy=policy),
        "literal": SparsityPlan(densities=tuple(layerwise_schedule(info["s_i"], budget, min_density=min_density,
                                                                   order=order)), policy=policy),
        "window": SparsityPlan(densities=tuple(layerwise_schedule(info["s_i_window"], budget,
                                                                  min_density=min_density, order=order)),
                               policy=policy),
    }


def schedule_kl_runs(
    model: nn.Module, tokenizer: Any, calib: CalibrationResult, windows: Sequence[dict], cfg: ScheduleKLSettings,
    cache: Path | None = None, progress: bool = True, min_density: float = DEFAULT_MIN_DENSITY,
) -> dict[str, list[dict[str, Any]]]:
    """Continuation records of the dense model and of every schedule at every budget (`"<schedule> @ <budget>"`)."""
    run = RunConfig(progress=progress)
    out = {"dense": evaluate(model, tokenizer, windows, None, cache, run)}
    for b in cfg.budgets:
        for name, plan in schedule_plans(calib, b, cfg.policy, min_density).items():
            out[f"{name} @ {b:g}"] = evaluate(model, tokenizer, windows, plan, cache, run)
    return out


def schedule_kl_table(runs: dict[str, Sequence[dict]], model: str, n_boot: int = 2000, seed: int = 0
                      ) -> list[dict[str, Any]]:
    """Per budget: each schedule's mean KL and NLL change to dense, and the paired KL difference (95 % bootstrap
    CI) of each layer-wise schedule against uniform and of the window-aware against the literal one."""
    budgets = sorted({float(k.split(" @ ")[1]) for k in runs if " @ " in k}, reverse=True)
    rows = []
    for b in budgets:
        recs = {name: runs[f"{name} @ {b:g}"] for name in SCHEDULES if f"{name} @ {b:g}" in runs}
        for name, rs in recs.items():
            kl = paired_difference(recs["uniform"], rs, "kl", n_boot=n_boot, seed=seed)
            row = {"model": model, "budget": b, "schedule": name, "n": kl["n"], "kl": round(kl["other_mean"], 5),
                   "nll_increase": round(float(np.mean([r["metrics"]["nll"] - r["metrics"]["dense_nll"]
                                                        for r in rs if r["task"] == "continuation"])), 5)}
            if name != "uniform":
                row.update(kl_minus_uniform=round(kl["diff"], 5), kl_minus_uniform_ci=[round(x, 5) for x in kl["ci"]])
            if name == "window" and "literal" in recs:
                d = paired_difference(recs["literal"], rs, "kl", n_boot=n_boot, seed=seed)
                row.update(kl_minus_literal=round(d["diff"], 5), kl_minus_literal_ci=[round(x, 5) for x in d["ci"]])
            rows.append(row)
    return rows


def _resolved(ci: Sequence[float]) -> bool:
    return ci[0] > 0 or ci[1] < 0


def _diff(d: float, ci: Sequence[float]) -> str:
    return f"{d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def schedule_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown reading of `schedule_kl_table`'s rows: which schedule is closer to dense, resolved or not."""
    lines = []
    for (model, b) in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        by = {r["schedule"]: r for r in rows if r["model"] == model and r["budget"] == b}
        parts = [f"**{model}, density {b:g}** (n = {by['uniform']['n']} windows): KL to dense uniform "
                 f"{by['uniform']['kl']:.4f}"]
        for name, label in (("literal", "literal s_i"), ("window", "window-aware s_i")):
            if name in by:
                r = by[name]
                ci = r["kl_minus_uniform_ci"]
                verdict = (("below" if ci[1] < 0 else "above") + " uniform") if _resolved(ci) else "not resolved vs uniform"
                parts.append(f"{label} {r['kl']:.4f} ({_diff(r['kl_minus_uniform'], ci)}, {verdict})")
        if "window" in by and "kl_minus_literal" in by["window"]:
            r = by["window"]
            ci = r["kl_minus_literal_ci"]
            verdict = ("lower" if ci[1] < 0 else "higher") if _resolved(ci) else "not resolved"
            parts.append(f"window-aware minus literal {_diff(r['kl_minus_literal'], ci)}: {verdict}")
        lines.append("- " + "; ".join(parts) + ".")
    return "\n".join(lines)


def importance_reading(results: dict[str, CalibrationResult]) -> str:
    """A markdown reading of the two importances per model: the ranges on windowed vs full-attention layers."""
    lines = []
    for key, r in results.items():
        lit, win = r.scores("literal"), r.scores("window")
        kinds = {"full": [i for i, w in enumerate(r.layer_windows) if w is None],
                 "windowed": [i for i, w in enumerate(r.layer_windows) if w is not None]}
        if not kinds["windowed"]:
            lines.append(f"- **{key}**: every layer attends to the whole prompt, so both importances are the same "
                         f"(s_i {min(lit):.0f} to {max(lit):.0f} of {r.seq_len}) and so are its schedules.")
            continue

        def rng(v: list[float], idx: list[int]) -> str:
            return f"{min(v[i] for i in idx):.0f} to {max(v[i] for i in idx):.0f}"

        w = max(x for x in r.layer_windows if x)
        n_vis = sink_visible_queries(r.seq_len, r.block_size, w)
        lines.append(
            f"- **{key}**: in its {len(kinds['windowed'])} windowed layers only {n_vis} of {r.seq_len} queries can see "
            f"block 1. Literal s_i: windowed layers {rng(lit, kinds['windowed'])}, full-attention layers "
            f"{rng(lit, kinds['full'])} (of {r.seq_len}), so Algorithm 1 would favour the windowed layers by "
            f"geometry. Window-aware: windowed {rng(win, kinds['windowed'])}, full {rng(win, kinds['full'])} "
            "(unchanged on full-attention layers).")
    return "\n".join(lines)
