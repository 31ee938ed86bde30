"""The expert predictor: labels, forward shapes, training, artifacts, the engine policy, metrics."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ffcore.collect import CollectConfig, Collection, collect, load_collection_dir
from ffcore.engine import sparsify
from ffcore.models import gated_mlps, load_model, model_dims
from ffcore.engine.plan import SparsityPlan
from ffcore.engine.policies import SelectContext, SelectionPolicy, griffin_scores, topk_sorted
from ffcore.predictor import (
    ExpertPredictor, LabelConfig, PredictorConfig, first_block_prior, load_predictor, make_labels, pool_and_score,
    standardize, with_blend,
    predictor_flop_share, predictor_meta, predictor_rank, predict_scores, save_predictor, selection_metrics,
    train_predictor, weighted_bce,
)
from ffcore.engine.sparse_ffn import dense_activations, fused_ffn


# ------------------------------------------------------------------ labels
def test_labels_on_a_hand_made_example():
    # 20 neurons; scores 0..19 shuffled. Top 10 are positives in fifths of 2: weights 32,32,16,16,...,2,2.
    scores = torch.tensor([3., 19, 0, 7, 12, 18, 1, 5, 16, 9, 14, 2, 17, 4, 11, 6, 15, 8, 13, 10])
    y, w = make_labels(scores)
    expected_w = {19: 32, 18: 32, 17: 16, 16: 16, 15: 8, 14: 8, 13: 4, 12: 4, 11: 2, 10: 2}
    for j, s in enumerate(scores.tolist()):
        assert y[j] == (1.0 if s >= 10 else 0.0), (j, s)
        assert w[j] == expected_w.get(int(s), 1.0), (j, s)
    assert y.sum() == 10 and w.sum() == 2 * (32 + 16 + 8 + 4 + 2) + 10


def test_labels_are_parameters_and_batch_wise():
    scores = torch.arange(8.0).flip(0).expand(3, 2, 8)  # neuron 0 best
    y, w = make_labels(scores, LabelConfig(pos_frac=0.25, pos_weights=(5.0,), neg_weight=0.5))
    assert y.shape == w.shape == (3, 2, 8)
    assert y[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert w[2, 1].tolist() == [5, 5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    y2, w2 = make_labels(torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0]), LabelConfig(pos_frac=0.6, pos_weights=(3.0, 2.0)))
    assert y2.tolist() == [0, 1, 1, 1, 0] and w2.tolist() == [1, 3, 3, 2, 1]  # groups floor(k*2/3) = 0,0,1
    with pytest.raises(ValueError):
        LabelConfig(pos_frac=1.0)


def test_weighted_bce_matches_formula():
    logits = torch.randn(4, 3, 10)
    y, w = make_labels(torch.rand(4, 3, 10))
    p = logits.sigmoid()
    ref = -(w * (y * p.log() + (1 - y) * (1 - p).log())).sum(-1) / w.sum(-1)
    torch.testing.assert_close(weighted_bce(logits, y, w), ref.mean(0), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the model
def test_rank_is_power_of_two_at_or_above_d_over_16():
    assert [predictor_rank(d) for d in (64, 576, 640, 2048, 3072, 4096)] == [4, 64, 64, 128, 256, 256]


def test_forward_matches_the_paper_equations():
    torch.manual_seed(0)
    pred = ExpertPredictor(L=3, d=16, f=40)
    with torch.no_grad():
        pred.q.normal_()
    X = torch.randn(5, 3, 7, 16)  # [n, L, N, d]
    s = pred(X)
    assert s.shape == (5, 3, 40) and pred.r == 1
    l, b = 2, 4
    a = torch.softmax(pred.q[l] @ X[b, l].T / math.sqrt(16), dim=-1) @ X[b, l]  # eq. 12
    ref = torch.relu(a @ pred.w1[l]) @ pred.w2[l]  # eq. 13
    torch.testing.assert_close(s[b, l], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.layer_scores(l, X[:, l]), s[:, l], atol=1e-5, rtol=1e-5)


def _ctx(x: torch.Tensor, spans, k: int, layer: int = 1) -> SelectContext:
    model, _ = load_model("tiny-llama")
    from ffcore.models import gated_mlps

    return SelectContext(layer, x, spans, k, fused_ffn(gated_mlps(model)[layer]), 128)


def test_select_top_k_for_full_partial_and_decode_spans():
    torch.manual_seed(1)
    pred = ExpertPredictor(L=4, d=64, f=256)
    assert isinstance(pred, SelectionPolicy) and pred.name == "predictor"
    x = torch.randn(300, 64)
    spans = [(128, 256), (0, 128), (256, 300)]  # two full blocks and a partial one
    idx = pred.select(_ctx(x, spans, k=100))
    assert idx.shape == (3, 100) and idx.dtype == torch.long
    for j, (s, e) in enumerate(spans):
        ref = pred.layer_scores(1, x[s:e].unsqueeze(0))[0].topk(100).indices.sort().values
        assert torch.equal(idx[j], ref)
        assert torch.all(idx[j][1:] > idx[j][:-1])  # sorted, unique
    one = pred.select(_ctx(x[:1], [(0, 1)], k=10))
    assert one.shape == (1, 10)


# ------------------------------------------------------------------ training and artifacts
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, tok = load_model("tiny-llama")
    root = tmp_path_factory.mktemp("pred")
    folders = {}
    for split, n in (("train", 6), ("eval", 2)):
        cfg = CollectConfig(split=split, n_samples=n, seq_len=512, samples_per_shard=3, batch_size=3)
        folders[split] = collect(model, tok, cfg, root / split, "tiny-llama", progress=False)
    train = load_collection_dir(folders["train"])
    cfg = PredictorConfig(mean_pool_epochs=25, max_epochs=5, patience=25, lr=1e-2, batch_blocks=8)
    res = train_predictor(train, cfg, meta=predictor_meta(model, "tiny-llama", train), progress=False)
    return model, train, load_collection_dir(folders["eval"]), res, root


def test_training_reduces_the_loss(trained):
    _, _, _, res, _ = trained
    h = res.history
    assert h[-1]["train_loss"] < 0.9 * h[0]["train_loss"]
    assert min(e["val_loss"] for e in h) < h[0]["val_loss"]
    meta = res.predictor.meta["training"]
    assert meta["train_blocks"] > 0 and meta["val_blocks"] > 0 and meta["epochs_run"] == len(h)


def test_save_load_round_trip_and_mismatch_refusal(trained):
    model, train, _, res, root = trained
    save_predictor(res.predictor, root / "art")
    back = load_predictor(root / "art", model)
    X = train.X[:3].float()
    torch.testing.assert_close(back(X), res.predictor(X))
    assert back.meta["fingerprint"] == res.predictor.meta["fingerprint"]
    other, _ = load_model("tiny-qwen3")  # same shapes, different weights
    assert model_dims(other)["d"] == model_dims(model)["d"]
    with pytest.raises(ValueError, match="fingerprint"):
        load_predictor(root / "art", other)
    gemma, _ = load_model("tiny-gemma3")
    with torch.no_grad():  # change a shape the predictor depends on
        bad = ExpertPredictor(4, 64, 128, meta={"model": "x", "fingerprint": "y"})
    save_predictor(bad, root / "bad")
    with pytest.raises(ValueError, match="shape"):
        load_predictor(root / "bad", gemma)
    with pytest.raises(FileNotFoundError):
        load_predictor(root / "missing", model)


def test_predictor_policy_inside_sparsify(trained):
    model, _, _, res, _ = trained
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, SparsityPlan(densities=0.5, policy=res.predictor)) as st:
            out = model(ids).logits
        with sparsify(model, SparsityPlan(densities=1.0, policy=res.predictor)):
            full = model(ids).logits
    assert out.shape == dense.shape and st.stats["sparse_tokens"] > 0 and not torch.allclose(out, dense)
    torch.testing.assert_close(full, dense)

    class TrainingForm:
        """The same experts computed independently: the training-time forward (pool_and_score) per span."""

        name = "reference"

        def select(self, ctx):
            p = res.predictor
            sl = slice(ctx.layer, ctx.layer + 1)
            rows = [pool_and_score(ctx.x[s:e][None, None], p.q[sl], p.w1[sl], p.w2[sl])[0, 0] for s, e in ctx.spans]
            return topk_sorted(torch.stack(rows), ctx.k)

    with torch.no_grad(), sparsify(model, SparsityPlan(densities=0.5, policy=TrainingForm())):
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_metrics_and_baselines(trained):
    _, train, heldout, res, _ = trained
    pred = predict_scores(res.predictor, heldout)
    rows = selection_metrics(heldout, pred, prior=train.scores.mean(0), densities=(0.5, 0.7))
    mean = {(r["policy"], r["density"]): r for r in rows if r["layer"] == -1}
    for dens in (0.5, 0.7):
        assert mean[("oracle", dens)]["recall"] == pytest.approx(1.0)
        assert mean[("oracle", dens)]["mass"] == pytest.approx(1.0)
        for p in ("predictor", "first_block_static", "random", "global_static"):
            assert 0 < mean[(p, dens)]["mass"] <= 1 + 1e-6 and 0 <= mean[(p, dens)]["recall"] <= 1
        assert mean[("random", dens)]["recall"] == pytest.approx(dens, abs=0.05)
    n_layers = heldout.scores.shape[1]
    assert len(rows) == 2 * 5 * (n_layers + 1)


def test_first_block_static_metric_uses_the_same_samples_first_block():
    f, L = 10, 1
    sc = torch.rand(4, L, f)
    coll = Collection(None, sc, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), [0], {})
    coll.scores[1] = coll.scores[0]  # sample 0: block 1 repeats block 0 -> static is perfect there
    rows = selection_metrics(coll, densities=(0.5,))
    static = [r for r in rows if r["policy"] == "first_block_static" and r["layer"] == 0][0]
    k = 5
    own = (sc[3, 0, sc[2, 0].topk(k).indices]).sum() / sc[3, 0].topk(k).values.sum()
    assert static["mass"] == pytest.approx((1.0 + float(own)) / 2, abs=1e-6)


def test_flop_share():
    out = predictor_flop_share(576, 1536, block_size=128)
    assert out["r"] == 64
    assert out["predictor_flops"] == 4 * 128 * 576 + 2 * 576 * 64 + 2 * 64 * 1536
    assert out["share"] == pytest.approx(out["predictor_flops"] / (6 * 128 * 576 * 1536))
    assert out["share"] < 0.01


def test_nll_verdict_ranks_policies_by_change():
    from ffcore.experiments.nb03_predictor import nll_verdict

    rows = [{"model": "m", "policy": "dense", "rel_change_pct": 0.0},
            {"model": "m", "policy": "oracle", "rel_change_pct": 2.0},
            {"model": "m", "policy": "predictor", "rel_change_pct": 1.0}]
    assert nll_verdict(rows) == "- **m** (NLL change vs dense, best first): predictor +1.00 %, oracle +2.00 %."


# ------------------------------------------------------------------ compact collections and the first-block prior
@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """A compact collection (16 sampled tokens per block) and a full one of the same samples."""
    model, tok = load_model("tiny-llama")
    root = tmp_path_factory.mktemp("compact")
    cfgs = {"full": CollectConfig(split="train", n_samples=4, seq_len=512, samples_per_shard=2, batch_size=2),
            "compact": CollectConfig(split="train", n_samples=4, seq_len=512, samples_per_shard=2, batch_size=2,
                                     tokens_per_block=16)}
    colls = {k: load_collection_dir(collect(model, tok, c, root / k, "tiny-llama", progress=False))
             for k, c in cfgs.items()}
    return model, colls


def test_compact_collection_keeps_the_mean_and_sampled_tokens(compact):
    _, c = compact
    full, small = c["full"], c["compact"]
    assert small.X.shape[2] == 16 and full.X.shape[2] == 128
    torch.testing.assert_close(small.pooled.float(), full.X.float().mean(2), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(small.scores, full.scores, atol=2e-3, rtol=2e-3)  # fp16 storage, fp32 loaded
    # the sampled tokens are rows of their full blocks
    rows = (small.X[:, 0].float()[..., None, :] - full.X[:, 0].float()[:, None]).abs().amax(-1)  # [n, 16, 128]
    assert bool((rows.min(-1).values < 2e-3).all())  # every sampled token is one of its block's tokens
    assert small.block_domains() == full.block_domains() and set(small.block_domains()) <= {"prose", "code"}


def test_predictor_trains_on_pooled_inputs_and_selects_the_same_experts(compact):
    model, c = compact
    small = c["compact"]
    res = train_predictor(small, PredictorConfig(mean_pool_epochs=8, max_epochs=3, batch_blocks=8), progress=False)
    assert res.predictor.meta["training"]["attention_pool_phase"] is False  # q stays 0: the mean pool
    assert not bool(res.predictor.q.any())
    # scores from pooled inputs equal the engine-form pass over every token of the block (the full collection)
    pooled = predict_scores(res.predictor, small)
    full = predict_scores(res.predictor, c["full"])
    torch.testing.assert_close(pooled, full, atol=5e-3, rtol=5e-3)


def test_first_block_prior_predictor_trains_and_the_engine_feeds_it(compact):
    model, c = compact
    small = c["compact"]
    cfg = PredictorConfig(mean_pool_epochs=10, max_epochs=0, batch_blocks=8, prior=True, bias=True)
    res = train_predictor(small, cfg, progress=False)
    pred = res.predictor
    assert pred.prior and pred.needs_first_block and bool(pred.pg.abs().sum() > 0)
    # one batched pass over spans of any length == the per-span training form (mean pool + prior term)
    x = torch.randn(300, 64)
    spans = [(128, 256), (256, 300), (0, 128)]
    z = first_block_prior(torch.rand(256))
    s = pred.span_scores(2, x, spans, z)
    for j, (a, b) in enumerate(spans):
        ref = pred.pooled_scores(x[a:b].mean(0)[None, None].expand(1, pred.L, -1), z[None, None].expand(1, pred.L, -1))
        torch.testing.assert_close(s[j], ref[0, 2], atol=1e-5, rtol=1e-5)
    # inside the engine the predictor gets the prompt's first-block scores and reuses them after a cached context
    seen = []

    class Recorder:
        name, needs_first_block = "recorder", True

        def select(self, ctx):
            seen.append((ctx.layer, ctx.offset, ctx.first_scores))
            return pred.select(ctx)

    ids = torch.randint(0, 256, (1, 560), generator=torch.Generator().manual_seed(0))  # suffix: 2 sparse blocks + 1
    with torch.no_grad(), sparsify(model, SparsityPlan(densities=0.5, policy=Recorder())):
        out = model(ids[:, :300], use_cache=True)
        model(ids[:, 300:], past_key_values=out.past_key_values, use_cache=True)  # a suffix prefill
    fused = fused_ffn(gated_mlps(model)[1])
    first = [s for layer, off, s in seen if layer == 1]
    assert len(first) == 2 and first[0] is first[1]  # the suffix call reuses the context's first block
    hook_x = {}
    h = gated_mlps(model)[1].register_forward_pre_hook(lambda m, a: hook_x.update(x=a[0][0, :128]))  # returns None
    with torch.no_grad():
        model(ids[:, :300])
    h.remove()
    torch.testing.assert_close(first[0], griffin_scores(dense_activations(hook_x["x"], fused)), atol=1e-5, rtol=1e-4)


def test_blend_with_the_first_block_shares_weights_and_ranks_by_both(compact):
    model, c = compact
    small = c["compact"]
    res = train_predictor(small, PredictorConfig(mean_pool_epochs=5, max_epochs=0, batch_blocks=8), progress=False)
    plain = res.predictor
    blended = with_blend(plain, 1.0)
    assert blended.w2 is plain.w2 and blended.needs_first_block and not plain.needs_first_block
    assert SparsityPlan(0.5, policy=blended).key() != SparsityPlan(0.5, policy=plain).key()
    x = torch.randn(300, 64)
    spans = [(128, 256), (256, 300)]
    fs = torch.rand(256)
    z = first_block_prior(fs)
    s = blended.span_scores(1, x, spans, z)
    ref = standardize(z) + standardize(plain.span_scores(1, x, spans))
    torch.testing.assert_close(s, ref)
    # offline form: the blend of the collection's first-block scores and the MLP's
    off = predict_scores(blended, small)
    zz = first_block_prior(small.scores[small.first_rows()])
    torch.testing.assert_close(off, standardize(zz) + standardize(predict_scores(plain, small)), atol=1e-5, rtol=1e-5)
    # weight 0 is first-block static exactly; a saved blend loads as a blend
    fbs = with_blend(plain, 0.0).span_scores(1, x, spans, z)
    assert torch.equal(fbs.topk(50).indices.sort().values, standardize(z).expand(2, -1).topk(50).indices.sort().values)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save_predictor(blended, Path(tmp))
        again = load_predictor(Path(tmp))
    assert again.blend == 1.0 and torch.equal(again.w1, plain.w1)
    with pytest.raises(ValueError, match="blend"):
        with_blend(plain, -1.0)
