"""A local long-context suite in LongBench's spirit, built offline from the corpora's eval split.

Five tasks, each a `datasets.Dataset` row per sample (see `ROW_FIELDS`), deterministic for a
seed and a tokenizer (the same seed gives identical prompts; prompt lengths are fitted to a
token budget with the model's own tokenizer, so prompts differ between tokenizers):

* `code_completion` (Code, like LongBench lcc): the prefix of a standard-library file up to
  a line; predict the next non-trivial code line; edit similarity (fuzz ratio / 100). The prompt
  is cut at the tokenizer's own boundary before the line's code (`healed_ids`), so it may end with
  the line's indentation.
  Chance = mean edit similarity of random other code lines of the same file to the target.
* `kv_retrieval` (Synthetic): a JSON object of random keys -> values (word-pair keys and
  6-digit values, or UUID-like hex), a one-shot example, then ask one key's value; exact
  match. Chance = 1 / number of pairs.
* `passkey` (Synthetic): "The pass key is 68213. Remember it. ..." buried at a random depth
  in real prose; the prompt ends "The pass key is"; exact match on the number.
  Chance = 1 / 9 * 10^(digits-1) (guessing a number of that many digits).
* `classification` (Few-shot, like LongBench trec): many labelled stdlib code snippets
  ("Module: email.feedparser"), then a new snippet; accuracy. Chance = 1 / number of classes.
* `continuation` (Language modelling): a window of eval-split text; the true next
  `continuation_tokens` tokens are scored teacher-forced (score = top-1 accuracy on the
  true tokens; also NLL, KL and top-1 agreement with the dense model, and greedy agreement
  with the dense model's continuation). Chance = 1 / vocabulary size.

Every document comes from the 'eval' split of `ffcore.data`, disjoint from the documents
the predictor and compensator are trained or calibrated on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import random
import re
import textwrap
import tokenize as pytokenize
from typing import Any, Callable, Mapping, Sequence

from ffcore.config import StrictConfig
from ffcore.data import documents, domains_of, family_of
from ffcore.evaluation.metrics import edit_similarity

SUITE_NAME = "ffcore-local"
SUITE_VERSION = "2"

ROW_FIELDS = (
    "uid", "suite", "seed", "task", "category", "kind", "metric", "first_line_only", "prompt",
    "prompt_ids", "answers", "all_classes", "chance", "max_new_tokens", "stop", "target_ids", "meta",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task of the local suite: its LongBench-style category, metric and generation kind."""

    name: str
    category: str
    metric: str
    kind: str  # 'generate' (greedy answer, scored by `metric`) or 'continuation' (teacher forced)
    description: str


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("code_completion", "Code", "edit_sim", "generate", "next line of a stdlib .py file"),
        TaskSpec("kv_retrieval", "Synthetic", "exact_match", "generate", "value of one key in a long JSON object"),
        TaskSpec("passkey", "Synthetic", "first_number", "generate", "pass key buried in real prose"),
        TaskSpec("classification", "Few-shot", "label_match", "generate", "many-shot stdlib package of a code snippet"),
        TaskSpec("continuation", "Language modelling", "token_acc", "continuation", "next tokens of eval text"),
    )
}
TASK_NAMES = tuple(TASKS)
DEFAULT_FAMILIES = ("asyncio", "multiprocessing", "tkinter", "unittest", "xml")


