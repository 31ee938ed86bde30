"""`ffcore.fit` and the FastForward bundle on tiny models: round trip bit for bit, refusals, resume, atomic writes, CLI."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydoc_data.topics import topics

import ffcore
from ffcore import bundle as fb
from ffcore import fitting as ffit
from ffcore.__main__ import main as cli
from ffcore.bundle import BUNDLE_FILE, BundleError, FastForward
from ffcore.engine import sparsify
from ffcore.engine.layout import sparse_token_count
from ffcore.fitting import FitConfig, text_samples
from ffcore.models import load_model, model_fingerprint, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [topics[k] for k in sorted(topics)][:120]  # real prose, ~100K bytes (the tiny tokenizer is byte-level)
SMALL = dict(seq_len=128, block_size=32, calib_samples=2, train_samples=6, val_samples=2,
             predictor={"mean_pool_epochs": 4, "max_epochs": 0, "batch_blocks": 8, "patience": 2},
             compensator={"max_epochs": 2, "warm_epochs": 1, "batch_blocks": 4, "patience": 1})
CFG = FitConfig.from_dict(SMALL)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny matmuls on a shared machine: one thread is faster and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def fitted(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[FastForward, Path]:
    """One fit of tiny-llama (the in-memory result and its bundle folder)."""
    model, tok = tiny
    out = tmp_path_factory.mktemp("bundle")
    return ffcore.fit(model, tok, TEXTS, out, CFG, progress=False), out


def prompt_ids(n: int = 300) -> torch.Tensor:
    """A prompt of n byte tokens from text the fit never saw (8 blocks of 32 at n = 300: 6 sparse)."""
    text = "".join(topics[k] for k in sorted(topics)[-20:])
    return tiny_tokenizer()(text, return_tensors="pt").input_ids[:, :n]


@torch.no_grad()
def logits(model: Any, plan: Any, ids: torch.Tensor) -> torch.Tensor:
    with sparsify(model, plan) as state:
        out = model(ids).logits
    assert state.stats["sparse_tokens"] > 0
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    """A copy of the bundle's three files."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (BUNDLE_FILE, fb.PREDICTOR_FILE, fb.COMPENSATOR_FILE):
        shutil.copy(src / name, dst / name)
    return dst


# ---------------------------------------------------------------- the round trip
@pytest.mark.parametrize("sparsity", [0.3, 0.4, 0.5])
def test_save_load_plan_reproduces_the_in_memory_plan_bit_for_bit(
    tiny: tuple[Any, Any], fitted: tuple[FastForward, Path], tmp_path: Path, sparsity: float,
) -> None:
    model, _ = tiny
    ff, out = fitted
    ids = prompt_ids()
    ref = logits(model, ff.plan(sparsity), ids)
    loaded = FastForward.from_pretrained(out, model)
    again = FastForward.from_pretrained(loaded.save_pretrained(tmp_path / "copy"), model)
    for other in (loaded, again):
        plan = other.plan(sparsity)
        assert plan.key() == ff.plan(sparsity).key() and plan.describe() == ff.plan(sparsity).describe()
        assert torch.equal(logits(model, plan, ids), ref)
    dense = model(ids).logits
    assert not torch.equal(ref, dense)
    dens = ff.densities(sparsity)
    assert len(dens) == 4 and sum(dens) / 4 == pytest.approx(1 - sparsity) and min(dens) >= CFG.min_density


