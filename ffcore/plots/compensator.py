"""Figures of notebook 04: compensator training curves, per-layer error reduction, correction norms, density sweep."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, PercentFormatter

COMP_ORDER = ("none", "before", "plain", "masked", "specialist")
COMP_COLORS = {"none": "#7f7f7f", "before": "#9ecae1", "plain": "#1f77b4", "masked": "#d62728", "specialist": "#2ca02c"}
COMP_LABELS = {
    "none": "no compensation", "plain": "plain compensator (paper), schedule densities + gain",
    "masked": "mask-conditioned (ours)", "before": "plain, earlier: 0.5-0.7 grid, no gain",
    "specialist": "plain, trained at one density",
}


def _select(rows: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """Per-layer rows (layer >= 0) matching every key, sorted by layer."""
    sel = [r for r in rows if r["layer"] >= 0 and all(r.get(k) == v for k, v in match.items())]
    return sorted(sel, key=lambda r: r["layer"])


def training_curves(histories: dict[str, dict[str, list[dict[str, Any]]]],
                    continues: dict[str, str] | None = None) -> "plt.Figure":
    """Validation (solid) and training (dashed) relative MSE per epoch; one panel per model, one colour per variant.

    `histories[model][variant]` is `TrainResult.history`; each phase starts with an epoch-0 entry
    (its starting point on that phase's masks), marked by a dotted vertical line. A variant listed
    in `continues` (default: masked continues plain) is drawn after the variant it was initialised from.
    """
    continues = {"masked": "plain"} if continues is None else continues
    names = list(histories)
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        start: dict[str, int] = {}
        n_marks = 0
        for variant, hist in histories[name].items():
            c = COMP_COLORS.get(variant, "#9467bd")
            x0 = start.get(continues.get(variant, ""), 0)
            start[variant] = x0 + len(hist)
            x = [x0 + i for i in range(len(hist))]
            ax.plot(x, [h["val_loss"] for h in hist], color=c, marker="o", ms=2.5, label=f"{variant} validation")
            tr = [(x0 + i, h["train_loss"]) for i, h in enumerate(hist) if h["train_loss"] is not None]
            ax.plot([i for i, _ in tr], [v for _, v in tr], color=c, ls="--", alpha=0.7, label=f"{variant} train")
            for i, h in enumerate(hist):
                if h["epoch"] == 0:
                    ax.axvline(x0 + i, color=c, ls=":", lw=1)
                    ax.annotate(f" {variant}: {h['phase']} masks", (x0 + i, 0.98 - 0.06 * n_marks),
                                xycoords=("data", "axes fraction"), color=c, fontsize=7, va="top", ha="left")
                    n_marks += 1
        ax.set(xlabel="epoch (all phases)", ylabel="relative MSE (1 = uncompensated)", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def per_layer_error(rows_by_model: dict[str, Sequence[dict[str, Any]]], density: float = 0.5) -> "plt.Figure":
    """Per-layer relative FFN-output error (top) and its reduction (bottom) for each compensator; one column per model.

    Solid lines: the trained predictor's masks (deployment); dashed: oracle masks (reference).
    """
    names = list(rows_by_model)
    fig, axes = plt.subplots(2, len(names), figsize=(5.8 * len(names), 6.6), squeeze=False)
    for col, name in enumerate(names):
        rows = rows_by_model[name]
        for comp in COMP_ORDER:
            for source, ls, alpha in (("predictor", "-", 1.0), ("oracle", "--", 0.55)):
                sel = _select(rows, density=density, compensator=comp, source=source)
                if not sel:
                    continue
                layers = [r["layer"] for r in sel]
                lab = f"{COMP_LABELS[comp]}, {source} masks"
                axes[0, col].plot(layers, [r["rel_err"] for r in sel], ls=ls, alpha=alpha, marker="o", ms=3,
                                  color=COMP_COLORS[comp], label=lab)
                if comp != "none":
                    axes[1, col].plot(layers, [r["reduction"] for r in sel], ls=ls, alpha=alpha, marker="o", ms=3,
                                      color=COMP_COLORS[comp], label=lab)
        axes[0, col].set(title=f"{name}, density {density:.0%}", ylabel="||y_dense - y_sparse - c|| / ||y_dense||")
        axes[1, col].set(xlabel="layer", ylabel="error reduction vs no compensation")
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[1, col].yaxis.set_major_formatter(PercentFormatter(1.0))
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def correction_norms(rows_by_model: dict[str, Sequence[dict[str, Any]]], density: float = 0.5,
                     source: str = "predictor") -> "plt.Figure":
    """||c|| / ||e|| (top) and cos(c, e) (bottom) per layer for each trained compensator; one column per model."""
    names = list(rows_by_model)
    fig, axes = plt.subplots(2, len(names), figsize=(5.6 * len(names), 5.8), squeeze=False, sharex="col")
    for col, name in enumerate(names):
        for comp in COMP_ORDER[1:]:
            sel = _select(rows_by_model[name], density=density, compensator=comp, source=source)
            if not sel:
                continue
            layers = [r["layer"] for r in sel]
            axes[0, col].plot(layers, [r["corr_to_err"] for r in sel], marker="o", ms=3, color=COMP_COLORS[comp],
                              label=COMP_LABELS[comp])
            axes[1, col].plot(layers, [r["cos"] for r in sel], marker="o", ms=3, color=COMP_COLORS[comp],
                              label=COMP_LABELS[comp])
        axes[0, col].set(title=f"{name}, {source} masks, density {density:.0%}", ylabel="||c|| / ||e||")
        axes[1, col].set(xlabel="layer", ylabel="cos(c, e)")
        axes[0, col].axhline(1, color="black", lw=0.8, ls=":")
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    return fig


def across_densities(table: Sequence[dict[str, Any]], source: str = "predictor",
                     trained: tuple[float, float] = (0.5, 0.7)) -> "plt.Figure":
    """Layer-mean relative error (top) and its reduction (bottom) vs density; one column per model; trained range shaded."""
    names = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(2, len(names), figsize=(5.4 * len(names), 6.4), squeeze=False, sharex=True)
    for col, name in enumerate(names):
        for comp in COMP_ORDER:
            sel = sorted((r for r in table if (r["model"], r["source"], r["compensator"]) == (name, source, comp)),
                         key=lambda r: r["density"])
            if not sel:
                continue
            dens = [r["density"] for r in sel]
            ls = "--" if comp == "before" else "-"
            axes[0, col].plot(dens, [r["rel_err"] for r in sel], marker="o", ls=ls, color=COMP_COLORS[comp],
                              label=COMP_LABELS[comp])
            if comp != "none":
                axes[1, col].plot(dens, [r["reduction"] for r in sel], marker="o", ls=ls, color=COMP_COLORS[comp],
                                  label=COMP_LABELS[comp])
        for ax in axes[:, col]:
            ax.axvspan(*trained, color="#bbbbbb", alpha=0.25, lw=0, label="trained density range")
        axes[0, col].set(ylabel="relative error (layer mean)", title=f"{name}, {source} masks")
        axes[1, col].set(xlabel="density (1 - sparsity)", ylabel="reduction (layer mean)")
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[1, col].yaxis.set_major_formatter(PercentFormatter(1.0))
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    return fig
