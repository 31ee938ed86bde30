"""`sparsify(model, plan)`: swap every layer's gated MLP for a block-sparse one, restore on exit.

    with ffcore.sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        logits = model(input_ids).logits

Inside the context each layer's MLP runs prefill in blocks of `plan.block_size` tokens
(`ffcore.engine.layout`); the first/last block run dense (switches in the plan), every other
block computes only its selected experts. Attention is untouched. In a padded batch each row's
blocks start at its own first token (read from the 2-D attention mask; `row_ranges`). Nested calls swap the plan
and options of the existing wrappers (never double-wrap) and restore the outer ones on exit.

With `plan.sparse_decode`, a one-token decode step picks its experts from the token itself
(`decode_context='token'`) or from a window of the last `block_size` FFN inputs ('window',
'reuse'; `ffcore.engine.decode_window`), which the session keeps with the KV cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ffcore.engine.decode_window import DecodeWindow, attach, window_of
from ffcore.engine.layout import experts_for
from ffcore.engine.plan import EngineOptions, SparsityPlan
from ffcore.engine.policies import SelectContext, SelectionPolicy, griffin_scores, make_policy
from ffcore.engine.sparse_ffn import block_sparse_ffn, dense_activations, fused_ffn
from ffcore.models import cache_from_kwargs, decoder_layers, gated_mlps

_SESSION_ATTR = "_ffcore_session"


@dataclasses.dataclass
class _RunState:
    """What the wrappers of one model share: the active plan and options, and the current call's cache offset."""

    plan: SparsityPlan
    policy: SelectionPolicy
    options: EngineOptions
    n_layers: int
    offset: int = 0  # tokens already in the KV cache when the current forward started
    first_scores: dict[tuple[int, int], Tensor] = dataclasses.field(default_factory=dict)  # (layer, row) -> [f]
    window: DecodeWindow | None = None  # the current sequence's decode-time context ('window' / 'reuse' plans)
    pad_mask: Tensor | None = None  # [batch, past + T] 2-D attention mask of the current call when it has padding
    stats: dict[str, int] = dataclasses.field(default_factory=lambda: {"dense_tokens": 0, "sparse_tokens": 0})


