"""Notebook 01 (where prefill compute goes): the timing knobs per profile, the measured breakdown of
the profile's models, and the analyses that put it beside the FLOP model (achieved GFLOP/s, the
measured FFN/attention crossover).
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any, Sequence

import torch

from ffcore import flops
from ffcore.config import StrictConfig
from ffcore.experiments.profiles import pick
from ffcore.models import load_model
from ffcore.timing import breakdown_records, prompt_ids, usable_lengths


@dataclasses.dataclass
class TimingConfig(StrictConfig):
    """Per-profile knobs of the timing breakdown."""

    context_lengths: list[int]
    repeats: int  # timed passes per context length (median reported)
    warmup: int = 1  # untimed passes before the timed ones
    long_from: int | None = None  # from this length on use `long_repeats` (long prefills are slow on CPU)
    long_repeats: int = 1
    long_warmup: int = 0

    def plan(self, T: int) -> tuple[int, int]:
        """(warm-up passes, timed repeats) for one context length."""
        if self.long_from is not None and T >= self.long_from:
            return self.long_warmup, self.long_repeats
        return self.warmup, self.repeats


def timing_config(profile: str) -> TimingConfig:
    """The timing knobs of a profile (smoke: tiny models in seconds; full: 512..8192 tokens)."""
    return pick(
        profile,
        smoke=TimingConfig(context_lengths=[64, 128], repeats=1, warmup=1),
        quick=TimingConfig(context_lengths=[512, 1024, 2048], repeats=2, warmup=1),
        # Long prefills dominate the run time (gemma3-270m's SDPA gets a sliding-window mask and
        # computes full T x T scores), so lengths from 4K on get a single timed pass.
        full=TimingConfig(
            context_lengths=[512, 1024, 2048, 4096, 8192], repeats=2, warmup=1,
            long_from=4096, long_repeats=1, long_warmup=0,
        ),
    )


def timing_records(model: Any, cfg: TimingConfig, prompt: torch.Tensor, name: str | None = None) -> list[dict[str, Any]]:
    """The measured breakdown of one model at every usable length of `cfg` (warm-up and repeats per length)."""
    rows: list[dict[str, Any]] = []
    for T in usable_lengths(model, cfg.context_lengths):
        warmup, repeats = cfg.plan(T)
        rows += breakdown_records(model, prompt, [T], repeats, warmup, name)
    return rows


def measure_models(keys: Sequence[str], cfg: TimingConfig, seed: int = 0) -> list[dict[str, Any]]:
    """`timing_records` for several models, loading one model at a time (models sharing a tokenizer share the prompt)."""
    rows: list[dict[str, Any]] = []
    prompts: dict[tuple[str, int, int], torch.Tensor] = {}
    for key in keys:
        model, tok = load_model(key)
        lengths = usable_lengths(model, cfg.context_lengths)
        if lengths:
            tok_key = (type(tok).__name__ + str(getattr(tok, "name_or_path", "")), len(tok), max(lengths))
            if tok_key not in prompts:
                prompts[tok_key] = prompt_ids(tok, max(lengths), seed)
            rows += timing_records(model, cfg, prompts[tok_key], name=key)
        del model
        gc.collect()
    return rows


def measured_crossover(rows: Sequence[dict[str, Any]]) -> dict[str, int | None]:
    """Per model, the smallest measured T at which attention took longer than the MLP (None if never)."""
    times = {(r["model"], r["T"], r["component"]): r["median_s"] for r in rows}
    out: dict[str, int | None] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        Ts = sorted({T for (m, T, _) in times if m == model})
        out[model] = next((T for T in Ts if times[model, T, "attention"] > times[model, T, "mlp"]), None)
    return out


def achieved_rates(rows: Sequence[dict[str, Any]], specs: Sequence[flops.ModelSpec]) -> list[dict[str, Any]]:
    """Achieved GFLOP/s of attention and MLP: the FLOP model's count over the measured time.

    Attention FLOPs are given both ways (visible pairs only / full T x T scores); see `ffcore.flops`.
    """
    by_name = {s.name: s for s in specs}
    out = []
    for r in rows:
        if r["component"] not in ("attention", "mlp") or r["model"] not in by_name:
            continue
        spec = by_name[r["model"]]
        counts = {p: flops.group_flops(flops.prefill_flops(spec, r["T"], p)) for p in flops.PAIR_MODES}
        rec = {"model": r["model"], "T": r["T"], "component": r["component"], "median_s": r["median_s"]}
        for p, g in counts.items():
            n = g["ffn"] if r["component"] == "mlp" else g["attention_core"] + g["attention_proj"]
            rec[f"gflops_{p}"] = n / r["median_s"] / 1e9
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- readings (Markdown from the numbers)
def _tok(T: int | None) -> str:
    return "-" if T is None else (f"{T / 1024:.0f}K" if T >= 1024 and T % 1024 == 0 else f"{T:,}")


def crossover_reading(crossovers: Sequence[dict[str, Any]]) -> str:
    """What the crossover table says against the paper's ~16K (1B) / ~28K (8B), per config."""
    lines = []
    for r in crossovers:
        quoted = f"; the paper quotes ~{r['paper_quoted'] / 1000:.0f}K" if r.get("paper_quoted") else ""
        lines.append(
            f"- **{r['model']}** (d={r['d']}, d_ffn={r['f']}): attention's core passes the gated FFN at "
            f"T = {r['attn_core_vs_gated_ffn']:,} ({r['attn_core_vs_gated_ffn'] / r['f']:.2f} d_ffn), a 2-matmul FFN at "
            f"{r['attn_core_vs_2matmul_ffn']:,} ({r['attn_core_vs_2matmul_ffn'] / r['f']:.2f} d_ffn){quoted}.")
    return "**This run's crossovers.**\n" + "\n".join(lines)


