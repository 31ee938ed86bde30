"""The measured prefill breakdown: hooks, medians, records (tiny models, random prompts: fast)."""
from __future__ import annotations

import pytest
import torch

from ffcore import timing
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
    cfg = timing.TimingConfig(context_lengths=[16, 32, 10**6], repeats=2, warmup=0)
    rows = timing.timing_records(model, tok, cfg, name="tiny", prompt=_prompt(model, 32))
    assert {r["T"] for r in rows} == {16, 32}  # 10**6 exceeds max_position_embeddings
    for T in (16, 32):
        parts = {r["component"]: r for r in rows if r["T"] == T}
        assert set(parts) == {"attention", "mlp", "other", "total"}
        assert sum(parts[c]["share"] for c in timing.TIMED_COMPONENTS) == pytest.approx(1.0)
        assert parts["total"]["share"] == 1.0 and parts["total"]["repeats"] == 2
        assert all(r["model"] == "tiny" for r in parts.values())
    with pytest.raises(ValueError, match="prompt has"):
        timing.timing_records(model, tok, cfg, prompt=_prompt(model, 8))


def test_timing_config_profiles_and_strictness():
    full = timing.timing_config("full")
    assert full.plan(512) == (full.warmup, full.repeats)
    assert full.plan(8192) == (full.long_warmup, full.long_repeats)
    assert timing.timing_config("smoke").plan(128) == (1, 1)
    with pytest.raises(ValueError, match="unknown key"):
        timing.TimingConfig.from_dict({"context_lengths": [64], "repeats": 1, "repeat": 2})
    with pytest.raises(ValueError, match="unknown profile"):
        timing.timing_config("huge")
