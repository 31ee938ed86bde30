"""`ffcore.fit` (this module, `ffcore.fitting`): FastForward on your own model in one call, from your own texts to one bundle folder.

    import torch, ffcore
    model, tok = ffcore.load_model("/path/to/checkpoint")            # any local gated-MLP HF checkpoint
    ff = ffcore.fit(model, tok, "my_texts/", "my-bundle/")           # a few minutes for a 135M model on a CPU
    with torch.no_grad(), ffcore.sparsify(model, ff.plan(sparsity=0.5)):
        out = model.generate(ids, max_new_tokens=32)
    ff = ffcore.FastForward.from_pretrained("my-bundle/", model)      # later, anywhere

`texts` (a list of strings, a text file, or a folder of text files, read in name order) is tokenized,
joined with blank lines and cut into consecutive windows of `seq_len` tokens (each opening with the
tokenizer's BOS token when it has one); the windows are shuffled with `seed` and dealt into three disjoint
parts: calibration, validation, training (no window belongs to two parts). The stages:

1. **calibration**: attention mass received per key block on the calibration part (`ffcore.calibration`),
   the layer importances `s_i` that Algorithm 1 (`ffcore.schedule`) turns into per-layer densities;
2. **collection**: the dense model's FFN inputs and oracle scores on the training part (`ffcore.collect`'s
   format, sharded, resumable);
3. **predictor**: the expert predictor (`ffcore.predictor.train_predictor`);
4. **compensator**: distillation targets on the oracle's and the predictor's masks over the trained
   sparsity grid (each layer at the densities the layer-wise schedule gives it there), then the error
   compensator (`ffcore.compensator`);
5. **validation**: on the held-out validation part, the predictor's recall of the oracle's experts and the
   compensator's FFN-output error reduction at the ends and middle of the trained range (uniform densities,
   layer means; in the bundle).

Each stage keeps its result in `out_dir/.work/` under a key of everything it depends on (the model's
fingerprint, the token samples' sha256, the settings, the upstream weights), so a rerun after an
interruption reuses every finished stage (and every finished collection shard) and a changed setting redoes
only what depends on it. The model's forward passes (calibration, collection, distillation targets,
validation) run where the model is (CUDA included); the two small trainers run on the CPU. The bundle
(`ffcore.bundle`) is written at the end, atomically; the work folder is then removed (`keep_work=True` keeps
it). A rerun with the same model, texts and settings finds the finished bundle and just loads it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ffcore.bundle import (BUNDLE_FILE, FastForward, is_bundle, model_info, read_meta, versions, write_bundle,
                           write_json_atomic)
from ffcore.calibration import CalibrationResult, attention_block_mass, attention_window, check_seq_len
from ffcore.collect import FORMAT_VERSION as COLLECTION_FORMAT
from ffcore.collect import MANIFEST, capture, load_collection_dir, token_positions
from ffcore.compensator import (CompensatorConfig, ErrorCompensator, compensator_meta, distill_data, heldout_metrics,
                                load_compensator, mask_sources, save_compensator, schedule_grid, train_compensator)
from ffcore.config import StrictConfig
from ffcore.engine.layout import BLOCK_SIZE, check_block_size
from ffcore.engine.plan import weights_digest
from ffcore.models import decoder_layers, gated_mlps, model_dims, model_fingerprint
from ffcore.predictor import (ExpertPredictor, PredictorConfig, load_predictor, predict_scores, predictor_meta,
                              save_predictor, selection_metrics, train_predictor, with_blend)
from ffcore.schedule import DEFAULT_MIN_DENSITY, ORDERS, layerwise_schedule

WORK_DIR = ".work"
PARTS = ("calibration", "validation", "train")
SOURCE = "texts"  # the one "domain" of a collection made from user texts
_PIECE_CHARS = 1 << 15  # characters tokenized per call (long texts are cut at line ends)


# ------------------------------------------------------------------------------ settings
def _default_predictor() -> PredictorConfig:
    """The predictor's training settings for a fit (mean-pool phase only: the collection keeps 16 tokens/block)."""
    return PredictorConfig(mean_pool_epochs=30, max_epochs=0, batch_blocks=16, patience=4)


