#!/usr/bin/env python
"""One GPU session's checks and measurements in one command (issue 22): kernel tests, FFN bench, prefill.

    python scripts/gpu_run.py --out "$OUT"               # CUDA machine: stages a-c, about 6 minutes on an H200
    python scripts/gpu_run.py --dry-run-cpu --out DIR    # no GPU: every stage on tiny shapes under TRITON_INTERPRET=1

Stages, each time-boxed, each writing its JSON as it goes (a later failure, or a kill, keeps what is done):

a. `tests`   -> gpu_tests.json: pytest on kernels/tests and tests/test_engine_triton.py in a subprocess,
               natively (TRITON_INTERPRET unset); pass/fail/skip counts and the failures' text (capped).
b. `ffn`     -> gpu_ffn_bench.json: scripts/bench_gpu_ffn.py's grid (FFN shapes of Llama-3.2-1B/3B and
               Llama-3.1-8B, bf16, 1K-16K tokens, densities 0.5/0.6/0.7): Triton block-sparse vs dense cuBLAS
               vs gather+bmm, each sparse variant checked against a torch reference before it is timed.
c. `prefill` -> gpu_prefill.json: end-to-end prefill of Llama-3.2-1B and Llama-3.1-8B configurations
               (public config numbers of ffcore.flops.BUILTIN_SPECS) with random bf16 weights, dense vs
               `ffcore.engine.sparsify` at 30/40/50 % sparsity with (i) a random-initialised ExpertPredictor
               and ErrorCompensator (their cost counted) and (ii) given random experts (no selection cost),
               interleaved rounds timed with CUDA synchronisation, beside `flops.plan_speedup`. Before timing,
               every sparse variant is compared with dense (first block: identical) and with the engine's
               torch backend on the same experts (all rows).

gpu_run.json is the run's manifest: every stage's status and duration, the estimate, the environment.
Every file carries the device, the torch / triton / transformers / CUDA versions, the git commit (or
`--git-commit`) and a digest of the sources, the settings and all raw samples. A dry run says so in
every file (`dry_run: true` and a note): nothing in it is a GPU measurement.

The device machine has its own python3 (torch 2.11, triton 3.6, transformers 5.17) and no ffcore
install: this script puts the repository root on sys.path and, when `ffcore.kernels` (installed from
kernels/ by pyproject's package-dir) is not importable, links ffcore/kernels -> ../kernels for the run
(removed at exit). It uses no ffcore path that needs transformers >= 5.23 (models are built directly
from `transformers.LlamaConfig`; no checkpoint, tokenizer, dataset or KV-cache code is involved).
"""
from __future__ import annotations

import argparse
import atexit
import gc
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "ffcore.gpu_run/1"
STAGES = ("tests", "ffn", "prefill")
FILES = {"tests": "gpu_tests.json", "ffn": "gpu_ffn_bench.json", "prefill": "gpu_prefill.json", "run": "gpu_run.json"}
DRY_NOTE = ("CPU DRY RUN under TRITON_INTERPRET=1 on tiny shapes: it exercises every code path and measures "
            "nothing; no number in this file is a GPU measurement")
GPU_NOTE = "measured on the CUDA device named in env"

# ----------------------------------------------------------------------------- settings
# Stage a: the kernel and engine tests (57 tests; compile-bound natively: Triton builds each config once).
TEST_PATHS = ["kernels/tests", "tests/test_engine_triton.py"]
DRY_TEST_PATHS = ["kernels/tests/test_kernel_common.py",
                  "tests/test_engine_triton.py::test_backend_names_are_checked"]
# Stage b: the FFN grid (scripts/bench_gpu_ffn.py's MODELS x TOKENS x DENSITIES).
FFN_WARMUP, FFN_REPEATS = 3, 20
DRY_FFN = {"models": {"tiny": (32, 64)}, "tokens": (96,), "densities": (0.5,), "block_size": 32}
# Stage c: end-to-end prefill.
PREFILL_MODELS = ("llama-3.2-1b", "llama-3.1-8b")
PREFILL_TOKENS = (1024, 2048, 4096, 8192, 16384)
SPARSITIES = (0.3, 0.4, 0.5)
POLICIES = ("predictor+compensator", "random_given")
PREFILL_WARMUP, PREFILL_REPEATS = 2, 10
TIED_EMBEDDINGS = {"llama-3.2-1b": True, "llama-3.2-3b": True, "llama-3.1-8b": False}  # public configs
DRY_PREFILL = {"tokens": (96,), "sparsities": (0.5,), "block_size": 32}
DRY_SPEC = dict(name="tiny-llama", d=32, f=64, L=2, heads=4, kv_heads=2, head_dim=8, vocab=128)
# transformers' default init std 0.02 makes a 32-wide FFN's output ~1e-3, too small for the checks to see a
# wrong result through the residual stream; 0.25 gives it the O(1) output the real shapes get at 0.02.
DRY_INIT_STD = 0.25
# Time boxes (seconds) and the tolerances of the prefill checks.
CAPS = {"tests": 120.0, "ffn": 150.0, "prefill": 180.0}
BUDGET_S = 450.0  # all stages together (expected ~5 min); the device command's timeout_s=540 leaves slack
FIRST_BLOCK_TOL = 1e-2  # ||sparse - dense|| / ||dense|| on the first block's rows (identical computation)
BACKEND_TOL = 3e-2  # per layer: ||triton - torch backend|| / ||torch backend||, same input and experts (bf16)
H200_BF16_TFLOPS = 790.0  # measured dense bf16 matmul rate on this workplace's H200 (KINDS.md)
OUTPUT_CAP = 20_000  # characters of pytest output kept
FAILURE_CAP = 3_000  # characters per failure text


