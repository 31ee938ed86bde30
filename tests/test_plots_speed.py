"""Notebook 07's figures draw what their rows say: spreads, the Fig. 1 form, coinciding schedules."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ffcore.plots import speed  # noqa: E402


def _ttft_rows() -> list[dict]:
    rows = []
    for T, dense in ((1024, [1.0, 1.2, 1.1, 1.4]), (2048, [2.0, 2.4, 2.2, 2.1])):
        for plan, f in (("full method", 0.8), ("random experts", 0.9)):
            sparse = [t * f for t in dense]
            rows.append({"model": "m", "plan": plan, "T": T, "sparsity": 0.5, "dense_all_s": dense,
                         "sparse_all_s": sparse, "speedup": 1 / f, "speedup_q25": 1 / f - 0.1,
                         "speedup_q75": 1 / f + 0.2, "flop_speedup": 1.3})
    return rows


def test_ttft_absolute_draws_medians_and_quartiles() -> None:
    fig = speed.plot_ttft_absolute(_ttft_rows())
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: label -> data line
    assert set(lines) == {"dense", "full method (50%)", "random experts (50%)"}
    np.testing.assert_allclose(lines["dense"].get_ydata(), [np.median([1.0, 1.2, 1.1, 1.4]), np.median([2.0, 2.4, 2.2, 2.1])])
    np.testing.assert_allclose(lines["full method (50%)"].get_ydata(), 0.8 * lines["dense"].get_ydata())
    assert ax.get_xticklabels()[0].get_text() == "1K"


def test_ttft_speedup_bars_carry_the_interquartile_range() -> None:
    fig = speed.plot_ttft(_ttft_rows())
    ax = fig.axes[0]
    segs = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    assert segs, "no error bars drawn"
    (lo, hi), = {tuple(np.round(s[:, 1], 6)) for s in segs[0].get_segments()[:1]}  # first bar's whisker
    assert hi - lo == pytest.approx(0.3)


def test_flop_curves_merge_coinciding_schedules() -> None:
    Ts = [256, 512, 1024]
    rows = [{"model": "m", "sparsity": 0.5, "schedule": k, "T": T, "speedup": 1 + T / 4096 + d}
            for T in Ts for k, d in (("uniform", 0.0), ("layer-wise", 1e-4))]
    rows += [{"model": "m", "sparsity": 0.3, "schedule": k, "T": T, "speedup": 1 + T / 8192 + d}
             for T in Ts for k, d in (("uniform", 0.0), ("layer-wise", 0.05))]
    ax = speed.plot_flop_curves(rows).axes[0]
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert labels == ["30% sparsity, layer-wise", "30% sparsity, uniform", "50% sparsity, uniform = layer-wise"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "512", "1K"]
