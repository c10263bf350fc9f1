"""LOOP: leave-one-out PPO for RL fine-tuning of text-to-image diffusion models, in one readable file.

Paper: S. Gupta et al., "A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion
Fine-tuning" (LOOP), arXiv:2503.00897. Four estimators side by side, named as on the command line:
`reinforce`, `rloo` (REINFORCE with a leave-one-out baseline), `ppo` (as in DDPO) and `loop`.

Quickstart:
    python loop.py --algo loop --k 4 --reward color                  # CPU, embedded tiny model, minutes
    python loop.py --algo loop --k 4 --reward color --model stabilityai/stable-diffusion-2-base \
        --prompt_dir T2I-CompBench/examples/dataset --num_steps 50 --images_per_epoch 256 \
        --micro_batch 8 --lr 3e-4 --guidance_scale 7.5                # one GPU (torchrun for several)

Deviations from the paper (each with its reason):
 1. log pi is the MEAN of the per-dimension Gaussian log-density over the latent dimensions (as DDPO's
    code), not the sum. The ratio is then exp(mean delta), so the clip range eps = 1e-4 of DDPO/LOOP keeps
    its meaning, and the same eps and learning rate transfer between a 16x16 and a 64x64 latent. A sum
    would make eps = 1e-4 absurdly tight (PITFALLS #4). The log-prob is the exact density up to this scale.
 2. Steps whose DDIM std sigma_t < MIN_SIGMA are not trained on (their log-prob is stored as 0). With
    set_alpha_to_one=True the last step has sigma_t = 0 and its density is undefined; a tiny sigma_t makes
    its log-density dominate the gradient (PITFALLS #1). The paper trains on all T steps.
 3. The random subset of timesteps (`--timestep_fraction`) is drawn per micro-batch, not per sample as in
    DDPO, so re-scoring uses exactly the batch composition of sampling and the first ratio is exactly 1.
 4. PPO's per-prompt reward statistics (DDPO) use the K samples of each prompt in the current rollout
    instead of a buffer kept across epochs: stateless, so resume is exact. With K = 1 PPO falls back to
    batch statistics, which is what DDPO does for a prompt without enough history.
 5. LoRA on the UNet's attention projections (as DDPO); no full fine-tuning.
 6. Multi-GPU: LoRA gradients are averaged by one explicit all_reduce per optimizer step instead of DDP's
    hooks: the UNet runs T times per backward and accumulates over micro-batches, which DDP would need
    no_sync bookkeeping for; the two-process test proves the weights stay identical on every rank.
 7. Prompts are drawn with replacement each epoch (the paper does not specify).
 8. Default hyper-parameters fit the embedded 64x64 model on 2 CPU cores, not the paper's SD 2 settings;
    the GPU quickstart above shows the paper-scale ones. They all live in `Config`.
 9. Optional KL penalty to the base model (`--kl_coef`, default 0 = the paper) and a stop on a non-finite
    reward or gradient (never train on NaN).

Notation (paper symbol -> code name):
    B prompts per rank per epoch      n_prompts        K samples per prompt          k
    T denoising (DDIM) steps          num_steps        t, x_t latent at step t       latents[:, j]
    c prompt (its text embedding)     cond             pi_theta(x_{t-1} | x_t, c)    log_prob
    pi_old (policy that sampled)      old_log_prob     alpha_bar_t                   alpha_bar_t
    sigma_t DDIM std                  sigma_t          eta (DDIM stochasticity)      eta
    r(x_0, c) reward                  reward           b_i leave-one-out baseline    baseline
    A_i advantage                     advantage        rho_t importance ratio        ratio
    eps PPO clip range                clip_range       w guidance scale              guidance_scale
Shapes: N = B*K images on a rank, (C, h, w) latent, (3, H, W) image, L tokens, D text width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import rewards

HERE = Path(__file__).resolve().parent
ALGOS = ("reinforce", "rloo", "ppo", "loop")
NORMALIZATIONS = ("auto", "off", "batch", "group-std")
SHAPES_MARKER = "shapes_world.json"  # a model folder holding this file draws the offline shapes world
CATEGORIES = (
    "color",
    "shape",
    "texture",
    "spatial",
    "non_spatial",
    "complex",
)  # T2I-CompBench names
MIN_SIGMA = 1e-4  # steps with sigma_t below this are deterministic in practice: not trained (Deviation 2)
EVAL_SEED = (
    1234  # held-out evaluation noise: the same for every epoch, run and algorithm
)


class UsageError(Exception):
    """Bad input: printed as one line naming the problem and the fix, exit code 2."""


def knob(default, doc: str):
    return field(default=default, metadata={"doc": doc})


# ----------------------------------------------------------------------------------------------------------
# Config: every knob in one place (the lead tunes the defaults here)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    algo: str = knob("loop", "estimator: reinforce | rloo | ppo | loop")
    k: int = knob(4, "K, images sampled per prompt (>= 2 for rloo and loop)")
    reward: str = knob("color", "r(x_0, c): a name in rewards.REWARD_NAMES")
    model: str = knob(
        "assets/tiny-shapes",
        "local diffusers folder (relative to loop.py if not found) or hub id",
    )
    train_prompts: str = knob(
        "", "training prompt file, one per line (default: from the model/reward)"
    )
    eval_prompts: str = knob(
        "", "held-out prompt file (default: the *_val.txt next to the training file)"
    )
    prompt_dir: str = knob(
        "", "folder with T2I-CompBench <category>_train.txt / <category>_val.txt"
    )
    num_eval_prompts: int = knob(
        48, "held-out prompts scored at each evaluation (one fixed-noise image each)"
    )
    lr: float = knob(1e-3, "AdamW learning rate for the LoRA parameters")
    lora_rank: int = knob(8, "LoRA rank r (alpha = r)")
    epochs: int = knob(
        30, "epochs; one epoch = one rollout of images_per_epoch images + its updates"
    )
    images_per_epoch: int = knob(
        32, "B*K*world_size, images per rollout (fixed for equal-budget runs)"
    )
    num_steps: int = knob(10, "T, DDIM steps per image")
    eta: float = knob(
        1.0, "eta, DDIM stochasticity (> 0: the policy must be stochastic)"
    )
    guidance_scale: float = knob(4.0, "w, classifier-free guidance scale")
    clip_range: float = knob(
        1e-4, "eps, PPO clip range on rho_t (mean-reduced log-probs, Deviation 1)"
    )
    adv_clip: float = knob(
        5.0, "advantages clipped to [-adv_clip, adv_clip] (0 = off; DDPO uses 5)"
    )
    normalize_advantage: str = knob(
        "auto", "off | batch | group-std (GRPO-style) | auto = paper's choice"
    )
    inner_epochs: int = knob(
        1, "passes over each rollout (ppo/loop; reinforce/rloo are on-policy: 1)"
    )
    minibatch: int = knob(
        0,
        "samples per optimizer step, all ranks (0: whole rollout for reinforce/rloo, 1/4 for ppo/loop)",
    )
    micro_batch: int = knob(
        8, "samples per forward/backward on a rank (gradient accumulation in samples)"
    )
    timestep_fraction: float = knob(
        1.0, "fraction of the trainable DDIM steps used per update"
    )
    kl_coef: float = knob(
        0.0, "beta, KL penalty to the base model (LoRA disabled); 0 = paper"
    )
    max_grad_norm: float = knob(1.0, "gradient-norm clip")
    eval_every: int = knob(
        5, "evaluate held-out prompts every this many epochs (and before and after)"
    )
    seed: int = knob(0, "seed for LoRA init, prompts and sampling noise")
    out: str = knob("", "run folder (default runs/<algo>-<reward>-k<K>-<time>)")
    resume: str = knob(
        "", "run folder to continue (flags given again override its config)"
    )
    mixed_precision: str = knob(
        "auto", "no | bf16 | fp16 for frozen weights (auto: bf16 on GPU, no on CPU)"
    )
    device: str = knob("auto", "cpu | cuda | auto")


# ----------------------------------------------------------------------------------------------------------
# 1. The denoising MDP: one DDIM step with eta > 0 is a Gaussian policy pi_theta(x_{t-1} | x_t, c)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """The T DDIM steps, in sampling order (all shapes (T,))."""

    timesteps: torch.Tensor  # t, integer training timesteps, high -> low
    alpha_bar_t: torch.Tensor  # alpha_bar at t
    alpha_bar_prev: torch.Tensor  # alpha_bar at the step DDIM jumps to
    sigma_t: torch.Tensor  # DDIM std of x_{t-1}
    trainable: torch.Tensor  # bool, sigma_t >= MIN_SIGMA


def ddim_sigma(
    alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float
) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)   (DDIM, Song et al. eq. 16)"""
    # sigma_t = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    variance = (
        (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    )
    return eta * variance**0.5


