"""The bench scripts (bench/) at tiny sizes on the test suite's tiny model: seconds each, so they cannot rot.

Each test runs a script's main in-process (its children are forked from here) and checks what it
measured, not only that it ran.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import REPO, subprocess_env

import loop
from bench import common, compare, cost, gpu, variance


def test_compare_tiny_grid_writes_csv_and_table(tmp_path, tiny_model, prompt_file):
    """One configuration, two segments (a --resume between), raw and EMA held-out scores."""
    paths = compare.main(
        tiny=True, configs="loop-k2", seeds=1, model=str(tiny_model),
        runs=str(tmp_path / "runs"), results=str(tmp_path / "results"),
    )  # fmt: skip
    rows = list(csv.DictReader(paths["csv"].read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # TINY: 2 epochs, evaluated every epoch
    assert all(r["eval_ema"] and r["eval_raw"] for r in rows)  # raw scored after each segment
    assert [int(r["images_seen"]) for r in rows] == [0, 4, 8]
    assert float(rows[-1]["peak_rss_mb"]) > 50
    # the run really was trained in two segments: the second resumed the first
    log = (tmp_path / "runs" / "loop-k2-s0.log").read_text()
    assert "resumed" in log
    table = paths["md"].read_text()
    assert "| loop-k2 | 1 |" in table and "n/a" in table  # no ppo-k1 reference in this grid


def test_compare_rejects_unknown_configuration(tmp_path):
    with pytest.raises(common.BenchError, match="unknown --configs"):
        compare.main(tiny=True, configs="sgd-k1", runs=str(tmp_path), results=str(tmp_path))


def synthetic_rows() -> list[dict]:
    """Two configurations x two seeds x epochs 0..2, ppo-k1 the reference."""
    rows = []
    for name, slope in (("ppo-k1", 0.1), ("loop-k4", 0.2)):
        for seed in (0, 1):
            for epoch in range(3):
                score = 0.4 + slope * epoch + 0.01 * seed
                rows.append({"config": name, "seed": seed, "epoch": epoch, "images_seen": 32 * epoch,
                             "reward_mean": score, "eval_ema": score, "eval_raw": score - 0.01,
                             "seconds": 1.0 + seed, "peak_rss_mb": 400.0 + seed})  # fmt: skip
    return rows


def test_compare_summary_images_to_reach_the_reference():
    table = compare.summary_table(synthetic_rows(), ["ppo-k1", "loop-k4"])
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    # ppo-k1 ends at 0.605 (mean of 0.60, 0.61), reached at epoch 2 (64 images); loop-k4 reaches
    # it at epoch 1 (0.605 as well: 32 images)
    assert "| 0.605 +- 0.007 |" in lines["ppo-k1"] and "| 64 |" in lines["ppo-k1"]
    assert "| 32 |" in lines["loop-k4"] and "| 401 |" in lines["loop-k4"]
    assert compare.images_to_reach([0.0, 32.0], torch.tensor([0.1, 0.2]).numpy(), 0.9) is None


def test_compare_summary_when_the_reference_ends_below_the_start():
    rows = [r | {"eval_ema": 0.8 - r["eval_ema"]} if r["config"] == "ppo-k1" else r
            for r in synthetic_rows()]  # fmt: skip
    table = compare.summary_table(rows, ["ppo-k1", "loop-k4"])
    assert table.count("n/a (ppo-k1 ends below the start)") == 2 and "| 0 |" not in table


def test_compare_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = compare.plot(synthetic_rows(), ["ppo-k1", "loop-k4"], tmp_path / "c.png")
    assert path.is_file() and path.stat().st_size > 1000


def test_evaluation_epochs_end_at_the_last_epoch():
    assert compare.evaluation_epochs(48, 24) == [24, 48]
    assert compare.evaluation_epochs(10, 4) == [4, 8, 10]
    assert compare.evaluation_epochs(3, 5) == [3]


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


def test_gpu_tiny_reports_throughput(tmp_path):
    report = gpu.main(tiny=True, images=4, repeats=1, results=str(tmp_path))
    assert report["sampling_images_per_s"] > 0 and report["update_images_per_s"] > 0
    assert 0.3 < report["update_over_bare_fwd_bwd"] < 10
    assert report["max_abs_image_diff"] < 1e-4
    assert json.loads((tmp_path / "gpu.json").read_text())["k"] == 4


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
