"""Behaviour on a real (tiny) Stable Diffusion pipeline, in-process: ratio == 1 on re-scoring, gradient
identities through the UNet, LoRA vs frozen parameters, determinism, resume, diffusers LoRA loading."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, write_prompts
from safetensors.torch import load_file

import loop
import loop_utils
import rewards


def brightness_reward(images, prompts):
    """A cheap deterministic reward: mean pixel value, (N,)."""
    return images.mean(dim=(1, 2, 3))


def tiny_config(**overrides) -> loop.Config:
    base = {"k": 4, "images_per_epoch": 8, "num_steps": 3, "micro_batch": 4, "guidance_scale": 3.0}
    return loop.Config(**{**base, **overrides})


def load(model, seed=0, rank=4):
    return loop.load_models(str(model), torch.device("cpu"), torch.float32, rank, seed)


def perturb_lora(models, seed=0, scale=0.05):
    """Give the LoRA non-zero weights (lora_B starts at 0) so every test exercises the adapter path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loop.lora_parameters(models.unet):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def fresh_rollout(models, cfg, n_prompts=2):
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    # (B*K,), grouped by prompt
    prompts = [p for p in PROMPTS[:n_prompts] for _ in range(cfg.k)]
    gen = torch.Generator().manual_seed(0)
    n, shape = len(prompts), models.latent_shape
    x_T, step_noise = loop.draw_noise(gen, n, cfg.num_steps, shape)
    batch, reward = loop.rollout(
        models, policy, prompts, x_T, step_noise, brightness_reward, cfg.micro_batch
    )
    return policy, batch, reward


