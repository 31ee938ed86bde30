"""The README results block is generated from result files, never typed: rendering, replacement, CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ffcore import readme_results as RR

README = """# Title

Intro text that must survive.

## Results

<!-- results:start -->
old generated text 99.9
<!-- results:end -->

## Later section
"""


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    doc = {"provenance": {"profile": "full", "git_commit": "abc1234", "device": "CPU: test (2 cores)",
                          "created_utc": "2025-01-01T00:00:00+00:00"}, "rows": rows}
    (folder / f"{name}.json").write_text(json.dumps(doc))


def _acc(model: str, config: str, avg: float, gap: float, lo: float, hi: float) -> dict:
    return {"table": "table2", "model": model, "config": config, "average": avg, "average_ci_low": avg - 4.25,
            "average_ci_high": avg + 3.75, "rel_gap_pct": gap, "rel_gap_ci_low": lo, "rel_gap_ci_high": hi,
            "n_samples": 48}


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    _write(folder, "05_table2", [_acc("gemma3-270m", "dense", 61.37, 0.0, 0.0, 0.0),
                                 _acc("gemma3-270m", "50% sparsity", 58.91, -4.0086, -7.53, -1.12)])
    _write(folder, "05_task_selection", [{"model": "gemma3-270m", "task": "passkey", "score": 87.5, "ci_low": 62.5,
                                          "ci_high": 100.0, "chance": 0.0011, "n": 8, "kept": True},
                                         {"model": "gemma3-270m", "task": "classification", "score": 12.5,
                                          "ci_low": 0.0, "ci_high": 37.5, "chance": 20.0, "n": 8, "kept": False}])
    _write(folder, "06_comparisons", [{"model": "gemma3-270m", "reference": "layer-wise 50%", "other": "uniform 50%",
                                       "reference_avg": 58.91, "other_avg": 57.2, "rel_change_pct": -2.9,
                                       "ci_low": -6.1, "ci_high": 0.4, "resolved": False,
                                       "paper_expects": "worse", "agrees_with_paper": None}])
    return folder


def _numbers(text: str) -> set[float]:
    return {float(x) for x in re.findall(r"[-+]?\d+\.\d+", text)}


def test_render_copies_numbers_from_files(results: Path):
    text = RR.render(results)
    assert "58.9 [54.7, 62.7]" in text and "-4.01 [-7.5, -1.1]" in text and "0 (reference)" in text
    assert "87.5 [62.5, 100.0]" in text and "no (near chance)" in text
    assert "uniform 50% vs layer-wise 50%" in text and "| no | worse (not resolved) |" in text
    assert "profile `full`, commit `abc1234`" in text
    # missing tables are listed, not filled in
    assert "Not generated yet" in text and "`06_table4` (notebook `06_ablations`)" in text
    # every decimal number shown comes from a file (rounded): nothing invented
    source = set()
    for p in results.glob("*.json"):
        for row in json.loads(p.read_text())["rows"]:
            source |= {float(v) for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = _numbers(text)
    assert shown
    for x in shown:
        assert any(abs(x - s) <= 0.051 for s in source) or any(abs(x - round(s, 2)) < 1e-9 for s in source), x


def test_update_replaces_only_the_block(results: Path, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert RR.update_readme(readme, results) is True
    new = readme.read_text()
    assert new.startswith("# Title\n\nIntro text that must survive.\n") and new.endswith("## Later section\n")
    assert "old generated text" not in new and new.count(RR.START) == 1 and new.count(RR.END) == 1
    assert RR.update_readme(readme, results) is False  # idempotent
    assert RR.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    _write(results, "06_table4", [_acc("gemma3-270m", "uniform 50%", 57.2, -6.8, -9.0, -4.0)])
    assert RR.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == new  # --check never writes
    assert RR.main(["--results", str(results), "--readme", str(readme)]) == 0
    assert "57.2" in readme.read_text()


def test_bad_inputs(results: Path, tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert RR.main(["--results", str(results), "--readme", str(readme)]) == 2
    with pytest.raises(ValueError, match="exactly one"):
        RR.replace_block(README + RR.START, "x")
    (results / "05_table3.json").write_text(json.dumps({"provenance": {}}))
    with pytest.raises(ValueError, match="rows"):
        RR.render(results)
    assert RR._num(float("nan")) == "n/a" and RR._ci(None, 1.0) == "n/a"


def test_repository_readme_has_the_markers():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(RR.START) == 1 and text.count(RR.END) == 1


def test_speed_compensator_and_specprefill_tables():
    ffn = [{"model": "m", "T": 2048, "density": 0.5, "dense_ms": 126.3, "sparse_ms": 71.0, "speedup": 1.779,
            "ideal_speedup": 1.778, "fraction_of_ideal": 1.0, "load_1min": 1.2},
           {"model": "m", "T": 2048, "density": 0.7, "dense_ms": 1.0, "sparse_ms": 1.0, "speedup": 9.99,
            "ideal_speedup": 1.0, "fraction_of_ideal": 1.0, "load_1min": 0.0}]
    text = RR.ffn_speed_table(ffn)
    assert "126.3" in text and "9.99" not in text  # only the 50 % density rows
    ttft = [{"model": "m", "plan": "random experts", "T": 1024, "sparsity": 0.5, "dense_s": 2.41, "sparse_s": 2.0,
             "speedup": 1.205, "flop_speedup": 1.29}]
    assert "| m | random experts | 1024 | 50 | 2.41 | 2.00 | 1.21 | 1.29 |" in RR.ttft_table(ttft)
    comp = [{"model": "m", "source": "predictor", "density": 0.5, "compensator": "plain", "rel_err": 0.21,
             "reduction": 0.123, "corr_to_err": 0.3},
            {"model": "m", "source": "oracle", "density": 0.5, "compensator": "plain", "rel_err": 0.5,
             "reduction": 0.0, "corr_to_err": 0.0}]
    text = RR.compensator_table(comp)
    assert "12.3" in text and "0.5000" not in text  # predictor masks only


def test_heldout_kl_tables():
    rows = [{"model": "m", "variant": "predictor", "scope": "out of domain", "family": "all", "n": 20, "kl": 0.15617,
             "kl_first_block_static": 0.19277, "kl_oracle": 0.08703, "gap_closed": 0.3461,
             "gap_closed_ci": [0.0976, 0.5099], "kl_minus_fbs": -0.0366, "kl_minus_fbs_ci": [-0.07376, -0.00713]},
            {"model": "m", "variant": "predictor", "scope": "out of domain", "family": "legal", "n": 2, "kl": 9.0,
             "kl_first_block_static": 9.0, "kl_oracle": 9.0, "gap_closed": 0.0, "gap_closed_ci": [0.0, 0.0],
             "kl_minus_fbs": 0.0, "kl_minus_fbs_ci": [0.0, 0.0]}]
    text = RR.heldout_kl_table(rows)
    assert ("| m | predictor | out of domain | 0.1562 | 0.1928 | 0.0870 | 35 [10, 51] | -0.0366 [-0.0738, -0.0071] "
            "| 20 |") in text and "9.0000" not in text  # pooled rows only
    e2e = [{"model": "m", "config": "plain compensator", "scope": "in domain", "family": "all", "n": 8, "kl": 0.064,
            "kl_first_block_static": 0.108, "kl_oracle": 0.057, "gap_closed": 0.856, "gap_closed_ci": [0.6451, 1.164],
            "kl_minus_no_compensator": -0.0273, "kl_minus_no_compensator_ci": [-0.0425, -0.0145]}]
    text = RR.compensator_e2e_table(e2e)
    assert "minus no compensator" in text and "| 86 [65, 116] | -0.0273 [-0.0425, -0.0145] | 8 |" in text
    spec = [{"model": "m", "method": "dense", "keep_rate": None, "sparsity": None, "speculator": None,
             "flops_speedup": 1.0, "rel_nll_gap": 0.0, "n_samples": 4},
            {"model": "m", "method": "specprefill", "keep_rate": 0.3, "sparsity": None, "speculator": "first 8 layers",
             "flops_speedup": 1.808, "rel_nll_gap": 0.0371, "n_samples": 4}]
    text = RR.specprefill_table(spec)
    assert "specprefill keep 0.3 [first 8 layers] | 1.81 | +3.71 | 4" in text and "| dense |" not in text


def test_kl_and_specprefill_suite_tables():
    kl = [{"model": "m", "reference": "+ dense first & last", "other": "all blocks sparse", "reference_kl": 0.025,
           "other_kl": 0.0616, "kl_change_pct": 146.6, "ci_low": 90.1, "ci_high": 210.0, "resolved": True,
           "paper_expects": "worse", "agrees_with_paper": True}]
    assert ("| m | all blocks sparse vs + dense first & last | 0.0616 vs 0.0250 | +146.6 [+90.1, +210.0] | yes | "
            "worse (consistent) |") in RR.kl_comparison_table(kl)
    suite = [{"model": "m", "config": "dense", "method": "dense", "kept_fraction": 1.0, "flops_speedup": 1.0,
              "average": 50.0, "average_ci_low": 40.0, "average_ci_high": 60.0, "rel_gap_pct": 0.0,
              "rel_gap_ci_low": 0.0, "rel_gap_ci_high": 0.0, "n_samples": 20},
             {"model": "m", "config": "SpecPrefill p=0.5", "method": "specprefill", "kept_fraction": 0.51,
              "flops_speedup": 1.234, "average": 45.0, "average_ci_low": 35.0, "average_ci_high": 55.0,
              "rel_gap_pct": -10.0, "rel_gap_ci_low": -20.0, "rel_gap_ci_high": 1.5, "n_samples": 20}]
    text = RR.specprefill_suite_table(suite)
    assert "| m | dense | 1.00 | 1.00 | 50.0 [40.0, 60.0] | 0 (reference) | 20 |" in text
    assert "| m | SpecPrefill p=0.5 | 0.51 | 1.23 | 45.0 [35.0, 55.0] | -10.00 [-20.0, +1.5] | 20 |" in text
