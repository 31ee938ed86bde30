"""How the evaluation runner prefills a prompt: in full (the default, `ffcore.decoding.FULL`) or by
SpecPrefill's token dropping (`SpecPrefillMethod`).

A prefill method (`ffcore.decoding.PrefillMethod`) has a `key` (part of the result-cache key; ''
for the full prefill), `prefill(model, ids)` returning the next-token logits, a decoding state and
a dict of extra record fields, and `extend(model, state, ids)` feeding more tokens (greedy decode,
teacher forcing) at the positions after the ORIGINAL prompt. The runner calls both inside
`sparsify(model, plan)`, so a SpecPrefill method under a sparse plan is the combination
(token dropping, then FastForward's block-sparse FFN on the kept tokens).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch
from torch import Tensor, nn

from ffcore import specprefill as sp
from ffcore.decoding import FULL, FullPrefill, Prefilled, PrefillMethod

__all__ = ["FULL", "FullPrefill", "Prefilled", "PrefillMethod", "SpecPrefillMethod", "kept_ranges",
           "ranges_to_positions"]


def kept_ranges(positions: Tensor) -> list[list[int]]:
    """Sorted positions [K] as half-open runs [[start, end), ...] (compact to store in a record)."""
    pos = positions.view(-1).tolist()
    runs: list[list[int]] = []
    for p in pos:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def ranges_to_positions(runs: list[list[int]]) -> Tensor:
    """Inverse of `kept_ranges`: positions [K]."""
    return torch.cat([torch.arange(a, b) for a, b in runs]) if runs else torch.zeros(0, dtype=torch.long)


class SpecPrefillMethod:
    """SpecPrefill as a runner prefill: score with the speculator, prefill the kept tokens at their original positions.

    speculator:   a causal LM with the main model's vocabulary (e.g. `layer_prefix_view(model, n)`).
    keep_rate:    fraction of chunks kept, in (0, 1].
    config:       `SpecPrefillConfig` (look-ahead, pooling, chunk size, keep_last, windows).
    name:         names the speculator in the cache key; two different speculators need two names.
    scores_cache: a dict shared by methods with the same speculator and config, so the speculator
                  scores each prompt once for all keep rates (the scores do not depend on it).

    Each record gets `kept_tokens`, `kept_ranges` (original positions kept) and `speculator_s`
    (the scoring time, 0 when the scores came from `scores_cache`).
    """

    def __init__(self, speculator: nn.Module, keep_rate: float, config: Any = None, name: str = "speculator",
                 scores_cache: dict[str, Any] | None = None) -> None:
        self.speculator = speculator
        self.keep_rate = sp.check_keep_rate(keep_rate)
        self.config = config or sp.SpecPrefillConfig()
        self.name = name
        self.scores_cache = {} if scores_cache is None else scores_cache
        cfg = json.dumps(self.config.to_dict(), sort_keys=True)
        self.key = f"specprefill[{name}] p={self.keep_rate:g} {cfg}"

    def _scores(self, input_ids: Tensor) -> tuple[Any, float]:
        score_cfg = json.dumps({k: v for k, v in self.config.to_dict().items() if k not in ("keep_last", "keep_first",
                                                                                              "window")}, sort_keys=True)
        h = hashlib.sha256(input_ids.cpu().numpy().tobytes() + f"{self.name}|{score_cfg}".encode()).hexdigest()
        if h in self.scores_cache:
            return self.scores_cache[h], 0.0
        t0 = time.perf_counter()
        scores = sp.score_tokens(self.speculator, input_ids, self.config)
        self.scores_cache[h] = scores
        return scores, time.perf_counter() - t0

    @torch.no_grad()
    def prefill(self, model: nn.Module, input_ids: Tensor) -> Prefilled:
        """Speculator scores (dense, cached per prompt), then the main model prefills the kept tokens."""
        scores, spec_s = self._scores(input_ids)
        out = sp.speculative_prefill(model, None, input_ids, self.keep_rate, self.config, scores=scores)
        info = {"kept_tokens": int(out.kept.numel()), "kept_ranges": kept_ranges(out.kept),
                "speculator_s": round(spec_s, 4)}
        return Prefilled(out.logits[0], out.cache, info)

    @torch.no_grad()
    def extend(self, model: nn.Module, state: Any, input_ids: Tensor) -> Tensor:
        """Decode / teacher-force at the positions after the original prompt."""
        return sp.POSITIONS.extend(model, state, input_ids)
