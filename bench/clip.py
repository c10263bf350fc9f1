"""Clip range x reuse: LOOP K=4 with 1 or 4 passes over each rollout at eps 1e-4, 1e-3, 1e-2
(bench/PROTOCOL.md, section "Clip range x reuse (issue 38, part A)"). loop.py's log-prob is a mean
over the latent's D dimensions, so DDPO's eps = 1e-4 (set for D = 16,384) is about 8x tighter on
this world's D = 256; this sweep asks whether reuse pays at a clip range matched to D.

    python bench/clip.py run --jobs 2 --commit fa566ad   # the check run, then seeds 0-19 seed-major
    python bench/clip.py report                          # clip.md, clip.png from the CSVs
    python bench/clip.py run --tiny --jobs 2             # the test suite's tiny model, seconds

Each run is `OMP_NUM_THREADS=1 python loop.py --algo loop --k 4 [--inner_epochs 4 --lr 1e-3]
[--clip_range E]` in a worktree of one commit, through bench/compare.py's machinery (a stopped sweep
resumes exactly; a run already in clip_runs.csv is skipped). Results go to --results (default
runs/clip/results, untracked); the committed ones were made with `--results bench/results`.
    clip_runs.csv    one row per run: config, passes, clip range, lr, seed, final held-out score,
                     images to untrained + 0.1, per pass the mean share of terms outside the clip
                     range, the share whose gradient it zeroes and the rms of log rho, seconds, cpu,
                     commit, command (the run's flags)
    clip_curves.csv  one row per run and epoch (as compare_curves.csv)
The 1-pass eps 1e-4 cell (`loop-k4`) and on-policy RLOO K=4 (`rloo-k4`) are the comparison's stage 2-3
runs, read from compare_runs.csv / compare_curves.csv, never rerun, except the check run (seed 0 of
`loop-k4`, stage "check"), which must reproduce its recorded row.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import compare
from bench.common import BenchError, tiny_model

# === The protocol (bench/PROTOCOL.md, "Clip range x reuse"), as data
EPOCHS = 48
PASSES_LR = {1: 4e-3, 4: 1e-3}  # lr x passes held at 4e-3
NEW = {  # configuration -> (passes, clip range); every one LOOP K=4, 64 images an epoch
    "loop-k4-p1-c1e-2": (1, 1e-2),
    "loop-k4-p4-c1e-4": (4, 1e-4),
    "loop-k4-p4-c1e-3": (4, 1e-3),
    "loop-k4-p4-c1e-2": (4, 1e-2),
}
REUSED = {"loop-k4": (1, 1e-4), "rloo-k4": (1, None)}  # the comparison's stage 2-3 (rloo: no clip)
SEEDS = tuple(range(20))
MIN_SEEDS = 10  # the floor: a cell with fewer is incomplete and left out of tables and verdicts
UPDATES_PER_PASS = 2  # the default minibatch is half the 64-image rollout
CLAIMS = [  # (name, x, y): P(x > y)
    ("R", "loop-k4-p4-c1e-3", "loop-k4"),
    ("R'", "loop-k4-p4-c1e-4", "loop-k4"),
    ("C1", "loop-k4-p1-c1e-2", "loop-k4"),
    ("C4", "loop-k4-p4-c1e-3", "loop-k4-p4-c1e-2"),
    ("P", "loop-k4-p4-c1e-3", "rloo-k4"),
]
PASS_KEYS = {"outside": "clipfrac_by_update", "zeroed": "zeroed_by_update",
             "log_ratio_rms": "log_ratio_rms_by_update"}  # fmt: skip
RUN_FIELDS = ("stage", "config", "algo", "k", "lr", "passes", "clip_range", "seed", "reward",
              "threads", "epochs", "untrained_heldout", "final_heldout", "final_heldout_raw",
              "final_train_reward", "images_to_threshold",
              *(f"{name}_by_pass" for name in PASS_KEYS), "train_seconds", "eval_seconds", "cpu",
              "commit", "command")  # fmt: skip
TINY_SCALE = 8  # --tiny: 8 images an epoch, 2 epochs, seed 0 only


@dataclass(frozen=True)
class ClipRun(compare.Run):
    passes: int = 1
    clip_range: float = 1e-4

    def flags(self) -> list[str]:
        """The comparison's flags, plus only what differs from loop.py's defaults."""
        extra = ["--inner_epochs", str(self.passes)] if self.passes != 1 else []
        if self.clip_range != 1e-4:
            extra += ["--clip_range", f"{self.clip_range:g}"]
        return [*super().flags(), *extra]


def plan(seeds=SEEDS) -> list[ClipRun]:
    """The check run (seed 0 of the reused 1-pass eps 1e-4 cell), then seeds seed-major over the
    new cells in PROTOCOL's order."""
    runs = [ClipRun("check", "loop-k4", "loop", 4, PASSES_LR[1], seeds[0], "color", 4)]
    for seed in seeds:
        for config, (passes, clip) in NEW.items():
            runs.append(ClipRun("evaluate", config, "loop", 4, PASSES_LR[passes], seed, "color", 4,
                                passes, clip))  # fmt: skip
    return runs


