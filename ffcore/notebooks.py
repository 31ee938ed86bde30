"""Notebook discovery, parameters-cell parsing and lint checks (shared by the runner and the tests).

The runner (`ffcore.reproduce`) uses `discover`/`select` to find and order the numbered
notebooks and `parameter_cell` to refuse a notebook whose `parameters` cell does not declare
every injected name (papermill itself only warns). `lint_notebook` holds the house rules that
`tests/test_notebooks_lint.py` enforces on every committed notebook.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import nbformat

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
_NUMBERED = re.compile(r"^(\d\d)_.+\.ipynb$")
PARAMETERS_TAG = "parameters"
REQUIRED_PARAMETERS = ("PROFILE", "SEED")
MAX_FUNCTION_LINES = 15


class NotebookError(ValueError):
    """A notebook that cannot be run or does not follow the house rules."""


@dataclasses.dataclass(frozen=True)
class ParameterCell:
    """The `parameters`-tagged cell of a notebook: its index and the names it assigns."""

    index: int
    names: tuple[str, ...]
    source: str


def number(path: Path) -> int:
    """The two-digit numeric prefix of a notebook file name (`03_foo.ipynb` -> 3)."""
    m = _NUMBERED.match(Path(path).name)
    if not m:
        raise NotebookError(f"{Path(path).name}: not a numbered notebook (expected {NOTEBOOK_GLOB})")
    return int(m.group(1))


def discover(root: Path) -> list[Path]:
    """Numbered notebooks `notebooks/NN_*.ipynb` under `root`, in numeric (then name) order."""
    folder = Path(root) / "notebooks"
    paths = [p for p in folder.glob(NOTEBOOK_GLOB) if p.is_file()]
    return sorted(paths, key=lambda p: (number(p), p.name))


def _matches(path: Path, selector: str) -> bool:
    sel = selector.strip()
    if sel.isdigit():
        return number(path) == int(sel)
    return sel in (path.name, path.stem)


def select(paths: Sequence[Path], only: Iterable[str] | None = None, start: str | None = None) -> list[Path]:
    """Filter ordered notebooks by `only` (numbers like `03` or names) and `start` (run from this one on)."""
    chosen = list(paths)
    available = ", ".join(p.name for p in paths) or "none"
    if only:
        only = list(only)
        for sel in only:
            if not any(_matches(p, sel) for p in paths):
                raise NotebookError(f"--only {sel!r} matches no notebook (available: {available})")
        chosen = [p for p in chosen if any(_matches(p, sel) for sel in only)]
    if start is not None:
        hits = [i for i, p in enumerate(paths) if _matches(p, start)]
        if not hits:
            raise NotebookError(f"--from {start!r} matches no notebook (available: {available})")
        first = paths[hits[0]]
        key = (number(first), first.name)
        chosen = [p for p in chosen if (number(p), p.name) >= key]
    return chosen


def read(path: Path) -> nbformat.NotebookNode:
    """Read a notebook as nbformat v4."""
    return nbformat.read(str(path), as_version=4)


def _cell_tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []) or [])


def parameter_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of the cells tagged `parameters`."""
    return [i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in _cell_tags(c)]


def _assigned_names(tree: ast.Module) -> list[str]:
    names: list[str] = []

    def add(target: ast.AST) -> None:
        if isinstance(target, ast.Name):
            names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                add(elt)

    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                add(t)
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            add(stmt.target)
    return names


def parameter_cell(nb: nbformat.NotebookNode, name: str = "notebook") -> ParameterCell:
    """The single `parameters` cell of `nb` and the names it assigns; NotebookError if missing or ambiguous."""
    idx = parameter_cells(nb)
    if not idx:
        raise NotebookError(
            f"{name}: no cell tagged {PARAMETERS_TAG!r}; add one that assigns "
            f"{', '.join(REQUIRED_PARAMETERS)} (papermill injects values after it)"
        )
    if len(idx) > 1:
        raise NotebookError(f"{name}: {len(idx)} cells tagged {PARAMETERS_TAG!r} (cells {idx}); keep exactly one")
    cell = nb.cells[idx[0]]
    if cell.cell_type != "code":
        raise NotebookError(f"{name}: the {PARAMETERS_TAG!r} cell (cell {idx[0]}) is {cell.cell_type}, not code")
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as exc:
        raise NotebookError(f"{name}: the {PARAMETERS_TAG!r} cell (cell {idx[0]}) is not valid Python: {exc}") from exc
    return ParameterCell(idx[0], tuple(_assigned_names(tree)), cell.source)


