"""Reading the GPU session's JSON files into flat rows, and the GPU figures, on synthetic files."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from ffcore.experiments import gpu_results  # noqa: E402
from ffcore.plots import gpu as gpu_plots  # noqa: E402

ENV = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "transformers": "5.17.0",
       "cuda": "13.0", "git_commit": "abc123", "git_commit_given": None}


def _doc(stage: str, dry: bool = False, **extra) -> dict:
    return {"schema": "ffcore.gpu_run/1", "stage": stage, "dry_run": dry, "note": "x", "status": "ok",
            "created_utc": "2026-11-20T10:00:00Z", "env": ENV, "settings": {}, **extra}


def _ffn_row(model: str, T: int, dens: float, speed: float) -> dict:
    return {"model": model, "d": 2048, "f": 8192, "T": T, "density": dens, "triton_ms": 1.0, "dense_ms": speed,
            "speedup_triton_vs_dense": speed, "speedup_triton_vs_dense_q25": speed - 0.05,
            "speedup_triton_vs_dense_q75": speed + 0.05, "speedup_triton_vs_dense_all": [speed] * 3,
            "speedup_gather_vs_dense": speed - 0.3, "flop_ideal_speedup": speed + 0.2,
            "frac_ideal_triton": speed / (speed + 0.2), "triton_all_ms": [1.0, 1.0, 1.0]}


def _prefill_row(model: str, T: int, variant: str, policy: str, sp: float, speed: float | None) -> dict:
    row = {"model": model, "T": T, "variant": variant, "policy": policy, "sparsity": sp, "median_ms": 10.0,
           "q25_ms": 9.0, "q75_ms": 11.0, "all_ms": [9.0, 10.0, 11.0]}
    if speed is not None:
        row.update({"speedup": speed, "speedup_q25": speed - 0.02, "speedup_q75": speed + 0.03,
                    "speedup_all": [speed] * 3, "flop_speedup": speed + 0.1})
    return row


def _write(folder: Path, name: str, doc) -> None:
    (folder / name).write_text(json.dumps(doc))


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    ffn = [_ffn_row(m, T, dens, 1.2 + 0.1 * i) for m in ("llama-3.2-1b", "llama-3.1-8b")
           for i, T in enumerate((1024, 4096)) for dens in (0.5, 0.7)]
    ffn.append({"model": "llama-3.1-8b", "T": 16384, "density": 0.5, "skipped": "time box"})
    _write(tmp_path, "gpu_ffn_bench.json", _doc("ffn_bench", rows=ffn))
    pre = []
    for m in ("llama-3.2-1b", "llama-3.1-8b"):
        for T in (1024, 2048):
            pre.append(_prefill_row(m, T, "dense", "dense", 0.0, None))
            for pol in ("predictor+compensator", "random_given"):
                for sp in (0.3, 0.5):
                    pre.append(_prefill_row(m, T, f"{pol}@{round(sp * 100)}", pol, sp, 1.1 + sp))
    pre.append({"model": "llama-3.1-8b", "T": 16384, "error": "OutOfMemoryError: ..."})
    checks = [{"model": "llama-3.2-1b", "variant": "random_given@30", "ok": True, "T": 1024,
               "first_block_rel_err_vs_dense": 0.0, "rel_err_triton_vs_torch_backend": 0.004}]
    _write(tmp_path, "gpu_prefill.json", _doc("prefill", rows=pre, checks=checks))
    _write(tmp_path, "gpu_tests.json", _doc("tests", summary={"total": 57, "passed": 56, "failed": 1, "errors": 0,
                                                              "skipped": 0},
                                            failures=[{"nodeid": "kernels/tests/x.py::test_y", "text": "boom"}],
                                            duration_s=40.0, timed_out=False))
    _write(tmp_path, "gpu_run.json", _doc("run", stages={"tests": {"status": "partial", "duration_s": 40.0},
                                                         "ffn": {"status": "ok", "duration_s": 80.0}}))
    return tmp_path


def test_no_files_give_no_rows(tmp_path):
    assert gpu_results.gpu_rows(tmp_path) == []
    assert gpu_results.ffn_rows(tmp_path / "missing") == []
    assert gpu_results.prefill_rows(tmp_path) == [] and gpu_results.check_rows(tmp_path) == []
    assert gpu_results.native_test_rows(tmp_path) == []


def test_rows_are_flat_with_provenance(results):
    ffn = gpu_results.ffn_rows(results)
    assert len(ffn) == 8  # the skipped configuration is not a measured row
    assert all(r["stage"] == "ffn_bench" and r["device"] == "NVIDIA H200" and r["file"] == "gpu_ffn_bench.json"
               and r["git_commit"] == "abc123" and r["triton"] == "3.6.0" for r in ffn)
    assert len(gpu_results.gpu_rows(results, "ffn_bench")) == 9  # all rows, the skipped one too
    pre = gpu_results.prefill_rows(results)
    assert len(pre) == 2 * 2 * 5 and {r["variant"] for r in pre if r["policy"] == "dense"} == {"dense"}
    assert gpu_results.check_rows(results)[0]["rel_err_triton_vs_torch_backend"] == 0.004
    (t,) = gpu_results.native_test_rows(results)
    assert (t["passed"], t["failed"], t["failed_tests"]) == (56, 1, ["kernels/tests/x.py::test_y"])
    run = gpu_results.gpu_rows(results, "run")
    assert {r["step"]: r["status"] for r in run} == {"tests": "partial", "ffn": "ok"}
    compact = gpu_results.ffn_rows(results, samples=False)
    assert not any(k.endswith("_all") or k.endswith("_all_ms") for r in compact for k in r)
    with pytest.raises(ValueError, match="unknown stage"):
        gpu_results.gpu_rows(results, "bogus")


def test_dry_runs_are_left_out_unless_asked(tmp_path):
    _write(tmp_path, "gpu_ffn_bench.json", _doc("ffn_bench", dry=True, rows=[_ffn_row("tiny", 96, 0.5, 0.2)]))
    assert gpu_results.ffn_rows(tmp_path) == []
    (row,) = gpu_results.ffn_rows(tmp_path, include_dry_run=True)
    assert row["dry_run"] is True


def test_foreign_broken_and_standalone_files(tmp_path):
    _write(tmp_path, "gpu_other.json", {"rows": [1, 2]})  # not ours: ignored
    (tmp_path / "gpu_cut.json").write_text('{"schema": "ffcore.gpu_run/1", "rows": [')  # cut short by a kill
    standalone = {"benchmark": "FFN module: Triton block-sparse vs dense cuBLAS vs torch gather+bmm",
                  "device": "NVIDIA H100", "torch": "2.11", "git_commit": "def", "rows": [_ffn_row("m", 1024, 0.5, 1.3)]}
    _write(tmp_path, "gpu_ffn_bench_h100.json", standalone)
    (tmp_path / "other.json").write_text(json.dumps(_doc("ffn_bench", rows=[_ffn_row("m", 1, 0.5, 1.0)])))
    with pytest.warns(UserWarning, match="gpu_cut.json"):
        rows = gpu_results.ffn_rows(tmp_path)
    assert [(r["device"], r["git_commit"], r["dry_run"]) for r in rows] == [("NVIDIA H100", "def", False)]


def test_ffn_figure_has_a_panel_per_shape_with_iqr_bars(results):
    fig = gpu_plots.plot_gpu_ffn_speedup(gpu_results.ffn_rows(results))
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["llama-3.2-1b", "llama-3.1-8b"]
    bars = [c for c in axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # one per density
    assert "NVIDIA H200" in fig._suptitle.get_text() and "DRY RUN" not in fig._suptitle.get_text()
    plt.close(fig)
    fig = gpu_plots.plot_gpu_ffn_fraction(gpu_results.ffn_rows(results))
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    plt.close(fig)


def test_prefill_figure_has_measured_beside_the_flop_model(results):
    fig = gpu_plots.plot_gpu_prefill_speedup(gpu_results.prefill_rows(results))
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 * 2  # policies x sparsities
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 2  # the FLOP model, one per sparsity
    assert sorted(dashed[0].get_ydata()) == pytest.approx([1.1 + 0.3 + 0.1] * 2)
    plt.close(fig)


def test_figures_say_dry_run_and_refuse_nothing_to_plot(tmp_path):
    rows = [{**_ffn_row("tiny", 96, 0.5, 0.2), "dry_run": True, "device": "cpu (no CUDA device)"}]
    fig = gpu_plots.plot_gpu_ffn_speedup(rows)
    assert "DRY RUN" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="no measured"):
        gpu_plots.plot_gpu_prefill_speedup([_prefill_row("m", 1024, "dense", "dense", 0.0, None)])
    with pytest.raises(ValueError, match="no measured"):
        gpu_plots.plot_gpu_ffn_speedup([])
