"""Activation collection: the dense model's FFN inputs and per-block oracle scores, sharded on disk, compactly.

For every layer and every full `block_size`-token block of a sample we keep what training needs:

* `scores` : the block's oracle (GRIFFIN) neuron importance, `[f]` (stored fp16, loaded fp32),
             computed at collection time from the dense intermediate activations
             `h = act(W_gate x) * (W_up x)`;
* `pooled` : the mean over the block's tokens of the FFN input (the post-attention norm output =
             the MLP's input), `[d]` fp16: the predictor's input (its attention pool starts as, and
             in the default training stays, the mean; notebook 03 measured no gain from learning q);
* `X`      : the FFN input of `tokens_per_block` tokens sampled from the block (deterministic
             positions, `token_pos`), `[t, d]` fp16: the compensator's training tokens. With
             `tokens_per_block=None` every token is kept (`[B, d]`, the format the attention-pool
             phase of the predictor needs).

So a block costs `L (f + d + t d)` fp16 values instead of `L B d`: about 0.37 MB for gemma3-270m at
t = 16 instead of 2.9 MB, which is what lets the training set grow to thousands of blocks.

`X` and `pooled` are captured by a forward pre-hook on each layer's `mlp`, `h` by a forward pre-hook on
its `down_proj` (whose input *is* `h`), so the model runs once and the FFN is never recomputed; the
forward is cut short after the last layer's FFN (no final norm / lm head).

A collection is a folder (notebook 03 uses `<artifacts>/<model>/collect_<split>/`) of safetensors
shards plus a `manifest.json` that records what was collected (model fingerprint, split, seq_len, n
samples, seed, domains, block size, tokens per block, shard layout) and the provenance of every sample
(its domain and the document ids from `ffcore.data.token_samples`). A rerun with the same manifest key
skips shards already on disk, so an interrupted collection resumes. Blocks are stored sample-major in
block order, so "the first block of the same sample" is available to the predictor and to first-block
static baselines.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ffcore.config import StrictConfig
from ffcore.data import DOMAINS, SOURCES, SPLITS, token_samples
from ffcore.engine.layout import BLOCK_SIZE
from ffcore.models import decoder_layers, gated_mlps, model_dims, model_fingerprint, model_slug

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


@dataclasses.dataclass
class CollectConfig(StrictConfig):
    """What to collect from one split.

    split:             'calibration', 'train' or 'eval' (disjoint by document, see ffcore.data).
    n_samples:         number of token samples of `seq_len` tokens.
    seq_len:           tokens per sample; a multiple of `block_size` (only full blocks are kept).
    seed:              seed of `token_samples` (document shuffle).
    block_size:        tokens per block (paper: 128).
    sources:           domains to draw from, round-robin (`ffcore.data.DOMAINS`).
    tokens_per_block:  FFN-input tokens kept per block (sampled); None keeps all `block_size`.
    samples_per_shard: samples written per safetensors shard (bounds memory during collection).
    batch_size:        samples per forward pass (equal lengths, no padding).
    """

    split: str = "train"
    n_samples: int = 32
    seq_len: int = 1024
    seed: int = 0
    block_size: int = BLOCK_SIZE
    sources: tuple[str, ...] = SOURCES
    tokens_per_block: int | None = None
    samples_per_shard: int = 8
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {SPLITS}")
        if self.seq_len % self.block_size:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of block_size {self.block_size}")
        if min(self.n_samples, self.samples_per_shard, self.batch_size) < 1:
            raise ValueError("n_samples, samples_per_shard and batch_size must be >= 1")
        if self.tokens_per_block is not None and not 1 <= self.tokens_per_block <= self.block_size:
            raise ValueError(f"tokens_per_block must be in [1, block_size={self.block_size}] or None")
        self.sources = tuple(self.sources)
        unknown = sorted(set(self.sources) - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; choose from {DOMAINS}")

    @property
    def kept_tokens(self) -> int:
        """FFN-input tokens stored per block."""
        return self.block_size if self.tokens_per_block is None else self.tokens_per_block

    @property
    def blocks_per_sample(self) -> int:
        """Full blocks in one sample."""
        return self.seq_len // self.block_size


@dataclasses.dataclass
class Collection:
    """A loaded collection: blocks in sample-major, block order."""

    X: Tensor | None  # [n_blocks, n_layers, t, d] fp16 FFN inputs of t tokens per block (None: loaded without X)
    scores: Tensor  # [n_blocks, n_layers, f] fp32 oracle (GRIFFIN) scores
    sample: Tensor  # [n_blocks] int64 sample index within the collection
    position: Tensor  # [n_blocks] int64 block position within its sample (0 = first block)
    layers: list[int]  # which model layers the second dim holds
    manifest: dict[str, Any]
    pooled: Tensor | None = None  # [n_blocks, n_layers, d] fp16 mean FFN input over the block's tokens
    domain: Tensor | None = None  # [n_blocks] int64 index into `domain_names`

    @property
    def n_blocks(self) -> int:
        """Number of blocks."""
        return int(self.sample.numel())

    @property
    def domain_names(self) -> list[str]:
        """The domains the `domain` indices refer to."""
        return list(self.manifest.get("domains", self.manifest["key"]["sources"]))

    def block_domains(self) -> list[str]:
        """The domain of every block."""
        names = self.domain_names
        if self.domain is None:  # a single-domain or pre-v2 collection: from the samples' records
            by_sample = {s["index"]: s["source"] for s in self.manifest["samples"]}
            return [by_sample[int(s)] for s in self.sample]
        return [names[int(i)] for i in self.domain]

    def doc_ids(self) -> set[str]:
        """Every document id any block of this collection came from."""
        return {d for s in self.manifest["samples"] for d in s["doc_ids"]}

    def first_rows(self) -> Tensor:
        """For every block, the row of its own sample's first block (position 0): [n_blocks] int64."""
        first = {int(s): i for i, (s, p) in enumerate(zip(self.sample.tolist(), self.position.tolist())) if p == 0}
        missing = set(self.sample.tolist()) - set(first)
        if missing:
            raise ValueError(f"samples {sorted(missing)[:5]} have no first block in this collection")
        return torch.tensor([first[int(s)] for s in self.sample])

    def mean_inputs(self) -> Tensor:
        """The mean FFN input of every block and layer: [n_blocks, n_layers, d] (fp32)."""
        if self.pooled is not None:
            return self.pooled.float()
        if self.X is None or self.X.shape[2] != self.manifest["key"]["block_size"]:
            raise ValueError("the collection has neither pooled inputs nor every token's X")
        return self.X.float().mean(2)

    def subset(self, rows: Tensor) -> "Collection":
        """The blocks at `rows` (a LongTensor or bool mask over blocks)."""
        rows = rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows
        pick = (lambda t: None if t is None else t[rows])
        return Collection(pick(self.X), self.scores[rows], self.sample[rows], self.position[rows], self.layers,
                          self.manifest, pick(self.pooled), pick(self.domain))

    def of_domains(self, domains: Sequence[str]) -> "Collection":
        """The blocks whose domain is in `domains`."""
        keep = set(domains)
        return self.subset(torch.tensor([d in keep for d in self.block_domains()], dtype=torch.bool))