# ----------------------------------------------------------------------------- small helpers
def utc() -> str:
    """The current UTC time, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def clean(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, tuples -> lists, unknown objects -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


class StageFile:
    """One stage's JSON document, rewritten (atomically) whenever it changes."""

    def __init__(self, path: Path, doc: dict) -> None:
        self.path, self.doc, self.t0 = path, doc, time.monotonic()
        self.write()

    def write(self) -> None:
        """Write the document now (elapsed time and a timestamp updated)."""
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 3)
        self.doc["updated_utc"] = utc()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(clean(self.doc), indent=1) + "\n")
        os.replace(tmp, self.path)

    def finish(self, status: str) -> None:
        """Set the final status and write."""
        self.doc["status"] = status
        self.doc["finished_utc"] = utc()
        self.write()


def header(stage: str, dry_run: bool, env: dict, settings: dict) -> dict:
    """The fields every stage file starts with."""
    return {"schema": SCHEMA, "stage": stage, "dry_run": dry_run, "note": DRY_NOTE if dry_run else GPU_NOTE,
            "status": "running", "created_utc": utc(), "env": env, "settings": settings}


def source_digest() -> str:
    """12 hex digits of a hash of the code this run executes (ffcore, kernels, the two scripts, the tests it runs)."""
    files = sorted([*ROOT.glob("ffcore/**/*.py"), *ROOT.glob("kernels/**/*.py"), ROOT / "scripts" / "gpu_run.py",
                    ROOT / "scripts" / "bench_gpu_ffn.py", ROOT / "tests" / "test_engine_triton.py"])
    h = hashlib.sha256()
    for p in files:
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def ensure_kernels_importable() -> str:
    """'installed' if `ffcore.kernels` imports as is; else link ffcore/kernels -> ../kernels (removed at exit)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("ffcore.kernels") is not None:
        return "installed"
    link = ROOT / "ffcore" / "kernels"
    link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    atexit.register(lambda: link.unlink() if link.is_symlink() else None)
    importlib.invalidate_caches()
    if importlib.util.find_spec("ffcore.kernels") is None:
        raise ImportError("ffcore.kernels is not importable even through the ffcore/kernels link")
    return "linked ffcore/kernels -> ../kernels for this run"


def load_bench() -> Any:
    """scripts/bench_gpu_ffn.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_ffn", ROOT / "scripts" / "bench_gpu_ffn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a: Any, b: Any) -> float:
    """||a - b||_F / ||b||_F in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- estimate
def estimate(dry_run: bool, ffn_configs: Sequence[tuple], prefill_specs: Sequence[Any], tokens: Sequence[int],
             sparsities: Sequence[float], ffn_rounds: int, prefill_rounds: int, tflops: float = H200_BF16_TFLOPS,
             efficiency: float = 0.6) -> dict:
    """Expected seconds per stage on the device from FLOPs at `efficiency` x `tflops`, plus fixed costs."""
    from ffcore import flops
    from ffcore.engine.layout import experts_for, sparse_token_count
    from ffcore.engine.plan import SparsityPlan

    rate = tflops * 1e12 * efficiency
    ffn_fl = 0.0
    keys = set()
    for _, d, f, T, dens in ffn_configs:
        n_sp = sparse_token_count(T, 128)
        dense = 6 * T * d * f
        sparse = 6 * d * ((T - n_sp) * f + n_sp * experts_for(dens, f))
        ffn_fl += ffn_rounds * (dense + 2 * sparse) + 3 * sparse  # timed rounds + the checks
        keys.add((d, experts_for(dens, f)))
    # autotuning: per (d, K) key two kernels x 6 configs benchmarked (~0.15 s each), ~24 compiles of ~2 s
    ffn_fixed = len(keys) * 2 * 6 * 0.15 + 48 + 0.3 * len(ffn_configs)
    pre_fl, pre_fixed = 0.0, 0.0
    for spec in prefill_specs:
        pre_fixed += 4 + spec.L * spec.d * spec.f * 3 * 2 / 1e9  # build + init: ~1 s per GB of FFN weights
        for T in tokens:
            dense = flops.plan_speedup(spec, T, SparsityPlan(densities=1.0, policy="random"))["dense_flops"]
            sparse = sum(flops.plan_speedup(spec, T, SparsityPlan(densities=1 - s, policy="random"), overheads=o)[
                "sparse_flops"] for s in sparsities for o in (True, False))
            pre_fl += prefill_rounds * (dense + sparse)
            pre_fixed += prefill_rounds * (1 + 2 * len(sparsities)) * spec.L * 4e-4  # engine overhead per layer
    est = {"tests": 60.0, "ffn": ffn_fl / rate + ffn_fixed, "prefill": pre_fl / rate + pre_fixed,
           "startup": 20.0}
    est = {k: round(v, 1) for k, v in est.items()}
    est["total"] = round(sum(est.values()), 1)
    return {"seconds": est, "assumed_tflops": tflops, "assumed_efficiency": efficiency,
            "ffn_flops": ffn_fl, "prefill_flops": pre_fl, "applies_to": "an H200" if not dry_run else
            "an H200 (this is a dry run: the estimate is of the GPU settings' sizes, not of this run)"}


# ----------------------------------------------------------------------------- stage a: tests
def _junit_results(path: Path) -> dict:
    """Counts and failure texts from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures, budget = [], 60_000
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is None:
                continue
            text = ((el.get("message") or "") + "\n" + (el.text or "")).strip()
            text = text[-FAILURE_CAP:]
            budget -= len(text)
            failures.append({"nodeid": f"{case.get('classname', '')}::{case.get('name', '')}", "kind": kind,
                             "text": text if budget > 0 else "(cut: the failure texts' cap was reached)"})
    skipped = [f"{c.get('classname', '')}::{c.get('name', '')}: {(c.find('skipped').get('message') or '')[:300]}"
               for c in root.iter("testcase") if c.find("skipped") is not None]
    return {"counts": counts, "failures": failures, "skipped": skipped}