def _default_compensator() -> CompensatorConfig:
    """The compensator's training settings for a fit (oracle warm start, then predictor masks)."""
    return CompensatorConfig(batch_blocks=4, lr=2e-3, max_epochs=8, warm_epochs=6, patience=2)


@dataclasses.dataclass
class FitConfig(StrictConfig):
    """Settings of `ffcore.fit` (unknown keys are an error). The defaults fit a 135M model in minutes on a laptop CPU.

    Text and samples:
      seq_len:          tokens per sample; a multiple of `block_size`, at least two blocks (the sink block and
                        one more). Longer samples give more non-first blocks per sample (more training signal) and
                        a calibration closer to long prompts: 2048-4096 for a real deployment.
      block_size:       tokens per prefill block (the paper's 128); the bundle runs at this block size.
      calib_samples:    samples for the attention-sink calibration (s_i): 4-8 are plenty.
      train_samples:    samples the predictor and compensator are trained on (15 % of them held out for early
                        stopping). The main knob to scale up: 200+ samples of 1024-2048 tokens on a GPU.
      val_samples:      held-out samples for the validation metrics in the bundle (0: none).
      seed:             window shuffle, sampled token positions, distillation levels.
    Calibration and schedule:
      chunk_size:       queries per chunk of the calibration (memory ~ chunk x seq_len x heads).
      min_density:      floor of any layer's density in the schedule (see ffcore.schedule).
      order:            Algorithm 1's walk: 'sorted' (water-filling, default) or 'layer' (literal).
    Collection:
      tokens_per_block: FFN-input tokens kept per block for the compensator (memory: L x (f + d + t d) fp16 per
                        block); 16-64.
      batch_size:       samples per forward pass while collecting.
      samples_per_shard: samples per resumable shard.
    Training:
      sparsities:       the overall sparsities the compensator is trained on (its grid); the bundle serves the
                        range [min, max] of them.
      schedule_grid:    True: each layer trains at the densities the layer-wise schedule gives it at the grid
                        sparsities (where it will run; as notebook 04); False: every layer at the uniform 1 - s.
      levels_per_block: grid sparsities stored per (block, layer) of the distillation targets.
      blend:            None (the paper's predictor) or a weight w: rank experts by a fixed blend of the first
                        block's scores and the predictor's (beyond the paper; ffcore.predictor.with_blend).
      predictor:        ffcore.predictor.PredictorConfig (a dict works): epochs, batch, learning rate, ...
      compensator:      ffcore.compensator.CompensatorConfig (a dict works): variant, epochs, batch, ...
    """

    seq_len: int = 512
    block_size: int = BLOCK_SIZE
    calib_samples: int = 4
    train_samples: int = 32
    val_samples: int = 4
    seed: int = 0
    chunk_size: int = 128
    min_density: float = DEFAULT_MIN_DENSITY
    order: str = "sorted"
    tokens_per_block: int = 16
    batch_size: int = 2
    samples_per_shard: int = 8
    sparsities: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5)
    schedule_grid: bool = True
    levels_per_block: int = 2
    blend: float | None = None
    predictor: PredictorConfig = dataclasses.field(default_factory=_default_predictor)
    compensator: CompensatorConfig = dataclasses.field(default_factory=_default_compensator)

    def __post_init__(self) -> None:
        if isinstance(self.predictor, Mapping):
            self.predictor = PredictorConfig.from_dict(self.predictor)
        if isinstance(self.compensator, Mapping):
            self.compensator = CompensatorConfig.from_dict(self.compensator)
        if not isinstance(self.predictor, PredictorConfig) or not isinstance(self.compensator, CompensatorConfig):
            raise TypeError("FitConfig: predictor / compensator must be a PredictorConfig / CompensatorConfig or a dict")
        check_block_size(self.block_size)
        check_seq_len(self.seq_len, self.block_size)
        if self.seq_len % self.block_size:
            raise ValueError(f"FitConfig: seq_len {self.seq_len} is not a multiple of block_size {self.block_size}")
        if self.calib_samples < 1 or self.train_samples < 1 or self.val_samples < 0:
            raise ValueError("FitConfig: calib_samples and train_samples must be >= 1 and val_samples >= 0")
        if min(self.chunk_size, self.batch_size, self.samples_per_shard) < 1:
            raise ValueError("FitConfig: chunk_size, batch_size and samples_per_shard must be >= 1")
        if not 1 <= self.tokens_per_block <= self.block_size:
            raise ValueError(f"FitConfig: tokens_per_block must be in [1, block_size={self.block_size}]")
        self.sparsities = tuple(sorted(float(s) for s in self.sparsities))
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError(f"FitConfig: sparsities must be a non-empty list of values in (0, 1), got {self.sparsities}")
        if not 0.0 < self.min_density <= 1.0 - self.sparsities[-1]:
            raise ValueError(f"FitConfig: min_density {self.min_density} must be in (0, 1 - max sparsity "
                             f"{self.sparsities[-1]}]")
        if self.order not in ORDERS:
            raise ValueError(f"FitConfig: order must be one of {ORDERS}, got {self.order!r}")
        if not 1 <= self.levels_per_block <= len(self.sparsities):
            raise ValueError(f"FitConfig: levels_per_block must be in [1, {len(self.sparsities)}] (the grid size)")
        if self.blend is not None and (isinstance(self.blend, bool) or not self.blend >= 0):
            raise ValueError(f"FitConfig: blend must be None or a weight >= 0, got {self.blend!r}")

    @property
    def sparsity_range(self) -> tuple[float, float]:
        """(lowest, highest) sparsity the bundle serves."""
        return self.sparsities[0], self.sparsities[-1]