def manifest_key(cfg: CollectConfig, fingerprint: str) -> dict[str, Any]:
    """The fields that decide whether shards on disk can be reused."""
    return {
        "format": FORMAT_VERSION, "fingerprint": fingerprint, "split": cfg.split, "n_samples": cfg.n_samples,
        "seq_len": cfg.seq_len, "seed": cfg.seed, "block_size": cfg.block_size, "sources": list(cfg.sources),
        "tokens_per_block": cfg.tokens_per_block, "samples_per_shard": cfg.samples_per_shard,
    }


# ------------------------------------------------------------------------------ capture
class _StopForward(Exception):
    """Raised after the last layer's FFN input is captured: nothing downstream is needed."""


def block_griffin_scores(h: Tensor, block_size: int) -> Tensor:
    """GRIFFIN scores of every full block: h [b, T, f] -> [b, T // block_size, f] (fp32)."""
    b, T, f = h.shape
    nb = T // block_size
    hb = h[:, : nb * block_size].float().reshape(b, nb, block_size, f)  # [b, T, f] -> [b, nb, B, f]
    hb = hb / hb.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # unit L2 norm per token
    return hb.norm(dim=2)  # column L2 norm over the block's tokens -> [b, nb, f]


@torch.no_grad()
def capture(
    model: nn.Module, input_ids: Tensor, block_size: int, token_pos: Tensor | None = None,
) -> dict[str, Tensor]:
    """One dense forward, cut after the last FFN: per full block and layer, the oracle scores, the mean FFN
    input, and the FFN input of the tokens at `token_pos` ([b, nb, t] positions within each block; None: all).

    Returns {"scores": [b, nb, L, f] fp32, "pooled": [b, nb, L, d] fp16, "x": [b, nb, L, t, d] fp16}.
    """
    layers = decoder_layers(model)
    mlps = gated_mlps(model)
    if any(getattr(layer.mlp, "original", None) is not None for layer in layers):
        raise RuntimeError("capture needs the dense model; it is inside ffcore.sparsify")
    b, T = input_ids.shape
    nb = T // block_size
    xs: list[Tensor | None] = [None] * len(mlps)
    pooled: list[Tensor | None] = [None] * len(mlps)
    sc: list[Tensor | None] = [None] * len(mlps)

    def x_hook(i: int):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0][:, : nb * block_size].reshape(b, nb, block_size, -1)  # [b, T, d] -> [b, nb, B, d]
            pooled[i] = x.float().mean(2).to(torch.float16)  # [b, nb, d]
            if token_pos is not None:  # the sampled tokens of every block: [b, nb, t, d]
                x = x.gather(2, token_pos.to(x.device)[..., None].expand(-1, -1, -1, x.shape[-1]))
            xs[i] = x.to(torch.float16)
        return hook

    def h_hook(i: int):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple) -> None:
            sc[i] = block_griffin_scores(args[0], block_size)  # [b, T, f] -> [b, nb, f]
            if i == len(mlps) - 1:
                raise _StopForward
        return hook

    handles = []
    try:
        for i, mlp in enumerate(mlps):
            handles.append(mlp.register_forward_pre_hook(x_hook(i)))
            handles.append(mlp.down_proj.register_forward_pre_hook(h_hook(i)))
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    finally:
        for hd in handles:
            hd.remove()
    if any(t is None for t in xs) or any(t is None for t in sc):
        raise RuntimeError("not every layer's MLP ran; is this a supported decoder?")
    return {"scores": torch.stack(sc, dim=2), "pooled": torch.stack(pooled, dim=2), "x": torch.stack(xs, dim=2)}


