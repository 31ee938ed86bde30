"""Benchmarks: the FFN module and the time to first token, dense vs block-sparse, interleaved in one process.

    python -m ffcore.bench --models smollm2-135m gemma3-270m --tokens 1024 2048 --densities 0.5

Dense is the model's own MLP module on the whole sequence; sparse is the engine's compute path
(`block_sparse_ffn`) with first/last blocks dense and fixed expert ids, so the FFN number isolates
the FFN compute (expert selection is a separate, FLOP-counted overhead). Every measurement uses
`ffcore.timing.interleaved`: dense and sparse calls alternate round by round, the speedup is the
median of the per-round ratios, with its interquartile range, wall and CPU time both recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ffcore.config import StrictConfig
from ffcore.engine import BLOCK_SIZE, EngineOptions, SparsityPlan, experts_for, sparsify, split_blocks
from ffcore.engine.sparse_ffn import block_sparse_ffn, fused_ffn
from ffcore.flops import ffn_ideal_speedup
from ffcore.models import gated_mlps, load_model
from ffcore.results import provenance
from ffcore.timing import interleaved, model_sync, ratio


@dataclasses.dataclass
class FFNBenchConfig(StrictConfig):
    """What the FFN benchmark measures."""

    tokens: Sequence[int] = (1024, 2048, 4096, 8192)
    densities: Sequence[float] = (0.5, 0.6, 0.7)
    repeats: int = 7
    warmup: int = 2
    block_size: int = BLOCK_SIZE
    dense_first: bool = True
    dense_last: bool = True
    dense_tail: str = "full"
    seed: int = 0


def synthetic_mlp(d: int, f: int, act: str = "silu", seed: int = 0) -> nn.Module:
    """A gated MLP of a given shape with random weights (speed does not depend on the values)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    act_name = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[act]
    return LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f, hidden_act=act_name)).eval()


def random_experts(n_blocks: int, f: int, k: int, seed: int) -> torch.Tensor:
    """Sorted random expert ids [n_blocks, k] (timing does not depend on which experts)."""
    g = torch.Generator().manual_seed(seed)
    if n_blocks == 0:  # a context of at most two blocks: first and last run dense
        return torch.empty(0, k, dtype=torch.long)
    return torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(n_blocks)]).sort(-1).values


@torch.no_grad()
def bench_ffn(mlp: nn.Module, cfg: FFNBenchConfig, label: str = "",
              options: EngineOptions = EngineOptions()) -> list[dict[str, Any]]:
    """Dense vs sparse FFN time at every (tokens, density), interleaved; one flat record each."""
    fused = fused_ffn(mlp)
    d, f = fused.d, fused.f
    dtype = fused.w_gu.dtype
    rows = []
    for T in cfg.tokens:
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float32).to(dtype)
        dense_spans, sparse_spans = split_blocks(T, cfg.block_size, cfg.dense_first, cfg.dense_last, tail=cfg.dense_tail)
        for density in cfg.densities:
            k = experts_for(density, f)
            idx = random_experts(len(sparse_spans), f, k, cfg.seed)

            def run_sparse() -> torch.Tensor:
                return block_sparse_ffn(x, fused, dense_spans, sparse_spans, idx, mlp, options)

            torch.testing.assert_close(  # sanity: the dense first block must agree (full K is checked in tests)
                run_sparse()[: cfg.block_size], mlp(x)[: cfg.block_size], rtol=1e-4, atol=1e-4)
            rec = interleaved({"dense": lambda: mlp(x), "sparse": run_sparse}, cfg.repeats, cfg.warmup)
            speed = ratio(rec, "dense", "sparse")
            ideal = ffn_ideal_speedup(T, k / f, cfg.block_size, cfg.dense_first, cfg.dense_last, cfg.dense_tail)
            rows.append({
                "model": label, "d": d, "f": f, "T": T, "density": density, "k": k,
                **rec.summary("dense", 1e3, "_ms"), **rec.summary("sparse", 1e3, "_ms"), **speed,
                "ideal_speedup": ideal, "fraction_of_ideal": speed["speedup"] / ideal, **rec.conditions(),
            })
    return rows


def bench_models(models: Sequence[str], cfg: FFNBenchConfig, layer: int = 0) -> list[dict[str, Any]]:
    """`bench_ffn` on one layer's MLP of each named model (real weights)."""
    rows = []
    for key in models:
        model, _ = load_model(key)
        rows += bench_ffn(gated_mlps(model)[layer], cfg, label=key)
    return rows


@torch.no_grad()
def bench_ttft(
    model: nn.Module, input_ids: torch.Tensor, plans: Mapping[str, SparsityPlan | None], repeats: int = 3,
    warmup: int = 1, options: EngineOptions = EngineOptions(),
) -> dict[str, Any]:
    """Time to first token (one prefill forward, last-token logits) of the dense model and every plan, interleaved.

    `plans` maps a name to a plan (None: the dense model); every plan shares the dense baseline of the
    same rounds. Returns {"record": TimingRecord, "<name>": ratio fields of dense / that plan}.
    """
    def prefill(plan: SparsityPlan | None) -> Any:
        def run() -> None:
            ctx = contextlib.nullcontext() if plan is None else sparsify(model, plan, options)
            with ctx:
                model(input_ids, use_cache=False, logits_to_keep=1)
        return run

    fns = {"dense": prefill(None), **{name: prefill(plan) for name, plan in plans.items() if name != "dense"}}
    rec = interleaved(fns, repeats, warmup, sync=model_sync(model))
    return {"record": rec, **{name: ratio(rec, "dense", name) for name in fns if name != "dense"}}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of FFN benchmark records."""
    head = (f"{'model':<14}{'T':>6}{'dens':>6}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}{'IQR':>13}"
            f"{'ideal':>7}{'frac':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<14}{r['T']:>6}{r['density']:>6.2f}{r['dense_ms']:>10.1f}{r['sparse_ms']:>11.1f}"
            f"{r['speedup']:>9.2f}  [{r['speedup_q25']:.2f}, {r['speedup_q75']:.2f}]"
            f"{r['ideal_speedup']:>7.2f}{r['fraction_of_ideal']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the dense-vs-sparse FFN table (and write JSON with --json)."""
    p = argparse.ArgumentParser(prog="python -m ffcore.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="also write the records to this JSON file")
    a = p.parse_args(argv)
    cfg = FFNBenchConfig(tokens=a.tokens, densities=a.densities, repeats=a.repeats)
    rows = bench_models(a.models, cfg)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"provenance": provenance("cli"), "config": cfg.to_dict(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
