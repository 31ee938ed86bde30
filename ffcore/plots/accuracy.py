"""Figures of notebooks 05 and 06: one bar chart per accuracy table, and dense scores vs chance per task."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ffcore.plots import PALETTE

DENSE_COLOR = "#7f7f7f"


def _models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def table_chart(rows: Sequence[Mapping[str, Any]], title: str, dense_label: str = "dense") -> "plt.Figure":
    """Average score (0-100) with its 95 % bootstrap CI per configuration, one panel per model.

    The dense baseline is a grey bar and a dashed line; every other bar is annotated with its
    relative gap to dense in percent. `rows` are `ffcore.experiments.accuracy.accuracy_rows` output.
    """
    models = _models(rows)
    if not models:
        raise ValueError("no rows to plot")
    n_cfg = max(sum(r["model"] == m for r in rows) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.5, 1.25 * n_cfg + 1.5) * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        x = np.arange(len(mrows))
        avg = np.array([r["average"] for r in mrows], dtype=float)
        lo = np.array([r["average_ci_low"] for r in mrows], dtype=float)
        hi = np.array([r["average_ci_high"] for r in mrows], dtype=float)
        colors = [DENSE_COLOR if r["config"] == dense_label else PALETTE[i % len(PALETTE)] for i, r in enumerate(mrows)]
        ax.bar(x, avg, color=colors, alpha=0.85, width=0.7)
        ax.errorbar(x, avg, yerr=[np.clip(avg - lo, 0, None), np.clip(hi - avg, 0, None)], fmt="none",
                    ecolor="black", capsize=4, lw=1.2)
        dense = [r for r in mrows if r["config"] == dense_label]
        if dense:
            ax.axhline(dense[0]["average"], color=DENSE_COLOR, ls="--", lw=1)
        for xi, r in zip(x, mrows):
            if r["config"] == dense_label or math.isnan(r["rel_gap_pct"]):
                continue
            ax.annotate(f"{r['rel_gap_pct']:+.1f}%", (xi, r["average_ci_high"]), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [r["config"] for r in mrows], rotation=25, ha="right")
        top = np.nanmax(np.concatenate([hi, avg])) if len(hi) else 1.0
        ax.set_ylim(0, max(1.0, top) * 1.15)
        n = mrows[0].get("n_samples", "?")
        ax.set_title(f"{model} ({mrows[0].get('n_tasks', '?')} tasks, {n} samples)", fontsize=10)
        ax.set_ylabel("average score (0-100), 95 % CI")
    fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.tight_layout()
    return fig


def selection_chart(table: Sequence[Mapping[str, Any]]) -> "plt.Figure":
    """Dense score per task (0-100, 95 % CI) beside the chance level; kept tasks solid, dropped ones hatched.

    `table` rows: model, task, score, ci_low, ci_high, chance, kept (all on a 0-100 scale).
    """
    models = _models(table)
    if not models:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in table if r["model"] == model]
        x = np.arange(len(rows))
        s = np.array([r["score"] for r in rows], dtype=float)
        err = [np.clip(s - [r["ci_low"] for r in rows], 0, None), np.clip(np.array([r["ci_high"] for r in rows]) - s, 0, None)]
        bars = ax.bar(x - 0.18, s, width=0.36, color=PALETTE[0], label="dense score")
        for b, r in zip(bars, rows):
            if not r["kept"]:
                b.set_hatch("//")
                b.set_alpha(0.45)
        ax.errorbar(x - 0.18, s, yerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
        ax.bar(x + 0.18, [r["chance"] for r in rows], width=0.36, color=DENSE_COLOR, label="chance level")
        ax.set_xticks(x, [r["task"] + ("" if r["kept"] else "\n(dropped)") for r in rows], rotation=20, ha="right")
        ax.set_ylim(0, 105)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("score (0-100)")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Dense model vs chance: which tasks measure anything", fontsize=11, fontweight="bold")
    fig.tight_layout()
    return fig


def multiq_forest(rows: Sequence[Mapping[str, Any]], highlight: str | None = None) -> plt.Figure:
    """Forest plot of the multi-question results: per model, the relative gap to dense (%, 95 % CI over items) of
    the gold-answer probability (circles) and of the answer score (crosses), per task and pooled ('all', bold);
    the configuration named `highlight` (the full method) in the accent colour."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models), 0.8 + 0.32 * sum(
        1 for r in rows if r["model"] == models[0] and "gold_prob_rel_ci" in r)), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "gold_prob_rel_ci" in r]
        labels = []
        for y, r in enumerate(mine):
            color = PALETTE[1] if r["config"] == highlight else PALETTE[0]
            for field, ci, marker, dy in (("gold_prob_rel_gap_pct", "gold_prob_rel_ci", "o", -0.12),
                                          ("score_rel_gap_pct", "score_rel_ci", "x", 0.12)):
                v, (lo, hi) = r[field], r[ci]
                if not all(map(math.isfinite, (v, lo, hi))):
                    continue
                ax.errorbar([v], [y + dy], xerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], fmt=marker, color=color, ms=5, capsize=2,
                            alpha=1.0 if r["task"] == "all" else 0.75)
            labels.append(f"{r['config']} · {r['task']}")
        ax.axvline(0, color="k", lw=0.8)
        for x in (-3, 3):
            ax.axvline(x, color="k", ls=":", lw=0.6)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for tick, r in zip(ax.get_yticklabels(), mine):
            if r["task"] == "all":
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlabel("relative gap to dense, % (o gold-answer probability, x answer score)")
        ax.set_title(model, fontsize=10)
    fig.suptitle("Many questions per context: paired gaps to dense with 95 % intervals over contexts "
                 "(dotted: +-3 %)", fontsize=10)
    fig.tight_layout()
    return fig


