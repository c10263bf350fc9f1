"""The bench scripts (bench/) at tiny sizes on the test suite's tiny model: seconds each, so they cannot rot.

Each test runs a script's main in-process (its children are forked from here) and checks what it
measured, not only that it ran.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env

import loop
from bench import common, compare, cost, gpu, reuse, variance


def test_compare_runs_the_real_command_and_a_row_reproduces(tmp_path):
    """Two tiny runs through the worktree; a rerun skips them; a row's command gives its numbers."""
    runs = compare.plan_tune(lrs=(2e-3,), seeds=(100,), configs=("loop-k4", "ppo-k1"))
    results = tmp_path / "results"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    compare.run_all(runs, 2, 1, results, tmp_path / "runs", tiny=True, commit=commit)
    rows = compare.read_csv(results / "compare_runs.csv")
    assert sorted(r["config"] for r in rows) == ["loop-k4", "ppo-k1"]
    assert all(r["commit"] == commit and r["threads"] == "1" for r in rows)
    curves = compare.read_csv(results / "compare_curves.csv")
    assert [int(c["epoch"]) for c in curves if c["config"] == "loop-k4"] == [0, 1, 2]
    assert compare.run_all(runs, 2, 1, results, tmp_path / "runs", True, commit) == []  # skipped
    # the recorded command, run again in the worktree, gives the row's numbers
    row = next(r for r in rows if r["config"] == "loop-k4")
    env_var, *argv = row["command"].split()
    assert env_var == "OMP_NUM_THREADS=1" and argv[:2] == ["python", "loop.py"]
    src = tmp_path / "runs" / f"src-{commit[:10]}"
    again = tmp_path / "again"
    subprocess.run([sys.executable, *argv[1:], "--out", str(again)], cwd=src, check=True,
                   env=subprocess_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True)  # fmt: skip
    last = compare.metrics_of(again)[-1]
    assert last["eval_reward_mean"] == float(row["final_heldout"])
    assert last["eval_raw_reward_mean"] == float(row["final_heldout_raw"])


def test_compare_plans_texture_with_twelve_held_out_images_a_prompt():
    """Stage 2 plans PPO K=1 and LOOP K=4 on texture, seeds 0-9, and only texture scores 12 images a
    prompt (its held-out file has 10 prompts); the verdict pair is planned too."""
    picks = dict.fromkeys(compare.TUNED, 4e-3)
    runs = compare.plan_evaluate(picks)
    texture = [r for r in runs if r.reward == "texture"]
    assert sorted((r.config, r.seed) for r in texture) == sorted(
        (c, s) for c in ("loop-k4", "ppo-k1") for s in range(10)
    )
    assert all(r.flags()[-2:] == ["--eval_images_per_prompt", "12"] for r in texture)
    assert not any("--eval_images_per_prompt" in r.flags() for r in runs if r.reward != "texture")
    assert ("loop-k4", "ppo-k1", "texture") in compare.PAIRS


def synthetic_runs(
    shift: float, seeds: int = 10, spread: float = 0.03, reward: str = "color"
) -> list[dict]:
    """Evaluation rows of loop-k4 and ppo-k1 on one task: loop-k4's scores = ppo-k1's + shift."""
    rng = np.random.default_rng(0)
    rows = []
    for config, offset in (("ppo-k1", 0.0), ("loop-k4", shift)):
        for seed, noise in enumerate(rng.normal(0, spread, seeds)):
            rows.append({"stage": "evaluate", "config": config, "reward": reward, "seed": seed,
                         "lr": 0.004, "final_heldout": 0.5 + offset + noise,
                         "final_train_reward": 0.6 + offset + noise,
                         "images_to_threshold": 640 if offset else "",
                         "untrained_heldout": 0.3 + 0.02 * (seed % 2)})  # fmt: skip
    return rows


def test_probability_of_improvement_detects_a_known_difference_and_not_a_zero_one():
    pytest.importorskip("rliable")
    rows = synthetic_runs(shift=0.10)
    x, y = compare.scores_of(rows, "loop-k4", "color"), compare.scores_of(rows, "ppo-k1", "color")
    p, low, high = compare.improvement_probabilities({"p": (x, y)})["p"]
    assert p > 0.95 and low > 0.5 and compare.verdict(low, high) == "supported"
    p, low, high = compare.improvement_probabilities({"p": (y, x)})["p"]  # the reverse claim
    assert compare.verdict(low, high) == "contradicted"
    # a zero difference: x and y are the same scores shuffled between the two configurations
    rows = synthetic_runs(shift=0.0)
    x, y = compare.scores_of(rows, "loop-k4", "color"), compare.scores_of(rows, "ppo-k1", "color")
    p, low, high = compare.improvement_probabilities({"p": (x, y)})["p"]
    assert low < 0.5 < high and compare.verdict(low, high) == "not resolved at this budget"
    iqm = compare.iqm_intervals({"x": x})["x"]
    assert iqm[1] <= iqm[0] <= iqm[2]
    # two-sided 5%, 80% power: 2.80 sqrt(2) s / sqrt(n)
    a, b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
    assert compare.detectable_difference(a, b) == pytest.approx(2.801585 * math.sqrt(2 / 3))


