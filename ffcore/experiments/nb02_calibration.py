"""Notebook 02 (attention sinks and the layer-wise schedule): the calibration knobs per profile, and
the schedule files it writes (one JSON per model under the profile's results) that notebooks 05, 07
and 08 read through `load_schedule`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ffcore.calibration import CalibrationResult, calibrate, check_seq_len
from ffcore.config import StrictConfig
from ffcore.engine.layout import BLOCK_SIZE
from ffcore.experiments.profiles import pick
from ffcore.models import load_model, model_fingerprint
from ffcore.results import out_dirs, read_json, write_json
from ffcore.schedule import (DEFAULT_MIN_DENSITY, algorithm1, check_budget, layerwise_schedule, uniform_schedule)


@dataclasses.dataclass
class CalibrationConfig(StrictConfig):
    """Per-profile knobs of the attention-sink calibration (notebook 02)."""

    n_samples: int  # calibration samples per model
    seq_len: int  # tokens per sample (>= 2 blocks)
    block_size: int = BLOCK_SIZE  # tokens per key block (the paper's B = 128)
    chunk_size: int = 128  # queries per chunk: memory ~ chunk x seq_len x heads x 4 bytes
    sources: tuple[str, ...] = ("prose", "code")  # corpora the calibration split is drawn from
    budgets: tuple[float, ...] = (0.7, 0.6, 0.5)  # overall FFN densities to build schedules for
    min_density: float = 0.05  # floor of any layer's density (see ffcore.schedule)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.chunk_size < 1 or self.n_samples < 1:
            raise ValueError(f"block_size, chunk_size and n_samples must be >= 1: {self}")
        check_seq_len(self.seq_len, self.block_size)
        self.sources = tuple(self.sources)
        self.budgets = tuple(float(b) for b in self.budgets)


def calibration_config(profile: str, **overrides: Any) -> CalibrationConfig:
    """The calibration knobs of a run profile (smoke / quick / full), optionally overridden."""
    cfg = pick(
        profile,
        smoke=CalibrationConfig(n_samples=2, seq_len=256, chunk_size=96),
        quick=CalibrationConfig(n_samples=4, seq_len=2048),
        # full: sized so that both real models finish in ~5 min on a 2-core CPU (see notebook 02)
        full=CalibrationConfig(n_samples=4, seq_len=4096),
    )
    return cfg.replace(**overrides) if overrides else cfg



def calibrate_model(key: str, cfg: CalibrationConfig, seed: int = 0, progress: bool = True) -> CalibrationResult:
    """Load a model by key and calibrate it with a profile's `CalibrationConfig`."""
    model, tok = load_model(key)
    return calibrate(
        model, tok, cfg.n_samples, cfg.seq_len, block_size=cfg.block_size, chunk_size=cfg.chunk_size,
        sources=cfg.sources, seed=seed, progress=progress,
    )


def schedule_name(model_key: str) -> str:
    """Result name of a model's schedule file: `02_schedule_<key>` (a path key is reduced to a safe name)."""
    key = Path(str(model_key).rstrip("/")).name if "/" in str(model_key) else str(model_key)
    return "02_schedule_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


IMPORTANCE_KEYS = {"window": "s_i_window", "literal": "s_i"}  # which stored s_i each importance uses
DEFAULT_IMPORTANCE = "window"  # our schedules use the window-aware importance; "literal" is the paper's eq. 23


def save_schedules(
    calib: "CalibrationResult", profile: str, budgets: Sequence[float] = (0.7, 0.6, 0.5),
    min_density: float = DEFAULT_MIN_DENSITY, order: str = "sorted",
) -> Path:
    """Write one model's schedules for all `budgets`, by both importances (with the calibration's provenance), as JSON.

    `densities` is the default (window-aware) schedule; `densities_literal` the one from the paper's s_i.
    """
    info = calib.calibration_info()
    plans = []
    for b in budgets:
        b = check_budget(b)
        s, lit = info["s_i_window"], info["s_i"]
        plans.append({
            "budget": b, "sparsity": round(1.0 - b, 6),
            "densities": layerwise_schedule(s, b, min_density=min_density, order=order),
            "densities_literal": layerwise_schedule(lit, b, min_density=min_density, order=order),
            "literal_layer_order": algorithm1(lit, b, order="layer"),  # the paper's walk on its s_i, no floor
            "capped_layers": [i for i, x in enumerate(algorithm1(s, b)) if x >= 1.0 - 1e-12],
            "uniform": uniform_schedule(len(s), b),
        })
    payload = {
        "model": info["model"], "fingerprint": info["fingerprint"], "calibration": info, "importance": DEFAULT_IMPORTANCE,
        "min_density": min_density, "order": order, "schedules": plans,
    }
    return write_json(schedule_name(info["model"]), payload, profile,
                      model=info["model"], fingerprint=info["fingerprint"])


def load_schedule(
    model: nn.Module | str, budget: float, profile: str, fingerprint: str | None = None,
    importance: str = DEFAULT_IMPORTANCE,
) -> list[float]:
    """Per-layer densities for `model` at `budget`, refusing a file calibrated on another model.

    `model` is a loaded model (its key is `model.ffcore_name`, its fingerprint is computed), or a
    key string together with `fingerprint`. `importance` picks the window-aware (default) or the
    paper's literal s_i. A budget not stored in the file is recomputed from the stored s_i with the
    stored floor and order; budget 1.0 is all-dense.
    """
    if importance not in IMPORTANCE_KEYS:
        raise ValueError(f"unknown importance {importance!r}; choose one of {sorted(IMPORTANCE_KEYS)}")
    budget = check_budget(budget)
    if isinstance(model, nn.Module):
        key = getattr(model, "ffcore_name", None)
        if key is None:
            raise ValueError("model has no ffcore_name: load it with ffcore.models.load_model, or pass its key")
        fingerprint = model_fingerprint(model)
    else:
        key = str(model)
        if fingerprint is None:
            raise ValueError(
                f"load_schedule({key!r}, ...) with a key needs fingerprint=... (or pass the loaded model) "
                "so a schedule calibrated on another model is refused"
            )
    doc = read_json(schedule_name(key), profile)
    if doc.get("fingerprint") != fingerprint:
        raise ValueError(
            f"schedule file {out_dirs(profile).results / (schedule_name(key) + '.json')} was calibrated on "
            f"model {doc.get('model')!r} with fingerprint {doc.get('fingerprint')}, but this model "
            f"({key!r}) has fingerprint {fingerprint}: re-run notebook 02 for this model"
        )
    field = "densities" if importance == doc.get("importance", "literal") else f"densities_{importance}"
    for plan in doc["schedules"]:
        if abs(plan["budget"] - budget) < 1e-9 and field in plan:
            return list(plan[field])
    s = doc["calibration"].get(IMPORTANCE_KEYS[importance])
    if s is None:
        raise ValueError(f"{schedule_name(key)} has no {importance!r} importance: re-run notebook 02")
    if budget >= 1.0:
        return [1.0] * len(s)
    return layerwise_schedule(s, budget, min_density=doc["min_density"], order=doc["order"])
