"""Notebook 03's experiment code on a tiny model: folds, per-family offline metrics, the KL table."""
from __future__ import annotations

import pytest

from ffcore.collect import collect, load_collection_dir
from ffcore.data import FAMILIES, SOURCES
from ffcore.experiments import nb03_predictor as nb03
from ffcore.models import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = load_model("tiny-llama")
    S = nb03.settings("smoke")
    root = tmp_path_factory.mktemp("nb03")
    colls = {split: load_collection_dir(collect(model, tok, cfg, root / split, "tiny-llama", progress=False))
             for split, cfg in (("train", S.train), ("eval", S.heldout))}
    return model, tok, S, colls


def test_settings_and_folds():
    S = nb03.settings("smoke")
    assert S.train.sources == SOURCES and S.held_out == ("python",) and S.train_families == ("manuals",)
    full = nb03.settings("full")
    assert set(full.families) == set(FAMILIES) and set(full.held_out) == set(nb03.HELD_OUT)
    folds = nb03.fold_families(full.families, full.held_out)
    assert folds["deployed"] == full.train_families
    for f in full.families:
        assert f not in folds[f"without {f}"] and len(folds[f"without {f}"]) == len(full.families) - 1
    with pytest.raises(ValueError, match="held-out"):
        nb03.Notebook03Settings.from_dict({**S.to_dict(), "held_out": ("fiction",)})


def test_folds_train_on_their_families_only(setup):
    _, _, S, colls = setup
    res = nb03.train_fold(colls["train"], ["manuals"], {"plain": S.plain, "prior": S.prior})
    for r in res.values():
        assert r.predictor.meta["families"] == ["manuals"]
        assert r.predictor.meta["training"]["train_blocks"] + r.predictor.meta["training"]["val_blocks"] < \
            colls["train"].n_blocks  # the python family's blocks were left out
    half = nb03.train_fold(colls["train"], ["manuals", "python"], {"plain": S.plain}, fraction=0.5)
    assert half["plain"].predictor.meta["fraction"] == 0.5


def test_offline_rows_split_in_and_out_of_domain(setup):
    _, _, S, colls = setup
    res = nb03.train_fold(colls["train"], ["manuals"], {"plain": S.plain})
    rows = nb03.offline_rows(colls["eval"], {"predictor": res["plain"].predictor}, colls["train"].scores.mean(0),
                             ["manuals"])
    fams = {(r["family"], r["in_domain"]) for r in rows}
    assert fams == {("manuals", True), ("python", False)}
    pols = {r["policy"] for r in rows}
    assert {"oracle", "first_block_static", "random", "global_static", "predictor"} <= pols
    assert all(r["mass"] == 1.0 for r in rows if r["policy"] == "oracle")


def test_kl_runs_and_table(setup, tmp_path):
    model, tok, S, colls = setup
    windows = nb03.kl_windows(tok, S.families, 1, 256, 8)
    assert [nb03.window_family(w) for w in windows] == list(S.families)
    folds = {}
    for fold, fams in nb03.fold_families(S.families, S.held_out).items():
        res = nb03.train_fold(colls["train"], fams, {"plain": S.plain})
        folds[fold] = {k: r.predictor for k, r in res.items()}
    runs = nb03.kl_runs(model, tok, windows, folds, 0.5, tmp_path / "cache")
    assert {"dense", "first_block_static", "oracle", "plain [deployed]", "plain [without manuals]"} <= set(runs)
    assert len(runs["plain [without python]"]) == 1  # a fold runs on the family it left out only
    table = nb03.kl_table(runs, windows, ["plain"], n_boot=200)
    scopes = {(r["scope"], r["family"]) for r in table}
    assert ("out of domain", "all") in scopes and ("in domain", "manuals") in scopes
    for r in table:
        assert r["kl"] >= 0 and r["kl_oracle"] >= 0 and r["n"] >= 1
