"""The error compensator (paper section 3.3) and a mask-conditioned variant (the paper's section 8 future work).

Per layer `l` and every token `x` ([d], the FFN input) of a sparse block whose kept experts are `M`
(dropped neurons `D`, the complement), the engine adds a correction `c` to the sparse FFN output (eq. 21):

    plain  (eq. 20):  c = W2 act(W1 x)                                   W1: [d, r], W2: [r, d], r = d/8
    masked (ours):    c = W2 [act(W1 x + u_D) * (1 + g_D)]
                      u_D = sum_{j in D} A_j / sqrt(f),  g_D = sum_{j in D} G_j / sqrt(f)   A, G: [f, r]

**Why the masked form.** The error the compensator should cancel is exactly the dropped neurons'
contribution, `e(x) = y_dense - y_sparse = sum_{j in D} w_j h_j(x)` (`w_j` = column `j` of W_down,
`h_j` = the neuron's gated activation). If each activation is approximately a linear read-out of
the compensator's `r` hidden features, `h_j(x) ~ a_j . phi(x)`, then `e(x) ~ (sum_{j in D} w_j a_j^T) phi(x)`:
a read-out of shared features whose `[d, r]` matrix depends on the dropped set. The plain
compensator can only learn that matrix's average over masks (and, seeing one token, it does not
even know the block's density). Building the exact mask-dependent matrix per block costs
`2 |D| d r` FLOPs and reads W_down's dropped columns — the very memory traffic sparsity saves.
The masked compensator uses the cheapest mask-dependent family that keeps the per-token cost of
the plain one: a per-feature gain `(1 + g_D)` of the shared read-out W2 (a diagonal correction of
the mask-dependent matrix in the feature basis) and a per-feature shift `u_D` that lets the dropped
set choose which features fire. Both are sums of learned `r`-vectors over the dropped neurons,
computed once per block; through `|D|` they also carry the block's density.

Cost per layer (`N` tokens per block, `K` kept experts, `|D| = f - K`): plain `4 N d r` FLOPs per block;
masked `+ 2 |D| r` (two embedding sums per block) `+ 2 N r` (shift and gain per token), i.e. +0.6 % for
smollm2-135m at 50 % density — equal FLOPs for all practical purposes — but `2 f r` extra parameters
per layer, of which a block reads `2 |D| r`.

**Zero initialisation.** W2 (and A, G) start at zero, so an untrained compensator returns exact
zeros and the engine's output is unchanged; a masked compensator initialised from a trained plain
one (`init=`) reproduces it exactly until training moves A and G.

**Training (layer-wise distillation, eq. 22).** From the blocks collected by notebook 03
(`ffcore.collect`; no second collection) we recompute, with the model's own MLP weights, every
sampled token's error `e = W_down[:, D] h_D(x)` at densities of a grid spanning 30-50 % sparsity,
once for oracle masks (the collection's GRIFFIN scores) and once for the trained predictor's masks
(`distill_data`). Because a density's dropped set is the tail of the block's neuron ranking, the
errors at several densities come from one pass over the dropped neurons of the lowest (nested
bands). Each (block, layer) keeps two random grid densities; every step draws one of them, so one
compensator serves the whole range. Loss: the MSE of eq. 22, normalised per layer by the mean squared error norm of the
uncompensated sparse output ("relative MSE": 1 = no correction, 0 = perfect). All layers train at
once (parameters stacked over layers, batched matmuls). Two phases (section 3.3): oracle masks
(warm start), then predictor masks; Adam; 15 % of the training *samples* held out for validation
(the same samples notebook 03's predictor held out); per-layer early stopping — each layer keeps
its best validation epoch of each phase. During training the inputs are standardised per
dimension and the targets scaled per layer; both scalings are folded into W1 and W2 at the end,
so the saved compensator is exactly the architecture above.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tqdm import tqdm

from ffcore.artifacts import read_artifact, save_artifact
from ffcore.collect import Collection
from ffcore.config import StrictConfig
from ffcore.engine.layout import BLOCK_SIZE, compensator_rank, experts_for
from ffcore.engine.plan import weights_digest
from ffcore.engine.sparse_ffn import dense_activations, fused_ffn
from ffcore.flops import ModelSpec, compensator_flops
from ffcore.models import gated_mlps, model_fingerprint, model_slug
from ffcore.predictor import predict_scores, split_train_val

ARTIFACT_STEM = "compensator"
VARIANTS = ("plain", "masked")
SOURCES = ("oracle", "predictor")
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
}
TRAIN_DENSITIES = (0.5, 0.55, 0.6, 0.65, 0.7)  # 30-50 % sparsity, the range one compensator serves
EVAL_DENSITIES = (0.4, 0.5, 0.6, 0.7, 0.8)  # the trained range and one step beyond on each side


# ------------------------------------------------------------------------------ the model
def compensate(
    x: Tensor, w1: Tensor, w2: Tensor, act: str, b1: Tensor | None = None, b2: Tensor | None = None,
    shift: Tensor | None = None, gain: Tensor | None = None,
) -> Tensor:
    """c = W2 [act(x W1 + b1 + shift) * (1 + gain)] + b2, batched by broadcasting.

    x [..., n, d], w1 [..., d, r], w2 [..., r, d]; b1 / shift / gain broadcast to [..., n, r] and
    b2 to [..., n, d]. The plain compensator passes shift = gain = None.
    """
    z = x @ w1  # [..., n, r]
    if b1 is not None:
        z = z + b1
    if shift is not None:
        z = z + shift
    hid = ACTIVATIONS[act](z)
    if gain is not None:
        hid = hid * (1.0 + gain)
    c = hid @ w2  # [..., n, d]
    return c if b2 is None else c + b2


def dropped_sum(drop: Tensor, emb: Tensor) -> Tensor:
    """sum_{j in D} emb_j / sqrt(f) of dropped-neuron masks: drop [..., m, f] (0/1) @ emb [..., f, r] -> [..., m, r]."""
    return (drop @ emb) / math.sqrt(emb.shape[-2])  # also drop [f] @ emb [f, r] -> [r]


def grouped_correction(
    x: Tensor, w1: Tensor, w2: Tensor, act: str, b1: Tensor | None = None, b2: Tensor | None = None,
    shift: Tensor | None = None, gain: Tensor | None = None,
) -> Tensor:
    """Every layer's corrections of several blocks at once, as two batched matmuls over layers.

    x [L, b, n, d] (b blocks of n tokens per layer), w1 [L, d, r], w2 [L, r, d], b1 [L, r], b2 [L, d],
    shift / gain [L, b, r] (one value per block, shared by its tokens) -> [L, b, n, d].
    """
    L, b, n, d = x.shape
    r = w1.shape[-1]
    z = torch.bmm(x.reshape(L, b * n, d), w1).view(L, b, n, r)  # [L, b*n, d] @ [L, d, r] -> [L, b, n, r]
    if b1 is not None:
        z = z + b1[:, None, None]
    if shift is not None:
        z = z + shift.unsqueeze(2)  # [L, b, 1, r]: the block's shift on every token
    hid = ACTIVATIONS[act](z)
    if gain is not None:
        hid = hid * (1.0 + gain.unsqueeze(2))
    c = torch.bmm(hid.view(L, b * n, r), w2).view(L, b, n, d)  # [L, b*n, r] @ [L, r, d] -> [L, b, n, d]
    return c if b2 is None else c + b2[:, None, None]


class ErrorCompensator(nn.Module):
    """Per-layer error compensators stacked over layers; callable as `comp(layer, x [n, d], idx [K]) -> [n, d]`.

    Plugs into the engine: `SparsityPlan(..., compensator=comp)`. `x` may have any float dtype and
    device (the correction comes back in x's dtype and device; it is computed in the parameters'
    dtype on their device). `idx` are the block's kept experts; the plain variant ignores them.
    """

    def __init__(self, L: int, d: int, f: int, r: int | None = None, variant: str = "plain", act: str = "silu",
                 bias: bool = False, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown compensator variant {variant!r}; choose one of {VARIANTS}")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {tuple(ACTIVATIONS)}")
        r = compensator_rank(d) if r is None else int(r)
        if min(L, d, f, r) < 1:
            raise ValueError(f"L, d, f and r must be positive, got {(L, d, f, r)}")
        self.L, self.d, self.f, self.r, self.variant, self.act = L, d, f, r, variant, act
        self.w1 = nn.Parameter(torch.randn(L, d, r) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.zeros(L, r, d))  # zero: an untrained compensator changes nothing
        self.b1 = nn.Parameter(torch.zeros(L, r)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(L, d)) if bias else None
        masked = variant == "masked"
        self.shift = nn.Parameter(torch.zeros(L, f, r)) if masked else None  # A: dropped neuron -> hidden shift
        self.gain = nn.Parameter(torch.zeros(L, f, r)) if masked else None  # G: dropped neuron -> hidden gain
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def bias(self) -> bool:
        """Whether the compensator has biases."""
        return self.b1 is not None

    @property
    def name(self) -> str:
        """An informative, weight-specific name (used by `SparsityPlan.describe()` / `key()`)."""
        model = model_slug(self.meta["model"]) if self.meta.get("model") else "untrained"
        return f"compensator-{self.variant}({model}, r={self.r}, {self.digest()})"

    def digest(self) -> str:
        """8 hex digits of a hash of the weights (cached until a parameter changes)."""
        return weights_digest(self)

    def mask_terms(self, layer: int | slice, drop: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(shift, gain) of the hidden layer for dropped-neuron masks drop [..., f] (None for the plain variant)."""
        if self.variant == "plain":
            return None, None
        if drop is None:
            raise ValueError("the masked compensator needs the block's expert selection (drop mask or idx)")
        drop = drop.to(device=self.shift.device, dtype=self.shift.dtype)
        return dropped_sum(drop, self.shift[layer]), dropped_sum(drop, self.gain[layer])

    def layer_correction(self, layer: int, x: Tensor, drop: Tensor | None = None) -> Tensor:
        """Corrections of several blocks of one layer: x [b, n, d], drop [b, f] (1 = dropped) -> [b, n, d]."""
        shift, gain = self.mask_terms(layer, drop)
        unsq = (lambda t: None if t is None else t.unsqueeze(-2))  # [b, r] -> [b, 1, r]
        return compensate(x.to(self.w1), self.w1[layer], self.w2[layer], self.act,
                          None if self.b1 is None else self.b1[layer], None if self.b2 is None else self.b2[layer],
                          unsq(shift), unsq(gain))

    def correction(self, X: Tensor, drop: Tensor | None = None) -> Tensor:
        """All layers at once: X [b, L, n, d], drop [b, L, f] -> [b, L, n, d] (training/evaluation form)."""
        if X.shape[1] != self.L or X.shape[-1] != self.d:
            raise ValueError(f"X has shape {tuple(X.shape)}; expected [b, {self.L}, n, {self.d}]")
        x = X.to(self.w1).transpose(0, 1)  # [b, L, n, d] -> [L, b, n, d]
        d_t = None if drop is None else drop.transpose(0, 1)  # [L, b, f]
        shift, gain = self.mask_terms(slice(None), d_t)  # [L, b, r]
        c = grouped_correction(x, self.w1, self.w2, self.act, self.b1, self.b2, shift, gain)  # [L, b, n, d]
        return c.transpose(0, 1)

    def drop_mask(self, idx: Tensor) -> Tensor:
        """The dropped-neuron mask [f] (float 0/1) of one block's kept experts idx [K]."""
        drop = torch.ones(self.f, device=self.w1.device, dtype=self.w1.dtype)
        return drop.index_fill_(0, idx.to(device=self.w1.device, dtype=torch.long), 0.0)

    def forward(self, layer: int, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """The engine interface: correction of one sparse block, x [n, d], kept experts idx [K] -> [n, d]."""
        if not isinstance(layer, int) or not 0 <= layer < self.L:
            raise IndexError(f"layer {layer!r} out of range for a {self.L}-layer compensator")
        if x.dim() != 2 or x.shape[-1] != self.d:
            raise ValueError(f"x must be [n, {self.d}] (one block's FFN input), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        drop = None
        if idx is not None:
            if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or idx.numel() > self.f:
                raise ValueError(f"idx must be a 1-D integer tensor of at most f={self.f} expert ids, "
                                 f"got shape {tuple(idx.shape)} dtype {idx.dtype}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.f):
                raise ValueError(f"expert ids must lie in [0, {self.f}), got [{int(idx.min())}, {int(idx.max())}]")
            drop = self.drop_mask(idx) if self.variant == "masked" else None
        elif self.variant == "masked":
            raise ValueError("the masked compensator needs the block's kept experts idx [K]")
        c = self.layer_correction(layer, x.unsqueeze(0), None if drop is None else drop.unsqueeze(0))[0]
        return c.to(device=x.device, dtype=x.dtype)

    def block_corrections(self, layer: int, x: Tensor, spans: Sequence[tuple[int, int]],
                          idx: Tensor | None = None) -> Tensor:
        """Corrections of all sparse blocks of one layer in one call (the engine's fast path).

        x [T, d] (the layer's FFN input), spans [(start, end)] * b, idx [b, K] (kept experts per block)
        -> [sum(end - start), d]: the rows of the spans, in order. Equal to calling `forward` block by
        block, but two matmuls per layer instead of two per block.
        """
        if not isinstance(layer, int) or not 0 <= layer < self.L:
            raise IndexError(f"layer {layer!r} out of range for a {self.L}-layer compensator")
        if x.dim() != 2 or x.shape[-1] != self.d:
            raise ValueError(f"x must be [T, {self.d}] (the layer's FFN input), got {tuple(x.shape)}")
        if not spans:
            return x.new_zeros(0, self.d)
        contiguous = all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
        rows = x[spans[0][0]:spans[-1][1]] if contiguous else torch.cat([x[s:e] for s, e in spans])  # [N, d]
        shift = gain = None
        if self.variant == "masked":
            if idx is None or idx.dim() != 2 or idx.shape[0] != len(spans):
                raise ValueError(f"the masked compensator needs kept experts idx [{len(spans)}, K], got "
                                 f"{None if idx is None else tuple(idx.shape)}")
            drop = torch.ones(len(spans), self.f, device=self.w1.device, dtype=self.w1.dtype)
            drop.scatter_(1, idx.to(device=self.w1.device, dtype=torch.long), 0.0)  # [b, f], 1 = dropped
            lengths = torch.tensor([e - s for s, e in spans], device=self.w1.device)
            shift, gain = (t.repeat_interleave(lengths, 0) for t in self.mask_terms(layer, drop))  # [b, r] -> [N, r]
        c = compensate(rows.to(self.w1), self.w1[layer], self.w2[layer], self.act,
                       None if self.b1 is None else self.b1[layer], None if self.b2 is None else self.b2[layer],
                       shift, gain)
        return c.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return (f"ErrorCompensator(variant={self.variant!r}, L={self.L}, d={self.d}, f={self.f}, r={self.r}, "
                f"act={self.act!r}, bias={self.bias})")


# ------------------------------------------------------------------------------ artifacts
def save_compensator(comp: ErrorCompensator, folder: Path) -> Path:
    """Write `compensator.safetensors` (all layers) and `compensator.json` (metadata) into `folder`."""
    meta = {**comp.meta, "variant": comp.variant, "L": comp.L, "d": comp.d, "f": comp.f, "r": comp.r,
            "act": comp.act, "bias": comp.bias, "digest": comp.digest()}
    return save_artifact(comp, folder, ARTIFACT_STEM, meta)


def load_compensator(folder: Path, model: nn.Module | None = None) -> ErrorCompensator:
    """Load a saved compensator; with `model`, refuse one trained for another model and move it to its device."""
    meta, state = read_artifact(folder, ARTIFACT_STEM, "compensator", "04", model)
    comp = ErrorCompensator(meta["L"], meta["d"], meta["f"], meta["r"], meta["variant"], meta["act"], meta["bias"],
                            meta=meta)
    comp.load_state_dict(state)
    comp.requires_grad_(False)
    if model is not None:
        comp.to(next(model.parameters()).device)
    return comp.eval()


def compensator_meta(model: nn.Module, model_key: str, train: Collection) -> dict[str, Any]:
    """Provenance of a compensator: the model (key, fingerprint) and the training collection."""
    key = train.manifest["key"]
    return {"model": str(model_key), "fingerprint": model_fingerprint(model),
            "collection": {k: key[k] for k in ("split", "n_samples", "seq_len", "seed", "sources", "fingerprint")}}


# ------------------------------------------------------------------------------ distillation targets
def mask_sources(coll: Collection, predictor: nn.Module | None = None) -> dict[str, Tensor]:
    """Scores [n_blocks, L, f] whose top-K are each block's experts: the oracle's, and the predictor's if given."""
    out = {"oracle": coll.scores}
    if predictor is not None:
        out["predictor"] = predict_scores(predictor, coll)
    return out


def _ranks(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Neurons by decreasing score and each neuron's rank (0 = most important): [..., f] -> (order, rank)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [..., f]
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return order, rank


def dropped_errors(h: Tensor, w_down_t: Tensor, order: Tensor, ks: Sequence[int]) -> Tensor:
    """Sparsification errors y_dense - y_sparse of blocks at several K: [b, J, n, d].

    h [b, n, f] the blocks' dense activations, w_down_t [f, d], order [b, f] neurons by decreasing
    importance, ks ascending kept counts. The dropped set at ks[j] is order[:, ks[j]:]; the errors
    are accumulated band by band from the least important neurons up (one pass over order[:, ks[0]:]).
    """
    b, n, f = h.shape
    d = w_down_t.shape[1]
    k0 = ks[0]
    dropped = order[:, k0:]  # [b, f - k0]
    hg = h.gather(2, dropped.unsqueeze(1).expand(b, n, f - k0))  # [b, n, f - k0]
    wg = w_down_t.index_select(0, dropped.reshape(-1)).view(b, f - k0, d)  # [b*(f-k0), d] -> [b, f - k0, d]
    bounds = [k - k0 for k in ks] + [f - k0]
    out = torch.zeros(len(ks) + 1, b, n, d, dtype=h.dtype, device=h.device)  # out[J] = 0 starts the sum
    for j in reversed(range(len(ks))):
        a, e = bounds[j], bounds[j + 1]
        torch.baddbmm(out[j + 1], hg[:, :, a:e], wg[:, a:e], out=out[j])  # + this band's contribution
    return out[:-1].transpose(0, 1).float()  # [J, b, n, d] -> [b, J, n, d]


@dataclasses.dataclass
class DistillData:
    """Layer-wise distillation data: sampled tokens' FFN inputs and their sparsification errors at grid densities.

    Every (block, layer) holds the errors at `P` densities of the grid (`level` says which); errors
    are stored divided by a per-layer scale (`scale`, the RMS error element) in fp16.
    """

    X: Tensor  # [n, L, T, d] fp32 FFN inputs of T tokens sampled per block
    err: dict[str, Tensor]  # mask source -> [n, L, P, T, d] fp16 error / scale[l] at densities[level[..., p]]
    energy: dict[str, Tensor]  # mask source -> [n, L, P] fp32 sum over tokens of ||err||^2 (scaled units)
    level: Tensor  # [n, L, P] int64 grid index of each stored density
    rank: dict[str, Tensor]  # mask source -> [n, L, f] int32 neuron rank (0 = most important)
    scale: Tensor  # [L] fp32
    densities: tuple[tuple[float, ...], ...]  # the grid of every layer ([L][J]; the same row everywhere for a global grid)
    ks: tuple[tuple[int, ...], ...]  # kept experts at each layer's grid densities ([L][J])
    sample: Tensor  # [n] sample index (for the train/validation split)
    position: Tensor  # [n] block position within its sample
    layers: list[int]

    @property
    def n_blocks(self) -> int:
        """Number of blocks."""
        return int(self.sample.numel())

    @property
    def f(self) -> int:
        """FFN width."""
        return int(next(iter(self.rank.values())).shape[-1])

    def drop_mask(self, source: str, rows: Tensor, slots: Tensor) -> Tensor:
        """Dropped-neuron masks [b, L, f] (float) of blocks `rows` at their stored densities `slots` [b, L]."""
        b, L = slots.shape
        lv = self.level[rows.unsqueeze(1), torch.arange(L), slots]  # [b, L] grid index
        ks = torch.tensor(self.ks)[torch.arange(L), lv]  # [L, J] indexed by (layer, level) -> [b, L]
        return (self.rank[source][rows] >= ks.unsqueeze(-1)).float()


@torch.no_grad()
def density_grid(densities: Sequence[float] | Sequence[Sequence[float]], n_layers: int) -> tuple[tuple[float, ...], ...]:
    """A per-layer density grid [L][J] (each row sorted) from one grid for every layer or one row per layer."""
    rows = [tuple(densities)] * n_layers if all(isinstance(x, (int, float)) for x in densities) else \
        [tuple(r) for r in densities]
    if len(rows) != n_layers:
        raise ValueError(f"the density grid has {len(rows)} rows for {n_layers} layers")
    grid = tuple(tuple(sorted(float(x) for x in r)) for r in rows)
    if not grid[0] or len({len(r) for r in grid}) != 1:
        raise ValueError("every layer's density grid must have the same, non-zero number of densities")
    if any(not 0.0 < x <= 1.0 for r in grid for x in r):
        raise ValueError(f"densities must lie in (0, 1], got {grid}")
    return grid


def _grid_json(grid: Sequence[Sequence[float]]) -> list[Any]:
    """A grid for metadata: the one row when every layer shares it, else every row."""
    return list(grid[0]) if all(tuple(r) == tuple(grid[0]) for r in grid) else [list(r) for r in grid]


def schedule_grid(schedules: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    """The densities each layer runs at under the deployed schedules: one schedule per budget -> [L][n_budgets]."""
    return density_grid(list(zip(*schedules)), len(schedules[0]))


@torch.no_grad()
def distill_data(
    model: nn.Module, coll: Collection, sources: Mapping[str, Tensor],
    densities: Sequence[float] | Sequence[Sequence[float]] = TRAIN_DENSITIES,
    tokens_per_block: int | None = 64, levels_per_block: int | None = 2, skip_first: bool = True, seed: int = 0,
    chunk: int = 16, progress: bool = True,
) -> DistillData:
    """Distillation targets from a collection: errors of oracle / predictor masks at grid densities.

    `densities` is one grid for every layer, or one row per layer (`schedule_grid`: the densities the
    deployed layer-wise schedules give each layer, so every layer trains where it will run).
    `sources` maps a name to scores [n_blocks, L, f] aligned with `coll` (see `mask_sources`);
    `tokens_per_block` random tokens of each block are kept (None: all). Blocks are processed in
    random chunks of `chunk`; every (chunk, layer) stores `levels_per_block` random densities of the
    grid (None: all of them), so the grid is covered evenly at a fraction of the memory. Blocks at
    position 0 run dense in the engine and are skipped when `skip_first`. Dense activations are
    recomputed from the model's MLP weights (one pass per layer and chunk).
    """
    if coll.X is None:
        raise ValueError("the collection was loaded without X")
    if not sources:
        raise ValueError("no mask sources given")
    grid = density_grid(densities, len(coll.layers))
    J = len(grid[0])
    P = J if levels_per_block is None else int(levels_per_block)
    if not 1 <= P <= J:
        raise ValueError(f"levels_per_block must be in [1, {J}] (the grid size), got {levels_per_block}")
    rows = (coll.position > 0).nonzero().squeeze(1) if skip_first else torch.arange(coll.n_blocks)
    if not len(rows):
        raise ValueError("no blocks to distil on (every block is a first block)")
    n, (_, L, B, d) = len(rows), coll.X.shape
    mlps = [gated_mlps(model)[layer] for layer in coll.layers]
    f = fused_ffn(mlps[0]).f
    ks = tuple(tuple(experts_for(r, f) for r in row) for row in grid)  # [L][J]
    T = B if tokens_per_block is None else min(B, int(tokens_per_block))
    g = torch.Generator().manual_seed(seed)
    tok = torch.rand(n, B, generator=g).argsort(-1)[:, :T].sort(-1).values  # [n, T] sampled token positions
    shuffled = torch.randperm(n, generator=g)  # chunks mix samples
    chunks = [shuffled[a : a + chunk] for a in range(0, n, chunk)]
    Xs = torch.empty(n, L, T, d)
    err = {s: torch.empty(n, L, P, T, d, dtype=torch.float16) for s in sources}
    energy = {s: torch.empty(n, L, P) for s in sources}
    level = torch.empty(n, L, P, dtype=torch.long)
    rank = {s: torch.empty(n, L, f, dtype=torch.int32) for s in sources}
    scale = torch.empty(L)
    for li in tqdm(range(L), desc="distillation targets", disable=not progress, leave=False):
        fused = fused_ffn(mlps[li])
        dev, dt = fused.w_down_t.device, fused.w_down_t.dtype
        xl = coll.X[:, li].index_select(0, rows).gather(1, tok.unsqueeze(-1).expand(n, T, d))  # [n, B, d] -> [n, T, d]
        Xs[:, li] = xl.float()
        layer_err = {s: torch.empty(n, P, T, d) for s in sources}
        for ids in chunks:
            lv = torch.arange(J) if P == J else torch.randperm(J, generator=g)[:P].sort().values  # [P] grid levels
            level[ids, li] = lv
            x = xl[ids].to(device=dev, dtype=dt)  # [c, T, d]
            c = x.shape[0]
            h = dense_activations(x.reshape(c * T, d), fused).view(c, T, f)  # [c*T, f] -> [c, T, f]
            for s, sc in sources.items():
                order, rk = _ranks(sc[rows[ids], li].to(dev))  # [c, f]
                rank[s][ids, li] = rk.cpu().to(torch.int32)
                layer_err[s][ids] = dropped_errors(h, fused.w_down_t, order, [ks[li][j] for j in lv.tolist()]).cpu()
        ms = torch.stack([e.pow(2).mean() for e in layer_err.values()]).mean()
        scale[li] = ms.sqrt().clamp_min(1e-12)
        for s in sources:
            scaled = layer_err[s] / scale[li]  # [n, P, T, d]
            energy[s][:, li] = scaled.pow(2).sum((-1, -2))
            err[s][:, li] = scaled.to(torch.float16)
    return DistillData(Xs, err, energy, level, rank, scale, grid, ks, coll.sample[rows].clone(),
                       coll.position[rows].clone(), list(coll.layers))


# ------------------------------------------------------------------------------ training
@dataclasses.dataclass
class CompensatorConfig(StrictConfig):
    """Compensator training settings (see the module docstring).

    phases:    mask sources in training order (paper: oracle warm start, then predictor).
    warm_epochs: epoch cap of every phase but the last (the warm start; None: max_epochs).
    max_epochs / patience / min_delta: per phase. Each layer keeps its best validation epoch; a
               phase stops when the layer mean of the best validation relative MSEs has not
               improved by `min_delta` for `patience` epochs.
    """

    variant: str = "plain"
    rank: int | None = None  # None: d // 8 (paper)
    shrink: bool = True  # scale each layer's correction by its least-squares gain on the validation blocks, in [0, 1]
    act: str = "silu"
    bias: bool = False
    phases: tuple[str, ...] = SOURCES
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_blocks: int = 4
    max_epochs: int = 8
    warm_epochs: int | None = None
    patience: int = 2
    min_delta: float = 1e-3
    val_frac: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown compensator variant {self.variant!r}; choose one of {VARIANTS}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r}; choose one of {tuple(ACTIVATIONS)}")
        self.phases = tuple(self.phases)
        if not self.phases:
            raise ValueError("phases is empty")
        if self.batch_blocks < 1 or self.max_epochs < 0 or self.patience < 1:
            raise ValueError("batch_blocks and patience must be >= 1 and max_epochs >= 0")


@dataclasses.dataclass
class TrainResult:
    """A trained compensator and its training record."""

    compensator: ErrorCompensator
    history: list[dict[str, Any]]  # one entry per epoch (epoch 0 of a phase: its starting point)
    best_epoch: dict[str, list[int]]  # phase source -> per-layer best epoch
    seconds: float


def _input_scale(X: Tensor, batch: int = 32) -> Tensor:
    """Per-layer, per-dim RMS of the tokens' FFN input: X [n, L, T, d] -> [L, d]."""
    acc = torch.zeros(X.shape[1], X.shape[-1])
    for i in range(0, X.shape[0], batch):
        acc += X[i : i + batch].float().pow(2).mean(2).sum(0)
    return (acc / X.shape[0]).sqrt().clamp_min(1e-6)


class _Trainer:
    """Training state: raw (preconditioned) parameters, per-layer best copies, history."""

    def __init__(self, comp: ErrorCompensator, data: DistillData, cfg: CompensatorConfig, sx: Tensor) -> None:
        self.comp, self.data, self.cfg, self.sx = comp, data, cfg, sx
        raw = {k: v.detach().clone() for k, v in comp.named_parameters()}
        raw["w1"] = raw["w1"] * sx.unsqueeze(-1)  # V = W1 * sx: the weights seen by standardised inputs
        raw["w2"] = raw["w2"] / data.scale.view(-1, 1, 1)  # the read-out in units of the per-layer error scale
        if "b2" in raw:
            raw["b2"] = raw["b2"] / data.scale.unsqueeze(-1)
        self.raw = {k: v.requires_grad_(True) for k, v in raw.items()}
        self.best = {k: v.detach().clone() for k, v in self.raw.items()}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.history: list[dict[str, Any]] = []
        self.best_epoch: dict[str, list[int]] = {}
        self.t0 = time.time()

    def predict(self, p: dict[str, Tensor], x: Tensor, drop: Tensor | None) -> Tensor:
        """Scaled corrections [L, b, T, d] of inputs x [L, b, T, d] with drop masks [L, b, f] (masked variant)."""
        w1 = p["w1"] / self.sx.unsqueeze(-1)  # acts on raw X like V on standardised X
        shift = gain = None
        if "shift" in p:
            shift, gain = dropped_sum(drop, p["shift"]), dropped_sum(drop, p["gain"])  # [L, b, r]
        return grouped_correction(x, w1, p["w2"], self.comp.act, p.get("b1"), p.get("b2"), shift, gain)

    def batch(self, rows: Tensor, src: str, slots: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Inputs, scaled targets ([L, b, T, d] each) and drop masks [L, b, f] of blocks `rows` at slots [b, L]."""
        data = self.data
        b, L = slots.shape
        x = data.X.index_select(0, rows).transpose(0, 1)  # [b, L, T, d] -> [L, b, T, d]
        e = data.err[src][rows.unsqueeze(1).expand(b, L), torch.arange(L).expand(b, L), slots]  # [b, L, T, d]
        drop = data.drop_mask(src, rows, slots).transpose(0, 1) if "shift" in self.raw else None  # [L, b, f]
        return x, e.float().transpose(0, 1), drop

    def val_set(self, rows: Tensor, src: str) -> dict[str, Any]:
        """The validation blocks, each layer at a fixed stored density (cycling), loaded once per phase."""
        L, P = self.data.X.shape[1], self.data.level.shape[-1]
        slots = (torch.arange(len(rows)).unsqueeze(1) + torch.arange(L)) % P  # [n_val, L]
        parts = [self.batch(rows[a : a + 64], src, slots[a : a + 64]) for a in range(0, len(rows), 64)]
        den = self.data.energy[src][rows.unsqueeze(1), torch.arange(L), slots].sum(0)  # [L]
        return {"parts": parts, "den": den.clamp_min(1e-30)}

    @torch.no_grad()
    def validate(self, p: dict[str, Tensor], val: dict[str, Any]) -> Tensor:
        """Relative MSE per layer [L] on the validation set."""
        num = sum((e - self.predict(p, x, drop)).pow(2).sum((1, 2, 3)) for x, e, drop in val["parts"])
        return num / val["den"]

    def run(self, tr: Tensor, va: Tensor, src: str, epochs: int, progress: bool) -> None:
        """One phase on mask source `src`, keeping each layer's best validation epoch; stops when the
        layer mean of the best validation losses has not improved by `min_delta` for `patience` epochs."""
        cfg, (L, P) = self.cfg, self.data.level.shape[1:]
        opt = torch.optim.Adam(list(self.raw.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        den = self.data.energy[src][tr].mean((0, 2)) / self.data.X.shape[2]  # [L] mean ||e||^2 per token
        val = self.val_set(va, src)
        best_loss = self.validate(self.raw, val)
        self.best = {k: v.detach().clone() for k, v in self.raw.items()}
        best_epoch = [0] * L
        self._log(src, 0, None, best_loss)
        stale = 0
        for epoch in tqdm(range(1, epochs + 1), desc=f"compensator/{src}", disable=not progress, leave=False):
            tot = torch.zeros(L)
            perm = tr[torch.randperm(len(tr), generator=self.gen)]
            for a in range(0, len(perm), cfg.batch_blocks):
                rows = perm[a : a + cfg.batch_blocks]
                x, e, drop = self.batch(rows, src, torch.randint(P, (len(rows), L), generator=self.gen))
                loss = (e - self.predict(self.raw, x, drop)).pow(2).sum(-1).mean((1, 2)) / den  # [L] relative MSE
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                tot += loss.detach() * len(rows)
            loss_v = self.validate(self.raw, val)
            improved = loss_v < best_loss  # [L]
            for k, v in self.raw.items():
                self.best[k][improved] = v.detach()[improved]
            gain = float(best_loss.mean() - torch.where(improved, loss_v, best_loss).mean())
            best_loss = torch.where(improved, loss_v, best_loss)
            for layer in improved.nonzero().flatten().tolist():
                best_epoch[layer] = epoch
            self._log(src, epoch, tot / len(tr), loss_v)
            stale = 0 if gain > cfg.min_delta else stale + 1
            if stale >= cfg.patience:
                break
        with torch.no_grad():  # the next phase (and the result) start from every layer's best parameters
            for k, v in self.raw.items():
                v.copy_(self.best[k])
        self.best_epoch[src] = best_epoch

    def _log(self, src: str, epoch: int, train: Tensor | None, val: Tensor) -> None:
        self.history.append({
            "step": len(self.history), "phase": src, "epoch": epoch,
            "train_loss": None if train is None else float(train.mean()), "val_loss": float(val.mean()),
            "train_loss_per_layer": None if train is None else train.tolist(), "val_loss_per_layer": val.tolist(),
            "seconds": round(time.time() - self.t0, 2),
        })

    def finish(self) -> dict[str, Tensor]:
        """The best parameters in the saved architecture's units (scalings folded in)."""
        out = {k: v.detach().clone() for k, v in self.best.items()}
        out["w1"] = out["w1"] / self.sx.unsqueeze(-1)
        out["w2"] = out["w2"] * self.data.scale.view(-1, 1, 1)
        if "b2" in out:
            out["b2"] = out["b2"] * self.data.scale.unsqueeze(-1)
        return out


def train_compensator(
    data: DistillData, cfg: CompensatorConfig = CompensatorConfig(), init: ErrorCompensator | None = None,
    meta: dict[str, Any] | None = None, progress: bool = True,
) -> TrainResult:
    """Train all layers' compensators at once by layer-wise distillation (phases of `cfg.phases`, early stopping).

    `init` warm-starts from a trained compensator (e.g. the masked variant from the plain one:
    its extra parameters start at zero, so training starts exactly at the plain compensator).
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    missing = [s for s in cfg.phases if s not in data.err]
    if missing:
        raise ValueError(f"phase source(s) {missing} are not in the data (it has {sorted(data.err)})")
    n, L, T, d = data.X.shape
    f = data.f
    comp = ErrorCompensator(L, d, f, cfg.rank, cfg.variant, cfg.act, cfg.bias)
    if init is not None:
        if (init.L, init.d, init.f, init.r, init.act, init.bias) != (L, d, f, comp.r, cfg.act, cfg.bias):
            raise ValueError(f"init {init!r} does not match the configuration {cfg}")
        with torch.no_grad():
            for k, p in init.named_parameters():
                getattr(comp, k).copy_(p.detach().cpu())
    tr, va = split_train_val(data, cfg.val_frac, cfg.seed)  # the same samples notebook 03's predictor held out
    if not len(va):  # too few samples: stop on the training blocks
        va = tr
    trainer = _Trainer(comp, data, cfg, _input_scale(data.X[tr]))
    for i, src in enumerate(cfg.phases):
        last = i == len(cfg.phases) - 1
        trainer.run(tr, va, src, cfg.max_epochs if last or cfg.warm_epochs is None else cfg.warm_epochs, progress)
    with torch.no_grad():
        for k, v in trainer.finish().items():
            getattr(comp, k).copy_(v)
    hist = trainer.history
    comp.meta = {
        **(meta or {}), "variant": cfg.variant, "L": L, "d": d, "f": f, "r": comp.r, "act": cfg.act, "bias": cfg.bias,
        "training": {
            **cfg.to_dict(), "densities": _grid_json(data.densities), "levels_per_block": int(data.level.shape[-1]),
            "tokens_per_block": T, "train_blocks": int(len(tr)), "val_blocks": int(len(va)),
            "train_tokens": int(len(tr)) * T, "init": None if init is None else init.name,
            "epochs_per_phase": {s: sum(1 for h in hist if h["phase"] == s and h["epoch"] > 0) for s in cfg.phases},
            "best_epoch_per_layer": trainer.best_epoch,
            "best_val_loss": {s: min(h["val_loss"] for h in hist if h["phase"] == s) for s in cfg.phases},
            "seconds": round(time.time() - t0, 1),
        },
    }
    comp.requires_grad_(False)
    gains = shrink_to_validation(comp, data, va, cfg.phases[-1]) if cfg.shrink else None
    comp.meta["training"]["shrink_gains"] = None if gains is None else [round(g, 4) for g in gains.tolist()]
    return TrainResult(comp.eval(), hist, trainer.best_epoch, time.time() - t0)


@torch.no_grad()
def shrink_to_validation(comp: ErrorCompensator, data: DistillData, rows: Tensor, source: str = "predictor",
                         batch: int = 32) -> Tensor:
    """Scale every layer's correction by alpha_l = clip(<c, e> / <c, c>, 0, 1) on validation blocks (folded into W2).

    alpha is the least-squares optimal gain of the correction on held-out blocks at the stored densities:
    a layer whose correction points away from the error gets alpha = 0 (switched off), one that overshoots
    is shrunk, so the held-out error with the compensator is never above the error without it (per layer,
    on that data). Returns alpha [L].
    """
    L, P = data.X.shape[1], data.level.shape[-1]
    ce, cc = torch.zeros(L), torch.zeros(L)
    for a in range(0, len(rows), batch):
        r = rows[a : a + batch]
        for p in range(P):
            slots = torch.full((len(r), L), p, dtype=torch.long)
            e = data.err[source][r.unsqueeze(1).expand(-1, L), torch.arange(L).expand(len(r), L), slots].float()
            e = e * data.scale.view(1, L, 1, 1)  # [b, L, T, d] back to FFN-output units
            drop = data.drop_mask(source, r, slots) if comp.variant == "masked" else None
            c = comp.correction(data.X[r], drop).float()  # [b, L, T, d]
            ce += (c * e).sum((0, 2, 3))
            cc += c.pow(2).sum((0, 2, 3))
    alpha = (ce / cc.clamp_min(1e-30)).clamp(0.0, 1.0)
    comp.w2.mul_(alpha.view(L, 1, 1).to(comp.w2))
    if comp.b2 is not None:
        comp.b2.mul_(alpha.view(L, 1).to(comp.b2))
    return alpha


# ------------------------------------------------------------------------------ held-out metrics
def _acc(store: dict, key: tuple, value: Tensor) -> None:
    store[key] = store.get(key, 0.0) + float(value)


@torch.no_grad()
def heldout_metrics(
    model: nn.Module, coll: Collection, sources: Mapping[str, Tensor], compensators: Mapping[str, ErrorCompensator],
    densities: Sequence[float] = EVAL_DENSITIES, skip_first: bool = True, chunk: int = 8, progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-layer FFN-output error on held-out blocks without and with each compensator.

    For every mask source, density and layer, over all tokens of the held-out blocks (first blocks
    skipped when `skip_first`: they run dense), with `e = y_dense - y_sparse` and correction `c`:

    * rel_err     = ||e - c||_F / ||y_dense||_F   (compensator 'none': c = 0)
    * reduction   = 1 - rel_err / rel_err(none)
    * corr_to_err = ||c||_F / ||e||_F             (the paper's observation: small corrections)
    * cos         = <c, e> / (||c||_F ||e||_F)     (alignment of the correction with the error)

    Rows {source, density, k, layer, compensator, rel_err, reduction, corr_to_err, cos}; layer -1
    is the mean over layers.
    """
    if coll.X is None:
        raise ValueError("the collection was loaded without X")
    densities = tuple(sorted(float(r) for r in densities))
    rows_ = (coll.position > 0).nonzero().squeeze(1) if skip_first else torch.arange(coll.n_blocks)
    n, (_, L, B, d) = len(rows_), coll.X.shape
    mlps = [gated_mlps(model)[layer] for layer in coll.layers]
    f = fused_ffn(mlps[0]).f
    ks = tuple(experts_for(r, f) for r in densities)
    y2: dict[tuple, float] = {}
    sums: dict[tuple, float] = {}
    for li in tqdm(range(L), desc="held-out metrics", disable=not progress, leave=False):
        fused = fused_ffn(mlps[li])
        dev, dt = fused.w_down_t.device, fused.w_down_t.dtype
        for a in range(0, n, chunk):
            r = rows_[a : a + chunk]
            x = coll.X[r, li].to(device=dev, dtype=dt)  # [c, B, d]
            c = x.shape[0]
            h = dense_activations(x.reshape(c * B, d), fused).view(c, B, f)  # [c*B, f] -> [c, B, f]
            y = h @ fused.w_down_t + (0 if fused.b_down is None else fused.b_down)  # [c, B, d]
            _acc(y2, (li,), y.float().pow(2).sum())
            plain = {m: cp.layer_correction(li, x).float() for m, cp in compensators.items() if cp.variant == "plain"}
            for s, sc in sources.items():
                order, rank = _ranks(sc[r, li].to(dev))  # [c, f]
                errs = dropped_errors(h, fused.w_down_t, order, ks)  # [c, J, B, d]
                for j in range(len(ks)):
                    e = errs[:, j]
                    _acc(sums, (s, j, li, "none", "r2"), e.pow(2).sum())
                    drop = (rank >= ks[j]).float()  # [c, f]
                    for m, cp in compensators.items():
                        corr = plain[m] if m in plain else cp.layer_correction(li, x, drop).float()
                        corr = corr.to(e.device)
                        _acc(sums, (s, j, li, m, "r2"), (e - corr).pow(2).sum())
                        _acc(sums, (s, j, li, m, "c2"), corr.pow(2).sum())
                        _acc(sums, (s, j, li, m, "ce"), (corr * e).sum())
    out: list[dict[str, Any]] = []
    for s in sources:
        for j, dens in enumerate(densities):
            per: dict[str, list[dict[str, Any]]] = {}
            for li, layer in enumerate(coll.layers):
                e2 = sums[(s, j, li, "none", "r2")]
                base = math.sqrt(e2 / max(y2[(li,)], 1e-30))
                for m in ("none", *compensators):
                    rel = math.sqrt(sums[(s, j, li, m, "r2")] / max(y2[(li,)], 1e-30))
                    c2 = 0.0 if m == "none" else sums[(s, j, li, m, "c2")]
                    cos = None if m == "none" or c2 <= 0 else sums[(s, j, li, m, "ce")] / math.sqrt(c2 * max(e2, 1e-30))
                    per.setdefault(m, []).append({
                        "source": s, "density": dens, "k": ks[j], "layer": layer, "compensator": m, "rel_err": rel,
                        "reduction": 1.0 - rel / base if base > 0 else 0.0,
                        "corr_to_err": math.sqrt(c2 / max(e2, 1e-30)), "cos": cos,
                    })
            for m, rows in per.items():
                out += rows
                mean = {k: (None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) / len(rows))
                        for k in ("rel_err", "reduction", "corr_to_err", "cos")}
                out.append({"source": s, "density": dens, "k": ks[j], "layer": -1, "compensator": m, **mean})
    return out


def mean_rows(rows: Sequence[dict[str, Any]], model_key: str, digits: int = 4) -> list[dict[str, Any]]:
    """The layer-averaged rows of `heldout_metrics`, tagged with the model (the comparison table)."""
    rnd = (lambda v: None if v is None else round(v, digits))
    return [{"model": model_key, "source": r["source"], "density": r["density"], "compensator": r["compensator"],
             "rel_err": rnd(r["rel_err"]), "reduction": rnd(r["reduction"]), "corr_to_err": rnd(r["corr_to_err"]),
             "cos": rnd(r["cos"])} for r in rows if r["layer"] == -1]


# ------------------------------------------------------------------------------ cost
def compensator_cost(d: int, f: int, density: float, variant: str = "plain", r: int | None = None,
                     block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """One layer's compensator per sparse block: FLOPs, parameters read, and shares of the block's FFN FLOPs.

    plain: `4 N d r` (ffcore.flops.compensator_flops); masked adds `2 |D| r` (two embedding sums
    over the dropped neurons) + `2 N r` (shift and gain per token).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown compensator variant {variant!r}; choose one of {VARIANTS}")
    r = compensator_rank(d) if r is None else int(r)
    spec = ModelSpec("probe", d=d, f=f, L=1, heads=1, kv_heads=1, head_dim=d, vocab=1)
    plain = compensator_flops(spec, block_size) if r == compensator_rank(d) else 4 * block_size * d * r
    k = experts_for(density, f)
    masked = variant == "masked"
    extra = 2 * (f - k) * r + 2 * block_size * r if masked else 0
    ffn_sparse, ffn_dense = 6 * block_size * d * k, 6 * block_size * d * f
    return {
        "variant": variant, "density": density, "r": r, "block_size": block_size, "flops": plain + extra,
        "extra_flops_vs_plain": extra, "extra_pct_vs_plain": 100 * extra / plain,
        "share_of_sparse_ffn_pct": 100 * (plain + extra) / ffn_sparse,
        "share_of_dense_ffn_pct": 100 * (plain + extra) / ffn_dense,
        "params": 2 * d * r + (2 * f * r if masked else 0),
        "params_read": 2 * d * r + (2 * (f - k) * r if masked else 0),
        "ffn_weights_read": 3 * d * k,
    }