@dataclasses.dataclass
class SuiteConfig(StrictConfig):
    """How the local suite is built.

    n_per_task:          samples per task.
    context_tokens:      prompt token budgets; sample i of a task uses entry i % len (~1K in the default profiles; 1K-4K on a faster machine).
    tasks:               which tasks to build (names in `TASKS`).
    seed:                everything random (documents, keys, depths, shots) derives from it.
    kv_format:           'words' (keys like 'amber-lambda' from eval-prose words, values 6-digit
                         numbers) or 'hex' (keys and values of `kv_key_chars` hex digits, UUID-like).
                         Small models match hex keys poorly (one token per hex digit).
    kv_key_chars:        hex characters per key and per value in 'hex' format.
    kv_one_shot:         show one solved lookup (another key of the same object) before the question.
    passkey_digits:      digits of the pass key.
    classify_by:         'module' (classes = stdlib files, e.g. 'email.feedparser') or 'package'
                         (classes = `classify_families`, e.g. 'asyncio').
    classify_classes:    classes per prompt when classify_by='module' (drawn per sample).
    classify_min_snippets: a module needs this many snippets to be a class.
    classify_families:   stdlib packages used as classes when classify_by='package'.
    classify_snippet_lines: lines per snippet (from a `def` line).
    classify_hide_label: drop snippets that contain their own package name.
    code_min_chars:      a target line has at least this many non-blank characters.
    code_max_new_tokens: greedy tokens for the code answer (stops at the end of the line).
    continuation_tokens: true next tokens scored teacher-forced.
    continuation_greedy: greedy tokens compared with the dense model's greedy continuation.
    depth_range:         where the needle/queried key sits, as a fraction of the context.
    """

    n_per_task: int = 8
    context_tokens: tuple[int, ...] = (1024, 2048)
    tasks: tuple[str, ...] = TASK_NAMES
    seed: int = 0
    kv_format: str = "words"
    kv_key_chars: int = 8
    kv_one_shot: bool = True
    passkey_digits: int = 5
    classify_by: str = "package"
    classify_classes: int = 6
    classify_min_snippets: int = 6
    classify_families: tuple[str, ...] = DEFAULT_FAMILIES
    classify_snippet_lines: int = 6
    classify_hide_label: bool = True
    code_min_chars: int = 12
    code_max_new_tokens: int = 48
    continuation_tokens: int = 64
    continuation_greedy: int = 16
    depth_range: tuple[float, float] = (0.1, 0.9)

    def __post_init__(self) -> None:
        self.context_tokens = tuple(int(c) for c in self.context_tokens)
        self.tasks = tuple(self.tasks)
        self.classify_families = tuple(self.classify_families)
        self.depth_range = tuple(float(x) for x in self.depth_range)  # type: ignore[assignment]
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
        if self.n_per_task < 1 or not self.context_tokens or min(self.context_tokens) < 128:
            raise ValueError("need n_per_task >= 1 and context_tokens entries >= 128")
        if self.kv_format not in ("words", "hex"):
            raise ValueError(f"kv_format must be 'words' or 'hex', got {self.kv_format!r}")
        if self.classify_by not in ("module", "package") or self.classify_classes < 2:
            raise ValueError("classify_by must be 'module' or 'package', and classify_classes >= 2")
        lo, hi = self.depth_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"depth_range must satisfy 0 <= lo <= hi <= 1, got {self.depth_range}")
        if not 1 <= self.kv_key_chars <= 64 or not 1 <= self.passkey_digits <= 12:
            raise ValueError("kv_key_chars must be in [1, 64] and passkey_digits in [1, 12]")


# ----------------------------------------------------------------- rows and helpers


