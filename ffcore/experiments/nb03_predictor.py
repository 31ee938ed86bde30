"""Notebook 03 (the expert predictor): the settings per profile, where the profile's collections and
predictor live (`collection_dir`, `predictor_dir`: notebook 04 and later read them from there), the
continuation-NLL sanity check and the verdict text.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ffcore.collect import CollectConfig, Collection, load_collection_dir
from ffcore.config import StrictConfig
from ffcore.data import FAMILIES, SOURCES, SPLITS, corpus, domains_of, family_of
from ffcore.engine import SparsityPlan
from ffcore.evaluation.runner import RunConfig, evaluate
from ffcore.evaluation.scoring import gap_closed, paired_difference
from ffcore.evaluation.suite import kl_windows, window_family  # noqa: F401  (re-exported for notebooks 03-04)
from ffcore.experiments.profiles import pick
from ffcore.models import model_slug
from ffcore.predictor import (ExpertPredictor, PredictorConfig, TrainResult, load_predictor, predict_scores,
                              save_predictor, selection_metrics, train_predictor)
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


PREDICTOR_STEMS = {"deployed": "predictor", "paper": "predictor_paper"}


def load_profile_predictor(model_key: str, profile: str, model: nn.Module | None = None,
                           variant: str = "deployed") -> ExpertPredictor:
    """Notebook 03's predictor of a model: 'deployed' (the one later notebooks run) or 'paper' (eqs. 12-13 alone).

    Refused for a model with another fingerprint.
    """
    if variant not in PREDICTOR_STEMS:
        raise ValueError(f"unknown predictor variant {variant!r}; choose one of {sorted(PREDICTOR_STEMS)}")
    return load_predictor(predictor_dir(model_key, profile), model, PREDICTOR_STEMS[variant])


def save_profile_predictors(model_key: str, profile: str, paper: ExpertPredictor, deployed: ExpertPredictor) -> None:
    """Write the paper's predictor and the deployed one (the same weights when the blend is not chosen)."""
    save_predictor(paper, predictor_dir(model_key, profile), PREDICTOR_STEMS["paper"])
    save_predictor(deployed, predictor_dir(model_key, profile), PREDICTOR_STEMS["deployed"])


def lodo_offline_rows(
    held: Collection, train: Collection, fold_preds: Mapping[str, Mapping[str, ExpertPredictor]],
    folds: Mapping[str, Sequence[str]], density: float = 0.5, seed: int = 0,
) -> list[dict[str, Any]]:
    """Every leave-one-family-out fold's predictors on the family it left out (offline, captured mass and recall)."""
    rows = []
    for fold, preds in fold_preds.items():
        if not fold.startswith("without "):
            continue
        family = fold.removeprefix("without ")
        prior = train.of_domains(domains_of(folds[fold])).scores.mean(0)  # the fold's own global-static prior
        rows += offline_rows(held.of_domains(FAMILIES[family]), preds, prior, folds[fold], density, seed)
    return rows


def choose_deployed(kl_rows: Sequence[dict[str, Any]], model: str, variants: Sequence[str] = ("predictor", "blend")) -> str:
    """The variant with the lower pooled out-of-domain KL for one model (the one notebooks 04-08 run)."""
    pooled = {r["variant"]: r["kl"] for r in kl_rows
              if r["model"] == model and r["scope"] == "out of domain" and r["family"] == "all" and r["variant"] in variants}
    if not pooled:
        raise ValueError(f"no pooled out-of-domain KL for {model}")
    return min(pooled, key=pooled.get)


# ------------------------------------------------------------------------------ profiles
# The two families the deployed predictor and compensators never see: one prose, one code. Notebooks 05-08
# report their items as out of domain; notebook 03's leave-one-family-out folds hold out every family in turn.
HELD_OUT = ("fiction", "go-rust")
SMOKE_FAMILIES = ("manuals", "python")  # built from the two domains every machine has (and networkx)


