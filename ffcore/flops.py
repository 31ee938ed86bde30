"""Exact per-component FLOPs of a decoder-only prefill, and the compute-bound speedup of a sparsity plan.

Counting convention: **one multiply-add = 2 FLOPs**, so a matmul `[m, k] x [k, n]` costs
`2*m*k*n` FLOPs (the convention of `torch.utils.flop_counter.FlopCounterMode`).

Components counted per layer, for a prompt of `T` tokens (paper section 2, eqs. 1-10):

* `q_proj`   : `2*T*d*(heads*head_dim)`
* `kv_proj`  : `2 * 2*T*d*(kv_heads*head_dim)` (grouped-query attention: k and v are narrower)
* `o_proj`   : `2*T*(heads*head_dim)*d`
* `attn_scores` (QK^T) and `attn_av` (AV): `2*heads*head_dim*P` each, where `P` is the number
  of (query, key) pairs computed. With ``pairs="causal"`` (the default, exact) `P` is the number
  of *visible* pairs: `sum_t min(t+1, window)`, i.e. `T(T+1)/2` for a full-attention layer; this
  is what a mask-aware kernel (FlashAttention-style) has to do. With ``pairs="full"`` `P = T*T`,
  what an eager or SDPA-math implementation does when it materialises the masked `T x T` matrix.
  Sliding-window layers (Gemma 3 `layer_types`) use `window` = the config's `sliding_window`
  (Hugging Face masks keys with `k <= t - window`, so a query sees `min(t+1, window)` keys).
* `ffn`      : gated FFN, 3 matmuls of `d x f`: `3 * 2*T*d*f`
* `lm_head`  : the last token only (prefill needs one next-token distribution): `2*d*vocab`

Optional FastForward overheads (section 3), counted by `predictor_flops` / `compensator_flops`:

* expert predictor, once per sparse 128-token block of `N` tokens and layer: attention pool
  `q X^T` (`2*N*d`) and the softmax-weighted sum (`2*N*d`), then `d x r` and `r x f` matmuls
  (`2*d*r + 2*r*f`), `r` = the power of two at or above `d/16`;
* error compensator, per token of a sparse block and layer: `d -> d/8 -> d` (`4*d*(d//8)`).

Not counted, because they are elementwise: `O(T*d)` per layer against the `O(T*d*d)` matmuls,
or a few operations per score for the softmax against `4*head_dim` per score for QK^T + AV:
softmax, RMSNorm, rotary embeddings, activation functions and the gating product, residual
adds, the embedding lookup (no FLOPs), the predictor's softmax/ReLU and top-K.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from ffcore.config import StrictConfig
from ffcore.engine.layout import BLOCK_SIZE, block_spans, compensator_rank, predictor_rank, sparse_token_count
from ffcore.engine.plan import SparsityPlan
from ffcore.models import OFFLINE_MODELS, TINY_MODELS, offline_model_path, tiny_config

COMPONENTS = ("q_proj", "kv_proj", "o_proj", "attn_scores", "attn_av", "ffn", "lm_head")
ATTENTION_CORE = ("attn_scores", "attn_av")
ATTENTION_PROJ = ("q_proj", "kv_proj", "o_proj")
PAIR_MODES = ("causal", "full")
LAYER_TYPES = ("full", "sliding")
_HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "full": "full", "sliding": "sliding"}

# The paper's rough crossover rule (section 2.3): FFN dominates while T < c * d_ffn with c ~ 2,
# "up to approximately 16K tokens for the 1B model and 28K tokens for the 8B model".
PAPER_RULE_C = 2
PAPER_CROSSOVER = {"llama-3.2-1b": 16_000, "llama-3.1-8b": 28_000}


@dataclasses.dataclass
class ModelSpec(StrictConfig):
    """The shape numbers of a decoder that determine its prefill FLOPs."""

    name: str
    d: int
    f: int
    L: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "full" / "sliding" per layer; None = all full

    def __post_init__(self) -> None:
        """Normalise Hugging Face layer-type names and validate the shape."""
        if self.layer_types is not None:
            unknown = sorted({t for t in self.layer_types if t not in _HF_LAYER_TYPES})
            if unknown:
                raise NotImplementedError(f"{self.name}: unsupported layer type(s) {unknown}; ffcore counts {LAYER_TYPES}")
            self.layer_types = [_HF_LAYER_TYPES[t] for t in self.layer_types]
            if len(self.layer_types) != self.L:
                raise ValueError(f"{self.name}: {len(self.layer_types)} layer_types for L={self.L} layers")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError(f"{self.name}: sliding layers need a sliding_window")
        for key in ("d", "f", "L", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, key) < 1:
                raise ValueError(f"{self.name}: {key} must be positive, got {getattr(self, key)}")

    def window(self, layer: int) -> int | None:
        """The attention window of one layer (None = full causal attention)."""
        if self.layer_types is None or self.layer_types[layer] == "full":
            return None
        return self.sliding_window


def _gemma3_layer_types(L: int, pattern: int = 6) -> list[str]:
    """Gemma 3's default layer pattern: every `pattern`-th layer is full, the rest sliding."""
    return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(L)]


