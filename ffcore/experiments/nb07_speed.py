"""Notebook 07 (speed): FFN-module and end-to-end prefill speed, measured beside the FLOP model.

Three measurements (paper section 5, Figs. 6-7):

* `ffn_records`: FFN-module time, dense vs block-sparse, per model shape, context length and
  density (`ffcore.bench.bench_ffn`, interleaved in one process, median per-round ratio), with the
  FLOP-ideal FFN speedup (dense first/last blocks included) beside each.
* `flop_curve_records`: the compute-bound end-to-end prefill speedup of the real per-layer
  schedules from notebook 02, with predictor and compensator overheads (`ffcore.flops.plan_speedup`).
* `ttft_records`: measured CPU time-to-first-token, dense vs a FastForward plan, for the real
  models (`ffcore.bench.bench_ttft`), each beside its FLOP-model speedup.

Measured times depend on the machine and on what else runs on it: every record carries the
thread count, the 1-minute load average, all samples and the interquartile range of the ratio.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ffcore import flops
from ffcore.bench import FFNBenchConfig, bench_ffn, bench_ttft
from ffcore.config import StrictConfig
from ffcore.engine import SparsityPlan
from ffcore.experiments.profiles import pick


@dataclasses.dataclass
class SpeedSettings(StrictConfig):
    """Sizes of notebook 07's measurements for one profile."""

    ffn_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    ffn_densities: tuple[float, ...] = (0.5, 0.6, 0.7)
    ffn_repeats: int = 7
    ttft_tokens: tuple[int, ...] = (1024, 2048, 4096)
    ttft_sparsities: tuple[float, ...] = (0.5,)
    ttft_extra_sparsities_at: int = 1024  # also measure 30 % and 40 % sparsity at this length
    ttft_repeats: int = 3
    baseline_at: int = 2048  # the random-experts plan (sparse compute without selection) is timed at this length
    curve_max_tokens: int = 32768


def settings(profile: str) -> SpeedSettings:
    """Notebook 07's sizes per profile (smoke: tiny models in seconds; full: ~15 min on 2 idle cores, mostly 4K TTFT)."""
    return SpeedSettings(
        ffn_tokens=pick(profile, (256, 512), (1024, 2048), (1024, 2048, 4096, 8192)),
        ffn_repeats=pick(profile, 2, 5, 7),
        ttft_tokens=pick(profile, (256, 512), (1024, 2048), (1024, 2048, 4096)),
        ttft_extra_sparsities_at=pick(profile, 512, 1024, 1024),
        ttft_repeats=pick(profile, 2, 3, 3),
        baseline_at=pick(profile, 512, 2048, 2048),
        curve_max_tokens=pick(profile, 4096, 32768, 32768),
    )


def ffn_records(
    mlps: dict[str, nn.Module], cfg: SpeedSettings, seed: int = 0, progress: bool = True,
) -> list[dict[str, Any]]:
    """Dense vs sparse FFN-module time for each named MLP at every (tokens, density)."""
    bcfg = FFNBenchConfig(tokens=cfg.ffn_tokens, densities=cfg.ffn_densities, repeats=cfg.ffn_repeats, seed=seed)
    rows: list[dict[str, Any]] = []
    for name, mlp in tqdm(mlps.items(), desc="FFN bench", disable=not progress):
        rows += bench_ffn(mlp, bcfg, label=name)
    return rows


def flop_curve_records(
    specs: Sequence[flops.ModelSpec], schedules: dict[str, dict[float, list[float]]], Ts: Sequence[int],
) -> list[dict[str, Any]]:
    """Compute-bound prefill speedup over T per model and sparsity, for layer-wise and uniform plans.

    `schedules[model][sparsity]` is the per-layer density list (from notebook 02); models without
    one get only the uniform plan. Predictor and compensator overheads are included; a second
    record per point without them shows their cost.
    """
    rows = []
    for spec in specs:
        for sparsity in sorted({s for m in schedules.values() for s in m} | set(flops.PAPER_SPARSITIES)):
            plans = {"uniform": SparsityPlan(1.0 - sparsity)}
            if sparsity in schedules.get(spec.name, {}):
                plans["layer-wise"] = SparsityPlan(schedules[spec.name][sparsity])
            for kind, plan in plans.items():
                for T in Ts:
                    r = flops.plan_speedup(spec, int(T), plan, overheads=True)
                    bare = flops.plan_speedup(spec, int(T), plan, overheads=False)
                    rows.append({"model": spec.name, "sparsity": sparsity, "schedule": kind, "T": int(T),
                                 "speedup": r["speedup"], "speedup_no_overheads": bare["speedup"],
                                 "ffn_speedup": r["ffn_speedup"],
                                 "overhead_share": (r["predictor_flops"] + r["compensator_flops"]) / r["sparse_flops"]})
    return rows


