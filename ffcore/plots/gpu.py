"""Figures of the GPU session (`scripts/gpu_run.py`): FFN-module speedup beside the FLOP ideal per shape, and
end-to-end prefill speedup vs context length beside the FLOP model, both with interquartile-range error bars.

The functions take flat rows (as `ffcore.experiments.gpu_results` returns them, or any dicts with the same
keys); rows from a CPU dry run make the title say so, since nothing in them is a measurement.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ffcore.plots import PALETTE

Row = Mapping[str, Any]
POLICY_STYLE = {"predictor+compensator": ("o", "-"), "random_given": ("s", ":")}
POLICY_LABEL = {"predictor+compensator": "predictor + compensator", "random_given": "given random experts"}


def _models(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _log2_T(ax: plt.Axes, Ts: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({int(t) for t in Ts})
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
    ax.set_xlabel("context length T (tokens)")


def _iqr_bars(rows: Sequence[Row], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Medians and [lower, upper] error-bar lengths of `key` from its `_q25` / `_q75` fields ([2, n])."""
    med = np.array([float(r[key]) for r in rows])
    lo = np.array([float(r.get(f"{key}_q25", r[key])) for r in rows])
    hi = np.array([float(r.get(f"{key}_q75", r[key])) for r in rows])
    return med, np.vstack([np.clip(med - lo, 0, None), np.clip(hi - med, 0, None)])


def _suptitle(fig: plt.Figure, text: str, rows: Sequence[Row]) -> None:
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    dry = any(r.get("dry_run") for r in rows)
    where = ", ".join(devices) if devices else "device unknown"
    fig.suptitle(f"{text} ({where})" + ("\nCPU DRY RUN: not measurements" if dry else ""), fontsize=11)


def _subplots(n: int) -> tuple[plt.Figure, np.ndarray]:
    return plt.subplots(1, max(1, n), figsize=(4.6 * max(1, n), 3.7), squeeze=False, sharey=True)


def plot_gpu_ffn_speedup(rows: Sequence[Row], gather: bool = True) -> plt.Figure:
    """FFN-module speedup vs T per shape: Triton (IQR bars), gather+bmm (dotted), FLOP ideal (dashed), per density."""
    rows = [r for r in rows if r.get("speedup_triton_vs_dense") is not None]
    if not rows:
        raise ValueError("no measured FFN rows to plot")
    models = _models(rows)
    fig, axes = _subplots(len(models))
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        for c, dens in zip(PALETTE, sorted({r["density"] for r in mine})):
            rs = sorted((r for r in mine if r["density"] == dens), key=lambda r: r["T"])
            Ts = [r["T"] for r in rs]
            med, err = _iqr_bars(rs, "speedup_triton_vs_dense")
            ax.errorbar(Ts, med, yerr=err, fmt="o-", color=c, capsize=3, label=f"{1 - dens:.0%} sparsity, Triton")
            g = [r for r in rs if r.get("speedup_gather_vs_dense") is not None]
            if gather and g:
                ax.plot([r["T"] for r in g], [r["speedup_gather_vs_dense"] for r in g], ":", marker=".", color=c,
                        alpha=0.8, label=f"{1 - dens:.0%}, gather+bmm")
            ax.plot(Ts, [r["flop_ideal_speedup"] for r in rs], "--", color=c, alpha=0.6, label=f"{1 - dens:.0%}, FLOP ideal")
        _log2_T(ax, [r["T"] for r in mine])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{m} (d={mine[0].get('d')}, f={mine[0].get('f')})", fontsize=10)
    axes[0, 0].set_ylabel("FFN-module speedup vs dense cuBLAS")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    _suptitle(fig, "FFN module, block-sparse vs dense, bf16 (median, IQR bars; cf. paper Fig. 6)", rows)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def plot_gpu_ffn_fraction(rows: Sequence[Row]) -> plt.Figure:
    """Fraction of the FLOP-ideal speedup the Triton path reaches, vs T per shape and density."""
    rows = [r for r in rows if r.get("frac_ideal_triton") is not None]
    if not rows:
        raise ValueError("no measured FFN rows to plot")
    models = _models(rows)
    fig, axes = _subplots(len(models))
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        for c, dens in zip(PALETTE, sorted({r["density"] for r in mine})):
            rs = sorted((r for r in mine if r["density"] == dens), key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["frac_ideal_triton"] for r in rs], "o-", color=c,
                    label=f"{1 - dens:.0%} sparsity")
        _log2_T(ax, [r["T"] for r in mine])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(m, fontsize=10)
    axes[0, 0].set_ylabel("measured / FLOP-ideal speedup")
    axes[0, 0].legend(fontsize=8)
    _suptitle(fig, "Triton block-sparse FFN: share of the FLOP-ideal speedup reached", rows)
    fig.tight_layout()
    return fig


def plot_gpu_prefill_speedup(rows: Sequence[Row]) -> plt.Figure:
    """End-to-end prefill speedup vs T per model: measured (IQR bars) per policy and sparsity, FLOP model dashed."""
    rows = [r for r in rows if r.get("variant") != "dense" and r.get("speedup") is not None]
    if not rows:
        raise ValueError("no measured sparse prefill rows to plot")
    models = _models(rows)
    fig, axes = _subplots(len(models))
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        for c, sp in zip(PALETTE, sorted({r["sparsity"] for r in mine})):
            at = [r for r in mine if r["sparsity"] == sp]
            for pol in dict.fromkeys(r["policy"] for r in at):
                rs = sorted((r for r in at if r["policy"] == pol), key=lambda r: r["T"])
                marker, ls = POLICY_STYLE.get(pol, ("^", "-."))
                med, err = _iqr_bars(rs, "speedup")
                ax.errorbar([r["T"] for r in rs], med, yerr=err, marker=marker, ls=ls, color=c, capsize=3,
                            label=f"{sp:.0%} sparsity, {POLICY_LABEL.get(pol, pol)}")
            # the FLOP model of the deployed method (predictor and compensator counted) when it was measured
            ref_pol = "predictor+compensator" if any(r["policy"] == "predictor+compensator" for r in at) else at[0]["policy"]
            rs = sorted((r for r in at if r["policy"] == ref_pol), key=lambda r: r["T"])
            ax.plot([r["T"] for r in rs], [r["flop_speedup"] for r in rs], "--", color=c, alpha=0.6,
                    label=f"{sp:.0%}, FLOP model (compute-bound)")
        _log2_T(ax, [r["T"] for r in mine])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(m, fontsize=10)
    axes[0, 0].set_ylabel("prefill speedup vs dense (TTFT ratio)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.16))
    _suptitle(fig, "End-to-end prefill, random-weight configs, bf16 (median per-round ratio, IQR bars; cf. Fig. 7)",
              rows)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