def speedup_reading(peaks: Sequence[dict[str, Any]], paper: float = 1.45) -> str:
    """Peak compute-bound speedups per config at the highest sparsity, against the paper's "up to 1.45x"."""
    sel = [r for r in peaks if r["pairs"] == "causal" and r["overheads"]]
    if not sel:
        return ""
    lo, hi = min(sel, key=lambda r: r["peak_speedup"]), max(sel, key=lambda r: r["peak_speedup"])
    sp = sel[0]["sparsity"]
    lines = [f"- **{r['model']}**: {r['peak_speedup']:.2f}x at T = {_tok(r['T_at_peak'])}" for r in sel]
    verdict = ("brackets" if lo["peak_speedup"] <= paper <= hi["peak_speedup"] else
               "lies below" if paper > hi["peak_speedup"] else "lies above")
    return (f"**This run's peaks** at {sp:.0%} sparsity (visible pairs, predictor and compensator counted):\n"
            + "\n".join(lines) + f"\n\nThe range {lo['peak_speedup']:.2f}-{hi['peak_speedup']:.2f}x {verdict} the "
            f"paper's \"up to {paper}x\".")


def timing_reading(rows: Sequence[dict[str, Any]], measured_cross: dict[str, int | None],
                   crossovers: Sequence[dict[str, Any]]) -> str:
    """Measured MLP and attention shares of CPU prefill time at the shortest and longest timed length, per model."""
    flop_cross = {r["model"]: r["attn_core_vs_gated_ffn"] for r in crossovers}
    lines = []
    for m in dict.fromkeys(r["model"] for r in rows):
        share = {(r["T"], r["component"]): r["share"] for r in rows if r["model"] == m}
        Ts = sorted({T for T, _ in share})
        ends = [T for T in (Ts[0], Ts[-1]) if (T, "mlp") in share and (T, "attention") in share]
        parts = [f"at {_tok(T)} the MLP takes {share[(T, 'mlp')]:.0%} of the time and attention "
                 f"{share[(T, 'attention')]:.0%}" for T in dict.fromkeys(ends)]
        cross = measured_cross.get(m)
        where = (f"attention's time passes the MLP's from {_tok(cross)} tokens" if cross is not None
                 else f"attention stays below the MLP up to {_tok(Ts[-1])}")
        lines.append(f"- **{m}**: {'; '.join(parts)}; {where} (FLOP crossover: {_tok(flop_cross.get(m))}).")
    return ("**This run's CPU breakdown.**\n" + "\n".join(lines) + "\n\nA measured crossover far below the FLOP "
            "crossover means attention runs at a lower FLOP rate than the FFN on this CPU (next table), which "
            "shrinks the share of time FFN sparsity can remove.")
