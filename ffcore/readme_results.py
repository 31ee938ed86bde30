"""Regenerate the README's results section from `results/*.json`: `python -m ffcore.readme_results`.

The block between `<!-- results:start -->` and `<!-- results:end -->` in README.md is replaced
by Markdown tables rendered from the JSON tables the notebooks wrote (`ffcore.results.write_table`
files, `{"provenance": ..., "rows": [...]}`). Every number in the block is copied from a file
(only rounded for display); a table whose file is missing is listed as not generated yet, never
filled in. `--check` exits 1 when the README is out of date (for CI), without writing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

START = "<!-- results:start -->"
END = "<!-- results:end -->"

Row = Mapping[str, Any]


def _num(x: Any, digits: int = 1, signed: bool = False) -> str:
    """A number from a result file, rounded for display ('n/a' for missing/NaN)."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(float(x)):
        return "n/a"
    return f"{float(x):+.{digits}f}" if signed else f"{float(x):.{digits}f}"


def _ci(lo: Any, hi: Any, digits: int = 1, signed: bool = False) -> str:
    a, b = _num(lo, digits, signed), _num(hi, digits, signed)
    return "n/a" if "n/a" in (a, b) else f"[{a}, {b}]"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ renderers
def accuracy_table(rows: Sequence[Row]) -> str:
    """An accuracy table (notebooks 05/06): model, configuration, average [CI], relative gap to dense [CI], n."""
    body = []
    for r in rows:
        gap = "0 (reference)" if r.get("config") == "dense" else (
            f"{_num(r.get('rel_gap_pct'), 2, True)} {_ci(r.get('rel_gap_ci_low'), r.get('rel_gap_ci_high'), 1, True)}")
        body.append([r.get("model", "?"), r.get("config", "?"),
                     f"{_num(r.get('average'))} {_ci(r.get('average_ci_low'), r.get('average_ci_high'))}",
                     gap, str(r.get("n_samples", "?"))])
    return _md_table(["model", "configuration", "average (0-100) [95 % CI]", "rel. gap to dense, % [95 % CI]",
                      "samples"], body)


def selection_table(rows: Sequence[Row]) -> str:
    """Task selection (notebook 05): the dense score of every task beside its chance level."""
    body = [[r.get("model", "?"), r.get("task", "?"), f"{_num(r.get('score'))} {_ci(r.get('ci_low'), r.get('ci_high'))}",
             _num(r.get("chance"), 2), str(r.get("n", "?")), "yes" if r.get("kept") else "no (near chance)"]
            for r in rows]
    return _md_table(["model", "task", "dense score [95 % CI]", "chance", "samples", "kept"], body)


def _paper(r: Row) -> str:
    """What the paper found for a comparison, and whether our result agrees ('-' when it made no claim)."""
    expect, agree = r.get("paper_expects", "none"), r.get("agrees_with_paper")
    if expect in (None, "none"):
        return "-"
    return f"{expect} ({'not resolved' if agree is None else 'consistent' if agree else 'not consistent'})"


def _pair_table(rows: Sequence[Row], values: str, change: str, digits: tuple[int, int], header: Sequence[str]) -> str:
    """Comparison rows (other vs reference): the two `other_/reference_<values>`, the `change` with its CI, verdicts."""
    body = [[r.get("model", "?"), f"{r.get('other', '?')} vs {r.get('reference', '?')}",
             f"{_num(r.get(f'other_{values}'), digits[0])} vs {_num(r.get(f'reference_{values}'), digits[0])}",
             f"{_num(r.get(change), digits[1], True)} {_ci(r.get('ci_low'), r.get('ci_high'), 1, True)}",
             "yes" if r.get("resolved") else "no", _paper(r)] for r in rows]
    return _md_table(["model", "comparison", *header, "CI excludes 0", "paper found"], body)


def comparison_table(rows: Sequence[Row]) -> str:
    """Paired comparisons of the ablations (notebook 06): other vs reference, relative change [CI]."""
    return _pair_table(rows, "avg", "rel_change_pct", (1, 2), ["averages", "rel. change, % [95 % CI]"])


