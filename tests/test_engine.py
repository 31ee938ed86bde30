"""The block-sparse FFN engine against dense and masked-dense references on tiny models."""
from __future__ import annotations

import inspect

import pytest
import torch

from ffcore.bench import random_experts, synthetic_mlp
from ffcore.engine import EngineOptions, SparseMLP, sparsify
from ffcore.engine import sparse_ffn as sf
from ffcore.engine.layout import block_spans, split_blocks
from ffcore.engine.plan import SparsityPlan
from ffcore.engine.policies import OraclePolicy, SelectContext, SelectionPolicy, griffin_scores, make_policy, topk_sorted
from ffcore.engine.sparse_ffn import block_sparse_ffn, dense_activations, fused_ffn
from ffcore.models import decoder_layers, gated_mlps, tiny_model

ARCHS = ["llama", "qwen3", "gemma3"]
T = 300  # 3 blocks of 128 minus a partial last block (44 tokens) at block size 128


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=1)


def _ids(T: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_density_one_equals_dense(model):
    ids = _ids()
    ref = model(ids).logits
    for policy in ("oracle", "random", "first_block_static"):
        with sparsify(model, SparsityPlan(densities=1.0, policy=policy)):
            out = model(ids).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_gather_path_at_full_k_matches_dense(model):
    """Selecting every neuron through the gather path reproduces the MLP, sequential and block-parallel."""
    mlp = gated_mlps(model)[0]
    x = torch.randn(T, model.config.hidden_size)
    fused = fused_ffn(mlp)
    dense, sparse = split_blocks(T, 64, False, False)
    idx = torch.arange(fused.f).expand(len(sparse), -1)
    for parallel in (False, True):
        y = block_sparse_ffn(x, fused, dense, sparse, idx, mlp, EngineOptions(block_parallel=parallel))
        torch.testing.assert_close(y, mlp(x), atol=1e-5, rtol=1e-5)


def _masked_dense_reference(mlp, x, spans, k, dense_spans):
    """The dense MLP with all but each block's top-k oracle neurons zeroed: x [T, d] -> [T, d]."""
    fused = fused_ffn(mlp)
    h = dense_activations(x, fused)  # [T, f]
    mask = torch.zeros_like(h)
    for s, e in spans:
        mask[s:e, topk_sorted(griffin_scores(h[s:e]), k)] = 1.0
    for s, e in dense_spans:
        mask[s:e] = 1.0
    return (h * mask) @ mlp.down_proj.weight.t()


@torch.no_grad()
@pytest.mark.parametrize("density", [0.5, 0.3])
def test_oracle_equals_masked_dense(model, density):
    mlp = gated_mlps(model)[1]
    layers = decoder_layers(model)
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    plan = SparsityPlan(densities=density, policy="oracle", block_size=64)
    dense, sparse = split_blocks(T, 64, True, True)
    k = round(density * mlp.intermediate_size)
    ref = _masked_dense_reference(mlp, x[0], sparse, k, dense)
    with sparsify(model, plan):
        out = layers[1].mlp(x)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_first_and_last_blocks_bit_identical(model):
    ids = _ids()
    ref = model(ids).logits
    B = 128
    with sparsify(model, SparsityPlan(densities=0.4, policy="oracle", block_size=B)):
        out = model(ids).logits
    assert torch.equal(out[:, :B], ref[:, :B]), "the dense first block must be bit-identical to dense"
    assert not torch.equal(out[:, B:], ref[:, B:]), "sparse blocks must differ (else nothing was sparsified)"
    # module level: the last block's FFN rows are the dense MLP's rows for the same input
    mlp = gated_mlps(model)[0]
    x = torch.randn(1, T, model.config.hidden_size)
    with sparsify(model, SparsityPlan(densities=0.4, policy="oracle", block_size=B)):
        y = decoder_layers(model)[0].mlp(x)
    last = block_spans(T, B)[-1]
    assert torch.equal(y[:, last[0] :], mlp(x[:, last[0] :]))
    assert torch.equal(y[:, :B], mlp(x[:, :B]))


@torch.no_grad()
def test_switches_off_sparsify_first_and_last(model):
    ids = _ids()
    ref = model(ids).logits
    with sparsify(model, SparsityPlan(densities=0.4, policy="oracle", dense_first=False, dense_last=False)) as st:
        out = model(ids).logits
    assert st.stats["dense_tokens"] == 0 and st.stats["sparse_tokens"] == T * model.config.num_hidden_layers
    assert not torch.equal(out[:, :128], ref[:, :128])


@torch.no_grad()
def test_restore_is_bit_identical(model):
    ids = _ids()
    before_params = {k: v.clone() for k, v in model.state_dict().items()}
    before_mlps = [layer.mlp for layer in decoder_layers(model)]
    ref = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with sparsify(model, SparsityPlan(densities=0.5)):
            assert isinstance(decoder_layers(model)[0].mlp, SparseMLP)
            raise RuntimeError("boom")
    assert [layer.mlp for layer in decoder_layers(model)] == before_mlps
    after = model.state_dict()
    assert before_params.keys() == after.keys()
    assert all(torch.equal(before_params[k], after[k]) for k in after)
    assert torch.equal(model(ids).logits, ref)
    assert not hasattr(model, "_ffcore_session")


@torch.no_grad()
def test_nested_sparsify_does_not_double_wrap(model):
    ids = _ids()
    with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        outer = model(ids).logits
        with sparsify(model, SparsityPlan(densities=1.0, policy="oracle")):
            mlp = decoder_layers(model)[0].mlp
            assert isinstance(mlp, SparseMLP) and not isinstance(mlp.original, SparseMLP)
            inner = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(inner, model(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(outer, again)


@torch.no_grad()
@pytest.mark.parametrize("cache_kwarg", ["past_key_values", "cache"])
@pytest.mark.parametrize("sparse_decode", [False, True])
def test_decode_after_sparse_prefill_uses_kv_cache(model, sparse_decode, cache_kwarg):
    if cache_kwarg == "cache" and "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("transformers < 5.24 has no `cache` argument (`past_key_values` was renamed in 5.24)")
    ids = _ids(260)
    plan = SparsityPlan(densities=0.5, policy="first_block_static", sparse_decode=sparse_decode)
    with sparsify(model, plan) as st:
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        before = dict(st.stats)
        step = model(nxt, **{cache_kwarg: out.past_key_values}, use_cache=True)  # token 260: block 2, not dense block 0
        grew = {k: st.stats[k] - before[k] for k in before}
    L = model.config.num_hidden_layers
    assert step.logits.shape == (1, 1, model.config.vocab_size)
    assert grew == ({"dense_tokens": 0, "sparse_tokens": L} if sparse_decode else {"dense_tokens": L, "sparse_tokens": 0})
    # decode with a dense plan continues exactly like the dense model from the same (sparse) cache
    assert torch.isfinite(step.logits).all()


@torch.no_grad()
def test_generate_runs(model):
    ids = _ids(200)
    with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 204)


def test_bad_input(model):
    L = model.config.num_hidden_layers
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            SparsityPlan(densities=bad)
    with pytest.raises(ValueError, match="layers"):
        with sparsify(model, SparsityPlan(densities=[0.5] * (L + 1))):
            pass
    with pytest.raises(ValueError, match="unknown policy"):
        SparsityPlan(policy="magic")
    with pytest.raises(ValueError, match="unknown key"):
        SparsityPlan.from_dict({"densitys": 0.5})
    ids = torch.randint(0, 256, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :10] = 0
    with sparsify(model, SparsityPlan(densities=0.5)):
        with pytest.raises(ValueError, match="padding"):
            model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones_like(mask))  # equal lengths, no padding: fine


def test_unsupported_mlp_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match="gated MLP"):
        with sparsify(gpt2, SparsityPlan(densities=0.5)):
            pass


