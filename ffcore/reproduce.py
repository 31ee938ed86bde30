"""Run every numbered notebook end to end with papermill: `python -m ffcore.reproduce --profile smoke`.

Notebooks `notebooks/NN_*.ipynb` run in numeric order, with the repository root as working
directory, FFCORE_ROOT set to it, and PROFILE / SEED injected into each notebook's
`parameters` cell. Executed copies go to `out_dirs(profile).notebooks` (build/<profile>/notebooks),
never next to the sources. Every notebook is checked before anything runs: a missing
`parameters` cell, or one that does not declare an injected name, is refused up front.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from ffcore import notebooks as nbs
from ffcore.results import PROFILES, check_profile, git_commit, out_dirs, repo_root

KERNEL_NAME = "ffcore-python"


class ReproduceError(RuntimeError):
    """The reproduction run could not start or did not finish."""

    def __init__(self, message: str, records: Sequence["NotebookRecord"] = ()) -> None:
        super().__init__(message)
        self.records = list(records)


class NotebookFailed(ReproduceError):
    """A notebook raised while executing; carries where and why."""

    def __init__(self, message: str, records: Sequence["NotebookRecord"], notebook: str,
                 cell_index: int | None, ename: str, evalue: str, output: Path) -> None:
        super().__init__(message, records)
        self.notebook, self.cell_index, self.ename, self.evalue, self.output = (
            notebook, cell_index, ename, evalue, output)


@dataclasses.dataclass
class NotebookRecord:
    """Outcome of one notebook: status is 'ok', 'failed' or 'not run'."""

    name: str
    source: Path
    output: Path
    status: str = "not run"
    seconds: float = 0.0
    error: str | None = None


# --------------------------------------------------------------------------- kernel

def _runs_this_python(argv: Sequence[str]) -> bool:
    if not argv:
        return False
    exe = argv[0]
    # jupyter_client replaces a bare python / python3 / python3.X with sys.executable.
    if exe in {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}:
        return True
    here = Path(sys.executable)
    try:
        return Path(exe).absolute().parent == here.absolute().parent and os.path.samefile(exe, here)
    except OSError:
        return False


def kernel_name() -> str:
    """Name of a Jupyter kernelspec that runs the current interpreter (installing one into sys.prefix if needed)."""
    try:
        import ipykernel.kernelspec as ipk
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError as exc:  # pragma: no cover - both are dependencies
        raise ReproduceError(f"cannot run notebooks: {exc}; pip install ipykernel papermill") from exc
    for name in ("python3", KERNEL_NAME):
        try:
            if _runs_this_python(KernelSpecManager().get_kernel_spec(name).argv):
                return name
        except NoSuchKernel:
            continue
    # 'python3' resolves to another interpreter (e.g. a user-level kernelspec): install our own.
    ipk.install(kernel_name=KERNEL_NAME, display_name=f"Python ({sys.prefix})", prefix=sys.prefix)
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    if not _runs_this_python(spec.argv):
        raise ReproduceError(
            f"kernelspec {KERNEL_NAME!r} at {spec.resource_dir} runs {spec.argv[0]}, not {sys.executable}; "
            f"remove it (jupyter kernelspec remove {KERNEL_NAME}) and retry"
        )
    return KERNEL_NAME


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- running

def plan(profile: str, only: Sequence[str] | None = None, root: Path | str | None = None,
         start: str | None = None) -> list[NotebookRecord]:
    """The notebooks a run would execute, in order, each checked for its `parameters` cell."""
    check_profile(profile)
    root = Path(root).resolve() if root is not None else repo_root()
    found = nbs.discover(root)
    if not found:
        raise ReproduceError(f"no notebooks matching notebooks/{nbs.NOTEBOOK_GLOB} under {root}")
    try:
        chosen = nbs.select(found, only=only, start=start)
        for path in chosen:
            nbs.check_parameters(path, ("PROFILE", "SEED"))
    except nbs.NotebookError as exc:
        raise ReproduceError(f"refusing to run: {exc}") from exc
    dest = out_dirs(profile, root).notebooks
    if dest.resolve() == (root / "notebooks").resolve():  # pragma: no cover - guarded by results.py
        raise ReproduceError("executed notebooks would overwrite the sources")
    return [NotebookRecord(p.name, p, dest / p.name) for p in chosen]


def _failure(exc: Exception, rec: NotebookRecord, param_index: int) -> tuple[str, int | None, str, str]:
    """(message, source-cell index, ename, evalue) for a papermill failure."""
    idx = getattr(exc, "cell_index", None)
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    if idx is None:
        return f"{rec.name} failed: {ename}: {evalue}", None, ename, evalue
    # papermill counts cells of the executed copy, which has the injected-parameters cell after
    # the `parameters` cell; map back to the index in the source notebook.
    src_idx = idx - 1 if idx > param_index else idx
    lines = [ln for ln in (getattr(exc, "source", "") or "").splitlines() if ln.strip()]
    first = lines[0].strip() if lines else "<empty>"
    count = getattr(exc, "exec_count", None)
    msg = (f"{rec.name} failed in cell {src_idx} (0-based, In [{count}]) starting {first!r}:\n"
           f"    {ename}: {evalue}")
    return msg, src_idx, ename, evalue


def run_notebooks(profile: str, seed: int = 0, only: Sequence[str] | None = None,
                  root: Path | str | None = None, *, start: str | None = None,
                  progress: bool = True, kernel: str | None = None) -> list[NotebookRecord]:
    """Execute the selected notebooks in order; return one record each, or raise NotebookFailed."""
    import papermill as pm
    from tqdm import tqdm

    records = plan(profile, only=only, root=root, start=start)
    root = records[0].source.parent.parent
    kernel = kernel or kernel_name()
    params = {"PROFILE": profile, "SEED": int(seed)}
    commit = git_commit(root)  # before anything runs: what the notebooks' results will name
    bar = tqdm(records, desc=f"notebooks [{profile}]", unit="nb", disable=not progress)
    with _env(FFCORE_ROOT=str(root)):
        for rec in bar:
            bar.set_postfix_str(rec.name)
            t0, started = time.perf_counter(), time.time() - 1
            try:
                pm.execute_notebook(
                    str(rec.source), str(rec.output), parameters=params, kernel_name=kernel,
                    language="python", cwd=str(root), progress_bar=progress, log_output=False,
                )
            except Exception as exc:  # papermill raises PapermillExecutionError, or kernel errors
                rec.seconds, rec.status = time.perf_counter() - t0, "failed"
                param_index = nbs.parameter_cell(nbs.read(rec.source)).index
                msg, idx, ename, evalue = _failure(exc, rec, param_index)
                rec.error = f"{ename}: {evalue}"
                bar.close()
                fresh = rec.output.exists() and rec.output.stat().st_mtime >= started
                msg += (f"\n    partially executed notebook: {rec.output}" if fresh
                        else f"\n    no executed copy was written ({rec.output} not updated)")
                raise NotebookFailed(msg, records, rec.name, idx, ename, evalue, rec.output) from exc
            rec.seconds, rec.status = time.perf_counter() - t0, "ok"
            if profile == "full":  # the committed notebooks carry the full run's outputs
                nbs.publish(rec.output, rec.source, root, commit, profile, seed)
            tqdm.write(f"  {rec.name}: ok in {rec.seconds:.1f} s -> {rec.output}", file=sys.stdout)
    return records


def summary(records: Sequence[NotebookRecord]) -> str:
    """A plain-text table of notebook, status, wall time and output path."""
    w = max([len("notebook")] + [len(r.name) for r in records])
    lines = [f"{'notebook':<{w}}  {'status':<8}  {'time':>8}  output", "-" * (w + 30)]
    for r in records:
        t = f"{r.seconds:7.1f}s" if r.status != "not run" else f"{'-':>8}"
        lines.append(f"{r.name:<{w}}  {r.status:<8}  {t}  {r.output}")
    total = sum(r.seconds for r in records)
    ok = sum(r.status == "ok" for r in records)
    lines.append(f"{ok}/{len(records)} notebooks ok, {total:.1f} s total")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m ffcore.reproduce`."""
    p = argparse.ArgumentParser(
        prog="python -m ffcore.reproduce",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        epilog="""\
outputs:
  executed notebooks  build/<profile>/notebooks/NN_*.ipynb
  results, figures    results/, figures/ (full); build/<profile>/{results,figures} (smoke, quick)

profiles:
  smoke  tiny random models and data, seconds per notebook (CI)
  quick  the real offline models with reduced samples
  full   the real models at the sizes of the committed results (default)

examples:
  python -m ffcore.reproduce --profile smoke
  python -m ffcore.reproduce --profile full --only 03 05
  python -m ffcore.reproduce --profile quick --from 04 --seed 1

exit status: 0 all notebooks ran; 1 a notebook failed (the message names the notebook,
the cell and the exception, and where the partially executed copy is); 2 a usage error
or a notebook refused before anything ran (no or incomplete 'parameters' cell).""",
    )
    p.add_argument("--profile", choices=PROFILES, default="full", help="run profile (default: full)")
    p.add_argument("--seed", type=int, default=0, help="SEED injected into every notebook (default: 0)")
    p.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (numbers like 03, or file names)")
    p.add_argument("--from", dest="start", metavar="NN", help="start at this notebook and run the ones after it")
    p.add_argument("--root", type=Path, default=None,
                   help="project root (default: $FFCORE_ROOT or the current directory)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        records = run_notebooks(args.profile, seed=args.seed, only=args.only, root=args.root,
                                start=args.start, progress=not args.no_progress)
    except NotebookFailed as exc:
        print("\n" + summary(exc.records), file=sys.stdout)
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    except ReproduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n" + summary(records))
    print(f"profile={args.profile} seed={args.seed}: all {len(records)} notebooks ran "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
