"""SpecPrefill on tiny models: exactness at keep rate 1, original positions, scoring by hand, FLOPs, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from ffcore.decoding import greedy_decode
from ffcore.engine import sparsify
from ffcore.engine.plan import SparsityPlan
from ffcore.experiments.nb08_specprefill import best_point, summarize
from ffcore.flops import prefill_flops, spec_from_model
from ffcore.models import decoder_layers, tiny_model, tiny_tokenizer
from ffcore.specprefill import (
    POSITIONS, SpecPrefillConfig, TokenScores, check_compatible, chunk_positions, extend, kept_pairs,
    layer_prefix_view, position_masks, prefill_at, prefix_layers, score_tokens, select_chunks, select_tokens,
    smooth_and_chunk, speculative_generate, speculative_prefill, specprefill_flops, speculator_flops,
)

ARCHS = ["llama", "qwen3", "gemma3"]
T = 150  # > tiny Gemma 3's sliding window (64): local layers really slide


def _ids(T: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=1)


def _capture_positions(model):
    """Hook the decoder stack: every forward's position_ids end up in the returned list."""
    seen = []
    owner = model.model

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].detach().clone().view(-1))

    return seen, owner.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------- exactness and positions
@torch.no_grad()
def test_keep_rate_one_reproduces_dense_logits(model):
    ids = _ids()
    ref = model(ids).logits[:, -1]
    out = speculative_prefill(model, model, ids, 1.0)
    assert out.kept.tolist() == list(range(T))
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    # the cache continues exactly like a dense one
    nxt = _ids(4, seed=3)
    torch.testing.assert_close(extend(model, out.cache, nxt), model(torch.cat([ids, nxt], 1)).logits[:, -4:],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_main_model_gets_original_positions_and_decode_continues_at_prompt_length(model):
    ids = _ids()
    view = layer_prefix_view(model, 2)
    scores = score_tokens(view, ids, SpecPrefillConfig(lookahead=2))
    seen, handle = _capture_positions(model)
    try:
        out = speculative_prefill(model, None, ids, 0.5, scores=scores)
        tokens = torch.tensor([greedy_decode(model, out.logits[0], out.cache, 3, POSITIONS)])
    finally:
        handle.remove()
    assert 0 < out.kept.numel() < T and int(out.kept[-1]) == T - 1
    assert torch.equal(seen[0], out.kept)  # the prefill: kept tokens at their ORIGINAL positions
    assert [int(s) for s in seen[1:]] == [T, T + 1]  # decode: right after the original prompt length
    assert out.cache.next_position == T + 2 and tokens.shape == (1, 3)


@torch.no_grad()
def test_generate_at_keep_rate_one_matches_hf_greedy():
    m = tiny_model("llama", seed=2)
    ids = _ids(64)
    ours = speculative_generate(m, m, ids, 1.0, max_new_tokens=6)
    ref = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=258)[:, 64:]
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_sliding_windows_on_original_positions_equal_dense_with_dropped_keys_masked():
    """Gemma 3, window='positions': the kept tokens compute exactly what the dense model computes if the
    dropped tokens are hidden as keys (same positions, same windows). Cache-slot windows differ."""
    m = tiny_model("gemma3", seed=1)
    ids = _ids(256)
    kept = torch.cat([torch.arange(0, 32), torch.arange(96, 160), torch.arange(224, 256)])
    logits, _ = prefill_at(m, ids, kept, window="positions")
    pos = torch.arange(256)
    masks = position_masks(m, pos, pos)
    visible = torch.isin(pos, kept)  # keys of dropped tokens are hidden from every query
    masks = {k: v & visible.view(1, 1, 1, -1) for k, v in masks.items()}
    ref = m(ids, attention_mask=masks, position_ids=pos[None]).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    other, _ = prefill_at(m, ids, kept, window="cache")
    assert (other - ref).abs().max() > 1e-3


