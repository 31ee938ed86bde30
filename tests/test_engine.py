"""The block-sparse FFN engine against dense and masked-dense references on tiny models."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from ffcore.bench import random_experts, synthetic_mlp
from ffcore.engine import EngineOptions, SparseMLP, sparsify
from ffcore.engine import sparse_ffn as sf
from ffcore.engine.layout import block_spans, experts_for, split_blocks
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


# T = 300 in blocks of 64, written out by hand: the full-block tail is the last 64 tokens and shortens the
# block it overlaps ([192, 236)); the grid tail is the grid's 44-token remainder.
HAND_LAYOUTS = {
    "full": ([(0, 64), (236, 300)], [(64, 128), (128, 192), (192, 236)]),
    "grid": ([(0, 64), (256, 300)], [(64, 128), (128, 192), (192, 256)]),
}


def test_split_blocks_tails_by_hand():
    for tail, (dense, sparse) in HAND_LAYOUTS.items():
        assert split_blocks(T, 64, True, True, tail=tail) == (dense, sparse)
    assert split_blocks(100, 64, True, True, tail="full") == ([(0, 64), (64, 100)], [])  # never into block 1
    assert split_blocks(256, 64, True, True, tail="full") == split_blocks(256, 64, True, True, tail="grid")
    assert split_blocks(300, 64, True, True, offset=10, tail="full") == ([(236, 300)], [(0, 64), (64, 128), (128, 192), (192, 236)])
    with pytest.raises(ValueError, match="dense tail"):
        split_blocks(T, 64, tail="last")
    with pytest.raises(ValueError, match="dense tail"):
        SparsityPlan(densities=0.5, dense_tail="last")


@torch.no_grad()
@pytest.mark.parametrize("tail", ["full", "grid"])
def test_dense_tail_equals_masked_dense(model, tail):
    """Both tail rules against the masked-dense reference on the hand-written layout; they differ."""
    mlp = gated_mlps(model)[1]
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    dense, sparse = HAND_LAYOUTS[tail]
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=64, dense_tail=tail)
    assert plan.spans(T) == (dense, sparse)
    ref = _masked_dense_reference(mlp, x[0], sparse, experts_for(0.5, mlp.intermediate_size), dense)
    with sparsify(model, plan):
        out = decoder_layers(model)[1].mlp(x)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    tail_start = dense[-1][0]
    torch.testing.assert_close(out[tail_start:], mlp(x)[0, tail_start:], atol=1e-5, rtol=1e-4)  # the tail is dense
    other = "grid" if tail == "full" else "full"
    with sparsify(model, plan.replace(dense_tail=other)):
        out_other = decoder_layers(model)[1].mlp(x)[0]
    assert (out_other[236:256] - out[236:256]).abs().max() > 1e-4  # the overlap region is dense in one rule only


@torch.no_grad()
@pytest.mark.parametrize("block_size", [64, 128])
def test_sparse_partial_last_block_equals_masked_dense(model, block_size):
    """With the last block sparse, its partial span (T % block_size tokens) keeps its own top-k like any block."""
    mlp = gated_mlps(model)[2]
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=block_size, dense_last=False)
    dense, sparse = split_blocks(T, block_size, True, False)
    assert sparse[-1][1] - sparse[-1][0] == T % block_size  # the partial block is among the sparse ones
    ref = _masked_dense_reference(mlp, x[0], sparse, experts_for(0.5, mlp.intermediate_size), dense)
    with sparsify(model, plan):
        out = decoder_layers(model)[2].mlp(x)[0]
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
        ref_cache = copy.deepcopy(out.past_key_values)
        before = dict(st.stats)
        step = model(nxt, **{cache_kwarg: out.past_key_values}, use_cache=True)  # token 260: block 2, not dense block 0
        grew = {k: st.stats[k] - before[k] for k in before}
    L = model.config.num_hidden_layers
    assert step.logits.shape == (1, 1, model.config.vocab_size)
    assert grew == ({"dense_tokens": 0, "sparse_tokens": L} if sparse_decode else {"dense_tokens": L, "sparse_tokens": 0})
    if not sparse_decode:  # a dense decode step continues exactly like the dense model from the same (sparse) cache
        dense_step = model(nxt, past_key_values=ref_cache, use_cache=True)
        torch.testing.assert_close(step.logits, dense_step.logits, atol=1e-5, rtol=1e-5)


def _masked_decode_mlp(mlp, k):
    """The dense MLP of one decode token with all but its own top-k oracle neurons zeroed (the masked reference)."""
    fused = fused_ffn(mlp)

    def forward(x):  # x [1, 1, d]
        h = dense_activations(x[0], fused)  # [1, f]
        mask = torch.zeros_like(h)
        mask[:, topk_sorted(griffin_scores(h), k)] = 1.0
        return ((h * mask) @ fused.w_down_t)[None]  # [1, 1, d]

    return forward


@torch.no_grad()
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_sparse_decode_step_equals_references(model, density):
    """Sparse decode at density 1 is the dense model; at density d it is the masked dense MLP of the token."""
    ids = _ids(200, seed=2)
    plan = SparsityPlan(densities=density, policy="oracle", sparse_decode=True)
    with sparsify(model, plan):
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        ref_cache = copy.deepcopy(out.past_key_values)
        step = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    mlps = gated_mlps(model)
    saved = [m.forward for m in mlps]
    if density < 1.0:
        for m in mlps:
            m.forward = _masked_decode_mlp(m, experts_for(density, fused_ffn(m).f))
    try:
        ref = model(nxt, past_key_values=ref_cache, use_cache=True).logits
    finally:
        for m, f in zip(mlps, saved):
            m.forward = f
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_under_sparsify_equals_a_sparse_prefill_and_dense_greedy_decode(model):
    ids = _ids(200)
    plan = SparsityPlan(densities=0.5, policy="oracle")
    with sparsify(model, plan):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        first = model(ids, use_cache=True)
    assert out.shape == (1, 204)
    tokens, cache, logits = [], first.past_key_values, first.logits[:, -1]
    for _ in range(4):  # decode steps run dense (plan.sparse_decode is False)
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok))
        step = model(tok, past_key_values=cache, use_cache=True)
        cache, logits = step.past_key_values, step.logits[:, -1]
    assert out[0, 200:].tolist() == tokens


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
    mask[1, 40:60] = 0  # a hole inside the row: neither left nor right padding
    with sparsify(model, SparsityPlan(densities=0.5)):
        with pytest.raises(ValueError, match="padding between its tokens"):
            model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones_like(mask))  # equal lengths, no padding: fine
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :10] = 0
    with sparsify(model, SparsityPlan(densities=0.5, sparse_decode=True, decode_context="window")):
        with pytest.raises(ValueError, match="padded batch"):
            model(ids, attention_mask=mask)


LENGTHS = (300, 190, 129)  # rows of different lengths: 3 blocks + partial, 2 blocks minus, one block + 1 token


def _padded(lengths: tuple[int, ...], side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
    """A padded batch [len(lengths), max] of random ids, its attention mask, and each row's unpadded ids."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 256, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask, rows


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_one_at_a_time(model, side):
    """Each row's blocks come from its own tokens: a padded batch gives every row its solo logits."""
    ids, mask, rows = _padded(LENGTHS, side)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, width], each row counts from its first token
    plans = (SparsityPlan(densities=0.5, policy="oracle"),
             SparsityPlan(densities=0.4, policy="first_block_static"))
    for plan in plans:
        with sparsify(model, plan) as state:
            batch = model(ids, attention_mask=mask, position_ids=position_ids).logits  # [batch, width, V]
            stats = dict(state.stats)
            solo = [model(r[None]).logits[0] for r in rows]  # [n, V] each
        for b, (r, ref) in enumerate(zip(rows, solo)):
            got = batch[b][mask[b].bool()]  # [n, V], the row's real positions
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4, msg=f"{plan.policy_name} row {b} ({side})")
        L = model.config.num_hidden_layers
        assert stats["dense_tokens"] + stats["sparse_tokens"] == L * sum(LENGTHS)  # padding is neither


