"""Many questions per prefilled context: same answers and gold log-likelihoods as one-question prompts.

The multi-question path prefills an item's context once (first block dense, later blocks sparse), then
asks each question as a dense suffix prefill from a copy of the KV cache. Checked here: on the dense
model it equals one-pass prompts (context + question); at density < 1 it equals a one-pass prefill with
the same block layout (and differs from other layouts); the gold log-likelihood equals a hand computation;
items are deterministic and distinct; records are cached.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

from ffcore.decoding import FULL, copy_state, eos_ids, greedy_decode, stop_strings, teacher_forced
from ffcore.engine import SparsityPlan, sparsify
from ffcore.evaluation import multiq as M
from ffcore.evaluation import runner as R
from ffcore.models import load_model, tiny_tokenizer

QUIET = R.RunConfig(progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def tiny(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def small_items(tok):
    """One small item of every task (tiny byte-level tokenizer: one token per byte)."""
    return (M.kv_items(tok, n_items=1, context_tokens=300, n_questions=3)
            + M.needle_items(tok, n_items=1, context_tokens=500, n_questions=3)
            + M.classification_items(tok, n_items=1, context_tokens=400, n_questions=3, snippet_lines=3)
            + M.code_items(tok, n_items=1, context_tokens=400, n_questions=3, max_new_tokens=8)
            + M.code_items(tok, n_items=1, context_tokens=400, n_questions=3, layout="prefix", max_new_tokens=8))


def _text_ids(tok, n: int, start: int = 0) -> list[int]:
    """n byte tokens of eval prose (a realistic token stream of an exact length)."""
    from ffcore.evaluation.suite import _eval_docs

    text = "\n\n".join(t for _, t in _eval_docs("prose"))
    return tok(text[start:start + n], add_special_tokens=False)["input_ids"]


def _synthetic_item(tok, n_context: int, q_lens: tuple[int, ...], gold_len: int = 6) -> dict:
    """An item with an exact context length and question lengths, drawn from prose."""
    ctx = [tok.bos_token_id] + _text_ids(tok, n_context - 1)
    questions = []
    for j, n in enumerate(q_lens):
        q = _text_ids(tok, n, start=5000 + 700 * j)
        gold = _text_ids(tok, gold_len, start=5000 + 700 * j + n)
        questions.append(M.make_question(f"q{j}", q, [tok.decode(gold)], gold, 4, ["\n"]))
    return M.make_item("kv_retrieval", ctx, questions, "exact_match", "prose")


def _single_pass(model, tok, item: dict, q: dict, plan: SparsityPlan | None) -> tuple[list[int], torch.Tensor]:
    """(greedy ids, gold log-probs [P]) of ONE prefill of context + question under plan, then the same decoding."""
    ids = torch.tensor([item["context_ids"] + q["question_ids"]])
    gold = torch.tensor(q["gold_ids"])
    sparse = plan is not None and not plan.is_dense
    sparse_decode = sparse and plan.sparse_decode
    with torch.no_grad():
        with sparsify(model, plan) if sparse else contextlib.nullcontext():
            first, state, _ = FULL.prefill(model, ids)
            tf_state = copy_state(state)
            if sparse_decode:
                new = greedy_decode(model, first, state, q["max_new_tokens"], FULL, eos_ids(model, tok),
                                    stop_strings(tok, q["stop"]))
                logits = teacher_forced(model, first, tf_state, gold, FULL, stepwise=True)
        if not sparse_decode:
            new = greedy_decode(model, first, state, q["max_new_tokens"], FULL, eos_ids(model, tok),
                                stop_strings(tok, q["stop"]))
            logits = teacher_forced(model, first, tf_state, gold, FULL)
    return new, logits.float().log_softmax(-1).gather(1, gold[:, None])[:, 0]


def _lp(rec: dict) -> torch.Tensor:
    return torch.tensor(rec["gold_token_logprobs"])


HAS_TAIL = "dense_tail" in {f.name for f in dataclasses.fields(SparsityPlan)}


def _grid(plan: SparsityPlan) -> SparsityPlan:
    """The plan whose one-pass dense tail is the grid's last block (the question's own block when aligned)."""
    return plan.replace(dense_tail="grid") if HAS_TAIL else plan


# ----------------------------------------------------------------- equivalence with one-question prompts


def test_dense_multi_question_equals_one_question_prompts(tiny, small_items):
    model, tok = tiny
    recs = M.evaluate_items(model, tok, small_items, None, progress=False)
    rows = [r for it in small_items for r in M.one_question_rows(it)]
    assert len(recs) == len(rows) == sum(len(it["questions"]) for it in small_items)
    ref = R.evaluate(model, tok, rows, None, config=QUIET)  # one prefill per question, the runner's own decode
    for rec, row, r1 in zip(recs, rows, ref):
        meta = json.loads(row["meta"])
        assert rec["uid"] == f"{meta['item_uid']}/{meta['qid']}"
        assert rec["new_ids"] == r1["new_ids"] and rec["prediction"] == r1["prediction"]
        assert rec["score"] == r1["score"]
        # gold log-likelihood: one forward over context + question + gold (no cache at all)
        full = torch.tensor([row["prompt_ids"] + meta["gold_ids"]])
        with torch.no_grad():
            logp = model(full, use_cache=False).logits[0].float().log_softmax(-1)  # [T, V]
        n = len(row["prompt_ids"])
        gold = torch.tensor(meta["gold_ids"])
        hand = logp[n - 1:n - 1 + len(gold)].gather(1, gold[:, None])[:, 0]
        torch.testing.assert_close(_lp(rec), hand, atol=2e-5, rtol=1e-5)
        assert rec["gold_logprob"] == pytest.approx(float(hand.sum()), abs=1e-4)


def test_density_one_equals_dense(llama, small_items):
    model, tok = llama
    items = small_items[:2]
    dense = M.evaluate_items(model, tok, items, None, progress=False)
    one = M.evaluate_items(model, tok, items, SparsityPlan(1.0, "oracle"), progress=False)
    assert [r["new_ids"] for r in one] == [r["new_ids"] for r in dense]
    assert [r["gold_token_logprobs"] for r in one] == [r["gold_token_logprobs"] for r in dense]
    # K = f through the engine's sparse path (density just under 1 keeps every neuron): dense up to rounding
    f = model.config.intermediate_size
    near = SparsityPlan(1.0 - 0.4 / f, "oracle")
    assert not near.is_dense
    rec = M.evaluate_items(model, tok, items, near, progress=False)
    assert [r["new_ids"] for r in rec] == [r["new_ids"] for r in dense]
    for a, b in zip(rec, dense):
        torch.testing.assert_close(_lp(a), _lp(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy,sparse_decode", [("oracle", False), ("first_block_static", True), ("random", True)])
def test_sparse_multi_question_equals_single_pass_with_the_same_layout(tiny, tok, policy, sparse_decode):
    model, _ = tiny
    B = 64
    plan = SparsityPlan(0.4, policy, block_size=B, sparse_decode=sparse_decode)
    item = _synthetic_item(tok, 3 * B, (20, 41, B))  # context = 3 blocks; every question fits one block
    recs = M.evaluate_items(model, tok, [item], plan, progress=False)
    dense = M.evaluate_items(model, tok, [item], None, progress=False)
    for rec, d, q in zip(recs, dense, item["questions"]):
        new, lp = _single_pass(model, tok, item, q, _grid(plan))  # blocks: dense, sparse, sparse | question dense
        assert rec["new_ids"] == new and rec["n_shared_tokens"] == 3 * B
        torch.testing.assert_close(_lp(rec), lp, atol=2e-5, rtol=1e-5)
        # the check can fail: the question in a sparse block, or no sparsity at all, give other numbers
        _, merged = _single_pass(model, tok, item, q, _grid(plan).replace(dense_last=False))
        assert (merged - lp).abs().max() > 1e-3
        assert (_lp(d) - lp).abs().max() > 1e-3
        if HAS_TAIL and len(q["question_ids"]) < B:  # a dense tail of B tokens reaches into the context
            _, full_tail = _single_pass(model, tok, item, q, plan.replace(dense_tail="full"))
            assert (full_tail - lp).abs().max() > 1e-3


@pytest.mark.parametrize("policy,sparse_decode", [("oracle", False), ("first_block_static", True)])
def test_aligned_share_equals_the_one_prompt_runner(tiny, tok, small_items, policy, sparse_decode):
    """share='aligned': every record equals one prefill of context + question under the plan, any context length."""
    model, _ = tiny
    B = 64
    plan = SparsityPlan(0.4, policy, block_size=B, sparse_decode=sparse_decode)
    items = [_synthetic_item(tok, 3 * B - 20, (20, 41, B)), _synthetic_item(tok, 4 * B + 5, (30,))] + small_items[:2]
    recs = M.evaluate_items(model, tok, items, plan, progress=False, share="aligned")
    rows = [r for it in items for r in M.one_question_rows(it)]
    ref = R.evaluate(model, tok, rows, plan, config=QUIET)  # the runner: one prefill per question
    pairs = [(it, q) for it in items for q in it["questions"]]
    for rec, r1, (it, q) in zip(recs, ref, pairs):
        assert rec["new_ids"] == r1["new_ids"] and rec["score"] == r1["score"]
        assert rec["n_shared_tokens"] % B == 0 and rec["n_shared_tokens"] >= B  # something is shared
        assert rec["n_suffix_tokens"] == len(it["context_ids"]) - rec["n_shared_tokens"] + len(q["question_ids"])
        _, lp = _single_pass(model, tok, it, q, plan)
        torch.testing.assert_close(_lp(rec), lp, atol=2e-5, rtol=1e-5)
    ctx_mode = M.evaluate_items(model, tok, items[:1], plan, progress=False)  # share='context': another layout
    assert max((_lp(a) - _lp(b)).abs().max() for a, b in zip(ctx_mode, recs)) > 1e-3


def test_misaligned_context_is_not_the_single_pass_layout(llama, tok):
    """A context that is not a whole number of blocks: the question still runs as its own dense block."""
    model, _ = llama
    B = 64
    plan = SparsityPlan(0.4, "oracle", block_size=B)
    item = _synthetic_item(tok, 3 * B - 20, (30,))
    rec = M.evaluate_items(model, tok, [item], plan, progress=False)[0]
    _, one_pass = _single_pass(model, tok, item, item["questions"][0], plan)  # last block = ctx tail + question
    assert (_lp(rec) - one_pass).abs().max() > 1e-3


def test_gold_loglik_is_the_hand_computation(llama, tok):
    model, _ = llama
    B = 64
    item = _synthetic_item(tok, 2 * B, (25, 33), gold_len=7)
    sp = SparsityPlan(0.5, "oracle", block_size=B)
    for plan, share, one_pass in ((None, "context", None), (sp, "context", _grid(sp)), (sp, "aligned", sp)):
        recs = M.evaluate_items(model, tok, [item], plan, progress=False, share=share)
        for rec, q in zip(recs, item["questions"]):
            ids = torch.tensor([item["context_ids"] + q["question_ids"]])
            gold = torch.tensor(q["gold_ids"])
            with torch.no_grad():
                with sparsify(model, one_pass) if one_pass is not None else contextlib.nullcontext():
                    out = model(ids, use_cache=True)  # one pass: question = the dense last block
                rest = model(gold[None, :-1], past_key_values=out.past_key_values).logits[0]  # dense decode
            logits = torch.cat([out.logits[0, -1:], rest])  # [P, V]: position j predicts gold[j]
            logp = torch.log_softmax(logits.double(), -1)
            per_token = torch.stack([logp[j, gold[j]] for j in range(len(gold))])
            assert rec["gold_tokens"] == len(gold) == 7
            assert rec["gold_logprob"] == pytest.approx(float(per_token.sum()), abs=1e-4)
            assert rec["gold_nll"] == pytest.approx(float(-per_token.mean()), abs=1e-5)
            assert rec["gold_top1"] == pytest.approx(float((logits.argmax(-1) == gold).double().mean()))
            assert not rec["gold_from_decode"]  # a random model does not produce the gold text


@pytest.mark.parametrize("sparse_decode", [False, True])
def test_gold_loglik_from_a_right_greedy_answer(llama, tok, sparse_decode):
    """A right answer: the greedy steps' logits serve as teacher forcing, equal to the separate forward."""
    model, _ = llama
    B = 64
    plan = SparsityPlan(0.5, "first_block_static", block_size=B, sparse_decode=sparse_decode)
    probe = _synthetic_item(tok, 2 * B, (25, 33))
    greedy = [r["new_ids"] for r in M.evaluate_items(model, tok, [probe], plan, progress=False)]
    questions = [M.make_question(q["qid"], q["question_ids"], [tok.decode(g)], g[:3], 4, [])
                 for q, g in zip(probe["questions"], greedy)]
    item = M.make_item("kv_retrieval", probe["context_ids"], questions, "exact_match", "prose")
    for rec, q in zip(M.evaluate_items(model, tok, [item], plan, progress=False), item["questions"]):
        assert rec["gold_from_decode"] and rec["gold_top1"] == 1.0 and rec["score"] == 1.0
        _, lp = _single_pass(model, tok, item, q, _grid(plan))  # a separate teacher-forced pass
        torch.testing.assert_close(_lp(rec), lp, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------- items


def test_items_are_deterministic_distinct_and_fit(tok):
    kw = dict(n_items=2, context_tokens=(600, 800), n_questions=4)
    builders = {
        "kv": lambda s: M.kv_items(tok, seed=s, **kw),
        "needle": lambda s: M.needle_items(tok, seed=s, **kw),
        "classification": lambda s: M.classification_items(tok, seed=s, snippet_lines=3, **kw),
        "code": lambda s: M.code_items(tok, seed=s, **kw),
        "code_prefix": lambda s: M.code_items(tok, seed=s, layout="prefix", **kw),
    }
    all_uids = []
    for name, build in builders.items():
        items = build(0)
        assert items == build(0), name  # the same seed and tokenizer: identical items
        assert {it["uid"] for it in items}.isdisjoint(it["uid"] for it in build(1)), name
        for it, budget in zip(items, (600, 800)):
            assert set(it) == set(M.ITEM_FIELDS) and it["questions"]
            assert 0.6 * budget <= len(it["context_ids"]) <= budget, (name, len(it["context_ids"]))
            assert it["context_ids"] == tok(it["context"])["input_ids"], name
            qs = [tuple(q["question_ids"]) for q in it["questions"]]
            assert len(set(qs)) == len(qs), name  # distinct questions
            assert len({q["qid"] for q in it["questions"]}) == len(qs)
            for q in it["questions"]:
                assert set(q) == set(M.QUESTION_FIELDS)
                assert 1 <= len(q["question_ids"]) <= 120 and q["gold_ids"]
                answer = q["answers"][0]
                assert tok.decode(q["question_ids"] + q["gold_ids"]).rstrip().endswith(answer), name
            rows = M.one_question_rows(it)
            assert [r["prompt_ids"] for r in rows] == [it["context_ids"] + q["question_ids"] for q in it["questions"]]
            assert len({r["uid"] for r in rows}) == len(rows)
            all_uids.append(it["uid"])
        if name in ("kv", "classification", "code"):
            assert all(len(it["questions"]) == 4 for it in items), name
    assert len(set(all_uids)) == len(all_uids)


def test_item_contents(tok):
    kv = M.kv_items(tok, n_items=1, context_tokens=800, n_questions=8)[0]
    for q in kv["questions"]:
        key = q["question"].split('"')[1]
        assert kv["context"].count(f'"{key}": "{q["answers"][0]}"') == 1
    depths = [q["meta"]["depth"] for q in kv["questions"]]
    assert depths == sorted(depths) and depths[0] < 0.2 and depths[-1] > 0.8  # spread over the object
    nd = M.needle_items(tok, n_items=1, context_tokens=1200, n_questions=6)[0]
    cities = [q["meta"]["city"] for q in nd["questions"]]
    assert len(set(cities)) == 6
    for q in nd["questions"]:
        assert nd["context"].count(f"The special magic number for {q['meta']['city']} is {q['answers'][0]}.") == 1
    pos = [nd["context"].index(f"for {c} is") for c in cities]
    assert pos == sorted(pos)  # needles at increasing depths
    cl = M.classification_items(tok, n_items=1, context_tokens=800, n_questions=6, snippet_lines=3)[0]
    labels = [q["answers"][0] for q in cl["questions"]]
    assert len(set(labels)) >= 5 and cl["chance"] == pytest.approx(1 / len(cl["all_classes"]))
    for q in cl["questions"]:
        snippet = q["question"][len("Code:\n"):-len("\nPackage:")]
        assert snippet not in cl["context"]  # a question is never a shot
    code = M.code_items(tok, n_items=1, context_tokens=800, n_questions=6)[0]
    assert f"# file: {code['meta']['file']}\n" not in code["context"]  # the target file is not in the context
    pre = M.code_items(tok, n_items=1, context_tokens=800, n_questions=6, layout="prefix")[0]
    assert f"# file: {pre['meta']['file']}\n" in pre["context"]
    for q in pre["questions"]:  # every suffix continues the context's copy of the file
        assert tok.decode(pre["context_ids"] + q["question_ids"]).startswith(pre["context"])


def test_build_items_and_overview(tok):
    items = M.build_items(tok, ("kv_retrieval", "needle"), n_items=1, context_tokens=400,
                          needle={"n_questions": 2}, kv_retrieval={"n_questions": 5})
    table = {r["task"]: r for r in M.item_overview(items)}
    assert table["needle"]["questions"] == 2 and table["kv_retrieval"]["questions"] == 5
    with pytest.raises(ValueError, match="unknown task"):
        M.build_items(tok, ("passkey",))


# ----------------------------------------------------------------- cache and errors


def test_records_are_cached_and_incremental(llama, tok, tmp_path):
    model, _ = llama
    plan = SparsityPlan(0.5, "oracle")
    a = M.kv_items(tok, n_items=1, context_tokens=300, n_questions=3)
    b = M.needle_items(tok, n_items=1, context_tokens=400, n_questions=2)
    calls: list[int] = []
    def count(module, args, kwargs):  # the length of every forward call
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        calls.append(int(ids.shape[1]))

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        first = M.evaluate_items(model, tok, a, plan, cache_dir=tmp_path, progress=False)
        assert calls.count(len(a[0]["context_ids"])) == 1  # ONE context prefill for three questions
        calls.clear()
        again = M.evaluate_items(model, tok, a, plan, cache_dir=tmp_path, progress=False)
        assert again == first and calls == []  # nothing recomputed
        both = M.evaluate_items(model, tok, a + b, plan, cache_dir=tmp_path, progress=False)
        assert both[:3] == first and len(both) == 5
        assert len(a[0]["context_ids"]) not in calls and calls.count(len(b[0]["context_ids"])) == 1
    finally:
        hook.remove()
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 5
    assert json.loads(files[0].with_suffix(".meta.json").read_text())["plan"] == plan.describe()
    other = M.evaluate_items(model, tok, a, plan.replace(densities=0.6), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and len(other) == 3


def test_bad_items_are_refused(llama, tok):
    model, _ = llama
    q = M.make_question("q", [1, 2, 3], ["x"], [4], 4)
    with pytest.raises(ValueError, match="no questions"):
        M.make_item("kv_retrieval", [1, 2], [], "exact_match", "prose")
    with pytest.raises(ValueError, match="empty context"):
        M.make_item("kv_retrieval", [], [q], "exact_match", "prose")
    long_q = M.make_item("kv_retrieval", [1, 2], [M.make_question("q", list(range(129)), ["x"], [4], 4)],
                         "exact_match", "prose")
    with pytest.raises(ValueError, match="one block"):
        M.evaluate_items(model, tok, [long_q], SparsityPlan(0.5), progress=False)
    with pytest.raises(ValueError, match="share"):
        M.evaluate_items(model, tok, [long_q], SparsityPlan(0.5), progress=False, share="everything")
    with pytest.raises(ValueError, match="duplicate qids"):
        M.make_item("kv_retrieval", [1, 2], [q, q], "exact_match", "prose")
    with pytest.raises(ValueError, match="empty gold"):
        M.make_item("kv_retrieval", [1, 2], [M.make_question("q", [1], ["x"], [], 4)], "exact_match", "prose")
    item = M.make_item("kv_retrieval", [1, 2, 3], [M.make_question("q", list(range(40)), ["x"], [4], 4)],
                       "exact_match", "prose")
    with pytest.raises(ValueError, match="1..32"):  # longer than the plan's block
        M.evaluate_items(model, tok, [item], SparsityPlan(0.5, block_size=32), progress=False)
    short = M.make_item("kv_retrieval", [1, 2, 3], [M.make_question("q", [5], ["x"], [4], 4)], "exact_match", "prose")
    with pytest.raises(ValueError, match="sparse_decode"):
        M.evaluate_items(model, tok, [short], SparsityPlan(0.5, sparse_decode=True), progress=False)
    with pytest.raises(ValueError, match="max_question_tokens"):
        M.kv_items(tok, max_question_tokens=200)
    with pytest.raises(ValueError, match="not installed|unknown"):
        M.needle_items(tok, domain="no-such-domain")


# ----------------------------------------------------------------- a real tokenizer and model


@pytest.mark.real_model
def test_gemma3_270m_items_and_answers():
    try:
        model, tok = load_model("gemma3-270m")
    except Exception as exc:  # noqa: BLE001 - any failure to load means: not available here
        pytest.skip(f"gemma3-270m not available: {exc}")
    items = M.build_items(tok, n_items=1, context_tokens=1024)
    for it in items:
        assert 0.75 * 1024 <= len(it["context_ids"]) <= 1024 and len(it["questions"]) >= 2
        assert all(len(q["question_ids"]) < 128 for q in it["questions"])
    item = M.kv_items(tok, n_items=1, context_tokens=512, n_questions=3)[0]
    recs = M.evaluate_items(model, tok, [item], None, progress=False)
    ref = R.evaluate(model, tok, M.one_question_rows(item), None, config=QUIET)
    assert [r["new_ids"] for r in recs] == [r["new_ids"] for r in ref]
    plan = SparsityPlan(0.5, "oracle")  # share='aligned' reproduces the one-prompt runner under a sparse plan
    recs = M.evaluate_items(model, tok, [item], plan, progress=False, share="aligned")
    ref = R.evaluate(model, tok, M.one_question_rows(item), plan, config=QUIET)
    assert [r["new_ids"] for r in recs] == [r["new_ids"] for r in ref]
    assert recs[0]["n_shared_tokens"] >= 256
