"""The GPU session's results: `results/gpu_*.json` (written by `scripts/gpu_run.py`) read into flat rows.

    from ffcore.experiments import gpu_results
    ffn = gpu_results.ffn_rows()          # one row per (shape, T, density) of the FFN-module benchmark
    pre = gpu_results.prefill_rows()      # one row per (model, T, variant) of the end-to-end prefill
    checks = gpu_results.check_rows()     # the prefill's correctness checks
    tests = gpu_results.native_test_rows()  # the native kernel-test run's summary

Every row carries its file, the device, the dry-run flag, the commit and the creation time of its run.
CPU dry runs (`dry_run: true`, nothing measured) are left out unless `include_dry_run=True`. Files that
are not in the schema (or are cut short) are skipped; a `gpu_ffn_bench.json` written by
`scripts/bench_gpu_ffn.py` on its own (no schema field) is read as an FFN-bench file. No file: [].
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parents[2] / "results"
SCHEMA_PREFIX = "ffcore.gpu_run/"
STAGES = ("tests", "ffn_bench", "prefill", "prefill_check", "run")


def _stage_of(doc: dict) -> str | None:
    """The stage of a document, or None when it is none of ours."""
    if str(doc.get("schema", "")).startswith(SCHEMA_PREFIX):
        return doc.get("stage")
    if "schema" not in doc and str(doc.get("benchmark", "")).startswith("FFN module") and "rows" in doc:
        return "ffn_bench"  # scripts/bench_gpu_ffn.py's own report
    return None


def read_documents(results_dir: Path | None = None, include_dry_run: bool = False) -> list[dict]:
    """Every `gpu_*.json` document of ours in `results_dir` (default: the repository's results/), by file name."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    if not folder.is_dir():
        return []
    docs = []
    for path in sorted(folder.glob("gpu_*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping {path.name}: not readable JSON ({err})", stacklevel=2)
            continue
        if not isinstance(doc, dict) or _stage_of(doc) is None:
            continue
        if doc.get("dry_run", False) and not include_dry_run:
            continue
        docs.append({**doc, "_file": path.name, "_stage": _stage_of(doc)})
    return docs


def _provenance(doc: dict) -> dict[str, Any]:
    env = doc.get("env") or doc  # the standalone bench report keeps these at the top level
    return {"file": doc["_file"], "device": env.get("device"), "dry_run": bool(doc.get("dry_run", False)),
            "git_commit": env.get("git_commit_given") or env.get("git_commit"), "created_utc": doc.get("created_utc"),
            "torch": env.get("torch"), "triton": env.get("triton"), "transformers": env.get("transformers"),
            "cuda": env.get("cuda")}


def _strip_samples(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k.endswith("_all") or k.endswith("_all_ms") or k == "all_ms")}


def gpu_rows(results_dir: Path | None = None, stage: str | None = None, include_dry_run: bool = False,
             samples: bool = True) -> list[dict[str, Any]]:
    """Flat rows of every GPU file: `stage` is tests, ffn_bench, prefill, prefill_check or run (None: all).

    `samples=False` drops the raw-sample lists (`*_all`, `*_all_ms`, `all_ms`) for compact tables.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    out = []
    for doc in read_documents(results_dir, include_dry_run):
        kind, prov = doc["_stage"], _provenance(doc)
        if kind == "tests":
            rows = [{"stage": "tests", **prov, "status": doc.get("status"), **(doc.get("summary") or {}),
                     "failed_tests": [f.get("nodeid") for f in doc.get("failures", [])],
                     "duration_s": doc.get("duration_s"), "timed_out": doc.get("timed_out")}]
        elif kind == "run":
            rows = [{"stage": "run", **prov, "step": name, **entry}
                    for name, entry in (doc.get("stages") or {}).items()]
        elif kind == "prefill":
            rows = [{"stage": "prefill", **prov, **r} for r in doc.get("rows", [])]
            rows += [{"stage": "prefill_check", **prov, **c} for c in doc.get("checks", [])]
        else:
            rows = [{"stage": kind, **prov, **r} for r in doc.get("rows", [])]
        for r in rows:
            if stage is None or r["stage"] == stage:
                out.append(r if samples else _strip_samples(r))
    return out


def ffn_rows(results_dir: Path | None = None, include_dry_run: bool = False, samples: bool = True) -> list[dict]:
    """Measured FFN-module rows (configurations that errored or were skipped are left out)."""
    return [r for r in gpu_rows(results_dir, "ffn_bench", include_dry_run, samples) if r.get("triton_ms") is not None]


def prefill_rows(results_dir: Path | None = None, include_dry_run: bool = False, samples: bool = True) -> list[dict]:
    """Measured end-to-end prefill rows, dense and sparse (errored or skipped lengths are left out)."""
    return [r for r in gpu_rows(results_dir, "prefill", include_dry_run, samples) if r.get("median_ms") is not None]


def check_rows(results_dir: Path | None = None, include_dry_run: bool = False) -> list[dict]:
    """The prefill's correctness checks (sparse vs dense on the first block, Triton vs torch backend)."""
    return gpu_rows(results_dir, "prefill_check", include_dry_run)


def native_test_rows(results_dir: Path | None = None, include_dry_run: bool = False) -> list[dict]:
    """The native test run's summary (one row per file)."""
    return gpu_rows(results_dir, "tests", include_dry_run)
