"""Attention-sink calibration (paper section 3.4, Figs. 4-5): attention mass received per key block.

For every layer `i`, head `h` and calibration sample `X`, the attention matrix `A` (`[T, T]`,
causal, each row sums to 1) is reduced to its column sums (the mass each key receives, summed
over all queries) and those to 128-token key blocks. Block 1 holds the attention sinks. The
paper's layer importance is

    s_i = mean over samples and heads of  sum_{k not in block 1} sum_t A_tk
        = T - (mass received by block 1)            (every row sums to 1).

The attention weights are recomputed from the model's OWN queries and keys: a forward pre-hook
on each layer's `self_attn` captures its input `hidden_states` and the rotary `(cos, sin)` that
transformers passes in, and we apply that layer's `q_proj`/`k_proj`, `q_norm`/`k_norm` (Qwen3,
Gemma3), the model's own `apply_rotary_pos_emb`, GQA sharing, the module's `scaling`, logit
soft-capping where the architecture applies it, the causal mask and the sliding window
(transformers' convention: a query at `t` sees keys `t-W+1 .. t`, i.e. `W` keys). Queries are
processed in chunks, so memory is `O(chunk x T)` and a `T x T` matrix is never built; the
statistics of a layer are reduced inside its hook, so no layer's hidden states are kept.
`tests/test_calibration.py` checks all of this against transformers' eager attention weights.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ffcore.data import token_samples
from ffcore.engine.layout import BLOCK_SIZE
from ffcore.models import decoder_layers, model_fingerprint



IMPORTANCES = ("window", "literal")


def sink_visible_queries(T: int, block_size: int, window: int | None) -> int:
    """How many of a T-token prompt's queries can attend to any key of the first block.

    A query at t sees keys max(0, t - W + 1) .. t (transformers' convention), so it reaches the first
    block's last key (B - 1) iff t <= W + B - 2: min(T, W + B - 1) queries; every query without a window.
    """
    return T if window is None else min(T, window + block_size - 1)


# ---------------------------------------------------------------------------- checks
def check_seq_len(seq_len: int, block_size: int = BLOCK_SIZE) -> None:
    """Raise a clear error when a sample is too short to have a sink block and a non-sink block."""
    if seq_len < 2 * block_size:
        raise ValueError(
            f"calibration samples of {seq_len} tokens are shorter than two {block_size}-token blocks; "
            f"s_i needs the first (sink) block and at least one other block: use seq_len >= {2 * block_size}"
        )


# ---------------------------------------------------------------------------- the chunked kernel
def received_attention(
    q: torch.Tensor, k: torch.Tensor, scaling: float, *, sliding_window: int | None = None,
    softcap: float | None = None, chunk_size: int = 128,
) -> torch.Tensor:
    """Causal attention mass each key receives, summed over queries: `[B, H, T]` (float64).

    `q` is `[B, H, T, hd]` and `k` is `[B, KV, T, hd]` (after norms and RoPE); head `h` uses
    kv head `h // (H // KV)` as in transformers' `repeat_kv`. A query at `t` sees keys
    `max(0, t-W+1) .. t` with a sliding window `W`, else `0 .. t`. Only the keys a query chunk can
    see are scored, so the work is about half of `T x T` (much less with a window).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, H, T, hd = q.shape
    KV = k.shape[1]
    if H % KV or k.shape[0] != B or k.shape[2] != T or k.shape[3] != hd:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    G = H // KV
    qg = (q * scaling).reshape(B, KV, G, T, hd)  # [B, KV, G, T, hd]: G query heads share a kv head
    kt = k.transpose(-1, -2)  # [B, KV, hd, T]
    cols = torch.zeros(B, KV, G, T, dtype=torch.float64, device=q.device)  # [B, KV, G, T]
    pos = torch.arange(T, device=q.device)
    for t0 in range(0, T, chunk_size):
        t1 = min(T, t0 + chunk_size)
        c = t1 - t0
        lo = 0 if sliding_window is None else max(0, t0 - sliding_window + 1)
        qc = qg[:, :, :, t0:t1].reshape(B, KV, G * c, hd)  # [B, KV, G*c, hd]
        scores = torch.matmul(qc, kt[..., lo:t1]).view(B, KV, G, c, t1 - lo)  # [B, KV, G, c, t1-lo]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        # Only two column ranges can hold masked keys: the diagonal [t0, t1) (causality) and, with
        # a window, its left edge [lo, t1 - W); keys in between are visible to every query.
        edge = lo if sliding_window is None else max(lo, t1 - sliding_window)
        ranges = [(lo, t1)] if edge >= t0 else [(lo, edge), (t0, t1)]
        for a, b in ranges:
            if b <= a:
                continue
            qpos, kpos = pos[t0:t1, None], pos[None, a:b]  # [c, 1], [1, b-a]
            hidden = kpos > qpos
            if sliding_window is not None:
                hidden |= kpos <= qpos - sliding_window
            scores[..., a - lo:b - lo].masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, KV, G, c, t1-lo]
        cols[..., lo:t1] += probs.sum(dim=-2)  # summed over the chunk's queries (fp32, then fp64)
    return cols.reshape(B, H, T)  # [B, H, T]


