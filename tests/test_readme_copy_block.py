"""The README's "Copy LOOP into your code" block behaves exactly as loop.py: same log-probs, advantages,
loss and gradient (the last through loop.train_on_rollout itself), and a drifted copy is caught."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SD2_SCHEDULER
from diffusers import DDIMScheduler

import loop
import loop_utils

README = REPO / "README.md"
BLOCK = re.compile(r"<!-- copy-loop -->\s*```python\n(.*?)```\s*<!-- /copy-loop -->", re.DOTALL)


def readme_block() -> str:
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) == 1, "README.md: one ```python block between the copy-loop markers"
    return blocks[0]


def load_block(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md (copy-loop block)", "exec"), namespace)  # noqa: S102 (our README)
    return namespace


class ToyUNet(torch.nn.Module):
    """A differentiable stand-in for the UNet: eps_theta(x_t, t, c) = w x_t + b mean(c) + t / 1000."""

    def __init__(self, latent_shape):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.1 * torch.randn(latent_shape, generator=gen))
        self.b = torch.nn.Parameter(0.1 * torch.randn(latent_shape, generator=gen))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x_t, t, encoder_hidden_states):
        c = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]  # (N, L, D) -> (N, 1, 1, 1)
        return SimpleNamespace(sample=self.w * x_t + self.b * c + t / 1000)


def setup(clip_range=1e-4):
    """One rollout of B = 2 prompts x K = 4 images on the toy UNet; its stored log pi_old are offset
    by +-0.5 eps and +-3 eps from the current policy's, so pairs lie inside and outside the clip range
    (never near its edge, where float rounding could decide), with advantages of both signs."""
    # adv_clip: 8 advantages are never 5 std from their mean (at most sqrt(7)); 1.5 clips the outlier
    cfg = loop.Config(
        k=4, images_per_epoch=8, minibatch=8, micro_batch=2, num_steps=4, guidance_scale=3.0,
        clip_range=clip_range, max_grad_norm=1e9, min_train_sigma=0.5, adv_clip=1.5,
    )  # fmt: skip
    sizes = loop_utils.check_config(cfg, 1)
    latent_shape = (4, 8, 8)
    unet = ToyUNet(latent_shape)
    schedule = loop.ddim_schedule(DDIMScheduler(**SD2_SCHEDULER), cfg.num_steps, cfg.eta)
    gen = torch.Generator().manual_seed(1)
    uncond = torch.randn(1, 5, 6, generator=gen)
    policy = loop.Policy(unet, uncond, schedule, cfg.guidance_scale, "epsilon", None)
    n = cfg.images_per_epoch
    cond = torch.randn(n, 5, 6, generator=gen)  # (N, L, D)
    x_T, step_noise = loop.draw_noise(gen, n, cfg.num_steps, latent_shape)
    latents, log_probs = loop.sample_trajectories(policy, cond, x_T, step_noise)
    offsets = torch.tensor([-3.0, -0.5, 0.5, 3.0]) * clip_range
    pick = torch.randint(0, 4, log_probs.shape, generator=gen)
    old_log_probs = log_probs - offsets[pick]  # log rho_t = +-0.5 eps or +-3 eps
    batch = loop.Rollout(latents, old_log_probs, cond, torch.zeros(n, 3, 8, 8))
    reward = torch.rand(n // cfg.k, cfg.k, generator=gen)  # (B, K)
    reward[0, 1] = 40.0  # an outlier, so that the advantage clip acts
    return cfg, sizes, policy, batch, reward


def loop_py_loss_and_grad(cfg, sizes, policy, batch, reward):
    """loop.py's loss (policy_loss with train_on_rollout's scaling) and, from one real call of
    train_on_rollout (one minibatch, a zero learning rate), the LoRA gradient it accumulates."""
    params = loop.lora_parameters(policy.unet)
    advantage = loop.compute_advantages(cfg.algo, reward, cfg.normalize_advantage, cfg.adv_clip)
    steps = loop.trained_steps(policy.schedule, cfg.min_train_sigma)
    n, mb, micro = len(advantage), sizes["minibatch_per_rank"], sizes["micro_batch"]
    n_steps = len(steps)
    with torch.no_grad():
        total = 0.0
        for start in range(0, n, micro):
            rows = slice(start, start + micro)
            for j in steps:
                log_prob = loop.rescore(policy, batch, rows, j)[0]
                old, adv = batch.log_probs[rows, j], advantage[rows]
                loss = loop.policy_loss(cfg.algo, log_prob, old, adv, cfg.clip_range)
                total = total + loss * micro / mb / n_steps  # train_on_rollout's scaling
    optimizer = torch.optim.SGD(params, lr=0.0)
    stats = loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, random.Random(0), sizes)
    return total, [p.grad.clone() for p in params], stats


def block_loss_and_grad(block, cfg, policy, batch, reward):
    params = loop.lora_parameters(policy.unet)
    for p in params:
        p.grad = None
    advantage = block["loop_advantage"](reward, cfg.adv_clip)
    steps = loop.trained_steps(policy.schedule, cfg.min_train_sigma)
    columns = []
    for j in steps:  # the block's log-prob of the stored x_{t-1}, from loop.py's DDIM mean
        x_t, x_prev = batch.latents[:, j], batch.latents[:, j + 1]
        mean = loop.policy_step(policy, x_t, j, batch.cond, x_prev=x_prev)[2]
        columns.append(block["log_prob"](x_prev, mean, policy.schedule.sigma_t[j]))
    log_prob = torch.stack(columns, dim=1)  # S x (N,) -> (N, S)
    loss = block["loop_loss"](log_prob, batch.log_probs[:, steps], advantage, cfg.clip_range)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def check_block_equals_loop_py(block: dict) -> None:
    """Every piece, then the whole loss and gradient; raises AssertionError on any difference."""
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(5, 4, 8, 8, generator=gen)
    x_prev = mean + 0.3 * torch.randn(5, 4, 8, 8, generator=gen)
    for sigma in (0.05, 0.7):
        sigma_t = torch.tensor(sigma)
        ours = block["log_prob"](x_prev, mean, sigma_t)
        torch.testing.assert_close(ours, loop.gaussian_log_prob(x_prev, mean, sigma_t))

    cfg, sizes, policy, batch, reward = setup()
    assert (cfg.algo, cfg.normalize_advantage) == ("loop", "auto")  # LOOP's default advantage path
    expected = loop.compute_advantages(cfg.algo, reward, cfg.normalize_advantage, cfg.adv_clip)
    torch.testing.assert_close(block["loop_advantage"](reward, cfg.adv_clip), expected)
    unclipped = loop.compute_advantages(cfg.algo, reward, cfg.normalize_advantage, 0.0)
    assert expected.max() < unclipped.max()  # the outlier's advantage was clipped
    torch.testing.assert_close(block["loop_advantage"](reward, 0.0), unclipped)

    log_prob, old_log_prob, advantage = torch.randn(3, 16, generator=gen)  # one step, 16 images
    one_step = block["loop_loss"](log_prob[:, None], old_log_prob[:, None], advantage, 0.5)
    reference = loop.policy_loss("loop", log_prob, old_log_prob, advantage, 0.5)
    torch.testing.assert_close(one_step, reference)

    loss_ref, grads_ref, stats = loop_py_loss_and_grad(cfg, sizes, policy, batch, reward)
    assert 0.2 < stats["clipfrac"] < 0.8  # both sides of the clip are exercised
    loss, grads = block_loss_and_grad(block, cfg, policy, batch, reward)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-9)


def test_readme_block_equals_loop_py():
    check_block_equals_loop_py(load_block(readme_block()))


def test_readme_block_stays_short():
    assert len(readme_block().strip().splitlines()) <= 32


DRIFTS = {
    "log-prob summed over latent dims": (".mean(dim=(1, 2, 3))", ".sum(dim=(1, 2, 3))"),
    "loss summed over images and steps": ("return -objective.mean()", "return -objective.sum()"),
    "baseline includes the image itself": ("/ (k - 1)", "/ k"),
    "no advantage clip": ("if adv_clip > 0:", "if False:"),
    "advantage clip not in std units": (
        "advantage.clamp(mean - adv_clip * std, mean + adv_clip * std)",
        "advantage.clamp(-adv_clip, adv_clip)",
    ),
    "max instead of min": ("torch.minimum(", "torch.maximum("),
    "normalised advantage": (
        "advantage = reward - baseline",
        "advantage = (reward - baseline) / (reward - baseline).std()",
    ),
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_a_drifted_block_is_caught(drift):
    old, new = DRIFTS[drift]
    code = readme_block()
    assert old in code, f"the drift check {drift!r} no longer matches the README block"
    with pytest.raises(AssertionError):
        check_block_equals_loop_py(load_block(code.replace(old, new)))


def test_ci_runs_the_readme_test_command_verbatim():
    command = "pip install -r requirements.txt -r bench/requirements.txt pytest && python -m pytest -q -rs tests"
    assert f"```bash\n{command}\n```" in README.read_text()
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_equation_table_names_functions_that_exist():
    text = README.read_text()
    table = text[text.index("## Equations -> functions") :].split("\n## ")[0]
    names = [n for row in table.splitlines() if row.startswith("| ") for n in
             re.findall(r"`(\w+)`", row.rsplit("|", 2)[-2])]  # fmt: skip
    assert len(names) >= 15
    missing = [name for name in names if not callable(getattr(loop, name, None))]
    assert not missing, f"README's equation table names functions loop.py lacks: {missing}"
