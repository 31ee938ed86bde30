"""Notebook 09 (needle in a haystack): magic-number needles at depths 0-100 % of a prose haystack, at several
context lengths, dense vs FastForward at 30 % / 50 % and the per-block oracle; depth x length grids of the
retrieval score, and paired gaps to dense (the multi-question machinery of `ffcore.evaluation.multiq`).
"""
from __future__ import annotations

import dataclasses
from statistics import fmean
from typing import Any, Mapping, Sequence

from ffcore.config import StrictConfig
from ffcore.evaluation.multiq import SHARES, needle_items
from ffcore.experiments.accuracy import (DENSE, DENSE_LABEL, Components, ConfigSpec, MultiQSettings, method,
                                         multiq_rows, run_multiq)
from ffcore.experiments.profiles import pick

ORACLE_LABEL = "per-block oracle"


@dataclasses.dataclass
class NIAHSettings(StrictConfig):
    """Sizes of the needle test for one profile.

    models:           model keys (empty: the profile's models).
    lengths:          haystack budgets in tokens (one row of each grid per length).
    items_per_length: haystacks per length; needles: needles per haystack (each asked on its own).
    sparsities:       the full method's sparsities; oracle_sparsity: the per-block oracle's (no compensator).
    depth_bins:       rows of the depth axis (depths 0-100 % split evenly).
    share:            'aligned' (each answer equals a one-prompt prefill of haystack + question) or 'context'.
    """

    models: tuple[str, ...] = ()
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    items_per_length: int = 2
    needles: int = 10
    sparsities: tuple[float, ...] = (0.3, 0.5)
    oracle_sparsity: float = 0.5
    depth_bins: int = 5
    share: str = "aligned"

    def __post_init__(self) -> None:
        self.models, self.lengths, self.sparsities = tuple(self.models), tuple(self.lengths), tuple(self.sparsities)
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"lengths must be one or more budgets >= 64 tokens, got {self.lengths}")
        if min(self.items_per_length, self.needles, self.depth_bins) < 1:
            raise ValueError(f"items_per_length, needles and depth_bins must be >= 1: {self}")
        if not all(0.0 < s < 1.0 for s in (*self.sparsities, self.oracle_sparsity)):
            raise ValueError(f"sparsities must lie in (0, 1): {self.sparsities}, {self.oracle_sparsity}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {self.share!r}")


def settings(profile: str) -> NIAHSettings:
    """Per-profile sizes (full: gemma3-270m, 512-4K tokens, 2 haystacks x 10 needles per length)."""
    return pick(profile,
                smoke=NIAHSettings(lengths=(384, 512), items_per_length=1, needles=4, depth_bins=2),
                quick=NIAHSettings(models=("gemma3-270m",), lengths=(512, 1024, 2048), items_per_length=1,
                                   needles=8),
                full=NIAHSettings(models=("gemma3-270m",)))


def specs(cfg: NIAHSettings) -> list[ConfigSpec]:
    """Dense, the full method at each sparsity, and the per-block oracle (layer-wise schedule, no compensator)."""
    return [DENSE, *[method(s) for s in cfg.sparsities],
            method(cfg.oracle_sparsity, label=f"{ORACLE_LABEL} {cfg.oracle_sparsity:.0%}", policy="oracle",
                   compensator=None)]


def build_items(tokenizer: Any, cfg: NIAHSettings, seed: int = 0) -> list[dict[str, Any]]:
    """`items_per_length` haystacks per length, each with `needles` needles spread over depths 0-100 %."""
    items = []
    for T in cfg.lengths:
        items += needle_items(tokenizer, n_items=cfg.items_per_length, context_tokens=T, n_questions=cfg.needles,
                              seed=seed * 100003 + T, depth_range=(0.0, 1.0))
    return items


def run(comps: Components, cfg: NIAHSettings, items: Sequence[dict[str, Any]], cache: Any, seed: int = 0,
        ) -> dict[str, list[dict[str, Any]]]:
    """Per-question records of every configuration (`specs`), through the evaluation cache."""
    return run_multiq(comps, specs(cfg), items, MultiQSettings(tasks=("needle",), share=cfg.share), cache, seed)


def cell_rows(model: str, runs: Mapping[str, Sequence[dict[str, Any]]], items: Sequence[dict[str, Any]],
              depth_bins: int) -> list[dict[str, Any]]:
    """Mean retrieval score (0-100) and gold NLL per configuration, length and depth bin."""
    where = {f"{it['uid']}/{q['qid']}": (it["meta"]["budget"], float(q["meta"]["depth"]))
             for it in items for q in it["questions"]}
    rows = []
    for label, recs in runs.items():
        cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in recs:
            budget, depth = where[r["uid"]]
            cells.setdefault((budget, min(depth_bins - 1, int(depth * depth_bins))), []).append(r)
        for (budget, b), rs in sorted(cells.items()):
            rows.append({"model": model, "config": label, "length": budget, "depth_bin": b,
                         "depth_lo": b / depth_bins, "depth_hi": (b + 1) / depth_bins, "questions": len(rs),
                         "score": round(100 * fmean(float(r["score"]) for r in rs), 2),
                         "gold_nll": round(fmean(float(r["gold_nll"]) for r in rs), 4)})
    return rows


def gap_rows(model: str, runs: Mapping[str, Sequence[dict[str, Any]]], n_boot: int = 2000, seed: int = 0
             ) -> list[dict[str, Any]]:
    """Pooled paired gaps of each configuration to dense (items resampled whole): `accuracy.multiq_rows`."""
    return [r for r in multiq_rows(model, runs, DENSE_LABEL, n_boot, seed) if r["task"] == "all"]


def _ci(lo: float, hi: float) -> tuple[str, str]:
    return f"[{lo:+.1f}, {hi:+.1f}]", ("resolved" if lo > 0 or hi < 0 else "not resolved")


def reading(cells: Sequence[Mapping[str, Any]], gaps: Sequence[Mapping[str, Any]]) -> str:
    """Markdown reading from the numbers: each configuration's score, its weakest cell, and its paired gap to dense."""
    lines = []
    for g in gaps:
        own = [c for c in cells if c["model"] == g["model"] and c["config"] == g["config"]]
        worst = min(own, key=lambda c: (c["score"], -c["length"]))
        text = (f"- **{g['model']}, {g['config']}**: {g['score']:.1f} % of {g['questions']} needles retrieved "
                f"({g['items']} haystacks); weakest cell {worst['score']:.0f} % at {worst['length']} tokens, depth "
                f"{worst['depth_lo']:.0%}-{worst['depth_hi']:.0%}")
        if "score_diff_ci" in g:
            ci, res = _ci(*g["score_diff_ci"])
            gci, gres = _ci(*g["gold_prob_rel_ci"])
            text += (f"; against dense {g['score_diff']:+.1f} points {ci} ({res}), gold-answer probability "
                     f"{g['gold_prob_rel_gap_pct']:+.1f} % {gci} ({gres})")
        lines.append(text + ".")
    return "\n".join(lines)
