"""The lm-eval adapter (`ffcore.lm_eval_adapter`): offline fixture tasks through lm-eval on tiny-llama.

Dense runs equal lm-eval's stock HFLM exactly; sparse log-likelihoods equal a hand computation (a prefill
of context + continuation inside `sparsify`) and sparse generations a hand-written greedy loop under the
same plan. The whole module is skipped when lm-eval is not installed (it is an optional extra).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets / huggingface_hub are imported (also patched below)
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import ffcore  # noqa: E402
from ffcore import lm_eval_adapter as adapter  # noqa: E402
from ffcore.engine import SparsityPlan, sparsify  # noqa: E402
from ffcore.models import model_fingerprint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "fixtures" / "lm_eval"
TASKS = ["ffcore_fixture_mc", "ffcore_fixture_gen"]
LIMIT = 3  # fixture rows per task: 12 log-likelihood requests and 3 generations per run
PLAN = SparsityPlan(densities=0.5, policy="oracle", block_size=128)  # ~700-token prompts: 4 of 6 blocks sparse
MODEL_ARGS = "pretrained=tiny-llama,sparsity={},policy=oracle,block_size=128"


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Offline Hub and datasets, a private datasets cache, the repo root as cwd (the YAMLs' data_files), one thread."""
    import datasets.config
    import huggingface_hub.constants

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.chdir(ROOT)
        torch.set_num_threads(1)  # tiny matmuls; the test machine's cores are shared
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """tiny-llama and its byte-level tokenizer (the same weights as `pretrained=tiny-llama`: seeded init)."""
    return ffcore.load_model("tiny-llama")


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    """Only the fixture tasks (indexing lm-eval's built-in tasks would take seconds)."""
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def _run(model: Any, task_manager: TaskManager, model_args: str | None = None, batch_size: int = 1) -> dict[str, Any]:
    """simple_evaluate on the fixture tasks, with samples."""
    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=task_manager,
                           limit=LIMIT, log_samples=True, device="cpu", batch_size=batch_size)


@pytest.fixture(scope="module")
def dense(task_manager: TaskManager) -> dict[str, Any]:
    """The registered `ffcore` model at sparsity 0."""
    return _run("ffcore", task_manager, MODEL_ARGS.format(0))


@pytest.fixture(scope="module")
def sparse(task_manager: TaskManager) -> dict[str, Any]:
    """The registered `ffcore` model at 50 % sparsity, oracle experts."""
    return _run("ffcore", task_manager, MODEL_ARGS.format(0.5))


@pytest.fixture(scope="module")
def stock(tiny: tuple[Any, Any], task_manager: TaskManager) -> dict[str, Any]:
    """lm-eval's own HFLM on the same model."""
    model, tok = tiny
    return _run(HFLM(pretrained=model, tokenizer=tok, batch_size=1), task_manager)


def _metrics(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {t: {k: float(v) for k, v in m.items() if "," in k} for t, m in res["results"].items()}


def _lls(res: dict[str, Any]) -> list[float]:
    return [ll for s in res["samples"]["ffcore_fixture_mc"] for (ll, _), in s["resps"]]


def _encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Ids of context + continuation and the continuation's length (trailing spaces move to it, as in lm-eval)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ids = tok(context + continuation).input_ids
    return ids, len(ids) - len(tok(context).input_ids)


@torch.no_grad()
def hand_loglikelihood(model: Any, tok: Any, plan: SparsityPlan, context: str, continuation: str) -> float:
    """Prefill context + continuation inside sparsify; the sum of the continuation tokens' log-probs."""
    ids, n = _encode_pair(tok, context, continuation)
    with sparsify(model, plan):
        logits = model(torch.tensor([ids])).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))


@torch.no_grad()
def hand_greedy(model: Any, tok: Any, plan: SparsityPlan, context: str, until: list[str], max_gen_toks: int) -> str:
    """A greedy loop under the plan: sparse prefill of the context, then one token at a time; cut at a stop string."""
    new: list[int] = []
    with sparsify(model, plan):
        out = model(input_ids=torch.tensor([tok(context).input_ids]), use_cache=True)
        for _ in range(max_gen_toks):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            if any(s in tok.decode(new, skip_special_tokens=True) for s in until):
                break
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    text = tok.decode(new, skip_special_tokens=True)
    for s in until:
        text = text.split(s)[0]
    return text


