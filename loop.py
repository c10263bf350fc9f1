"""LOOP, leave-one-out PPO for RL fine-tuning of text-to-image diffusion: the method in one file.

S. Gupta et al., "A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion
Fine-tuning", arXiv:2503.00897. Four estimators, named as on the command line: reinforce, rloo
(REINFORCE with a leave-one-out baseline), ppo (DDPO's clipped ratio) and loop (PPO's clipped
objective with RLOO's leave-one-out advantage). Read top to bottom: Config; 1. the DDIM policy;
2. K-sample rollouts; 3. the estimators; 4. training; 5. evaluation; the loop; the command line.
    python loop.py --algo loop --k 4 --reward color    # CPU, the embedded shapes-world model
    (Stable Diffusion 2 on GPUs, torchrun for several: README "Stable Diffusion on GPUs")

Deviations from the paper (their reasons and measurements: README "Implementation details"):
 1. log pi is the mean over the C*h*w latent dims (as DDPO's code), not the sum: eps is in its units.
 2. Steps with sigma_t < MIN_SIGMA have no density (log-prob stored as 0) and are never trained on.
 3. --timestep_fraction draws steps per micro-batch, not per sample (re-scoring = sampling's batches).
 4. PPO's per-prompt statistics use this rollout's K images, not a buffer across epochs (exact resume).
 5. LoRA on the UNet's attention projections (as DDPO), not full fine-tuning.
 6. Several GPUs: LoRA gradients all-reduced explicitly, not by DDP; advantages from all ranks' rewards.
 7. Prompts are drawn with replacement each epoch (the paper does not say).
 8. Defaults fit the embedded model on 2 CPU cores: T = 6, w = 5, 64 images a rollout, 2 updates.
 9. Optional KL penalty to the base model (--kl_coef, 0 as the paper); non-finite values stop the run.
10. Steps with sigma_t < --min_train_sigma are sampled, not trained on (0.5: the first 3 of 6).
11. The held-out score and the saved LoRA use a per-epoch EMA of the LoRA weights (--ema_decay 0.9).
12. --adv_clip clips A to its batch mean +- 5 std (DDPO's 5, in the units it was meant in).
13. The loss is a mean over the trained steps (as DDPO's code), not the paper's sum over t.
Notation: B prompts, K images per prompt (k), T steps (num_steps), N = B*K images on a rank;
x_t latents[:, j]; c cond; log pi_theta log_prob; log pi_old old_log_prob; r(x_0, c) reward;
b_i baseline; A_i advantage; rho_t ratio; eps clip_range; w guidance_scale; (C, h, w) a latent.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import loop_utils  # the plumbing (flags, run folder, ranks): never needed to read the method

ALGOS = ("reinforce", "rloo", "ppo", "loop")
MIN_SIGMA = 1e-4  # steps with sigma_t below this are (almost) deterministic: Deviation 2
EVAL_SEED = 1234  # held-out noise: the same for every epoch, run and algorithm
STAT_KEYS = ("approx_kl", "clipfrac", "ratio_mean", "grad_norm", "kl")
UPDATE_KEYS = ("clipfrac_by_update", "zeroed_by_update", "log_ratio_mean_by_update",
               "log_ratio_rms_by_update")  # fmt: skip
RATIO_TOLERANCE = 1e-6  # a fresh rollout's max |log rho_t| above this is worth a look (GPU)


# === Config: every knob in one place. Annotated: the values a flag may take (checked as it is used)
@dataclass
class Config:
    algo: Annotated[str, ALGOS] = "loop"
    """the estimator"""
    k: Annotated[int, "[1, inf)"] = 4
    """K, images sampled per prompt (>= 2 for rloo and loop)"""
    reward: str = "color"
    """r(x_0, c): a name in rewards.REWARD_NAMES (shapes-world model: color -> shapes_color)"""
    reward_options: str = ""
    """JSON of rewards.load_reward options, e.g. '{"model": "/data/blip"}' (training and held-out)"""
    model: str = "shapes_world/tiny-shapes"
    """local diffusers folder (else next to loop.py) or a hub id; --reward texture: its -texture twin"""
    train_prompts: str = ""
    """training prompt file, one per line (default: from the model, reward or --prompt_dir)"""
    eval_prompts: str = ""
    """held-out prompt file (default: the *_val.txt next to the training file)"""
    prompt_dir: str = ""
    """folder with T2I-CompBench's <category>_train.txt and <category>_val.txt"""
    num_eval_prompts: Annotated[int, "[1, inf)"] = 64
    """held-out prompts scored at each evaluation (the file's first ones)"""
    eval_images_per_prompt: Annotated[int, "[1, inf)"] = 2
    """fixed-noise images per held-out prompt (more: a less noisy held-out score)"""
    lr: Annotated[float, "(0, inf)"] = 4e-3
    """AdamW learning rate of the LoRA weights"""
    lora_rank: Annotated[int, "[1, inf)"] = 8
    """LoRA rank r (alpha = r)"""
    lora_modules: str = "to_k,to_q,to_v,to_out.0"
    """comma-separated UNet module names that get LoRA (attn2.to_k: cross-attention only)"""
    epochs: Annotated[int, "[1, inf)"] = 48
    """epochs; one epoch = one rollout of images_per_epoch images and its updates"""
    images_per_epoch: Annotated[int, "[1, inf)"] = 64
    """B*K*ranks, images per rollout (fixed for equal-budget comparisons)"""
    num_steps: Annotated[int, "[1, inf)"] = 6
    """T, DDIM steps per image"""
    eta: Annotated[float, "(0, 1]"] = 1.0
    """eta, DDIM stochasticity (> 0: the policy must be stochastic; 1 = DDPM's)"""
    guidance_scale: Annotated[float, "[0, inf)"] = 5.0
    """w, classifier-free guidance scale (<= 1: no guidance, one UNet pass per step)"""
    clip_range: Annotated[float, "(0, 1)"] = 1e-4
    """eps, PPO clip range on rho_t (for mean-reduced log-probs, Deviation 1)"""
    adv_clip: Annotated[float, "[0, inf)"] = 5.0
    """advantage clip in units of the batch's std (0 = off; DDPO's 5; Deviation 12)"""
    normalize_advantage: Annotated[str, ("auto", "off", "batch", "group-std")] = "auto"
    """group-std: per prompt (GRPO-style); auto = the paper's choice per algorithm"""
    inner_epochs: Annotated[int, "[1, inf)"] = 1
    """passes over each rollout (reinforce/rloo: > 1 update reuses stale samples)"""
    minibatch: Annotated[int, "[0, inf)"] = 0
    """samples per optimizer step, all ranks (0: rollout if reinforce/rloo, else half)"""
    micro_batch: Annotated[int, "[1, inf)"] = 32
    """samples per forward/backward on a rank (gradient accumulation, in samples)"""
    min_train_sigma: Annotated[float, "[0, inf)"] = 0.5
    """steps with sigma_t below this are sampled but not trained on (Deviation 10)"""
    ema_decay: Annotated[float, "[0, 1)"] = 0.9
    """per-epoch EMA of the LoRA weights, evaluated, saved (0: the last; Deviation 11)"""
    timestep_fraction: Annotated[float, "(0, 1]"] = 1.0
    """fraction of the trained steps used, drawn per micro-batch (Deviation 3)"""
    kl_coef: Annotated[float, "[0, inf)"] = 0.0
    """beta, KL penalty to the base model (LoRA adapter switched off; 0 = the paper)"""
    max_grad_norm: Annotated[float, "(0, inf]"] = 1.0
    """gradient-norm clip (inf: none)"""
    gradient_checkpointing: bool = False
    """recompute the UNet's activations in backward: less memory, the same update, more time"""
    eval_every: Annotated[int, "[1, inf)"] = 24
    """score the held-out prompts every this many epochs (and first and last)"""
    eval_raw: bool = False
    """also score the raw (not averaged) LoRA weights at each evaluation: eval_raw_reward_mean"""
    seed: Annotated[int, "[0, 9223372036854775807]"] = 0
    """seed of the LoRA init, the prompts and the sampling noise (torch's 64-bit range)"""
    out: str = ""
    """run folder (default runs/<algo>-<reward>-k<K>-<time>)"""
    resume: str = ""
    """run folder to continue; may change only --epochs --eval_every --eval_raw --micro_batch --device"""
    mixed_precision: Annotated[str, ("auto", "no", "bf16", "fp16")] = "auto"
    """frozen weights' dtype (fp16: loss-scaled; auto: bf16 on GPUs of compute >= 8.0, else no)"""
    device: Annotated[str, ("auto", "cpu", "cuda")] = "auto"
    """where to train"""


