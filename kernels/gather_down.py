"""Gathered down projection of the block-sparse FFN, all sparse blocks in one Triton launch.

For sparse block b (rows [s_b, min(s_b + B, T))) with experts idx[b] ([K]) and its
intermediate activations h[b] ([B, K], from `gather_gate_up`):

    y[s_b + t, :] = sum_k h[b, t, k] * w_down_t[idx[b, k], :]

with `w_down_t` = W_down^T [f, d], so expert j's down weights are one contiguous row. The
result is written into rows of an output [T, d]; rows outside the sparse blocks are left
untouched. Accumulation is fp32. Grid: (block, token tile, output-column tile), flattened
to one axis with the column tile fastest.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from ffcore.kernels._common import (
    bf16_dot_workaround,
    check_blocks,
    check_devices,
    check_inputs,
    check_launchable,
    check_tensor,
    input_precision,
    interpreting,
    prune_token_tiles,
)

__all__ = ["gather_down", "gather_down_ref", "gather_down_kernel"]

INTERP_CONFIGS = [triton.Config({"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
GPU_CONFIGS = [
    triton.Config({"BLOCK_T": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_T": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
KEY = ["d", "K", "BLOCK_SIZE"]


@triton.autotune(
    configs=INTERP_CONFIGS if interpreting() else GPU_CONFIGS,
    key=KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": prune_token_tiles},
)
@triton.jit
def gather_down_kernel(
    h_ptr,  # [nsb, BLOCK_SIZE, KP], strides (stride_hb, stride_ht, 1); columns K..KP-1 are zero
    w_down_t_ptr,  # [f, d] contiguous
    starts_ptr,  # [nsb] int32
    idx_ptr,  # [nsb, K] int32/int64 contiguous
    y_ptr,  # [T, d], rows `stride_y` apart
    T,
    d,
    K,
    KP,  # columns of h to read (>= K; a multiple of 16 gives vectorised loads)
    stride_hb,
    stride_ht,
    stride_y,
    BLOCK_SIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast tiles to fp32 before tl.dot (interpreter bf16 workaround only)
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid over (block, token tile, column tile), column tile fastest: the programs that
    # run together share the block's h tile and expert ids (from L2).
    N_T: tl.constexpr = (BLOCK_SIZE + BLOCK_T - 1) // BLOCK_T
    pid = tl.program_id(0)
    n_n = tl.cdiv(d, BLOCK_N)
    pid_n = pid % n_n
    pid_t = (pid // n_n) % N_T
    b = (pid // n_n // N_T).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    rows = tl.minimum(T - start, BLOCK_SIZE)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < rows
    n_mask = offs_n < d
    h_row = b * stride_hb + offs_t.to(tl.int64) * stride_ht  # [BLOCK_T] int64

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ht = tl.load(h_ptr + h_row[:, None] + offs_k[None, :], mask=t_mask[:, None] & (offs_k < KP)[None, :], other=0.0)
        neuron = tl.load(idx_ptr + b * K + offs_k, mask=k_mask, other=0).to(tl.int64)
        w = tl.load(
            w_down_t_ptr + (neuron * d)[:, None] + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )
        if DOT_F32:
            ht = ht.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(ht, w, acc, input_precision=INPUT_PRECISION)

    y_off = (start + offs_t)[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def gather_down(
    h: torch.Tensor,
    w_down_t: torch.Tensor,
    block_starts: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    out: torch.Tensor,
    check_values: bool | None = None,
) -> torch.Tensor:
    """out[s_b + t] = h[b, t] @ w_down_t[idx[b]] for every sparse block, one launch; returns `out`.

    h [nsb, block_size, K], w_down_t [f, d] and out [T, d] share a dtype (fp32/fp16/bf16);
    h and out may have padded/strided rows (last dim contiguous); block_starts int32 [nsb];
    idx int32/int64 [nsb, K]. Rows of `out` outside the sparse
    blocks are untouched. `check_values` (default: only off CUDA) checks index ranges.
    """
    T, d, f, nsb, K = check_inputs(out, w_down_t, "w_down_t", 1, block_starts, idx, block_size, x_name="out")
    check_tensor("h", h, 3, (out.dtype,), row_strided=True)
    if tuple(h.shape) != (nsb, block_size, K):
        raise ValueError(f"h must be [nsb, block_size, K] = {(nsb, block_size, K)}, got {tuple(h.shape)}")
    device = check_devices(h=h, w_down_t=w_down_t, block_starts=block_starts, idx=idx, out=out)
    if check_values if check_values is not None else device.type != "cuda":
        check_blocks(block_starts, idx, T, f, block_size)
    launch_gather_down(h, K, w_down_t, block_starts, idx, block_size, out)
    return out


def launch_gather_down(
    h: torch.Tensor, K: int, w_down_t: torch.Tensor, block_starts: torch.Tensor, idx: torch.Tensor,
    block_size: int, out: torch.Tensor,
) -> None:
    """Launch the kernel on checked inputs; h is [nsb, block_size, KP >= K] with zeros in columns K.."""
    T, d = out.shape
    nsb, KP = h.shape[0], h.shape[2]
    if nsb == 0:
        return
    if K == 0:  # no experts: the sparse rows are zero
        for s in block_starts.tolist():
            out[s : s + block_size].zero_()
        return
    check_launchable(gather_down_kernel, out.device)

    def grid(meta: dict) -> tuple[int]:
        return (nsb * triton.cdiv(block_size, meta["BLOCK_T"]) * triton.cdiv(d, meta["BLOCK_N"]),)

    gather_down_kernel[grid](
        h, w_down_t, block_starts, idx, out, T, d, K, KP, h.stride(0), h.stride(1), out.stride(0),
        BLOCK_SIZE=block_size, INPUT_PRECISION=input_precision(out.dtype),
        DOT_F32=bf16_dot_workaround(gather_down_kernel, out.dtype),
    )


def gather_down_ref(
    h: torch.Tensor, w_down_t: torch.Tensor, block_starts: torch.Tensor, idx: torch.Tensor, block_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of `gather_down` (fp32 math, written into `out` in its dtype)."""
    T = out.shape[0]
    for b, s in enumerate(block_starts.tolist()):
        e = min(s + block_size, T)
        w = w_down_t.index_select(0, idx[b].long()).float()  # [K, d]
        out[s:e] = (h[b, : e - s].float() @ w).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- benchmark
