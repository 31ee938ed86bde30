"""Expert selection policies: which K neurons each sparse block computes.

Every policy implements `select(ctx) -> LongTensor[n_blocks, K]` (sorted neuron ids per
sparse block). The trained predictor (ffcore.predictor) implements the same interface.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from ffcore.engine.sparse_ffn import FusedFFN, dense_activations


@dataclasses.dataclass
class SelectContext:
    """What a policy may look at when choosing the experts of a layer's sparse blocks."""

    layer: int
    x: Tensor  # [T, d] this sequence's FFN input (output of the post-attention norm)
    spans: Sequence[tuple[int, int]]  # the sparse blocks, [start, end) rows of x
    k: int  # experts per block
    fused: FusedFFN  # the layer's weights (for oracle statistics)
    block_size: int
    decode: bool = False  # a one-token decode step (spans == [(0, 1)])
    offset: int = 0  # tokens already in the KV cache before this call
    first_scores: Tensor | None = None  # [f] GRIFFIN scores of the prompt's first block (policies that ask for it)


@runtime_checkable
class SelectionPolicy(Protocol):
    """The interface every expert-selection policy implements.

    A policy with a true `needs_first_block` attribute gets `ctx.first_scores`: the engine takes them
    from the prompt's first block (free when it runs dense) and keeps them for later calls on the same
    sequence (a suffix prefill after a cached context, decode steps).
    """

    name: str

    def select(self, ctx: SelectContext) -> Tensor:
        """Expert ids per sparse block: LongTensor [len(ctx.spans), ctx.k]."""
        ...


def griffin_scores(h: Tensor) -> Tensor:
    """GRIFFIN neuron importance of a block: row-normalise h [n, f], then column L2 norm -> [f]."""
    h = h.float()
    h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return h.norm(dim=0)


def topk_sorted(scores: Tensor, k: int) -> Tensor:
    """Ids of the k largest scores along the last dim, sorted ascending (friendlier gathers)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def block_scores(ctx: SelectContext, spans: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Oracle (GRIFFIN) scores of each span from its own dense activations: [n_spans, f]."""
    spans = ctx.spans if spans is None else spans
    return torch.stack([griffin_scores(dense_activations(ctx.x[s:e], ctx.fused)) for s, e in spans])


class DensePolicy:
    """Select every neuron (the sparse path at K = f; mainly for tests)."""

    name = "dense"

    def select(self, ctx: SelectContext) -> Tensor:
        """All f neuron ids for every block."""
        return torch.arange(ctx.fused.f, device=ctx.x.device).expand(len(ctx.spans), -1)[:, : ctx.k]


class OraclePolicy:
    """Per-block oracle: each block's own top-K GRIFFIN neurons (needs its dense activations)."""

    name = "oracle"

    def select(self, ctx: SelectContext) -> Tensor:
        """Top-K of each block's own GRIFFIN scores."""
        return topk_sorted(block_scores(ctx), ctx.k)


class FirstBlockStaticPolicy:
    """GRIFFIN's static experts: chosen from the first block, reused by every later block and decode step."""

    name = "first_block_static"
    needs_first_block = True

    def select(self, ctx: SelectContext) -> Tensor:
        """The first block's top-K, one row per sparse block."""
        if ctx.first_scores is None:
            raise RuntimeError("first_block_static needs the first block's scores: prefill from position 0 first")
        return topk_sorted(ctx.first_scores, ctx.k).expand(len(ctx.spans), -1)


class StaticPolicy:
    """Fixed experts per layer, the same for every prompt (e.g. the top-K of the mean training importance)."""

    name = "global_static"

    def __init__(self, scores: Tensor, name: str = "global_static") -> None:
        self.scores = scores  # [L, f]
        self.name = name

    def select(self, ctx: SelectContext) -> Tensor:
        """The layer's top-K, one row per sparse block."""
        return topk_sorted(self.scores[ctx.layer].to(ctx.x.device), ctx.k).expand(len(ctx.spans), -1)


class RandomPolicy:
    """K random neurons per block (a floor every real policy must beat)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, ctx: SelectContext) -> Tensor:
        """Random K-subsets, deterministic in (seed, layer, block position)."""
        rows = []
        for s, _ in ctx.spans:
            g = torch.Generator().manual_seed(hash((self.seed, ctx.layer, ctx.offset + s)) & 0x7FFFFFFF)
            rows.append(torch.randperm(ctx.fused.f, generator=g)[: ctx.k])
        return torch.stack(rows).sort(dim=-1).values.to(ctx.x.device)


def make_policy(name: str, seed: int = 0) -> SelectionPolicy:
    """A fresh policy object by name."""
    table = {"dense": DensePolicy, "oracle": OraclePolicy, "first_block_static": FirstBlockStaticPolicy}
    if name == "random":
        return RandomPolicy(seed)
    if name not in table:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(table) + ['random']}")
    return table[name]()
