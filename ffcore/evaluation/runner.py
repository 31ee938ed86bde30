"""Run a suite (local or LongBench) under a sparsity plan, with an incremental on-disk cache.

Per sample: ONE prefill of the prompt under the engine (`sparsify(model, plan)`) by a prefill
method (`ffcore.evaluation.prefill`: the whole prompt by default, or SpecPrefill's kept tokens), then a
KV-cached greedy decode (dense by default; sparse when `plan.sparse_decode`, paper Table 3)
that stops at EOS or at the row's stop strings. Continuation rows are scored teacher-forced
on the true next tokens after the (sparse) prefill, and compared with the dense model's
next-token distributions and greedy continuation (the dense reference is computed once,
cached, and reused by every configuration).

Results are cached as JSONL under `cache_dir`, one file per configuration, keyed by a hash
of (model fingerprint, `plan.key()` (which covers the weight digests of a trained predictor and
compensator), suite name and version, suite seed, and the prefill method's key when it is not the
full prefill); each line is one sample's record keyed by the row's content hash, so re-running
with more samples or after an interruption only computes what is missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ffcore.config import StrictConfig
from ffcore.decoding import FULL, PrefillMethod, copy_state, eos_ids, greedy_decode, stop_strings, teacher_forced
from ffcore.engine import SparsityPlan, dense_plan, sparsify
from ffcore.engine.plan import as_plan
from ffcore.evaluation.metrics import score_prediction
from ffcore.evaluation.suite import SUITE_NAME, SUITE_VERSION
from ffcore.models import model_fingerprint

_MEMORY: dict[str, dict[str, dict[str, Any]]] = {}  # config key -> uid -> record (when no cache_dir)


@dataclasses.dataclass
class RunConfig(StrictConfig):
    """Knobs of a run that do not change results' meaning.

    ref_topk:            dense next-token log-probs kept per position for the KL (top-k + one tail bucket).
    max_new_tokens_cap:  cap every row's max_new_tokens (None: the row's own value; LongBench's go to 512).
    progress:            show a tqdm bar.
    """

    ref_topk: int = 64
    max_new_tokens_cap: int | None = None
    progress: bool = True


def is_dense(plan: SparsityPlan | None) -> bool:
    """True when the plan changes nothing (None, or every density 1 and no compensator)."""
    return as_plan(plan).is_dense


def config_key(model_fp: str, plan: SparsityPlan | None, suite: str, seed: int, prefill: str = "") -> str:
    """Hash of (model fingerprint, plan key incl. weight digests, suite name/version, seed, prefill method key)."""
    fields = {"model": model_fp, "plan": as_plan(plan).key(), "suite": suite, "seed": int(seed)}
    if prefill:  # the full prefill adds nothing to the key
        fields["prefill"] = prefill
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def suite_id(row: dict[str, Any]) -> str:
    """The suite name and version a row belongs to (part of the cache key)."""
    return f"{row['suite']}/{SUITE_VERSION}" if row["suite"] == SUITE_NAME else str(row["suite"])


class ResultCache:
    """Per-sample records of one configuration: a JSONL file (append-only) or process memory."""

    def __init__(self, cache_dir: str | Path | None, key: str, meta: dict[str, Any]) -> None:
        self.key = key
        self.path = None if cache_dir is None else Path(cache_dir) / f"{key}.jsonl"
        if self.path is None:
            self.records = _MEMORY.setdefault(key, {})
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta_path = self.path.with_suffix(".meta.json")
        if not meta_path.exists():
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.records = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption: recompute that sample
                        continue
                    self.records[rec["uid"]] = rec

    def add(self, record: dict[str, Any]) -> None:
        """Store one sample's record (appended to disk at once, so interruptions lose little)."""
        self.records[record["uid"]] = record
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------- generation


def _ctx(model: Any, plan: SparsityPlan | None) -> Any:
    return contextlib.nullcontext() if is_dense(plan) else sparsify(model, plan)


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompt_ids: Sequence[int], plan: SparsityPlan | None, max_new_tokens: int,
    stop: Sequence[str] = (), method: PrefillMethod = FULL,
) -> tuple[list[int], float, dict[str, Any]]:
    """(new token ids, prefill seconds, the method's record fields): one prefill under the plan, then greedy decode."""
    dev = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=dev)
    with _ctx(model, plan):
        t0 = time.perf_counter()
        first, state, info = method.prefill(model, ids)
        prefill_s = time.perf_counter() - t0
        new = greedy_decode(model, first, state, max_new_tokens, method, eos_ids(model, tokenizer),
                            stop_strings(tokenizer, stop))
    return new, prefill_s, info


