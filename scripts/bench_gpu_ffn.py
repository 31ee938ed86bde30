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

Only the FFN is timed (expert indices are given; the predictor is not run). Before timing, both
sparse variants are checked against the per-block torch reference (a wrong kernel is never
timed); that first call also runs the Triton autotuner. Then `warmup` untimed calls per variant,
then `repeats` interleaved rounds (dense, triton, gather; the order rotated every round), each
call between two CUDA events. Reported: every sample, the median and the interquartile range
per variant, the speedup as the median of the per-round ratios (with its quartiles), the
achieved TFLOP/s, and the fraction of the FLOP-ideal speedup reached. The FLOP-ideal speedup
counts the three matmuls: dense 6 T d f, sparse 6 d (n_dense_rows f + n_sparse_rows K).
`scripts/gpu_run.py` runs this grid as its stage b (and writes the same rows).
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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's ffcore (the engine's block layout), also without an install

from ffcore.engine.layout import BLOCK_SIZE, experts_for, sparse_token_count, split_blocks  # noqa: E402

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
def dense_sparse_rows(T: int, block_size: int, dense_first: bool = True, dense_last: bool = True,
                      tail: str = "full") -> tuple[int, int]:
    """(rows computed densely, rows computed sparsely) of a T-token prompt, by the engine's own block layout."""
    n_sparse = sparse_token_count(T, block_size, dense_first, dense_last, tail=tail)
    return T - n_sparse, n_sparse


def ffn_flops(rows: int, d: int, n_neurons: int) -> int:
    """Matmul FLOPs of a gated FFN over `rows` tokens with `n_neurons` neurons (gate, up, down)."""
    return 3 * 2 * rows * d * n_neurons


def flop_ideal_speedup(T: int, d: int, f: int, density: float, block_size: int = BLOCK,
                       dense_first: bool = True, dense_last: bool = True, tail: str = "full") -> float:
    """Dense FFN FLOPs / block-sparse FFN FLOPs (first/last block dense), the speedup ceiling."""
    K = experts_for(density, f)
    n_dense, n_sparse = dense_sparse_rows(T, block_size, dense_first, dense_last, tail)
    return ffn_flops(T, d, f) / (ffn_flops(n_dense, d, f) + ffn_flops(n_sparse, d, K))


