"""The paper's equations against independent references: diffusers' DDIMScheduler.step,
torch.distributions, explicit Python loops, and autograd identities between the estimators."""

from __future__ import annotations

import pytest
import torch
from conftest import SD2_SCHEDULER
from diffusers import DDIMScheduler

import loop

SCHEDULERS = {
    "sd2": SD2_SCHEDULER,  # set_alpha_to_one=False: last sigma_t small but > 0
    "alpha_to_one": {**SD2_SCHEDULER, "set_alpha_to_one": True},  # last sigma_t == 0
    "sd1_clip": {**SD2_SCHEDULER, "clip_sample": True},  # DDIMScheduler's default clip_sample
}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config", list(SCHEDULERS))
@pytest.mark.parametrize("num_steps", [4, 50])
def test_ddim_step_equals_diffusers(prediction_type, config, num_steps):
    """prev_sample within 1e-6 of DDIMScheduler.step with the same variance_noise, at every step."""
    scheduler = DDIMScheduler(**{**SCHEDULERS[config], "prediction_type": prediction_type})
    eta = 1.0
    schedule = loop.ddim_schedule(scheduler, num_steps, eta)
    clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for j, t in enumerate(scheduler.timesteps):
        x_t = torch.randn(3, 4, 8, 8, generator=gen)
        model_output = torch.randn(3, 4, 8, 8, generator=gen)
        noise = torch.randn(3, 4, 8, 8, generator=gen)
        ref = scheduler.step(model_output, t, x_t, eta=eta, variance_noise=noise).prev_sample
        ours, log_prob, mean = loop.ddim_step(
            model_output,
            x_t,
            schedule.alpha_bar_t[j],
            schedule.alpha_bar_prev[j],
            schedule.sigma_t[j],
            prediction_type,
            noise=noise,
            clip=clip,
        )
        worst = max(worst, (ours - ref).abs().max().item())
        ref_mean = scheduler.step(
            model_output, t, x_t, eta=eta, variance_noise=torch.zeros_like(noise)
        ).prev_sample
        torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=0)
        assert (log_prob is None) == (not bool(schedule.trainable[j]))
    assert worst <= 1e-6, worst


def test_last_step_sigma_guard():
    """Which steps have sigma_t > 0 is known; the zero-sigma step is never trained on."""
    sd2 = loop.ddim_schedule(DDIMScheduler(**SCHEDULERS["sd2"]), 10, 1.0)
    assert sd2.trainable.all() and sd2.sigma_t.min() > 0.01  # last step: t=1, sigma ~ 0.02
    one = loop.ddim_schedule(DDIMScheduler(**SCHEDULERS["alpha_to_one"]), 10, 1.0)
    assert one.sigma_t[-1] == 0 and not one.trainable[-1] and one.trainable[:-1].all()
    # the sigma formula itself, against diffusers' _get_variance
    scheduler = DDIMScheduler(**SCHEDULERS["sd2"])
    scheduler.set_timesteps(10)
    for j, t in enumerate(scheduler.timesteps):
        variance = scheduler._get_variance(int(t), int(t) - 100)
        torch.testing.assert_close(sd2.sigma_t[j], variance**0.5, atol=1e-7, rtol=0)


def test_log_prob_equals_torch_normal():
    """log pi = Normal(mean, sigma).log_prob(x) averaged over the latent dimensions."""
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(5, 4, 8, 8, generator=gen)
    x = mean + 0.3 * torch.randn(5, 4, 8, 8, generator=gen)
    for sigma in (0.02, 0.3, 1.0):
        ours = loop.gaussian_log_prob(x, mean, torch.tensor(sigma))
        ref = torch.distributions.Normal(mean, sigma).log_prob(x).mean(dim=(1, 2, 3))
        assert ours.shape == (5,) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)


