"""The block-sparse gated FFN: the fused weight layout and the fast compute path.

Layout (built once per MLP, cached): `w_gu[j] = concat(W_gate[j], W_up[j])` ([f, 2d]) so one
row gather serves gate and up, and `w_down_t = W_down^T` ([f, d]) so an expert's down
weights are one contiguous row. A sparse block with experts `idx` ([K]) then costs two
row gathers and two dense matmuls of size K instead of f.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffcore.engine.layout import Span
from ffcore.engine.plan import BACKENDS, EngineOptions


@dataclasses.dataclass
class FusedFFN:
    """Derived weights of one gated MLP in the engine's layout."""

    w_gu: Tensor  # [f, 2d]
    w_down_t: Tensor  # [f, d]
    b_gu: Tensor | None  # [f, 2] (gate, up) biases, or None
    b_down: Tensor | None  # [d]
    act: Callable[[Tensor], Tensor]
    act_name: str  # 'silu', 'gelu_tanh', 'gelu' or 'other' (the Triton path needs a known one)
    stamp: tuple  # identity + version of the source weights, to detect in-place changes

    @property
    def d(self) -> int:
        """Hidden size."""
        return self.w_down_t.shape[1]

    @property
    def f(self) -> int:
        """Intermediate size."""
        return self.w_down_t.shape[0]


_CACHE: "weakref.WeakKeyDictionary[nn.Module, FusedFFN]" = weakref.WeakKeyDictionary()


def _stamp(mlp: nn.Module) -> tuple:
    ps = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps)


# Activation classes by the function they compute (transformers.activations and torch.nn). Checked
# against torch's exact and tanh-approximated GELU and SiLU in tests/test_engine.py.
_SILU = ("SiLUActivation", "SiLU")
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation")
_GELU_EXACT = ("GELUActivation",)


def act_name(act: nn.Module) -> str:
    """'silu', 'gelu_tanh', 'gelu' (exact) or 'other' for a gated MLP's activation module.

    'other' (QuickGELU, clipped GELU, ReLU, ...) runs on the torch path with the module itself; the
    Triton kernels know only the three named functions and refuse it with a clear error.
    """
    cls = type(act).__name__
    if cls in _SILU:
        return "silu"
    if cls in _GELU_TANH:
        return "gelu_tanh"
    if cls == "GELU":  # torch.nn.GELU
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if cls in _GELU_EXACT:
        return "gelu"
    return "other"


def fused_ffn(mlp: nn.Module) -> FusedFFN:
    """The fused layout of a gated MLP, built on first use and cached until its weights change."""
    stamp = _stamp(mlp)
    hit = _CACHE.get(mlp)
    if hit is not None and hit.stamp == stamp:
        return hit
    with torch.no_grad():
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [f,d],[f,d],[d,f]
        w_gu = torch.cat([wg, wu], dim=1).contiguous()  # [f, 2d]
        w_down_t = wd.t().contiguous()  # [f, d]
        bg, bu = mlp.gate_proj.bias, mlp.up_proj.bias
        b_gu = None
        if bg is not None or bu is not None:
            zeros = torch.zeros(wg.shape[0], dtype=wg.dtype, device=wg.device)
            b_gu = torch.stack([bg if bg is not None else zeros, bu if bu is not None else zeros], 1)  # [f, 2]
        b_down = None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach().clone()
    fused = FusedFFN(w_gu, w_down_t, b_gu, b_down, mlp.act_fn, act_name(mlp.act_fn), stamp)
    _CACHE[mlp] = fused
    return fused


def clear_cache() -> None:
    """Drop every cached fused layout (frees the duplicated FFN weights)."""
    _CACHE.clear()


# ----------------------------------------------------------------------------- compute
def dense_activations(x: Tensor, fused: FusedFFN) -> Tensor:
    """Intermediate activations h = act(x Wg^T) * (x Wu^T) of all f neurons: [n, d] -> [n, f]."""
    gu = F.linear(x, fused.w_gu.view(2 * fused.f, fused.d))  # [n, 2f] interleaved (gate_j, up_j)
    gu = gu.view(x.shape[0], fused.f, 2)  # [n, f, 2]
    if fused.b_gu is not None:
        gu = gu + fused.b_gu
    return fused.act(gu[..., 0]) * gu[..., 1]


def _w_gu_rows(fused: FusedFFN) -> Tensor:
    """w_gu viewed as [2f, d] rows ordered (gate_0, up_0, gate_1, up_1, ...)."""
    return fused.w_gu.view(2 * fused.f, fused.d)


def _gate_times_up(g: Tensor, u: Tensor, fused: FusedFFN) -> Tensor:
    """act(g) * u, in place in g where the activation allows it."""
    if fused.act_name == "silu":
        return F.silu(g, inplace=True).mul_(u)
    if fused.act_name == "gelu_tanh":
        return F.gelu(g, approximate="tanh").mul_(u)
    return fused.act(g).mul_(u)


