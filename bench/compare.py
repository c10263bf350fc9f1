"""The paper's comparison at equal images per epoch: reward against images seen for each estimator.

Measures, for each configuration of the grid and each seed, through loop.main (the real training
loop, imported, never re-implemented): the training reward of every epoch, the held-out score of the
EMA weights (what loop.py evaluates) and of the raw weights every `eval_every` epochs, images seen,
seconds per epoch and the peak memory of the run. Writes to `--results`:
    compare.csv        one row per (configuration, seed, epoch)
    compare.png        training and held-out reward against images seen: mean over seeds, 80% band
    compare.md         final held-out mean +- std over seeds; images needed to reach the reference's
                       (PPO as DDPO) final held-out score; seconds per epoch; peak memory

The grid (`GRID`): reinforce K=1, rloo K=4, ppo K=1 (DDPO: batch-normalised advantages), ppo K=4
(group statistics, GRPO-like), loop K=2 and K=4; 3 seeds each. Held equal: every loop.Config field
other than algo and k (images per epoch, epochs, lr, LoRA, DDIM steps, eta, guidance, clip range,
trained steps, EMA, held-out prompts and noise). What differs is what each method requires: K, the
advantage (and PPO's normalisation: `normalize_advantage auto`), and the updates per rollout (one for
the on-policy reinforce/rloo, Config's minibatches for ppo/loop).

How the raw weights are scored: each run is trained in segments that end at the evaluation epochs,
each segment a `--resume` of the last (resume is exact: tested in tests/test_loop_cli.py), and after
each segment a separate child scores the raw LoRA weights saved in checkpoint/state.pt with
loop.evaluate. At the end of a run it also re-scores the EMA weights and stops if that differs from
the score loop.main logged: the bench's evaluation path is checked against loop.py's every run.

Peak memory: ru_maxrss of the forked child that trains (see bench/common.py), max over segments.

    python bench/compare.py                   # the grid: 6 configurations x 3 seeds, loop.Config's budget
    python bench/compare.py --quick           # 4 configurations, 1 seed, epochs / 8: a check, not a result
    python bench/compare.py --jobs 2          # two runs at a time, 1 thread each (2 cores)
    python bench/compare.py --tiny            # the test suite's tiny random model, seconds
Run folders go to --runs (default runs/bench-compare/, gitignored); a finished run (its bench.json)
is reused when the script is run again, an unfinished one is started over.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
import rewards
from bench.common import (
    BenchError,
    cli_main,
    default_threads,
    fork_call,
    fork_map,
    have_matplotlib,
    markdown_table,
    mean_std,
    preload,
    tiny_model,
)

GRID = {  # name -> the loop.Config fields that differ; everything else is loop.Config's default
    "reinforce-k1": {"algo": "reinforce", "k": 1},
    "rloo-k4": {"algo": "rloo", "k": 4},
    "ppo-k1": {"algo": "ppo", "k": 1},  # DDPO: K = 1, batch-normalised advantages
    "ppo-k4": {"algo": "ppo", "k": 4},  # group statistics (GRPO-like)
    "loop-k2": {"algo": "loop", "k": 2},
    "loop-k4": {"algo": "loop", "k": 4},
}
QUICK = ("reinforce-k1", "rloo-k4", "ppo-k1", "loop-k4")
REFERENCE = "ppo-k1"  # "images needed to reach PPO's final score": PPO as DDPO
# --tiny: the budget of tests/test_loop_cli.py's smoke runs, on the test suite's tiny random model
TINY = {
    "reward": "jpeg_compressibility",
    "images_per_epoch": 4,
    "num_steps": 3,
    "micro_batch": 2,
    "epochs": 2,
    "eval_every": 1,
    "num_eval_prompts": 2,
}
BAND = (10, 90)  # percentiles over seeds of the shaded band: 80%, as the paper's figures
CSV_FIELDS = (
    "config", "algo", "k", "seed", "epoch", "images_seen", "reward_mean", "reward_std",
    "eval_ema", "eval_raw", "seconds", "approx_kl", "clipfrac", "grad_norm", "peak_rss_mb",
)  # fmt: skip


# === One run: train in segments that end at the evaluation epochs, score the raw weights after each
def evaluation_epochs(epochs: int, eval_every: int) -> list[int]:
    """The epochs after which loop.main scores the held-out prompts (besides epoch 0)."""
    ends = list(range(eval_every, epochs + 1, eval_every))
    return ends if ends and ends[-1] == epochs else [*ends, epochs]


def train_segment(cfg: loop.Config) -> None:
    """One segment: loop.main up to cfg.epochs (a fresh run or a --resume)."""
    torch.set_flush_denormal(True)
    loop.main(cfg)


def score_checkpoint(cfg: loop.Config, run: Path, with_ema: bool) -> dict:
    """Held-out mean of the raw LoRA weights in run/checkpoint (and of the EMA), by loop.evaluate."""
    from peft.utils import set_peft_model_state_dict

    torch.set_flush_denormal(True)
    path = loop.resolve_model_path(cfg.model)
    reward_name, _, eval_prompts = loop.resolve_reward_and_prompts(cfg, path)
    weight_dtype = loop.weight_dtype_for(cfg.mixed_precision, torch.device("cpu"))
    models = loop.load_models(
        path, torch.device("cpu"), weight_dtype, cfg.lora_rank, cfg.seed, cfg.lora_modules
    )
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=False, map_location="cpu")
    set_peft_model_state_dict(models.unet, state["lora"])
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    reward_fn = rewards.load_reward(reward_name)
    micro = loop.check_config(cfg, 1)["micro_batch"]  # the batches loop.main evaluates with
    raw, _ = loop.evaluate(models, policy, eval_prompts, reward_fn, micro)
    scores = {"epoch": state["next_epoch"], "eval_raw": raw.mean().item()}
    if with_ema:
        with loop.swapped_in(loop.lora_parameters(models.unet), state["ema"]):
            scores["eval_ema"] = (
                loop.evaluate(models, policy, eval_prompts, reward_fn, micro)[0].mean().item()
            )
    return scores


def run_one(name: str, cfg: loop.Config, threads: int) -> list[dict]:
    """Train one (configuration, seed) in segments; returns its CSV rows (also in run/bench.json)."""
    run = Path(cfg.out)
    if (run / "bench.json").is_file():
        return json.loads((run / "bench.json").read_text())
    if run.exists():  # an unfinished run from an interrupted grid: start it over
        shutil.rmtree(run)
    log, peak, raw = run.with_name(run.name + ".log"), 0.0, {0: None}
    ends = evaluation_epochs(cfg.epochs, cfg.eval_every)
    for i, end in enumerate(ends):
        segment = dataclasses.replace(cfg, epochs=end, resume=str(run) if i else "")
        peak = max(peak, fork_call(train_segment, segment, threads=threads, log=log)["peak_rss_mb"])
        last = end == cfg.epochs
        scores = fork_call(score_checkpoint, cfg, run, last, threads=threads, log=log)["value"]
        raw[end] = scores["eval_raw"]
    metrics = loop.read_metrics(run)
    raw[0] = metrics[0]["eval_reward_mean"]  # before training the raw weights are the EMA's
    logged = metrics[-1]["eval_reward_mean"]
    if not math.isclose(scores["eval_ema"], logged, rel_tol=1e-5, abs_tol=1e-6):
        raise BenchError(
            f"{run}: re-scoring the EMA weights gave {scores['eval_ema']:.6f}, loop.main logged "
            f"{logged:.6f}; the bench does not evaluate as loop.py does"
        )
    rows = [
        {
            "config": name,
            "algo": cfg.algo,
            "k": cfg.k,
            "seed": cfg.seed,
            "epoch": m["epoch"],
            "images_seen": m["images_seen"],
            "reward_mean": m["reward_mean"],
            "reward_std": m["reward_std"],
            "eval_ema": m["eval_reward_mean"],
            "eval_raw": raw.get(m["epoch"]),
            "seconds": m["seconds"],
            "approx_kl": m["approx_kl"],
            "clipfrac": m["clipfrac"],
            "grad_norm": m["grad_norm"],
            "peak_rss_mb": peak,
        }
        for m in metrics
    ]
    (run / "bench.json").write_text(json.dumps(rows))
    return rows


# === The grid
def grid_configs(names: list[str], seeds: list[int], base: dict, runs: Path) -> list[tuple]:
    """(name, loop.Config) for every configuration and seed; each Config is checked by loop."""
    out = []
    for name in names:
        for seed in seeds:
            cfg = loop.Config(**base, **GRID[name], seed=seed, out=str(runs / f"{name}-s{seed}"))
            loop.check_config(cfg, 1)  # bad input stops here, before any run starts
            out.append((name, cfg))
    return out


def curves(rows: list[dict], name: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """images_seen (E,) and values (seeds, E) of one configuration, epochs where key is set."""
    seeds = sorted({r["seed"] for r in rows if r["config"] == name})
    per_seed = [
        [(r["images_seen"], r[key]) for r in rows if r["config"] == name and r["seed"] == s]
        for s in seeds
    ]
    per_seed = [[(x, y) for x, y in points if y is not None] for points in per_seed]
    images = np.array([x for x, _ in per_seed[0]], dtype=float)
    values = np.array([[y for _, y in points] for points in per_seed], dtype=float)
    return images, values  # (E,), (S, E)


def images_to_reach(images: np.ndarray, mean: np.ndarray, target: float) -> float | None:
    """First images_seen at which the mean-over-seeds curve reaches target (None: never)."""
    reached = np.nonzero(mean >= target)[0]
    return float(images[reached[0]]) if len(reached) else None


def summary_table(rows: list[dict], names: list[str]) -> str:
    """The markdown table: one line per configuration."""
    target = None
    if REFERENCE in names:
        target = curves(rows, REFERENCE, "eval_ema")[1][:, -1].mean()
    table = []
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        images, ema = curves(rows, name, "eval_ema")
        raw = curves(rows, name, "eval_raw")[1]
        seconds = [r["seconds"] for r in mine if r["epoch"] > 0]
        first = ema[:, 0].mean()
        (m, s), (mr, sr) = mean_std(ema[:, -1].tolist()), mean_std(raw[:, -1].tolist())
        if target is None:
            reach_text = "n/a"
        elif target <= first:  # every curve would "reach" it before training
            reach_text = f"n/a ({REFERENCE} ends below the start)"
        else:
            reach = images_to_reach(images, ema.mean(axis=0), target)
            reach_text = f"{reach:.0f}" if reach is not None else "not reached"
        table.append([
            name, len(ema), f"{first:.3f}", f"{m:.3f} +- {s:.3f}", f"{mr:.3f} +- {sr:.3f}",
            reach_text, f"{np.median(seconds):.2f}", f"{max(r['peak_rss_mb'] for r in mine):.0f}",
        ])  # fmt: skip
    header = [
        "config", "seeds", "held-out before", "held-out after (EMA), mean +- std",
        "held-out after (raw)", f"images to reach {REFERENCE}'s final (EMA)",
        "s / epoch (median)", "peak RSS MB",
    ]  # fmt: skip
    return markdown_table(header, table)


def plot(rows: list[dict], names: list[str], path: Path) -> Path | None:
    """Training and held-out reward against images seen: mean over seeds and the 80% band."""
    if not have_matplotlib():
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, color in zip(names, plt.cm.tab10.colors):
        for ax, key in zip(axes, ("reward_mean", "eval_ema")):
            images, values = curves(rows, name, key)
            low, high = np.percentile(values, BAND, axis=0)
            ax.plot(images, values.mean(axis=0), color=color, label=name)
            ax.fill_between(images, low, high, color=color, alpha=0.2, linewidth=0)
        images, raw = curves(rows, name, "eval_raw")
        axes[1].plot(images, raw.mean(axis=0), color=color, linestyle=":", linewidth=1)
    axes[0].set(title="training reward (rollout mean)", xlabel="images seen", ylabel="reward")
    axes[1].set(title="held-out (solid: EMA weights, dotted: raw)", xlabel="images seen")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean over seeds, band: {BAND[0]}th-{BAND[1]}th percentile over seeds")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict], names: list[str], results: Path, note: str) -> dict:
    """compare.csv, compare.md and compare.png under results; returns their paths."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    table = summary_table(rows, names)
    (results / "compare.md").write_text(f"{note}\n\n{table}")
    return {"csv": results / "compare.csv", "md": results / "compare.md",
            "png": plot(rows, names, results / "compare.png")}  # fmt: skip


