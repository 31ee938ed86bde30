"""scripts/gpu_run.py, rehearsed on CPU: `--dry-run-cpu` runs every stage on tiny shapes under Triton's
interpreter and must write the same JSON files as the GPU run, marked as a dry run, with the sparse
outputs compared against dense and reference outputs (not only timed).

The dry run (one subprocess, ~1 minute on two busy cores) is shared by the schema tests; the fuller dry
run with the default dry-run test selection runs only with FFCORE_SLOW_TESTS=1.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.py"
FILES = ("gpu_run.json", "gpu_tests.json", "gpu_ffn_bench.json", "gpu_prefill.json")
ENV_KEYS = ("device", "torch", "triton", "transformers", "cuda", "git_commit", "source_digest", "kernels_import")
slow = pytest.mark.skipif(os.environ.get("FFCORE_SLOW_TESTS") != "1", reason="slow; set FFCORE_SLOW_TESTS=1")


def _gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> dict:
    """The smallest dry run: one quick kernel-test file, one FFN shape, one tiny model at one length."""
    out = tmp_path_factory.mktemp("gpu_run_dry")
    proc = _dry_run(out, "--test-paths", "kernels/tests/test_kernel_common.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout, **{f: json.loads((out / f).read_text()) for f in FILES}}


def test_every_file_is_written_and_says_dry_run(dry):
    assert sorted(p.name for p in dry["out"].iterdir()) == sorted(FILES)  # no stray temporary files
    for name in FILES:
        doc = dry[name]
        assert doc["schema"] == "ffcore.gpu_run/1" and doc["dry_run"] is True
        assert "DRY RUN" in doc["note"] and "measures nothing" in doc["note"]
        assert doc["status"] == "ok", (name, doc.get("status"))
        assert all(k in doc["env"] for k in ENV_KEYS), (name, sorted(doc["env"]))
        assert doc["env"]["triton_interpret"] == "1" and doc["env"]["device"].startswith("cpu")
        assert {"created_utc", "finished_utc", "elapsed_s", "settings"} <= set(doc)
    assert {d["stage"] for d in (dry[f] for f in FILES)} == {"run", "tests", "ffn_bench", "prefill"}


def test_manifest_lists_the_stages_and_sizes_the_gpu_run(dry):
    run = dry["gpu_run.json"]
    assert list(run["stages"]) == ["tests", "ffn", "prefill"]
    assert all(s["status"] == "ok" and s["duration_s"] >= 0 for s in run["stages"].values())
    est = run["estimate"]["seconds"]
    # the GPU settings (not this dry run's) are sized to finish in about six minutes on an H200
    assert 180 <= est["total"] <= 420 and set(est) == {"tests", "ffn", "prefill", "startup", "total"}
    assert sum(run["settings"]["caps_s"].values()) <= run["settings"]["budget_s"]


def test_tests_stage_counts_results(dry):
    doc = dry["gpu_tests.json"]
    s = doc["summary"]
    assert s["total"] >= 1 and s["passed"] == s["total"] and s["failed"] == s["errors"] == 0
    assert doc["returncode"] == 0 and doc["timed_out"] is False and doc["failures"] == []
    assert doc["settings"]["triton_interpret"] == "1" and "passed" in doc["output_tail"]


def test_ffn_stage_checks_then_times(dry):
    doc = dry["gpu_ffn_bench.json"]
    reps = doc["settings"]["repeats"]
    (row,) = doc["rows"]
    assert row["max_rel_err_triton"] <= row["check_tol"] and row["max_rel_err_gather"] <= row["check_tol"]
    for v in ("dense", "triton", "gather_bmm"):
        assert len(row[f"{v}_all_ms"]) == reps
        assert row[f"{v}_q25_ms"] <= row[f"{v}_ms"] <= row[f"{v}_q75_ms"]
    assert len(row["speedup_triton_vs_dense_all"]) == reps
    assert row["speedup_triton_vs_dense_q25"] <= row["speedup_triton_vs_dense"] <= row["speedup_triton_vs_dense_q75"]
    assert row["flop_ideal_speedup"] > 1 and row["frac_ideal_triton"] == pytest.approx(
        row["speedup_triton_vs_dense"] / row["flop_ideal_speedup"])
    assert doc["settings"]["dtype"] == "bfloat16" and doc["n_errors"] == 0


def test_prefill_stage_compares_sparse_with_dense_and_reference(dry):
    doc = dry["gpu_prefill.json"]
    variants = {f"{p}@{round(100 * s)}" for p in doc["settings"]["policies"] for s in doc["settings"]["sparsities"]}
    checks = {c["variant"]: c for c in doc["checks"]}
    assert set(checks) == variants
    for c in checks.values():
        assert c["ok"] and c["finite"] and c["layers_recorded"] == 2
        for key in ("first_block_mlp_rel_err_vs_dense", "first_block_rel_err_vs_dense"):
            assert c[key] <= c["first_block_tol"]  # the first block is computed densely in every layer
        for key in ("mlp_rel_err_triton_vs_torch_backend", "rel_err_triton_vs_torch_backend"):
            assert c[key] <= c["backend_tol"]
        assert c["sparse_vs_dense_mlp_rel_err"] > 0.05  # the sparse blocks really were sparse
    reps = doc["settings"]["repeats"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == variants | {"dense"}
    for name, r in rows.items():
        assert len(r["all_ms"]) == reps and r["q25_ms"] <= r["median_ms"] <= r["q75_ms"] and r["finite"]
        assert r["context_enter_exit_ms"] >= 0  # measured apart from the forward
        if name != "dense":
            assert len(r["speedup_all"]) == reps and r["check_ok"] is True
            assert r["flop_speedup"] > 1 and r["flop_overheads"] == (r["policy"] == "predictor+compensator")
            assert r["frac_of_flop_model"] == pytest.approx(r["speedup"] / r["flop_speedup"])
    pred = next(r for r in rows.values() if r["policy"] == "predictor+compensator")
    assert pred["predictor_flops"] > 0 and pred["compensator_flops"] > 0
    given = next(r for r in rows.values() if r["policy"] == "random_given")
    assert given["predictor_flops"] == given["compensator_flops"] == 0
    assert doc["models"]["tiny-llama"]["attn_implementation"] == "sdpa"


def test_dry_run_results_feed_the_reader_and_figures(dry):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ffcore.experiments import gpu_results
    from ffcore.plots import gpu as gpu_plots

    assert gpu_results.ffn_rows(dry["out"]) == []  # dry runs are not results
    ffn = gpu_results.ffn_rows(dry["out"], include_dry_run=True)
    pre = gpu_results.prefill_rows(dry["out"], include_dry_run=True)
    assert len(ffn) == 1 and len(pre) == 3
    for fig in (gpu_plots.plot_gpu_ffn_speedup(ffn), gpu_plots.plot_gpu_prefill_speedup(pre)):
        assert "DRY RUN" in fig._suptitle.get_text()
        plt.close(fig)


def test_prefill_check_catches_a_wrong_sparse_result(monkeypatch):
    """A Triton path that computes the wrong experts fails the backend check; the dense first block still matches."""
    import ffcore.kernels
    from ffcore import flops
    from ffcore.kernels.block_sparse_ffn import block_sparse_ffn_gathered_ref

    gr = _gpu_run()
    spec = flops.ModelSpec(**gr.DRY_SPEC)
    model = gr.build_model(spec, "cpu", torch.float32, seed=0, init_std=gr.DRY_INIT_STD)
    pred, comp = gr.build_trained_parts(spec, "cpu", torch.float32, seed=0)
    variants = gr._variants(pred, comp, (0.5,), 32, seed=0)

    def wrong(x, w_gu, w_down_t, starts, idx, width, act, out=None):
        return block_sparse_ffn_gathered_ref(x, w_gu, w_down_t, starts, (idx + 1) % w_gu.shape[0], width, act, out)

    monkeypatch.setattr(ffcore.kernels, "block_sparse_ffn", wrong)
    for c in gr.prefill_checks(model, variants, 96, 32, "cpu", seed=0):
        assert not c["ok"] and c["mlp_rel_err_triton_vs_torch_backend"] > max(0.2, c["backend_tol"])
        assert c["first_block_mlp_rel_err_vs_dense"] <= 1e-6 and c["first_block_rel_err_vs_dense"] <= 1e-6


def test_test_stage_parsers(tmp_path):
    """Counts from a junit report, and from pytest -v lines when the run was killed before writing one."""
    gr = _gpu_run()
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="kernels.tests.t" name="test_a"/>'
                   '<testcase classname="kernels.tests.t" name="test_b"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="kernels.tests.t" name="test_c"><skipped message="no gpu"/></testcase>'
                   '</testsuite></testsuites>')
    res = gr._junit_results(xml)
    assert res["counts"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert res["failures"][0]["nodeid"] == "kernels.tests.t::test_b" and "boom" in res["failures"][0]["text"]
    out = ("kernels/tests/t.py::test_a PASSED   [ 10%]\nkernels/tests/t.py::test_b[x] FAILED   [ 20%]\n"
           "[gw1] [ 30%] PASSED tests/test_engine_triton.py::test_z\n[gw0] [ 40%] ERROR tests/e.py::test_e\n")
    assert gr._verbose_results(out) == {"kernels/tests/t.py::test_a": "PASSED", "kernels/tests/t.py::test_b[x]": "FAILED",
                                        "tests/test_engine_triton.py::test_z": "PASSED", "tests/e.py::test_e": "ERROR"}


def test_given_experts_are_computed_once():
    from ffcore.engine.policies import SelectContext
    from ffcore.engine.sparse_ffn import fused_ffn
    from ffcore.models import gated_mlps

    from ffcore import flops

    gr = _gpu_run()
    model = gr.build_model(flops.ModelSpec(**gr.DRY_SPEC), "cpu", torch.float32, seed=0)
    ctx = SelectContext(0, torch.randn(96, 32), [(32, 64)], 16, fused_ffn(gated_mlps(model)[0]), 32)
    pol = gr.GivenExperts(seed=3)
    a = pol.select(ctx)
    assert pol.select(ctx) is a and a.shape == (1, 16) and len(set(a[0].tolist())) == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_without_gpu_the_real_run_refuses(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "o").exists()


@slow
def test_default_dry_run(tmp_path):
    """The dry run as the device session would rehearse it (the default dry-run test selection)."""
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "gpu_run.json").read_text())
    assert all(s["status"] == "ok" for s in run["stages"].values())
