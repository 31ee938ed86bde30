"""Scores from per-sample records: per task and category, the average, the gap to dense, bootstrap CIs.

The average is the mean over tasks of the per-task mean score (LongBench averages over
datasets); a category's score is the mean of its tasks. The relative gap is the paper's
Table 2 column: (sparse - dense) / dense * 100 of the average.

Confidence intervals are percentile bootstraps. Our suites are small (8-32 samples per
task), so the intervals are wide and themselves approximate: the bootstrap understates
uncertainty at such sample sizes, and a task whose samples all score the same gets a
zero-width interval. For a gap, the bootstrap is PAIRED: the same resampled samples (per
task, stratified, so every task keeps its sample count) are used for dense and sparse,
which removes the between-sample variance that both configurations share.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Records = Sequence[Mapping[str, Any]]


def _by_task(records: Records) -> dict[str, dict[str, float]]:
    """task -> uid -> score."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        out.setdefault(r["task"], {})[r["uid"]] = float(r["score"])
    return out


def _categories(records: Records) -> dict[str, str]:
    return {r["task"]: r.get("category", "") for r in records}


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (small-sample caveats in the module docstring)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _stratified_means(tasks: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index draws per task: for each task an [n_boot, n_task] array of resampled sample indices."""
    return [rng.integers(0, len(t), size=(n_boot, len(t))) for t in tasks]


def task_table(records: Records, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """One row per task: category, n, mean score, bootstrap CI, mean chance level."""
    chance: dict[str, list[float]] = {}
    for r in records:
        chance.setdefault(r["task"], []).append(float(r.get("chance", 0.0)))
    cats = _categories(records)
    rows = []
    for i, (task, scores) in enumerate(_by_task(records).items()):
        vals = list(scores.values())
        lo, hi = bootstrap_mean_ci(vals, n_boot, level, seed + i)
        rows.append({"task": task, "category": cats[task], "n": len(vals), "score": float(np.mean(vals)),
                     "ci_low": lo, "ci_high": hi, "chance": float(np.mean(chance[task]))})
    return rows


def average_score(records: Records, tasks: Sequence[str] | None = None) -> float:
    """Mean over tasks of the per-task mean score (restricted to `tasks` if given)."""
    by = _by_task(records)
    names = [t for t in (tasks if tasks is not None else by) if t in by]
    return float(np.mean([np.mean(list(by[t].values())) for t in names])) if names else float("nan")


def category_scores(records: Records, tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Mean over each category's tasks of the per-task mean score."""
    by, cats = _by_task(records), _categories(records)
    out: dict[str, list[float]] = {}
    for t in (tasks if tasks is not None else by):
        if t in by:
            out.setdefault(cats[t], []).append(float(np.mean(list(by[t].values()))))
    return {c: float(np.mean(v)) for c, v in out.items()}


def paired_gap(
    dense: Records, sparse: Records, tasks: Sequence[str] | None = None, n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Relative gap of the average, (sparse - dense) / dense * 100, with a paired, task-stratified bootstrap CI.

    Only samples present in both configurations count. Also returns the absolute
    difference of the averages and its CI, and per-task relative gaps (point estimates).
    """
    bd, bs = _by_task(dense), _by_task(sparse)
    names = [t for t in (tasks if tasks is not None else bd) if t in bd and t in bs]
    pairs = []
    for t in names:
        uids = [u for u in bd[t] if u in bs[t]]
        if uids:
            pairs.append((t, np.array([bd[t][u] for u in uids]), np.array([bs[t][u] for u in uids])))
    if not pairs:
        raise ValueError("no task has samples in both configurations; were they run on the same suite?")
    d_avg = float(np.mean([d.mean() for _, d, _ in pairs]))
    s_avg = float(np.mean([s.mean() for _, _, s in pairs]))
    rng = np.random.default_rng(seed)
    draws = _stratified_means([d for _, d, _ in pairs], n_boot, rng)
    d_boot = np.mean([d[idx].mean(1) for (_, d, _), idx in zip(pairs, draws)], axis=0)
    s_boot = np.mean([s[idx].mean(1) for (_, _, s), idx in zip(pairs, draws)], axis=0)
    a = (1 - level) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_boot = (s_boot - d_boot) / d_boot * 100
    rel_boot = rel_boot[np.isfinite(rel_boot)]
    per_task = {t: (float((s.mean() - d.mean()) / d.mean() * 100) if d.mean() else float("nan"))
                for t, d, s in pairs}
    return {
        "dense_avg": d_avg, "sparse_avg": s_avg,
        "rel_gap_pct": (s_avg - d_avg) / d_avg * 100 if d_avg else float("nan"),
        "rel_gap_ci": (float(np.quantile(rel_boot, a)), float(np.quantile(rel_boot, 1 - a))) if rel_boot.size else (float("nan"),) * 2,
        "abs_diff": s_avg - d_avg,
        "abs_diff_ci": (float(np.quantile(s_boot - d_boot, a)), float(np.quantile(s_boot - d_boot, 1 - a))),
        "per_task_rel_gap_pct": per_task, "tasks": [t for t, _, _ in pairs],
        "n_pairs": {t: len(d) for t, d, _ in pairs},
    }


def summarize(
    results: Mapping[str, Records], dense: str = "dense", tasks: Sequence[str] | None = None,
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:
    """A Table-2-style summary: one row per configuration (categories, average with CI, gap to `dense` with CI)."""
    if dense not in results:
        raise KeyError(f"the dense configuration {dense!r} is not among {sorted(results)}")
    rows = []
    for name, recs in results.items():
        recs_t = [r for r in recs if tasks is None or r["task"] in tasks]
        by = _by_task(recs_t)
        rng = np.random.default_rng(seed)
        arrs = [np.array(list(v.values())) for v in by.values()]
        boot = np.mean([a[idx].mean(1) for a, idx in zip(arrs, _stratified_means(arrs, n_boot, rng))], axis=0)
        alpha = (1 - level) / 2
        row: dict[str, Any] = {"config": name, **{f"cat:{c}": v for c, v in category_scores(recs_t).items()}}
        row.update({f"task:{t}": float(np.mean(list(v.values()))) for t, v in by.items()})
        row.update({"average": average_score(recs_t), "average_ci_low": float(np.quantile(boot, alpha)),
                    "average_ci_high": float(np.quantile(boot, 1 - alpha))})
        gap = paired_gap(results[dense], recs_t, tasks, n_boot, level, seed)
        row.update({"rel_gap_pct": gap["rel_gap_pct"], "rel_gap_ci_low": gap["rel_gap_ci"][0],
                    "rel_gap_ci_high": gap["rel_gap_ci"][1]})
        rows.append(row)
    return rows


def continuation_table(results: Mapping[str, Records], task: str = "continuation") -> list[dict[str, Any]]:
    """Per configuration: mean NLL, NLL change vs dense (%), KL to dense, top-1 and greedy agreement."""
    rows = []
    for name, recs in results.items():
        ms = [r["metrics"] for r in recs if r["task"] == task]
        if not ms:
            continue
        nll, dnll = float(np.mean([m["nll"] for m in ms])), float(np.mean([m["dense_nll"] for m in ms]))
        rows.append({
            "config": name, "n": len(ms), "nll": nll, "dense_nll": dnll, "nll_change_pct": (nll - dnll) / dnll * 100,
            "kl": float(np.mean([m["kl"] for m in ms])), "top1_agree": float(np.mean([m["top1_agree"] for m in ms])),
            "greedy_agree": float(np.mean([m["greedy_agree"] for m in ms])),
            "greedy_prefix": float(np.mean([m["greedy_prefix"] for m in ms])),
            "token_acc": float(np.mean([m["token_acc"] for m in ms])),
        })
    return rows


def paired_metric_change(
    reference: Records, other: Records, metric: str = "kl", task: str = "continuation", n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Relative change (%) of a continuation metric's mean, other vs reference, with a paired bootstrap CI over samples.

    Samples are matched by uid; the bootstrap resamples samples (not tokens: a sample's tokens are correlated).
    """
    ref = {r["uid"]: r["metrics"][metric] for r in reference if r["task"] == task}
    oth = {r["uid"]: r["metrics"][metric] for r in other if r["task"] == task}
    uids = sorted(set(ref) & set(oth))
    if not uids:
        raise ValueError(f"no {task!r} sample is shared by the two configurations")
    a = np.array([ref[u] for u in uids])
    b = np.array([oth[u] for u in uids])
    change = (b.mean() / a.mean() - 1) * 100 if a.mean() > 0 else float("nan")
    idx = np.random.default_rng(seed).integers(0, len(uids), size=(n_boot, len(uids)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (b[idx].mean(1) / a[idx].mean(1) - 1) * 100
    alpha = (1 - level) / 2
    lo, hi = (float(np.nanquantile(boot, q)) for q in (alpha, 1 - alpha)) if np.isfinite(boot).any() else (
        float("nan"), float("nan"))
    return {"metric": metric, "n": len(uids), "reference_mean": float(a.mean()), "other_mean": float(b.mean()),
            "rel_change_pct": float(change), "ci": (lo, hi)}


def _aligned(metric: str, *groups: Records, task: str = "continuation") -> tuple[list[str], list[np.ndarray]]:
    """uids shared by every group of records and each group's metric values on them (in uid order)."""
    maps = [{r["uid"]: float(r["metrics"][metric]) for r in g if r["task"] == task} for g in groups]
    uids = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
    if not uids:
        raise ValueError(f"no {task!r} sample is shared by all {len(groups)} configurations")
    return uids, [np.array([m[u] for u in uids]) for m in maps]


def paired_difference(
    reference: Records, other: Records, metric: str = "kl", task: str = "continuation", n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Mean of other - reference (a continuation metric), with a paired bootstrap CI over samples."""
    uids, (a, b) = _aligned(metric, reference, other, task=task)
    idx = np.random.default_rng(seed).integers(0, len(uids), size=(n_boot, len(uids)))
    boot = (b[idx] - a[idx]).mean(1)
    alpha = (1 - level) / 2
    return {"metric": metric, "n": len(uids), "reference_mean": float(a.mean()), "other_mean": float(b.mean()),
            "diff": float((b - a).mean()), "ci": (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha)))}


def gap_closed(
    baseline: Records, method: Records, oracle: Records, metric: str = "kl", task: str = "continuation",
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Fraction of the baseline-to-oracle gap a method closes, (B - M) / (B - O) of the means, paired bootstrap CI.

    1 = as good as the oracle, 0 = no better than the baseline, < 0 = worse than the baseline.
    """
    uids, (b, m, o) = _aligned(metric, baseline, method, oracle, task=task)
    idx = np.random.default_rng(seed).integers(0, len(uids), size=(n_boot, len(uids)))
    with np.errstate(divide="ignore", invalid="ignore"):
        point = (b.mean() - m.mean()) / (b.mean() - o.mean())
        boot = (b[idx].mean(1) - m[idx].mean(1)) / (b[idx].mean(1) - o[idx].mean(1))
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    ci = (float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))) if boot.size else (float("nan"),) * 2
    return {"metric": metric, "n": len(uids), "baseline_mean": float(b.mean()), "method_mean": float(m.mean()),
            "oracle_mean": float(o.mean()), "closed": float(point), "ci": ci}


@dataclasses.dataclass
class TaskSelection:
    """Which tasks a model's dense scores make worth measuring (see `select_tasks`)."""

    kept: list[str]
    dropped: dict[str, str]  # task -> reason
    table: list[dict[str, Any]]  # per task: score, chance, margin, CI, kept


def select_tasks(
    dense_records: Records, min_margin: float = 0.15, use_ci: bool = False, n_boot: int = 2000, seed: int = 0,
) -> TaskSelection:
    """Keep tasks where the dense model is above chance: score >= chance + min_margin, or with `use_ci` the lower end
    of the score's 95 % bootstrap interval strictly above chance + min_margin.

    Scores and chance levels are on the metric's 0-1 scale (min_margin=0.15 means 15
    points above chance). A task measured near its floor cannot show a sparsity gap.
    """
    table = task_table(dense_records, n_boot=n_boot, seed=seed)
    kept, dropped = [], {}
    for row in table:
        basis = row["ci_low"] if use_ci else row["score"]
        row["margin"] = row["score"] - row["chance"]
        row["kept"] = bool(basis > row["chance"] + min_margin if use_ci else basis >= row["chance"] + min_margin)
        if row["kept"]:
            kept.append(row["task"])
        else:
            what = "CI low end" if use_ci else "dense score"
            dropped[row["task"]] = (f"{what} {basis:.3f} {'<=' if use_ci else '<'} chance {row['chance']:.3f} "
                                    f"+ margin {min_margin:.3f}")
    return TaskSelection(kept, dropped, table)


# ------------------------------------------------------------------------------ clustered paired gaps and power
def gold_probability(record: Mapping[str, Any]) -> float:
    """A continuous 0-100 score of one generated answer: 100 x the gold answer's per-token geometric-mean
    probability under teacher forcing, exp(-gold_nll) (multi-question records, `ffcore.evaluation.multiq`)."""
    return 100.0 * math.exp(-float(record["gold_nll"]))


def _cluster_sums(reference: Records, other: Records, value: Callable[[Mapping[str, Any]], float],
                  cluster: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cluster sums of `value` over the records both groups share (paired by uid), and the cluster sizes."""
    ref = {r["uid"]: r for r in reference}
    oth = {r["uid"]: r for r in other}
    uids = sorted(set(ref) & set(oth))
    if not uids:
        raise ValueError("no record is shared by the two configurations")
    index: dict[str, int] = {}
    a: list[float] = []
    b: list[float] = []
    size: list[int] = []
    for u in uids:
        c = index.setdefault(str(ref[u].get(cluster, u)), len(index))
        if c == len(a):
            a.append(0.0)
            b.append(0.0)
            size.append(0)
        a[c] += value(ref[u])
        b[c] += value(oth[u])
        size[c] += 1
    return np.array(a), np.array(b), np.array(size, dtype=float)


def clustered_gap(
    reference: Records, other: Records, value: Callable[[Mapping[str, Any]], float], cluster: str = "item_uid",
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Paired difference (other - reference) of a per-record score and its relative gap in %, with a bootstrap
    over clusters (questions of one prefilled context are not independent: whole items are resampled)."""
    a, b, size = _cluster_sums(reference, other, value, cluster)
    m, n = len(a), int(size.sum())
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    sa, sb, sn = a[idx].sum(1), b[idx].sum(1), size[idx].sum(1)
    q = ((1 - level) / 2, (1 + level) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (b.sum() / a.sum() - 1) * 100 if a.sum() != 0 else float("nan")
        rel_boot = (sb / sa - 1) * 100
    rel_boot = rel_boot[np.isfinite(rel_boot)]
    diff_boot = (sb - sa) / sn
    return {"n": n, "clusters": m, "reference_mean": float(a.sum() / n), "other_mean": float(b.sum() / n),
            "diff": float((b.sum() - a.sum()) / n), "ci": tuple(float(np.quantile(diff_boot, x)) for x in q),
            "rel_gap_pct": float(rel),
            "rel_ci": tuple(float(np.quantile(rel_boot, x)) for x in q) if rel_boot.size else (float("nan"),) * 2}


def clusters_needed(
    reference: Records, other: Records, value: Callable[[Mapping[str, Any]], float], half_width_pct: float = 3.0,
    cluster: str = "item_uid", level: float = 0.95,
) -> dict[str, Any]:
    """Power calculation from a pilot: how many clusters (items) make the `level` interval of the relative gap
    at most +-`half_width_pct` points, by the delta method for a ratio of cluster totals.

    With cluster totals A_c, B_c (m clusters), R = sum B / sum A and mean total a = sum A / m, the relative gap
    100 (R - 1) has standard error 100 sd(B_c - R A_c) / (a sqrt(m)); solving z * se <= h for m gives the count.
    """
    from statistics import NormalDist

    if half_width_pct <= 0:
        raise ValueError(f"half_width_pct must be > 0, got {half_width_pct}")
    a, b, size = _cluster_sums(reference, other, value, cluster)
    m, n = len(a), int(size.sum())
    if m < 2:
        raise ValueError("a power calculation needs a pilot of at least 2 clusters")
    if a.sum() <= 0:
        raise ValueError("the reference's total score is 0: a relative gap is undefined")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    R = b.sum() / a.sum()
    sd = float(np.std(b - R * a, ddof=1))
    abar = float(a.mean())
    se = 100 * sd / (abar * math.sqrt(m))
    need = math.ceil((z * 100 * sd / (abar * half_width_pct)) ** 2) if sd > 0 else 1
    return {"pilot_clusters": m, "pilot_records": n, "records_per_cluster": n / m, "half_width_pct_now": z * se,
            "clusters_needed": max(2, need), "target_half_width_pct": half_width_pct}
