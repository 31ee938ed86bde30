"""Figures of notebook 03: flocking heat map, predictor training curves, per-layer selection quality."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ffcore.plots import PALETTE

POLICY_ORDER = ("oracle", "predictor", "first_block_static", "global_static", "random")
POLICY_LABELS = {
    "oracle": "per-block oracle", "predictor": "trained predictor", "first_block_static": "first-block static",
    "global_static": "global static (train mean)", "random": "random",
}


def flocking_heatmap(scores: Tensor, title: str, ax: "plt.Axes | None" = None, max_neurons: int = 512) -> "plt.Figure":
    """Neuron importance across the blocks of one prompt: scores [n_blocks, f], neurons sorted by mean importance."""
    sc = scores.float().numpy()  # [n_blocks, f]
    order = np.argsort(-sc.mean(0))[:max_neurons]  # the most important neurons on average, left to right
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 2.8))
    im = ax.imshow(sc[:, order], aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel(f"neuron (top {len(order)} of {sc.shape[1]}, sorted by mean importance over the prompt)")
    ax.set_ylabel("block")
    ax.set_yticks(range(sc.shape[0]))
    ax.set_title(title)
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="GRIFFIN score", pad=0.01)
    return fig


def training_curves(histories: dict[str, list[dict[str, Any]]]) -> "plt.Figure":
    """Train/validation loss (mean over layers) and validation captured mass per epoch, one colour per model."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for c, (name, hist) in zip(PALETTE, histories.items()):
        ep = [h["epoch"] for h in hist]
        ax1.plot(ep, [h["train_loss"] for h in hist], color=c, ls="--", label=f"{name} train")
        ax1.plot(ep, [h["val_loss"] for h in hist], color=c, label=f"{name} validation")
        ax2.plot(ep, [h["val_mass_at_0.5"] for h in hist], color=c, label=name)
    ax1.set(xlabel="epoch", ylabel="weighted BCE (mean over layers)", title="predictor training")
    ax2.set(xlabel="epoch", ylabel="captured mass at 50 % density", title="validation selection quality")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_layer_quality(rows_by_model: dict[str, Sequence[dict[str, Any]]], density: float = 0.5) -> "plt.Figure":
    """Per-layer recall of the oracle top-K and captured mass per policy, one column per model."""
    names = list(rows_by_model)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 6.2), squeeze=False, sharey="row")
    for col, name in enumerate(names):
        rows = [r for r in rows_by_model[name] if r["density"] == density and r["layer"] >= 0]
        for c, pol in zip(PALETTE, POLICY_ORDER):
            sel = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["layer"])
            if not sel:
                continue
            for row, metric in enumerate(("recall", "mass")):
                axes[row, col].plot([r["layer"] for r in sel], [r[metric] for r in sel], marker="o", ms=3,
                                    color=c, label=POLICY_LABELS[pol])
        axes[0, col].set_title(f"{name}, density {density:.0%}")
        axes[0, col].set_ylabel("recall of oracle top-K")
        axes[1, col].set_ylabel("captured importance mass")
        axes[1, col].set_xlabel("layer")
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