def block_sums(columns: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Sum per-key values `[..., T]` over consecutive key blocks: `[..., ceil(T / block_size)]`.

    The last block is partial when `block_size` does not divide `T`.
    """
    T = columns.shape[-1]
    nb = math.ceil(T / block_size)
    pad = nb * block_size - T
    if pad:
        columns = torch.nn.functional.pad(columns, (0, pad))
    return columns.reshape(*columns.shape[:-1], nb, block_size).sum(-1)  # [..., nb]


# ---------------------------------------------------------------------------- per-architecture pieces
def _rope_fn(attn: nn.Module) -> Callable:
    """The `apply_rotary_pos_emb` of the attention module's own modeling file."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(attn).__name__}: its module has no apply_rotary_pos_emb")
    return fn


_SOFTCAP_USED: dict[type, bool] = {}


def attention_softcap(attn: nn.Module) -> float | None:
    """The logit soft-cap the architecture really applies (Gemma 2 does; Gemma 3 in transformers does not).

    transformers' `Gemma3Attention` stores `attn_logit_softcapping` but never passes it to its
    attention function (Gemma 3 replaced soft-capping by QK-norm), so we apply it only when the
    module's forward passes `softcap=` on; for gemma3-270m the value is None anyway.
    """
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        return None
    cls = type(attn)
    if cls not in _SOFTCAP_USED:
        try:
            _SOFTCAP_USED[cls] = "softcap=" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _SOFTCAP_USED[cls] = True
    return float(cap) if _SOFTCAP_USED[cls] else None


def attention_window(attn: nn.Module, layer_idx: int) -> int | None:
    """The sliding window of one layer's attention (None for full attention)."""
    if hasattr(attn, "sliding_window"):  # Gemma3, Qwen2/3: already None on full-attention layers
        w = attn.sliding_window
    else:
        cfg = attn.config
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            w = cfg.sliding_window if types[layer_idx] == "sliding_attention" else None
        elif getattr(cfg, "model_type", "") in ("mistral", "mixtral"):
            w = getattr(cfg, "sliding_window", None)
        else:
            w = None
    return int(w) if w is not None else None


def queries_keys(
    attn: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's post-norm, post-RoPE queries `[B, H, T, hd]` and keys `[B, KV, T, hd]`."""
    B, T, _ = hidden_states.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden_states)  # [B, T, H*hd]
    k = attn.k_proj(hidden_states)  # [B, T, KV*hd]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    per_head_norm = q_norm is not None and getattr(q_norm, "weight", torch.empty(hd)).shape[-1] == hd
    if q_norm is not None and not per_head_norm:  # OLMo2-style norm over all heads
        q, k = q_norm(q), k_norm(k)
    q = q.view(B, T, -1, hd).transpose(1, 2)  # [B, H, T, hd]
    k = k.view(B, T, -1, hd).transpose(1, 2)  # [B, KV, T, hd]
    if per_head_norm:  # Qwen3 / Gemma3: RMSNorm over each head's dims
        q, k = q_norm(q), k_norm(k)
    cos, sin = position_embeddings
    return _rope_fn(attn)(q, k, cos, sin)


def layer_received_attention(
    attn: nn.Module, layer_idx: int, hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor], chunk_size: int = 128,
) -> torch.Tensor:
    """Mass each key receives in one layer, from that layer's input: `[B, H, T]` (float64)."""
    if not getattr(attn, "is_causal", True):
        raise ValueError(f"layer {layer_idx}: bidirectional attention is not supported by the calibration")
    q, k = queries_keys(attn, hidden_states, position_embeddings)
    return received_attention(
        q.float(), k.float(), float(attn.scaling), sliding_window=attention_window(attn, layer_idx),
        softcap=attention_softcap(attn), chunk_size=chunk_size,
    )


