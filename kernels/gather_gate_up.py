"""Gathered gate/up projection of the block-sparse FFN, all sparse blocks in one Triton launch.

For sparse block b (rows [s_b, min(s_b + B, T)) of x) with experts idx[b] ([K]):

    h[b, t, k] = act(x[s_b + t] . W_gate[idx[b, k]]) * (x[s_b + t] . W_up[idx[b, k]])

with the fused weight `w_gu` [f, 2d] (row j = concat(W_gate[j], W_up[j])), so one row
gather feeds both products. Accumulation is fp32; h is stored in x's dtype. Rows of a
partial last block beyond T are written as zeros. Grid: (block, token tile, expert tile),
flattened to one axis with the expert tile fastest (programs running together share x in L2).
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from ffcore.kernels._common import (
    act_code,
    act_torch,
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

__all__ = ["gather_gate_up", "gather_gate_up_ref", "gather_gate_up_kernel"]

# One small config in the interpreter (it is slow and has nothing to tune).
INTERP_CONFIGS = [triton.Config({"BLOCK_T": 16, "BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
GPU_CONFIGS = [
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 32, "BLOCK_K": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
]
KEY = ["d", "K", "BLOCK_SIZE"]


@triton.autotune(
    configs=INTERP_CONFIGS if interpreting() else GPU_CONFIGS,
    key=KEY,
    prune_configs_by=None if interpreting() else {"early_config_prune": prune_token_tiles},
)
@triton.jit
def gather_gate_up_kernel(
    x_ptr,  # [T, d], rows `stride_x` apart
    w_gu_ptr,  # [f, 2d] contiguous
    starts_ptr,  # [nsb] int32
    idx_ptr,  # [nsb, K] int32/int64 contiguous
    h_ptr,  # [nsb, BLOCK_SIZE, KP], strides (stride_hb, stride_ht, 1)
    T,
    d,
    K,
    KP,  # columns of h to write (>= K); columns K..KP-1 get zeros (alignment padding)
    stride_x,
    stride_hb,
    stride_ht,
    BLOCK_SIZE: tl.constexpr,
    ACT: tl.constexpr,  # 0 silu, 1 gelu_tanh, 2 gelu (erf)
    INPUT_PRECISION: tl.constexpr,  # 'ieee' or 'tf32' (only matters for fp32 inputs)
    DOT_F32: tl.constexpr,  # upcast tiles to fp32 before tl.dot (interpreter bf16 workaround only)
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # 1-D grid over (block, token tile, expert tile), expert tile fastest: the programs that
    # run together share the block's x tile (from L2) and read disjoint expert rows.
    N_T: tl.constexpr = (BLOCK_SIZE + BLOCK_T - 1) // BLOCK_T
    pid = tl.program_id(0)
    n_k = tl.cdiv(KP, BLOCK_K)
    pid_k = pid % n_k
    pid_t = (pid // n_k) % N_T
    b = (pid // n_k // N_T).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    rows = tl.minimum(T - start, BLOCK_SIZE)  # valid rows of this block (partial last block)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_mask = offs_t < rows
    k_mask = offs_k < K
    neuron = tl.load(idx_ptr + b * K + offs_k, mask=k_mask, other=0).to(tl.int64)

    x_row = (start + offs_t) * stride_x  # [BLOCK_T] int64
    w_row = neuron * (2 * d)  # [BLOCK_K] int64
    acc_g = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        xt = tl.load(x_ptr + x_row[:, None] + offs_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        w_mask = d_mask[:, None] & k_mask[None, :]
        w_off = w_row[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_K]: gate part of the gathered rows
        wg = tl.load(w_gu_ptr + w_off, mask=w_mask, other=0.0)
        wu = tl.load(w_gu_ptr + w_off + d, mask=w_mask, other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=INPUT_PRECISION)

    if ACT == 0:
        a = acc_g * tl.sigmoid(acc_g)
    elif ACT == 1:
        # 0.5 g (1 + tanh(z)) == g * sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3)
        a = acc_g * tl.sigmoid(1.5957691216057308 * (acc_g + 0.044715 * acc_g * acc_g * acc_g))
    else:
        a = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
    h = a * acc_u  # rows past the block's end and columns >= K are exactly 0 (masked inputs)

    h_off = b * stride_hb + offs_t.to(tl.int64)[:, None] * stride_ht + offs_k[None, :]
    h_mask = (offs_t < BLOCK_SIZE)[:, None] & (offs_k < KP)[None, :]
    tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=h_mask)


def gather_gate_up(
    x: torch.Tensor,
    w_gu: torch.Tensor,
    block_starts: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    act: str,
    out: torch.Tensor | None = None,
    check_values: bool | None = None,
) -> torch.Tensor:
    """h [nsb, block_size, K] = act(x W_gate[idx]^T) * (x W_up[idx]^T) for every sparse block, one launch.

    x [T, d] (rows may be strided) and w_gu [f, 2d] share a dtype (fp32/fp16/bf16); block_starts
    int32 [nsb]; idx int32/int64 [nsb, K]. `out` may be a view with padded rows (last dim
    contiguous). Rows past T in a partial block are zero. `check_values`
    (default: only off CUDA, as it syncs) checks start/idx ranges and block overlap.
    """
    T, d, f, nsb, K = check_inputs(x, w_gu, "w_gu", 2, block_starts, idx, block_size)
    code = act_code(act)
    tensors = dict(x=x, w_gu=w_gu, block_starts=block_starts, idx=idx)
    if out is not None:
        check_tensor("out", out, 3, (x.dtype,), row_strided=True)
        if tuple(out.shape) != (nsb, block_size, K):
            raise ValueError(f"out must be [nsb, block_size, K] = {(nsb, block_size, K)}, got {tuple(out.shape)}")
        tensors["out"] = out
    device = check_devices(**tensors)
    if check_values if check_values is not None else device.type != "cuda":
        check_blocks(block_starts, idx, T, f, block_size)
    h = out if out is not None else torch.empty((nsb, block_size, K), dtype=x.dtype, device=device)
    launch_gather_gate_up(x, w_gu, block_starts, idx, block_size, code, h)
    return h


def launch_gather_gate_up(
    x: torch.Tensor, w_gu: torch.Tensor, block_starts: torch.Tensor, idx: torch.Tensor, block_size: int,
    act_id: int, h: torch.Tensor,
) -> None:
    """Launch the kernel on checked inputs; h [nsb, block_size, KP >= K] gets zeros in columns K.."""
    T, d = x.shape
    nsb, K = idx.shape
    KP = h.shape[2]
    if nsb == 0 or K == 0:
        h.zero_()
        return
    check_launchable(gather_gate_up_kernel, x.device)

    def grid(meta: dict) -> tuple[int]:
        return (nsb * triton.cdiv(block_size, meta["BLOCK_T"]) * triton.cdiv(KP, meta["BLOCK_K"]),)

    gather_gate_up_kernel[grid](
        x, w_gu, block_starts, idx, h, T, d, K, KP, x.stride(0), h.stride(0), h.stride(1),
        BLOCK_SIZE=block_size, ACT=act_id, INPUT_PRECISION=input_precision(x.dtype),
        DOT_F32=bf16_dot_workaround(gather_gate_up_kernel, x.dtype),
    )


def gather_gate_up_ref(
    x: torch.Tensor, w_gu: torch.Tensor, block_starts: torch.Tensor, idx: torch.Tensor, block_size: int, act: str,
) -> torch.Tensor:
    """Torch reference of `gather_gate_up` (fp32 math, result in x's dtype, zero rows past T)."""
    T, d = x.shape
    nsb, K = idx.shape
    fn = act_torch(act)
    h = torch.zeros((nsb, block_size, K), dtype=x.dtype, device=x.device)
    for b, s in enumerate(block_starts.tolist()):
        e = min(s + block_size, T)
        w = w_gu.index_select(0, idx[b].long()).float()  # [K, 2d]
        xb = x[s:e].float()
        h[b, : e - s] = (fn(xb @ w[:, :d].T) * (xb @ w[:, d:].T)).to(x.dtype)
    return h


# ----------------------------------------------------------------------------- benchmark
if __name__ == "__main__":
    if not torch.cuda.is_available() or interpreting():
        print("gather_gate_up benchmark needs a CUDA GPU (and TRITON_INTERPRET unset); nothing to do on CPU.")
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
            plot_name="gather-gate-up-d2048-f8192-density0.5-bf16",
            args={"d": 2048, "f": 8192, "density": 0.5, "B": 128},
        )
    )
    def bench(T: int, provider: str, d: int, f: int, density: float, B: int) -> tuple[float, float, float]:
        """Time (ms) of the gate/up stage over all blocks of a T-token sequence."""
        dev, dt = "cuda", torch.bfloat16
        K = int(round(density * f))
        x = torch.randn(T, d, device=dev, dtype=dt)
        w_gu = torch.randn(f, 2 * d, device=dev, dtype=dt) / d**0.5
        starts = torch.arange(0, T, B, device=dev, dtype=torch.int32)
        idx = torch.stack([torch.randperm(f, device=dev)[:K] for _ in range(starts.numel())]).to(torch.int32)
        nsb = starts.numel()
        if provider == "triton":
            fn = lambda: gather_gate_up(x, w_gu, starts, idx, B, "silu")  # noqa: E731
        elif provider == "torch-gather-bmm":
            xb = x.view(nsb, B, d)

            def fn() -> torch.Tensor:
                w = w_gu.index_select(0, idx.reshape(-1)).view(nsb, K, 2 * d)
                g = torch.bmm(xb, w[:, :, :d].transpose(1, 2))
                u = torch.bmm(xb, w[:, :, d:].transpose(1, 2))
                return torch.nn.functional.silu(g) * u
        else:
            wg = w_gu[:, :d].contiguous()
            wu = w_gu[:, d:].contiguous()
            fn = lambda: torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)  # noqa: E731
        ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return ms, lo, hi

    bench.run(print_data=True, show_plots=False)
