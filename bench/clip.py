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
    clip.md, clip.png  the report: the check run against its recorded row, the cells, the clip
                     statistics by pass, the claims (R, R', C1, C4, P) and which hypotheses hold
The 1-pass eps 1e-4 cell (`loop-k4`) and on-policy RLOO K=4 (`rloo-k4`) are the comparison's stage 2-3
runs, read from compare_runs.csv / compare_curves.csv in --results (else the committed
bench/results), never rerun, except the check run (seed 0 of
`loop-k4`, stage "check"), which must reproduce its recorded row.
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
from bench.common import have_matplotlib, markdown_table, tiny_model
from bench.prompts import _interval, cell_statistics, compare_folder

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
# the check runs: seed 0 as registered (recorded on an AVX2 EPYC), and seed 4, the first seed of the
# reused cell recorded on the AVX512 kind this sweep runs on (PROTOCOL's amendment)
CHECK_SEEDS = (0, 4)
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
    """The check runs (seeds 0 and 4 of the reused 1-pass eps 1e-4 cell), then seeds seed-major
    over the new cells in PROTOCOL's order."""
    runs = [ClipRun("check", "loop-k4", "loop", 4, PASSES_LR[1], s, "color", 4)
            for s in CHECK_SEEDS if s in seeds]  # fmt: skip
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
    sha = compare.sweep_commit(jobs, threads, commit)
    results_dir, runs_dir = Path(results), Path(runs)
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

    compare.sweep(todo, one, jobs, "runs", lambda r: f"{r['config']} seed {r['seed']}: held-out "
                  f"{r['final_heldout']:.4f}, zeroed by pass {r['zeroed_by_pass']} "
                  f"({r['train_seconds']:.0f} s training)")  # fmt: skip


# === Report: the cells, the claims, the hypotheses, the clip statistics by pass
ORDER = ["loop-k4", *NEW, "rloo-k4"]  # table rows, colours
GAIN, COLLAPSE_SHARE = 0.03, 0.15  # the hypotheses' thresholds (PROTOCOL)
TOL = 1e-9  # a difference of exactly 0.03 computed in floats counts as 0.03


def _rows(results_dir: Path) -> list[dict]:
    return compare.read_csv(results_dir / "clip_runs.csv")


def _reused(results_dir: Path, name: str) -> list[dict]:
    return compare.read_csv(compare_folder(results_dir) / f"compare_{name}.csv")


def cell_rows(results_dir: Path) -> dict[str, list[dict]]:
    """configuration -> its color rows of seeds 0-19: the new cells (clip_runs.csv) and the reused
    ones (compare_runs.csv), stage "evaluate", one row per seed (the last recorded)."""
    new = [r for r in _rows(results_dir) if r["config"] in NEW]
    old = [r for r in _reused(results_dir, "runs") if r["config"] in REUSED]
    out: dict[str, dict[int, dict]] = {}
    for r in new + old:
        if r["stage"] == "evaluate" and r["reward"] == "color" and int(r["seed"]) in SEEDS:
            out.setdefault(r["config"], {})[int(r["seed"])] = r
    return {c: [out[c][s] for s in sorted(out[c])] for c in ORDER if c in out}


def curve_points(results_dir: Path) -> dict[tuple[str, int], list[tuple[int, int, int, float]]]:
    """(configuration, seed) -> [(epoch, prompts seen, images seen, held-out EMA)], as
    prompts.curve_points (K = 4 in every cell)."""
    rows = [r for r in compare.read_csv(results_dir / "clip_curves.csv") if r["config"] in NEW]
    rows += [r for r in _reused(results_dir, "curves") if r["config"] in REUSED]
    points: dict[tuple[str, int], dict[int, tuple]] = {}
    for r in rows:
        if r["stage"] == "evaluate" and r["reward"] == "color" and r["heldout"] not in ("", None):
            epoch, images = int(r["epoch"]), int(r["images_seen"])
            points.setdefault((r["config"], int(r["seed"])), {})[epoch] = (
                epoch, images // 4, images, float(r["heldout"]))  # fmt: skip
    return {key: [by_epoch[e] for e in sorted(by_epoch)] for key, by_epoch in points.items()}


def pass_means(rows: list[dict], name: str) -> list[float]:
    """The mean over runs of a `<name>_by_pass` field (space-separated, one number a pass)."""
    values = [[float(v) for v in r[f"{name}_by_pass"].split()] for r in rows
              if r.get(f"{name}_by_pass")]  # fmt: skip
    return [float(v) for v in np.mean(values, axis=0)] if values else []


def hypotheses(claims: dict[str, tuple[str, float]], means: dict[str, float],
               collapsed: dict[str, float]) -> list[str] | None:  # fmt: skip
    """The protocol's hypotheses that hold, from claims {name: (verdict, mean difference)}, the
    complete cells' mean final held-out scores and collapse shares; None while R or R' is out."""
    if "R" not in claims or "R'" not in claims:
        return None
    (r, r_diff), (r2, _) = claims["R"], claims["R'"]
    four = [c for c, (passes, _) in NEW.items() if passes == 4 and c in means]
    held = ["reuse pays"] if r == "supported" and r_diff >= GAIN - TOL else []
    if (r.startswith("not resolved") and r2.startswith("not resolved")
            and all(abs(means[c] - means["loop-k4"]) <= GAIN + TOL for c in four)):  # fmt: skip
        held.append("noise")
    if "contradicted" in (r, r2) or collapsed.get("loop-k4-p4-c1e-2", 0) >= COLLAPSE_SHARE - TOL:
        held.append("overfit")
    return held


def report(results: str = "runs/clip/results") -> Path:
    """clip.md (check run, cells, clip statistics by pass, claims, hypotheses) and clip.png."""
    results_dir = Path(results)
    rows, points, mine = cell_rows(results_dir), curve_points(results_dir), _rows(results_dir)
    complete, scores, _, iqm, iqm_area = cell_statistics(rows, points, results_dir, MIN_SEEDS)
    incomplete = {c: len(rows.get(c, [])) for c in ORDER if c not in complete}
    collapsed = {c: np.mean([float(r["final_heldout"]) < float(r["untrained_heldout"]) for r in v])
                 for c, v in complete.items()}  # fmt: skip
    pairs = {name: (scores[x], scores[y]) for name, x, y in CLAIMS if x in scores and y in scores}
    probabilities = compare.improvement_probabilities(pairs) if pairs else {}
    claims, body = {}, []
    for name, x, y in CLAIMS:
        if name not in pairs:
            body.append([name, f"{x} > {y}", "-", "left out (incomplete cell)", "-", "-"])
            continue
        (sx, sy), (p, low, high) = pairs[name], probabilities[name]
        claims[name] = (compare.verdict(low, high), float(sx.mean() - sy.mean()))
        body.append([name, f"{x} > {y}", f"{len(sx)} / {len(sy)}",
                     f"{p:.2f} [{low:.2f}, {high:.2f}] {claims[name][0]}",
                     f"{claims[name][1]:+.3f}",
                     f"{compare.detectable_difference(sx[:, 0], sy[:, 0]):.3f}"])  # fmt: skip
    held = hypotheses(claims, {c: float(s.mean()) for c, s in scores.items()}, collapsed)
    check = [r for r in mine if (r["stage"], r["config"], r["reward"])
             == ("check", "loop-k4", "color")]  # fmt: skip
    lines = ["# Clip range x reuse: LOOP K=4, 1 or 4 passes, eps 1e-4 to 1e-2 (issue 38, part A)",
             "", ('Written by `python bench/clip.py report`; protocol: bench/PROTOCOL.md, "Clip '
                  f'range x reuse (issue 38, part A)". Color task, {EPOCHS} epochs. New runs: '
                  f"{len(mine)}; commits {sorted({r['commit'][:10] for r in mine})}; CPUs "
                  f"{sorted({r['cpu'] for r in mine})}; threads per run "
                  f"{sorted({r['threads'] for r in mine})}."), "",
             "## Check runs (loop-k4 seeds rerun against their recorded rows)", "",
             *check_lines(check, _reused(results_dir, "runs")),
             "## Cells", "", cells_table(complete, iqm, iqm_area),
             "## Clip statistics by pass (mean over the runs of each cell)", "",
             pass_table(({"loop-k4 (check run)": check} if check else {})
                        | {c: rows[c] for c in NEW if c in rows}),
             "## Claims: probability of improvement on the final held-out score (EMA)", "",
             markdown_table(["claim", "X > Y", "seeds", "P(X > Y) [95% CI], verdict",
                             "mean difference", "smallest detectable difference"], body),
             "## Hypotheses (decided before the runs)", "",
             *hypothesis_lines(held), ""]  # fmt: skip
    if incomplete:
        listed = ", ".join(f"{c} ({n} seeds)" for c, n in incomplete.items())
        lines += [
            f"Incomplete cells (fewer than {MIN_SEEDS} of seeds 0-19), left out: {listed}",
            "",
        ]
    per_seed = [[c, len(rows[c]), ", ".join(f"{r['seed']}: {float(r['final_heldout']):.3f}"
                                            for r in rows[c])] for c in NEW if c in rows]  # fmt: skip
    if per_seed:
        lines += ["## New runs (final held-out, EMA, per seed)", "",
                  markdown_table(["configuration", "seeds", "seed: score"], per_seed)]  # fmt: skip
    out = results_dir / "clip.md"
    out.write_text("\n".join(lines))
    if have_matplotlib():
        plot(complete, points, {c: rows[c] for c in NEW if c in rows}, results_dir / "clip.png")
    print(f"wrote {out}")
    return out


def check_lines(check: list[dict], recorded_rows: list[dict]) -> list[str]:
    """Each check run beside the recorded row of its seed: bit-identical scores or not, and
    whether the two ran on the same CPU kind (only then can they be bit-identical)."""
    if not check:
        return ["Not run yet.", ""]
    recorded = {int(r["seed"]): r for r in recorded_rows
                if (r["stage"], r["config"], r["reward"]) == ("evaluate", "loop-k4", "color")}  # fmt: skip
    keys, body = ("untrained_heldout", "final_heldout", "final_heldout_raw"), []
    for r in check:
        old = recorded.get(int(r["seed"]))
        if old is None:
            body.append([r["seed"], r["final_heldout"], "-", r["cpu"], "-", "no recorded row"])
            continue
        same = all(float(r[k]) == float(old[k]) for k in keys)
        kind = "same CPU kind" if r["cpu"] == old["cpu"] else "different CPU kinds"
        body.append([r["seed"], r["final_heldout"], old["final_heldout"], r["cpu"], old["cpu"],
                     f"{'yes' if same else 'no'} ({kind})"])  # fmt: skip
    header = ["seed", "check run: final held-out", "recorded", "check run's cpu", "recorded cpu",
              "bit-identical (untrained, final, final raw)"]  # fmt: skip
    return [markdown_table(header, body), ""]


def cells_table(complete: dict, iqm: dict, iqm_area: dict) -> str:
    body = []
    for config, v in complete.items():
        passes, clip = {**NEW, **REUSED}[config]
        untrained = np.mean([float(r["untrained_heldout"]) for r in v])
        reach = [float(r["images_to_threshold"]) for r in v if r["images_to_threshold"]]
        collapsed = sum(float(r["final_heldout"]) < float(r["untrained_heldout"]) for r in v)
        body.append([config, passes, f"{clip:g}" if clip else "none (on-policy)",
                     f"{float(v[0]['lr']):g}", len(v), f"{untrained:.3f}", _interval(iqm[config]),
                     _interval(iqm_area[config]) if config in iqm_area else "-",
                     f"{len(reach)}/{len(v)}", f"{np.median(reach):.0f}" if reach else "-",
                     f"{collapsed}/{len(v)}"])  # fmt: skip
    header = ["configuration", "passes", "clip range", "lr", "seeds", "untrained held-out",
              "final held-out (EMA) IQM [95% CI]",
              f"area under the held-out curve / {EPOCHS} epochs, IQM [95% CI]",
              f"runs reaching untrained + {compare.THRESHOLD_GAIN}",
              "images to reach it, median", "collapses (final < untrained)"]  # fmt: skip
    return markdown_table(header, body)


def pass_table(cells: dict[str, list[dict]]) -> str:
    body = []
    for cell, v in cells.items():
        means = [pass_means(v, name) for name in PASS_KEYS]
        body += [[cell, len(v), p + 1, *(f"{m[p]:{f}}" if p < len(m) else "-"
                                         for m, f in zip(means, (".3f", ".3f", ".2e")))]
                 for p in range(max(map(len, means)))]  # fmt: skip
    header = ["cell", "runs", "pass", "share outside the clip range", "share zeroed by the clip",
              "rms of log rho"]  # fmt: skip
    return markdown_table(header, body) if body else "No per-pass statistics yet.\n"


def hypothesis_lines(held: list[str] | None) -> list[str]:
    if held is None:
        return ["Not evaluated: (R) or (R') is left out (incomplete cell)."]
    rules = {"reuse pays": f"(R) supported with a mean difference >= +{GAIN}",
             "noise": f"(R) and (R') not resolved, every 4-pass cell within +-{GAIN} of loop-k4",
             "overfit": f"(R) or (R') contradicted, or loop-k4-p4-c1e-2 collapses in >= "
                        f"{COLLAPSE_SHARE:.0%} of its runs"}  # fmt: skip
    lines = [f"- {name}: {rule}: {'holds' if name in held else 'does not hold'}"
             for name, rule in rules.items()]  # fmt: skip
    return [*lines, "", f"Holding: {', '.join(held)}." if held else "None of the three holds."]


def plot(complete: dict, points: dict, new: dict, path: Path) -> None:
    """Left: held-out score (EMA) against epochs, mean and 80% prediction interval over seeds per
    complete cell; right: the mean zeroed share per pass of every new cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for config, v in complete.items():
        curves = [points.get((config, int(r["seed"])), []) for r in v]
        length = min(len(c) for c in curves)
        if length < 2:
            continue
        values = np.array([[p[3] for p in c[:length]] for c in curves])
        mean, low, high = compare.prediction_band(values)
        x, color = [p[0] for p in curves[0][:length]], f"C{ORDER.index(config)}"
        left.plot(x, mean, color=color, marker=".", label=f"{config} ({len(values)} seeds)")
        left.fill_between(x, low, high, color=color, alpha=0.12, linewidth=0)
    left.set(xlabel="epoch", ylabel="held-out score (EMA), color")
    left.set_title("mean and 80% prediction interval over seeds", fontsize=10)
    for config, v in new.items():
        zeroed = pass_means(v, "zeroed")
        right.plot(range(1, len(zeroed) + 1), zeroed, marker="o", color=f"C{ORDER.index(config)}",
                   label=f"{config} ({len(v)} runs)")  # fmt: skip
    right.set(xlabel="pass", ylabel="share of terms the clip zeroes", xticks=[1, 2, 3, 4])
    right.set_title("zeroed share by pass, mean over runs", fontsize=10)
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMMANDS = {"run": run, "report": report}

if __name__ == "__main__":
    from bench.common import commands_main

    commands_main(COMMANDS, __doc__)
