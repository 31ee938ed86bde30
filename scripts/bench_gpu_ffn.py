#!/usr/bin/env python
"""GPU timing of one FFN module: Triton block-sparse path vs dense cuBLAS vs gather-then-bmm in torch.

    python scripts/bench_gpu_ffn.py                 # CUDA GPU: prints a table, writes results/gpu_ffn_bench.json
    python scripts/bench_gpu_ffn.py --dry-run-cpu   # no GPU: runs the same loop on tiny CPU shapes, writes nothing

Shapes: the FFNs of Llama-3.2-1B (d 2048, f 8192), Llama-3.2-3B (3072, 8192) and
Llama-3.1-8B (4096, 14336), bf16, SiLU, prompt lengths T in {1K, 2K, 4K, 8K, 16K},
densities 0.5 / 0.6 / 0.7 (K = round(density * f) experts per sparse block), blocks of
128 tokens with the first and the last block dense. Variants (all produce the same [T, d]):

- dense:  the whole FFN with torch F.linear on the original [f, d] / [d, f] weights (cuBLAS);
- triton: first/last block dense as above, the middle blocks through `block_sparse_ffn`
          (two Triton launches: gathered gate/up + gathered down);
- gather: first/last block dense as above, the middle blocks by index_select of the
          experts' w_gu / w_down_t rows, then torch.bmm (one per projection).

Only the FFN is timed (expert indices are given; the predictor is not run). CUDA events
around each call, warm-up calls (which also run the Triton autotuner) excluded, median of
the repeats. The FLOP-ideal speedup counts the three matmuls: dense 6 T d f, sparse
6 d (n_dense_rows f + n_sparse_rows K).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's ffcore (the engine's block layout), also without an install

from ffcore.engine.layout import BLOCK_SIZE, experts_for, sparse_token_count  # noqa: E402

# name -> (d, f): FFN shapes of the paper's models.
MODELS = {
    "llama-3.2-1b": (2048, 8192),
    "llama-3.2-3b": (3072, 8192),
    "llama-3.1-8b": (4096, 14336),
}
TOKENS = (1024, 2048, 4096, 8192, 16384)
DENSITIES = (0.5, 0.6, 0.7)
BLOCK = BLOCK_SIZE
# Tiny CPU problem for --dry-run-cpu: exercises every code path, measures nothing meaningful.
DRY_MODELS = {"tiny": (64, 256)}
DRY_TOKENS = (384, 520)
DRY_DENSITIES = (0.5,)
DRY_BLOCK = 64


# ----------------------------------------------------------------------------- FLOP model
def dense_sparse_rows(T: int, block_size: int, dense_first: bool = True, dense_last: bool = True) -> tuple[int, int]:
    """(rows computed densely, rows computed sparsely) of a T-token prompt, by the engine's own block layout."""
    n_sparse = sparse_token_count(T, block_size, dense_first, dense_last)
    return T - n_sparse, n_sparse


def ffn_flops(rows: int, d: int, n_neurons: int) -> int:
    """Matmul FLOPs of a gated FFN over `rows` tokens with `n_neurons` neurons (gate, up, down)."""
    return 3 * 2 * rows * d * n_neurons


def flop_ideal_speedup(T: int, d: int, f: int, density: float, block_size: int = BLOCK,
                       dense_first: bool = True, dense_last: bool = True) -> float:
    """Dense FFN FLOPs / block-sparse FFN FLOPs (first/last block dense), the speedup ceiling."""
    K = experts_for(density, f)
    n_dense, n_sparse = dense_sparse_rows(T, block_size, dense_first, dense_last)
    return ffn_flops(T, d, f) / (ffn_flops(n_dense, d, f) + ffn_flops(n_sparse, d, K))


