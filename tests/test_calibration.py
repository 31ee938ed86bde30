"""The chunked attention-sink calibration equals transformers' eager attention weights."""
from __future__ import annotations

import json

import pytest
import torch

from ffcore import calibration as cal
from ffcore.experiments import nb02_calibration as nb02
from ffcore.models import decoder_layers, load_model

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread (and do not stall when other jobs share the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


T_TEST = 200  # > the tiny Gemma3 sliding window (64), not a multiple of the chunk or block size
CHUNK = 37


def eager_columns(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Column sums of transformers' eager attention weights: `[B, L, H, T]` (float64)."""
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == len(decoder_layers(model))
    return torch.stack([a.sum(dim=-2) for a in out.attentions], dim=1).double()  # [B, L, H, T]


def _ids(b: int = 2, t: int = T_TEST, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3", "tiny-qwen3"])
def eager_model(request):
    model, _ = load_model(request.param, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model


def test_columns_match_eager_attention(eager_model):
    ids = _ids()
    ref = eager_columns(eager_model, ids)
    got = cal.attention_block_mass(eager_model, ids, block_size=128, chunk_size=CHUNK, return_columns=True)
    torch.testing.assert_close(got["columns"], ref, rtol=1e-5, atol=1e-6)
    ref_blocks = torch.stack([ref[..., :128].sum(-1), ref[..., 128:].sum(-1)], dim=-1)  # [B, L, H, 2]
    torch.testing.assert_close(got["block_mass"], ref_blocks, rtol=1e-5, atol=1e-6)
    # every attention row sums to 1, so the total received mass per head is T
    torch.testing.assert_close(got["block_mass"].sum(-1), torch.full_like(ref_blocks[..., 0], T_TEST))


@pytest.fixture(scope="module")
def gemma_ref():
    """Tiny Gemma3 (window 64) in eager mode, one input of T_TEST tokens, its eager column sums."""
    model, _ = load_model("tiny-gemma3", attn_implementation="eager")
    ids = _ids(1)
    return model, ids, eager_columns(model, ids)


def test_gemma3_sliding_window_is_exercised_and_exact(gemma_ref):
    model, ids, ref = gemma_ref
    windows = [cal.attention_window(layer.self_attn, i) for i, layer in enumerate(decoder_layers(model))]
    assert windows == [64, 64, 64, None] and 64 < T_TEST
    got = cal.attention_block_mass(model, ids, chunk_size=CHUNK, return_columns=True)["columns"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the window matters: late queries cannot see the first keys in sliding layers
    assert ref[0, 0, :, 0].max() < ref[0, 3, :, 0].max()


@pytest.mark.parametrize("shift", [-1, 1])
def test_off_by_one_window_is_detected(monkeypatch, gemma_ref, shift):
    """The comparison is sharp enough to tell window W from W +- 1."""
    model, ids, ref = gemma_ref
    real = cal.attention_window
    monkeypatch.setattr(cal, "attention_window", lambda attn, i: None if real(attn, i) is None else real(attn, i) + shift)
    got = cal.attention_block_mass(model, ids, chunk_size=CHUNK, return_columns=True)["columns"]
    assert not torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_gemma3_softcap_follows_transformers(monkeypatch, gemma_ref):
    """transformers' Gemma3 stores attn_logit_softcapping but does not apply it; neither do we."""
    model, ids, _ = gemma_ref
    for layer in decoder_layers(model):
        monkeypatch.setattr(layer.self_attn, "attn_logit_softcapping", 5.0)
    assert cal.attention_softcap(decoder_layers(model)[0].self_attn) is None
    got = cal.attention_block_mass(model, ids, chunk_size=CHUNK, return_columns=True)["columns"]
    torch.testing.assert_close(got, eager_columns(model, ids), rtol=1e-5, atol=1e-6)


def _dense_reference(q, k, scaling, window=None, softcap=None):
    B, H, T, hd = q.shape
    kk = k.repeat_interleave(H // k.shape[1], dim=1)  # [B, H, T, hd]
    s = (q @ kk.transpose(-1, -2)) * scaling  # [B, H, T, T]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    t = torch.arange(T)
    ok = t[None, :] <= t[:, None]
    if window is not None:
        ok &= t[None, :] > t[:, None] - window
    return torch.softmax(s.masked_fill(~ok, float("-inf")), -1).sum(-2).double()  # [B, H, T]


@pytest.mark.parametrize("window,softcap,chunk", [(None, None, 3), (None, None, 50), (16, None, 7),
                                                  (40, 3.0, 33), (300, None, 64), (5, None, 300)])
def test_kernel_matches_dense_reference(window, softcap, chunk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 150, 8, generator=g)
    k = torch.randn(2, 2, 150, 8, generator=g)
    got = cal.received_attention(q, k, 0.5, sliding_window=window, softcap=softcap, chunk_size=chunk)
    torch.testing.assert_close(got, _dense_reference(q, k, 0.5, window, softcap), rtol=1e-5, atol=1e-6)


def test_block_sums_partial_last_block():
    x = torch.arange(10.0).reshape(1, 10)
    assert cal.block_sums(x, 4).tolist() == [[6.0, 22.0, 17.0]]


def test_calibrate_end_to_end_and_identity():
    model, tok = load_model("tiny-llama")
    res = cal.calibrate(model, tok, n_samples=2, seq_len=256, chunk_size=100, progress=False)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert res.block_mass.shape == (2, L, H, 2)
    assert res.row_sum_error() < 1e-4  # fp32 rows, summed over 256 queries
    s = res.scores()
    share = res.first_block_share()
    assert len(s) == L and all(0 <= x <= 1 for x in share)
    for si, fi in zip(s, share):  # s_i = N - mass on block 1
        assert si == pytest.approx(256 * (1 - fi), rel=1e-6)
    assert res.mean_block_mass() == pytest.approx(s)  # one non-first block
    assert res.block_values(0).shape == (2,)
    info = res.calibration_info()
    assert info["fingerprint"] and info["n_samples"] == 2 and info["seq_len"] == 256
    json.dumps(res.summary())  # JSON-friendly
    assert {r["layer"] for r in cal.summary_table({"tiny-llama": res})} == set(range(L))


def test_short_samples_are_refused():
    model, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="two 128-token blocks"):
        cal.calibrate(model, tok, n_samples=1, seq_len=200, progress=False)
    with pytest.raises(ValueError, match="two"):
        nb02.CalibrationConfig(n_samples=1, seq_len=255)


def test_profile_configs_are_strict():
    cfg = nb02.calibration_config("smoke")
    assert cfg.seq_len >= 2 * cfg.block_size
    assert nb02.calibration_config("full").n_samples >= 1
    with pytest.raises(ValueError, match="unknown key"):
        nb02.CalibrationConfig.from_dict({"n_samples": 1, "seq_len": 256, "typo": 3})
    assert nb02.calibration_config("smoke", n_samples=3).n_samples == 3


# ----------------------------------------------------------------------------- window-aware importance
def test_sink_visible_queries_by_hand():
    # a query at t sees keys t-W+1 .. t: it reaches key 127 (block 1's last) iff t <= W + 126
    assert cal.sink_visible_queries(4096, 128, 512) == 639
    assert cal.sink_visible_queries(4096, 128, None) == 4096
    assert cal.sink_visible_queries(300, 128, 512) == 300


def _synthetic_calibration(sink_mass: list[float], windows: list[int | None], T: int = 512) -> cal.CalibrationResult:
    nb = T // 128
    mass = torch.zeros(1, len(sink_mass), 1, nb)  # [n, L, H, nb]
    for i, m in enumerate(sink_mass):
        mass[0, i, 0, 0] = m
        mass[0, i, 0, 1:] = (T - m) / (nb - 1)  # every row sums to 1: T in all
    return cal.CalibrationResult("synthetic", "fp", T, 128, 0, ("prose",), mass, windows)


def test_window_importance_by_hand():
    r = _synthetic_calibration([100.0, 100.0, 40.0], [None, 128, 128])
    lit, win = r.scores("literal"), r.scores("window")
    assert lit == pytest.approx([412.0, 412.0, 472.0])
    assert win[0] == pytest.approx(lit[0])  # full attention: the literal s_i
    n_vis = 128 + 127  # the queries of a 128-window layer that can see block 1
    assert win[1] == pytest.approx(512 * (1 - 100 / n_vis))
    assert win[2] == pytest.approx(512 * (1 - 40 / n_vis))
    assert win[1] < lit[1]  # the same sink mass spread over fewer eligible queries: more sink-bound
    info = r.calibration_info()
    assert info["s_i"] == pytest.approx(lit) and info["s_i_window"] == pytest.approx(win)
    with pytest.raises(ValueError, match="importance"):
        r.scores("paper")


def test_schedule_plans_differ_only_on_windowed_layers():
    full = _synthetic_calibration([100.0, 200.0, 300.0], [None, None, None])
    plans = nb02.schedule_plans(full, 0.5)
    assert plans["uniform"].densities == 0.5
    assert plans["literal"].densities == pytest.approx(plans["window"].densities)  # no window: same schedule
    mixed = _synthetic_calibration([100.0, 100.0, 300.0], [None, 128, None])
    plans = nb02.schedule_plans(mixed, 0.5)
    lit, win = plans["literal"].densities, plans["window"].densities
    assert lit[0] == pytest.approx(lit[1]) and win[1] < win[0]  # the window correction lowers layer 1's share
    assert sum(win) / 3 == pytest.approx(0.5) and sum(lit) / 3 == pytest.approx(0.5)
    assert {p.policy for p in plans.values()} == {"oracle"}


def _records(kls: list[float]) -> list[dict]:
    return [{"uid": f"w{i}", "task": "continuation", "metrics": {"kl": k, "nll": 2.0 + k, "dense_nll": 2.0}}
            for i, k in enumerate(kls)]


def test_schedule_kl_table_and_verdict():
    base = [0.10, 0.20, 0.15, 0.12, 0.18, 0.11, 0.16, 0.14]
    runs = {"dense": _records([0.0] * 8), "uniform @ 0.5": _records(base),
            "literal @ 0.5": _records([k + 0.05 for k in base]),  # clearly worse
            "window @ 0.5": _records([k + (0.01 if i % 2 else -0.01) for i, k in enumerate(base)])}  # a wash
    rows = nb02.schedule_kl_table(runs, "m", n_boot=500)
    by = {r["schedule"]: r for r in rows}
    assert by["uniform"]["kl"] == pytest.approx(sum(base) / 8, abs=1e-5)
    assert by["literal"]["kl_minus_uniform"] == pytest.approx(0.05, abs=1e-5)
    assert by["literal"]["kl_minus_uniform_ci"][0] > 0
    assert by["window"]["kl_minus_literal"] == pytest.approx(-0.05, abs=1e-5)
    assert by["literal"]["nll_increase"] == pytest.approx(by["literal"]["kl"], abs=1e-5)
    text = nb02.schedule_verdict(rows)
    assert "literal s_i" in text and "above uniform" in text
    assert "not resolved vs uniform" in text  # the window schedule's +-0.01 wash
    assert "lower" in text  # window minus literal resolves


def test_schedule_kl_settings_are_strict():
    assert nb02.schedule_kl_settings("full").ctx > 640  # long enough for a 512-token window to hide block 1
    with pytest.raises(ValueError, match="unknown key"):
        nb02.ScheduleKLSettings.from_dict({"windows_per_family": 1, "ctx": 8, "cont": 2, "typo": 1})
