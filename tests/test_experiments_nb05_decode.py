"""Notebook 05's decode-time sparsity diagnosis: plans, table and verdict (synthetic records; one tiny run)."""
from __future__ import annotations

import numpy as np
import pytest

from ffcore.experiments import nb05_accuracy as nb05
from ffcore.predictor import ExpertPredictor


def _recs(kl, nll, dense_nll=2.0):
    return [{"uid": f"w{i}", "task": "continuation",
             "metrics": {"kl": float(k), "nll": float(n), "dense_nll": dense_nll, "top1_agree": 0.9, "greedy_agree": 0.5}}
            for i, (k, n) in enumerate(zip(kl, nll))]


def _synthetic(n=12, seed=0):
    """Windows with a shared per-window difficulty; configs offset from it by known amounts."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.02, 0.06, n)
    noise = lambda s: rng.normal(0, s, n)  # noqa: E731
    kl = {
        "predictor, prefill only": base,
        "oracle, prefill only": base * 0.5,
        "predictor, token": base + 0.40 + noise(0.01),  # decode adds a lot
        "oracle, token": base * 0.5 + 0.30 + noise(0.01),
    }
    kl["first_block_static, token"] = kl["predictor, token"] + np.resize([0.05, -0.05], n)  # mean difference 0
    kl.update({
        "predictor, window": base + 0.10 + noise(0.01),  # clearly below the reference
        "predictor, reuse": base + 0.15 + noise(0.01),
    })
    runs = {label: _recs(v, 2.0 + 2 * v) for label, v in kl.items()}
    runs["dense"] = _recs(np.zeros(n), np.full(n, 2.0))
    return runs, kl


def test_plans_cover_every_configuration():
    pred = ExpertPredictor(2, 8, 16)
    plans = nb05.decode_diagnosis_plans(0.5, predictor=pred, block_size=32)
    assert list(plans) == [
        "dense", "predictor, prefill only", "oracle, prefill only", "first_block_static, prefill only",
        "predictor, token", "oracle, token", "first_block_static, token",
        "predictor, window", "oracle, window", "predictor, reuse", "oracle, reuse"]
    assert plans["dense"] is None
    for label, plan in plans.items():
        if plan is None:
            continue
        policy, context = label.split(", ")
        assert plan.sparse_decode == (context != "prefill only") and plan.block_size == 32
        assert plan.decode_context == (context if context in ("window", "reuse") else "token")
        assert plan.policy_name == policy and (plan.policy is pred) == (policy == "predictor")
    bare = nb05.decode_diagnosis_plans(0.5)  # no predictor: its rows are left out
    assert not any(k.startswith("predictor") for k in bare) and "oracle, reuse" in bare
    with pytest.raises(ValueError, match="decode_context"):
        nb05.decode_diagnosis_plans(0.5, contexts=("block",))
    with pytest.raises(ValueError, match="prefill_only"):
        nb05.decode_diagnosis_plans(0.5, prefill_only=("predictor",))


def test_table_means_and_paired_differences():
    runs, kl = _synthetic()
    rows = {r["config"]: r for r in nb05.decode_diagnosis_table(runs, model="m", n_boot=500)}
    assert "dense" not in rows and set(rows) == set(kl)
    for label, v in kl.items():
        r = rows[label]
        assert r["model"] == "m" and r["reference"] == "predictor, token" and r["n"] == 12
        assert r["kl"] == pytest.approx(v.mean(), abs=1e-12)
        assert r["nll"] == pytest.approx((2.0 + 2 * v).mean(), abs=1e-12)
        assert r["nll_change_pct"] == pytest.approx(((2.0 + 2 * v).mean() - 2.0) / 2.0 * 100)
        d = v - kl["predictor, token"]
        assert r["kl_diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert r["kl_diff_ci_low"] <= r["kl_diff"] <= r["kl_diff_ci_high"]
        assert r["nll_diff"] == pytest.approx(2 * d.mean(), abs=1e-12)
    ref = rows["predictor, token"]
    assert ref["kl_diff"] == 0 and ref["kl_diff_ci_low"] == 0 == ref["kl_diff_ci_high"]
    assert rows["predictor, window"]["kl_diff_ci_high"] < 0  # clearly below the reference
    fbs = rows["first_block_static, token"]
    assert fbs["kl_diff_ci_low"] < 0 < fbs["kl_diff_ci_high"]  # not resolved
    dk = rows["predictor, token"]["decode_kl"]
    assert dk == pytest.approx((kl["predictor, token"] - kl["predictor, prefill only"]).mean())
    assert rows["predictor, token"]["decode_kl_ci_low"] > 0
    assert rows["first_block_static, token"]["decode_kl"] is None  # no prefill-only run of that policy
    assert rows["oracle, prefill only"]["decode_kl"] is None


def test_reference_falls_back_and_is_checked():
    runs, _ = _synthetic()
    no_pred = {k: v for k, v in runs.items() if not k.startswith("predictor")}
    rows = nb05.decode_diagnosis_table(no_pred, n_boot=200)
    assert {r["reference"] for r in rows} == {"oracle, token"}
    with pytest.raises(KeyError, match="reference"):
        nb05.decode_diagnosis_table(runs, reference="magic, token", n_boot=200)


def test_verdict_reads_the_numbers():
    runs, kl = _synthetic()
    rows = nb05.decode_diagnosis_table(runs, model="m", n_boot=500)
    text = nb05.decode_diagnosis_verdict(rows)
    lines = text.splitlines()
    assert lines[0].startswith("- **m** (12 windows): per-token sparse decode")
    pt = next(x for x in rows if x["config"] == "predictor, token")
    assert f"predictor: {pt['decode_kl']:+.4f}" in lines[0] and "adds KL" in lines[0]
    window = next(line for line in lines if "predictor, window:" in line)
    assert "**below** the reference" in window
    fbs = next(line for line in lines if "first_block_static, token:" in line)
    assert "not resolved" in fbs
    assert "reference **predictor, token**" in text
    assert "lowest KL with sparse decode: **predictor, window**" in text and "resolved below the reference" in text
    r = next(x for x in rows if x["config"] == "predictor, window")
    assert f"KL {r['kl']:.4f}" in window  # the numbers shown are the rows'


def test_diagnosis_runs_through_the_runner_on_a_tiny_model():
    """End to end on a tiny model: sparse-decode rows differ from prefill-only, density 1 is dense."""
    from ffcore.evaluation.runner import RunConfig
    from ffcore.evaluation.suite import continuation_windows
    from ffcore.models import load_model

    model, tok = load_model("tiny-llama")
    windows = continuation_windows(tok, ["prose"], 2, 96, 8, greedy_tokens=4)
    plans = nb05.decode_diagnosis_plans(0.5, block_size=32, prefill_only=("oracle",))
    runs = nb05.decode_diagnosis_runs(model, tok, windows, plans, None, RunConfig(progress=False))
    rows = {r["config"]: r for r in nb05.decode_diagnosis_table(runs, n_boot=200)}
    assert rows["oracle, token"]["reference"] == "oracle, token"
    assert all(r["n"] == 2 and np.isfinite(r["kl"]) for r in rows.values())
    assert rows["oracle, token"]["kl"] != rows["oracle, prefill only"]["kl"]
    assert rows["oracle, window"]["kl"] != rows["oracle, token"]["kl"]
    full = nb05.decode_diagnosis_plans(1.0, block_size=32, prefill_only=("oracle",))
    dense_runs = nb05.decode_diagnosis_runs(model, tok, windows, {k: full[k] for k in ("oracle, window", "oracle, reuse")},
                                            None, RunConfig(progress=False))
    for recs in dense_runs.values():
        assert all(r["metrics"]["kl"] < 1e-6 for r in recs)


def test_decode_settings_validate_and_windows_are_tagged_by_domain():
    cfg = nb05.decode_settings("smoke")
    assert cfg.sparsity == 0.5 and cfg.prefill_only == ("predictor", "oracle")
    with pytest.raises(ValueError, match="sparsity"):
        nb05.DecodeSettings(1, 64, 8, sparsity=1.0)
    with pytest.raises(ValueError, match="bogus"):
        nb05.DecodeSettings.from_dict({"windows_per_family": 1, "ctx": 64, "cont": 8, "bogus": 1})
    from ffcore.evaluation.suite import window_family
    from ffcore.experiments.nb03_predictor import settings as s03
    from ffcore.models import load_model

    _, tok = load_model("tiny-llama")
    windows = nb05.decode_windows(tok, nb05.DecodeSettings(1, 96, 8), "smoke")
    s3 = s03("smoke")
    assert sorted(window_family(w) for w in windows) == sorted(s3.families)
    assert all(w["out_of_domain"] == (window_family(w) in s3.held_out) for w in windows)
    assert any(w["out_of_domain"] for w in windows) and not all(w["out_of_domain"] for w in windows)


def test_restrict_runs_keeps_the_named_windows():
    runs, _ = _synthetic(6)
    sub = nb05.restrict_runs(runs, {"w0", "w3"})
    assert set(sub) == set(runs) and all([r["uid"] for r in recs] == ["w0", "w3"] for recs in sub.values())
    rows = nb05.decode_diagnosis_table(sub, model="m", n_boot=200)
    assert all(r["n"] == 2 for r in rows)


def test_decode_context_chart_draws_one_point_per_configuration():
    runs, _ = _synthetic()
    rows = nb05.decode_diagnosis_table(runs, model="m", n_boot=200)
    rows += [{**r, "model": "n"} for r in rows]
    from ffcore.plots.accuracy import decode_context_chart
    fig = decode_context_chart(rows)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_yticklabels()) == len(rows) // 2
    import matplotlib.pyplot as plt
    plt.close(fig)