# ----------------------------------------------------------------------------- variants
class Problem:
    """One FFN's weights (original and engine layouts), one prompt's input, per-block experts."""

    def __init__(self, T: int, d: int, f: int, density: float, block_size: int, device: str,
                 dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.T, self.d, self.f, self.B = T, d, f, block_size
        self.K = experts_for(density, f)
        r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        self.x = r(T, d)
        self.w_gate = r(f, d) / d**0.5
        self.w_up = r(f, d) / d**0.5
        self.w_down = r(d, f) / f**0.5  # original [d, f]
        self.w_gu = torch.cat([self.w_gate, self.w_up], dim=1).contiguous()  # [f, 2d]
        self.w_down_t = self.w_down.t().contiguous()  # [f, d]
        n_blocks = -(-T // block_size)
        if n_blocks < 3:
            raise ValueError(f"T={T} gives {n_blocks} blocks of {block_size}: no block is sparse")
        # first and last block dense; the middle ones are full blocks, contiguous rows
        self.nsb = n_blocks - 2
        self.sparse_lo, self.sparse_hi = block_size, block_size * (n_blocks - 1)
        self.block_starts = torch.arange(self.sparse_lo, self.sparse_hi, block_size, dtype=torch.int32, device=device)
        scores = torch.rand(self.nsb, f, generator=g, device=device)
        # distinct experts per block, sorted (neighbouring rows: a cheap step an engine can take too)
        self.idx = scores.topk(self.K, dim=1).indices.sort(dim=1).values.to(torch.int32).contiguous()
        self.dense_rows = torch.cat([
            torch.arange(0, self.sparse_lo, device=device), torch.arange(self.sparse_hi, T, device=device)
        ])

    def dense_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The gated FFN through cuBLAS on the original weights."""
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)

    def run_dense(self) -> torch.Tensor:
        """Every block dense."""
        return self.dense_ffn(self.x)

    def _dense_blocks_into(self, out: torch.Tensor) -> None:
        out.index_copy_(0, self.dense_rows, self.dense_ffn(self.x.index_select(0, self.dense_rows)))

    def run_gather(self) -> torch.Tensor:
        """First/last dense; middle blocks: index_select of expert rows, then torch.bmm."""
        out = torch.empty_like(self.x)
        self._dense_blocks_into(out)
        nsb, B, K, d = self.nsb, self.B, self.K, self.d
        xb = self.x[self.sparse_lo : self.sparse_hi].view(nsb, B, d)
        flat = self.idx.reshape(-1)
        w = self.w_gu.index_select(0, flat).view(nsb, 2 * K, d)  # rows (gate_k, up_k) interleaved
        gu = torch.bmm(xb, w.transpose(1, 2)).view(nsb, B, K, 2)
        h = F.silu(gu[..., 0]) * gu[..., 1]
        wd = self.w_down_t.index_select(0, flat).view(nsb, K, d)
        out[self.sparse_lo : self.sparse_hi] = torch.bmm(h, wd).view(nsb * B, d)
        return out

    def run_sparse(self, block_sparse_ffn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """First/last dense; middle blocks through `block_sparse_ffn` (Triton, or its reference)."""
        out = torch.empty_like(self.x)
        self._dense_blocks_into(out)
        return block_sparse_ffn(self.x, self.w_gu, self.w_down_t, self.block_starts, self.idx, self.B, "silu", out=out)


# ----------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> list[float]:
    """Per-call times in ms after `warmup` untimed calls: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _median_or_none(fn: Callable[[], object], warmup: int, repeats: int, cuda: bool) -> tuple[float | None, str]:
    try:
        return statistics.median(time_ms(fn, warmup, repeats, cuda)), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of GPU memory"


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_variants(p: "Problem", sparse_fn: Callable, tol: float) -> dict:
    """Both sparse variants vs the memory-light per-block torch reference; raise if either is off."""
    from ffcore.kernels.block_sparse_ffn import block_sparse_ffn_gathered_ref

    ref = p.run_sparse(block_sparse_ffn_gathered_ref)
    errs = {"max_rel_err_triton": max_rel_err(p.run_sparse(sparse_fn), ref)}
    try:
        errs["max_rel_err_gather"] = max_rel_err(p.run_gather(), ref)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        errs["max_rel_err_gather"] = None
    for name, err in errs.items():
        if err is not None and not err <= tol:
            raise RuntimeError(f"d={p.d} f={p.f} T={p.T} K={p.K}: {name} = {err:.3g} > {tol} against the torch "
                               "reference; not timing a wrong computation")
    return errs


def bench_one(model: str, d: int, f: int, T: int, density: float, block_size: int, sparse_fn: Callable,
              device: str, dtype: torch.dtype, warmup: int, repeats: int, tol: float) -> dict:
    """Time the three variants on one (shape, T, density) after checking the sparse ones are right."""
    cuda = device == "cuda"
    p = Problem(T, d, f, density, block_size, device, dtype)
    errs = check_variants(p, sparse_fn, tol)  # also runs the Triton autotuner once
    dense_ms, _ = _median_or_none(p.run_dense, warmup, repeats, cuda)
    sparse_ms, note_s = _median_or_none(lambda: p.run_sparse(sparse_fn), warmup, repeats, cuda)
    gather_ms, note_g = _median_or_none(p.run_gather, warmup, repeats, cuda)
    ideal = flop_ideal_speedup(T, d, f, density, block_size)
    speed = lambda ms: None if ms is None or dense_ms is None else dense_ms / ms  # noqa: E731
    row = {
        "model": model, "d": d, "f": f, "T": T, "density": density, "K": p.K, "block_size": block_size,
        "sparse_blocks": p.nsb, "dense_ms": dense_ms, "triton_ms": sparse_ms, "gather_bmm_ms": gather_ms,
        "speedup_triton_vs_dense": speed(sparse_ms), "speedup_gather_vs_dense": speed(gather_ms),
        "speedup_triton_vs_gather": None if sparse_ms is None or gather_ms is None else gather_ms / sparse_ms,
        "flop_ideal_speedup": ideal, **errs,
    }
    row["frac_ideal_triton"] = None if row["speedup_triton_vs_dense"] is None else row["speedup_triton_vs_dense"] / ideal
    row["frac_ideal_gather"] = None if row["speedup_gather_vs_dense"] is None else row["speedup_gather_vs_dense"] / ideal
    notes = "; ".join(n for n in (note_s and f"triton: {note_s}", note_g and f"gather: {note_g}") if n)
    if notes:
        row["note"] = notes
    del p
    if cuda:
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- report
COLUMNS = [
    ("model", "model", "{}"), ("T", "T", "{}"), ("density", "dens", "{:.1f}"), ("dense_ms", "dense ms", "{:.3f}"),
    ("triton_ms", "triton ms", "{:.3f}"), ("gather_bmm_ms", "gather ms", "{:.3f}"),
    ("speedup_triton_vs_dense", "triton x", "{:.2f}"), ("speedup_gather_vs_dense", "gather x", "{:.2f}"),
    ("flop_ideal_speedup", "ideal x", "{:.2f}"), ("frac_ideal_triton", "triton/ideal", "{:.0%}"),
    ("frac_ideal_gather", "gather/ideal", "{:.0%}"),
]


MIN_WIDTH = 12


def format_table(rows: list[dict], header: bool = True) -> str:
    """A fixed-width text table of the results (columns at least MIN_WIDTH wide, so rows printed
    one at a time line up with the header)."""
    cells = [[h for _, h, _ in COLUMNS]] if header else []
    for r in rows:
        cells.append(["n/a" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in COLUMNS])
    widths = [max([MIN_WIDTH] + [len(c[i]) for c in cells]) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    if header:
        lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def git_commit() -> str:
    """HEAD's hash, '+dirty' when tracked files differ, 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    ap.add_argument("--block-size", type=int, default=BLOCK)
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per variant (the first runs the autotuner)")
    ap.add_argument("--repeats", type=int, default=25, help="timed calls per variant; the median is reported")
    ap.add_argument("--tol", type=float, default=3e-2,
                    help="max |error| / max |reference| allowed for the sparse variants vs the torch reference")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_ffn_bench.json")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the whole loop on CPU with tiny shapes and the torch reference; write nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = parse_args(argv)
    if args.dry_run_cpu:
        from ffcore.kernels.block_sparse_ffn import block_sparse_ffn_gathered_ref as sparse_fn  # no Triton launch

        device, dtype = "cpu", torch.float32
        models = DRY_MODELS
        tokens, densities, block = DRY_TOKENS, DRY_DENSITIES, DRY_BLOCK
        warmup, repeats = 1, 3
        print("DRY RUN on CPU: torch reference instead of Triton, tiny shapes; these are NOT measurements "
              "and nothing is written.")
    else:
        if not torch.cuda.is_available():
            print("bench_gpu_ffn.py needs a CUDA GPU and none is available here; no numbers were produced. "
                  "(Use --dry-run-cpu to exercise the script on CPU.)", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("TRITON_INTERPRET is set: Triton would run in its CPU interpreter; unset it to time the GPU.",
                  file=sys.stderr)
            return 2
        import triton

        from ffcore.kernels import block_sparse_ffn as sparse_fn

        device, dtype = "cuda", torch.bfloat16
        models = {m: MODELS[m] for m in args.models}
        tokens, densities, block = args.tokens, args.densities, args.block_size
        warmup, repeats = max(1, args.warmup), max(1, args.repeats)

    rows = []
    print(format_table([]), flush=True)
    for model, (d, f) in models.items():
        for T in tokens:
            for density in densities:
                row = bench_one(model, d, f, T, density, block, sparse_fn, device, dtype, warmup, repeats, args.tol)
                rows.append(row)
                print(format_table([row], header=False) + (f"   ({row['note']})" if "note" in row else ""), flush=True)
    print()
    print(format_table(rows))
    if args.dry_run_cpu:
        return 0

    report = {
        "benchmark": "FFN module: Triton block-sparse vs dense cuBLAS vs torch gather+bmm",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "dtype": "bfloat16", "activation": "silu", "block_size": block, "first_last_block_dense": True,
            "warmup": warmup, "repeats": repeats, "statistic": "median of CUDA-event times (ms)",
            "expert_selection": "random distinct experts per block (predictor not run)",
            "flop_model": "dense 6*T*d*f; sparse 6*d*(dense_rows*f + sparse_rows*K)",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