def ddim_schedule(scheduler, num_steps: int, eta: float) -> Schedule:
    """Timesteps and alpha_bars exactly as diffusers' DDIMScheduler.step picks them (prev = t - 1000 // T)."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.clone()  # (T,)
    prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod.float()
    alpha_bar_t = alphas[timesteps]
    alpha_bar_prev = torch.where(
        prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.float()
    )
    sigma_t = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    return Schedule(
        timesteps, alpha_bar_t, alpha_bar_prev, sigma_t, sigma_t >= MIN_SIGMA
    )


def predicted_x0_and_eps(
    model_output,
    x_t,
    alpha_bar_t,
    prediction_type: str,
    clip_sample: float | None = None,
):
    """x0_hat and eps_hat from the network output (all (N, C, h, w))."""
    if prediction_type == "epsilon":
        # x0_hat = (x_t - sqrt(1 - a_t) * eps_hat) / sqrt(a_t)
        eps_hat = model_output
        x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps_hat) / alpha_bar_t**0.5
    elif prediction_type == "v_prediction":
        # x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v ;  eps_hat = sqrt(a_t) v + sqrt(1 - a_t) x_t
        x0_hat = alpha_bar_t**0.5 * x_t - (1 - alpha_bar_t) ** 0.5 * model_output
        eps_hat = alpha_bar_t**0.5 * model_output + (1 - alpha_bar_t) ** 0.5 * x_t
    else:
        raise UsageError(
            f"prediction_type {prediction_type!r} is not supported; use an epsilon or v model"
        )
    if (
        clip_sample is not None
    ):  # the scheduler config's clip_sample (False for Stable Diffusion)
        x0_hat = x0_hat.clamp(-clip_sample, clip_sample)
    return x0_hat, eps_hat


def ddim_mean(x0_hat, eps_hat, alpha_bar_prev, sigma_t) -> torch.Tensor:
    """mu_theta(x_t, c) = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat      (N, C, h, w)"""
    # mu = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat
    return (
        alpha_bar_prev**0.5 * x0_hat
        + (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps_hat
    )


def gaussian_log_prob(x_prev, mean, sigma_t) -> torch.Tensor:
    """log pi(x_{t-1} | x_t, c), MEAN over latent dims (Deviation 1): (N, C, h, w) -> (N,), fp32."""
    x_prev, mean, sigma_t = (
        x_prev.float(),
        mean.float(),
        torch.as_tensor(sigma_t, dtype=torch.float32),
    )
    # log N(x; mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)
    log_density = (
        -((x_prev - mean) ** 2) / (2 * sigma_t**2)
        - torch.log(sigma_t)
        - math.log(math.sqrt(2 * math.pi))
    )
    return log_density.mean(dim=tuple(range(1, x_prev.ndim)))


def ddim_step(
    model_output,
    x_t,
    alpha_bar_t,
    alpha_bar_prev,
    sigma_t,
    prediction_type,
    *,
    x_prev=None,
    noise=None,
    clip_sample=None,
):
    """Sample x_{t-1} = mu + sigma_t * noise (x_prev=None) or score the given x_prev.

    Returns (x_prev (N, C, h, w), log_prob (N,) or None if sigma_t < MIN_SIGMA, mean (N, C, h, w)).
    Identical to diffusers' DDIMScheduler.step(..., eta, variance_noise=noise).prev_sample.
    """
    x0_hat, eps_hat = predicted_x0_and_eps(
        model_output, x_t, alpha_bar_t, prediction_type, clip_sample
    )
    mean = ddim_mean(x0_hat, eps_hat, alpha_bar_prev, sigma_t)
    if x_prev is None:
        # x_{t-1} = mu + sigma_t * z,  z ~ N(0, I)
        x_prev = mean + sigma_t * noise
    log_prob = (
        gaussian_log_prob(x_prev, mean, sigma_t) if sigma_t >= MIN_SIGMA else None
    )
    return x_prev, log_prob, mean


# ----------------------------------------------------------------------------------------------------------
# 2. K-sample rollouts: B prompts x K images, CFG batched, trajectories in fp32
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One batch of trajectories (fp32, on the training device)."""

    latents: torch.Tensor  # (N, T+1, C, h, w): x_T .. x_0
    log_probs: (
        torch.Tensor
    )  # (N, T): log pi_old(x_{t-1} | x_t, c); 0 where sigma_t < MIN_SIGMA
    cond: torch.Tensor  # (N, L, D): prompt embeddings c
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings, exactly as StableDiffusionPipeline.encode_prompt: list of N -> (N, L, D)."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def guided_noise_prediction(
    unet, x_t, t, cond, uncond, guidance_scale: float
) -> torch.Tensor:
    """eps_hat = eps(x_t, "") + w * (eps(x_t, c) - eps(x_t, ""))  (CFG, one batched UNet call) -> (N, C, h, w)"""
    dtype = unet.dtype
    latent_in = torch.cat([x_t, x_t]).to(dtype)  # (2N, C, h, w)
    embeds = torch.cat([uncond.expand(len(cond), -1, -1), cond]).to(dtype)  # (2N, L, D)
    out = unet(latent_in, t, encoder_hidden_states=embeds).sample.float()
    eps_uncond, eps_cond = out.chunk(2)  # (2N, ...) -> 2 x (N, ...)
    # eps_hat = eps_uncond + w * (eps_cond - eps_uncond)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def policy_step(
    unet,
    x_t,
    j: int,
    cond,
    uncond,
    schedule: Schedule,
    cfg_w: float,
    prediction_type: str,
    clip_sample=None,
    *,
    x_prev=None,
    noise=None,
):
    """pi_theta at DDIM step j: the shared code path of sampling (x_prev=None) and re-scoring (PITFALLS #2)."""
    model_output = guided_noise_prediction(
        unet, x_t, schedule.timesteps[j], cond, uncond, cfg_w
    )
    return ddim_step(
        model_output,
        x_t,
        schedule.alpha_bar_t[j],
        schedule.alpha_bar_prev[j],
        schedule.sigma_t[j],
        prediction_type,
        x_prev=x_prev,
        noise=noise,
        clip_sample=clip_sample,
    )