def main(
    quick: bool = False,
    tiny: bool = False,
    configs: str = "",
    seeds: int = 3,
    epochs: int = 0,
    eval_every: int = 0,
    jobs: int = 1,
    threads: int = 0,
    model: str = "",
    runs: str = "runs/bench-compare",
    results: str = "bench/results",
) -> dict:
    """The grid (or --quick / --tiny), then the CSV, table and plot. Returns the output paths.

    configs: comma-separated names of GRID (default: all; --quick: QUICK); seeds: seeds 0..seeds-1;
    epochs / eval_every: 0 = loop.Config's (--quick: epochs / 8, evaluated at the end only);
    jobs: runs at a time; threads: torch threads per run (0: torch's threads / jobs)."""
    names = [n.strip() for n in configs.split(",") if n.strip()] or list(QUICK if quick else GRID)
    if unknown := [n for n in names if n not in GRID]:
        raise BenchError(f"unknown --configs {unknown}; choose from {', '.join(GRID)}")
    if seeds < 1 or epochs < 0 or eval_every < 0:
        raise BenchError("--seeds must be >= 1, --epochs and --eval_every >= 0")
    base: dict = {}
    runs_dir = Path(runs)
    if tiny:
        base |= TINY
        tiny_path, prompts = tiny_model(runs_dir / "tiny-model")
        base |= {"model": str(tiny_path), "train_prompts": str(prompts)}
    if model:
        base["model"] = model
    defaults = loop.Config(**base)
    if quick:
        seeds = 1
        epochs = epochs or max(2, defaults.epochs // 8)
        eval_every = eval_every or epochs
    base["epochs"] = epochs or defaults.epochs
    base["eval_every"] = eval_every or defaults.eval_every
    threads = threads or default_threads(jobs)
    preload()
    runs_list = grid_configs(names, list(range(seeds)), base, runs_dir)
    per_run = [(name, cfg, threads) for name, cfg in runs_list]
    print(
        f"{len(per_run)} runs ({len(names)} configurations x {seeds} seeds), {base['epochs']} "
        f"epochs of {defaults.images_per_epoch} images each, {jobs} at a time, {threads} threads"
    )
    with tqdm(total=len(per_run), desc="runs") as bar:  # each run waits on its own children
        done = fork_map(run_one, per_run, jobs=jobs, on_done=lambda _: bar.update())
    rows = [row for run in done for row in run["value"]]
    held = {k: v for k, v in dataclasses.asdict(runs_list[0][1]).items()}
    held = {k: v for k, v in held.items() if k not in ("algo", "k", "seed", "out", "resume")}
    note = (
        f"Held equal (loop.Config, {'tiny' if tiny else 'default'} budget): {json.dumps(held)}; "
        f"{jobs} run(s) at a time, {threads} thread(s) each, on {os.cpu_count()} cores."
    )
    paths = write_results(rows, names, Path(results), note)
    print((Path(results) / "compare.md").read_text())
    print("wrote", ", ".join(str(p) for p in paths.values() if p))
    return paths


if __name__ == "__main__":
    import fire

    fire.Fire(lambda **flags: cli_main(main, **flags))
