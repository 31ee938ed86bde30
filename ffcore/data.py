"""Offline corpora through `datasets`, deterministic disjoint splits, fixed-length token samples.

A *domain* is one source of documents. Two exist on every machine: `prose` (`pydoc_data.topics`,
the Python language reference and library topics) and `code` (the standard library's `.py` files).
Sixteen more come from registry packages (`ffcore.corpus`: scripture, fiction, quotations,
dictionaries, licences, man pages, manuals, and C, Go, Rust, Perl, shell, JavaScript and Python
code), installed by `scripts/setup_corpus.sh`. Domains are grouped into *families* of related text
(`FAMILIES`) so that a held-out family is really new text, not a sibling of a training domain.

Every document is assigned to exactly one split (calibration / train / eval) by a hash of its id,
so splits are disjoint, stable, and independent of corpus order.
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ffcore import corpus as external

SPLITS = ("calibration", "train", "eval")
SPLIT_FRACTIONS = {"calibration": 0.2, "train": 0.5, "eval": 0.3}
SOURCES = ("prose", "code")  # the two built-in domains (every machine has them)
DOMAINS = SOURCES + tuple(external.DOMAINS)  # every domain, built-in first
# Families of related domains: leave-one-family-out holds out all of a family's domains at once.
FAMILIES: dict[str, tuple[str, ...]] = {
    "scripture": ("kjv",),
    "fiction": ("austen",),
    "quotations": ("fortunes",),
    "dictionaries": ("gcide", "lexicon", "foldoc"),
    "legal": ("legal",),
    "manuals": ("prose", "manpages", "guides"),
    "c": ("c",),
    "go-rust": ("go", "rust"),
    "scripting": ("perl", "shell", "javascript"),
    "python": ("code", "python"),
}
FAMILY_OF = {d: f for f, ds in FAMILIES.items() for d in ds}


def family_of(domain: str) -> str:
    """The family a domain belongs to."""
    if domain not in FAMILY_OF:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    return FAMILY_OF[domain]


def available_domains() -> tuple[str, ...]:
    """The domains whose documents exist on this machine (the built-in two, plus installed corpus domains)."""
    return SOURCES + tuple(d for d in external.available_domains() if d in external.DOMAINS)


def domains_of(families: Sequence[str], available_only: bool = True) -> tuple[str, ...]:
    """The domains of some families (those installed here, unless `available_only` is False)."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; choose from {sorted(FAMILIES)}")
    have = set(available_domains()) if available_only else set(DOMAINS)
    return tuple(d for f in families for d in FAMILIES[f] if d in have)
_EXCLUDED_CODE_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


def split_of(doc_id: str) -> str:
    """The split a document belongs to, from a hash of its id (stable across runs and machines)."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name in SPLITS:
        edge += SPLIT_FRACTIONS[name]
        if u < edge:
            return name
    return SPLITS[-1]


def _prose_records() -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) > 200:
            yield {"doc_id": f"prose:{key}", "source": "prose", "text": text}


def _code_records() -> Iterator[dict[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_CODE_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 1000:
            yield {"doc_id": f"code:{rel.as_posix()}", "source": "code", "text": text}


def _external_records(domain: str) -> Iterator[dict[str, str]]:
    for doc in external.documents(domain):
        yield {"doc_id": doc["doc_id"], "source": domain, "text": doc["text"]}


@functools.lru_cache(maxsize=32)
def corpus(source: str) -> Any:
    """A `datasets.Dataset` of one domain's documents (`doc_id`, `source`, `text`, `split`); cached per process.

    `source` is a domain name (`DOMAINS`); a corpus domain that is not installed raises
    `ffcore.corpus.CorpusMissing` with the setup command.
    """
    from datasets import Dataset

    gens = {"prose": _prose_records, "code": _code_records}
    if source not in DOMAINS:
        raise ValueError(f"unknown source {source!r}; choose one of {DOMAINS}")
    records = gens[source]() if source in gens else _external_records(source)
    rows = [dict(r, split=split_of(r["doc_id"])) for r in records]
    return Dataset.from_list(rows)


@functools.lru_cache(maxsize=96)
def documents(source: str, split: str) -> Any:
    """The documents of one domain that belong to one split (cached per process)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    ds = corpus(source)
    keep = [i for i, s in enumerate(ds["split"]) if s == split]
    return ds.select(keep)


def token_samples(
    tokenizer: Any, split: str, seq_len: int, n: int, sources: Sequence[str] = SOURCES, seed: int = 0,
) -> dict[str, Any]:
    """`n` samples of exactly `seq_len` tokens from one split, drawn round-robin over `sources`.

    Documents of a source are shuffled with `seed`, joined with blank lines and cut into
    consecutive windows, so every token of a sample comes from documents of that split.
    Each sample starts with the tokenizer's BOS token when it has one. Returns
    `{"input_ids": LongTensor[n, seq_len], "doc_ids": list[list[str]], "source": list[str]}`.
    """
    if seq_len < 2 or n < 1:
        raise ValueError(f"need seq_len >= 2 and n >= 1, got seq_len={seq_len}, n={n}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = seq_len - len(bos)
    streams = {s: _windows(tokenizer, documents(s, split), body, seed) for s in sources}
    ids, docs, srcs = [], [], []
    exhausted: set[str] = set()
    while len(ids) < n:
        progressed = False
        for s in sources:
            if len(ids) >= n or s in exhausted:
                continue
            try:
                window, doc_ids = next(streams[s])
            except StopIteration:
                exhausted.add(s)
                continue
            ids.append(bos + window)
            docs.append(doc_ids)
            srcs.append(s)
            progressed = True
        if not progressed:
            raise ValueError(
                f"split {split!r} of {list(sources)} holds only {len(ids)} samples of {seq_len} tokens; "
                f"ask for fewer or shorter samples (wanted {n})"
            )
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "doc_ids": docs, "source": srcs}


def _windows(tokenizer: Any, docs: Any, length: int, seed: int) -> Iterator[tuple[list[int], list[str]]]:
    """Consecutive `length`-token windows over the shuffled, concatenated documents."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    buf: list[int] = []
    owners: list[str] = []  # doc id of each token in buf (kept run-length small via set below)
    for i in order:
        doc = docs[i]
        toks = tokenizer(doc["text"] + "\n\n", add_special_tokens=False)["input_ids"]
        buf += toks
        owners += [doc["doc_id"]] * len(toks)
        while len(buf) >= length:
            window, buf = buf[:length], buf[length:]
            ids, owners = owners[:length], owners[length:]
            yield window, sorted(set(ids))