# ----------------------------------------------------------------------------- variants
class Problem:
    """One FFN's weights (original and engine layouts), one prompt's input, per-block experts."""

    def __init__(self, T: int, d: int, f: int, density: float, block_size: int, device: str,
                 dtype: torch.dtype, seed: int = 0, tail: str = "full") -> None:
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
        self.tail = tail
        dense_spans, sparse_spans = split_blocks(T, block_size, tail=tail)  # the engine's layout
        if not sparse_spans:
            raise ValueError(f"T={T} with blocks of {block_size}: no block is sparse")
        # every sparse block is full except, under the full-block dense tail, the last one (shortened)
        self.nsb = len(sparse_spans)
        self.sparse_lo, self.sparse_hi = sparse_spans[0][0], sparse_spans[-1][1]  # the sparse rows are contiguous
        self.n_full = sum(e - s == block_size for s, e in sparse_spans)  # leading full blocks
        self.block_starts = torch.tensor([s for s, _ in sparse_spans], dtype=torch.int32, device=device)
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
        nb, B, K, d = self.n_full, self.B, self.K, self.d
        lo, mid = self.sparse_lo, self.sparse_lo + nb * B  # full blocks in [lo, mid), a short one after
        xb = self.x[lo:mid].view(nb, B, d)
        flat = self.idx[:nb].reshape(-1)
        w = self.w_gu.index_select(0, flat).view(nb, 2 * K, d)  # rows (gate_k, up_k) interleaved
        gu = torch.bmm(xb, w.transpose(1, 2)).view(nb, B, K, 2)
        h = F.silu(gu[..., 0]) * gu[..., 1]
        wd = self.w_down_t.index_select(0, flat).view(nb, K, d)
        out[lo:mid] = torch.bmm(h, wd).view(nb * B, d)
        if mid < self.sparse_hi:  # the shortened last sparse block
            last = self.idx[nb].long()
            w = self.w_gu.index_select(0, last).view(2 * K, d)  # [K, 2d] -> [2K, d], (gate_k, up_k) interleaved
            gu = F.linear(self.x[mid : self.sparse_hi], w).view(-1, K, 2)  # [rows, K, (gate, up)]
            out[mid : self.sparse_hi] = (F.silu(gu[..., 0]) * gu[..., 1]) @ self.w_down_t.index_select(0, last)
        return out

    def run_sparse(self, block_sparse_ffn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """First/last dense; middle blocks through `block_sparse_ffn` (Triton, or its reference)."""
        out = torch.empty_like(self.x)
        self._dense_blocks_into(out)
        hi = self.sparse_hi  # the kernel bounds a block by the rows it is given: stop at the dense tail
        y = block_sparse_ffn(self.x[:hi], self.w_gu, self.w_down_t, self.block_starts, self.idx, self.B, "silu",
                             out=out[:hi])
        if y.data_ptr() != out.data_ptr():  # a kernel that did not write in place
            out[:hi] = y
        return out


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




def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation (one value: itself)."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no values")
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                        cuda: bool) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per-call ms of several callables in interleaved rounds (order rotated per round) after `warmup`
    untimed calls each: CUDA events on GPU, perf_counter on CPU. A callable that runs out of GPU
    memory in its warm-up is dropped; returns (samples per name, notes per dropped name)."""
    notes: dict[str, str] = {}
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(1, warmup)):
                fn()
            live[name] = fn
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            notes[name] = "out of GPU memory"
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        torch.cuda.synchronize()
    names = list(live)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % max(1, len(names)):] + names[: r % max(1, len(names))]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                live[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                live[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples, notes


def summarize_ms(prefix: str, samples: list[float] | None) -> dict:
    """`<prefix>_ms` (median), `_q25_ms`, `_q75_ms`, `_iqr_ms` and `_all_ms` (every sample) of one variant."""
    if not samples:
        return {f"{prefix}_ms": None, f"{prefix}_q25_ms": None, f"{prefix}_q75_ms": None, f"{prefix}_iqr_ms": None,
                f"{prefix}_all_ms": []}
    q25, med, q75 = quartiles(samples)
    return {f"{prefix}_ms": med, f"{prefix}_q25_ms": q25, f"{prefix}_q75_ms": q75, f"{prefix}_iqr_ms": q75 - q25,
            f"{prefix}_all_ms": [round(t, 6) for t in samples]}


def round_ratios(prefix: str, num: list[float] | None, den: list[float] | None) -> dict:
    """Per-round ratios num / den (a speedup when num is the dense time): median as `<prefix>`, quartiles, all."""
    if not num or not den:
        return {prefix: None, f"{prefix}_q25": None, f"{prefix}_q75": None, f"{prefix}_all": []}
    r = [a / b for a, b in zip(num, den)]
    q25, med, q75 = quartiles(r)
    return {prefix: med, f"{prefix}_q25": q25, f"{prefix}_q75": q75, f"{prefix}_all": [round(x, 5) for x in r]}

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
              device: str, dtype: torch.dtype, warmup: int, repeats: int, tol: float, seed: int = 0) -> dict:
    """Time the three variants on one (shape, T, density) after checking the sparse ones are right."""
    cuda = device == "cuda"
    p = Problem(T, d, f, density, block_size, device, dtype, seed=seed)
    errs = check_variants(p, sparse_fn, tol)  # also runs the Triton autotuner once
    fns = {"dense": p.run_dense, "triton": lambda: p.run_sparse(sparse_fn), "gather_bmm": p.run_gather}
    if errs.get("max_rel_err_gather") is None:
        del fns["gather_bmm"]  # it ran out of memory in the check
    samples, notes = time_interleaved_ms(fns, warmup, repeats, cuda)
    if "gather_bmm" not in fns:
        notes["gather_bmm"] = "out of GPU memory"
    n_dense, n_sparse = dense_sparse_rows(T, block_size)
    ideal = flop_ideal_speedup(T, d, f, density, block_size)
    dense_fl = ffn_flops(T, d, f)
    sparse_fl = ffn_flops(n_dense, d, f) + ffn_flops(n_sparse, d, p.K)
    row = {
        "model": model, "d": d, "f": f, "T": T, "density": density, "K": p.K, "block_size": block_size,
        "sparse_blocks": p.nsb, "dense_rows": n_dense, "sparse_rows": n_sparse,
        "dense_flops": dense_fl, "sparse_flops": sparse_fl, "flop_ideal_speedup": ideal,
        **summarize_ms("dense", samples.get("dense")), **summarize_ms("triton", samples.get("triton")),
        **summarize_ms("gather_bmm", samples.get("gather_bmm")),
        **round_ratios("speedup_triton_vs_dense", samples.get("dense"), samples.get("triton")),
        **round_ratios("speedup_gather_vs_dense", samples.get("dense"), samples.get("gather_bmm")),
        **round_ratios("speedup_triton_vs_gather", samples.get("gather_bmm"), samples.get("triton")),
        **errs, "check_tol": tol,
    }
    tflops = lambda flop, ms: None if ms is None else flop / (ms * 1e-3) / 1e12  # noqa: E731
    row["dense_tflops"] = tflops(dense_fl, row["dense_ms"])
    row["triton_tflops"] = tflops(sparse_fl, row["triton_ms"])
    row["gather_bmm_tflops"] = tflops(sparse_fl, row["gather_bmm_ms"])
    for v, key in (("triton", "speedup_triton_vs_dense"), ("gather", "speedup_gather_vs_dense")):
        row[f"frac_ideal_{v}"] = None if row[key] is None else row[key] / ideal
    if notes:
        row["note"] = "; ".join(f"{k}: {v}" for k, v in notes.items())
    del p
    if cuda:
        torch.cuda.empty_cache()
    return row


def grid(models: dict[str, tuple[int, int]], tokens: Sequence[int], densities: Sequence[float]) -> list[tuple]:
    """The (model, d, f, T, density) configurations of a run, in the order they are measured."""
    return [(m, d, f, T, dens) for m, (d, f) in models.items() for T in tokens for dens in densities]


def run_grid(configs: Sequence[tuple], block_size: int, sparse_fn: Callable, device: str, dtype: torch.dtype,
             warmup: int, repeats: int, tol: float, deadline: float | None = None,
             on_row: Callable[[dict], None] | None = None, keep_going: bool = False) -> list[dict]:
    """`bench_one` over the configurations; past `deadline` (time.monotonic) the rest are recorded as skipped.

    With `keep_going`, a configuration that fails (a wrong sparse result, an error) is recorded with its
    error instead of stopping the run. `on_row` sees every row as soon as it exists.
    """
    rows = []
    for model, d, f, T, density in configs:
        base = {"model": model, "d": d, "f": f, "T": T, "density": density, "block_size": block_size}
        if deadline is not None and time.monotonic() > deadline:
            row = {**base, "skipped": "time box reached before this configuration"}
        else:
            try:
                row = bench_one(model, d, f, T, density, block_size, sparse_fn, device, dtype, warmup, repeats, tol)
            except Exception as err:  # noqa: BLE001 - recorded, the rest of the grid still runs
                if not keep_going:
                    raise
                row = {**base, "error": f"{type(err).__name__}: {err}"[:2000]}
                if device == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def autotune_choices() -> dict:
    """The Triton autotuner's chosen config per kernel and key (empty in the interpreter or before any launch)."""
    out = {}
    try:
        from ffcore.kernels.gather_down import gather_down_kernel
        from ffcore.kernels.gather_gate_up import gather_gate_up_kernel
    except ImportError:
        return out
    for name, k in (("gather_gate_up", gather_gate_up_kernel), ("gather_down", gather_down_kernel)):
        cache = getattr(k, "cache", None)
        if isinstance(cache, dict):
            out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out

