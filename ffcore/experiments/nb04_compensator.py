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

from ffcore.collect import Collection
from ffcore.compensator import (TRAIN_DENSITIES, VARIANTS, CompensatorConfig, ErrorCompensator,
                                TrainResult, distill_data, heldout_metrics, load_compensator, mask_sources,
                                train_compensator)
from ffcore.config import StrictConfig
from ffcore.data import FAMILIES, domains_of
from ffcore.engine import SparsityPlan
from ffcore.evaluation.scoring import gap_closed, paired_difference
from ffcore.experiments.nb03_predictor import kl_windows, model_artifacts, window_family
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


# ------------------------------------------------------------------------------ profiles
@dataclasses.dataclass
class Notebook04Settings(StrictConfig):
    """Per-profile sizes of notebook 04.

    budgets:          the deployed layer-wise schedules' overall densities (notebook 02); every layer's
                      compensator trains on the densities those schedules give that layer.
    fixed_grid:       the earlier global grid (every layer 0.5-0.7): the 'before' of the density curve.
    levels_per_block: grid densities stored per (block, layer) (each step samples one of them).
    eval_densities:   held-out densities of the per-density error curve.
    kl_*:             continuation windows per training family (in domain) and per held-out family (out).
    """

    budgets: tuple[float, ...]
    fixed_grid: tuple[float, ...]
    levels_per_block: int
    eval_densities: tuple[float, ...]
    plain: CompensatorConfig
    masked: CompensatorConfig
    kl_in_windows: int
    kl_out_windows: int
    kl_ctx: int
    kl_cont: int
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        for name in ("plain", "masked"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, CompensatorConfig.from_dict(getattr(self, name)))
        self.budgets, self.fixed_grid = tuple(self.budgets), tuple(self.fixed_grid)
        self.eval_densities = tuple(self.eval_densities)


def settings(profile: str, seed: int = 0) -> Notebook04Settings:
    """The notebook-04 settings of a profile (smoke: tiny models in seconds; full: both real models)."""
    common = dict(seed=seed, batch_blocks=pick(profile, 4, 8, 8), lr=2e-3, max_epochs=pick(profile, 4, 8, 8),
                  warm_epochs=pick(profile, 3, 5, 5), patience=2)
    return Notebook04Settings(
        budgets=(0.5, 0.6, 0.7), fixed_grid=TRAIN_DENSITIES, levels_per_block=2,
        eval_densities=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        plain=CompensatorConfig(variant="plain", **common),
        masked=CompensatorConfig(variant="masked", phases=("predictor",), **common),
        kl_in_windows=1, kl_out_windows=pick(profile, 1, 2, 3), kl_ctx=pick(profile, 384, 1024, 1024),
        kl_cont=pick(profile, 16, 64, 64),
    )


# ------------------------------------------------------------------------------ training
def train_variants(
    model: nn.Module, train: Collection, predictor: nn.Module, grid: Sequence[Sequence[float]], S: Notebook04Settings,
    meta: dict[str, Any], seed: int = 0,
) -> tuple[dict[str, TrainResult], float]:
    """The compensators of one model: plain and mask-conditioned on the schedules' per-layer densities, and the
    earlier plain one (global 0.5-0.7 grid, no shrink) for the before/after curve. Returns (results, target seconds)."""
    t0 = time.time()
    sources = mask_sources(train, predictor)
    data = distill_data(model, train, sources, grid, None, S.levels_per_block, seed=seed, progress=False)
    fixed = distill_data(model, train, sources, S.fixed_grid, None, S.levels_per_block, seed=seed, progress=False)
    t_data = time.time() - t0
    plain = train_compensator(data, S.plain, meta=meta, progress=False)
    masked = train_compensator(data, S.masked, init=plain.compensator, meta=meta, progress=False)
    before = train_compensator(fixed, S.plain.replace(shrink=False), meta=meta, progress=False)
    return {"plain": plain, "masked": masked, "before": before}, t_data


def density_rows(
    model: nn.Module, held: Collection, predictor: nn.Module, comps: Mapping[str, ErrorCompensator],
    densities: Sequence[float], trained_on: Sequence[str],
) -> list[dict[str, Any]]:
    """Held-out FFN-output error per density, compensator, layer (-1: the mean) and scope (in / out of the training
    families)."""
    rows = []
    for scope, families in (("in domain", trained_on),
                            ("out of domain", [f for f in FAMILIES if f not in trained_on])):
        part = held.of_domains(domains_of(families))
        if not part.n_blocks:
            continue
        metrics = heldout_metrics(model, part, mask_sources(part, predictor), comps, densities, progress=False)
        rows += [{"scope": scope, **r} for r in metrics]
    return rows


# ------------------------------------------------------------------------------ end to end
def e2e_windows(tokenizer: Any, S: Notebook04Settings, train_families: Sequence[str], held_out: Sequence[str],
                seed: int = 0) -> list[dict[str, Any]]:
    """Continuation windows: `kl_in_windows` per training family, `kl_out_windows` per held-out family."""
    return (kl_windows(tokenizer, train_families, S.kl_in_windows, S.kl_ctx, S.kl_cont, seed)
            + kl_windows(tokenizer, held_out, S.kl_out_windows, S.kl_ctx, S.kl_cont, seed))


