"""Many questions per prefilled context: one long context prefilled once, each question a suffix prefill.

Why: one prefill of a 1K-token prompt costs ~2.5 s on the project's CPU and, in the one-question suite
(`ffcore.evaluation.suite`), buys one answer, too few to resolve the paper's 2-6 % gaps (DESIGN.md
section 6, issue 19). Here an *item* is one long context and several questions about it:

* the context (`context_ids`, BOS included) is prefilled ONCE under `plan.replace(dense_last=False)`:
  its first block dense (attention sinks), every later block sparse. Its own last block is not the
  question, so it is not kept dense;
* each question (`question_ids`, at most one block, no BOS) is a suffix prefill from a COPY of that
  KV cache under `plan` itself. The engine does not apply `dense_first` to a call with a cache
  offset > 0, and with `dense_last` the call's last (here: only) block, the question, runs dense;
* the answer is decoded greedily from the question's state (dense unless `plan.sparse_decode`), and
  from a second copy of the post-question state the gold answer `gold_ids` is scored teacher-forced:
  its first token is predicted by the question's last logits, the rest by one forward (per token
  under sparse decode; taken from the greedy steps themselves when the answer is right). Every record
  carries the exact-match / edit-similarity / label score next to the gold log-likelihood
  (`gold_logprob` summed, `gold_nll` per token, `gold_token_logprobs`).

Block layout (`share`, see `shared_tokens`). 'context' (the default, the design above): the context's
blocks are aligned to its start and the question alone is the dense tail. When `len(context_ids)` is a
multiple of `block_size` this is exactly a single-pass prefill of context + question whose dense tail is
the grid's last block (first block dense, context blocks sparse, the question's block dense), which
`tests/test_eval_multiq.py` checks; a one-prompt prefill whose dense tail is the last `block_size` tokens
(the engine's `dense_tail='full'`) also keeps the end of the context dense, so it differs. 'aligned':
only the longest block-aligned context prefix that lies before every question's one-prompt dense tail
is shared; each question's suffix is the rest of the context plus the question, and every record then
equals a one-prompt prefill of context + question under the plan, whatever its tail rule (about one
block of context re-prefilled per question). `one_question_rows(item)` flattens an item into ordinary
suite rows (context + question as one prompt) for the one-prompt runner.

The four builders (deterministic for a seed and a tokenizer; budgets fitted with the model's own
tokenizer, as in the suite; every document from the eval split of `ffcore.data`):

* `kv_items`: a JSON object of word-pair keys -> 6-digit values (and one solved lookup); each question
  asks one key, keys spread evenly over the object's depth. Exact match.
* `needle_items`: a haystack of one domain's eval text with one "The special magic number for <city>
  is <7 digits>." sentence per question at spread depths; each question asks one city. First number.
* `classification_items`: one shared many-shot block of stdlib snippets labelled by package; each
  question is a held-out snippet (balanced over the classes). Label match.
* `code_items`: several files of one stdlib package as repository context; questions are completion
  points in another file of the package. Layout 'excerpt' (default, repobench-style): each question
  is a short excerpt of that file ending right before its target line, so any number of targets fit
  in one block each. Layout 'prefix': the context also holds the file up to a cut, and each question
  adds the file's lines from the cut to its target (every suffix under one block, so only the few
  targets within ~`max_question_tokens` of the cut). Edit similarity of the next line.

Token boundaries: the context ends at a clean boundary ("\\n\\n" before the question's first word, or
a token boundary of the tokenizer's own tokenization of the code), questions are tokenized without
special tokens, and `gold_ids` are the tokens of the question + answer tokenized together that
follow the question's tokens (code: the target's tokens after a token-healed cut, as the suite does).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ffcore.data import available_domains, documents
from ffcore.decoding import FULL, copy_state, eos_ids, greedy_decode, stop_strings, teacher_forced, token_nll
from ffcore.engine import SparsityPlan, dense_plan, sparsify
from ffcore.engine.layout import split_blocks
from ffcore.engine.plan import as_plan
from ffcore.evaluation.metrics import edit_similarity, score_prediction
from ffcore.evaluation.runner import ResultCache, config_key, is_dense
from ffcore.evaluation.suite import (
    CLASSIFY_HEAD, DEFAULT_FAMILIES, KV_HEAD, TASKS, _code_targets, _eval_docs, _family, _insert_at_paragraph,
    _prose_words, _snippet_pool, fit_units, make_row,
)
from ffcore.models import model_fingerprint

MULTIQ_SUITE = "ffcore-multiq"
MULTIQ_VERSION = "1"
METHOD_KEY = "multi-question"  # part of the result-cache key: context once, questions as suffix prefills

ITEM_FIELDS = ("uid", "suite", "seed", "task", "category", "metric", "chance", "domain", "all_classes",
               "context", "context_ids", "questions", "meta")
QUESTION_FIELDS = ("qid", "question", "question_ids", "answers", "gold_ids", "max_new_tokens", "stop", "meta")

NEEDLE_HEAD = (
    "There are some special magic numbers hidden inside a lot of irrelevant text. Find them and memorize "
    "them. I will quiz you about the magic numbers there.\n\n"
)
CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Beijing", "Berlin", "Boston", "Brussels", "Budapest",
    "Cairo", "Chicago", "Copenhagen", "Dallas", "Delhi", "Denver", "Dublin", "Edinburgh", "Florence",
    "Geneva", "Hamburg", "Havana", "Helsinki", "Istanbul", "Jakarta", "Lagos", "Lima", "Lisbon", "London",
    "Madrid", "Manila", "Melbourne", "Miami", "Milan", "Montreal", "Moscow", "Mumbai", "Munich", "Nairobi",
    "Oslo", "Paris", "Prague", "Rome", "Seattle", "Seoul", "Singapore", "Stockholm", "Sydney", "Tokyo",
    "Toronto", "Vienna", "Warsaw", "Zurich",
)
REPO_HEAD = "# Repository: the Python standard library package `{pkg}`\n\n"


# ----------------------------------------------------------------- items


def _uid(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def make_question(
    qid: str, question_ids: Sequence[int], answers: Sequence[str], gold_ids: Sequence[int], max_new_tokens: int,
    stop: Sequence[str] = (), question: str = "", meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One question of an item (fields `QUESTION_FIELDS`), its ids as plain int lists."""
    return {"qid": str(qid), "question": question, "question_ids": [int(i) for i in question_ids],
            "answers": [str(a) for a in answers], "gold_ids": [int(i) for i in gold_ids],
            "max_new_tokens": int(max_new_tokens), "stop": list(stop), "meta": dict(meta or {})}


