"""The engine's Triton backend (run by Triton's interpreter on CPU, natively on a GPU) against its torch path.

Every expert policy, the trained predictor, sparse decode and partial blocks go through the kernels,
including the policies that return expanded (stride-0) expert ids: the engine hands the kernels
contiguous indices.
"""
from __future__ import annotations

import pytest
import torch

from ffcore.engine import EngineOptions, sparsify
from ffcore.engine.plan import SparsityPlan
from ffcore.engine.policies import SelectContext, make_policy
from ffcore.engine.sparse_ffn import fused_ffn
from ffcore.models import gated_mlps, tiny_model
from ffcore.predictor import ExpertPredictor

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH, TRITON = EngineOptions(backend="torch"), EngineOptions(backend="triton")


def _model(arch: str, layers: int = 2) -> torch.nn.Module:
    return tiny_model(arch, seed=2, num_hidden_layers=layers).to(DEVICE)


def _ids(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _both(model: torch.nn.Module, plan: SparsityPlan, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with sparsify(model, plan, TORCH):
            ref = model(ids).logits
        with sparsify(model, plan, TRITON):
            out = model(ids).logits
    return out, ref


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dense_last", [True, False])
def test_triton_backend_matches_torch_backend(arch, dense_last):
    model = _model(arch)
    plan = SparsityPlan(densities=0.4, policy="oracle", block_size=32, dense_last=dense_last)
    out, ref = _both(model, plan, _ids(150))  # partial last block (22 tokens)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("policy", ["dense", "oracle", "first_block_static", "random"])
def test_every_policy_through_the_kernels(policy):
    """Policies returning expanded ids (first_block_static, dense) used to be refused by the kernels' stride check."""
    model = _model("llama")
    plan = SparsityPlan(densities=0.5, policy=policy, block_size=32)
    out, ref = _both(model, plan, _ids(32 * 5 + 7))  # four sparse blocks, the last one partial and dense
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_expanded_expert_ids_are_what_the_policies_return():
    """The regression this file guards: first-block static experts are one row expanded over the blocks."""
    model = _model("llama")
    fused = fused_ffn(gated_mlps(model)[0])
    x = torch.randn(160, model.config.hidden_size, device=DEVICE)
    ctx = SelectContext(0, x, [(32, 64), (64, 96), (96, 128)], 40, fused, 32,
                        first_scores=torch.rand(fused.f, device=DEVICE))
    idx = make_policy("first_block_static").select(ctx)
    assert idx.stride(0) == 0  # so the engine, not the policy, must make it contiguous


def test_trained_predictor_through_the_kernels():
    model = _model("gemma3")
    cfg = model.config
    torch.manual_seed(0)
    pred = ExpertPredictor(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size).to(DEVICE)
    with torch.no_grad():
        pred.w2.normal_()  # spread the scores so the top-K is not a tie
    plan = SparsityPlan(densities=0.5, policy=pred, block_size=32)
    out, ref = _both(model, plan, _ids(140, seed=3))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_sparse_decode_through_the_kernels():
    """One-token decode steps are single-row sparse spans: the kernels' smallest block."""
    model = _model("llama")
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=32, sparse_decode=True)
    ids = _ids(100, seed=4)
    steps = {}
    with torch.no_grad():
        for name, opts in (("torch", TORCH), ("triton", TRITON)):
            with sparsify(model, plan, opts):
                out = model(ids, use_cache=True)
                cache, logits = out.past_key_values, [out.logits[:, -1]]
                for t in range(3):
                    nxt = logits[-1].argmax(-1, keepdim=True)
                    o = model(nxt, past_key_values=cache, use_cache=True)
                    cache = o.past_key_values
                    logits.append(o.logits[:, -1])
            steps[name] = torch.stack(logits)
    torch.testing.assert_close(steps["triton"], steps["torch"], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_through_the_kernels(dtype):
    model = _model("llama").to(dtype)
    plan = SparsityPlan(densities=0.5, policy="random", block_size=32)
    out, ref = _both(model, plan, _ids(130, seed=5))
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="unknown backend"):
        EngineOptions(backend="cuda")
    model = _model("llama", layers=1)
    with pytest.raises(TypeError, match="EngineOptions"):
        with sparsify(model, SparsityPlan(densities=0.5), "triton"):
            pass