def as_config(config: FitConfig | Mapping[str, Any] | None) -> FitConfig:
    """A FitConfig from a FitConfig, a mapping (unknown keys rejected) or None (the defaults)."""
    if config is None:
        return FitConfig()
    if isinstance(config, FitConfig):
        return config
    if isinstance(config, Mapping):
        return FitConfig.from_dict(config)
    raise TypeError(f"config must be a FitConfig or a dict, got {type(config).__name__}")


def _normal(obj: Any) -> Any:
    """A JSON round trip (tuples become lists), so keys compare equal to the ones read back from disk."""
    return json.loads(json.dumps(obj, sort_keys=True))


# ------------------------------------------------------------------------------ texts -> token samples
def iter_documents(texts: str | os.PathLike | Sequence[str]) -> Iterator[tuple[str, str]]:
    """(name, text) of every document: the strings of a list, a text file, or the files of a folder (name order)."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts).expanduser()
        try:
            is_file, is_dir = path.is_file(), path.is_dir()
        except OSError:  # e.g. a long text passed where a path was expected
            is_file = is_dir = False
        if is_file:
            yield path.name, path.read_text(encoding="utf-8", errors="replace")
        elif is_dir:
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise FileNotFoundError(f"texts={str(texts)!r}: the folder holds no text files")
            for p in files:
                try:
                    text = p.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    warnings.warn(f"ffcore.fit: skipping {p}: not UTF-8 text", stacklevel=2)
                    continue
                yield str(p.relative_to(path)), text
        else:
            shown = str(texts) if len(str(texts)) < 200 else str(texts)[:200] + "..."
            raise FileNotFoundError(f"texts={shown!r} is neither a file nor a folder; pass a list of strings to "
                                    "give the text itself")
    elif isinstance(texts, Sequence) and all(isinstance(t, str) for t in texts):
        for i, t in enumerate(texts):
            yield f"texts[{i}]", t
    else:
        raise TypeError(f"texts must be a list of strings, a text file or a folder of text files, got "
                        f"{type(texts).__name__}")


def _pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
    """A long text in pieces of about `size` characters, cut after a line end (or a space) where there is one."""
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = text.rfind("\n", i + size // 2, j)
            k = text.rfind(" ", i + size // 2, j) if k < 0 else k
            j = k + 1 if k >= 0 else j
        yield text[i:j]
        i = j


@dataclasses.dataclass
class TextSamples:
    """Token samples of user texts in three disjoint parts, and where they came from."""

    parts: dict[str, Tensor]  # part -> LongTensor [n, seq_len]
    windows: dict[str, list[int]]  # part -> index of each sample's window in reading order
    seq_len: int
    documents: int  # documents read (reading stops once enough windows are cut)
    tokens: int  # tokens read
    available: int  # windows cut

    def digest(self, part: str) -> str:
        """sha256 of one part's token ids (what the stages' reuse keys depend on)."""
        return hashlib.sha256(self.parts[part].numpy().tobytes()).hexdigest()

    def info(self) -> dict[str, Any]:
        """What a bundle records about its data: sizes and sha256 of every part."""
        return {"seq_len": self.seq_len, "documents_read": self.documents, "tokens_read": self.tokens,
                "windows": self.available, "samples": {p: int(t.shape[0]) for p, t in self.parts.items()},
                "sha256": {p: self.digest(p) for p in self.parts}}


def text_samples(
    tokenizer: Any, texts: str | os.PathLike | Sequence[str], seq_len: int, calib_samples: int, train_samples: int,
    val_samples: int = 0, seed: int = 0,
) -> TextSamples:
    """Cut texts into `seq_len`-token windows and deal them (shuffled by `seed`) into calibration, validation, training.

    Calibration is served first, then training, then validation; with less text than asked for, validation
    shrinks first (to none), then training (with a warning). Training needs at least one window.
    """
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = seq_len - len(bos)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after the BOS token")
    want = calib_samples + train_samples + val_samples
    windows: list[list[int]] = []
    buf: list[int] = []
    docs = tokens = 0
    for _, text in iter_documents(texts):
        if len(windows) >= want:
            break
        docs += 1
        for piece in _pieces(text + "\n\n"):
            ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            tokens += len(ids)
            buf += ids
            while len(buf) >= body:
                windows.append(bos + buf[:body])
                buf = buf[body:]
            if len(windows) >= want:
                break
    n = len(windows)
    if n == 0:
        raise ValueError(f"texts too short to fill one calibration sample of {seq_len} tokens: give more text or "
                         "lower seq_len")
    n_cal = min(calib_samples, n)
    if n - n_cal < 1:
        raise ValueError(
            f"texts fill only {n} sample(s) of {seq_len} tokens, all taken by the calibration ({calib_samples}); "
            "training needs at least one more: give more text, lower seq_len or calib_samples"
        )
    n_val = min(val_samples, max(0, n - n_cal - train_samples))  # training first: validation gets what is left
    n_train = min(train_samples, n - n_cal - n_val)
    if n_val < val_samples or n_train < train_samples:
        warnings.warn(
            f"ffcore.fit: the texts fill {n} samples of {seq_len} tokens; asked for {calib_samples} calibration + "
            f"{train_samples} training + {val_samples} validation, using {n_cal} + {n_train} + {n_val}. Give more "
            "text for a better predictor and compensator", stacklevel=2,
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    counts = {"calibration": n_cal, "validation": n_val, "train": n_train}
    picked: dict[str, list[int]] = {}
    start = 0
    for part in PARTS:
        picked[part] = order[start:start + counts[part]]
        start += counts[part]
    parts = {p: torch.tensor([windows[i] for i in idx], dtype=torch.long).reshape(len(idx), seq_len)
             for p, idx in picked.items()}
    return TextSamples(parts, picked, seq_len, docs, tokens, n)


# ------------------------------------------------------------------------------ stage 1: calibration
@torch.no_grad()
def calibrate_ids(
    model: nn.Module, input_ids: Tensor, block_size: int = BLOCK_SIZE, chunk_size: int = 128, seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """`ffcore.calibration.calibrate` on given token samples [n, T] instead of the built-in corpora."""
    n, T = input_ids.shape
    check_seq_len(T, block_size)
    name = getattr(model, "ffcore_name", type(model).__name__)
    t0, c0 = time.time(), time.process_time()
    masses = [attention_block_mass(model, row[None], block_size, chunk_size)["block_mass"][0]
              for row in tqdm(input_ids, desc=f"calibrating {name}", unit="sample", disable=not progress)]
    layers = decoder_layers(model)
    return CalibrationResult(
        model=str(name), fingerprint=model_fingerprint(model), seq_len=T, block_size=block_size, seed=seed,
        sources=(SOURCE,), block_mass=torch.stack(masses),  # [n, L, H, nb]
        layer_windows=[attention_window(layer.self_attn, i) for i, layer in enumerate(layers)],
        seconds=time.time() - t0, cpu_seconds=time.process_time() - c0,
    )


# ------------------------------------------------------------------------------ stage 2: collection
def collect_ids(
    model: nn.Module, input_ids: Tensor, folder: Path, *, split: str, block_size: int = BLOCK_SIZE,
    tokens_per_block: int | None = 16, samples_per_shard: int = 8, batch_size: int = 2, seed: int = 0,
    windows: Sequence[int] | None = None, model_key: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """`ffcore.collect.collect` on given token samples [n, T]: the same folder format, resumable by shard; the manifest.

    `windows` names each sample's window (its document id in the manifest, for leak checks between parts).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, T = input_ids.shape
    if T % block_size:
        raise ValueError(f"samples of {T} tokens are not a multiple of block_size {block_size}")
    fp = model_fingerprint(model)
    key = {
        "format": COLLECTION_FORMAT, "fingerprint": fp, "split": split, "n_samples": n, "seq_len": T, "seed": seed,
        "block_size": block_size, "sources": [SOURCE], "tokens_per_block": tokens_per_block,
        "samples_per_shard": samples_per_shard,
        "samples_sha256": hashlib.sha256(input_ids.numpy().tobytes()).hexdigest(),
    }
    path = folder / MANIFEST
    old = json.loads(path.read_text()) if path.exists() else None
    if old is not None and old.get("key") != key:
        for sh in old.get("shards", []):
            (folder / sh["file"]).unlink(missing_ok=True)
        path.unlink()
    windows = list(range(n)) if windows is None else [int(w) for w in windows]
    nb = T // block_size
    dims = model_dims(model)
    shards = [{"file": f"shard_{j:05d}.safetensors", "samples": [s, min(s + samples_per_shard, n)]}
              for j, s in enumerate(range(0, n, samples_per_shard))]
    manifest = {
        "key": key, "model": str(model_key or getattr(model, "ffcore_name", type(model).__name__)),
        "d": dims["d"], "f": dims["f"], "L": dims["L"], "blocks_per_sample": nb, "n_blocks": n * nb,
        "tokens_per_block": block_size if tokens_per_block is None else tokens_per_block, "domains": [SOURCE],
        "shards": shards, "complete": False,
        "samples": [{"index": i, "source": SOURCE, "doc_ids": [f"window:{windows[i]}"]} for i in range(n)],
    }
    write_json_atomic(path, manifest)
    todo = [sh for sh in shards if not (folder / sh["file"]).exists()]
    tok_pos = None if tokens_per_block is None else token_positions(n, nb, block_size, tokens_per_block, seed)
    device = next(model.parameters()).device
    t0 = time.time()
    bar = tqdm(total=sum(b - a for a, b in (sh["samples"] for sh in todo)) * T, unit="tok", desc=f"collect {split}",
               disable=not progress or not todo)
    for sh in todo:
        a, b = sh["samples"]
        parts: dict[str, list[Tensor]] = {"x": [], "pooled": [], "scores": []}
        for s in range(a, b, batch_size):
            e = min(s + batch_size, b)
            out = capture(model, input_ids[s:e].to(device), block_size, None if tok_pos is None else tok_pos[s:e])
            for name in parts:
                parts[name].append(out[name].flatten(0, 1).cpu())  # [bs, nb, ...] -> [bs*nb, ...]
            bar.update((e - s) * T)
        tensors = {
            "x": torch.cat(parts["x"]).contiguous(),  # [blocks, L, t, d] fp16
            "pooled": torch.cat(parts["pooled"]).contiguous(),  # [blocks, L, d] fp16
            "scores": torch.cat(parts["scores"]).to(torch.float16).contiguous(),  # [blocks, L, f]
            "sample": torch.arange(a, b).repeat_interleave(nb),
            "position": torch.arange(nb).repeat(b - a),
            "domain": torch.zeros((b - a) * nb, dtype=torch.long),
        }
        if tok_pos is not None:
            tensors["token_pos"] = tok_pos[a:b].flatten(0, 1).contiguous()  # [blocks, t]
        tmp = folder / (sh["file"] + ".tmp")
        save_file(tensors, str(tmp), metadata={"fingerprint": fp, "split": split})
        os.replace(tmp, folder / sh["file"])  # a shard exists under its name only when complete
    bar.close()
    manifest.update(complete=True, resumed_shards=len(shards) - len(todo),
                    collect_seconds=round(time.time() - t0, 1) if todo else (old or {}).get("collect_seconds", 0.0))
    write_json_atomic(path, manifest)
    return manifest


