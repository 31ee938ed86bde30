"""Timing: the one helper every measurement uses, and the per-component breakdown of a real prefill.

`interleaved(fns, repeats, warmup)` runs several callables round-robin (`A B C A B C ...`, the order
rotated every round so no callable always runs first), `repeats` timed rounds after `warmup` untimed
ones, and records every call's wall time (`time.perf_counter`) and this process's CPU time
(`time.process_time`, all threads): when another job steals the cores, wall time grows but CPU time
does not, so the two ratios side by side show whether a measurement was disturbed. Its record
(`TimingRecord`) carries the thread count and the 1-minute load average before and after, all
samples, and per-callable medians and interquartile ranges; `ratio(record, a, b)` gives the per-round
ratios a/b (a speedup when `a` is the dense baseline) with their median and interquartile range.
Every benchmark (`ffcore.bench`, notebooks 01, 07 and 08) uses it.

The breakdown: one prefill = one forward pass with `use_cache=False` and `logits_to_keep=1` (the lm
head runs for the last token only, as in the FLOP model of `ffcore.flops`). Forward pre/post hooks on
every layer's `self_attn` and `mlp` add up their wall time (CUDA is synchronised when the model is on
a GPU); "other" is the total minus the two (embedding, norms, residual adds, lm head, hook overhead).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ffcore.data import token_samples
from ffcore.models import decoder_layers

TIMED_COMPONENTS = ("attention", "mlp", "other")


def load_1min() -> float:
    """The machine's 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of values (linear interpolation; one value: itself)."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no values")
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


@dataclasses.dataclass
class TimingRecord:
    """Every sample of an interleaved measurement and the conditions it ran under."""

    wall_s: dict[str, list[float]]  # name -> wall seconds of each timed call, in round order
    cpu_s: dict[str, list[float]]  # name -> process CPU seconds (all threads) of each timed call
    repeats: int
    warmup: int
    threads: int
    load_1min: float  # after the measurement
    load_1min_before: float
    results: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # what each timed call returned

    def median(self, name: str) -> float:
        """Median wall seconds of one callable."""
        return quartiles(self.wall_s[name])[1]

    def summary(self, name: str, unit: float = 1.0, suffix: str = "_s") -> dict[str, Any]:
        """Flat fields `<name>_s`, `<name>_q25_s`, `<name>_q75_s`, `<name>_all_s` (times unit: 1e3 with suffix '_ms')."""
        q25, med, q75 = quartiles(self.wall_s[name])
        return {f"{name}{suffix}": med * unit, f"{name}_q25{suffix}": q25 * unit, f"{name}_q75{suffix}": q75 * unit,
                f"{name}_all{suffix}": [round(t * unit, 6) for t in self.wall_s[name]]}

    def conditions(self) -> dict[str, Any]:
        """The fields every timing record carries: repeats, warm-up, threads, load before and after."""
        return {"repeats": self.repeats, "warmup": self.warmup, "threads": self.threads,
                "load_1min": self.load_1min, "load_1min_before": self.load_1min_before}


def interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
    keep_results: bool = False,
) -> TimingRecord:
    """Time callables round-robin: `warmup` untimed rounds, then `repeats` timed ones (order rotated per round)."""
    if not fns:
        raise ValueError("nothing to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    load0 = load_1min()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            out = fns[name]()
            sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if keep_results:
                results[name].append(out)
    return TimingRecord(wall, cpu, repeats, warmup, torch.get_num_threads(), load_1min(), load0,
                        results if keep_results else {})


def ratio(rec: TimingRecord, a: str, b: str, prefix: str = "speedup") -> dict[str, Any]:
    """Per-round ratios a / b of wall time (and of CPU time): median, quartiles, IQR, all; `prefix` names the fields."""
    wall = [x / y for x, y in zip(rec.wall_s[a], rec.wall_s[b])]
    cpu = [x / y if y > 0 else float("nan") for x, y in zip(rec.cpu_s[a], rec.cpu_s[b])]
    q25, med, q75 = quartiles(wall)
    return {prefix: med, f"{prefix}_q25": q25, f"{prefix}_q75": q75, f"{prefix}_iqr": q75 - q25,
            f"{prefix}_all": [round(x, 5) for x in wall], f"cpu_{prefix}": quartiles(cpu)[1]}


# ----------------------------------------------------------------------------- per-component breakdown
def model_sync(model: nn.Module) -> Callable[[], None]:
    """A function that waits for the model's queued GPU work (a no-op on CPU), for honest wall-clock readings."""
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        return lambda: torch.cuda.synchronize(p.device)
    return lambda: None


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
    sync = model_sync(model)

    def pre(module: nn.Module, args: Any) -> None:
        sync()
        starts[id(module)] = time.perf_counter()

    def post_for(name: str) -> Any:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            sync()
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
    sync = model_sync(model)
    with torch.no_grad(), component_timer(model) as parts:
        sync()
        t0 = time.perf_counter()
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        sync()
        total = time.perf_counter() - t0
    return {**parts, "other": total - sum(parts.values()), "total": total}


def usable_lengths(model: nn.Module, lengths: Sequence[int]) -> list[int]:
    """The context lengths the model's position embeddings allow."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return [T for T in lengths if limit is None or T <= limit]


def prompt_ids(tokenizer: Any, length: int, seed: int = 0) -> torch.Tensor:
    """One real-text prompt (eval split, prose and code) of `length` tokens, shape [1, length]."""
    return token_samples(tokenizer, "eval", length, 1, seed=seed)["input_ids"]


def breakdown_records(
    model: nn.Module, prompt: torch.Tensor, lengths: Sequence[int], repeats: int, warmup: int = 1,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Flat records (model, T, component, median_s, share, repeats, threads, load_1min) of a measured breakdown.

    The prompts are prefixes of `prompt` ([1, >= max(lengths)] real text). `component` is attention,
    mlp, other or total; `share` is of the total (medians over the `repeats` timed passes).
    """
    name = name or getattr(model, "ffcore_name", type(model).__name__)
    lengths = usable_lengths(model, lengths)
    if not lengths:
        return []
    if prompt.shape[-1] < max(lengths):
        raise ValueError(f"prompt has {prompt.shape[-1]} tokens, the longest context length is {max(lengths)}")
    ids = prompt.to(next(model.parameters()).device)
    rows = []
    for T in lengths:
        rec = interleaved({"prefill": lambda T=T: timed_prefill(model, ids[:, :T])}, repeats, warmup, keep_results=True)
        runs = rec.results["prefill"]  # per-pass component seconds
        med = {c: statistics.median(r[c] for r in runs) for c in runs[0]}
        cond = rec.conditions()
        rows += [
            {"model": name, "T": T, "component": c, "median_s": med[c], "share": med[c] / med["total"],
             "all_s": [round(r[c], 6) for r in runs], **cond}
            for c in TIMED_COMPONENTS + ("total",)
        ]
    return rows
