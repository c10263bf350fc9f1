"""Where the policy-gradient signal of the tiny model lives: per-step gradient norms and agreement.

For R independent rollouts (B prompts x K samples each, the default run's shape) this computes the
RLOO gradient of the LoRA weights separately for every DDIM step j, then prints, per step, sigma_t,
the mean gradient norm and the mean cosine between the gradients of different rollouts (near 0:
noise dominates; > 0: the rollouts agree on a direction). The same for sums over groups of steps.
This is the measurement behind loop.py's Deviation 10 (`--min_train_sigma`).

    python bench/step_gradients.py --rollouts 6
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
import loop_utils
import rewards


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-30)).item()


def mean_and_se(values: list[float]) -> str:
    v = torch.tensor(values)
    return f"{v.mean():+.3f} +- {v.std() / len(v) ** 0.5:.3f}"


def main(
    model: str = "shapes_world/tiny-shapes",
    rollouts: int = 6,
    prompts_per_rollout: int = 8,
    k: int = 4,
) -> None:
    cfg = loop.Config(model=model, k=k)
    torch.set_flush_denormal(True)
    path = loop_utils.resolve_model_path(cfg.model)
    reward_name, train_prompts, _ = loop_utils.reward_and_prompts(cfg, path)
    models = loop.load_models(path, torch.device("cpu"), torch.float32, cfg.lora_rank, 0)
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    reward_fn, params = rewards.load_reward(reward_name), loop.lora_parameters(models.unet)
    steps = loop.trained_steps(policy.schedule, 0.0)  # every step with a density
    grads = {}  # (rollout, step) -> flattened LoRA gradient of that step's RLOO loss
    for i in range(rollouts):
        rng, generator = random.Random(i), torch.Generator().manual_seed(i)
        prompts = [p for p in rng.choices(train_prompts, k=prompts_per_rollout) for _ in range(k)]
        x_T, noise = loop.draw_noise(generator, len(prompts), cfg.num_steps, models.latent_shape)
        batch, reward = loop.rollout(models, policy, prompts, x_T, noise, reward_fn, 16)
        advantage = loop.compute_advantages("rloo", reward.view(-1, k), "off", cfg.adv_clip)
        for j in steps:
            for p in params:
                p.grad = None
            log_prob, _ = loop.rescore(policy, batch, slice(None), j)
            loop.policy_loss("rloo", log_prob, batch.log_probs[:, j], advantage, 0.0).backward()
            grads[i, j] = torch.cat([p.grad.flatten() for p in params])
        print(f"rollout {i + 1}/{rollouts}: reward {reward.mean():.3f}", flush=True)
    pairs = list(itertools.combinations(range(rollouts), 2))
    print(" j  sigma_t  |grad|    cosine between rollouts (mean +- s.e.)")
    for j in steps:
        norm = sum(grads[i, j].norm().item() for i in range(rollouts)) / rollouts
        cos = [cosine(grads[a, j], grads[b, j]) for a, b in pairs]
        print(f"{j:2d}  {policy.schedule.sigma_t[j]:.3f}  {norm:.5f}  {mean_and_se(cos)}")
    for threshold in (0.0, 0.1, 0.5):  # loop.py's --min_train_sigma: all, last two out, default
        group = loop.trained_steps(policy.schedule, threshold)
        name = f"sigma_t >= {threshold}" if threshold else "all"
        total = {i: sum(grads[i, j] for j in group) for i in range(rollouts)}
        cos = [cosine(total[a], total[b]) for a, b in pairs]
        print(f"sum over steps {name} ({len(group)} steps): cosine {mean_and_se(cos)}")


if __name__ == "__main__":
    fire.Fire(main)