def check_parameters(path: Path, injected: Iterable[str]) -> ParameterCell:
    """Refuse a notebook whose `parameters` cell does not assign every name in `injected`."""
    path = Path(path)
    pc = parameter_cell(read(path), path.name)
    missing = [n for n in injected if n not in pc.names]
    if missing:
        declared = ", ".join(pc.names) or "nothing"
        raise NotebookError(
            f"{path.name}: parameter(s) {', '.join(missing)} would be injected but the "
            f"{PARAMETERS_TAG!r} cell (cell {pc.index}) does not define them (it defines: {declared}); "
            f"papermill would only warn and the notebook would silently use its defaults"
        )
    return pc


def _python_source(source: str) -> str:
    """Cell source with IPython magics / shell escapes turned into plain Python."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        return "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.splitlines())


def _is_literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _lint_parameters(nb: nbformat.NotebookNode) -> list[str]:
    try:
        pc = parameter_cell(nb)
    except NotebookError as exc:
        return [str(exc).removeprefix("notebook: ")]
    problems = [f"parameters cell does not assign {n}" for n in REQUIRED_PARAMETERS if n not in pc.names]
    for stmt in ast.parse(pc.source).body:
        value = getattr(stmt, "value", None)
        target = getattr(stmt, "target", None)
        targets = getattr(stmt, "targets", [target])
        flat = isinstance(stmt, (ast.Assign, ast.AnnAssign)) and len(targets) == 1
        flat = flat and isinstance(targets[0], ast.Name) and value is not None and _is_literal(value)
        if not flat:
            problems.append(
                f"parameters cell line {stmt.lineno}: {ast.unparse(stmt)[:60]!r} is not `NAME = <literal>`"
            )
    return problems


def _lint_functions(nb: nbformat.NotebookNode, max_lines: int) -> list[str]:
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(_python_source(cell.source))
        except SyntaxError as exc:
            problems.append(f"cell {i}: cannot parse ({exc.msg}, line {exc.lineno})")
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > max_lines:
                    problems.append(
                        f"cell {i}: function {node.name}() is {n} lines (> {max_lines}); move it into ffcore/"
                    )
    return problems


# --------------------------------------------------------------------------- published outputs
PUBLISH_MAX_BYTES = 3_000_000  # a committed notebook with its outputs stays under this
PUBLISHED_KEY = "ffcore"  # notebook metadata of a published run: {"profile", "seed", "git_commit"}
_ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|home|Users|tmp|root|opt|usr|mnt|private|var)/[^\s\"'<>]*")
_BAR = re.compile(r"\d+%\|")  # a tqdm bar line


def published(nb: nbformat.NotebookNode) -> dict[str, Any] | None:
    """The provenance of a notebook that carries a published full-profile run's outputs, else None."""
    meta = nb.metadata.get(PUBLISHED_KEY)
    return dict(meta) if isinstance(meta, dict) else None


def _clean_text(text: str, root: str) -> str:
    """Output text without the machine's paths and with each progress bar cut to its final state."""
    text = text.replace(root + "/", "").replace(root, ".")
    text = _ABSOLUTE.sub("<path>", text)
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]  # a \r-redrawn bar: its last frame
    return "\n".join(lines)


