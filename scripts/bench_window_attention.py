#!/usr/bin/env python
"""CPU timing of a dense gemma3-270m prefill: stock SDPA vs ffcore's windowed attention.

    python scripts/bench_window_attention.py                       # 1024, 2048, 4096 tokens; 1 warm-up + 5 pairs
    python scripts/bench_window_attention.py --lengths 2048 --pairs 9 --json results/x.json

What is timed: `model(ids, use_cache=False, logits_to_keep=1)` under `torch.no_grad()`, the
whole dense prefill (embeddings, 18 layers, one logit row). Stock is transformers' `sdpa`
(sliding-window layers get a full `[T, T]` boolean mask); windowed is
`ffcore.engine.attention.windowed_attention` (15 sliding layers computed per query chunk
against their visible keys; the 3 full layers unchanged). Runs are interleaved (stock,
windowed, stock, windowed, ...) after warm-up pairs, so slow drifts in the machine's load hit
both alike. Per pair: the wall-clock ratio stock / windowed and the same ratio of
`time.process_time()` (CPU seconds of this process, all threads); printed as median and range,
with `os.getloadavg()` before and after each length. On a shared machine the numbers are
indicative, not a benchmark: other processes steal cores and inflate both runs unevenly.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ffcore.engine.attention import DEFAULT_CHUNK_SIZE, windowed_attention  # noqa: E402
from ffcore.models import load_model  # noqa: E402


def timed(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(wall s, process CPU s, last-row logits) of one dense prefill."""
    with torch.no_grad():
        t0, p0 = time.perf_counter(), time.process_time()
        logits = model(ids, use_cache=False, logits_to_keep=1).logits
        return time.perf_counter() - t0, time.process_time() - p0, logits


def run_pair(model: torch.nn.Module, ids: torch.Tensor, chunk: int) -> dict[str, float]:
    """One stock run, then one windowed run."""
    ws, ps, ls = timed(model, ids)
    with windowed_attention(model, chunk_size=chunk):
        ww, pw, lw = timed(model, ids)
    return {"stock_s": ws, "windowed_s": ww, "stock_cpu_s": ps, "windowed_cpu_s": pw,
            "max_abs_logit_diff": (ls - lw).abs().max().item()}


def summarise(length: int, pairs: list[dict[str, float]], load_before: tuple, load_after: tuple) -> dict:
    """Medians and ranges of one length's pairs."""
    wall = [p["stock_s"] / p["windowed_s"] for p in pairs]
    cpu = [p["stock_cpu_s"] / p["windowed_cpu_s"] for p in pairs]
    return {
        "tokens": length, "pairs": len(pairs),
        "stock_s_median": statistics.median(p["stock_s"] for p in pairs),
        "windowed_s_median": statistics.median(p["windowed_s"] for p in pairs),
        "ratio_median": statistics.median(wall), "ratio_min": min(wall), "ratio_max": max(wall),
        "cpu_ratio_median": statistics.median(cpu), "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu),
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in pairs),
        "loadavg_before": list(load_before), "loadavg_after": list(load_after), "raw": pairs,
    }


def main() -> None:
    """Parse arguments, time every length, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--pairs", type=int, default=5, help="timed (stock, windowed) pairs per length")
    ap.add_argument("--warmup", type=int, default=1, help="untimed pairs per length")
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_model("gemma3-270m")
    cfg = model.config
    print(f"gemma3-270m: {cfg.num_hidden_layers} layers, {cfg.layer_types.count('sliding_attention')} sliding "
          f"(window {cfg.sliding_window}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; chunk {args.chunk_size}", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in args.lengths:
        ids = torch.randint(300, 20000, (1, length), generator=gen)
        load_before = os.getloadavg()
        for _ in range(args.warmup):
            run_pair(model, ids, args.chunk_size)
        pairs = []
        for i in range(args.pairs):
            pairs.append(run_pair(model, ids, args.chunk_size))
            p = pairs[-1]
            print(f"  T={length} pair {i + 1}: stock {p['stock_s']:.2f}s  windowed {p['windowed_s']:.2f}s  "
                  f"ratio {p['stock_s'] / p['windowed_s']:.2f}  cpu ratio {p['stock_cpu_s'] / p['windowed_cpu_s']:.2f}",
                  flush=True)
        rows.append(summarise(length, pairs, load_before, os.getloadavg()))

    print("\nDense prefill, stock SDPA vs windowed (ratio = stock / windowed; >1 means windowed is faster)")
    head = (f"{'tokens':>6} {'pairs':>5} {'stock s':>8} {'wind. s':>8} {'ratio med [min, max]':>21} "
            f"{'cpu ratio med [min, max]':>25} {'max|dlogit|':>11} {'loadavg before -> after':>24}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lb, la = r["loadavg_before"], r["loadavg_after"]
        print(f"{r['tokens']:>6} {r['pairs']:>5} {r['stock_s_median']:>8.2f} {r['windowed_s_median']:>8.2f} "
              f"{r['ratio_median']:>5.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]{'':>4} "
              f"{r['cpu_ratio_median']:>9.2f} [{r['cpu_ratio_min']:.2f}, {r['cpu_ratio_max']:.2f}]{'':>2} "
              f"{r['max_abs_logit_diff']:>11.1e} {lb[0]:>5.2f} {lb[1]:.2f} -> {la[0]:.2f} {la[1]:.2f}")
    print("Indicative only: a shared machine (load average above); medians of interleaved pairs.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"chunk_size": args.chunk_size, "threads": torch.get_num_threads(),
                                         "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