def make_row(**fields: Any) -> dict[str, Any]:
    """A suite row with defaults filled in and a content hash `uid` (stable across runs)."""
    row: dict[str, Any] = {
        "suite": SUITE_NAME, "seed": 0, "category": "", "kind": "generate", "first_line_only": False,
        "prompt": "", "prompt_ids": [], "answers": [], "all_classes": [], "chance": 0.0,
        "max_new_tokens": 32, "stop": [], "target_ids": [], "meta": "{}",
    }
    row.update(fields)
    if isinstance(row["meta"], dict):
        row["meta"] = json.dumps(row["meta"], sort_keys=True)
    ident = {k: row[k] for k in ("suite", "task", "kind", "metric", "prompt_ids", "answers", "target_ids",
                                 "max_new_tokens", "stop", "first_line_only", "all_classes")}
    row["uid"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    missing = set(ROW_FIELDS) - set(row)
    if missing:
        raise ValueError(f"row is missing fields {sorted(missing)}")
    return {k: row[k] for k in ROW_FIELDS}


def _rng(seed: int, task: str, i: int) -> random.Random:
    """The random stream of one sample (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"{SUITE_NAME}/{SUITE_VERSION}/{seed}/{task}/{i}")


def n_tokens(tokenizer: Any, text: str) -> int:
    """Prompt length in tokens, special tokens (BOS) included."""
    return len(tokenizer(text)["input_ids"])


def fit_units(render: Callable[[int], str], n_max: int, budget: int, tokenizer: Any) -> tuple[int, str]:
    """The largest unit count n in [1, n_max] whose `render(n)` fits in `budget` tokens (binary search)."""
    lo, hi = 1, n_max
    if n_tokens(tokenizer, render(1)) > budget:
        raise ValueError(f"even one unit exceeds the budget of {budget} tokens; raise context_tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(tokenizer, render(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, render(lo)


@functools.lru_cache(maxsize=4)
def _eval_docs(source: str) -> tuple[tuple[str, str], ...]:
    """(doc_id, text) of the eval split of one source, in id order (cached per process)."""
    ds = documents(source, "eval")
    return tuple(sorted(zip(ds["doc_id"], ds["text"])))


def _family(doc_id: str) -> str:
    rel = doc_id.split(":", 1)[1]
    return rel.split("/")[0] if "/" in rel else ""


def _depth(rng: random.Random, cfg: SuiteConfig) -> float:
    return rng.uniform(*cfg.depth_range)


# ----------------------------------------------------------------- passkey


PASSKEY_HEAD = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n\n"
)


PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def _prose_lines() -> list[str]:
    lines: list[str] = []
    for _, text in _eval_docs("prose"):
        lines += text.strip("\n").split("\n") + [""]
    return lines


def _insert_at_paragraph(lines: list[str], pos: float, needle: str) -> list[str]:
    """Insert `needle` as its own paragraph at the paragraph boundary nearest to line `pos`."""
    bounds = [j for j in range(len(lines) + 1) if j == 0 or j == len(lines) or not lines[j - 1].strip()]
    j = min(bounds, key=lambda b: (abs(b - pos), b))
    return lines[:j] + ([""] if j and lines[j - 1].strip() else []) + [needle, ""] + lines[j:]


def _passkey_rows(tokenizer: Any, cfg: SuiteConfig) -> list[dict[str, Any]]:
    prose = _prose_lines()
    rows = []
    lo_key, hi_key = 10 ** (cfg.passkey_digits - 1), 10**cfg.passkey_digits - 1
    for i in range(cfg.n_per_task):
        rng = _rng(cfg.seed, "passkey", i)
        budget = cfg.context_tokens[i % len(cfg.context_tokens)]
        key = str(rng.randint(lo_key, hi_key))
        starts = [j for j in range(len(prose)) if j == 0 or not prose[j - 1].strip()]  # paragraph starts
        start = rng.choice(starts)
        stream = prose[start:] + prose[:start]
        depth = _depth(rng, cfg)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def render(n: int, stream: list[str] = stream, needle: str = needle, depth: float = depth) -> str:
            body = _insert_at_paragraph(stream[:n], depth * n, needle)
            return PASSKEY_HEAD + "\n".join(body).strip("\n") + PASSKEY_QUESTION

        n, prompt = fit_units(render, len(stream), budget, tokenizer)
        rows.append(make_row(
            seed=cfg.seed, task="passkey", category=TASKS["passkey"].category, metric="first_number",
            prompt=prompt, prompt_ids=tokenizer(prompt)["input_ids"], answers=[key],
            chance=1.0 / (hi_key - lo_key + 1), max_new_tokens=cfg.passkey_digits + 4, stop=["\n", "."],
            meta={"budget": budget, "depth": round(depth, 4), "lines": n, "first_line": start},
        ))
    return rows


# ----------------------------------------------------------------- key-value retrieval


KV_HEAD = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


@functools.lru_cache(maxsize=1)
def _prose_words() -> tuple[str, ...]:
    """Distinct lower-case alphabetic words (4-10 letters) of the eval prose, sorted."""
    words: set[str] = set()
    for _, text in _eval_docs("prose"):
        words.update(w for w in re.findall(r"[a-z]{4,10}", text) if w.isalpha())
    return tuple(sorted(words))


def _kv_item(rng: random.Random, cfg: SuiteConfig, key: bool) -> str:
    """A key or value: hex ('a3f9c2d1') or words format (keys 'amber-lambda', values 6-digit numbers)."""
    if cfg.kv_format == "hex":
        return _hex(rng, cfg.kv_key_chars)
    if key:
        words = _prose_words()
        return f"{rng.choice(words)}-{rng.choice(words)}"
    return str(rng.randint(100000, 999999))


def _kv_rows(tokenizer: Any, cfg: SuiteConfig) -> list[dict[str, Any]]:
    rows = []
    for i in range(cfg.n_per_task):
        rng = _rng(cfg.seed, "kv_retrieval", i)
        budget = cfg.context_tokens[i % len(cfg.context_tokens)]
        n_max = budget  # far more pairs than can ever fit
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < n_max:
            k = _kv_item(rng, cfg, True)
            if k not in seen:
                seen.add(k)
                keys.append(k)
        values: list[str] = []
        vseen: set[str] = set()
        while len(values) < n_max:  # distinct values: a right answer is never ambiguous
            v = _kv_item(rng, cfg, False)
            if v not in vseen:
                vseen.add(v)
                values.append(v)
        depth, shot_u = _depth(rng, cfg), rng.random()

        def pick(n: int, depth: float = depth, shot_u: float = shot_u) -> tuple[int, int]:
            q = min(n - 1, int(depth * n))
            s = min(n - 1, int(shot_u * n))
            if s == q:
                s = (q + 1) % n if n > 1 else q
            return q, s

        def render(n: int, keys: list[str] = keys, values: list[str] = values) -> str:
            q, s = pick(n)
            lines = ",\n ".join(f'"{keys[j]}": "{values[j]}"' for j in range(n))
            shot = f'Key: "{keys[s]}"\nCorresponding value: "{values[s]}"\n\n' if cfg.kv_one_shot and n > 1 else ""
            return f'{KV_HEAD}{{{lines}}}\n\n{shot}Key: "{keys[q]}"\nCorresponding value: "'

        n, prompt = fit_units(render, n_max, budget, tokenizer)
        q, s = pick(n)
        rows.append(make_row(
            seed=cfg.seed, task="kv_retrieval", category=TASKS["kv_retrieval"].category,
            metric="exact_match", prompt=prompt, prompt_ids=tokenizer(prompt)["input_ids"],
            answers=[values[q]], chance=1.0 / n, max_new_tokens=2 * max(cfg.kv_key_chars, 6) + 4, stop=['"', "\n"],
            meta={"budget": budget, "pairs": n, "query_index": q, "shot_index": s},
        ))
    return rows


# ----------------------------------------------------------------- many-shot classification


CLASSIFY_HEAD = "Each Python code snippet below comes from one of these standard-library {what}: {labels}.\n\n"


def _snippets(text: str, n_lines: int) -> list[str]:
    """Function snippets of a source file: a `def` line and up to n_lines - 1 lines of its body, dedented."""
    lines = text.split("\n")
    out = []
    for i, ln in enumerate(lines):
        if not re.match(r"\s*(async\s+)?def\s", ln):
            continue
        indent = len(ln) - len(ln.lstrip())
        body = [ln]
        for nxt in lines[i + 1:]:
            if len(body) >= n_lines or (nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent):
                break
            body.append(nxt)
        chunk = textwrap.dedent("\n".join(body)).rstrip()
        if sum(1 for c in chunk.split("\n") if c.strip()) >= min(4, n_lines):
            out.append(chunk)
    return out


def _module_name(doc_id: str) -> str:
    """'code:email/feedparser.py' -> 'email.feedparser'."""
    rel = doc_id.split(":", 1)[1]
    return rel[:-3].replace("/", ".") if rel.endswith(".py") else rel.replace("/", ".")


@functools.lru_cache(maxsize=8)
def _snippet_pool(by: str, families: tuple[str, ...], n_lines: int, hide_label: bool) -> dict[str, tuple[str, ...]]:
    """Class label -> distinct snippets, for classes by 'package' (among `families`) or by 'module' (file)."""
    pool: dict[str, list[str]] = {}
    for doc_id, text in _eval_docs("code"):
        fam = _family(doc_id)
        if by == "package":
            if fam not in families:
                continue
            label, hidden = fam, fam
        else:
            if fam == "encodings" or _module_name(doc_id).endswith("__init__"):
                continue
            label = _module_name(doc_id)
            hidden = label.split(".")[-1].strip("_")
        for snip in _snippets(text, n_lines):
            if hide_label and hidden.lower() in snip.lower():
                continue
            pool.setdefault(label, []).append(snip)
    return {f: tuple(dict.fromkeys(v)) for f, v in pool.items() if len(set(v)) >= 2}


def _classification_rows(tokenizer: Any, cfg: SuiteConfig) -> list[dict[str, Any]]:
    pool = _snippet_pool(cfg.classify_by, cfg.classify_families, cfg.classify_snippet_lines, cfg.classify_hide_label)
    if cfg.classify_by == "module":
        pool = {k: v for k, v in pool.items() if len(v) >= cfg.classify_min_snippets}
    if len(pool) < 2 or (cfg.classify_by == "module" and len(pool) < cfg.classify_classes):
        raise ValueError(
            f"classification by {cfg.classify_by} finds only {len(pool)} classes with snippets in the eval split "
            f"({sorted(pool)}); lower classify_classes / classify_min_snippets or change classify_families"
        )
    rows = []
    for i in range(cfg.n_per_task):
        rng = _rng(cfg.seed, "classification", i)
        budget = cfg.context_tokens[i % len(cfg.context_tokens)]
        if cfg.classify_by == "module":
            labels = sorted(rng.sample(sorted(pool), cfg.classify_classes))
            label = rng.choice(labels)
        else:
            labels = sorted(pool)
            label = labels[i % len(labels)] if cfg.n_per_task >= len(labels) else rng.choice(labels)
        what = "modules" if cfg.classify_by == "module" else "packages"
        head = CLASSIFY_HEAD.format(what=what, labels=", ".join(labels))
        field = "Module" if cfg.classify_by == "module" else "Package"
        query = rng.choice(pool[label])
        # balanced shots: round-robin over shuffled classes, each class's snippets shuffled
        per_class = {f: [s for s in pool[f] if s != query] for f in labels}
        for f in labels:
            rng.shuffle(per_class[f])
        order: list[tuple[str, str]] = []
        depth = max(len(v) for v in per_class.values())
        for r in range(depth):
            round_labels = list(labels)
            rng.shuffle(round_labels)
            order += [(f, per_class[f][r]) for f in round_labels if r < len(per_class[f])]

        def render(n: int, order: list[tuple[str, str]] = order, query: str = query, head: str = head,
                   field: str = field) -> str:
            shots = "".join(f"Code:\n{s}\n{field}: {f}\n\n" for f, s in order[:n])
            return f"{head}{shots}Code:\n{query}\n{field}:"

        n, prompt = fit_units(render, len(order), budget, tokenizer)
        rows.append(make_row(
            seed=cfg.seed, task="classification", category=TASKS["classification"].category,
            metric="label_match", prompt=prompt, prompt_ids=tokenizer(prompt)["input_ids"], answers=[label],
            all_classes=labels, chance=1.0 / len(labels), max_new_tokens=12, stop=["\n"],
            meta={"budget": budget, "shots": n, "classes": len(labels), "by": cfg.classify_by},
        ))
    return rows


# ----------------------------------------------------------------- code completion


def _code_line_starts(text: str) -> set[int]:
    """0-based indices of physical lines where a logical line of code starts with a name/keyword."""
    starts: set[int] = set()
    prev_end_row = 0
    new_logical = True
    try:
        for tok in pytokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (pytokenize.NEWLINE,):
                new_logical = True
                continue
            if tok.type in (pytokenize.NL, pytokenize.COMMENT, pytokenize.INDENT, pytokenize.DEDENT,
                            pytokenize.ENCODING):
                continue
            if new_logical:
                if tok.type == pytokenize.NAME and tok.start[0] > prev_end_row:
                    starts.add(tok.start[0] - 1)
                new_logical = False
            prev_end_row = tok.end[0]
    except (pytokenize.TokenError, IndentationError, SyntaxError):
        pass
    return starts


# Lines a completion is not asked for: block keywords alone, and def/class/decorator lines
# (new names are unpredictable from context; LongBench's lcc targets are mostly body lines).
_TRIVIAL = re.compile(r"^(else:|try:|finally:|pass|break|continue|return|raise|\)|\]|\}|@.*|def .*|async def .*|class .*)$")


def _code_targets(lines: list[str], min_chars: int) -> list[int]:
    text = "".join(lines)
    starts = _code_line_starts(text)
    out = []
    for i in sorted(starts):
        s = lines[i].strip()
        if len(s) >= min_chars and not _TRIVIAL.match(s) and not s.startswith(("#", '"', "'")):
            out.append(i)
    return out


def healed_ids(tokenizer: Any, prompt: str, target_line: str) -> list[int]:
    """Prompt ids cut where the tokenizer itself would start the target line's code (token healing).

    A prompt that ends with a bare newline is an unnatural token sequence for tokenizers that merge a
    newline with the next line's indentation (GPT-2-style BPE: '\\n       ' + ' self'): the model then
    starts its answer with a stray token. Tokenizing prompt + target line together and cutting before
    the first token that reaches the target's first non-blank character keeps every prompt token
    natural (indentation included when the tokenizer keeps it separate). Falls back to the plain
    prompt for tokenizers without offsets.
    """
    p = len(prompt) + len(target_line) - len(target_line.lstrip())
    try:
        enc = tokenizer(prompt + target_line, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return list(tokenizer(prompt)["input_ids"])
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    cut = next((i for i, (_, end) in enumerate(offsets) if end > p), len(ids))
    return list(ids[:cut])


def _code_rows(tokenizer: Any, cfg: SuiteConfig) -> list[dict[str, Any]]:
    docs = [(d, t) for d, t in _eval_docs("code") if _family(d) != "encodings"]  # encodings: near-duplicates
    rows = []
    for i in range(cfg.n_per_task):
        rng = _rng(cfg.seed, "code_completion", i)
        budget = cfg.context_tokens[i % len(cfg.context_tokens)]
        order = list(range(len(docs)))
        rng.shuffle(order)
        for j in order:
            doc_id, text = docs[j]
            lines = text.splitlines(keepends=True)
            counts = [len(c) for c in tokenizer(lines, add_special_tokens=False)["input_ids"]] if lines else []
            cum = [0]
            for c in counts:
                cum.append(cum[-1] + c)
            targets = [t for t in _code_targets(lines, cfg.code_min_chars) if cum[t] >= budget]
            if targets:
                break
        else:
            raise ValueError(f"no eval-split code file has {budget} tokens before a code line; lower context_tokens")
        t = rng.choice(targets)

        def render(n: int, lines: list[str] = lines, t: int = t) -> str:
            return "".join(lines[t - n:t])

        n, prompt = fit_units(render, t, max(1, budget - 4), tokenizer)
        ids = healed_ids(tokenizer, prompt, lines[t])
        while len(ids) > budget and n > 1:  # the healed prompt adds the indentation's tokens
            n -= 1
            prompt = render(n)
            ids = healed_ids(tokenizer, prompt, lines[t])
        target = lines[t].strip()
        others = [k for k in _code_targets(lines, cfg.code_min_chars) if k != t]
        rng.shuffle(others)
        sims = [edit_similarity(lines[k], target) for k in others[:30]]
        rows.append(make_row(
            seed=cfg.seed, task="code_completion", category=TASKS["code_completion"].category,
            metric="edit_sim", prompt=tokenizer.decode(ids, skip_special_tokens=True), prompt_ids=ids, answers=[target],
            chance=sum(sims) / len(sims) if sims else 0.0, max_new_tokens=cfg.code_max_new_tokens,
            stop=["\n"], meta={"budget": budget, "doc_id": doc_id, "line": t, "context_lines": n},
        ))
    return rows


# ----------------------------------------------------------------- long-document continuation


def continuation_windows(
    tokenizer: Any, domains: Sequence[str], n_per_domain: int, context_tokens: int, continuation_tokens: int,
    greedy_tokens: int = 16, seed: int = 0, split: str = "eval",
) -> list[dict[str, Any]]:
    """Continuation rows (a window of a domain's text, the true next tokens scored teacher-forced), n per domain.

    Windows of a domain come from consecutive documents of `split` starting at a random document
    (`seed`); every row's `meta` names its domain and family, so results can be split in-domain vs
    out-of-domain by whoever trained the parts being evaluated.
    """
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    vocab = len(tokenizer)
    rows = []
    for domain in domains:
        ds = documents(domain, split)
        docs = list(zip(ds["doc_id"], ds["text"]))
        if not docs:
            raise ValueError(f"domain {domain!r} has no {split} documents")
        need = context_tokens + continuation_tokens - len(bos)
        for i in range(n_per_domain):
            rng = _rng(seed, f"continuation/{domain}", i)
            start = rng.randrange(len(docs))
            ids: list[int] = []
            used = []
            for k in range(len(docs)):
                doc_id, text = docs[(start + k) % len(docs)]
                ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
                used.append(doc_id)
                if len(ids) >= need:
                    break
            if len(ids) < need:
                raise ValueError(f"the {split} split of {domain} holds fewer than {need} tokens")
            ids = bos + ids[:need]
            prompt_ids, target_ids = ids[:context_tokens], ids[context_tokens:]
            rows.append(make_row(
                seed=seed, task="continuation", category=TASKS["continuation"].category, kind="continuation",
                metric="token_acc", prompt=tokenizer.decode(prompt_ids, skip_special_tokens=True),
                prompt_ids=prompt_ids, answers=[tokenizer.decode(target_ids, skip_special_tokens=True)],
                target_ids=target_ids, chance=1.0 / vocab, max_new_tokens=greedy_tokens,
                meta={"budget": context_tokens, "source": domain, "domain": domain, "family": family_of(domain),
                      "doc_ids": used},
            ))
    return rows


def kl_windows(tokenizer: Any, families: Sequence[str], n: int, ctx: int, cont: int, seed: int = 0) -> list[dict]:
    """`n` continuation windows per family (eval split), cycling over the family's installed domains."""
    rows = []
    for family in families:
        doms = domains_of([family])
        picks = [doms[i % len(doms)] for i in range(n)]
        for dom in dict.fromkeys(picks):
            rows += continuation_windows(tokenizer, [dom], picks.count(dom), ctx, cont, seed=seed)
    return rows


def window_family(row: Mapping[str, Any]) -> str:
    """The family a continuation row (from `kl_windows`) was drawn from."""
    return json.loads(row["meta"])["family"] if isinstance(row["meta"], str) else row["meta"]["family"]


def _continuation_rows(tokenizer: Any, cfg: SuiteConfig) -> list[dict[str, Any]]:
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    sources = ("prose", "code")
    vocab = len(tokenizer)
    rows = []
    for i in range(cfg.n_per_task):
        rng = _rng(cfg.seed, "continuation", i)
        budget = cfg.context_tokens[i % len(cfg.context_tokens)]
        source = sources[i % 2]
        docs = list(_eval_docs(source))
        start = rng.randrange(len(docs))
        need = budget + cfg.continuation_tokens - len(bos)
        ids: list[int] = []
        used = []
        for k in range(len(docs)):
            doc_id, text = docs[(start + k) % len(docs)]
            ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
            used.append(doc_id)
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise ValueError(f"the eval split of {source} holds fewer than {need} tokens")
        ids = bos + ids[:need]
        prompt_ids, target_ids = ids[:budget], ids[budget:]
        rows.append(make_row(
            seed=cfg.seed, task="continuation", category=TASKS["continuation"].category, kind="continuation",
            metric="token_acc", prompt=tokenizer.decode(prompt_ids, skip_special_tokens=True),
            prompt_ids=prompt_ids, answers=[tokenizer.decode(target_ids, skip_special_tokens=True)],
            target_ids=target_ids, chance=1.0 / vocab, max_new_tokens=cfg.continuation_greedy,
            meta={"budget": budget, "source": source, "doc_ids": used},
        ))
    return rows


_BUILDERS: dict[str, Callable[[Any, SuiteConfig], list[dict[str, Any]]]] = {
    "code_completion": _code_rows,
    "kv_retrieval": _kv_rows,
    "passkey": _passkey_rows,
    "classification": _classification_rows,
    "continuation": _continuation_rows,
}


def build_suite(tokenizer: Any, config: SuiteConfig | None = None) -> Any:
    """The local suite as a `datasets.Dataset` (one row per sample, fields `ROW_FIELDS`)."""
    from datasets import Dataset

    cfg = config or SuiteConfig()
    rows: list[dict[str, Any]] = []
    for task in cfg.tasks:
        rows += _BUILDERS[task](tokenizer, cfg)
    return Dataset.from_list(rows)


def suite_overview(dataset: Any) -> list[dict[str, Any]]:
    """Per task: samples, prompt-length range (tokens) and mean chance level (for a notebook table)."""
    out: dict[str, dict[str, Any]] = {}
    for r in dataset:
        d = out.setdefault(r["task"], {"task": r["task"], "category": r["category"], "metric": r["metric"],
                                       "n": 0, "min_tokens": 10**9, "max_tokens": 0, "chance": 0.0})
        d["n"] += 1
        d["min_tokens"] = min(d["min_tokens"], len(r["prompt_ids"]))
        d["max_tokens"] = max(d["max_tokens"], len(r["prompt_ids"]))
        d["chance"] += r["chance"]
    for d in out.values():
        d["chance"] = d["chance"] / d["n"]
    return list(out.values())


def task_specs(names: Sequence[str] | None = None) -> list[TaskSpec]:
    """The specs of the named tasks (all by default)."""
    return [TASKS[n] for n in (names or TASK_NAMES)]