def _verbose_results(output: str) -> dict[str, str]:
    """nodeid -> PASSED / FAILED / ERROR / SKIPPED from pytest -v lines (also xdist's '[gw0] PASSED nodeid')."""
    import re

    seen = {}
    for m in re.finditer(r"^(?:\[gw\d+\]\s+\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)"
                         r"|^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M):
        status, node = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        seen[node] = status
    return seen


def stage_tests(args: argparse.Namespace, env: dict, out: Path, deadline: float) -> str:
    """Stage a: run the kernel and engine tests in a pytest subprocess; write gpu_tests.json."""
    paths = args.test_paths or (DRY_TEST_PATHS if args.dry_run_cpu else TEST_PATHS)
    junit = Path("/tmp") / f"ffcore_gpu_tests_{os.getpid()}.xml"
    cmd = [sys.executable, "-m", "pytest", *paths, "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra",
           "--color=no", f"--junitxml={junit}"]
    workers = 0 if args.dry_run_cpu else args.test_workers
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    else:
        workers = 0
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout=120"]
    child_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), PYTHONUNBUFFERED="1")
    if args.dry_run_cpu:
        child_env["TRITON_INTERPRET"] = "1"
    else:
        child_env.pop("TRITON_INTERPRET", None)
    timeout = max(5.0, deadline - time.monotonic())
    settings = {"paths": paths, "command": cmd[1:], "workers": workers, "timeout_s": round(timeout, 1),
                "triton_interpret": child_env.get("TRITON_INTERPRET")}
    sf = StageFile(out / FILES["tests"], header("tests", args.dry_run_cpu, env, settings))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest we started and its xdist workers
        output, _ = proc.communicate()
    print(output[-4000:], flush=True)
    doc = sf.doc
    doc.update({"returncode": proc.returncode, "timed_out": timed_out, "duration_s": round(time.monotonic() - t0, 2),
                "output_tail": output[-OUTPUT_CAP:]})
    if junit.exists():
        res = _junit_results(junit)
        c = res["counts"]
        doc["summary"] = {"total": c["tests"], "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"],
                          "failed": c["failures"], "errors": c["errors"], "skipped": c["skipped"]}
        doc["failures"], doc["skipped"] = res["failures"], res["skipped"]
        junit.unlink()
    else:  # killed at the time box (or crashed): count the verbose per-test lines printed so far
        seen = _verbose_results(output)
        statuses = list(seen.values())
        doc["summary"] = {"total": len(seen), "passed": statuses.count("PASSED"), "failed": statuses.count("FAILED"),
                          "errors": statuses.count("ERROR"), "skipped": statuses.count("SKIPPED"),
                          "incomplete": True}
        doc["failures"] = [{"nodeid": n, "kind": v.lower(), "text": "(no junit report: see output_tail)"}
                           for n, v in seen.items() if v in ("FAILED", "ERROR")]
        doc["skipped"] = [n for n, v in seen.items() if v == "SKIPPED"]
        doc["error"] = "pytest wrote no junit report (killed at the time box, or crashed); counts from its output"
    s = doc["summary"]
    status = "ok" if proc.returncode == 0 and not timed_out and s["total"] > 0 else "failed"
    sf.finish(status)
    print(f"[tests] {status}: {s}", flush=True)
    return status