# === 1. The denoising MDP: a DDIM step with eta > 0 is a Gaussian policy pi_theta(x_{t-1} | x_t, c)
@dataclass
class Schedule:
    """The T DDIM steps in sampling order; every field has shape (T,)."""

    timesteps: torch.Tensor  # t, integer training timesteps, high -> low
    alpha_bar_t: torch.Tensor  # alpha_bar at t
    alpha_bar_prev: torch.Tensor  # alpha_bar at the timestep DDIM jumps to
    sigma_t: torch.Tensor  # DDIM std of x_{t-1}
    trainable: torch.Tensor  # bool: sigma_t >= MIN_SIGMA


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float) -> torch.Tensor:
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)  (DDIM eq. 16)"""
    # sigma_t^2 / eta^2 = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    return eta * variance**0.5


def ddim_schedule(scheduler, num_steps: int, eta: float) -> Schedule:
    """Timesteps and alpha_bars as diffusers' DDIMScheduler.step picks them (prev = t - 1000/T)."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.clone()  # (T,)
    prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    alphas, final = (scheduler.alphas_cumprod.float(), scheduler.final_alpha_cumprod.float())
    alpha_bar_t = alphas[timesteps]
    alpha_bar_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    sigma_t = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    return Schedule(timesteps, alpha_bar_t, alpha_bar_prev, sigma_t, sigma_t >= MIN_SIGMA)


