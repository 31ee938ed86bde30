"""Figures of notebook 02: per-block received attention (paper Figs. 4-5), sink share, schedules."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ffcore.calibration import CalibrationResult, sink_visible_queries
from ffcore.plots import PALETTE

FULL_COLOR, SLIDING_COLOR = PALETTE[1], PALETTE[0]


def select_layers(n_layers: int, k: int = 6, must: Sequence[int] = ()) -> list[int]:
    """`k` layers spread evenly from first to last, plus any `must` layers (sorted, unique)."""
    picks = {int(round(x)) for x in np.linspace(0, n_layers - 1, min(k, n_layers))}
    return sorted(picks | {int(m) for m in must if 0 <= m < n_layers})


def _layer_label(r: CalibrationResult, i: int) -> str:
    w = r.layer_windows[i]
    return f"layer {i}" + ("" if w is None else f" (window {w})")


def _colors(r: CalibrationResult) -> list[str]:
    return [FULL_COLOR if w is None else SLIDING_COLOR for w in r.layer_windows]


def _has_sliding(r: CalibrationResult) -> bool:
    return any(w is not None for w in r.layer_windows)


def _type_legend(ax: plt.Axes, r: CalibrationResult, extra: Sequence = ()) -> None:
    from matplotlib.patches import Patch

    handles = list(extra)
    if _has_sliding(r):
        handles = [Patch(color=FULL_COLOR, label="full attention"),
                   Patch(color=SLIDING_COLOR, label=f"sliding window {max(w for w in r.layer_windows if w)}")] + handles
    if handles:  # callers leave head-room above the bars for it
        ax.legend(handles=handles, loc="upper right", ncol=min(len(handles), 2), fontsize=8, frameon=True)


def plot_block_histograms(
    results: Mapping[str, CalibrationResult], k: int = 6, bins: int = 30,
) -> plt.Figure:
    """Paper Fig. 4: histograms of the attention each 128-token block receives (first block excluded).

    One row per model, `k` selected layers per row (Gemma 3's full-attention layers are added).
    A block's value is the mass its keys receive, summed over all queries, averaged over heads.
    """
    picks = {key: select_layers(r.n_layers, k, [i for i, w in enumerate(r.layer_windows) if w is None]
                                if _has_sliding(r) else ()) for key, r in results.items()}
    ncols = max(len(p) for p in picks.values())
    fig, axes = plt.subplots(len(results), ncols, figsize=(2.5 * ncols, 2.5 * len(results)), squeeze=False)
    for row, (key, r) in enumerate(results.items()):
        # log-spaced bins shared by the row: block values span decades (late blocks are seen by few queries)
        allv = np.concatenate([r.block_values(i).numpy() for i in picks[key]])
        vmin = max(float(allv[allv > 0].min()) if (allv > 0).any() else 1e-3, 1e-3)
        edges = np.geomspace(vmin * 0.98, max(float(allv.max()), vmin * 1.1) * 1.02, bins + 1)
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(picks[key]):
                ax.axis("off")
                continue
            i = picks[key][col]
            vals = r.block_values(i).numpy()
            ax.hist(vals, bins=edges, color=_colors(r)[i], alpha=0.85)
            ax.axvline(vals.mean(), color="k", lw=1, ls="--")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(_layer_label(r, i), fontsize=9)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(f"{key}\nblocks", fontsize=9)
            if row == len(results) - 1:
                ax.set_xlabel("attention received per block (log)", fontsize=8)
    fig.suptitle("Attention received per 128-token block, first (sink) block excluded (cf. paper Fig. 4);"
                 " dashed: mean", fontsize=10)
    fig.tight_layout()
    return fig


def plot_block_means(results: Mapping[str, CalibrationResult]) -> plt.Figure:
    """Paper Fig. 5: mean attention received per non-first block, per layer (proportional to s_i)."""
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 3.4), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items()):
        m = r.mean_block_mass()
        ax.bar(range(r.n_layers), m, color=_colors(r))
        ax.set_ylim(0, max(m) * 1.3)
        ax.set_title(key)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean attention per block")
        ax.set_xticks(range(0, r.n_layers, 2 if r.n_layers <= 20 else 3))
        _type_legend(ax, r)
    fig.suptitle(f"Mean attention received per 128-token block (first block excluded; "
                 f"{next(iter(results.values())).seq_len}-token samples) (cf. paper Fig. 5)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_first_block_share(results: Mapping[str, CalibrationResult]) -> plt.Figure:
    """Share of all attention that lands on the first (sink) block, per layer, per model."""
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 3.2), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items()):
        share = np.array(r.first_block_share())
        ax.bar(range(r.n_layers), share, color=_colors(r))
        # the share block 1 would get under uniform causal attention: sum_t min(B, t+1)/(t+1) / T
        t = np.arange(r.seq_len)
        uniform = float((np.minimum(r.block_size, t + 1) / (t + 1)).sum() / r.seq_len)
        line = ax.axhline(uniform, color="k", ls=":", lw=1, label=f"uniform attention ({uniform:.2f})")
        ax.set_ylim(0, 1)
        ax.set_title(key)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of attention on block 1")
        ax.set_xticks(range(0, r.n_layers, 2 if r.n_layers <= 20 else 3))
        _type_legend(ax, r, [line])
    fig.suptitle("How much of the attention the first 128 tokens (the sinks) receive", fontsize=10)
    fig.tight_layout()
    return fig


def plot_importance(results: Mapping[str, CalibrationResult]) -> plt.Figure:
    """The window confound: per layer, s_i / T by the paper's literal eq. 23 and by the window-aware count,
    with the share of queries that can see the sink block at all (right axis)."""
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 3.9), squeeze=False)
    for ax, (key, r) in zip(axes[0], results.items()):
        x = np.arange(r.n_layers)
        lit = np.array(r.scores("literal")) / r.seq_len
        win = np.array(r.scores("window")) / r.seq_len
        colors = _colors(r)
        ax.bar(x - 0.2, lit, width=0.4, color=colors, alpha=0.35, hatch="//", edgecolor="k", lw=0.3,
               label="literal s_i / T (paper eq. 23)")
        ax.bar(x + 0.2, win, width=0.4, color=colors, edgecolor="k", lw=0.3, label="window-aware s_i / T")
        vis = [sink_visible_queries(r.seq_len, r.block_size, w) / r.seq_len for w in r.layer_windows]
        ax2 = ax.twinx()
        ax2.plot(x, vis, color="k", ls=":", marker=".", lw=1, label="queries that can see block 1")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("share of queries that see block 1", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("non-sink attention share")
        ax.set_title(key, fontsize=10)
        ax.set_xticks(range(0, r.n_layers, 2 if r.n_layers <= 20 else 3))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.suptitle(f"Layer importance with and without the window correction ({next(iter(results.values())).seq_len}"
                 "-token samples; colour: attention type as in the figures above)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_schedules(
    schedules: Mapping[str, Mapping[float, Sequence[float]]], windows: Mapping[str, Sequence[int | None]] | None = None,
    literal: Mapping[str, Mapping[float, Sequence[float]]] | None = None,
) -> plt.Figure:
    """Per-layer FFN density from Algorithm 1 for several budgets (dashed: the uniform plan; dotted with
    crosses: the schedule from the paper's literal s_i, when given)."""
    fig, axes = plt.subplots(1, len(schedules), figsize=(6.2 * len(schedules), 3.6), squeeze=False)
    for ax, (key, plans) in zip(axes[0], schedules.items()):
        for c, (budget, dens) in enumerate(sorted(plans.items(), reverse=True)):
            color = PALETTE[2 + c % (len(PALETTE) - 2)]
            ax.plot(range(len(dens)), dens, marker="o", ms=3.5, color=color,
                    label=f"{1 - budget:.0%} sparsity (density {budget:g})")
            ax.axhline(budget, color=color, ls="--", lw=1)
            if literal is not None and budget in literal.get(key, {}):
                lit = literal[key][budget]
                ax.plot(range(len(lit)), lit, marker="x", ms=3.5, ls=":", lw=1, color=color,
                        label=f"  literal s_i, density {budget:g}")
        if windows is not None:
            for i, w in enumerate(windows[key]):
                if w is None and any(x is not None for x in windows[key]):
                    ax.axvline(i, color=FULL_COLOR, alpha=0.25, lw=6)
        ax.set_ylim(0, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key + ("  (shaded: full-attention layers)" if windows and any(
            x is not None for x in windows[key]) else ""), fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("FFN density (1 - sparsity)")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Layer-wise schedule (Algorithm 1) vs uniform (dashed)"
                 + ("; dotted: from the literal s_i" if literal else ""), fontsize=10)
    fig.tight_layout()
    return fig


def plot_schedule_kl(rows: Sequence[Mapping]) -> plt.Figure:
    """Paired KL differences (95 % bootstrap CI) between schedules, per model and budget (notebook 02)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 2.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        labels, vals, los, his = [], [], [], []
        for r in rows:
            if r["model"] != model:
                continue
            for field, label in (("kl_minus_uniform", f"{r['schedule']} - uniform"),
                                 ("kl_minus_literal", "window - literal")):
                if field in r:
                    d, (lo, hi) = r[field], r[f"{field}_ci"]
                    labels.append(f"{label} (density {r['budget']:g})")
                    vals.append(d)
                    los.append(max(0.0, d - lo))
                    his.append(max(0.0, hi - d))
        y = np.arange(len(labels))
        ax.errorbar(vals, y, xerr=[los, his], fmt="o", color=PALETTE[2], capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("paired difference in continuation KL to dense")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_title(model, fontsize=10)
    fig.suptitle("Schedules compared with oracle experts (left of 0: closer to the dense model)", fontsize=10)
    fig.tight_layout()
    return fig