# ----------------------------------------------------------------------------- stage b: FFN bench
def stage_ffn(args: argparse.Namespace, env: dict, out: Path, deadline: float) -> str:
    """Stage b: the FFN-module benchmark grid; write gpu_ffn_bench.json row by row."""
    import torch

    from ffcore.kernels import block_sparse_ffn  # optional dependency: imports triton

    bench = load_bench()
    if args.dry_run_cpu:
        models, block, device = DRY_FFN["models"], DRY_FFN["block_size"], "cpu"
        tokens, densities = args.ffn_tokens or DRY_FFN["tokens"], args.densities or DRY_FFN["densities"]
        warmup, repeats = 1, args.repeats or 2
    else:
        models, block, device = {m: bench.MODELS[m] for m in args.ffn_models}, bench.BLOCK, "cuda"
        tokens, densities = args.ffn_tokens or bench.TOKENS, args.densities or bench.DENSITIES
        warmup, repeats = FFN_WARMUP, args.repeats or FFN_REPEATS
    configs = bench.grid(models, tokens, densities)
    settings = bench.settings_record(block, warmup, repeats, args.tol, models, tokens, densities)
    settings["n_configs"] = len(configs)
    settings["time_box_s"] = round(deadline - time.monotonic(), 1)
    sf = StageFile(out / FILES["ffn"], header("ffn_bench", args.dry_run_cpu, env, settings))
    sf.doc["rows"] = []
    print(bench.format_table([]), flush=True)

    def on_row(row: dict) -> None:
        sf.doc["rows"].append(row)
        sf.write()
        extra = row.get("note") or row.get("error") or row.get("skipped") or ""
        print(bench.format_table([row], header=False) + (f"   ({extra})" if extra else ""), flush=True)

    rows = bench.run_grid(configs, block, block_sparse_ffn, device, torch.bfloat16, warmup, repeats, args.tol,
                          deadline=deadline, on_row=on_row, keep_going=True)
    sf.doc["autotune"] = bench.autotune_choices()
    bad = [r for r in rows if "error" in r]
    skipped = [r for r in rows if "skipped" in r]
    status = "failed" if len(bad) == len(rows) else "partial" if bad or skipped else "ok"
    sf.doc["n_errors"], sf.doc["n_skipped"] = len(bad), len(skipped)
    sf.finish(status)
    print(f"[ffn] {status}: {len(rows) - len(bad) - len(skipped)} measured, {len(bad)} errors, "
          f"{len(skipped)} skipped", flush=True)
    return status


# ----------------------------------------------------------------------------- stage c: prefill
class GivenExperts:
    """policy='random' experts, computed once per (layer, spans, K) and then handed out: no selection cost."""

    name = "random_given"

    def __init__(self, seed: int = 0) -> None:
        from ffcore.engine.policies import RandomPolicy

        self.inner = RandomPolicy(seed)
        self.cache: dict[tuple, Any] = {}

    def select(self, ctx: Any) -> Any:
        """The cached random experts of this layer's sparse blocks: [n_spans, K]."""
        key = (ctx.layer, ctx.offset, ctx.decode, ctx.k, tuple(ctx.spans))
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self.inner.select(ctx).contiguous()
        return hit


class Recorder:
    """Wraps a policy, keeping its last selection per layer (to replay the same experts on another backend)."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.name, self.seen = policy, getattr(policy, "name", "policy"), {}
        self.needs_first_block = bool(getattr(policy, "needs_first_block", False))  # the engine reads it

    def select(self, ctx: Any) -> Any:
        """The wrapped policy's experts, recorded."""
        idx = self.policy.select(ctx)
        self.seen[ctx.layer] = idx
        return idx


class Replay:
    """Hands out the experts a `Recorder` saw, layer by layer."""

    name = "replay"

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def select(self, ctx: Any) -> Any:
        """The recorded experts of this layer."""
        return self.seen[ctx.layer]


def build_model(spec: Any, device: str, dtype: Any, seed: int, init_std: float = 0.02) -> Any:
    """A LlamaForCausalLM with the spec's shape and random weights (HF's initialiser, normal(0, init_std)),
    on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.d, intermediate_size=spec.f,
                      num_hidden_layers=spec.L, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                      head_dim=spec.head_dim, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                      tie_word_embeddings=TIED_EMBEDDINGS.get(spec.name, False), initializer_range=init_std)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def build_trained_parts(spec: Any, device: str, dtype: Any, seed: int) -> tuple[Any, Any]:
    """A random-initialised ExpertPredictor and ErrorCompensator of the model's shapes (non-zero corrections)."""
    import torch

    from ffcore.compensator import ErrorCompensator
    from ffcore.predictor import ExpertPredictor

    torch.manual_seed(seed + 1)
    with torch.device(device):
        pred = ExpertPredictor(spec.L, spec.d, spec.f)
        comp = ErrorCompensator(spec.L, spec.d, spec.f)
    with torch.no_grad():
        pred.q.normal_(0.0, spec.d ** -0.5)  # a non-uniform pool (the trained q is not zero either)
        comp.w2.normal_(0.0, 0.01)  # the untrained compensator is exactly zero; make its output count
    return pred.to(dtype).eval().requires_grad_(False), comp.to(dtype).eval().requires_grad_(False)


def _variants(pred: Any, comp: Any, sparsities: Sequence[float], block: int, seed: int) -> list[dict]:
    from ffcore.engine.plan import SparsityPlan

    out = []
    for policy in POLICIES:
        for s in sparsities:
            dens = round(1.0 - s, 6)
            if policy == "random_given":
                plan = SparsityPlan(densities=dens, policy=GivenExperts(seed), block_size=block)
            else:
                plan = SparsityPlan(densities=dens, policy=pred, compensator=comp, block_size=block)
            out.append({"key": f"{policy}@{round(100 * s)}", "policy": policy, "sparsity": s, "density": dens,
                        "plan": plan, "overheads": policy != "random_given"})
    return out


def _plan_fields(plan: Any) -> dict:
    """What the JSON says about a plan (no weight digests: hashing the 8B predictor would cost seconds)."""
    return {"densities": plan.densities, "policy": plan.policy_name, "compensator": None if plan.compensator is None
            else repr(plan.compensator), "block_size": plan.block_size, "dense_first": plan.dense_first,
            "dense_last": plan.dense_last, "dense_tail": plan.dense_tail}