def predicted_x0_and_eps(model_output, x_t, alpha_bar_t, prediction_type: str, clip=None):
    """x0_hat and eps_hat from the network's output; all (N, C, h, w)."""
    if prediction_type == "epsilon":
        eps_hat = model_output
        # x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
        x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps_hat) / alpha_bar_t**0.5
    elif prediction_type == "v_prediction":
        # x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v;   eps_hat = sqrt(a_t) v + sqrt(1 - a_t) x_t
        x0_hat = alpha_bar_t**0.5 * x_t - (1 - alpha_bar_t) ** 0.5 * model_output
        eps_hat = alpha_bar_t**0.5 * model_output + (1 - alpha_bar_t) ** 0.5 * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: use an epsilon or v model")
    if clip is not None:  # the scheduler's clip_sample (off for Stable Diffusion)
        x0_hat = x0_hat.clamp(-clip, clip)
    return x0_hat, eps_hat


def ddim_mean(x0_hat, eps_hat, alpha_bar_prev, sigma_t) -> torch.Tensor:
    """mu_theta(x_t, c) = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat  (N, C, h, w)"""
    # mu = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat
    return alpha_bar_prev**0.5 * x0_hat + (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps_hat


def gaussian_log_prob(x_prev, mean, sigma_t) -> torch.Tensor:
    """log pi(x_{t-1} | x_t, c), MEAN over latent dims (Deviation 1): (N, C, h, w) -> (N,) fp32"""
    x_prev, mean = x_prev.float(), mean.float()
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float32)
    # log N(x; mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)
    log_density = -((x_prev - mean) ** 2) / (2 * sigma_t**2) - torch.log(sigma_t)
    log_density = log_density - math.log(math.sqrt(2 * math.pi))
    return log_density.mean(dim=tuple(range(1, x_prev.ndim)))


def ddim_step(model_output, x_t, alpha_bar_t, alpha_bar_prev, sigma_t, prediction_type: str, *,
              x_prev=None, noise=None, clip=None):  # fmt: skip
    """Sample x_{t-1} (x_prev=None; equals DDIMScheduler.step with variance_noise=noise) or
    score the given x_prev. Returns x_prev (N, C, h, w), log_prob (N,) or None when
    sigma_t < MIN_SIGMA, and the mean (N, C, h, w)."""
    x0_hat, eps_hat = predicted_x0_and_eps(model_output, x_t, alpha_bar_t, prediction_type, clip)
    mean = ddim_mean(x0_hat, eps_hat, alpha_bar_prev, sigma_t)
    if x_prev is None:
        # x_{t-1} = mu + sigma_t z,  z ~ N(0, I)
        x_prev = mean + sigma_t * noise
    trainable = sigma_t >= MIN_SIGMA
    return x_prev, gaussian_log_prob(x_prev, mean, sigma_t) if trainable else None, mean


# === 2. K-sample rollouts: B prompts x K images, CFG batched, trajectories stored in fp32
@dataclass
class Policy:
    """pi_theta: the UNet (with LoRA) and everything one DDIM step needs besides x_t and c."""

    unet: torch.nn.Module
    uncond: torch.Tensor  # (1, L, D): embedding of the empty prompt
    schedule: Schedule
    guidance_scale: float  # w
    prediction_type: str  # epsilon | v_prediction
    clip: float | None  # the scheduler's clip_sample_range, or None