def ttft_records(
    model: nn.Module, name: str, prompt: torch.Tensor, plans: dict[str, Callable[[float], SparsityPlan]],
    grid: Sequence[tuple[int, float]], repeats: int, progress: bool = True,
) -> list[dict[str, Any]]:
    """Measured TTFT dense vs each plan at every (T, sparsity) of `grid`, beside the FLOP-model speedup.

    `prompt` [1, >= max T] is real text; shorter prompts are its prefixes. `plans[label](sparsity)`
    builds the plan. At each length the dense prefill and every plan's are timed round-robin
    (`ffcore.bench.bench_ttft`): one dense baseline shared by all of them, the speedup is the median of
    the per-round ratios, with its interquartile range and the CPU-time ratio beside it.
    """
    spec = flops.spec_from_model(model)
    rows = []
    lengths = list(dict.fromkeys(T for T, _ in grid))
    for T in tqdm(lengths, desc=f"TTFT {name}", disable=not progress):
        if prompt.shape[1] < T:
            raise ValueError(f"prompt has {prompt.shape[1]} tokens, the grid needs {T}")
        at = {(label, s): plans[label](s) for t, s in grid if t == T for label in plans}
        keys = {f"{label} @ {s:g}": (label, s) for label, s in at}  # timing name -> (plan label, sparsity)
        res = bench_ttft(model, prompt[:, :T], {k: at[v] for k, v in keys.items()}, repeats=repeats)
        rec = res["record"]
        for k, (label, sparsity) in keys.items():
            plan = at[(label, sparsity)]
            model_flops = flops.plan_speedup(spec, T, plan)
            r = res[k]
            rows.append({
                "model": name, "plan": label, "T": T, "sparsity": sparsity, "dense_s": rec.median("dense"),
                "sparse_s": rec.median(k), **r, "flop_speedup": model_flops["speedup"],
                "fraction_of_flop_speedup": r["speedup"] / model_flops["speedup"],
                "dense_all_s": [round(t, 5) for t in rec.wall_s["dense"]],
                "sparse_all_s": [round(t, 5) for t in rec.wall_s[k]], **rec.conditions(),
            })
        gc.collect()
    return rows


def gpu_results(results_dir: Path) -> list[dict[str, Any]]:
    """Rows of committed GPU benchmark files (`gpu_ffn_bench*.json`), tagged with their device; [] if none."""
    rows = []
    for path in sorted(Path(results_dir).glob("gpu_ffn_bench*.json")):
        doc = json.loads(path.read_text())
        device = doc.get("device") or doc.get("provenance", {}).get("device", "unknown GPU")
        rows += [{**r, "device": device, "file": path.name} for r in doc.get("rows", [])]
    return rows


def summary(ffn: Sequence[dict[str, Any]], ttft: Sequence[dict[str, Any]], T: int = 2048,
            density: float = 0.5) -> list[dict[str, Any]]:
    """The headline numbers at one (T, density): FFN fraction of ideal and TTFT speedup per model."""
    out = []
    for r in ffn:
        if r["T"] == T and abs(r["density"] - density) < 1e-9:
            out.append({"what": "FFN module", "model": r["model"], "T": T, "sparsity": round(1 - density, 2),
                        "speedup": r["speedup"], "ideal": r["ideal_speedup"], "fraction": r["fraction_of_ideal"]})
    for r in ttft:
        if r["T"] == T and abs(r["sparsity"] - (1 - density)) < 1e-9:
            out.append({"what": f"TTFT ({r['plan']})", "model": r["model"], "T": T, "sparsity": r["sparsity"],
                        "speedup": r["speedup"], "ideal": r["flop_speedup"], "fraction": r["fraction_of_flop_speedup"]})
    return out
