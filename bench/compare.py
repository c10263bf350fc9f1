"""The paper's comparison of the four estimators, run as bench/PROTOCOL.md fixes it.

Every run is the real command line, `OMP_NUM_THREADS=1 python loop.py --algo .. --k .. --lr ..`, executed
in a git worktree of one commit (so later edits of loop.py never change a run in flight, and a recorded
row reproduces with `git checkout COMMIT` and its `command`). Stages:

    python bench/compare.py tune --jobs 2        # stage 1: 4 estimators x 3 lrs x seeds 100-102
    python bench/compare.py evaluate --jobs 2    # stage 2: seeds 0-9 at the picked lrs (needs stage 1)
    python bench/compare.py extend --jobs 2      # stage 3: seeds 10-19, only if the protocol says so
    python bench/compare.py report               # tables, rliable intervals and figures from the CSVs
    python bench/compare.py tune --tiny --jobs 2 # the test suite's tiny model and budget, seconds

Results go to --results (default runs/compare/results, untracked); the committed results were made with
`--results bench/results`, which only an explicit flag writes. Two CSVs there:
    compare_runs.csv    one row per run: algo, k, lr, seed, reward, threads, final_heldout, ..., command, commit
    compare_curves.csv  one row per run and epoch: training reward, held-out (EMA, raw), images, seconds
A run already in compare_runs.csv is skipped, an interrupted one is continued with loop.py's --resume (exact),
so a stage can be stopped and restarted at any time. `report` writes compare.md and the figures
compare_fig2.png, compare_fig3.png, compare_intervals.png, compare_lr.png (needs bench/requirements.txt).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import BenchError, have_matplotlib, markdown_table, tiny_model

# === The protocol (bench/PROTOCOL.md), as data
TUNED = {"reinforce-k1": ("reinforce", 1), "rloo-k4": ("rloo", 4), "ppo-k1": ("ppo", 1),
         "loop-k4": ("loop", 4)}  # fmt: skip
TUNE_LRS = (1e-3, 2e-3, 4e-3)
TUNE_SEEDS = (100, 101, 102)
EVALUATED = {  # configuration -> (algo, K, the tuned configuration whose lr it uses)
    "reinforce-k1": ("reinforce", 1, "reinforce-k1"),
    "rloo-k4": ("rloo", 4, "rloo-k4"),
    "ppo-k1": ("ppo", 1, "ppo-k1"),
    "ppo-k4": ("ppo", 4, "ppo-k1"),
    "loop-k2": ("loop", 2, "loop-k4"),
    "loop-k4": ("loop", 4, "loop-k4"),
    "loop-k8": ("loop", 8, "loop-k4"),
}
TASKS = {"color": list(EVALUATED), "shape": ["ppo-k1", "loop-k4"], "spatial": ["ppo-k1", "loop-k4"],
         "texture": ["ppo-k1", "loop-k4"]}  # fmt: skip
# texture's held-out file has 10 prompts: 12 images each, the other tasks' order of held-out images
TASK_FLAGS = {"texture": ["--eval_images_per_prompt", "12"]}
EVAL_SEEDS, EXTRA_SEEDS = tuple(range(10)), tuple(range(10, 20))
EXTENDED = ("loop-k4", "ppo-k1", "rloo-k4")  # stage 3's configurations
PAIRS = [("loop-k4", "ppo-k1", "color"), ("loop-k4", "rloo-k4", "color"),
         ("rloo-k4", "reinforce-k1", "color"), ("ppo-k1", "reinforce-k1", "color"),
         ("loop-k8", "loop-k2", "color"), ("loop-k4", "ppo-k1", "shape"),
         ("loop-k4", "ppo-k1", "spatial"), ("loop-k4", "ppo-k1", "texture")]  # fmt: skip
THRESHOLD_GAIN = 0.10  # images_to_threshold: held-out EMA >= untrained + this
LAST_EPOCHS = 10  # final_train_reward: mean training reward of the last this many epochs
REPS, CI = 20_000, 0.95  # stratified bootstrap resamples and interval size
# --tiny: the test suite's tiny random model, 2 epochs (a check of the machinery, not a result)
TINY_FLAGS = ["--images_per_epoch", "8", "--num_steps", "3", "--micro_batch", "4", "--epochs", "2",
              "--num_eval_prompts", "2", "--min_train_sigma", "0"]  # fmt: skip
RUN_FIELDS = ("stage", "config", "algo", "k", "lr", "seed", "reward", "threads", "epochs",
              "untrained_heldout", "final_heldout", "final_heldout_raw", "final_train_reward",
              "images_to_threshold", "train_seconds", "cpu", "commit", "command")  # fmt: skip
CURVE_FIELDS = ("stage", "config", "lr", "seed", "reward", "epoch", "images_seen", "train_reward",
                "heldout", "heldout_raw", "seconds")  # fmt: skip


@dataclass(frozen=True)
class Run:
    stage: str
    config: str
    algo: str
    k: int
    lr: float
    seed: int
    reward: str
    eval_every: int

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.reward}-{self.config}-lr{self.lr:g}-s{self.seed}"

    def flags(self) -> list[str]:
        return ["--algo", self.algo, "--k", str(self.k), "--reward", self.reward,
                "--lr", f"{self.lr:g}", "--seed", str(self.seed),
                "--eval_every", str(self.eval_every), "--eval_raw", "true",
                *TASK_FLAGS.get(self.reward, [])]  # fmt: skip


def plan_tune(lrs=TUNE_LRS, seeds=TUNE_SEEDS, configs=tuple(TUNED)) -> list[Run]:
    """Stage 1, seed-major: a stopped stage leaves whole seeds, every configuration and lr alike."""
    return [Run("tune", c, *TUNED[c], lr, s, "color", 48) for s in seeds for c in configs
            for lr in lrs]  # fmt: skip


def plan_evaluate(picks: dict, seeds=EVAL_SEEDS, only=None) -> list[Run]:
    """Stage 2 (or 3 with only=EXTENDED and seeds 10-19), seed-major over tasks and configurations."""
    runs = []
    for seed in seeds:
        for task, configs in TASKS.items():
            for c in configs:
                if only is None or (c in only and task == "color"):
                    algo, k, tuned = EVALUATED[c]
                    runs.append(Run("evaluate", c, algo, k, picks[tuned], seed, task, 4))
    return runs


# === Running: one worktree per commit, one subprocess per run, resume what was interrupted
def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def worktree(commit: str, runs: Path) -> Path:
    """A detached worktree of commit under runs/ (created once): the code every run executes."""
    path = (runs / f"src-{commit[:10]}").resolve()
    if not (path / "loop.py").is_file():
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune")
        git("worktree", "add", "--detach", str(path), commit)
    return path


def command_line(run: Run, threads: int, extra: list[str]) -> str:
    return " ".join([f"OMP_NUM_THREADS={threads}", "python", "loop.py", *run.flags(), *extra])


def metrics_of(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def finished(folder: Path, epochs: int) -> bool:
    rows = metrics_of(folder)
    return bool(rows) and rows[-1]["epoch"] == epochs and rows[-1]["eval_reward_mean"] is not None


def execute(run: Run, src: Path, out: Path, threads: int, extra: list[str], epochs: int) -> Path:
    """loop.py for one run (fresh, or --resume of an interrupted one); its log next to the folder."""
    folder = out / run.name
    if finished(folder, epochs):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    if (folder / "checkpoint" / "state.pt").is_file():
        args = ["--resume", str(folder)]
    else:
        shutil.rmtree(folder, ignore_errors=True)
        args = [*run.flags(), *extra, "--out", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(folder.with_name(folder.name + ".log"), "a") as log:
        done = subprocess.run([sys.executable, "loop.py", *args], cwd=src, env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode or not finished(folder, epochs):
        raise BenchError(f"{run.name} failed (exit {done.returncode}); see {folder}.log")
    return folder


def summarise(run: Run, folder: Path, threads: int, commit: str, cmd: str) -> tuple[dict, list]:
    """The run's row of compare_runs.csv and its rows of compare_curves.csv."""
    rows = metrics_of(folder)
    evals = [r for r in rows if r["eval_reward_mean"] is not None]
    untrained, last = evals[0]["eval_reward_mean"], evals[-1]
    reached = [
        r["images_seen"] for r in evals if r["eval_reward_mean"] >= untrained + THRESHOLD_GAIN
    ]
    train = [r["reward_mean"] for r in rows[1:]]
    record = {
        "stage": run.stage, "config": run.config, "algo": run.algo, "k": run.k, "lr": run.lr,
        "seed": run.seed, "reward": run.reward, "threads": threads, "epochs": rows[-1]["epoch"],
        "untrained_heldout": untrained, "final_heldout": last["eval_reward_mean"],
        "final_heldout_raw": last.get("eval_raw_reward_mean"),
        "final_train_reward": float(np.mean(train[-LAST_EPOCHS:])),
        "images_to_threshold": reached[0] if reached else "",
        "train_seconds": round(sum(r["seconds"] for r in rows), 1),
        "cpu": cpu_name(threads), "commit": commit, "command": cmd,
    }  # fmt: skip
    curves = [{
        "stage": run.stage, "config": run.config, "lr": run.lr, "seed": run.seed,
        "reward": run.reward, "epoch": r["epoch"], "images_seen": r["images_seen"],
        "train_reward": r["reward_mean"], "heldout": r["eval_reward_mean"],
        "heldout_raw": r.get("eval_raw_reward_mean"), "seconds": r["seconds"],
    } for r in rows]  # fmt: skip
    return record, curves


