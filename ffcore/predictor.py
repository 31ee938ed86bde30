"""The expert-neuron predictor (paper section 3.2): labels, model, training, artifacts, policy, metrics.

Per layer `l` and block `X` ([N, d], the FFN input of the block's tokens):

    a = softmax(q X^T / sqrt(d)) X          q: [d]        (single-head attention pool, eq. 12)
    s = ReLU(a W1) W2                       W1: [d, r], W2: [r, f]   (eq. 13)

with `r` the power of two at or above d/16. The block's experts are the top-K of `s`. All
layers are stored and trained together (q [L, d], W1 [L, d, r], W2 [L, r, f]; einsum over L).

Choices the paper leaves open (documented, all parameters of `PredictorConfig`):

* **Biases**: none by default, as in eqs. (12)-(13) (`bias=False`); `bias=True` adds b1 [r]
  and b2 [f].
* **Labels**: the top `pos_frac` (50 %) of neurons by the block's oracle (GRIFFIN) score are
  positives, weighted 32/16/8/4/2 for successive fifths of the positives by rank; negatives
  weight 1 (DESIGN.md section 2.3 notes the paper's wording is ambiguous).
* **Loss normalisation**: eq. (19) sums over neurons; we divide each block's weighted sum by
  its total weight (a constant, 6.7 f for the default weights), so losses are comparable
  across models, and average over blocks. Layers are independent; their losses are summed.
* **Optimisation**: Adam; `q` starts at 0 (the pool starts as a plain mean). Training runs in
  a *preconditioned* parameterisation: `q = u / sx` and `W1 = V / sa` with fixed per-layer,
  per-dimension RMS scales `sx` (of the tokens' X) and `sa` (of the mean-pooled X) measured on
  the training blocks, because post-norm FFN inputs have outlier dimensions hundreds of times
  larger than the rest. The scales are folded back into q and W1 when training ends, so the
  saved predictor has exactly the paper's architecture and no extra inference cost.
* **Early stopping**: per layer, on the validation loss (a held-out 15 % of the training
  *samples*, so neighbouring blocks of one sample never straddle the split): each layer keeps
  the parameters of its best validation epoch; training stops when no layer has improved for
  `patience` epochs.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ffcore import flops
from ffcore.artifacts import read_artifact, save_artifact
from ffcore.collect import Collection
from ffcore.config import StrictConfig
from ffcore.engine.layout import BLOCK_SIZE, experts_for, predictor_rank
from ffcore.engine.policies import SelectContext, topk_sorted
from ffcore.models import model_fingerprint

ARTIFACT_STEM = "predictor"
DENSITIES = (0.5, 0.6, 0.7)


# ------------------------------------------------------------------------------ labels
@dataclasses.dataclass
class LabelConfig(StrictConfig):
    """How oracle scores become weighted binary labels (paper section 3.2, 'Training')."""

    pos_frac: float = 0.5
    pos_weights: tuple[float, ...] = (32.0, 16.0, 8.0, 4.0, 2.0)
    neg_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.pos_frac < 1.0:
            raise ValueError(f"pos_frac must be in (0, 1), got {self.pos_frac}")
        if not self.pos_weights:
            raise ValueError("pos_weights is empty")
        self.pos_weights = tuple(float(w) for w in self.pos_weights)


def make_labels(scores: Tensor, cfg: LabelConfig = LabelConfig()) -> tuple[Tensor, Tensor]:
    """Binary labels and BCE weights from oracle scores: [..., f] -> (y [..., f], w [..., f]) float32.

    The `round(pos_frac * f)` highest-scoring neurons are positives; positive of rank `k`
    (0 = best) falls in group `floor(k * G / n_pos)` of `G = len(pos_weights)` near-equal
    groups and gets that group's weight; negatives get `neg_weight`.
    """
    f = scores.shape[-1]
    n_pos = max(1, min(f - 1, round(cfg.pos_frac * f)))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [..., f] neuron ids by rank
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(f, device=scores.device).expand_as(order))  # rank of each neuron
    y = (rank < n_pos).float()
    G = len(cfg.pos_weights)
    group = (rank * G).div(n_pos, rounding_mode="floor").clamp_max(G - 1)
    table = torch.tensor(cfg.pos_weights, dtype=torch.float32, device=scores.device)
    w = torch.where(rank < n_pos, table[group], torch.full_like(y, cfg.neg_weight))
    return y, w


def weighted_bce(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Per-layer weighted BCE: logits/y/w [n, L, f] -> [L] (weight-normalised per block, mean over blocks)."""
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # [n, L, f]
    return ((w * per).sum(-1) / w.sum(-1)).mean(0)