def make_item(
    task: str, context_ids: Sequence[int], questions: Sequence[dict[str, Any]], metric: str, domain: str,
    chance: float = 0.0, category: str | None = None, all_classes: Sequence[str] = (), context: str = "",
    seed: int = 0, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An item (fields `ITEM_FIELDS`) with a content-hash `uid`; checked by `check_item`."""
    item = {
        "suite": f"{MULTIQ_SUITE}/{MULTIQ_VERSION}", "seed": int(seed), "task": task,
        "category": category if category is not None else (TASKS[task].category if task in TASKS else ""),
        "metric": metric, "chance": float(chance), "domain": domain, "all_classes": list(all_classes),
        "context": context, "context_ids": [int(i) for i in context_ids], "questions": [dict(q) for q in questions],
        "meta": dict(meta or {}),
    }
    ident = {k: item[k] for k in ("suite", "task", "metric", "context_ids", "all_classes")}
    ident["questions"] = [{k: q[k] for k in ("qid", "question_ids", "answers", "gold_ids", "max_new_tokens", "stop")}
                          for q in item["questions"]]
    item["uid"] = _uid(ident)
    check_item(item)  # questions of at most one block are checked where they matter (share='context')
    return {k: item[k] for k in ITEM_FIELDS}


def check_item(item: dict[str, Any], block_size: int | None = None, sparse_decode: bool = False) -> None:
    """Raise ValueError for an item the multi-question path cannot run faithfully.

    Needs a non-empty context, at least one question, distinct qids, non-empty questions and gold ids. With a
    `block_size` (share='context') every question must fit one block: a longer one would be split into
    blocks whose first runs sparse. Under sparse decode a one-token question is refused: the engine cannot
    tell a one-token suffix prefill from a decode step.
    """
    uid = item.get("uid", "?")
    if not item.get("context_ids"):
        raise ValueError(f"item {uid}: empty context_ids")
    qs = item.get("questions") or []
    if not qs:
        raise ValueError(f"item {uid}: no questions")
    qids = [q["qid"] for q in qs]
    if len(set(qids)) != len(qids):
        raise ValueError(f"item {uid}: duplicate qids {sorted({q for q in qids if qids.count(q) > 1})}")
    for q in qs:
        n = len(q["question_ids"])
        if n < 1 or (block_size is not None and n > block_size):
            raise ValueError(
                f"item {uid} question {q['qid']}: {n} question tokens; a question must be 1..{block_size or 'n'} "
                "tokens (one block) so that its suffix prefill is one dense block"
            )
        if n == 1 and sparse_decode:
            raise ValueError(f"item {uid} question {q['qid']}: a one-token question under sparse_decode would run "
                             "as a sparse decode step, not a dense block")
        if not q["gold_ids"]:
            raise ValueError(f"item {uid} question {q['qid']}: empty gold_ids")
        if int(q["max_new_tokens"]) < 1:
            raise ValueError(f"item {uid} question {q['qid']}: max_new_tokens must be >= 1")


def one_question_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The item as ordinary single-prompt suite rows (`make_row`): prompt_ids = context_ids + question_ids.

    Rows run through `ffcore.evaluation.runner.evaluate` (one prefill per question); `meta` keeps the
    item uid, qid and gold ids so their records can be paired with `evaluate_items`' records.
    """
    check_item(item)
    rows = []
    for q in item["questions"]:
        chance = q["meta"].get("chance", item["chance"])
        rows.append(make_row(
            suite=f"{MULTIQ_SUITE}-1q/{MULTIQ_VERSION}", seed=item["seed"], task=item["task"],
            category=item["category"], kind="generate", metric=item["metric"],
            prompt=item["context"] + q["question"], prompt_ids=item["context_ids"] + q["question_ids"],
            answers=q["answers"], all_classes=item["all_classes"], chance=chance,
            max_new_tokens=q["max_new_tokens"], stop=q["stop"],
            meta={"item_uid": item["uid"], "qid": q["qid"], "gold_ids": q["gold_ids"], "domain": item["domain"],
                  "n_context_tokens": len(item["context_ids"]), **q["meta"]},
        ))
    return rows


def item_overview(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: items, questions, context / question / gold token ranges and mean chance (a notebook table)."""
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        d = out.setdefault(it["task"], {"task": it["task"], "metric": it["metric"], "items": 0, "questions": 0,
                                        "context_tokens": [], "question_tokens": [], "gold_tokens": [], "chance": 0.0})
        d["items"] += 1
        d["questions"] += len(it["questions"])
        d["context_tokens"].append(len(it["context_ids"]))
        d["question_tokens"] += [len(q["question_ids"]) for q in it["questions"]]
        d["gold_tokens"] += [len(q["gold_ids"]) for q in it["questions"]]
        d["chance"] += it["chance"]
    rows = []
    for d in out.values():
        c, q, g = d.pop("context_tokens"), d.pop("question_tokens"), d.pop("gold_tokens")
        rows.append({**d, "chance": d["chance"] / d["items"], "questions_per_item": d["questions"] / d["items"],
                     "min_context_tokens": min(c), "max_context_tokens": max(c),
                     "mean_question_tokens": sum(q) / len(q), "max_question_tokens": max(q),
                     "mean_gold_tokens": sum(g) / len(g)})
    return rows


# ----------------------------------------------------------------- builder helpers


def _rng(seed: int, task: str, i: int) -> random.Random:
    """The random stream of one item (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"{MULTIQ_SUITE}/{MULTIQ_VERSION}/{seed}/{task}/{i}")


def _budget(context_tokens: int | Sequence[int], i: int) -> int:
    budgets = (context_tokens,) if isinstance(context_tokens, int) else tuple(context_tokens)
    if not budgets or min(budgets) < 64:
        raise ValueError(f"context_tokens must be one or more budgets >= 64 tokens, got {context_tokens!r}")
    return int(budgets[i % len(budgets)])


def _check_counts(n_items: int, n_questions: int, max_question_tokens: int) -> None:
    if n_items < 1 or n_questions < 1:
        raise ValueError(f"need n_items >= 1 and n_questions >= 1, got {n_items}, {n_questions}")
    if not 1 <= max_question_tokens <= 128:
        raise ValueError(f"max_question_tokens must be in [1, 128] (one block), got {max_question_tokens}")


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _question_and_gold(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(question ids, gold ids): the answer's tokens as they follow the question when tokenized together."""
    q = _ids(tokenizer, question)
    joint = _ids(tokenizer, question + answer)
    if joint[: len(q)] == q and len(joint) > len(q):
        return q, joint[len(q):]
    return q, _ids(tokenizer, answer)  # the tokenizer merges across the boundary: the answer on its own


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """(ids, character spans) of text without special tokens, or None for tokenizers without offsets."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _cut_at(ends: Sequence[int], char: int) -> int:
    """Index of the first token (ascending end offsets `ends`) reaching past `char`: a straddling token goes after."""
    return bisect.bisect_right(ends, char)


def _spread(rng: random.Random, candidates: Sequence[Any], n: int) -> list[Any]:
    """n candidates spread evenly over the sequence: one random pick in each of n equal bins (in order)."""
    n = min(n, len(candidates))
    picks = []
    for b in range(n):
        lo, hi = b * len(candidates) // n, (b + 1) * len(candidates) // n
        picks.append(candidates[rng.randrange(lo, hi)])
    return picks


def _lines_of(domain: str) -> list[str]:
    """The eval documents of a domain as lines, a blank line between documents (doc id order)."""
    if domain not in available_domains():
        raise ValueError(f"domain {domain!r} is not installed here; choose one of {available_domains()}")
    lines: list[str] = []
    ds = documents(domain, "eval")
    for _, text in sorted(zip(ds["doc_id"], ds["text"])):
        lines += text.strip("\n").split("\n") + [""]
    if not lines:
        raise ValueError(f"domain {domain!r} has no eval documents")
    return lines


# ----------------------------------------------------------------- key-value retrieval


def kv_items(
    tokenizer: Any, n_items: int = 4, context_tokens: int | Sequence[int] = 1024, n_questions: int = 16,
    seed: int = 0, one_shot: bool = True, max_question_tokens: int = 120,
) -> list[dict[str, Any]]:
    """Items of one JSON object (eval-prose word-pair keys, 6-digit values); each question asks one key's value.

    The context is the instruction, the object fitted to the budget and (one_shot) one solved lookup of
    another key. The queried keys are spread evenly over the object (one per depth bin).
    """
    _check_counts(n_items, n_questions, max_question_tokens)
    words = _prose_words()
    items = []
    for i in range(n_items):
        rng = _rng(seed, "kv", i)
        budget = _budget(context_tokens, i)
        n_max = budget  # far more pairs than can fit
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < n_max:
            k = f"{rng.choice(words)}-{rng.choice(words)}"
            if k not in seen:
                seen.add(k)
                keys.append(k)
        values: list[str] = []
        seen = set()
        while len(values) < n_max:  # distinct values: a right answer is never ambiguous
            v = str(rng.randint(100000, 999999))
            if v not in seen:
                seen.add(v)
                values.append(v)
        shot_u = rng.random()

        def shot_of(n: int, shot_u: float = shot_u) -> int | None:
            return min(n - 1, int(shot_u * n)) if one_shot and n > 1 else None

        def render(n: int, keys: list[str] = keys, values: list[str] = values) -> str:
            body = ",\n ".join(f'"{keys[j]}": "{values[j]}"' for j in range(n))
            s = shot_of(n)
            shot = f'Key: "{keys[s]}"\nCorresponding value: "{values[s]}"\n\n' if s is not None else ""
            return f"{KV_HEAD}{{{body}}}\n\n{shot}"

        n, context = fit_units(render, n_max, budget, tokenizer)
        s = shot_of(n)
        candidates = [j for j in range(n) if j != s]
        if not candidates:
            raise ValueError(f"only one key-value pair fits in {budget} tokens; raise context_tokens")
        questions = []
        for j in _spread(rng, candidates, n_questions):
            text = f'Key: "{keys[j]}"\nCorresponding value: "'
            q_ids, gold = _question_and_gold(tokenizer, text, values[j])
            if len(q_ids) > max_question_tokens:
                raise ValueError(f"a kv question has {len(q_ids)} tokens > max_question_tokens={max_question_tokens}")
            questions.append(make_question(f"k{j}", q_ids, [values[j]], gold, 12, ['"', "\n"], text,
                                           {"index": j, "depth": round(j / n, 4)}))
        items.append(make_item(
            "kv_retrieval", tokenizer(context)["input_ids"], questions, "exact_match", "prose", chance=1.0 / n,
            context=context, seed=seed, meta={"budget": budget, "pairs": n, "shot_index": s},
        ))
    return items


# ----------------------------------------------------------------- needles in a haystack


def needle_items(
    tokenizer: Any, n_items: int = 4, context_tokens: int | Sequence[int] = 1024, n_questions: int = 8,
    seed: int = 0, domain: str = "prose", digits: int = 7, depth_range: tuple[float, float] = (0.05, 0.95),
    max_question_tokens: int = 120,
) -> list[dict[str, Any]]:
    """Items of a `domain` haystack holding one magic-number sentence per question (distinct cities, spread depths).

    Needle j sits at depth lo + (hi - lo) * (j + u) / n (u uniform), at the nearest paragraph boundary;
    question j asks for city j's number ("... The special magic number for <city> is"), the answer the number.
    """
    _check_counts(n_items, n_questions, max_question_tokens)
    if n_questions > len(CITIES):
        raise ValueError(f"at most {len(CITIES)} needles (distinct cities) per item, got {n_questions}")
    lo, hi = depth_range
    if not 0.0 <= lo <= hi <= 1.0 or not 1 <= digits <= 12:
        raise ValueError(f"need 0 <= lo <= hi <= 1 and 1 <= digits <= 12, got {depth_range}, {digits}")
    lines = _lines_of(domain)
    starts = [j for j in range(len(lines)) if j == 0 or not lines[j - 1].strip()]  # paragraph starts
    items = []
    for i in range(n_items):
        rng = _rng(seed, f"needle/{domain}", i)
        budget = _budget(context_tokens, i)
        cities = rng.sample(CITIES, n_questions)
        numbers: list[str] = []
        while len(numbers) < n_questions:
            v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
            if v not in numbers:
                numbers.append(v)
        depths = [lo + (hi - lo) * (j + rng.random()) / n_questions for j in range(n_questions)]
        start = rng.choice(starts)
        stream, chars = [], 0
        for k in range(len(lines)):  # enough text for the budget (a token spans at least one character)
            stream.append(lines[(start + k) % len(lines)])
            chars += len(stream[-1]) + 1
            if chars > 24 * budget:
                break
        needles = [f"The special magic number for {c} is {v}." for c, v in zip(cities, numbers)]

        def render(n: int, stream: list[str] = stream, needles: list[str] = needles,
                   depths: list[float] = depths) -> str:
            body = stream[:n]
            for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):  # deepest first: indices stay valid
                body = _insert_at_paragraph(body, depth * n, needle)
            return NEEDLE_HEAD + "\n".join(body).strip("\n") + "\n\n"

        n, context = fit_units(render, len(stream), budget, tokenizer)
        questions = []
        for j, (city, number) in enumerate(zip(cities, numbers)):
            text = f"What is the special magic number for {city}? The special magic number for {city} is"
            q_ids, gold = _question_and_gold(tokenizer, text, f" {number}")
            if len(q_ids) > max_question_tokens:
                raise ValueError(f"a needle question has {len(q_ids)} tokens > {max_question_tokens=}")
            questions.append(make_question(f"n{j}", q_ids, [number], gold, digits + 4, ["\n", "."], text,
                                           {"city": city, "depth": round(depths[j], 4)}))
        items.append(make_item(
            "needle", tokenizer(context)["input_ids"], questions, "first_number", domain, category="Synthetic",
            chance=1.0 / (9 * 10 ** (digits - 1)), context=context, seed=seed,
            meta={"budget": budget, "lines": n, "first_line": start, "needles": n_questions},
        ))
    return items


# ----------------------------------------------------------------- many-shot classification


def classification_items(
    tokenizer: Any, n_items: int = 4, context_tokens: int | Sequence[int] = 1024, n_questions: int = 16,
    seed: int = 0, families: Sequence[str] = DEFAULT_FAMILIES, snippet_lines: int = 6, hide_label: bool = True,
    max_question_tokens: int = 120,
) -> list[dict[str, Any]]:
    """Items of one shared many-shot block (stdlib snippets labelled by package); questions are held-out snippets.

    Questions are balanced over the classes (round robin over shuffled classes) and never among the shots;
    only snippets whose question ("Code:\\n<snippet>\\nPackage:") fits `max_question_tokens` are asked.
    """
    _check_counts(n_items, n_questions, max_question_tokens)
    pool = _snippet_pool("package", tuple(families), snippet_lines, hide_label)
    labels = sorted(pool)
    if len(labels) < 2:
        raise ValueError(f"classification finds only {len(labels)} classes with snippets among {list(families)}")
    head = CLASSIFY_HEAD.format(what="packages", labels=", ".join(labels))
    items = []
    for i in range(n_items):
        rng = _rng(seed, "classification", i)
        budget = _budget(context_tokens, i)
        per_class = {f: list(pool[f]) for f in labels}
        for f in labels:
            rng.shuffle(per_class[f])
        asked: list[tuple[str, str, list[int], list[int]]] = []
        used: set[str] = set()
        while len(asked) < n_questions:
            order = list(labels)
            rng.shuffle(order)
            grew = False
            for f in order:
                while per_class[f] and len(asked) < n_questions:
                    snip = per_class[f].pop()
                    q_ids, gold = _question_and_gold(tokenizer, f"Code:\n{snip}\nPackage:", f" {f}")
                    if len(q_ids) <= max_question_tokens:
                        asked.append((f, snip, q_ids, gold))
                        used.add(snip)
                        grew = True
                        break
            if not grew:
                break
        if not asked:
            raise ValueError(f"no snippet question fits in {max_question_tokens} tokens; lower snippet_lines")
        # shots: every other snippet, balanced round robin over shuffled classes
        rest = {f: [s for s in pool[f] if s not in used] for f in labels}
        for f in labels:
            rng.shuffle(rest[f])
        shots: list[tuple[str, str]] = []
        for r in range(max(len(v) for v in rest.values())):
            round_labels = list(labels)
            rng.shuffle(round_labels)
            shots += [(f, rest[f][r]) for f in round_labels if r < len(rest[f])]

        def render(n: int, shots: list[tuple[str, str]] = shots) -> str:
            return head + "".join(f"Code:\n{s}\nPackage: {f}\n\n" for f, s in shots[:n])

        n, context = fit_units(render, len(shots), budget, tokenizer)
        questions = [make_question(f"c{j}", q_ids, [f], gold, 12, ["\n"], f"Code:\n{snip}\nPackage:", {"label": f})
                     for j, (f, snip, q_ids, gold) in enumerate(asked)]
        items.append(make_item(
            "classification", tokenizer(context)["input_ids"], questions, "label_match", "code",
            chance=1.0 / len(labels), all_classes=labels, context=context, seed=seed,
            meta={"budget": budget, "shots": n, "classes": len(labels)},
        ))
    return items


# ----------------------------------------------------------------- repository code completion


def _packages(min_files: int = 2) -> dict[str, list[tuple[str, str]]]:
    """Stdlib packages (eval split, encodings excluded) -> their (doc_id, text), with at least min_files files."""
    out: dict[str, list[tuple[str, str]]] = {}
    for doc_id, text in _eval_docs("code"):
        fam = _family(doc_id)
        if fam and fam != "encodings":
            out.setdefault(fam, []).append((doc_id, text))
    return {k: v for k, v in sorted(out.items()) if len(v) >= min_files}


def _path(doc_id: str) -> str:
    return doc_id.split(":", 1)[1]


def _repo_context(tokenizer: Any, pkg: str, files: list[tuple[str, str]], budget: int,
                  tail: str = "", tail_ids: Sequence[int] = ()) -> tuple[str, list[int]]:
    """(text, ids) of the repository context: '# file:'-headed files cut at a line to fit `budget` with the tail."""
    stream: list[str] = []
    for doc_id, text in files:
        stream += [f"# file: {_path(doc_id)}\n"] + text.rstrip("\n").split("\n") + [""]
        if sum(len(s) + 1 for s in stream) > 24 * budget:
            break
    head = REPO_HEAD.format(pkg=pkg)

    def render(n: int) -> str:
        return head + "\n".join(stream[:n]).rstrip("\n") + "\n\n"

    n, text = fit_units(render, len(stream), budget - len(tail_ids), tokenizer)
    return text + tail, list(tokenizer(text)["input_ids"]) + list(tail_ids)


def code_items(
    tokenizer: Any, n_items: int = 4, context_tokens: int | Sequence[int] = 1024, n_questions: int = 16,
    seed: int = 0, layout: str = "excerpt", min_chars: int = 12, window_lines: int = 12,
    max_new_tokens: int = 48, max_question_tokens: int = 120, packages: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Items of repository context (files of one stdlib package) and completion points in another file of it.

    layout 'excerpt': the target file is not in the context; question j is '# file: <path> (excerpt)' and
    up to `window_lines` lines before target line t_j (fewer where needed to fit `max_question_tokens`),
    cut where the tokenizer starts t_j's code; targets spread over the file; up to n_questions.
    layout 'prefix': the context ends with the target file's first lines up to a cut line p (at a token
    boundary of the file's own tokenization, in at most half the budget), and question j adds the file's
    tokens from p up to target t_j, so only targets within `max_question_tokens` of p are asked (the p with
    the most such targets). Answer: the target line's code; gold ids: its tokens after the healed cut.
    """
    _check_counts(n_items, n_questions, max_question_tokens)
    if layout not in ("excerpt", "prefix"):
        raise ValueError(f"layout must be 'excerpt' or 'prefix', got {layout!r}")
    pkgs = _packages()
    if packages is not None:
        missing = sorted(set(packages) - set(pkgs))
        if missing:
            raise ValueError(f"packages {missing} have fewer than 2 eval-split files; choose from {sorted(pkgs)}")
        pkgs = {k: pkgs[k] for k in packages}
    items = []
    for i in range(n_items):
        rng = _rng(seed, f"code/{layout}", i)
        budget = _budget(context_tokens, i)
        names = sorted(pkgs)
        rng.shuffle(names)
        built = None
        for pkg in names:
            files = list(pkgs[pkg])
            rng.shuffle(files)
            for k, (doc_id, text) in enumerate(files):
                others = files[:k] + files[k + 1:]
                build = _code_excerpt if layout == "excerpt" else _code_prefix
                built = build(tokenizer, rng, pkg, doc_id, text, others, budget, n_questions, min_chars,
                              window_lines, max_new_tokens, max_question_tokens)
                if built is not None:
                    break
            if built is not None:
                break
        if built is None:
            raise ValueError(f"no stdlib package has enough eval-split code for a {budget}-token {layout} item")
        context, context_ids, questions, meta = built
        chance = sum(q["meta"]["chance"] for q in questions) / len(questions)
        items.append(make_item(
            "code_completion", context_ids, questions, "edit_sim", "code", chance=chance, context=context, seed=seed,
            meta={"budget": budget, "layout": layout, "package": pkg, "file": _path(doc_id), **meta},
        ))
    return items


def _line_chance(lines: list[str], targets: list[int], t: int, rng: random.Random) -> float:
    """Mean edit similarity of up to 30 other target lines of the file to line t (a chance level)."""
    others = [k for k in targets if k != t]
    rng.shuffle(others)
    sims = [edit_similarity(lines[k], lines[t].strip()) for k in others[:30]]
    return sum(sims) / len(sims) if sims else 0.0


def _code_excerpt(
    tokenizer: Any, rng: random.Random, pkg: str, doc_id: str, text: str, others: list[tuple[str, str]], budget: int,
    n_questions: int, min_chars: int, window_lines: int, max_new: int, max_q: int,
) -> tuple[str, list[int], list[dict[str, Any]], dict[str, Any]] | None:
    """The 'excerpt' layout for one target file, or None when it or the package is too small."""
    lines = text.splitlines(keepends=True)
    targets = [t for t in _code_targets(lines, min_chars) if t >= 1]
    if len(targets) < min(n_questions, 4):
        return None
    context, context_ids = _repo_context(tokenizer, pkg, others, budget)
    if len(context_ids) < 0.75 * budget:
        return None
    header = f"# file: {_path(doc_id)} (excerpt)\n"
    questions = []
    for t in _spread(rng, targets, n_questions):
        code = lines[t].rstrip("\n")
        indent = len(code) - len(code.lstrip())
        for k in range(min(window_lines, t), 0, -1):
            body = header + "".join(lines[t - k:t])
            q_ids, gold = _code_cut(tokenizer, body + code, len(body) + indent, len(body) + len(code))
            if len(q_ids) <= max_q:
                break
        else:
            continue  # not even one line before the target fits: skip it
        if not gold:
            continue
        questions.append(make_question(
            f"l{t}", q_ids, [code.strip()], gold, max_new, ["\n"], tokenizer.decode(q_ids),
            {"line": t, "window_lines": k, "chance": _line_chance(lines, targets, t, rng)},
        ))
    if not questions:
        return None
    return context, context_ids, questions, {"targets": len(targets)}


def _code_cut(tokenizer: Any, text: str, code_start: int, code_end: int) -> tuple[list[int], list[int]]:
    """(ids before the target's code, ids of the code): text tokenized once, cut where the tokenizer starts the code."""
    enc = _offsets(tokenizer, text)
    if enc is None:
        return _ids(tokenizer, text[:code_start]), _ids(tokenizer, text[code_start:code_end])
    ids, offs = enc
    cut = _cut_at([e for _, e in offs], code_start)
    end = next((j for j in range(cut, len(ids)) if offs[j][0] >= code_end), len(ids))
    return ids[:cut], ids[cut:end]


def _code_prefix(
    tokenizer: Any, rng: random.Random, pkg: str, doc_id: str, text: str, others: list[tuple[str, str]], budget: int,
    n_questions: int, min_chars: int, window_lines: int, max_new: int, max_q: int,
) -> tuple[str, list[int], list[dict[str, Any]], dict[str, Any]] | None:
    """The 'prefix' layout for one target file, or None when no cut line has two targets within max_q tokens."""
    header = f"# file: {_path(doc_id)}\n"
    lines = text.splitlines(keepends=True)
    targets = _code_targets(lines, min_chars)
    enc = _offsets(tokenizer, header + text)
    if enc is None or len(targets) < 2:
        return None  # the prefix layout cuts the file's own tokenization: it needs offsets
    ids, offs = enc
    line_start = [len(header)]
    for ln in lines:
        line_start.append(line_start[-1] + len(ln))
    ends = [e for _, e in offs]
    tok_at = [_cut_at(ends, c) for c in line_start[:-1]]  # token index where each line starts (healed)
    code_tok = {t: _cut_at(ends, line_start[t] + len(lines[t]) - len(lines[t].lstrip())) for t in targets}
    best: list[tuple[int, int]] = []  # (count, p)
    for p in range(1, len(lines)):
        if tok_at[p] > budget // 2:
            break
        lo = bisect.bisect_right(targets, p - 1)  # targets t >= p: the question holds lines p..t-1 (maybe none)
        count = 0
        for t in targets[lo:]:
            if code_tok[t] - tok_at[p] > max_q:
                break
            if code_tok[t] > tok_at[p]:
                count += 1
        if count >= 2:
            best.append((count, p))
    if not best:
        return None
    top = max(c for c, _ in best)
    p = rng.choice([q for c, q in best if c == top])
    c0 = tok_at[p]
    context, context_ids = _repo_context(tokenizer, pkg, others, budget, tail=tokenizer.decode(ids[:c0]),
                                         tail_ids=ids[:c0])
    if len(context_ids) < 0.75 * budget:
        return None
    questions = []
    for t in targets[bisect.bisect_right(targets, p - 1):]:
        cut = code_tok[t]
        if cut - c0 > max_q or len(questions) >= n_questions:
            break
        if cut <= c0:
            continue
        code_end = line_start[t] + len(lines[t].rstrip("\n"))
        end = next((j for j in range(cut, len(ids)) if offs[j][0] >= code_end), len(ids))
        if end <= cut:
            continue
        questions.append(make_question(
            f"l{t}", ids[c0:cut], [lines[t].strip()], ids[cut:end], max_new, ["\n"], tokenizer.decode(ids[c0:cut]),
            {"line": t, "chance": _line_chance(lines, targets, t, rng)},
        ))
    if not questions:
        return None
    return context, context_ids, questions, {"targets": len(targets), "cut_line": p}


ITEM_BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "kv_retrieval": kv_items,
    "needle": needle_items,
    "classification": classification_items,
    "code_completion": code_items,
}


def build_items(
    tokenizer: Any, tasks: Sequence[str] = tuple(ITEM_BUILDERS), n_items: int = 4,
    context_tokens: int | Sequence[int] = 1024, seed: int = 0, **per_task: dict[str, Any],
) -> list[dict[str, Any]]:
    """Items of several tasks; `per_task` gives a builder's own keyword arguments by task name."""
    unknown = sorted((set(tasks) | set(per_task)) - set(ITEM_BUILDERS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(ITEM_BUILDERS)}")
    items = []
    for task in tasks:
        items += ITEM_BUILDERS[task](tokenizer, n_items=n_items, context_tokens=context_tokens, seed=seed,
                                     **per_task.get(task, {}))
    return items


# ----------------------------------------------------------------- evaluation


class _Recording:
    """The full prefill's `extend` that also keeps every step's last logits [V] (a greedy decode's own logits)."""

    key = ""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def extend(self, model: Any, state: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """FULL.extend, remembering logits[-1]."""
        out = FULL.extend(model, state, input_ids)  # [n, V]
        self.logits.append(out[-1])
        return out


def _engine(model: Any, plan: SparsityPlan | None) -> Any:
    return contextlib.nullcontext() if is_dense(plan) else sparsify(model, plan)


SHARES = ("context", "aligned")


def _spans(plan: SparsityPlan, T: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(dense, sparse) spans of a T-token prefill from position 0 under plan (the engine's own layout)."""
    own = getattr(plan, "spans", None)
    if callable(own):
        return own(T, 0)
    return split_blocks(T, plan.block_size, plan.dense_first, plan.dense_last, 0)


def shared_tokens(item: dict[str, Any], plan: SparsityPlan | None, share: str = "context") -> int:
    """How many context tokens are prefilled once (the rest of the context goes with every question).

    share='context': the whole context (its own blocks aligned to its start, its last block sparse; each
    question alone is the dense tail). share='aligned': the longest prefix that is a whole number of blocks
    and ends at or before the dense tail of EVERY question's one-prompt layout (context + question in one
    call), so each question's suffix prefill (the context's remaining tokens + the question) reproduces that
    one-prompt layout exactly, whatever the plan's tail rule; 0 (no sharing) when no such prefix exists.
    A dense plan shares the whole context in both modes.
    """
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}")
    n = len(item["context_ids"])
    if share == "context" or is_dense(plan):
        return n
    B = plan.block_size
    cut = n
    if plan.dense_last:
        for q in item["questions"]:
            dense, _ = _spans(plan, n + len(q["question_ids"]))
            cut = min(cut, dense[-1][0] if dense else n)  # the dense tail is the last dense span
    return cut // B * B


@torch.no_grad()
def answer_item(
    model: Any, tokenizer: Any, item: dict[str, Any], plan: SparsityPlan | None = None,
    qids: Sequence[str] | None = None, max_new_tokens_cap: int | None = None, share: str = "context",
) -> list[dict[str, Any]]:
    """Records of an item's questions (all, or those in `qids`): the shared context prefilled once, then suffixes.

    The shared part (`shared_tokens`) is prefilled under `plan.replace(dense_last=False)`; each question's
    suffix (share='context': the question; 'aligned': the context's remaining tokens + the question) under
    `plan` from a copy of that cache. One `sparsify` session spans the item, so policies that keep the first
    block's scores (first_block_static) see them in the suffix prefills and decode steps. When the greedy
    answer starts with gold[:-1] (a right answer), the decode steps' own logits are the teacher-forced ones
    and the extra forward is skipped (`gold_from_decode`); otherwise the gold ids are fed to a copy of the
    post-question state (one forward; per token under sparse decode).
    """
    p = as_plan(plan)
    sparse = not is_dense(plan)
    sparse_decode = sparse and p.sparse_decode
    n_shared = shared_tokens(item, plan, share)
    check_item(item, p.block_size if share == "context" and sparse else None,
               sparse_decode and n_shared == len(item["context_ids"]))
    dev = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    rest = item["context_ids"][n_shared:]
    todo = [q for q in item["questions"] if qids is None or q["qid"] in set(qids)]
    records = []
    with _engine(model, plan):
        t0 = time.perf_counter()
        ctx = None
        if n_shared:
            with _engine(model, p.replace(dense_last=False) if sparse else None):  # its last block: sparse
                ctx = FULL.prefill(model, torch.tensor([item["context_ids"][:n_shared]], device=dev))
        prefill_s = time.perf_counter() - t0
        for q in todo:
            t1 = time.perf_counter()
            state = None if ctx is None else copy_state(ctx.state)
            suffix = torch.tensor([rest + q["question_ids"]], device=dev)  # [1, n]
            first, state, _ = FULL.prefill(model, suffix, state)  # first: logits [V]
            suffix_s = time.perf_counter() - t1
            tf_state = copy_state(state)
            gold = torch.tensor(q["gold_ids"], device=dev)  # [P]
            max_new = q["max_new_tokens"] if max_new_tokens_cap is None else min(q["max_new_tokens"],
                                                                                 max_new_tokens_cap)
            with contextlib.nullcontext() if sparse_decode or not sparse else sparsify(model, dense_plan()):
                steps = _Recording()
                new = greedy_decode(model, first, state, max_new, steps, eos, stop_strings(tokenizer, q["stop"]))
                n_gold = len(gold)
                reused = len(new) >= n_gold and new[: n_gold - 1] == q["gold_ids"][: n_gold - 1]
                if reused:  # the greedy steps fed gold[:-1]: their logits ARE the teacher-forced ones
                    logits = torch.stack([first.reshape(-1)] + steps.logits[: n_gold - 1])  # [P, V]
                else:
                    logits = teacher_forced(model, first, tf_state, gold, FULL, stepwise=sparse_decode)  # [P, V]
            lp = -token_nll(logits, gold)  # [P] log-probs of the gold tokens
            pred = tokenizer.decode(new, skip_special_tokens=True)
            records.append({
                "uid": f"{item['uid']}/{q['qid']}", "item_uid": item["uid"], "qid": q["qid"], "task": item["task"],
                "category": item["category"], "metric": item["metric"], "domain": item["domain"],
                "chance": q["meta"].get("chance", item["chance"]),
                "score": score_prediction(pred, q["answers"], item["metric"], item["all_classes"]),
                "gold_logprob": float(lp.sum()), "gold_nll": float(-lp.mean()), "gold_tokens": len(q["gold_ids"]),
                "gold_token_logprobs": [round(v, 6) for v in lp.tolist()],
                "gold_top1": float((logits.argmax(-1) == gold).float().mean()), "gold_from_decode": reused,
                "prediction": pred, "new_ids": new, "n_new_tokens": len(new),
                "n_context_tokens": len(item["context_ids"]), "n_question_tokens": len(q["question_ids"]),
                "n_shared_tokens": n_shared, "n_suffix_tokens": suffix.shape[1], "share": share,
                "n_questions": len(item["questions"]), "prefill_s": prefill_s, "suffix_prefill_s": suffix_s,
                "time_s": time.perf_counter() - t1,
            })
    return records


def evaluate_items(
    model: Any, tokenizer: Any, items: Sequence[dict[str, Any]], plan: SparsityPlan | None = None,
    cache_dir: str | Path | None = None, progress: bool = True, max_new_tokens_cap: int | None = None,
    share: str = "context",
) -> list[dict[str, Any]]:
    """Per-question records of `items` under `plan` (None = dense), cached; in item then question order.

    `share` (see `shared_tokens`): 'context' prefills the whole context once and runs each question alone as
    the dense tail (the paper's layout with the question as the last block); 'aligned' shares the longest
    block-aligned prefix, so every record equals a one-prompt prefill of context + question under `plan`
    (the runner's layout) at the price of re-prefilling up to about one block of context per question.

    Each record: uid (item uid + '/' + qid), item_uid, qid, task, domain, score (the item's metric), gold_logprob
    (sum), gold_nll (mean per token), gold_tokens, gold_token_logprobs, gold_top1, prediction, new_ids,
    n_context_tokens, n_question_tokens, n_shared_tokens, n_suffix_tokens, prefill_s (the item's one shared
    prefill, the same in all its records), suffix_prefill_s and time_s (this question's own work: cache copies,
    suffix prefill, decode, teacher forcing), gold_from_decode (the gold log-likelihood came from the greedy
    steps, see `answer_item`). The cache (`runner.ResultCache`, one JSONL per configuration) is keyed by the
    model fingerprint, `plan.key()`, this suite and the sharing mode; a record by its uid, so a rerun computes
    only missing questions (an item whose questions are all cached is not prefilled).
    """
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}")
    items = list(items)
    if not items:
        return []
    model_fp = model_fingerprint(model)
    suite = f"{MULTIQ_SUITE}/{MULTIQ_VERSION}"
    method = f"{METHOD_KEY}/{share}"
    key = config_key(model_fp, plan, suite, 0, method)
    meta = {"model": model_fp, "model_name": getattr(model, "ffcore_name", None), "plan": as_plan(plan).describe(),
            "suite": suite, "prefill": method}
    cache = ResultCache(cache_dir, key, meta)
    todo = [it for it in items if any(f"{it['uid']}/{q['qid']}" not in cache.records for q in it["questions"])]
    desc = f"{meta['model_name'] or 'model'} {as_plan(plan).policy_name} multi-q"
    for it in _progress(todo, progress, desc):
        missing = [q["qid"] for q in it["questions"] if f"{it['uid']}/{q['qid']}" not in cache.records]
        for rec in answer_item(model, tokenizer, it, plan, missing, max_new_tokens_cap, share):
            cache.add(rec)
    return [cache.records[f"{it['uid']}/{q['qid']}"] for it in items for q in it["questions"]]


def _progress(items: list[Any], on: bool, desc: str) -> Any:
    if not on or not items:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def cost_summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds per question: the context prefill amortised over its item's questions plus the question's own work."""
    items: dict[str, float] = {}
    for r in records:
        items[r["item_uid"]] = r["prefill_s"]
    n = max(1, len(records))
    own = sum(r["time_s"] for r in records)
    return {"questions": len(records), "items": len(items),
            "context_prefill_s": sum(items.values()) / max(1, len(items)),
            "own_time_s": own / n, "seconds_per_question": (sum(items.values()) + own) / n}
