"""pyproject.toml and environment.yml describe the same environment; kernels import safely."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = {r.strip() for r in py["dependencies"] + [r for extra in py["optional-dependencies"].values() for r in extra]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    entries = [ln.strip()[2:].strip() for ln in lines if ln.startswith("      - ")]
    pip_reqs = {e for e in entries if not e.startswith("-")}  # drop pip options: `-c constraints.txt`, `-e .`
    assert "-c constraints.txt" in entries
    assert pip_reqs == want, f"only in pyproject: {want - pip_reqs}; only in environment.yml: {pip_reqs - want}"


def test_constraints_pin_every_dependency_inside_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for ln in (ROOT / "constraints.txt").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            assert version, f"constraints.txt: {ln!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for extra in py["optional-dependencies"].values() for r in extra]
    for req in map(Requirement, py["dependencies"] + extras):
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req.specifier}"


def test_kernels_install_under_ffcore_namespace():
    import ffcore.kernels

    assert Path(ffcore.kernels.__file__).parent.name == "kernels"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"ffcore.kernels" = "kernels"' in text
