"""The official-format LongBench runner on a hand-written fixture, with the byte-level tiny tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffcore.evaluation import longbench as LB
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.models import load_model, tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()  # one token per byte, no BOS: token counts are character counts for ASCII


def _first(name: str) -> dict:
    return json.loads((FIXTURE / f"{name}.jsonl").read_text().splitlines()[0])


def test_tables_cover_the_english_datasets():
    english = {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
               "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"}
    for table in (LB.DATASET2PROMPT, LB.DATASET2MAXLEN, LB.DATASET2METRIC, LB.DATASET2CATEGORY):
        assert set(table) == english
    assert set(LB.DATASET2CATEGORY.values()) == set(LB.CATEGORIES)
    assert LB.DATASET2MAXLEN["gov_report"] == 512 and LB.DATASET2MAXLEN["hotpotqa"] == 32
    assert LB.base_name("qasper_e") == "qasper" and LB.base_name("hotpotqa") == "hotpotqa"


def test_load_folder(tok):
    sets = LB.load_longbench(FIXTURE)
    assert set(sets) == {p.stem for p in FIXTURE.glob("*.jsonl")}
    assert sets["hotpotqa"][1]["answers"] == ["Philip K. Dick", "Philip Kindred Dick"]
    only = LB.load_longbench(FIXTURE, datasets=["trec"])
    assert list(only) == ["trec"]
    with pytest.raises(FileNotFoundError):
        LB.load_longbench(FIXTURE.parent / "nowhere")


def test_prompt_formatting_is_the_official_template(tok):
    rec = _first("hotpotqa")
    prompt = LB.build_prompt(rec, "hotpotqa", tok, LB.LongBenchConfig(max_length=10_000))
    expected = (
        "Answer the question based on the given passages. Only give me the answer and do not output any other words."
        "\n\nThe following are given passages.\n" + rec["context"] + "\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other words.\n\nQuestion: " + rec["input"]
        + "\nAnswer:"
    )
    assert prompt == expected
    lcc = _first("lcc")
    assert LB.build_prompt(lcc, "lcc", tok) == "Please complete the code given below. \n" + lcc["context"] + "Next line of code:\n"
    rb = _first("repobench-p")
    assert LB.build_prompt(rb, "repobench-p", tok).endswith(rb["context"] + rb["input"] + "Next line of code:\n")


def test_middle_truncation_exact(tok):
    rec = _first("hotpotqa")
    full = LB.DATASET2PROMPT["hotpotqa"].format(**rec)
    assert len(tok(full)["input_ids"]) == len(full.encode())  # byte-level: one token per byte
    for max_length in (100, 101, 57):
        half = int(max_length / 2)
        got = LB.build_prompt(rec, "hotpotqa", tok, LB.LongBenchConfig(max_length=max_length))
        assert got == full[:half] + full[-half:]
    assert LB.truncate_middle(full, tok, len(full)) == full  # at the limit: unchanged


def test_rows_and_runner_on_fixture(tmp_path, tok):
    model, tok = load_model("tiny-llama")
    cfg = LB.LongBenchConfig(max_length=300)
    rows = LB.longbench_rows(FIXTURE, tok, cfg)
    assert set(rows["task"]) == {p.stem for p in FIXTURE.glob("*.jsonl")}
    by_task = {r["task"]: r for r in rows}
    assert by_task["trec"]["first_line_only"] and not by_task["hotpotqa"]["first_line_only"]
    assert by_task["samsum"]["stop"] == ["\n"] and by_task["gov_report"]["max_new_tokens"] == 512
    assert by_task["trec"]["all_classes"][0] == "City"
    assert all(len(r["prompt_ids"]) <= 300 for r in rows)
    recs = evaluate(model, tok, rows, None, tmp_path, config=RunConfig(max_new_tokens_cap=3, progress=False))
    assert len(recs) == len(rows) and all(0.0 <= r["score"] <= 1.0 for r in recs)
    assert all(r["n_new_tokens"] <= 3 for r in recs)
    summary = LB.longbench_summary(recs)
    assert set(summary["categories"]) == set(LB.CATEGORIES)
    assert summary["samples"]["hotpotqa"] == 2


def test_official_scorer():
    # eval.py's scorer: first line for triviaqa, max over answers, mean x 100 rounded
    assert LB.scorer("triviaqa", ["Egypt\nand more", "Cairo"], [["Egypt"], ["Egypt"]], None) == 50.0
    assert LB.scorer("hotpotqa", ["The cat sat"], [["the cat", "dog"]], None) == pytest.approx(66.67)
    assert LB.scorer("passage_retrieval_en", ["Paragraph 2"], [["Paragraph 2"]], None) == 100.0
    assert LB.scorer("trec", ["City\nCountry"], [["City"]], ["City", "Country"]) == 100.0
    e = LB.scorer_e("hotpotqa_e", ["Paris", "x"], [["Paris"], ["Paris"]], [1000, 9000], None)
    assert e["0-4k"] == 100.0 and e["8k+"] == 0.0


def test_config_is_strict():
    with pytest.raises(ValueError, match="unknown key"):
        LB.LongBenchConfig.from_dict({"max_len": 10})
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        LB.LongBenchConfig(datasets=("dureader",))
