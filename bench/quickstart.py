"""The README's quickstart numbers, measured rather than typed: the bare `python loop.py --seed S` on
seeds 0-4 (or --seeds), at --threads torch threads, one run at a time, plus a short fingerprint of
the same code (the first 3 epochs of seed 0 at one thread) that the test suite re-runs.

    python bench/quickstart.py                 # measure; prints the README block, writes nothing tracked
    python bench/quickstart.py --write         # also bench/results/quickstart.json and README's quickstart block
    python bench/quickstart.py --runs DIR      # reuse finished run folders DIR/seed<S> (read, not rerun)

Each run folder gets a file `commit` (the code that made it), quoted with the numbers; a reused
folder made elsewhere needs one written by hand.

tests/test_quickstart.py checks that README's block is the one bench/results/quickstart.json renders and that
today's code reproduces the fingerprint: a change that moves the default run fails it until this
script is rerun with --write.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "bench" / "results" / "quickstart.json"
README = REPO / "README.md"
BEGIN, END = "<!-- quickstart -->", "<!-- /quickstart -->"
FINGERPRINT_EPOCHS = 3


def run_default(folder: Path, seed: int, threads: int, *extra: str) -> list[dict]:
    """metrics.jsonl of `python loop.py --seed S` in folder (run unless it finished already)."""
    metrics = folder / "metrics.jsonl"
    if not (folder / "samples" / "before_after.png").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, str(REPO / "loop.py"), "--seed", str(seed), "--out", str(folder)]
        subprocess.run([*command, *extra], cwd=REPO, env=env, check=True, capture_output=True)
        (folder / "commit").write_text(head_commit())
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def head_commit() -> str:
    git = ["git", "rev-parse", "--short=7", "HEAD"]
    return subprocess.run(git, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def commits_of(seeds: dict) -> str:
    """'abc1234' or 'abc1234 (seed 0), def5678 (seeds 1-4)': the code each run was made by."""
    by_commit: dict[str, list[str]] = {}
    for seed, entry in seeds.items():
        by_commit.setdefault(entry["commit"], []).append(seed)
    if len(by_commit) == 1:
        return f"commit {next(iter(by_commit))}"
    named = [f"{c} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for c, s in by_commit.items()]
    return "commits " + ", ".join(named)


def fingerprint(folder: Path) -> list[float]:
    """reward_mean of the first epochs of seed 0, one thread: moves with any change to the default."""
    rows = run_default(folder, 0, 1, "--epochs", str(FINGERPRINT_EPOCHS))
    return [row["reward_mean"] for row in rows[1:]]


def render(record: dict) -> str:
    """README's quickstart block from bench/results/quickstart.json."""
    seeds = record["seeds"]
    name, first = next(iter(seeds.items()))  # the first seed measured (0 unless --seeds said)
    gains = [s["after"] - s["before"] for s in seeds.values()]
    listed = ", ".join(f"{g:+.3f}" for g in gains)
    numbers = [int(s) for s in seeds]
    span = f"{numbers[0]}-{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else (
        ", ".join(map(str, numbers)))  # fmt: skip
    return "\n".join([
        "```",
        f"held-out shapes_color: before {first['before']:.4f} -> after {first['after']:.4f} (epoch 48)",
        "before/after grid: runs/loop-color-k4-<time>/samples/before_after.png",
        "LoRA: runs/loop-color-k4-<time>/lora/pytorch_lora_weights.safetensors",
        "```",
        "",
        (
            f"That is seed {name} of the bare command with {record['threads']} torch threads on a "
            f"{record['cores']}-core machine: {gains[0]:+.3f} in about "
            f"{round(first['minutes'])} minutes. Seeds {span} gained {listed} (median "
            f"{statistics.median(gains):+.3f}, {sum(g >= 0.1 for g in gains)} of {len(gains)} at "
            f"least +0.10; torch {record['torch']}, {commits_of(seeds)}; "
            "`bench/quickstart.py` measured them). Other machines, "
            "thread counts and torch versions sum in other orders: the trajectory can differ."
        ),
    ])  # fmt: skip


def main(seeds: str | tuple = "0,1,2,3,4", threads: int = 2, runs: str = "runs/quickstart",
         write: bool = False) -> None:  # fmt: skip
    import torch

    root, record = Path(runs), {"seeds": {}}
    # fire reads `--seeds 0,1,2` as a tuple and `--seeds 3` as an int; a string is split on commas
    listed = seeds if isinstance(seeds, (tuple, list)) else str(seeds).split(",")
    for seed in (int(s) for s in listed):
        rows = run_default(root / f"seed{seed}", seed, threads)
        evals = [r for r in rows if r["eval_reward_mean"] is not None]
        minutes = sum(r["seconds"] + (r["eval_seconds"] or 0) for r in rows) / 60
        record["seeds"][str(seed)] = {"before": evals[0]["eval_reward_mean"],
                                      "after": evals[-1]["eval_reward_mean"], "minutes": minutes,
                                      "commit": (root / f"seed{seed}" / "commit").read_text().strip()}  # fmt: skip
        print(
            f"seed {seed}: {evals[0]['eval_reward_mean']:.4f} -> {evals[-1]['eval_reward_mean']:.4f}"
        )
    record |= {
        "threads": threads,
        "cores": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
    }
    record |= {"cpu": platform.processor() or platform.machine()}
    record["fingerprint"] = fingerprint(root / "fingerprint")
    record["fingerprint_commit"] = head_commit()
    block = render(record)
    print(block)
    if write:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        text = README.read_text()
        head, rest = text.split(BEGIN)
        README.write_text(f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}")
        print(f"wrote {RECORD} and README's quickstart block")


if __name__ == "__main__":
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        sys.exit(0)
    import fire

    fire.Fire(main)
