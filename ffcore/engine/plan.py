"""A sparsity plan: what the block-sparse FFN engine does in each layer (paper section 3).

`SparsityPlan` is an immutable value that every part of ffcore takes whole: the engine
(`sparsify(model, plan)`), the FLOP model (`flops.plan_speedup(spec, T, plan)`), the evaluation
runner (its cache key is `plan.key()`) and the benchmarks. `plan.replace(...)` returns a new plan
and never copies a trained module's weights. How the engine executes a plan (backend, CPU block
parallelism) is a separate value, `EngineOptions`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

import torch
from torch import nn

from ffcore.engine.layout import BLOCK_SIZE, Span, check_block_size, check_tail, split_blocks

POLICY_NAMES = ("dense", "oracle", "first_block_static", "random", "predictor")
BACKENDS = ("auto", "torch", "triton")
# What a sparse decode step picks its experts from (`SparsityPlan.decode_context`, `ffcore.engine.decode_window`):
# the decode token alone (the paper), a window of the last block_size FFN inputs, or that window's experts reused.
DECODE_CONTEXTS = ("token", "window", "reuse")


def check_decode_context(context: str) -> str:
    """Return context, or raise if it is not one of DECODE_CONTEXTS."""
    if context not in DECODE_CONTEXTS:
        raise ValueError(f"unknown decode_context {context!r}; choose one of {DECODE_CONTEXTS}")
    return context


def weights_digest(module: nn.Module) -> str:
    """8 hex digits of a hash of a module's state dict (cached on the module until a tensor changes)."""
    tensors = [t for _, t in sorted(module.state_dict().items())]
    stamp = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)
    cached = getattr(module, "_ffcore_digest", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:8]
    object.__setattr__(module, "_ffcore_digest", (stamp, digest))  # plain attribute, not a submodule
    return digest


