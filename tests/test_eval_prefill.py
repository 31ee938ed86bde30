"""Prefill methods in the evaluation runner: SpecPrefill through `evaluate`, and notebook 08's suite table."""
from __future__ import annotations

import pytest
import torch

from ffcore.evaluation import runner as R
from ffcore.experiments import nb08_specprefill as ST
from ffcore.evaluation.prefill import FULL, SpecPrefillMethod, kept_ranges, ranges_to_positions
from ffcore.evaluation.suite import SuiteConfig, build_suite
from ffcore.experiments.accuracy import Components
from ffcore.models import load_model, model_fingerprint
from ffcore.engine.plan import SparsityPlan
from ffcore.specprefill import SpecPrefillConfig, layer_prefix_view, specprefill_flops

QUIET = R.RunConfig(progress=False, max_new_tokens_cap=6)
SP = SpecPrefillConfig(lookahead=2)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def tiny(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def suite(tiny):
    _, tok = tiny
    cfg = SuiteConfig(n_per_task=1, context_tokens=(768,), continuation_tokens=12, continuation_greedy=4,
                      code_max_new_tokens=6)
    return build_suite(tok, cfg)


def test_kept_ranges_roundtrip():
    pos = torch.tensor([0, 1, 2, 5, 6, 9])
    assert kept_ranges(pos) == [[0, 3], [5, 7], [9, 10]]
    assert ranges_to_positions(kept_ranges(pos)).tolist() == pos.tolist()
    assert ranges_to_positions([]).numel() == 0


def test_keep_rate_one_reproduces_the_full_prefill_through_the_runner(tiny, suite):
    model, tok = tiny
    full = R.evaluate(model, tok, suite, None, None, config=QUIET)
    spec = R.evaluate(model, tok, suite, None, None, config=QUIET,
                      method=SpecPrefillMethod(layer_prefix_view(model, 1), 1.0, SP, name="first 1"))
    for a, b in zip(full, spec):
        assert a["uid"] == b["uid"] and b["kept_tokens"] == a["n_prompt_tokens"]
        assert a["new_ids"] == b["new_ids"]  # same greedy tokens: decoding continues at the original positions
        if a["task"] == "continuation":
            for k in ("nll", "kl", "top1_agree"):
                assert b["metrics"][k] == pytest.approx(a["metrics"][k], abs=2e-4), k


def test_dropping_tokens_changes_the_result_and_is_cached_separately(tiny, suite):
    model, tok = tiny
    fp = model_fingerprint(model)
    view = layer_prefix_view(model, 1)
    shared: dict = {}
    half = SpecPrefillMethod(view, 0.5, SP, name="first 1", scores_cache=shared)
    most = SpecPrefillMethod(view, 0.75, SP, name="first 1", scores_cache=shared)
    keys = {R.config_key(fp, None, "s", 0, prefill=m.key) for m in (FULL, half, most)}
    keys.add(R.config_key(fp, None, "s", 0, prefill=SpecPrefillMethod(view, 0.5, SP.replace(keep_last=False)).key))
    assert len(keys) == 4
    assert R.config_key(fp, None, "s", 0, prefill=FULL.key) == R.config_key(fp, None, "s", 0)
    recs = R.evaluate(model, tok, suite, None, None, config=QUIET, method=half)
    assert all(r["kept_tokens"] < r["n_prompt_tokens"] for r in recs)
    assert all(r["n_prompt_tokens"] - 1 in ranges_to_positions(r["kept_ranges"]).tolist() for r in recs)
    again = R.evaluate(model, tok, suite, None, None, config=QUIET, method=most)  # scores reused across keep rates
    assert all(r["speculator_s"] == 0.0 for r in again) and all(r["speculator_s"] > 0 for r in recs)
    cont = [r for r in recs if r["task"] == "continuation"]
    assert cont and cont[0]["metrics"]["kl"] > 0  # compared with the dense reference, not with itself


def test_the_combination_runs_sparse_on_the_kept_tokens(tiny, suite):
    model, tok = tiny
    rows = [r for r in suite if r["task"] == "continuation"]
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=64)
    meth = SpecPrefillMethod(layer_prefix_view(model, 1), 0.5, SP, name="first 1")
    alone = R.evaluate(model, tok, rows, None, None, config=QUIET, method=meth)
    combo = R.evaluate(model, tok, rows, plan, None, config=QUIET, method=meth)
    assert combo[0]["kept_ranges"] == alone[0]["kept_ranges"]  # the speculator runs dense inside sparsify
    assert combo[0]["metrics"]["nll"] != alone[0]["metrics"]["nll"]


def test_suite_specs_and_flops(tiny):
    model, tok = tiny
    specs = ST.suite_specs([0.3, 0.5], [0.5], same_model_keep_rates=[0.5], no_last_keep_rates=[0.5],
                           combos=[[0.5, 0.5]])
    assert [s.method for s in specs] == ["dense", "fastforward", "specprefill", "specprefill", "specprefill",
                                         "specprefill, last chunk not forced", "specprefill+fastforward"]
    with pytest.raises(ValueError, match="keep_rate"):
        ST.TokenDropSpec("bad", keep_rate=1.5)
    with pytest.raises(ValueError, match="speculator"):
        ST.TokenDropSpec("bad", keep_rate=0.5, speculator="other")
    sps = ST.Speculators.of(model, 0.5)
    from ffcore.flops import spec_from_model

    main = spec_from_model(model)
    rec = {"n_prompt_tokens": 256, "kept_ranges": [[0, 64], [200, 256]]}
    got = ST.record_flops(rec, main, specs[3], sps, 2)
    want = specprefill_flops(main, 256, ranges_to_positions(rec["kept_ranges"]), sps.specs["first"], 2)
    assert got == want and got["kept_tokens"] == 120
    dense = ST.record_flops({"n_prompt_tokens": 256}, main, specs[0], sps, 2)
    assert dense["speedup"] == pytest.approx(1.0)
    plan = SparsityPlan(densities=0.5, policy="oracle", block_size=64)
    ff = ST.record_flops({"n_prompt_tokens": 256}, main, specs[1], sps, 2, plan)
    assert ff["speedup"] > 1.0 and ff["speculator_flops"] == 0


