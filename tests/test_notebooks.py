"""The teaching notebooks (notebooks/*.ipynb) run top to bottom, and import rather than copy.

Each notebook's code cells are executed in order in one fresh namespace, with the repository root as
the working directory and on sys.path, as a reader running it would; a cell that raises, or a notebook
that runs past TIME_LIMIT_S, fails its test and the message names the cell. A notebook may not define
a function or class whose name exists in the project's modules (one source of truth: a notebook
calls the code it teaches), and it is committed with its outputs so that it reads well on GitHub.
"""

from __future__ import annotations

import ast
import contextlib
import json
import linecache
import signal
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
MODULES = ("loop.py", "loop_utils.py", "rewards.py", "shapes_world/__init__.py")
TIME_LIMIT_S = 180  # per notebook; 01-03 take 5-20 s on one CPU thread
# 04 trains the tiny model for 24 epochs with loop.main: about 3 minutes on one thread
TIME_LIMITS_S = {"04_loop_end_to_end.ipynb": 600}


def code_cells(path: Path) -> list[str]:
    """The source of every code cell, in order."""
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4, f"{path.name}: nbformat {notebook['nbformat']}, expected 4"
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def module_names() -> dict[str, str]:
    """Top-level function and class names of the project's modules -> the module defining them."""
    names = {}
    for module in MODULES:
        for node in ast.parse((REPO / module).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = module
    return names


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeoutError in the running code after `seconds` (SIGALRM: main thread, POSIX only)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield  # no alarm available: run unbounded rather than not at all
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_notebooks_found():
    names = [path.name for path in NOTEBOOKS]
    expected_names = ("01_ddim_policy", "02_estimators", "03_shapes_world", "04_loop_end_to_end")
    for expected in (f"{name}.ipynb" for name in expected_names):
        assert expected in names, f"notebooks/{expected} is missing (found {names})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))  # also undoes the notebook's own sys.path edit
    if any("import matplotlib" in source for source in code_cells(path)):
        pytest.importorskip(
            "matplotlib", reason=f"{path.name} plots with matplotlib (not in requirements.txt)"
        )
    namespace = {"__name__": "__main__"}
    with time_limit(TIME_LIMITS_S.get(path.name, TIME_LIMIT_S), path.name):
        for n, source in enumerate(code_cells(path)):
            filename = f"{path.name}, code cell {n}"
            # register the source so that a traceback shows the failing line of the cell
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            try:  # running the notebook's own cells is the point of this test
                exec(compile(source, filename, "exec"), namespace)  # noqa: S102
            except Exception as error:
                raise AssertionError(
                    f"{filename} raised {type(error).__name__}: {error}\n--- cell source ---\n{source}"
                ) from error


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_defines_nothing_of_the_modules(path):
    """One source of truth: `import loop` and call loop.ddim_step, never paste a copy of it."""
    names = module_names()
    for n, source in enumerate(code_cells(path)):
        for node in ast.walk(ast.parse(source)):
            defined = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in defined:
                assert name not in names, (
                    f"{path.name}, code cell {n} defines {name!r}, which {names[name]} already "
                    f"has: import and call it instead"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_committed_with_outputs(path):
    """Every code cell was executed before the commit, so the notebook reads well on GitHub."""
    cells = json.loads(path.read_text())["cells"]
    unexecuted = [
        n
        for n, cell in enumerate(c for c in cells if c["cell_type"] == "code")
        if cell.get("execution_count") is None
    ]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} have no outputs; run and save it"


# figures each notebook shows (its saved image outputs): the equations as pictures, not only prints
FIGURES = {
    "01_ddim_policy.ipynb": 3,  # log-density around the mean, sigma_t and trained steps, a trajectory
    "02_estimators.ipynb": 3,  # leave-one-out baseline, clipped objective against rho, variance vs K
    "03_shapes_world.ipynb": 2,
    "04_loop_end_to_end.ipynb": 3,
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_shows_its_figures(path):
    cells = json.loads(path.read_text())["cells"]
    outputs = [output for cell in cells for output in cell.get("outputs", [])]
    images = sum("image/png" in output.get("data", {}) for output in outputs)
    errors = [output["ename"] for output in outputs if output.get("output_type") == "error"]
    assert not errors, f"{path.name} was saved with errors {errors}: rerun it and save"
    assert images >= FIGURES.get(path.name, 1), (
        f"{path.name} shows {images} figures, expected {FIGURES.get(path.name, 1)}: run it and save"
    )