# Public config.json numbers of the paper's models and of our two offline models.
BUILTIN_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("llama-3.2-1b", d=2048, f=8192, L=16, heads=32, kv_heads=8, head_dim=64, vocab=128256),
        ModelSpec("llama-3.2-3b", d=3072, f=8192, L=28, heads=24, kv_heads=8, head_dim=128, vocab=128256),
        ModelSpec("llama-3.1-8b", d=4096, f=14336, L=32, heads=32, kv_heads=8, head_dim=128, vocab=128256),
        ModelSpec("qwen3-4b", d=2560, f=9728, L=36, heads=32, kv_heads=8, head_dim=128, vocab=151936),
        ModelSpec("smollm2-135m", d=576, f=1536, L=30, heads=9, kv_heads=3, head_dim=64, vocab=49152),
        ModelSpec(
            "gemma3-270m", d=640, f=2048, L=18, heads=4, kv_heads=1, head_dim=256, vocab=262144,
            sliding_window=512, layer_types=_gemma3_layer_types(18),
        ),
    )
}
PAPER_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-4b")
PAPER_SPARSITIES = (0.3, 0.4, 0.5)  # the FFN sparsity levels of the paper's Table 2 and Fig. 7
TABLE_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)  # 0.5K .. 128K


def builtin_spec(name: str) -> ModelSpec:
    """A copy of a built-in spec by name, with a clear error listing the known names."""
    if name not in BUILTIN_SPECS:
        raise KeyError(f"no built-in spec {name!r}; known: {sorted(BUILTIN_SPECS)}")
    return dataclasses.replace(BUILTIN_SPECS[name])


