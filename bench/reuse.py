"""Sample reuse: how each estimator fares as the optimizer steps per rollout grow (bench/PROTOCOL.md,
section "Reuse sweep"). The paper's argument for PPO's ratio and clip, and so for LOOP, is that they let
an estimator take several gradient steps per image without collapsing; this sweep tests it.

    python bench/reuse.py run --jobs 2              # the planned cells, seed-major, resumable
    python bench/reuse.py report                    # reuse.md and reuse.png from the CSVs
    python bench/reuse.py run --tiny --jobs 2       # the test suite's tiny model, seconds

Each run is `OMP_NUM_THREADS=1 python loop.py --algo .. --k 4 --lr .. --minibatch M` in a worktree of one
commit, through bench/compare.py's machinery (a stopped sweep resumes exactly). Results go to --results
(default runs/reuse/results, untracked); the committed ones were made with `--results bench/results`.
    reuse_runs.csv    one row per run: config, updates per rollout, final held-out score, mean clipfrac
                      and approx_kl over the run's updates, commit, command
    reuse_curves.csv  one row per run and epoch (as compare_curves.csv)
The 2-updates cells of LOOP and PPO K=4 are stage 2's runs of the comparison (same flags: the default
minibatch is half the rollout), and the 1-update cell of RLOO at its own lr 2e-3 is stage 2's on-policy
RLOO K=4, all read from compare_runs.csv in the same results folder.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import compare
from bench.common import BenchError, have_matplotlib, markdown_table, tiny_model

# === The protocol (bench/PROTOCOL.md, "Reuse sweep"), as data
IMAGES = 64  # per rollout (48 epochs: 3,072 images per run, as the comparison)
ESTIMATORS = {  # name -> (algo, K, lr): the comparison's stage-1 picks, not re-tuned (PROTOCOL)
    "loop": ("loop", 4, 4e-3),
    "ppo (GRPO advantage)": ("ppo", 4, 4e-3),
    "rloo off-policy (LOOP unclipped)": ("rloo", 4, 4e-3),
}
FOLLOW_UP = {  # PROTOCOL's follow-up, run after the cells above: RLOO at its own stage-1 lr
    "rloo off-policy, own lr 2e-3": ("rloo", 4, 2e-3),
}
LEVELS = (8, 4)  # optimizer steps per rollout run here, in this order (2: stage 2's runs)
SEEDS = tuple(range(10))
# stage 2's configurations that are cells here: LOOP and PPO at 2 steps (the default minibatch), and
# RLOO K=4 at its own lr 2e-3 on-policy, the follow-up's line at 1 step (there rho = 1: LOOP = RLOO)
COMPARED = {("loop", 2): "loop-k4", ("ppo (GRPO advantage)", 2): "ppo-k4",
            ("rloo off-policy, own lr 2e-3", 1): "rloo-k4"}  # fmt: skip
PAIRS = [("loop", "ppo (GRPO advantage)"), ("loop", "rloo off-policy (LOOP unclipped)"),
         ("loop", "rloo off-policy, own lr 2e-3")]  # fmt: skip
ALL = ESTIMATORS | FOLLOW_UP
RUN_FIELDS = ("config", "estimator", "algo", "k", "lr", "updates", "minibatch", "seed", "reward",
              "threads", "epochs", "untrained_heldout", "final_heldout", "final_train_reward",
              "clipfrac", "approx_kl", "train_seconds", "cpu", "commit", "command")  # fmt: skip


def config_name(estimator: str, updates: int) -> str:
    algo, k, lr = ALL[estimator]
    return f"{algo}-k{k}-u{updates}" + (f"-lr{lr:g}" if estimator in FOLLOW_UP else "")


@dataclass(frozen=True)
class ReuseRun(compare.Run):
    minibatch: int = IMAGES // 2

    def flags(self) -> list[str]:
        return [*super().flags(), "--minibatch", str(self.minibatch)]


def plan(levels=LEVELS, seeds=SEEDS) -> list[ReuseRun]:
    """Level-major, then seed-major: a stopped sweep leaves whole seeds of a whole level; the
    follow-up's cells come after every main cell, in the same order."""
    runs = []
    for estimators in (ESTIMATORS, FOLLOW_UP):
        for updates in levels:
            for seed in seeds:
                for estimator, (algo, k, lr) in estimators.items():
                    name = config_name(estimator, updates)
                    runs.append(
                        ReuseRun("reuse", name, algo, k, lr, seed, "color", 48, IMAGES // updates)
                    )
    return runs


def run(jobs: int = 2, threads: int = 1, results: str = "runs/reuse/results",
        runs: str = "runs/reuse", tiny: bool = False, commit: str = "HEAD") -> None:  # fmt: skip
    """Execute every planned run not yet in reuse_runs.csv, `jobs` at a time; a row as each ends."""

    sha = compare.sweep_commit(jobs, threads, commit)
    results_dir, runs_dir = Path(results), Path(runs)
    results_dir.mkdir(parents=True, exist_ok=True)
    planned = plan()
    extra, epochs = [], 48
    if tiny:  # the tiny model, 8 images a rollout (minibatch / 8) and a reward it can be scored by
        planned = [dataclasses.replace(r, reward="jpeg_compressibility", minibatch=r.minibatch // 8)
                   for r in planned[:6]]  # fmt: skip
        model, prompts = tiny_model(runs_dir / "tiny-model")
        extra = [*compare.TINY_FLAGS, "--model", str(model.resolve()), "--train_prompts",
                 str(prompts.resolve())]  # fmt: skip
        epochs = 2
    done = {
        (r["config"], int(r["seed"]), r["reward"])
        for r in compare.read_csv(results_dir / "reuse_runs.csv")
    }
    todo = [r for r in planned if (r.config, r.seed, r.reward) not in done]
    src = compare.worktree(sha, runs_dir)
    print(
        f"{len(todo)} of {len(planned)} runs to do, {jobs} at a time, {threads} thread(s), code at {sha[:10]}"
    )

    def one(r: ReuseRun) -> dict:
        folder = compare.execute(r, src, runs_dir.resolve(), threads, extra, epochs)
        cmd = compare.command_line(r, threads, extra)
        base, curves = compare.summarise(r, folder, threads, sha, cmd)
        rows = compare.metrics_of(folder)[1:]
        updates = int(r.config.split("-u")[1].split("-")[0])  # <algo>-k<K>-u<updates>[-lr<lr>]
        estimator = next(e for e in ALL if config_name(e, updates) == r.config)
        record = {key: base.get(key) for key in RUN_FIELDS}
        record |= {"estimator": estimator, "updates": updates}
        record |= {
            "minibatch": r.minibatch,
            "clipfrac": float(np.mean([x["clipfrac"] for x in rows])),
        }
        record["approx_kl"] = float(np.mean([x["approx_kl"] for x in rows]))
        compare.append_csv(results_dir / "reuse_curves.csv", compare.CURVE_FIELDS, curves)
        compare.append_csv(results_dir / "reuse_runs.csv", RUN_FIELDS, [record])
        return record

    compare.sweep(todo, one, jobs, "runs",
                  lambda r: f"{r['config']} seed {r['seed']}: held-out {r['final_heldout']:.4f}")  # fmt: skip


# === Report: IQM intervals per cell, P(LOOP > X) per level, one figure
def cells(results_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """(estimator, updates per rollout) -> final held-out scores over seeds 0-9, complete cells only."""
    out: dict[tuple[str, int], list] = {}
    for r in compare.read_csv(results_dir / "reuse_runs.csv"):
        if r["reward"] == "color" and int(r["seed"]) in SEEDS:
            out.setdefault((r["estimator"], int(r["updates"])), []).append(
                float(r["final_heldout"])
            )
    stage2 = compare.read_csv(results_dir / "compare_runs.csv")
    for (estimator, updates), config in COMPARED.items():
        scores = [float(r["final_heldout"]) for r in stage2 if r["stage"] == "evaluate"
                  and r["config"] == config and r["reward"] == "color" and int(r["seed"]) in SEEDS]  # fmt: skip
        out[(estimator, updates)] = scores
    # (runs, 1 task): rliable's layout
    return {key: np.array(v).reshape(-1, 1) for key, v in out.items() if len(v) == len(SEEDS)}


def run_stats(results_dir: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """(estimator, updates) -> mean clipfrac, mean approx_kl over the cell's runs."""
    stats: dict[tuple[str, int], list] = {}
    for r in compare.read_csv(results_dir / "reuse_runs.csv"):
        stats.setdefault((r["estimator"], int(r["updates"])), []).append(
            (float(r["clipfrac"]), float(r["approx_kl"])))  # fmt: skip
    return {key: tuple(np.mean(v, axis=0)) for key, v in stats.items()}


def report(results: str = "runs/reuse/results") -> Path:
    """reuse.md (IQM and intervals per cell, clipfrac, approx_kl, P(LOOP > X) per level) and reuse.png."""
    results_dir = Path(results)
    scores = cells(results_dir)
    if not scores:
        raise BenchError(f"no complete cell in {results_dir}; run `run` first")
    iqm = compare.iqm_intervals({f"{e} @ {u}": v for (e, u), v in scores.items()})
    extra = run_stats(results_dir)
    untrained = compare.mean_untrained(compare.read_csv(results_dir / "reuse_runs.csv"))
    table = []
    for (estimator, updates), values in sorted(scores.items(), key=lambda x: (x[0][1], x[0][0])):
        point, low, high = iqm[f"{estimator} @ {updates}"]
        clipfrac, kl = extra.get((estimator, updates), (float("nan"), float("nan")))
        table.append([updates, estimator, len(values), f"{point:.3f} [{low:.3f}, {high:.3f}]",
                      f"{clipfrac:.3f}" if not np.isnan(clipfrac) else "(stage 2)",
                      f"{kl:.2e}" if not np.isnan(kl) else "(stage 2)"])  # fmt: skip
    pairs = {f"P({x} > {y}) @ {u}": (scores[(x, u)], scores[(y, u)])
             for u in sorted({u for _, u in scores}) for x, y in PAIRS
             if (x, u) in scores and (y, u) in scores}  # fmt: skip
    probabilities = compare.improvement_probabilities(pairs) if pairs else {}
    header = (
        'Written by `python bench/reuse.py report`; protocol: bench/PROTOCOL.md, "Reuse sweep". '
        f"Color task, K = 4, 48 epochs x 64 images, seeds 0-9 per cell; untrained {untrained:.3f}."
    )
    columns = ["updates per rollout", "estimator", "seeds", "IQM [95% CI]", "mean clipfrac",
               "mean approx_kl"]  # fmt: skip
    lines = ["# Sample reuse: final held-out score against optimizer steps per rollout", "",
             header, "", "## IQM of the final held-out score (EMA), 95% stratified-bootstrap interval",
             "", markdown_table(columns, table), "",
             "## Probability of improvement (95% interval) and verdict", ""]  # fmt: skip
    rows = [[name, f"{p:.2f} [{lo:.2f}, {hi:.2f}]", compare.verdict(lo, hi)]
            for name, (p, lo, hi) in probabilities.items()]  # fmt: skip
    lines += [markdown_table(["comparison", "P [95% CI]", "verdict"], rows), ""]
    out = results_dir / "reuse.md"
    out.write_text("\n".join(lines))
    if have_matplotlib():
        plot(scores, iqm, results_dir / "reuse.png", untrained)
    print(f"wrote {out}")
    return out


LEGEND = {  # the figure's names: each line's lr, and what RLOO is at 1 step
    "loop": "loop (lr 4e-3)",
    "ppo (GRPO advantage)": "ppo, GRPO advantage (lr 4e-3)",
    "rloo off-policy (LOOP unclipped)": "rloo off-policy = LOOP unclipped (lr 4e-3)",
    "rloo off-policy, own lr 2e-3": "rloo at its own lr 2e-3 (1 step: on-policy)",
}


def plot(scores: dict, iqm: dict, path: Path, untrained: float | None) -> None:
    """One line per estimator: IQM and its interval against updates per rollout; dots: seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    if untrained is not None:
        ax.axhline(untrained, color="grey", linestyle="--", linewidth=1, label="untrained")
    for i, (estimator, color) in enumerate(zip(ALL, plt.cm.tab10.colors)):
        levels = sorted(u for e, u in scores if e == estimator)
        if not levels:
            continue
        x = np.array(levels) * (1 + 0.04 * (i - 1))  # side by side
        point = [iqm[f"{estimator} @ {u}"] for u in levels]
        ax.errorbar(x, [p[0] for p in point], yerr=[[p[0] - p[1] for p in point],
                    [p[2] - p[0] for p in point]], fmt="o-", color=color, capsize=3,
                    label=LEGEND.get(estimator, estimator))  # fmt: skip
        for xi, u in zip(x, levels):
            ax.scatter(
                [xi] * len(scores[(estimator, u)]),
                scores[(estimator, u)].ravel(),
                color=color,
                s=8,
                alpha=0.4,
            )
    ax.set(xscale="log", xlabel="optimizer steps per 64-image rollout (each image used once)",
           ylabel="final held-out score (EMA), color")  # fmt: skip
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_title("sample reuse: IQM and 95% interval over 10 seeds (dots: seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMMANDS = {"run": run, "report": report}

if __name__ == "__main__":
    from bench.common import commands_main

    commands_main(COMMANDS, __doc__)
