"""Notebook 04 (the error compensator): the settings per profile, where the profile's compensators live
(`compensator_dir`: notebooks 05-08 read them from there), the continuation-NLL sanity check and the
verdict text.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ffcore.compensator import (EVAL_DENSITIES, TRAIN_DENSITIES, VARIANTS, CompensatorConfig, ErrorCompensator,
                                load_compensator)
from ffcore.config import StrictConfig
from ffcore.data import token_samples
from ffcore.decoding import continuation_nll
from ffcore.engine import SparsityPlan
from ffcore.experiments.nb03_predictor import model_artifacts
from ffcore.experiments.profiles import pick


def compensator_dir(model_key: str, profile: str, variant: str = "plain") -> Path:
    """`<artifacts>/<model>/compensator_<variant>/` (files `compensator.*` there)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown compensator variant {variant!r}; choose one of {VARIANTS}")
    path = model_artifacts(model_key, profile) / f"compensator_{variant}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_profile_compensator(model_key: str, profile: str, variant: str, model: nn.Module | None = None
                             ) -> ErrorCompensator:
    """Notebook 04's compensator of a model and variant (refused for a model with another fingerprint)."""
    return load_compensator(compensator_dir(model_key, profile, variant), model)


# ------------------------------------------------------------------------------ end-to-end check
def sanity_nll(
    model: nn.Module, tokenizer: Any, predictor: nn.Module, compensators: Mapping[str, ErrorCompensator | None],
    n_samples: int, ctx_len: int, cont_len: int, density: float = 0.5, seed: int = 0,
) -> list[dict[str, Any]]:
    """Continuation NLL after a sparse prefill with the predictor's experts, per compensator (None: none), and dense."""
    ids = token_samples(tokenizer, "eval", ctx_len + cont_len, n_samples, seed=seed)["input_ids"]  # [n, T]
    t0 = time.time()
    rows = [{"compensator": "dense", "density": 1.0, "nll": round(continuation_nll(model, ids, ctx_len), 5),
             "seconds": round(time.time() - t0, 1)}]
    for name, comp in compensators.items():
        t0 = time.time()
        plan = SparsityPlan(densities=density, policy=predictor, compensator=comp, seed=seed)
        nll = continuation_nll(model, ids, ctx_len, plan)
        rows.append({"compensator": name, "density": density, "nll": round(nll, 5),
                     "seconds": round(time.time() - t0, 1)})
    for r in rows:
        r["rel_change_pct"] = round(100 * (r["nll"] / rows[0]["nll"] - 1), 2)
    return rows


# ------------------------------------------------------------------------------ profiles
@dataclasses.dataclass
class Notebook04Settings(StrictConfig):
    """Per-profile sizes for notebook 04.

    tokens_per_block:   training tokens sampled per collected block (held-out metrics use all tokens).
    train_densities:    the density grid the targets are computed on.
    levels_per_block:   grid densities stored per (block, layer) (each step samples one of them).
    eval_densities:     held-out densities (the trained range and one step beyond on each side).
    """

    tokens_per_block: int
    levels_per_block: int
    train_densities: tuple[float, ...]
    eval_densities: tuple[float, ...]
    plain: CompensatorConfig
    masked: CompensatorConfig
    nll_samples: int
    nll_ctx: int
    nll_cont: int

    def __post_init__(self) -> None:
        for name in ("plain", "masked"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, CompensatorConfig.from_dict(getattr(self, name)))
        self.train_densities, self.eval_densities = tuple(self.train_densities), tuple(self.eval_densities)


def settings(profile: str, seed: int = 0) -> Notebook04Settings:
    """The notebook-04 settings of a profile (smoke: tiny models in seconds; full: ~10 min on 2 idle CPU cores)."""
    common = dict(seed=seed, batch_blocks=4, lr=2e-3, max_epochs=pick(profile, 6, 8, 8), warm_epochs=pick(profile, 6, 6, 6),
                  patience=2)
    return Notebook04Settings(
        tokens_per_block=64, levels_per_block=2, train_densities=TRAIN_DENSITIES, eval_densities=EVAL_DENSITIES,
        plain=CompensatorConfig(variant="plain", **common),
        masked=CompensatorConfig(variant="masked", phases=("predictor",), **common),
        nll_samples=pick(profile, 1, 2, 3), nll_ctx=pick(profile, 384, 1024, 1024),
        nll_cont=pick(profile, 32, 64, 64),
    )


# ------------------------------------------------------------------------------ notebook helpers
def verdict(table: Sequence[dict[str, Any]], density: float = 0.5, trained: Sequence[float] = (0.5, 0.6, 0.7)) -> str:
    """A Markdown summary computed from `mean_rows` output (predictor masks): errors, masked vs plain, across levels."""
    lines = []
    for model_key in dict.fromkeys(r["model"] for r in table):
        get = {(r["density"], r["compensator"]): r for r in table
               if r["model"] == model_key and r["source"] == "predictor"}
        none, plain, masked = (get.get((density, m)) for m in ("none", "plain", "masked"))
        if none is None or plain is None:
            continue
        txt = (f"- **{model_key}**, predictor masks at {density:.0%} density: relative FFN-output error "
               f"**{none['rel_err']:.4f}** without compensation, **{plain['rel_err']:.4f}** with the plain compensator "
               f"({plain['reduction']:.1%} lower)")
        if masked is not None:
            diff = 1 - masked["rel_err"] / plain["rel_err"]
            txt += (f", **{masked['rel_err']:.4f}** with the mask-conditioned one ({masked['reduction']:.1%} lower); the "
                    f"mask-conditioned compensator {'**beats**' if diff > 0 else 'does **not** beat'} the plain one "
                    f"({abs(diff):.1%} {'less' if diff > 0 else 'more'} remaining error)")
        helps = [q for q in trained if (q, "plain") in get and get[(q, "plain")]["reduction"] > 0]
        red = ", ".join(f"{get[(q, 'plain')]['reduction']:.1%} at {q:.0%}" for q in trained if (q, "plain") in get)
        txt += (f". One plain compensator {'reduces' if len(helps) == len(trained) else 'does **not** reduce'} the "
                f"error at every trained density (by {red})")
        outside = sorted(q for q, m in get if m == "plain" and q not in trained)
        if outside:
            txt += "; outside the trained range: " + ", ".join(
                f"{get[(q, 'plain')]['reduction']:+.1%} at {q:.0%} (mask-conditioned: "
                f"{get[(q, 'masked')]['reduction']:+.1%})" if (q, "masked") in get else
                f"{get[(q, 'plain')]['reduction']:+.1%} at {q:.0%}" for q in outside)
        lines.append(txt + ".")
    return "\n".join(lines)


def nll_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown summary of `sanity_nll` rows (tagged with 'model'): does each compensator lower the NLL increase?"""
    lines = []
    for model_key in dict.fromkeys(r["model"] for r in rows):
        get = {r["compensator"]: r for r in rows if r["model"] == model_key}
        if "none" not in get:
            continue
        base = get["none"]["rel_change_pct"]
        parts = [f"{name} {r['rel_change_pct']:+.2f} % ({'better' if r['rel_change_pct'] < base else 'not better'} "
                 f"than none)" for name, r in get.items() if name not in ("dense", "none")]
        lines.append(f"- **{model_key}**: continuation NLL vs dense after a 50 % sparse prefill: no compensator "
                     f"{base:+.2f} %; " + "; ".join(parts) + ".")
    return "\n".join(lines)
