"""Windowed sliding-window attention (`ffcore.engine.attention`) equals transformers' stock attention."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ffcore.engine import attention as wa
from ffcore.models import tiny_model

ATOL = 1e-5  # float32 logits


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls that took the windowed (chunked) path."""
    calls = {"windowed": 0}
    core = wa.windowed_attention_core

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["windowed"] += 1
        return core(*args, **kwargs)

    monkeypatch.setattr(wa, "windowed_attention_core", counting)
    return calls


def _ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, n), generator=g)


def _gemma(window: int) -> torch.nn.Module:
    # query_pre_attn_scalar 37 != head_dim 16: Gemma's `scaling` differs from SDPA's default
    return tiny_model("gemma3", sliding_window=window, query_pre_attn_scalar=37)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max |diff| {err:.2e} > {atol:.0e}"


# ------------------------------------------------------------------------------ registration
def test_registered_in_both_interfaces() -> None:
    assert ALL_ATTENTION_FUNCTIONS[wa.WINDOWED_ATTENTION] is wa.windowed_sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[wa.WINDOWED_ATTENTION] is wa.windowed_sdpa_mask


def test_context_manager_switches_and_restores() -> None:
    model = _gemma(16)
    attn = model.model.layers[0].self_attn
    assert model.config._attn_implementation == "sdpa"
    with wa.windowed_attention(model, chunk_size=8):
        assert model.config._attn_implementation == wa.WINDOWED_ATTENTION
        assert attn.config._attn_implementation == wa.WINDOWED_ATTENTION
        assert getattr(attn, "_ffcore_window_chunk_size") == 8
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(attn, "_ffcore_window_chunk_size")
    wa.enable_windowed_attention(model)
    assert model.config._attn_implementation == wa.WINDOWED_ATTENTION
    wa.disable_windowed_attention(model)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------ the mask side
@pytest.mark.parametrize(
    ("q_len", "kv_len", "q_off", "kv_off", "window"),
    [(40, 40, 0, 0, 16), (7, 47, 40, 0, 16), (7, 22, 40, 25, 16), (1, 60, 59, 0, 16), (33, 33, 0, 0, 5)],
)
def test_window_mask_dense_equals_sdpa_mask(q_len: int, kv_len: int, q_off: int, kv_off: int, window: int) -> None:
    spec = wa.windowed_sdpa_mask(
        batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off,
        mask_function=sliding_window_causal_mask_function(window), local_size=window,
    )
    assert isinstance(spec, wa.WindowMask)
    ref = sdpa_mask(
        batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off,
        mask_function=sliding_window_causal_mask_function(window), local_size=window, allow_is_causal_skip=False,
    )
    assert torch.equal(spec.to_dense(), ref)


def test_mask_delegates_what_it_cannot_prove() -> None:
    base = dict(batch_size=1, q_length=40, kv_length=40, local_size=16)
    chunked = chunked_causal_mask_function(16, torch.zeros(1, dtype=torch.long))
    cases = {
        "chunked attention": dict(mask_function=chunked),
        "window differs from local_size": dict(mask_function=sliding_window_causal_mask_function(8)),
        "vmap (custom overlay)": dict(mask_function=sliding_window_causal_mask_function(16), use_vmap=True),
        "caller needs a tensor": dict(mask_function=sliding_window_causal_mask_function(16), allow_is_causal_skip=False),
        "padding": dict(mask_function=sliding_window_causal_mask_function(16),
                        attention_mask=torch.tensor([[False] * 3 + [True] * 37])),
        "tensor offset": dict(mask_function=sliding_window_causal_mask_function(16), q_offset=torch.tensor(0)),
    }
    for name, kw in cases.items():
        out = wa.windowed_sdpa_mask(**{**base, **kw})
        assert not isinstance(out, wa.WindowMask), name
    # the window cuts nothing: exactly the stock answer (None: SDPA's is_causal)
    short = wa.windowed_sdpa_mask(batch_size=1, q_length=10, kv_length=10, local_size=16,
                                  mask_function=sliding_window_causal_mask_function(16))
    assert short is None


@pytest.mark.parametrize(
    ("q_len", "kv_len", "q_off", "kv_off", "window", "chunk"),
    [
        (100, 100, 0, 0, 16, 64),  # prefill from an empty cache
        (37, 137, 100, 0, 16, 8),  # suffix against a cache that keeps everything (keys cut in front)
        (37, 52, 100, 85, 16, 8),  # suffix against a sliding cache holding the last W - 1 keys
        (1, 80, 79, 0, 16, 64),  # one decode step against a full-history cache
        (20, 64, 0, 0, 8, 7),  # static-cache layout: future key slots after the queries
        (50, 50, 0, 0, 1, 16),  # window 1: each query sees only itself
    ],
)
def test_core_equals_sdpa_on_the_dense_mask(
    q_len: int, kv_len: int, q_off: int, kv_off: int, window: int, chunk: int
) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, generator=g)  # [B, H, n, hd]
    k = torch.randn(2, 2, kv_len, 16, generator=g)  # [B, KV, m, hd]: GQA, 2 heads per KV head
    v = torch.randn(2, 2, kv_len, 12, generator=g)  # value dim differs from head dim
    spec = wa.WindowMask(2, q_len, kv_len, q_off, kv_off, window, torch.device("cpu"))
    out = wa.windowed_attention_core(q, k, v, spec, scaling=0.3, chunk_size=chunk)  # [B, n, H, Ev]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=spec.to_dense(), scale=0.3
    ).transpose(1, 2)
    _close(out, ref)


