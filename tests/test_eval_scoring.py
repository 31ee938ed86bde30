"""Scores, relative gaps, bootstrap intervals and the chance-level task filter, on synthetic records."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ffcore.evaluation import scoring as S


def _recs(task: str, scores, chance: float = 0.0, category: str = "C", prefix: str = ""):
    return [{"uid": f"{prefix}{task}{i}", "task": task, "category": category, "score": float(s), "chance": chance}
            for i, s in enumerate(scores)]


def test_bootstrap_ci_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 100, 1000):
        x = rng.random(n)
        lo, hi = S.bootstrap_mean_ci(x, n_boot=2000, seed=1)
        assert lo <= x.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert S.bootstrap_mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)  # degenerate: zero width


def test_task_table_average_and_categories():
    recs = _recs("a", [1, 0, 1, 0], 0.25, "X") + _recs("b", [1, 1], 0.5, "X") + _recs("c", [0.2, 0.4], 0.0, "Y")
    rows = {r["task"]: r for r in S.task_table(recs)}
    assert rows["a"]["score"] == 0.5 and rows["a"]["chance"] == 0.25 and rows["a"]["n"] == 4
    assert rows["a"]["ci_low"] <= 0.5 <= rows["a"]["ci_high"]
    assert S.average_score(recs) == pytest.approx((0.5 + 1.0 + 0.3) / 3)  # mean over tasks, not samples
    assert S.average_score(recs, tasks=["a", "b"]) == pytest.approx(0.75)
    assert S.category_scores(recs) == pytest.approx({"X": 0.75, "Y": 0.3})


def test_paired_gap():
    rng = np.random.default_rng(0)
    dense = _recs("a", rng.random(30)) + _recs("b", rng.random(20))
    same = S.paired_gap(dense, dense)
    assert same["rel_gap_pct"] == 0.0 and same["rel_gap_ci"] == (0.0, 0.0)  # paired: no shared noise
    sparse = [dict(r, score=0.9 * r["score"]) for r in dense]
    gap = S.paired_gap(dense, sparse)
    assert gap["rel_gap_pct"] == pytest.approx(-10.0)
    assert gap["rel_gap_ci"][0] == pytest.approx(-10.0) and gap["rel_gap_ci"][1] == pytest.approx(-10.0)
    noisy = [dict(r, score=r["score"] * 0.9 + rng.normal(0, 0.05)) for r in dense]
    g = S.paired_gap(dense, noisy)
    assert g["rel_gap_ci"][0] <= g["rel_gap_pct"] <= g["rel_gap_ci"][1]
    # only samples present in both configurations are compared
    partial = S.paired_gap(dense, sparse[:10])
    assert partial["n_pairs"] == {"a": 10}
    with pytest.raises(ValueError, match="no task"):
        S.paired_gap(dense, _recs("z", [1.0]))


def test_summarize_table2_style():
    dense = _recs("a", [1, 1, 0, 0], category="Synthetic") + _recs("b", [0.5, 0.7], category="Code")
    sparse = _recs("a", [1, 0, 0, 0], category="Synthetic") + _recs("b", [0.5, 0.5], category="Code")
    rows = {r["config"]: r for r in S.summarize({"dense": dense, "50%": sparse})}
    assert rows["dense"]["rel_gap_pct"] == 0.0
    assert rows["dense"]["average"] == pytest.approx(0.55)
    assert rows["50%"]["average"] == pytest.approx(0.375)
    assert rows["50%"]["rel_gap_pct"] == pytest.approx((0.375 - 0.55) / 0.55 * 100)
    assert rows["50%"]["cat:Code"] == 0.5 and rows["50%"]["task:a"] == 0.25
    assert rows["50%"]["rel_gap_ci_low"] <= rows["50%"]["rel_gap_pct"] <= rows["50%"]["rel_gap_ci_high"]
    assert rows["50%"]["average_ci_low"] <= 0.375 <= rows["50%"]["average_ci_high"]
    restricted = S.summarize({"dense": dense, "50%": sparse}, tasks=["b"])
    assert restricted[1]["average"] == 0.5
    with pytest.raises(KeyError):
        S.summarize({"50%": sparse})


def test_select_tasks_by_chance_level():
    recs = (_recs("good", [1, 1, 1, 0], chance=0.25) + _recs("floor", [0, 0, 1, 0], chance=0.2)
            + _recs("code", [0.5, 0.45], chance=0.3))
    sel = S.select_tasks(recs, min_margin=0.15)
    assert sel.kept == ["good", "code"]
    assert set(sel.dropped) == {"floor"} and "chance" in sel.dropped["floor"]
    assert {r["task"]: r["kept"] for r in sel.table} == {"good": True, "floor": False, "code": True}
    strict = S.select_tasks(recs, min_margin=0.3)
    assert strict.kept == ["good"]
    with_ci = S.select_tasks(recs, min_margin=0.15, use_ci=True)  # CI low end of 'good' is 0.25: not enough
    assert "good" not in with_ci.kept
    # the interval rule with no margin: kept only when the CI's low end lies strictly above chance
    ci0 = S.select_tasks(recs + _recs("sure", [1, 1, 1, 1, 1, 1], chance=0.2), min_margin=0.0, use_ci=True)
    assert "sure" in ci0.kept and "floor" not in ci0.kept
    assert "good" not in ci0.kept  # its interval reaches down to chance (0.25)


def test_continuation_table():
    def rec(nll, dnll, kl):
        return {"task": "continuation", "metrics": {"nll": nll, "dense_nll": dnll, "kl": kl, "top1_agree": 1.0,
                                                    "greedy_agree": 1.0, "greedy_prefix": 1.0, "token_acc": 0.5}}
    rows = S.continuation_table({"dense": [rec(2.0, 2.0, 0.0)], "sparse": [rec(2.2, 2.0, 0.1)]})
    assert rows[1]["nll_change_pct"] == pytest.approx(10.0) and rows[1]["kl"] == 0.1


def test_paired_metric_change():
    def recs(kls, prefix=""):
        return [{"uid": f"c{i}", "task": "continuation", "metrics": {"kl": k}} for i, k in enumerate(kls)] + [
            {"uid": "p0", "task": "passkey", "metrics": {}}]
    c = S.paired_metric_change(recs([0.1, 0.2, 0.3]), recs([0.2, 0.4, 0.6]), n_boot=500)
    assert c["n"] == 3 and c["rel_change_pct"] == pytest.approx(100.0)
    assert c["ci"][0] == pytest.approx(100.0) and c["ci"][1] == pytest.approx(100.0)  # every resample doubles
    noisy = S.paired_metric_change(recs([0.1, 0.2, 0.3]), recs([0.05, 0.4, 0.3]), n_boot=500)
    assert noisy["ci"][0] < noisy["rel_change_pct"] < noisy["ci"][1]
    with pytest.raises(ValueError, match="shared"):
        S.paired_metric_change(recs([0.1]), [{"uid": "x", "task": "continuation", "metrics": {"kl": 0.1}}])


def test_paired_difference_and_gap_closed_on_known_data():
    """Synthetic KLs: baseline 0.10, method 0.04, oracle 0.02 on every sample -> 75 % of the gap closed exactly."""
    def recs(values):
        return [{"uid": f"u{i}", "task": "continuation", "metrics": {"kl": v}} for i, v in enumerate(values)]
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, 40)
    base, meth, orc = recs(0.10 + noise), recs(0.04 + noise), recs(0.02 + noise)  # paired: the same noise
    g = S.gap_closed(base, meth, orc, n_boot=500)
    assert g["closed"] == pytest.approx(0.75) and g["ci"][0] == pytest.approx(0.75) and g["ci"][1] == pytest.approx(0.75)
    d = S.paired_difference(base, meth, n_boot=500)
    assert d["diff"] == pytest.approx(-0.06) and d["ci"][1] < 0 and d["n"] == 40
    unpaired = S.paired_difference(base, recs(0.10 + rng.normal(0, 0.01, 40)), n_boot=500)
    assert unpaired["ci"][0] < 0 < unpaired["ci"][1]  # no real difference: the interval includes 0
    with pytest.raises(ValueError, match="shared"):
        S.paired_difference(base, [{"uid": "x", "task": "continuation", "metrics": {"kl": 0.0}}])


# ----------------------------------------------------------------------------- clustered gaps and the power calculation
def _multiq_records(values, per_item: int) -> list[dict]:
    return [{"uid": f"i{i // per_item}/q{i % per_item}", "item_uid": f"i{i // per_item}", "gold_nll": 0.0, "v": float(v)}
            for i, v in enumerate(values)]


def test_gold_probability_by_hand():
    assert S.gold_probability({"gold_nll": 0.0}) == pytest.approx(100.0)
    assert S.gold_probability({"gold_nll": math.log(2)}) == pytest.approx(50.0)


def test_clustered_gap_by_hand_and_resamples_items():
    ref = _multiq_records([50, 50, 50, 50, 60, 60, 60, 60], per_item=4)
    oth = _multiq_records([45, 45, 45, 45, 57, 57, 57, 57], per_item=4)
    g = S.clustered_gap(ref, oth, lambda r: r["v"], n_boot=400)
    assert g["n"] == 8 and g["clusters"] == 2
    assert g["diff"] == pytest.approx(-4.0)
    assert g["rel_gap_pct"] == pytest.approx((408 / 440 - 1) * 100)
    # only two clusters: every bootstrap draw is one of {i0,i0}, {i0,i1}, {i1,i1}: the interval spans -5 .. -3
    assert g["ci"][0] == pytest.approx(-5.0) and g["ci"][1] == pytest.approx(-3.0)


def test_clusters_needed_matches_the_known_variance():
    rng = np.random.default_rng(0)
    m, k, mu, sigma = 4000, 4, 50.0, 10.0  # per-record paired noise sd sigma, items of k questions
    dense = [mu] * (m * k)
    sparse = list(mu + rng.normal(0, sigma, m * k))
    p = S.clusters_needed(_multiq_records(dense, k), _multiq_records(sparse, k), lambda r: r["v"], 3.0)
    # cluster totals: A = k mu, B - R A ~ N(0, k sigma^2): m = (1.96 * 100 * sqrt(k) sigma / (k mu * 3))^2
    expect = (1.959964 * 100 * math.sqrt(k) * sigma / (k * mu * 3.0)) ** 2
    assert p["clusters_needed"] == pytest.approx(expect, rel=0.05)
    assert p["half_width_pct_now"] == pytest.approx(1.959964 * 100 * sigma / (mu * math.sqrt(m * k)), rel=0.05)
    # and the bootstrap interval of a run of that size is about +-3 points wide
    n_items = p["clusters_needed"]
    g = S.clustered_gap(_multiq_records(dense[: n_items * k], k), _multiq_records(sparse[: n_items * k], k),
                         lambda r: r["v"], n_boot=2000)
    assert (g["rel_ci"][1] - g["rel_ci"][0]) / 2 == pytest.approx(3.0, rel=0.2)
    with pytest.raises(ValueError):
        S.clusters_needed(_multiq_records(dense[:4], 4), _multiq_records(sparse[:4], 4), lambda r: r["v"])
