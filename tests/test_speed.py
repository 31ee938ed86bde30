"""Notebook 07's experiment code on tiny models: record shapes, FLOP bookkeeping, GPU-file reading."""
from __future__ import annotations

import json

import pytest
import torch

from ffcore import flops
from ffcore.experiments import nb07_speed as speed
from ffcore.models import gated_mlps, tiny_model
from ffcore.engine.plan import SparsityPlan


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=0)
    model.ffcore_name = "tiny-llama"
    return model, None


def test_settings_profiles():
    assert speed.settings("smoke").ffn_tokens == (256, 512)
    assert max(speed.settings("full").ttft_tokens) == 4096
    with pytest.raises(ValueError):
        speed.settings("nope")


def test_ffn_records_carry_ideal_and_load(tiny):
    model, _ = tiny
    cfg = speed.SpeedSettings(ffn_tokens=(256,), ffn_densities=(0.5,), ffn_repeats=1)
    rows = speed.ffn_records({"tiny": gated_mlps(model)[0]}, cfg, progress=False)
    assert len(rows) == 1
    r = rows[0]
    assert r["ideal_speedup"] == pytest.approx(flops.ffn_ideal_speedup(256, r["k"] / r["f"]))
    assert r["speedup"] > 0 and r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert "load_1min" in r


def test_flop_curves_layerwise_equals_uniform_for_a_flat_schedule(tiny):
    model, _ = tiny
    spec = flops.spec_from_model(model)
    flat = {spec.name: {0.5: [0.5] * spec.L}}
    rows = speed.flop_curve_records([spec], flat, [256, 1024])
    lw = {r["T"]: r["speedup"] for r in rows if r["sparsity"] == 0.5 and r["schedule"] == "layer-wise"}
    un = {r["T"]: r["speedup"] for r in rows if r["sparsity"] == 0.5 and r["schedule"] == "uniform"}
    assert lw == pytest.approx(un) and set(lw) == {256, 1024}
    # overheads cost FLOPs; the paper's three sparsity levels are always present
    assert all(r["speedup"] <= r["speedup_no_overheads"] for r in rows)
    assert {r["sparsity"] for r in rows} == set(flops.PAPER_SPARSITIES)
    # a schedule for another model is not used for this one
    other = speed.flop_curve_records([spec], {"someone-else": {0.5: [0.5] * spec.L}}, [256])
    assert {r["schedule"] for r in other} == {"uniform"}


def test_ttft_records_match_flop_model(tiny):
    model, _ = tiny
    prompt = torch.randint(0, 250, (1, 512))
    plans = {"random experts": lambda sp: SparsityPlan(densities=1.0 - sp, policy="random")}
    rows = speed.ttft_records(model, "tiny-llama", prompt, plans, [(384, 0.5)], repeats=1, progress=False)
    (r,) = rows
    want = flops.plan_speedup(flops.spec_from_model(model), 384, SparsityPlan(0.5), overheads=False)
    assert r["flop_speedup"] == pytest.approx(want["speedup"])
    assert r["dense_s"] > 0 and r["sparse_s"] > 0
    with pytest.raises(ValueError, match="prompt has"):
        speed.ttft_records(model, "tiny-llama", prompt, plans, [(1024, 0.5)], repeats=1, progress=False)


def test_gpu_results_and_summary(tmp_path):
    assert speed.gpu_results(tmp_path) == []
    (tmp_path / "gpu_ffn_bench.json").write_text(json.dumps({"device": "NVIDIA H100", "rows": [{"T": 4096}]}))
    assert speed.gpu_results(tmp_path) == [{"T": 4096, "device": "NVIDIA H100", "file": "gpu_ffn_bench.json"}]
    ffn = [{"model": "m", "T": 2048, "density": 0.5, "speedup": 1.6, "ideal_speedup": 1.78, "fraction_of_ideal": 0.9}]
    ttft = [{"model": "m", "plan": "p", "T": 2048, "sparsity": 0.5, "speedup": 1.1, "flop_speedup": 1.2,
             "fraction_of_flop_speedup": 1.1 / 1.2}]
    rows = speed.summary(ffn, ttft, T=2048, density=0.5)
    assert [r["what"] for r in rows] == ["FFN module", "TTFT (p)"]
