"""SpecPrefill (Liu et al., arXiv 2502.02789): prefill only the prompt tokens a speculator finds important.

A *speculator* (any causal LM with the main model's vocabulary) prefills the prompt and greedily
generates a few look-ahead tokens. Each prompt token is scored by the attention that the last
prompt token and the look-ahead tokens pay to it: softmax over the prompt keys per layer and head
(the layer's own causal / sliding-window visibility applies), max over layers and heads, mean over
the query tokens; then optional 1-D average pooling (kernel 13) and a mean per chunk of 32 tokens.
The top `keep_rate` fraction of chunks is kept. The main model prefills ONLY the kept tokens, each
at its ORIGINAL position id, and decoding continues at the original prompt length.

How positions work in transformers 5.x (checked on 5.23, Llama / Qwen3 / Gemma 3):

* There is no `cache_position` any more. RoPE reads `position_ids`; the causal and sliding-window
  masks are built on *cache indices* (the query offset is the cache length). We therefore always
  pass `position_ids` explicitly (the default would be `cache length + arange`, i.e. the
  compressed positions), and we always pass a cache object: without one, transformers reads
  position ids with jumps as *packed sequences* and masks across the jumps. Where an older
  transformers' forward still takes `cache_position`, we pass the cache-slot indices there.
* Causal masking by cache index is exactly right for the kept tokens: they are cached in original
  order, so "earlier cache slot" means "earlier original position".
* Sliding windows (Gemma 3 local layers, Mistral) are NOT equivalent: a window of W cache slots
  spans up to W / keep_rate original positions, so a local layer would see relative RoPE distances
  it never saw in training. The default `window="positions"` defines every window on ORIGINAL
  positions (a kept query at position p sees kept keys at p - W < k <= p), i.e. each layer sees
  exactly the keys the dense model would see, minus the dropped ones. It keeps every key in a plain
  `DynamicCache` and passes explicit per-layer-type masks (a dict for models with `layer_types`).
  `window="cache"` keeps transformers' own behaviour (window on cache slots) for comparison.
  For models without sliding layers both modes are the same computation (and use the fast path).

The speculator's FLOPs count against the speedup (`specprefill_flops`); `layer_prefix_view`
builds the cheap self-speculator (the main model's first N layers, weights shared). Combined
with FastForward: `with sparsify(main, plan): speculative_prefill(main, spec, ids, 0.5)` runs the
block-sparse FFN on the kept tokens (the speculator always runs dense).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import enum
import inspect
import math
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffcore.config import StrictConfig
from ffcore.decoding import greedy_decode
from ffcore.engine import SparsityPlan
from ffcore.flops import ModelSpec, causal_pairs, plan_speedup, prefill_flops, spec_from_config
from ffcore.models import cache_from_kwargs, decoder_layers

WINDOW_MODES = ("positions", "cache")


class Method(str, enum.Enum):
    """Which prefill a configuration runs (the value is what records and tables store)."""

    DENSE = "dense"
    SPECPREFILL = "specprefill"
    FASTFORWARD = "fastforward"
    COMBINATION = "specprefill+fastforward"
    SPECPREFILL_CACHE_WINDOWS = "specprefill, windows on cache slots"
    SPECPREFILL_NO_LAST = "specprefill, last chunk not forced"
    COMBINATION_NO_LAST = "specprefill+fastforward, last chunk not forced"

    @property
    def drops_tokens(self) -> bool:
        """Whether the configuration prefills only SpecPrefill's kept tokens."""
        return self not in (Method.DENSE, Method.FASTFORWARD)

    @property
    def sparse_ffn(self) -> bool:
        """Whether FastForward's block-sparse FFN runs."""
        return self in (Method.FASTFORWARD, Method.COMBINATION, Method.COMBINATION_NO_LAST)


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class SpecPrefillConfig(StrictConfig):
    """Knobs of the SpecPrefill method (the keep rate is an argument of each call).

    lookahead:   greedy look-ahead tokens the speculator generates (their queries join the last
                 prompt token's); 0 = last prompt token only.
    chunk_size:  tokens per selection chunk (32); the prompt must hold at least one chunk.
    pool_kernel: odd kernel of the 1-D average pooling of token scores; 1 = no smoothing.
    keep_last:   always keep the last chunk (it holds the question). The final prompt token is
                 kept in any case: the next-token distribution is read at it.
    keep_first:  always keep the first chunk (attention sinks; max-over-heads scoring keeps it anyway).
    window:      where sliding windows are measured on the kept tokens: 'positions' (original
                 positions, default) or 'cache' (transformers' cache slots).
    """

    lookahead: int = 8
    chunk_size: int = 32
    pool_kernel: int = 13
    keep_last: bool = True
    keep_first: bool = False
    window: str = "positions"

    def __post_init__(self) -> None:
        if not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0, got {self.lookahead!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if not isinstance(self.pool_kernel, int) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be an odd int >= 1 (1 = no smoothing), got {self.pool_kernel!r}")
        if self.window not in WINDOW_MODES:
            raise ValueError(f"window must be one of {WINDOW_MODES}, got {self.window!r}")


def check_keep_rate(keep_rate: float) -> float:
    """Return keep_rate as a float, or raise if it is outside (0, 1]."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or math.isnan(keep_rate) \
            or not 0.0 < keep_rate <= 1.0:
        raise ValueError(
            f"keep_rate must lie in (0, 1] (the fraction of prompt chunks the main model prefills), got {keep_rate!r}"
        )
    return float(keep_rate)


# ----------------------------------------------------------------------------- compatibility
def _vocab_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.vocab_size)


def check_compatible(
    main_model: nn.Module, speculator: nn.Module, main_tokenizer: Any = None, speculator_tokenizer: Any = None,
) -> None:
    """Raise ValueError unless the speculator shares the main model's vocabulary (and tokenizer, if given)."""
    vm, vs = _vocab_size(main_model), _vocab_size(speculator)
    if vm != vs:
        raise ValueError(
            f"the speculator's vocabulary ({vs} tokens) differs from the main model's ({vm}); SpecPrefill "
            "scores the main model's prompt token ids with the speculator, so both must share one tokenizer"
        )
    if main_tokenizer is None or speculator_tokenizer is None or main_tokenizer is speculator_tokenizer:
        return
    a, b = main_tokenizer.get_vocab(), speculator_tokenizer.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(
            f"the speculator's tokenizer differs from the main model's ({len(a)} vs {len(b)} entries; e.g. "
            f"{diff}); SpecPrefill needs the same token ids in both models"
        )
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(main_tokenizer, attr, None) != getattr(speculator_tokenizer, attr, None):
            raise ValueError(f"the tokenizers disagree on {attr}; SpecPrefill needs one shared tokenizer")


def _check_prompt(input_ids: Tensor, chunk_size: int, vocab: int | None = None) -> int:
    """Validate a [1, T] prompt; return T."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a LongTensor of shape [1, T]")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"SpecPrefill runs one prompt at a time (batch {input_ids.shape[0]}): each prompt keeps different "
            "tokens, so a batch would be ragged; loop over the prompts"
        )
    T = input_ids.shape[1]
    if T < chunk_size:
        raise ValueError(
            f"the prompt has {T} tokens, fewer than one chunk ({chunk_size}); SpecPrefill selects whole chunks, "
            "so a prompt this short has nothing to drop: prefill it densely"
        )
    if vocab is not None and int(input_ids.max()) >= vocab:
        raise ValueError(f"token id {int(input_ids.max())} is outside the speculator's vocabulary ({vocab})")
    return T


# ----------------------------------------------------------------------------- first-N-layers view
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with its own child / hook tables that shares every parameter tensor."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            setattr(new, name, collections.OrderedDict())
    new.__dict__.pop("_ffcore_session", None)
    return new


def _layers_owner(model: nn.Module) -> nn.Module:
    """The submodule whose `layers` attribute is the decoder layer list (e.g. `model.model`)."""
    layers = decoder_layers(model)
    for m in model.modules():
        if m._modules.get("layers") is layers:
            return m
    raise TypeError(f"cannot find the module holding the decoder layers of {type(model).__name__}")


def layer_prefix_view(model: nn.Module, n_layers: int) -> nn.Module:
    """A causal LM that runs only the first `n_layers` decoder layers of `model`, then its final norm and lm head.

    No weight is copied: the view's modules are shallow copies that hold the main model's parameter
    tensors. Its decoder layers always use the original (dense) MLPs, also when the main model is
    inside `sparsify` (the speculator's FLOPs are counted dense).
    """
    layers = decoder_layers(model)
    if not isinstance(n_layers, int) or not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be an int in [1, {len(layers)}], got {n_layers!r}")
    owner = _layers_owner(model)
    cfg = copy.deepcopy(owner.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:n_layers]
    view_layers = []
    for layer in list(layers)[:n_layers]:
        new = _shallow(layer)
        if "mlp" in new._modules:
            new._modules["mlp"] = getattr(layer.mlp, "original", layer.mlp)  # see through an ffcore wrapper
        view_layers.append(new)
    new_owner = _shallow(owner)
    new_owner._modules["layers"] = nn.ModuleList(view_layers)
    new_owner.config = cfg
    if owner is model:
        view = new_owner
    else:  # rebuild the path from the top module down to the owner with shallow copies
        view = _shallow(model)
        view.config = cfg
        parent, path = view, _module_path(model, owner)
        for name in path[:-1]:
            child = _shallow(parent._modules[name])
            parent._modules[name] = child
            parent = child
        parent._modules[path[-1]] = new_owner
    view.ffcore_name = f"{getattr(model, 'ffcore_name', type(model).__name__)}[:{n_layers}]"
    return view.eval()


def _module_path(root: nn.Module, target: nn.Module) -> list[str]:
    for name, m in root.named_modules():
        if m is target:
            return name.split(".")
    raise ValueError("target is not a submodule of root")


@contextlib.contextmanager
def dense_mlps(model: nn.Module) -> Iterator[None]:
    """Temporarily run every layer's original MLP (undo ffcore's sparse wrappers) inside the context."""
    swapped = []
    for layer in decoder_layers(model):
        mlp = layer._modules.get("mlp")
        original = getattr(mlp, "original", None)
        if original is not None:
            layer._modules["mlp"] = original
            swapped.append((layer, mlp))
    try:
        yield
    finally:
        for layer, mlp in swapped:
            layer._modules["mlp"] = mlp


# ----------------------------------------------------------------------------- position-aware prefill
@dataclasses.dataclass
class PositionCache:
    """A KV cache plus the original position of every cached key.

    past_key_values: the transformers cache object.
    key_positions:   LongTensor [M], original position of each cached key, in cache order.
    next_position:   the position id of the next token fed (the ORIGINAL prompt length after a prefill).
    custom_masks:    masks are built here from `key_positions` (sliding windows on original positions).
    """

    past_key_values: Any
    key_positions: Tensor
    next_position: int
    custom_masks: bool

    @property
    def cached(self) -> int:
        """Number of cached tokens (kept prompt tokens plus any decoded ones)."""
        return int(self.key_positions.numel())


def _windows(model: nn.Module) -> list[int | None]:
    """Each layer's sliding window (None = full causal attention), as transformers applies it."""
    spec = spec_from_config(model.config)
    return [spec.window(i) for i in range(spec.L)]


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _accepts_cache_position(model: nn.Module) -> bool:
    """Older transformers (4.x) forwards take `cache_position`; 5.x removed it."""
    try:
        return "cache_position" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def position_masks(model: nn.Module, q_pos: Tensor, k_pos: Tensor) -> Any:
    """Attention masks on ORIGINAL positions: query p sees key k iff k <= p (and p - k < window on sliding layers).

    Returns what the model's forward takes as `attention_mask`: a dict by layer type for models
    with `layer_types` (Gemma 3, Qwen3), else one tensor. Each mask is [1, 1, n_q, n_k]: boolean
    (True = attend) for SDPA, additive float for eager and other implementations.
    """
    cfg = _text_config(model)
    dtype = next(model.parameters()).dtype
    rel = q_pos.view(-1, 1) - k_pos.view(1, -1)  # [n_q, n_k] relative distance p - k
    causal = rel >= 0
    window = getattr(cfg, "sliding_window", None)

    def fmt(allowed: Tensor) -> Tensor:
        allowed = allowed[None, None]  # [1, 1, n_q, n_k]
        if cfg._attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    sliding = causal & (rel < window) if window else causal
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return {t: fmt(sliding if "sliding" in t and window else causal) for t in set(layer_types)}
    return fmt(sliding if any(w is not None for w in _windows(model)) else causal)


def _forward(model: nn.Module, ids: Tensor, q_pos: Tensor, cache: PositionCache, logits_to_keep: int | Tensor) -> Tensor:
    """Run `ids` [1, n] at positions q_pos [n] on top of `cache` (updated in place); return logits [1, n', V]."""
    n_before = cache.cached
    k_pos = torch.cat([cache.key_positions, q_pos])
    kwargs: dict[str, Any] = dict(
        input_ids=ids, position_ids=q_pos.view(1, -1), past_key_values=cache.past_key_values, use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    if cache.custom_masks:
        kwargs["attention_mask"] = position_masks(model, q_pos, k_pos)
    if _accepts_cache_position(model):
        kwargs["cache_position"] = torch.arange(n_before, n_before + ids.shape[1], device=ids.device)
    out = model(**kwargs)
    cache.key_positions = k_pos
    return out.logits


@torch.no_grad()
def prefill_at(
    model: nn.Module, input_ids: Tensor, positions: Tensor | None = None, window: str = "positions",
    keep_all_keys: bool = False,
) -> tuple[Tensor, PositionCache]:
    """Prefill the tokens of `input_ids` [1, T] at `positions` (sorted original positions; None = all).

    Returns (next-token logits [1, V] read at the last fed token, cache); the cache continues at
    position T. `keep_all_keys` keeps every key also on sliding-window layers (for scoring).
    """
    if window not in WINDOW_MODES:
        raise ValueError(f"window must be one of {WINDOW_MODES}, got {window!r}")
    T = input_ids.shape[1]
    device = input_ids.device
    if positions is None:
        positions = torch.arange(T, device=device)
    positions = positions.to(device=device, dtype=torch.long).view(-1)
    if positions.numel() == 0 or bool((positions[1:] <= positions[:-1]).any()) or int(positions[-1]) >= T \
            or int(positions[0]) < 0:
        raise ValueError("positions must be strictly increasing original positions inside the prompt")
    from transformers import DynamicCache

    sliding = any(w is not None for w in _windows(model))
    everything = positions.numel() == T
    custom = sliding and (keep_all_keys or (window == "positions" and not everything))
    past = DynamicCache() if custom else DynamicCache(config=model.config)  # plain cache: no key is evicted
    cache = PositionCache(past, positions[:0].clone(), T, custom)
    logits = _forward(model, input_ids[:, positions], positions, cache, logits_to_keep=1)
    return logits[:, -1], cache


@torch.no_grad()
def extend(model: nn.Module, cache: PositionCache, input_ids: Tensor, logits: bool = True) -> Tensor:
    """Feed `input_ids` [1, n] at the next positions after `cache` (teacher forcing / decode); logits [1, n, V].

    `logits=False` skips the lm head (returns [1, 0, V]): only the cache and the hooks see the step.
    """
    n = input_ids.shape[1]
    q_pos = torch.arange(cache.next_position, cache.next_position + n, device=input_ids.device)
    keep = 0 if logits else torch.zeros(0, dtype=torch.long, device=input_ids.device)  # no rows for the lm head
    logits = _forward(model, input_ids, q_pos, cache, logits_to_keep=keep)
    cache.next_position += n
    return logits


class PositionDecode:
    """Continues a `PositionCache` (decode steps, teacher forcing) at the positions after the original prompt.

    The `ffcore.decoding.Extender` for SpecPrefill: `greedy_decode(model, out.logits[0], out.cache, n, POSITIONS)`.
    """

    def extend(self, model: nn.Module, state: "PositionCache", input_ids: Tensor) -> Tensor:
        """Feed input_ids [1, n] after the cache: logits [n, V]."""
        return extend(model, state, input_ids)[0]


POSITIONS = PositionDecode()


# ----------------------------------------------------------------------------- token scoring
def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def last_query(attn: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The post-RoPE query of the attention module for hidden [1, n, d] with cos/sin [1, n, D]: [1, H, n, D]."""
    D = attn.head_dim
    if cos.shape[-1] != D:
        raise NotImplementedError(f"partial rotary embeddings ({cos.shape[-1]} of {D} dims) are not supported")
    n = hidden.shape[1]
    q = attn.q_proj(hidden).view(1, n, -1, D)  # [1, n, H, D]
    if getattr(attn, "q_norm", None) is not None:  # Qwen3 / Gemma 3: RMSNorm over head_dim
        q = attn.q_norm(q)
    q = q.transpose(1, 2)  # [1, H, n, D]
    return q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)


def query_attention(q: Tensor, keys: Tensor, scaling: float, q_pos: int, window: int | None) -> Tensor:
    """Softmax attention of one query over prompt keys, max over heads.

    q [1, H, 1, D], keys [1, KVH, T, D] (post-RoPE, key t at position t) -> [T] probabilities
    (keys outside a sliding window get 0).
    """
    H, KVH, T = q.shape[1], keys.shape[1], keys.shape[2]
    qg = q.view(KVH, H // KVH, q.shape[-1]).float()  # [KVH, rep, D]: head h uses kv head h // rep
    logits = torch.bmm(qg, keys[0].float().transpose(1, 2)) * scaling  # [KVH, rep, T]
    if window is not None:
        k = torch.arange(T, device=keys.device)
        logits = logits.masked_fill((q_pos - k) >= window, float("-inf"))
    return logits.softmax(-1).reshape(H, T).amax(0)  # [T]


@dataclasses.dataclass
class TokenScores:
    """The speculator's importance scores of one prompt.

    per_query: [n_q, T] max over layers and heads for each query (last prompt token first).
    token:     [T] mean over the queries.
    smoothed:  [T] after average pooling.
    chunk:     [C] mean of `smoothed` per chunk (the last chunk may be partial).
    """

    per_query: Tensor
    token: Tensor
    smoothed: Tensor
    chunk: Tensor
    chunk_size: int
    lookahead_ids: list[int]

    @property
    def T(self) -> int:
        """Prompt length."""
        return int(self.token.numel())


def smooth_and_chunk(token: Tensor, pool_kernel: int = 13, chunk_size: int = 32) -> tuple[Tensor, Tensor]:
    """Average-pool token scores [T] (odd kernel, stride 1, edges averaged over real tokens) and mean per chunk.

    Returns (smoothed [T], chunk scores [ceil(T / chunk_size)]).
    """
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and >= 1, got {pool_kernel}")
    T = token.numel()
    s = token.float().view(1, 1, T)  # [batch=1, channel=1, T]
    if pool_kernel > 1:
        s = F.avg_pool1d(s, pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=False)
    smoothed = s.view(T)
    C = math.ceil(T / chunk_size)
    padded = F.pad(smoothed, (0, C * chunk_size - T)).view(C, chunk_size)  # [C, chunk]
    counts = torch.full((C,), float(chunk_size))
    counts[-1] = T - (C - 1) * chunk_size
    return smoothed, padded.sum(1) / counts


@torch.no_grad()
def score_tokens(speculator: nn.Module, input_ids: Tensor, config: SpecPrefillConfig | None = None) -> TokenScores:
    """Score every prompt token by the speculator's attention from the last prompt token and look-ahead tokens.

    The speculator prefills the prompt (keeping every key, also on sliding layers) and decodes
    `config.lookahead` greedy tokens. A hook after each attention module recomputes the query of
    the token just fed (projection, q-norm, RoPE, the module's `scaling`) and scores it against the
    cached prompt keys: O(T) per query, never a T x T matrix.
    """
    cfg = config or SpecPrefillConfig()
    T = _check_prompt(input_ids, cfg.chunk_size, _vocab_size(speculator))
    windows = _windows(speculator)
    state: dict[str, Any] = {"q_pos": T - 1, "acc": None}
    rows: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        keys = cache_from_kwargs(kwargs).layers[module.layer_idx].keys[:, :, :T]  # [1, KVH, T, D] prompt keys
        q = last_query(module, hidden[:, -1:], cos[:, -1:], sin[:, -1:])  # [1, H, 1, D]
        p = query_attention(q, keys, module.scaling, state["q_pos"], windows[module.layer_idx])
        state["acc"] = p if state["acc"] is None else torch.maximum(state["acc"], p)

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(speculator)]
    look: list[int] = []
    try:
        with dense_mlps(speculator):
            logits, cache = prefill_at(speculator, input_ids, keep_all_keys=True)
            rows.append(state["acc"])
            for step in range(cfg.lookahead):
                tok = logits.argmax(-1, keepdim=True)  # [1, 1]
                look.append(int(tok))
                state["q_pos"], state["acc"] = cache.next_position, None
                last = step == cfg.lookahead - 1  # its query is scored, its next token is never needed
                out = extend(speculator, cache, tok, logits=not last)
                logits = out[:, -1] if not last else logits
                rows.append(state["acc"])
    finally:
        for h in handles:
            h.remove()
    per_query = torch.stack(rows).cpu()  # [n_q, T]
    token = per_query.mean(0)
    smoothed, chunk = smooth_and_chunk(token, cfg.pool_kernel, cfg.chunk_size)
    return TokenScores(per_query, token, smoothed, chunk, cfg.chunk_size, look)


def select_chunks(chunk_scores: Tensor, keep_rate: float, keep_last: bool = True, keep_first: bool = False) -> Tensor:
    """Ids (ascending) of the kept chunks: ceil(keep_rate * C) top-scoring ones, plus the forced first/last."""
    keep_rate = check_keep_rate(keep_rate)
    C = chunk_scores.numel()
    n_keep = min(C, max(1, math.ceil(keep_rate * C - 1e-9)))
    forced = ([C - 1] if keep_last else []) + ([0] if keep_first and 0 != C - 1 else [])
    chosen = list(dict.fromkeys(forced))
    for c in torch.argsort(chunk_scores, descending=True, stable=True).tolist():
        if len(chosen) >= n_keep:
            break
        if c not in chosen:
            chosen.append(c)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def chunk_positions(chunks: Tensor, T: int, chunk_size: int) -> Tensor:
    """Token positions [K] covered by the chunk ids, plus the final prompt token, ascending."""
    pos = [torch.arange(c * chunk_size, min((c + 1) * chunk_size, T)) for c in chunks.tolist()]
    pos.append(torch.tensor([T - 1]))
    return torch.unique(torch.cat(pos))  # sorted


def select_tokens(scores: TokenScores, keep_rate: float, config: SpecPrefillConfig | None = None) -> Tensor:
    """Original positions [K] of the tokens SpecPrefill keeps at `keep_rate`."""
    cfg = config or SpecPrefillConfig()
    chunks = select_chunks(scores.chunk, keep_rate, cfg.keep_last, cfg.keep_first)
    return chunk_positions(chunks, scores.T, scores.chunk_size)


# ----------------------------------------------------------------------------- the main entry points
class SpecPrefillOutput(NamedTuple):
    """What `speculative_prefill` returns."""

    logits: Tensor  # [1, V] next-token logits (at the original position T)
    cache: PositionCache  # the main model's cache of the kept tokens; decoding continues at T
    kept: Tensor  # [K] original positions of the kept tokens


@torch.no_grad()
def speculative_prefill(
    main_model: nn.Module, speculator: nn.Module | None, input_ids: Tensor, keep_rate: float,
    config: SpecPrefillConfig | None = None, scores: TokenScores | None = None, tokenizers: tuple[Any, Any] | None = None,
) -> SpecPrefillOutput:
    """Score the prompt with the speculator, then prefill only the kept tokens on the main model at their original positions.

    `scores` reuses an earlier `score_tokens` result (the scores do not depend on the keep rate).
    Inside `sparsify(main_model, plan)` the main model's prefill runs the block-sparse FFN; the
    speculator always runs dense. `tokenizers=(main_tok, speculator_tok)` also checks the tokenizers.
    """
    cfg = config or SpecPrefillConfig()
    keep_rate = check_keep_rate(keep_rate)
    T = _check_prompt(input_ids, cfg.chunk_size, _vocab_size(main_model))
    if scores is None:
        if speculator is None:
            raise ValueError("give a speculator model or precomputed `scores`")
        check_compatible(main_model, speculator, *(tokenizers or (None, None)))
        scores = score_tokens(speculator, input_ids, cfg)
    elif scores.T != T or scores.chunk_size != cfg.chunk_size:
        raise ValueError(f"scores are for a {scores.T}-token prompt in chunks of {scores.chunk_size}; "
                         f"this prompt has {T} tokens and chunk_size {cfg.chunk_size}")
    kept = select_tokens(scores, keep_rate, cfg)
    logits, cache = prefill_at(main_model, input_ids, kept.to(input_ids.device), window=cfg.window)
    return SpecPrefillOutput(logits, cache, kept)


@torch.no_grad()
def speculative_generate(
    main_model: nn.Module, speculator: nn.Module | None, input_ids: Tensor, keep_rate: float, max_new_tokens: int,
    config: SpecPrefillConfig | None = None, eos_token_id: int | None = None, **kw: Any,
) -> Tensor:
    """Greedy continuation tokens [1, n] after a SpecPrefill (decode continues from the kept-token cache)."""
    logits, cache, _ = speculative_prefill(main_model, speculator, input_ids, keep_rate, config, **kw)
    eos = () if eos_token_id is None else (eos_token_id,)
    new = greedy_decode(main_model, logits[0], cache, max_new_tokens, POSITIONS, eos)
    return torch.tensor([new], dtype=torch.long)


# ----------------------------------------------------------------------------- FLOPs and speedup
def _total(flops: dict[str, int]) -> int:
    return int(sum(flops.values()))


def speculator_flops(spec: ModelSpec, T: int, lookahead: int) -> dict[str, int]:
    """FLOPs of scoring a T-token prompt: prefill + look-ahead decode steps + the scoring dot products.

    The look-ahead steps cost exactly the difference of a (T + lookahead)- and a T-token causal
    prefill (same projections, FFN and visible attention pairs); the lm head runs `lookahead`
    times (the prefill's produces the first look-ahead token; none is needed without look-ahead).
    Scoring adds one q.k dot product per query, head, layer and prompt key.
    """
    body = {k: v for k, v in prefill_flops(spec, T + lookahead).items() if k != "lm_head"}
    lm = lookahead * 2 * spec.d * spec.vocab
    scoring = spec.L * (lookahead + 1) * 2 * spec.heads * spec.head_dim * T
    return {"body": _total(body), "lm_head": lm, "scoring": scoring}


def kept_pairs(positions: Tensor, window: int | None) -> int:
    """Visible (query, key) pairs among kept tokens when windows are measured on original positions."""
    pos = positions.view(-1).cpu()
    K = pos.numel()
    if window is None:
        return K * (K + 1) // 2
    lo = torch.searchsorted(pos, pos - window, right=True)  # first kept key with k > p - window
    return int((torch.arange(K) - lo + 1).sum())


def _attention_adjustment(spec: ModelSpec, positions: Tensor, window: str) -> int:
    """Exact minus cache-slot attention FLOPs of a kept-token prefill (nonzero only for windows on positions)."""
    if window != "positions" or spec.layer_types is None:
        return 0
    K = positions.numel()
    adj = 0
    for layer in range(spec.L):
        w = spec.window(layer)
        if w is not None:
            adj += 2 * 2 * spec.heads * spec.head_dim * (kept_pairs(positions, w) - int(causal_pairs(K, w)))
    return adj


def specprefill_flops(
    main_spec: ModelSpec, T: int, kept: Tensor, speculator_spec: ModelSpec | None = None, lookahead: int = 0,
    plan: SparsityPlan | None = None, window: str = "positions", fastforward_overheads: bool | None = True,
) -> dict[str, Any]:
    """Compute-bound FLOPs and speedup: dense main prefill vs speculator + main prefill of the kept tokens.

    `plan` adds FastForward's block-sparse FFN on the kept tokens (`flops.plan_speedup`;
    `fastforward_overheads` is its `overheads`: True counts the predictor and compensator of the
    deployed method, None what the plan holds). `speculator_spec=None` = no speculator (FastForward
    alone when all tokens are kept).
    """
    kept = kept.view(-1)
    K = int(kept.numel())
    dense = _total(prefill_flops(main_spec, T))
    if plan is None:
        main = _total(prefill_flops(main_spec, K))
    else:
        main = plan_speedup(main_spec, K, plan, overheads=fastforward_overheads)["sparse_flops"]
    main += _attention_adjustment(main_spec, kept, window) if K < T else 0
    spec = speculator_flops(speculator_spec, T, lookahead) if speculator_spec is not None else {}
    spec_total = sum(spec.values())
    total = spec_total + main
    return {
        "T": T, "kept_tokens": K, "kept_fraction": K / T, "dense_flops": dense, "speculator_flops": spec_total,
        "main_flops": main, "total_flops": total, "speedup": dense / total,
        "speculator_share": spec_total / total,
    }


# ----------------------------------------------------------------------------- the self-speculator
def prefix_layers(model: nn.Module, fraction: float) -> int:
    """How many layers the self-speculator keeps: round(fraction * L), at least 1, and at least up to the first
    full-attention layer.

    A prefix of only sliding-window layers (Gemma 3: layers 0-4 are local) is blind beyond the window:
    every token more than `window` positions before the last one scores 0, and SpecPrefill degenerates to
    keeping the most recent tokens.
    """
    L = len(decoder_layers(model))
    n = max(1, min(L, round(fraction * L)))
    windows = _windows(model)
    if all(w is not None for w in windows[:n]) and any(w is None for w in windows):
        n = windows.index(None) + 1
    return n
