"""A FastForward bundle: everything one model needs for predictive FFN sparsity, in one folder (like a PEFT adapter).

    ff = ffcore.FastForward.from_pretrained("my-bundle/", model)   # refuses a bundle fit for another model
    with torch.no_grad(), ffcore.sparsify(model, ff.plan(sparsity=0.5)):
        out = model.generate(ids, max_new_tokens=32)

A bundle folder holds three files, written by `ffcore.fit` or `FastForward.save_pretrained`:

* `ffcore_bundle.json`: the format version, the model it was fit on (name, path, fingerprint, a
  dtype-independent fingerprint, dims L/d/f), the block size, the layer importances `s_i` of the
  attention-sink calibration with the schedule's floor and order (Algorithm 1 gives the per-layer
  densities at any sparsity in the trained range), the trained sparsity range, the predictor's and the
  compensator's shapes, their training records and the sha256 of their weight files, the fit settings,
  held-out validation metrics and the package versions;
* `predictor.safetensors` (the expert predictor's state dict) and `compensator.safetensors` (the error
  compensator's).

Writing is atomic: the weights go to temporary names and are renamed into place, then the JSON, which is
what makes a folder a bundle, is written and renamed last; an interrupted write leaves no loadable bundle.
Loading checks the format, every required field, the model (fingerprint and dims), and each weight file
against its sha256 and its recorded shapes, and says which check failed.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ffcore.compensator import ErrorCompensator
from ffcore.engine import SparsityPlan
from ffcore.engine.layout import check_block_size
from ffcore.models import gated_mlps, model_dims, model_fingerprint
from ffcore.predictor import ExpertPredictor, with_blend
from ffcore.results import package_versions
from ffcore.schedule import ORDERS, layerwise_schedule

BUNDLE_FILE = "ffcore_bundle.json"
PREDICTOR_FILE = "predictor.safetensors"
COMPENSATOR_FILE = "compensator.safetensors"
FORMAT = "ffcore-bundle"
FORMAT_VERSION = 1
_TOL = 1e-9
# Fields `from_pretrained` cannot do without (dotted paths into ffcore_bundle.json).
REQUIRED_FIELDS = (
    "format", "format_version", "model.fingerprint", "model.dims.L", "model.dims.d", "model.dims.f", "block_size",
    "schedule.s_i", "schedule.min_density", "sparsity_range",
    "predictor.file", "predictor.sha256", "predictor.config.L", "predictor.config.d", "predictor.config.f",
    "predictor.config.r", "predictor.config.bias", "predictor.config.prior",
    "compensator.file", "compensator.sha256", "compensator.config.variant", "compensator.config.L",
    "compensator.config.d", "compensator.config.f", "compensator.config.r", "compensator.config.act",
    "compensator.config.bias",
)


class BundleError(ValueError):
    """A bundle folder that cannot be used: missing or bad fields, corrupt weights, or another model's bundle."""


# ------------------------------------------------------------------------------ helpers
def fingerprint_bf16(model: nn.Module) -> str:
    """`model_fingerprint`'s hash over the weights rounded to bfloat16: equal for fp32 / bf16 loads of one checkpoint."""
    h = hashlib.sha256()
    cfg = model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 257)][:257]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.to(torch.float64).cpu().numpy().round(6).tobytes())
    return h.hexdigest()[:16]


