"""LongBench's metrics (reimplemented) and the local suite's, on hand-computed cases."""
from __future__ import annotations

import pytest

from ffcore.evaluation import metrics as M


# ----------------------------------------------------------------- qa F1 (LongBench metrics.py)
def test_normalize_answer():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_hand_computed():
    # "cat sat" vs "cat": 1 common token, P = 1/2, R = 1 -> F1 = 2 * 1/2 * 1 / (3/2) = 2/3
    assert M.qa_f1_score("The cat sat", "the cat") == pytest.approx(2 / 3)
    assert M.qa_f1_score("Paris.", "paris") == 1.0
    assert M.qa_f1_score("London", "Paris") == 0.0
    # multiset overlap: "cat cat" vs "cat" -> common = 1, P = 1/2, R = 1
    assert M.qa_f1_score("the cat the cat", "cat") == pytest.approx(2 / 3)
    # "barack obama" vs "barack hussein obama": common 2, P = 1, R = 2/3 -> F1 = 0.8
    assert M.qa_f1_score("Barack Obama", "Barack Hussein Obama") == pytest.approx(0.8)
    assert M.qa_f1_score("", "anything") == 0.0


def test_score_is_max_over_answers_and_first_line_rule():
    # vs "obama": 2/3; vs "barack hussein obama": 0.8 -> max 0.8
    assert M.score_prediction("Barack Obama", ["Obama", "Barack Hussein Obama"], "qa_f1") == pytest.approx(0.8)
    # trec/triviaqa/samsum score only the first line (after leading newlines)
    assert M.score_prediction("\nParis\nLondon", ["Paris"], "qa_f1", first_line_only=True) == 1.0
    assert M.score_prediction("\nParis\nLondon", ["Paris"], "qa_f1") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown metric"):
        M.score_prediction("x", ["x"], "bleu")


# ----------------------------------------------------------------- edit similarity / code_sim
def test_fuzz_ratio_matches_fuzzywuzzy_levenshtein():
    assert M.fuzz_ratio("this is a test", "this is a test!") == 97  # fuzzywuzzy's README example
    assert M.fuzz_ratio("kitten", "sitting") == 62  # LCS 'ittn': 2*4/13 = 0.615
    assert M.fuzz_ratio("abc", "abd") == 67  # 4/6
    assert M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("", "a") == 0 and M.fuzz_ratio("a", "") == 0
    assert M.fuzz_ratio("abcdefgh", "ijklmnoa") == 12  # 2/16 = 12.5 -> round half to even, like intr()
    assert M.indel_distance("kitten", "sitting") == 5  # 13 - 2 * 4


def test_code_sim_score_skips_fences_and_comments():
    pred = "```python\n# the next line\nx = foo(1)\ny = 2\n"
    # first line without '`', '#', '//' is "x = foo(1)"; LCS with "x = foo(2)" is 9 of 10 -> 18/20
    assert M.code_sim_score(pred, "x = foo(2)") == pytest.approx(0.9)
    assert M.code_sim_score("\n\nreturn a - b", "return a - b") == 1.0  # leading newlines dropped
    assert M.code_sim_score("    return a - b", "return a - b") == pytest.approx(0.86)  # indentation counts


def test_code_sim_indentation_counts():
    # "    return a - b" (16 chars) vs "return a - b" (12): LCS 12 -> 24 / 28 = 0.857 -> 86
    assert M.fuzz_ratio("    return a - b", "return a - b") == 86


def test_local_edit_similarity_strips_and_takes_first_line():
    assert M.edit_similarity("\n    x = foo(1)\nmore", "x = foo(2)") == pytest.approx(0.9)
    assert M.edit_similarity("", "x") == 0.0


# ----------------------------------------------------------------- ROUGE-L (pltrdy/rouge semantics)
def test_rouge_l_hand_computed():
    # distinct words: ref {the,cat,is,on,mat} (5), hyp {the,cat,sat,on,mat} (5); LCS words {the,cat,on,mat}
    assert M.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary-level union LCS: hyp sentences "a b" and "c d" against ref "c a": LCS sets {a} and {c}
    # -> llcs 2, m = 2, n = 4 -> R = 1, P = 1/2, F = 2/3 (a plain LCS over all words would give 0.4)
    assert M.rouge_score("a b. c d", "c a") == pytest.approx(2 / 3, abs=1e-6)
    assert M.rouge_score("the the the", "the") == pytest.approx(1.0, abs=1e-6)  # sets, not counts
    assert M.rouge_score("", "the cat") == 0.0  # rouge raises on an empty hypothesis; LongBench returns 0
    assert M.rouge_score("...", "the cat") == 0.0
    assert M.rouge_score("dog", "the cat") == 0.0


# ----------------------------------------------------------------- classification / retrieval / count
def test_classification_score_official_behaviour():
    classes = ["Description", "Entity", "Location"]
    assert M.classification_score("Description or Entity", "Description", all_classes=classes) == 0.5
    assert M.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert M.classification_score("no idea", "Location", all_classes=classes) == 0.0  # fallback unreachable
    # a sub-string class of the answer is dropped: "Entity type" is the only remaining match
    assert M.classification_score("Entity type", "Entity type", all_classes=["Entity", "Entity type"]) == 1.0
    # the official loop removes items while iterating: with ['a', 'ab', 'abc'] it drops 'a', skips 'ab'
    # (now at index 0), so 'ab' survives and the score is 1/2, not 1
    assert M.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5


def test_retrieval_and_count_scores():
    assert M.retrieval_score("Paragraph 3 and 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval_score("none", "Paragraph 3") == 0.0
    assert M.count_score("There are 7 paragraphs, not 8", "7") == 0.5
    assert M.count_score("seven", "7") == 0.0


# ----------------------------------------------------------------- local suite metrics
def test_local_metrics():
    assert M.exact_match('c9114d99"', "c9114d99") == 1.0
    assert M.exact_match("c9114d98", "c9114d99") == 0.0
    assert M.first_number_match(" 93883.", "93883") == 1.0
    assert M.first_number_match(" the pass key.", "93883") == 0.0
    assert M.first_number_match(" 938830", "93883") == 0.0
    assert M.label_match(" asyncio\n\n", "asyncio") == 1.0
    assert M.label_match(" _markupbase.", "_markupbase") == 1.0
    assert M.label_match(" xml", "asyncio") == 0.0
    assert M.label_match("", "asyncio") == 0.0
