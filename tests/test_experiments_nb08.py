"""Notebook 08's generated reading follows its numbers."""
from __future__ import annotations

from ffcore.experiments import nb08_specprefill as nb08


def test_nb08_headline_reading_follows_the_numbers() -> None:
    head = [{"model": "m", "specprefill_best": "SP p=0.3", "specprefill_flops_speedup": 1.8, "specprefill_rel_nll_gap_%": 3.7,
             "fastforward": "FF 50%", "fastforward_flops_speedup": 1.29, "fastforward_rel_nll_gap_%": 2.7,
             "combination_best": "SP p=0.5 + FF 50%", "combination_flops_speedup": 1.5, "combination_rel_nll_gap_%": 7.0,
             "specprefill_p0.5_first_rel_nll_gap_%": 3.6, "passkey_dense": "2/2"}]
    suite = [{"model": "m", "config": "dense", "rel_gap_pct": 0.0, "rel_gap_ci_low": 0.0, "rel_gap_ci_high": 0.0,
              "flops_speedup": 1.0},
             {"model": "m", "config": "FF 50%", "rel_gap_pct": -5.0, "rel_gap_ci_low": -9.0, "rel_gap_ci_high": -1.0,
              "flops_speedup": 1.3}]
    text = nb08.headline_reading(head, suite)
    assert "1.80x fewer FLOPs at +3.7 %" in text and "super-additive" in text  # 7.0 > 3.6 + 2.7
    assert "Suite, FF 50%: -5.0 % vs dense [-9.0, -1.0] (resolved" in text and "dense 2/2" in text


def test_nb08_reading_names_a_missing_relative_gap() -> None:
    suite = [{"model": "m", "config": "FF 50%", "rel_gap_pct": float("nan"), "rel_gap_ci_low": float("nan"),
              "rel_gap_ci_high": float("nan"), "flops_speedup": 1.3}]
    assert "no relative gap (the dense average is 0)" in nb08.headline_reading([{"model": "m"}], suite)