def test_run_suite_table_on_a_tiny_model(tiny, suite):
    model, tok = tiny
    comps = Components("tiny", model, tok, "smoke")  # no trained artifacts: dense and SpecPrefill rows only
    specs = ST.suite_specs([0.5], [], no_last_keep_rates=[0.5])
    tasks = sorted(set(suite["task"]))
    res = ST.run_suite_table(comps, suite, tasks, specs, 0.5, SP, None, QUIET, n_boot=200)
    by = {r["config"]: r for r in res.rows}
    assert by["dense"]["flops_speedup"] == pytest.approx(1.0) and by["dense"]["kept_fraction"] == 1.0
    if by["dense"]["average"] > 0:  # a random tiny model may score 0 everywhere: the relative gap is then undefined
        assert by["dense"]["rel_gap_pct"] == 0
    sp = by["SpecPrefill p=0.5"]
    assert 0.4 < sp["kept_fraction"] < 0.7 and sp["speculator"].startswith("first") and sp["speculator_share"] > 0
    assert sp["n_samples"] == len(suite) and sp["average_ci_low"] <= sp["average"] <= sp["average_ci_high"]
    assert set(res.records) == {s.label for s in specs}
    with pytest.raises(ValueError, match="dense"):
        ST.run_suite_table(comps, suite, tasks, specs[1:], 0.5, SP, None, QUIET)


def test_suite_pareto_draws_intervals_and_skips_undefined_gaps():
    from ffcore.plots import specprefill as spplots

    base = {"model": "m", "speculator": "first 2 layers", "keep_rate": None, "sparsity": None}
    rows = [
        {**base, "method": "dense", "flops_speedup": 1.0, "rel_gap_pct": 0.0, "rel_gap_ci_low": 0.0, "rel_gap_ci_high": 0.0},
        {**base, "method": "specprefill", "keep_rate": 0.5, "flops_speedup": 1.3, "rel_gap_pct": -5.0,
         "rel_gap_ci_low": -12.0, "rel_gap_ci_high": 1.0},
        {**base, "method": "fastforward", "sparsity": 0.5, "flops_speedup": 1.2, "rel_gap_pct": float("nan"),
         "rel_gap_ci_low": float("nan"), "rel_gap_ci_high": float("nan")},
    ]
    fig = spplots.pareto(rows, gap_key="rel_gap_pct", scale=-1.0, ci_keys=("rel_gap_ci_high", "rel_gap_ci_low"),
                         ylabel="loss (%)")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo < -1.0 and hi >= 12.0  # the interval [-1, 12] (loss = -gap) is inside the axes
    assert ax.get_ylabel() == "loss (%)"


def test_answer_kept_and_retrieval_rows():
    class Tok:  # a whitespace tokenizer with offsets
        def __call__(self, text, return_offsets_mapping=False):
            import re
            spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
            return {"input_ids": list(range(len(spans))), "offset_mapping": spans}

    row = {"uid": "u", "task": "passkey", "prompt": "a b 123 c d 123 e", "answers": ["123"]}
    assert ST.answer_kept(row, {"score": 1.0}, Tok()) == 1.0  # a full prefill keeps everything
    assert ST.answer_kept(row, {"kept_ranges": [[0, 2], [6, 7]]}, Tok()) == 0.0  # both copies (tokens 2, 5) dropped
    assert ST.answer_kept(row, {"kept_ranges": [[5, 7]]}, Tok()) == 1.0  # the second copy is enough
    recs = {"dense": [{"uid": "u", "task": "passkey", "score": 1.0}],
            "sp": [{"uid": "u", "task": "passkey", "score": 0.0, "kept_ranges": [[0, 2]]}]}
    rows = ST.retrieval_rows("m", [row], recs, Tok())
    assert [(r["config"], r["score"], r["answer_kept"]) for r in rows] == [("dense", 100.0, 1.0), ("sp", 0.0, 0.0)]


def test_last_chunk_rows():
    specs = ST.suite_specs([0.5], [], no_last_keep_rates=[0.5])
    recs = {"SpecPrefill p=0.5": [{"uid": "a", "n_prompt_tokens": 100, "kept_ranges": [[0, 32], [64, 100]]},
                                  {"uid": "b", "n_prompt_tokens": 100, "kept_ranges": [[0, 64], [96, 100]]}],
            "SpecPrefill p=0.5, last chunk not forced": [
                {"uid": "a", "n_prompt_tokens": 100, "kept_ranges": [[0, 32], [64, 100]]},
                {"uid": "b", "n_prompt_tokens": 100, "kept_ranges": [[0, 64], [99, 100]]}]}
    (row,) = ST.last_chunk_rows("m", specs, recs, chunk_size=32)
    assert row["compared_with"] == "SpecPrefill p=0.5" and row["prompts"] == 2
    assert row["same_selection_as_forced"] == 1 and row["last_chunk_kept_on_its_score"] == 1
