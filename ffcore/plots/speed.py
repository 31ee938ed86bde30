"""Notebook 07's figures: FFN-module speedup (Fig. 6 analogue), compute-bound prefill speedup from the
FLOP model (Fig. 7 analogue), and measured time-to-first-token beside the FLOP-model prediction."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ffcore.plots import PALETTE


def _log2_T(ax: plt.Axes, Ts: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(int(t) for t in Ts))
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
    ax.set_xlabel("context length T (tokens)")


def _models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def plot_ffn_speedup(ffn: Sequence[Mapping[str, Any]], title: str = "CPU") -> plt.Figure:
    """Measured FFN-module speedup vs T per model (solid) beside the FLOP-ideal speedup (dashed), per density."""
    models = _models(ffn)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        rows = [r for r in ffn if r["model"] == m]
        for c, dens in zip(PALETTE, sorted({r["density"] for r in rows})):
            rs = sorted((r for r in rows if r["density"] == dens), key=lambda r: r["T"])
            Ts = [r["T"] for r in rs]
            ax.plot(Ts, [r["speedup"] for r in rs], "o-", color=c, label=f"{1 - dens:.0%} sparsity, measured")
            ax.plot(Ts, [r["ideal_speedup"] for r in rs], "--", color=c, alpha=0.7, label=f"{1 - dens:.0%}, FLOP-ideal")
        _log2_T(ax, [r["T"] for r in rows])
        shape = f"d={rows[0]['d']}, f={rows[0]['f']}" if "d" in rows[0] else ""
        ax.set_title(f"{m} ({shape})", fontsize=10)
        ax.axhline(1.0, color="k", lw=0.8)
    axes[0, 0].set_ylabel("FFN-module speedup vs dense")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"FFN module, block-sparse vs dense ({title}; cf. paper Fig. 6)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_flop_curves(curves: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Compute-bound prefill speedup vs T from the FLOP model: layer-wise (solid) and uniform (dashed)."""
    models = _models(curves)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        rows = [r for r in curves if r["model"] == m]
        for c, sp in zip(PALETTE, sorted({r["sparsity"] for r in rows})):
            for kind, ls in (("layer-wise", "-"), ("uniform", "--")):
                rs = sorted((r for r in rows if r["sparsity"] == sp and r["schedule"] == kind), key=lambda r: r["T"])
                if rs:
                    ax.plot([r["T"] for r in rs], [r["speedup"] for r in rs], ls, color=c,
                            label=f"{sp:.0%} sparsity, {kind}")
        _log2_T(ax, [r["T"] for r in rows if r["T"] in (1024, 4096, 16384, 65536) or r["T"] == max(x["T"] for x in rows)])
        ax.set_title(m, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.8)
    axes[0, 0].set_ylabel("end-to-end prefill speedup (FLOPs)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.1))
    fig.suptitle("Compute-bound prefill speedup, predictor + compensator overheads included (cf. paper Fig. 7)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_ttft(ttft: Sequence[Mapping[str, Any]], sparsity: float = 0.5) -> plt.Figure:
    """Measured CPU TTFT speedup (bars) beside the FLOP-model speedup (hatched) per model, T and plan."""
    models = _models(ttft)
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        rows = [r for r in ttft if r["model"] == m and abs(r["sparsity"] - sparsity) < 1e-9]
        Ts = sorted({r["T"] for r in rows})
        plans = list(dict.fromkeys(r["plan"] for r in rows))
        width = 0.8 / (2 * len(plans))
        for j, (p, c) in enumerate(zip(plans, PALETTE)):
            get = {r["T"]: r for r in rows if r["plan"] == p}
            x = np.arange(len(Ts)) + (2 * j - len(plans)) * width + width / 2
            ax.bar(x, [get[T]["speedup"] if T in get else np.nan for T in Ts], width, color=c, label=f"{p}: measured")
            ax.bar(x + width, [get[T]["flop_speedup"] if T in get else np.nan for T in Ts], width, color=c,
                   alpha=0.35, hatch="//", label=f"{p}: FLOP model")
        ax.set_xticks(np.arange(len(Ts)), [f"{T // 1024}K" if T >= 1024 else str(T) for T in Ts])
        ax.set_xlabel("prompt length")
        ax.set_title(m, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.8)
    axes[0, 0].set_ylabel(f"TTFT speedup at {sparsity:.0%} sparsity")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle("Time to first token on CPU, dense vs FastForward (medians, interleaved repeats)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
