"""Equal prompts: LOOP K=2, 4, 8 and PPO K=1 at 16 prompts an epoch (bench/PROTOCOL.md,
section "Equal prompts (issue 38, part B)"). The paper plots reward per epoch, i.e. per prompt,
and a LOOP K=4 epoch costs 4x the images of a PPO K=1 epoch; this sweep holds prompts equal and
reports each claim beside the comparison's equal-image answer.

    python bench/prompts.py run --jobs 2 --commit e9c0c19  # tuning, then seeds 0-19 seed-major
    python bench/prompts.py report                         # prompts.md, prompts.png from the CSVs
    python bench/prompts.py run --tiny --jobs 2            # the test suite's tiny model, seconds

`run` first tunes PPO K=1 at 16 images an epoch (lr 2e-3, 4e-3, 8e-3 on seeds 100-102, plus the
edge rule's point if the pick is at an edge, decided from the tuning rows), then runs seeds 0-19 of
ppo-k1-i16, loop-k2-i32 and loop-k8-i128 seed by seed. Each run is `OMP_NUM_THREADS=1 python
loop.py --algo .. --k .. --images_per_epoch .. --lr ..` in a worktree of one commit, through
bench/compare.py's machinery (a stopped sweep resumes exactly; a run already in prompts_runs.csv is
skipped). Results go to --results (default runs/prompts/results, untracked); the committed ones were
made with `--results bench/results`.
    prompts_runs.csv    one row per run: config, algo, k, lr, images and prompts per epoch, seed,
                        final held-out score, images to untrained + 0.1, seconds, cpu, commit,
                        command (the run's flags)
    prompts_curves.csv  one row per run and epoch (as compare_curves.csv, plus prompts_seen)
LOOP K=4 at 64 images an epoch (16 prompts) is the comparison's stage-2 cell, and the equal-image
side is the comparison's 64-image cells, all read from compare_runs.csv / compare_curves.csv in
--results (or, if that has none, the committed bench/results), never rerun.
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

# === The protocol (bench/PROTOCOL.md, "Equal prompts"), as data
PROMPTS = 16  # prompts per epoch in every new cell (B); 48 epochs: 768 prompts a run
EPOCHS = 48
NEW = {"ppo-k1-i16": ("ppo", 1), "loop-k2-i32": ("loop", 2), "loop-k8-i128": ("loop", 8)}
TUNED = "ppo-k1-i16"  # re-tuned here; the LOOP cells use loop's stage-1 pick (compare_runs.csv)
TUNE_LRS = (2e-3, 4e-3, 8e-3)
TUNE_SEEDS = (100, 101, 102)
SEEDS = tuple(range(20))
MIN_SEEDS = 10  # the floor: a cell with fewer is incomplete and left out of tables and verdicts
# estimator -> its configuration at equal prompts (16 an epoch) and at equal images (64 an epoch)
EQUAL_PROMPTS = {"PPO K=1": "ppo-k1-i16", "LOOP K=2": "loop-k2-i32", "LOOP K=4": "loop-k4",
                 "LOOP K=8": "loop-k8-i128"}  # fmt: skip
EQUAL_IMAGES = {
    "PPO K=1": "ppo-k1",
    "LOOP K=2": "loop-k2",
    "LOOP K=4": "loop-k4",
    "LOOP K=8": "loop-k8",
}
ACCOUNTINGS = {"equal prompts": EQUAL_PROMPTS, "equal images": EQUAL_IMAGES}
CLAIMS = [("LOOP K=4", "PPO K=1"), ("LOOP K=8", "LOOP K=2")]
SECONDARY = [("LOOP K=4", "LOOP K=2")]  # descriptive only (PROTOCOL)
RUN_FIELDS = ("stage", "config", "algo", "k", "lr", "images_per_epoch", "prompts_per_epoch", "seed",
              "reward", "threads", "epochs", "untrained_heldout", "final_heldout",
              "final_heldout_raw", "final_train_reward", "images_to_threshold", "train_seconds",
              "eval_seconds", "cpu", "commit", "command")  # fmt: skip
CURVE_FIELDS = ("stage", "config", "lr", "seed", "reward", "epoch", "images_seen", "prompts_seen",
                "train_reward", "heldout", "heldout_raw", "seconds")  # fmt: skip
TINY_SCALE = 8  # --tiny: images per epoch / 8 (2, 4, 16), 2 epochs, one tuning seed, seed 0


@dataclass(frozen=True)
class PromptsRun(compare.Run):
    images_per_epoch: int = 64

    def flags(self) -> list[str]:
        return [*super().flags(), "--images_per_epoch", str(self.images_per_epoch)]


def plan_tune(lrs=TUNE_LRS, seeds=TUNE_SEEDS) -> list[PromptsRun]:
    """PPO K=1 at 16 images an epoch, seed-major; flags as the comparison's stage 1."""
    algo, k = NEW[TUNED]
    return [PromptsRun("tune", TUNED, algo, k, lr, s, "color", EPOCHS, PROMPTS * k)
            for s in seeds for lr in lrs]  # fmt: skip


