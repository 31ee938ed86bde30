"""Timing: the interleaved helper on synthetic timings, and the measured prefill breakdown (tiny models)."""
from __future__ import annotations

import itertools

import pytest
import torch

from ffcore import timing
from ffcore.experiments import nb01_flops as nb01
from ffcore.models import load_model


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-gemma3")
    return model, tok


def _prompt(model, T):
    return torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))


def test_component_timer_measures_and_cleans_up(tiny):
    model, _ = tiny
    mods = timing.component_modules(model)
    assert len(mods["attention"]) == len(mods["mlp"]) == model.config.num_hidden_layers
    r = timing.timed_prefill(model, _prompt(model, 32))
    assert set(r) == {"attention", "mlp", "other", "total"}
    assert r["attention"] > 0 and r["mlp"] > 0 and r["total"] > 0
    assert r["attention"] + r["mlp"] + r["other"] == pytest.approx(r["total"])
    for m in mods["attention"] + mods["mlp"]:  # hooks removed after the pass
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_timing_records_shape_and_shares(tiny):
    model, tok = tiny
    cfg = nb01.TimingConfig(context_lengths=[16, 32, 10**6], repeats=2, warmup=0)
    rows = nb01.timing_records(model, cfg, _prompt(model, 32), name="tiny")
    assert {r["T"] for r in rows} == {16, 32}  # 10**6 exceeds max_position_embeddings
    for T in (16, 32):
        parts = {r["component"]: r for r in rows if r["T"] == T}
        assert set(parts) == {"attention", "mlp", "other", "total"}
        assert sum(parts[c]["share"] for c in timing.TIMED_COMPONENTS) == pytest.approx(1.0)
        assert parts["total"]["share"] == 1.0 and parts["total"]["repeats"] == 2
        assert all(r["model"] == "tiny" for r in parts.values())
    with pytest.raises(ValueError, match="prompt has"):
        nb01.timing_records(model, cfg, _prompt(model, 8))


def test_timing_config_profiles_and_strictness():
    full = nb01.timing_config("full")
    assert full.plan(512) == (full.warmup, full.repeats)
    assert full.plan(8192) == (full.long_warmup, full.long_repeats)
    assert nb01.timing_config("smoke").plan(128) == (1, 1)
    with pytest.raises(ValueError, match="unknown key"):
        nb01.TimingConfig.from_dict({"context_lengths": [64], "repeats": 1, "repeat": 2})
    with pytest.raises(ValueError, match="unknown profile"):
        nb01.timing_config("huge")


def test_interleaved_rotates_order_and_ratio_statistics(monkeypatch):
    """Synthetic timings: per-round ratios, their median and quartiles, wall and CPU ratios recorded apart."""
    wall = {"dense": [2.0, 2.2, 1.8, 2.0, 4.0], "sparse": [1.0, 1.0, 1.0, 1.0, 1.0]}  # one disturbed dense round
    cpu = {"dense": [2.0] * 5, "sparse": [1.0] * 5}
    order, clock_w, clock_c = [], [0.0], [0.0]
    calls = {"dense": iter(range(5)), "sparse": iter(range(5))}

    def make(name):
        def fn():
            i = next(calls[name])
            order.append(name)
            clock_w[0] += wall[name][i]
            clock_c[0] += cpu[name][i]
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock_w[0])
    monkeypatch.setattr(timing.time, "process_time", lambda: clock_c[0])
    rec = timing.interleaved({"dense": make("dense"), "sparse": make("sparse")}, repeats=5, warmup=0)
    assert order == ["dense", "sparse", "sparse", "dense", "dense", "sparse", "sparse", "dense", "dense", "sparse"]
    for name in wall:
        assert rec.wall_s[name] == pytest.approx(wall[name]) and rec.cpu_s[name] == pytest.approx(cpu[name])
    assert rec.repeats == 5
    r = timing.ratio(rec, "dense", "sparse")
    assert r["speedup_all"] == pytest.approx([2.0, 2.2, 1.8, 2.0, 4.0])
    assert r["speedup"] == pytest.approx(2.0)  # the median ignores the disturbed round; a mean would not
    assert (r["speedup_q25"], r["speedup_q75"]) == pytest.approx((2.0, 2.2))
    assert r["speedup_iqr"] == pytest.approx(0.2)
    assert r["cpu_speedup"] == pytest.approx(2.0)
    s = rec.summary("dense", unit=1e3, suffix="_ms")
    assert s["dense_ms"] == pytest.approx(2000.0) and s["dense_q75_ms"] == pytest.approx(2200.0)
    assert set(rec.conditions()) == {"repeats", "warmup", "threads", "load_1min", "load_1min_before"}


def test_quartiles_and_bad_input():
    assert timing.quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert timing.quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
    with pytest.raises(ValueError):
        timing.interleaved({}, repeats=1)
    with pytest.raises(ValueError):
        timing.interleaved({"a": lambda: None}, repeats=0)
    warm = itertools.count()
    rec = timing.interleaved({"a": lambda: next(warm)}, repeats=2, warmup=3, keep_results=True)
    assert rec.results["a"] == [3, 4]  # warm-up calls ran first and were not recorded
