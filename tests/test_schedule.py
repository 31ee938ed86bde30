"""Algorithm 1 (layer-wise density schedule): properties, bad input, and the schedule files."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ffcore import schedule as sch
from ffcore.experiments import nb02_calibration as nb02

scores_st = st.lists(st.floats(min_value=1e-3, max_value=1e4, allow_nan=False), min_size=1, max_size=40)
budget_st = st.floats(min_value=0.05, max_value=1.0)
FLOOR = 0.05


def _mean(x):
    return sum(x) / len(x)


# ---------------------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None)
@given(scores_st, budget_st)
def test_sorted_plan_preserves_mean_and_caps(scores, budget):
    plan = sch.layerwise_schedule(scores, budget, min_density=FLOOR)
    assert len(plan) == len(scores)
    assert all(FLOOR - 1e-12 <= b <= 1.0 for b in plan)
    assert _mean(plan) == pytest.approx(budget, rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(scores_st, budget_st)
def test_sorted_plan_is_monotone_in_scores(scores, budget):
    """A layer with a larger score never gets less density (the sorted walk is water-filling)."""
    plan = sch.layerwise_schedule(scores, budget, min_density=FLOOR)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert plan[i] >= plan[j] - 1e-9


@settings(max_examples=300, deadline=None)
@given(scores_st, budget_st)
def test_sorted_plan_is_water_filling(scores, budget):
    """The plan is clip(c * s_i, floor, 1) for one constant c."""
    plan = sch.layerwise_schedule(scores, budget, min_density=FLOOR)
    inner = [(b, s) for b, s in zip(plan, scores) if FLOOR + 1e-9 < b < 1 - 1e-9]
    if inner:
        c = inner[0][0] / inner[0][1]
        for b, s in zip(plan, scores):
            assert b == pytest.approx(min(1.0, max(FLOOR, c * s)), rel=1e-7, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1.0, 3.0), min_size=1, max_size=40), st.floats(0.15, 0.3), st.sampled_from(sch.ORDERS))
def test_no_cap_binding_gives_the_proportional_plan_in_any_order(scores, budget, order):
    """Where no cap (and no floor) binds, Algorithm 1 is b_i = B * L * s_i / S in any walk order."""
    L, S = len(scores), sum(scores)
    prop = [budget * L * s / S for s in scores]
    assume(max(prop) <= 1.0 and min(prop) >= FLOOR)
    for plan in (sch.algorithm1(scores, budget, order), sch.layerwise_schedule(scores, budget, FLOOR, order)):
        assert plan == pytest.approx(prop, rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(scores_st, budget_st)
def test_literal_layer_order_never_overspends(scores, budget):
    """The paper's walk in layer order respects caps and never exceeds the budget."""
    plan = sch.algorithm1(scores, budget, order="layer")
    assert all(0 <= b <= 1 for b in plan)
    assert sum(plan) <= budget * len(scores) * (1 + 1e-9)  # float rounding of the running totals


def test_literal_layer_order_counterexamples():
    """Documented failures of the layer-order walk when a cap binds (why we sort by score)."""
    under = sch.algorithm1([1, 3], 0.75, order="layer")  # budget left unspent
    assert under == pytest.approx([0.375, 1.0]) and _mean(under) < 0.75
    assert _mean(sch.algorithm1([1, 3], 0.75)) == pytest.approx(0.75)
    non_mono = sch.algorithm1([1, 4, 0.9], 0.8, order="layer")  # s=0.9 gets more than s=1
    assert non_mono[2] > non_mono[0]
    mono = sch.algorithm1([1, 4, 0.9], 0.8)
    assert mono[1] == 1.0 and mono[0] > mono[2] and _mean(mono) == pytest.approx(0.8)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e4), st.integers(1, 40), budget_st, st.sampled_from(sch.ORDERS))
def test_uniform_scores_give_the_uniform_plan(s, L, budget, order):
    plan = sch.layerwise_schedule([s] * L, budget, min_density=FLOOR, order=order)
    assert plan == pytest.approx(sch.uniform_schedule(L, budget), rel=1e-9)


def test_floor_and_zero_scores():
    plan = sch.layerwise_schedule([1.0, 0.001, 0.01, 2.0], 0.3, min_density=0.05)
    assert plan[1] == plan[2] == 0.05 and _mean(plan) == pytest.approx(0.3)
    assert sch.algorithm1([1.0, 0.0], 0.5) == [1.0, 0.0]  # no floor: a zero score gets nothing
    plan = sch.layerwise_schedule([1.0, 0.0], 0.5)
    assert plan == pytest.approx([0.95, 0.05])
    # degenerate: every positive layer capped, the rest goes to the zero-score layer
    assert sch.layerwise_schedule([1.0, 0.0], 0.9) == pytest.approx([1.0, 0.8])
    assert sch.layerwise_schedule([3.0, 1.0], 1.0) == [1.0, 1.0]
    assert sch.layerwise_schedule([3.0, 1.0], 0.05) == pytest.approx([0.05, 0.05])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e3)), min_size=1, max_size=20), budget_st)
