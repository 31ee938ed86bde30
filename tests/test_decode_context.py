"""Sparse decode's expert context (`SparsityPlan.decode_context`): 'token', 'window', 'reuse' on tiny models.

References are computed by hand from captured FFN inputs: a decode step's experts are the top-K of the
GRIFFIN scores (or the predictor's scores) of the last `block_size` FFN inputs, the current one included
('window'), the same but chosen every `block_size` steps ('reuse'), or of the token alone ('token').
"""
from __future__ import annotations

import copy

import pytest
import torch

from ffcore.engine import SparsityPlan, sparsify
from ffcore.engine.decode_window import WINDOW_ATTR, DecodeWindow
from ffcore.engine.layout import experts_for
from ffcore.engine.plan import DECODE_CONTEXTS
from ffcore.engine.policies import OraclePolicy, griffin_scores, topk_sorted
from ffcore.engine.sparse_ffn import dense_activations, fused_ffn
from ffcore.models import decoder_layers, gated_mlps, tiny_model
from ffcore.predictor import ExpertPredictor

ARCHS = ["llama", "qwen3", "gemma3"]
B = 32  # block size: short windows, so the ring buffer wraps within a few dozen decode steps
T = 100  # prompt: dense [0, 32), sparse [32, 64), [64, 68), dense tail [68, 100)
STEPS = 40  # decode steps (> B: the window wraps; 'reuse' selects at steps 0 and 32)
ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=1)


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _plan(context: str, density: float = 0.5, policy="oracle", **kw) -> SparsityPlan:
    return SparsityPlan(densities=density, policy=policy, block_size=B, sparse_decode=True, decode_context=context, **kw)