def _forward_with_mlp_io(model: Any, ids: Any, plan: Any = None, options: Any = None) -> tuple[Any, list, list]:
    """Last hidden state [T, d] and every layer's MLP input and output ([1, T, d] each) of one prefill."""
    import contextlib

    from ffcore.engine import sparsify
    from ffcore.models import decoder_layers

    ins: list = []
    outs: list = []

    def keep(module: Any, args: tuple, y: Any) -> None:
        ins.append(args[0].detach().clone())
        outs.append(y.detach().clone())

    with contextlib.nullcontext() if plan is None else sparsify(model, plan, options):
        hooks = [layer.mlp.register_forward_hook(keep) for layer in decoder_layers(model)]
        try:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]  # [1, T, d] -> [T, d]
        finally:
            for h in hooks:
                h.remove()
    return hidden, ins, outs


def prefill_checks(model: Any, variants: list[dict], T: int, block: int, device: str, seed: int) -> list[dict]:
    """Each sparse variant (Triton backend) against dense and against the engine's torch backend.

    Per layer: the MLP output on the first block vs the dense model's (the first block runs dense and its
    attention sees only itself, so it is the same computation), and the MLP output on the sparse blocks'
    rows vs the torch backend given the same input and the same experts (no drift from earlier layers).
    End to end (reported; not part of `ok`): the last hidden state vs a torch-backend prefill replaying the
    experts, and vs dense.
    """
    import torch

    from ffcore.engine import EngineOptions, sparsify
    from ffcore.models import decoder_layers

    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(device)
    layers = decoder_layers(model)
    rows = []
    with torch.no_grad():
        dense_h, _, dense_m = _forward_with_mlp_io(model, ids)
        spans = variants[0]["plan"].spans(T)[1]
        sp = torch.cat([torch.arange(s, e) for s, e in spans]).to(device)  # rows of the sparse blocks
        for v in variants:
            plan = v["plan"]
            rec = Recorder(plan.policy)
            tri_h, tri_in, tri_m = _forward_with_mlp_io(model, ids, plan.replace(policy=rec),
                                                        EngineOptions(backend="triton"))
            replay = plan.replace(policy=Replay(rec.seen))
            with sparsify(model, replay, EngineOptions(backend="torch")):
                ref_m = [layer.mlp(x) for layer, x in zip(layers, tri_in)]  # same inputs, same experts
            ref_h, _, _ = _forward_with_mlp_io(model, ids, replay, EngineOptions(backend="torch"))
            layer_err = [rel_err(a[0, sp], b[0, sp]) for a, b in zip(tri_m, ref_m)]
            first_err = [rel_err(a[0, :block], b[0, :block]) for a, b in zip(tri_m, dense_m)]
            row = {
                "variant": v["key"], "policy": v["policy"], "sparsity": v["sparsity"], "T": T,
                "mlp_rel_err_triton_vs_torch_backend": max(layer_err),
                "mlp_rel_err_triton_vs_torch_backend_per_layer": layer_err,
                "first_block_mlp_rel_err_vs_dense": max(first_err),
                "first_block_rel_err_vs_dense": rel_err(tri_h[:block], dense_h[:block]),
                "rel_err_triton_vs_torch_backend": rel_err(tri_h, ref_h),
                "max_abs_err_triton_vs_torch_backend": float((tri_h.float() - ref_h.float()).abs().max()),
                "sparse_vs_dense_mlp_rel_err": max(rel_err(a[0, sp], b[0, sp]) for a, b in zip(tri_m, dense_m)),
                "sparse_vs_dense_rel_err": rel_err(tri_h, dense_h),
                "finite": bool(torch.isfinite(tri_h).all()) and all(bool(torch.isfinite(m).all()) for m in tri_m),
                "first_block_tol": FIRST_BLOCK_TOL, "backend_tol": BACKEND_TOL, "layers_recorded": len(rec.seen),
            }
            row["ok"] = bool(row["finite"] and len(tri_m) == len(ref_m) == len(dense_m) == len(layers) > 0
                             and max(row["first_block_mlp_rel_err_vs_dense"], row["first_block_rel_err_vs_dense"])
                             <= FIRST_BLOCK_TOL and row["mlp_rel_err_triton_vs_torch_backend"] <= BACKEND_TOL)
            rows.append(row)
            del tri_in, tri_m, ref_m
            if isinstance(plan.policy, GivenExperts):
                plan.policy.cache.clear()
    return rows


def interleaved_forward_rounds(calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], repeats: int,
                               warmup: int, cuda: bool) -> tuple[Any, dict[str, list[float]]]:
    """Rounds of every call (order rotated per round) after `warmup` untimed rounds; returns an
    `ffcore.timing.TimingRecord` of the forward passes alone and each call's context enter+exit seconds.

    calls: name -> (context factory, forward). The context (e.g. `sparsify(model, plan)`) is entered and
    left outside the timed region; the forward is timed between CUDA events after a synchronisation
    (perf_counter on CPU), so the GPU's wait for Python's kernel launches is in the time.
    """
    import torch

    from ffcore import timing

    names = list(calls)
    for _ in range(warmup):
        for name in names:
            ctx, fwd = calls[name]
            with ctx():
                fwd()
    load0 = timing.load_1min()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    ctx_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            ctx, fwd = calls[name]
            t0 = time.perf_counter()
            with ctx():
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    c0 = time.process_time()
                    start.record()
                    fwd()
                    end.record()
                    end.synchronize()
                    wall[name].append(start.elapsed_time(end) / 1e3)
                else:
                    c0, w0 = time.process_time(), time.perf_counter()
                    fwd()
                    wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
                t2 = time.perf_counter()
            ctx_s[name].append((t1 - t0) + (time.perf_counter() - t2))
    rec = timing.TimingRecord(wall, cpu, repeats, warmup, torch.get_num_threads(), timing.load_1min(), load0)
    return rec, ctx_s


