"""The block layout of a prefill, and the sizes a plan derives from a model's shape.

One implementation of each, used by the engine, the FLOP model, the trainers and the GPU benchmark:

* `block_spans(T, B)`: `[start, end)` of every `B`-token block of a `T`-token prompt, aligned to
  the prompt's start (the last block may be partial);
* `split_blocks(T, B, dense_first, dense_last, offset, tail)`: those spans split into the dense ones (the
  first block holds the attention sinks, the tail the question) and the sparse ones; with `tail="full"`
  the dense tail is the prompt's last `B` tokens (the block before it shortens), with `tail="grid"` it is
  the grid's last block, which may be a single token;
* `experts_for(density, f)`: how many neurons a sparse block keeps, `K = round(density * f)`;
* `predictor_rank(d)` and `compensator_rank(d)`: the bottleneck widths of the trained parts.

This module imports nothing heavy (no torch), so a benchmark script on another machine can use it.
"""
from __future__ import annotations

import math

BLOCK_SIZE = 128  # tokens per prefill block (the paper's B)

Span = tuple[int, int]
TAILS = ("full", "grid")  # the dense tail: the last block_size tokens, or the grid's (possibly partial) last block


def check_block_size(block_size: int) -> int:
    """Return block_size, or raise if it is not a positive int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def block_spans(T: int, block_size: int = BLOCK_SIZE) -> list[Span]:
    """[start, end) of each block of a T-token sequence; the last block may be partial."""
    check_block_size(block_size)
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    return [(s, min(s + block_size, T)) for s in range(0, T, block_size)]


def check_tail(tail: str) -> str:
    """Return tail, or raise if it is not one of TAILS."""
    if tail not in TAILS:
        raise ValueError(f"unknown dense tail {tail!r}; choose one of {TAILS}")
    return tail


def split_blocks(
    T: int, block_size: int = BLOCK_SIZE, dense_first: bool = True, dense_last: bool = True, offset: int = 0,
    tail: str = "full",
) -> tuple[list[Span], list[Span]]:
    """A sequence's blocks split into (dense spans, sparse spans), both in order.

    `offset` > 0 means this call continues an earlier prefill (KV cache): its first block does
    not hold the sequence's sinks, so `dense_first` does not apply to it. With `dense_last`, the
    tail runs dense: `tail="full"` makes it the last `block_size` tokens (never reaching into the
    dense first block) and cuts the grid block it overlaps short; `tail="grid"` keeps the grid's last
    block, however short (the question then mostly falls into a sparse block).
    """
    check_tail(tail)
    spans = block_spans(T, block_size)
    head = dense_first and offset == 0 and bool(spans)
    dense = [spans[0]] if head else []
    body = spans[1:] if head else spans
    if dense_last and body:
        if tail == "grid":
            tail_span = body[-1]
        else:
            tail_span = (max(body[0][0], T - block_size), T)
        body = [(s, min(e, tail_span[0])) for s, e in body if s < tail_span[0]]
        return dense + [tail_span], body
    return dense, body


def sparse_token_count(T: int, block_size: int = BLOCK_SIZE, dense_first: bool = True, dense_last: bool = True,
                       tail: str = "full") -> int:
    """Number of prompt tokens that fall into sparse blocks."""
    return sum(e - s for s, e in split_blocks(T, block_size, dense_first, dense_last, tail=tail)[1])


def experts_for(density: float, f: int) -> int:
    """Neurons a sparse block keeps at a density: K = round(density * f), at least 1 and at most f."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1] (density = 1 - sparsity), got {density!r}")
    return max(1, min(f, round(density * f)))


def predictor_rank(d: int) -> int:
    """The expert predictor's bottleneck width r: the power of two at or above d/16."""
    return 1 << max(0, math.ceil(math.log2(d / 16)))


def compensator_rank(d: int) -> int:
    """The error compensator's bottleneck width d/8 (at least 1)."""
    return max(1, d // 8)