def sparse_block_forward(x: Tensor, fused: FusedFFN, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """FFN output of one block using only experts `idx`: x [n, d], idx [K] -> [n, d] (no down bias)."""
    d = fused.d
    w = fused.w_gu.index_select(0, idx)  # [K, 2d]: one gather serves gate and up
    g = torch.mm(x, w[:, :d].t())  # [n, K] (strided view: BLAS reads it in place)
    u = torch.mm(x, w[:, d:].t())  # [n, K]
    if fused.b_gu is not None:
        b = fused.b_gu.index_select(0, idx)  # [K, 2]
        g += b[:, 0]
        u += b[:, 1]
    h = _gate_times_up(g, u, fused)  # [n, K]
    wd = fused.w_down_t.index_select(0, idx)  # [K, d]: experts' down weights are contiguous rows
    return torch.mm(h, wd, out=out) if out is not None else h @ wd


def dense_rows_forward(x: Tensor, fused: FusedFFN) -> Tensor:
    """Dense FFN over rows x [n, d] -> [n, d] through the fused layout (no down bias)."""
    return dense_activations(x, fused) @ fused.w_down_t


def resolve_backend(backend: str, x: Tensor, fused: FusedFFN) -> str:
    """'auto' picks the Triton kernels for CUDA tensors they support, else the torch path."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    triton_ok = fused.b_gu is None and fused.b_down is None and fused.act_name != "other"
    if backend == "triton" and not triton_ok:
        raise ValueError(
            f"the Triton kernels support silu/gelu activations without FFN biases; this MLP has "
            f"act {fused.act_name!r} and biases={fused.b_gu is not None}: use backend='torch'"
        )
    if backend == "auto":
        return "triton" if x.is_cuda and triton_ok and _has_triton() else "torch"
    return backend


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def block_sparse_ffn(
    x: Tensor, fused: FusedFFN, dense_spans: Sequence[Span], sparse_spans: Sequence[Span], idx: Tensor | None,
    dense_fn: Callable[[Tensor], Tensor], options: EngineOptions = EngineOptions(),
    dense_out: dict[Span, Tensor] | None = None,
) -> Tensor:
    """One sequence's FFN output [T, d]: dense spans through `dense_fn`, sparse spans with experts idx [ns, K].

    `options.backend`: 'torch' (the CPU fast path), 'triton' (ffcore.kernels: all sparse blocks of
    the layer in two launches), or 'auto' (Triton on CUDA, torch elsewhere). On a multi-core CPU with
    `options.block_parallel` the blocks are spread over `torch.get_num_threads()` workers, each
    running single-threaded BLAS (see `block_workers`): a 128-row GEMM splits poorly across cores,
    whole blocks do not. `dense_out` holds dense spans' outputs the caller already computed.
    """
    out = torch.empty_like(x)
    for s, e in dense_spans:
        done = None if dense_out is None else dense_out.get((s, e))
        out[s:e] = done if done is not None else dense_fn(x[s:e])
    if sparse_spans:
        assert idx is not None and idx.shape[0] == len(sparse_spans)
        if resolve_backend(options.backend, x, fused) == "triton":
            from ffcore.kernels import block_sparse_ffn as triton_block_sparse_ffn  # optional: imports triton

            starts = torch.tensor([s for s, _ in sparse_spans], dtype=torch.int32, device=x.device)
            width = max(e - s for s, e in sparse_spans)  # the block size (a lone partial block: its length)
            if any(e - s != width for s, e in sparse_spans[:-1]):
                raise ValueError(f"the Triton path needs equal sparse blocks (only the last may be shorter): {sparse_spans}")
            end = sparse_spans[-1][1]  # the kernels clip blocks at the row count: a short last sparse block
            triton_block_sparse_ffn(x[:end], fused.w_gu, fused.w_down_t, starts, idx.contiguous(), width,
                                    fused.act_name, out=out[:end])  # ends at `end`, before the dense tail
            return out
        workers = block_workers(x, len(sparse_spans), options.block_parallel)
        if workers > 1:
            _sparse_parallel(x, fused, sparse_spans, idx, out, workers)
        else:
            write_in_place = not x.requires_grad  # mm(out=) does not support autograd
            for j, (s, e) in enumerate(sparse_spans):
                if write_in_place:
                    sparse_block_forward(x[s:e], fused, idx[j], out=out[s:e])
                else:
                    out[s:e] = sparse_block_forward(x[s:e], fused, idx[j])
        if fused.b_down is not None:
            for s, e in sparse_spans:
                out[s:e] += fused.b_down
    return out


# ----------------------------------------------------------------------------- CPU block parallelism
_POOLS: dict[int, "ThreadPoolExecutor"] = {}
_POOL_LOCK = threading.Lock()


def block_workers(x: Tensor, n_blocks: int, parallel: bool = True) -> int:
    """How many threads run a layer's sparse blocks: 1 unless parallel, CPU, no autograd, >= 2 blocks and threads."""
    if not parallel or x.device.type != "cpu" or x.requires_grad:
        return 1
    if threading.current_thread() is not threading.main_thread():
        return 1  # nested use from a worker (or a user's thread): stay sequential
    return max(1, min(torch.get_num_threads(), n_blocks))


def _pool(workers: int) -> "ThreadPoolExecutor":
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ffcore-block")
        return _POOLS[workers]


def _sparse_parallel(x: Tensor, fused: FusedFFN, spans: Sequence[tuple[int, int]], idx: Tensor, out: Tensor,
                     workers: int) -> None:
    """Blocks round-robin over `workers` threads, single-threaded BLAS each; rows written are disjoint.

    torch's thread count is process-wide: it is set to 1 for the duration and restored after,
    also on errors (torch releases the GIL inside each op, so the workers run in parallel).
    """
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers must run in the caller's mode

    def work(js: range) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode(inference):
            for j in js:
                s, e = spans[j]
                sparse_block_forward(x[s:e], fused, idx[j], out=out[s:e])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(_pool(workers).map(work, [range(w, len(spans), workers) for w in range(workers)]))
    finally:
        torch.set_num_threads(threads)