def model_info(model: nn.Module) -> dict[str, Any]:
    """What a bundle records about its model: name, local path, type, dtype, fingerprints and dims L/d/f."""
    dims = model_dims(model)
    src = str(getattr(model.config, "_name_or_path", "") or "")
    name = str(getattr(model, "ffcore_name", None) or src or type(model).__name__)
    path = next((str(Path(p).expanduser().resolve()) for p in (name, src) if p and Path(p).expanduser().is_dir()),
                None)
    return {
        "name": name, "path": path, "model_type": getattr(model.config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "fingerprint": model_fingerprint(model), "fingerprint_bf16": fingerprint_bf16(model),
        "dims": {"L": dims["L"], "d": dims["d"], "f": dims["f"]},
    }


def versions() -> dict[str, str]:
    """Package versions recorded in a bundle."""
    from importlib import metadata

    out = package_versions()
    for name in ("safetensors", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON to `<path>.tmp`, then rename it to `path` (a reader never sees a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _field(meta: Mapping[str, Any], dotted: str) -> Any:
    obj: Any = meta
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def _dims_text(dims: Mapping[str, Any]) -> str:
    return f"L={dims.get('L')}, d={dims.get('d')}, f={dims.get('f')}"


def predictor_config(pred: ExpertPredictor) -> dict[str, Any]:
    """The shapes and switches that rebuild a predictor from its state dict."""
    return {"L": pred.L, "d": pred.d, "f": pred.f, "r": pred.r, "bias": pred.bias, "prior": pred.prior,
            "blend": pred.blend}


def compensator_config(comp: ErrorCompensator) -> dict[str, Any]:
    """The shapes and switches that rebuild a compensator from its state dict."""
    return {"variant": comp.variant, "L": comp.L, "d": comp.d, "f": comp.f, "r": comp.r, "act": comp.act,
            "bias": comp.bias}


# ------------------------------------------------------------------------------ validation
def validate_meta(meta: Mapping[str, Any], where: str = "the bundle") -> None:
    """Raise BundleError naming the first missing field or a value that cannot be right."""
    if not isinstance(meta, Mapping):
        raise BundleError(f"{where}: {BUNDLE_FILE} must hold a JSON object")
    if meta.get("format") not in (None, FORMAT):
        raise BundleError(f"{where}: {BUNDLE_FILE} has format {meta.get('format')!r}, not {FORMAT!r}")
    for dotted in REQUIRED_FIELDS:
        try:
            _field(meta, dotted)
        except KeyError:
            raise BundleError(f"{where}: {BUNDLE_FILE} lacks the required field {dotted!r}; the bundle is incomplete "
                              "or was edited: fit it again (ffcore.fit / python -m ffcore fit)") from None
    if meta["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {meta['format_version']!r}; this ffcore reads version "
                          f"{FORMAT_VERSION}")
    L = meta["model"]["dims"]["L"]
    s = meta["schedule"]["s_i"]
    if not isinstance(s, list) or len(s) != L or not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0
                                                         for x in s):
        raise BundleError(f"{where}: schedule.s_i must be {L} finite scores >= 0 (one per layer), got {s!r}")
    rng = meta["sparsity_range"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, (int, float)) for x in rng)
            and 0.0 <= rng[0] <= rng[1] < 1.0):
        raise BundleError(f"{where}: sparsity_range must be [low, high] with 0 <= low <= high < 1, got {rng!r}")
    md = meta["schedule"]["min_density"]
    if not isinstance(md, (int, float)) or not 0.0 < md <= 1.0 - rng[1] + _TOL:
        raise BundleError(f"{where}: schedule.min_density {md!r} must be in (0, 1 - {rng[1]}]")
    if meta["schedule"].get("order", "sorted") not in ORDERS:
        raise BundleError(f"{where}: schedule.order must be one of {ORDERS}, got {meta['schedule'].get('order')!r}")
    try:
        check_block_size(meta["block_size"])
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from None
    for part in ("predictor", "compensator"):
        cfg = meta[part]["config"]
        got = {k: cfg[k] for k in ("L", "d", "f")}
        if got != dict(meta["model"]["dims"]):
            raise BundleError(f"{where}: the {part} has {_dims_text(got)} but the bundle's model has "
                              f"{_dims_text(meta['model']['dims'])}")


def check_model(meta: Mapping[str, Any], model: nn.Module, where: str = "the bundle") -> None:
    """Refuse a model the bundle was not fit on, saying which fingerprint and dims each side has."""
    try:
        gated_mlps(model)
    except TypeError as e:
        raise TypeError(f"{where} cannot run on this model: {e}") from None
    want = meta["model"]
    dims = model_dims(model)
    have = {"L": dims["L"], "d": dims["d"], "f": dims["f"]}
    fp = model_fingerprint(model)
    if fp == want["fingerprint"]:
        return
    same_dims = have == dict(want["dims"])
    if same_dims and want.get("fingerprint_bf16") and fingerprint_bf16(model) == want["fingerprint_bf16"]:
        return  # the same weights in another dtype (e.g. fit in float32, deployed in bfloat16)
    name = getattr(model, "ffcore_name", None) or getattr(model.config, "_name_or_path", None) or type(model).__name__
    why = "the same dims but different weights" if same_dims else "different dims"
    raise BundleError(
        f"{where} was fit on model {want.get('name')!r} (fingerprint {want['fingerprint']}, "
        f"{_dims_text(want['dims'])}), but this model {name!r} has fingerprint {fp} ({_dims_text(have)}): {why}. "
        "A bundle only runs on the model it was fit on: fit one for this model (ffcore.fit / python -m ffcore fit)"
    )