def test_no_guidance_runs_only_the_conditional_model(tiny_model):
    """w <= 1 (as diffusers): eps_hat = eps(x_t, c), one UNet pass of N latents instead of 2N."""
    models = load(tiny_model)
    perturb_lora(models)
    seen = []
    hook = models.unet.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    x_t = torch.randn(3, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = loop.encode_prompts(models.tokenizer, models.text_encoder, PROMPTS[:3])
    t = torch.tensor(500)
    eps_hat = loop.guided_noise_prediction(models.unet, x_t, t, cond, models.uncond, 1.0)
    hook.remove()
    assert seen == [3]
    eps_cond = models.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(eps_hat, eps_cond, atol=0, rtol=0)
    guided = loop.guided_noise_prediction(models.unet, x_t, t, cond, models.uncond, 1.5)
    assert (guided - eps_cond).abs().max() > 1e-4  # w > 1 does guide: the test can fail


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_v"])
def test_rescoring_a_fresh_rollout_gives_ratio_one(model_fixture, request):
    """Sampling's batch composition, fp32 latents and CFG path when re-scoring -> rho_t == 1."""
    models = load(request.getfixturevalue(model_fixture))
    perturb_lora(models)
    cfg = tiny_config()
    policy, batch, _ = fresh_rollout(models, cfg)
    assert batch.latents.shape == (8, cfg.num_steps + 1, *models.latent_shape)
    assert batch.latents.dtype == batch.log_probs.dtype == torch.float32
    worst = 0.0
    for start in range(0, 8, cfg.micro_batch):
        idx = slice(start, start + cfg.micro_batch)
        for j in range(cfg.num_steps):
            log_prob, _ = loop.rescore(policy, batch, idx, j)
            assert log_prob.requires_grad
            ratio = loop.importance_ratio(log_prob, batch.log_probs[idx, j])
            worst = max(worst, (ratio - 1).abs().max().item())
    assert worst <= 1e-6, worst


def test_ratio_one_with_bf16_frozen_weights(tiny_model):
    """Mixed precision: bf16 UNet, fp32 LoRA and log-probs; the re-score still matches exactly."""
    models = loop.load_models(str(tiny_model), torch.device("cpu"), torch.bfloat16, 4, 0)
    perturb_lora(models)
    assert {p.dtype for p in loop.lora_parameters(models.unet)} == {torch.float32}
    cfg = tiny_config()
    policy, batch, _ = fresh_rollout(models, cfg)
    assert batch.log_probs.dtype == torch.float32
    log_prob, _ = loop.rescore(policy, batch, slice(0, cfg.micro_batch), 1)
    ratio = loop.importance_ratio(log_prob, batch.log_probs[: cfg.micro_batch, 1])
    assert (ratio - 1).abs().max() <= 1e-6


def test_kl_reference_is_the_model_with_lora_switched_off(tiny_model):
    models, plain = load(tiny_model), load(tiny_model)  # plain: LoRA B == 0, i.e. the base model
    perturb_lora(models)
    cfg = tiny_config()
    policy, batch, _ = fresh_rollout(models, cfg)
    base_policy = loop.make_policy(plain, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    rows = slice(0, 4)
    with torch.no_grad():
        _, mean = loop.rescore(policy, batch, rows, 1)
        with loop.base_model(models.unet):
            _, ref_mean = loop.rescore(policy, batch, rows, 1)
        _, base_mean = loop.rescore(base_policy, batch, rows, 1)
        _, mean_again = loop.rescore(policy, batch, rows, 1)
    assert torch.equal(ref_mean, base_mean) and torch.equal(mean, mean_again)
    kl = loop.gaussian_kl(mean, ref_mean, policy.schedule.sigma_t[1])
    assert (kl > 0).all()
    # the penalty enters training: with kl_coef > 0 the statistics report it
    sizes = loop_utils.check_config(tiny_config(kl_coef=0.5), world=1)
    advantage = loop.compute_advantages("loop", torch.zeros(2, 4), "off", 5.0)
    optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=1e-3)
    stats = loop.train_on_rollout(
        policy, batch, advantage, tiny_config(kl_coef=0.5), optimizer, random.Random(0), sizes
    )
    assert stats["kl"] > 0 and stats["grad_norm"] > 0  # zero advantage: the KL alone pulls


@pytest.mark.parametrize("pair", [("ppo", "reinforce"), ("loop", "rloo")])
def test_unet_gradient_of_clipped_objective_equals_reinforce(tiny_model, pair):
    models = load(tiny_model)
    perturb_lora(models)
    cfg = tiny_config()
    policy, batch, reward = fresh_rollout(models, cfg)
    advantage = loop.compute_advantages("loop", reward.view(-1, cfg.k), "off", 5.0)
    params = loop.lora_parameters(models.unet)
    grads = []
    for algo in pair:
        for p in params:
            p.grad = None
        idx = slice(0, 4)
        log_prob, _ = loop.rescore(policy, batch, idx, 1)
        old = batch.log_probs[idx, 1]
        loop.policy_loss(algo, log_prob, old, advantage[idx], 1e-4).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-5)


def test_lora_parameters_change_and_base_parameters_do_not(tiny_model):
    models = load(tiny_model)
    cfg = tiny_config(algo="loop", inner_epochs=2, lr=1e-2)
    sizes = loop_utils.check_config(cfg, world=1)
    policy, batch, reward = fresh_rollout(models, cfg)
    advantage = loop.compute_advantages("loop", reward.view(-1, cfg.k), "off", 5.0)
    before = {
        name: p.detach().clone()
        for part in (models.unet, models.vae, models.text_encoder)
        for name, p in part.named_parameters(prefix=type(part).__name__)
    }
    optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=cfg.lr)
    rng = random.Random(0)
    stats = loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, rng, sizes)
    assert sizes["updates_per_epoch"] == 4 and stats["grad_norm"] > 0  # 2 minibatches x 2 passes
    after = {
        name: p.detach()
        for part in (models.unet, models.vae, models.text_encoder)
        for name, p in part.named_parameters(prefix=type(part).__name__)
    }
    lora = [n for n in before if "lora" in n]
    assert lora and all("lora" in n for n in lora)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    frozen = [n for n in before if "lora" not in n]
    assert all(torch.equal(before[n], after[n]) for n in frozen)