def test_gaussian_kl_equals_torch_kl():
    gen = torch.Generator().manual_seed(2)
    mean, ref_mean = torch.randn(2, 2, 3, 3, 4, generator=gen)
    sigma = torch.tensor(0.2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, sigma), torch.distributions.Normal(ref_mean, sigma)
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loop.gaussian_kl(mean, ref_mean, sigma), ref)


def test_leave_one_out_advantage_matches_explicit_loop():
    reward = torch.rand(5, 4, generator=torch.Generator().manual_seed(3))  # (B, K)
    advantage = loop.leave_one_out_advantage(reward)
    for b in range(5):
        for i in range(4):
            others = [reward[b, j].item() for j in range(4) if j != i]
            baseline = sum(others) / len(others)
            assert abs(advantage[b, i].item() - (reward[b, i].item() - baseline)) < 1e-6
    torch.testing.assert_close(advantage.sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_ppo_advantage_is_grpos_and_loops_is_dr_grpos_times_k_over_k_minus_1(k):
    """With K > 1 and --normalize_advantage auto, `ppo`'s advantage is GRPO's, (r_i - mean) / std
    over the prompt's K rewards (population std), and `loop`'s is the mean-centred (Dr. GRPO) form
    r_i - mean times K / (K - 1): r_i - b_i = r_i - (K mean - r_i) / (K - 1) = K / (K - 1) (r_i - mean)."""
    reward = torch.rand(5, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    mean = reward.mean(dim=1, keepdim=True)
    std = reward.std(dim=1, keepdim=True, unbiased=False)
    grpo = (reward - mean) / std
    dr_grpo = reward - mean
    ppo = loop.compute_advantages("ppo", reward, "auto", adv_clip=0)
    ours = loop.compute_advantages("loop", reward, "auto", adv_clip=0)
    torch.testing.assert_close(ppo, grpo.flatten(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, (k / (k - 1) * dr_grpo).flatten(), rtol=1e-12, atol=1e-12)


def test_advantage_branches_and_normalisation():
    reward = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])  # second prompt: std 0
    assert torch.equal(loop.compute_advantages("reinforce", reward, "off", 0), reward.flatten())
    loo = loop.leave_one_out_advantage(reward).flatten()
    assert torch.equal(loop.compute_advantages("rloo", reward, "off", 0), loo)
    assert torch.equal(loop.compute_advantages("loop", reward, "off", 0), loo)
    ppo = loop.compute_advantages("ppo", reward, "group-std", 5.0)  # DDPO per-prompt statistics
    torch.testing.assert_close(ppo, torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0]))
    batch = loop.normalize(reward, "batch")
    torch.testing.assert_close(batch.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.std(unbiased=False), torch.tensor(1.0))
    # the clip acts in units of the batch's std: raw A to mean +- c std (mean 5, std sqrt(12.5))
    clipped = loop.compute_advantages("reinforce", reward * 10, "off", 0.5)
    torch.testing.assert_close(clipped.max(), torch.tensor(5 + 0.5 * 12.5**0.5))


# reward (B, K) = (16, 4) at the scales of DDPO's rewards: JPEG size in kB and in bytes, aesthetic
REWARD_SCALES = {"jpeg_kb": (-60.0, 12.0), "jpeg_bytes": (-6e4, 1.2e4), "aesthetic": (5.5, 0.3)}