# ------------------------------------------------------------------------------ the model
def attention_pool(X: Tensor, q: Tensor) -> Tensor:
    """a = softmax(q X^T / sqrt(d)) X per block and layer: X [n, L, N, d], q [L, d] -> a [n, L, d]."""
    n, d = X.shape[0], X.shape[-1]
    # both products keep X's row-major layout (q X^T and p X), the fast forms for CPU BLAS
    logits = q[None, :, None, :].expand(n, -1, -1, -1) @ X.transpose(-1, -2)  # [n, L, 1, N]
    return ((logits / math.sqrt(d)).softmax(dim=-1) @ X).squeeze(-2)  # [n, L, 1, d] -> [n, L, d]


def mlp_scores(a: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None = None, b2: Tensor | None = None) -> Tensor:
    """s = ReLU(a W1 + b1) W2 + b2 per layer: a [n, L, d] -> s [n, L, f]."""
    hid = torch.einsum("bld,ldr->blr", a, w1)  # [n, L, r]
    if b1 is not None:
        hid = hid + b1
    s = torch.einsum("blr,lrf->blf", hid.relu(), w2)  # [n, L, f]
    return s if b2 is None else s + b2


def pool_and_score(
    X: Tensor, q: Tensor, w1: Tensor, w2: Tensor, b1: Tensor | None = None, b2: Tensor | None = None,
) -> Tensor:
    """The predictor for all layers: X [n, L, N, d] (q [L, d], w1 [L, d, r], w2 [L, r, f]) -> s [n, L, f]."""
    return mlp_scores(attention_pool(X, q), w1, w2, b1, b2)


def first_block_prior(first_scores: Tensor, eps: float = 1e-6) -> Tensor:
    """The predictor's view of the prompt's own first block: centred log GRIFFIN scores, [..., f] -> [..., f]."""
    z = first_scores.float().clamp_min(eps).log()
    return z - z.mean(-1, keepdim=True)


def standardize(s: Tensor) -> Tensor:
    """Scores on a common scale, per row over the neurons: zero mean, unit standard deviation ([..., f])."""
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)