def kl_comparison_table(rows: Sequence[Row]) -> str:
    """The ablation pairs judged by the continuation task's KL to dense (notebook 06): lower = closer to dense."""
    return _pair_table(rows, "kl", "kl_change_pct", (4, 1), ["KL to dense", "KL change, % [95 % CI]"])


def heldout_kl_table(rows: Sequence[Row], what: str = "variant", versus: str = "kl_minus_fbs",
                     versus_label: str = "minus first-block static [95 % CI]") -> str:
    """Notebooks 03/04: continuation KL on held-out windows (all families pooled) beside first-block static and the oracle."""
    body = [[r.get("model", "?"), str(r.get(what, "?")), str(r.get("scope", "?")), _num(r.get("kl"), 4),
             _num(r.get("kl_first_block_static"), 4), _num(r.get("kl_oracle"), 4),
             f"{_num(None if r.get('gap_closed') is None else 100 * r['gap_closed'], 0)} "
             f"{_ci(*[None if x is None else 100 * x for x in (r.get('gap_closed_ci') or (None, None))], 0)}",
             f"{_num(r.get(versus), 4, True)} {_ci(*(r.get(f'{versus}_ci') or (None, None)), 4, True)}",
             str(r.get("n", "?"))]
            for r in rows if r.get("family") == "all"]
    return _md_table(["model", what, "windows", "KL to dense", "first-block static", "per-block oracle",
                      "gap closed, % [95 % CI]", versus_label, "n"], body)


def compensator_e2e_table(rows: Sequence[Row]) -> str:
    """Notebook 04: the deployed predictor with each compensator, held-out continuation KL (all families pooled)."""
    return heldout_kl_table(rows, "config", "kl_minus_no_compensator", "minus no compensator [95 % CI]")


def compensator_table(rows: Sequence[Row]) -> str:
    """Notebook 04's layer-mean FFN-output error at 50 % density with predictor masks, per compensator."""
    body = [[r.get("model", "?"), str(r.get("scope", "-")), str(r.get("compensator", "?")), _num(r.get("rel_err"), 4),
             _num(None if r.get("reduction") is None else 100 * r["reduction"], 1), _num(r.get("corr_to_err"), 3)]
            for r in rows if r.get("source") == "predictor" and isinstance(r.get("density"), (int, float))
            and abs(r["density"] - 0.5) < 1e-9]
    return _md_table(["model", "blocks", "compensator", "relative FFN-output error", "error reduction, %",
                      "correction / error norm"], body)


def ffn_speed_table(rows: Sequence[Row]) -> str:
    """Notebook 07's measured CPU FFN-module speedup at 50 % density beside the FLOP-ideal one."""
    body = [[r.get("model", "?"), str(r.get("T", "?")), _num(r.get("dense_ms"), 1), _num(r.get("sparse_ms"), 1),
             _num(r.get("speedup"), 2), _num(r.get("ideal_speedup"), 2), _num(r.get("fraction_of_ideal"), 2),
             _num(r.get("load_1min"), 1)]
            for r in rows if isinstance(r.get("density"), (int, float)) and abs(r["density"] - 0.5) < 1e-9]
    return _md_table(["model", "T", "dense ms", "sparse ms", "speedup", "FLOP-ideal", "fraction of ideal",
                      "load avg"], body)


def ttft_table(rows: Sequence[Row]) -> str:
    """Notebook 07's measured CPU time-to-first-token, dense vs a FastForward plan, beside the FLOP model."""
    body = [[r.get("model", "?"), str(r.get("plan", "?")), str(r.get("T", "?")),
             _num(None if r.get("sparsity") is None else 100 * r["sparsity"], 0), _num(r.get("dense_s"), 2),
             _num(r.get("sparse_s"), 2), _num(r.get("speedup"), 2), _num(r.get("flop_speedup"), 2)] for r in rows]
    return _md_table(["model", "plan", "T", "sparsity %", "dense s", "sparse s", "measured speedup",
                      "FLOP-model speedup"], body)


