"""The local long-context suite: built from the eval split, deterministic by seed, fitted to a token budget."""
from __future__ import annotations

import json

import pytest

from ffcore.evaluation.suite import ROW_FIELDS, TASKS, SuiteConfig, build_suite, suite_overview
from ffcore.models import tiny_tokenizer

CFG = SuiteConfig(n_per_task=2, context_tokens=(1024, 1536), seed=0, continuation_tokens=16, continuation_greedy=4)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def suite(tok):
    return build_suite(tok, CFG)


def test_rows_have_the_schema_and_fit_the_budget(suite):
    assert set(suite.column_names) == set(ROW_FIELDS)
    assert sorted(set(suite["task"])) == sorted(TASKS)
    for r in suite:
        budget = json.loads(r["meta"])["budget"]
        assert budget in CFG.context_tokens
        assert len(r["prompt_ids"]) <= budget
        assert len(r["prompt_ids"]) >= 0.6 * budget, (r["task"], len(r["prompt_ids"]))
        assert r["answers"] and 0.0 <= r["chance"] < 1.0
        assert r["category"] == TASKS[r["task"]].category and r["metric"] == TASKS[r["task"]].metric


def test_tasks_are_well_formed(suite, tok):
    for r in suite:
        ans, prompt = r["answers"][0], r["prompt"]
        if r["task"] == "kv_retrieval":
            assert f'"{ans}"' in prompt and prompt.endswith('Corresponding value: "')
            assert prompt.count(f'"{ans}"') == 1  # only in the JSON object: the one-shot uses another key
        elif r["task"] == "passkey":
            assert f"The pass key is {ans}. Remember it." in prompt
            assert prompt.endswith("The pass key is") and len(ans) == CFG.passkey_digits
        elif r["task"] == "classification":
            assert ans in r["all_classes"] and prompt.endswith("Package:")
            assert r["chance"] == pytest.approx(1 / len(r["all_classes"]))
        elif r["task"] == "code_completion":
            assert prompt.rstrip(" ").endswith("\n") and ans == ans.strip() and len(ans) >= CFG.code_min_chars
            assert len(r["prompt_ids"]) <= json.loads(r["meta"])["budget"]
            assert 0.0 < r["chance"] < 1.0  # mean edit similarity of other lines of the file
        elif r["task"] == "continuation":
            assert r["kind"] == "continuation" and len(r["target_ids"]) == CFG.continuation_tokens
            assert len(r["prompt_ids"]) == json.loads(r["meta"])["budget"]


def test_eval_split_only(suite):
    from ffcore.data import split_of

    for r in suite:
        meta = json.loads(r["meta"])
        for doc in meta.get("doc_ids", []) + ([meta["doc_id"]] if "doc_id" in meta else []):
            assert split_of(doc) == "eval"


def test_same_seed_identical_different_seed_differs(suite, tok):
    again = build_suite(tok, CFG)
    assert again["prompt_ids"] == suite["prompt_ids"] and again["uid"] == suite["uid"]
    other = build_suite(tok, CFG.replace(seed=1))
    for task in TASKS:
        a = [r["prompt"] for r in suite if r["task"] == task]
        b = [r["prompt"] for r in other if r["task"] == task]
        assert a != b, task
    assert not set(other["uid"]) & set(suite["uid"])


def test_overview(suite):
    rows = {r["task"]: r for r in suite_overview(suite)}
    assert rows["passkey"]["n"] == CFG.n_per_task
    assert rows["classification"]["chance"] == pytest.approx(1 / 5)


def test_profile_configs():
    from ffcore.experiments.accuracy import suite_config

    assert suite_config("quick").n_per_task < suite_config("full").n_per_task <= 8
    assert min(suite_config("full").context_tokens) >= 1024
    assert suite_config("full", context_tokens=(2048, 4096)).context_tokens == (2048, 4096)
    assert suite_config("smoke", seed=3).seed == 3
    with pytest.raises(ValueError):
        suite_config("huge")


def test_kv_hex_format(tok):
    ds = build_suite(tok, SuiteConfig(n_per_task=1, context_tokens=(1024,), tasks=("kv_retrieval",),
                                      kv_format="hex", kv_key_chars=32))
    ans = ds[0]["answers"][0]
    assert len(ans) == 32 and set(ans) <= set("0123456789abcdef") and f'"{ans}"' in ds[0]["prompt"]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown task"):
        SuiteConfig(tasks=("summarization",))
    with pytest.raises(ValueError, match="unknown key"):
        SuiteConfig.from_dict({"n_samples": 3})
    with pytest.raises(ValueError, match="depth_range"):
        SuiteConfig(depth_range=(0.9, 0.1))


def test_public_names_resolve():
    import ffcore.evaluation as E

    for name in E.__all__:
        assert getattr(E, name) is not None
    with pytest.raises(AttributeError):
        E.no_such_name  # noqa: B018


class _MergingTokenizer:
    """GPT-2-style toy: a newline merges with the following spaces except the last one."""

    import re as _re
    PATTERN = _re.compile(r"\n +(?= )|\n +$|\n| ?[A-Za-z_.=]+| ?\d+|\S| +")

    def __call__(self, text, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in self.PATTERN.finditer(text)]
        out = {"input_ids": [hash(text[s:e]) % 1000 for s, e in spans]}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def test_healed_ids_cut_at_the_natural_token_boundary(tok):
    from ffcore.evaluation.suite import healed_ids

    prompt, line = "    x = 1\n", "        self.y = 2\n"
    # byte-level: every character is a token, so the prompt keeps the full indentation
    assert tok.decode(healed_ids(tok, prompt, line), skip_special_tokens=True) == prompt + " " * 8
    merging = _MergingTokenizer()
    ids = healed_ids(merging, prompt, line)  # '    ' 'x' ' =' ' 1' '\n       ' | ' self.y' ...
    full = merging(prompt + line)["input_ids"]
    assert ids == full[: len(ids)] and len(ids) == 5  # ends with the merged newline+7 spaces token