def time_prefill(model: Any, spec: Any, variants: list[dict], T: int, warmup: int, repeats: int, device: str,
                 seed: int) -> list[dict]:
    """Interleaved rounds (dense and every sparse variant, order rotated) at one context length: one row each."""
    import contextlib

    import torch

    from ffcore import flops, timing
    from ffcore.engine import EngineOptions, sparsify

    g = torch.Generator(device="cpu").manual_seed(seed + T)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(device)
    opts = EngineOptions(backend="triton")
    last: dict[str, Any] = {}

    def forward(name: str) -> Callable[[], None]:
        def run() -> None:
            last[name] = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits  # [1, 1, vocab]
        return run

    calls = {"dense": (contextlib.nullcontext, forward("dense"))}
    for v in variants:
        calls[v["key"]] = ((lambda plan=v["plan"]: sparsify(model, plan, opts)), forward(v["key"]))
    with torch.no_grad():
        rec, ctx_s = interleaved_forward_rounds(calls, repeats, warmup, device == "cuda")
    dense_fl = flops.plan_speedup(spec, T, variants[0]["plan"].replace(densities=1.0), overheads=False)["dense_flops"]
    rows = []
    for name in calls:
        q25, med, q75 = timing.quartiles(rec.wall_s[name])
        row = {"model": spec.name, "T": T, "variant": name, "median_ms": med * 1e3, "q25_ms": q25 * 1e3,
               "q75_ms": q75 * 1e3, "iqr_ms": (q75 - q25) * 1e3, "all_ms": [round(t * 1e3, 4) for t in rec.wall_s[name]],
               "context_enter_exit_ms": timing.quartiles(ctx_s[name])[1] * 1e3,
               "finite": bool(torch.isfinite(last[name]).all()), **rec.conditions()}
        if name == "dense":
            row.update({"policy": "dense", "sparsity": 0.0, "density": 1.0, "flops": dense_fl,
                        "achieved_tflops": dense_fl / med / 1e12})
        else:
            v = next(v for v in variants if v["key"] == name)
            fm = flops.plan_speedup(spec, T, v["plan"], overheads=v["overheads"])
            row.update({"policy": v["policy"], "sparsity": v["sparsity"], "density": v["density"],
                        "flops": fm["sparse_flops"], "achieved_tflops": fm["sparse_flops"] / med / 1e12,
                        **timing.ratio(rec, "dense", name), "flop_speedup": fm["speedup"],
                        "flop_ffn_speedup": fm["ffn_speedup"], "flop_overheads": v["overheads"],
                        "predictor_flops": fm["predictor_flops"], "compensator_flops": fm["compensator_flops"],
                        "sparse_blocks": fm["sparse_blocks"], "plan": _plan_fields(v["plan"])})
            row["frac_of_flop_model"] = row["speedup"] / fm["speedup"]
        rows.append(row)
    for v in variants:
        if isinstance(v["plan"].policy, GivenExperts):
            v["plan"].policy.cache.clear()
    return rows


