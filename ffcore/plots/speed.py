"""Notebook 07's figures: FFN-module speedup (Fig. 6 analogue), compute-bound prefill speedup from the
FLOP model (Fig. 7 analogue), and measured time-to-first-token beside the FLOP-model prediction."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
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


def plot_flop_curves(curves: Sequence[Mapping[str, Any]], tol: float = 5e-3) -> plt.Figure:
    """Compute-bound prefill speedup vs T from the FLOP model: layer-wise (solid) and uniform (dashed).

    Where the two schedules give the same curve (within `tol`: every layer has the same FFN shape, so
    only the mean density counts) one line is drawn and labelled "uniform = layer-wise".
    """
    models = _models(curves)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], models):
        rows = [r for r in curves if r["model"] == m]
        for c, sp in zip(PALETTE, sorted({r["sparsity"] for r in rows})):
            by = {kind: sorted((r for r in rows if r["sparsity"] == sp and r["schedule"] == kind), key=lambda r: r["T"])
                  for kind in ("layer-wise", "uniform")}
            same = by["layer-wise"] and len(by["layer-wise"]) == len(by["uniform"]) and max(
                abs(a["speedup"] - b["speedup"]) for a, b in zip(by["layer-wise"], by["uniform"])) < tol
            for kind, ls in (("layer-wise", "-"), ("uniform", "--")):
                rs = by[kind]
                if not rs or (same and kind == "uniform"):
                    continue
                label = f"{sp:.0%} sparsity, " + ("uniform = layer-wise" if same else kind)
                ax.plot([r["T"] for r in rs], [r["speedup"] for r in rs], ls, color=c, label=label)
        Ts = sorted({r["T"] for r in rows})
        _log2_T(ax, [t for t in Ts if t & (t - 1) == 0 and t >= 256] or Ts[:: max(1, len(Ts) // 6)])
        ax.set_title(m, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("end-to-end prefill speedup (FLOPs)")
    fig.suptitle("Compute-bound prefill speedup, predictor + compensator overheads included (cf. paper Fig. 7)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def _err(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray | None:
    """[2, n] distances from each row's median `key` to its quartiles (`key_q25`, `key_q75`), or None if absent."""
    if not rows or any(f"{key}_q25" not in r for r in rows):
        return None
    return np.array([[r[key] - r[f"{key}_q25"] for r in rows], [r[f"{key}_q75"] - r[key] for r in rows]])


def _quartile_err(samples: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Medians [n] and [2, n] distances to the quartiles of each list of samples."""
    q = np.array([np.percentile(s, [25, 50, 75]) for s in samples])  # [n, 3]
    return q[:, 1], np.stack([q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]])


def plot_ttft_absolute(ttft: Sequence[Mapping[str, Any]], sparsity: float = 0.5) -> plt.Figure:
    """Absolute TTFT against context length, dense vs each plan (medians, interquartile bars; cf. paper Fig. 1)."""
    models = _models(ttft)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in ttft if r["model"] == m and abs(r["sparsity"] - sparsity) < 1e-9 and "dense_all_s" in r]
        Ts = sorted({r["T"] for r in rows})
        plans = [p for p in dict.fromkeys(r["plan"] for r in rows)
                 if {r["T"] for r in rows if r["plan"] == p} == set(Ts)]  # plans timed at every length
        if not plans:
            continue
        first = {T: next(r for r in rows if r["T"] == T) for T in Ts}  # the dense baseline is shared per length
        med, err = _quartile_err([first[T]["dense_all_s"] for T in Ts])
        ax.errorbar(Ts, med, yerr=err, fmt="o-", color="k", capsize=3, label="dense")
        for p, c in zip(plans, PALETTE):
            rs = {r["T"]: r for r in rows if r["plan"] == p}
            med, err = _quartile_err([rs[T]["sparse_all_s"] for T in Ts])
            ax.errorbar(Ts, med, yerr=err, fmt="o-", color=c, capsize=3, label=f"{p} ({sparsity:.0%})")
        _log2_T(ax, Ts)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
        ax.set_title(m, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].set_ylabel("time to first token (s)")
    fig.suptitle("CPU time to first token against context length (cf. paper Fig. 1)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_ttft(ttft: Sequence[Mapping[str, Any]], sparsity: float = 0.5) -> plt.Figure:
    """Measured CPU TTFT speedup (bars, interquartile whiskers) beside the FLOP-model speedup (hatched)."""
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
            have = [get[T] for T in Ts if T in get]
            err = _err(have, "speedup") if len(have) == len(Ts) else None  # interquartile range of the per-round ratios
            ax.bar(x, [get[T]["speedup"] if T in get else np.nan for T in Ts], width, color=c, label=f"{p}: measured",
                   yerr=err, capsize=2, error_kw={"lw": 0.8})
            ax.bar(x + width, [get[T]["flop_speedup"] if T in get else np.nan for T in Ts], width, color=c,
                   alpha=0.35, hatch="//", label=f"{p}: FLOP model")
        ax.set_xticks(np.arange(len(Ts)), [f"{T // 1024}K" if T >= 1024 else str(T) for T in Ts])
        ax.set_xlabel("prompt length")
        ax.set_title(m, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.8)
    axes[0, 0].set_ylabel(f"TTFT speedup at {sparsity:.0%} sparsity")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle("Time to first token on CPU, dense vs FastForward (median ratio of interleaved rounds, bars: interquartile range)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig
