"""Figures of notebook 03: flocking heat map, predictor training curves, per-layer selection quality."""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from ffcore.plots import PALETTE

POLICY_ORDER = ("oracle", "predictor", "blend", "prior", "first_block_static", "global_static", "random")
POLICY_LABELS = {
    "oracle": "per-block oracle", "predictor": "trained predictor (paper)", "first_block_static": "first-block static",
    "global_static": "global static (train mean)", "random": "random",
    "blend": "predictor blended with the first block (ours)", "prior": "predictor + learned first-block term (ours)",
}


def topk_overlap(scores: Tensor, k: int) -> np.ndarray:
    """Overlap |top-K(i) & top-K(j)| / K of the experts of every pair of blocks: scores [n_blocks, f] -> [n, n]."""
    top = scores.float().topk(k, dim=-1).indices  # [n, k]
    member = np.zeros((scores.shape[0], scores.shape[1]), dtype=bool)
    for i, row in enumerate(top.numpy()):
        member[i, row] = True
    m = member.astype(np.float32)
    return (m @ m.T) / k


def flocking_overlap(scores_by_model: dict[str, Tensor], density: float = 0.5) -> "plt.Figure":
    """Block-to-block overlap of the oracle's top-K experts within one prompt (one panel per model).

    Flocking shows as high overlap everywhere (a prompt keeps using the same neurons); its drift as
    overlap that falls with the distance between blocks. A shared 0-1 colour scale: no outlier
    neuron can dominate it, as raw scores did.
    """
    fig, axes = plt.subplots(1, len(scores_by_model), figsize=(4.6 * len(scores_by_model), 3.9), squeeze=False)
    im = None
    for ax, (name, sc) in zip(axes[0], scores_by_model.items()):
        k = max(1, round(density * sc.shape[-1]))
        ov = topk_overlap(sc, k)
        im = ax.imshow(ov, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set(xlabel="block", ylabel="block", title=f"{name}")
        ax.set_xticks(range(ov.shape[0]))
        ax.set_yticks(range(ov.shape[0]))
        ax.grid(False)
        off = ov[~np.eye(ov.shape[0], dtype=bool)]
        ax.text(0.02, -0.22, f"mean overlap of two blocks {off.mean():.2f}; random K-sets {density:.2f}",
                transform=ax.transAxes, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label=f"share of top-{density:.0%} experts in common", pad=0.02)
    return fig


def learning_curve(rows: Sequence[dict[str, Any]]) -> "plt.Figure":
    """Held-out captured mass (left) and continuation KL (right) against training blocks, in and out of domain."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for c, model in zip(PALETTE, models):
        for scope, ls in (("in domain", "-"), ("out of domain", "--")):
            sel = sorted((r for r in rows if r["model"] == model and r["scope"] == scope), key=lambda r: r["blocks"])
            if not sel:
                continue
            ax1.plot([r["blocks"] for r in sel], [r["mass"] for r in sel], ls=ls, marker="o", color=c,
                     label=f"{model}, {scope}")
            kl = [r for r in sel if r.get("kl") is not None]
            if kl:
                ax2.plot([r["blocks"] for r in kl], [r["kl"] for r in kl], ls=ls, marker="o", color=c,
                         label=f"{model}, {scope}")
        fbs = [r for r in rows if r["model"] == model and r.get("fbs_mass") is not None]
        if fbs:
            ax1.axhline(fbs[0]["fbs_mass"], color=c, lw=0.8, ls=":", label=f"{model}, first-block static")
    ax1.set(xscale="log", xlabel="training blocks (log)", ylabel="captured oracle mass, 50 %",
            title="predictor: held-out selection quality")
    ax2.set(xscale="log", xlabel="training blocks (log)", ylabel="continuation KL to dense",
            title="end to end (out of domain: left-out families)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def family_kl(rows: Sequence[dict[str, Any]], variants: Sequence[str], scope: str = "out of domain") -> "plt.Figure":
    """Continuation KL to dense per family (left-out family of each fold): first-block static, predictors, oracle."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 3.2 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        sel = [r for r in rows if r["model"] == model and r["scope"] == scope]
        fams = list(dict.fromkeys(r["family"] for r in sel))
        x = np.arange(len(fams))
        series = [("first-block static", "kl_first_block_static", variants[0])]
        series += [(POLICY_LABELS.get(v, v), "kl", v) for v in variants]
        series += [("per-block oracle", "kl_oracle", variants[0])]
        width = 0.8 / len(series)
        for i, (label, key, variant) in enumerate(series):
            by = {r["family"]: r for r in sel if r["variant"] == variant}
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [by[f][key] if f in by else np.nan for f in fams],
                   width, color=PALETTE[i % len(PALETTE)], label=label)
        ax.set_xticks(x, [f.replace("all", "all families") for f in fams], rotation=20, ha="right", fontsize=8)
        ax.set(ylabel="KL to dense", title=f"{model}: {scope}, 50 % sparsity")
    axes[0, 0].legend(fontsize=8, ncol=len(variants) + 2)
    fig.tight_layout()
    return fig


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
