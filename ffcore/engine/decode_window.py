"""The decode-time predictor context (beyond the paper): the last `block_size` FFN inputs of every layer.

A sparse decode step under `SparsityPlan(sparse_decode=True, decode_context=...)` picks its experts from

* 'token':  the decode token alone, a one-token span (the paper's reading; the default);
* 'window': the FFN inputs of the last `block_size` tokens, the current one included, which the
  policy (oracle, predictor, ...) scores exactly as it scores a prefill block;
* 'reuse':  the experts of such a window, chosen at the first decode step and then every
  `block_size` decode steps, reused by the steps in between (one selection per block, as in prefill).

`DecodeWindow` holds, per layer, a ring buffer `[batch, block_size, d]` of the most recent FFN inputs
(one per batch row, so rows stay independent), filled by a prefill with the prompt's last `block_size`
FFN inputs (a suffix prefill appends its own) and by every decode step with its token. It travels with
the KV cache it belongs to (an attribute of the cache object, so `copy.deepcopy(cache)` copies it and two
continuations from one prefilled cache never see each other's tokens); a prefill at offset 0 starts a
fresh one. Only plans with sparse decode and a 'window' / 'reuse' context fill it.

Cost per layer and decode step: one row write into the buffer; 'window' adds one selection over
`block_size` tokens (the predictor's attention pool and MLP: cheap; the oracle's dense activations of
the whole window: `block_size` dense FFN rows, a diagnostic, not a deployable policy); 'reuse' adds that
selection only every `block_size` steps. Beam search (reordering cache rows) does not reorder the window.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

WINDOW_ATTR = "_ffcore_decode_window"  # the attribute of a KV cache object that holds its window


class DecodeWindow:
    """Per-layer ring buffers of a batch's most recent FFN inputs, and the experts in use ('reuse')."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.buf: dict[int, Tensor] = {}  # layer -> [batch, size, d]
        self.count: dict[int, int] = {}  # layer -> valid rows (<= size)
        self.head: dict[int, int] = {}  # layer -> next slot to write
        self.experts: dict[int, Tensor] = {}  # layer -> [batch, K] experts in use ('reuse')
        self.age: dict[int, int] = {}  # layer -> decode steps served by experts[layer] so far
        self.selections: dict[int, int] = {}  # layer -> selections made from the window (diagnostics, tests)
        self.end = 0  # the cache length after the last call that pushed (offset + tokens)
        self.attached = False  # held by a cache object (else only by the engine's run state)

    def push(self, layer: int, x: Tensor, offset: int) -> None:
        """Append FFN inputs x [batch, t, d] (the call's tokens, in order) to a layer's buffer."""
        x = x.detach()
        b, t, d = x.shape
        buf = self.buf.get(layer)
        if buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled():
            buf = self.buf[layer] = buf.clone()  # written in inference mode, continued outside it
        if buf is None or buf.shape[0] != b or buf.shape[2] != d or buf.dtype != x.dtype or buf.device != x.device:
            buf = self.buf[layer] = x.new_empty(b, self.size, d)
            self.count[layer], self.head[layer] = 0, 0
            self.experts.pop(layer, None)
        self.end = offset + t
        n = self.size
        if t >= n:
            buf.copy_(x[:, t - n:])
            self.count[layer], self.head[layer] = n, 0
            return
        h = self.head[layer]
        first = min(t, n - h)
        buf[:, h:h + first] = x[:, :first]
        if first < t:
            buf[:, :t - first] = x[:, first:]
        self.head[layer] = (h + t) % n
        self.count[layer] = min(self.count[layer] + t, n)

    def window(self, layer: int) -> Tensor:
        """The layer's buffered FFN inputs in order, oldest first: [batch, n, d], n <= size."""
        buf, n, h = self.buf[layer], self.count[layer], self.head[layer]
        if n < self.size:  # not yet wrapped: slots [0, n) in order
            return buf[:, :n]
        return buf if h == 0 else torch.cat([buf[:, h:], buf[:, :h]], dim=1)

    def due(self, layer: int, k: int, batch: int) -> bool:
        """'reuse': whether the layer must select again (no experts yet, another K or batch, or a block served)."""
        e = self.experts.get(layer)
        return e is None or e.shape != (batch, k) or self.age.get(layer, 0) >= self.size

    def keep(self, layer: int, experts: Tensor) -> None:
        """Remember the experts just selected for a layer (they serve this step and the next size - 1)."""
        self.experts[layer] = experts
        self.age[layer] = 1
        self.selections[layer] = self.selections.get(layer, 0) + 1

    def forget_experts(self, layer: int) -> None:
        """Drop the layer's reused experts (a prefill chunk changed the context: the next step selects)."""
        self.experts.pop(layer, None)
        self.age.pop(layer, None)


def window_of(cache: Any) -> DecodeWindow | None:
    """The window a KV cache object carries, or None."""
    return None if cache is None else getattr(cache, WINDOW_ATTR, None)


def attach(cache: Any, window: DecodeWindow) -> bool:
    """Store the window on the cache object (False when the object takes no attributes, e.g. a tuple)."""
    if cache is None:
        return False
    try:
        setattr(cache, WINDOW_ATTR, window)
    except (AttributeError, TypeError):
        return False
    window.attached = True
    return True