# ---------------------------------------------------------------- registration and the fixture tasks
def test_registered_under_ffcore() -> None:
    assert get_model("ffcore") is adapter.FFCoreLM
    adapter.register()  # idempotent
    assert get_model("ffcore") is adapter.FFCoreLM


def test_ffcore_never_imports_the_adapter_or_lm_eval() -> None:
    """`import ffcore` must not need lm-eval: only the adapter imports it, and nothing imports the adapter."""
    offenders = []
    for path in sorted((ROOT / "ffcore").rglob("*.py")):
        if path.name == "lm_eval_adapter.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "lm_eval" or n.endswith("lm_eval_adapter") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_dense_equals_stock_hflm(dense: dict[str, Any], stock: dict[str, Any]) -> None:
    assert _metrics(dense) == _metrics(stock)
    for task in TASKS:
        assert [s["resps"] for s in dense["samples"][task]] == [s["resps"] for s in stock["samples"][task]]
    assert dense["config"]["ffcore_plan"] is None and dense["config"]["ffcore_engine_stats"]["sparse_tokens"] == 0


def test_sparse_differs_from_dense(dense: dict[str, Any], sparse: dict[str, Any]) -> None:
    assert sparse["config"]["ffcore_engine_stats"]["sparse_tokens"] > 0
    assert sparse["config"]["ffcore_plan"] == PLAN.describe()
    diffs = [abs(a - b) for a, b in zip(_lls(dense), _lls(sparse), strict=True)]
    assert len(diffs) == 4 * LIMIT and min(diffs) > 1e-4, diffs


def test_sparse_loglikelihood_equals_a_sparse_prefill_of_context_plus_continuation(
    tiny: tuple[Any, Any], sparse: dict[str, Any],
) -> None:
    model, tok = tiny
    assert sparse["config"]["ffcore_fingerprint"] == model_fingerprint(model)  # the same weights
    for s in sparse["samples"]["ffcore_fixture_mc"]:
        for (context, continuation), ((ll, _),) in zip(s["arguments"], s["resps"], strict=True):
            assert ll == pytest.approx(hand_loglikelihood(model, tok, PLAN, context, continuation), abs=1e-4)


def test_sparse_generation_equals_a_greedy_loop_under_the_plan(tiny: tuple[Any, Any], sparse: dict[str, Any]) -> None:
    model, tok = tiny
    for s in sparse["samples"]["ffcore_fixture_gen"]:
        ((context, kwargs),) = s["arguments"]
        expected = hand_greedy(model, tok, PLAN, context, kwargs["until"], kwargs["max_gen_toks"])
        assert s["resps"] == [[expected]]


# ---------------------------------------------------------------- the Python routes, policies, the prefill choice
def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("t", 0, 1))


def _context() -> str:
    """The first fixture passage, 400 characters (no trailing space)."""
    return json.loads((TASK_DIR / "ffcore_fixture.jsonl").read_text().splitlines()[0])["context"][:400]


@pytest.mark.parametrize("policy", ["oracle", "random", "first_block_static"])
def test_python_route_with_a_plan(tiny: tuple[Any, Any], policy: str) -> None:
    """FFCoreLM(pretrained=model, tokenizer=tok, plan=...): log-likelihood and generation match the hand versions."""
    model, tok = tiny
    plan = SparsityPlan(densities=0.5, policy=policy, block_size=32, sparse_decode=policy == "random")
    lm = adapter.FFCoreLM(pretrained=model, tokenizer=tok, plan=plan)
    ctx = _context()
    (ll, _), = lm.loglikelihood([_instance("loglikelihood", (ctx, " forty two"))], disable_tqdm=True)
    assert ll == pytest.approx(hand_loglikelihood(model, tok, plan, ctx, " forty two"), abs=1e-4)
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    out, = lm.generate_until([_instance("generate_until", (ctx, gen_kwargs))], disable_tqdm=True)
    assert out == hand_greedy(model, tok, plan, ctx, ["\n"], 6)
    assert lm.engine_stats["sparse_tokens"] > 0