def plan_seeds(ppo_lr: float, loop_lr: float, seeds=SEEDS) -> list[PromptsRun]:
    """Seeds 0-19, seed-major over the three new cells; evaluation flags as stage 2."""
    runs = []
    for seed in seeds:
        for config, (algo, k) in NEW.items():
            lr = ppo_lr if config == TUNED else loop_lr
            runs.append(PromptsRun("evaluate", config, algo, k, lr, seed, "color", 4, PROMPTS * k))
    return runs


def pick_lr(rows: list[dict], seeds: int = len(TUNE_SEEDS)) -> tuple[float | None, float | None]:
    """(pick, edge): stage 1's rule over the tuning rows of TUNED (highest mean final held-out EMA,
    a tie within 1e-4 to the smaller lr); edge is the lr the edge rule adds, None if none. (None,
    None) while a grid point lacks a seed."""
    by_lr: dict[float, list] = {}
    for r in rows:
        if r["stage"] == "tune" and r["config"] == TUNED:
            by_lr.setdefault(float(r["lr"]), []).append(float(r["final_heldout"]))
    complete = {lr: float(np.mean(v)) for lr, v in by_lr.items() if len(v) >= seeds}
    if any(lr not in complete for lr in TUNE_LRS):
        return None, None
    best = max(complete.values())
    pick = min(lr for lr, m in complete.items() if m >= best - 1e-4)
    grid, edge = sorted(complete), None
    if len(grid) == len(TUNE_LRS):  # the edge rule is applied once
        edge = grid[0] / 2 if pick == grid[0] else grid[-1] * 2 if pick == grid[-1] else None
    return pick, edge


def compare_folder(results_dir: Path) -> Path:
    """Where the comparison's rows are read: --results if it has compare_runs.csv, else the
    committed bench/results."""
    for folder in (results_dir, REPO / "bench" / "results"):
        if (folder / "compare_runs.csv").is_file():
            return folder
    raise BenchError(f"no compare_runs.csv in {results_dir} or bench/results")


def loop_pick(results_dir: Path) -> float:
    """loop's stage-1 lr (4e-3 in the committed comparison)."""
    picks, edges = compare.pick_lrs(
        compare.read_csv(compare_folder(results_dir) / "compare_runs.csv")
    )
    if "loop-k4" not in picks or "loop-k4" in edges:
        raise BenchError("the comparison's stage 1 has no final pick for loop-k4")
    return picks["loop-k4"]