def draw_noise(
    generator: torch.Generator, n: int, num_steps: int, latent_shape: tuple
) -> tuple:
    """x_T (n, C, h, w) and the per-step noise z (n, T, C, h, w), drawn on CPU in diffusers' order."""
    x_T = torch.randn((n, *latent_shape), generator=generator)
    step_noise = torch.stack(
        [
            torch.randn((n, *latent_shape), generator=generator)
            for _ in range(num_steps)
        ],
        1,
    )
    return x_T, step_noise


@torch.no_grad()
def sample_trajectories(
    unet,
    cond,
    uncond,
    x_T,
    step_noise,
    schedule: Schedule,
    guidance_scale: float,
    prediction_type: str,
    clip_sample=None,
):
    """Run the T-step policy from x_T: latents (N, T+1, C, h, w) and log-probs (N, T), both fp32."""
    x_t, latents, log_probs = x_T.float(), [x_T.float()], []
    for j in range(len(schedule.timesteps)):
        x_t, log_prob, _ = policy_step(
            unet,
            x_t,
            j,
            cond,
            uncond,
            schedule,
            guidance_scale,
            prediction_type,
            clip_sample,
            noise=step_noise[:, j].to(x_t.device),
        )
        latents.append(x_t)
        log_probs.append(
            log_prob
            if log_prob is not None
            else torch.zeros(len(x_t), device=x_t.device)
        )
    return torch.stack(latents, 1), torch.stack(
        log_probs, 1
    )  # (N, T+1, C, h, w), (N, T)