# ---------------------------------------------------------------- specs from Hugging Face configs
def spec_from_config(config: Any, name: str | None = None) -> ModelSpec:
    """A `ModelSpec` from a Hugging Face (text) config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, L = cfg.num_attention_heads, cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None and window is not None and getattr(cfg, "use_sliding_window", True):
        layer_types = ["sliding"] * L  # Mistral-style: a window on every layer
    if layer_types is not None:
        layer_types = [_HF_LAYER_TYPES.get(t, t) for t in layer_types]
        if window is None:  # e.g. Qwen3 may list sliding types while its window is disabled
            layer_types = ["full" if t == "sliding" else t for t in layer_types]
    uses_window = layer_types is not None and "sliding" in layer_types
    return ModelSpec(
        name=name or getattr(cfg, "name_or_path", None) or cfg.model_type,
        d=cfg.hidden_size, f=cfg.intermediate_size, L=L, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
        sliding_window=window if uses_window else None,
        layer_types=layer_types if uses_window else None,
    )


def spec_from_model(model: Any) -> ModelSpec:
    """A `ModelSpec` from a loaded Hugging Face causal LM."""
    return spec_from_config(model.config, name=getattr(model, "ffcore_name", None))


def spec_for(key: str) -> ModelSpec:
    """The spec of a built-in config, a tiny test model, an offline model or a local checkpoint (no weights loaded)."""
    if key in PAPER_MODELS:
        return builtin_spec(key)
    if key in TINY_MODELS:
        return spec_from_config(tiny_config(TINY_MODELS[key]), name=key)
    from transformers import AutoConfig

    path = offline_model_path(key) if key in OFFLINE_MODELS else key
    return spec_from_config(AutoConfig.from_pretrained(path), name=key)


# ---------------------------------------------------------------- FLOP formulas
def _ints(T: Any) -> np.ndarray:
    """Context lengths as an integer array; object arrays (exact Python ints) pass through."""
    T = np.asarray(T)
    return T if T.dtype == object else T.astype(np.int64)


def causal_pairs(T: Any, window: int | None = None) -> Any:
    """Visible (query, key) pairs of a causal mask: sum over t < T of min(t+1, window)."""
    T = _ints(T)
    if window is None:
        return T * (T + 1) // 2
    head = np.minimum(T, window)  # queries t < window see t+1 keys, later ones see `window`
    return head * (head + 1) // 2 + (T - head) * window


def attention_pairs(T: Any, window: int | None, pairs: str = "causal") -> Any:
    """(query, key) pairs an attention layer computes: visible pairs ("causal") or T*T ("full")."""
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    T = _ints(T)
    return causal_pairs(T, window) if pairs == "causal" else T * T


def layer_flops(spec: ModelSpec, layer: int, T: Any, pairs: str = "causal") -> dict[str, Any]:
    """FLOPs of one decoder layer for T prompt tokens (T may be an int array), per component."""
    T = _ints(T)
    q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    p = attention_pairs(T, spec.window(layer), pairs)
    return {
        "q_proj": 2 * T * spec.d * q_width,
        "kv_proj": 2 * (2 * T * spec.d * kv_width),
        "o_proj": 2 * T * q_width * spec.d,
        "attn_scores": 2 * spec.heads * spec.head_dim * p,
        "attn_av": 2 * spec.heads * spec.head_dim * p,
        "ffn": 3 * (2 * T * spec.d * spec.f),
    }


def lm_head_flops(spec: ModelSpec, tokens: int = 1) -> int:
    """FLOPs of the output projection for `tokens` positions (prefill needs only the last one)."""
    return 2 * tokens * spec.d * spec.vocab


# Below this context length every count of every built-in config fits int64 (checked in tests);
# longer contexts switch to exact Python integers (object arrays, slower).
INT64_SAFE_T = 1 << 20


def prefill_flops_curve(spec: ModelSpec, Ts: Sequence[int], pairs: str = "causal") -> dict[str, np.ndarray]:
    """Vectorised `prefill_flops` over many context lengths: component -> integer array."""
    Ts = _ints(Ts)
    if (Ts < 1).any():
        raise ValueError("context lengths must be >= 1")
    if Ts.dtype != object and Ts.max() >= INT64_SAFE_T:
        Ts = np.array([int(t) for t in Ts], dtype=object)
    out = {c: np.zeros_like(Ts) for c in COMPONENTS}
    windows = [spec.window(layer) for layer in range(spec.L)]
    for w in dict.fromkeys(windows):  # layers with the same window cost the same
        for c, v in layer_flops(spec, windows.index(w), Ts, pairs).items():
            out[c] = out[c] + windows.count(w) * v
    out["lm_head"] = np.full_like(Ts, lm_head_flops(spec))
    return out


def prefill_flops(spec: ModelSpec, T: int, pairs: str = "causal") -> dict[str, int]:
    """Exact FLOPs of a T-token prefill, per component (see the module docstring)."""
    exact = np.array([int(T)], dtype=object)  # Python ints: no overflow at any T
    return {c: int(v[0]) for c, v in prefill_flops_curve(spec, exact, pairs).items()}


def group_flops(flops: dict[str, Any]) -> dict[str, Any]:
    """Coarse groups: attention core (scores + AV), attention projections, FFN, lm head."""
    return {
        "attention_core": sum(flops[c] for c in ATTENTION_CORE),
        "attention_proj": sum(flops[c] for c in ATTENTION_PROJ),
        "ffn": flops["ffn"],
        "lm_head": flops["lm_head"],
    }


def module_shares(flops: dict[str, Any]) -> dict[str, Any]:
    """FLOP shares by the modules a profiler sees: attention (self_attn incl. projections), mlp, other."""
    g = group_flops(flops)
    total = sum(flops[c] for c in COMPONENTS)
    return {
        "attention": (g["attention_core"] + g["attention_proj"]) / total,
        "mlp": g["ffn"] / total,
        "other": g["lm_head"] / total,
    }


# ---------------------------------------------------------------- crossover
def _attention_minus_ffn(
    spec: ModelSpec, Ts: Any, include_projections: bool, gated: bool, pairs: str
) -> np.ndarray:
    """Attention FLOPs minus FFN FLOPs at each T (the FFN counted with 3 or 2 matmuls)."""
    c = prefill_flops_curve(spec, Ts, pairs)
    attn = sum(c[k] for k in ATTENTION_CORE + (ATTENTION_PROJ if include_projections else ()))
    ffn = c["ffn"] if gated else c["ffn"] // 3 * 2
    return attn - ffn


def crossover_length(
    spec: ModelSpec, include_projections: bool = False, gated: bool = True, pairs: str = "causal",
    t_max: int = 1 << 26,
) -> int | None:
    """Smallest T at which attention FLOPs exceed FFN FLOPs (None if not below `t_max`).

    Attention means scores + AV (`include_projections=False`) or scores + AV + q/k/v/o
    projections. `gated=False` counts a classic 2-matmul FFN (paper eqs. 7-9) instead of the
    3-matmul gated FFN the models actually have. The per-token attention cost never decreases
    with T while the FFN's is constant, so the set of T where attention wins is upward closed
    and a binary search is exact.
    """
    def wins(T: int) -> bool:
        exact = np.array([T], dtype=object)
        return bool(_attention_minus_ffn(spec, exact, include_projections, gated, pairs)[0] > 0)

    if not wins(t_max):
        return None
    lo, hi = 1, t_max  # invariant: answer in [lo, hi], wins(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def paper_rule_crossover(spec: ModelSpec, c: float = PAPER_RULE_C) -> float:
    """The paper's rule of thumb (section 2.3): FFN dominates while T < c * d_ffn."""
    return c * spec.f