@dataclass
class Rollout:
    """A batch of trajectories (fp32, on the training device; the images on the CPU)."""

    latents: torch.Tensor  # (N, T+1, C, h, w): x_T .. x_0
    log_probs: torch.Tensor  # (N, T): log pi_old(x_{t-1} | x_t, c); 0 at untrained steps
    cond: torch.Tensor  # (N, L, D): prompt embeddings c
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], on the CPU


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP embeddings as StableDiffusionPipeline.encode_prompt: N prompts -> (N, L, D)."""
    length = tokenizer.model_max_length
    ids = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def guided_noise_prediction(unet, x_t, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in one batched UNet call: (N, C, h, w) -> (N, C, h, w)"""
    if guidance_scale <= 1:  # as diffusers: no guidance, eps_hat = eps(x_t, c), half the cost
        return unet(x_t.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
    latent_in = torch.cat([x_t, x_t]).to(unet.dtype)  # (2N, C, h, w)
    uncond = uncond.expand(len(cond), -1, -1)  # (1, L, D) -> (N, L, D)
    embeds = torch.cat([uncond, cond]).to(unet.dtype)  # (2N, L, D)
    out = unet(latent_in, t, encoder_hidden_states=embeds).sample.float()
    eps_uncond, eps_cond = out.chunk(2)  # (2N, ...) -> 2 x (N, ...)
    # eps_hat = eps(x_t, "") + w (eps(x_t, c) - eps(x_t, ""))
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def policy_step(policy: Policy, x_t, j: int, cond, *, x_prev=None, noise=None):
    """pi_theta at DDIM step j: the one code path of sampling and re-scoring (ratio 1)."""
    s, w = policy.schedule, policy.guidance_scale
    model_output = guided_noise_prediction(policy.unet, x_t, s.timesteps[j], cond, policy.uncond, w)
    step = (s.alpha_bar_t[j], s.alpha_bar_prev[j], s.sigma_t[j], policy.prediction_type)
    return ddim_step(model_output, x_t, *step, x_prev=x_prev, noise=noise, clip=policy.clip)


def draw_noise(generator: torch.Generator, n: int, num_steps: int, latent_shape: tuple):
    """x_T (n, C, h, w) and step noise z (n, T, C, h, w), on CPU, in diffusers' draw order."""
    x_T = torch.randn((n, *latent_shape), generator=generator)
    steps = [torch.randn((n, *latent_shape), generator=generator) for _ in range(num_steps)]
    return x_T, torch.stack(steps, dim=1)


@torch.no_grad()
def sample_trajectories(policy: Policy, cond, x_T, step_noise):
    """Run the T-step policy from x_T: latents (N, T+1, C, h, w), log-probs (N, T), fp32."""
    x_t = x_T.float()
    latents, log_probs = [x_t], []
    for j in range(len(policy.schedule.timesteps)):
        z = step_noise[:, j].to(x_t.device)
        x_t, log_prob, _ = policy_step(policy, x_t, j, cond, noise=z)
        latents.append(x_t)
        log_probs.append(torch.zeros(len(x_t), device=x_t.device) if log_prob is None else log_prob)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_images(vae, x_0) -> torch.Tensor:
    """VAE decode as the pipeline does: (N, C, h, w) latents -> (N, 3, H, W) in [0, 1]."""
    images = vae.decode((x_0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def score_images(reward_fn, images, prompts: list[str]) -> torch.Tensor:
    """r(x_0, c): (N,) fp32 on CPU."""
    return torch.as_tensor(reward_fn(images, prompts)).float().flatten().cpu()


def rollout(
    models, policy, prompts, x_T, step_noise, reward_fn, micro_batch, show=False, desc="sampling"
):
    """N trajectories (a Rollout) and rewards (N,), in the micro-batches training re-scores."""
    parts, scores = [], []
    for start in tqdm(range(0, len(prompts), micro_batch), desc, leave=False, disable=not show):
        rows, chunk = slice(start, start + micro_batch), prompts[start : start + micro_batch]
        cond = encode_prompts(models.tokenizer, models.text_encoder, chunk).float()  # (n, L, D)
        x_T_rows = x_T[rows].to(models.device)
        latents, log_probs = sample_trajectories(policy, cond, x_T_rows, step_noise[rows])
        images = decode_images(models.vae, latents[:, -1])  # (n, 3, H, W)
        scores.append(score_images(reward_fn, images, chunk))
        parts.append((latents, log_probs, cond, images.cpu()))  # training needs no image
    return Rollout(*(torch.cat(field) for field in zip(*parts))), torch.cat(scores)


# === 3. The four estimators: advantages, importance ratio, objectives
def leave_one_out_baseline(reward: torch.Tensor) -> torch.Tensor:
    """b_i = 1/(K-1) sum_{j != i} r_j, per prompt: reward (B, K) -> baseline (B, K)"""
    k = reward.shape[1]
    # b_i = (sum_j r_j - r_i) / (K - 1)
    return (reward.sum(dim=1, keepdim=True) - reward) / (k - 1)


def leave_one_out_advantage(reward: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - b_i (RLOO, LOOP): (B, K) -> (B, K); sums to zero over each prompt's K."""
    # A_i = r_i - 1/(K-1) sum_{j != i} r_j
    return reward - leave_one_out_baseline(reward)


def normalize(advantage: torch.Tensor, how: str) -> torch.Tensor:
    """(A - mean) / std over the batch or each prompt's K (group-std); 0 where std == 0: (B, K)"""
    if how == "off":
        return advantage
    if how == "batch":  # DDPO without per-prompt tracking
        mean, std = advantage.mean(), advantage.std(unbiased=False)
    else:  # group-std: DDPO's per-prompt statistics, GRPO's group normalisation
        mean = advantage.mean(dim=1, keepdim=True)
        std = advantage.std(dim=1, keepdim=True, unbiased=False)
    # A <- (A - mean) / std
    normalized = (advantage - mean) / std.clamp(min=1e-6)
    return torch.where(std > 1e-6, normalized, torch.zeros_like(advantage))


def clip_in_std_units(advantage, adv_clip: float, mean, std) -> tuple[torch.Tensor, float]:
    """A clipped to mean +- c std (DDPO's clip, in the units it was meant in), and the fraction
    clipped: (B, K) -> (B, K), float"""
    low, high = mean - adv_clip * std, mean + adv_clip * std
    fraction = ((advantage < low) | (advantage > high)).float().mean().item()
    # A <- clip(A, mean - c std, mean + c std)
    return advantage.clamp(low, high), fraction


def compute_advantages(
    algo: str, reward, normalization: str, adv_clip: float, stats: dict | None = None
) -> torch.Tensor:
    """A for each image, one visible branch per algorithm: reward (B, K) -> advantage (B*K,).
    normalization "auto" is the paper's choice; stats, if given, gets adv_clipfrac."""
    if algo == "reinforce":
        advantage, paper = reward, "off"  # A = r(x_0, c): no baseline
    elif algo == "rloo":
        advantage, paper = leave_one_out_advantage(reward), "off"  # A_i = r_i - b_i
    elif algo == "ppo":  # DDPO: per-prompt (K > 1) or batch statistics act as the baseline
        advantage, paper = reward, "group-std" if reward.shape[1] > 1 else "batch"
    elif algo == "loop":
        advantage, paper = leave_one_out_advantage(reward), "off"  # A_i = r_i - b_i, as in RLOO
    else:
        raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    how = paper if normalization == "auto" else normalization
    advantage = normalize(advantage, how)
    fraction = 0.0
    if adv_clip > 0 and how == "off":  # raw A: in units of the batch's std (Deviation 12)
        mean = advantage.mean()
        std = ((advantage - mean) ** 2).mean().sqrt()
        advantage, fraction = clip_in_std_units(advantage, adv_clip, mean, std)
    elif adv_clip > 0:  # normalised A is in std units already: DDPO's [-c, c]
        advantage, fraction = clip_in_std_units(advantage, adv_clip, 0.0, 1.0)
    if stats is not None:
        stats["adv_clipfrac"] = fraction
    return advantage.flatten()  # (B, K) -> (B*K,)


def importance_ratio(log_prob, old_log_prob) -> torch.Tensor:
    """rho_t = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c)   (N,)"""
    # rho_t = exp(log pi_theta - log pi_old)
    return torch.exp(log_prob - old_log_prob)


def reinforce_objective(log_prob, advantage) -> torch.Tensor:
    """log pi_theta(x_{t-1} | x_t, c) A, whose gradient is the REINFORCE estimator   (N,)"""
    # J = log pi_theta A    (grad J = grad log pi_theta A)
    return log_prob * advantage


def clipped_objective(log_prob, old_log_prob, advantage, clip_range: float) -> torch.Tensor:
    """min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), PPO's clipped surrogate   (N,)"""
    ratio = importance_ratio(log_prob, old_log_prob)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    # J = min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)
    return torch.minimum(ratio * advantage, clipped * advantage)


def policy_loss(algo: str, log_prob, old_log_prob, advantage, clip_range: float):
    """Loss of one DDIM step; we minimise -J. REINFORCE and RLOO differ only in their advantage A
    (compute_advantages), as PPO and LOOP do: the objective is shared pairwise.  (N,) -> ()"""
    if algo in ("reinforce", "rloo"):
        # grad J = sum_t grad log pi(x_{t-1} | x_t, c) A,   A = r (REINFORCE) or r_i - b_i (RLOO)
        return -reinforce_objective(log_prob, advantage).mean()
    if algo in ("ppo", "loop"):
        # J = min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A),   A normalised (PPO) or r_i - b_i (LOOP)
        return -clipped_objective(log_prob, old_log_prob, advantage, clip_range).mean()
    raise ValueError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")


def gaussian_kl(mean, ref_mean, sigma_t) -> torch.Tensor:
    """KL(pi_theta || pi_ref) for equal sigma_t, MEAN over latent dims: (N, C, h, w) -> (N,)"""
    # KL = (mu_theta - mu_ref)^2 / (2 sigma_t^2)
    kl = (mean - ref_mean) ** 2 / (2 * sigma_t**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))


# === 4. Training: LoRA on the UNet, AdamW, gradient accumulation in samples, all-reduced gradients
@dataclass
class Models:
    """The loaded pipeline parts (a record, not a trainer)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: typing.Any
    scheduler: typing.Any  # a DDIMScheduler with the model's config
    uncond: torch.Tensor  # (1, L, D)
    device: torch.device
    latent_shape: tuple  # (C, h, w)
    resolution: int  # H = W = unet sample_size * VAE scale factor


def load_models(model: str, device, weight_dtype, lora_rank: int, seed: int,
                lora_modules=Config.lora_modules, gradient_checkpointing=False) -> Models:  # fmt: skip
    """Load a Stable Diffusion folder or hub id, freeze it, add fp32 LoRA to the attention."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    # fp32 is from_pretrained's default; its keyword is `dtype` from diffusers 0.40 on
    options = loop_utils.dtype_option(weight_dtype) if weight_dtype != torch.float32 else {}
    options["local_files_only"] = Path(model).is_dir()  # a folder never touches the network
    try:  # the same loader for a folder and a hub id
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False, **options
        )
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise loop_utils.UsageError(
            f"could not load --model {model} ({reason}); pass a local Stable "
            "Diffusion folder, or a hub id on a machine online"
        ) from None
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.thresholding:
        raise loop_utils.UsageError(
            "the scheduler uses dynamic thresholding, which DDIM's log-prob lacks"
        )
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval().to(device)
    torch.manual_seed(seed)  # the same LoRA init on every rank
    target = lora_modules.split(",")
    lora = LoraConfig(
        r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=target
    )
    try:
        pipe.unet.add_adapter(lora)
    except ValueError as error:  # peft: none of the target modules exists in this UNet
        raise loop_utils.UsageError(f"--lora_modules {lora_modules}: {error}") from None
    if gradient_checkpointing:  # activations recomputed in backward instead of kept
        pipe.unet.enable_gradient_checkpointing()
    for p in lora_parameters(pipe.unet):  # LoRA and its optimizer state in fp32
        p.data = p.data.float()
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).float()  # (1, L, D)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, uncond, device)
    return Models(*parts, (channels, size, size), size * pipe.vae_scale_factor)


def make_policy(models: Models, num_steps: int, eta: float, guidance_scale: float) -> Policy:
    """pi_theta: T = num_steps DDIM steps with stochasticity eta and guidance scale w."""
    schedule = ddim_schedule(models.scheduler, num_steps, eta)
    config = models.scheduler.config
    clip = config.clip_sample_range if config.clip_sample else None
    return Policy(
        models.unet, models.uncond, schedule, guidance_scale, config.prediction_type, clip
    )


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def base_model(unet):
    """pi_ref: the same UNet with its LoRA adapter switched off (no second copy)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def update_ema(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    """Once per epoch (Deviation 11)."""
    with torch.no_grad():
        for average, p in zip(ema, params):
            # theta_ema <- decay theta_ema + (1 - decay) theta
            average.lerp_(p.detach(), 1 - decay)


@contextlib.contextmanager
def swapped_in(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Inside the block the LoRA weights hold `values` (the EMA); afterwards their own again."""
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, own):
                p.copy_(v)


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average LoRA gradients over ranks (Deviation 6): every rank takes the same step."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def trained_steps(schedule: Schedule, min_train_sigma: float) -> list[int]:
    """Steps j the updates train on: with a density (Deviation 2), sigma_t >= min (Deviation 10)."""
    keep = schedule.trainable & (schedule.sigma_t >= min_train_sigma)
    return torch.nonzero(keep).flatten().tolist()


