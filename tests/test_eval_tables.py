"""The accuracy tables of notebooks 05/06: configurations, plans, cache reuse, tabulation (tiny random models)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ffcore.engine.plan import SparsityPlan
from ffcore.evaluation import runner as R
from ffcore.evaluation.suite import SuiteConfig, build_suite
from ffcore.experiments import accuracy as T
from ffcore.experiments import nb05_accuracy as nb05
from ffcore.experiments import nb06_ablations as nb06
from ffcore.experiments.nb02_calibration import schedule_name
from ffcore.models import load_model, model_dims, model_fingerprint
from ffcore.predictor import ExpertPredictor
from ffcore.results import write_json
from ffcore.schedule import layerwise_schedule

TABLES = {**nb05.TABLES, **nb06.TABLES}  # notebook 05 runs Tables 2-3, notebook 06 Tables 4-7


def _owner(table):
    return nb05 if table in nb05.TABLES else nb06


def table_specs(table):
    return nb05.table_specs(table) if table in nb05.TABLES else nb06.table_specs(table)


def comparison_pairs(table):
    return _owner(table).comparison_pairs(table)


def run_table(table, *args):
    return _owner(table).run(table, *args)

FIELDS = ("sparsity", "schedule", "policy", "compensator", "dense_first", "dense_last", "dense_tail", "sparse_decode")


class FakeCompensator(nn.Module):
    """A tiny stand-in for ffcore.compensator.ErrorCompensator with the engine's interface."""

    def __init__(self, d: int, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((d,), scale))
        self.name = "fake-compensator"

    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x) + self.w


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture()
def comps(tiny, tmp_path, monkeypatch):
    """Components of tiny-llama with a random predictor, fake compensators and a schedule file in a temp root."""
    monkeypatch.setenv("FFCORE_ROOT", str(tmp_path))
    model, tok = tiny
    dims = model_dims(model)
    s_i = [float(i + 1) for i in range(dims["L"])]
    write_json(schedule_name("tiny-llama"), {
        "model": "tiny-llama", "fingerprint": model_fingerprint(model), "calibration": {"s_i": s_i, "s_i_window": s_i}, "importance": "window",
        "min_density": 0.05, "order": "sorted",
        "schedules": [{"budget": b, "densities": layerwise_schedule(s_i, b)} for b in (0.7, 0.6, 0.5)],
    }, "smoke")
    torch.manual_seed(0)
    pred = ExpertPredictor(dims["L"], dims["d"], dims["f"])
    return T.Components("tiny-llama", model, tok, "smoke", pred,
                        {"plain": FakeCompensator(dims["d"], 1e-3), "masked": FakeCompensator(dims["d"], 2e-3)})


@pytest.fixture(scope="module")
def suite(tiny):
    _, tok = tiny
    return build_suite(tok, SuiteConfig(n_per_task=1, context_tokens=(384,), tasks=("passkey", "continuation"),
                                        continuation_tokens=8, continuation_greedy=2))


# ------------------------------------------------------------------------------ configurations
@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_starts_dense_and_varies_one_factor(table):
    specs = table_specs(table)
    assert specs[0] == T.DENSE and specs[0].dense
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels)
    ref = T.method(0.5)
    for s in specs[1:]:
        diff = {f.replace("_first", "").replace("_last", "") for f in FIELDS if getattr(s, f) != getattr(ref, f)}
        assert len(diff) <= 1, (s.label, diff)  # the dense-block switches count as one factor (Table 5)
    if table == "table2":
        assert [s.sparsity for s in specs[1:]] == [0.3, 0.4, 0.5]
    else:  # every ablation contains the full method (the reference row shared with Table 2)
        same = [s for s in specs[1:] if all(getattr(s, f) == getattr(ref, f) for f in FIELDS)]
        assert len(same) == 1
    for ref_label, other, expect in comparison_pairs(table):
        assert {ref_label, other} <= set(labels) and expect in T.EXPECTATIONS


