"""The error compensator: forward equations, engine integration, distillation targets, training, artifacts, errors."""
from __future__ import annotations

import math

import pytest
import torch

from ffcore import compensator as fc
from ffcore.experiments import nb04_compensator as nb04
from ffcore.collect import CollectConfig, collect, load_collection_dir
from ffcore.engine import sparsify
from ffcore.models import gated_mlps, load_model
from ffcore.engine.plan import SparsityPlan
from ffcore.engine.policies import griffin_scores, topk_sorted
from ffcore.engine.layout import experts_for
from ffcore.engine.sparse_ffn import dense_activations, dense_rows_forward, fused_ffn, sparse_block_forward

ATOL, RTOL = 1e-5, 1e-5  # fp32 reference comparisons


def _randomised(comp: fc.ErrorCompensator, seed: int = 0, scale: float = 0.3) -> fc.ErrorCompensator:
    """Give every parameter (the zero-initialised ones too) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return comp


def _manual(comp: fc.ErrorCompensator, layer: int, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The compensator written out with plain torch ops, one token at a time (x [n, d], idx [K])."""
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu,
           "gelu": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[comp.act]
    dropped = sorted(set(range(comp.f)) - set(idx.tolist()))
    out = []
    for tok in x:
        z = comp.w1[layer].T @ tok + (comp.b1[layer] if comp.bias else 0)
        gain = torch.zeros(comp.r)
        if comp.variant == "masked":
            z = z + comp.shift[layer, dropped].sum(0) / math.sqrt(comp.f)
            gain = comp.gain[layer, dropped].sum(0) / math.sqrt(comp.f)
        out.append(comp.w2[layer].T @ (act(z) * (1 + gain)) + (comp.b2[layer] if comp.bias else 0))
    return torch.stack(out)


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("variant", fc.VARIANTS)
@pytest.mark.parametrize("act,bias", [("silu", False), ("gelu", True), ("relu", False)])
def test_forward_matches_the_equations(variant, act, bias):
    torch.manual_seed(0)
    comp = _randomised(fc.ErrorCompensator(L=3, d=16, f=40, variant=variant, act=act, bias=bias))
    assert comp.r == 2  # d / 8
    x = torch.randn(7, 16)
    idx = torch.tensor(sorted(torch.randperm(40)[:25].tolist()))
    with torch.no_grad():
        ref = _manual(comp, 1, x, idx)
        out = comp(1, x, idx)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        # the batched all-layer form (training / evaluation) agrees with the engine form
        X = torch.randn(2, 3, 5, 16)
        drop = torch.ones(2, 3, 40)
        drop[0, :, idx] = 0
        drop[1, :, :10] = 0
        batched = comp.correction(X, drop if variant == "masked" else None)
        for b in range(2):
            for layer in range(3):
                keep = (drop[b, layer] == 0).nonzero().squeeze(1)
                torch.testing.assert_close(batched[b, layer], comp(layer, X[b, layer], keep), atol=ATOL, rtol=RTOL)


def test_plain_ignores_the_mask_and_masked_uses_it():
    torch.manual_seed(1)
    x = torch.randn(4, 16)
    a, b = torch.arange(20), torch.arange(20, 40)
    plain = _randomised(fc.ErrorCompensator(2, 16, 40, variant="plain"))
    masked = _randomised(fc.ErrorCompensator(2, 16, 40, variant="masked"))
    with torch.no_grad():
        torch.testing.assert_close(plain(0, x, a), plain(0, x, b))
        torch.testing.assert_close(plain(0, x), plain(0, x, a))  # idx is optional for the plain variant
        assert not torch.allclose(masked(0, x, a), masked(0, x, b))


def test_zero_initialised_compensator_returns_zeros():
    for variant in fc.VARIANTS:
        comp = fc.ErrorCompensator(2, 16, 40, variant=variant)
        out = comp(1, torch.randn(5, 16), torch.arange(20))
        assert torch.equal(out, torch.zeros(5, 16))