def rescore(policy: Policy, batch: Rollout, rows: slice, j: int):
    """log pi_theta of the stored x_{t-1} at step j for samples `rows`: (n,), and the mean."""
    x_t, x_prev = batch.latents[rows, j], batch.latents[rows, j + 1]  # (n, C, h, w) each
    _, log_prob, mean = policy_step(policy, x_t, j, batch.cond[rows], x_prev=x_prev)
    return log_prob, mean


def train_on_rollout(policy: Policy, batch: Rollout, advantage, cfg: Config, optimizer, rng,
                     sizes: dict, show=False, scaler=None) -> dict:  # fmt: skip
    """inner_epochs passes of minibatch updates over one rollout; returns mean statistics, and per
    optimizer step (*_by_update) the shares of terms outside the clip range and zeroed by it and
    log rho's mean and rms. scaler: fp16's loss scaler (without one, fp16 gradients underflow)."""
    params, stats = lora_parameters(policy.unet), {key: [] for key in STAT_KEYS}
    by_update = {key: [] for key in UPDATE_KEYS}
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    trainable, eps = trained_steps(policy.schedule, cfg.min_train_sigma), cfg.clip_range
    n_steps = max(1, round(cfg.timestep_fraction * len(trainable)))
    n, mb, micro = len(advantage), sizes["minibatch_per_rank"], sizes["micro_batch"]
    # one optimizer step per minibatch of mb samples (micro at a time), inner_epochs passes
    minibatches = [range(first, first + mb, micro) for first in range(0, n, mb)] * cfg.inner_epochs
    for micro_starts in tqdm(minibatches, "training", leave=False, disable=not show):
        optimizer.zero_grad()
        terms = {key: [] for key in UPDATE_KEYS}  # one value per (micro-batch, step)
        for start in micro_starts:
            rows = slice(start, start + micro)
            for j in sorted(rng.sample(trainable, n_steps)):  # per micro-batch: Deviation 3
                log_prob, mean = rescore(policy, batch, rows, j)
                old_log_prob, adv = batch.log_probs[rows, j], advantage[rows]
                loss = policy_loss(cfg.algo, log_prob, old_log_prob, adv, eps)
                if cfg.kl_coef > 0:
                    with torch.no_grad(), base_model(policy.unet):
                        ref_mean = rescore(policy, batch, rows, j)[1]
                    kl = gaussian_kl(mean, ref_mean, policy.schedule.sigma_t[j]).mean()
                    loss = loss + cfg.kl_coef * kl  # loss = -J + beta KL
                    stats["kl"].append(kl.item())
                # the minibatch loss is a mean over its samples and steps
                scaler.scale(loss * micro / mb / n_steps).backward()
                with torch.no_grad():
                    ratio = importance_ratio(log_prob, old_log_prob)
                    log_ratio, outside = (log_prob - old_log_prob), (ratio - 1).abs() > eps
                    # min() keeps the clipped side, whose gradient is 0, where A > 0 and rho > 1 + eps
                    # or A < 0 and rho < 1 - eps (PPO, LOOP; REINFORCE and RLOO clip nothing)
                    zeroed = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
                    zeroed = zeroed & (cfg.algo in ("ppo", "loop"))
                    stats["approx_kl"].append(0.5 * (ratio.log() ** 2).mean().item())
                    stats["clipfrac"].append(outside.float().mean().item())
                    stats["ratio_mean"].append(ratio.mean().item())
                    terms["clipfrac_by_update"].append(outside.float().mean().item())
                    terms["zeroed_by_update"].append(zeroed.float().mean().item())
                    terms["log_ratio_mean_by_update"].append(log_ratio.mean().item())
                    terms["log_ratio_rms_by_update"].append((log_ratio**2).mean().item())
        for key, values in terms.items():
            by_update[key].append(float(np.mean(values)))
        sync_gradients(params)
        scaler.unscale_(optimizer)  # fp16: true units before the clip (a no-op otherwise)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm) and not scaler.is_enabled():
            raise loop_utils.NonFinite(
                "the LoRA gradient", optimizer.state != {}
            )  # (state: updated)
        scaler.step(optimizer)  # fp16: skipped (and the scale halved) when it overflowed
        scaler.update()
        if torch.isfinite(grad_norm):
            stats["grad_norm"].append(grad_norm.item())
    by_update["log_ratio_rms_by_update"] = [
        math.sqrt(v) for v in by_update["log_ratio_rms_by_update"]
    ]
    return {key: float(np.mean(v)) if v else None for key, v in stats.items()} | by_update