def cpu_name(threads: int) -> str:
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores)"


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


CSV_LOCK = threading.Lock()  # runs end in worker threads; their rows are appended one at a time


def append_csv(path: Path, fields: tuple, rows: list[dict]) -> None:
    with CSV_LOCK, open(path, "a", newline="") as f:
        new = f.tell() == 0
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_all(runs_list: list[Run], jobs: int, threads: int, results: Path, runs: Path,
            tiny: bool, commit: str) -> list[dict]:  # fmt: skip
    """Execute every run not yet in compare_runs.csv, `jobs` at a time; append rows as each ends."""

    results.mkdir(parents=True, exist_ok=True)
    if tiny:  # the tiny random model draws no shapes: a reward it can be scored by
        runs_list = [dataclasses.replace(r, reward="jpeg_compressibility") for r in runs_list]
    key = lambda r: (r["stage"], r["config"], float(r["lr"]), int(r["seed"]), r["reward"])
    done = {key(r) for r in read_csv(results / "compare_runs.csv")}
    todo = [r for r in runs_list if (r.stage, r.config, r.lr, r.seed, r.reward) not in done]
    commit = sweep_commit(jobs, threads, commit)
    if git("status", "--porcelain", "loop.py", "rewards.py", "shapes_world"):
        print(
            f"note: loop.py, rewards.py or shapes_world/ have uncommitted changes; runs use {commit[:10]}"
        )
    src = worktree(commit, runs)
    extra: list[str] = []
    if tiny:
        model, prompts = tiny_model(runs / "tiny-model")
        extra = [*TINY_FLAGS, "--model", str(model.resolve()), "--train_prompts",
                 str(prompts.resolve())]  # fmt: skip
    epochs = 2 if tiny else 48
    print(f"{len(todo)} of {len(runs_list)} runs to do, {jobs} at a time, {threads} thread(s) each, "
          f"code at {commit[:10]}")  # fmt: skip

    def one(run: Run) -> dict:
        folder = execute(run, src, runs.resolve(), threads, extra, epochs)
        cmd = command_line(run, threads, extra)
        record, curve_rows = summarise(run, folder, threads, commit, cmd)
        append_csv(results / "compare_curves.csv", CURVE_FIELDS, curve_rows)
        append_csv(results / "compare_runs.csv", RUN_FIELDS, [record])
        return record

    return sweep(todo, one, jobs, "runs", lambda r: f"{r['config']} {r['reward']} lr {r['lr']:g} "
                 f"seed {r['seed']}: held-out {r['final_heldout']:.4f}")  # fmt: skip