if __name__ == "__main__":
    if not torch.cuda.is_available() or interpreting():
        print("gather_down benchmark needs a CUDA GPU (and TRITON_INTERPRET unset); nothing to do on CPU.")
        sys.exit(0)
    import triton.testing

    @triton.testing.perf_report(
        triton.testing.Benchmark(
            x_names=["T"],
            x_vals=[1024, 2048, 4096, 8192, 16384],
            line_arg="provider",
            line_vals=["triton", "torch-gather-bmm", "dense-cublas"],
            line_names=["Triton gather", "torch index_select+bmm", "dense F.linear (all f)"],
            ylabel="ms (median)",
            plot_name="gather-down-d2048-f8192-density0.5-bf16",
            args={"d": 2048, "f": 8192, "density": 0.5, "B": 128},
        )
    )
    def bench(T: int, provider: str, d: int, f: int, density: float, B: int) -> tuple[float, float, float]:
        """Time (ms) of the down stage over all blocks of a T-token sequence."""
        dev, dt = "cuda", torch.bfloat16
        K = int(round(density * f))
        starts = torch.arange(0, T, B, device=dev, dtype=torch.int32)
        nsb = starts.numel()
        h = torch.randn(nsb, B, K, device=dev, dtype=dt)
        w_down_t = torch.randn(f, d, device=dev, dtype=dt) / f**0.5
        idx = torch.stack([torch.randperm(f, device=dev)[:K] for _ in range(nsb)]).to(torch.int32)
        out = torch.empty(T, d, device=dev, dtype=dt)
        if provider == "triton":
            fn = lambda: gather_down(h, w_down_t, starts, idx, B, out)  # noqa: E731
        elif provider == "torch-gather-bmm":
            fn = lambda: torch.bmm(h, w_down_t.index_select(0, idx.reshape(-1)).view(nsb, K, d))  # noqa: E731
        else:
            w_down = w_down_t.t().contiguous()  # [d, f]
            hf = torch.randn(T, f, device=dev, dtype=dt)
            fn = lambda: torch.nn.functional.linear(hf, w_down)  # noqa: E731
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])

    bench.run(print_data=True, show_plots=False)