def by_pass(rows: list[dict], key: str, passes: int) -> list[float]:
    """Per pass, the mean over the run's epochs of a per-update field (updates 2p and 2p + 1)."""
    values = np.array([r[key] for r in rows if r.get(key)], dtype=float)  # (epochs, updates)
    if not len(values):
        return []
    per_pass = values.reshape(len(values), passes, -1).mean(axis=(0, 2))
    return [round(float(v), 5) for v in per_pass]


# === Running
def run(jobs: int = 2, threads: int = 1, results: str = "runs/clip/results",
        runs: str = "runs/clip", tiny: bool = False, commit: str = "HEAD") -> None:  # fmt: skip
    """The check run, then seeds 0-19 seed-major; every run not yet in clip_runs.csv, `jobs` at a
    time; a row as each ends."""
    from tqdm import tqdm

    if jobs < 1 or threads < 1:
        raise BenchError(f"--jobs {jobs} / --threads {threads}: need at least 1")
    results_dir, runs_dir = Path(results), Path(runs)
    try:
        sha = compare.git("rev-parse", "--verify", f"{commit}^{{commit}}").strip()
    except subprocess.CalledProcessError as error:
        raise BenchError(f"--commit {commit}: not a commit of this repository") from error
    results_dir.mkdir(parents=True, exist_ok=True)
    planned, extra, epochs = plan(), [], EPOCHS
    if tiny:  # the tiny random model, 1/8 of the images, a reward it can be scored by
        model, prompts = tiny_model(runs_dir / "tiny-model")
        extra = [*compare.TINY_FLAGS, "--model", str(model.resolve()), "--train_prompts",
                 str(prompts.resolve())]  # fmt: skip
        planned = [dataclasses.replace(r, reward="jpeg_compressibility")
                   for r in plan(SEEDS[:1])]  # fmt: skip
        epochs = 2
    src = compare.worktree(sha, runs_dir)
    key = lambda r: (r["stage"], r["config"], int(r["seed"]), r["reward"])
    done = {key(r) for r in compare.read_csv(results_dir / "clip_runs.csv")}
    todo = [r for r in planned if (r.stage, r.config, r.seed, r.reward) not in done]
    print(f"{len(todo)} of {len(planned)} runs to do, {jobs} at a time, {threads} thread(s) each, "
          f"code at {sha[:10]}")  # fmt: skip

    def one(r: ClipRun) -> dict:
        folder = compare.execute(r, src, runs_dir.resolve(), threads, extra, epochs)
        cmd = compare.command_line(r, threads, extra)
        base, curves = compare.summarise(r, folder, threads, sha, cmd)
        rows = compare.metrics_of(folder)
        evals = [m["eval_seconds"] for m in rows if m.get("eval_seconds")]
        record = {field: base.get(field) for field in RUN_FIELDS} | {
            "passes": r.passes, "clip_range": r.clip_range, "eval_seconds": round(sum(evals), 1)}  # fmt: skip
        for name, field in PASS_KEYS.items():
            record[f"{name}_by_pass"] = " ".join(map(str, by_pass(rows[1:], field, r.passes)))
        compare.append_csv(results_dir / "clip_curves.csv", compare.CURVE_FIELDS, curves)
        compare.append_csv(results_dir / "clip_runs.csv", RUN_FIELDS, [record])
        return record

    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(todo), desc="runs") as bar:
        for record in pool.map(one, todo):
            bar.update()
            tqdm.write(f"{record['config']} seed {record['seed']}: held-out "
                       f"{record['final_heldout']:.4f}, zeroed by pass {record['zeroed_by_pass']} "
                       f"({record['train_seconds']:.0f} s training)")  # fmt: skip


def report(results: str = "runs/clip/results") -> Path:
    """clip.md (cells, claims, zeroed share by pass) and clip.png; written in a later step."""
    raise BenchError("the report is not written yet")


COMMANDS = {"run": run, "report": report}

if __name__ == "__main__":
    from bench.common import commands_main

    commands_main(COMMANDS, __doc__)