def sweep_commit(jobs: int, threads: int, commit: str) -> str:
    """A sweep's flags checked, and the full sha of the commit its runs execute (one line if not one)."""
    if jobs < 1 or threads < 1:
        raise BenchError(f"--jobs {jobs} / --threads {threads}: need at least 1")
    try:
        return git("rev-parse", "--verify", f"{commit}^{{commit}}").strip()
    except subprocess.CalledProcessError as error:
        raise BenchError(f"--commit {commit}: not a commit of this repository") from error


def sweep(todo: list, one, jobs: int, label: str, line) -> list[dict]:
    """one(run) for every run, `jobs` at a time, `line(record)` printed as each ends (one appends
    its rows). A failed run (BenchError) is named and the others go on: a background sweep is
    unattended; the sweep then ends naming every failure."""
    from tqdm import tqdm

    def guarded(run):
        try:
            return one(run)
        except BenchError as error:
            return str(error)

    records, failed = [], []
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(todo), desc=label) as bar:
        for record in pool.map(guarded, todo):
            bar.update()
            if isinstance(record, str):
                failed.append(record)
            else:
                records.append(record)
            tqdm.write(f"failed, going on: {record}" if isinstance(record, str) else line(record))
    if failed:
        raise BenchError(f"{len(failed)} run(s) failed: {'; '.join(failed)}")
    return records