def test_bootstrap_intervals_are_reproducible_and_independent_of_the_other_names(monkeypatch):
    """rliable draws from numpy's global generator: two reports must still agree to the bit."""
    pytest.importorskip("rliable")
    monkeypatch.setattr(compare, "REPS", 500)
    rows = synthetic_runs(shift=0.02, spread=0.05)
    x, y = compare.scores_of(rows, "loop-k4", "color"), compare.scores_of(rows, "ppo-k1", "color")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = compare.improvement_probabilities({"p": (x, y)})
    np.random.rand(7)  # a different global state between the calls changes nothing
    again = compare.improvement_probabilities({"other": (y, x), "p": (x, y)})
    assert first["p"] == again["p"]
    assert compare.iqm_intervals({"x": x}) == {"x": compare.iqm_intervals({"y": y, "x": x})["x"]}
    np.random.seed(123)
    assert (np.random.get_state()[1] == before).all()  # and the caller's generator is put back
    # the seed matters: a different one moves the interval's edges (the check above can fail)
    with compare.seeded_numpy(1):
        from rliable import library as rly
        from rliable import metrics

        _, ci = rly.get_interval_estimates({"p": (x, y)}, metrics.probability_of_improvement,
                                           reps=500)  # fmt: skip
    assert tuple(np.ravel(ci["p"])) != first["p"][1:]


def test_pick_lrs_ties_to_the_smaller_and_flags_an_edge():
    rows = [{"stage": "tune", "config": c, "lr": lr, "seed": s, "final_heldout": score + 0.001 * (s - 100)}
            for c, scores in (("loop-k4", (0.50, 0.55, 0.55)), ("rloo-k4", (0.6, 0.5, 0.4)))
            for lr, score in zip(compare.TUNE_LRS, scores) for s in compare.TUNE_SEEDS]  # fmt: skip
    picks, edges = compare.pick_lrs(rows)
    assert picks == {"loop-k4": 2e-3, "rloo-k4": 1e-3}  # loop-k4: 2e-3 and 4e-3 tie
    assert edges == {"rloo-k4": 5e-4}  # rloo-k4's pick is the grid's lower edge: the rule adds /2
    rows += [{"stage": "tune", "config": "rloo-k4", "lr": 5e-4, "seed": s, "final_heldout": 0.7}
             for s in compare.TUNE_SEEDS]  # fmt: skip
    picks, edges = compare.pick_lrs(rows)
    assert picks["rloo-k4"] == 5e-4 and edges == {}  # extended once: used as it is
    assert compare.pick_lrs(rows[:5])[0] == {}  # an unfinished grid picks nothing


def test_prediction_band_is_the_t_interval_of_one_more_seed():
    values = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])  # 3 seeds, 2 epochs
    mean, low, high = compare.prediction_band(values, 0.80)
    half = 1.885618 * 1.0 * math.sqrt(1 + 1 / 3)  # t(0.90, 2) s sqrt(1 + 1/n)
    assert mean.tolist() == [1.0, 1.0] and high[0] - mean[0] == pytest.approx(half, rel=1e-5)
    assert low[1] == high[1] == 1.0  # no spread, no band


def test_compare_report_from_synthetic_csvs(tmp_path):
    pytest.importorskip("rliable")
    rows = synthetic_runs(shift=0.10) + synthetic_runs(shift=-0.10, reward="texture")
    fields = compare.RUN_FIELDS
    full = [{f: r.get(f, "") for f in fields} | {"commit": "abc", "cpu": "x", "threads": 1}
            for r in rows]  # fmt: skip
    for c, lr in (("loop-k4", 1e-3), ("ppo-k1", 1e-3)):
        full += [{f: "" for f in fields} | {"stage": "tune", "config": c, "lr": lr, "seed": s,
                 "final_heldout": 0.5, "commit": "abc", "cpu": "x", "threads": 1}
                 for s in compare.TUNE_SEEDS]  # fmt: skip
    compare.append_csv(tmp_path / "compare_runs.csv", fields, full)
    curves = [{"stage": "evaluate", "config": r["config"], "lr": 0.004, "seed": r["seed"],
               "reward": r["reward"], "epoch": e, "images_seen": 64 * e,
               "train_reward": r["final_train_reward"] * e / 2, "heldout": "", "heldout_raw": "",
               "seconds": 1.0} for r in rows for e in range(3)]  # fmt: skip
    compare.append_csv(tmp_path / "compare_curves.csv", compare.CURVE_FIELDS, curves)
    text = compare.report(str(tmp_path)).read_text()
    assert "| loop-k4 > ppo-k1 | color | 10 / 10 |" in text and "| supported |" in text
    assert "| color | loop-k4 | 0.004 | 10 | 0.310 |" in text  # the runs' mean untrained score
    assert "| loop-k4 > ppo-k1 | texture | 10 / 10 |" in text and "| contradicted |" in text
    if common.have_matplotlib():
        assert (tmp_path / "compare_fig3.png").stat().st_size > 1000
        assert (tmp_path / "compare_intervals.png").stat().st_size > 1000