# ---------------------------------------------------------------------------- model-level capture
@torch.no_grad()
def attention_block_mass(
    model: nn.Module, input_ids: torch.Tensor, block_size: int = BLOCK_SIZE, chunk_size: int = 128,
    return_columns: bool = False,
) -> dict[str, torch.Tensor]:
    """One no-grad forward; per layer, the attention mass received per key block, summed over queries.

    Returns `{"block_mass": [B, L, H, nb]}` (float64) and, with `return_columns`, the per-key
    column sums `{"columns": [B, L, H, T]}`. Inputs are unpadded `[B, T]` token ids.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]  # [1, T]
    layers = decoder_layers(model)
    per_layer: list[torch.Tensor | None] = [None] * len(layers)
    cols: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is None:
                raise TypeError(f"layer {idx}: self_attn was called without position_embeddings")
            c = layer_received_attention(module, idx, hs, pe, chunk_size)
            per_layer[idx] = block_sums(c, block_size)  # [B, H, nb]
            if return_columns:
                cols[idx] = c
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        base = getattr(model, "base_model", model)  # skip the LM head: only layer inputs are needed
        base(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, m in enumerate(per_layer) if m is None]
    if missing:
        raise RuntimeError(f"the attention hooks of layers {missing} did not fire")
    out = {"block_mass": torch.stack(per_layer, dim=1).cpu()}  # [B, L, H, nb]
    if return_columns:
        out["columns"] = torch.stack(cols, dim=1).cpu()  # [B, L, H, T]
    return out


# ---------------------------------------------------------------------------- the calibration result
@dataclasses.dataclass
class CalibrationResult:
    """Per-block received attention of one model over the calibration samples, and its provenance."""

    model: str
    fingerprint: str
    seq_len: int
    block_size: int
    seed: int
    sources: tuple[str, ...]
    block_mass: torch.Tensor  # [n_samples, L, H, nb]: mass received per key block, summed over queries
    layer_windows: list[int | None]  # sliding window per layer (None = full attention)
    seconds: float = 0.0  # wall-clock time of the calibration
    cpu_seconds: float = 0.0  # CPU time of this process, all threads (less sensitive to other jobs)

    @property
    def n_samples(self) -> int:
        """Number of calibration samples."""
        return int(self.block_mass.shape[0])

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return int(self.block_mass.shape[1])

    def head_mean(self) -> torch.Tensor:
        """Received mass per block averaged over heads: `[n_samples, L, nb]`."""
        return self.block_mass.mean(dim=2)

    def scores(self, importance: str = "literal") -> list[float]:
        """Layer importance s_i: 'literal' (the paper's eq. 23) or 'window' (window-aware, see `sink_visible_queries`).

        literal: mass on non-first blocks, summed over queries, mean over heads and samples (= T - sink mass).
        window:  T times the mean non-sink share over the queries that can see the sink block at all,
                 T * (1 - sink mass / n_visible); equal to the literal s_i on full-attention layers.
        """
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
        if importance == "literal":
            return self.head_mean()[..., 1:].sum(-1).mean(0).tolist()
        sink = self.head_mean()[..., 0].mean(0)  # [L] mass received by block 1, summed over queries
        n_vis = torch.tensor([sink_visible_queries(self.seq_len, self.block_size, w) for w in self.layer_windows],
                             dtype=sink.dtype)
        return (self.seq_len * (1.0 - sink / n_vis)).tolist()

    def first_block_share(self) -> list[float]:
        """Share of all attention (every row sums to 1, so T per head) landing on block 1, per layer."""
        return (self.head_mean()[..., 0] / self.seq_len).mean(0).tolist()

    def mean_block_mass(self) -> list[float]:
        """Paper Fig. 5: mean received mass per non-first block, per layer (= s_i / (nb - 1))."""
        return self.head_mean()[..., 1:].mean(dim=(0, 2)).tolist()

    def block_values(self, layer: int) -> torch.Tensor:
        """Paper Fig. 4: head-averaged received mass of every non-first block of one layer, all samples."""
        return self.head_mean()[:, layer, 1:].reshape(-1)

    def row_sum_error(self) -> float:
        """Max |total received mass - T| over samples, layers and heads (rows sum to 1: a self-check)."""
        return float((self.block_mass.sum(-1) - self.seq_len).abs().max())

    def sample_scores(self) -> torch.Tensor:
        """s_i of each sample separately: `[n_samples, L]`."""
        return self.head_mean()[..., 1:].sum(-1)

    def overview(self) -> dict[str, Any]:
        """One-line overview: size, time, self-check, s_i range and its spread across samples."""
        per = self.sample_scores()  # [n, L]
        cv = (per.std(0) / per.mean(0)).mean().item() if self.n_samples > 1 else float("nan")
        s = self.scores()
        return {
            "layers": self.n_layers, "samples x tokens": f"{self.n_samples} x {self.seq_len}",
            "seconds": round(self.seconds, 1), "cpu seconds": round(self.cpu_seconds, 1),
            "max |row-sum check|": f"{self.row_sum_error():.1e}",
            "s_i range": f"{min(s):.0f} .. {max(s):.0f} (of {self.seq_len})",
            "s_i across samples (mean CV)": round(cv, 3),
            "first-block share range": f"{min(self.first_block_share()):.2f} .. {max(self.first_block_share()):.2f}",
        }

    def calibration_info(self) -> dict[str, Any]:
        """The provenance a schedule carries: model, fingerprint, samples, lengths, seed, s_i both ways and windows."""
        return {
            "model": self.model, "fingerprint": self.fingerprint, "n_samples": self.n_samples,
            "seq_len": self.seq_len, "block_size": self.block_size, "seed": self.seed,
            "sources": list(self.sources), "split": "calibration", "s_i": self.scores("literal"),
            "s_i_window": self.scores("window"), "layer_windows": list(self.layer_windows),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-friendly per-layer statistics plus the head-averaged per-block masses."""
        return {
            **self.calibration_info(),
            "n_layers": self.n_layers,
            "layer_windows": self.layer_windows,
            "first_block_share": self.first_block_share(),
            "mean_block_mass": self.mean_block_mass(),
            "row_sum_error": self.row_sum_error(),
            "seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            # [n_samples][L][nb], head-averaged; enough to redraw Figs. 4-5
            "block_mass_head_mean": self.head_mean().to(torch.float32).round(decimals=4).tolist(),
        }


def calibrate(
    model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int, *, block_size: int = BLOCK_SIZE,
    chunk_size: int = 128, sources: Sequence[str] = ("prose", "code"), seed: int = 0, progress: bool = True,
) -> CalibrationResult:
    """Run the calibration over `n_samples` x `seq_len` tokens of the calibration split."""
    check_seq_len(seq_len, block_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    ids = token_samples(tokenizer, "calibration", seq_len, n_samples, sources=tuple(sources), seed=seed)["input_ids"]
    name = getattr(model, "ffcore_name", type(model).__name__)
    t0, c0 = time.time(), time.process_time()
    masses = []
    for row in tqdm(ids, desc=f"calibrating {name}", unit="sample", disable=not progress):
        masses.append(attention_block_mass(model, row[None], block_size, chunk_size)["block_mass"][0])
    layers = decoder_layers(model)
    return CalibrationResult(
        model=name, fingerprint=model_fingerprint(model), seq_len=seq_len, block_size=block_size,
        seed=seed, sources=tuple(sources), block_mass=torch.stack(masses),  # [n, L, H, nb]
        layer_windows=[attention_window(layer.self_attn, i) for i, layer in enumerate(layers)],
        seconds=time.time() - t0, cpu_seconds=time.process_time() - c0,
    )


def summary_table(results: Mapping[str, CalibrationResult]) -> list[dict[str, Any]]:
    """Flat per-(model, layer) rows: layer type, s_i, mean per-block mass, first-block share."""
    rows = []
    for key, r in results.items():
        for i, (s, m, f) in enumerate(zip(r.scores(), r.mean_block_mass(), r.first_block_share())):
            w = r.layer_windows[i]
            rows.append({
                "model": key, "layer": i, "attention": "full" if w is None else f"sliding {w}",
                "s_i": round(s, 3), "mean_block_mass": round(m, 4), "first_block_share": round(f, 4),
            })
    return rows
