"""Shared helpers of the block-sparse FFN kernels: activation codes, interpreter mode, input checks.

Interpreter mode: `TRITON_INTERPRET=1` must be in the environment before `triton` is first
imported (Triton's own `tl.*` helpers are built then, and our kernels when their module is
imported). The kernels then run on CPU tensors (slowly: for tests and small shapes). In
that mode bf16 tiles are upcast to fp32 before `tl.dot`, because the interpreter's bf16
dot multiplies the raw bit patterns (triton 3.9); the GPU path never takes that branch.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import triton

# Activation codes passed to the kernels as a constexpr.
ACT_SILU = 0
ACT_GELU_TANH = 1
ACT_GELU = 2

_ACT_CODES = {
    "silu": ACT_SILU,
    "swish": ACT_SILU,
    "gelu_tanh": ACT_GELU_TANH,
    "gelu_pytorch_tanh": ACT_GELU_TANH,  # the Hugging Face name (Gemma)
    "gelu_new": ACT_GELU_TANH,
    "gelu": ACT_GELU,  # exact (erf) GELU
}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when the environment asks Triton for its CPU interpreter (TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def act_code(act: str) -> int:
    """The kernel constexpr of an activation name ('silu', 'gelu_tanh' or 'gelu')."""
    if not isinstance(act, str) or act.lower() not in _ACT_CODES:
        raise ValueError(f"unsupported activation {act!r}; choose one of {sorted(_ACT_CODES)}")
    return _ACT_CODES[act.lower()]


def act_torch(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of an activation name (for the references)."""
    code = act_code(act)
    if code == ACT_SILU:
        return torch.nn.functional.silu
    if code == ACT_GELU_TANH:
        return lambda t: torch.nn.functional.gelu(t, approximate="tanh")
    return torch.nn.functional.gelu


def check_tensor(name: str, t: Any, ndim: int, dtypes: tuple[torch.dtype, ...], row_strided: bool = False) -> None:
    """Raise a clear error unless `t` is a tensor of `ndim` dims, one of `dtypes`, and contiguous
    (with `row_strided`: its last dim contiguous and rows laid out in order without overlap)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if not row_strided:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous()); got strides {t.stride()}")
        return
    ok = t.shape[-1] <= 1 or t.stride(-1) == 1
    for i in range(ndim - 1):
        if t.shape[i] > 1 and t.stride(i) < t.stride(i + 1) * t.shape[i + 1]:
            ok = False
    if not ok:
        raise ValueError(
            f"{name} must be contiguous in its last dim with rows in order (e.g. a row slice); got shape "
            f"{tuple(t.shape)}, strides {t.stride()} (call .contiguous())"
        )


_IDX_DTYPES = (torch.int32, torch.int64)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch for matmuls (off by default: exact fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_inputs(
    x: torch.Tensor, w: torch.Tensor, w_name: str, w_cols: int, block_starts: torch.Tensor, idx: torch.Tensor,
    block_size: int, x_name: str = "x",
) -> tuple[int, int, int, int, int]:
    """Shape/dtype/contiguity checks shared by the wrappers; returns (T, d, f, nsb, K)."""
    check_tensor(x_name, x, 2, SUPPORTED_DTYPES, row_strided=True)
    T, d = x.shape
    check_tensor(w_name, w, 2, (x.dtype,))
    check_tensor("block_starts", block_starts, 1, (torch.int32,))
    check_tensor("idx", idx, 2, _IDX_DTYPES)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if w.shape[1] != w_cols * d:
        raise ValueError(f"{w_name} must be [f, {w_cols}*d] = [f, {w_cols * d}] for {x_name} [T, d={d}]; got {tuple(w.shape)}")
    if idx.shape[0] != block_starts.shape[0]:
        raise ValueError(f"idx has {idx.shape[0]} rows but there are {block_starts.shape[0]} block_starts")
    if T == 0 or d == 0:
        raise ValueError(f"{x_name} must be non-empty, got shape {tuple(x.shape)}")
    return T, d, w.shape[0], idx.shape[0], idx.shape[1]


def check_devices(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, which is CUDA or CPU; returns it."""
    devs = {name: t.device for name, t in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        raise ValueError("all tensors must be on the same device, got " + ", ".join(f"{n}={d}" for n, d in devs.items()))
    if first.type not in ("cuda", "cpu"):
        raise ValueError(f"tensors are on {first}; the Triton kernels run on CUDA (or on CPU in the interpreter)")
    return first


def check_blocks(block_starts: torch.Tensor, idx: torch.Tensor, T: int, f: int, block_size: int) -> None:
    """Value checks (host sync): starts in [0, T), blocks disjoint, idx in [0, f)."""
    if block_starts.numel():
        s = block_starts.detach().to("cpu", torch.int64)
        if int(s.min()) < 0 or int(s.max()) >= T:
            raise ValueError(f"block_starts must lie in [0, T={T}); got min {int(s.min())}, max {int(s.max())}")
        ss = torch.sort(s).values
        if ss.numel() > 1 and int((ss[1:] - ss[:-1]).min()) < block_size:
            raise ValueError(f"sparse blocks overlap: two block_starts are less than block_size={block_size} apart")
    if idx.numel():
        i = idx.detach().to("cpu", torch.int64)
        if int(i.min()) < 0 or int(i.max()) >= f:
            raise ValueError(f"idx must lie in [0, f={f}); got min {int(i.min())}, max {int(i.max())}")


def _base_fn(kernel: Any) -> Any:
    """The JITFunction / InterpretedFunction under any Autotuner/Heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was built by Triton's interpreter (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_base_fn(kernel), InterpretedFunction)


def prune_token_tiles(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Autotune pruning: drop token tiles larger than the block (they would compute masked rows only)."""
    bs = kwargs.get("BLOCK_SIZE", named_args.get("BLOCK_SIZE"))
    if bs is None:
        return configs
    cap = max(16, triton.next_power_of_2(int(bs)))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]


def check_launchable(kernel: Any, device: torch.device) -> None:
    """Raise a clear error when CPU tensors meet a kernel compiled for the GPU."""
    if device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            "the tensors are on CPU but the Triton kernels were built for a GPU: set TRITON_INTERPRET=1 "
            "before `triton` is first imported to run them in Triton's CPU interpreter (slow; for tests), "
            "or move the tensors to CUDA"
        )


def bf16_dot_workaround(kernel: Any, dtype: torch.dtype) -> bool:
    """Whether to upcast bf16 tiles to fp32 before tl.dot (the interpreter's bf16 dot is wrong)."""
    return dtype == torch.bfloat16 and is_interpreted(kernel)