def test_reuse_tiny_records_updates_clipfrac_and_resumes(tmp_path):
    """Six tiny runs at 8 updates per rollout: each row names its estimator and level and carries
    the run's clipfrac and approx_kl; a second `run` finds nothing left to do."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    reuse.run(jobs=2, threads=1, results=str(results), runs=str(runs), tiny=True)
    rows = compare.read_csv(results / "reuse_runs.csv")
    assert sorted({r["estimator"] for r in rows}) == sorted(reuse.ESTIMATORS)
    assert {r["updates"] for r in rows} == {"8"} and {r["minibatch"] for r in rows} == {"1"}
    for r in rows:  # rho_t leaves 1 after the first of 8 updates: something is clipped
        assert 0 < float(r["clipfrac"]) < 1 and float(r["approx_kl"]) > 0, r
    reuse.run(jobs=2, threads=1, results=str(results), runs=str(runs), tiny=True)
    assert len(compare.read_csv(results / "reuse_runs.csv")) == len(rows)


def test_reuse_report_from_synthetic_csvs(tmp_path):
    """A collapsed estimator is reported as beaten; equal ones are not resolved; an incomplete
    cell (9 seeds) is left out; stage 2's rows fill the 2-updates level."""
    pytest.importorskip("rliable")
    rng = np.random.default_rng(0)
    rows = []
    for estimator, (algo, k, lr) in reuse.ALL.items():
        for updates in reuse.LEVELS:
            level = 0.02 if algo == "rloo" else 0.5
            seeds = (
                reuse.SEEDS[:9] if estimator in reuse.FOLLOW_UP and updates == 4 else reuse.SEEDS
            )
            rows += [{"config": reuse.config_name(estimator, updates), "estimator": estimator,
                      "algo": algo, "k": k, "lr": lr, "updates": updates, "seed": s,
                      "reward": "color", "untrained_heldout": 0.3, "clipfrac": 0.8,
                      "approx_kl": 1e-5, "final_heldout": level + rng.normal(0, 0.03)}
                     for s in seeds]  # fmt: skip
    compare.append_csv(tmp_path / "reuse_runs.csv", reuse.RUN_FIELDS, rows)
    stage2 = [{"stage": "evaluate", "config": config, "reward": "color", "seed": s,
               "final_heldout": 0.5 + rng.normal(0, 0.03)}
              for config in reuse.COMPARED.values() for s in reuse.SEEDS]  # fmt: skip
    compare.append_csv(tmp_path / "compare_runs.csv", ("stage", "config", "reward", "seed",
                       "final_heldout"), stage2)  # fmt: skip
    text = reuse.report(str(tmp_path)).read_text()
    assert (
        "| P(loop > rloo off-policy (LOOP unclipped)) @ 8 | 1.00 [1.00, 1.00] | supported |" in text
    )
    assert "P(loop > rloo off-policy, own lr 2e-3) @ 8" in text
    assert "own lr 2e-3) @ 4" not in text  # 9 seeds: not a complete cell
    assert "| 2 | loop | 10 |" in text and "(stage 2)" in text
    assert "| 1 | rloo off-policy, own lr 2e-3 | 10 |" in text  # stage 2's on-policy RLOO
    assert "P(loop > ppo (GRPO advantage)) @ 4" in text and "not resolved" in text
    if common.have_matplotlib():
        assert (tmp_path / "reuse.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "script", ["bench/compare.py", "bench/cost.py", "bench/variance.py", "bench/gpu.py", "bench/reuse.py",
               "bench/step_gradients.py", "bench/quickstart.py"]
)  # fmt: skip
def test_help_prints_flags_and_runs_nothing(script, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / script), "--help"], check=False, cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stdout + done.stderr) > 200  # fire: stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_variance_tiny_the_baseline_removes_variance(tmp_path):
    """jpeg_compressibility is far from 0 on the tiny model: without a baseline the gradient is
    dominated by r * grad log pi, so REINFORCE's trace is orders of magnitude above RLOO's."""
    rows = variance.main(tiny=True, rollouts=3, ks="2", work=str(tmp_path),
                         results=str(tmp_path / "results"))  # fmt: skip
    by_name = {r["estimator"]: r for r in rows}
    assert set(by_name) == {"reinforce K=1", "rloo K=2", "loop K=2 (first update)"}
    assert all(r["trace"] > 0 and math.isfinite(r["cosine"]) for r in rows)
    assert by_name["rloo K=2"]["trace"] < 0.1 * by_name["reinforce K=1"]["trace"]
    assert (tmp_path / "results" / "variance.md").is_file()