# ----------------------------------------------------------------------------- report
COLUMNS = [
    ("model", "model", "{}"), ("T", "T", "{}"), ("density", "dens", "{:.1f}"), ("dense_ms", "dense ms", "{:.3f}"),
    ("triton_ms", "triton ms", "{:.3f}"), ("gather_bmm_ms", "gather ms", "{:.3f}"),
    ("speedup_triton_vs_dense", "triton x", "{:.2f}"), ("speedup_gather_vs_dense", "gather x", "{:.2f}"),
    ("flop_ideal_speedup", "ideal x", "{:.2f}"), ("frac_ideal_triton", "triton/ideal", "{:.0%}"),
    ("frac_ideal_gather", "gather/ideal", "{:.0%}"), ("triton_tflops", "triton TF/s", "{:.0f}"),
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


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Where a measurement ran: device, driver, torch / CUDA / triton / transformers versions, git commit."""
    import platform

    info = {
        "device": "cpu (no CUDA device)", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": package_version("triton"), "transformers": package_version("transformers"),
        "numpy": package_version("numpy"), "git_commit": git_commit(), "hostname": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"), "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({
            "device": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "total_memory_gib": round(props.total_memory / 2**30, 2),
            "driver": _nvidia_driver(), "cudnn": torch.backends.cudnn.version(),
        })
    return info


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
        from ffcore.kernels import block_sparse_ffn as sparse_fn  # optional: imports triton

        device, dtype = "cuda", torch.bfloat16
        models = {m: MODELS[m] for m in args.models}
        tokens, densities, block = args.tokens, args.densities, args.block_size
        warmup, repeats = max(1, args.warmup), max(1, args.repeats)

    print(format_table([]), flush=True)

    def show(row: dict) -> None:
        print(format_table([row], header=False) + (f"   ({row['note']})" if "note" in row else ""), flush=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = run_grid(grid(models, tokens, densities), block, sparse_fn, device, dtype, warmup, repeats, args.tol,
                    on_row=show)
    print()
    print(format_table(rows))
    if args.dry_run_cpu:
        return 0

    report = {
        "benchmark": "FFN module: Triton block-sparse vs dense cuBLAS vs torch gather+bmm",
        **environment(),
        "created_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": settings_record(block, warmup, repeats, args.tol, models, tokens, densities),
        "autotune": autotune_choices(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def settings_record(block: int, warmup: int, repeats: int, tol: float, models: dict, tokens: Sequence[int],
                    densities: Sequence[float], dtype: str = "bfloat16") -> dict:
    """The settings block of a report (what was measured and how)."""
    return {
        "dtype": dtype, "activation": "silu", "block_size": block, "first_last_block_dense": True,
        "models": {m: {"d": d, "f": f} for m, (d, f) in models.items()}, "tokens": list(tokens),
        "densities": list(densities), "warmup": warmup, "repeats": repeats, "check_tol": tol,
        "timing": "interleaved rounds (dense, triton, gather_bmm; order rotated per round), CUDA events around "
                  "each call; warm-up calls and the Triton autotuner excluded",
        "statistic": "median and interquartile range of the per-call ms; speedups are medians of per-round ratios",
        "expert_selection": "random distinct experts per block, sorted (predictor not run)",
        "flop_model": "dense 6*T*d*f; sparse 6*d*(dense_rows*f + sparse_rows*K)",
    }


if __name__ == "__main__":
    sys.exit(main())
