"""Provenance written with every result: enough to tell where and how a number was measured."""
from __future__ import annotations

import os

import pytest
import torch

from ffcore.results import device_name, provenance


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the device is the GPU's name")
def test_cpu_device_names_cores_and_vector_isa():
    name = device_name()
    assert name.startswith("CPU: ")
    assert f"({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})" in name


def test_provenance_fields():
    p = provenance("smoke", seed=3)
    assert {"git_commit", "profile", "device", "versions", "created_utc"} <= p.keys()
    assert p["profile"] == "smoke" and p["seed"] == 3
    assert p["versions"]["torch"] == torch.__version__


def test_git_commit_ignores_the_runs_own_outputs(tmp_path):
    import subprocess

    from ffcore.results import _git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    for name in ("results/a.json", "figures/b.png", "code.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("0")
    git("add", ".")
    git("commit", "-qm", "init")
    clean = _git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results/a.json").write_text("1")
    (tmp_path / "figures/b.png").write_text("1")
    assert _git_commit(tmp_path) == clean  # the reproduction's own outputs do not dirty it
    (tmp_path / "code.py").write_text("1")
    assert _git_commit(tmp_path) == clean + "+dirty"
