#!/usr/bin/env python
"""Compare two results folders value by value, apart from timing and provenance fields.

    python scripts/compare_results.py /tmp/smoke_before build/smoke/results

Every JSON file present in either folder is loaded and walked; a leaf that differs (numbers beyond
`--rtol`) is reported by its path. Fields that measure time or describe the run, not the result,
are skipped: the `provenance` block, and keys that name seconds, milliseconds, timings, speedups
measured on the clock, load averages and thread counts (see `TIMING_KEYS`). Exit status 1 when
anything else differs, so the script can gate a refactor that must not change results.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

# Keys whose values are clock readings or run descriptions (matched against the last path element).
TIMING_KEYS = re.compile(
    r"(^provenance$|seconds|_s$|_ms$|^runs?_s|_all_s$|^time|^load|threads$|measured_speedup$|^speedup$|"
    r"^fraction$|^measured_crossover$|^fraction_of_|^dense_s|^sparse_s|^median|^gflops|^share$|_sec$|runtime|"
    r"^ttft|^created|^warmup$|^speedup_|^cpu_)"
)


def leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf of a JSON value; timing keys are not entered."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if TIMING_KEYS.search(str(k)):
                continue
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def same(a: Any, b: Any, rtol: float) -> bool:
    """Equal, or numbers within rtol (NaN equals NaN)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3)
    return a == b


def compare(before: Path, after: Path, rtol: float = 0.0) -> list[str]:
    """Lines describing every difference between the JSON files of two folders."""
    out: list[str] = []
    names = sorted({p.name for p in before.glob("*.json")} | {p.name for p in after.glob("*.json")})
    for name in names:
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            out.append(f"{name}: only in {'after' if not a.exists() else 'before'}")
            continue
        la, lb = dict(leaves(json.loads(a.read_text()))), dict(leaves(json.loads(b.read_text())))
        diff = [p for p in sorted(set(la) | set(lb)) if p not in la or p not in lb or not same(la[p], lb[p], rtol)]
        if diff:
            kinds = Counter(re.sub(r"\[\d+\]", "[]", p) for p in diff)
            out.append(f"{name}: {len(diff)} differing values: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common(6)))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the differences; exit 1 if there are any."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default: exact)")
    a = p.parse_args(argv)
    lines = compare(a.before, a.after, a.rtol)
    print("\n".join(lines) if lines else f"identical apart from timing and provenance fields "
                                          f"({len(list(a.before.glob('*.json')))} JSON files)")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