def test_table_factors():
    by = {t: {s.label: s for s in table_specs(t)} for t in TABLES}
    assert by["table3"]["50% prefill + generation"].sparse_decode
    assert by["table4"]["uniform 50%"].schedule == "uniform"
    t5 = by["table5"]
    assert (t5["all blocks sparse"].dense_first, t5["all blocks sparse"].dense_last) == (False, False)
    assert (t5["+ dense first"].dense_first, t5["+ dense first"].dense_last) == (True, False)
    assert by["table6"]["no compensator"].compensator is None
    assert by["table6"]["mask-conditioned compensator"].compensator == "masked"
    assert by["table7"]["per-block oracle"].policy == "oracle"
    assert by["table7"]["first-block static"].policy == "first_block_static"
    with pytest.raises(ValueError, match="unknown table"):
        nb05.table_specs("table9")
    with pytest.raises(ValueError, match="unknown table"):
        nb06.table_specs("table2")
    with pytest.raises(ValueError, match="schedule"):
        T.ConfigSpec("x", schedule="random")
    with pytest.raises(ValueError, match="compensator"):
        T.ConfigSpec("x", compensator="big")


def test_build_plan_for_every_configuration(comps):
    L = comps.n_layers
    for table in TABLES:
        for spec in table_specs(table):
            plan = T.build_plan(spec, comps)
            if spec.dense:
                assert plan is None
                continue
            assert isinstance(plan, SparsityPlan)
            if spec.schedule.startswith("layerwise"):
                assert isinstance(plan.densities, tuple) and len(plan.densities) == L  # plans are immutable
                assert sum(plan.densities) / L == pytest.approx(1 - spec.sparsity)
                assert len(set(plan.densities)) > 1  # really layer-wise
            else:
                assert plan.densities == pytest.approx(1 - spec.sparsity)
            assert (plan.policy is comps.predictor) == (spec.policy == "predictor")
            if spec.policy != "predictor":
                assert plan.policy == spec.policy
            assert plan.compensator is (comps.compensators.get(spec.compensator) if spec.compensator else None)
            assert (plan.dense_first, plan.dense_last, plan.dense_tail, plan.sparse_decode) == (
                spec.dense_first, spec.dense_last, spec.dense_tail, spec.sparse_decode)
    no_comp = dataclasses.replace(comps, compensators={})
    with pytest.raises(ValueError, match="compensator"):
        T.build_plan(T.method(0.5), no_comp)
    with pytest.raises(ValueError, match="predictor"):
        T.build_plan(T.method(0.5), dataclasses.replace(comps, predictor=None))


def test_schedule_of_another_model_is_refused(comps):
    other, tok = load_model("tiny-gemma3")
    other.ffcore_name = "tiny-llama"  # pretend: same key, different weights
    with pytest.raises(ValueError, match="fingerprint"):
        T.build_plan(T.method(0.5), dataclasses.replace(comps, model=other, tokenizer=tok))


def test_plan_key_names_the_weights(comps):
    """The cache key of a plan covers the weights of its predictor and compensator (no separate tag)."""
    plan = T.build_plan(T.method(0.5), comps)
    d = plan.describe()
    assert d["policy_id"].startswith("predictor@") and "@" in d["compensator"]
    bare = T.build_plan(T.method(0.5, policy="oracle", compensator=None), comps).describe()
    assert bare["policy_id"] is None and bare["compensator"] is None
    other = ExpertPredictor(comps.predictor.L, comps.predictor.d, comps.predictor.f)  # different random weights
    assert plan.replace(policy=other).key() != plan.key()
    assert plan.replace(compensator=comps.compensators["masked"]).key() != plan.key()
    assert plan.replace(seed=1).policy is plan.policy  # replace() shares trained objects, never copies them