# === Picking the learning rates (stage 1)
def lr_table(runs_rows: list[dict]) -> dict:
    """{config: {lr: [final held-out EMA of each tuning seed]}}"""
    table: dict = {}
    for r in runs_rows:
        if r["stage"] == "tune":
            table.setdefault(r["config"], {}).setdefault(float(r["lr"]), []).append(
                float(r["final_heldout"])
            )
    return table


def pick_lrs(runs_rows: list[dict], seeds: int = len(TUNE_SEEDS)) -> tuple[dict, dict]:
    """(picks, edges): the lr of highest mean final held-out score per tuned configuration (ties
    within 1e-4 to the smaller lr), and for a pick at its grid's edge the lr the edge rule adds."""
    picks, edges = {}, {}
    for config, by_lr in lr_table(runs_rows).items():
        complete = {lr: np.mean(v) for lr, v in by_lr.items() if len(v) >= seeds}
        if len(complete) < len(TUNE_LRS):
            continue  # stage 1 unfinished for this configuration
        best = max(complete.values())
        picks[config] = min(lr for lr, m in complete.items() if m >= best - 1e-4)
        grid = sorted(complete)
        extended = len(grid) > len(TUNE_LRS)
        if picks[config] == grid[0] and not (extended and grid[0] < min(TUNE_LRS)):
            edges[config] = grid[0] / 2
        elif picks[config] == grid[-1] and not (extended and grid[-1] > max(TUNE_LRS)):
            edges[config] = grid[-1] * 2
    return picks, edges


# === Aggregates: rliable's IQM and probability of improvement, prediction intervals, detectable difference
def runs_of(runs_rows: list[dict], config: str, task: str) -> list[dict]:
    """The stage-2 rows of one configuration on one task."""
    return [r for r in runs_rows
            if r["stage"] == "evaluate" and r["config"] == config and r["reward"] == task]  # fmt: skip


def scores_of(
    runs_rows: list[dict], config: str, task: str, key: str = "final_heldout"
) -> np.ndarray:
    values = [float(r[key]) for r in runs_of(runs_rows, config, task)]
    return np.array(values).reshape(-1, 1)  # (runs, 1 task), rliable's layout