class ExpertPredictor(nn.Module):
    """Per-layer expert predictors, stacked over layers; also a `SelectionPolicy` (name 'predictor').

    Two ways (beyond the paper) to read the prompt's own first block, which runs dense anyway so its
    oracle (GRIFFIN) scores are free, `z = first_block_prior(first-block scores)`:

    * `prior=True`: a learned term, `s = ReLU(a W1) W2 + g * z (+ b2)`, `g` a per-neuron gain [L, f];
    * `blend=w`: a fixed, untrained blend of the two rankings, `standardize(z) + w * standardize(s)`
      (see `with_blend`). Trained in domain, the learned gain leans on the MLP; the blend keeps
      the first block's evidence at a fixed weight, which is what carries out of domain.
    """

    name = "predictor"

    def __init__(self, L: int, d: int, f: int, r: int | None = None, bias: bool = False, prior: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        r = predictor_rank(d) if r is None else r
        self.L, self.d, self.f, self.r = L, d, f, r
        self.q = nn.Parameter(torch.zeros(L, d))
        self.w1 = nn.Parameter(torch.randn(L, d, r) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(L, r, f) * math.sqrt(2.0 / r))
        self.b1 = nn.Parameter(torch.zeros(L, r)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(L, f)) if bias else None
        self.pg = nn.Parameter(torch.zeros(L, f)) if prior else None  # gain on the first block's log scores
        self.blend: float | None = None  # weight of the MLP's scores in a blend with the first block's (None: none)
        self.meta: dict[str, Any] = dict(meta or {})
        if prior:
            self.name = "predictor+first-block"

    @property
    def bias(self) -> bool:
        """Whether the predictor has biases."""
        return self.b1 is not None

    @property
    def prior(self) -> bool:
        """Whether the predictor reads the prompt's first-block scores."""
        return self.pg is not None

    @property
    def needs_first_block(self) -> bool:
        """The engine hands `SelectContext.first_scores` to policies that say so."""
        return self.prior or self.blend is not None

    def _blended(self, s: Tensor, z: Tensor | None) -> Tensor:
        """The blend of the MLP's scores with the first block's (unchanged without a blend)."""
        if self.blend is None:
            return s
        if z is None:
            raise ValueError("a blended predictor reads the first block's scores: pass them")
        return standardize(z.to(s)) + self.blend * standardize(s)

    def _prior(self, layers: slice | int, z: Tensor | None) -> Tensor | float:
        if self.pg is None:
            return 0.0
        if z is None:
            raise ValueError("this predictor reads the first block's scores (prior=True): pass them")
        return self.pg[layers] * z.to(self.pg)

    def forward(self, X: Tensor, Z: Tensor | None = None) -> Tensor:
        """Scores of every layer: X [n, L, N, d] (every token of each block), Z [n, L, f] (prior) -> s [n, L, f]."""
        p = self.q
        s = pool_and_score(X.to(p.dtype), self.q, self.w1, self.w2, self.b1, self.b2)
        return self._blended(s + self._prior(slice(None), Z), Z)

    def pooled_scores(self, A: Tensor, Z: Tensor | None = None) -> Tensor:
        """Scores from mean-pooled inputs A [n, L, d] (exact when q = 0, the default training), Z [n, L, f] -> [n, L, f]."""
        s = mlp_scores(A.to(self.q.dtype), self.w1, self.w2, self.b1, self.b2) + self._prior(slice(None), Z)
        return self._blended(s, Z)

    def layer_scores(self, layer: int, xb: Tensor, z: Tensor | None = None) -> Tensor:
        """Scores of one layer for equal-length spans: xb [nb, n, d], z [f] or [nb, f] -> s [nb, f]."""
        p = self.q
        xb = xb.to(device=p.device, dtype=p.dtype)
        att = (xb @ self.q[layer]) / math.sqrt(self.d)  # [nb, n]
        a = torch.einsum("bn,bnd->bd", att.softmax(dim=-1), xb)  # [nb, d]
        return self._span_mlp(layer, a, z)

    def _span_mlp(self, layer: int, a: Tensor, z: Tensor | None) -> Tensor:
        hid = a @ self.w1[layer]  # [nb, r]
        if self.b1 is not None:
            hid = hid + self.b1[layer]
        s = hid.relu() @ self.w2[layer]  # [nb, f]
        s = s if self.b2 is None else s + self.b2[layer]
        return self._blended(s + self._prior(layer, z), z)

    def span_scores(self, layer: int, x: Tensor, spans: Sequence[tuple[int, int]], z: Tensor | None = None) -> Tensor:
        """Scores of every span of x [T, d] at once (spans of any lengths, one pass): [n_spans, f]."""
        p = self.q
        lengths = torch.tensor([e - s for s, e in spans], device=x.device)
        rows = torch.cat([torch.arange(s, e, device=x.device) for s, e in spans])  # [N] token rows of the spans
        xr = x.index_select(0, rows).to(device=p.device, dtype=p.dtype)  # [N, d]
        span_id = torch.repeat_interleave(torch.arange(len(spans), device=p.device), lengths.to(p.device))  # [N]
        logit = (xr @ self.q[layer]) / math.sqrt(self.d)  # [N]
        top = logit.new_full((len(spans),), float("-inf")).scatter_reduce(0, span_id, logit, "amax")  # [n_spans]
        e = (logit - top[span_id]).exp()  # softmax within each span
        w = e / torch.zeros(len(spans), dtype=e.dtype, device=e.device).index_add_(0, span_id, e)[span_id]
        a = torch.zeros(len(spans), self.d, dtype=xr.dtype, device=xr.device).index_add_(0, span_id, w[:, None] * xr)
        return self._span_mlp(layer, a, z)  # a [n_spans, d] -> [n_spans, f]

    @torch.no_grad()
    def select(self, ctx: SelectContext) -> Tensor:
        """Top-K predicted experts of every sparse span of ctx.x (any span lengths, one batched pass): [n_spans, K]."""
        z = first_block_prior(ctx.first_scores) if self.needs_first_block else None
        s = self.span_scores(ctx.layer, ctx.x, ctx.spans, z)  # [n_spans, f]
        return topk_sorted(s, ctx.k).to(ctx.x.device)

    def __repr__(self) -> str:
        return (f"ExpertPredictor(L={self.L}, d={self.d}, f={self.f}, r={self.r}, bias={self.bias}, "
                f"prior={self.prior}, blend={self.blend})")


def with_blend(pred: ExpertPredictor, weight: float = 1.0) -> ExpertPredictor:
    """The same trained predictor (weights shared, not copied) blending its ranking with the first block's."""
    if weight < 0:
        raise ValueError(f"the blend weight must be >= 0, got {weight}")
    out = ExpertPredictor(pred.L, pred.d, pred.f, pred.r, bias=False, prior=False, meta=dict(pred.meta))
    for name, param in pred.named_parameters():
        setattr(out, name, param)  # the very same Parameter objects
    out.blend = float(weight)
    out.name = f"{pred.name}, blended with the first block (w={weight:g})"
    out.meta["blend"] = float(weight)
    return out.eval()


# ------------------------------------------------------------------------------ artifacts
def save_predictor(pred: ExpertPredictor, folder: Path, stem: str = ARTIFACT_STEM) -> Path:
    """Write `<stem>.safetensors` (all layers) and `<stem>.json` (metadata) into `folder`."""
    meta = {**pred.meta, "L": pred.L, "d": pred.d, "f": pred.f, "r": pred.r, "bias": pred.bias, "prior": pred.prior,
            "blend": pred.blend}
    return save_artifact(pred, folder, stem, meta)


def load_predictor(folder: Path, model: nn.Module | None = None, stem: str = ARTIFACT_STEM) -> ExpertPredictor:
    """Load a saved predictor; with `model`, refuse one trained for a different model (fingerprint/shape)."""
    meta, state = read_artifact(folder, stem, "predictor", "03", model)
    pred = ExpertPredictor(meta["L"], meta["d"], meta["f"], meta["r"], meta["bias"], meta.get("prior", False), meta=meta)
    pred.load_state_dict(state)
    return pred.eval() if meta.get("blend") is None else with_blend(pred.eval(), meta["blend"])


# ------------------------------------------------------------------------------ training
@dataclasses.dataclass
class PredictorConfig(StrictConfig):
    """Predictor training settings (see the module docstring for the choices).

    Training runs in two phases over the same objective: (1) `q` fixed at 0, i.e. the pool is the
    block mean, which the collection stores (`Collection.pooled`), so an epoch costs only the tiny
    MLP and up to `mean_pool_epochs` epochs are cheap; (2) everything jointly, `q` included, for up
    to `max_epochs` epochs: it needs every token's X (a collection with `tokens_per_block=None`) and
    is skipped otherwise (notebook 03 measured no gain from it). Both phases early-stop per layer on
    the validation loss with `patience`. `prior=True` adds the first-block prior term (beyond the
    paper; see `ExpertPredictor`).
    """

    rank: int | None = None  # None: the power of two at or above d/16
    bias: bool = False
    prior: bool = False
    lr: float = 1e-2
    lr_joint: float = 1e-3
    weight_decay: float = 0.0
    batch_blocks: int = 32
    mean_pool_epochs: int = 40
    max_epochs: int = 4
    patience: int = 4
    min_delta: float = 1e-4
    val_frac: float = 0.15
    precondition: bool = True
    seed: int = 0
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.labels, dict):
            self.labels = LabelConfig.from_dict(self.labels)


