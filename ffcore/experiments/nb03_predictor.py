"""Notebook 03 (the expert predictor): the settings per profile, where the profile's collections and
predictor live (`collection_dir`, `predictor_dir`: notebook 04 and later read them from there), the
continuation-NLL sanity check and the verdict text.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ffcore.collect import CollectConfig, Collection, load_collection_dir
from ffcore.config import StrictConfig
from ffcore.data import token_samples
from ffcore.decoding import continuation_nll
from ffcore.engine import SparsityPlan
from ffcore.experiments.profiles import pick
from ffcore.models import model_slug
from ffcore.predictor import ExpertPredictor, PredictorConfig, load_predictor
from ffcore.results import out_dirs


# ------------------------------------------------------------------------------ where the artifacts live
def model_artifacts(model_key: str, profile: str) -> Path:
    """`out_dirs(profile).artifacts/<model>/`: the collections, predictor and compensators of one model."""
    path = out_dirs(profile).artifacts / model_slug(model_key)
    path.mkdir(parents=True, exist_ok=True)
    return path


def collection_dir(model_key: str, profile: str, split: str) -> Path:
    """`<artifacts>/<model>/collect_<split>/`."""
    return model_artifacts(model_key, profile) / f"collect_{split}"


def load_collection(
    model_key: str, profile: str, split: str, layers: Sequence[int] | None = None, with_x: bool = True,
    fingerprint: str | None = None,
) -> Collection:
    """Load the collection of `model_key`/`split` that notebook 03 wrote for `profile`."""
    return load_collection_dir(collection_dir(model_key, profile, split), layers, with_x, fingerprint)


def predictor_dir(model_key: str, profile: str) -> Path:
    """`<artifacts>/<model>/` (the predictor files are `predictor.*` there)."""
    return model_artifacts(model_key, profile)


def load_profile_predictor(model_key: str, profile: str, model: nn.Module | None = None) -> ExpertPredictor:
    """Notebook 03's predictor of a model (refused for a model with another fingerprint)."""
    return load_predictor(predictor_dir(model_key, profile), model)


# ------------------------------------------------------------------------------ profiles
@dataclasses.dataclass
class Notebook03Settings(StrictConfig):
    """Per-profile sizes for notebook 03 (collection, training, sanity check)."""

    train: CollectConfig
    heldout: CollectConfig
    predictor: PredictorConfig
    nll_samples: int
    nll_ctx: int
    nll_cont: int


def settings(profile: str, seed: int = 0) -> Notebook03Settings:
    """The notebook-03 settings of a profile (smoke: tiny models in seconds; full: ~8 min on 2 idle CPU cores).

    Collection dominates the cost (one dense forward per token); in development runs on
    smollm2-135m, 48 training samples beat 32 (held-out captured mass 0.953 vs 0.945), so
    `full` uses as many as the runtime target allows.
    """
    seq = pick(profile, 512, 1024, 1024)
    train = CollectConfig(split="train", n_samples=pick(profile, 6, 16, 40), seq_len=seq, seed=seed)
    heldout = CollectConfig(split="eval", n_samples=pick(profile, 3, 6, 6), seq_len=seq, seed=seed)
    pcfg = PredictorConfig(seed=seed, mean_pool_epochs=pick(profile, 30, 40, 40), max_epochs=pick(profile, 2, 2, 2),
                           batch_blocks=pick(profile, 4, 32, 32))
    return Notebook03Settings(train, heldout, pcfg, nll_samples=pick(profile, 1, 2, 3),
                              nll_ctx=pick(profile, 384, 1024, 1024), nll_cont=pick(profile, 32, 64, 64))


# ------------------------------------------------------------------------------ notebook helpers
def mean_rows(rows: Sequence[dict[str, Any]], model_key: str) -> list[dict[str, Any]]:
    """The layer-averaged rows of `selection_metrics`, tagged with the model (the Table 7 analogue)."""
    return [{"model": model_key, "policy": r["policy"], "density": r["density"], "k": r["k"],
             "recall": round(r["recall"], 4), "mass": round(r["mass"], 4)} for r in rows if r["layer"] == -1]


def sanity_nll(
    model: nn.Module, tokenizer: Any, predictor: ExpertPredictor, n_samples: int, ctx_len: int, cont_len: int,
    density: float = 0.5, seed: int = 0, policies: Sequence[str] = ("dense", "oracle", "predictor", "first_block_static"),
) -> list[dict[str, Any]]:
    """Continuation NLL on eval samples after a sparse prefill (first/last block dense) for each policy."""
    ids = token_samples(tokenizer, "eval", ctx_len + cont_len, n_samples, seed=seed)["input_ids"]  # [n, T]
    rows = []
    for name in policies:
        t0 = time.time()
        plan = None if name == "dense" else SparsityPlan(
            densities=density, policy=predictor if name == "predictor" else name, seed=seed)
        nll = continuation_nll(model, ids, ctx_len, plan)
        rows.append({"policy": name, "density": 1.0 if name == "dense" else density, "nll": round(nll, 5),
                     "seconds": round(time.time() - t0, 1)})
    dense = rows[0]["nll"] if rows and rows[0]["policy"] == "dense" else None
    for r in rows:
        r["rel_change_pct"] = None if dense is None else round(100 * (r["nll"] / dense - 1), 2)
    return rows


def verdict(table: Sequence[dict[str, Any]], density: float = 0.5) -> str:
    """A Markdown paragraph comparing the predictor with first-block static, computed from `mean_rows` output."""
    lines = []
    for model_key in dict.fromkeys(r["model"] for r in table):
        get = {r["policy"]: r for r in table if r["model"] == model_key and r["density"] == density}
        p, s, g = get.get("predictor"), get.get("first_block_static"), get.get("global_static")
        if p is None or s is None:
            continue
        beats = p["mass"] > s["mass"]
        gl = f"; the prompt-independent global-static prior captures {g['mass']:.3f}" if g else ""
        lines.append(
            f"- **{model_key}** at {density:.0%} density: the trained predictor captures **{p['mass']:.3f}** of the "
            f"oracle's importance mass (recall {p['recall']:.3f}) vs **{s['mass']:.3f}** (recall {s['recall']:.3f}) "
            f"for first-block static{gl}. The predictor "
            + ("**beats** first-block static." if beats else "does **not** beat first-block static.")
        )
    return "\n".join(lines)


def nll_verdict(nll_rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown line per model ranking the policies by continuation-NLL change, computed from `sanity_nll` rows."""
    lines = []
    for model_key in dict.fromkeys(r["model"] for r in nll_rows):
        rs = sorted((r for r in nll_rows if r["model"] == model_key and r["policy"] != "dense"),
                    key=lambda r: r["rel_change_pct"])
        ranking = ", ".join(f"{r['policy']} {r['rel_change_pct']:+.2f} %" for r in rs)
        lines.append(f"- **{model_key}** (NLL change vs dense, best first): {ranking}.")
    return "\n".join(lines)