def test_stock_hflm_inside_sparsify_prefills_context_plus_continuation_minus_its_last_token(
    tiny: tuple[Any, Any],
) -> None:
    """The documented HFLM-inside-sparsify route: with the grid tail it agrees with the adapter except when the
    last token opens a block; with the full-block tail the adapter still equals the hand-made prefill."""
    model, tok = tiny
    grid = SparsityPlan(densities=0.5, policy="oracle", block_size=32, dense_tail="grid")
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    ctx = _context()[:90]
    assert not ctx.endswith(" ")
    for plan in (grid, grid.replace(dense_tail="full")):
        ours = adapter.FFCoreLM(pretrained=model, tokenizer=tok, plan=plan)
        for cont, edge in ((" nine bells", False), (" seven!", True)):  # 90 + 7 - 1 = 96 = 3 blocks of 32
            assert ((len(ctx) + len(cont) - 1) % 32 == 0) == edge
            req = [_instance("loglikelihood", (ctx, cont))]
            (mine, _), = ours.loglikelihood(req, disable_tqdm=True)
            with torch.no_grad(), sparsify(model, plan):
                (theirs, _), = stock.loglikelihood(req, disable_tqdm=True)
            assert mine == pytest.approx(hand_loglikelihood(model, tok, plan, ctx, cont), abs=1e-4)
            if plan.dense_tail == "grid":  # (full tail: a one-token shift of the tail, a small change either way)
                assert (abs(mine - theirs) > 1e-4) == edge
    plan = grid.replace(dense_tail="full")
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    with torch.no_grad(), sparsify(model, plan):
        out, = stock.generate_until([_instance("generate_until", (_context(), gen_kwargs))], disable_tqdm=True)
    assert out == hand_greedy(model, tok, plan, _context(), ["\n"], 6)


def test_sparse_batched_equals_one_at_a_time(sparse: dict[str, Any], task_manager: TaskManager) -> None:
    """batch_size=4 (padded batches) gives the batch-1 log-likelihoods and generations at 50 % sparsity."""
    batched = _run("ffcore", task_manager, MODEL_ARGS.format(0.5), batch_size=4)
    assert _lls(batched) == pytest.approx(_lls(sparse), abs=2e-3)
    stats = batched["config"]["ffcore_engine_stats"]
    assert stats == sparse["config"]["ffcore_engine_stats"] and stats["sparse_tokens"] > 0  # padding counts as neither
    for task in batched["samples"]:
        got = [s["resps"] for s in batched["samples"][task]]
        ref = [s["resps"] for s in sparse["samples"][task]]
        if task != "ffcore_fixture_mc":  # generations: greedy text must agree exactly
            assert got == ref, task