@dataclasses.dataclass
class Notebook03Settings(StrictConfig):
    """Per-profile sizes of notebook 03.

    families:        the corpus families used (all ten in quick/full; a leave-one-family-out fold each).
    held_out:        families the deployed predictor never sees (out-of-domain items of notebooks 05-08).
    train / heldout: what is collected (domains of `families`, train and eval splits).
    plain / prior:   the two predictors: the paper's, and ours that also reads the prompt's first block.
    curve_fractions: fractions of the training blocks for the learning curve.
    kl_windows:      continuation windows per family for the end-to-end KL (kl_ctx context + kl_cont scored).
    """

    families: tuple[str, ...]
    held_out: tuple[str, ...]
    train: CollectConfig
    heldout: CollectConfig
    plain: PredictorConfig
    prior: PredictorConfig
    curve_fractions: tuple[float, ...]
    kl_windows: int
    kl_ctx: int
    kl_cont: int
    density: float = 0.5
    nll_samples: int = 2
    nll_ctx: int = 1024
    nll_cont: int = 64

    def __post_init__(self) -> None:
        for name in ("train", "heldout"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, CollectConfig.from_dict(getattr(self, name)))
        for name in ("plain", "prior"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, PredictorConfig.from_dict(getattr(self, name)))
        self.families, self.held_out = tuple(self.families), tuple(self.held_out)
        self.curve_fractions = tuple(self.curve_fractions)
        if not set(self.held_out) <= set(self.families):
            raise ValueError(f"held-out families {self.held_out} must be among {self.families}")

    @property
    def train_families(self) -> tuple[str, ...]:
        """The families the deployed predictor is trained on."""
        return tuple(f for f in self.families if f not in self.held_out)


def settings(profile: str, seed: int = 0) -> Notebook03Settings:
    """The notebook-03 settings of a profile (smoke: tiny models in seconds; full: both real models)."""
    families = pick(profile, SMOKE_FAMILIES, tuple(FAMILIES), tuple(FAMILIES))
    held_out = pick(profile, ("python",), HELD_OUT, HELD_OUT)
    # smoke: only the two built-in domains, so a run is the same on every machine, corpus installed or not
    domains = SOURCES if profile == "smoke" else domains_of(families)
    seq = pick(profile, 512, 1024, 1024)
    # full: 60 x 1K training samples (~3,200 blocks of 10 families): sized so that notebook 03 runs in about 45 min
    # for both models on a 2-core CPU; the learning curve shows what more data would buy
    train = CollectConfig(split="train", n_samples=pick(profile, 8, 36, 60), seq_len=seq, seed=seed, sources=domains,
                          tokens_per_block=16, samples_per_shard=pick(profile, 4, 12, 12), batch_size=2)
    heldout = CollectConfig(split="eval", n_samples=pick(profile, 4, 18, 24), seq_len=seq, seed=seed, sources=domains,
                            tokens_per_block=16, samples_per_shard=pick(profile, 4, 12, 12), batch_size=2)
    common = dict(seed=seed, mean_pool_epochs=pick(profile, 10, 30, 30), max_epochs=0,
                  batch_blocks=pick(profile, 4, 32, 32), patience=pick(profile, 3, 4, 4))
    return Notebook03Settings(
        families=families, held_out=held_out, train=train, heldout=heldout,
        plain=PredictorConfig(**common), prior=PredictorConfig(**common, prior=True, bias=True),
        curve_fractions=pick(profile, (0.5, 1.0), (0.25, 0.5, 1.0), (0.25, 0.5, 1.0)),
        kl_windows=pick(profile, 1, 1, 2), kl_ctx=pick(profile, 384, 1024, 1024), kl_cont=pick(profile, 16, 64, 64),
        nll_samples=pick(profile, 1, 2, 2), nll_ctx=pick(profile, 384, 1024, 1024), nll_cont=pick(profile, 32, 64, 64),
    )