@torch.no_grad()
def decode_images(vae, x_0) -> torch.Tensor:
    """VAE decode, as the pipeline does: (N, C, h, w) latents -> (N, 3, H, W) images in [0, 1]."""
    images = vae.decode((x_0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def score_images(reward_fn, images, prompts: list[str]) -> torch.Tensor:
    """r(x_0, c) for each image: (N,) fp32 on CPU. A non-finite reward stops the run and names the prompts."""
    reward = torch.as_tensor(reward_fn(images, prompts)).float().flatten().cpu()
    bad = [p for p, r in zip(prompts, reward.tolist()) if not math.isfinite(r)]
    if bad:
        raise UsageError(
            f"the reward returned a non-finite value for prompts {sorted(set(bad))}; fix the reward "
            "function or remove these prompts (training stopped; the last checkpoint is intact)"
        )
    return reward


def rollout(
    models,
    prompts: list[str],
    x_T,
    step_noise,
    cfg: Config,
    schedule: Schedule,
    reward_fn,
    desc: str = "sampling",
    show: bool = True,
) -> tuple[Rollout, torch.Tensor]:
    """Sample, decode and score N images in micro-batches (the same batches that training re-scores)."""
    parts, rewards_ = [], []
    for start in tqdm(
        range(0, len(prompts), cfg.micro_batch),
        desc=desc,
        leave=False,
        disable=not show,
    ):
        chunk = prompts[start : start + cfg.micro_batch]
        cond = encode_prompts(
            models.tokenizer, models.text_encoder, chunk
        ).float()  # (n, L, D)
        latents, log_probs = sample_trajectories(
            models.unet,
            cond,
            models.uncond,
            x_T[start : start + len(chunk)].to(models.device),
            step_noise[start : start + len(chunk)],
            schedule,
            cfg.guidance_scale,
            models.prediction_type,
            models.clip_sample,
        )
        images = decode_images(models.vae, latents[:, -1])  # (n, 3, H, W)
        rewards_.append(score_images(reward_fn, images, chunk))
        parts.append(Rollout(latents, log_probs, cond, images))
    batch = Rollout(
        *(
            torch.cat([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(Rollout)
        )
    )
    return batch, torch.cat(rewards_)  # Rollout of N, (N,)


# ----------------------------------------------------------------------------------------------------------
# 3. The four estimators: advantages, importance ratio, objectives
# ----------------------------------------------------------------------------------------------------------
def leave_one_out_baseline(reward: torch.Tensor) -> torch.Tensor:
    """b_i = 1/(K-1) * sum_{j != i} r_j, per prompt: (B, K) -> (B, K)"""
    k = reward.shape[1]
    # b_i = (sum_j r_j - r_i) / (K - 1)
    return (reward.sum(dim=1, keepdim=True) - reward) / (k - 1)


def leave_one_out_advantage(reward: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - b_i  (RLOO and LOOP): (B, K) -> (B, K); sums to zero over each prompt's K samples."""
    # A_i = r_i - 1/(K-1) sum_{j != i} r_j
    return reward - leave_one_out_baseline(reward)


def normalize(advantage: torch.Tensor, how: str) -> torch.Tensor:
    """(A - mean) / std over the batch or over each prompt's K samples (group-std); 0 where std == 0. (B, K)"""
    if how == "off":
        return advantage
    if how == "batch":
        mean, std = advantage.mean(), advantage.std(unbiased=False)
    else:  # "group-std": per-prompt statistics (DDPO's per-prompt tracker, GRPO's group normalisation)
        mean, std = (
            advantage.mean(dim=1, keepdim=True),
            advantage.std(dim=1, keepdim=True, unbiased=False),
        )
    # A <- (A - mean) / std
    return torch.where(
        std > 1e-6,
        (advantage - mean) / std.clamp(min=1e-6),
        torch.zeros_like(advantage),
    )


def compute_advantages(
    algo: str, reward: torch.Tensor, normalization: str, adv_clip: float
) -> torch.Tensor:
    """Advantage A_i of each image, one visible branch per algorithm: reward (B, K) -> advantage (B*K,)."""
    if algo == "reinforce":
        advantage = reward  # A = r(x_0, c): plain REINFORCE, no baseline
    elif algo == "rloo":
        advantage = leave_one_out_advantage(reward)  # A_i = r_i - b_i
    elif algo == "ppo":
        advantage = reward  # DDPO: per-prompt (group-std) or batch statistics below make it a baseline
    elif algo == "loop":
        advantage = leave_one_out_advantage(reward)  # A_i = r_i - b_i, as RLOO
    advantage = normalize(advantage, normalization)
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    return advantage.flatten()  # (B, K) -> (B*K,)


def importance_ratio(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor
) -> torch.Tensor:
    """rho_t = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c)    (N,)"""
    # rho_t = exp(log pi_theta - log pi_old)
    return torch.exp(log_prob - old_log_prob)


def reinforce_objective(
    log_prob: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """log pi_theta(x_{t-1} | x_t, c) * A: its gradient is the REINFORCE estimator (N,)"""
    # J = log pi_theta * A      (grad J = grad log pi_theta * A)
    return log_prob * advantage


def clipped_objective(
    log_prob, old_log_prob, advantage, clip_range: float
) -> torch.Tensor:
    """min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)   (PPO's clipped surrogate)   (N,)"""
    ratio = importance_ratio(log_prob, old_log_prob)
    # J = min(rho_t * A, clip(rho_t, 1 - eps, 1 + eps) * A)
    return torch.minimum(
        ratio * advantage, ratio.clamp(1 - clip_range, 1 + clip_range) * advantage
    )


def policy_loss(
    algo: str, log_prob, old_log_prob, advantage, clip_range: float
) -> torch.Tensor:
    """The loss of one DDIM step, one visible branch per algorithm; we minimise -objective. (N,) -> ()"""
    if algo == "reinforce":
        # grad = sum_t grad log pi(x_{t-1} | x_t, c) * r(x_0, c)
        return -reinforce_objective(log_prob, advantage).mean()
    if algo == "rloo":
        # grad = sum_t grad log pi(x_{t-1} | x_t, c) * (r_i - b_i)
        return -reinforce_objective(log_prob, advantage).mean()
    if algo == "ppo":
        # J = min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), A from per-prompt reward statistics
        return -clipped_objective(log_prob, old_log_prob, advantage, clip_range).mean()
    if algo == "loop":
        # J = min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i), A_i = r_i - b_i
        return -clipped_objective(log_prob, old_log_prob, advantage, clip_range).mean()
    raise UsageError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)}")


def gaussian_kl(mean, ref_mean, sigma_t) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of two Gaussians with the same sigma_t, MEAN over latent dims: (N, C, h, w) -> (N,)"""
    # KL = ||mu_theta - mu_ref||^2 / (2 sigma_t^2)
    return ((mean - ref_mean) ** 2 / (2 * sigma_t**2)).mean(
        dim=tuple(range(1, mean.ndim))
    )


# ----------------------------------------------------------------------------------------------------------
# 4. Training: LoRA on the UNet, AdamW, gradient accumulation in samples, all-reduced gradients
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Models:
    """The loaded pipeline parts (a record, not a trainer)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: typing.Any
    scheduler: typing.Any
    uncond: torch.Tensor  # (1, L, D): embedding of the empty prompt
    device: torch.device
    prediction_type: str
    clip_sample: float | None
    latent_shape: tuple  # (C, h, w)
    resolution: int  # H = W = unet sample_size * vae scale factor


def load_models(
    model_path: str,
    device: torch.device,
    weight_dtype: torch.dtype,
    lora_rank: int,
    seed: int,
) -> Models:
    """Load a Stable Diffusion folder or hub id, freeze it and add LoRA (fp32) to the UNet's attention."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    local = Path(model_path).is_dir()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_path,
            torch_dtype=weight_dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local,
        )
    except (OSError, ValueError) as error:
        first_line = (
            str(error).strip().splitlines()[0]
            if str(error).strip()
            else type(error).__name__
        )
        raise UsageError(
            f"could not load --model {model_path} ({first_line}); pass a local Stable Diffusion "
            "folder, or a hub id on a machine with network access"
        ) from None
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.thresholding:
        raise UsageError(
            "the scheduler uses dynamic thresholding, which the DDIM log-prob does not model"
        )
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval().to(device)
    torch.manual_seed(seed)  # identical LoRA init on every rank
    pipe.unet.add_adapter(
        LoraConfig(
            r=lora_rank,
            lora_alpha=lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for p in lora_parameters(pipe.unet):
        p.data = (
            p.data.float()
        )  # LoRA weights and their optimizer state in fp32 (mixed precision)
    uncond = encode_prompts(
        pipe.tokenizer, pipe.text_encoder, [""]
    ).float()  # (1, L, D)
    sample_size = pipe.unet.config.sample_size
    clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    return Models(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        scheduler,
        uncond,
        device,
        scheduler.config.prediction_type,
        clip,
        (pipe.unet.config.in_channels, sample_size, sample_size),
        sample_size * pipe.vae_scale_factor,
    )


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def base_model(unet):
    """pi_ref: the same UNet with its LoRA adapter switched off (no second copy of the model)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average LoRA gradients over ranks (Deviation 6; PITFALLS #5): after this every rank steps identically."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


STAT_KEYS = ("approx_kl", "clipfrac", "ratio_mean", "grad_norm", "kl")


def train_on_rollout(
    models: Models,
    batch: Rollout,
    advantage,
    cfg: Config,
    schedule: Schedule,
    optimizer,
    rng: random.Random,
    sizes: dict,
    show: bool,
) -> dict:
    """inner_epochs passes of minibatch updates over one rollout; returns the epoch's training statistics."""
    params, stats = lora_parameters(models.unet), {key: [] for key in STAT_KEYS}
    trainable = torch.nonzero(schedule.trainable).flatten().tolist()
    n_steps = max(1, round(cfg.timestep_fraction * len(trainable)))
    n, mb, micro = len(advantage), sizes["minibatch_per_rank"], cfg.micro_batch
    bar = tqdm(
        total=cfg.inner_epochs * n // mb, desc="training", leave=False, disable=not show
    )
    for _inner in range(cfg.inner_epochs):
        for mb_start in range(0, n, mb):
            optimizer.zero_grad(set_to_none=False)
            for start in range(mb_start, mb_start + mb, micro):
                idx = slice(start, start + micro)
                for j in sorted(
                    rng.sample(trainable, n_steps)
                ):  # timestep subset per micro-batch (Deviation 3)
                    log_prob, mean = training_step_log_prob(
                        models, batch, idx, j, cfg, schedule
                    )
                    old_log_prob, adv = batch.log_probs[idx, j], advantage[idx]
                    loss = policy_loss(
                        cfg.algo, log_prob, old_log_prob, adv, cfg.clip_range
                    )
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), base_model(models.unet):
                            _, ref_mean = training_step_log_prob(
                                models, batch, idx, j, cfg, schedule
                            )
                        kl = gaussian_kl(mean, ref_mean, schedule.sigma_t[j]).mean()
                        loss = loss + cfg.kl_coef * kl  # loss = -J + beta * KL
                        stats["kl"].append(kl.item())
                    (
                        loss * micro / mb / n_steps
                    ).backward()  # mean over the minibatch's samples and steps
                    with torch.no_grad():
                        ratio = importance_ratio(log_prob, old_log_prob)
                        stats["approx_kl"].append(
                            0.5 * ((log_prob - old_log_prob) ** 2).mean().item()
                        )
                        stats["clipfrac"].append(
                            ((ratio - 1).abs() > cfg.clip_range).float().mean().item()
                        )
                        stats["ratio_mean"].append(ratio.mean().item())
            sync_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise UsageError(
                    "non-finite LoRA gradient; lower --lr or check the reward (the last checkpoint "
                    "is intact, continue with --resume)"
                )
            optimizer.step()
            stats["grad_norm"].append(grad_norm.item())
            bar.update()
    bar.close()
    return {key: (float(np.mean(v)) if v else None) for key, v in stats.items()}


def training_step_log_prob(
    models, batch: Rollout, idx: slice, j: int, cfg: Config, schedule: Schedule
):
    """Re-score the stored x_{t-1} of step j for samples idx under the current policy: log_prob (n,), mean."""
    x_t, x_prev = batch.latents[idx, j], batch.latents[idx, j + 1]  # (n, C, h, w) each
    _, log_prob, mean = policy_step(
        models.unet,
        x_t,
        j,
        batch.cond[idx],
        models.uncond,
        schedule,
        cfg.guidance_scale,
        models.prediction_type,
        models.clip_sample,
        x_prev=x_prev,
    )
    return log_prob, mean


# ----------------------------------------------------------------------------------------------------------
# 5. Evaluation on held-out prompts with fixed noise
# ----------------------------------------------------------------------------------------------------------
def evaluate(
    models: Models,
    prompts: list[str],
    cfg: Config,
    schedule: Schedule,
    reward_fn,
    show: bool,
):
    """Mean reward on held-out prompts; the noise depends only on EVAL_SEED: comparable across epochs/runs."""
    x_T, step_noise = draw_noise(
        torch.Generator().manual_seed(EVAL_SEED),
        len(prompts),
        cfg.num_steps,
        models.latent_shape,
    )
    batch, reward = rollout(
        models, prompts, x_T, step_noise, cfg, schedule, reward_fn, "evaluating", show
    )
    return reward.mean().item(), batch.images, reward


# ----------------------------------------------------------------------------------------------------------
# The run folder: config.json, metrics.jsonl, samples/, lora/, checkpoint/ (all writes atomic)
# ----------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: a kill mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_grid(
    images: torch.Tensor, captions: list[str], path: Path, ncol: int = 8
) -> Path:
    """PNG grid of (N, 3, H, W) images in [0, 1] plus a .txt with one caption per image in grid order."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / ncol)
    grid = torch.zeros(3, rows * h, min(n, ncol) * w)
    for i, img in enumerate(images):
        grid[
            :,
            (i // ncol) * h : (i // ncol + 1) * h,
            (i % ncol) * w : (i % ncol + 1) * w,
        ] = img
    array = (
        (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    )  # (3, H', W') -> (H', W', 3)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    atomic_write(
        path.with_suffix(".txt"), lambda tmp: tmp.write_text("\n".join(captions) + "\n")
    )
    return path


def before_after_grid(run: Path, first: Path, last: Path) -> Path:
    """Stack the first rows of the first and last evaluation grids: top = before training, bottom = after."""
    from PIL import Image

    top, bottom = Image.open(first), Image.open(last)
    row_h = top.height // math.ceil(
        len(first.with_suffix(".txt").read_text().splitlines()) / 8
    )
    out = Image.new("RGB", (top.width, 2 * row_h))
    out.paste(top.crop((0, 0, top.width, row_h)), (0, 0))
    out.paste(bottom.crop((0, 0, bottom.width, row_h)), (0, row_h))
    path = run / "samples" / "before_after.png"
    atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
    return path


def save_lora(unet, folder: Path) -> Path:
    """lora/pytorch_lora_weights.safetensors in diffusers' format (load_lora_weights reads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=state, safe_serialization=True
    )
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(
        tmp / "pytorch_lora_weights.safetensors",
        folder / "pytorch_lora_weights.safetensors",
    )
    tmp.rmdir()
    return folder / "pytorch_lora_weights.safetensors"


def save_checkpoint(run: Path, unet, optimizer, next_epoch: int) -> None:
    """checkpoint/state.pt: LoRA weights, optimizer, RNG states and the next epoch (PITFALLS #6)."""
    from peft.utils import get_peft_model_state_dict

    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    state = {
        "lora": get_peft_model_state_dict(unet),
        "optimizer": optimizer.state_dict(),
        "next_epoch": next_epoch,
        "rng": rng,
    }
    (run / "checkpoint").mkdir(exist_ok=True)
    atomic_write(run / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(run: Path, unet, optimizer) -> int:
    """Restore what save_checkpoint wrote; returns the epoch to continue from."""
    from peft.utils import set_peft_model_state_dict

    state = torch.load(
        run / "checkpoint" / "state.pt", weights_only=False, map_location="cpu"
    )
    set_peft_model_state_dict(unet, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["next_epoch"]


def append_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run: Path, next_epoch: int) -> None:
    """On resume, drop rows of epochs the checkpoint does not contain (a kill between metrics and checkpoint)."""
    path = run / "metrics.jsonl"
    rows = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["epoch"] < next_epoch
    ]
    atomic_write(path, lambda tmp: tmp.write_text("".join(r + "\n" for r in rows)))


# ----------------------------------------------------------------------------------------------------------
# Configuration checks, prompt files and derived sizes (everything that can fail runs before any write)
# ----------------------------------------------------------------------------------------------------------
def resolve_model_path(model: str) -> str:
    """A local folder (as given, or relative to loop.py) or a hub id 'org/name'; a missing folder is an error."""
    for candidate in (Path(model).expanduser(), HERE / model):
        if candidate.is_dir():
            if not (candidate / "model_index.json").is_file():
                raise UsageError(
                    f"--model {model}: {candidate} has no model_index.json; pass a diffusers folder"
                )
            return str(candidate)
    looks_like_hub_id = (
        model.count("/") == 1
        and not model.startswith((".", "/", "~"))
        and ":" not in model
    )
    if (
        not looks_like_hub_id
        or (HERE / model.split("/")[0]).is_dir()
        or Path(model.split("/")[0]).is_dir()
    ):
        raise UsageError(
            f"--model {model}: model folder not found; pass an existing diffusers folder or a hub id "
            "such as stabilityai/stable-diffusion-2-base"
        )
    return model


def read_prompts(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UsageError(
            f"{what} prompt file {path} not found; pass --train_prompts/--eval_prompts or --prompt_dir"
        )
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(
            f"{what} prompt file {path} is empty; write one prompt per line"
        )
    return prompts


def resolve_reward_and_prompts(
    cfg: Config, model_path: str
) -> tuple[str, list[str], list[str]]:
    """Reward name (shapes world: color -> shapes_color) and the training / held-out prompt lists."""
    shapes_world = Path(model_path, SHAPES_MARKER).is_file()
    reward = cfg.reward
    if shapes_world and f"shapes_{reward}" in rewards.REWARD_NAMES:
        reward = f"shapes_{reward}"
        print(f"shapes-world model: --reward {cfg.reward} resolves to {reward}")
    if reward not in rewards.REWARD_NAMES:
        raise UsageError(
            f"unknown --reward {cfg.reward!r}; choose one of {', '.join(rewards.REWARD_NAMES)}"
        )
    category = reward.removeprefix("shapes_")
    if cfg.train_prompts:
        train = Path(cfg.train_prompts)
    elif cfg.prompt_dir:
        train = Path(cfg.prompt_dir) / f"{category}_train.txt"
    elif shapes_world and category in CATEGORIES:
        train = HERE / "prompts" / "shapes" / f"{category}_train.txt"
    else:
        raise UsageError(
            f"no prompts for --reward {reward}; pass --train_prompts FILE or --prompt_dir DIR"
        )
    train_prompts = read_prompts(train, "training")
    if cfg.eval_prompts:
        evaluation = Path(cfg.eval_prompts)
    else:
        evaluation = train.with_name(train.name.replace("_train.txt", "_val.txt"))
    if not cfg.eval_prompts and (evaluation == train or not evaluation.is_file()):
        evaluation = (
            train  # a plain prompt file without *_val.txt: fixed training prompts
        )
        print(
            f"no held-out prompt file next to {train}: evaluating on its first prompts"
        )
    eval_prompts = read_prompts(evaluation, "held-out")[: cfg.num_eval_prompts]
    return reward, train_prompts, eval_prompts


def check_config(cfg: Config, world: int) -> dict:
    """Reject bad input with one clear line; return the derived sizes printed at start-up."""
    if cfg.algo not in ALGOS:
        raise UsageError(
            f"unknown --algo {cfg.algo!r}; choose one of {', '.join(ALGOS)}"
        )
    if cfg.algo in ("rloo", "loop") and cfg.k < 2:
        raise UsageError(
            f"--algo {cfg.algo} needs K >= 2 images per prompt for the leave-one-out baseline; "
            f"pass --k 2 or more (got {cfg.k})"
        )
    if cfg.k < 1:
        raise UsageError(f"--k {cfg.k}: need at least one image per prompt")
    if cfg.eta <= 0:
        raise UsageError(
            f"--eta {cfg.eta}: DDIM must be stochastic (eta > 0) to have a policy log-prob; "
            "pass e.g. --eta 1.0"
        )
    if cfg.normalize_advantage not in NORMALIZATIONS:
        raise UsageError(
            f"unknown --normalize_advantage {cfg.normalize_advantage!r}; one of {NORMALIZATIONS}"
        )
    if cfg.normalize_advantage == "group-std" and cfg.k < 2:
        raise UsageError("--normalize_advantage group-std needs --k >= 2; use batch")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise UsageError(
            f"unknown --mixed_precision {cfg.mixed_precision!r}; use auto, no, bf16 or fp16"
        )
    if (
        not 0 < cfg.timestep_fraction <= 1
        or cfg.epochs < 1
        or cfg.num_steps < 1
        or cfg.inner_epochs < 1
    ):
        raise UsageError(
            "need 0 < --timestep_fraction <= 1 and --epochs, --num_steps, --inner_epochs >= 1"
        )
    if cfg.images_per_epoch % (world * cfg.k):
        raise UsageError(
            f"--images_per_epoch {cfg.images_per_epoch} must be a multiple of K x ranks = "
            f"{cfg.k * world} (whole groups of K per rank)"
        )
    on_policy = cfg.algo in ("reinforce", "rloo")
    minibatch = cfg.minibatch or (
        cfg.images_per_epoch if on_policy else max(world, cfg.images_per_epoch // 4)
    )
    if on_policy and (minibatch != cfg.images_per_epoch or cfg.inner_epochs != 1):
        raise UsageError(
            f"--algo {cfg.algo} is on-policy: one update per rollout; leave --minibatch and "
            "--inner_epochs unset, or use --algo ppo/loop for several updates per rollout"
        )
    per_rank = minibatch // world
    micro = min(cfg.micro_batch, per_rank)
    if minibatch % world or cfg.images_per_epoch % minibatch or per_rank % micro:
        raise UsageError(
            f"--minibatch {minibatch} must divide --images_per_epoch {cfg.images_per_epoch}, split "
            f"evenly over {world} ranks and be a multiple of --micro_batch {micro}"
        )
    cfg.micro_batch = micro
    normalization = cfg.normalize_advantage
    if (
        normalization == "auto"
    ):  # the paper's choice: DDPO's per-prompt statistics for PPO, raw A otherwise
        normalization = (
            ("group-std" if cfg.k >= 2 else "batch") if cfg.algo == "ppo" else "off"
        )
    return {
        "world_size": world,
        "prompts_per_epoch": cfg.images_per_epoch // cfg.k,
        "images_per_epoch": cfg.images_per_epoch,
        "images_per_rank": cfg.images_per_epoch // world,
        "minibatch": minibatch,
        "minibatch_per_rank": per_rank,
        "micro_batch": micro,
        "grad_accumulation": per_rank // micro,
        "updates_per_epoch": cfg.inner_epochs * cfg.images_per_epoch // minibatch,
        "normalization": normalization,
    }


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """Rank, world size and device; torchrun sets RANK/WORLD_SIZE (gloo on CPU, nccl on GPU)."""
    rank, world = (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )
    use_cuda = cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    if cfg.device not in ("auto", "cpu", "cuda") or (
        use_cuda and not torch.cuda.is_available()
    ):
        raise UsageError(
            f"--device {cfg.device}: not available here; use cpu, cuda or auto"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", rank=rank, world_size=world
        )
    return rank, world, device


def weight_dtype_for(cfg: Config, device: torch.device) -> torch.dtype:
    choice = cfg.mixed_precision
    if choice == "auto":
        choice = (
            "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        )
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """One seed per (run seed, rank, epoch): noise and prompts never depend on earlier RNG use (exact resume)."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**62


def mean_over_ranks(value: float, device) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


# ----------------------------------------------------------------------------------------------------------
# main: seed, device, load, optimise in a loop, log, save
# ----------------------------------------------------------------------------------------------------------
def main(cfg: Config) -> Path:
    rank, world, device = setup_distributed(cfg)
    sizes = check_config(cfg, world)
    model_path = resolve_model_path(cfg.model)
    reward_name, train_prompts, eval_prompts = resolve_reward_and_prompts(
        cfg, model_path
    )
    run = Path(
        cfg.resume
        or cfg.out
        or f"runs/{cfg.algo}-{cfg.reward}-k{cfg.k}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if not cfg.resume and (run / "checkpoint").exists():
        raise UsageError(
            f"--out {run} already holds a run; continue it with --resume {run} or pick another --out"
        )
    show = rank == 0
    if show:
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        print(
            "derived:",
            json.dumps(sizes),
            f"reward={reward_name} train_prompts={len(train_prompts)} "
            f"eval_prompts={len(eval_prompts)}",
        )

    # Load: frozen pipeline (mixed precision on GPU), LoRA in fp32, the reward, the DDIM schedule.
    weight_dtype = weight_dtype_for(cfg, device)
    models = load_models(model_path, device, weight_dtype, cfg.lora_rank, cfg.seed)
    reward_fn = rewards.load_reward(reward_name, device=device)
    schedule = ddim_schedule(models.scheduler, cfg.num_steps, cfg.eta)
    if not schedule.trainable.any():
        raise UsageError(
            f"every DDIM step has sigma_t < {MIN_SIGMA} at --eta {cfg.eta}; raise --eta (e.g. 1.0)"
        )
    params = lora_parameters(models.unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)  # DDPO's decay
    if show:
        print(
            f"model={model_path} resolution={models.resolution} latent={models.latent_shape} "
            f"lora_params={sum(p.numel() for p in params)} device={device} dtype={weight_dtype} "
            f"trainable_steps={int(schedule.trainable.sum())}/{cfg.num_steps}"
        )
    if world > 1:  # every rank starts from rank 0's LoRA weights
        for p in params:
            dist.broadcast(p.data, src=0)

    # The run folder: start, or continue from the checkpoint.
    start_epoch = 0
    if cfg.resume:
        start_epoch = load_checkpoint(run, models.unet, optimizer)
        if show:
            truncate_metrics(run, start_epoch + 1)
            print(f"resumed {run} at epoch {start_epoch}")
    elif show:
        (run / "samples").mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write(
            run / "config.json",
            lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2)),
        )
        eval_mean, images, reward = evaluate(
            models, eval_prompts, cfg, schedule, reward_fn, show
        )
        save_grid(
            images,
            [f"{p} | r={r:.3f}" for p, r in zip(eval_prompts, reward.tolist())],
            run / "samples" / "eval_epoch_0000.png",
        )
        untrained = {
            "epoch": 0,
            "images_seen": 0,
            "reward_mean": None,
            "reward_std": None,
            "seconds": 0.0,
        }
        append_metrics(
            run,
            {**untrained, "eval_reward_mean": eval_mean, **dict.fromkeys(STAT_KEYS)},
        )
        save_checkpoint(
            run, models.unet, optimizer, 0
        )  # from here on the run can always be resumed
        print(f"held-out {reward_name} before training: {eval_mean:.4f}")
    if world > 1:
        dist.barrier()

    # Optimise: each epoch = one rollout of B*K images per rank + the algorithm's updates on it.
    n_rank = sizes["images_per_rank"]
    for epoch in tqdm(
        range(start_epoch, cfg.epochs), desc=f"{cfg.algo} epochs", disable=not show
    ):
        tic = time.time()
        rng = random.Random(epoch_seed(cfg.seed, rank, epoch))
        prompts = [
            p
            for p in rng.choices(train_prompts, k=n_rank // cfg.k)
            for _ in range(cfg.k)
        ]  # B*K, grouped
        x_T, step_noise = draw_noise(
            torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch)),
            n_rank,
            cfg.num_steps,
            models.latent_shape,
        )
        batch, reward = rollout(
            models, prompts, x_T, step_noise, cfg, schedule, reward_fn, "sampling", show
        )
        advantage = compute_advantages(
            cfg.algo, reward.view(-1, cfg.k), sizes["normalization"], cfg.adv_clip
        )
        stats = train_on_rollout(
            models,
            batch,
            advantage.to(device),
            cfg,
            schedule,
            optimizer,
            rng,
            sizes,
            show,
        )

        # Log, evaluate, save (rank 0 writes; the checkpoint last, so a kill never loses a logged epoch).
        reward_mean = mean_over_ranks(reward.mean().item(), device)
        reward_var = (
            mean_over_ranks((reward**2).mean().item(), device) - reward_mean**2
        )  # E[r^2] - E[r]^2
        row = {
            "epoch": epoch + 1,
            "images_seen": (epoch + 1) * cfg.images_per_epoch,
            "reward_mean": reward_mean,
            "reward_std": math.sqrt(max(0.0, reward_var)),
            "eval_reward_mean": None,
            **stats,
        }
        final = epoch + 1 == cfg.epochs
        if show:
            save_grid(
                batch.images[:16],
                [f"{p} | r={r:.3f}" for p, r in zip(prompts, reward.tolist())][:16],
                run / "samples" / f"train_epoch_{epoch + 1:04d}.png",
            )
            if (epoch + 1) % cfg.eval_every == 0 or final:
                row["eval_reward_mean"], images, eval_reward = evaluate(
                    models, eval_prompts, cfg, schedule, reward_fn, show
                )
                save_grid(
                    images,
                    [
                        f"{p} | r={r:.3f}"
                        for p, r in zip(eval_prompts, eval_reward.tolist())
                    ],
                    run / "samples" / f"eval_epoch_{epoch + 1:04d}.png",
                )
            row["seconds"] = time.time() - tic
            append_metrics(run, row)
            save_lora(models.unet, run / "lora")
            save_checkpoint(run, models.unet, optimizer, epoch + 1)
            tqdm.write(
                f"epoch {epoch + 1}: reward {row['reward_mean']:.4f} clipfrac {stats['clipfrac']:.3f} "
                f"approx_kl {stats['approx_kl']:.2e} eval {row['eval_reward_mean']}"
            )
        if world > 1:
            dist.barrier()

    if show:
        rows = [
            json.loads(line)
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        evals = [r for r in rows if r["eval_reward_mean"] is not None]
        grid = before_after_grid(
            run,
            run / "samples" / f"eval_epoch_{evals[0]['epoch']:04d}.png",
            run / "samples" / f"eval_epoch_{evals[-1]['epoch']:04d}.png",
        )
        print(
            f"held-out {reward_name}: before {evals[0]['eval_reward_mean']:.4f} -> after "
            f"{evals[-1]['eval_reward_mean']:.4f}  (epoch {evals[-1]['epoch']})"
        )
        print(f"before/after grid: {grid}")
        print(f"LoRA: {run / 'lora' / 'pytorch_lora_weights.safetensors'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return run


# ----------------------------------------------------------------------------------------------------------
# Command line (fire): every Config field is a --flag
# ----------------------------------------------------------------------------------------------------------
def config_from_flags(flags: dict) -> Config:
    """Build a Config from --flags (type-checked); with --resume, start from the run's config.json."""
    hints = typing.get_type_hints(Config)
    if flags.pop("help", None) or flags.pop("h", None):
        print(cli.__doc__)
        sys.exit(0)
    unknown = sorted(set(flags) - set(hints))
    if unknown:
        raise UsageError(
            f"unknown flag(s) {', '.join('--' + u for u in unknown)}; see python loop.py --help"
        )
    values = {}
    if flags.get("resume"):
        saved = Path(flags["resume"]) / "config.json"
        if (
            not saved.is_file()
            or not (Path(flags["resume"]) / "checkpoint" / "state.pt").is_file()
        ):
            raise UsageError(
                f"--resume {flags['resume']}: no config.json and checkpoint/ there; pass a run folder"
            )
        values = json.loads(saved.read_text())
    for name, value in flags.items():
        kind = hints[name]
        try:
            values[name] = kind(value) if kind in (int, float) else str(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} {value!r}: expected {kind.__name__}") from None
        if kind is int and float(value) != int(value):
            raise UsageError(f"--{name} {value!r}: expected an integer")
    return Config(**values)


def cli(**flags) -> None:
    try:
        main(config_from_flags(flags))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


cli.__doc__ = "Flags (python loop.py --flag value):\n" + "\n".join(
    f"  --{f.name} (default {f.default!r}): {f.metadata['doc']}"
    for f in dataclasses.fields(Config)
)

if __name__ == "__main__":
    import fire

    fire.Fire(cli)
