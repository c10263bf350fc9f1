"""The variance the leave-one-out baseline removes, measured on the real LoRA gradient.

For a fixed set of prompts and R independent rollouts per K (each rollout: images_per_epoch images,
N/K prompts drawn from the set with replacement, as loop.py draws them, K samples each), this takes
the LoRA gradient that loop.train_on_rollout computes for
    reinforce  K = 1                       A = r (no baseline), one update over the rollout
    rloo       K = 2, 4, 8                 A_i = r_i - b_i, one update over the rollout
    loop       K = 2, 4, 8, first update   A_i = r_i - b_i (over the whole rollout), the gradient of
                                           its first optimizer step: Config's first minibatch, rho = 1
and reports, per estimator: the trace of the covariance of the gradient over rollouts
(sum_d Var[g_d]), its ratio to REINFORCE's, the cosine between independent estimates (mean over pairs
of rollouts, +- its standard error) and the unbiasedness check: every estimator above has the same
expectation (the policy gradient of the mean reward over the prompt set), so with g_bar the mean over
R rollouts, z = |g_bar - g_bar_ref|^2 / (tr C / R + tr C_ref / R) has expectation 1 when the means
agree (reference: reinforce K = 1; independent rollouts); z >> 1 (say > 3) flags a bias. The last
column, |g_bar|^2 / (tr C / R), says whether the mean is resolved at all (~1: the mean is noise, and the
check can only detect biases about as large as that noise).

The gradient is captured, not recomputed: train_on_rollout is given a stand-in for the optimizer whose
step() records the LoRA gradient instead of moving the weights (max_grad_norm = inf: unclipped).
Everything else is loop.Config's default (model, reward, steps, trained steps, micro-batches).

    python bench/variance.py                    # R = 16 rollouts per K on the embedded model
    python bench/variance.py --tiny             # the test suite's tiny random model, seconds
Writes variance.md (table), variance.csv and variance.png (trace and cosine against K) to --results
(default runs/bench/results, untracked; the committed results: --results bench/results).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
import loop_utils
import rewards
from bench.common import BenchError, cli_main, have_matplotlib, markdown_table, tiny_model

TINY = {"reward": "jpeg_compressibility", "images_per_epoch": 8, "num_steps": 3, "micro_batch": 4}
FIELDS = ("estimator", "algo", "k", "rollouts", "trace", "trace_ratio", "cosine", "cosine_se",
          "z_unbiased", "mean_resolved")  # fmt: skip


class GradientRecorder:
    """Stands in for the optimizer: train_on_rollout calls zero_grad() and step(); step() records
    the LoRA gradient (flattened, float64) instead of moving the weights."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params, self.grads = params, []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads.append(torch.cat([p.grad.flatten() for p in self.params]).double().cpu())


def first_rows(batch: loop.Rollout, n: int) -> loop.Rollout:
    """The first n samples of a rollout (the first minibatch: LOOP's first update)."""
    return loop.Rollout(*(field[:n] for field in dataclasses.astuple(batch)))


def estimator_gradient(policy, batch, reward, cfg: loop.Config, first_update: bool) -> torch.Tensor:
    """The LoRA gradient of cfg.algo's first optimizer step on this rollout: (D,) float64."""
    sizes = loop_utils.check_config(cfg, 1)
    advantage = loop.compute_advantages(
        cfg.algo, reward.view(-1, cfg.k), cfg.normalize_advantage, cfg.adv_clip
    )  # over the whole rollout, as loop.main
    if first_update:  # only the first minibatch: one optimizer step, at rho = 1
        batch, advantage = first_rows(batch, sizes["minibatch"]), advantage[: sizes["minibatch"]]
    recorder = GradientRecorder(loop.lora_parameters(policy.unet))
    loop.train_on_rollout(policy, batch, advantage, cfg, recorder, random.Random(0), sizes)
    return recorder.grads[0]


def statistics(grads: torch.Tensor) -> dict:
    """grads (R, D): mean (D,), trace of the covariance, mean pairwise cosine and its s.e."""
    r = len(grads)
    mean = grads.mean(dim=0)
    trace = ((grads - mean) ** 2).sum().item() / (r - 1)  # tr C = sum_d Var[g_d]
    unit = grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-300)
    cos = torch.tensor([(unit[a] @ unit[b]).item() for a, b in itertools.combinations(range(r), 2)])
    se = (cos.std() / math.sqrt(len(cos))).item() if len(cos) > 1 else math.nan
    return {"mean": mean, "trace": trace, "cosine": cos.mean().item(), "cosine_se": se, "r": r}


def unbiasedness_z(a: dict, b: dict) -> float:
    """z = |mean_a - mean_b|^2 / (tr C_a / R_a + tr C_b / R_b): expectation 1 for equal means."""
    gap = ((a["mean"] - b["mean"]) ** 2).sum().item()
    return gap / (a["trace"] / a["r"] + b["trace"] / b["r"])