def check_first_ratio(models: Models, policy: Policy, prompts, steps: list[int], show=False):
    """max |log rho_t| of a fresh micro-batch re-scored as training does (with grad): exactly 0 on
    the CPU. A GPU may pick other kernels with grad than without; every update's first ratio then
    starts that far from 1 (main stops the run if that is near eps)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    T = len(policy.schedule.timesteps)
    x_T, step_noise = draw_noise(generator, len(prompts), T, models.latent_shape)
    cond = encode_prompts(models.tokenizer, models.text_encoder, prompts).float()  # (n, L, D)
    latents, log_probs = sample_trajectories(policy, cond, x_T.to(models.device), step_noise)
    loop_utils.check_finite(prompts, torch.zeros(len(prompts)), latents, log_probs)
    batch = Rollout(latents, log_probs, cond, torch.zeros(0))
    # log rho_t = log pi_theta(x_{t-1} | x_t, c) - log pi_old(x_{t-1} | x_t, c)
    log_ratios = [
        rescore(policy, batch, slice(None), j)[0].detach() - log_probs[:, j] for j in steps
    ]
    worst = max(r.abs().max().item() for r in log_ratios)
    if show:
        print(f"first importance ratio: max |log rho_t| = {worst:.2e} ({len(prompts)} samples)")
    if worst > RATIO_TOLERANCE:  # sampling and re-scoring ran different kernels
        far = f"max |log rho_t| = {worst:.2e} > {RATIO_TOLERANCE}; so is every update's first"
        print(f"warning: re-scoring a fresh rollout gives {far}", file=sys.stderr)
    return worst


# === 5. Evaluation: held-out prompts, fixed noise
def evaluate(models: Models, policy: Policy, prompts, reward_fn, micro_batch: int, show=False):
    """Held-out rewards (E,) and images (E, 3, H, W), on every rank; noise from EVAL_SEED: comparable
    across runs and epochs. Each rank scores every world-th micro-batch, so the micro-batches and
    scores are those of one process."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    T = len(policy.schedule.timesteps)
    x_T, step_noise = draw_noise(generator, len(prompts), T, models.latent_shape)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    starts = range(0, len(prompts), micro_batch)[rank::world]
    mine = [i for start in starts for i in range(start, min(start + micro_batch, len(prompts)))]
    reward, images = torch.zeros(0), torch.zeros(0, 3, models.resolution, models.resolution)
    latents = torch.zeros(0)
    if mine:
        batch, reward = rollout(models, policy, [prompts[i] for i in mine], x_T[mine],
                                step_noise[mine], reward_fn, micro_batch, show, "evaluating")  # fmt: skip
        images, latents = batch.images, batch.latents
    loop_utils.check_finite([prompts[i] for i in mine], reward, latents)  # on every rank
    if world > 1:  # every rank gets every (rows, rewards, images)
        shards = [None] * world
        dist.all_gather_object(shards, (mine, reward, images))
        mine = [i for rows, _, _ in shards for i in rows]
        reward, images = (torch.cat([shard[f] for shard in shards]) for f in (1, 2))
    order = torch.argsort(torch.tensor(mine))  # back to the prompts' order
    return reward[order], images[order]


