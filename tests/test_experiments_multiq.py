"""Notebook 05's multi-question machinery (`ffcore.experiments.accuracy`) on a tiny random model."""
from __future__ import annotations

import pytest

from ffcore.experiments import accuracy as A
from ffcore.models import load_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model, tok = load_model("tiny-llama")
    comps = A.Components("tiny-llama", model, tok, "smoke")
    cfg = A.multiq_settings("smoke", tasks=("kv_retrieval", "needle"))
    items = A.build_multiq_items(tok, cfg)
    specs = [A.DENSE, A.ConfigSpec("oracle 50%", sparsity=0.5, schedule="uniform", policy="oracle", compensator=None)]
    return A.run_multiq(comps, specs, items, cfg, tmp_path_factory.mktemp("cache")), cfg


def test_rows_pair_every_question_and_resample_contexts(runs):
    runs, cfg = runs
    rows = A.multiq_rows("tiny-llama", runs, n_boot=200)
    by = {(r["config"], r["task"]): r for r in rows}
    n = cfg.n_items * cfg.n_questions
    assert by[("dense", "kv_retrieval")]["questions"] == n and by[("dense", "all")]["questions"] == 2 * n
    assert by[("dense", "all")]["items"] == 2 * cfg.n_items
    assert "gold_prob_rel_ci" not in by[("dense", "all")]  # the reference has no gap to itself
    sparse = by[("oracle 50%", "all")]
    lo, hi = sparse["gold_prob_rel_ci"]
    assert lo <= sparse["gold_prob_rel_gap_pct"] <= hi
    assert 0 < sparse["gold_prob"] <= 100 and sparse["gold_nll_diff"] != 0.0  # density 0.5 changes the model


def test_power_and_verdict(runs):
    runs, cfg = runs
    rows = A.multiq_rows("tiny-llama", runs, n_boot=200)
    power = A.multiq_power("tiny-llama", runs, "oracle 50%", cfg.half_width_pct)
    pooled = next(p for p in power if p["task"] == "all")
    assert pooled["pilot_items"] == 2 * cfg.n_items and pooled["gold_prob_items_needed"] >= 2
    text = A.multiq_verdict(rows, power)
    assert "oracle 50%" in text and "contexts" in text and "Power" in text


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown multi-question task"):
        A.MultiQSettings(tasks=("trivia",))
    with pytest.raises(ValueError, match="share"):
        A.MultiQSettings(share="none")
    with pytest.raises(ValueError, match="unknown key"):
        A.multiq_settings("smoke", typo=1)