@dataclasses.dataclass
class TrainResult:
    """A trained predictor and its training record."""

    predictor: ExpertPredictor
    history: list[dict[str, Any]]  # one entry per epoch
    best_epoch: list[int]  # per layer
    seconds: float


def _rms(t: Tensor, token_dim: bool, batch: int = 64) -> Tensor:
    """Per-layer, per-dim RMS over blocks (and tokens): [n, L, (N,) d] -> [L, d]."""
    acc = torch.zeros(t.shape[1], t.shape[-1])
    for i in range(0, t.shape[0], batch):
        tb = t[i : i + batch].float()
        acc += (tb.pow(2).mean(2) if token_dim else tb.pow(2)).sum(0)
    return (acc / t.shape[0]).sqrt().clamp_min(1e-6)


def split_train_val(coll: Collection, val_frac: float, seed: int) -> tuple[Tensor, Tensor]:
    """Block rows of the training and validation parts, split by sample: (train_rows, val_rows)."""
    samples = coll.sample.unique()
    n_val = 0 if len(samples) < 2 or val_frac <= 0 else max(1, round(val_frac * len(samples)))
    perm = samples[torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))]
    val = torch.isin(coll.sample, perm[:n_val])
    return (~val).nonzero().squeeze(1), val.nonzero().squeeze(1)