class SparseMLP(nn.Module):
    """A block-sparse stand-in for one layer's gated MLP (holds the original for dense work and restore)."""

    def __init__(self, original: nn.Module, layer: int, state: _RunState) -> None:
        super().__init__()
        self.original = original
        self.layer = layer
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        """x [batch, T, d] -> [batch, T, d]."""
        st = self.state
        plan = st.plan
        density = plan.density(self.layer)
        T = x.shape[1]
        decode = T == 1 and st.offset > 0
        if density >= 1.0 or plan.policy_name == "dense" and plan.compensator is None or (
            decode and not plan.sparse_decode
        ):
            st.stats["dense_tokens"] += x.shape[0] * T
            return self.original(x)
        fused = fused_ffn(self.original)
        k = experts_for(density, fused.f)
        need_first = bool(getattr(st.policy, "needs_first_block", False))
        win = self._window(x) if plan.sparse_decode and plan.decode_context != "token" else None
        if win is not None and decode:
            experts = self._window_experts(win, fused, k, need_first)  # [batch, K]
        rows = []
        for b, (lo, hi, offset) in enumerate(row_ranges(st.pad_mask, x.shape[0], T, st.offset)):
            xb = x[b, lo:hi]  # [n, d], this row's real tokens (all T without padding)
            dense, sparse = ([], [(0, 1)]) if decode else plan.spans(hi - lo, offset)
            idx, dense_out = None, {}
            first = self._first_block(xb, dense, fused, b, decode, dense_out, offset) if need_first else None
            if sparse and win is not None and decode:
                idx = experts[b:b + 1]
            elif sparse:
                ctx = SelectContext(self.layer, xb, sparse, k, fused, plan.block_size, decode, offset, first)
                idx = st.policy.select(ctx)
                _check_idx(idx, len(sparse), k, fused.f, st.policy)
                idx = idx.contiguous()  # policies may return expanded views (stride 0); kernels need rows
            y = block_sparse_ffn(xb, fused, dense, sparse, idx, self.original, st.options, dense_out) if hi > lo \
                else xb.new_zeros(xb.shape)
            if plan.compensator is not None and sparse and hi > lo:
                add_corrections(plan.compensator, self.layer, xb, y, sparse, idx)
            if hi - lo < T:  # padding: its positions get zeros (attention never reads them)
                y = torch.nn.functional.pad(y, (0, 0, lo, T - hi))  # [T, d]
            rows.append(y)
            st.stats["sparse_tokens"] += sum(e - s for s, e in sparse) if hi > lo else 0
            st.stats["dense_tokens"] += sum(e - s for s, e in dense)
        return torch.stack(rows)

    def _window(self, x: Tensor) -> DecodeWindow:
        """The sequence's decode window with this call's FFN inputs x [batch, T, d] appended (the last block_size)."""
        st = self.state
        size = st.plan.block_size
        if st.window is None or st.window.size != size:  # a new sequence, or a plan with another block size
            st.window = DecodeWindow(size)
        st.window.push(self.layer, x[:, -size:], st.offset + max(0, x.shape[1] - size))
        if x.shape[1] > 1:  # a prefill chunk: the next decode step selects again ('reuse')
            st.window.forget_experts(self.layer)
        return st.window

    def _window_experts(self, win: DecodeWindow, fused: Any, k: int, need_first: bool) -> Tensor:
        """A decode step's experts [batch, K]: the policy's choice for each row's window, or the reused ones."""
        st, layer = self.state, self.layer
        batch = win.buf[layer].shape[0]
        if st.plan.decode_context == "reuse" and not win.due(layer, k, batch):
            win.age[layer] += 1
            return win.experts[layer]
        w = win.window(layer)  # [batch, n, d], the current token last
        n = w.shape[1]
        rows = []
        for b in range(batch):
            first = st.first_scores.get((layer, b)) if need_first else None
            # scored like a prefill block: spans [(0, n)], decode False, offset = the window's first position
            ctx = SelectContext(layer, w[b], [(0, n)], k, fused, st.plan.block_size, False, st.offset + 1 - n, first)
            idx = st.policy.select(ctx)
            _check_idx(idx, 1, k, fused.f, st.policy)
            rows.append(idx)
        experts = torch.cat(rows).contiguous()
        win.keep(layer, experts)
        return experts


    def _first_block(self, xb: Tensor, dense: list[tuple[int, int]], fused: Any, row: int, decode: bool,
                     dense_out: dict[tuple[int, int], Tensor], offset: int) -> Tensor | None:
        """GRIFFIN scores [f] of the sequence's first block: from its dense run at offset 0 (free), else remembered.

        When the first block runs dense its intermediate activations come with its output (a hook on
        down_proj), so the scores cost no extra FFN work and the output is written to `dense_out`. With
        every block sparse (the Table 5 ablation) they need an extra dense pass over the first block.
        """
        st = self.state
        if offset > 0 or decode:  # a suffix prefill or decode step: the scores of the prompt's first block
            return st.first_scores.get((self.layer, row))
        if xb.shape[0] == 0:  # a row that is all padding in this call
            return None
        span = (0, min(st.plan.block_size, xb.shape[0]))
        if span in dense:
            seen: dict[str, Tensor] = {}

            def keep_h(module: nn.Module, args: tuple) -> None:  # returns None: the input is not replaced
                seen["h"] = args[0]

            hook = self.original.down_proj.register_forward_pre_hook(keep_h)
            try:
                dense_out[span] = self.original(xb[span[0]:span[1]])
            finally:
                hook.remove()
            h = seen["h"]  # [B, f] the first block's intermediate activations
        else:
            h = dense_activations(xb[span[0]:span[1]], fused)
        scores = griffin_scores(h)
        st.first_scores[(self.layer, row)] = scores
        return scores


def add_corrections(comp: Any, layer: int, x: Tensor, y: Tensor, spans: list[tuple[int, int]], idx: Tensor) -> None:
    """y[spans] += the compensator's corrections: all blocks in one call when it has `block_corrections`.

    x, y [T, d]; idx [b, K]. Any other callable `comp(layer, x_block, idx_block)` is called per block.
    """
    batched = getattr(comp, "block_corrections", None)
    if batched is None:
        for j, (s, e) in enumerate(spans):
            y[s:e] += comp(layer, x[s:e], idx[j])
        return
    c = batched(layer, x, spans, idx)  # [sum of span lengths, d], rows in span order
    if all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1)):  # one contiguous range: one add
        y[spans[0][0]:spans[-1][1]] += c
        return
    row = 0
    for s, e in spans:
        y[s:e] += c[row:row + e - s]
        row += e - s


def row_ranges(mask: Tensor | None, batch: int, T: int, offset: int) -> list[tuple[int, int, int]]:
    """Per row of this call's T tokens: (lo, hi, offset), its real tokens x[lo:hi] and the real tokens before them.

    `mask` [batch, past + T] is the 2-D attention mask (1 = token, 0 = padding; left or right padded),
    None when there is no padding: then every row is (0, T, offset). A row's real tokens in this call
    must be one contiguous run; its offset counts the real tokens already in the KV cache, so its
    block grid starts at its own first token, exactly as if the row ran alone.
    """
    if mask is None:
        return [(0, T, offset)] * batch
    if mask.shape[0] != batch or mask.shape[1] < T:
        raise ValueError(f"ffcore.sparsify: attention_mask of shape {tuple(mask.shape)} does not cover a "
                         f"batch of {batch} rows of {T} tokens")
    now, past = mask[:, -T:].bool(), mask[:, :-T].bool()  # [batch, T], [batch, past]
    out = []
    for b in range(batch):
        pos = now[b].nonzero().flatten()
        lo, hi = (int(pos[0]), int(pos[-1]) + 1) if pos.numel() else (0, 0)
        if hi - lo != pos.numel():
            raise ValueError(f"ffcore.sparsify: row {b} of the attention mask has padding between its tokens; "
                             "only left or right padding is supported")
        out.append((lo, hi, int(past[b].sum())))
    return out