def decode_context_chart(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Forest plot of notebook 05's decode diagnosis: per model, each configuration's continuation KL minus the
    reference's ('predictor, token'), paired over windows with its 95 % CI; prefill-only rows grey, the mean KL
    printed beside each point."""
    models = _models(rows)
    n = max(sum(1 for r in rows if r["model"] == m) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 1.0 + 0.36 * n), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for y, r in enumerate(mine):
            v, lo, hi = r["kl_diff"], r["kl_diff_ci_low"], r["kl_diff_ci_high"]
            color = DENSE_COLOR if r["decode"] == "prefill only" else PALETTE[1] if r["config"] == r["reference"] else PALETTE[0]
            ax.errorbar([v], [y], xerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], fmt="o", color=color, ms=5, capsize=2)
            ax.annotate(f"KL {r['kl']:.3f}", (hi, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(mine)), [r["config"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"KL to dense minus '{mine[0]['reference']}' (95 % CI over windows)")
        ax.set_title(f"{model} ({mine[0]['n']} windows)", fontsize=10)
        ax.margins(x=0.25)
    fig.suptitle("Decode-time sparsity: which decode context loses least (grey: dense decode after the same sparse prefill)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def niah_heatmaps(cells: Sequence[Mapping[str, Any]], model: str) -> plt.Figure:
    """Needle retrieval (0-100 %) per depth bin (rows) and context length (columns), one panel per configuration."""
    rows = [c for c in cells if c["model"] == model]
    configs = list(dict.fromkeys(c["config"] for c in rows))
    lengths = sorted({c["length"] for c in rows})
    bins = sorted({c["depth_bin"] for c in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(2.2 + 2.0 * len(configs), 3.4), squeeze=False, sharey=True)
    im = None
    for ax, cfg in zip(axes[0], configs):
        grid = np.full((len(bins), len(lengths)), np.nan)  # [depth bin, length]
        for c in rows:
            if c["config"] == cfg:
                grid[bins.index(c["depth_bin"]), lengths.index(c["length"])] = c["score"]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.grid(False)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9,
                        color="white" if v < 25 or v > 80 else "black")
        ax.set_xticks(range(len(lengths)), [f"{t // 1024}K" if t >= 1024 else str(t) for t in lengths])
        ax.set_title(cfg, fontsize=9)
    depth = {c["depth_bin"]: (c["depth_lo"], c["depth_hi"]) for c in rows}
    axes[0, 0].set_yticks(range(len(bins)), [f"{depth[b][0]:.0%}-{depth[b][1]:.0%}" for b in bins])
    axes[0, 0].set_ylabel("needle depth")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.025, pad=0.02, label="needles retrieved (%)")
    fig.supxlabel("context length (tokens)", fontsize=10)
    fig.suptitle(f"Needle in a haystack, {model}", fontsize=11)
    return fig
