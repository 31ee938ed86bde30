"""Figures of notebook 08: SpecPrefill token scores, the speed/quality Pareto plot, measured TTFT."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ffcore.plots import PALETTE
from ffcore.specprefill import Method

SERIES_STYLE = {  # method -> (colour, marker)
    "specprefill/same": (PALETTE[0], "o"),
    "specprefill/first": (PALETTE[1], "s"),
    Method.FASTFORWARD.value: (PALETTE[2], "^"),
    Method.COMBINATION.value: (PALETTE[3], "D"),
    Method.SPECPREFILL_CACHE_WINDOWS.value: (PALETTE[4], "x"),
    Method.SPECPREFILL_NO_LAST.value: (PALETTE[5 % len(PALETTE)], "v"),
}


def score_profile(scores: Mapping[str, Any], kept: Mapping[str, Any], title: str = "") -> plt.Figure:
    """Token scores (raw and smoothed) and chunk scores of one prompt per speculator, kept chunks shaded.

    scores: speculator name -> TokenScores; kept: speculator name -> LongTensor of kept positions.
    """
    n = len(scores)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n), sharex=True, squeeze=False)
    for ax, (name, sc) in zip(axes[:, 0], scores.items()):
        T, cs = sc.T, sc.chunk_size
        x = np.arange(T)
        mask = np.zeros(T, dtype=bool)
        mask[kept[name].numpy()] = True
        ax.fill_between(x, 0, 1, where=mask, transform=ax.get_xaxis_transform(), color="#2ca02c", alpha=0.12,
                        step="mid", label="kept tokens")
        ax.plot(x, sc.token.numpy(), color="#7f7f7f", lw=0.6, alpha=0.7, label="token score")
        ax.plot(x, sc.smoothed.numpy(), color=PALETTE[0], lw=1.2, label="smoothed (avg pool 13)")
        edges = np.minimum(np.arange(len(sc.chunk) + 1) * cs, T)
        ax.stairs(sc.chunk.numpy(), edges, baseline=None, color=PALETTE[1], lw=1.5, label=f"chunk mean ({cs} tokens)")
        ax.set_yscale("log")
        ax.set_ylabel("attention score")
        ax.set_title(f"speculator: {name}", loc="left", fontsize=10)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("prompt position")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _series_key(row: Mapping[str, Any]) -> str:
    m = row["method"]
    if m == Method.SPECPREFILL.value:
        return "specprefill/same" if str(row["speculator"]).startswith("same") else "specprefill/first"
    return m


def _series_label(key: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if key == "specprefill/same":
        return "SpecPrefill, same-model speculator (keep rate)"
    if key == "specprefill/first":
        return f"SpecPrefill, {rows[0]['speculator']} speculator (keep rate)"
    if key == Method.FASTFORWARD.value:
        return "FastForward alone (sparsity)"
    if key == Method.COMBINATION.value:
        return f"SpecPrefill [{rows[0]['speculator']}] + FastForward (keep rate / sparsity)"
    if key == Method.SPECPREFILL_CACHE_WINDOWS.value:
        return f"SpecPrefill [{rows[0]['speculator']}], sliding windows on cache slots"
    if key == Method.SPECPREFILL_NO_LAST.value:
        return f"SpecPrefill [{rows[0]['speculator']}], last chunk (the question) not forced in"
    return f"{key} (keep rate)"


def _annotation(key: str, row: Mapping[str, Any]) -> str:
    if key == Method.FASTFORWARD.value:
        return f"{row['sparsity']:.0%}"
    if key == Method.COMBINATION.value:
        return f"{row['keep_rate']}/{row['sparsity']:.0%}"
    return f"{row['keep_rate']}"


def pareto(
    summary: Sequence[Mapping[str, Any]], gap_key: str = "rel_nll_gap", scale: float = 100.0,
    ylabel: str = "continuation NLL vs dense (%)", ci_keys: tuple[str, str] | None = None,
) -> plt.Figure:
    """Compute-bound FLOP speedup vs a relative loss to dense (up = worse), one panel per model.

    Defaults plot notebook 08's continuation-NLL summary; `gap_key` / `scale` / `ci_keys` select
    another loss (e.g. the suite's accuracy loss in percent with its bootstrap interval).
    """
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in summary if r["model"] == model and r["method"] != Method.DENSE.value]
        series: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            series.setdefault(_series_key(r), []).append(r)
        regular = [scale * r[gap_key] for r in rows if _series_key(r) != Method.SPECPREFILL_CACHE_WINDOWS.value]
        if ci_keys:
            regular += [scale * r[k] for r in rows for k in ci_keys]
        regular = [v for v in regular if np.isfinite(v)]  # an undefined gap (dense scored 0) is not drawn
        top = max(regular + [1.0]) * 1.25  # an ablation far off this scale is drawn at the top edge
        for key, rs in series.items():
            colour, marker = SERIES_STYLE.get(key, ("#333333", "o"))
            rs = sorted(rs, key=lambda r: (r.get("sparsity") or 0, r["flops_speedup"]))
            x = [r["flops_speedup"] for r in rs]
            y = [scale * r[gap_key] for r in rs]
            if ci_keys:
                lo = [yi - scale * r[ci_keys[0]] for r, yi in zip(rs, y)]
                hi = [scale * r[ci_keys[1]] - yi for r, yi in zip(rs, y)]
                ax.errorbar(x, y, yerr=[lo, hi], fmt="none", ecolor=colour, alpha=0.35, lw=1, capsize=2)
            if any(v > top for v in y):
                for xi, yi in zip(x, y):
                    if yi > top:
                        ax.annotate(f"+{yi:.0f} % (off scale)", (xi, top * 0.97), xytext=(0, -14),
                                    textcoords="offset points", ha="center", fontsize=7, color=colour,
                                    arrowprops=dict(arrowstyle="->", color=colour))
                y = [min(v, top * 0.97) for v in y]
            ls = "none" if key == Method.COMBINATION.value or len(rs) == 1 else "-"
            ax.plot(x, y, marker=marker, color=colour, ls=ls, lw=1.2, ms=6, label=_series_label(key, rs))
            for r, xi, yi in zip(rs, x, y):
                ax.annotate(_annotation(key, r), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colour)
        ax.plot([1.0], [0.0], marker="*", color="black", ms=12, ls="none", label="dense")
        ax.axvline(1.0, color="#999999", lw=0.8, ls=":")
        ax.axhline(0.0, color="#999999", lw=0.8, ls=":")
        lo = min(regular + [0.0])
        ax.set_ylim(lo - 0.08 * (top - lo), top)
        ax.set_xlabel("compute-bound prefill speedup (FLOPs, speculator included)")
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    fig.tight_layout()
    return fig


def ttft_bars(rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Measured CPU time-to-first-token per configuration, stacked speculator + main prefill, one panel per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    colours = {"speculator": PALETTE[1], "main prefill": PALETTE[0]}
    for ax, model in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model]
        configs = list(dict.fromkeys(r["config"] for r in rs))
        bottoms = np.zeros(len(configs))
        for comp in ("speculator", "main prefill"):
            vals = np.array([sum(r["median_s"] for r in rs if r["config"] == c and r["component"] == comp)
                             for c in configs])
            ax.bar(range(len(configs)), vals, bottom=bottoms, color=colours[comp], label=comp, width=0.6)
            bottoms += vals
        dense = bottoms[configs.index("dense")] if "dense" in configs else bottoms[0]
        for i, c in enumerate(configs):
            fl = next(r["flops_speedup"] for r in rs if r["config"] == c)
            ax.text(i, bottoms[i], f"{dense / bottoms[i]:.2f}x measured\n{fl:.2f}x FLOPs", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(configs)), [c.replace(" p=", "\np=").replace(" + ", "\n+ ") for c in configs],
                      fontsize=8)
        ax.set_ylabel("time to first token (s, median)")
        ax.set_ylim(0, bottoms.max() * 1.2)
        ax.set_title(model)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