# ----------------------------------------------------------------------------- scoring
def _rope(x, pos, theta):
    """Rotary embedding by hand: x [..., n, D] at positions pos [n] (rotate-half convention)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = pos.float()[:, None] * inv[None]  # [n, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
    return x * cos + rot * sin


@torch.no_grad()
def test_scores_match_attention_computed_by_hand():
    """One-layer Llama: the last token's softmax attention from q/k by hand, max over heads."""
    m = tiny_model("llama", seed=3, num_hidden_layers=1)
    ids = _ids(40)
    layer = m.model.layers[0]
    attn = layer.self_attn
    H, KVH, D = m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim
    emb = m.model.embed_tokens(ids)[0]  # [T, d]
    w, eps = layer.input_layernorm.weight, m.config.rms_norm_eps
    x = emb / torch.sqrt(emb.pow(2).mean(-1, keepdim=True) + eps) * w
    q = (x @ attn.q_proj.weight.T).view(40, H, D).transpose(0, 1)  # [H, T, D]
    k = (x @ attn.k_proj.weight.T).view(40, KVH, D).transpose(0, 1)  # [KVH, T, D]
    pos = torch.arange(40)
    theta = m.config.rope_parameters["rope_theta"]
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    probs = torch.stack([(q[h, -1] @ k[h // (H // KVH)].T / math.sqrt(D)).softmax(-1) for h in range(H)])
    expected = probs.max(0).values  # [T]
    sc = score_tokens(m, ids, SpecPrefillConfig(lookahead=0, pool_kernel=1))
    torch.testing.assert_close(sc.token, expected, atol=1e-6, rtol=1e-5)
    assert sc.per_query.shape == (1, 40)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_scores_match_eager_attentions_with_lookahead(arch):
    """Max over layers and heads of eager attention probabilities; a look-ahead query is renormalised over
    the prompt keys only (also through Gemma 3's sliding windows)."""
    m = tiny_model(arch, seed=1)
    m.config._attn_implementation = "eager"
    ids = _ids(100)
    sc = score_tokens(m, ids, SpecPrefillConfig(lookahead=1, pool_kernel=1))
    full = torch.cat([ids, torch.tensor([sc.lookahead_ids])], 1)
    att = torch.stack([a[0] for a in m(full, output_attentions=True).attentions])  # [L, H, T+1, T+1]
    last = att[:, :, 99, :100].amax((0, 1))
    la = att[:, :, 100, :100]
    la = (la / la.sum(-1, keepdim=True)).amax((0, 1))
    torch.testing.assert_close(sc.per_query[0], last, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sc.per_query[1], la, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sc.token, (last + la) / 2, atol=1e-5, rtol=1e-4)


def test_pooling_and_chunking_by_hand():
    token = torch.tensor([0.0, 0, 3, 0, 0, 6, 0, 0, 0, 9])
    smoothed, chunks = smooth_and_chunk(token, pool_kernel=3, chunk_size=4)
    # kernel 3, edges averaged over the real tokens only: (0+0)/2, (0+0+3)/3, ... (0+9)/2
    torch.testing.assert_close(smoothed, torch.tensor([0.0, 1, 1, 1, 2, 2, 2, 0, 3, 4.5]))
    torch.testing.assert_close(chunks, torch.tensor([0.75, 1.5, 3.75]))  # last chunk: 2 tokens
    _, raw = smooth_and_chunk(token, pool_kernel=1, chunk_size=4)
    torch.testing.assert_close(raw, torch.tensor([0.75, 1.5, 4.5]))


def test_chunk_selection_by_hand():
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 0.5])
    assert select_chunks(scores, 0.4, keep_last=False).tolist() == [0, 2]  # ceil(0.4 * 5) = 2
    assert select_chunks(scores, 0.4, keep_last=True).tolist() == [0, 4]  # last forced, then the best
    assert select_chunks(scores, 0.41, keep_last=True).tolist() == [0, 2, 4]  # ceil(2.05) = 3
    assert select_chunks(scores, 0.2, keep_last=False, keep_first=False).tolist() == [0]
    assert select_chunks(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    # positions: whole chunks, partial last chunk, and the final prompt token always
    assert chunk_positions(torch.tensor([1]), 10, 4).tolist() == [4, 5, 6, 7, 9]
    sc = TokenScores(torch.zeros(1, 10), torch.zeros(10), torch.zeros(10), torch.tensor([3.0, 1.0, 2.0]), 4, [])
    assert select_tokens(sc, 0.5, SpecPrefillConfig(chunk_size=4)).tolist() == [0, 1, 2, 3, 8, 9]


# ----------------------------------------------------------------------------- speculators
@torch.no_grad()
def test_prefix_view_shares_weights_and_runs_the_first_layers(model):
    ids = _ids(80)
    view = layer_prefix_view(model, 2)
    assert len(decoder_layers(view)) == 2 and len(decoder_layers(model)) == 4
    assert model.config.num_hidden_layers == 4
    for p_view, p_main in zip(decoder_layers(view)[1].parameters(), decoder_layers(model)[1].parameters()):
        assert p_view.data_ptr() == p_main.data_ptr()
    assert view.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(view(ids).logits, model.lm_head(model.model.norm(hs[2])), atol=1e-5, rtol=1e-5)
    assert spec_from_model(view).L == 2


@torch.no_grad()
def test_combination_with_fastforward_runs_sparse_main_and_dense_speculator(model):
    ids = _ids(300)
    view = layer_prefix_view(model, 2)
    cfg = SpecPrefillConfig(lookahead=2)
    plain = score_tokens(view, ids, cfg)
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=32)
    with sparsify(model, plan) as state:
        out = speculative_prefill(model, view, ids, 0.5, cfg)
        inside = score_tokens(view, ids, cfg)
        same = score_tokens(model, ids, cfg)
    torch.testing.assert_close(inside.token, plain.token)  # the speculator is not sparsified
    torch.testing.assert_close(same.token, score_tokens(model, ids, cfg).token)
    assert state.stats["sparse_tokens"] > 0 and torch.isfinite(out.logits).all()
    dense_kept, _ = prefill_at(model, ids, out.kept)
    assert (out.logits - dense_kept).abs().max() > 0  # the kept tokens really ran block-sparse
    assert not any(type(layer.mlp).__name__ == "SparseMLP" for layer in decoder_layers(model))


# ----------------------------------------------------------------------------- FLOPs
def test_flops_accounting():
    m = tiny_model("gemma3", seed=0)
    spec = spec_from_model(m)
    all_pos = torch.arange(T)
    assert specprefill_flops(spec, T, all_pos)["speedup"] == 1.0
    # the look-ahead steps cost the difference of two causal prefills, plus one lm head per look-ahead token
    s0, s3 = speculator_flops(spec, T, 0), speculator_flops(spec, T, 3)
    body = lambda n: sum(v for k, v in prefill_flops(spec, n).items() if k != "lm_head")  # noqa: E731
    assert s0["body"] == body(T) and s0["lm_head"] == 0
    assert s3["body"] == body(T + 3) and s3["lm_head"] == 3 * 2 * spec.d * spec.vocab
    # visible pairs with windows on original positions, by hand: positions 0,1,5,6, window 3
    assert kept_pairs(torch.tensor([0, 1, 5, 6]), 3) == 1 + 2 + 1 + 2
    assert kept_pairs(torch.tensor([0, 1, 5, 6]), None) == 10
    kept = torch.arange(0, T, 2)
    view = spec_from_model(layer_prefix_view(m, 1))
    r = specprefill_flops(spec, T, kept, view, lookahead=3)
    assert r["total_flops"] == r["speculator_flops"] + r["main_flops"] and r["kept_tokens"] == len(kept)
    main_cache = sum(prefill_flops(spec, len(kept)).values())
    assert r["main_flops"] < main_cache  # sliding windows on positions see fewer kept keys than W slots
    assert specprefill_flops(spec, T, kept, window="cache")["main_flops"] == main_cache
    combo = specprefill_flops(spec, T, kept, view, 3, plan=SparsityPlan(0.5, block_size=32))
    assert combo["total_flops"] < r["total_flops"]


def test_summary_and_best_point():
    rows = [
        {"model": "m", "method": "dense", "speculator": None, "keep_rate": None, "sparsity": None, "T": 10,
         "kept_tokens": 10, "nll": 2.0, "dense_nll": 2.0, "top1_agree": 1.0, "first_agree": 1.0,
         "flops_speedup": 1.0, "speculator_share": 0.0},
    ]
    for p, nll, sp in ((0.3, 2.4, 2.0), (0.5, 2.06, 1.5), (0.9, 2.0, 0.9)):
        rows.append({**rows[0], "method": "specprefill", "speculator": "first 1 layers", "keep_rate": p,
                     "kept_tokens": int(10 * p), "nll": nll, "flops_speedup": sp})
    summ = summarize(rows)
    assert [round(r["rel_nll_gap"], 3) for r in summ] == [0.0, 0.2, 0.03, 0.0]
    assert best_point(summ, "m", "specprefill", 0.05)["keep_rate"] == 0.5  # fastest within the gap
    assert best_point(summ, "m", "specprefill", 0.5)["keep_rate"] == 0.3
    assert best_point(summ, "m", "specprefill", 0.01)["keep_rate"] == 0.5  # none within: smallest gap, > 1x
    assert best_point(summ, "m", "fastforward", 0.05) is None


# ----------------------------------------------------------------------------- bad input
@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    m = tiny_model("llama", seed=0)
    ids = _ids(100)
    other = tiny_model("llama", seed=0, vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_prefill(m, other, ids, 0.5)
    tok, tok2 = tiny_tokenizer(), tiny_tokenizer()
    tok2.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer"):
        check_compatible(m, m, tok, tok2)
    check_compatible(m, m, tok, tiny_tokenizer())  # equal tokenizers pass
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="keep_rate"):
            speculative_prefill(m, m, ids, bad)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        speculative_prefill(m, m, ids[:, :31], 0.5)
    with pytest.raises(ValueError, match="one prompt at a time"):
        speculative_prefill(m, m, ids.expand(2, -1), 0.5)
    with pytest.raises(ValueError, match="pool_kernel"):
        SpecPrefillConfig(pool_kernel=12)
    with pytest.raises(ValueError, match="n_layers"):
        layer_prefix_view(m, 0)
    with pytest.raises(ValueError, match="increasing"):
        prefill_at(m, ids, torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="unknown key"):
        SpecPrefillConfig.from_dict({"keep_rate": 0.5})


def test_self_speculator_reaches_a_full_attention_layer():
    """A prefix of only sliding layers is blind beyond the window: the prefix grows to the first global layer."""
    gemma = tiny_model("gemma3", seed=0)  # layer types: sliding, sliding, sliding, full
    assert prefix_layers(gemma, 0.25) == 4
    assert prefix_layers(tiny_model("llama", seed=0), 0.25) == 1
    assert prefix_layers(tiny_model("llama", seed=0), 0.5) == 2