# ------------------------------------------------------------------------------ the work folder
class WorkFolder:
    """`out_dir/.work/`: one JSON record per finished stage, valid only under the key it was made with."""

    def __init__(self, root: Path) -> None:
        """Create the folder."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """A stage's folder (created)."""
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def done(self, stage: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The record of a finished stage made under `key`, else None."""
        path = self.root / f"{stage}.json"
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return rec if rec.get("key") == _normal(key) else None

    def finish(self, stage: str, key: Mapping[str, Any], **payload: Any) -> dict[str, Any]:
        """Record a finished stage (atomically, after its files are in place); the record."""
        rec = _normal({"key": key, **payload})
        write_json_atomic(self.root / f"{stage}.json", rec)
        return rec


class _Log:
    """Stage lines on stdout when progress is on."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"[ffcore.fit {time.time() - self.t0:6.1f}s] {msg}", flush=True)


def _stage(stages: dict[str, Any], name: str, t0: float, reused: bool, log: _Log, what: str = "") -> None:
    stages[name] = {"seconds": round(time.time() - t0, 1), "reused": reused}
    log(f"{name}: {'reused from the work folder' if reused else 'done'} ({stages[name]['seconds']} s){what}")


def _matching_bundle(out: Path, fp: str, cfg: FitConfig, samples: TextSamples) -> bool:
    """Whether out_dir already holds the finished bundle of this very fit (same model, data and settings)."""
    if not is_bundle(out):
        return False
    try:
        meta = read_meta(out)
    except (ValueError, OSError):
        return False
    return (meta["model"].get("fingerprint") == fp and meta.get("fit_config") == _normal(cfg.to_dict())
            and meta.get("data", {}).get("sha256") == samples.info()["sha256"])


def _validation(model: nn.Module, val: Any, pred: ExpertPredictor, comp: ErrorCompensator,
                sparsities: Sequence[float], seed: int, progress: bool) -> dict[str, Any]:
    """Held-out metrics: predictor recall / captured mass vs the oracle, compensator error reduction (layer means)."""
    scores = predict_scores(pred, val)
    dens = tuple(round(1.0 - s, 6) for s in sparsities)
    sel = [r for r in selection_metrics(val, scores, densities=dens, seed=seed) if r["layer"] == -1]
    err = [r for r in heldout_metrics(model, val, {"predictor": scores}, {"compensator": comp}, dens,
                                      progress=progress) if r["layer"] == -1]
    rows = []
    for s, d in zip(sparsities, dens):
        pick = {r["policy"]: r for r in sel if abs(r["density"] - d) < 1e-9}
        e = {r["compensator"]: r for r in err if abs(r["density"] - d) < 1e-9}
        rows.append({
            "sparsity": s, "recall": {p: round(r["recall"], 4) for p, r in pick.items()},
            "captured_mass": {p: round(r["mass"], 4) for p, r in pick.items()},
            "ffn_rel_err": {m: round(r["rel_err"], 4) for m, r in e.items()},
            "compensator_error_reduction": round(e["compensator"]["reduction"], 4),
        })
    return {"blocks": int((val.position > 0).sum()), "samples": int(val.sample.unique().numel()),
            "per_sparsity": rows}


# ------------------------------------------------------------------------------ fit
def fit(
    model: nn.Module, tokenizer: Any, texts: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike,
    config: FitConfig | Mapping[str, Any] | None = None, progress: bool = True, keep_work: bool = False,
) -> FastForward:
    """Calibrate, schedule, collect, train the predictor and compensator on `texts`; write one bundle to `out_dir`.

    Resumable: a rerun with the same `out_dir` reuses every finished stage kept in `out_dir/.work/`.
    Returns the fitted `FastForward` (its parts on the model's device); the bundle loads with
    `FastForward.from_pretrained(out_dir, model)`.
    """
    cfg = as_config(config)
    try:
        gated_mlps(model)
    except TypeError as e:
        raise TypeError(f"ffcore.fit: {e}") from None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ValueError(f"ffcore.fit: seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    log = _Log(progress)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    info = model_info(model)
    fp, name = info["fingerprint"], info["name"]
    samples = text_samples(tokenizer, texts, cfg.seq_len, cfg.calib_samples, cfg.train_samples, cfg.val_samples,
                           cfg.seed)
    counts = {p: int(t.shape[0]) for p, t in samples.parts.items()}
    log(f"{name} (fingerprint {fp}): {counts['calibration']} calibration / {counts['train']} training / "
        f"{counts['validation']} validation samples of {cfg.seq_len} tokens")
    if _matching_bundle(out, fp, cfg, samples):
        log(f"{out / BUNDLE_FILE} is this fit's finished bundle: loading it")
        return FastForward.from_pretrained(out, model)
    if is_bundle(out):
        log(f"{out / BUNDLE_FILE} belongs to another fit (model, texts or settings changed): replacing it")
        (out / BUNDLE_FILE).unlink()
    work = WorkFolder(out / WORK_DIR)
    stages: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        # 1. calibration -> s_i (window-aware: only the queries that can see the sink block count, notebook 02;
        #    equal to the paper's eq. 23 on full-attention layers; the literal s_i is kept beside it)
        t0 = time.time()
        key = {"fingerprint": fp, "samples": samples.digest("calibration"), "block_size": cfg.block_size,
               "chunk_size": cfg.chunk_size, "importance": "window"}
        calib_rec = work.done("calibration", key)
        reused = calib_rec is not None
        if not reused:
            calib = calibrate_ids(model, samples.parts["calibration"], cfg.block_size, cfg.chunk_size, cfg.seed,
                                  progress)
            calib_rec = work.finish(
                "calibration", key, s_i=calib.scores("window"), s_i_literal=calib.scores("literal"),
                first_block_share=calib.first_block_share(),
                layer_windows=calib.layer_windows, n_samples=calib.n_samples, seq_len=calib.seq_len,
                row_sum_error=calib.row_sum_error(), seconds=round(calib.seconds, 1))
        s_i = calib_rec["s_i"]
        layerwise_schedule(s_i, 1.0 - cfg.sparsity_range[1], cfg.min_density, cfg.order)  # fails early on bad s_i
        _stage(stages, "calibration", t0, reused, log)
        # 2. collection of the training part
        t0 = time.time()
        manifest = collect_ids(
            model, samples.parts["train"], work.path("collect_train"), split="train", block_size=cfg.block_size,
            tokens_per_block=cfg.tokens_per_block, samples_per_shard=cfg.samples_per_shard,
            batch_size=cfg.batch_size, seed=cfg.seed, windows=samples.windows["train"], model_key=name,
            progress=progress)
        _stage(stages, "collection", t0, manifest["resumed_shards"] == len(manifest["shards"]), log,
               f", {manifest['n_blocks']} blocks")
        train = load_collection_dir(work.root / "collect_train", fingerprint=fp)
        # 3. predictor
        t0 = time.time()
        key = {"collection": manifest["key"], "config": cfg.predictor.to_dict()}
        folder = work.path("predictor")
        reused = work.done("predictor", key) is not None
        if reused:
            pred = load_predictor(folder, model)
        else:
            pred = train_predictor(train, cfg.predictor, meta=predictor_meta(model, name, train),
                                   progress=progress).predictor
            save_predictor(pred, folder)
            work.finish("predictor", key, digest=weights_digest(pred))
        deployed = pred if cfg.blend is None else with_blend(pred, cfg.blend)
        _stage(stages, "predictor", t0, reused, log)
        # 4. compensator
        t0 = time.time()
        uniform = [round(1.0 - s, 6) for s in cfg.sparsities]
        densities: list[Any] = uniform if not cfg.schedule_grid else [list(row) for row in schedule_grid(
            [layerwise_schedule(s_i, d, cfg.min_density, cfg.order) for d in uniform])]  # [L][J]
        key = {"collection": manifest["key"], "predictor": weights_digest(pred), "blend": cfg.blend,
               "config": cfg.compensator.to_dict(), "densities": densities, "levels_per_block": cfg.levels_per_block,
               "seed": cfg.seed}
        folder = work.path("compensator")
        reused = work.done("compensator", key) is not None
        if reused:
            comp = load_compensator(folder, model).cpu()
        else:
            data = distill_data(model, train, mask_sources(train, deployed), densities, None, cfg.levels_per_block,
                                seed=cfg.seed, progress=progress)
            comp = train_compensator(data, cfg.compensator, meta=compensator_meta(model, name, train),
                                     progress=progress).compensator
            del data
            save_compensator(comp, folder)
            work.finish("compensator", key, digest=comp.digest())
        del train
        _stage(stages, "compensator", t0, reused, log)
        # 5. validation on the held-out part
        validation = None
        if counts["validation"]:
            t0 = time.time()
            vman = collect_ids(
                model, samples.parts["validation"], work.path("collect_validation"), split="validation",
                block_size=cfg.block_size, tokens_per_block=cfg.tokens_per_block,
                samples_per_shard=cfg.samples_per_shard, batch_size=cfg.batch_size, seed=cfg.seed + 1,
                windows=samples.windows["validation"], model_key=name, progress=progress)
            grid = sorted({cfg.sparsities[0], cfg.sparsities[len(cfg.sparsities) // 2], cfg.sparsities[-1]})
            key = {"collection": vman["key"], "predictor": weights_digest(pred), "blend": cfg.blend,
                   "compensator": comp.digest(), "sparsities": grid}
            rec = work.done("validation", key)
            reused = rec is not None
            if not reused:
                val = load_collection_dir(work.root / "collect_validation", fingerprint=fp)
                rec = work.finish("validation", key, metrics=_validation(model, val, deployed, comp, grid, cfg.seed,
                                                                         progress))
                del val
            validation = rec["metrics"]
            mid = validation["per_sparsity"][len(grid) // 2]
            _stage(stages, "validation", t0, reused, log,
                   f"; at sparsity {mid['sparsity']:g}: predictor recall {mid['recall'].get('predictor', 0):.3f} "
                   f"(first-block static {mid['recall'].get('first_block_static', 0):.3f}), compensator error "
                   f"reduction {100 * mid['compensator_error_reduction']:.1f} %")
    finally:
        model.train(was_training)
    # 6. the bundle
    meta = {
        "model": info, "block_size": cfg.block_size, "dense_first": True, "dense_last": True,
        "schedule": {"s_i": s_i, "importance": "window", "min_density": cfg.min_density, "order": cfg.order,
                     "calibration": {k: v for k, v in calib_rec.items() if k not in ("key", "s_i")}},
        "sparsity_range": list(cfg.sparsity_range),
        "predictor": {"training": deployed.meta.get("training")},
        "compensator": {"training": comp.meta.get("training")},
        "data": samples.info(), "fit_config": _normal(cfg.to_dict()), "validation": validation, "stages": stages,
        "device": str(next(model.parameters()).device), "versions": versions(),
    }
    meta = write_bundle(out, _normal(meta), deployed, comp)
    log(f"bundle written to {out} ({BUNDLE_FILE}, predictor.safetensors, compensator.safetensors)")
    if not keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    return FastForward(meta, deployed, comp).to(next(model.parameters()).device)