def main(
    rollouts: int = 16,
    ks: str = "2,4,8",
    prompts: int = 8,
    tiny: bool = False,
    model: str = "",
    seed: int = 0,
    results: str = "runs/bench/results",
    work: str = "runs/bench-variance",
) -> list[dict]:
    """R rollouts per K, the estimators' gradients, the table and the plot; returns the rows."""
    k_values = sorted({int(k) for k in str(ks).split(",") if str(k).strip()})
    if rollouts < 2 or prompts < 1 or not k_values or min(k_values) < 2:
        raise BenchError("need --rollouts >= 2, --prompts >= 1 and --ks of values >= 2, e.g. 2,4,8")
    base: dict = dict(TINY) if tiny else {}
    if tiny:
        tiny_path, prompt_file = tiny_model(Path(work) / "tiny-model")
        base |= {"model": str(tiny_path), "train_prompts": str(prompt_file)}
    if model:
        base["model"] = model
    cfg = loop.Config(**base, seed=seed, max_grad_norm=math.inf)
    if bad := [k for k in k_values if cfg.images_per_epoch % k]:
        raise BenchError(f"--ks {bad}: must divide images_per_epoch {cfg.images_per_epoch}")
    torch.set_flush_denormal(True)
    path = loop_utils.resolve_model_path(cfg.model)
    reward_name, train_prompts, _ = loop_utils.reward_and_prompts(cfg, path)
    models = loop.load_models(
        path, torch.device("cpu"), torch.float32, cfg.lora_rank, seed, cfg.lora_modules
    )
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    reward_fn = rewards.load_reward(reward_name)
    prompt_set = random.Random(seed).sample(train_prompts, min(prompts, len(train_prompts)))

    # estimator name -> (Config, first update only); the rollouts of one K serve all its estimators
    plan = {1: {"reinforce K=1": (dataclasses.replace(cfg, algo="reinforce", k=1), False)}}
    for k in k_values:
        plan[k] = {
            f"rloo K={k}": (dataclasses.replace(cfg, algo="rloo", k=k), False),
            f"loop K={k} (first update)": (dataclasses.replace(cfg, algo="loop", k=k), True),
        }
    grads: dict[str, list[torch.Tensor]] = {name: [] for group in plan.values() for name in group}
    n, micro = cfg.images_per_epoch, loop_utils.check_config(cfg, 1)["micro_batch"]
    with tqdm(total=len(plan) * rollouts, desc="rollouts") as bar:
        for k, estimators in plan.items():
            for i in range(rollouts):
                rollout_seed = seed * 1_000_003 + k * 10_007 + i  # independent across K and i
                chosen = random.Random(rollout_seed).choices(prompt_set, k=n // k)
                batch_prompts = [p for p in chosen for _ in range(k)]  # each group of K together
                generator = torch.Generator().manual_seed(rollout_seed)
                x_T, noise = loop.draw_noise(generator, n, cfg.num_steps, models.latent_shape)
                batch, reward = loop.rollout(
                    models, policy, batch_prompts, x_T, noise, reward_fn, micro
                )
                for name, (est_cfg, first_update) in estimators.items():
                    grads[name].append(
                        estimator_gradient(policy, batch, reward, est_cfg, first_update)
                    )
                bar.update()

    stats = {name: statistics(torch.stack(g)) for name, g in grads.items()}
    reference = stats["reinforce K=1"]
    rows = []
    for name, s in stats.items():
        k = 1 if name.startswith("reinforce") else int(name.split("K=")[1].split()[0])
        rows.append({
            "estimator": name, "algo": name.split()[0], "k": k, "rollouts": s["r"],
            "trace": s["trace"], "trace_ratio": s["trace"] / reference["trace"],
            "cosine": s["cosine"], "cosine_se": s["cosine_se"],
            "z_unbiased": math.nan if s is reference else unbiasedness_z(s, reference),
            "mean_resolved": (s["mean"] ** 2).sum().item() / (s["trace"] / s["r"]),
        })  # fmt: skip
    write_results(rows, Path(results), cfg, n)
    return rows


def write_results(rows: list[dict], results: Path, cfg: loop.Config, n: int) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "variance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    header = ["estimator", "tr Cov(g)", "vs reinforce", "cosine between rollouts",
              "z (unbiased: ~1)", "\\|g_bar\\|^2 / (tr C / R)"]  # fmt: skip
    table = [
        [
            r["estimator"],
            f"{r['trace']:.3g}",
            f"{r['trace_ratio']:.3g}",
            f"{r['cosine']:+.3f} +- {r['cosine_se']:.3f}",
            "ref" if math.isnan(r["z_unbiased"]) else f"{r['z_unbiased']:.2f}",
            f"{r['mean_resolved']:.2f}",
        ]
        for r in rows
    ]
    note = (
        f"{rows[0]['rollouts']} independent rollouts of {n} images per K; model {cfg.model}, "
        f"reward {cfg.reward}, {cfg.num_steps} DDIM steps, min_train_sigma {cfg.min_train_sigma}."
    )
    (results / "variance.md").write_text(f"{note}\n\n{markdown_table(header, table)}")
    print((results / "variance.md").read_text())
    plot(rows, results / "variance.png")


def plot(rows: list[dict], path: Path) -> Path | None:
    """Trace of the covariance (log) and cosine between rollouts against K, per estimator."""
    if not have_matplotlib():
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    reinforce = next(r for r in rows if r["algo"] == "reinforce")
    for ax, key in ((left, "trace"), (right, "cosine")):
        ax.axhline(reinforce[key], color="gray", linestyle="--", label="reinforce K=1")
    for algo, marker in (("rloo", "o"), ("loop", "s")):
        mine = [r for r in rows if r["algo"] == algo]
        ks = [r["k"] for r in mine]
        left.plot(ks, [r["trace"] for r in mine], marker=marker, label=algo)
        cos, se = [r["cosine"] for r in mine], [r["cosine_se"] for r in mine]
        right.errorbar(ks, cos, yerr=se, marker=marker, capsize=3, label=algo)
    left.set(xscale="log", yscale="log", xlabel="K (equal images)", title="tr Cov of the gradient")
    right.set(xscale="log", xlabel="K (equal images)", title="cosine between rollouts (+- s.e.)")
    left.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import fire

    fire.Fire(lambda **flags: cli_main(main, **flags))
