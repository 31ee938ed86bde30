"""Integration of the Triton kernels: the engine's weight layout, and the GPU benchmark script's CPU parts.

The kernels run on CPU in Triton's interpreter, which needs TRITON_INTERPRET=1 before triton is
first imported; kernels/tests/conftest.py sets it for a whole-suite run, and this module sets it
when run on its own. If triton was already imported natively on a GPU-less machine, the
kernel-launching tests here are skipped.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from ffcore.kernels import block_sparse_ffn  # noqa: E402
from ffcore.kernels._common import interpreting  # noqa: E402
from ffcore.kernels.block_sparse_ffn import block_sparse_ffn_gathered_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
can_launch = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(),
    reason="triton was imported without TRITON_INTERPRET=1 on a machine without CUDA",
)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_ffn", ROOT / "scripts" / "bench_gpu_ffn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


# ----------------------------------------------------------------------------- engine layout
class _MLP(torch.nn.Module):
    """A tiny HF-style gated MLP."""

    def __init__(self, d: int, f: int, act: torch.nn.Module) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)
        self.act_fn = act


@can_launch
@pytest.mark.parametrize("act_mod", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")], ids=["silu", "gelu_tanh"])
def test_kernels_on_engine_layout_match_engine(act_mod):
    """block_sparse_ffn on ffcore.engine.sparse_ffn's fused weights == the engine's per-block torch path."""
    sparse_ffn = pytest.importorskip("ffcore.engine.sparse_ffn")
    torch.manual_seed(0)
    d, f, K, B, T = 48, 96, 40, 16, 75
    mlp = _MLP(d, f, act_mod).to(DEVICE)
    fused = sparse_ffn.fused_ffn(mlp)
    assert fused.act_name in ("silu", "gelu_tanh")
    x = torch.randn(T, d, device=DEVICE)
    starts = [16, 32, 64]  # the last (block 4) is partial: 11 rows
    idx = torch.stack([torch.randperm(f)[:K] for _ in starts]).to(torch.int32).to(DEVICE)
    with torch.no_grad():
        y = block_sparse_ffn(x, fused.w_gu, fused.w_down_t, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                             idx, B, fused.act_name)
        for j, s in enumerate(starts):
            e = min(s + B, T)
            ref = sparse_ffn.sparse_block_forward(x[s:e], fused, idx[j].long())
            torch.testing.assert_close(y[s:e], ref, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- bench script
def test_experts_and_rows():
    assert bench.experts_for(0.5, 8192) == 4096
    assert bench.experts_for(0.6, 8192) == 4915
    assert bench.experts_for(0.7, 14336) == 10035
    assert bench.dense_sparse_rows(1024, 128) == (256, 768)
    assert bench.dense_sparse_rows(300, 128) == (128 + 128, 44)  # full-block tail: the last 128 tokens
    assert bench.dense_sparse_rows(300, 128, tail="grid") == (128 + 44, 128)  # grid tail: the 44-token remainder
    assert bench.dense_sparse_rows(200, 128) == (200, 0)
    assert bench.dense_sparse_rows(1024, 128, dense_first=False, dense_last=False) == (0, 1024)
    with pytest.raises(ValueError):
        bench.experts_for(0.0, 100)


def test_flop_ideal_speedup():
    assert bench.flop_ideal_speedup(1024, 2048, 8192, 0.5) == pytest.approx(8 / (2 + 6 * 0.5))
    assert bench.flop_ideal_speedup(16384, 4096, 14336, 0.5) == pytest.approx(128 / (2 + 126 * 0.5))
    assert bench.flop_ideal_speedup(4096, 2048, 8192, 0.5, dense_first=False, dense_last=False) == pytest.approx(2.0)
    assert bench.flop_ideal_speedup(200, 64, 256, 0.5) == pytest.approx(1.0)
    assert bench.flop_ideal_speedup(300, 64, 256, 0.5) == pytest.approx(300 / (256 + 44 * 0.5))  # blocks of 128
    assert bench.flop_ideal_speedup(300, 64, 256, 0.5, tail="grid") == pytest.approx(300 / (172 + 128 * 0.5))
    assert bench.flop_ideal_speedup(300, 64, 256, 0.5, 64) == pytest.approx(300 / (128 + 172 * 0.5))
    # the d of the model cancels; more density -> less headroom
    assert bench.flop_ideal_speedup(2048, 3072, 8192, 0.7) < bench.flop_ideal_speedup(2048, 3072, 8192, 0.6)


@pytest.mark.parametrize("tail, nsb, n_dense", [("full", 7, 64 + 64), ("grid", 7, 64 + 8)])
def test_bench_variants_agree_on_cpu(tail, nsb, n_dense):
    # 520 tokens in blocks of 64: the full-block tail leaves a short (8-row) last sparse block
    p = bench.Problem(520, 64, 256, 0.5, 64, "cpu", torch.float32, tail=tail)
    assert p.nsb == nsb and p.K == 128 and p.dense_rows.numel() == n_dense
    y_ref = p.run_sparse(block_sparse_ffn_gathered_ref)
    torch.testing.assert_close(p.run_gather(), y_ref, rtol=1e-4, atol=1e-5)
    y_dense = p.run_dense()
    rows = p.dense_rows
    torch.testing.assert_close(y_ref[rows], y_dense[rows], rtol=1e-4, atol=1e-5)  # first/last block dense
    assert (y_ref - y_dense).abs().max() > 1e-3  # the sparse rows do differ at density 0.5
    full = bench.Problem(520, 64, 256, 1.0, 64, "cpu", torch.float32, tail=tail)  # all experts: sparse == dense
    torch.testing.assert_close(full.run_gather(), full.run_dense(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.run_sparse(block_sparse_ffn_gathered_ref), full.run_dense(), rtol=1e-4, atol=1e-5)


@can_launch
def test_bench_sparse_path_with_kernels_matches_gather():
    p = bench.Problem(200, 32, 64, 0.5, 16, DEVICE, torch.float32)  # 13 blocks, last partial (8 rows)
    torch.testing.assert_close(p.run_sparse(block_sparse_ffn), p.run_gather(), rtol=2e-4, atol=2e-4)


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--dry-run-cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "ideal x" in text and "tiny" in text
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_no_cuda_exits_cleanly(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_table_format():
    row = {k: None for k, _, _ in bench.COLUMNS} | {"model": "m", "T": 1024, "density": 0.5, "dense_ms": 1.0}
    text = bench.format_table([row])
    assert "n/a" in text and "1.000" in text and len(text.splitlines()) == 3


def test_bench_refuses_to_time_a_wrong_kernel():
    p = bench.Problem(384, 32, 64, 0.5, 64, "cpu", torch.float32)

    def wrong(x, w_gu, w_down_t, block_starts, idx, block_size, act, out=None):
        return block_sparse_ffn_gathered_ref(x, w_gu, w_down_t, block_starts, idx.flip(1).roll(1, 1), block_size,
                                             act, out) * 1.5

    errs = bench.check_variants(p, block_sparse_ffn_gathered_ref, 1e-4)
    assert errs["max_rel_err_triton"] == 0.0 and errs["max_rel_err_gather"] < 1e-4
    with pytest.raises(RuntimeError, match="not timing a wrong computation"):
        bench.check_variants(p, wrong, 3e-2)
