"""Where outputs go, and JSON/CSV writers that stamp every result with its provenance.

The `full` profile writes into the committed `results/` and `figures/` folders; every
other profile writes under `build/<profile>/` so a smoke run never overwrites the
committed numbers. Artifacts (trained weights, caches) always live under `build/`.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

PROFILES = ("smoke", "quick", "full")


@dataclasses.dataclass(frozen=True)
class OutDirs:
    """The four output folders of one profile."""

    results: Path
    figures: Path
    artifacts: Path
    notebooks: Path

    def make(self) -> "OutDirs":
        """Create the folders (idempotent) and return self."""
        for p in dataclasses.astuple(self):
            Path(p).mkdir(parents=True, exist_ok=True)
        return self


def repo_root() -> Path:
    """The project root: $FFCORE_ROOT, else the current directory."""
    return Path(os.environ.get("FFCORE_ROOT", os.getcwd())).resolve()


def out_dirs(profile: str, root: Path | None = None) -> OutDirs:
    """Output folders for `profile` (created on first use)."""
    check_profile(profile)
    root = Path(root) if root is not None else repo_root()
    build = root / "build" / profile
    if profile == "full":
        dirs = OutDirs(root / "results", root / "figures", build / "artifacts", build / "notebooks")
    else:
        dirs = OutDirs(build / "results", build / "figures", build / "artifacts", build / "notebooks")
    return dirs.make()


def check_profile(profile: str) -> None:
    """Raise a clear error for an unknown profile name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")


RUN_OUTPUTS = ("results", "figures")  # what a full reproduction itself writes: not a change of the code it ran


def git_commit(root: Path) -> str:
    """HEAD's short hash, "+dirty" when tracked files other than the run's own outputs differ from it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{d}" for d in RUN_OUTPUTS)],
            cwd=root, capture_output=True, text=True, timeout=5,
        )
        if out.returncode != 0:
            return "unknown"
        changed = [ln[3:].strip() for ln in dirty.stdout.splitlines() if ln.strip()]
        changed = [p for p in changed if not _outputs_only_change(root, p)]
        return out.stdout.strip() + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _outputs_only_change(root: Path, path: str) -> bool:
    """True when `path` is a notebook whose only change from HEAD is a published run's outputs."""
    if not (path.startswith("notebooks/") and path.endswith(".ipynb")):
        return False
    from ffcore.notebooks import cleared  # lazy: nbformat only when a notebook differs

    head = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, text=True, timeout=5)
    if head.returncode != 0 or not (root / path).is_file():
        return False
    try:
        return cleared(head.stdout) == cleared((root / path).read_text())
    except ValueError:  # not a notebook nbformat can read: a real change
        return False


def device_name() -> str:
    """A human-readable name of the compute device results were measured on."""
    import torch  # lazy: writing a result should not pay for torch's import unless it names a device

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the vector ISA torch dispatches to (AVX2 vs AVX512) changes CPU timings as much as the core count
    return f"CPU: {cpu} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "triton", "numpy", "ffcore"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(profile: str, **extra: Any) -> dict[str, Any]:
    """Git commit, profile, device, package versions, UTC time, plus any `extra` fields."""
    return {
        "git_commit": git_commit(repo_root()),
        "profile": profile,
        "device": device_name(),
        "versions": package_versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_json(name: str, payload: Mapping[str, Any], profile: str, **prov: Any) -> Path:
    """Write `payload` to `<results>/<name>.json` with a `provenance` block; return the path."""
    path = out_dirs(profile).results / f"{name}.json"
    doc = {"provenance": provenance(profile, **prov), **payload}
    path.write_text(json.dumps(doc, indent=2, default=_jsonable) + "\n")
    return path


def read_json(name: str, profile: str) -> dict[str, Any]:
    """Read a result written by an earlier notebook, with a clear error if it is missing."""
    path = out_dirs(profile).results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the notebook that writes '{name}' first "
            f"(python -m ffcore.reproduce --profile {profile})"
        )
    return json.loads(path.read_text())


def write_table(name: str, rows: Iterable[Mapping[str, Any]], profile: str, **prov: Any) -> Path:
    """Write a list of flat records as `<name>.csv` and `<name>.json` (with provenance)."""
    rows = [dict(r) for r in rows]
    path = out_dirs(profile).results / f"{name}.csv"
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    write_json(name, {"rows": rows}, profile, **prov)
    return path
