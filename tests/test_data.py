"""Offline corpora and their calibration / train / eval splits."""
from __future__ import annotations

import pytest

from ffcore import data
from ffcore.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("source", data.SOURCES)
def test_corpora_are_real_and_split_disjointly(source):
    ds = data.corpus(source)
    assert len(ds) > 50
    ids = {s: set(data.documents(source, s)["doc_id"]) for s in data.SPLITS}
    assert all(ids.values()), "every split gets documents"
    assert not ids["calibration"] & ids["train"]
    assert not ids["calibration"] & ids["eval"]
    assert not ids["train"] & ids["eval"]
    assert set().union(*ids.values()) == set(ds["doc_id"])


def test_split_assignment_is_stable():
    assert data.split_of("prose:if") == data.split_of("prose:if")
    counts = {s: 0 for s in data.SPLITS}
    for i in range(4000):
        counts[data.split_of(f"doc{i}")] += 1
    for s, frac in data.SPLIT_FRACTIONS.items():
        assert abs(counts[s] / 4000 - frac) < 0.03


def test_token_samples_are_deterministic_and_disjoint(tok):
    a = data.token_samples(tok, "train", 512, 4, seed=1)
    b = data.token_samples(tok, "train", 512, 4, seed=1)
    c = data.token_samples(tok, "train", 512, 4, seed=2)
    assert a["input_ids"].shape == (4, 512)
    assert (a["input_ids"] == b["input_ids"]).all()
    assert not (a["input_ids"] == c["input_ids"]).all()
    assert a["input_ids"][:, 0].eq(tok.bos_token_id).all()
    assert a["source"] == ["prose", "code", "prose", "code"]
    ev = data.token_samples(tok, "eval", 512, 4, seed=1)
    train_docs = {d for docs in a["doc_ids"] for d in docs}
    eval_docs = {d for docs in ev["doc_ids"] for d in docs}
    assert train_docs and eval_docs and not train_docs & eval_docs


def test_bad_requests_are_clear(tok):
    with pytest.raises(ValueError, match="unknown split"):
        data.documents("prose", "test")
    with pytest.raises(ValueError, match="unknown source"):
        data.corpus("poetry")
    with pytest.raises(ValueError, match="holds only"):
        data.token_samples(tok, "calibration", 100_000, 50, sources=("prose",))
