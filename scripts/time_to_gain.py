"""Held-out gain per CPU-minute on the embedded default: time to +0.15, and images/s old vs new.

Time to +0.15 (the measure of the "held-out gain per CPU-minute" issue): for each seed, run the
real command `python loop.py --algo loop --k 4 --reward color --seed S` with `--epochs` = twice the
default (the cap) and `--eval_every 4`, then read its metrics.jsonl. The time is the training wall
time (metrics' `seconds`: rollouts and updates; held-out evaluations are timed apart, in
`eval_seconds`, and not counted) from the start of training until the held-out score (EMA weights,
fixed noise) first reaches the untrained score + 0.15; "> cap" when it never does. The same runs
give the default command's targets, since a run is the default run up to the default epochs (no
schedule depends on --epochs): the held-out gain at the default epochs and the training reward of
its last 10 epochs against its first 10.

    python scripts/time_to_gain.py --label new                      # seeds 0-4, today's defaults
    python scripts/time_to_gain.py --label old --seeds 0 --old old  # the 10-step default, as flags
    python scripts/time_to_gain.py --label six --old six            # the 6-step default, as flags
    python scripts/time_to_gain.py --speed_repeats 3                # images/s old vs new, one process
    python scripts/time_to_gain.py --speed_repeats 3 --speed_model runs/other  # + another model
    python scripts/time_to_gain.py --plot old,new                   # gain vs training minutes

The previous defaults ran on the previous, 16x16-latent model; `--old` and the speed table take it
from git (commit OLD_MODEL_COMMIT) into runs/tiny16 the first time.

Runs go to runs/time_to_gain/<label>-seed<S>; a finished run is read, not rerun, so an interrupted
measurement continues where it stopped. The runs docs/record.md quotes are kept in docs/time_to_gain/
(each run's metrics.jsonl as <label>-seed<S>.metrics.jsonl, and the tables and figures written here). `--parallel 2` runs two seeds at a time with one thread
each (say so when you report times: a 2-thread run alone is faster per run). Machines differ in
speed: compare old and new measured back to back on one machine, as ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import loop

COMMAND = ["--algo", "loop", "--k", "4", "--reward", "color"]
# The 16x16-latent model shipped until 2026-12-02; `old_model()` extracts it from git into runs/
OLD_MODEL_COMMIT, OLD_MODEL = "b59f749", "runs/tiny16"
# The defaults before the "held-out gain per CPU-minute" issue (loop.py at commit ec7ba27)
OLD = {
    "epochs": 56, "lr": 2e-3, "num_steps": 10, "guidance_scale": 5.0, "micro_batch": 8,
    "images_per_epoch": 32, "min_train_sigma": 0.5, "ema_decay": 0.9, "clip_range": 1e-4,
    "minibatch": 8, "inner_epochs": 1, "lora_rank": 8, "model": OLD_MODEL,
}  # fmt: skip
# The 6-step default on the 16x16 model (2026-12-02, commit b59f749), the step between OLD and now
SIX_STEPS = OLD | {"epochs": 48, "num_steps": 6}
PREVIOUS = {"old": OLD, "six": SIX_STEPS}


def old_model(folder: str = OLD_MODEL) -> str:
    """The previous model folder, extracted from git at OLD_MODEL_COMMIT when it is not there yet."""
    if not (Path(folder) / "model_index.json").is_file():
        Path(folder).mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(HERE), "archive", OLD_MODEL_COMMIT, "assets/tiny-shapes"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        subprocess.run(
            ["tar", "-x", "-C", folder, "--strip-components=2"], input=archive, check=True
        )
    return folder


def flags_of(values: dict) -> list[str]:
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def train(folder: Path, seed: int, epochs: int, eval_every: int, extra: dict, threads: int):
    """The real command for one seed, in its own process, up to `epochs` (continuing a run with
    --resume, which is exact); returns its metrics rows."""
    if (folder / "metrics.jsonl").is_file() and loop.read_metrics(folder)[-1]["epoch"] >= epochs:
        return [r for r in loop.read_metrics(folder) if r["epoch"] <= epochs]
    values = {"seed": seed, "epochs": epochs, "eval_every": eval_every, **extra}
    flag = "--resume" if (folder / "checkpoint" / "state.pt").is_file() else "--out"
    command = [sys.executable, str(HERE / "loop.py"), *COMMAND, *flags_of(values), flag, folder]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with open(folder.with_suffix(".log"), "a") as log:
        subprocess.run(list(map(str, command)), check=True, env=env, stdout=log, stderr=log)
    return loop.read_metrics(folder)


def reached(rows: list[dict], target: float) -> bool:
    return any((r["eval_reward_mean"] or -1) >= rows[0]["eval_reward_mean"] + target for r in rows)


def gain_curve(rows: list[dict]) -> list[tuple[float, int, float]]:
    """(training minutes, epoch, held-out gain) at every evaluation; evaluation time not counted."""
    before, minutes, curve = rows[0]["eval_reward_mean"], 0.0, [(0.0, 0, 0.0)]
    for row in rows[1:]:
        minutes += row["seconds"] / 60
        if row["eval_reward_mean"] is not None:
            curve.append((minutes, row["epoch"], row["eval_reward_mean"] - before))
    return curve


def summarise(rows: list[dict], default_epochs: int, target: float) -> dict:
    """Time to before + target (training seconds, evaluation excluded), and the default run's gains."""
    before = rows[0]["eval_reward_mean"]
    hits = [(m, epoch) for m, epoch, gain in gain_curve(rows)[1:] if gain >= target]
    hit = {"epoch": hits[0][1], "minutes": hits[0][0]} if hits else None
    train_seconds = sum(row["seconds"] for row in rows[1:])
    at_default = next(r for r in rows if r["epoch"] == default_epochs)["eval_reward_mean"]
    train_reward = [r["reward_mean"] for r in rows[1 : default_epochs + 1]]
    return {
        "before": before,
        "hit": hit,
        "cap_minutes": train_seconds / 60,
        "default_gain": at_default - before,
        "default_minutes": sum(r["seconds"] for r in rows[1 : default_epochs + 1]) / 60,
        "reward_rise": statistics.mean(train_reward[-10:]) - statistics.mean(train_reward[:10]),
        "last": {"epoch": rows[-1]["epoch"], "gain": rows[-1]["eval_reward_mean"] - before},
    }