def object_identity(obj: Any) -> str | None:
    """A short name of a policy or compensator object that changes when its weights do."""
    if obj is None:
        return None
    name = str(getattr(obj, "name", type(obj).__name__))
    own = getattr(obj, "digest", None)
    digest = own() if callable(own) else weights_digest(obj) if isinstance(obj, nn.Module) else None
    if digest is None or digest in name:  # a name that already carries the digest (the compensator's)
        return name
    return f"{name}@{digest}"


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine executes a plan (never changes its result beyond float rounding).

    backend:        'auto' (Triton kernels for CUDA tensors they support, the torch path otherwise),
                    'torch', or 'triton' (on CPU only under TRITON_INTERPRET=1, for tests).
    block_parallel: on a multi-core CPU, spread a layer's sparse blocks over torch's threads, each
                    running single-threaded BLAS (a 128-row GEMM splits poorly across cores).
    """

    backend: str = "auto"
    block_parallel: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
    """Per-layer FFN densities and how blocks pick their experts (an immutable value).

    densities:      one density (1 - sparsity) for every layer, or one per layer, each in (0, 1].
    policy:         expert selection: 'dense', 'oracle', 'first_block_static', 'random', or a
                    `SelectionPolicy` object (the trained predictor).
    block_size:     tokens per prefill block (paper: 128).
    dense_first:    the first block (attention sinks) runs dense.
    dense_last:     the tail (the question) runs dense.
    dense_tail:     'full': the dense tail is the prompt's last `block_size` tokens (the grid block it
                    overlaps runs sparse, shortened); 'grid': the grid's last block, which can be one
                    token long (the literal reading: most of the question then runs sparse).
    sparse_decode:  also sparsify one-token decode steps (paper Table 3); default dense.
    decode_context: what a sparse decode step selects its experts from (only with sparse_decode):
                    'token': the decode token alone, a one-token span (the paper; the default);
                    'window': the FFN inputs of the last `block_size` tokens (the prompt's tail at first,
                    then the decode tokens, the current one included), scored exactly like a prefill
                    block; 'reuse': the experts of such a window, chosen at the first decode step and
                    then every `block_size` steps, reused in between (beyond the paper;
                    `ffcore.engine.decode_window`).
    compensator:    an error compensator (callable `(layer, x, idx) -> correction`), or None.
    seed:           seed of the 'random' policy.
    """

    densities: float | tuple[float, ...] = 0.5
    policy: Any = "oracle"
    block_size: int = BLOCK_SIZE
    dense_first: bool = True
    dense_last: bool = True
    dense_tail: str = "full"
    sparse_decode: bool = False
    decode_context: str = "token"
    compensator: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        dens = self.densities
        if isinstance(dens, torch.Tensor):
            dens = dens.tolist()
        if not isinstance(dens, (int, float)):
            dens = tuple(float(d) for d in dens)
            object.__setattr__(self, "densities", dens)
        listed = [dens] if isinstance(dens, (int, float)) else list(dens)
        if not listed:
            raise ValueError("densities is empty: give one density or one per layer")
        for i, d in enumerate(listed):
            if isinstance(d, bool) or not isinstance(d, (int, float)) or math.isnan(d) or not 0.0 < d <= 1.0:
                raise ValueError(
                    f"density {d!r} (layer {i}) is outside (0, 1]; density = 1 - sparsity, "
                    "e.g. 0.5 for 50 % sparsity"
                )
        if isinstance(self.policy, str) and self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICY_NAMES} or pass an object")
        if self.policy == "predictor":
            raise ValueError("policy 'predictor' needs the trained predictor object: pass it as policy=<predictor>")
        check_block_size(self.block_size)
        check_tail(self.dense_tail)
        check_decode_context(self.decode_context)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparsityPlan":
        """A plan from a mapping, naming any unknown keys in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"SparsityPlan: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "SparsityPlan":
        """A new plan with some fields changed (unknown names rejected; trained objects are shared, not copied)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"SparsityPlan: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def spans(self, T: int, offset: int = 0) -> tuple[list[Span], list[Span]]:
        """(dense spans, sparse spans) of a T-token prefill call under this plan (`layout.split_blocks`)."""
        return split_blocks(T, self.block_size, self.dense_first, self.dense_last, offset, self.dense_tail)

    def density(self, layer: int) -> float:
        """The density of one layer."""
        if isinstance(self.densities, (int, float)):
            return float(self.densities)
        return float(self.densities[layer])

    def layer_densities(self, n_layers: int) -> list[float]:
        """Every layer's density (checks a per-layer list against the layer count)."""
        self.check_layers(n_layers)
        return [self.density(i) for i in range(n_layers)]

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

    @property
    def uses_predictor(self) -> bool:
        """Whether a trained (non-string) policy selects the experts, so its cost counts."""
        return not isinstance(self.policy, str)

    @property
    def is_dense(self) -> bool:
        """True when the plan changes nothing (every density 1 and no compensator)."""
        dens = [self.densities] if isinstance(self.densities, (int, float)) else list(self.densities)
        return self.compensator is None and all(float(d) >= 1.0 for d in dens)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description; objects are named with a digest of their weights.

        `decode_context` appears only when it is not the default 'token', so the descriptions (and
        `key()`, the result caches' keys) of plans that existed before the option are unchanged.
        """
        dens = self.densities if isinstance(self.densities, (int, float)) else [round(float(d), 6) for d in self.densities]
        out = {
            "densities": dens, "policy": self.policy_name, "policy_id": object_identity(self.policy)
            if self.uses_predictor else None, "block_size": self.block_size, "dense_first": self.dense_first,
            "dense_last": self.dense_last, "dense_tail": self.dense_tail, "sparse_decode": self.sparse_decode,
            "compensator": object_identity(self.compensator), "seed": self.seed,
        }
        if self.decode_context != "token":
            out["decode_context"] = self.decode_context
        return out

    def key(self) -> str:
        """A short stable hash of `describe()` (result caches): changes with the trained objects' weights."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]


def dense_plan() -> SparsityPlan:
    """A plan that changes nothing (every layer at density 1)."""
    return SparsityPlan(densities=1.0, policy="dense")


def as_plan(plan: SparsityPlan | None) -> SparsityPlan:
    """The plan itself, or the dense plan for None."""
    return dense_plan() if plan is None else plan