def test_dtypes_and_name():
    comp = _randomised(fc.ErrorCompensator(2, 16, 40, variant="masked", meta={"model": "/x/my-model"}))
    idx = torch.arange(0, 40, 2)
    with torch.no_grad():
        ref = comp(0, torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), idx)
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(dt)
            out = comp(0, x, idx.to(torch.int32))
            assert out.dtype == dt and out.shape == (3, 16)
            torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)  # low-precision inputs
    name = comp.name
    assert name.startswith("compensator-masked(my-model, r=2, ") and name == comp.name
    with torch.no_grad():
        comp.w2.add_(1.0)
    assert comp.name != name  # the name follows the weights (plan keys of different weights differ)
    plan = SparsityPlan(densities=0.5, compensator=comp)
    assert plan.describe()["compensator"] == comp.name
    assert plan.key() != SparsityPlan(densities=0.5, compensator=fc.ErrorCompensator(2, 16, 40)).key()


def test_bad_inputs_are_refused():
    comp = fc.ErrorCompensator(2, 16, 40, variant="masked")
    x = torch.randn(4, 16)
    idx = torch.arange(20)
    with pytest.raises(IndexError):
        comp(2, x, idx)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        comp(0, torch.randn(4, 15), idx)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        comp(0, torch.randn(1, 4, 16), idx)
    with pytest.raises(TypeError):
        comp(0, torch.ones(4, 16, dtype=torch.long), idx)
    with pytest.raises(ValueError, match="needs the block's kept experts"):
        comp(0, x)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        comp(0, x, torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="1-D integer"):
        comp(0, x, idx.float())
    with pytest.raises(ValueError, match="variant"):
        fc.ErrorCompensator(2, 16, 40, variant="fancy")
    with pytest.raises(ValueError, match="activation"):
        fc.ErrorCompensator(2, 16, 40, act="tanh")
    with pytest.raises(ValueError, match="unknown key"):
        fc.CompensatorConfig.from_dict({"variant": "plain", "learning_rate": 1.0})
    with pytest.raises(ValueError, match="variant"):
        fc.CompensatorConfig(variant="nope")
    with pytest.raises(ValueError, match="variant"):
        nb04.compensator_dir("tiny-llama", "smoke", "other")
    with pytest.raises(ValueError, match="variant"):
        fc.compensator_cost(64, 256, 0.5, "other")


# ------------------------------------------------------------------ engine integration
def _ids(T: int = 300, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-gemma3"])
def test_zero_initialised_compensator_leaves_the_engine_unchanged(key):
    model, _ = load_model(key)
    ids = _ids()
    with torch.no_grad():
        with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
            ref = model(ids).logits
        for variant in fc.VARIANTS:
            comp = fc.ErrorCompensator(4, 64, 256, variant=variant)
            with sparsify(model, SparsityPlan(densities=0.5, policy="oracle", compensator=comp)) as st:
                out = model(ids).logits
            assert st.stats["sparse_tokens"] > 0
            assert torch.equal(out, ref), variant


# T = 300 in blocks of 128: [0,128) dense; the grid tail leaves [128,256) sparse and [256,300) dense, the
# full-block tail makes the last 128 tokens [172,300) dense and shortens the sparse block to [128,172)
@pytest.mark.parametrize("tail, sparse_end", [("grid", 256), ("full", 172)])
@pytest.mark.parametrize("variant", fc.VARIANTS)
def test_engine_adds_the_correction_to_sparse_blocks_only(variant, tail, sparse_end):
    """One layer's sparse MLP inside the engine == manual sparse FFN + manual correction on sparse blocks."""
    model, _ = load_model("tiny-llama")
    comp = _randomised(fc.ErrorCompensator(4, 64, 256, variant=variant), scale=0.05)
    layer, T, k = 2, 300, 128
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(5))
    mlp = gated_mlps(model)[layer]
    fused = fused_ffn(mlp)
    with torch.no_grad():
        plan = SparsityPlan(densities=0.5, policy="oracle", compensator=comp, dense_tail=tail)
        with sparsify(model, plan):
            out = model.model.layers[layer].mlp(x)[0]  # [T, d]
        xs = x[0, 128:sparse_end]
        idx = topk_sorted(griffin_scores(dense_activations(xs, fused)), k)  # the oracle, by hand
        ref = torch.cat([
            dense_rows_forward(x[0, :128], fused),
            sparse_block_forward(xs, fused, idx) + _manual(comp, layer, xs, idx),
            dense_rows_forward(x[0, sparse_end:], fused),
        ])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("variant", fc.VARIANTS)
