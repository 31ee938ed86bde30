"""Figures of notebook 01: where prefill FLOPs and CPU time go, and what FFN sparsity can buy.

Every function takes flat records (as written to `results/`) and returns a matplotlib Figure.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ffcore.plots import PALETTE

# Display groups of the FLOP components (ffcore.flops.COMPONENTS), bottom to top.
FLOP_GROUPS = {
    "FFN (gate, up, down)": ("ffn",),
    "q/k/v/o projections": ("q_proj", "kv_proj", "o_proj"),
    "attention scores QKᵀ": ("attn_scores",),
    "attention AV": ("attn_av",),
    "lm head (last token)": ("lm_head",),
}
MODULE_COLORS = {"mlp": PALETTE[0], "attention": PALETTE[1], "other": PALETTE[7]}


def _by_model(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Group records by their `model` field, keeping first-seen order."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["model"]].append(r)
    return dict(out)


def _share_series(rows: Sequence[Mapping[str, Any]], components: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(T, summed share of `components`) sorted by T."""
    acc: dict[int, float] = defaultdict(float)
    for r in rows:
        if r["component"] in components:
            acc[r["T"]] += r["share"]
    Ts = np.array(sorted(acc))
    return Ts, np.array([acc[t] for t in Ts])


def _fmt_T(x: float) -> str:
    """A context length as a short label: 512, 2K, 128K."""
    return f"{x / 1024:g}K" if x >= 1024 else f"{x:g}"


def _log2_axis(ax: plt.Axes, label: str = "context length T (tokens)") -> None:
    """A base-2 log x axis with plain-number tick labels."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: _fmt_T(x)))
    ax.set_xlabel(label)


def plot_ffn_attention_share(
    flop_rows: Sequence[Mapping[str, Any]], crossovers: Mapping[str, int | None],
    panels: Mapping[str, Sequence[str]],
) -> plt.Figure:
    """FFN (solid) vs attention scores+AV (dashed) share of prefill FLOPs vs T; crossover marked."""
    groups = _by_model(flop_rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), sharey=True, squeeze=False)
    for ax, (title, models) in zip(axes[0], panels.items()):
        for color, name in zip(PALETTE, models):
            T, ffn = _share_series(groups[name], ("ffn",))
            _, attn = _share_series(groups[name], ("attn_scores", "attn_av"))
            t_star = crossovers.get(name)
            ax.plot(T, ffn, color=color, lw=2, label=f"{name}  (T* = {t_star:,})" if t_star else name)
            ax.plot(T, attn, color=color, lw=1.6, ls="--")
            if t_star is not None and T[0] <= t_star <= T[-1]:
                y = np.interp(np.log2(t_star), np.log2(T), ffn)
                ax.plot([t_star], [y], "o", color=color, ms=7, mec="k")
        _log2_axis(ax)
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="center left", title="solid: FFN, dashed: QKᵀ+AV", title_fontsize=8)
    axes[0][0].set_ylabel("share of prefill FLOPs")
    fig.suptitle("FFN vs attention (QKᵀ + AV) share of prefill FLOPs; dot = crossover T* (attention > FFN)", y=1.02)
    fig.tight_layout()
    return fig


def plot_component_breakdown(flop_rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> plt.Figure:
    """Stacked share of prefill FLOPs by component vs context length, one panel per model."""
    groups = _by_model(flop_rows)
    cols = min(3, len(models))
    nrows = -(-len(models) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, models):
        series = [_share_series(groups[name], comps) for comps in FLOP_GROUPS.values()]
        ax.stackplot(series[0][0], *[s[1] for s in series], labels=list(FLOP_GROUPS), colors=PALETTE, alpha=0.85)
        _log2_axis(ax)
        ax.set_title(name, fontsize=11)
        ax.set_ylim(0, 1)
        ax.margins(x=0)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of prefill FLOPs")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.04), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_measured_time(timing_rows: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Measured prefill time per component vs context length (log-log), one panel per model."""
    groups = _by_model(timing_rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.4 * len(groups), 4.0), squeeze=False)
    for ax, (name, rows) in zip(axes[0], groups.items()):
        for comp in ("total", "mlp", "attention", "other"):
            pts = sorted((r["T"], r["median_s"]) for r in rows if r["component"] == comp)
            T, s = np.array(pts).T
            ax.plot(T, s, "o-", color=MODULE_COLORS.get(comp, "k"), lw=2.4 if comp == "total" else 1.6,
                    label="total prefill" if comp == "total" else comp)
        _log2_axis(ax)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_ylabel("median wall time (s)")
        ax.legend(fontsize=8)
    fig.suptitle("Measured CPU prefill time by component", y=1.02)
    fig.tight_layout()
    return fig


def plot_measured_vs_flops(
    timing_rows: Sequence[Mapping[str, Any]], model_share_rows: Sequence[Mapping[str, Any]],
) -> plt.Figure:
    """Stacked shares (mlp, attention, other) vs T: measured CPU time next to the FLOP model's.

    One row per model; the first column is the measured time, each further column one
    `source` of `model_share_rows` (records: model, T, source, component, share).
    """
    t_groups, f_groups = _by_model(timing_rows), _by_model(model_share_rows)
    sources = list(dict.fromkeys(r["source"] for r in model_share_rows))
    ncols = 1 + len(sources)
    fig, axes = plt.subplots(len(t_groups), ncols, figsize=(3.6 * ncols, 3.3 * len(t_groups)), sharey=True,
                             squeeze=False)
    for row, (name, rows) in zip(axes, t_groups.items()):
        Ts = sorted({r["T"] for r in rows})
        panels = [("measured CPU time", rows)] + [
            (src, [r for r in f_groups.get(name, []) if r["source"] == src]) for src in sources
        ]
        for ax, (label, recs) in zip(row, panels):
            share = {(r["T"], r["component"]): r["share"] for r in recs}
            bottom = np.zeros(len(Ts))
            for comp in ("mlp", "attention", "other"):
                h = np.array([share.get((T, comp), 0.0) for T in Ts])
                ax.bar(range(len(Ts)), h, 0.8, bottom=bottom, color=MODULE_COLORS[comp], label=comp)
                bottom += h
            ax.set_xticks(range(len(Ts)), [_fmt_T(T) for T in Ts])
            ax.set_title(f"{name}\n{label}", fontsize=10)
            ax.set_ylim(0, 1)
        row[0].set_ylabel("share of prefill")
    for ax in axes[-1]:
        ax.set_xlabel("context length T")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_plan_speedup(speedup_rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> plt.Figure:
    """Compute-bound prefill speedup of FFN sparsity vs context length, per model and density."""
    groups = _by_model(speedup_rows)
    cols = min(3, len(models))
    nrows = -(-len(models) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.5 * nrows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, models):
        by_density: dict[float, list[tuple[int, float]]] = defaultdict(list)
        for r in groups[name]:
            by_density[r["mean_density"]].append((r["T"], r["speedup"]))
        for color, (rho, pts) in zip(PALETTE, sorted(by_density.items(), reverse=True)):
            T, s = np.array(sorted(pts)).T
            ax.plot(T, s, color=color, lw=1.8, label=f"{1 - rho:.0%} sparsity")
        _log2_axis(ax)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(name, fontsize=11)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("compute-bound speedup (FLOPs)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Dense / sparse prefill FLOPs (first+last block dense, predictor + compensator counted)", y=1.01)
    fig.tight_layout()
    return fig