def stage_prefill(args: argparse.Namespace, env: dict, out: Path, deadline: float) -> str:
    """Stage c: end-to-end prefill, dense vs sparsify, per model and context length; write gpu_prefill.json."""
    import torch

    from ffcore import flops
    from ffcore.engine import sparse_ffn

    dry = args.dry_run_cpu
    device, dtype = ("cpu", torch.bfloat16) if dry else ("cuda", torch.bfloat16)
    if dry:
        specs = [flops.ModelSpec(**DRY_SPEC)]
        tokens, sparsities, block = args.prefill_tokens or DRY_PREFILL["tokens"], \
            args.sparsities or DRY_PREFILL["sparsities"], DRY_PREFILL["block_size"]
        warmup, repeats = 1, args.repeats or 2
    else:
        specs = [flops.builtin_spec(m) for m in args.prefill_models]
        tokens, sparsities, block = args.prefill_tokens or PREFILL_TOKENS, args.sparsities or SPARSITIES, 128
        warmup, repeats = PREFILL_WARMUP, args.repeats or PREFILL_REPEATS
    tokens = sorted(tokens)
    settings = {
        "models": {s.name: {"d": s.d, "f": s.f, "L": s.L, "heads": s.heads, "kv_heads": s.kv_heads,
                            "head_dim": s.head_dim, "vocab": s.vocab, "tie_word_embeddings":
                            TIED_EMBEDDINGS.get(s.name, False)} for s in specs},
        "tokens": tokens, "sparsities": list(sparsities), "policies": list(POLICIES), "block_size": block,
        "dtype": "bfloat16", "warmup": warmup, "repeats": repeats, "backend": "triton", "seed": args.seed,
        "weights": f"random (transformers' initialiser, std {DRY_INIT_STD if dry else 0.02}); speed does not depend "
                   "on the values. No rope "
                   "scaling or rope_theta from the real configs (elementwise, no FLOPs).",
        "predictor": "ExpertPredictor(L, d, f), random (q ~ N(0, 1/d)); its cost is counted (policy per sparse block)",
        "compensator": "ErrorCompensator(L, d, f), plain, random (w2 ~ N(0, 0.01^2)); added to every sparse block",
        "random_given": "policy='random' experts computed in the warm-up and then handed out (no selection cost)",
        "timing": "rounds of dense and every sparse variant, order rotated per round; each forward "
                  "model(input_ids, use_cache=False, logits_to_keep=1) timed between CUDA events after "
                  "torch.cuda.synchronize() (perf_counter on CPU). Sparse forwards run inside ffcore.engine."
                  "sparsify(model, plan, EngineOptions(backend='triton')), entered and left outside the timed "
                  "region (its cost is context_enter_exit_ms); speedups are medians of per-round ratios "
                  "(ffcore.timing.ratio)",
        "flop_model": "ffcore.flops.plan_speedup(spec, T, plan, overheads=True for predictor+compensator, "
                      "False for random_given), causal pairs",
        "checks": f"at T={tokens[0]}, relative Frobenius errors, worst layer: each variant's MLP output on the "
                  f"first block vs the dense model's (tolerance {FIRST_BLOCK_TOL}; also the last hidden state) and "
                  f"on the sparse blocks' rows vs the engine's torch backend given the same input and experts "
                  f"({BACKEND_TOL}); end-to-end hidden-state errors vs a torch-backend prefill and vs dense are "
                  f"reported. Variants are timed either way; their rows carry check_ok",
        "time_box_s": round(deadline - time.monotonic(), 1),
    }
    sf = StageFile(out / FILES["prefill"], header("prefill", dry, env, settings))
    sf.doc.update({"rows": [], "checks": [], "models": {}, "errors": []})
    bad = skipped = 0
    for spec in specs:
        info: dict[str, Any] = {}
        sf.doc["models"][spec.name] = info
        if time.monotonic() > deadline - (15 if dry else 40):
            info["skipped"] = "time box reached before this model"
            skipped += 1
            sf.write()
            continue
        model = pred = comp = None
        try:
            t0 = time.monotonic()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model = build_model(spec, device, dtype, args.seed, DRY_INIT_STD if dry else 0.02)
            pred, comp = build_trained_parts(spec, device, dtype, args.seed)
            info.update({"build_s": round(time.monotonic() - t0, 2), "attn_implementation":
                         getattr(model.config, "_attn_implementation", None),
                         "params": sum(p.numel() for p in model.parameters()),
                         "predictor_params": sum(p.numel() for p in pred.parameters()),
                         "compensator_params": sum(p.numel() for p in comp.parameters())})
            variants = _variants(pred, comp, sparsities, block, args.seed)
            t0 = time.monotonic()
            try:
                checks = prefill_checks(model, variants, tokens[0], block, device, args.seed)
            except Exception as err:  # noqa: BLE001 - recorded; the timing still runs, its rows say check_ok None
                checks = []
                info["check_error"] = f"{type(err).__name__}: {err}"[:2000]
                sf.doc["errors"].append({"model": spec.name, "where": "checks",
                                         "traceback": traceback.format_exc()[-4000:]})
                bad += 1
                if device == "cuda":
                    torch.cuda.empty_cache()
            info["check_s"] = round(time.monotonic() - t0, 2)
            ok = {c["variant"]: c["ok"] for c in checks}
            sf.doc["checks"] += [{"model": spec.name, **c} for c in checks]
            sf.write()
            print(f"[prefill] {spec.name} checks: " + ", ".join(
                f"{c['variant']} {'ok' if c['ok'] else 'FAILED'} (first block {c['first_block_mlp_rel_err_vs_dense']:.1e}, "
                f"vs torch {c['mlp_rel_err_triton_vs_torch_backend']:.1e})" for c in checks), flush=True)
            last: tuple[int, float] | None = None  # (T, seconds) of the last measured length
            for T in tokens:
                left = deadline - time.monotonic()
                need = 0.0 if last is None else last[1] * T / last[0] * 1.15  # attention grows faster than T
                if need > left or left <= 0:
                    sf.doc["rows"].append({"model": spec.name, "T": T, "skipped": f"time box: ~{need:.0f} s "
                                           f"needed, {left:.0f} s left"})
                    skipped += 1
                    sf.write()
                    continue
                t0 = time.monotonic()
                try:
                    rows = time_prefill(model, spec, variants, T, warmup, repeats, device, args.seed)
                except Exception as err:  # noqa: BLE001 - recorded; the next length may still fit
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    sf.doc["rows"].append({"model": spec.name, "T": T, "error": f"{type(err).__name__}: {err}"[:2000]})
                    bad += 1
                    sf.write()
                    continue
                last = (T, time.monotonic() - t0)
                for r in rows:
                    r["check_ok"] = ok.get(r["variant"]) if r["variant"] != "dense" else True  # None: not checked
                sf.doc["rows"] += rows
                sf.write()
                d = next(r for r in rows if r["variant"] == "dense")
                print(f"[prefill] {spec.name} T={T}: dense {d['median_ms']:.1f} ms; " + ", ".join(
                    f"{r['variant']} x{r['speedup']:.2f} (FLOP model x{r['flop_speedup']:.2f})"
                    for r in rows if r["variant"] != "dense"), flush=True)
            if device == "cuda":
                info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as err:  # noqa: BLE001 - recorded; the next model still runs
            bad += 1
            info["error"] = f"{type(err).__name__}: {err}"[:2000]
            sf.doc["errors"].append({"model": spec.name, "traceback": traceback.format_exc()[-4000:]})
            print(f"[prefill] {spec.name} failed: {info['error']}", flush=True)
        finally:
            del model, pred, comp
            sparse_ffn.clear_cache()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            sf.write()
    measured = [r for r in sf.doc["rows"] if "median_ms" in r]
    failed_checks = [c for c in sf.doc["checks"] if not c["ok"]]
    status = "failed" if not measured else "partial" if bad or skipped or failed_checks else "ok"
    sf.doc["n_failed_checks"] = len(failed_checks)
    sf.finish(status)
    print(f"[prefill] {status}: {len(measured)} rows, {len(failed_checks)} failed checks, {bad} errors, "
          f"{skipped} skipped", flush=True)
    return status


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: the GPU run sized for ~6 minutes on an H200; tiny ones with --dry-run-cpu)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON files (on the device: $OUT)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="no GPU: every stage on tiny shapes under TRITON_INTERPRET=1 (measures nothing)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--test-paths", nargs="+", default=None, help="pytest arguments of stage a (default: the suite)")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers for stage a on the GPU")
    ap.add_argument("--ffn-models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"],
                    choices=["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
    ap.add_argument("--ffn-tokens", nargs="+", type=int, default=None)
    ap.add_argument("--densities", nargs="+", type=float, default=None, help="stage b densities")
    ap.add_argument("--prefill-models", nargs="+", default=list(PREFILL_MODELS), choices=list(TIED_EMBEDDINGS))
    ap.add_argument("--prefill-tokens", nargs="+", type=int, default=None)
    ap.add_argument("--sparsities", nargs="+", type=float, default=None, help="stage c FFN sparsities")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls/rounds (stage b and c)")
    ap.add_argument("--tol", type=float, default=3e-2, help="stage b: max |err| / max |ref| of the sparse variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="all stages together (seconds)")
    ap.add_argument("--git-commit", default=None, help="the commit of the tree, when the copy has no .git")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the stages; exit code 0 when every stage ran (their own status is in the JSON), 2 without a GPU."""
    args = parse_args(argv)
    t_start = time.monotonic()
    if args.dry_run_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    else:
        interp = os.environ.pop("TRITON_INTERPRET", None)
        if interp not in (None, "", "0"):
            print(f"TRITON_INTERPRET={interp} was set; unset for this GPU run", flush=True)
    kernels_import = ensure_kernels_importable()
    import torch

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("gpu_run.py needs a CUDA GPU and none is available; use --dry-run-cpu to rehearse on CPU",
              file=sys.stderr)
        return 2
    bench = load_bench()
    env = {**bench.environment(), "kernels_import": kernels_import, "source_digest": source_digest(),
           "git_commit_given": args.git_commit, "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    from ffcore import flops

    ffn_configs = bench.grid({m: bench.MODELS[m] for m in args.ffn_models}, args.ffn_tokens or bench.TOKENS,
                             args.densities or bench.DENSITIES)
    est = estimate(args.dry_run_cpu, ffn_configs, [flops.builtin_spec(m) for m in args.prefill_models],
                   args.prefill_tokens or PREFILL_TOKENS, args.sparsities or SPARSITIES,
                   FFN_WARMUP + (args.repeats or FFN_REPEATS), PREFILL_WARMUP + (args.repeats or PREFILL_REPEATS))
    print(f"estimate on an H200: {est['seconds']}", flush=True)
    manifest = StageFile(args.out / FILES["run"], {
        "schema": SCHEMA, "stage": "run", "dry_run": args.dry_run_cpu, "note": DRY_NOTE if args.dry_run_cpu
        else GPU_NOTE, "status": "running", "created_utc": utc(), "env": env, "estimate": est,
        "settings": {"stages": args.stages, "caps_s": CAPS, "budget_s": args.budget_s}, "stages": {}})
    runners = {"tests": stage_tests, "ffn": stage_ffn, "prefill": stage_prefill}
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.monotonic()
        deadline = min(t0 + CAPS[stage], t_start + args.budget_s)
        print(f"\n=== stage {stage} (time box {deadline - t0:.0f} s) ===", flush=True)
        try:
            status = runners[stage](args, env, args.out, deadline)
            entry = {"status": status}
        except Exception as err:  # noqa: BLE001 - the next stage still runs; the error is in the manifest
            traceback.print_exc()
            entry = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
        entry.update({"file": FILES[stage], "duration_s": round(time.monotonic() - t0, 2)})
        manifest.doc["stages"][stage] = entry
        manifest.write()
    statuses = [e["status"] for e in manifest.doc["stages"].values()]
    manifest.doc["total_s"] = round(time.monotonic() - t_start, 2)
    manifest.finish("ok" if statuses and all(s == "ok" for s in statuses) else "partial" if any(
        s in ("ok", "partial") for s in statuses) else "failed")
    print(f"\n{json.dumps({k: v['status'] for k, v in manifest.doc['stages'].items()})} in "
          f"{manifest.doc['total_s']:.0f} s; files in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