def _effective(raw: dict[str, Tensor], sx: Tensor | None, sa: Tensor | None) -> dict[str, Tensor]:
    """The paper-architecture parameters from the preconditioned ones (q = u / sx, W1 = V / sa)."""
    out = dict(raw)
    if sa is not None:
        if sx is not None:
            out["q"] = raw["q"] / sx
        out["w1"] = raw["w1"] / sa.unsqueeze(-1)  # [L, d, r] / [L, d, 1]
    return out


def _scores(p: dict[str, Tensor], X: Tensor | None, A: Tensor | None, Z: Tensor | None) -> Tensor:
    """Predictor scores from X [n, L, N, d] (attention pool) or, in phase 1, mean-pooled A [n, L, d]; + prior."""
    a = attention_pool(X, p["q"]) if A is None else A
    s = mlp_scores(a, p["w1"], p["w2"], p.get("b1"), p.get("b2"))
    return s if "pg" not in p else s + p["pg"] * Z


@dataclasses.dataclass
class _Data:
    """One part (train or validation) of the training blocks."""

    A: Tensor  # [n, L, d] fp32 mean-pooled FFN inputs
    y: Tensor  # [n, L, f] bool labels
    w: Tensor  # [n, L, f] fp16 BCE weights
    X: Tensor | None = None  # [n, L, N, d] every token's FFN input (the attention-pool phase only)
    Z: Tensor | None = None  # [n, L, f] fp16 first-block prior (predictors with prior=True)
    scores: Tensor | None = None  # [n, L, f] oracle scores (validation: captured mass)

    def batch(self, sl: slice, phase1: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor]:
        """(X, A, Z, y, w) of a batch in float32 (X only outside phase 1, A only in it)."""
        Z = None if self.Z is None else self.Z[sl].float()
        return (None if phase1 else self.X[sl].float(), self.A[sl] if phase1 else None, Z, self.y[sl].float(),
                self.w[sl].float())


def _part(train: Collection, rows: Tensor, labels: LabelConfig, with_x: bool, prior: bool, val: bool) -> _Data:
    y, w = make_labels(train.scores[rows], labels)
    Z = first_block_prior(train.scores[train.first_rows()[rows]]).to(torch.float16) if prior else None
    X = train.X[rows] if with_x else None
    return _Data(train.mean_inputs()[rows], y.bool(), w.to(torch.float16), X, Z, train.scores[rows] if val else None)