def publish(executed: Path, dest: Path, root: Path, git_commit: str, profile: str = "full", seed: int = 0) -> Path:
    """Write papermill's executed copy to `dest` as a committed notebook: outputs kept, machine traces removed.

    Drops papermill's injected-parameters cell (the source's own `parameters` cell stays), per-cell
    papermill/execution metadata and stderr streams (warnings and progress bars name this machine's
    paths), replaces the repository root in the remaining outputs by a relative path, and records
    `{profile, seed, git_commit}` under `metadata.ffcore` so a test can tie the outputs to `results/`.
    """
    nb = read(Path(executed))
    root_s = str(Path(root).resolve())
    cells = []
    for cell in nb.cells:
        if "injected-parameters" in _cell_tags(cell):
            continue
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:  # papermill adds an empty tag list to every untagged cell
            cell.metadata.pop("tags")
        if cell.cell_type == "code":
            outs = []
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    continue
                if "text" in out:
                    out["text"] = _clean_text("".join(out["text"]), root_s)
                for mime, value in out.get("data", {}).items():
                    if mime.startswith("text/"):
                        out["data"][mime] = _clean_text("".join(value), root_s)
                outs.append(out)
            cell.outputs = outs
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("papermill", None)
    _bare_language_info(nb)
    nb.metadata[PUBLISHED_KEY] = {"profile": profile, "seed": int(seed), "git_commit": git_commit}
    problems = published_problems(nb)
    if problems:
        raise NotebookError(f"{Path(executed).name} cannot be published:\n  " + "\n  ".join(problems))
    dest = Path(dest)
    tmp = dest.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    tmp.replace(dest)
    return dest


def _bare_language_info(nb: nbformat.NotebookNode) -> None:
    """Keep only the language name: the kernel fills in its Python version and lexer when it runs."""
    info = nb.metadata.get("language_info")
    if isinstance(info, dict) and "name" in info:
        nb.metadata["language_info"] = {"name": info["name"]}


def cleared(text: str) -> str:
    """A notebook's JSON text with every output, execution count and run metadata removed (its source)."""
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several types for unreadable JSON
        raise ValueError(f"not a readable notebook: {exc}") from exc
    nb.metadata.pop(PUBLISHED_KEY, None)
    nb.metadata.pop("papermill", None)
    _bare_language_info(nb)
    for cell in nb.cells:
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if cell.metadata.get("tags") == []:
            cell.metadata.pop("tags")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nbformat.writes(nb)


def published_problems(nb: nbformat.NotebookNode) -> list[str]:
    """What keeps a notebook with outputs from being committed: wrong profile, machine paths, bars, size."""
    meta = published(nb)
    if meta is None:
        return []
    problems = []
    if meta.get("profile") != "full":
        problems.append(f"outputs come from profile {meta.get('profile')!r}; only the full profile's are committed")
    if not meta.get("git_commit") or str(meta["git_commit"]).endswith("+dirty"):
        problems.append(f"outputs name no clean commit (git_commit={meta.get('git_commit')!r})")
    size = len(nbformat.writes(nb).encode())
    if size > PUBLISH_MAX_BYTES:
        problems.append(f"{size / 1e6:.1f} MB with outputs (> {PUBLISH_MAX_BYTES / 1e6:.0f} MB)")
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts = [out.get("text", "")] + [v for m, v in out.get("data", {}).items() if m.startswith("text/")]
            for text in texts:
                text = "".join(text)
                if _ABSOLUTE.search(text):
                    problems.append(f"cell {i}: an output names a machine path ({_ABSOLUTE.search(text).group()})")
                if len(_BAR.findall(text)) > 1:
                    problems.append(f"cell {i}: an output holds progress-bar frames (keep the final line at most)")
    return problems


def lint_notebook(nb: nbformat.NotebookNode, max_function_lines: int = MAX_FUNCTION_LINES) -> list[str]:
    """House-rule violations of a notebook (empty list = clean).

    A notebook is committed either cleared, or with the outputs of a published full-profile run
    (`publish`; `metadata.ffcore` names its commit), which must pass `published_problems`.
    """
    problems: list[str] = []
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        problems.append("the first cell must be markdown (title and what the notebook shows)")
    problems += _lint_parameters(nb)
    if published(nb) is not None:
        problems += published_problems(nb)
    else:
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if cell.get("outputs"):
                problems.append(f"cell {i}: has stored outputs (commit notebooks cleared or published by a full run)")
            if cell.get("execution_count") is not None:
                problems.append(f"cell {i}: has an execution count (commit notebooks cleared or published)")
    problems += _lint_functions(nb, max_function_lines)
    return problems