def test_the_plan_is_the_layerwise_schedule_with_the_trained_parts(fitted: tuple[FastForward, Path]) -> None:
    from ffcore.schedule import layerwise_schedule

    ff, _ = fitted
    plan = ff.plan(0.5)
    assert plan.densities == tuple(layerwise_schedule(ff.s_i, 0.5, CFG.min_density))
    assert plan.policy is ff.predictor and plan.compensator is ff.compensator
    assert plan.block_size == 32 and plan.dense_first and plan.dense_last and not plan.sparse_decode
    assert ff.plan(0.5, sparse_decode=True).sparse_decode
    # the compensator trained every layer at the densities the schedule gives it over the trained grid
    rows = [list(r) for r in zip(*(layerwise_schedule(ff.s_i, round(1 - x, 6), CFG.min_density)
                                   for x in CFG.sparsities))]
    got = ff.compensator.meta["training"]["densities"]
    assert [sorted(r) for r in rows] == (got if isinstance(got[0], list) else [got] * 4)
    with pytest.raises(ValueError, match="unknown key"):
        ff.plan(0.5, sparsity_decode=True)


def test_bundle_layout(fitted: tuple[FastForward, Path], tiny: tuple[Any, Any]) -> None:
    ff, out = fitted
    model, _ = tiny
    assert sorted(p.name for p in out.iterdir()) == sorted([BUNDLE_FILE, "compensator.safetensors",
                                                            "predictor.safetensors"])  # no .work/ left
    meta = json.loads((out / BUNDLE_FILE).read_text())
    assert meta["format"] == "ffcore-bundle" and meta["format_version"] == fb.FORMAT_VERSION
    assert meta["model"]["fingerprint"] == model_fingerprint(model) and meta["model"]["name"] == "tiny-llama"
    assert meta["model"]["dims"] == {"L": 4, "d": 64, "f": 256} and meta["model"]["dtype"] == "float32"
    assert meta["block_size"] == 32 and len(meta["schedule"]["s_i"]) == 4 and meta["schedule"]["min_density"] == 0.05
    assert meta["sparsity_range"] == [0.3, 0.5] and ff.sparsity_range == (0.3, 0.5)
    assert meta["fit_config"] == json.loads(json.dumps(CFG.to_dict()))
    assert meta["data"]["samples"] == {"calibration": 2, "validation": 2, "train": 6}
    assert set(meta["versions"]) >= {"torch", "transformers", "safetensors", "ffcore", "python"}
    assert meta["predictor"]["sha256"] == fb.file_sha256(out / "predictor.safetensors")
    modes = {(out / n).stat().st_mode & 0o777 for n in (BUNDLE_FILE, fb.PREDICTOR_FILE, fb.COMPENSATOR_FILE)}
    assert len(modes) == 1  # the weights are as readable as the JSON
    assert meta["compensator"]["config"]["variant"] == "plain" and meta["predictor"]["config"]["r"] == 4
    assert set(meta["stages"]) == {"calibration", "collection", "predictor", "compensator", "validation"}
    val = meta["validation"]["per_sparsity"]
    assert [r["sparsity"] for r in val] == [0.3, 0.4, 0.5] and val[0]["recall"]["oracle"] == 1.0
    assert FitConfig.from_dict(meta["fit_config"]) == CFG


def test_ffcore_exports_fit_fitconfig_fastforward() -> None:
    assert ffcore.FitConfig is FitConfig and ffcore.FastForward is FastForward
    assert ffcore.fit is ffit.fit and callable(ffcore.fit)  # the package exports the function


# ---------------------------------------------------------------- refusals
def test_refuses_a_bundle_fit_for_another_model(fitted: tuple[FastForward, Path]) -> None:
    _, out = fitted
    other = tiny_model("llama", seed=1)  # the same dims, other weights
    fp = model_fingerprint(other)
    with pytest.raises(BundleError, match=rf"fingerprint .*{fp}.*same dims but different weights") as e:
        FastForward.from_pretrained(out, other)
    assert "L=4, d=64, f=256" in str(e.value) and "tiny-llama" in str(e.value)
    narrow = tiny_model("llama", intermediate_size=128)
    with pytest.raises(BundleError, match=r"L=4, d=64, f=256.*L=4, d=64, f=128\): different dims"):
        FastForward.from_pretrained(out, narrow)
    with pytest.raises(BundleError, match="fingerprint"):
        FastForward.from_pretrained(out, tiny_model("qwen3"))


