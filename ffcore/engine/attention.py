"""Windowed attention for sliding-window layers: compute only the keys each query can see.

Stock transformers runs a sliding-window layer (Gemma 3: window 512 in 15 of 18 layers) as
one SDPA call over all `T x T` query-key pairs with an explicit boolean mask, so on CPU its
cost grows as `T^2` while the FLOP model (and the layer itself) needs only `T x W`. This module
registers one name, `WINDOWED_ATTENTION`, in both of transformers' registries, so the model code
stays stock:

* in `AttentionMaskInterface` (`windowed_sdpa_mask`): where transformers asks for a mask, the
  function proves the request is the plain sliding-window causal pattern (the mask function is
  structurally transformers' own `sliding_window_causal_mask_function(W)`: same code objects,
  same closure values; no or/and overlays, packing or block ids; every key inside the 2-D
  padding mask; integer offsets; not compiling; every query's own key in range; the window
  actually cuts some keys). Then it returns a `WindowMask`, a small description
  (`q_offset`, `kv_offset`, lengths, window) instead of a `[B, 1, T, kv]` tensor. Anything else
  (full-attention layers, padding, custom masks, static-cache decode, ...) is delegated
  unchanged to transformers' `sdpa_mask`, so it gets exactly the stock mask.
* in `AttentionInterface` (`windowed_sdpa_attention_forward`): given a `WindowMask` it splits the
  queries into chunks of `C` tokens. Query index `i` sits at absolute position `q_offset + i`,
  key index `j` at `kv_offset + j` (this is how transformers builds the mask, so cached prefixes,
  suffix prefill and sliding caches that keep only the last `W - 1` keys all come out right), and
  key `j` is visible to query `i` iff `q_offset + i - W < kv_offset + j <= q_offset + i`. A chunk
  `[i0, i1)` therefore needs only keys `[q_offset + i0 - W + 1 - kv_offset, q_offset + i1 - kv_offset)`:
  `C + W - 1` of them. The key axis is padded in front (or cut) so that chunk `c` reads keys
  `[c C, c C + C + W - 1)`; `Tensor.unfold` turns that into a strided `[n_chunks, KV, C + W - 1, hd]`
  view (no gather), and ONE `torch.nn.functional.scaled_dot_product_attention` call per sequence
  takes the chunk axis as its batch axis, with an additive `[n_chunks, 1, C, C + W - 1]` mask for
  the two triangular edges and the padding (built once per forward and shared by all sliding
  layers). One call instead of a Python loop of small calls matters on a shared CPU: each
  parallel region waits for its slowest thread, and a loop of 64 small regions per layer ran
  2-3x slower than one large one when other processes held a core. GQA uses SDPA's
  `enable_gqa`. With `softcap` (Gemma 2) the same chunks run as explicit math (scores, tanh cap,
  mask, float32 softmax). Every other mask (`None`, a tensor) goes to transformers' own
  `sdpa_attention_forward` (or, with a softcap, to the equivalent eager math), as does a
  `WindowMask` whose shapes do not match or which arrives with dropout or a position bias; it is
  then expanded to the dense mask the stock code would have built. A one-token decode step gets
  a `WindowMask` only when its cache holds keys beyond the window (a `DynamicCache()` built
  without the config); it then runs as one SDPA call over the last `W` keys.

Chunk size: the work is about `T * (C + W - 1)` scores against the ideal `T * W`, while small
chunks cost overhead. Measured here (gemma3-270m shapes: 4 heads, 1 KV head, head_dim 256,
W = 512, one layer, CPU seconds of one thread, best of 5 interleaved; shared machine): C =
32 / 64 / 96 / 128 / 256 took 106 / 110 / 124 / 122 / 147 ms at T = 2048 and 238 / 233 / 266 /
272 / 303 ms at T = 4096 (stock masked SDPA: 336 ms and 1396 ms). `DEFAULT_CHUNK_SIZE = 64`;
pass `chunk_size=` to change it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

WINDOWED_ATTENTION = "ffcore_windowed_sdpa"
DEFAULT_CHUNK_SIZE = 64
_CHUNK_ATTR = "_ffcore_window_chunk_size"


# ----------------------------------------------------------------------------- the mask side
@dataclasses.dataclass(frozen=True)
class WindowMask:
    """A proven plain sliding-window causal mask, described instead of materialised."""

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int  # absolute position of query index 0
    kv_offset: int  # absolute position of key index 0
    window: int  # key visible iff q - window < k <= q (absolute positions)
    device: torch.device
    _layouts: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # chunk layouts, by (C, dtype)

    def to_dense(self) -> torch.Tensor:
        """The boolean `[B, 1, q_length, kv_length]` mask transformers' `sdpa_mask` would build."""
        q = torch.arange(self.q_length, device=self.device)[:, None] + self.q_offset  # [q, 1]
        k = torch.arange(self.kv_length, device=self.device)[None, :] + self.kv_offset  # [1, kv]
        mask = (k <= q) & (k > q - self.window)  # [q, kv]
        return mask[None, None].expand(self.batch_size, 1, self.q_length, self.kv_length)

    def chunk_layout(self, chunk: int, dtype: torch.dtype) -> ChunkLayout:
        """The chunk geometry and additive mask for `chunk`-token query chunks (cached: shared by all layers)."""
        key = (chunk, dtype)
        if key not in self._layouts:
            self._layouts[key] = ChunkLayout.build(self, chunk, dtype)
        return self._layouts[key]

    def contiguous(self) -> WindowMask:
        """No-op: `generate` calls `.contiguous()` on masks it prepares for compileable caches."""
        return self


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Query chunks of `chunk` tokens, each against `span = chunk + window - 1` keys of a padded key axis.

    With `shift = q_offset - kv_offset` (query `i`'s own key has index `i + shift`) the keys are
    padded in front by `pad = window - 1 - shift` (cut instead if negative), so chunk `c` reads
    padded keys `[c * chunk, c * chunk + span)`: an `unfold` view, no gather. In those coordinates
    query row `r` sees local key `s` iff `r <= s <= r + window - 1`, the same band for every chunk;
    padded keys and padded query rows are masked in `mask`.
    """

    chunk: int
    n_chunks: int
    span: int
    pad: int  # keys added in front of key index 0 (negative: keys cut from the front)
    mask: torch.Tensor  # [n_chunks, 1, chunk, span] additive: 0 visible, -inf hidden

    @staticmethod
    def build(spec: WindowMask, chunk: int, dtype: torch.dtype) -> ChunkLayout:
        """Geometry and mask of `spec` for query chunks of (at most) `chunk` tokens."""
        n, m, w = spec.q_length, spec.kv_length, spec.window
        chunk = max(1, min(chunk, n))
        n_chunks = -(-n // chunk)
        span = chunk + w - 1
        pad = w - 1 - (spec.q_offset - spec.kv_offset)
        dev = spec.device
        r = torch.arange(chunk, device=dev)[:, None]  # [C, 1] query row in its chunk
        s = torch.arange(span, device=dev)[None, :]  # [1, S] key slot in the chunk's span
        band = (s >= r) & (s <= r + w - 1)  # [C, S]
        start = torch.arange(n_chunks, device=dev)[:, None] * chunk  # [N, 1] first query of each chunk
        key_idx = start + s - pad  # [N, S] key index of each slot
        key_ok = (key_idx >= 0) & (key_idx < m)  # [N, S]
        q_pad = (start + r.T >= n)[:, :, None]  # [N, C, 1] padded query rows (outputs dropped)
        visible = (band[None] & key_ok[:, None, :]) | q_pad  # [N, C, S]; padded rows see all: no empty rows
        mask = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill_(~visible, float("-inf"))
        return ChunkLayout(chunk, n_chunks, span, pad, mask[:, None])  # [N, 1, C, S]

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """`[KV, m, d]` keys or values of one sequence -> `[n_chunks, KV, span, d]` (a strided view)."""
        if self.pad < 0:
            x = x[:, -self.pad :]  # keys no query can see
        front = max(self.pad, 0)
        back = max(0, (self.n_chunks - 1) * self.chunk + self.span - (x.shape[1] + front))
        if front or back:
            x = torch.nn.functional.pad(x, (0, 0, front, back))  # [KV, front + m' + back, d]
        win = x.unfold(1, self.span, self.chunk)  # [KV, >= n_chunks, d, span]
        return win[:, : self.n_chunks].permute(1, 0, 3, 2)  # [n_chunks, KV, span, d]

    def chunks(self, q: torch.Tensor) -> torch.Tensor:
        """`[H, n, hd]` queries of one sequence -> `[n_chunks, H, chunk, hd]` (padded at the end)."""
        H, n, hd = q.shape
        total = self.n_chunks * self.chunk
        if total != n:
            q = torch.nn.functional.pad(q, (0, 0, 0, total - n))  # [H, total, hd]
        return q.view(H, self.n_chunks, self.chunk, hd).transpose(0, 1)  # [n_chunks, H, chunk, hd]


def _same_function(f: Any, g: Any, depth: int = 0) -> bool:
    """Whether two mask functions are the same code with equal closure values (conservative)."""
    if f is g:
        return True
    if depth > 8 or not (callable(f) and callable(g)):
        return False
    code_f, code_g = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if code_f is None or code_f is not code_g:
        return False
    cells_f, cells_g = f.__closure__ or (), g.__closure__ or ()
    if len(cells_f) != len(cells_g):
        return False
    return all(_same_value(a.cell_contents, b.cell_contents, depth + 1) for a, b in zip(cells_f, cells_g))


def _same_value(a: Any, b: Any, depth: int) -> bool:
    """Equality of closure contents: functions structurally, tuples elementwise, ints/strs by value."""
    if a is b:
        return True
    if callable(a) or callable(b):
        return _same_function(a, b, depth)
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
    if type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))):
        return a == b
    return False  # tensors and anything else: not provably equal


def _window_mask_or_none(
    batch_size: int, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any, mask_function: Callable,
    attention_mask: torch.Tensor | None, local_size: int | None, allow_is_causal_skip: bool, use_vmap: bool,
    device: torch.device | str,
) -> WindowMask | None:
    """A `WindowMask` if the request is provably the plain sliding-window causal mask and windowing saves work."""
    if local_size is None or use_vmap or not allow_is_causal_skip:
        return None  # full causal, custom overlays, or a caller that needs a real tensor
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (q_offset, kv_offset, local_size)):
        return None  # e.g. static caches pass a tensor offset
    if not _same_function(mask_function, masking_utils.sliding_window_causal_mask_function(local_size)):
        return None  # chunked attention, packed sequences, block ids, ...
    if attention_mask is not None:  # 2-D padding mask over absolute key positions
        if attention_mask.dim() != 2 or attention_mask.shape[-1] < kv_offset + kv_length:
            return None
        if not bool(attention_mask[:, kv_offset : kv_offset + kv_length].all()):
            return None  # real padding: let the stock mask handle it
    if not (kv_offset <= q_offset and q_offset + q_length <= kv_offset + kv_length):
        return None  # some query's own key is outside the keys: unusual cache layout
    if q_offset + q_length - 1 - local_size < kv_offset:
        return None  # the window never cuts a key: stock SDPA already does only the needed work
    return WindowMask(batch_size, q_length, kv_length, q_offset, kv_offset, local_size, torch.device(device))


def windowed_sdpa_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function: Callable = masking_utils.causal_mask_function, attention_mask: torch.Tensor | None = None,
    local_size: int | None = None, allow_is_causal_skip: bool = True, use_vmap: bool = False,
    device: torch.device | str = "cpu", **kwargs: Any,
) -> torch.Tensor | WindowMask | None:
    """Mask interface: a `WindowMask` for plain sliding-window layers, else exactly `sdpa_mask`'s answer."""
    spec = _window_mask_or_none(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size,
        allow_is_causal_skip, use_vmap, device,
    )
    if spec is not None:
        return spec
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs,
    )