def specprefill_table(rows: Sequence[Row]) -> str:
    """Notebook 08's configurations: compute-bound speedup and continuation-NLL gap to dense."""
    def label(r: Row) -> str:
        parts = [str(r.get("method", "?"))]
        if r.get("keep_rate") is not None:
            parts.append(f"keep {r['keep_rate']}")
        if r.get("sparsity") is not None:
            parts.append(f"sparsity {r['sparsity']}")
        if r.get("speculator"):
            parts.append(f"[{r['speculator']}]")
        return " ".join(parts)

    body = [[r.get("model", "?"), label(r), _num(r.get("flops_speedup"), 2),
             _num(None if r.get("rel_nll_gap") is None else 100 * r["rel_nll_gap"], 2, True), str(r.get("n_samples", "?"))]
            for r in rows if r.get("method") != "dense"]
    return _md_table(["model", "configuration", "FLOP speedup", "continuation NLL vs dense, %", "samples"], body)


def specprefill_suite_table(rows: Sequence[Row]) -> str:
    """Notebook 08 on the local suite: kept tokens, compute-bound speedup, average score and gap to dense [CI]."""
    body = [[r.get("model", "?"), str(r.get("config", "?")), _num(r.get("kept_fraction"), 2),
             _num(r.get("flops_speedup"), 2), f"{_num(r.get('average'))} {_ci(r.get('average_ci_low'), r.get('average_ci_high'))}",
             "0 (reference)" if r.get("method") == "dense" else
             f"{_num(r.get('rel_gap_pct'), 2, True)} {_ci(r.get('rel_gap_ci_low'), r.get('rel_gap_ci_high'), 1, True)}",
             str(r.get("n_samples", "?"))] for r in rows]
    return _md_table(["model", "configuration", "kept tokens", "FLOP speedup", "average (0-100) [95 % CI]",
                      "rel. gap to dense, % [95 % CI]", "samples"], body)


@dataclasses.dataclass(frozen=True)
class Section:
    """One table of the results block: its result file, heading, renderer and the notebook that writes it."""

    name: str
    title: str
    render: Callable[[Sequence[Row]], str]
    notebook: str
    rows_key: str = "rows"  # the list of rows inside the file (write_table: 'rows')


def schedule_kl_table(rows: Sequence[Row]) -> str:
    """Notebook 02: continuation KL of the uniform / literal-s_i / window-aware schedules, oracle experts."""
    body = []
    for r in rows:
        vs_u = ("reference" if r.get("schedule") == "uniform" else
                f"{_num(r.get('kl_minus_uniform'), 4, True)} {_ci(*(r.get('kl_minus_uniform_ci') or (None, None)), 4, True)}")
        vs_l = (f"{_num(r.get('kl_minus_literal'), 4, True)} {_ci(*(r.get('kl_minus_literal_ci') or (None, None)), 4, True)}"
                if "kl_minus_literal" in r else "")
        body.append([r.get("model", "?"), _num(r.get("budget"), 1), r.get("schedule", "?"), _num(r.get("kl"), 4),
                     vs_u, vs_l, str(r.get("n", "?"))])
    return _md_table(["model", "density", "schedule", "KL to dense", "minus uniform [95 % CI]",
                      "window minus literal [95 % CI]", "windows"], body)