def held_out_row(models, policy, params, ema, prompts, reward_fn, micro, eval_raw, show=False):
    """The metrics row's held-out fields (the EMA weights' score; with eval_raw, the raw weights'
    too), the rewards and the images."""
    tic, row = time.time(), {}
    if eval_raw:  # the weights trained on, before the EMA is swapped in
        row["eval_raw_reward_mean"] = (
            evaluate(models, policy, prompts, reward_fn, micro)[0].mean().item()
        )
    with swapped_in(params, ema):
        reward, images = evaluate(models, policy, prompts, reward_fn, micro, show)
    row |= {"eval_reward_mean": reward.mean().item(), "eval_seconds": time.time() - tic}
    return row, reward, images


def epoch_inputs(cfg: Config, rank: int, epoch: int, train_prompts, n: int, latent_shape: tuple):
    """The epoch's rng, B*K prompts (each group of K together), x_T and step noise."""
    # one seed per (seed, rank, epoch): noise and prompts never depend on earlier RNG use
    seed = (cfg.seed * 1_000_003 + rank * 10_007 + epoch) % 2**62
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    chosen = rng.choices(train_prompts, k=n // cfg.k)  # B prompts
    prompts = [p for p in chosen for _ in range(cfg.k)]  # B*K = n
    x_T, step_noise = draw_noise(generator, n, cfg.num_steps, latent_shape)
    return rng, prompts, x_T, step_noise


# === The loop: load, then each epoch rollout -> rewards -> advantages -> updates -> log, checkpoint
def main(cfg: Config) -> Path:
    """Train as cfg says; returns the run folder. Every input is checked before anything is written
    (loop_utils.prepare); the folder is this process's alone while it trains (loop_utils.claimed)."""
    run = loop_utils.prepare(cfg, ALGOS)
    torch.set_flush_denormal(True)  # CPU: denormal floats (near-zero advantages) run ~100x slower
    with loop_utils.claimed(run, cfg):
        train(cfg, run)
    return run.folder


def train(cfg: Config, run: loop_utils.Run) -> None:
    # Load: the reward first (a missing download fails fast), the frozen pipeline, fp32 LoRA, pi_theta
    reward_fn, eval_reward_fn = loop_utils.load_rewards(run)
    models = load_models(run.model, run.device, run.weight_dtype, cfg.lora_rank, cfg.seed,
                         cfg.lora_modules, cfg.gradient_checkpointing)  # fmt: skip
    policy = make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    steps = trained_steps(policy.schedule, cfg.min_train_sigma)
    loop_utils.check_steps(steps, policy.schedule.sigma_t, MIN_SIGMA, cfg)
    params = lora_parameters(models.unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)  # DDPO's weight decay
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.weight_dtype == torch.float16)
    loop_utils.broadcast(params)  # every rank starts from rank 0's LoRA
    ema = [p.detach().clone() for p in params]  # the weights evaluated and saved (Deviation 11)
    state = (models.unet, optimizer, ema, scaler)  # what a checkpoint holds
    loop_utils.print_start(cfg, run, models, steps, sum(p.numel() for p in params))
    start = loop_utils.load_checkpoint(run, *state) if cfg.resume else 0
    worst = check_first_ratio(models, policy, run.eval_prompts[: run.micro], steps, run.writer)
    loop_utils.check_ratio_noise(worst, cfg.clip_range)
    micro, evaluating = run.micro, (models, policy, params, ema, run.eval_prompts, eval_reward_fn)
    if not cfg.resume:  # row 0: the untrained model's held-out score (a resume has its row 0)
        held_out, eval_reward, images = held_out_row(*evaluating, micro, False, run.writer)
        row = {"epoch": 0, "images_seen": 0, "reward_mean": None, "reward_std": None, **held_out}
        row |= dict.fromkeys(("adv_clipfrac", *STAT_KEYS, *UPDATE_KEYS))  # no update yet
        row["eval_raw_reward_mean"] = held_out["eval_reward_mean"]  # untrained: EMA = raw weights
        row["seconds"] = 0.0
        loop_utils.save_epoch(run, row, {"eval": (images, run.eval_prompts, eval_reward)}, *state)

    for epoch in tqdm(range(start, cfg.epochs), f"{cfg.algo} epochs", disable=not run.writer):
        tic = time.time()
        # Rollout: B prompts x K images per rank, trajectories and log pi_old, rewards r(x_0, c)
        rng, prompts, x_T, step_noise = epoch_inputs(cfg, run.rank, epoch, run.train_prompts,
                                                     run.images_per_rank, models.latent_shape)  # fmt: skip
        batch, reward = rollout(
            models, policy, prompts, x_T, step_noise, reward_fn, micro, run.writer
        )
        loop_utils.check_finite(prompts, reward, batch.latents, batch.log_probs)
        # Advantages: from every rank's rewards (B*K*ranks,) -> (B*ranks, K); this rank keeps its rows
        stats, everyone = {}, loop_utils.gather(reward)
        advantage = compute_advantages(cfg.algo, everyone.view(-1, cfg.k), cfg.normalize_advantage,
                                       cfg.adv_clip, stats)  # fmt: skip
        mine = slice(run.rank * len(reward), (run.rank + 1) * len(reward))
        # Updates: minibatches of the clipped (or plain) objective, then the EMA of the weights
        stats |= train_on_rollout(policy, batch, advantage[mine].to(run.device), cfg, optimizer, rng,
                                  run.sizes, run.writer, scaler)  # fmt: skip
        update_ema(ema, params, cfg.ema_decay)
        # Log, evaluate (every eval_every epochs and the last), save the LoRA, checkpoint
        row = {"epoch": epoch + 1, "images_seen": (epoch + 1) * cfg.images_per_epoch}
        row |= dict(zip(("reward_mean", "reward_std"), loop_utils.mean_and_std(everyone)))
        row |= {"eval_reward_mean": None, "eval_seconds": None, "eval_raw_reward_mean": None}
        row |= loop_utils.mean_over_ranks(stats)
        grids = {"train": (batch.images[:16], prompts[:16], reward[:16])}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            held_out, eval_reward, images = held_out_row(
                *evaluating, micro, cfg.eval_raw, run.writer
            )
            row |= held_out
            grids["eval"] = (images, run.eval_prompts, eval_reward)
        with swapped_in(params, ema):
            loop_utils.save_lora(run, models.unet)
        row["seconds"] = time.time() - tic - (row["eval_seconds"] or 0)
        loop_utils.save_epoch(run, row, grids, *state)
    loop_utils.finish(run, models.resolution)


# === Command line (fire): every Config field is a --flag; loop_utils checks them before fire runs
def cli(**flags) -> None:
    """python loop.py [--flag value ...]: one line and exit 2 for bad input, 130 when interrupted."""
    with loop_utils.one_line_errors():
        if flags.pop("help", False) or flags.pop("h", False):
            return print(loop_utils.help_text(Config))
        main(loop_utils.config_from_flags(flags, Config))


if __name__ == "__main__":
    import fire

    with loop_utils.one_line_errors():
        loop_utils.check_argv(sys.argv[1:], typing.get_type_hints(Config))
    fire.Fire(cli)