@pytest.mark.parametrize("spans", [[(0, 5), (5, 12), (12, 20)], [(2, 6), (9, 17)]], ids=["contiguous", "gaps"])
def test_block_corrections_equal_the_per_block_forward(variant, spans):
    comp = _randomised(fc.ErrorCompensator(L=3, d=16, f=40, variant=variant, bias=True), seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 16, generator=g)
    idx = torch.stack([torch.randperm(40, generator=g)[:17] for _ in spans])  # [b, K]
    with torch.no_grad():
        got = comp.block_corrections(1, x, spans, idx)
        ref = torch.cat([comp(1, x[s:e], idx[j]) for j, (s, e) in enumerate(spans)])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    assert comp.block_corrections(1, x, [], idx[:0]).shape == (0, 16)
    if variant == "masked":
        with pytest.raises(ValueError, match="idx"):
            comp.block_corrections(1, x, spans, None)
    with pytest.raises(IndexError):
        comp.block_corrections(3, x, spans, idx)


@pytest.mark.parametrize("variant", fc.VARIANTS)
def test_engine_batched_corrections_equal_the_per_block_path(variant):
    """The engine's one-call-per-layer path == calling the compensator block by block (a plain callable)."""
    model, _ = load_model("tiny-llama")
    comp = _randomised(fc.ErrorCompensator(4, 64, 256, variant=variant), scale=0.05)
    ids = _ids(700)
    with torch.no_grad():
        with sparsify(model, SparsityPlan(densities=0.5, policy="oracle", block_size=64, compensator=comp)) as st:
            fast = model(ids).logits
        per_block = lambda layer, x, idx: comp(layer, x, idx)  # noqa: E731 - no block_corrections attribute
        with sparsify(model, SparsityPlan(densities=0.5, policy="oracle", block_size=64, compensator=per_block)):
            slow = model(ids).logits
    assert st.stats["sparse_tokens"] > 0
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_engine_with_compensator_changes_logits_and_decodes():
    model, _ = load_model("tiny-qwen3")
    ids = _ids(400)
    comp = _randomised(fc.ErrorCompensator(4, 64, 256, variant="masked"), scale=0.05)
    with torch.no_grad():
        with sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
            base = model(ids).logits
        plan = SparsityPlan(densities=0.5, policy="oracle", compensator=comp, sparse_decode=True)
        with sparsify(model, plan):
            out = model(ids, use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert not torch.allclose(out.logits, base)
    torch.testing.assert_close(out.logits[:, :128], base[:, :128])  # the dense first block is untouched
    # the decode step: each layer's masked dense MLP (the token's own top-k) plus the compensator's correction
    with torch.no_grad(), sparsify(model, SparsityPlan(densities=0.5, policy="oracle", compensator=comp)):
        cache = model(ids, use_cache=True).past_key_values
    mlps = gated_mlps(model)
    saved = [m.forward for m in mlps]

    def corrected(layer, mlp):
        fused = fused_ffn(mlp)
        k = experts_for(0.5, fused.f)

        def forward(x):  # x [1, 1, d]
            h = dense_activations(x[0], fused)  # [1, f]
            idx = topk_sorted(griffin_scores(h), k)  # [k]
            mask = torch.zeros_like(h)
            mask[:, idx] = 1.0
            return ((h * mask) @ fused.w_down_t + comp(layer, x[0], idx))[None]
        return forward

    for i, m in enumerate(mlps):
        m.forward = corrected(i, m)
    try:
        with torch.no_grad():
            ref = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    finally:
        for m, f in zip(mlps, saved):
            m.forward = f
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ distillation data, training, metrics
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tok = load_model("tiny-llama")
    root = tmp_path_factory.mktemp("comp")
    folders = {}
    for split, n in (("train", 8), ("eval", 3)):
        cfg = CollectConfig(split=split, n_samples=n, seq_len=512, samples_per_shard=4, batch_size=4)
        folders[split] = collect(model, tok, cfg, root / split, "tiny-llama", progress=False)
    train, held = load_collection_dir(folders["train"]), load_collection_dir(folders["eval"])
    prior = train.scores.mean(0)  # [L, f] a prompt-independent 'predictor': large, partly systematic errors
    src_train = {"oracle": train.scores, "static": prior.expand_as(train.scores)}
    src_held = {"oracle": held.scores, "static": prior.expand_as(held.scores)}
    data = fc.distill_data(model, train, src_train, densities=(0.5, 0.6, 0.7), tokens_per_block=64, progress=False)
    return model, train, held, src_held, data, root


def test_distillation_targets_are_the_sparsification_error(tiny):
    model, train, _, _, data, _ = tiny
    assert data.X.shape == (24, 4, 64, 64) and data.err["oracle"].shape == (24, 4, 2, 64, 64)
    assert data.X.dtype == torch.float32 and data.err["static"].dtype == torch.float16
    assert bool((data.position > 0).all())  # first blocks run dense: skipped
    lv = data.level  # [n, L, P]: two distinct grid levels per block and layer, ascending
    assert lv.shape == (24, 4, 2) and bool((lv[..., 0] < lv[..., 1]).all()) and set(lv.unique().tolist()) == {0, 1, 2}
    rows = (train.position > 0).nonzero().squeeze(1)
    fused = fused_ffn(gated_mlps(model)[1])
    full = fc.distill_data(model, train, {"oracle": train.scores}, densities=(0.5, 0.6, 0.7), tokens_per_block=None,
                           levels_per_block=None, progress=False)
    assert full.err["oracle"].shape == (24, 4, 3, 128, 64) and bool((full.level == torch.arange(3)).all())
    for b in (0, 5):
        x = train.X[rows[b], 1].float()  # [128, d]
        for j, dens in enumerate((0.5, 0.6, 0.7)):
            k = round(dens * 256)
            idx = topk_sorted(train.scores[rows[b], 1], k)
            ref = dense_rows_forward(x, fused) - sparse_block_forward(x, fused, idx)
            got = full.err["oracle"][b, 1, j].float() * full.scale[1]
            torch.testing.assert_close(got, ref, atol=2e-3 * float(ref.abs().max()), rtol=2e-3)
            assert set(idx.tolist()) == set((full.rank["oracle"][b, 1] < k).nonzero().squeeze(1).tolist())
            # the two-level data holds the same errors at its own levels (same seed: same tokens)
            for p in range(2):
                if int(data.level[b, 1, p]) == j:
                    torch.testing.assert_close(data.err["oracle"][b, 1, p].float() * data.scale[1],
                                               ref[data_tokens(data, full, b)], atol=2e-3 * float(ref.abs().max()),
                                               rtol=2e-3)
            drop = data.drop_mask("oracle", torch.tensor([b]), torch.zeros(1, 4, dtype=torch.long))[0, 1]
            assert int(drop.sum()) == 256 - data.ks[1][int(data.level[b, 1, 0])]  # layer 1's grid
    with pytest.raises(ValueError, match="levels_per_block"):
        fc.distill_data(model, train, {"oracle": train.scores}, densities=(0.5,), levels_per_block=2, progress=False)


def data_tokens(data: fc.DistillData, full: fc.DistillData, b: int) -> torch.Tensor:
    """Positions (within the block) of the tokens `data` sampled for block b, found by matching FFN inputs."""
    x, allx = data.X[b, 1], full.X[b, 1]  # [T, d], [128, d]
    return torch.cdist(x, allx).argmin(1)


@pytest.fixture(scope="module")
def trained(tiny):
    _, _, _, _, data, _ = tiny
    cfg = fc.CompensatorConfig(variant="plain", phases=("oracle", "static"), max_epochs=12, patience=12, min_delta=0.0,
                               batch_blocks=4, lr=3e-3, shrink=False)  # unshrunk: the masked start is exact
    plain = fc.train_compensator(data, cfg, meta={"model": "tiny-llama", "fingerprint": "x"}, progress=False)
    masked = fc.train_compensator(data, cfg.replace(variant="masked", phases=("static",)), init=plain.compensator,
                                  meta={"model": "tiny-llama"}, progress=False)
    return plain, masked


def test_training_reduces_the_heldout_error(tiny, trained):
    model, _, held, src_held, _, _ = tiny
    plain, masked = trained
    h = plain.history
    assert [e["phase"] for e in h if e["epoch"] == 0] == ["oracle", "static"]
    static = [e["val_loss"] for e in h if e["phase"] == "static"]
    assert min(static[1:]) < static[0]  # the second phase improves on its starting point
    meta = plain.compensator.meta["training"]
    assert meta["train_blocks"] > 0 and meta["val_blocks"] > 0 and meta["tokens_per_block"] == 64
    assert not plain.compensator.w2.requires_grad
    # the masked variant starts exactly at the plain compensator
    per_layer = torch.tensor([e["val_loss_per_layer"] for e in h if e["phase"] == "static"]).min(0).values
    torch.testing.assert_close(torch.tensor(masked.history[0]["val_loss_per_layer"]), per_layer, rtol=1e-4, atol=1e-6)
    rows = fc.heldout_metrics(model, held, src_held, {"plain": plain.compensator, "masked": masked.compensator},
                              densities=(0.5, 0.6), progress=False)
    mean = {(r["source"], r["density"], r["compensator"]): r for r in rows if r["layer"] == -1}
    for dens in (0.5, 0.6):
        none = mean[("static", dens, "none")]["rel_err"]
        assert mean[("static", dens, "plain")]["rel_err"] < 0.97 * none
        assert mean[("static", dens, "masked")]["rel_err"] < 0.97 * none
        assert 0 < mean[("static", dens, "plain")]["corr_to_err"] < 1.5
        assert mean[("static", dens, "plain")]["cos"] > 0
    assert len(rows) == 2 * 2 * 3 * (4 + 1)  # sources x densities x compensators x (layers + mean)


def test_heldout_metrics_of_a_zero_compensator(tiny):
    model, _, held, src_held, _, _ = tiny
    zero = fc.ErrorCompensator(4, 64, 256)
    rows = fc.heldout_metrics(model, held, {"oracle": src_held["oracle"]}, {"plain": zero}, densities=(0.5,),
                              progress=False)
    by = {(r["layer"], r["compensator"]): r for r in rows}
    assert by[(1, "plain")]["rel_err"] == pytest.approx(by[(1, "none")]["rel_err"])
    assert by[(1, "plain")]["corr_to_err"] == 0 and by[(1, "plain")]["cos"] is None
    # rel_err of 'none' from scratch for layer 1
    fused = fused_ffn(gated_mlps(model)[1])
    num = den = 0.0
    for b in (held.position > 0).nonzero().squeeze(1).tolist():
        x = held.X[b, 1].float()
        y = dense_rows_forward(x, fused)
        num += float((y - sparse_block_forward(x, fused, topk_sorted(held.scores[b, 1], 128))).pow(2).sum())
        den += float(y.pow(2).sum())
    assert by[(1, "none")]["rel_err"] == pytest.approx(math.sqrt(num / den), rel=1e-4)


def test_training_config_errors(tiny):
    _, _, _, _, data, _ = tiny
    with pytest.raises(ValueError, match="not in the data"):
        fc.train_compensator(data, fc.CompensatorConfig(phases=("predictor",)), progress=False)
    with pytest.raises(ValueError, match="does not match"):
        fc.train_compensator(data, fc.CompensatorConfig(act="relu", phases=("oracle",), max_epochs=0),
                             init=fc.ErrorCompensator(4, 64, 256), progress=False)


def test_single_density_training(tiny):
    model, train, _, _, _, _ = tiny
    one = fc.distill_data(model, train, {"oracle": train.scores}, densities=(0.5,), tokens_per_block=16,
                          levels_per_block=1, progress=False)
    res = fc.train_compensator(one, fc.CompensatorConfig(phases=("oracle",), max_epochs=2), progress=False)
    t = res.compensator.meta["training"]
    assert t["densities"] == [0.5] and t["levels_per_block"] == 1 and t["epochs_per_phase"]["oracle"] >= 1


# ------------------------------------------------------------------ artifacts
def test_save_load_round_trip_and_mismatch_refusal(tiny, trained):
    model, _, _, _, _, root = tiny
    from ffcore.models import model_fingerprint

    for res in trained:
        comp = res.compensator
        comp.meta["fingerprint"] = model_fingerprint(model)
        folder = root / f"art_{comp.variant}"
        fc.save_compensator(comp, folder)
        back = fc.load_compensator(folder, model)
        assert back.variant == comp.variant and back.name == comp.name
        assert back.meta["fingerprint"] == comp.meta["fingerprint"]
        x, idx = torch.randn(6, 64), torch.arange(0, 256, 2)
        torch.testing.assert_close(back(3, x, idx), comp(3, x, idx), atol=0, rtol=0)
        other, _ = load_model("tiny-qwen3")  # same shapes, different weights
        with pytest.raises(ValueError, match="fingerprint"):
            fc.load_compensator(folder, other)
        assert fc.load_compensator(folder).name == comp.name  # no model: no check
    bad = fc.ErrorCompensator(4, 64, 128, meta={"model": "x", "fingerprint": "y"})
    fc.save_compensator(bad, root / "bad")
    with pytest.raises(ValueError, match="shape"):
        fc.load_compensator(root / "bad", model)
    with pytest.raises(FileNotFoundError):
        fc.load_compensator(root / "missing", model)


def test_compensator_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FFCORE_ROOT", str(tmp_path))
    path = nb04.compensator_dir("smollm2-135m", "smoke", "masked")
    assert path == tmp_path / "build" / "smoke" / "artifacts" / "smollm2-135m" / "compensator_masked" and path.is_dir()
    assert nb04.compensator_dir("smollm2-135m", "smoke").name == "compensator_plain"


# ------------------------------------------------------------------ cost and the verdict
def test_cost():
    plain = fc.compensator_cost(576, 1536, 0.5, "plain")
    assert plain["r"] == 72 and plain["flops"] == 4 * 128 * 576 * 72
    masked = fc.compensator_cost(576, 1536, 0.5, "masked")
    assert masked["flops"] - plain["flops"] == 2 * 768 * 72 + 2 * 128 * 72
    assert masked["extra_pct_vs_plain"] < 1.0
    assert plain["share_of_sparse_ffn_pct"] == pytest.approx(100 * plain["flops"] / (6 * 128 * 576 * 768))
    assert masked["params"] == 2 * 576 * 72 + 2 * 1536 * 72


def test_verdict_is_computed_from_the_table():
    def row(dens, comp, err, red):
        return {"model": "m", "source": "predictor", "density": dens, "compensator": comp, "rel_err": err,
                "reduction": red, "corr_to_err": 0.1, "cos": 0.5}

    table = [row(d, "none", 0.2, 0.0) for d in (0.5, 0.6, 0.7)]
    table += [row(d, "plain", 0.18, 0.1) for d in (0.5, 0.6, 0.7)] + [row(0.5, "masked", 0.19, 0.05)]
    text = nb04.verdict(table)
    assert "does **not** beat" in text and "reduces" in text and "0.1800" in text
    table[-1] = row(0.5, "masked", 0.17, 0.15)
    assert "**beats**" in nb04.verdict(table) and "5.6% less remaining error" in nb04.verdict(table)
    table += [row(0.8, "plain", 0.1, -0.02), row(0.8, "masked", 0.09, 0.01)]
    assert "at the other densities: -2.0% at 80% (mask-conditioned: +1.0%)" in nb04.verdict(table)
    e2e = [{"model": "m", "scope": "out of domain", "family": "all", "config": c, "n": 6, "kl": kl,
            "kl_first_block_static": 0.06, "kl_oracle": 0.02, "gap_closed": g, "gap_closed_ci": gci,
            "kl_minus_no_compensator": dk, "kl_minus_no_compensator_ci": dci}
           for c, kl, g, gci, dk, dci in (("no compensator", 0.05, 0.25, [0.1, 0.4], 0.0, [0.0, 0.0]),
                                          ("plain compensator", 0.03, 0.75, [0.65, 0.85], -0.02, [-0.03, -0.01]),
                                          ("masked compensator", 0.052, 0.2, [0.0, 0.4], 0.002, [-0.001, 0.005]))]
    text = nb04.e2e_verdict(e2e)
    assert "the plain compensator lowers the KL" in text and "masked compensator does not resolvably change" in text
    assert "closes **75 %**" in text and "it meets the 60 % target" in text


def test_warm_epochs_cap_the_first_phase(tiny):
    _, _, _, _, data, _ = tiny
    cfg = fc.CompensatorConfig(phases=("oracle", "static"), max_epochs=3, warm_epochs=1, patience=5, min_delta=-1.0)
    res = fc.train_compensator(data, cfg, progress=False)
    assert res.compensator.meta["training"]["epochs_per_phase"] == {"oracle": 1, "static": 3}


def test_per_layer_density_grid_and_the_shrink_gain(tiny):
    """Each layer can train on its own densities (the deployed schedules'); the validation gain never raises the error."""
    assert fc.density_grid((0.5, 0.7), 3) == ((0.5, 0.7),) * 3
    assert fc.schedule_grid([[0.4, 1.0, 0.6], [0.5, 1.0, 0.7]]) == ((0.4, 0.5), (1.0, 1.0), (0.6, 0.7))
    with pytest.raises(ValueError, match="rows"):
        fc.density_grid([(0.5,), (0.6,)], 3)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fc.density_grid((0.0, 0.5), 2)
    model, train, _, _, _, _ = tiny
    grid = [(0.4, 0.6), (0.5, 0.7), (0.9, 1.0), (0.3, 0.5)]  # layer 2 runs almost dense; 1.0 = no error at all
    data = fc.distill_data(model, train, {"oracle": train.scores}, densities=grid, tokens_per_block=32,
                           levels_per_block=None, progress=False)
    assert data.densities == tuple(tuple(r) for r in grid) and data.ks[2] == (round(0.9 * 256), 256)
    assert float(data.err["oracle"][:, 2, 1].abs().max()) == 0.0  # density 1 drops nothing
    cfg = fc.CompensatorConfig(variant="plain", phases=("oracle",), max_epochs=3, batch_blocks=4, lr=3e-3)
    res = fc.train_compensator(data, cfg, progress=False)
    gains = res.compensator.meta["training"]["shrink_gains"]
    assert len(gains) == 4 and all(0.0 <= g <= 1.0 for g in gains)
    # on the validation blocks the gain was fitted on, no layer's error grows with the (shrunk) correction
    from ffcore.predictor import split_train_val
    _, va = split_train_val(data, cfg.val_frac, cfg.seed)
    for layer in range(4):
        e = data.err["oracle"][va, layer].float() * data.scale[layer]  # [n, P, T, d]
        c = res.compensator.correction(data.X[va])[:, layer].unsqueeze(1)  # [n, 1, T, d]
        assert float((e - c).pow(2).sum()) <= float(e.pow(2).sum()) * (1 + 1e-6), layer