# ----------------------------------------------------------------- continuation scoring


def coarse_kl(ref_ids: torch.Tensor, ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(dense || model) per position over the dense top-k tokens plus one 'rest' bucket.

    ref_ids/ref_logp [P, k]: the dense model's top-k token ids and log-probs; logp [P, V]: the
    evaluated model's log-probs. Merging the tail into one bucket can only lower the KL (data
    processing inequality), so this is a lower bound that is tight when the dense tail is small.
    """
    p = ref_logp.exp()
    q_logp = logp.gather(1, ref_ids)
    head = (p * (ref_logp - q_logp)).sum(1)
    p_tail = (1 - p.sum(1)).clamp_min(1e-12)
    q_tail = (1 - q_logp.exp().sum(1)).clamp_min(1e-12)
    return (head + p_tail * (p_tail.log() - q_tail.log())).clamp_min(0.0)


@torch.no_grad()
def _continuation(
    model: Any, tokenizer: Any, row: dict[str, Any], plan: SparsityPlan | None, ref: dict[str, Any] | None,
    topk: int, max_new: int, method: PrefillMethod = FULL,
) -> dict[str, Any]:
    dev = next(model.parameters()).device
    target = torch.tensor(row["target_ids"], device=dev)
    sparse_decode = not is_dense(plan) and plan.sparse_decode
    with _ctx(model, plan):
        t0 = time.perf_counter()
        first, cache, info = method.prefill(model, torch.tensor([row["prompt_ids"]], device=dev))
        prefill_s = time.perf_counter() - t0
        tf_cache = copy_state(cache)
        greedy = greedy_decode(model, first, cache, max_new, method, eos_ids(model, tokenizer))
        if sparse_decode:  # sparse decode: token by token, inside the plan
            tf_logits = teacher_forced(model, first, tf_cache, target, method, stepwise=True)
    if not sparse_decode:  # dense decode: one teacher-forced forward
        tf_logits = teacher_forced(model, first, tf_cache, target, method)
    logp = tf_logits.float().log_softmax(-1)  # [P, V], P = len(target)
    nll = -logp.gather(1, target[:, None])[:, 0]
    argmax = logp.argmax(-1)
    own_ref = None
    if ref is None:  # this run is the dense reference
        top = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        own_ref = {
            "topk_ids": top.indices.tolist(), "topk_logp": [[round(v, 5) for v in r] for r in top.values.tolist()],
            "argmax": argmax.tolist(), "nll": [round(v, 6) for v in nll.tolist()], "greedy": greedy,
        }
        ref = own_ref
    ref_ids = torch.tensor(ref["topk_ids"], device=dev)
    kl = coarse_kl(ref_ids, torch.tensor(ref["topk_logp"], device=dev, dtype=logp.dtype), logp)
    ref_greedy = ref["greedy"]
    n_g = min(len(greedy), len(ref_greedy)) or 1
    prefix = 0
    while prefix < min(len(greedy), len(ref_greedy)) and greedy[prefix] == ref_greedy[prefix]:
        prefix += 1
    metrics = {
        "token_acc": float((argmax == target).float().mean()),
        "nll": float(nll.mean()),
        "dense_nll": float(sum(ref["nll"]) / len(ref["nll"])),
        "kl": float(kl.mean()),
        "top1_agree": float((argmax == torch.tensor(ref["argmax"], device=dev)).float().mean()),
        "greedy_agree": sum(a == b for a, b in zip(greedy, ref_greedy)) / n_g,
        "greedy_prefix": prefix / max(1, len(ref_greedy)),
    }
    rec = {"score": metrics["token_acc"], "metrics": metrics, "new_ids": greedy, "prefill_s": prefill_s,
           "prediction": tokenizer.decode(greedy, skip_special_tokens=True), **info}
    if own_ref is not None:
        rec["ref"] = own_ref
    return rec


# ----------------------------------------------------------------- the run


def _run_row(
    model: Any, tokenizer: Any, row: dict[str, Any], plan: SparsityPlan | None, ref: dict[str, Any] | None,
    cfg: RunConfig, method: PrefillMethod = FULL,
) -> dict[str, Any]:
    max_new = row["max_new_tokens"] if cfg.max_new_tokens_cap is None else min(row["max_new_tokens"], cfg.max_new_tokens_cap)
    t0 = time.perf_counter()
    if row["kind"] == "continuation":
        rec = _continuation(model, tokenizer, row, plan, ref, cfg.ref_topk, max_new, method)
    else:
        new, prefill_s, info = generate(model, tokenizer, row["prompt_ids"], plan, max_new, row["stop"], method)
        pred = tokenizer.decode(new, skip_special_tokens=True)
        score = score_prediction(pred, row["answers"], row["metric"], row["all_classes"], row["first_line_only"])
        rec = {"score": score, "metrics": {}, "new_ids": new, "prefill_s": prefill_s, "prediction": pred, **info}
    rec.update({
        "uid": row["uid"], "task": row["task"], "category": row["category"], "chance": row["chance"],
        "n_prompt_tokens": len(row["prompt_ids"]), "n_new_tokens": len(rec["new_ids"]),
        "time_s": time.perf_counter() - t0,
    })
    return rec


def evaluate(
    model: Any, tokenizer: Any, dataset: Any, plan: SparsityPlan | None = None,
    cache_dir: str | Path | None = None, config: RunConfig | None = None, method: PrefillMethod = FULL,
) -> list[dict[str, Any]]:
    """Per-sample records of `dataset` (suite or LongBench rows) under `plan` (None = dense) and a prefill method, cached.

    Each record: uid, task, category, score, chance, prediction, metrics (continuation: nll,
    dense_nll, kl, top1_agree, greedy_agree, greedy_prefix, token_acc), timings, and the prefill
    method's own fields (SpecPrefill: kept tokens). The dense reference needed by continuation rows
    (full prefill, dense plan) is evaluated (or read from the cache) first.
    """
    cfg = config or RunConfig()
    rows = list(dataset)
    if not rows:
        return []
    model_fp = model_fingerprint(model)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((suite_id(r), int(r["seed"])), []).append(r)
    dense = is_dense(plan) and not method.key  # the reference itself: dense plan, full prefill
    out: dict[str, dict[str, Any]] = {}
    for (suite, seed), group in groups.items():
        refs: dict[str, dict[str, Any]] = {}
        cont = [r for r in group if r["kind"] == "continuation"]
        if cont and not dense:
            for rec in evaluate(model, tokenizer, cont, dense_plan(), cache_dir, cfg):
                refs[rec["uid"]] = rec["ref"]
        key = config_key(model_fp, plan, suite, seed, method.key)
        meta = {"model": model_fp, "model_name": getattr(model, "ffcore_name", None),
                "plan": as_plan(plan).describe(), "suite": suite, "seed": seed,
                **({"prefill": method.key} if method.key else {})}
        cache = ResultCache(cache_dir, key, meta)
        todo = [r for r in group if r["uid"] not in cache.records]
        desc = f"{meta['model_name'] or 'model'} {(plan or dense_plan()).policy_name}{' + ' + method.key[:24] if method.key else ''}"
        for r in _progress(todo, cfg.progress, desc):
            cache.add(_run_row(model, tokenizer, r, plan, refs.get(r["uid"]), cfg, method))
        for r in group:
            out[r["uid"]] = cache.records[r["uid"]]
    return [out[r["uid"]] for r in rows]


def _progress(items: list[Any], on: bool, desc: str) -> Any:
    if not on or not items:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def run_configs(
    model: Any, tokenizer: Any, dataset: Any, plans: dict[str, SparsityPlan | None],
    cache_dir: str | Path | None = None, config: RunConfig | None = None,
    methods: dict[str, PrefillMethod] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Evaluate several named plans (include a dense one, e.g. `{'dense': None, ...}`); dense reused via the cache.

    `methods` names a prefill method per configuration (default: the full prefill).
    """
    methods = methods or {}
    return {name: evaluate(model, tokenizer, dataset, plan, cache_dir, config, methods.get(name, FULL))
            for name, plan in plans.items()}


def timing_summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per sample (total and prefill) and mean prompt length, over the given records."""
    n = max(1, len(records))
    return {
        "samples": len(records),
        "mean_time_s": sum(r["time_s"] for r in records) / n,
        "mean_prefill_s": sum(r["prefill_s"] for r in records) / n,
        "mean_prompt_tokens": sum(r["n_prompt_tokens"] for r in records) / n,
        "total_time_s": sum(r["time_s"] for r in records),
    }