# ------------------------------------------------------------------------------ training sets and folds
def fold_families(families: Sequence[str], held_out: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Training families of every fold: 'deployed' (all but `held_out`) and one leave-one-family-out fold per family."""
    folds = {"deployed": tuple(f for f in families if f not in held_out)}
    folds.update({f"without {f}": tuple(g for g in families if g != f) for f in families})
    return folds


def train_fold(
    train: Collection, families: Sequence[str], cfgs: Mapping[str, PredictorConfig], meta: dict[str, Any] | None = None,
    fraction: float = 1.0, seed: int = 0,
) -> dict[str, TrainResult]:
    """Train each predictor variant on the training blocks of `families` (a random `fraction` of their samples)."""
    part = train.of_domains(domains_of(families))
    if fraction < 1.0:
        samples = part.sample.unique()
        keep = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))]
        keep = keep[: max(2, round(fraction * len(samples)))]
        part = part.subset(torch.isin(part.sample, keep))
    fold_meta = {**(meta or {}), "families": list(families), "fraction": fraction}
    return {name: train_predictor(part, cfg, meta=fold_meta, progress=False) for name, cfg in cfgs.items()}


def offline_rows(
    held: Collection, predictors: Mapping[str, ExpertPredictor], prior: Tensor, trained_on: Sequence[str],
    density: float = 0.5, seed: int = 0,
) -> list[dict[str, Any]]:
    """Captured oracle mass and recall per family of `held` for every policy, tagged in/out of `trained_on`."""
    rows = []
    for family in dict.fromkeys(family_of(d) for d in held.block_domains()):
        part = held.of_domains(FAMILIES[family])
        scores = {name: predict_scores(p, part) for name, p in predictors.items()}
        for r in selection_metrics(part, scores, prior, (density,), seed=seed):
            if r["layer"] == -1:
                rows.append({"family": family, "in_domain": family in trained_on, "policy": r["policy"],
                             "density": density, "recall": round(r["recall"], 4), "mass": round(r["mass"], 4),
                             "blocks": int((part.position > 0).sum())})
    return rows


def corpus_table(families: Sequence[str], domains: Sequence[str]) -> list[dict[str, Any]]:
    """Per domain used: family, held-out documents per split and characters (what the collections draw from)."""
    rows = []
    for fam in families:
        for dom in (d for d in FAMILIES[fam] if d in domains):
            ds = corpus(dom)
            split = list(ds["split"])
            rows.append({"family": fam, "domain": dom, "documents": len(ds),
                         "characters": sum(len(t) for t in ds["text"]),
                         **{f"{s}_docs": split.count(s) for s in SPLITS}})
    return rows


def learning_curve(
    train: Collection, held: Collection, families: Sequence[str], out_families: Sequence[str], cfg: PredictorConfig,
    fractions: Sequence[float], model: nn.Module | None = None, tokenizer: Any = None,
    windows: Sequence[dict] = (), kl_fractions: Sequence[float] = (), cache: Path | None = None,
    run: RunConfig | None = None, density: float = 0.5, seed: int = 0,
) -> list[dict[str, Any]]:
    """Held-out captured mass (in domain: eval blocks of `families`; out: of `out_families`) against training size.

    At `kl_fractions` also the continuation KL on `windows` of the out-of-domain families (the model runs).
    """
    rows = []
    held_in, held_out = held.of_domains(domains_of(families)), held.of_domains(domains_of(out_families))
    for frac in fractions:
        res = train_fold(train, families, {"plain": cfg}, fraction=frac, seed=seed)["plain"]
        t = res.predictor.meta["training"]
        for scope, part in (("in domain", held_in), ("out of domain", held_out)):
            m = {r["policy"]: r for r in selection_metrics(part, predict_scores(res.predictor, part), None, (density,),
                                                           seed=seed) if r["layer"] == -1}
            row = {"fraction": frac, "blocks": t["train_blocks"], "scope": scope, "mass": round(m["predictor"]["mass"], 4),
                   "fbs_mass": round(m["first_block_static"]["mass"], 4), "kl": None, "seconds": t["seconds"]}
            if scope == "out of domain" and frac in kl_fractions and model is not None:
                recs = evaluate(model, tokenizer, list(windows), SparsityPlan(densities=density, policy=res.predictor),
                                cache, run)
                row["kl"] = round(sum(r["metrics"]["kl"] for r in recs) / len(recs), 5)
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ end-to-end: continuation KL
def kl_runs(
    model: nn.Module, tokenizer: Any, windows: Sequence[dict], folds: Mapping[str, Mapping[str, ExpertPredictor]],
    density: float, cache: Path | None, run: RunConfig | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Continuation records of dense, first-block static, the oracle (every window), and every fold's predictors.

    A leave-one-family-out fold's predictors run on the windows of the family it left out (out of domain);
    the deployed ones on the windows of the families they were trained on (in domain).
    """
    def plan(policy: Any) -> SparsityPlan:
        return SparsityPlan(densities=density, policy=policy)

    out = {name: evaluate(model, tokenizer, windows, None if name == "dense" else plan(name), cache, run)
           for name in ("dense", "first_block_static", "oracle")}
    for fold, preds in folds.items():
        if fold.startswith("without "):
            rows = [w for w in windows if window_family(w) == fold.removeprefix("without ")]
        else:
            trained = set(preds[next(iter(preds))].meta.get("families", []))
            rows = [w for w in windows if window_family(w) in trained]
        for name, pred in preds.items():
            out[f"{name} [{fold}]"] = evaluate(model, tokenizer, rows, plan(pred), cache, run)
    return out


def kl_table(
    runs: Mapping[str, Sequence[dict]], windows: Sequence[dict], variants: Sequence[str], n_boot: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per family and pooled (in / out of domain): mean KL of each policy and the gap to the oracle each closes.

    Out of domain, a variant's records are its leave-one-family-out fold's on that family; in domain, the
    deployed predictor's. `closed` = (KL_FBS - KL) / (KL_FBS - KL_oracle), with a paired bootstrap CI.
    """
    fam = {w["uid"]: window_family(w) for w in windows}
    rows = []
    for variant in variants:
        for scope in ("out of domain", "in domain"):
            recs = []
            for name, rs in runs.items():
                if not name.startswith(f"{variant} ["):
                    continue
                fold = name[len(variant) + 2:-1]
                if (scope == "out of domain") == fold.startswith("without "):
                    recs += [r for r in rs if r["task"] == "continuation"]
            if not recs:
                continue
            for family in [None, *dict.fromkeys(fam[r["uid"]] for r in recs)]:
                sel = [r for r in recs if family is None or fam[r["uid"]] == family]
                uids = {r["uid"] for r in sel}
                base = [r for r in runs["first_block_static"] if r["uid"] in uids]
                orc = [r for r in runs["oracle"] if r["uid"] in uids]
                g = gap_closed(base, sel, orc, n_boot=n_boot, seed=seed)
                d = paired_difference(base, sel, n_boot=n_boot, seed=seed)
                rows.append({"variant": variant, "scope": scope, "family": family or "all", "n": g["n"],
                             "kl": round(g["method_mean"], 5), "kl_first_block_static": round(g["baseline_mean"], 5),
                             "kl_oracle": round(g["oracle_mean"], 5), "gap_closed": round(g["closed"], 4),
                             "gap_closed_ci": [round(x, 4) for x in g["ci"]],
                             "kl_minus_fbs": round(d["diff"], 5), "kl_minus_fbs_ci": [round(x, 5) for x in d["ci"]]})
    return rows


def _ci(lo_hi: Sequence[float], pct: bool = False) -> str:
    lo, hi = lo_hi
    return f"[{100 * lo:+.0f}, {100 * hi:+.0f}] %" if pct else f"[{lo:+.4f}, {hi:+.4f}]"


def kl_verdict(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Markdown: per model and variant, pooled KL against first-block static and the gap to the oracle it closes."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in variants:
            for scope in ("out of domain", "in domain"):
                pooled = [r for r in rows if r["model"] == model and r["variant"] == variant and r["scope"] == scope
                          and r["family"] == "all"]
                if not pooled:
                    continue
                r = pooled[0]
                lo, hi = r["kl_minus_fbs_ci"]
                side = ("**below** first-block static" if hi < 0 else "**above** first-block static" if lo > 0
                        else "not resolved against first-block static")
                fams = [x for x in rows if x["model"] == model and x["variant"] == variant and x["scope"] == scope
                        and x["family"] != "all"]
                below = sum(x["kl"] < x["kl_first_block_static"] for x in fams)
                lines.append(
                    f"- **{model}**, {variant}, {scope} ({r['n']} windows): KL {r['kl']:.4f} vs {r['kl_first_block_static']:.4f} "
                    f"(first-block static) and {r['kl_oracle']:.4f} (oracle): {side} (difference {r['kl_minus_fbs']:+.4f}, "
                    f"95 % CI {_ci(r['kl_minus_fbs_ci'])}); it closes **{100 * r['gap_closed']:.0f} %** of the gap from "
                    f"first-block static to the oracle (CI {_ci(r['gap_closed_ci'], pct=True)}); point estimate below "
                    f"first-block static on {below} of {len(fams)} families.")
    return "\n".join(lines)


def offline_verdict(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Markdown: per model, the layer-mean captured mass of each variant vs first-block static, in and out of domain."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for scope, flag in (("out of domain", False), ("in domain", True)):
            sel = [r for r in rows if r["model"] == model and r["in_domain"] == flag]
            if not sel:
                continue
            mean = {p: sum(r["mass"] for r in sel if r["policy"] == p) / max(1, sum(r["policy"] == p for r in sel))
                    for p in dict.fromkeys(r["policy"] for r in sel)}
            parts = ", ".join(f"{v} {mean[v]:.3f}" for v in variants if v in mean)
            lines.append(f"- **{model}**, {scope} (mean over families): captured mass {parts}; first-block static "
                         f"{mean.get('first_block_static', float('nan')):.3f}, global static "
                         f"{mean.get('global_static', float('nan')):.3f}, random {mean.get('random', float('nan')):.3f}.")
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
