"""Trained per-model artifacts (expert predictor, error compensator): weights + metadata on disk.

Each artifact is `<stem>.safetensors` (the module's state dict) and `<stem>.json` (its metadata,
including the fingerprint of the model it was trained on). Reading checks the shapes and the
fingerprint against the model it will run in and refuses a mismatch with a clear message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ffcore.models import model_dims, model_fingerprint


def save_artifact(module: nn.Module, folder: Path, stem: str, meta: dict[str, Any]) -> Path:
    """Write `<stem>.safetensors` (module's state dict) and `<stem>.json` (meta) into `folder`; the weights' path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    (folder / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return folder / f"{stem}.safetensors"


def read_artifact(
    folder: Path, stem: str, what: str, notebook: str, model: nn.Module | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, state dict) of a saved artifact; with `model`, refuse one trained for another model.

    `what` names the artifact in messages ("predictor"); `notebook` is the one that trains it.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / f"{stem}.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: train the {what} first (notebook {notebook})")
    meta = json.loads(meta_path.read_text())
    if model is not None:
        dims = model_dims(model)
        want = {"L": dims["L"], "d": dims["d"], "f": dims["f"]}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"{what} in {folder} has shape {got} but the model has {want}; it belongs to "
                             f"another model ({meta.get('model')!r})")
        fp = model_fingerprint(model)
        if meta.get("fingerprint") != fp:
            raise ValueError(
                f"{what} in {folder} was trained on model {meta.get('model')!r} with fingerprint "
                f"{meta.get('fingerprint')}, but this model's fingerprint is {fp}; retrain it for this model"
            )
    return meta, load_file(str(folder / f"{stem}.safetensors"))