def test_plans_with_zero_scores_keep_mean_caps_floor(scores, budget):
    assume(sum(scores) > 0)
    plan = sch.layerwise_schedule(scores, budget, min_density=FLOOR)
    assert all(FLOOR - 1e-12 <= b <= 1.0 for b in plan)
    assert _mean(plan) == pytest.approx(budget, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("budget", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        sch.layerwise_schedule([1.0, 2.0], budget)
    with pytest.raises(ValueError, match="budget"):
        sch.uniform_schedule(3, budget)


@pytest.mark.parametrize("scores,match", [([], "empty"), ([1.0, -1.0], "finite and >= 0"),
                                          ([1.0, float("nan")], "finite"), ([float("inf")], "finite"),
                                          ([0.0, 0.0], "all zero")])
def test_bad_scores(scores, match):
    with pytest.raises(ValueError, match=match):
        sch.layerwise_schedule(scores, 0.5)


def test_bad_floor_order_and_layers():
    with pytest.raises(ValueError, match="below the floor"):
        sch.layerwise_schedule([1.0, 2.0], 0.04, min_density=0.05)
    with pytest.raises(ValueError, match="min_density"):
        sch.layerwise_schedule([1.0, 2.0], 0.5, min_density=0.0)
    with pytest.raises(ValueError, match="order"):
        sch.algorithm1([1.0], 0.5, order="random")
    with pytest.raises(ValueError, match="n_layers"):
        sch.uniform_schedule(0, 0.5)


# ---------------------------------------------------------------------------- files
def _fake_calibration(model, key="tiny-llama"):
    from ffcore.calibration import CalibrationResult
    from ffcore.models import model_fingerprint

    L = model.config.num_hidden_layers
    mass = torch.rand(2, L, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mass = mass / mass.sum(-1, keepdim=True) * 384  # rows sum to 1: total mass per head = T
    return CalibrationResult(model=key, fingerprint=model_fingerprint(model), seq_len=384, block_size=128,
                             seed=0, sources=("prose", "code"), block_mass=mass, layer_windows=[None] * L)


def test_save_and_load_schedules(tmp_path, monkeypatch):
    from ffcore.models import load_model

    monkeypatch.setenv("FFCORE_ROOT", str(tmp_path))
    model, _ = load_model("tiny-llama")
    calib = _fake_calibration(model)
    path = nb02.save_schedules(calib, "smoke", budgets=(0.7, 0.5))
    assert path.name == "02_schedule_tiny-llama.json" and path.is_relative_to(tmp_path)
    plan = nb02.load_schedule(model, 0.5, "smoke")
    assert plan == pytest.approx(sch.layerwise_schedule(calib.scores(), 0.5))
    assert _mean(plan) == pytest.approx(0.5)
    # a budget not in the file is recomputed from the stored s_i; 1.0 is dense
    assert nb02.load_schedule(model, 0.6, "smoke") == pytest.approx(sch.layerwise_schedule(calib.scores(), 0.6))
    assert nb02.load_schedule(model, 1.0, "smoke") == [1.0] * len(plan)
    assert nb02.load_schedule("tiny-llama", 0.5, "smoke", fingerprint=calib.fingerprint) == plan
    with pytest.raises(ValueError, match="fingerprint"):
        nb02.load_schedule("tiny-llama", 0.5, "smoke")
    with pytest.raises(FileNotFoundError):
        nb02.load_schedule("tiny-gemma3", 0.5, "smoke", fingerprint="x")


def test_load_refuses_another_models_schedule(tmp_path, monkeypatch):
    from ffcore.models import load_model, tiny_model

    monkeypatch.setenv("FFCORE_ROOT", str(tmp_path))
    model, _ = load_model("tiny-llama")
    nb02.save_schedules(_fake_calibration(model), "smoke", budgets=(0.5,))
    other = tiny_model("llama", seed=1)  # same architecture and key, other weights
    other.ffcore_name = "tiny-llama"
    with pytest.raises(ValueError, match="calibrated on model 'tiny-llama' with fingerprint"):
        nb02.load_schedule(other, 0.5, "smoke")


def test_schedule_name_is_safe():
    assert nb02.schedule_name("gemma3-270m") == "02_schedule_gemma3-270m"
    assert nb02.schedule_name("/data/ckpt/Llama-3.1-8B/") == "02_schedule_Llama-3.1-8B"
    assert math.isclose(sch.schedule_summary([0.5, 1.0])["mean"], 0.75)


def test_plans_for_and_compare_orders():
    plans = sch.plans_for([1.0, 2.0, 3.0], (0.7, 0.5))
    assert set(plans) == {0.7, 0.5} and _mean(plans[0.5]) == pytest.approx(0.5)
    rows = sch.compare_orders([1, 4, 0.9], (0.8, 0.2))
    assert rows[0]["capped_layers"] == 1 and rows[0]["monotonicity_violations_layer_order"] == 1
    assert rows[1]["capped_layers"] == 0 and rows[1]["max_abs_diff"] == pytest.approx(0, abs=1e-12)
