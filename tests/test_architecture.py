"""The layout's rules, checked on the source: the method library never imports an experiment, and ffcore
modules are imported at the top of a file unless a comment says why not (a real cycle or an optional,
heavy dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ffcore"
EXPERIMENTS = PACKAGE / "experiments"
LIBRARY = [p for p in sorted(PACKAGE.rglob("*.py")) if EXPERIMENTS not in p.parents] + sorted(
    (ROOT / "kernels").glob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in a tree, with `from x import y` also as `x.y`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_library_never_imports_an_experiment():
    offenders = []
    for path in LIBRARY:
        for line, module in _imports(ast.parse(path.read_text())):
            if module == "ffcore.experiments" or module.startswith("ffcore.experiments."):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "library modules must not import experiments:\n" + "\n".join(offenders)


def test_experiments_are_one_module_per_notebook():
    notebooks = sorted(p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    modules = sorted(p.name[2:4] for p in EXPERIMENTS.glob("nb[0-9][0-9]_*.py"))
    assert modules == notebooks, f"notebooks {notebooks} vs experiment modules {modules}"


def test_ffcore_imports_are_at_the_top_unless_a_comment_says_why():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(m.startswith("ffcore") for m in mods) and "#" not in lines[node.lineno - 1]:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not offenders, "function-local ffcore imports need a comment (cycle / optional dependency):\n" + \
        "\n".join(offenders)


def test_the_checks_see_a_violation(tmp_path):
    """The scans above would catch the two patterns they forbid."""
    bad = "def f():\n    from ffcore.experiments import nb05_accuracy\n"
    mods = [m for _, m in _imports(ast.parse(bad))]
    assert "ffcore.experiments.nb05_accuracy" in mods
