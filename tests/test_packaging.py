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
    want = {r.strip() for r in py["dependencies"] + py["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_reqs = {ln.strip()[2:].strip() for ln in lines if ln.startswith("      - ") and "-e ." not in ln}
    assert pip_reqs == want, f"only in pyproject: {want - pip_reqs}; only in environment.yml: {pip_reqs - want}"


def test_kernels_install_under_ffcore_namespace():
    import ffcore.kernels

    assert Path(ffcore.kernels.__file__).parent.name == "kernels"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"ffcore.kernels" = "kernels"' in text