def test_the_same_weights_in_another_dtype_are_accepted(tiny: tuple[Any, Any], fitted: tuple[FastForward, Path]
                                                         ) -> None:
    model, _ = tiny
    _, out = fitted
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert model_fingerprint(half) != model_fingerprint(model)
    ff = FastForward.from_pretrained(out, half)
    with torch.no_grad(), sparsify(half, ff.plan(0.5)):
        assert torch.isfinite(half(prompt_ids()).logits).all()


def test_refuses_corrupt_or_truncated_weights(tiny: tuple[Any, Any], fitted: tuple[FastForward, Path],
                                              tmp_path: Path) -> None:
    model, _ = tiny
    _, out = fitted
    trunc = copy_bundle(out, tmp_path / "truncated")
    data = (trunc / "predictor.safetensors").read_bytes()
    (trunc / "predictor.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=r"predictor\.safetensors is truncated or corrupt"):
        FastForward.from_pretrained(trunc, model)
    flipped = copy_bundle(out, tmp_path / "flipped")
    raw = bytearray((flipped / "compensator.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (flipped / "compensator.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"compensator\.safetensors is truncated or corrupt"):
        FastForward.from_pretrained(flipped, model)
    # a truncated file whose digest was "fixed" in the JSON: safetensors itself refuses it
    forged = copy_bundle(out, tmp_path / "forged")
    (forged / "predictor.safetensors").write_bytes(data[:100])
    meta = json.loads((forged / BUNDLE_FILE).read_text())
    meta["predictor"]["sha256"] = fb.file_sha256(forged / "predictor.safetensors")
    (forged / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        FastForward.from_pretrained(forged, model)
    missing = copy_bundle(out, tmp_path / "missing")
    (missing / "compensator.safetensors").unlink()
    with pytest.raises(BundleError, match="compensator weights compensator.safetensors are missing"):
        FastForward.from_pretrained(missing, model)


@pytest.mark.parametrize("field", ["schedule.s_i", "model.fingerprint", "sparsity_range", "predictor.config.r",
                                   "compensator.sha256", "block_size", "model.dims.f"])
def test_refuses_a_missing_config_field(tiny: tuple[Any, Any], fitted: tuple[FastForward, Path], tmp_path: Path,
                                        field: str) -> None:
    model, _ = tiny
    folder = copy_bundle(fitted[1], tmp_path / "b")
    meta = json.loads((folder / BUNDLE_FILE).read_text())
    *path, last = field.split(".")
    obj = meta
    for part in path:
        obj = obj[part]
    del obj[last]
    (folder / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"lacks the required field '{field}'"):
        FastForward.from_pretrained(folder, model)


def test_refuses_bad_values_and_a_non_bundle(tiny: tuple[Any, Any], fitted: tuple[FastForward, Path],
                                             tmp_path: Path) -> None:
    model, _ = tiny
    folder = copy_bundle(fitted[1], tmp_path / "b")
    meta = json.loads((folder / BUNDLE_FILE).read_text())
    for change, match in (({"sparsity_range": [0.5, 0.3]}, "sparsity_range"), ({"format_version": 99}, "version 99"),
                          ({"schedule": {**meta["schedule"], "s_i": [1.0, 2.0]}}, r"4 finite scores")):
        (folder / BUNDLE_FILE).write_text(json.dumps({**meta, **change}))
        with pytest.raises(BundleError, match=match):
            FastForward.from_pretrained(folder, model)
    (folder / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        FastForward.from_pretrained(folder, model)
    with pytest.raises(FileNotFoundError, match="not a FastForward bundle"):
        FastForward.from_pretrained(tmp_path / "empty", model)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.55, 0.9, float("nan"), "0.5"])
def test_plan_refuses_a_sparsity_outside_the_trained_range(fitted: tuple[FastForward, Path], sparsity: Any) -> None:
    with pytest.raises(ValueError, match=r"outside this bundle's trained range \[0\.3, 0\.5\]"):
        fitted[0].plan(sparsity)


def test_a_model_without_a_gated_mlp_is_refused(fitted: tuple[FastForward, Path], tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=259, n_positions=512)).eval()
    with pytest.raises(TypeError, match="not a gated MLP"):
        ffcore.fit(gpt2, tiny_tokenizer(), TEXTS, tmp_path / "gpt2", CFG, progress=False)
    assert not (tmp_path / "gpt2").exists()  # refused before any work
    with pytest.raises(TypeError, match="not a gated MLP"):
        FastForward.from_pretrained(fitted[1], gpt2)


# ---------------------------------------------------------------- texts
def test_texts_too_short(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    msg = "texts too short to fill one calibration sample of 128 tokens: give more text or lower seq_len"
    with pytest.raises(ValueError, match=msg):
        ffcore.fit(model, tok, ["a short text"], tmp_path / "out", CFG, progress=False)
    with pytest.raises(ValueError, match=msg):
        ffcore.fit(model, tok, [], tmp_path / "out", CFG, progress=False)
    with pytest.raises(ValueError, match="training needs at least one more"):
        text_samples(tok, ["x" * 300], 128, 2, 6)  # two windows, both for the calibration
    with pytest.warns(UserWarning, match="using 2 \\+ 6 \\+ 1"):
        s = text_samples(tok, ["x" * 1150], 128, 2, 6, 2)  # nine windows of 127 + BOS: validation shrinks
    assert {p: len(t) for p, t in s.parts.items()} == {"calibration": 2, "validation": 1, "train": 6}
    with pytest.warns(UserWarning, match="using 2 \\+ 4 \\+ 0"):
        s = text_samples(tok, ["x" * 770], 128, 2, 6, 2)  # six windows: no validation, less training
    assert {p: len(t) for p, t in s.parts.items()} == {"calibration": 2, "validation": 0, "train": 4}


def test_texts_from_a_list_a_file_or_a_folder_give_disjoint_parts(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    one = "\n\n".join(TEXTS[:40])
    (tmp_path / "corpus.txt").write_text(one)
    (tmp_path / "dir").mkdir()
    for i, t in enumerate(TEXTS[:40]):
        (tmp_path / "dir" / f"doc{i:03d}.txt").write_text(t)
    (tmp_path / "dir" / ".hidden").write_text("ignored")
    s_file = text_samples(tok, tmp_path / "corpus.txt", 128, 2, 6, 2)
    s_str = text_samples(tok, str(tmp_path / "corpus.txt"), 128, 2, 6, 2)
    s_dir = text_samples(tok, tmp_path / "dir", 128, 2, 6, 2)
    s_list = text_samples(tok, TEXTS[:40], 128, 2, 6, 2)
    assert s_file.info() == s_str.info()
    assert s_dir.info()["sha256"] == s_list.info()["sha256"]  # a folder reads its files in name order
    for s in (s_file, s_list):
        assert all(t.shape == (n, 128) for t, n in zip(s.parts.values(), (2, 2, 6)))
        assert all(int(t[0, 0]) == tok.bos_token_id for t in s.parts.values())
        windows = [set(w) for w in s.windows.values()]
        assert sum(map(len, windows)) == len(set().union(*windows)) == 10  # no window in two parts
    assert text_samples(tok, TEXTS[:40], 128, 2, 6, 2, seed=1).info()["sha256"] != s_list.info()["sha256"]
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        text_samples(tok, tmp_path / "nope.txt", 128, 2, 6)
    with pytest.raises(TypeError, match="list of strings"):
        text_samples(tok, [b"bytes"], 128, 2, 6)


def test_fitconfig_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seq_length'\]"):
        FitConfig.from_dict({"seq_length": 256})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs'\]"):
        FitConfig.from_dict({"predictor": {"epochs": 3}})
    with pytest.raises(TypeError):
        FitConfig(seq_length=256)  # type: ignore[call-arg]
    for bad, match in (({"seq_len": 100, "block_size": 32}, "multiple"), ({"seq_len": 128}, "two 128-token blocks"),
                       ({"sparsities": (0.3, 1.2)}, r"\(0, 1\)"), ({"min_density": 0.6}, "min_density"),
                       ({"levels_per_block": 9}, "levels_per_block"), ({"train_samples": 0}, "train_samples")):
        with pytest.raises(ValueError, match=match):
            FitConfig.from_dict(bad)
    cfg = FitConfig()
    assert cfg.sparsity_range == (0.3, 0.5) and cfg.seq_len % cfg.block_size == 0


# ---------------------------------------------------------------- interruption and resume
def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("simulated interruption")


def test_an_interrupted_fit_leaves_no_bundle_and_a_rerun_resumes(
    tiny: tuple[Any, Any], fitted: tuple[FastForward, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tok = tiny
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        mp.setattr(ffit, "train_compensator", _boom)  # stage 4 fails after 1-3 have finished
        with pytest.raises(RuntimeError, match="simulated interruption"):
            ffcore.fit(model, tok, TEXTS, out, CFG, progress=False)
    assert not (out / BUNDLE_FILE).exists() and not (out / fb.PREDICTOR_FILE).exists()
    with pytest.raises(FileNotFoundError, match=r"\.work/ folder holds an unfinished fit"):
        FastForward.from_pretrained(out, model)
    captured = []
    real_capture = ffit.capture
    with monkeypatch.context() as mp:  # the finished stages must not run again
        for name in ("calibrate_ids", "train_predictor"):
            mp.setattr(ffit, name, _boom)
        mp.setattr(ffit, "capture", lambda m, ids, *a, **k: captured.append(len(ids)) or real_capture(m, ids, *a, **k))
        ff = ffcore.fit(model, tok, TEXTS, out, CFG, progress=False)
    assert captured == [2]  # only the validation part (2 samples, one batch) is collected: training is reused
    stages = ff.meta["stages"]
    assert [stages[s]["reused"] for s in ("calibration", "collection", "predictor")] == [True, True, True]
    assert not stages["compensator"]["reused"] and not (out / ".work").exists()
    assert ff.plan(0.5).key() == fitted[0].plan(0.5).key()  # deterministic: the same bundle as one uninterrupted fit
    assert torch.equal(logits(model, FastForward.from_pretrained(out, model).plan(0.5), prompt_ids()),
                       logits(model, fitted[0].plan(0.5), prompt_ids()))
    with monkeypatch.context() as mp:  # the same fit again: the finished bundle is just loaded
        for name in ("calibrate_ids", "capture", "train_predictor", "train_compensator", "write_bundle"):
            mp.setattr(ffit, name, _boom)
        assert ffcore.fit(model, tok, TEXTS, out, CFG, progress=False).plan(0.5).key() == ff.plan(0.5).key()


def test_a_collection_interrupted_mid_way_resumes_by_shard(tiny: tuple[Any, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny
    cfg = CFG.replace(samples_per_shard=2, batch_size=1, val_samples=0)
    calls = {"n": 0}
    real = ffit.capture

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 (samples 0-1) is written, shard 1 is half done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        mp.setattr(ffit, "capture", flaky)
        with pytest.raises(KeyboardInterrupt):
            ffcore.fit(model, tok, TEXTS, out, cfg, progress=False, keep_work=True)
    shards = sorted(p.name for p in (out / ".work" / "collect_train").glob("shard_*"))
    assert shards == ["shard_00000.safetensors"] and not (out / BUNDLE_FILE).exists()
    calls["n"] = 0
    with monkeypatch.context() as mp:
        mp.setattr(ffit, "capture", flaky)
        mp.setattr(ffit, "calibrate_ids", _boom)
        calls["n"] = -100  # no more interruptions
        ff = ffcore.fit(model, tok, TEXTS, out, cfg, progress=False, keep_work=True)
    manifest = json.loads((out / ".work" / "collect_train" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["resumed_shards"] == 1 and calls["n"] == -100 + 4  # 4 samples left
    assert ff.meta["validation"] is None and ff.meta["data"]["samples"]["validation"] == 0
    # a changed setting redoes what depends on it and reuses the rest
    with monkeypatch.context() as mp:
        mp.setattr(ffit, "calibrate_ids", _boom)
        mp.setattr(ffit, "capture", _boom)
        mp.setattr(ffit, "train_predictor", _boom)
        ff2 = ffcore.fit(model, tok, TEXTS, out, cfg.replace(compensator={**SMALL["compensator"], "max_epochs": 1}),
                         progress=False)
    assert not ff2.meta["stages"]["compensator"]["reused"] and ff2.meta["stages"]["predictor"]["reused"]


def test_bundle_writes_are_atomic(tiny: tuple[Any, Any], fitted: tuple[FastForward, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny
    ff, out = fitted
    target = copy_bundle(out, tmp_path / "b")
    with monkeypatch.context() as mp:
        mp.setattr(fb, "write_json_atomic", _boom)  # dies after the weights are renamed, before the JSON
        with pytest.raises(RuntimeError):
            ff.save_pretrained(target)
        with pytest.raises(RuntimeError):
            ff.save_pretrained(tmp_path / "new")
    for folder in (target, tmp_path / "new"):
        with pytest.raises(FileNotFoundError, match="not a FastForward bundle"):
            FastForward.from_pretrained(folder, model)
    with monkeypatch.context() as mp:
        mp.setattr(fb, "save_file", _boom)  # dies while writing the weights: the old bundle is untouched
        with pytest.raises(RuntimeError):
            ff.save_pretrained(copy_bundle(out, tmp_path / "c"))
    assert FastForward.from_pretrained(tmp_path / "c", model).plan(0.4).key() == ff.plan(0.4).key()


# ---------------------------------------------------------------- the command line
def test_cli_fit_and_generate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TEXTS))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("".join(topics[k] for k in sorted(topics)[-10:])[:400])
    config = tmp_path / "fit.json"
    config.write_text(json.dumps({k: v for k, v in SMALL.items() if k not in ("seq_len", "block_size")}))
    out = tmp_path / "bundle"
    assert cli(["fit", "--model", "tiny-llama", "--texts", str(corpus), "--out", str(out), "--config", str(config),
                "--seq-len", "128", "--block-size", "32", "--quiet"]) == 0
    assert "bundle:" in capsys.readouterr().out
    model, _ = load_model("tiny-llama")
    ff = FastForward.from_pretrained(out, model)
    assert ff.block_size == 32 and ff.meta["fit_config"]["seq_len"] == 128
    assert cli(["generate", "--model", "tiny-llama", "--bundle", str(out), "--sparsity", "0.4", "--prompt-file",
                str(prompt), "--max-new-tokens", "4", "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    T = len(tiny_tokenizer()(prompt.read_text()).input_ids)
    assert f"prefill of {T} tokens ({sparse_token_count(T, 32)} in sparse blocks), sparsity 0.4, 2 interleaved" in text
    assert "speedup" in text and "dense" in text
    assert cli(["generate", "--model", "tiny-llama", "--bundle", str(out), "--sparsity", "0.7", "--prompt", "hi"]) == 2
    assert "outside this bundle's trained range [0.3, 0.5]" in capsys.readouterr().err
    assert cli(["fit", "--model", "tiny-llama", "--texts", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # `python -m ffcore` as a user runs it
    proc = subprocess.run([sys.executable, "-m", "ffcore", "generate", "--model", "tiny-llama", "--bundle", str(out),
                           "--prompt", "The quick brown fox", "--max-new-tokens", "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fill no sparse block" in proc.stdout  # 20 tokens: only dense blocks, said so instead of a timing
