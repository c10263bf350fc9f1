"""Helpers shared by the bench scripts: run a function in a forked child and read its peak memory.

Peak memory on CPU is the child's peak resident set size, `ru_maxrss` of the rusage that
`os.wait4` returns for that child (Linux reports KiB). The child is forked from the bench script, so
it starts with the script's imports (torch, diffusers, loop.py: a few hundred MB) already resident;
every configuration starts from that same floor, and the scripts print a `load` row (a child that only
loads the model) to subtract. On a GPU the child also reports `torch.cuda.max_memory_allocated`.
Forking (not a fresh interpreter) avoids ~10 s of imports per configuration, which keeps the tiny
runs in the test suite at seconds. Nothing here re-implements loop.py.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class BenchError(Exception):
    """Bad input or a failed child: printed as one line by the scripts' command lines; exit 2."""


def cli_main(function: Callable, **flags) -> None:
    """Run a script's main with fire's flags; bad input ends as `error: ...` and exit code 2."""
    import loop_utils

    if flags.pop("help", False) or flags.pop("h", False):  # fire would pass them on as flags
        print((sys.modules[function.__module__].__doc__ or "").strip())
        print(f"\nflags: {inspect.signature(function)}")
        return
    try:
        function(**flags)
    except (BenchError, loop_utils.UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def commands_main(commands: dict[str, Callable], doc: str | None) -> None:
    """`python bench/<script>.py COMMAND [--flag value ...]`: the script's docstring for --help
    (or no command), one line and exit 2 for an unknown command, else cli_main through fire."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or "--help" in sys.argv:
        print(doc)
        sys.exit(0)
    import fire

    if sys.argv[1] not in commands:
        print(f"error: unknown command {sys.argv[1]!r}; choose one of {', '.join(commands)}")
        sys.exit(2)
    command = commands[sys.argv.pop(1)]
    fire.Fire(lambda **flags: cli_main(command, **flags))


def _child(function: Callable, args: tuple, log: Path | None, threads: int, result: Path) -> None:
    """Body of a forked child: its own log, its own thread count, the result pickled to a file."""
    code = 1
    try:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # and Python's own streams, which a caller (pytest) may have pointed elsewhere
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        torch.set_num_threads(threads)
        value = function(*args)
        cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
        result.write_bytes(pickle.dumps({"value": value, "cuda_peak": cuda_peak}))
        code = 0
    except BaseException:  # noqa: BLE001 - everything, so that the child never returns into the parent's code
        result.write_bytes(pickle.dumps({"error": traceback.format_exc()}))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_map(
    function: Callable,
    items: Sequence[tuple],
    jobs: int = 1,
    threads: int = 1,
    logs=None,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """function(*item) for each item, each in its own forked child, at most `jobs` at a time.

    Returns, in the order of items, {"value", "peak_rss_mb", "cuda_peak_mb"}; a failed child raises
    BenchError with its traceback's last lines; on_done(index) is called as each child ends.
    The parent must not have initialised CUDA (a forked child cannot use it then)."""
    if jobs < 1 or threads < 1:
        raise BenchError(f"--jobs {jobs} / --threads {threads}: need at least 1")
    logs = list(logs) if logs is not None else [None] * len(items)
    results: list[dict | None] = [None] * len(items)
    running: dict[int, tuple[int, Path]] = {}  # pid -> (index, result file)
    todo = list(range(len(items)))
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp:
        while todo or running:
            while todo and len(running) < jobs:
                index = todo.pop(0)
                result = Path(tmp) / f"{index}.pkl"
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(function, tuple(items[index]), logs[index], threads, result)
                running[pid] = (index, result)
            pid, _status, usage = os.wait4(-1, 0)
            if pid not in running:
                continue
            index, result = running.pop(pid)
            record = pickle.loads(result.read_bytes()) if result.exists() else {"error": "died"}
            if "error" in record:
                tail = "\n".join(record["error"].strip().splitlines()[-6:])
                raise BenchError(f"child for {repr(items[index])[:160]} failed:\n{tail}")
            cuda = record["cuda_peak"]
            results[index] = {
                "value": record["value"],
                "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
                "cuda_peak_mb": None if cuda is None else cuda / 2**20,
            }
            if on_done is not None:
                on_done(index)
    return results  # type: ignore[return-value]


def preload() -> None:
    """Import what loop.py imports lazily (diffusers' pipeline, peft: ~8 s) once, before forking."""
    import peft.utils  # noqa: F401
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: F401
    from diffusers.utils import convert_state_dict_to_diffusers  # noqa: F401


def default_threads(jobs: int) -> int:
    """Torch threads per child: this process's (OMP_NUM_THREADS or the cores) shared by jobs."""
    return max(1, torch.get_num_threads() // max(1, jobs))


def fork_call(function: Callable, *args, threads: int = 1, log: Path | None = None) -> dict:
    """function(*args) in one forked child: {"value", "peak_rss_mb", "cuda_peak_mb"}."""
    return fork_map(function, [args], jobs=1, threads=threads, logs=[log])[0]


def tiny_model(folder: Path) -> tuple[Path, Path]:
    """The test suite's tiny random pipeline (tests/conftest.py) and its prompt file, built once."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    model, prompts = folder / "tiny-sd", folder / "train.txt"
    if not (model / "model_index.json").is_file():
        conftest.save_tiny_pipeline(model)
    if not prompts.is_file():
        conftest.write_prompts(prompts)
    return model, prompts


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value); NaNs dropped."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
