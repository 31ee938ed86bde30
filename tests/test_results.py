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

    from ffcore.results import git_commit

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
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "results/a.json").write_text("1")
    (tmp_path / "figures/b.png").write_text("1")
    assert git_commit(tmp_path) == clean  # the reproduction's own outputs do not dirty it
    (tmp_path / "code.py").write_text("1")
    assert git_commit(tmp_path) == clean + "+dirty"


def test_git_commit_ignores_published_outputs_but_not_notebook_edits(tmp_path):
    import subprocess

    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from ffcore.results import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    path = tmp_path / "notebooks" / "01_x.ipynb"
    path.parent.mkdir()
    nb = new_notebook(cells=[new_markdown_cell("# x"), new_code_cell("print(1)")])
    nbformat.write(nb, str(path))
    git("add", ".")
    git("commit", "-qm", "init")
    clean = git_commit(tmp_path)
    nb.cells[1].outputs = [new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 1
    nb.metadata["ffcore"] = {"profile": "full", "seed": 0, "git_commit": clean}
    nbformat.write(nb, str(path))
    assert git_commit(tmp_path) == clean  # outputs of a published run are not a code change
    nb.cells[1].source = "print(2)"
    nbformat.write(nb, str(path))
    assert git_commit(tmp_path) == clean + "+dirty"  # an edited cell is
