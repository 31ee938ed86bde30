"""Layer-wise FFN density schedules (paper Algorithm 1) and their JSON files.

Algorithm 1 turns layer importance scores `s_i` (from `ffcore.calibration`) and an overall
density budget `B` (density = 1 - sparsity) into per-layer densities:

    T <- B * L;  S <- sum_i s_i
    for each layer i:  b_i <- min(1, s_i / S * T);  T <- T - b_i;  S <- S - s_i

What it guarantees, and in which order to walk the layers (see `tests/test_schedule.py`):

* When no cap binds (`max_i s_i * B * L / S <= 1`), every walk order gives exactly the
  proportional plan `b_i = B * L * s_i / S`: mean = B, monotone in `s_i`.
* When a cap binds, the literal walk in layer order (`order="layer"`) can leave budget unspent
  (e.g. s = (1, 3), B = 0.75 gives (0.375, 1.0), mean 0.6875) and can give a layer with a smaller
  score MORE density than an earlier layer with a larger one (s = (1, 4, 0.9), B = 0.8 gives
  (0.41, 1.0, 0.99)), because a capped layer raises T/S for the layers after it only.
* Walking in descending score order (`order="sorted"`, our default) makes every capped layer come
  first, so the result is the water-filling plan `b_i = min(1, c * s_i)`: caps respected,
  mean = B exactly whenever B <= 1, and monotone (a larger score never gets less density).
  It is identical to the literal algorithm whenever no cap binds.

Floor: a layer with a tiny score would get a density near 0 (no FFN at all). We clamp every
layer to `min_density` (default 0.05, i.e. at least 5 % of the neurons) and re-spread the rest of
the budget over the other layers, so the plan is `clip(c * s_i, min_density, 1)`, still with mean
B (a budget below `min_density` is an error). In the degenerate case where layers with score 0
sit on the floor and all others are capped at 1, the rest of the budget goes evenly to the
zero-score layers.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

ORDERS = ("sorted", "layer")
DEFAULT_MIN_DENSITY = 0.05
_TOL = 1e-9


def check_budget(budget: float) -> float:
    """Return the budget as a float, or raise if it is outside (0, 1]."""
    budget = float(budget)
    if not (0.0 < budget <= 1.0):  # also rejects NaN
        raise ValueError(f"density budget must be in (0, 1] (density = 1 - sparsity), got {budget}")
    return budget


def _check_scores(scores: Sequence[float]) -> list[float]:
    s = [float(x) for x in scores]
    if not s:
        raise ValueError("empty importance scores: need one score per layer")
    bad = [i for i, x in enumerate(s) if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"importance scores must be finite and >= 0; bad layers {bad}: {[s[i] for i in bad]}")
    if sum(s) <= 0:
        raise ValueError("importance scores are all zero: Algorithm 1 needs a positive total")
    return s


def algorithm1(scores: Sequence[float], budget: float, order: str = "sorted") -> list[float]:
    """Algorithm 1 without a floor: densities in [0, 1] in layer order (see the module docstring)."""
    s = _check_scores(scores)
    budget = check_budget(budget)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    idx = list(range(len(s)))
    if order == "sorted":
        idx.sort(key=lambda i: -s[i])  # stable: ties keep layer order
    T, S = budget * len(s), sum(s)
    out = [0.0] * len(s)
    for i in idx:
        # s_i <= S, so s_i / S * T <= T exactly; the running sums S and T drift by float rounding,
        # and the cap at T keeps the last layers from overspending by that drift
        b = min(1.0, T, s[i] / S * T) if S > 0 else 0.0
        b = max(0.0, b)  # T can go a hair below 0 by rounding
        out[i] = b
        T -= b
        S -= s[i]
    return out


def layerwise_schedule(
    scores: Sequence[float], budget: float, min_density: float = DEFAULT_MIN_DENSITY, order: str = "sorted",
) -> list[float]:
    """Per-layer densities from importance scores and an overall density budget (Algorithm 1 + floor).

    Each density is in `[min_density, 1]`; with `order="sorted"` the mean equals `budget`.
    """
    s = _check_scores(scores)
    budget = check_budget(budget)
    if not (0.0 < min_density <= 1.0):
        raise ValueError(f"min_density must be in (0, 1], got {min_density}")
    if budget < min_density - _TOL:
        raise ValueError(
            f"budget {budget} is below the floor min_density={min_density}: no plan has that mean; "
            "lower min_density or raise the budget"
        )
    L = len(s)
    floored: set[int] = set()
    while True:  # at most L rounds: each adds at least one layer to the floored set
        free = [i for i in range(L) if i not in floored]
        rest = budget * L - min_density * len(floored)
        if not free or sum(s[i] for i in free) <= 0:
            plan = [min_density] * L
            break
        sub_budget = min(1.0, max(rest / len(free), _TOL))
        sub = algorithm1([s[i] for i in free], sub_budget, order)
        below = {free[j] for j, b in enumerate(sub) if b < min_density - _TOL}
        if not below:
            plan = [min_density] * L
            for j, i in enumerate(free):
                plan[i] = sub[j]
            break
        floored |= below
    plan = [min(1.0, max(min_density, b)) for b in plan]
    # Degenerate case: zero-score layers sit on the floor while every other layer is capped at 1,
    # so no plan of the form clip(c * s_i, floor, 1) reaches the budget. Spread the rest evenly
    # over the zero-score layers (keeps caps, mean and monotonicity).
    deficit = budget * L - sum(plan)
    zeros = [i for i in range(L) if s[i] == 0]
    if deficit > 1e-9 and zeros:
        for i in zeros:
            plan[i] = min(1.0, plan[i] + deficit / len(zeros))
    return plan


def uniform_schedule(n_layers: int, budget: float) -> list[float]:
    """The same density in every layer (the paper's 'uniform' ablation)."""
    if int(n_layers) != n_layers or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers}")
    return [check_budget(budget)] * int(n_layers)


def plans_for(
    scores: Sequence[float], budgets: Sequence[float], min_density: float = DEFAULT_MIN_DENSITY,
    order: str = "sorted",
) -> dict[float, list[float]]:
    """`{budget: per-layer densities}` for several budgets."""
    return {float(b): layerwise_schedule(scores, b, min_density=min_density, order=order) for b in budgets}


def compare_orders(scores: Sequence[float], budgets: Sequence[float]) -> list[dict[str, Any]]:
    """Per budget: does a cap bind, and how the literal layer-order walk differs from the sorted one."""
    rows = []
    for b in budgets:
        lit, srt = algorithm1(scores, b, order="layer"), algorithm1(scores, b, order="sorted")
        inversions = sum(1 for i in range(len(scores)) for j in range(len(scores))
                         if scores[i] > scores[j] and lit[i] < lit[j] - 1e-9)
        rows.append({
            "budget": b, "capped_layers": sum(x >= 1 - 1e-12 for x in srt),
            "mean_sorted": sum(srt) / len(srt), "mean_layer_order": sum(lit) / len(lit),
            "max_abs_diff": max(abs(x - y) for x, y in zip(lit, srt)),
            "monotonicity_violations_layer_order": inversions,
        })
    return rows


def schedule_summary(schedule: Any) -> dict[str, Any]:
    """Min / mean / max of a density plan (a quick check in notebooks)."""
    d = list(schedule)
    return {"min": min(d), "mean": sum(d) / len(d), "max": max(d), "layers": len(d)}
