"""lm-evaluation-harness on FastForward: the `ffcore` model of lm-eval (an optional extra, `pip install lm-eval`).

Importing this module registers the model `ffcore` in lm-eval's model registry. Nothing else in
ffcore imports it, so `import ffcore` never needs lm-eval.

**CLI.** lm-eval 0.4.13 finds models only in its own registry (it reads no plugin entry points), so its
own `lm_eval` command does not know `ffcore`. This module is lm-eval's CLI with the model registered
(same arguments):

    python -m ffcore.lm_eval_adapter --model ffcore \\
        --model_args pretrained=tiny-llama,sparsity=0.5,policy=oracle,block_size=128 \\
        --include_path tests/fixtures/lm_eval --tasks ffcore_fixture_mc,ffcore_fixture_gen --device cpu

model_args: `pretrained` (an ffcore key such as `smollm2-135m` or `tiny-llama`, or a local checkpoint
folder; loaded with `ffcore.load_model`), `sparsity` (0 = dense, the default; density = 1 - sparsity),
`policy` (`oracle`, `random`, `first_block_static`, `dense`), `block_size` (128), `sparse_decode`
(False), `seed` (of `random`), `bundle` (a FastForward bundle folder written by `ffcore.fit`: the deployed plan at `sparsity`),
`dtype` (`float32`), `engine_backend` (`auto`, `torch`, `triton`), and a few of HFLM's own
(`max_length`, `logits_cache`, `add_bos_token`, ...).

**Python.** Either this class on a loaded model, with any plan (also a trained predictor or compensator):

    lm = FFCoreLM(pretrained=model, tokenizer=tok, plan=SparsityPlan(densities=0.5, policy="oracle"))
    lm_eval.simple_evaluate(model=lm, tasks=[...])

or lm-eval's stock `HFLM(pretrained=model, tokenizer=tok, batch_size=1)` evaluated inside
`with torch.no_grad(), ffcore.sparsify(model, plan):` (generation matches this class exactly; for
log-likelihoods see below).

**What is prefilled.** lm-eval scores a continuation with one forward over context + continuation, so
under the engine the continuation tokens are part of the prefill and their blocks follow the plan (the
blocks are aligned to the start of the context; the first and the last block stay dense by default).
This class feeds the whole `context + continuation` (left-truncated to `max_length`) and sums the
continuation's log-probabilities: exactly what the model assigns after a prefill of that text under
the plan. Each continuation gets its own prefill, so HFLM's `logits_cache` (one forward shared by
single-token continuations) does not apply under a sparse plan. Stock HFLM feeds
`context + continuation[:-1]` (the last token's logits are not needed), one token shorter: with the
default full-block dense tail (`dense_tail="full"`, the last `block_size` tokens) that shifts the tail
by a token, so the two differ slightly whenever a sparse block precedes the tail; with the grid tail
(`dense_tail="grid"`) they differ only when the last token opens a block of its own, which turns the
block before it from the dense last block into a sparse one. `generate_until` prefills the context under the plan
with `model.generate`; decode steps are dense unless `sparse_decode`. A dense run (sparsity 0) is
lm-eval's HFLM unchanged.

**Batches.** `batch_size` > 1 works: lm-eval pads the batch and the engine lays each row's blocks
out from its own first token (the attention mask), so every row is scored as if it ran alone. The
default stays 1, which keeps float round-off identical to the hand-written references in the tests.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lm_eval.api.registry as lm_registry
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from torch import nn
from tqdm import tqdm

from ffcore.engine import EngineOptions, SparsityPlan, sparsify
from ffcore.engine.layout import check_block_size
from ffcore.models import gated_mlps, load_model, model_fingerprint

MODEL_NAME = "ffcore"
_TARGET = "ffcore.lm_eval_adapter:FFCoreLM"  # a lazy placeholder: registering twice (python -m) is a no-op
POLICIES = ("oracle", "random", "first_block_static", "dense")
DTYPES = {"float32": torch.float32, "auto": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HFLM arguments that still mean something for a model ffcore has already loaded.
HFLM_ARGS = frozenset({
    "max_length", "logits_cache", "truncation", "add_bos_token", "prefix_token_id", "softmax_dtype",
    "mixed_precision_dtype", "max_batch_size", "think_end_token", "enable_thinking", "chat_template_args",
    "trust_remote_code",
})


def build_plan(sparsity: Any = 0.0, policy: Any = "oracle", block_size: Any = 128, sparse_decode: Any = False,
               seed: Any = 0) -> SparsityPlan | None:
    """The SparsityPlan of the model_args, or None for a dense run (sparsity 0); clear errors for bad values."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or \
            not 0.0 <= sparsity < 1.0:
        raise ValueError(f"ffcore: sparsity must be a number in [0, 1) (0 = dense, 0.5 = half the FFN "
                         f"neurons per sparse block), got {sparsity!r}")
    if policy == "predictor":
        raise ValueError("ffcore: policy=predictor needs a trained predictor: pass bundle=<folder> (CLI) or "
                         "plan=SparsityPlan(policy=<predictor>) (Python)")
    if policy not in POLICIES:
        raise ValueError(f"ffcore: unknown policy {policy!r}; choose one of {list(POLICIES)}")
    check_block_size(block_size)
    if not isinstance(sparse_decode, bool):
        raise ValueError(f"ffcore: sparse_decode must be True or False, got {sparse_decode!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"ffcore: seed must be an int, got {seed!r}")
    if sparsity == 0:
        return None
    return SparsityPlan(densities=1.0 - float(sparsity), policy=policy, block_size=block_size,
                        sparse_decode=sparse_decode, seed=seed)


def plan_from_bundle(bundle: str | Path, model: nn.Module, plan: SparsityPlan | None) -> SparsityPlan:
    """The deployed plan of a FastForward bundle on `model` at the model_args' sparsity (schedule, predictor, compensator).

    `plan` is what the other model_args built (None: sparsity 0); its sparsity must lie in the bundle's trained
    range, its block size must be the bundle's, and `sparse_decode` / `seed` carry over. The bundle's predictor
    selects the experts, so a `policy` other than the default is refused.
    """
    from ffcore.bundle import FastForward  # imported on use: only a bundle run needs the bundle reader

    ff = FastForward.from_pretrained(bundle, model)  # refuses another model's bundle, corrupt weights, missing fields
    if plan is None:
        sparsity = 0.0
    elif not isinstance(plan.densities, (int, float)):
        raise ValueError(f"ffcore: bundle={str(bundle)!r} takes one sparsity; the per-layer densities come from "
                         "the bundle's schedule")
    else:
        sparsity = round(1.0 - float(plan.densities), 9)
    if plan is not None and plan.policy_name != "oracle":  # "oracle" is build_plan's default
        raise ValueError(f"ffcore: bundle={str(bundle)!r} selects experts with its trained predictor; drop "
                         f"policy={plan.policy_name}")
    if plan is not None and plan.block_size != ff.block_size:
        raise ValueError(f"ffcore: bundle={str(bundle)!r} was fit with block_size={ff.block_size}; pass "
                         f"block_size={ff.block_size} (got {plan.block_size})")
    try:
        ff.check_sparsity(sparsity)
    except ValueError as e:
        raise ValueError(f"ffcore: bundle={str(bundle)!r}: {e}") from None
    changes = {} if plan is None else {"sparse_decode": plan.sparse_decode, "seed": plan.seed}
    return ff.plan(sparsity, **changes)


def _quiet_preloaded(record: logging.LogRecord) -> bool:
    """A logging filter: False for HFLM's two warnings about being given an already-loaded model."""
    msg = str(record.msg)
    return not ("`pretrained` model kwarg is not of type" in msg or "already-initialized model" in msg)


def _device(device: str | None) -> str:
    """The device to load on: the one asked for, CPU when CUDA is asked for but absent (lm-eval's CLI default)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if device is None and torch.cuda.is_available() else "cpu"
    return str(device)


class FFCoreLM(HFLM):
    """lm-eval's HFLM with ffcore's block-sparse prefill: loglikelihood and generate_until run inside `sparsify`."""

    def __init__(
        self,
        pretrained: str | nn.Module | None = None,
        sparsity: float = 0.0,
        policy: str = "oracle",
        block_size: int = 128,
        sparse_decode: bool = False,
        seed: int = 0,
        bundle: str | None = None,
        plan: SparsityPlan | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 1,  # padded batches work: each row's blocks follow its attention mask
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        engine_backend: str = "auto",
        **hflm_args: Any,
    ) -> None:
        """Load `pretrained` with ffcore.load_model (or take a loaded model) and build the plan from the model_args."""
        unknown = sorted(set(hflm_args) - HFLM_ARGS)
        if unknown:
            raise ValueError(f"ffcore: unknown model_args {unknown}; ffcore's own are pretrained, sparsity, policy, "
                             f"block_size, sparse_decode, seed, bundle, dtype, device, engine_backend, tokenizer, "
                             f"batch_size; HFLM's accepted here: {sorted(HFLM_ARGS)}")
        hflm_args.pop("trust_remote_code", None)  # ffcore loads local checkpoints only
        built = build_plan(sparsity, policy, block_size, sparse_decode, seed)
        if plan is not None:
            if not isinstance(plan, SparsityPlan):
                raise TypeError(f"ffcore: plan must be a SparsityPlan, got {type(plan).__name__}")
            if built is not None:
                raise ValueError("ffcore: give either plan= or sparsity/policy/block_size/sparse_decode, not both")
            built = None if plan.is_dense else plan
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"ffcore: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        options = EngineOptions(backend=engine_backend)

        if pretrained is None:
            raise ValueError("ffcore: model_args needs pretrained=<an ffcore key such as smollm2-135m, or a local "
                             "checkpoint folder>")
        if isinstance(pretrained, str):
            self.ffcore_source = pretrained
            model, tok = load_model(pretrained, dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype,
                                    device=_device(device))
            tokenizer = tok if tokenizer is None else tokenizer
        elif isinstance(pretrained, nn.Module):
            self.ffcore_source = type(pretrained).__name__
            model = pretrained
            if tokenizer is None:
                raise ValueError("ffcore: pass tokenizer= with a loaded model (ffcore.load_model returns both)")
        else:
            raise TypeError(f"ffcore: pretrained must be an ffcore key, a checkpoint folder or a model, "
                            f"got {type(pretrained).__name__}")
        try:
            gated_mlps(model)
        except TypeError as e:
            raise TypeError(f"ffcore: cannot sparsify pretrained={self.ffcore_source!r}: {e}") from e
        if bundle is not None:
            built = plan_from_bundle(bundle, model, built)
        self.plan: SparsityPlan | None = built
        self.engine_options = options
        self.engine_stats = {"dense_tokens": 0, "sparse_tokens": 0}  # summed over layers and calls
        hf_logger = logging.getLogger(HFLM.__module__)
        hf_logger.addFilter(_quiet_preloaded)  # ffcore loaded the model on purpose: drop HFLM's warnings about it
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                             **hflm_args)
        finally:
            hf_logger.removeFilter(_quiet_preloaded)

    def _sparse(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call fn inside `sparsify(model, plan)` and add the engine's token counts to `engine_stats`."""
        with torch.no_grad(), sparsify(self.model, self.plan, self.engine_options) as state:
            out = fn(*args, **kwargs)
        for k in self.engine_stats:
            self.engine_stats[k] += state.stats[k]
        return out

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> torch.Tensor:
        """HFLM's generation with the prompt prefilled under the plan (decode dense unless sparse_decode)."""
        if self.plan is None:
            return super()._model_generate(context, max_length, stop, **kwargs)
        return self._sparse(super()._model_generate, context, max_length, stop, **kwargs)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each continuation after a prefill of context + continuation under the plan."""
        if self.plan is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        res = []
        for request_str, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests (ffcore)"
        ):
            answer = self._score(context_enc, continuation_enc)
            res.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return res

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """One request: a sparse prefill of (context + continuation)[-max_length:], the continuation's log-prob sum."""
        n = len(continuation_enc)
        tokens = (context_enc + continuation_enc)[-self.max_length:]
        if not context_enc or n == 0 or n >= len(tokens):
            raise ValueError(f"ffcore: cannot score a continuation of {n} tokens after {len(context_enc)} context "
                             f"tokens within max_length={self.max_length}")
        inp = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self._sparse(self._model_call, inp)[0, -n - 1:-1]  # the positions that predict the continuation
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        target = inp[0, -n:]
        ll = logp.gather(-1, target[:, None]).sum()
        return float(ll), bool((logp.argmax(dim=-1) == target).all())

    def get_model_info(self) -> dict[str, Any]:
        """What the results' config records: the model, its fingerprint and the plan (no Hub lookups)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(getattr(self.model, "dtype", "")),
            "model_revision": None,
            "model_sha": "",
            "ffcore_model": self.ffcore_source,
            "ffcore_fingerprint": model_fingerprint(self.model),
            "ffcore_plan": None if self.plan is None else self.plan.describe(),
            "ffcore_plan_key": None if self.plan is None else self.plan.key(),
            "ffcore_engine_stats": dict(self.engine_stats),
        }


def register() -> None:
    """Register FFCoreLM as lm-eval's model `ffcore` (idempotent)."""
    if MODEL_NAME not in lm_registry.model_registry:
        lm_registry.model_registry.register(MODEL_NAME, target=_TARGET)


register()


def main() -> None:
    """lm-eval's command line (same arguments) with the `ffcore` model registered."""
    from lm_eval.__main__ import cli_evaluate  # the CLI module is only needed here

    cli_evaluate()


if __name__ == "__main__":
    main()