# === Running
def run(jobs: int = 2, threads: int = 1, results: str = "runs/prompts/results",
        runs: str = "runs/prompts", tiny: bool = False, commit: str = "HEAD") -> None:  # fmt: skip
    """Tuning (and the edge rule's runs), then seeds 0-19 seed-major; every run not yet in
    prompts_runs.csv, `jobs` at a time; a row as each ends."""
    sha = compare.sweep_commit(jobs, threads, commit)
    results_dir, runs_dir = Path(results), Path(runs)
    loop_lr = loop_pick(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tune_seeds, seeds, extra, epochs = TUNE_SEEDS, SEEDS, [], EPOCHS
    if tiny:  # the tiny random model, 1/8 of the images, a reward it can be scored by
        model, prompts = tiny_model(runs_dir / "tiny-model")
        i = compare.TINY_FLAGS.index("--images_per_epoch")  # the cells set their own
        extra = [*compare.TINY_FLAGS[:i], *compare.TINY_FLAGS[i + 2 :], "--model",
                 str(model.resolve()), "--train_prompts", str(prompts.resolve())]  # fmt: skip
        tune_seeds, seeds, epochs = TUNE_SEEDS[:1], SEEDS[:1], 2
    src = compare.worktree(sha, runs_dir)
    stage = lambda planned, label: _execute(planned, label, src, sha, results_dir, runs_dir,
                                            jobs, threads, extra, epochs, tiny)  # fmt: skip
    stage(plan_tune(seeds=tune_seeds), "tuning")
    pick, edge = pick_lr(_rows(results_dir), len(tune_seeds))
    if edge is not None:
        print(f"edge rule: PPO K=1's pick {pick:g} is at the grid's edge; adding lr {edge:g}")
        stage(plan_tune((edge,), tune_seeds), "edge rule")
        pick, edge = pick_lr(_rows(results_dir), len(tune_seeds))
    if pick is None:
        raise BenchError("the tuning is unfinished (a run failed?); run `run` again")
    print(f"PPO K=1 at {PROMPTS} images an epoch: lr {pick:g}; LOOP K=2 and K=8: lr {loop_lr:g}")
    stage(plan_seeds(pick, loop_lr, seeds), "seeds")


def _rows(results_dir: Path) -> list[dict]:
    return compare.read_csv(results_dir / "prompts_runs.csv")


def _execute(planned, label, src, sha, results_dir, runs_dir, jobs, threads, extra, epochs,
             tiny) -> None:  # fmt: skip

    if tiny:
        planned = [dataclasses.replace(r, reward="jpeg_compressibility",
                   images_per_epoch=r.images_per_epoch // TINY_SCALE) for r in planned]  # fmt: skip
    key = lambda r: (r["stage"], r["config"], float(r["lr"]), int(r["seed"]), r["reward"])
    done = {key(r) for r in _rows(results_dir)}
    todo = [r for r in planned if (r.stage, r.config, r.lr, r.seed, r.reward) not in done]
    print(f"{label}: {len(todo)} of {len(planned)} runs to do, {jobs} at a time, {threads} "
          f"thread(s) each, code at {sha[:10]}")  # fmt: skip

    def one(r: PromptsRun) -> dict:
        folder = compare.execute(r, src, runs_dir.resolve(), threads, extra, epochs)
        cmd = compare.command_line(r, threads, extra)
        base, curves = compare.summarise(r, folder, threads, sha, cmd)
        evals = [m["eval_seconds"] for m in compare.metrics_of(folder) if m["eval_seconds"]]
        record = {field: base.get(field) for field in RUN_FIELDS} | {
            "images_per_epoch": r.images_per_epoch,
            "prompts_per_epoch": r.images_per_epoch // r.k,
            "eval_seconds": round(sum(evals), 1),
        }
        for row in curves:
            row["prompts_seen"] = row["images_seen"] // r.k
        compare.append_csv(results_dir / "prompts_curves.csv", CURVE_FIELDS, curves)
        compare.append_csv(results_dir / "prompts_runs.csv", RUN_FIELDS, [record])
        return record

    compare.sweep(todo, one, jobs, label, lambda r: f"{r['config']} lr {r['lr']:g} seed "
                  f"{r['seed']}: held-out {r['final_heldout']:.4f} ({r['train_seconds']:.0f} s "
                  f"training, {r['eval_seconds']:.0f} s evaluating)")  # fmt: skip


# === Report: the cells at equal prompts and at equal images, side by side
def cell_rows(results_dir: Path) -> dict[str, list[dict]]:
    """configuration -> its color rows of seeds 0-19: the new cells (prompts_runs.csv) and the
    comparison's stage 2 (compare_runs.csv), one row per seed (the last recorded)."""
    new = [r for r in _rows(results_dir) if r["stage"] == "evaluate"]
    old = compare.read_csv(compare_folder(results_dir) / "compare_runs.csv")
    wanted = set(EQUAL_PROMPTS.values()) | set(EQUAL_IMAGES.values())
    out: dict[str, dict[int, dict]] = {}
    for r in new + [r for r in old if r["stage"] == "evaluate" and r["config"] not in NEW]:
        if r["config"] in wanted and r["reward"] == "color" and int(r["seed"]) in SEEDS:
            out.setdefault(r["config"], {})[int(r["seed"])] = r
    return {config: [by_seed[s] for s in sorted(by_seed)] for config, by_seed in out.items()}


def curve_points(results_dir: Path) -> dict[tuple[str, int], list[tuple[int, int, int, float]]]:
    """(configuration, seed) -> [(epoch, prompts seen, images seen, held-out EMA)], one per
    evaluation."""
    k_of = {c: k for c, (_, k) in NEW.items()} | {
        c: int(c.split("-k")[1]) for c in EQUAL_IMAGES.values()
    }
    folder = compare_folder(results_dir)
    rows = compare.read_csv(results_dir / "prompts_curves.csv") + [
        r for r in compare.read_csv(folder / "compare_curves.csv") if r["config"] not in NEW
    ]
    points: dict[tuple[str, int], dict[int, tuple]] = {}
    for r in rows:
        if (r["stage"] == "evaluate" and r["config"] in k_of and r["reward"] == "color"
                and r["heldout"] not in ("", None)):  # fmt: skip
            images, epoch = int(r["images_seen"]), int(r["epoch"])
            points.setdefault((r["config"], int(r["seed"])), {})[epoch] = (
                epoch, images // k_of[r["config"]], images, float(r["heldout"]))  # fmt: skip
    return {key: [by_epoch[e] for e in sorted(by_epoch)] for key, by_epoch in points.items()}


def area(points: list[tuple]) -> float:
    """Area under the held-out curve over epochs, divided by the epochs spanned: its time
    average."""
    epochs = np.array([p[0] for p in points], dtype=float)
    values = np.array([p[3] for p in points])
    if len(points) < 2:
        return float("nan")
    widths = np.diff(epochs)
    return float(np.sum(widths * (values[1:] + values[:-1]) / 2) / (epochs[-1] - epochs[0]))


def cell_statistics(rows: dict, points: dict, results_dir: Path,
                    min_seeds: int = MIN_SEEDS) -> tuple[dict, ...]:  # fmt: skip
    """The cells with at least `min_seeds` runs; per cell its final held-out scores and curve areas
    ((runs, 1): rliable's layout) and their IQM intervals. Used by prompts.py and clip.py."""
    complete = {c: v for c, v in rows.items() if len(v) >= min_seeds}
    if not complete:
        raise BenchError(f"no complete cell in {results_dir}; run `run` first")
    scores = {c: np.array([float(r["final_heldout"]) for r in v]).reshape(-1, 1)
              for c, v in complete.items()}  # fmt: skip
    areas = {c: np.array([area(points.get((c, int(r["seed"])), [])) for r in v]).reshape(-1, 1)
             for c, v in complete.items()}  # fmt: skip
    iqm = compare.iqm_intervals(scores)
    iqm_area = compare.iqm_intervals({c: a for c, a in areas.items() if not np.isnan(a).any()})
    return complete, scores, areas, iqm, iqm_area


def report(results: str = "runs/prompts/results") -> Path:
    """prompts.md (tuning, cells, the claims at equal prompts and at equal images) and
    prompts.png."""
    results_dir = Path(results)
    rows, points = cell_rows(results_dir), curve_points(results_dir)
    complete, scores, areas, iqm, iqm_area = cell_statistics(rows, points, results_dir)
    incomplete = {c: len(v) for c, v in rows.items() if len(v) < MIN_SEEDS}
    incomplete |= {c: 0 for c in NEW if c not in rows}
    mine = _rows(results_dir)
    lines = ["# Equal prompts: LOOP and PPO K=1 per prompt and per image (issue 38, part B)", "",
             ('Written by `python bench/prompts.py report`; protocol: bench/PROTOCOL.md, "Equal '
              'prompts (issue 38, part B)". Color task, 48 epochs. New runs: '
              f"{len(mine)}; commits {sorted({r['commit'][:10] for r in mine})}; CPUs "
              f"{sorted({r['cpu'] for r in mine})}; threads per run "
              f"{sorted({r['threads'] for r in mine})}. Equal images: the comparison's 64-image "
              "cells (compare_runs.csv); LOOP K=4 at 64 images is also the equal-prompt cell."),
             "", "## Learning rate of PPO K=1 at 16 images an epoch (seeds 100-102)", "",
             *tuning_lines(mine), "## Cells", "", cells_table(complete, iqm, iqm_area, areas),
             "## Claims: probability of improvement on the final held-out score (EMA)", "",
             claims_table(scores), ""]  # fmt: skip
    if incomplete:
        listed = ", ".join(f"{c} ({n} seeds)" for c, n in sorted(incomplete.items()))
        lines += [
            f"Incomplete cells (fewer than {MIN_SEEDS} of seeds 0-19), left out: {listed}",
            "",
        ]
    per_seed = [[c, len(v), ", ".join(f"{r['seed']}: {float(r['final_heldout']):.3f}" for r in v)]
                for c, v in rows.items() if c in NEW]  # fmt: skip
    if per_seed:
        lines += ["## New runs (final held-out, EMA, per seed)", "",
                  markdown_table(["configuration", "seeds", "seed: score"], per_seed)]  # fmt: skip
    out = results_dir / "prompts.md"
    out.write_text("\n".join(lines))
    if have_matplotlib():
        plot(complete, points, results_dir / "prompts.png")
    print(f"wrote {out}")
    return out


def tuning_lines(mine: list[dict]) -> list[str]:
    table: dict[float, list] = {}
    for r in mine:
        if r["stage"] == "tune" and r["config"] == TUNED:
            table.setdefault(float(r["lr"]), []).append(f"{float(r['final_heldout']):.3f}")
    if not table:
        return ["No tuning runs yet.", ""]
    pick, edge = pick_lr(mine)
    body = [[f"{lr:g}", f"{np.mean([float(v) for v in table[lr]]):.3f}", ", ".join(table[lr])]
            for lr in sorted(table)]  # fmt: skip
    if pick is None:
        note = "Pick: not yet (a grid point lacks a seed)."
    elif edge is not None:
        note = f"Pick so far: {pick:g}, at the grid's edge; the edge rule adds {edge:g}."
    else:
        still = len(table) > len(TUNE_LRS) and pick in (min(table), max(table))
        note = f"Pick: {pick:g}" + (" (still at the extended grid's edge: used)." if still else ".")
    return [markdown_table(["lr", "mean final held-out", "seeds 100, 101, 102"], body), note, ""]


def cells_table(complete: dict, iqm: dict, iqm_area: dict, areas: dict) -> str:
    body = []
    for accounting, cells in ACCOUNTINGS.items():
        for estimator, config in cells.items():
            if config not in complete:
                continue
            v = complete[config]
            k = int(v[0]["k"])
            images = int(v[0].get("images_per_epoch") or 64)
            untrained = np.mean([float(r["untrained_heldout"]) for r in v])
            reach = [float(r["images_to_threshold"]) for r in v if r["images_to_threshold"]]
            collapsed = sum(float(r["final_heldout"]) < float(r["untrained_heldout"]) for r in v)
            body.append([accounting, estimator, config, images, images // k,
                         f"{float(v[0]['lr']):g}", len(v), f"{untrained:.3f}",
                         _interval(iqm[config]),
                         _interval(iqm_area[config]) if config in iqm_area else "-",
                         f"{len(reach)}/{len(v)}",
                         f"{np.median(reach):.0f} ({np.median(reach) / k:.0f})" if reach else "-",
                         f"{collapsed}/{len(v)}"])  # fmt: skip
    header = ["accounting", "estimator", "configuration", "images / epoch", "prompts / epoch", "lr",
              "seeds", "untrained held-out", "final held-out (EMA) IQM [95% CI]",
              "area under the held-out curve / 48 epochs, IQM [95% CI]",
              f"runs reaching untrained + {compare.THRESHOLD_GAIN}",
              "images (prompts) to reach it, median", "collapses (final < untrained)"]  # fmt: skip
    return markdown_table(header, body)


def claims_table(scores: dict) -> str:
    pairs, body = {}, []
    for x, y in CLAIMS + SECONDARY:
        for accounting, cells in ACCOUNTINGS.items():
            cx, cy = cells[x], cells[y]
            if cx in scores and cy in scores:
                pairs[(x, y, accounting)] = (scores[cx], scores[cy])
    probabilities = compare.improvement_probabilities(pairs) if pairs else {}
    for x, y in CLAIMS + SECONDARY:
        row = [f"{x} > {y}" + (" (secondary)" if (x, y) in SECONDARY else "")]
        for accounting in ACCOUNTINGS:
            if (x, y, accounting) not in probabilities:
                row += ["-", "left out (incomplete cell)", "-", "-"]
                continue
            sx, sy = pairs[(x, y, accounting)]
            p, low, high = probabilities[(x, y, accounting)]
            verdict = f"{p:.2f} [{low:.2f}, {high:.2f}] {compare.verdict(low, high)}"
            row += [f"{len(sx)} / {len(sy)}", verdict, f"{sx.mean() - sy.mean():+.3f}",
                    f"{compare.detectable_difference(sx[:, 0], sy[:, 0]):.3f}"]  # fmt: skip
        body.append(row)
    header = ["claim"]
    for accounting in ACCOUNTINGS:
        header += [f"{accounting}: seeds", f"{accounting}: P(X > Y) [95% CI], verdict",
                   f"{accounting}: mean difference",
                   f"{accounting}: smallest detectable difference"]  # fmt: skip
    return markdown_table(header, body)


def _interval(values: tuple) -> str:
    point, low, high = values
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def plot(complete: dict, points: dict, path: Path) -> None:
    """Two panels: held-out score (EMA) against prompts and against images seen; per cell the mean
    and 80% prediction interval over seeds (as compare.plot_curves). Colour: estimator; solid: the
    16-prompt cells, dashed: the other 64-image cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    lines = [(e, c, "-") for e, c in EQUAL_PROMPTS.items()]
    lines += [(e, c, "--") for e, c in EQUAL_IMAGES.items() if c not in EQUAL_PROMPTS.values()]
    untrained = [float(r["untrained_heldout"]) for v in complete.values() for r in v]
    for column, (ax, axis) in enumerate(zip(axes, ("prompts", "images"))):
        if untrained:
            ax.axhline(np.mean(untrained), color="grey", linestyle=":", linewidth=1,
                       label="untrained")  # fmt: skip
        for estimator, config, style in lines:
            if config not in complete:
                continue
            curves = [points.get((config, int(r["seed"])), []) for r in complete[config]]
            length = min(len(c) for c in curves)
            if length < 2 or len(curves) < 2:
                continue
            x = np.array([p[1 + column] for p in curves[0][:length]])
            values = np.array([[p[3] for p in c[:length]] for c in curves])
            mean, low, high = compare.prediction_band(values)
            color = f"C{list(EQUAL_PROMPTS).index(estimator)}"
            v = complete[config]
            images = int(v[0].get("images_per_epoch") or 64)
            label = f"{estimator}, {images} images / {images // int(v[0]['k'])} prompts an epoch"
            ax.plot(x, mean, style, color=color, marker=".", label=f"{label} ({len(values)} seeds)")
            ax.fill_between(x, low, high, color=color, alpha=0.12, linewidth=0)
        ax.set(xlabel=f"{axis} seen", ylabel="held-out score (EMA), color")
        ax.set_title(f"against {axis} seen", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("held-out score: mean and 80% prediction interval over seeds (solid: 16 prompts "
                 "an epoch; dashed: the comparison's 64 images an epoch)", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMMANDS = {"run": run, "report": report}

if __name__ == "__main__":
    from bench.common import commands_main

    commands_main(COMMANDS, __doc__)