# ------------------------------------------------------------------------- prefill, tiny Gemma 3
@pytest.mark.parametrize(
    ("window", "length", "chunk"),
    [
        (16, 5, 64), (16, 16, 64), (16, 17, 64), (16, 100, 64), (16, 131, 64),  # below / at / above / well above
        (16, 100, 7), (16, 131, 16),  # lengths not a multiple of the chunk
        (64, 63, 64), (64, 64, 64), (64, 65, 64), (64, 300, 64), (64, 333, 32),
    ],
)
def test_prefill_matches_stock(window: int, length: int, chunk: int, spy: dict[str, int]) -> None:
    model = _gemma(window)
    ids = _ids(length)
    with torch.no_grad():
        ref = model(ids).logits
        with wa.windowed_attention(model, chunk_size=chunk):
            out = model(ids).logits
    _close(out, ref)
    assert spy["windowed"] == (3 if length > window else 0)  # 3 sliding layers; nothing to cut below the window


def test_prefill_batch_and_padding(spy: dict[str, int]) -> None:
    model = _gemma(16)
    ids = _ids(70, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding in row 1
    with torch.no_grad():
        ref = model(ids).logits
        ref_pad = model(ids, attention_mask=mask).logits
        with wa.windowed_attention(model):
            out = model(ids).logits
            assert spy["windowed"] == 3
            out_pad = model(ids, attention_mask=mask).logits
    assert spy["windowed"] == 3  # padding falls back to the stock mask
    _close(out, ref)
    _close(out_pad[0], ref_pad[0])
    _close(out_pad[1, 9:], ref_pad[1, 9:])


def test_training_mode_dropout_falls_back(spy: dict[str, int]) -> None:
    model = _gemma(16)
    model.config.attention_dropout = 0.0
    model.train()
    ids = _ids(50)
    ref = model(ids).logits
    with wa.windowed_attention(model):
        out = model(ids).logits  # dropout 0.0 in training: still the windowed path, with gradients
    out.sum().backward()
    _close(out, ref)
    assert spy["windowed"] == 3


# ------------------------------------------------------------------- suffix prefill and decode
def _cache(model: torch.nn.Module, kind: str) -> DynamicCache:
    # "config": what generate builds (sliding layers keep W-1 keys); "plain": every layer keeps all keys
    return DynamicCache(config=model.config) if kind == "config" else DynamicCache()


@pytest.mark.parametrize("kind", ["config", "plain"])
@pytest.mark.parametrize(("prefix", "suffix"), [(10, 30), (40, 7), (40, 50), (77, 1), (100, 33)])
def test_suffix_prefill_matches_stock(kind: str, prefix: int, suffix: int, spy: dict[str, int]) -> None:
    model = _gemma(16)
    ids = _ids(prefix + suffix)
    with torch.no_grad():
        full = model(ids).logits[:, prefix:]
        cache = _cache(model, kind)
        model(ids[:, :prefix], past_key_values=cache)
        ref = model(ids[:, prefix:], past_key_values=cache).logits
        with wa.windowed_attention(model, chunk_size=8):
            cache = _cache(model, kind)
            model(ids[:, :prefix], past_key_values=cache)
            n_prefix = spy["windowed"]
            out = model(ids[:, prefix:], past_key_values=cache).logits
    _close(out, ref)
    _close(out, full)
    assert n_prefix == (3 if prefix > 16 else 0)
    kv_offset = max(0, prefix - 15) if kind == "config" else 0  # first cached key's position
    cuts = prefix + suffix - 1 - 16 >= kv_offset  # the last query's window starts after the first key
    assert spy["windowed"] - n_prefix == (3 if cuts else 0)


@pytest.mark.parametrize("kind", ["config", "plain"])
def test_decode_token_by_token(kind: str, spy: dict[str, int]) -> None:
    model = _gemma(16)
    ids = _ids(60)
    prefix = 25
    with torch.no_grad():
        runs = []
        for windowed in (False, True):
            with wa.windowed_attention(model) if windowed else contextlib.nullcontext():
                cache = _cache(model, kind)
                steps = [model(ids[:, :prefix], past_key_values=cache).logits[:, -1]]
                for t in range(prefix, ids.shape[1]):
                    steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
            runs.append(torch.stack(steps))  # [steps, 1, V]
        full = model(ids).logits[:, prefix - 1 :].transpose(0, 1)  # [steps, 1, V]
    for step, (a, b) in enumerate(zip(*runs)):
        assert (a - b).abs().max().item() <= ATOL, f"step {step}"
    _close(runs[1], full)
    # prefill: 3 sliding layers; decode: windowed only where keys beyond the window are kept ("plain")
    assert spy["windowed"] == 3 + (3 * (ids.shape[1] - prefix) if kind == "plain" else 0)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_same_tokens(cache_implementation: str | None, spy: dict[str, int]) -> None:
    model = _gemma(16)
    ids = _ids(50, seed=3)
    kw = dict(max_new_tokens=40, do_sample=False)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    ref = model.generate(ids, **kw)
    with wa.windowed_attention(model):
        out = model.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert spy["windowed"] >= 3


def test_sparse_model_matches_stock(spy: dict[str, int]) -> None:
    from ffcore.engine import SparsityPlan, sparsify

    model = _gemma(16)
    ids = _ids(300)  # 3 FFN blocks of 128: the middle one sparse
    with torch.no_grad(), sparsify(model, SparsityPlan(densities=0.5, policy="oracle")):
        ref = model(ids).logits
        with wa.windowed_attention(model):
            out = model(ids).logits
        dense = model.model.layers[0].mlp  # still the sparse wrapper inside the context
    assert type(dense).__name__ == "SparseMLP"
    _close(out, ref)
    assert spy["windowed"] == 3


# -------------------------------------------------------------------------- no window: Llama
def test_llama_is_identical_to_stock(spy: dict[str, int]) -> None:
    model = tiny_model("llama")
    ids = _ids(150)
    with torch.no_grad():
        ref = model(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :100], past_key_values=cache)
        ref_suffix = model(ids[:, 100:], past_key_values=cache).logits
        gen_ref = model.generate(ids[:, :40], max_new_tokens=20, do_sample=False)
        with wa.windowed_attention(model):
            out = model(ids).logits
            cache = DynamicCache(config=model.config)
            model(ids[:, :100], past_key_values=cache)
            out_suffix = model(ids[:, 100:], past_key_values=cache).logits
            gen = model.generate(ids[:, :40], max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(out_suffix, ref_suffix)
    assert torch.equal(gen, gen_ref)
    assert spy["windowed"] == 0


# -------------------------------------------------------------------- softcapping: Gemma 2
def test_softcap_matches_eager(spy: dict[str, int]) -> None:
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.3)  # large enough for the softcap to bite
    ids = _ids(90)
    with torch.no_grad():
        ref = model(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :60], past_key_values=cache)
        ref_suffix = model(ids[:, 60:], past_key_values=cache).logits
        with wa.windowed_attention(model, chunk_size=16):
            out = model(ids).logits
            cache = DynamicCache(config=model.config)
            model(ids[:, :60], past_key_values=cache)
            out_suffix = model(ids[:, 60:], past_key_values=cache).logits
    assert model.config._attn_implementation == "eager"
    _close(out, ref)
    _close(out_suffix, ref_suffix)
    assert spy["windowed"] == 3  # full prefill, the 60-token prefix, the suffix: one sliding layer each