def capture_blocks(model: nn.Module, input_ids: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """One dense forward: every token's FFN input X [b, nb, L, B, d] (fp16) and oracle scores [b, nb, L, f] (fp32)."""
    out = capture(model, input_ids, block_size)
    return out["x"], out["scores"]


def token_positions(n_samples: int, blocks: int, block_size: int, t: int, seed: int) -> Tensor:
    """Sorted random positions of t tokens in every block of every sample: [n_samples, blocks, t] (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_samples, blocks, block_size, generator=g).argsort(-1)[..., :t].sort(-1).values


# ------------------------------------------------------------------------------ collect
def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def collect(
    model: nn.Module, tokenizer: Any, cfg: CollectConfig, folder: Path, model_key: str | None = None,
    progress: bool = True,
) -> Path:
    """Collect (or resume collecting) `cfg` for `model` into `folder`; return the folder."""
    model_key = model_key or getattr(model, "ffcore_name", type(model).__name__)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fp = model_fingerprint(model)
    key = manifest_key(cfg, fp)
    old = _read_manifest(folder)
    if old is not None and old.get("key") != key:
        print(f"[ffcore.collect] {folder}: settings or model changed; discarding the old collection")
        for sh in old.get("shards", []):
            (folder / sh["file"]).unlink(missing_ok=True)
        (folder / MANIFEST).unlink()
        old = None
    samples = token_samples(tokenizer, cfg.split, cfg.seq_len, cfg.n_samples, cfg.sources, cfg.seed)
    ids = samples["input_ids"]  # [n, seq_len]
    dims = model_dims(model)
    shards = [
        {"file": f"shard_{j:05d}.safetensors", "samples": [s, min(s + cfg.samples_per_shard, cfg.n_samples)]}
        for j, s in enumerate(range(0, cfg.n_samples, cfg.samples_per_shard))
    ]
    domains = list(dict.fromkeys(samples["source"]))
    manifest = {
        "key": key, "model": str(model_key), "d": dims["d"], "f": dims["f"], "L": dims["L"],
        "blocks_per_sample": cfg.blocks_per_sample, "n_blocks": cfg.n_samples * cfg.blocks_per_sample,
        "tokens_per_block": cfg.kept_tokens, "domains": domains, "shards": shards, "complete": False,
        "samples": [
            {"index": i, "source": samples["source"][i], "doc_ids": samples["doc_ids"][i]} for i in range(cfg.n_samples)
        ],
    }
    _write_manifest(folder, manifest)
    todo = [sh for sh in shards if not (folder / sh["file"]).exists()]
    t0 = time.time()
    bar = tqdm(total=sum(b - a for a, b in (sh["samples"] for sh in todo)) * cfg.seq_len, unit="tok",
               desc=f"collect {model_slug(model_key)}/{cfg.split}", disable=not progress or not todo)
    nb = cfg.blocks_per_sample
    tok_pos = None if cfg.tokens_per_block is None else token_positions(
        cfg.n_samples, nb, cfg.block_size, cfg.tokens_per_block, cfg.seed)  # [n, nb, t]
    dom_index = torch.tensor([domains.index(src) for src in samples["source"]])  # [n]
    for sh in todo:
        a, b = sh["samples"]
        parts: dict[str, list[Tensor]] = {"x": [], "pooled": [], "scores": []}
        for s in range(a, b, cfg.batch_size):
            e = min(s + cfg.batch_size, b)
            out = capture(model, ids[s:e], cfg.block_size, None if tok_pos is None else tok_pos[s:e])
            for name in parts:
                parts[name].append(out[name].flatten(0, 1))  # [bs, nb, ...] -> [bs*nb, ...]
            bar.update((e - s) * cfg.seq_len)
        tensors = {
            "x": torch.cat(parts["x"]).contiguous(),  # [n_blocks_shard, L, t, d] fp16
            "pooled": torch.cat(parts["pooled"]).contiguous(),  # [n_blocks_shard, L, d] fp16
            "scores": torch.cat(parts["scores"]).to(torch.float16).contiguous(),  # [n_blocks_shard, L, f]
            "sample": torch.arange(a, b).repeat_interleave(nb),  # [n_blocks_shard]
            "position": torch.arange(nb).repeat(b - a),  # [n_blocks_shard]
            "domain": dom_index[a:b].repeat_interleave(nb),  # [n_blocks_shard]
        }
        if tok_pos is not None:
            tensors["token_pos"] = tok_pos[a:b].flatten(0, 1).contiguous()  # [n_blocks_shard, t]
        tmp = folder / (sh["file"] + ".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": fp, "split": cfg.split})
        os.replace(tmp, folder / sh["file"])  # a shard exists under its name only when complete
    bar.close()
    manifest["complete"] = True
    manifest["collect_seconds"] = round(time.time() - t0, 1) if todo else manifest.get("collect_seconds", 0.0)
    manifest["resumed_shards"] = len(shards) - len(todo)
    _write_manifest(folder, manifest)
    return folder


def load_collection_dir(
    folder: Path, layers: Sequence[int] | None = None, with_x: bool = True, fingerprint: str | None = None,
) -> Collection:
    """Load a collection folder (optionally only some layers, or without X); check the fingerprint if given."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{folder}: no complete collection here; run ffcore.collect.collect(...) first")
    if fingerprint is not None and manifest["key"]["fingerprint"] != fingerprint:
        raise ValueError(
            f"{folder} was collected from a model with fingerprint {manifest['key']['fingerprint']}, "
            f"not {fingerprint}; collect again for this model"
        )
    L = manifest["L"]
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < L for i in layers):
        raise ValueError(f"layers {layers} out of range for a {L}-layer collection")
    contiguous = layers == list(range(layers[0], layers[-1] + 1)) if layers else True
    layered = ("scores", "pooled", "x") if with_x else ("scores", "pooled")
    parts: dict[str, list[Tensor]] = {k: [] for k in (*layered, "sample", "position", "domain")}
    for sh in manifest["shards"]:
        with safe_open(str(folder / sh["file"]), framework="pt") as fh:
            for name in layered:
                sl = fh.get_slice(name)
                if contiguous:
                    t = sl[:, layers[0] : layers[-1] + 1]
                else:
                    t = torch.cat([sl[:, i : i + 1] for i in layers], dim=1)
                parts[name].append(t)
            for name in ("sample", "position", "domain"):
                parts[name].append(fh.get_tensor(name))
    X = torch.cat(parts["x"]) if with_x else None
    return Collection(X, torch.cat(parts["scores"]).float(), torch.cat(parts["sample"]), torch.cat(parts["position"]),
                      layers, manifest, torch.cat(parts["pooled"]), torch.cat(parts["domain"]))


def collection_doc_ids(folder: Path) -> set[str]:
    """Every document id recorded in a collection's manifest (no tensors loaded)."""
    manifest = _read_manifest(Path(folder))
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no manifest")
    return {d for s in manifest["samples"] for d in s["doc_ids"]}
