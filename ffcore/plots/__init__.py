"""Plotting: one submodule per notebook topic; this module holds the shared style and saver."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None

import matplotlib.pyplot as plt  # noqa: E402

from ffcore.results import out_dirs  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]


def style() -> None:
    """The project's matplotlib style (applied once per notebook)."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.titleweight": "bold"})


def save_figure(fig: "plt.Figure", name: str, profile: str) -> Path:
    """Save `fig` as `<figures>/<name>.png` for the profile and return the path."""
    path = out_dirs(profile).figures / f"{name}.png"
    fig.savefig(path, bbox_inches="tight")
    return path
