"""Block-sparse gated FFN on the GPU: `gather_gate_up` then `gather_down`, two launches per layer.

Only the sparse blocks are computed; rows of `out` outside them are left as they are, so
the caller can run the dense blocks (first/last) into the same `out` with cuBLAS.
"""
from __future__ import annotations

import sys

import torch

from ffcore.kernels._common import (
    act_code,
    act_torch,
    check_blocks,
    check_devices,
    check_inputs,
    check_tensor,
    interpreting,
)
from ffcore.kernels.gather_down import gather_down_ref, launch_gather_down
from ffcore.kernels.gather_gate_up import gather_gate_up_ref, launch_gather_gate_up

__all__ = ["block_sparse_ffn", "block_sparse_ffn_ref", "block_sparse_ffn_gathered_ref"]


def block_sparse_ffn(
    x: torch.Tensor,
    w_gu: torch.Tensor,
    w_down_t: torch.Tensor,
    block_starts: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    act: str,
    out: torch.Tensor | None = None,
    check_values: bool | None = None,
) -> torch.Tensor:
    """Sparse-block FFN rows of x [T, d] with experts idx [nsb, K] into out [T, d] (zeros if None).

    Equals W_down[:, M_b] (act(W_gate[M_b] x) * (W_up[M_b] x)) on every row of sparse block b,
    M_b = idx[b]. `idx` rows should hold distinct neurons (a repeated id counts twice).
    """
    T, d, f, nsb, K = check_inputs(x, w_gu, "w_gu", 2, block_starts, idx, block_size)
    code = act_code(act)
    check_tensor("w_down_t", w_down_t, 2, (x.dtype,))
    if tuple(w_down_t.shape) != (f, d):
        raise ValueError(f"w_down_t must be [f, d] = {(f, d)} to match w_gu {tuple(w_gu.shape)}; "
                         f"got {tuple(w_down_t.shape)}")
    if out is None:
        out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, 2, (x.dtype,), row_strided=True)
        if out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    device = check_devices(x=x, w_gu=w_gu, w_down_t=w_down_t, block_starts=block_starts, idx=idx, out=out)
    if check_values if check_values is not None else device.type != "cuda":
        check_blocks(block_starts, idx, T, f, block_size)
    # h rows padded to a multiple of 16 columns (zeros past K): aligned, vectorised h loads
    # in the down kernel even when K is not a multiple of 16.
    h = torch.empty((nsb, block_size, _round_up(max(K, 1), 16)), dtype=x.dtype, device=device)
    launch_gather_gate_up(x, w_gu, block_starts, idx, block_size, code, h)
    launch_gather_down(h, K, w_down_t, block_starts, idx, block_size, out)
    return out


def _round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


def block_sparse_ffn_ref(
    x: torch.Tensor,
    w_gu: torch.Tensor,
    w_down_t: torch.Tensor,
    block_starts: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    act: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense masked reference in fp32: the full gated FFN with every unselected neuron of a block zeroed."""
    T, d = x.shape
    f = w_gu.shape[0]
    xf, w = x.float(), w_gu.float()
    h = act_torch(act)(xf @ w[:, :d].T) * (xf @ w[:, d:].T)  # [T, f], all neurons
    mask = torch.zeros(T, f, dtype=torch.bool, device=x.device)
    rows = torch.zeros(T, dtype=torch.bool, device=x.device)
    for b, s in enumerate(block_starts.tolist()):
        e = min(s + block_size, T)
        mask[s:e, idx[b].long()] = True
        rows[s:e] = True
    y = (h * mask) @ w_down_t.float()  # [T, d]
    out = torch.zeros_like(x) if out is None else out
    out[rows] = y[rows].to(out.dtype)
    return out


def block_sparse_ffn_gathered_ref(
    x: torch.Tensor,
    w_gu: torch.Tensor,
    w_down_t: torch.Tensor,
    block_starts: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    act: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch stand-in for `block_sparse_ffn` with the same signature and rounding (h in x's dtype)."""
    out = torch.zeros_like(x) if out is None else out
    h = gather_gate_up_ref(x, w_gu, block_starts, idx, block_size, act)
    return gather_down_ref(h, w_down_t, block_starts, idx, block_size, out)


# ----------------------------------------------------------------------------- benchmark
if __name__ == "__main__":
    if not torch.cuda.is_available() or interpreting():
        print("block_sparse_ffn benchmark needs a CUDA GPU (and TRITON_INTERPRET unset); nothing to do on CPU.")
        sys.exit(0)
    import triton
    import triton.testing

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["T"],
            x_vals=[1024, 2048, 4096, 8192, 16384],
            line_arg="provider",
            line_vals=["triton", "dense-cublas"],
            line_names=["Triton block-sparse FFN (density 0.5)", "dense FFN F.linear"],
            ylabel="ms (median)",
            plot_name="block-sparse-ffn-d2048-f8192-bf16",
            args={"d": 2048, "f": 8192, "density": 0.5, "B": 128},
        )
    )
    def bench(T: int, provider: str, d: int, f: int, density: float, B: int) -> tuple[float, float, float]:
        """Time (ms) of the FFN over all blocks of a T-token sequence (every block sparse)."""
        dev, dt = "cuda", torch.bfloat16
        K = int(round(density * f))
        x = torch.randn(T, d, device=dev, dtype=dt)
        w_gu = torch.randn(f, 2 * d, device=dev, dtype=dt) / d**0.5
        w_down_t = torch.randn(f, d, device=dev, dtype=dt) / f**0.5
        starts = torch.arange(0, T, B, device=dev, dtype=torch.int32)
        idx = torch.stack([torch.randperm(f, device=dev)[:K] for _ in range(starts.numel())]).to(torch.int32)
        out = torch.empty_like(x)
        if provider == "triton":
            fn = lambda: block_sparse_ffn(x, w_gu, w_down_t, starts, idx, B, "silu", out=out)  # noqa: E731
        else:
            wg, wu, wd = w_gu[:, :d].contiguous(), w_gu[:, d:].contiguous(), w_down_t.t().contiguous()
            F = torch.nn.functional
            fn = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)  # noqa: E731
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])

    bench.run(print_data=True, show_plots=False)