# ------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_gemma3_270m_logits_match_stock(spy: dict[str, int]) -> None:
    """1100 tokens (window 512): windowed vs stock SDPA, judged against stock eager vs stock SDPA.

    Both stock implementations are exact attention; their float32 disagreement (different
    summation order) is the noise floor. The windowed path changes the summation order too (and
    skips exact zeros), so its disagreement with SDPA must be of the same size: at most twice
    the eager-vs-SDPA disagreement, with a floor of 1e-4 relative to the logit scale.
    """
    from ffcore.models import load_model

    try:
        model, _ = load_model("gemma3-270m")
    except Exception as exc:  # noqa: BLE001 - any failure to load means: not available here
        pytest.skip(f"gemma3-270m not available: {exc}")
    ids = _ids(1100, seed=7) + 300  # ordinary vocabulary ids
    with torch.no_grad():
        ref = model(ids, use_cache=False, logits_to_keep=64).logits
        with wa.windowed_attention(model):
            out = model(ids, use_cache=False, logits_to_keep=64).logits
        model.config._attn_implementation = "eager"
        try:
            eager = model(ids, use_cache=False, logits_to_keep=64).logits
        finally:
            model.config._attn_implementation = "sdpa"
    assert spy["windowed"] == 15  # all sliding layers
    scale = ref.abs().max().item()
    noise = (eager - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    print(f"windowed-sdpa {err:.2e}, eager-sdpa {noise:.2e}, scale {scale:.1f}")
    assert err <= max(2 * noise, 1e-4 * scale), f"windowed {err:.2e} vs eager-sdpa noise {noise:.2e} (scale {scale:.1f})"
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