# ------------------------------------------------------------------------------ running and caching
def test_run_table_is_incremental_and_shares_rows(comps, suite, tmp_path, monkeypatch):
    cfg = T.AccuracySettings(suite=SuiteConfig(), n_boot=200, run=R.RunConfig(progress=False))
    kept = {"tiny-llama": ["passkey", "continuation"]}
    calls = []
    real = R._run_row
    monkeypatch.setattr(R, "_run_row", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cache = tmp_path / "cache"
    t4 = run_table("table4", {"tiny-llama": comps}, {"tiny-llama": suite}, kept, cfg, cache)
    n_rows = len(suite)
    assert len(calls) == 3 * n_rows  # dense, layer-wise (= literal here), uniform
    assert [r["config"] for r in t4.rows] == ["dense", "layer-wise 50%", "uniform 50%", "layer-wise 50%, literal s_i"]
    for r in t4.rows:
        assert r["model"] == "tiny-llama" and r["table"] == "table4" and r["n_samples"] == n_rows
        assert 0 <= r["average"] <= 100 and r["average_ci_low"] <= r["average"] + 1e-9
    assert json.dumps(t4.rows[0]["rel_gap_pct"]) in ("0.0", "NaN")  # random model: dense may score 0
    lit = "layer-wise 50%, literal s_i"  # no windowed layer in the tiny model: the same plan as layer-wise (cached)
    assert {c["other"] for c in t4.comparisons} == {"uniform 50%", lit}
    assert [(c["reference"], c["other"], c["n"]) for c in t4.kl] == [("layer-wise 50%", "uniform 50%", 1),
                                                                     ("layer-wise 50%", lit, 1)]
    assert "uniform 50%" in T.kl_verdict(t4.kl)
    assert {r["config"] for r in t4.continuation} == {"dense", "layer-wise 50%", "uniform 50%", lit}
    assert {(r["config"], r["task"]) for r in t4.tasks} == {
        (c, t) for c in ("dense", "layer-wise 50%", "uniform 50%", lit) for t in ("passkey", "continuation")}

    per_sample = sum(r["time_s"] for name, recs in t4.records["tiny-llama"].items() for r in recs
                     if name != lit)  # the literal row's records are the layer-wise row's, counted once
    assert T.fresh_seconds(t4) == pytest.approx(per_sample, abs=0.2)
    calls.clear()
    again = run_table("table4", {"tiny-llama": comps}, {"tiny-llama": suite}, kept, cfg, cache)
    assert T.fresh_seconds(t4, again) == T.fresh_seconds(t4)  # the same cached runs count once
    assert calls == [] and json.dumps(again.rows) == json.dumps(t4.rows)  # everything from the cache

    # Table 6's reference row is the same plan as Table 4's layer-wise row: only the new rows run
    run_table("table6", {"tiny-llama": comps}, {"tiny-llama": suite}, kept, cfg, cache)
    assert len(calls) == 2 * n_rows
    assert {c.compensator is None for c in calls} == {True, False}

    # retrained predictor (new weights, same name): the predictor rows are recomputed
    calls.clear()
    torch.manual_seed(1)
    retrained = dataclasses.replace(comps, predictor=ExpertPredictor(comps.predictor.L, comps.predictor.d,
                                                                     comps.predictor.f))
    run_table("table4", {"tiny-llama": retrained}, {"tiny-llama": suite}, kept, cfg, cache)
    assert len(calls) == 2 * n_rows  # dense reused, both predictor rows recomputed

    # only kept tasks run: a task subset runs nothing new
    calls.clear()
    one = run_table("table4", {"tiny-llama": comps}, {"tiny-llama": suite}, {"tiny-llama": ["passkey"]}, cfg, cache)
    assert calls == [] and {r["n_tasks"] for r in one.rows} == {1} and not one.continuation and not one.kl
    with pytest.raises(ValueError, match="no task is kept"):
        run_table("table4", {"tiny-llama": comps}, {"tiny-llama": suite}, {"tiny-llama": []}, cfg, cache)


def test_cache_key_changes_with_the_plan_of_each_configuration(comps):
    fp = model_fingerprint(comps.model)
    keys = set()
    for table in TABLES:
        for spec in table_specs(table):
            plan = T.build_plan(spec, comps)
            keys.add((spec.label if spec.dense else None, R.config_key(fp, plan, "ffcore-local/1", 0)))
    distinct = {k for _, k in keys}
    # dense + Table 2 (3) + one new row in Table 3 + 1 (T4) + 2 (T5) + 2 (T6) + 2 (T7) = 12 distinct configurations,
    # + the literal-s_i schedule (T4) and the grid tail (T5); on the tiny model with no windowed layer the literal
    # schedule equals the window-aware one, so it shares its key
    assert len(distinct) == 13


# ------------------------------------------------------------------------------ tabulating
def _recs(task, scores, chance=0.1, prefix="", category="Synthetic"):
    return [{"uid": f"{task}{i}", "task": task, "category": category, "score": float(s), "chance": chance}
            for i, s in enumerate(scores)]


def test_accuracy_rows_scale_and_gap():
    dense = _recs("a", [1, 1, 1, 0]) + _recs("b", [0.5, 0.5], category="Code")
    sparse = _recs("a", [1, 1, 0, 0]) + _recs("b", [0.5, 0.5], category="Code")
    specs = [T.DENSE, T.method(0.5, "half")]
    rows = T.accuracy_rows("table2", "m", specs, {"dense": dense, "half": sparse}, ["a", "b"], n_boot=200)
    d, s = rows
    assert d["average"] == pytest.approx(100 * (0.75 + 0.5) / 2) and s["average"] == pytest.approx(50.0)
    assert s["rel_gap_pct"] == pytest.approx((50.0 - 62.5) / 62.5 * 100, abs=1e-3)
    assert s["cat:Code"] == 50.0 and s["task:a"] == 50.0 and s["n_samples"] == 6 and s["n_tasks"] == 2
    assert s["schedule"] == "layerwise" and d["policy"] == "dense" and s["compensator"] == "plain"
    text = nb05.gap_verdict(rows, 0.5, 3.0)
    assert "**m**" in text and "-20.00 %" in text and "outside" in text and "62.5" in text
    comp = T.comparisons("table7", "m", {"dense": dense, "half": sparse}, [("dense", "half")], ["a", "b"], n_boot=200)
    assert comp[0]["rel_change_pct"] == pytest.approx(-20.0) and comp[0]["other"] == "half"
    assert comp[0]["paper_expects"] == "none" and comp[0]["agrees_with_paper"] is None
    assert "worse" in T.comparison_verdict(comp)
    claims = T.comparisons("table7", "m", {"dense": dense, "half": sparse},
                           [("dense", "half", "worse"), ("dense", "half", "similar")], ["a", "b"], n_boot=200)
    assert claims[0]["agrees_with_paper"] is (True if claims[0]["resolved"] else None)
    assert claims[1]["agrees_with_paper"] is (not claims[1]["resolved"])
    assert "consistent" in T.comparison_verdict(claims) or "not resolved" in T.comparison_verdict(claims)
    with pytest.raises(ValueError, match="expectation"):
        T.comparisons("table7", "m", {"dense": dense, "half": sparse}, [("dense", "half", "bigger")], ["a"])
    frame = T.frame(rows)
    assert list(frame.index.names) == ["model", "config"] and "Code" in frame.columns


def test_choose_tasks_and_selection_rows():
    recs = _recs("good", [1, 1, 1, 0], chance=0.1) + _recs("floor", [0, 0, 0, 0], chance=0.1)
    sel = T.choose_tasks(recs, 0.15, n_boot=200)
    assert sel["kept"] == ["good"] and "floor" in sel["dropped"]
    everything = T.choose_tasks(recs, None, n_boot=200)  # smoke: keep all
    assert everything["kept"] == ["good", "floor"] and not everything["dropped"]
    rows = T.selection_rows({"m": sel})
    assert {r["task"]: r["kept"] for r in rows} == {"good": True, "floor": False}
    assert next(r for r in rows if r["task"] == "good")["score"] == 75.0 and rows[0]["chance"] == 10.0


def test_settings_and_selection_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FFCORE_ROOT", str(tmp_path))
    from ffcore.results import write_json

    s = T.settings("smoke")
    assert s.min_margin is None and s.ablation_models == ("tiny-llama",)
    full = T.settings("full")
    assert full.min_margin == 0.0 and full.select_by_ci and full.ablation_models == ("gemma3-270m",) and full.sparsities == (0.3, 0.4, 0.5)
    assert set(T.settings("full", all_ablation_models=True).ablation_models) == {"gemma3-270m", "smollm2-135m"}
    with pytest.raises(ValueError, match="unknown key"):
        T.AccuracySettings.from_dict({"suite": {}, "samples": 3})
    write_json("05_accuracy", {"suite": T.suite_description(s.suite), "kept_tasks": {"tiny-llama": ["passkey"]}},
               "smoke")
    assert T.load_selection("smoke", s) == {"tiny-llama": ["passkey"]}
    other = s.replace(suite=s.suite.replace(n_per_task=5))
    with pytest.raises(ValueError, match="n_per_task"):
        T.load_selection("smoke", other)


def test_charts(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from ffcore.plots import accuracy as A

    dense = _recs("a", [1, 1, 0, 0]) + _recs("b", [0.5, 0.7])
    sparse = _recs("a", [1, 0, 0, 0]) + _recs("b", [0.5, 0.5])
    rows = T.accuracy_rows("table2", "m", [T.DENSE, T.method(0.5, "half")], {"dense": dense, "half": sparse},
                           ["a", "b"], n_boot=200)
    fig = A.table_chart(rows + [dict(r, model="n") for r in rows], "title")
    assert len(fig.axes) == 2
    sel = T.selection_rows({"m": T.choose_tasks(dense, 0.15, n_boot=200)})
    assert len(A.selection_chart(sel).axes) == 1
    with pytest.raises(ValueError):
        A.table_chart([], "empty")
    json.dumps(rows)  # rows are JSON-serialisable


def test_agreement_with_the_paper_needs_a_resolved_interval():
    """'consistent' only when the interval excludes the opposite sign; an unresolved difference is 'not resolved'."""
    assert T.agrees_with_paper("worse", worse=True, resolved=True) is True
    assert T.agrees_with_paper("worse", worse=False, resolved=True) is False
    assert T.agrees_with_paper("worse", worse=True, resolved=False) is None  # right sign, interval includes 0
    assert T.agrees_with_paper("similar", worse=True, resolved=False) is True
    assert T.agrees_with_paper("similar", worse=True, resolved=True) is False
    assert T.agrees_with_paper("none", worse=True, resolved=True) is None
    assert T.paper_verdict("worse", None) == "not resolved" and T.paper_verdict("none", True) == ""
    rows = [{"model": "m", "other": "b", "reference": "a", "other_avg": 1.0, "reference_avg": 2.0,
             "rel_change_pct": -50.0, "ci_low": -90.0, "ci_high": 10.0, "resolved": False, "paper_expects": "worse",
             "agrees_with_paper": None}]
    assert "the paper found it worse: not resolved" in T.comparison_verdict(rows)


def test_kl_comparisons_and_verdict():
    def recs(kls):
        return [{"uid": f"c{i}", "task": "continuation", "metrics": {"kl": k}} for i, k in enumerate(kls)]
    results = {"+ dense first & last": recs([0.02, 0.03, 0.025]), "all blocks sparse": recs([0.06, 0.07, 0.05]),
               "+ dense first": recs([0.021, 0.029, 0.026]),
               "+ dense first & last (grid tail)": recs([0.022, 0.031, 0.024])}
    rows = T.kl_comparisons("table5", "m", results, comparison_pairs("table5"), n_boot=500)
    by = {(r["reference"], r["other"]): r for r in rows}
    worse = by[("+ dense first & last", "all blocks sparse")]
    assert worse["kl_change_pct"] > 100 and worse["resolved"] and worse["agrees_with_paper"] is True
    assert by[("+ dense first & last", "+ dense first")]["agrees_with_paper"] in (True, False, None)
    text = T.kl_verdict(rows)
    assert text.count("\n") == 3 and "further from dense" in text and "consistent" in text
    assert T.kl_comparisons("table5", "m", {k: [] for k in results}, comparison_pairs("table5")) == []
