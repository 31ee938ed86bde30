"""The FLOP model: hand counts, masks, blocks, plan speedups, and agreement with torch's FlopCounterMode."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ffcore import flops
from ffcore.engine.layout import predictor_rank
from ffcore.engine.plan import SparsityPlan
from ffcore.flops import ModelSpec

# A toy config small enough to count by hand.
TOY = ModelSpec("toy", d=8, f=16, L=2, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_hand_counted_toy_prefill():
    T = 3
    # per layer, 1 multiply-add = 2 FLOPs:
    q = 2 * 3 * 8 * (2 * 4)  # T * d * (heads*head_dim) MACs      = 384
    kv = 2 * 2 * 3 * 8 * (1 * 4)  # k and v: T * d * (kv_heads*head_dim) = 384
    o = 2 * 3 * (2 * 4) * 8  # T * (heads*head_dim) * d          = 384
    pairs = 1 + 2 + 3  # query t sees t+1 keys              = 6
    scores = 2 * 2 * 4 * pairs  # heads * head_dim MACs per pair     = 96
    av = 2 * 2 * 4 * pairs  # same for A @ V                     = 96
    ffn = 3 * 2 * 3 * 8 * 16  # gate, up, down: T * d * f each     = 2304
    lm_head = 2 * 8 * 10  # last token only: d * vocab        = 160
    assert (q, kv, o, scores, av, ffn, lm_head) == (384, 384, 384, 96, 96, 2304, 160)
    expected = {
        "q_proj": 2 * q, "kv_proj": 2 * kv, "o_proj": 2 * o, "attn_scores": 2 * scores,
        "attn_av": 2 * av, "ffn": 2 * ffn, "lm_head": lm_head,
    }
    assert flops.prefill_flops(TOY, T) == expected


def test_gqa_narrows_only_k_and_v():
    mha = dataclasses.replace(TOY, kv_heads=2)
    a, b = flops.prefill_flops(TOY, 64), flops.prefill_flops(mha, 64)
    assert b["kv_proj"] == 2 * a["kv_proj"]
    for c in ("q_proj", "o_proj", "attn_scores", "attn_av", "ffn", "lm_head"):
        assert a[c] == b[c]


@pytest.mark.parametrize("window", [None, 1, 2, 5, 64])
def test_causal_pairs_closed_form_matches_brute_force(window):
    for T in range(1, 140):
        brute = sum(t + 1 if window is None else min(t + 1, window) for t in range(T))
        assert int(flops.causal_pairs(T, window)) == brute
    if window is None:
        assert int(flops.causal_pairs(1000)) == 1000 * 1001 // 2


def test_window_semantics_match_transformers_masks():
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    T, w = 40, 7
    overlay = sliding_window_overlay(w)
    visible = sum(
        causal_mask_function(0, 0, q, k) and overlay(0, 0, q, k) for q in range(T) for k in range(T)
    )
    assert visible == int(flops.causal_pairs(T, w))


def test_sliding_layers_use_the_window():
    spec = ModelSpec("sw", d=8, f=16, L=3, heads=2, kv_heads=1, head_dim=4, vocab=10,
                     sliding_window=2, layer_types=["sliding_attention", "full_attention", "sliding"])
    assert spec.layer_types == ["sliding", "full", "sliding"]
    T = 5
    # sliding layers: 1 + 2 + 2 + 2 + 2 = 9 pairs; the full layer: 1+2+3+4+5 = 15 pairs
    assert flops.prefill_flops(spec, T)["attn_scores"] == 2 * 2 * 4 * (9 + 15 + 9)
    assert flops.prefill_flops(spec, T, pairs="full")["attn_scores"] == 2 * 2 * 4 * 3 * T * T


def test_curve_matches_scalar_and_is_exact_at_long_contexts():
    Ts = [1, 2, 127, 128, 129, 4096, 32768]
    for spec in flops.BUILTIN_SPECS.values():
        curve = flops.prefill_flops_curve(spec, Ts)
        for i, T in enumerate(Ts):
            assert {c: int(v[i]) for c, v in curve.items()} == flops.prefill_flops(spec, T)
    big = flops.builtin_spec("llama-3.1-8b")
    T = flops.INT64_SAFE_T - 1  # the int64 path's limit agrees with exact Python integers
    assert int(flops.prefill_flops_curve(big, [T])["attn_scores"][0]) == flops.prefill_flops(big, T)["attn_scores"]
    T = 1 << 22
    assert flops.prefill_flops_curve(big, [T])["attn_av"][0] == 2 * 32 * 128 * 32 * (T * (T + 1) // 2)


def test_crossover_is_the_first_length_where_attention_wins():
    spec = flops.builtin_spec("llama-3.2-1b")
    T = flops.crossover_length(spec)
    f = flops.prefill_flops(spec, T)
    g = flops.prefill_flops(spec, T - 1)
    assert f["attn_scores"] + f["attn_av"] > f["ffn"]
    assert g["attn_scores"] + g["attn_av"] <= g["ffn"]
    # heads*head_dim == d here, so 2*d*T(T+1) (causal QK^T + AV) > 6*d*f*T  <=>  T + 1 > 3f
    assert T == 3 * spec.f
    # and against a 2-matmul FFN (paper eqs. 7-9) the crossover is T + 1 > 2f: the paper's c = 2
    assert flops.crossover_length(spec, gated=False) == 2 * spec.f
    only_sliding = ModelSpec("sw", d=8, f=16, L=1, heads=2, kv_heads=1, head_dim=4, vocab=10,
                             sliding_window=4, layer_types=["sliding"])
    assert flops.crossover_length(only_sliding, t_max=1 << 16) is None  # attention stays linear


def test_block_sizes_and_partial_last_block():
    assert flops.block_sizes(300) == [128, 128, 44]
    assert flops.block_sizes(256) == [128, 128]
    assert flops.sparse_tokens(300, tail="grid") == 128  # first and the grid's last (partial) block dense
    assert flops.sparse_tokens(300) == 44  # dense tail = the last 128 tokens: 128 | 44 sparse | 128
    assert flops.sparse_tokens(300, dense_last=False) == 128 + 44
    assert flops.sparse_tokens(300, dense_first=False, dense_last=False) == 300
    assert flops.ffn_ideal_speedup(300, 0.5, tail="grid") == pytest.approx(300 / (128 + 44 + 0.5 * 128))
    assert flops.ffn_ideal_speedup(300, 0.5) == pytest.approx(300 / (128 + 128 + 0.5 * 44))


def test_plan_speedup_limits():
    spec = flops.builtin_spec("llama-3.2-1b")
    assert flops.plan_speedup(spec, 4096, SparsityPlan(1.0), overheads=True)["speedup"] == 1.0  # nothing changes
    for T in (1, 100, 128, 256):  # at most the two dense blocks: nothing is sparse
        r = flops.plan_speedup(spec, T, SparsityPlan(0.5), overheads=True)
        assert r["speedup"] == 1.0 and r["predictor_flops"] == r["compensator_flops"] == 0
    all_sparse = SparsityPlan(0.5, dense_first=False, dense_last=False)
    assert flops.plan_speedup(spec, 128, all_sparse, overheads=True)["speedup"] > 1.0
    bare = flops.plan_speedup(spec, 4096, all_sparse, overheads=False)
    assert bare["ffn_speedup"] == pytest.approx(2.0)
    assert bare["speedup"] < 2.0  # attention and projections stay dense
    assert flops.ffn_ideal_speedup(128, 0.5) == 1.0


@pytest.mark.parametrize("tail,n_sp", [("grid", 128), ("full", 44)])
def test_plan_speedup_overheads_by_hand(tail, n_sp):
    # grid: blocks 128 | 128 | 44, only the middle one sparse; full: 128 | 44 sparse | the last 128 dense
    T, rho = 300, 0.5
    r = flops.plan_speedup(TOY, T, SparsityPlan([rho, 1.0], dense_tail=tail), overheads=True)  # layer 1 dense
    r_pred = 1  # power of two >= d/16 = 0.5
    assert predictor_rank(8) == r_pred
    pred = 2 * n_sp * 8 + 2 * n_sp * 8 + 2 * 8 * r_pred + 2 * r_pred * 16  # pool, weighted sum, W1, W2
    comp = 2 * n_sp * 8 * 1 + 2 * n_sp * 1 * 8  # d -> d/8 = 1 -> d on the sparse tokens
    ffn_layer = 3 * 2 * T * 8 * 16
    ffn_sparse = ffn_layer * ((T - n_sp) + rho * n_sp) / T + ffn_layer
    assert (r["predictor_flops"], r["compensator_flops"]) == (pred, comp)
    assert r["ffn_sparse_flops"] == pytest.approx(ffn_sparse)
    dense = sum(flops.prefill_flops(TOY, T).values())
    assert r["sparse_flops"] == pytest.approx(dense - 2 * ffn_layer + ffn_sparse + pred + comp)


def test_predictor_rank_matches_paper():
    # paper section 3.2: r = 128 for Llama-1B and 256 for Llama-3B/8B
    assert [predictor_rank(flops.builtin_spec(n).d) for n in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")] == [128, 256, 256]


def test_spec_validation_and_strictness():
    with pytest.raises(ValueError, match="unknown key"):
        ModelSpec.from_dict({**TOY.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="layer_types"):
        ModelSpec("x", d=8, f=16, L=2, heads=2, kv_heads=1, head_dim=4, vocab=10, sliding_window=4, layer_types=["full"])
    with pytest.raises(ValueError, match="densities"):
        flops.plan_speedup(TOY, 300, SparsityPlan([0.5]))


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_against_torch_flop_counter(key):
    """Every matmul of a real (tiny) model's prefill, counted by torch, equals the model (pairs='full')."""
    from torch.utils.flop_counter import FlopCounterMode

    from ffcore.models import load_model

    model, _ = load_model(key, attn_implementation="eager")  # eager materialises the masked T x T scores
    spec = flops.spec_from_model(model)
    T = 80  # longer than tiny-gemma3's window of 64
    ids = torch.randint(0, spec.vocab, (1, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    root = type(model).__name__  # FlopCounterMode names modules from the root class
    by_module = {k.removeprefix(root + "."): v for k, v in counter.get_flop_counts().items()}
    ours = flops.prefill_flops(spec, T, pairs="full")
    assert counter.get_total_flops() == sum(ours.values())
    layer = flops.layer_flops(spec, 0, T, pairs="full")
    mlp = sum(by_module["model.layers.0.mlp"].values())
    attn = sum(by_module["model.layers.0.self_attn"].values())
    assert mlp == int(layer["ffn"])
    assert attn == int(sum(layer[c] for c in flops.ATTENTION_PROJ + flops.ATTENTION_CORE))
    assert sum(by_module["lm_head"].values()) == ours["lm_head"]


def test_spec_from_tiny_configs():
    from ffcore.models import tiny_config

    g = flops.spec_from_config(tiny_config("gemma3"))
    assert g.layer_types == ["sliding", "sliding", "sliding", "full"] and g.sliding_window == 64
    q = flops.spec_from_config(tiny_config("qwen3"))
    assert q.layer_types is None and q.sliding_window is None


def test_records_shares_sum_to_one():
    rows = flops.flops_records(flops.builtin_spec("gemma3-270m"), [512, 8192])
    for T in (512, 8192):
        assert sum(r["share"] for r in rows if r["T"] == T) == pytest.approx(1.0)
    shares = flops.module_shares(flops.prefill_flops(TOY, 3))
    assert sum(shares.values()) == pytest.approx(1.0)
    assert np.isclose(shares["mlp"], 4608 / (4608 + 768 * 3 + 192 * 2 + 160))


@pytest.mark.real_model
@pytest.mark.parametrize("key", ["smollm2-135m", "gemma3-270m"])
def test_builtin_specs_match_real_configs(key):
    from transformers import AutoConfig

    from ffcore.models import offline_model_path

    spec = flops.spec_from_config(AutoConfig.from_pretrained(offline_model_path(key)), name=key)
    assert spec == flops.builtin_spec(key)