def report(label: str, seeds: list[int], results: list[dict], target: float) -> str:
    lines = [
        (
            f"| {label} seed | time to +{target:.2f} (epoch) | held-out gain at the default epochs "
            "| training reward rise (last 10 - first 10) | minutes for the default epochs "
            "| gain at the last evaluation (epoch) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for seed, r in zip(seeds, results):
        hit = r["hit"]
        cap = f"> {r['cap_minutes']:.1f} min (> {r['last']['epoch']})"
        reached = f"{hit['minutes']:.1f} min ({hit['epoch']})" if hit else cap
        lines.append(
            f"| {seed} | {reached} | {r['default_gain']:+.3f} | {r['reward_rise']:+.3f} "
            f"| {r['default_minutes']:.1f} | {r['last']['gain']:+.3f} ({r['last']['epoch']}) |"
        )
    times = sorted(r["hit"]["minutes"] if r["hit"] else float("inf") for r in results)
    gains = [r["default_gain"] for r in results]
    lines.append(
        f"\nmedian time to +{target:.2f}: {statistics.median(times):.1f} min; reached by "
        f"{sum(r['hit'] is not None for r in results)}/{len(results)} seeds; default-epoch gain "
        f"median {statistics.median(gains):+.3f}, min {min(gains):+.3f}"
    )
    return "\n".join(lines)


def speed(repeats: int, model: str = "") -> str:
    """Images/s of sampling and of the update phase, alternating in one process: the previous
    defaults on the previous (16x16-latent) model and today's on the shipped one; with `model`
    (another pipeline folder; its weights do not matter for speed) today's defaults on it too."""
    import random

    import torch

    import rewards

    torch.set_flush_denormal(True)
    new = loop.Config()
    path = loop.resolve_model_path(new.model)
    reward_name, prompts, _ = loop.resolve_reward_and_prompts(new, path)
    reward_fn = rewards.load_reward(reward_name)

    def load(folder) -> loop.Models:
        return loop.load_models(folder, torch.device("cpu"), torch.float32, new.lora_rank, 0)

    previous = load(old_model())
    entries = {
        "previous default (10 steps, 16x16 latents)": (previous, loop.Config(**OLD)),
        "6 steps, 16x16 latents (until 2026-12-02)": (previous, loop.Config(**SIX_STEPS)),
        "default (8x8 latents)": (load(path), new),
    }
    if model:
        entries[model] = (load(model), new)
    timings = {name: {"sampling": [], "updates": []} for name in entries}
    for repeat in range(repeats):
        for name, (models, cfg) in entries.items():
            sizes = loop.check_config(cfg, 1)
            policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
            optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=0.0)  # no change
            n = cfg.images_per_epoch
            _, chosen, x_T, step_noise = loop.epoch_inputs(
                cfg, 0, repeat, prompts, n, models.latent_shape
            )
            tic = time.time()
            batch, reward = loop.rollout(
                models, policy, chosen, x_T, step_noise, reward_fn, sizes["micro_batch"]
            )
            timings[name]["sampling"].append(n / (time.time() - tic))
            advantage = loop.compute_advantages(cfg.algo, reward.view(-1, cfg.k), "off", 5.0)
            tic = time.time()
            loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, random.Random(0), sizes)
            timings[name]["updates"].append(n / (time.time() - tic))
    rate = {
        name: {phase: statistics.median(v) for phase, v in t.items()} for name, t in timings.items()
    }
    # seconds per image of one epoch, and per epoch of each configuration's own size
    per_image = {name: sum(1 / r for r in rate[name].values()) for name in rate}
    first = next(iter(entries))
    header = (
        "| configuration | images per epoch | sampling, images/s | update phase, images/s "
        "| one epoch (s) | images/s, this / previous default |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for name, (_, cfg) in entries.items():
        lines.append(
            f"| {name} | {cfg.images_per_epoch} | {rate[name]['sampling']:.2f} | "
            f"{rate[name]['updates']:.2f} | {per_image[name] * cfg.images_per_epoch:.2f} | "
            f"{per_image[first] / per_image[name]:.2f}x |"
        )
    return "\n".join(lines)


def plot_gains(labels: list[str], out: Path, target: float) -> Path:
    """Held-out gain against training minutes (evaluation excluded), one line per run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for color, label in zip(("tab:gray", "tab:blue", "tab:green", "tab:red"), labels):
        for i, folder in enumerate(sorted(out.glob(f"{label}-seed*/"))):
            xs, _, ys = zip(*gain_curve(loop.read_metrics(folder)))
            axes.plot(
                xs, ys, color=color, alpha=0.8, label=None if i else f"{label} (one line a seed)"
            )
    axes.axhline(target, color="black", linestyle="--", linewidth=1, label=f"+{target}")
    axes.set(xlabel="training minutes (evaluation excluded)", ylabel="held-out gain (EMA)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "time_to_gain.png", dpi=110)
    return out / "time_to_gain.png"


def gains_at_minutes(labels: list[str], out: Path, minutes: list[float]) -> str:
    """Each run's held-out gain at its last evaluation within M training minutes, per label."""
    lines = ["| minutes | " + " | ".join(f"{label}: per seed | mean" for label in labels) + " |"]
    lines.append("|---|" + "---|---|" * len(labels))
    for limit in minutes:
        cells = []
        for label in labels:
            folders = sorted(out.glob(f"{label}-seed*/"))
            curves = [gain_curve(loop.read_metrics(folder)) for folder in folders]
            gains = [[g for m, _, g in curve if m <= limit][-1] for curve in curves]
            cells += [", ".join(f"{g:+.3f}" for g in gains), f"{statistics.mean(gains):+.3f}"]
        lines.append(f"| {limit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    label: str = "new",
    seeds: str = "0,1,2,3,4",
    old: str = "",
    target: float = 0.15,
    eval_every: int = 4,
    parallel: int = 1,
    threads: int = 0,
    cap: bool = True,
    out: str = "runs/time_to_gain",
    speed_repeats: int = 0,
    speed_model: str = "",
    plot: str = "",
    minutes: str = "4.7,8.3,9.3",
    **flags,
) -> None:
    """Run (or read) the seeds' capped runs and print the time-to-target table."""
    if speed_repeats:
        print(speed(speed_repeats, speed_model))
        return
    if plot:  # fire reads "old,new" as a tuple, and "4.7,9.3" too
        labels = list(plot) if isinstance(plot, tuple) else [plot]
        limits = [
            float(m) for m in (minutes if isinstance(minutes, tuple) else str(minutes).split(","))
        ]
        print(plot_gains(labels, Path(out), target))
        print(gains_at_minutes(labels, Path(out), limits))
        return
    values = PREVIOUS[old] if old else {"epochs": loop.Config.epochs}
    if "model" in values:
        old_model(values["model"])
    extra = {k: v for k, v in values.items() if k != "epochs"} | flags
    default_epochs = values["epochs"]
    # fire reads "0,1,2" as a tuple and "0" as an int
    seed_list = [int(s) for s in (seeds if isinstance(seeds, tuple) else str(seeds).split(","))]
    Path(out).mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 2) // parallel)

    def one(seed: int) -> list[dict]:
        """The default run; continued to the cap (twice the default epochs) only when it fell short."""
        folder = Path(out) / f"{label}-seed{seed}"
        rows = train(folder, seed, default_epochs, eval_every, extra, threads)
        if reached(rows, target) or not cap:
            return rows
        return train(folder, seed, 2 * default_epochs, eval_every, extra, threads)

    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(one, seed_list))
    results = [summarise(rows, default_epochs, target) for rows in runs]
    text = report(label, seed_list, results, target)
    print(text)
    (Path(out) / f"{label}.md").write_text(text + "\n")
    (Path(out) / f"{label}.json").write_text(json.dumps(dict(zip(seed_list, results)), indent=1))


if __name__ == "__main__":
    import fire

    if {"-h", "--help"} & set(sys.argv[1:]):  # fire would start the runs instead
        print(__doc__)
        sys.exit(0)

    fire.Fire(main)