# ---------------------------------------------------------------- sparsity plans
def block_sizes(T: int, block_size: int = BLOCK_SIZE) -> list[int]:
    """Token counts of the prompt's blocks (`ffcore.engine.layout`); the last one may be partial."""
    if T < 1:
        raise ValueError(f"need T >= 1, got T={T}")
    return [e - s for s, e in block_spans(T, block_size)]


def sparse_tokens(T: int, block_size: int = BLOCK_SIZE, dense_first: bool = True, dense_last: bool = True,
                  tail: str = "full") -> int:
    """Number of prompt tokens that fall into sparse blocks."""
    return sparse_token_count(T, block_size, dense_first, dense_last, tail)


def predictor_flops(spec: ModelSpec, n_tokens: int) -> int:
    """FLOPs of one expert-predictor call (one layer, one block of `n_tokens`)."""
    r = predictor_rank(spec.d)
    return 2 * n_tokens * spec.d + 2 * n_tokens * spec.d + 2 * spec.d * r + 2 * r * spec.f


def compensator_flops(spec: ModelSpec, n_tokens: int) -> int:
    """FLOPs of the error compensator for `n_tokens` tokens of one layer (d -> d/8 -> d)."""
    return 2 * 2 * n_tokens * spec.d * compensator_rank(spec.d)


def uniform_plan(sparsity: float, block_size: int = BLOCK_SIZE) -> SparsityPlan:
    """A plan with one density (1 - sparsity) in every layer and first/last blocks dense (no trained parts)."""
    return SparsityPlan(densities=1.0 - sparsity, policy="random", block_size=block_size)


def plan_speedup(spec: ModelSpec, T: int, plan: SparsityPlan, overheads: bool | None = None,
                 pairs: str = "causal") -> dict[str, Any]:
    """Dense vs sparse prefill FLOPs of a FastForward plan and the compute-bound speedup.

    A sparse block's FFN FLOPs scale with its layer's density (K = density * f neurons, not
    rounded). The first block and the tail stay dense as the plan says (`plan.spans`, the engine's layout).
    Layers with density 1 run dense and need neither predictor nor compensator. `overheads`
    decides what selection and correction cost: None counts what the plan holds (a trained
    predictor object: once per sparse block and layer; a compensator: every token of a sparse
    block); True counts both as the deployed method would (for configurations without weights,
    e.g. the paper's models); False counts neither. Attention, projections and the lm head are
    unchanged.
    """
    dens = plan.layer_densities(spec.L)
    _, sparse = plan.spans(T)
    sparse_sizes = [e - s for s, e in sparse]
    n_sparse = sum(sparse_sizes)
    dense = prefill_flops(spec, T, pairs)
    dense_total = sum(dense.values())
    ffn_layer = dense["ffn"] // spec.L  # every layer's FFN costs the same
    ffn_sparse = sum(ffn_layer * ((T - n_sparse) + rho * n_sparse) / T for rho in dens)
    active = sum(rho < 1.0 for rho in dens)
    with_pred = plan.uses_predictor if overheads is None else overheads
    with_comp = (plan.compensator is not None) if overheads is None else overheads
    pred = sum(predictor_flops(spec, n) for n in sparse_sizes) * active if with_pred else 0
    comp = compensator_flops(spec, n_sparse) * active if with_comp else 0
    sparse_total = dense_total - dense["ffn"] + ffn_sparse + pred + comp
    return {
        "model": spec.name, "T": T, "block_size": plan.block_size, "n_blocks": len(block_spans(T, plan.block_size)),
        "sparse_blocks": len(sparse_sizes), "sparse_tokens": n_sparse, "mean_density": float(np.mean(dens)),
        "dense_flops": dense_total, "sparse_flops": sparse_total, "ffn_dense_flops": dense["ffn"],
        "ffn_sparse_flops": ffn_sparse, "predictor_flops": pred, "compensator_flops": comp,
        "ffn_speedup": dense["ffn"] / ffn_sparse if ffn_sparse else math.inf,
        "speedup": dense_total / sparse_total,
    }