def _load_state(folder: Path, meta: Mapping[str, Any], part: str) -> dict[str, torch.Tensor]:
    """The state dict of the predictor or compensator, checked against the sha256 the bundle recorded."""
    rec = meta[part]
    path = folder / rec["file"]
    if not path.exists():
        raise BundleError(f"{folder}: the {part} weights {rec['file']} are missing")
    digest = file_sha256(path)
    if digest != rec["sha256"]:
        raise BundleError(f"{path} is truncated or corrupt: its sha256 {digest[:16]}... differs from the one the "
                          f"bundle recorded ({str(rec['sha256'])[:16]}...); copy the bundle again or refit")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # a file rewritten together with its recorded digest
        raise BundleError(f"{path} is truncated or corrupt (not a readable safetensors file: {e})") from None


def _build(part: str, cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], meta: dict[str, Any],
           where: str) -> nn.Module:
    """A predictor or compensator from its recorded config and state dict (shapes checked)."""
    if part == "predictor":
        mod: nn.Module = ExpertPredictor(cfg["L"], cfg["d"], cfg["f"], cfg["r"], cfg["bias"], cfg["prior"], meta=meta)
    else:
        mod = ErrorCompensator(cfg["L"], cfg["d"], cfg["f"], cfg["r"], cfg["variant"], cfg["act"], cfg["bias"],
                               meta=meta)
    try:
        mod.load_state_dict(dict(state))
    except RuntimeError as e:
        raise BundleError(f"{where}: the {part} weights do not match its recorded config {dict(cfg)}: {e}") from None
    mod.requires_grad_(False)
    mod.eval()
    if part == "predictor" and cfg.get("blend") is not None:
        mod = with_blend(mod, float(cfg["blend"]))
    return mod


def read_meta(folder: Path) -> dict[str, Any]:
    """The validated `ffcore_bundle.json` of a bundle folder."""
    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not path.exists():
        extra = (" (its .work/ folder holds an unfinished fit: rerun ffcore.fit with the same out_dir to resume)"
                 if (folder / ".work").is_dir() else "")
        raise FileNotFoundError(f"{folder} is not a FastForward bundle: {BUNDLE_FILE} is missing{extra}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is corrupt") from None
    validate_meta(meta, str(folder))
    return meta