@torch.no_grad()
def _run(model, ids, tokens, plan=None, cache=None):
    """Logits [batch, 1 + steps, V]: the prompt's last position, then each fixed decode token fed one at a time."""
    ctx = sparsify(model, plan) if plan is not None else torch.no_grad()
    with ctx:
        out = model(ids, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for j in range(tokens.shape[1]):
            step = model(tokens[:, j:j + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits[:, -1])
    return torch.stack(logits, 1), cache


class Capture:
    """Forward hook on one layer's (wrapped) MLP: its inputs and outputs, call by call."""

    def __init__(self, model, layer: int) -> None:
        self.layer, self.xs, self.ys = layer, [], []
        self.handle = decoder_layers(model)[layer].mlp.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.xs.append(args[0].detach().clone())
        self.ys.append(output.detach().clone())

    def remove(self):
        self.handle.remove()


class Recording:
    """A policy wrapper recording each selection (layer, window rows, experts)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []
        self.name = getattr(inner, "name", "recorded")
        self.needs_first_block = bool(getattr(inner, "needs_first_block", False))

    def select(self, ctx):
        idx = self.inner.select(ctx)
        self.calls.append((ctx.layer, ctx.x.clone(), list(ctx.spans), ctx.decode, idx.clone()))
        return idx


def _capture_run(model, plan, ids, tokens, layer=1):
    """Run prefill + decode under plan, capturing one layer's MLP inputs/outputs (prompt then decode tokens)."""
    with torch.no_grad(), sparsify(model, plan):
        cap = Capture(model, layer)
        try:
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            for j in range(tokens.shape[1]):
                model(tokens[:, j:j + 1], past_key_values=cache, use_cache=True)
        finally:
            cap.remove()
    xs = torch.cat(cap.xs, dim=1)[0]  # [T + steps, d] every FFN input of the layer, in order
    return xs, cap.ys


def _masked(mlp, x, experts):
    """The dense MLP of rows x [n, d] with only `experts` kept: [n, d]."""
    fused = fused_ffn(mlp)
    h = dense_activations(x, fused)
    mask = torch.zeros_like(h)
    mask[:, experts] = 1.0
    return (h * mask) @ fused.w_down_t


# ------------------------------------------------------------------------------ (a) density 1 is dense
@torch.no_grad()
@pytest.mark.parametrize("context", DECODE_CONTEXTS)
def test_density_one_is_dense_for_every_context(model, context):
    """At density 1 (the shortcut) and at K = f through the sparse gather path, every context is the dense model."""
    ids, toks = _ids(T, 0), _ids(8, 1)
    ref, _ = _run(model, ids, toks)
    f = model.config.intermediate_size
    for density in (1.0, 1.0 - 0.25 / f):  # the second keeps every neuron but runs the selection and gather
        assert experts_for(density, f) == f
        out, _ = _run(model, ids, toks, _plan(context, density))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ (b) 'window' = hand reference
@torch.no_grad()
def test_window_oracle_equals_masked_reference(model):
    """Each decode step keeps the top-K GRIFFIN neurons of the dense activations of the last B FFN inputs."""
    ids, toks = _ids(T, 2), _ids(STEPS, 3)
    layer = 1
    mlp = gated_mlps(model)[layer]
    k = experts_for(0.5, mlp.intermediate_size)
    xs, ys = _capture_run(model, _plan("window"), ids, toks, layer)
    fused = fused_ffn(mlp)
    differs = 0
    for j in range(STEPS):
        t = T + j  # the decode token's position
        win = xs[t - B + 1:t + 1]  # the last B FFN inputs, the current one included
        experts = topk_sorted(griffin_scores(dense_activations(win, fused)), k)
        ref = _masked(mlp, xs[t:t + 1], experts)
        torch.testing.assert_close(ys[1 + j][0], ref, atol=ATOL, rtol=1e-4)
        own = topk_sorted(griffin_scores(dense_activations(xs[t:t + 1], fused)), k)  # what 'token' would keep
        differs += int(not torch.equal(own, experts))
    assert differs > STEPS // 2, "the window's experts should differ from the token's own"


@torch.no_grad()
def test_window_predictor_scores_the_window_like_a_prefill_block(model):
    """A (random) trained predictor's window selection: its top-K for the window as one prefill span."""
    L, d, f = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    torch.manual_seed(0)
    pred = ExpertPredictor(L, d, f).eval()
    with torch.no_grad():
        pred.q.normal_(0, 1.0)  # a non-uniform attention pool: the window's rows are weighed, not averaged
    ids, toks = _ids(T, 4), _ids(STEPS, 5)
    layer = 2
    mlp = gated_mlps(model)[layer]
    k = experts_for(0.5, f)
    xs, ys = _capture_run(model, _plan("window", policy=pred), ids, toks, layer)
    for j in range(0, STEPS, 7):
        t = T + j
        win = xs[t - B + 1:t + 1]
        experts = topk_sorted(pred.span_scores(layer, win, [(0, B)]), k)
        torch.testing.assert_close(ys[1 + j][0], _masked(mlp, xs[t:t + 1], experts), atol=ATOL, rtol=1e-4)


# ------------------------------------------------------------------------------ (c) 'reuse' selects every B steps
@torch.no_grad()
def test_reuse_selects_once_per_block_from_the_window(model):
    ids, toks = _ids(T, 6), _ids(STEPS, 7)
    layer = 1
    mlp = gated_mlps(model)[layer]
    rec = Recording(OraclePolicy())
    xs, ys = _capture_run(model, _plan("reuse", policy=rec), ids, toks, layer)
    L = model.config.num_hidden_layers
    window_calls = [c for c in rec.calls if c[2] == [(0, B)] and c[1].shape[0] == B and not c[3]]
    prefill_calls = len(rec.calls) - len(window_calls)
    assert prefill_calls == L  # the prompt's sparse blocks: one selection call per layer
    n_sel = -(-STEPS // B)  # steps 0, B, 2B, ... select
    assert len(window_calls) == n_sel * L
    mine = [c for c in window_calls if c[0] == layer]
    for s, (_, win, _, _, experts) in enumerate(mine):
        t = T + s * B  # the selecting step's position: the window ends with its token
        torch.testing.assert_close(win, xs[t - B + 1:t + 1], atol=0, rtol=0)
        for j in range(s * B, min(STEPS, (s + 1) * B)):  # every step of the block uses those experts
            torch.testing.assert_close(ys[1 + j][0], _masked(mlp, xs[T + j:T + j + 1], experts[0]), atol=ATOL,
                                       rtol=1e-4)


@torch.no_grad()
def test_window_selects_every_step_and_token_never_uses_a_window(model):
    ids, toks = _ids(T, 8), _ids(6, 9)
    L = model.config.num_hidden_layers
    for context, per_step in (("window", B), ("token", 1)):
        rec = Recording(OraclePolicy())
        with sparsify(model, _plan(context, policy=rec)) as st:
            out = model(ids, use_cache=True)
            for j in range(toks.shape[1]):
                model(toks[:, j:j + 1], past_key_values=out.past_key_values, use_cache=True)
            assert (st.window is None) == (context == "token")
        decode_calls = rec.calls[L:]
        assert len(decode_calls) == toks.shape[1] * L
        assert all(c[1].shape[0] == per_step and c[3] == (context == "token") for c in decode_calls)


# ------------------------------------------------------------------------------ (d) 'token' is today's decode
from tests.test_engine import _masked_decode_mlp  # noqa: E402  (the one masked decode reference)


@torch.no_grad()
def test_token_context_is_the_per_token_decode(model):
    """'token' (the default) = the masked dense MLP of each token's own top-K, step after step, through the model."""
    ids, toks = _ids(200, 2), _ids(5, 10)
    plan = SparsityPlan(densities=0.5, policy="oracle", sparse_decode=True)
    assert plan.decode_context == "token" and plan == plan.replace(decode_context="token")
    with sparsify(model, plan):
        out = model(ids, use_cache=True)
        ref_cache = copy.deepcopy(out.past_key_values)
        cache, steps = out.past_key_values, []
        for j in range(toks.shape[1]):
            steps.append(model(toks[:, j:j + 1], past_key_values=cache, use_cache=True).logits)
    mlps = gated_mlps(model)
    saved = [m.forward for m in mlps]
    for m in mlps:
        m.forward = _masked_decode_mlp(m, experts_for(0.5, fused_ffn(m).f))
    try:
        refs = [model(toks[:, j:j + 1], past_key_values=ref_cache, use_cache=True).logits for j in range(toks.shape[1])]
    finally:
        for m, fwd in zip(mlps, saved):
            m.forward = fwd
    for got, ref in zip(steps, refs):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_plan_keys_of_the_default_context_are_unchanged():
    """'token' adds nothing to describe()/key() (existing result caches keep their keys); the others do."""
    base = SparsityPlan(densities=0.5, policy="oracle", sparse_decode=True)
    assert "decode_context" not in base.describe()
    assert set(base.describe()) == {"densities", "policy", "policy_id", "block_size", "dense_first", "dense_last",
                                    "dense_tail", "sparse_decode", "compensator", "seed"}
    keys = {c: base.replace(decode_context=c).key() for c in DECODE_CONTEXTS}
    assert keys["token"] == base.key() and len(set(keys.values())) == 3
    assert base.replace(decode_context="reuse").describe()["decode_context"] == "reuse"


# ------------------------------------------------------------------------------ (e) bad values
def test_bad_decode_context_is_refused():
    for bad in ("windowed", "", None, "Token"):
        with pytest.raises(ValueError, match=r"decode_context.*'token', 'window', 'reuse'"):
            SparsityPlan(densities=0.5, sparse_decode=True, decode_context=bad)
    with pytest.raises(ValueError, match="decode_context"):
        SparsityPlan.from_dict({"densities": 0.5, "decode_context": "block"})


# ------------------------------------------------------------------------------ (f) batch rows independent
@torch.no_grad()
@pytest.mark.parametrize("context", ["window", "reuse"])
def test_batch_rows_are_independent(model, context):
    ids, toks = _ids(T, 11, batch=2), _ids(B + 4, 12, batch=2)
    both, _ = _run(model, ids, toks, _plan(context))
    for row in range(2):
        one, _ = _run(model, ids[row:row + 1], toks[row:row + 1], _plan(context))
        torch.testing.assert_close(both[row:row + 1], one, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ state: per sequence, per cache
@torch.no_grad()
@pytest.mark.parametrize("context", ["window", "reuse"])
def test_window_resets_per_prefill_and_travels_with_the_cache(model, context):
    """A new prefill (offset 0) starts a fresh window; a copied cache continues from its own copy of it."""
    plan = _plan(context)
    ids_a, ids_b, toks, other = _ids(T, 13), _ids(T + 7, 14), _ids(B + 3, 15), _ids(B + 3, 16)
    fresh_b, _ = _run(model, ids_b, toks, plan)
    with torch.no_grad(), sparsify(model, plan):  # sequence A, then B in the same session
        _run(model, ids_a, other, plan)
        again_b, _ = _run(model, ids_b, toks, plan)
    torch.testing.assert_close(again_b, fresh_b, atol=ATOL, rtol=RTOL)
    # two continuations from one prefilled cache (the runner's greedy decode, then teacher forcing from a copy)
    with torch.no_grad(), sparsify(model, plan):
        out = model(ids_b, use_cache=True)
        assert isinstance(getattr(out.past_key_values, WINDOW_ATTR), DecodeWindow)
        saved = copy.deepcopy(out.past_key_values)
        cache = out.past_key_values
        for j in range(other.shape[1]):
            model(other[:, j:j + 1], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for j in range(toks.shape[1]):
            logits.append(model(toks[:, j:j + 1], past_key_values=saved, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), fresh_b, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_generate_uses_the_window(model):
    """Hugging Face's generate (it makes the cache before the prefill) decodes like the hand-written loop."""
    ids = _ids(T, 17)
    plan = _plan("window")
    with sparsify(model, plan):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        first = model(ids, use_cache=True)
        cache, logits, toks = first.past_key_values, first.logits[:, -1], []
        for _ in range(6):
            tok = logits.argmax(-1, keepdim=True)
            toks.append(int(tok))
            step = model(tok, past_key_values=cache, use_cache=True)
            logits = step.logits[:, -1]
    assert out[0, T:].tolist() == toks


def test_ring_buffer_keeps_the_last_block_in_order():
    w = DecodeWindow(4)
    seq = torch.arange(2 * 11 * 3, dtype=torch.float32).view(2, 11, 3)  # [batch, t, d]
    w.push(0, seq[:, :3], 0)
    torch.testing.assert_close(w.window(0), seq[:, :3])
    for t in range(3, 11):  # one token at a time: wraps around twice
        w.push(0, seq[:, t:t + 1], t)
        torch.testing.assert_close(w.window(0), seq[:, max(0, t - 3):t + 1])
    w.push(0, seq[:, 1:4], 11)  # a 3-token chunk across the wrap point
    torch.testing.assert_close(w.window(0), torch.cat([seq[:, 10:11], seq[:, 1:4]], 1))
    w.push(0, seq, 14)  # longer than the buffer: its last 4
    torch.testing.assert_close(w.window(0), seq[:, -4:])
    assert w.end == 25