def test_unbiasedness_statistic_separates_equal_and_shifted_means():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 500, generator=generator, dtype=torch.float64)
    b = torch.randn(64, 500, generator=generator, dtype=torch.float64)
    z_equal = variance.unbiasedness_z(variance.statistics(a), variance.statistics(b))
    z_shifted = variance.unbiasedness_z(variance.statistics(a), variance.statistics(b + 0.3))
    assert 0.7 < z_equal < 1.3 and z_shifted > 3


def test_gradient_recorder_records_loops_first_update(tiny_model, prompt_file):
    """The recorded gradient is the one train_on_rollout computes: at rho = 1 and with one
    minibatch LOOP's equals RLOO's on the same rollout (the identity loop.py's tests prove)."""
    cfg = loop.Config(model=str(tiny_model), train_prompts=str(prompt_file), k=2, num_steps=3,
                      images_per_epoch=4, micro_batch=2, reward="jpeg_compressibility",
                      max_grad_norm=math.inf, minibatch=4)  # fmt: skip
    models = loop.load_models(str(tiny_model), torch.device("cpu"), torch.float32, 8, 0)
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    x_T, noise = loop.draw_noise(torch.Generator().manual_seed(0), 4, 3, models.latent_shape)
    prompts = ["a red cube"] * 2 + ["a cat"] * 2
    reward_fn = lambda images, prompts: images.mean(dim=(1, 2, 3))
    batch, reward = loop.rollout(models, policy, prompts, x_T, noise, reward_fn, 2)
    g_loop = variance.estimator_gradient(policy, batch, reward, cfg, first_update=True)
    rloo = loop.Config(**{**vars(cfg), "algo": "rloo", "minibatch": 0})
    g_rloo = variance.estimator_gradient(policy, batch, reward, rloo, first_update=False)
    assert g_loop.abs().max() > 0
    torch.testing.assert_close(g_loop, g_rloo, rtol=1e-4, atol=1e-12)


def test_cost_tiny_ratios_and_per_algorithm(tmp_path):
    report = cost.main(tiny=True, repeats=1, epochs=2, work=str(tmp_path),
                       results=str(tmp_path / "results"))  # fmt: skip
    s = report["side_by_side"]
    assert s["max_abs_image_diff"] < 1e-4  # the pipeline computed the same images
    for phase in ("sampling", "update"):
        assert s[phase]["ours_s"] > 0 and s[phase]["floor_s"] > 0 and s[phase]["ratio"] > 0
    names = [r["config"] for r in report["per_algorithm"]]
    assert names == ["load", "reinforce K=1", "loop K=2"]
    assert all(r["seconds_per_epoch"] > 0 for r in report["per_algorithm"][1:])
    assert all(r["peak_rss_mb"] >= report["per_algorithm"][0]["peak_rss_mb"] - 1
               for r in report["per_algorithm"])  # fmt: skip
    assert "sampling" in (tmp_path / "results" / "cost.md").read_text()


def test_fork_map_reports_a_failing_child():
    with pytest.raises(common.BenchError, match="ZeroDivisionError"):
        common.fork_call(lambda: 1 / 0)
    assert common.fork_call(lambda x: x + 1, 1)["value"] == 2


def test_gpu_tiny_runs_what_a_gpu_session_measures(tmp_path):
    """The GPU session's script at the tiny SD 2 architecture on the CPU: a short real run
    (seconds per epoch), the first-ratio check (exactly 0 here), both floors, the report."""
    report = gpu.main(tiny=True, images=4, repeats=1, results=str(tmp_path))
    assert report["seconds_per_epoch"] > 0
    assert report["seconds_per_256_images"] == pytest.approx(report["seconds_per_epoch"] * 64)
    assert report["max_abs_log_ratio"] == 0.0
    assert report["sampling_images_per_s"] > 0 and report["update_images_per_s"] > 0
    assert 0.3 < report["update_over_bare_fwd_bwd"] < 10
    assert report["max_abs_image_diff"] < 1e-4
    assert report["run_peak_gpu_memory_gb"] is None  # a CPU has none
    assert json.loads((tmp_path / "gpu.json").read_text())["k"] == 4
    text = (tmp_path / "gpu.md").read_text()
    assert "max |log rho_t|" in text and "seconds per epoch" in text and "target <=" in text