# ------------------------------------------------------------------------------ the bundle
class FastForward:
    """A fitted FastForward bundle: layer importances, trained sparsity range, expert predictor, error compensator."""

    def __init__(self, meta: Mapping[str, Any], predictor: ExpertPredictor, compensator: ErrorCompensator) -> None:
        """Wrap the trained parts with the bundle metadata (`ffcore.fit` builds this; users call `from_pretrained`)."""
        meta = copy.deepcopy(dict(meta))
        validate_meta(meta)
        if not isinstance(predictor, ExpertPredictor):
            raise TypeError(f"predictor must be an ffcore.predictor.ExpertPredictor, got {type(predictor).__name__}")
        if not isinstance(compensator, ErrorCompensator):
            raise TypeError(f"compensator must be an ffcore.compensator.ErrorCompensator, got "
                            f"{type(compensator).__name__}")
        for part, cfg in (("predictor", predictor_config(predictor)), ("compensator", compensator_config(compensator))):
            rec = meta[part]["config"]
            if any(rec.get(k, cfg[k]) != cfg[k] for k in cfg):
                raise BundleError(f"the {part} {cfg} does not match the bundle's record {rec}")
        self.meta = meta
        self.predictor = predictor
        self.compensator = compensator

    # -------------------------------------------------------------- what the bundle says
    @property
    def s_i(self) -> list[float]:
        """The layer importances of the attention-sink calibration (one per layer)."""
        return [float(x) for x in self.meta["schedule"]["s_i"]]

    @property
    def min_density(self) -> float:
        """The schedule's floor: no layer gets a lower density."""
        return float(self.meta["schedule"]["min_density"])

    @property
    def order(self) -> str:
        """How Algorithm 1 walks the layers ('sorted', the default, or 'layer')."""
        return str(self.meta["schedule"].get("order", "sorted"))

    @property
    def block_size(self) -> int:
        """Tokens per prefill block the predictor and compensator were trained on."""
        return int(self.meta["block_size"])

    @property
    def sparsity_range(self) -> tuple[float, float]:
        """(lowest, highest) overall FFN sparsity the compensator was trained for; `plan` refuses others."""
        lo, hi = self.meta["sparsity_range"]
        return float(lo), float(hi)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model the bundle was fit on."""
        return str(self.meta["model"]["fingerprint"])

    def check_sparsity(self, sparsity: float) -> float:
        """The sparsity as a float, or a ValueError naming the trained range."""
        lo, hi = self.sparsity_range
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or \
                not lo - _TOL <= sparsity <= hi + _TOL:
            raise ValueError(
                f"sparsity {sparsity!r} is outside this bundle's trained range [{lo:g}, {hi:g}] (the compensator "
                "was trained there); pick a sparsity in that range, or fit again with FitConfig(sparsities=...)"
            )
        return float(sparsity)

    def densities(self, sparsity: float = 0.5) -> list[float]:
        """Per-layer FFN densities at an overall sparsity (Algorithm 1 on the stored s_i, with the stored floor)."""
        sparsity = self.check_sparsity(sparsity)
        return layerwise_schedule(self.s_i, 1.0 - sparsity, min_density=self.min_density, order=self.order)

    def plan(self, sparsity: float = 0.5, **changes: Any) -> SparsityPlan:
        """The deployed plan: layer-wise schedule at `sparsity`, the predictor, the compensator (`changes`: plan fields)."""
        plan = SparsityPlan(
            densities=tuple(self.densities(sparsity)), policy=self.predictor, compensator=self.compensator,
            block_size=self.block_size, dense_first=bool(self.meta.get("dense_first", True)),
            dense_last=bool(self.meta.get("dense_last", True)),
        )
        return plan.replace(**changes) if changes else plan

    def to(self, device: str | torch.device) -> "FastForward":
        """Move the predictor and compensator to a device (in place); returns self."""
        self.predictor.to(device)
        self.compensator.to(device)
        return self

    def __repr__(self) -> str:
        lo, hi = self.sparsity_range
        return (f"FastForward(model={self.meta['model'].get('name')!r}, fingerprint={self.fingerprint}, "
                f"{_dims_text(self.meta['model']['dims'])}, block_size={self.block_size}, "
                f"sparsity {lo:g}-{hi:g}, compensator={self.compensator.variant})")

    # -------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, bundle_dir: str | Path, model: nn.Module, device: str | torch.device | None = None,
                        ) -> "FastForward":
        """Load a bundle for `model`, refusing another model's bundle, corrupt weights or a bundle missing fields."""
        folder = Path(bundle_dir).expanduser()
        meta = read_meta(folder)
        where = f"bundle {folder}"
        check_model(meta, model, where)
        owner = {"model": meta["model"].get("name"), "fingerprint": meta["model"]["fingerprint"]}
        parts = {}
        for part in ("predictor", "compensator"):
            state = _load_state(folder, meta, part)
            training = {"training": meta[part]["training"]} if "training" in meta[part] else {}
            parts[part] = _build(part, meta[part]["config"], state, {**owner, **training}, where)
        ff = cls(meta, parts["predictor"], parts["compensator"])
        return ff.to(device if device is not None else next(model.parameters()).device)

    def save_pretrained(self, bundle_dir: str | Path) -> Path:
        """Write the bundle into `bundle_dir` (atomically: the JSON appears last); returns the folder."""
        self.meta = write_bundle(bundle_dir, self.meta, self.predictor, self.compensator)
        return Path(bundle_dir)


def write_bundle(folder: str | Path, meta: Mapping[str, Any], predictor: ExpertPredictor,
                 compensator: ErrorCompensator) -> dict[str, Any]:
    """Write weights (temporary names, renamed) and then `ffcore_bundle.json`; the final metadata."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    meta = copy.deepcopy(dict(meta))
    meta.update(format=FORMAT, format_version=FORMAT_VERSION)
    meta.setdefault("created_utc", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    staged = {}
    for part, mod, name, cfg in (("predictor", predictor, PREDICTOR_FILE, predictor_config(predictor)),
                                 ("compensator", compensator, COMPENSATOR_FILE, compensator_config(compensator))):
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in mod.state_dict().items()}
        save_file(tensors, str(tmp), metadata={"format": "pt", "ffcore": part})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a bundle is meant to be shared like the JSON
        rec = dict(meta.get(part, {}))
        rec.update(file=name, sha256=file_sha256(tmp), config=cfg)
        meta[part] = rec
        staged[name] = tmp
    validate_meta(meta, str(folder))
    (folder / BUNDLE_FILE).unlink(missing_ok=True)  # the old bundle stops loading before its weights change
    for name, tmp in staged.items():
        os.replace(tmp, folder / name)
    write_json_atomic(folder / BUNDLE_FILE, meta)
    return meta


def is_bundle(folder: str | Path) -> bool:
    """Whether a folder holds a bundle's JSON (not whether it loads)."""
    return (Path(folder) / BUNDLE_FILE).exists()
