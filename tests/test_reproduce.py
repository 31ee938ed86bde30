"""The papermill runner: ordering, selection, parameter checks, executed copies, loud failures.

Fixture notebooks are generated into tmp_path with nbformat. Only three kernels are started
in the whole module (two for the good run, one for the failing run); the rest is checked
before any kernel starts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from ffcore import notebooks as nbs
from ffcore import reproduce

PARAMS = 'PROFILE = "full"\nSEED = 0'
LOG_CELL = (
    "import os\n"
    "with open('ran.log', 'a') as fh:  # relative: checks cwd is the root\n"
    "    fh.write(f\"{NAME}|{PROFILE}|{SEED}|{os.environ['FFCORE_ROOT']}\\n\")"
)


def write_nb(root: Path, name: str, *cells: nbformat.NotebookNode) -> Path:
    """Write a notebook built from `cells` to root/notebooks/name."""
    path = root / "notebooks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=list(cells)), str(path))
    return path


def params(source: str = PARAMS) -> nbformat.NotebookNode:
    """A code cell tagged `parameters`."""
    return new_code_cell(source, metadata={"tags": ["parameters"]})


def logging_nb(root: Path, name: str) -> Path:
    """A good notebook that appends its name, PROFILE, SEED and FFCORE_ROOT to <cwd>/ran.log."""
    return write_nb(root, name, new_markdown_cell(f"# {name}"), params(),
                    new_code_cell(f"NAME = {Path(name).stem!r}"), new_code_cell(LOG_CELL))


def ran(root: Path) -> list[list[str]]:
    """The lines the logging notebooks wrote, split into fields."""
    log = root / "ran.log"
    return [ln.split("|") for ln in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------- no kernel


def test_discover_orders_numerically_and_ignores_unnumbered(tmp_path: Path) -> None:
    for name in ("10_c.ipynb", "02_b.ipynb", "01_a.ipynb", "02_a.ipynb", "1_x.ipynb", "notes.ipynb", "03_x.txt"):
        (tmp_path / "notebooks").mkdir(exist_ok=True)
        (tmp_path / "notebooks" / name).write_text("{}")
    found = nbs.discover(tmp_path)
    assert [p.name for p in found] == ["01_a.ipynb", "02_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in nbs.select(found, start="02")] == ["02_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in nbs.select(found, start="02_b")] == ["02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in nbs.select(found, only=["10", "1"])] == ["01_a.ipynb", "10_c.ipynb"]
    assert [p.name for p in nbs.select(found, only=["02_b.ipynb"])] == ["02_b.ipynb"]
    assert [p.name for p in nbs.select(found, only=["01", "10"], start="02")] == ["10_c.ipynb"]
    with pytest.raises(nbs.NotebookError, match="'07' matches no notebook"):
        nbs.select(found, only=["07"])
    with pytest.raises(nbs.NotebookError, match="--from '99'"):
        nbs.select(found, start="99")


@pytest.mark.parametrize(
    ("source", "missing"),
    [("PROFILE = 'full'", "SEED"), ("PROFILE = 'full'\nSEEED = 0", "SEED"), ("SEED = 0", "PROFILE")],
)
def test_unknown_parameter_is_refused_before_anything_runs(tmp_path: Path, source: str, missing: str) -> None:
    logging_nb(tmp_path, "01_good.ipynb")
    write_nb(tmp_path, "02_bad.ipynb", new_markdown_cell("# bad"), params(source), new_code_cell("1"))
    with pytest.raises(reproduce.ReproduceError, match=rf"02_bad\.ipynb: parameter\(s\) {missing} would be injected"):
        reproduce.run_notebooks("smoke", root=tmp_path, progress=False)
    assert ran(tmp_path) == []  # 01_good was not run either: everything is checked first
    assert not (tmp_path / "build" / "smoke" / "notebooks" / "01_good.ipynb").exists()


def test_missing_or_duplicate_parameters_cell_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_nb(tmp_path, "01_noparams.ipynb", new_markdown_cell("# x"), new_code_cell(PARAMS))
    rc = reproduce.main(["--profile", "smoke", "--root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "01_noparams.ipynb: no cell tagged 'parameters'" in err
    write_nb(tmp_path, "01_noparams.ipynb", new_markdown_cell("# x"), params(), params())
    with pytest.raises(reproduce.ReproduceError, match="01_noparams.ipynb: 2 cells tagged 'parameters'"):
        reproduce.plan("smoke", root=tmp_path)


def test_empty_notebooks_folder_and_bad_selector_fail(tmp_path: Path) -> None:
    with pytest.raises(reproduce.ReproduceError, match="no notebooks matching"):
        reproduce.plan("smoke", root=tmp_path)
    logging_nb(tmp_path, "01_a.ipynb")
    with pytest.raises(reproduce.ReproduceError, match="'05' matches no notebook"):
        reproduce.plan("smoke", only=["05"], root=tmp_path)
    with pytest.raises(ValueError, match="unknown profile"):
        reproduce.plan("huge", root=tmp_path)


def test_kernel_runs_this_interpreter() -> None:
    assert reproduce._runs_this_python(["python", "-m", "ipykernel_launcher"])
    assert reproduce._runs_this_python([sys.executable, "-m", "ipykernel_launcher"])
    assert not reproduce._runs_this_python(["/nonexistent/bin/python3", "-m", "ipykernel_launcher"])
    assert not reproduce._runs_this_python([])
    from jupyter_client.kernelspec import KernelSpecManager

    assert reproduce._runs_this_python(KernelSpecManager().get_kernel_spec(reproduce.kernel_name()).argv)


def test_help_is_informative(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for word in ("--profile", "smoke", "quick", "full", "--only", "--from", "--seed", "build/<profile>/notebooks"):
        assert word in out


# --------------------------------------------------------------------------- with kernels


def test_good_run_only_in_order_with_injected_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("10_c.ipynb", "02_b.ipynb", "01_a.ipynb"):
        logging_nb(tmp_path, name)
    before = os.environ.get("FFCORE_ROOT")
    rc = reproduce.main(["--profile", "smoke", "--seed", "7", "--only", "10", "01",
                         "--root", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert os.environ.get("FFCORE_ROOT") == before
    root = str(tmp_path.resolve())
    assert ran(tmp_path) == [["01_a", "smoke", "7", root], ["10_c", "smoke", "7", root]]
    dest = tmp_path / "build" / "smoke" / "notebooks"
    assert sorted(p.name for p in dest.iterdir()) == ["01_a.ipynb", "10_c.ipynb"]
    executed = nbformat.read(str(dest / "01_a.ipynb"), as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert 'PROFILE = "smoke"' in injected[0].source and "SEED = 7" in injected[0].source
    assert all(c.execution_count for c in executed.cells if c.cell_type == "code")
    source = nbformat.read(str(tmp_path / "notebooks" / "01_a.ipynb"), as_version=4)
    assert all(c.execution_count is None for c in source.cells if c.cell_type == "code")  # sources untouched
    assert "01_a.ipynb: ok in" in out and "2/2 notebooks ok" in out and "02_b" not in out


def test_failing_notebook_stops_the_run_loudly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_nb(tmp_path, "01_boom.ipynb", new_markdown_cell("# boom"), params(), new_code_cell("x = 1"),
             new_code_cell("\n# step two\nraise ValueError(f'boom {x + 41}')"))
    logging_nb(tmp_path, "02_after.ipynb")
    rc = reproduce.main(["--profile", "quick", "--root", str(tmp_path)])  # with progress bars on
    cap = capsys.readouterr()
    assert rc == 1
    partial = tmp_path / "build" / "quick" / "notebooks" / "01_boom.ipynb"
    assert "01_boom.ipynb failed in cell 3" in cap.err  # index in the source notebook
    assert "'# step two'" in cap.err
    assert "ValueError: boom 42" in cap.err
    assert str(partial) in cap.err and partial.exists()
    assert ran(tmp_path) == []  # the run stopped: 02_after never started
    assert "failed" in cap.out and "not run" in cap.out and "0/2 notebooks ok" in cap.out