def run_main(tmp_path, tiny_model, name, monkeypatch=None, **overrides):
    prompts = write_prompts(tmp_path / "prompts.txt")
    flags = {
        "model": str(tiny_model),
        "reward": "jpeg_compressibility",
        "train_prompts": str(prompts),
        "num_eval_prompts": 4,
        "out": str(tmp_path / name),
        "k": 2,
        "images_per_epoch": 4,
        "num_steps": 3,
        "micro_batch": 2,
        "epochs": 2,
        "eval_every": 1,
        "lr": 1e-2,
        "clip_range": 0.1,
        "min_train_sigma": 0.0,  # the test scheduler's sigmas are not the shipped model's
        **overrides,
    }
    return loop.main(loop_utils.config_from_flags(flags, loop.Config))


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds"), row.pop("eval_seconds")
    return rows


def test_same_seed_gives_identical_runs(tmp_path, tiny_model):
    a = run_main(tmp_path, tiny_model, "a", algo="ppo", inner_epochs=2)
    b = run_main(tmp_path, tiny_model, "b", algo="ppo", inner_epochs=2)
    c = run_main(tmp_path, tiny_model, "c", algo="ppo", inner_epochs=2, seed=1)
    lora = "lora/pytorch_lora_weights.safetensors"
    assert (a / lora).read_bytes() == (b / lora).read_bytes()
    assert metrics(a) == metrics(b)
    assert metrics(a) != metrics(c)
    # the run-folder contract
    rows = metrics(a)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["images_seen"] == 8
    for key in ("reward_mean", "reward_std", "eval_reward_mean", "approx_kl", "clipfrac"):
        assert rows[-1][key] is not None
    assert {"ratio_mean", "grad_norm", "images_seen"} <= set(rows[0])
    config = json.loads((a / "config.json").read_text())
    assert config["algo"] == "ppo" and config["k"] == 2
    assert (a / "samples" / "eval_epoch_0000.png").is_file()
    held_out = 4 * loop.Config.eval_images_per_prompt  # num_eval_prompts x images per prompt
    assert (a / "samples" / "eval_epoch_0000.txt").read_text().count("\n") == held_out
    assert (a / "samples" / "before_after.png").is_file()
    assert (a / "checkpoint" / "state.pt").is_file()