@torch.no_grad()
def _validate(p: dict[str, Tensor], data: _Data, phase1: bool, batch: int, k: int) -> tuple[Tensor, Tensor]:
    """Mean per-layer loss [L] and captured mass at K [L] over a data part."""
    tot, mass, n = 0.0, 0.0, data.y.shape[0]
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        X, A, Z, y, w = data.batch(sl, phase1)
        s = _scores(p, X, A, Z)
        loss = weighted_bce(s, y, w)
        sc = data.scores[sl]
        m = sc.gather(-1, s.topk(k, dim=-1).indices).sum(-1) / sc.topk(k, dim=-1).values.sum(-1)  # [b, L]
        tot, mass = tot + loss * s.shape[0], mass + m.sum(0)
    return tot / n, mass / n


class _Trainer:
    """The training loop state shared by both phases (per-layer early stopping)."""

    def __init__(self, raw: dict[str, Tensor], L: int, cfg: PredictorConfig, sx: Tensor | None, sa: Tensor | None):
        self.raw, self.cfg, self.sx, self.sa = raw, cfg, sx, sa
        self.best = {k: v.detach().clone() for k, v in raw.items()}
        self.best_loss = torch.full((L,), float("inf"))
        self.best_epoch = [0] * L
        self.history: list[dict[str, Any]] = []
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.t0 = time.time()

    def run(self, tr: _Data, va: _Data, phase: int, epochs: int, lr: float, progress: bool) -> None:
        """Train up to `epochs` epochs of one phase (1: mean pool, q fixed; 2: joint)."""
        cfg, phase1 = self.cfg, phase == 1
        params = [v for k, v in self.raw.items() if not (phase1 and k == "q")]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        n, L, f = tr.y.shape
        k_half = max(1, round(0.5 * f))
        stale = 0
        for epoch in tqdm(range(1, epochs + 1), desc=f"predictor phase {phase}", disable=not progress, leave=False):
            tot = torch.zeros(L)
            starts = torch.randperm((n + cfg.batch_blocks - 1) // cfg.batch_blocks, generator=self.gen)
            for b in (starts * cfg.batch_blocks).tolist():
                sl = slice(b, b + cfg.batch_blocks)  # contiguous batches of pre-shuffled blocks
                X, A, Z, y, w = tr.batch(sl, phase1)
                s = _scores(_effective(self.raw, self.sx, self.sa), X, A, Z)
                loss = weighted_bce(s, y, w)  # [L]
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                tot += loss.detach() * s.shape[0]
            eff = {k: v.detach() for k, v in _effective(self.raw, self.sx, self.sa).items()}
            val_loss, val_mass = _validate(eff, va, phase1, 4 * cfg.batch_blocks, k_half)
            stale = 0 if self._keep_best(val_loss, len(self.history) + 1) else stale + 1
            self.history.append({
                "epoch": len(self.history) + 1, "phase": phase, "train_loss": float((tot / n).mean()),
                "val_loss": float(val_loss.mean()), "val_mass_at_0.5": float(val_mass.mean()),
                "train_loss_per_layer": (tot / n).tolist(), "val_loss_per_layer": val_loss.tolist(),
                "seconds": round(time.time() - self.t0, 2),
            })
            if stale >= cfg.patience:
                break
        with torch.no_grad():  # the next phase starts from every layer's best parameters
            for k, v in self.raw.items():
                v.copy_(self.best[k])

    def _keep_best(self, val_loss: Tensor, epoch: int) -> bool:
        improved = val_loss < self.best_loss - self.cfg.min_delta  # [L]
        for k, v in self.raw.items():
            self.best[k][improved] = v.detach()[improved]
        self.best_loss = torch.where(improved, val_loss, self.best_loss)
        for layer in improved.nonzero().flatten().tolist():
            self.best_epoch[layer] = epoch
        return bool(improved.any())


def train_predictor(
    train: Collection, cfg: PredictorConfig = PredictorConfig(), meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train all layers' predictors at once on a training collection (Adam, early stopping per layer).

    The attention-pool phase (`cfg.max_epochs`) runs only when the collection holds every token's X.
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    A_all = train.mean_inputs()  # [n, L, d]
    n, L, d = A_all.shape
    f = train.scores.shape[-1]
    N = train.manifest["key"]["block_size"]
    full_x = train.X is not None and train.X.shape[2] == N
    joint = cfg.max_epochs > 0 and full_x
    tr_rows, va_rows = split_train_val(train, cfg.val_frac, cfg.seed)
    tr_rows = tr_rows[torch.randperm(len(tr_rows), generator=torch.Generator().manual_seed(cfg.seed))]
    tr = _part(train, tr_rows, cfg.labels, joint, cfg.prior, val=False)
    va = _part(train, va_rows, cfg.labels, joint, cfg.prior, val=True) if len(va_rows) else \
        _part(train, tr_rows, cfg.labels, joint, cfg.prior, val=True)  # too few samples: stop on train loss
    pred = ExpertPredictor(L, d, f, cfg.rank, cfg.bias, cfg.prior)
    sa = _rms(tr.A, token_dim=False) if cfg.precondition else None
    sx = _rms(tr.X, token_dim=True) if cfg.precondition and joint else None
    raw = {k: p.detach().clone() for k, p in pred.named_parameters()}
    if sa is not None:  # V ~ N(0, 1/d) on unit-scale inputs; u = 0
        raw["w1"] = torch.randn(L, d, pred.r) / math.sqrt(d)
    raw = {k: v.requires_grad_(True) for k, v in raw.items()}
    trainer = _Trainer(raw, L, cfg, sx, sa)
    if cfg.mean_pool_epochs:
        trainer.run(tr, va, 1, cfg.mean_pool_epochs, cfg.lr, progress)
    if joint:
        trainer.run(tr, va, 2, cfg.max_epochs, cfg.lr_joint, progress)
    eff = _effective(trainer.best, sx, sa)  # fold the preconditioning into q and W1
    with torch.no_grad():
        for key, p in pred.named_parameters():
            p.copy_(eff[key])
    hist = trainer.history
    pred.meta = {
        **(meta or {}), "L": L, "d": d, "f": f, "r": pred.r, "bias": cfg.bias, "prior": cfg.prior, "block_size": N,
        "training": {
            **cfg.to_dict(), "train_blocks": int(len(tr_rows)), "val_blocks": int(len(va_rows)),
            "train_tokens": int(len(tr_rows)) * N, "epochs_run": len(hist), "attention_pool_phase": joint,
            "epochs_per_phase": [sum(h["phase"] == p for h in hist) for p in (1, 2)],
            "best_epoch_per_layer": trainer.best_epoch, "final_train_loss": hist[-1]["train_loss"] if hist else None,
            "best_val_loss": float(trainer.best_loss.mean()), "best_val_loss_per_layer": trainer.best_loss.tolist(),
            "seconds": round(time.time() - t0, 1),
        },
    }
    return TrainResult(pred.eval(), hist, trainer.best_epoch, time.time() - t0)


def predictor_meta(model: nn.Module, model_key: str, train: Collection) -> dict[str, Any]:
    """Provenance of a predictor: the model (key, fingerprint) and the training collection."""
    key = train.manifest["key"]
    return {"model": str(model_key), "fingerprint": model_fingerprint(model),
            "collection": {k: key[k] for k in ("split", "n_samples", "seq_len", "seed", "sources", "fingerprint")}}


# ------------------------------------------------------------------------------ metrics
@torch.no_grad()
def predict_scores(pred: ExpertPredictor, coll: Collection, batch: int = 64) -> Tensor:
    """Predicted scores of every block and layer of a collection: [n_blocks, L, f].

    A predictor whose attention query is zero pools by the mean (the collection's `pooled`, exact);
    one with a learned query needs every token's X.
    """
    Z = first_block_prior(coll.scores[coll.first_rows()]) if pred.needs_first_block else None  # [n, L, f]
    zb = (lambda i: None if Z is None else Z[i : i + batch])
    if not bool(pred.q.any()):
        A = coll.mean_inputs()
        return torch.cat([pred.pooled_scores(A[i : i + batch], zb(i)) for i in range(0, coll.n_blocks, batch)])
    if coll.X is None or coll.X.shape[2] != coll.manifest["key"]["block_size"]:
        raise ValueError("this predictor learned its attention pool: it needs a collection with every token's X")
    return torch.cat([pred(coll.X[i : i + batch].float(), zb(i)) for i in range(0, coll.n_blocks, batch)])


def _chosen_masks(coll: Collection, k: int, predicted: Mapping[str, Tensor], prior: Tensor | None,
                  seed: int) -> dict[str, Tensor]:
    """Selected-neuron masks [n, L, f] (bool) of every policy at K."""
    sc = coll.scores  # [n, L, f]
    n, L, f = sc.shape

    def mask(idx: Tensor) -> Tensor:
        return torch.zeros(n, L, f, dtype=torch.bool).scatter_(-1, idx, True)

    first_rows = coll.first_rows()  # [n] row of the same sample's block 0
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(n, L, f, generator=g).argsort(-1)[..., :k]  # [n, L, k] uniform random subsets
    out = {
        "oracle": mask(sc.topk(k, dim=-1).indices),
        "first_block_static": mask(sc[first_rows].topk(k, dim=-1).indices),
        "random": mask(rand),
    }
    if prior is not None:  # [L, f] mean training importance: a prompt-independent static choice
        out["global_static"] = mask(prior.topk(k, dim=-1).indices.expand(n, L, k))
    for name, scores in predicted.items():
        out[name] = mask(scores.topk(k, dim=-1).indices)
    return out


def selection_metrics(
    coll: Collection, predicted: Tensor | Mapping[str, Tensor] | None = None, prior: Tensor | None = None,
    densities: Sequence[float] = DENSITIES, seed: int = 0, skip_first: bool = True,
) -> list[dict[str, Any]]:
    """Per-layer recall of the oracle top-K and captured importance mass for each policy and density.

    `predicted` [n, L, f] are predictor scores for `coll`'s blocks; `prior` [L, f] (optional) a
    global importance prior. Blocks at position 0 (always dense in the engine) are skipped when
    `skip_first`. Rows: {policy, density, k, layer, recall, mass}; layer = -1 is the mean over layers.
    """
    keep = coll.position > 0 if skip_first else torch.ones(coll.n_blocks, dtype=torch.bool)
    rows: list[dict[str, Any]] = []
    f = coll.scores.shape[-1]
    for density in densities:
        k = experts_for(density, f)
        named = {} if predicted is None else {"predictor": predicted} if isinstance(predicted, Tensor) else predicted
        masks = _chosen_masks(coll, k, named, prior, seed)
        sc = coll.scores
        oracle_mass = (sc * masks["oracle"]).sum(-1)  # [n, L]
        for policy, m in masks.items():
            recall = (m & masks["oracle"]).sum(-1).float() / k  # [n, L]
            mass = (sc * m).sum(-1) / oracle_mass  # [n, L]
            rec_l, mass_l = recall[keep].mean(0), mass[keep].mean(0)  # [L]
            for li, layer in enumerate(coll.layers):
                rows.append({"policy": policy, "density": density, "k": k, "layer": layer,
                             "recall": float(rec_l[li]), "mass": float(mass_l[li])})
            rows.append({"policy": policy, "density": density, "k": k, "layer": -1,
                         "recall": float(rec_l.mean()), "mass": float(mass_l.mean())})
    return rows


def predictor_flop_share(d: int, f: int, r: int | None = None, block_size: int = BLOCK_SIZE) -> dict[str, float]:
    """Predictor FLOPs per block and layer (the FLOP model's count), and their share of that block's dense FFN FLOPs."""
    r = predictor_rank(d) if r is None else r
    pred = 4 * block_size * d + 2 * d * r + 2 * r * f  # pool (q X^T and the weighted sum) + MLP
    ffn = 6 * block_size * d * f  # gate, up and down projections
    if r == predictor_rank(d):  # the FLOP model counts the default width: both must agree
        spec = flops.ModelSpec("probe", d=d, f=f, L=1, heads=1, kv_heads=1, head_dim=d, vocab=1)
        assert flops.predictor_flops(spec, block_size) == pred
    return {"predictor_flops": pred, "ffn_flops": ffn, "share": pred / ffn, "r": r}