def e2e_plans(densities: Sequence[float], predictor: nn.Module, comps: Mapping[str, ErrorCompensator]
              ) -> dict[str, SparsityPlan | None]:
    """The end-to-end configurations at the layer-wise schedule: baselines, the predictor alone and with each compensator."""
    base = SparsityPlan(densities=tuple(densities), policy=predictor)
    plans: dict[str, SparsityPlan | None] = {
        "dense": None, "first_block_static": base.replace(policy="first_block_static"),
        "oracle": base.replace(policy="oracle"), "no compensator": base,
    }
    plans.update({f"{name} compensator": base.replace(compensator=c) for name, c in comps.items()})
    return plans


def e2e_table(runs: Mapping[str, Sequence[dict]], windows: Sequence[dict], trained_on: Sequence[str],
              n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per scope and family: each configuration's KL, the gap to the oracle it closes (vs first-block static), and
    its KL change against the predictor without a compensator, with paired bootstrap intervals."""
    fam = {w["uid"]: window_family(w) for w in windows}
    rows = []
    for name, recs in runs.items():
        if name in ("dense", "first_block_static", "oracle"):
            continue
        for scope in ("in domain", "out of domain"):
            fams = [f for f in dict.fromkeys(fam.values()) if (f in trained_on) == (scope == "in domain")]
            for family in [None, *fams]:
                keep = {u for u, f in fam.items() if (family is None and f in fams) or f == family}
                if not keep:
                    continue
                pick_ = (lambda rs: [r for r in rs if r["uid"] in keep])
                g = gap_closed(pick_(runs["first_block_static"]), pick_(recs), pick_(runs["oracle"]), n_boot=n_boot, seed=seed)
                d = paired_difference(pick_(runs["no compensator"]), pick_(recs), n_boot=n_boot, seed=seed)
                rows.append({"config": name, "scope": scope, "family": family or "all", "n": g["n"],
                             "kl": round(g["method_mean"], 5), "kl_first_block_static": round(g["baseline_mean"], 5),
                             "kl_oracle": round(g["oracle_mean"], 5), "gap_closed": round(g["closed"], 4),
                             "gap_closed_ci": [round(x, 4) for x in g["ci"]],
                             "kl_minus_no_compensator": round(d["diff"], 5),
                             "kl_minus_no_compensator_ci": [round(x, 5) for x in d["ci"]]})
    return rows


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
                f"error at each of these densities (by {red})")
        outside = sorted(q for q, m in get if m == "plain" and q not in trained)
        if outside:
            txt += "; at the other densities: " + ", ".join(
                f"{get[(q, 'plain')]['reduction']:+.1%} at {q:.0%} (mask-conditioned: "
                f"{get[(q, 'masked')]['reduction']:+.1%})" if (q, "masked") in get else
                f"{get[(q, 'plain')]['reduction']:+.1%} at {q:.0%}" for q in outside)
        lines.append(txt + ".")
    return "\n".join(lines)


def _fmt(ci: Sequence[float], pct: bool = False) -> str:
    return f"[{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}] %" if pct else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


TARGETS = {"out of domain": 0.6, "in domain": 0.8}  # the share of the first-block-static-to-oracle gap to close


def e2e_verdict(rows: Sequence[dict[str, Any]], full: str = "plain compensator") -> str:
    """Markdown per model and scope: does each compensator lower the KL against none (paired CI), and how much of the
    gap from first-block static to the oracle the full method closes, against the target."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for scope in ("out of domain", "in domain"):
            pooled = {r["config"]: r for r in rows if r["model"] == model and r["scope"] == scope and r["family"] == "all"}
            if full not in pooled:
                continue
            parts = []
            for name, r in pooled.items():
                if name == "no compensator":
                    continue
                lo, hi = r["kl_minus_no_compensator_ci"]
                word = "lowers" if hi < 0 else "raises" if lo > 0 else "does not resolvably change"
                parts.append(f"the {name} {word} the KL ({r['kl_minus_no_compensator']:+.4f}, CI {_fmt((lo, hi))})")
            f = pooled[full]
            fams = [r for r in rows if r["model"] == model and r["scope"] == scope and r["config"] == full
                    and r["family"] != "all"]
            below = sum(r["kl"] < r["kl_first_block_static"] for r in fams)
            met = "meets" if f["gap_closed_ci"][0] >= TARGETS[scope] else (
                "does **not** meet" if f["gap_closed_ci"][1] < TARGETS[scope] else "is not resolved against")
            lines.append(
                f"- **{model}**, {scope} ({f['n']} windows): against the predictor alone, " + "; ".join(parts)
                + f". The full method (predictor, {full}, layer-wise schedule) has KL {f['kl']:.4f} vs "
                f"{f['kl_first_block_static']:.4f} for first-block static and {f['kl_oracle']:.4f} for the oracle and "
                f"closes **{100 * f['gap_closed']:.0f} %** of the gap (CI {_fmt(f['gap_closed_ci'], pct=True)}): it {met} "
                f"the {100 * TARGETS[scope]:.0f} % target; below first-block static on {below} of {len(fams)} families.")
    return "\n".join(lines)