@contextlib.contextmanager
def seeded_numpy(seed: int = 0):
    """numpy's global generator seeded for one block, its state put back after: rliable 1.2 draws its
    bootstrap resamples with np.random.choice and ignores the random_state it is handed, so this is
    what makes an interval the same on every run of `report`."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _intervals(score_dict: dict, func) -> dict:
    """{name: (estimate, low, high)}, each name bootstrapped alone from the same seed, so an interval
    does not depend on which other names are in score_dict or on their order."""
    from rliable import library as rly

    out = {}
    for name, scores in score_dict.items():
        with seeded_numpy(0):
            point, ci = rly.get_interval_estimates(
                {name: scores}, func, reps=REPS, confidence_interval_size=CI
            )
        out[name] = (float(np.ravel(point[name])[0]), *np.ravel(ci[name]).astype(float).tolist())
    return out


def iqm_intervals(score_dict: dict) -> dict:
    """{name: (IQM, low, high)}: interquartile mean with a stratified-bootstrap 95% interval."""
    from rliable import metrics

    return _intervals(score_dict, lambda x: np.array([metrics.aggregate_iqm(x)]))


def improvement_probabilities(pairs: dict) -> dict:
    """{name: (P(X > Y), low, high)} for pairs {name: (scores_x, scores_y)}, rliable's estimator."""
    from rliable import metrics

    return _intervals(pairs, metrics.probability_of_improvement)


def verdict(low: float, high: float) -> str:
    if low > 0.5:
        return "supported"
    if high < 0.5:
        return "contradicted"
    return "not resolved at this budget"


def detectable_difference(x: np.ndarray, y: np.ndarray) -> float:
    """Smallest true difference of means found with 80% power at two-sided 5%, n seeds each."""
    n = min(len(x), len(y))
    pooled = math.sqrt((np.var(x, ddof=1) + np.var(y, ddof=1)) / 2)
    return (1.959964 + 0.841621) * math.sqrt(2) * pooled / math.sqrt(n)


def prediction_band(values: np.ndarray, level: float = 0.80) -> tuple[np.ndarray, ...]:
    """Mean and the normal-theory prediction interval of one more seed: (S, E) -> 3 x (E,)."""
    from scipy import stats

    n = values.shape[0]
    mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd * math.sqrt(1 + 1 / n)
    return mean, mean - half, mean + half


# === The report: tables and figures from the two CSVs
def report(results: str = "runs/compare/results") -> Path:
    """compare.md and the figures from compare_runs.csv / compare_curves.csv under --results."""
    folder = Path(results)
    runs_rows = read_csv(folder / "compare_runs.csv")
    if not runs_rows:
        raise BenchError(f"{folder / 'compare_runs.csv'}: no runs yet; run a stage first")
    picks, edges = pick_lrs(runs_rows)
    lines = ["# The comparison of the four estimators (bench/PROTOCOL.md)", "",
             (f"Runs: {len(runs_rows)} ({stage_counts(runs_rows)}); commits: "
              f"{sorted({r['commit'][:10] for r in runs_rows})}; "
              f"CPUs: {sorted({r['cpu'] for r in runs_rows})}; threads per run: "
              f"{sorted({r['threads'] for r in runs_rows})}."), "", "## Stage 1: learning rates", ""]  # fmt: skip
    table = lr_table(runs_rows)
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    body = [[c, *[_mean_cell(table[c].get(lr)) for lr in lrs], f"{picks[c]:g}" if c in picks else "-",
             f"{edges[c]:g}" if c in edges else ""] for c in table]  # fmt: skip
    header = ["configuration", *[f"lr {lr:g}" for lr in lrs], "pick", "edge rule adds"]
    lines += [markdown_table(header, body)]
    stats = aggregates(runs_rows)  # the bootstrap is slow: computed once, for tables and figure
    if any(r["stage"] == "evaluate" for r in runs_rows):
        lines += evaluation_sections(runs_rows, stats)
    (folder / "compare.md").write_text("\n".join(lines) + "\n")
    if have_matplotlib():
        tuned = mean_untrained([r for r in runs_rows if r["stage"] == "tune"])
        plot_lr(table, folder / "compare_lr.png", tuned)
        curves = read_csv(folder / "compare_curves.csv")
        if stats["held"]:  # a configuration has 2 seeds somewhere
            fig2 = [("color", c) for c in ("reinforce-k1", "rloo-k4", "ppo-k1")]
            plot_curves(curves, fig2, folder / "compare_fig2.png")
            plot_figure3(curves, folder / "compare_fig3.png")
            plot_intervals(stats, folder / "compare_intervals.png")
    print((folder / "compare.md").read_text())
    return folder / "compare.md"