# ------------------------------------------------------------------------ the attention side
def _softcap_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    softcap: float,
) -> torch.Tensor:
    """Eager attention with logit softcapping, as Gemma 2's eager code; returns `[B, H, n, Ev]`."""
    B, H, n, hd = query.shape
    KV = key.shape[1]
    q = query.reshape(B, KV, H // KV, n, hd)  # [B, KV, G, n, hd]: heads sharing a KV head
    scores = torch.matmul(q, key[:, :, None].transpose(-1, -2)) * scaling  # [B, KV, G, n, m]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # [n, m], or [B, 1 or H, n, m]; boolean (True = keep) or additive float
        if mask.dim() == 4:  # [B, 1, 1, n, m] or [B, KV, G, n, m]: broadcasts against the scores
            mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], KV, H // KV, n, -1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value[:, :, None])  # [B, KV, G, n, Ev]
    return out.reshape(B, H, n, value.shape[-1])  # [B, H, n, Ev]


def _fallback(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | WindowMask | None, dropout: float, scaling: float | None, is_causal: bool | None,
    softcap: float | None, kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Stock behaviour: transformers' SDPA (eager math with a softcap) on the dense mask."""
    mask = attention_mask.to_dense() if isinstance(attention_mask, WindowMask) else attention_mask
    if softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if dropout:
        raise ValueError(f"{WINDOWED_ATTENTION}: softcapping with dropout is not supported; use eval() mode")
    n, m = query.shape[2], key.shape[2]
    if mask is None and n > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()  # SDPA's is_causal (upper-left)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _softcap_attention(query, key, value, mask, scale, softcap)  # [B, H, n, Ev]
    return out.transpose(1, 2).contiguous(), None  # [B, n, H, Ev]


def windowed_attention_core(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: WindowMask, scaling: float | None = None,
    softcap: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Sliding-window attention, all query chunks of a sequence in one SDPA call; returns `[B, n, H, Ev]`."""
    B, H, n, hd = query.shape
    KV, Ev = key.shape[1], value.shape[-1]
    lay = spec.chunk_layout(chunk_size, query.dtype)
    out = query.new_empty(B, n, H, Ev)  # [B, n, H, Ev], the layout the attention module reshapes
    for b in range(B):  # one call per sequence: the chunk axis becomes SDPA's batch axis
        q = lay.chunks(query[b])  # [N, H, C, hd]
        k, v = lay.windows(key[b]), lay.windows(value[b])  # [N, KV, S, hd], [N, KV, S, Ev]
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=lay.mask, scale=scaling, enable_gqa=H != KV
            )  # [N, H, C, Ev]
        else:
            scale = scaling if scaling is not None else hd**-0.5
            o = _softcap_attention(q, k, v, lay.mask, scale, softcap)  # [N, H, C, Ev]
        o = o.transpose(1, 2).reshape(lay.n_chunks * lay.chunk, H, Ev)  # [N * C, H, Ev]
        out[b] = o[:n]
    return out


def _spec_applies(
    spec: WindowMask, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
    kwargs: dict[str, Any],
) -> bool:
    """Whether the windowed path can run: shapes match the mask, eval-mode dropout, nothing extra."""
    if dropout or kwargs.get("position_bias") is not None:
        return False
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    B, H, n, hd = query.shape
    return (
        n == spec.q_length and key.shape[2] == spec.kv_length and value.shape[2] == spec.kv_length
        and key.shape[1] == value.shape[1] and H % key.shape[1] == 0 and key.shape[-1] == hd
        and key.shape[0] == B and value.shape[0] == B and spec.batch_size in (B, 1)
    )


def windowed_sdpa_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | WindowMask | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention interface: windowed chunks for a `WindowMask`, transformers' SDPA for everything else."""
    softcap = kwargs.pop("softcap", None)
    kwargs.pop("sliding_window", None)  # the mask, not this hint, defines the pattern (as in stock SDPA)
    if isinstance(attention_mask, WindowMask) and _spec_applies(attention_mask, query, key, value, dropout, kwargs):
        chunk = int(getattr(module, _CHUNK_ATTR, DEFAULT_CHUNK_SIZE))
        out = windowed_attention_core(query, key, value, attention_mask, scaling, softcap, chunk)
        return out, None
    return _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap, kwargs)


def register() -> None:
    """Register `WINDOWED_ATTENTION` in transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(WINDOWED_ATTENTION, windowed_sdpa_attention_forward)
    AttentionMaskInterface.register(WINDOWED_ATTENTION, windowed_sdpa_mask)


register()


# ----------------------------------------------------------------------------- switching it on
def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object of the model and its modules, sub-configs included."""
    seen: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen[id(cfg)] = cfg
        stack += [getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}) or {}]
    return list(seen.values())