def test_resume_equals_uninterrupted_run(tmp_path, tiny_model):
    """N epochs == N/2 epochs + --resume for N/2 more: identical LoRA weights and metrics (CPU)."""
    opts = {"algo": "loop", "inner_epochs": 2, "minibatch": 2, "epochs": 4, "eval_every": 2}
    full = run_main(tmp_path, tiny_model, "full", **opts)
    half = run_main(tmp_path, tiny_model, "half", **{**opts, "epochs": 2})
    resumed = loop.main(
        loop_utils.config_from_flags({"resume": str(half), "epochs": 4}, loop.Config)
    )
    assert resumed == half
    a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(half / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert metrics(full) == metrics(half)


def test_interrupted_checkpoint_write_leaves_the_old_one(tmp_path, tiny_model, monkeypatch):
    run = run_main(tmp_path, tiny_model, "run", epochs=1)
    good = (run / "checkpoint" / "state.pt").read_bytes()

    def killed_save(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.torch, "save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        loop_utils.atomic_write(run / "checkpoint" / "state.pt", lambda tmp: torch.save({}, tmp))
    assert (run / "checkpoint" / "state.pt").read_bytes() == good
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["state.pt"]


def test_nan_reward_stops_and_names_the_prompt(tmp_path, tiny_model, monkeypatch, capsys):
    def nan_for_cats(images, prompts):
        return torch.tensor([float("nan") if "cat" in p else 0.0 for p in prompts])

    monkeypatch.setattr(rewards, "load_reward", lambda name, device: nan_for_cats)
    eval_file = write_prompts(tmp_path / "val.txt", ["a red cube"])
    train_file = write_prompts(tmp_path / "cats.txt", ["a cat"])
    with pytest.raises(SystemExit) as exit_info:
        loop.cli(
            model=str(tiny_model),
            reward="jpeg_compressibility",
            train_prompts=str(train_file),
            eval_prompts=str(eval_file),
            out=str(tmp_path / "run"),
            k=2,
            images_per_epoch=2,
            num_steps=2,
            micro_batch=2,
            min_train_sigma=0.0,
        )
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error:") and "non-finite" in message and "a cat" in message
    run = tmp_path / "run"
    assert [r["epoch"] for r in metrics(run)] == [0]  # the untrained evaluation, nothing after
    models = load(tiny_model, rank=loop.Config.lora_rank)
    params = loop.lora_parameters(models.unet)
    ema = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    resumed = SimpleNamespace(folder=run, world=1, writer=False)
    assert (
        loop_utils.load_checkpoint(resumed, models.unet, torch.optim.AdamW(params), ema, scaler)
        == 0
    )


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])  # 1.0: no unconditional pass, as diffusers
def test_saved_lora_loads_in_stock_diffusers_and_reproduces_images(
    tmp_path, tiny_model, monkeypatch, guidance_scale
):
    """StableDiffusionPipeline.from_pretrained(base).load_lora_weights(run/lora) == the trained policy."""
    from diffusers import StableDiffusionPipeline

    captured = {}
    real_load = loop.load_models

    def spy(*args, **kwargs):
        captured["models"] = real_load(*args, **kwargs)
        return captured["models"]

    monkeypatch.setattr(loop, "load_models", spy)
    run = run_main(tmp_path, tiny_model, "run", algo="reinforce", lr=0.05, eval_every=5)
    models = captured["models"]
    cfg = loop.Config(num_steps=3, guidance_scale=guidance_scale)
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    prompts, shape = PROMPTS[:3], (3, *models.latent_shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    # the pipeline draws each step's noise from its generator in this order
    gen = torch.Generator().manual_seed(6)
    step_noise = torch.stack([torch.randn(shape, generator=gen) for _ in range(3)], 1)
    cond = loop.encode_prompts(models.tokenizer, models.text_encoder, prompts)
    ema = torch.load(run / "checkpoint" / "state.pt", weights_only=False)["ema"]
    with loop.swapped_in(loop.lora_parameters(models.unet), ema):  # lora/ holds the EMA
        latents, _ = loop.sample_trajectories(policy, cond, x_T, step_noise)
    ours = loop.decode_images(models.vae, latents[:, -1])

    def stock(with_lora):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
        if with_lora:
            pipe.load_lora_weights(str(run / "lora"))
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompts,
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            eta=cfg.eta,
            latents=x_T.clone(),
            generator=torch.Generator().manual_seed(6),
            output_type="pt",
        ).images

    with_lora, without = stock(True), stock(False)
    torch.testing.assert_close(with_lora, ours, atol=1e-6, rtol=0)
    assert (without - ours).abs().max() > 1e-3  # the LoRA changed the images: the test can fail


def test_min_train_sigma_trains_only_the_noisier_steps(tiny_model, monkeypatch):
    """Deviation 10: steps with sigma_t < min_train_sigma are sampled but never re-scored."""
    models = load(tiny_model)
    cfg = tiny_config(algo="loop", num_steps=5)
    policy, batch, reward = fresh_rollout(models, cfg)
    sigma = policy.schedule.sigma_t
    cfg.min_train_sigma = float(sigma.sort().values[2])  # between the 2nd and 3rd smallest
    expected = {j for j in range(cfg.num_steps) if sigma[j] >= cfg.min_train_sigma}
    assert 0 < len(expected) < cfg.num_steps
    seen, rescore = [], loop.rescore
    monkeypatch.setattr(
        loop, "rescore", lambda p, b, rows, j: seen.append(j) or rescore(p, b, rows, j)
    )
    advantage = loop.compute_advantages("loop", reward.view(-1, cfg.k), "off", 5.0)
    optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=1e-3)
    sizes = loop_utils.check_config(cfg, world=1)
    loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, random.Random(0), sizes)
    assert set(seen) == expected


def test_lora_modules_selects_the_adapted_layers(tiny_model):
    models = loop.load_models(
        str(tiny_model), torch.device("cpu"), torch.float32, 4, 0, "attn2.to_k"
    )
    names = [n for n, p in models.unet.named_parameters() if p.requires_grad]
    assert names and all("attn2.to_k.lora" in n for n in names)
    everywhere = load(tiny_model)
    assert len(loop.lora_parameters(everywhere.unet)) > len(names)
    with pytest.raises(loop_utils.UsageError, match="--lora_modules"):
        loop.load_models(str(tiny_model), torch.device("cpu"), torch.float32, 4, 0, "no_such_layer")


