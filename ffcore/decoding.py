"""Decoding after a prefill: the one greedy decoder and the one teacher-forced continuation scorer.

A *prefill method* says how a prompt is prefilled and how decoding continues from its state:
`FullPrefill` (every prompt token, Hugging Face's own KV cache and positions) or SpecPrefill's kept
tokens at their original positions (`ffcore.specprefill.POSITIONS`, `ffcore.evaluation.prefill`).
Anything with `extend(model, state, ids) -> logits [n, V]` (the state grows in place) can be decoded:

    first, state, _ = FULL.prefill(model, ids)              # inside sparsify(...) for a sparse prefill
    new = greedy_decode(model, first, state, 32)             # token ids
    logits = teacher_forced(model, first, state, target)     # [len(target), V]: the true continuation

Both run inside whatever `sparsify` context the caller holds, so decoding is sparse when the plan
says `sparse_decode` and dense otherwise.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffcore.engine import SparsityPlan, sparsify


class Prefilled(NamedTuple):
    """What a prefill method returns."""

    logits: Tensor  # [V] next-token logits after the prompt
    state: Any  # what `extend` continues from (a KV cache)
    info: dict[str, Any]  # extra fields for the caller's record (e.g. kept tokens)


class Extender(Protocol):
    """Anything that continues a prefilled state by more tokens."""

    def extend(self, model: nn.Module, state: Any, input_ids: Tensor) -> Tensor:
        """Feed input_ids [1, n] after the state; logits [n, V]; the state is updated in place."""


class PrefillMethod(Extender, Protocol):
    """How a prompt is prefilled (the evaluation runner's interface); `key` is part of result-cache keys."""

    key: str

    def prefill(self, model: nn.Module, input_ids: Tensor) -> Prefilled:
        """Prefill input_ids [1, T]."""


class FullPrefill:
    """The standard prefill: every prompt token, Hugging Face's own KV cache and positions."""

    key = ""

    @torch.no_grad()
    def prefill(self, model: nn.Module, input_ids: Tensor, state: Any = None) -> Prefilled:
        """One forward over the whole prompt (continuing `state`, a KV cache, when given)."""
        out = model(input_ids=input_ids, past_key_values=state, use_cache=True, logits_to_keep=1)
        return Prefilled(out.logits[0, -1], out.past_key_values, {})

    @torch.no_grad()
    def extend(self, model: nn.Module, state: Any, input_ids: Tensor) -> Tensor:
        """Continue the cache (positions follow the cache length): logits [n, V]."""
        return model(input_ids=input_ids, past_key_values=state, use_cache=True).logits[0]


FULL = FullPrefill()


def eos_ids(model: nn.Module, tokenizer: Any = None) -> set[int]:
    """The end-of-sequence token ids of a model's generation config and its tokenizer."""
    ids: set[int] = set()
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def stop_strings(tokenizer: Any, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A stop test for `greedy_decode`: the decoded answer (leading white space ignored) contains a stop string."""
    if not stop:
        return None

    def stopped(new: list[int]) -> bool:
        body = tokenizer.decode(new, skip_special_tokens=True).lstrip()
        return bool(body) and any(s in body for s in stop)

    return stopped


@torch.no_grad()
def greedy_decode(
    model: nn.Module, first_logits: Tensor, state: Any, max_new_tokens: int, method: Extender = FULL,
    eos: Iterable[int] = (), stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy token ids from a prefilled state (first_logits [V]); stops at EOS, a stop test, or max_new_tokens."""
    eos = set(eos)
    dev = first_logits.device
    logits, new = first_logits.reshape(-1), []
    for step in range(max_new_tokens):
        nxt = int(logits.argmax())
        new.append(nxt)
        if nxt in eos or (stop is not None and stop(new)) or step == max_new_tokens - 1:
            break
        logits = method.extend(model, state, torch.tensor([[nxt]], device=dev))[-1]  # the state grows in place
    return new


@torch.no_grad()
def teacher_forced(
    model: nn.Module, first_logits: Tensor, state: Any, target: Tensor, method: Extender = FULL,
    stepwise: bool = False,
) -> Tensor:
    """Logits predicting every token of the true continuation target [P]: [P, V] (the state grows by P - 1 tokens).

    `stepwise` feeds the target one token at a time (what a decode loop does, e.g. under sparse
    decode); otherwise one forward over target[:-1].
    """
    first = first_logits.reshape(1, -1)  # [1, V]
    target = target.reshape(-1)
    if len(target) <= 1:
        return first[: len(target)]
    if stepwise:
        rest = torch.stack([method.extend(model, state, tok.view(1, 1))[-1] for tok in target[:-1]])  # [P-1, V]
    else:
        rest = method.extend(model, state, target[None, :-1])  # [P-1, V]
    return torch.cat([first, rest.to(first.dtype)])


def token_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Per-token negative log-likelihood [P] of target [P] under logits [P, V] (float32)."""
    return F.cross_entropy(logits.float(), target.reshape(-1).to(logits.device), reduction="none")


@torch.no_grad()
def continuation_nll(model: nn.Module, input_ids: Tensor, ctx_len: int, plan: SparsityPlan | None = None) -> float:
    """Mean NLL of the tokens after `ctx_len`: the context prefilled under `plan` (None: dense), the rest teacher-forced.

    input_ids [n, T], one sample at a time; the continuation is fed with the plan's decode setting.
    """
    total, count = 0.0, 0
    for row in input_ids:
        ids, target = row.unsqueeze(0), row[ctx_len:]  # [1, T], [T - ctx_len]
        if plan is None or plan.is_dense:
            first, state, _ = FULL.prefill(model, ids[:, :ctx_len])
            logits = teacher_forced(model, first, state, target)
        else:
            with sparsify(model, plan):
                first, state, _ = FULL.prefill(model, ids[:, :ctx_len])
                if plan.sparse_decode:  # a decode loop: one token at a time, sparse
                    logits = teacher_forced(model, first, state, target, stepwise=True)
            if not plan.sparse_decode:  # a dense continuation in one forward
                logits = teacher_forced(model, first, state, target)
        nll = token_nll(logits, target)
        total, count = total + float(nll.sum()), count + int(nll.numel())
    return total / count


def copy_state(state: Any) -> Any:
    """An independent copy of a decoding state (a KV cache), so several continuations can start from it."""
    return copy.deepcopy(state)