def plan_speedup_curve(spec: ModelSpec, Ts: Sequence[int], plan: SparsityPlan, **kw: Any) -> list[dict[str, Any]]:
    """`plan_speedup` at each context length (a list of flat records)."""
    return [plan_speedup(spec, int(T), plan, **kw) for T in Ts]


def ffn_ideal_speedup(
    T: int, density: float, block_size: int = BLOCK_SIZE, dense_first: bool = True, dense_last: bool = True,
    tail: str = "full",
) -> float:
    """Ideal FLOP speedup of the FFN module alone (no predictor/compensator overhead)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density}")
    n_sparse = sparse_tokens(T, block_size, dense_first, dense_last, tail)
    return T / ((T - n_sparse) + density * n_sparse)


# ---------------------------------------------------------------- tables
def flops_records(spec: ModelSpec, Ts: Sequence[int], pairs: str = "causal") -> list[dict[str, Any]]:
    """Flat records (model, T, component, flops, share) for tables and plots."""
    curve = prefill_flops_curve(spec, Ts, pairs)
    total = sum(curve[c] for c in COMPONENTS)
    return [
        {"model": spec.name, "T": int(T), "component": c, "flops": int(curve[c][i]), "share": float(curve[c][i] / total[i])}
        for i, T in enumerate(np.asarray(Ts)) for c in COMPONENTS
    ]


def curve_lengths(
    t_min: int = 128, t_max: int = 131072, points_per_octave: int = 8, multiple_of: int = 1
) -> np.ndarray:
    """Log-spaced integer context lengths for smooth curves (ends included), rounded to `multiple_of`."""
    n = int(round(math.log2(t_max / t_min) * points_per_octave)) + 1
    Ts = np.geomspace(t_min, t_max, n) / multiple_of
    return np.unique(np.maximum(1, Ts.round()).astype(np.int64) * multiple_of)


def module_share_records(spec: ModelSpec, Ts: Sequence[int], pairs: str = "causal") -> list[dict[str, Any]]:
    """FLOP shares by profiler module (attention, mlp, other) per T, labelled with the counting mode."""
    source = {"causal": "FLOPs, visible pairs only", "full": "FLOPs, full T×T scores"}[pairs]
    rows = []
    for T in Ts:
        for comp, share in module_shares(prefill_flops(spec, int(T), pairs)).items():
            rows.append({"model": spec.name, "T": int(T), "source": source, "component": comp, "share": share})
    return rows


def speedup_records(
    spec: ModelSpec, Ts: Sequence[int], sparsities: Sequence[float] = PAPER_SPARSITIES, overheads: bool = True,
    pairs: str = "causal",
) -> list[dict[str, Any]]:
    """`plan_speedup` records for uniform FFN sparsity levels over T (overheads of the deployed method by default)."""
    return [r for s in sparsities for r in plan_speedup_curve(spec, Ts, uniform_plan(s), overheads=overheads,
                                                              pairs=pairs)]


def peak_speedups(specs: Sequence[ModelSpec], Ts: Sequence[int], sparsity: float = 0.5) -> list[dict[str, Any]]:
    """Peak compute-bound speedup over `Ts` per spec, attention counting mode, and with/without overheads."""
    rows = []
    for spec in specs:
        for pairs in PAIR_MODES:
            for overheads in (True, False):
                recs = speedup_records(spec, Ts, [sparsity], overheads=overheads, pairs=pairs)
                best = max(recs, key=lambda r: r["speedup"])
                rows.append({"model": spec.name, "sparsity": sparsity, "pairs": pairs, "overheads": overheads,
                             "T_at_peak": best["T"], "peak_speedup": best["speedup"]})
    return rows


def crossover_records(specs: Sequence[ModelSpec]) -> list[dict[str, Any]]:
    """Crossover lengths of each spec under the counting variants, with the paper's rule."""
    rows = []
    for s in specs:
        rows.append({
            "model": s.name, "d": s.d, "f": s.f,
            "attn_core_vs_gated_ffn": crossover_length(s),
            "attn_incl_proj_vs_gated_ffn": crossover_length(s, include_projections=True),
            "attn_core_vs_2matmul_ffn": crossover_length(s, gated=False),
            "attn_core_full_matrix_vs_gated_ffn": crossover_length(s, pairs="full"),
            "paper_rule_c_times_f": paper_rule_crossover(s),
            "paper_quoted": PAPER_CROSSOVER.get(s.name),
        })
    return rows