# ---------------------------------------------------------------- bad model_args
@pytest.mark.parametrize(("args", "error", "match"), [
    ({"pretrained": None}, ValueError, "needs pretrained"),
    ({"policy": "best"}, ValueError, "unknown policy"),
    ({"policy": "predictor", "sparsity": 0.5}, ValueError, "bundle="),
    ({"sparsity": 1.0}, ValueError, r"\[0, 1\)"),
    ({"sparsity": -0.1}, ValueError, r"\[0, 1\)"),
    ({"sparsity": "half"}, ValueError, r"\[0, 1\)"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"sparse_decode": "yes"}, ValueError, "sparse_decode"),
    ({"sparsty": 0.5}, ValueError, "unknown model_args"),
    ({"dtype": "int8"}, ValueError, "dtype"),
    ({"bundle": "/nonexistent/bundle"}, FileNotFoundError, "not a FastForward bundle"),
])
def test_bad_model_args(args: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        adapter.FFCoreLM(**{"pretrained": "tiny-llama", **args})


# ---------------------------------------------------------------- bundle= (a fitted FastForward bundle)
@pytest.fixture(scope="module")
def bundle(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A small FastForward bundle fit on tiny-llama (block size 32, sparsity range 0.3-0.5)."""
    from pydoc_data.topics import topics

    model, tok = tiny
    cfg = ffcore.FitConfig(seq_len=128, block_size=32, calib_samples=2, train_samples=4, val_samples=0,
                           predictor={"mean_pool_epochs": 2, "max_epochs": 0, "batch_blocks": 8},
                           compensator={"max_epochs": 1, "warm_epochs": 1, "batch_blocks": 4, "patience": 1})
    out = tmp_path_factory.mktemp("bundle")
    ff = ffcore.fit(model, tok, [topics[k] for k in sorted(topics)][:60], out, cfg, progress=False)
    return ff, out


def test_bundle_model_arg_runs_the_bundles_plan(tiny: tuple[Any, Any], bundle: tuple[Any, Path]) -> None:
    """bundle=<folder>,sparsity=s is FastForward.from_pretrained(folder, model).plan(s): schedule, predictor, compensator."""
    model, tok = tiny
    ff, folder = bundle
    lm = adapter.FFCoreLM(pretrained="tiny-llama", bundle=str(folder), sparsity=0.4, block_size=32)
    expected = ff.plan(0.4)
    assert lm.plan.key() == expected.key() and lm.plan.describe() == expected.describe()
    assert lm.plan.policy.name == "predictor" and lm.plan.compensator is not None
    assert len(lm.plan.densities) == 4 and sum(lm.plan.densities) / 4 == pytest.approx(0.6)
    ctx = _context()
    (ll, _), = lm.loglikelihood([_instance("loglikelihood", (ctx, " forty two"))], disable_tqdm=True)
    assert ll == pytest.approx(hand_loglikelihood(model, tok, expected, ctx, " forty two"), abs=1e-4)
    assert lm.engine_stats["sparse_tokens"] > 0
    assert lm.get_model_info()["ffcore_plan_key"] == expected.key()
    decode = adapter.FFCoreLM(pretrained=model, tokenizer=tok, bundle=str(folder), sparsity=0.5, block_size=32,
                              sparse_decode=True)
    assert decode.plan.sparse_decode and decode.plan.densities == ff.plan(0.5).densities


@pytest.mark.parametrize(("args", "match"), [
    ({"sparsity": 0.7, "block_size": 32}, r"outside this bundle's trained range \[0\.3, 0\.5\]"),
    ({"sparsity": 0.0, "block_size": 32}, r"outside this bundle's trained range \[0\.3, 0\.5\]"),
    ({"sparsity": 0.4}, "was fit with block_size=32; pass block_size=32"),
    ({"sparsity": 0.4, "block_size": 32, "policy": "random"}, "drop policy=random"),
])
def test_bundle_model_arg_refusals(bundle: tuple[Any, Path], args: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adapter.FFCoreLM(pretrained="tiny-llama", bundle=str(bundle[1]), **args)


def test_bundle_of_another_model_is_refused(bundle: tuple[Any, Path]) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        adapter.FFCoreLM(pretrained="tiny-qwen3", bundle=str(bundle[1]), sparsity=0.4, block_size=32)


def test_a_model_without_a_gated_mlp_is_refused(tiny: tuple[Any, Any]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=259, n_positions=64)).eval()
    with pytest.raises(TypeError, match="not a gated MLP"):
        adapter.FFCoreLM(pretrained=gpt2, tokenizer=tiny[1], sparsity=0.5)


def _cli_args() -> list[str]:
    return ["--model", "ffcore", "--model_args", MODEL_ARGS.format(0.5), "--include_path", str(TASK_DIR),
            "--tasks", "ffcore_fixture_mc", "--limit", "1", "--device", "cpu"]


def test_cli_wrapper_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`adapter.main()` is lm-eval's own CLI with `--model ffcore` known (built-in task index skipped for speed)."""
    import functools

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["ffcore.lm_eval_adapter", *_cli_args()])
    adapter.main()
    out = capsys.readouterr().out
    assert "ffcore_fixture_mc" in out and "acc" in out and "'sparsity': 0.5" in out


@pytest.mark.skipif(not os.environ.get("FFCORE_TEST_LM_EVAL_CLI"), reason=(
    "set FFCORE_TEST_LM_EVAL_CLI=1: lm-eval's CLI indexes its ~14,700 built-in tasks on every start "
    "(25-80 s on a 2-core machine)"))
def test_cli_wrapper_subprocess(tmp_path: Path) -> None:
    """`python -m ffcore.lm_eval_adapter ...` end to end, as a user runs it."""
    cmd = [sys.executable, "-m", "ffcore.lm_eval_adapter", *_cli_args()]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ffcore_fixture_mc" in proc.stdout and "acc" in proc.stdout
