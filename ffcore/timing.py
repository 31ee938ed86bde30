"""Measured per-component time of a real model's prefill (CPU by default).

One prefill = one forward pass over the prompt with `use_cache=False` and `logits_to_keep=1`
(the lm head runs for the last token only, as in the FLOP model of `ffcore.flops`). Forward
pre/post hooks on every layer's `self_attn` and `mlp` add up their wall time
(`time.perf_counter`; CUDA is synchronised when the model is on a GPU); "other" is the total
minus the two (embedding, norms, residual adds, lm head, hook overhead). Each context length
gets warm-up passes, then the median over repeats. Torch threads stay at the machine default.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ffcore.config import StrictConfig
from ffcore.models import decoder_layers
from ffcore.profiles import pick

TIMED_COMPONENTS = ("attention", "mlp", "other")


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


def _sync(model: nn.Module) -> None:
    """Wait for queued GPU work so wall-clock readings are honest (no-op on CPU)."""
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)


def component_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The attention and MLP module of every decoder layer."""
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers) if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp"))]
    if missing:
        raise TypeError(f"{type(model).__name__}: layers {missing} lack a `self_attn` or `mlp` module")
    return {"attention": [layer.self_attn for layer in layers], "mlp": [layer.mlp for layer in layers]}


@contextmanager
def component_timer(model: nn.Module) -> Iterator[dict[str, float]]:
    """Hooks that add each component's wall time (seconds) into the yielded dict while active."""
    totals = {name: 0.0 for name in component_modules(model)}
    starts: dict[int, float] = {}
    handles = []

    def pre(module: nn.Module, args: Any) -> None:
        _sync(model)
        starts[id(module)] = time.perf_counter()

    def post_for(name: str) -> Any:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            _sync(model)
            totals[name] += time.perf_counter() - starts.pop(id(module))
        return post

    for name, mods in component_modules(model).items():
        for m in mods:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post_for(name))]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


def timed_prefill(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Seconds spent in attention, MLP, other and in total by one prefill forward pass."""
    with torch.no_grad(), component_timer(model) as parts:
        _sync(model)
        t0 = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        _sync(model)
        total = time.perf_counter() - t0
    return {**parts, "other": total - sum(parts.values()), "total": total}


def median_prefill(model: nn.Module, input_ids: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Per-component medians over `repeats` timed passes after `warmup` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    runs = [timed_prefill(model, input_ids) for _ in range(max(1, repeats))]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def usable_lengths(model: nn.Module, lengths: Sequence[int]) -> list[int]:
    """The context lengths the model's position embeddings allow."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return [T for T in lengths if limit is None or T <= limit]


def prompt_ids(tokenizer: Any, length: int, seed: int = 0) -> torch.Tensor:
    """One real-text prompt (eval split, prose and code) of `length` tokens, shape [1, length]."""
    from ffcore.data import token_samples

    return token_samples(tokenizer, "eval", length, 1, seed=seed)["input_ids"]


def timing_records(
    model: nn.Module, tokenizer: Any, cfg: TimingConfig, name: str | None = None, seed: int = 0,
    prompt: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Flat records (model, T, component, median_s, share, repeats, load_1min) of a measured prefill breakdown.

    One real-text prompt of the longest usable length is drawn once (or `prompt`, shape
    [1, >= that length], is used); shorter prompts are its prefixes. `component` is
    attention, mlp, other or total; `share` is of the total; `load_1min` is the machine's
    1-minute load average after the measurement (other processes competing for the cores).
    """
    name = name or getattr(model, "ffcore_name", type(model).__name__)
    lengths = usable_lengths(model, cfg.context_lengths)
    if not lengths:
        return []
    ids = prompt if prompt is not None else prompt_ids(tokenizer, max(lengths), seed)
    if ids.shape[-1] < max(lengths):
        raise ValueError(f"prompt has {ids.shape[-1]} tokens, the longest context length is {max(lengths)}")
    ids = ids.to(next(model.parameters()).device)
    rows = []
    for T in lengths:
        warmup, repeats = cfg.plan(T)
        med = median_prefill(model, ids[:, :T], repeats, warmup)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows += [
            {"model": name, "T": T, "component": c, "median_s": med[c], "share": med[c] / med["total"],
             "repeats": repeats, "load_1min": load}
            for c in TIMED_COMPONENTS + ("total",)
        ]
    return rows


def measure_models(keys: Sequence[str], cfg: TimingConfig, seed: int = 0) -> list[dict[str, Any]]:
    """`timing_records` for several models, loading one model at a time."""
    import gc

    from ffcore.models import load_model

    rows: list[dict[str, Any]] = []
    prompts: dict[tuple[str, int, int], torch.Tensor] = {}  # models sharing a tokenizer share the prompt
    for key in keys:
        model, tok = load_model(key)
        lengths = usable_lengths(model, cfg.context_lengths)
        if lengths:
            tok_key = (type(tok).__name__ + str(getattr(tok, "name_or_path", "")), len(tok), max(lengths))
            if tok_key not in prompts:
                prompts[tok_key] = prompt_ids(tok, max(lengths), seed)
            rows += timing_records(model, tok, cfg, name=key, seed=seed, prompt=prompts[tok_key])
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


def achieved_rates(rows: Sequence[dict[str, Any]], specs: Sequence[Any]) -> list[dict[str, Any]]:
    """Achieved GFLOP/s of attention and MLP: the FLOP model's count over the measured time.

    Attention FLOPs are given both ways (visible pairs only / full T x T scores); see `ffcore.flops`.
    """
    from ffcore import flops

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