@pytest.mark.parametrize("scale", list(REWARD_SCALES))
@pytest.mark.parametrize("algo", loop.ALGOS)
def test_adv_clip_means_the_same_at_every_reward_scale(algo, scale):
    """DDPO's clip (5) is meant for normalised advantages; in reward units it clipped 99% of
    REINFORCE's and ~78% of LOOP's JPEG-scale advantages (a sign estimator), and tied every
    aesthetic-scale REINFORCE image. In units of the batch's std it means the same at any scale."""
    center, spread = REWARD_SCALES[scale]
    unit = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))  # (B, K)
    unit[3, 1] = 20.0  # one outlier, which the clip exists for
    stats, unit_stats = {}, {}
    advantage = loop.compute_advantages(algo, center + spread * unit, "auto", 5.0, stats)
    reference = loop.compute_advantages(algo, unit, "auto", 5.0, unit_stats)
    expected = 0.0 if algo == "ppo" else 1 / 64  # per-prompt z-scores of K = 4 stay < sqrt(3)
    assert stats["adv_clipfrac"] == unit_stats["adv_clipfrac"] == expected  # only the outlier
    if algo == "ppo":  # normalised: the same numbers at every scale
        torch.testing.assert_close(advantage, reference, atol=1e-4, rtol=1e-4)
    else:  # raw: the reward's units, the same shape (REINFORCE keeps its offset)
        offset = center if algo == "reinforce" else 0.0
        torch.testing.assert_close((advantage - offset) / spread, reference, atol=1e-3, rtol=1e-4)
    if algo in ("rloo", "loop"):  # the prompts without the outlier still sum to zero
        groups = advantage.view(16, 4).sum(dim=1) / spread
        assert groups[torch.arange(16) != 3].abs().max() < 1e-4
    assert len(advantage.unique()) > 60  # not a sign estimator: no ties at the bounds


def _grads(loss_fn, log_prob_value):
    log_prob = log_prob_value.clone().requires_grad_(True)
    loss_fn(log_prob).backward()
    return log_prob.grad


@pytest.mark.parametrize("pair", [("ppo", "reinforce"), ("loop", "rloo")])
def test_clipped_gradient_equals_reinforce_at_ratio_one(pair):
    """At rho = 1 the clipped objective's gradient is the REINFORCE/RLOO gradient."""
    gen = torch.Generator().manual_seed(4)
    old = torch.randn(8, generator=gen)
    advantage = torch.randn(8, generator=gen)
    clipped, plain = pair
    g_clip = _grads(lambda lp: loop.policy_loss(clipped, lp, old, advantage, 1e-4), old)
    g_plain = _grads(lambda lp: loop.policy_loss(plain, lp, old, advantage, 1e-4), old)
    torch.testing.assert_close(g_clip, g_plain, atol=0, rtol=1e-6)
    torch.testing.assert_close(g_plain, -advantage / 8)


def test_clipped_side_has_exactly_zero_gradient():
    old = torch.zeros(4)
    advantage = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # rho = e^0.1 > 1 + eps with A > 0, rho = e^-0.1 < 1 - eps with A < 0: clipped -> zero gradient
    # rho = e^-0.1 with A > 0 and rho = e^0.1 with A < 0: the unclipped term is the min -> gradient
    log_prob = torch.tensor([0.1, -0.1, -0.1, 0.1])
    grad = _grads(lambda lp: loop.policy_loss("loop", lp, old, advantage, 0.2 / 10), log_prob)
    assert grad[0] == 0 and grad[1] == 0
    assert grad[2] != 0 and grad[3] != 0
    ratio = loop.importance_ratio(log_prob, old)
    torch.testing.assert_close(grad[2:], -(ratio * advantage)[2:] / 4)


def test_ema_is_the_geometric_average_of_the_epochs_weights():
    """After epochs with weights w_1..w_n: ema = d^n w_0 + sum_e (1 - d) d^(n-e) w_e."""
    decay, start = 0.9, torch.randn(5)
    param = torch.nn.Parameter(start.clone())
    ema, expected = [start.clone()], start.clone()
    for _ in range(4):
        param.data = torch.randn(5)
        loop.update_ema(ema, [param], decay)
        expected = decay * expected + (1 - decay) * param.data
    assert torch.allclose(ema[0], expected)
    loop.update_ema(ema, [param], 0.0)  # decay 0: the last weights
    assert torch.equal(ema[0], param.data)


def test_swapped_in_restores_the_weights_even_after_an_error():
    param, other = torch.nn.Parameter(torch.zeros(3)), torch.ones(3)
    with pytest.raises(RuntimeError), loop.swapped_in([param], [other]):
        assert torch.equal(param.data, other)
        raise RuntimeError
    assert torch.equal(param.data, torch.zeros(3))