def test_gpu_configs_are_stable_diffusion_2_base():
    """Built on the meta device (no memory): the public parameter counts of SD 2 base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**gpu.SD2_UNET),
            "vae": AutoencoderKL(**gpu.SD2_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**gpu.SD2_TEXT)),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == gpu.SD2_PARAMETERS


def test_gpu_flags_match_loops_gpu_quickstart():
    quickstart = gpu.quickstart_flags()
    assert {name: quickstart.get(name) for name in gpu.SD2_FLAGS} == gpu.SD2_FLAGS
    assert gpu.SD2_SCHEDULER["set_alpha_to_one"] is False


def test_scripts_reject_bad_input_with_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "variance.py"), "--ks", "1"],
        check=False, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


def test_prompts_tiny_runs_tuning_then_seeds_and_resumes(tmp_path):
    """bench/prompts.py at tiny size: PPO K=1's tuning (one seed, the edge rule if its pick is at an
    edge), then seed 0 of the three new cells at 1/8 of their images; every row names its flags and
    sizes, the curves count prompts as images / K, and a second `run` finds nothing left to do."""
    from bench import prompts

    results, runs = tmp_path / "results", tmp_path / "runs"
    prompts.run(jobs=2, threads=1, results=str(results), runs=str(runs), tiny=True)
    rows = compare.read_csv(results / "prompts_runs.csv")
    tune = [r for r in rows if r["stage"] == "tune"]
    assert {r["config"] for r in tune} == {"ppo-k1-i16"} and {r["seed"] for r in tune} == {"100"}
    lrs = {float(r["lr"]) for r in tune}
    pick, edge = prompts.pick_lr(rows, seeds=1)
    assert set(prompts.TUNE_LRS) <= lrs and len(lrs) in (3, 4) and edge is None and pick in lrs
    seeds = {r["config"]: r for r in rows if r["stage"] == "evaluate"}
    assert sorted(seeds) == sorted(prompts.NEW)
    for config, r in seeds.items():
        algo, k = prompts.NEW[config]
        assert (r["algo"], int(r["k"]), r["seed"], r["threads"]) == (algo, k, "0", "1")
        assert int(r["images_per_epoch"]) == 16 * k // prompts.TINY_SCALE
        assert int(r["prompts_per_epoch"]) == 16 // prompts.TINY_SCALE
        assert float(r["lr"]) == (pick if algo == "ppo" else 4e-3)
        flags = r["command"].split()
        assert flags[:3] == ["OMP_NUM_THREADS=1", "python", "loop.py"]
        assert flags.count("--images_per_epoch") == 1  # the tiny flags' own 8 is dropped
        assert flags[flags.index("--images_per_epoch") + 1] == r["images_per_epoch"]
        assert "--eval_every 4 --eval_raw true" in r["command"]
        assert float(r["train_seconds"]) > 0 and float(r["eval_seconds"]) > 0 and r["cpu"]
    curves = compare.read_csv(results / "prompts_curves.csv")
    for c in curves:
        k = prompts.NEW[c["config"]][1]
        assert int(c["prompts_seen"]) * k == int(c["images_seen"])
    assert [int(c["epoch"]) for c in curves if c["config"] == "loop-k8-i128"] == [0, 1, 2]
    prompts.run(jobs=2, threads=1, results=str(results), runs=str(runs), tiny=True)
    assert len(compare.read_csv(results / "prompts_runs.csv")) == len(rows)


def test_prompts_pick_lr_ties_to_the_smaller_and_extends_an_edge_once():
    from bench import prompts

    def rows(means: dict) -> list[dict]:
        return [{"stage": "tune", "config": "ppo-k1-i16", "lr": lr, "final_heldout": m}
                for lr, m in means.items() for _ in prompts.TUNE_SEEDS]  # fmt: skip

    assert prompts.pick_lr(rows({2e-3: 0.5, 4e-3: 0.6})) == (None, None)  # 8e-3 missing
    assert prompts.pick_lr(rows({2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.60005})) == (4e-3, None)  # tie
    assert prompts.pick_lr(rows({2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.7})) == (8e-3, 1.6e-2)
    assert prompts.pick_lr(rows({2e-3: 0.7, 4e-3: 0.6, 8e-3: 0.5})) == (2e-3, 1e-3)
    extended = rows({2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.7, 1.6e-2: 0.8})
    assert prompts.pick_lr(extended) == (1.6e-2, None)  # still at the edge: used, not extended


def test_prompts_report_from_synthetic_csvs(tmp_path):
    """LOOP K=4 well above PPO K=1 at 16 prompts an epoch is found (supported) beside the
    equal-image cells where they are equal (not resolved); LOOP K=8 at 128 images with 9 seeds is
    incomplete and left out, its claim at equal prompts too; curves give the area and the figure."""
    pytest.importorskip("rliable")
    from bench import prompts

    rng = np.random.default_rng(0)
    levels = {"ppo-k1": 0.53, "loop-k2": 0.48, "loop-k4": 0.53, "loop-k8": 0.50,  # 64 images
              "ppo-k1-i16": 0.40, "loop-k2-i32": 0.45, "loop-k8-i128": 0.55}  # fmt: skip
    seeds = {"loop-k2": 10, "loop-k8": 10, "loop-k8-i128": 9}
    noise = rng.normal(0, 0.02, 20)  # per seed, the same in every cell: equal levels tie
    runs, curves = {"old": [], "new": []}, {"old": [], "new": []}
    for config, level in levels.items():
        k = int(config.split("-k")[1].split("-")[0])
        images = 16 * k if config in prompts.NEW else 64
        side = "new" if config in prompts.NEW else "old"
        for seed in range(seeds.get(config, 20)):
            final = level + noise[seed] - (0.5 if (config, seed) == ("ppo-k1", 3) else 0)
            runs[side].append({"stage": "evaluate", "config": config, "algo": "x", "k": k,
                               "lr": 0.004, "images_per_epoch": images, "seed": seed,
                               "reward": "color", "untrained_heldout": 0.37, "final_heldout": final,
                               "images_to_threshold": 20 * images if final > 0.47 else "",
                               "commit": "abc", "cpu": "x", "threads": 1})  # fmt: skip
            curves[side] += [{"stage": "evaluate", "config": config, "lr": 0.004, "seed": seed,
                              "reward": "color", "epoch": e, "images_seen": e * images,
                              "prompts_seen": e * images // k,
                              "heldout": 0.37 + (final - 0.37) * e / 48}
                             for e in range(0, 49, 4)]  # fmt: skip
    runs["new"] += [{"stage": "tune", "config": "ppo-k1-i16", "lr": lr, "seed": s,
                     "reward": "color", "final_heldout": 0.5 + lr, "commit": "abc", "cpu": "x",
                     "threads": 1}
                    for lr in prompts.TUNE_LRS for s in prompts.TUNE_SEEDS]  # fmt: skip
    old = lambda rows, fields: [{f: r.get(f, "") for f in fields} for r in rows]
    compare.append_csv(tmp_path / "compare_runs.csv", compare.RUN_FIELDS,
                       old(runs["old"], compare.RUN_FIELDS))  # fmt: skip
    compare.append_csv(tmp_path / "compare_curves.csv", compare.CURVE_FIELDS,
                       old(curves["old"], compare.CURVE_FIELDS))  # fmt: skip
    compare.append_csv(tmp_path / "prompts_runs.csv", prompts.RUN_FIELDS, runs["new"])
    compare.append_csv(tmp_path / "prompts_curves.csv", prompts.CURVE_FIELDS, curves["new"])
    text = prompts.report(str(tmp_path)).read_text()
    claim = next(line for line in text.splitlines() if line.startswith("| LOOP K=4 > PPO K=1 |"))
    prompts_side, images_side = claim.split(" | ")[2], claim.split(" | ")[6]
    assert prompts_side.startswith("1.00 [1.00, 1.00] supported")
    assert "not resolved" in images_side
    assert claim.split(" | ")[1] == "20 / 20" and claim.split(" | ")[5] == "20 / 20"
    k8 = next(line for line in text.splitlines() if line.startswith("| LOOP K=8 > LOOP K=2 |"))
    assert "left out (incomplete cell)" in k8.split(" | ")[2] and "10 / 10" in k8
    assert "loop-k8-i128 (9 seeds)" in text and "| equal prompts | LOOP K=8 |" not in text
    assert "| equal prompts | PPO K=1 | ppo-k1-i16 | 16 | 16 | 0.004 | 20 | 0.370 |" in text
    assert "| equal images | LOOP K=4 | loop-k4 | 64 | 16 | 0.004 | 20 |" in text
    assert "| equal images | PPO K=1 | ppo-k1 | 64 | 64 |" in text
    assert "| 1/20 |" in text  # ppo-k1 seed 3 ends below its untrained score: a collapse
    assert "Pick so far: 0.008, at the grid's edge; the edge rule adds 0.016." in text
    # the area of a straight line from 0.37 to the final score is their mean
    area = prompts.area([(e, 0, 0, 0.37 + 0.1 * e / 48) for e in range(0, 49, 4)])
    assert area == pytest.approx(0.42)
    if common.have_matplotlib():
        assert (tmp_path / "prompts.png").stat().st_size > 1000


def test_prompts_help_and_a_bad_commit_write_nothing(tmp_path):
    script = str(REPO / "bench" / "prompts.py")
    done = subprocess.run([sys.executable, script, "run", "--help"], check=False,
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "Equal prompts" in done.stdout and "--tiny" in done.stdout
    bad = subprocess.run([sys.executable, script, "run", "--commit", "no-such-commit"], check=False,
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --commit")
    assert "Traceback" not in bad.stderr and not any(tmp_path.iterdir())


def test_clip_tiny_runs_then_reports_its_rows_copied_over_seeds(tmp_path):
    """bench/clip.py at tiny size: the check run and seed 0 of the four new cells, each row with its
    flags and one number a pass per clip statistic. With no comparison rows nothing is complete (an
    error); with the tiny rows copied over seeds 0-19 at known scores (as the other report tests'
    synthetic CSVs) the report finds R supported (+0.05: reuse pays), R' contradicted (overfit),
    C1 not resolved, C4 left out (9 seeds), and the check run bit-identical to its recorded row."""
    pytest.importorskip("rliable")
    from bench import clip

    results = tmp_path / "results"
    clip.run(jobs=2, threads=1, results=str(results), runs=str(tmp_path), tiny=True)
    rows = compare.read_csv(results / "clip_runs.csv")
    assert sorted((r["stage"], r["config"]) for r in rows) == sorted(
        [("check", "loop-k4"), *(("evaluate", c) for c in clip.NEW)]
    )
    for r in rows:
        passes, clip_range = clip.NEW.get(r["config"], (1, 1e-4))
        assert (int(r["passes"]), float(r["clip_range"])) == (passes, clip_range)
        assert float(r["lr"]) == clip.PASSES_LR[passes] and r["seed"] == "0"
        assert ("--inner_epochs 4" in r["command"]) == (passes == 4)
        assert ("--clip_range" in r["command"]) == (clip_range != 1e-4)
        for name in clip.PASS_KEYS:
            values = [float(v) for v in r[f"{name}_by_pass"].split()]
            assert len(values) == passes and all(v >= 0 for v in values), (name, r)
    (results / "compare_runs.csv").write_text(",".join(compare.RUN_FIELDS) + "\n")
    with pytest.raises(common.BenchError, match="no complete cell"):
        clip.report(str(results))

    levels = {"loop-k4": 0.50, "rloo-k4": 0.50, "loop-k4-p1-c1e-2": 0.50,
              "loop-k4-p4-c1e-4": 0.45, "loop-k4-p4-c1e-3": 0.55, "loop-k4-p4-c1e-2": 0.50}  # fmt: skip
    noise = np.random.default_rng(0).normal(0, 0.02, 20)  # per seed, the same in every cell
    tiny = {r["config"]: r for r in rows}  # the check row stands for loop-k4 and rloo-k4
    check = tiny["loop-k4"] | {"reward": "color", "final_heldout": 0.50 + noise[0],
                               "untrained_heldout": 0.37}  # fmt: skip
    new, old, curves = [check], [], {"new": [], "old": []}
    for config, level in levels.items():
        side = "old" if config in clip.REUSED else "new"
        for seed in range(9 if config == "loop-k4-p4-c1e-2" else 20):
            final = level + noise[seed] - (0.2 if config == "loop-k4-p4-c1e-4" and seed < 2 else 0)
            row = tiny[config if side == "new" else "loop-k4"] | {
                "stage": "evaluate", "config": config, "seed": seed, "reward": "color",
                "untrained_heldout": 0.37, "final_heldout": final,
                "images_to_threshold": 640 if final > 0.47 else ""}  # fmt: skip
            (new if side == "new" else old).append(row)
            curves[side] += [{"stage": "evaluate", "config": config, "lr": row["lr"], "seed": seed,
                              "reward": "color", "epoch": e, "images_seen": 64 * e,
                              "heldout": 0.37 + (final - 0.37) * e / 48}
                             for e in range(0, 49, 4)]  # fmt: skip
    only = lambda rows, fields: [{f: r.get(f, "") for f in fields} for r in rows]
    (results / "clip_runs.csv").unlink()
    (results / "compare_runs.csv").unlink()
    compare.append_csv(results / "clip_runs.csv", clip.RUN_FIELDS, new)
    compare.append_csv(results / "clip_curves.csv", compare.CURVE_FIELDS,
                       only(curves["new"], compare.CURVE_FIELDS))  # fmt: skip
    compare.append_csv(results / "compare_runs.csv", compare.RUN_FIELDS,
                       only(old, compare.RUN_FIELDS))  # fmt: skip
    compare.append_csv(results / "compare_curves.csv", compare.CURVE_FIELDS,
                       only(curves["old"], compare.CURVE_FIELDS))  # fmt: skip
    text = clip.report(str(results)).read_text()
    claim = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 20 / 20 | " in claim["R"] and "supported | +0.050 |" in claim["R"]
    assert "contradicted" in claim["R'"] and "not resolved" in claim["C1"]
    assert "left out (incomplete cell)" in claim["C4"] and "supported" in claim["P"]
    assert "Holding: reuse pays, overfit." in text
    assert "loop-k4-p4-c1e-2 (9 seeds)" in text and "| loop-k4-p4-c1e-2 | 4 | 0.01 |" not in text
    assert "| loop-k4-p4-c1e-4 | 4 | 0.0001 | 0.001 | 20 | 0.370 |" in text and "| 2/20 |" in text
    assert "| rloo-k4 | 1 | none (on-policy) |" in text
    assert "| yes (same CPU kind) |" in text
    for config in clip.NEW:  # copies of one tiny run: the mean over runs is its own numbers
        outside, zeroed, rms = (tiny[config][f"{n}_by_pass"].split() for n in clip.PASS_KEYS)
        for p in range(clip.NEW[config][0]):
            runs = 9 if config == "loop-k4-p4-c1e-2" else 20
            assert (f"| {config} | {runs} | {p + 1} | {float(outside[p]):.3f} | "
                    f"{float(zeroed[p]):.3f} | {float(rms[p]):.2e} |") in text  # fmt: skip
    assert "| loop-k4 (check run) | 1 | 1 |" in text
    if common.have_matplotlib():
        assert (results / "clip.png").stat().st_size > 1000


def test_clip_sweep_goes_on_past_a_failed_run_and_names_it(tmp_path, monkeypatch):
    """A run that fails (here: made to) is named at the end; the sweep's other runs still run."""
    from bench import clip

    real = compare.execute

    def failing(run, *args, **kwargs):
        if run.config == "loop-k4-p1-c1e-2":
            raise common.BenchError(f"{run.name} failed (exit 2); see its log")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(compare, "execute", failing)
    results = tmp_path / "results"
    with pytest.raises(common.BenchError, match=r"1 run\(s\) failed: .*loop-k4-p1-c1e-2"):
        clip.run(jobs=1, threads=1, results=str(results), runs=str(tmp_path), tiny=True)
    configs = [r["config"] for r in compare.read_csv(results / "clip_runs.csv")]
    assert sorted(configs) == sorted(["loop-k4", *(c for c in clip.NEW if "p1" not in c)])


