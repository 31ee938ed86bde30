"""House rules for the committed notebooks in notebooks/ (and a check that the rules bite).

Every notebook: first cell markdown; exactly one `parameters` cell that assigns PROFILE and
SEED with flat `NAME = <literal>` statements only; committed clean (no outputs, no execution
counts); functions defined in notebooks stay short (logic belongs in ffcore/).
"""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from ffcore import notebooks as nbs

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
ALL_NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb")) if NOTEBOOK_DIR.is_dir() else []
NOTEBOOK_PARAMS = [pytest.param(p, id=p.name) for p in ALL_NOTEBOOKS] or [
    pytest.param(None, marks=pytest.mark.skip(reason=f"no notebooks in {NOTEBOOK_DIR} yet"), id="no-notebooks")
]


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS)
def test_notebook_follows_house_rules(path: Path) -> None:
    assert nbs._NUMBERED.match(path.name), f"{path.name}: name it NN_topic.ipynb or the runner skips it"
    raw = json.loads(path.read_text())  # nbformat.read fills in missing cell ids, with only a warning
    ids = [c.get("id") for c in raw["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: every cell needs a unique id (nbformat 4.5)"
    nb = nbs.read(path)
    nbformat.validate(nb)
    problems = nbs.lint_notebook(nb)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------ the rules themselves


def _nb(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return new_notebook(cells=list(cells))


def _params(source: str) -> nbformat.NotebookNode:
    return new_code_cell(source, metadata={"tags": ["parameters"]})


def test_clean_notebook_passes() -> None:
    short_fn = "def f(x):\n" + "    x += 1\n" * 13 + "    return x"
    nb = _nb(new_markdown_cell("# Title"),
             _params('PROFILE = "full"  # smoke | quick | full\nSEED = 0\nN: int = -3\nMODELS = ("a", "b")'),
             new_code_cell("%matplotlib inline\nimport ffcore\n" + short_fn))
    assert nbs.lint_notebook(nb) == []


def test_dirty_notebook_is_caught() -> None:
    long_fn = "def too_long(x):\n" + "    x += 1\n" * 15 + "    return x"
    executed = new_code_cell("print(1)", execution_count=3)
    executed.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb = _nb(new_code_cell("import os"),
             _params("PROFILE = 'full'\nSTEPS = 10 * 2\nA = B = 1\nimport os"),
             executed, new_code_cell(long_fn))
    problems = "\n".join(nbs.lint_notebook(nb))
    assert "first cell must be markdown" in problems
    assert "does not assign SEED" in problems
    assert "'STEPS = 10 * 2' is not `NAME = <literal>`" in problems
    assert "'A = B = 1'" in problems and "'import os'" in problems
    assert "cell 2: has stored outputs" in problems and "cell 2: has an execution count" in problems
    assert "cell 3: function too_long() is 17 lines" in problems


def test_parameters_cell_must_exist_once() -> None:
    assert any("no cell tagged 'parameters'" in p for p in nbs.lint_notebook(_nb(new_markdown_cell("# t"))))
    two = _nb(new_markdown_cell("# t"), _params("PROFILE = 'a'\nSEED = 0"), _params("SEED = 1"))
    assert any("2 cells tagged 'parameters'" in p for p in nbs.lint_notebook(two))


# ------------------------------------------------------------------ published outputs (issue: readable notebooks)


def _executed(root: Path) -> nbformat.NotebookNode:
    """What papermill writes: an injected-parameters cell, papermill metadata, stderr, machine paths, bars."""
    from nbformat.v4 import new_output

    injected = new_code_cell('PROFILE = "full"\nSEED = 0', metadata={"tags": ["injected-parameters"]})
    work = new_code_cell("run()", metadata={"papermill": {"duration": 1.0}, "execution": {"iopub.status.busy": "x"},
                                            "tags": []})
    work.outputs = [
        new_output("stream", name="stderr", text=f"{root}/.venv/lib/tqdm.py:1: TqdmWarning\n 10%|#   | 1/10\r100%|####| 10/10\n"),
        new_output("stream", name="stdout", text=f"wrote {root}/results/01_x.json\nrun 3.0 s\n"),
    ]
    work.execution_count = 1
    nb = _nb(new_markdown_cell("# t", metadata={"tags": []}), _params('PROFILE = "full"\nSEED = 0'), injected, work)
    nb.metadata["papermill"] = {"input_path": f"{root}/notebooks/01_x.ipynb"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    return nb


def test_publish_keeps_outputs_and_removes_machine_traces(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    executed, dest = tmp_path / "exec.ipynb", tmp_path / "01_x.ipynb"
    nbformat.write(_executed(root), str(executed))
    nbs.publish(executed, dest, root, git_commit="abc1234")
    nb = nbs.read(dest)
    assert [c.source for c in nb.cells][-1] == "run()" and len(nb.cells) == 3  # injected cell gone
    assert nb.metadata["ffcore"] == {"profile": "full", "seed": 0, "git_commit": "abc1234"}
    assert "papermill" not in nb.metadata and "papermill" not in nb.cells[-1].metadata
    assert "tags" not in nb.cells[0].metadata and "tags" not in nb.cells[-1].metadata  # papermill's empty lists
    source = _nb(new_markdown_cell("# t"), _params('PROFILE = "full"\nSEED = 0'), new_code_cell("run()"))
    source.metadata["language_info"] = {"name": "python"}
    def bare(text: str) -> tuple:  # a cleared notebook without its random cell ids
        nb = nbformat.reads(nbs.cleared(text), as_version=4)
        return dict(nb.metadata), [(c.cell_type, dict(c.metadata), c.source) for c in nb.cells]

    assert bare(dest.read_text()) == bare(nbformat.writes(source))  # the committed source is unchanged
    (out,) = nb.cells[-1].outputs  # stderr dropped, stdout kept
    assert out["text"] == "wrote results/01_x.json\nrun 3.0 s\n"
    assert nbs.lint_notebook(nb) == []
    assert str(tmp_path) not in dest.read_text()


def test_published_notebook_problems_are_caught() -> None:
    nb = _nb(new_markdown_cell("# t"), _params('PROFILE = "full"\nSEED = 0'), new_code_cell("x"))
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text="see /work/main/results/a.json\n 5%|# | 1/20\n"
                                                                   " 50%|### | 10/20\n")]
    nb.metadata["ffcore"] = {"profile": "smoke", "seed": 0, "git_commit": "abc+dirty"}
    problems = "\n".join(nbs.lint_notebook(nb))
    for needle in ("profile 'smoke'", "no clean commit", "machine path", "progress-bar frames"):
        assert needle in problems, needle


def test_committed_outputs_come_from_the_commit_of_their_results() -> None:
    """A notebook committed with outputs names the same clean commit as the results/ files it wrote."""
    results = NOTEBOOK_DIR.parent / "results"
    for path in ALL_NOTEBOOKS:
        meta = nbs.published(nbs.read(path))
        if meta is None:
            continue  # committed cleared: nothing to tie
        assert meta["profile"] == "full", path.name
        mine = sorted(results.glob(path.name[:3] + "*.json"))
        assert mine, f"{path.name} carries outputs but results/ holds nothing it wrote"
        for res in mine:
            commit = json.loads(res.read_text())["provenance"]["git_commit"]
            assert commit == meta["git_commit"], f"{res.name} says {commit}, {path.name} says {meta['git_commit']}"