def _check_idx(idx: Tensor, n_blocks: int, k: int, f: int, policy: Any) -> None:
    if idx.shape != (n_blocks, k):
        raise ValueError(f"policy {policy!r} returned experts of shape {tuple(idx.shape)}, expected {(n_blocks, k)}")


@dataclasses.dataclass
class _Session:
    """The wrappers, hooks and plan stack installed on one model."""

    layers: list[nn.Module]
    originals: list[nn.Module]
    wrappers: list[SparseMLP]
    state: _RunState
    hook: Any  # (pre-forward, post-forward) hook handles
    stack: list[tuple[SparsityPlan, SelectionPolicy, EngineOptions]]


def _policy_for(plan: SparsityPlan) -> SelectionPolicy:
    return make_policy(plan.policy, plan.seed) if isinstance(plan.policy, str) else plan.policy


def _pre_forward(state: _RunState):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        state.pad_mask = None
        if isinstance(mask, Tensor) and mask.dim() == 2 and bool((mask == 0).any()):
            plan = state.plan
            if plan.sparse_decode and plan.decode_context != "token":
                raise ValueError(
                    f"ffcore.sparsify: a padded batch with decode_context={plan.decode_context!r} is not supported "
                    "(the decode window would mix padding into each row's context); use decode_context='token', "
                    "a dense decode (sparse_decode=False), or run the rows one at a time."
                )
            state.pad_mask = mask
        state.offset = _cache_offset(kwargs)
        cache = cache_from_kwargs(kwargs)
        if state.offset == 0:  # a new sequence: its decode window starts empty (made on first use)
            state.window = None
            return
        win = window_of(cache)
        if win is None and state.window is not None and not state.window.attached and state.window.end == state.offset:
            win = state.window  # a cache that takes no attributes: the window this session kept for it
        state.window = win  # None: a cache this engine did not prefill; the window starts with this call
        if win is not None and not win.attached:
            attach(cache, win)

    return hook


def _post_forward(state: _RunState):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        win = state.window
        if win is not None and not win.attached:  # made in this call: it goes with the cache the call returns
            cache = getattr(output, "past_key_values", None)
            if cache is None:
                cache = getattr(output, "cache", None)
            if cache is None or not attach(cache, win):
                attach(cache_from_kwargs(kwargs), win)

    return hook


def _cache_offset(kwargs: dict) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    past = cache_from_kwargs(kwargs)
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return 0


@contextlib.contextmanager
def sparsify(model: nn.Module, plan: SparsityPlan, options: EngineOptions | None = None) -> Iterator[_RunState]:
    """Run `model` with block-sparse FFNs following `plan` inside the context; restore on exit.

    `options` (`EngineOptions`) says how: the backend ('auto': Triton kernels for CUDA inputs, the
    torch fast path otherwise) and CPU block parallelism. A nested call swaps in its own plan and
    options and restores the outer ones on exit.
    """
    options = EngineOptions() if options is None else options
    if not isinstance(options, EngineOptions):
        raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}")
    layers = list(decoder_layers(model))
    plan.check_layers(len(layers))
    policy = _policy_for(plan)
    session: _Session | None = getattr(model, _SESSION_ATTR, None)
    if session is not None:  # nested: swap the plan and options, keep the wrappers
        session.stack.append((plan, policy, options))
        session.state.plan, session.state.policy, session.state.options = plan, policy, options
        try:
            yield session.state
        finally:
            session.stack.pop()
            session.state.plan, session.state.policy, session.state.options = session.stack[-1]
        return
    originals = gated_mlps(model)
    state = _RunState(plan, policy, options, len(layers))
    wrappers = [SparseMLP(mlp, i, state) for i, mlp in enumerate(originals)]
    hook = model.register_forward_pre_hook(_pre_forward(state), with_kwargs=True)
    post = model.register_forward_hook(_post_forward(state), with_kwargs=True)
    session = _Session(layers, originals, wrappers, state, (hook, post), [(plan, policy, options)])
    try:
        for layer, w in zip(layers, wrappers):
            layer.mlp = w
        setattr(model, _SESSION_ATTR, session)
        yield state
    finally:
        for layer, mlp in zip(layers, originals):
            layer.mlp = mlp
        hook.remove()
        post.remove()
        if hasattr(model, _SESSION_ATTR):
            delattr(model, _SESSION_ATTR)