def stage_counts(runs_rows: list[dict]) -> str:
    """ "tune 36, evaluate 12, tune-superseded 9": rows of a stage named otherwise are kept, not used."""
    counts = Counter(r["stage"] for r in runs_rows)
    return ", ".join(f"{stage} {n}" for stage, n in counts.items())


def _mean_cell(values) -> str:
    if not values:
        return ""
    return f"{np.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def mean_untrained(rows: list[dict]) -> float | None:
    """The mean untrained held-out score of rows that recorded one (None if none did)."""
    before = [
        float(r["untrained_heldout"]) for r in rows if r["untrained_heldout"] not in ("", None)
    ]
    return float(np.mean(before)) if before else None


def aggregates(runs_rows: list[dict]) -> dict:
    """rliable's intervals of stage 2, for every configuration and pair with at least 2 seeds:
    {"held": {task: {config: (IQM, low, high)}}, "train": (same, training reward),
     "pairs": {(x, y, task): (P(X > Y), low, high)}, "untrained": {task: mean untrained score}}."""
    stats: dict = {"held": {}, "train": {}, "pairs": {}, "untrained": {}}
    for task, configs in TASKS.items():
        present = [c for c in configs if len(scores_of(runs_rows, c, task)) >= 2]
        if present:
            stats["untrained"][task] = mean_untrained(
                [r for c in present for r in runs_of(runs_rows, c, task)]
            )
            for name, key in (("held", "final_heldout"), ("train", "final_train_reward")):
                stats[name][task] = iqm_intervals({c: scores_of(runs_rows, c, task, key)
                                                   for c in present})  # fmt: skip
    for x, y, task in PAIRS:
        sx, sy = scores_of(runs_rows, x, task), scores_of(runs_rows, y, task)
        if len(sx) >= 2 and len(sy) >= 2:
            stats["pairs"][x, y, task] = improvement_probabilities({"p": (sx, sy)})["p"]
    return stats


def evaluation_sections(runs_rows: list[dict], stats: dict) -> list[str]:
    lines = ["", "## Stages 2 and 3: final scores, IQM with 95% stratified-bootstrap intervals", ""]
    body = []
    for task, held in stats["held"].items():
        for c, interval in held.items():
            mine = runs_of(runs_rows, c, task)
            reach = [float(r["images_to_threshold"]) for r in mine if r["images_to_threshold"]]
            before = stats["untrained"].get(task)
            body.append([task, c, f"{float(mine[0]['lr']):g}", len(mine),
                         "-" if before is None else f"{before:.3f}", _interval(interval),
                         _interval(stats["train"][task][c]), f"{len(reach)}/{len(mine)}",
                         f"{np.median(reach):.0f}" if reach else "-"])  # fmt: skip
    header = ["task", "configuration", "lr", "seeds", "untrained held-out (mean over the task's runs)",
              "held-out (EMA) IQM [95% CI]",
              "training reward, last 10 epochs, IQM [95% CI]",
              f"runs reaching untrained + {THRESHOLD_GAIN}", "images to reach it (median)"]  # fmt: skip
    lines += [markdown_table(header, body), "## Runs (final held-out, EMA, per seed)", ""]
    per_seed = []
    for task, configs in TASKS.items():
        for c in configs:
            mine = sorted(
                (int(r["seed"]), float(r["final_heldout"])) for r in runs_of(runs_rows, c, task)
            )
            if mine:
                per_seed.append([task, c, len(mine), ", ".join(f"{s}: {v:.3f}" for s, v in mine)])
    lines += [markdown_table(["task", "configuration", "seeds", "seed: score"], per_seed), "",
              "## Probability of improvement (held-out, EMA)", ""]  # fmt: skip
    body = []
    for (x, y, task), p in stats["pairs"].items():
        sx, sy = scores_of(runs_rows, x, task), scores_of(runs_rows, y, task)
        body.append([f"{x} > {y}", task, f"{len(sx)} / {len(sy)}", _interval(p, 2),
                     verdict(p[1], p[2]), f"{sx.mean() - sy.mean():+.3f}",
                     f"{detectable_difference(sx[:, 0], sy[:, 0]):.3f}"])  # fmt: skip
    header = ["claim", "task", "seeds", "P(X > Y) [95% CI]", "verdict", "mean difference",
              "smallest detectable difference"]  # fmt: skip
    return [*lines, markdown_table(header, body)]