SECTIONS: tuple[Section, ...] = (
    Section("02_attention_sink_calibration", "Layer-wise schedules by continuation KL, oracle experts (paper Table 4's "
            "question; window-aware vs the paper's literal s_i)", schedule_kl_table, "02_attention_sink_calibration",
            rows_key="schedule_kl"),
    Section("03_predictor_kl", "Expert predictor on held-out windows at 50 % density: continuation KL to dense, "
            "out of domain = families left out of training (paper Table 7's question)", heldout_kl_table,
            "03_predictor_training"),
    Section("04_compensator_comparison", "Error compensator on held-out blocks, predictor masks, 50 % density "
            "(paper Table 6, offline)", compensator_table, "04_compensator_training"),
    Section("04_compensator_e2e", "Full method on held-out windows, 50 % density: continuation KL per compensator "
            "(paper Table 6's question, end to end)", compensator_e2e_table, "04_compensator_training"),
    Section("05_task_selection", "Local suite: dense score vs chance per task", selection_table, "05_accuracy"),
    Section("05_table2", "Accuracy vs FFN sparsity (paper Table 2)", accuracy_table, "05_accuracy"),
    Section("05_table3", "Sparsity in prefill only vs also in generation (paper Table 3)", accuracy_table, "05_accuracy"),
    Section("06_table4", "Layer-wise vs uniform schedule (paper Table 4)", accuracy_table, "06_ablations"),
    Section("06_table5", "Which blocks stay dense (paper Table 5)", accuracy_table, "06_ablations"),
    Section("06_table6", "Error compensator (paper Table 6)", accuracy_table, "06_ablations"),
    Section("06_table7", "Expert selection (paper Table 7)", accuracy_table, "06_ablations"),
    Section("06_comparisons", "Ablations: paired comparisons", comparison_table, "06_ablations"),
    Section("06_kl_comparisons", "Ablations judged by the continuation task's KL to the dense model (lower = closer)",
            kl_comparison_table, "06_ablations"),
    Section("07_ffn_bench_cpu", "FFN module on CPU, 50 % density: measured vs FLOP-ideal speedup (paper Fig. 6)",
            ffn_speed_table, "07_speedups"),
    Section("07_ttft_cpu", "Time to first token on CPU, dense vs FastForward", ttft_table, "07_speedups"),
    Section("08_specprefill_suite", "SpecPrefill, FastForward and their combination on the local suite",
            specprefill_suite_table, "08_specprefill"),
    Section("08_specprefill_summary", "SpecPrefill, FastForward and their combination: continuation NLL",
            specprefill_table, "08_specprefill"),
)


def _load(path: Path, rows_key: str = "rows") -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get(rows_key), list):
        raise ValueError(f"{path} has no {rows_key!r} list of rows (ffcore.results.write_table writes 'rows')")
    return doc


def _provenance(doc: Mapping[str, Any]) -> str:
    p = doc.get("provenance", {})
    return (f"profile `{p.get('profile', '?')}`, commit `{p.get('git_commit', '?')}`, {p.get('device', '?')}, "
            f"{p.get('created_utc', '?')}")


def render(results_dir: Path | str, sections: Sequence[Section] = SECTIONS) -> str:
    """The Markdown of the results block (without the markers) from the JSON tables in `results_dir`."""
    results_dir = Path(results_dir)
    parts = [
        "<!-- generated by `python -m ffcore.readme_results` from results/*.json; do not edit by hand -->",
        "Scores are on a 0-100 scale; intervals are 95 % percentile bootstraps over samples (paired for gaps "
        "and comparisons). Our samples per task are few, so the intervals are wide: read a difference whose "
        "interval includes 0 as *not resolved*, not as a tie.",
    ]
    missing = []
    for sec in sections:
        path = results_dir / f"{sec.name}.json"
        if not path.exists():
            missing.append(f"`{sec.name}` (notebook `{sec.notebook}`)")
            continue
        doc = _load(path, sec.rows_key)
        parts.append(f"### {sec.title}\n\n{sec.render(doc[sec.rows_key])}\n\n<sub>`results/{sec.name}.json`: "
                     f"{_provenance(doc)}</sub>")
    if missing:
        parts.append("Not generated yet: " + ", ".join(missing) + ".")
    return "\n\n".join(parts)


def replace_block(text: str, block: str) -> str:
    """`text` with the content between the results markers replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain exactly one {START} followed by one {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def update_readme(readme: Path | str, results_dir: Path | str, check: bool = False) -> bool:
    """Rewrite the results block of `readme` from `results_dir`; return True if it changed (check: do not write)."""
    readme = Path(readme)
    text = readme.read_text()
    new = replace_block(text, render(results_dir))
    if new != text and not check:
        readme.write_text(new)
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: rewrite README.md's results block (exit 1 with --check when it is out of date)."""
    p = argparse.ArgumentParser(prog="python -m ffcore.readme_results", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("results"), help="folder of result JSON files")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="README to update")
    p.add_argument("--check", action="store_true", help="only report whether the README is out of date")
    args = p.parse_args(argv)
    try:
        changed = update_readme(args.readme, args.results, check=args.check)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.readme}: results block is {'OUT OF DATE' if changed else 'up to date'}")
        return int(changed)
    print(f"{args.readme}: results block {'updated' if changed else 'unchanged'} from {args.results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