@torch.no_grad()
def test_generate_on_a_left_padded_batch_equals_each_row_alone(model):
    """model.generate on a left-padded batch under sparsify gives each row the tokens it gets alone."""
    ids, mask, rows = _padded((260, 140), "left", seed=3)
    plan = SparsityPlan(densities=0.5, policy="oracle")
    cfg = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with sparsify(model, plan):
        out = model.generate(ids, attention_mask=mask, **cfg)[:, ids.shape[1]:]  # [batch, 5]
        for b, r in enumerate(rows):
            alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **cfg)
            assert out[b].tolist() == alone[0, len(r):].tolist(), f"row {b}"


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
    first_scores = griffin_scores(dense_activations(x[:64], fused))  # what the engine hands policies that ask
    ctx = SelectContext(0, x, spans, 17, fused, 64, first_scores=first_scores)
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


def test_activation_names_match_the_functions_they_compute():
    """Every transformers activation maps to the Triton activation that computes the same function, or 'other'."""
    import transformers.activations as A

    x = torch.linspace(-12, 12, 4001)  # wide enough to reach the clipped GELU's bounds (+-10)
    reference = {"silu": torch.nn.functional.silu(x), "gelu": torch.nn.functional.gelu(x),
                 "gelu_tanh": torch.nn.functional.gelu(x, approximate="tanh")}
    for key, cls in A.ACT2CLS.items():
        if key == "xielu":  # needs an optional CUDA extension to build
            continue
        act = cls[0](**cls[1]) if isinstance(cls, tuple) else cls()
        name = sf.act_name(act)
        if name == "other":  # then no known function may match: the mapping would have missed it
            assert all((act(x) - ref).abs().max() > 1e-4 for ref in reference.values()), key
        else:
            torch.testing.assert_close(act(x), reference[name], atol=1e-5, rtol=0, msg=key)
    for mod, want in ((torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
                      (torch.nn.SiLU(), "silu"), (torch.nn.ReLU(), "other")):
        assert sf.act_name(mod) == want


def test_unknown_activation_runs_on_torch_and_is_refused_by_triton():
    model = tiny_model("llama", seed=0, num_hidden_layers=1)
    mlp = gated_mlps(model)[0]
    mlp.act_fn = torch.nn.Mish()
    sf.clear_cache()
    ids = _ids(200)
    with torch.no_grad(), sparsify(model, SparsityPlan(densities=1.0, policy="oracle")):
        ref = model(ids).logits
    with torch.no_grad(), sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        assert torch.isfinite(model(ids).logits).all()  # the torch path applies the module itself
    with pytest.raises(ValueError, match="activations without FFN biases"):
        sf.resolve_backend("triton", torch.zeros(1), fused_ffn(mlp))
    assert ref.shape[1] == 200


def test_block_parallel_path_runs_under_inference_mode():
    """Worker threads do not inherit inference mode; the engine hands it to them (it used to raise)."""
    mlp = synthetic_mlp(64, 96)
    fused = fused_ffn(mlp)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            x = torch.randn(5 * 32, 64)
            dense, sparse = split_blocks(x.shape[0], 32, True, True)
            idx = random_experts(len(sparse), 96, 40, seed=2)
            par = sf.block_sparse_ffn(x, fused, dense, sparse, idx, mlp)
            seq = sf.block_sparse_ffn(x, fused, dense, sparse, idx, mlp, EngineOptions(block_parallel=False))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(par, seq, rtol=1e-5, atol=1e-6)