@dataclasses.dataclass
class _Saved:
    """What `enable_windowed_attention` changed, to undo it."""

    implementations: list[tuple[Any, Any]]  # (config, previous _attn_implementation_internal)
    chunks: list[tuple[nn.Module, Any]]  # (attention module, previous chunk attribute or _MISSING)


_MISSING = object()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that call the attention interface (those with a `config` and a `layer_idx`)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and hasattr(m, "q_proj")]


def _enable(model: nn.Module, chunk_size: int | None) -> _Saved:
    """Switch every config to `WINDOWED_ATTENTION`; return what was there before."""
    register()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    saved = _Saved([], [])
    for cfg in _configs(model):
        saved.implementations.append((cfg, cfg._attn_implementation_internal))
        cfg._attn_implementation_internal = WINDOWED_ATTENTION
    if chunk_size is not None:
        for mod in _attention_modules(model):
            saved.chunks.append((mod, mod.__dict__.get(_CHUNK_ATTR, _MISSING)))
            setattr(mod, _CHUNK_ATTR, int(chunk_size))
    return saved


def _restore(saved: _Saved) -> None:
    """Undo `_enable`."""
    for cfg, impl in saved.implementations:
        cfg._attn_implementation_internal = impl
    for mod, old in saved.chunks:
        if old is _MISSING:
            mod.__dict__.pop(_CHUNK_ATTR, None)
        else:
            setattr(mod, _CHUNK_ATTR, old)


def enable_windowed_attention(model: nn.Module, chunk_size: int | None = None) -> None:
    """Switch the model to windowed attention until `disable_windowed_attention` (keeps the old setting)."""
    if getattr(model, "_ffcore_windowed_saved", None) is not None:
        disable_windowed_attention(model)
    model._ffcore_windowed_saved = _enable(model, chunk_size)


def disable_windowed_attention(model: nn.Module) -> None:
    """Restore the attention implementation that `enable_windowed_attention` replaced."""
    saved = getattr(model, "_ffcore_windowed_saved", None)
    if saved is not None:
        _restore(saved)
        model._ffcore_windowed_saved = None


@contextlib.contextmanager
def windowed_attention(model: nn.Module, chunk_size: int | None = None) -> Iterator[nn.Module]:
    """Context manager: windowed attention inside, the previous implementation restored on exit."""
    saved = _enable(model, chunk_size)
    try:
        yield model
    finally:
        _restore(saved)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "WINDOWED_ATTENTION", "WindowMask", "disable_windowed_attention",
    "enable_windowed_attention", "register", "windowed_attention", "windowed_attention_core",
    "windowed_sdpa_attention_forward", "windowed_sdpa_mask",
]
