"""Notebook 09's needle grid: settings, binning by depth and length, the reading and the heatmap."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ffcore.experiments import nb09_niah as nb09  # noqa: E402
from ffcore.plots import accuracy as aplots  # noqa: E402


def test_settings_reject_bad_values() -> None:
    assert nb09.settings("full").models == ("gemma3-270m",)
    for bad in ({"lengths": (32,)}, {"needles": 0}, {"sparsities": (1.0,)}, {"share": "x"}, {"depthbins": 3}):
        with pytest.raises((ValueError, TypeError)):
            nb09.NIAHSettings.from_dict({**nb09.NIAHSettings().to_dict(), **bad})
    labels = [s.label for s in nb09.specs(nb09.NIAHSettings())]
    assert labels == ["dense", "30% sparsity", "50% sparsity", "per-block oracle 50%"]


def _fake() -> tuple[list[dict], dict[str, list[dict]]]:
    items = [{"uid": f"i{T}", "meta": {"budget": T}, "questions": [{"qid": f"n{j}", "meta": {"depth": d}}
                                                                  for j, d in enumerate((0.1, 0.4, 0.6, 1.0))]}
             for T in (512, 1024)]
    def recs(miss: set) -> list[dict]:
        return [{"uid": f"{it['uid']}/{q['qid']}", "item_uid": it["uid"], "task": "needle",
                 "score": 0.0 if (it["uid"], q["qid"]) in miss else 1.0, "gold_nll": 0.5}
                for it in items for q in it["questions"]]
    return items, {"dense": recs(set()), "50% sparsity": recs({("i1024", "n2"), ("i1024", "n3")})}


def test_cells_bin_by_depth_and_length() -> None:
    items, runs = _fake()
    cells = nb09.cell_rows("m", runs, items, depth_bins=2)
    got = {(c["config"], c["length"], c["depth_bin"]): (c["score"], c["questions"]) for c in cells}
    assert got[("dense", 512, 0)] == (100.0, 2) and got[("dense", 1024, 1)] == (100.0, 2)
    assert got[("50% sparsity", 1024, 1)] == (0.0, 2)  # depth 1.0 falls in the last bin, not past it
    assert got[("50% sparsity", 1024, 0)] == (100.0, 2)
    fig = aplots.niah_heatmaps(cells, "m")
    grid = fig.axes[1].get_images()[0].get_array()  # [depth bin, length] of the sparse panel
    np.testing.assert_array_equal(np.asarray(grid), [[100, 100], [100, 0]])
    gaps = [{"model": "m", "config": "50% sparsity", "questions": 8, "items": 2, "score": 75.0, "score_diff": -25.0,
             "score_diff_ci": [-50.0, 0.0], "gold_prob_rel_gap_pct": -20.0, "gold_prob_rel_ci": [-30.0, -5.0]}]
    text = nb09.reading(cells, gaps)
    assert "weakest cell 0 % at 1024 tokens, depth 50%-100%" in text
    assert "-25.0 points [-50.0, +0.0] (not resolved)" in text and "-20.0 % [-30.0, -5.0] (resolved)" in text