def test_clip_by_pass_and_hypotheses_on_hand_made_inputs():
    from bench import clip

    rows = [{"z": [0.0, 0.2, 0.4, 0.6]}, {"z": [0.2, 0.4, 0.6, 0.8]}, {"z": []}]
    assert clip.by_pass(rows, "z", 2) == pytest.approx([0.2, 0.6])  # updates (1, 2), (3, 4)
    assert clip.by_pass(rows, "z", 4) == pytest.approx([0.1, 0.3, 0.5, 0.7])
    assert clip.by_pass([{"z": None}], "z", 4) == []
    means = [{"zeroed_by_pass": "0.1 0.5"}, {"zeroed_by_pass": "0.3 0.7"}, {"zeroed_by_pass": ""}]
    assert clip.pass_means(means, "zeroed") == pytest.approx([0.2, 0.6])

    unresolved = "not resolved at this budget"
    cells = lambda a, b, c: {"loop-k4": 0.50, "loop-k4-p4-c1e-4": a, "loop-k4-p4-c1e-3": b,
                             "loop-k4-p4-c1e-2": c}  # fmt: skip
    hypotheses = lambda r, r2, means, collapsed=None: clip.hypotheses(
        {"R": r, "R'": r2}, means, collapsed or {})  # fmt: skip
    assert clip.hypotheses({"R": ("supported", 0.1)}, cells(0.5, 0.6, 0.5), {}) is None
    equal = cells(0.50, 0.53, 0.47)  # every 4-pass cell within +-0.03 (0.03 itself included)
    assert hypotheses(("supported", 0.53 - 0.50), (unresolved, 0.0), equal) == ["reuse pays"]
    assert hypotheses(("supported", 0.02), (unresolved, 0.0), equal) == []
    assert hypotheses((unresolved, 0.03), (unresolved, 0.0), equal) == ["noise"]
    assert hypotheses((unresolved, 0.04), (unresolved, 0.0), cells(0.5, 0.54, 0.5)) == []
    assert hypotheses((unresolved, 0.0), ("contradicted", -0.05), equal) == ["overfit"]
    assert hypotheses((unresolved, 0.0), (unresolved, 0.0), equal,
                      {"loop-k4-p4-c1e-2": 3 / 20}) == ["noise", "overfit"]  # fmt: skip
    assert hypotheses((unresolved, 0.0), (unresolved, 0.0), equal,
                      {"loop-k4-p4-c1e-2": 2 / 20}) == ["noise"]  # fmt: skip
