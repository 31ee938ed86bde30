"""A sparsity plan: what the block-sparse FFN engine does in each layer (paper section 3)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Sequence

from ffcore.config import StrictConfig

POLICY_NAMES = ("dense", "oracle", "first_block_static", "random", "predictor")


@dataclasses.dataclass
class SparsityPlan(StrictConfig):
    """Per-layer FFN densities and how blocks pick their experts.

    densities:      one density (1 - sparsity) for every layer, or one per layer, each in (0, 1].
    policy:         expert selection: 'dense', 'oracle', 'first_block_static', 'random',
                    'predictor', or a `SelectionPolicy` object.
    block_size:     tokens per prefill block (paper: 128).
    dense_first:    the first block (attention sinks) runs dense.
    dense_last:     the last block (the question) runs dense.
    sparse_decode:  also sparsify one-token decode steps (paper Table 3); default dense.
    compensator:    an error compensator (callable `(layer, x, idx) -> correction`), or None.
    seed:           seed of the 'random' policy.
    """

    densities: float | Sequence[float] = 0.5
    policy: Any = "oracle"
    block_size: int = 128
    dense_first: bool = True
    dense_last: bool = True
    sparse_decode: bool = False
    compensator: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        dens = [self.densities] if isinstance(self.densities, (int, float)) else list(self.densities)
        if not dens:
            raise ValueError("densities is empty: give one density or one per layer")
        for i, d in enumerate(dens):
            if not isinstance(d, (int, float)) or math.isnan(d) or not 0.0 < d <= 1.0:
                raise ValueError(
                    f"density {d!r} (layer {i}) is outside (0, 1]; density = 1 - sparsity, "
                    "e.g. 0.5 for 50 % sparsity"
                )
        if isinstance(self.policy, str) and self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICY_NAMES} or pass an object")
        if self.policy == "predictor":
            raise ValueError("policy 'predictor' needs the trained predictor object: pass it as policy=<predictor>")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    def density(self, layer: int, n_layers: int) -> float:
        """The density of one layer."""
        if isinstance(self.densities, (int, float)):
            return float(self.densities)
        return float(self.densities[layer])

    def check_layers(self, n_layers: int) -> None:
        """Raise if a per-layer density list does not match the model's layer count."""
        if not isinstance(self.densities, (int, float)) and len(self.densities) != n_layers:
            raise ValueError(
                f"the plan has {len(self.densities)} per-layer densities but the model has {n_layers} "
                "layers; build the schedule for this model (ffcore.schedule) or pass one float"
            )

    @property
    def policy_name(self) -> str:
        """The policy's name, also for policy objects."""
        return self.policy if isinstance(self.policy, str) else getattr(self.policy, "name", type(self.policy).__name__)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (objects are named, not serialised)."""
        dens = self.densities if isinstance(self.densities, (int, float)) else [round(float(d), 6) for d in self.densities]
        comp = None if self.compensator is None else getattr(self.compensator, "name", type(self.compensator).__name__)
        return {
            "densities": dens, "policy": self.policy_name, "block_size": self.block_size,
            "dense_first": self.dense_first, "dense_last": self.dense_last,
            "sparse_decode": self.sparse_decode, "compensator": comp, "seed": self.seed,
        }

    def key(self) -> str:
        """A short stable hash of `describe()` (for result caches)."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]


def dense_plan() -> SparsityPlan:
    """A plan that changes nothing (every layer at density 1)."""
    return SparsityPlan(densities=1.0, policy="dense")