@torch.no_grad()
def test_batch_rows_are_independent(model):
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(5))
    with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        both = model(ids).logits
        one = model(ids[1:]).logits
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


def test_policies_share_one_interface(model):
    mlp = gated_mlps(model)[0]
    fused = fused_ffn(mlp)
    x = torch.randn(T, model.config.hidden_size)
    spans = split_blocks(T, 64, True, True)[1]
    ctx = SelectContext(0, x, spans, 17, fused, 64)
    for name in ("dense", "oracle", "first_block_static", "random"):
        pol = make_policy(name)
        assert isinstance(pol, SelectionPolicy)
        idx = pol.select(ctx)
        assert idx.shape == (len(spans), 17)
        assert all(len(set(r.tolist())) == 17 for r in idx), "experts must be distinct"
    # first-block static reuses block 1's experts for every block
    fbs = make_policy("first_block_static").select(ctx)
    assert all(torch.equal(fbs[0], r) for r in fbs)
    first = OraclePolicy().select(SelectContext(0, x, [(0, 64)], 17, fused, 64))
    assert torch.equal(fbs[0], first[0])


@pytest.mark.parametrize("threads", [2, 3])
def test_block_parallel_cpu_path_matches_sequential(threads):
    mlp = synthetic_mlp(64, 96)
    fused = fused_ffn(mlp)
    x = torch.randn(7 * 32 + 5, 64)  # 8 blocks of 32, the last partial
    dense, sparse = split_blocks(x.shape[0], 32, True, True)
    idx = random_experts(len(sparse), 96, 40, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert sf.block_workers(x, len(sparse)) == min(threads, len(sparse))
            par = sf.block_sparse_ffn(x, fused, dense, sparse, idx, mlp)
            assert torch.get_num_threads() == threads  # restored after the workers ran
            assert sf.block_workers(x, len(sparse), parallel=False) == 1
            seq = sf.block_sparse_ffn(x, fused, dense, sparse, idx, mlp, EngineOptions(block_parallel=False))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-6)
    assert sf.block_workers(x.requires_grad_(), len(sparse)) == 1  # autograd stays sequential