def _interval(values: tuple, digits: int = 3) -> str:
    point, low, high = values
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _curve(curves: list[dict], config: str, task: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """epochs (E,) and values (S, E) of the evaluation runs of one configuration and task."""
    rows = [r for r in curves if r["stage"] == "evaluate" and r["config"] == config
            and r["reward"] == task and r[key] not in ("", None)]  # fmt: skip
    seeds = sorted({r["seed"] for r in rows})
    by_seed = [[(int(r["epoch"]), float(r[key])) for r in rows if r["seed"] == s] for s in seeds]
    epochs = np.array([e for e, _ in sorted(by_seed[0])]) if by_seed else np.zeros(0)
    values = np.array([[v for _, v in sorted(points)] for points in by_seed])
    return epochs, values


CURVE_LABELS = {"train_reward": "training reward", "heldout": "held-out score (EMA)"}


def plot_curves(curves: list[dict], lines: list[tuple], path: Path, ax=None,
                key: str = "train_reward") -> None:  # fmt: skip
    """Mean and 80% prediction interval over seeds of one curve column, per (task, configuration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for (task, config), color in zip(lines, plt.cm.tab10.colors):
        epochs, values = _curve(curves, config, task, key)
        if len(values) < 2:
            continue
        mean, low, high = prediction_band(values)
        ax.plot(epochs, mean, color=color, label=f"{config} ({len(values)} seeds)",
                marker="." if key != "train_reward" else None)  # fmt: skip
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set(xlabel="epoch (64 images each)", ylabel=CURVE_LABELS[key])
    ax.legend(fontsize=8)
    if own:
        ax.set_title(
            f"{CURVE_LABELS[key]}: mean and 80% prediction interval over seeds", fontsize=9
        )
        fig.savefig(path, dpi=120)
        plt.close(fig)


def plot_figure3(curves: list[dict], path: Path) -> None:
    """PPO K=1 vs LOOP K=4 per task: the training reward (the paper's y-axis, top) and the held-out
    score of the EMA weights every 4 epochs (what the verdicts use, bottom)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(TASKS), figsize=(4.7 * len(TASKS), 7.5), constrained_layout=True
    )
    for column, task in enumerate(TASKS):
        for row, key in enumerate(CURVE_LABELS):
            ax = axes[row, column]
            plot_curves(curves, [(task, "ppo-k1"), (task, "loop-k4")], path, ax=ax, key=key)
            ax.set_title(f"{task}: {CURVE_LABELS[key]}", fontsize=10)
    fig.suptitle("PPO K=1 vs LOOP K=4: mean and 80% prediction interval over seeds")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_intervals(stats: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    labels = []
    for task, held in stats["held"].items():
        before = stats["untrained"].get(task)
        for c, (point, low, high) in held.items():
            left.errorbar(point, len(labels), xerr=[[point - low], [high - point]], fmt="o",
                          capsize=3, color="C0")  # fmt: skip
            if before is not None:  # the task's untrained score: where every run started
                left.plot(before, len(labels), "|", color="gray", markersize=14,
                          label="untrained" if not labels else None)  # fmt: skip
            labels.append(f"{task}: {c}")
    left.set(
        yticks=range(len(labels)), yticklabels=labels, xlabel="final held-out score (EMA), IQM"
    )
    if stats["untrained"]:
        left.legend(loc="lower left", bbox_to_anchor=(0, 1), frameon=False)  # above the axes
    left.invert_yaxis()
    labels = []
    for (x, yc, task), (point, low, high) in stats["pairs"].items():
        right.errorbar(point, len(labels), xerr=[[point - low], [high - point]], fmt="o", capsize=3)
        labels.append(f"{task}: {x} > {yc}")
    right.axvline(0.5, color="gray", linestyle=":")
    right.set(yticks=range(len(labels)), yticklabels=labels, xlim=(0, 1),
              xlabel="P(X > Y), 95% interval")  # fmt: skip
    right.invert_yaxis()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lr(table: dict, path: Path, untrained: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    if untrained is not None:
        ax.axhline(untrained, color="grey", linestyle="--", linewidth=1, label="untrained")
    for (config, by_lr), color in zip(table.items(), plt.cm.tab10.colors):
        lrs = sorted(by_lr)
        ax.plot(lrs, [np.mean(by_lr[lr]) for lr in lrs], "o-", color=color, label=config)
        for lr in lrs:
            ax.scatter([lr] * len(by_lr[lr]), by_lr[lr], color=color, s=8, alpha=0.5)
    grid = sorted({lr for by_lr in table.values() for lr in by_lr})
    ax.set(xscale="log", xlabel="learning rate", ylabel="final held-out score (EMA), color")
    ax.set_xticks(grid, [f"{lr:g}" for lr in grid], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_title("learning-rate sensitivity (tuning seeds; line: mean)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# === Command line
def _stage(runs_list, jobs, threads, results, runs, tiny, commit) -> None:
    run_all(runs_list, jobs, threads, Path(results), Path(runs), tiny, commit)


def tune(jobs: int = 1, threads: int = 1, results: str = "runs/compare/results",
         runs: str = "runs/compare", tiny: bool = False, commit: str = "HEAD") -> None:  # fmt: skip
    """Stage 1 (and its edge-rule runs once the grid is complete)."""
    runs_list = plan_tune()
    _stage(runs_list, jobs, threads, results, runs, tiny, commit)
    _, edges = pick_lrs(read_csv(Path(results) / "compare_runs.csv"))
    if edges:
        print(f"edge rule: adding {edges}")
        extra = [run for c, lr in edges.items() for run in plan_tune((lr,), configs=(c,))]
        _stage(extra, jobs, threads, results, runs, tiny, commit)


def evaluate(jobs: int = 1, threads: int = 1, results: str = "runs/compare/results",
             runs: str = "runs/compare", tiny: bool = False, commit: str = "HEAD",
             seeds: int = len(EVAL_SEEDS)) -> None:  # fmt: skip
    """Stage 2 at stage 1's picks (--seeds: how many of seeds 0-9, for a partial stage)."""
    picks, edges = pick_lrs(read_csv(Path(results) / "compare_runs.csv"))
    if missing := [c for c in TUNED if c not in picks or c in edges]:
        raise BenchError(f"stage 1 is unfinished for {missing}; run `tune` first")
    runs_list = plan_evaluate(picks, EVAL_SEEDS[:seeds])
    _stage(runs_list, jobs, threads, results, runs, tiny, commit)


def extend(jobs: int = 1, threads: int = 1, results: str = "runs/compare/results",
           runs: str = "runs/compare", tiny: bool = False, commit: str = "HEAD") -> None:  # fmt: skip
    """Stage 3: seeds 10-19 of LOOP K=4, PPO K=1, RLOO K=4 if P(LOOP K=4 > PPO K=1)'s CI holds 0.5."""
    rows = read_csv(Path(results) / "compare_runs.csv")
    sx, sy = scores_of(rows, "loop-k4", "color"), scores_of(rows, "ppo-k1", "color")
    if len(sx) < len(EVAL_SEEDS) or len(sy) < len(EVAL_SEEDS):
        raise BenchError("stage 2 is unfinished for loop-k4 / ppo-k1 on color; run `evaluate`")
    _, low, high = improvement_probabilities({"p": (sx, sy)})["p"]
    if not low <= 0.5 <= high:
        print(f"P(loop-k4 > ppo-k1) interval [{low:.2f}, {high:.2f}] excludes 0.5: no stage 3")
        return
    picks, _ = pick_lrs(rows)
    _stage(plan_evaluate(picks, EXTRA_SEEDS, EXTENDED), jobs, threads, results, runs, tiny, commit)


COMMANDS = {"tune": tune, "evaluate": evaluate, "extend": extend, "report": report}

if __name__ == "__main__":
    from bench.common import commands_main

    commands_main(COMMANDS, __doc__)