def test_each_held_out_prompt_is_scored_with_several_noises(tmp_path, tiny_model):
    run = run_main(tmp_path, tiny_model, "run", num_eval_prompts=3, eval_images_per_prompt=2)
    lines = (run / "samples" / "eval_epoch_0000.txt").read_text().splitlines()
    prompts = [line.split(" | ")[0] for line in lines]
    assert len(prompts) == 6 and prompts[0::2] == prompts[1::2] and len(set(prompts)) == 3


def test_saved_lora_is_the_ema_and_training_continues_from_the_raw_weights(tmp_path, tiny_model):
    """--ema_decay d: lora/ holds the checkpoint's EMA, not the raw LoRA weights it also keeps."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    run = run_main(tmp_path, tiny_model, "ema", epochs=2, ema_decay=0.5)
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=False)
    in_file = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    saved = {key.removeprefix("unet."): value for key, value in in_file.items()}
    models = load(tiny_model, rank=loop.Config.lora_rank)

    def in_diffusers_format():  # copies: the state dict's tensors share the weights' storage
        state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet))
        return {key: value.clone() for key, value in state_dict.items()}

    with loop.swapped_in(loop.lora_parameters(models.unet), state["ema"]):
        ema = in_diffusers_format()
    set_peft_model_state_dict(models.unet, state["lora"])
    raw = in_diffusers_format()
    assert saved.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(saved[key], ema[key]) for key in saved)
    assert not all(torch.allclose(saved[key], raw[key]) for key in saved)


def fp16_gradient_norm(tiny_model, scaler) -> float:
    """The LoRA gradient norm of one update with fp16 frozen weights. The advantages are scaled
    to 1e-6 so that, at 8x8x4 latents, the gradient reaching the UNet output is as small as at
    SD 2's 64x64x4 with advantages of order 1 (log pi a mean over 16,384 dimensions)."""
    models = loop.load_models(str(tiny_model), torch.device("cpu"), torch.float16, 4, 0)
    cfg = tiny_config(algo="loop", min_train_sigma=0.0)
    policy, batch, _ = fresh_rollout(models, cfg)
    advantage = 1e-6 * torch.randn(8, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=1e-3)
    sizes = loop_utils.check_config(cfg, world=1)
    stats = loop.train_on_rollout(
        policy, batch, advantage, cfg, optimizer, random.Random(0), sizes, scaler=scaler
    )
    return stats["grad_norm"]


def test_fp16_learns_only_with_the_loss_scaler(tiny_model):
    """Without a loss scaler fp16's backward underflows silently (no NaN warns): on most CPUs to an
    exactly zero LoRA gradient, on some (CI's) to about half of the true one. loop.main scales the
    loss for fp16, and unscales before the gradient clip: then the gradient is the fp32 one."""
    unscaled = fp16_gradient_norm(tiny_model, None)
    scaled = fp16_gradient_norm(tiny_model, torch.amp.GradScaler("cpu"))
    assert scaled > 0
    models = load(tiny_model)  # fp32: the gradient the scaled fp16 one approximates
    cfg = tiny_config(algo="loop", min_train_sigma=0.0)
    policy, batch, _ = fresh_rollout(models, cfg)
    advantage = 1e-6 * torch.randn(8, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(loop.lora_parameters(models.unet), lr=1e-3)
    sizes = loop_utils.check_config(cfg, world=1)
    fp32 = loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, random.Random(0), sizes)
    assert scaled == pytest.approx(fp32["grad_norm"], rel=0.3)  # unscaled: the true units
    assert unscaled < 0.7 * fp32["grad_norm"]  # without the scaler, much of the gradient is lost


def test_an_epoch_with_an_exactly_zero_gradient_is_warned_about(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """A constant reward gives LOOP zero advantages: nothing is learned, and the run says so."""
    constant = lambda images, prompts: torch.zeros(len(prompts))
    monkeypatch.setattr(rewards, "load_reward", lambda name, device, **options: constant)
    run = run_main(tmp_path, tiny_model, "zero", epochs=1, algo="loop")
    assert metrics(run)[-1]["grad_norm"] == 0.0
    assert "the LoRA gradient was exactly zero" in capsys.readouterr().out


def test_first_ratio_check_at_start_up(tiny_model, capsys, monkeypatch):
    """Re-scoring a fresh micro-batch with grad reproduces sampling: max |log rho_t| is printed
    (0 on the CPU); a re-scoring path that differs (as other GPU kernels may) is warned about."""
    models = load(tiny_model)
    perturb_lora(models)
    cfg = tiny_config()
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    steps = loop.trained_steps(policy.schedule, 0.0)
    assert loop.check_first_ratio(models, policy, PROMPTS[:4], steps, show=True) == 0.0
    out = capsys.readouterr()
    assert "max |log rho_t| = 0.00e+00" in out.out and "warning" not in out.err
    real = loop.guided_noise_prediction

    def other_kernels(*args):  # with grad (re-scoring) the prediction moves by 1e-3
        return real(*args) + (1e-3 if torch.is_grad_enabled() else 0.0)

    monkeypatch.setattr(loop, "guided_noise_prediction", other_kernels)
    assert loop.check_first_ratio(models, policy, PROMPTS[:4], steps) > 1e-6
    assert "warning: re-scoring a fresh rollout gives max |log rho_t|" in capsys.readouterr().err


def test_rollout_keeps_its_images_off_the_training_device(tiny_model):
    """Training needs latents, log-probs and prompts; the decoded images (fp32, 512 px at SD 2
    scale) go to the CPU after scoring instead of staying on the GPU all epoch."""
    models = load(tiny_model)
    cfg = tiny_config()
    _, batch, _ = fresh_rollout(models, cfg)
    assert batch.images.device.type == "cpu" and batch.images.shape[0] == 8
    assert batch.latents.device == models.device


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 0), torch.float32), ((8, 0), torch.bfloat16)]
)
def test_auto_precision_picks_bf16_only_where_the_gpu_computes_in_it(
    monkeypatch, capability, expected
):
    """V100 (7.0) and T4 (7.5) report bf16 as supported but emulate it: auto picks fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert loop_utils.weight_dtype_for("auto", torch.device("cuda:0")) == expected
    assert loop_utils.weight_dtype_for("auto", torch.device("cpu")) == torch.float32
    assert loop_utils.weight_dtype_for("fp16", torch.device("cuda:0")) == torch.float16


def test_each_rank_sets_its_cuda_device(monkeypatch):
    """torchrun's LOCAL_RANK picks the GPU, and the rank makes it current (NCCL's object
    collectives and any bare .cuda() use the current device)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop_utils.setup_distributed(loop.Config(device="cuda"))[2] == torch.device("cuda:1")
    assert chosen == [torch.device("cuda:1")]


def test_gradient_checkpointing_gives_the_same_update(tiny_model):
    """--gradient_checkpointing recomputes the UNet's activations in backward instead of keeping
    them: the same LoRA after an update, bit for bit on the CPU (and ~1.5x the update's time,
    measured on the embedded model at one thread)."""
    cfg = tiny_config(algo="loop")
    sizes = loop_utils.check_config(cfg, 1)
    after = []
    for checkpointing in (False, True):
        models = loop.load_models(str(tiny_model), torch.device("cpu"), torch.float32, 4, 0,
                                  cfg.lora_modules, checkpointing)  # fmt: skip
        assert models.unet.is_gradient_checkpointing == checkpointing
        perturb_lora(models)
        policy, batch, reward = fresh_rollout(models, cfg)
        advantage = loop.compute_advantages("loop", reward.view(-1, cfg.k), "auto", 5.0)
        params = loop.lora_parameters(models.unet)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loop.train_on_rollout(policy, batch, advantage, cfg, optimizer, random.Random(0), sizes)
        after.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(after[0], after[1]))
