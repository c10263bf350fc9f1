"""Train the embedded default model: a tiny Stable-Diffusion-format pipeline for the shapes world.

One-time, offline, CPU (not run in CI). Produces a complete diffusers folder (VAE, UNet, CLIP text encoder,
CLIP tokenizer, DDIM scheduler, model_index.json) that `StableDiffusionPipeline.from_pretrained` loads, and
that loop.py loads with the very code it uses for `stabilityai/stable-diffusion-2-base`.

    python shapes_world/train.py --out runs/tiny-train                  # stages 1-4, ~70 min
    python shapes_world/train.py --out runs/tiny-train --seed 1 \
        --finetune_decoder runs/tiny-train/step_000500                           # stage 2b, ~8 min
    python shapes_world/train.py --out runs/tiny-train --ship step_NNNNNN   # copy + calibrate

The texture model (shapes_world/tiny-shapes-texture, bench/record.md "Texture"): --latent_factor 8 --vae_only
--vae_steps 2400 --seed 0; --continue_from OUT/vae_stage --lr 1e-3 --steps 4000 --eval_every 500 --scenes 16384
--seed 1 --category texture; --ship step_004000 --ship_to shapes_world/tiny-shapes-texture --category texture.

Stages (all from a fixed seed, on procedurally rendered (prompt, image) pairs of shapes_world/__init__.py):
1. the tokenizer: a CLIP BPE vocabulary in which every word of the world is one token;
2. the VAE (64x64x3 pixels <-> 16x16x4 latents, or 8x8x4 with --latent_factor 8 as the shipped
   model), trained on reconstruction + a tiny KL term, then its
   `scaling_factor` set to 1 / std of the latents as in Stable Diffusion;
3. the UNet and the text encoder, trained together from scratch with the epsilon-prediction loss of
   SD (10% of captions dropped, for classifier-free guidance), with an EMA of the weights;
2b. the decoder alone, fine-tuned on texture-rich scenes (encoder frozen, so the latent space the UNet
   learned is unchanged): the short first stage blurs stripes and dots away;
4. every `eval_every` steps a snapshot of the EMA pipeline is saved and scored with the exact judges on
   held-out two-object color prompts and on single-object prompts (the calibration numbers); the snapshot
   to ship is picked from the "calibration" rows of `train_log.jsonl` so that binding stays genuinely hard (color score 0.35..0.65)
   while single objects are drawn right at least 85% of the time.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time

import fire
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import itertools

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import shapes_world as W

MAX_TOKENS = (
    16  # longest prompt: "a striped red triangle on the right of a dotted blue square" = 12 + 2
)
SAMPLER = {
    "num_inference_steps": 10,
    "guidance_scale": 5.0,
    "eta": 1.0,
}  # the sampler the model was calibrated and picked with (loop.py's default until 2026-12)
RL_SAMPLER = {
    "num_inference_steps": 6,
    "guidance_scale": 5.0,
    "eta": 1.0,
}  # loop.py's default policy since 2026-12 (fewer, cheaper steps): calibrated as well


# ----------------------------------------------------------------------------------------------------
# 1. Tokenizer: a real CLIP BPE vocabulary, one token per word of the world
# ----------------------------------------------------------------------------------------------------
def world_words() -> list[str]:
    words = {"a", "an", "and", "on", "the", "left", "right", "of", "above", "below"}
    words |= set(W.COLORS) | set(W.SHAPES) | set(W.TEXTURES)
    return sorted(words)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the base alphabet of the BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: repeatedly merge the adjacent pair of lowest rank."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_tokenizer(folder: str) -> CLIPTokenizer:
    """Write vocab.json + merges.txt whose merges build each world word into a single token."""
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in world_words():
        # add the merge of the first adjacent pair of the word's current segmentation until it is one token
        while len(symbols := bpe(word, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.append(symbols[0] + symbols[1])
    merges = [" ".join(pair) for pair in sorted(ranks, key=ranks.get)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )
    for word in world_words():  # every word must be a single token
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# 2. The models, small configs of Stable Diffusion's classes
# ----------------------------------------------------------------------------------------------------
def build_models(
    vocab_size: int, latent_factor: int = 4
) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """latent_factor: the VAE's downsampling per side, 4 (64 px -> 16x16x4, the first model) or 8
    (64 px -> 8x8x4, Stable Diffusion's factor, the shipped model: one more encoder/decoder block)."""
    if latent_factor not in (4, 8):
        raise ValueError(f"latent_factor must be 4 or 8, got {latent_factor}")
    blocks = (16, 32, 64) if latent_factor == 4 else (16, 32, 64, 64)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=W.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=W.SIZE // latent_factor,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return vae, unet, text_encoder


def scheduler_config() -> dict:
    """Stable Diffusion 2 base's noise schedule and DDIM settings."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    }


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
CATEGORY_MIX = {
    "single": 0.3,
    "color": 0.2,
    "shape": 0.15,
    "texture": 0.1,
    "spatial": 0.25,
}


def scene_batch(
    rng: random.Random, n: int, mix: dict[str, float] = CATEGORY_MIX
) -> tuple[torch.Tensor, list[str]]:
    """n random training scenes (val phrase combinations never drawn): images (n, 3, 64, 64) in [0, 1]."""
    categories = rng.choices(list(mix), weights=list(mix.values()), k=n)
    scenes = [W.random_scene(c, rng, split="train") for c in categories]
    images = torch.stack([W.to_tensor(W.render(objects)) for _, objects in scenes])
    return images, [prompt for prompt, _ in scenes]


# ----------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------
def train_vae(
    vae: AutoencoderKL, rng: random.Random, steps: int, batch: int, lr: float, log
) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae")
    for step in bar:
        images, _ = scene_batch(rng, batch)
        x = images * 2 - 1  # (B, 3, 64, 64) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # loss = L1 + MSE reconstruction + 1e-6 * KL(q(z|x) || N(0, I)), SD's tiny KL weight
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            log({"stage": "vae", "step": step, "loss": loss.item()})


def finetune_decoder_stage(
    vae: AutoencoderKL,
    rng: random.Random,
    steps: int,
    batch: int,
    lr: float,
    log,
    categories: tuple[str, ...] = ("single", "texture"),
) -> None:
    """Stage 2b: train the decoder alone (encoder frozen, so the latent space the UNet learned is
    unchanged) on scenes drawn equally from `categories`: for the shipped model single objects and
    textures, which the short first VAE stage blurs away."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="decoder")
    for step in bar:
        images, _ = scene_batch(rng, batch, mix=dict.fromkeys(categories, 1.0))
        x = images * 2 - 1  # (B, 3, 64, 64) in [-1, 1]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            log({"stage": "decoder", "step": step, "loss": loss.item()})
    vae.requires_grad_(True)


@torch.no_grad()
def reconstruction_scores(vae: AutoencoderKL, rng: random.Random, n: int = 64) -> dict:
    """Exact-judge scores of clean renders and of their VAE reconstructions (the VAE must keep them)."""
    result = {}
    for category in W.CATEGORIES:
        scenes = [W.random_scene(category, rng, split=None) for _ in range(n)]
        images = torch.stack([W.to_tensor(W.render(objects)) for _, objects in scenes])
        prompts = [prompt for prompt, _ in scenes]
        recon = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2
        result[category] = W.score(images, prompts, category).mean().item()
        result[category + "_recon"] = W.score(recon.clamp(0, 1), prompts, category).mean().item()
    return result


@torch.no_grad()
def latent_std(vae: AutoencoderKL, rng: random.Random) -> float:
    images, _ = scene_batch(rng, 256)
    return vae.encode(images * 2 - 1).latent_dist.mean.std().item()


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(ids.input_ids)[0]  # (B, MAX_TOKENS, 64)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def save_pipeline(folder: str, vae, unet, text_encoder, tokenizer) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "shapes_world.json"), "w") as f:
        json.dump(
            {"world": "shapes", "size": W.SIZE, "categories": list(W.CATEGORIES)},
            f,
            indent=1,
        )


@torch.no_grad()
def calibrate(
    folder: str, seeds: int = 2, sampler: dict = SAMPLER, category: str = "color"
) -> dict:
    """Exact-judge scores of a saved pipeline: the category's held-out two-object prompts ("color_val",
    or "texture_val" for a texture model) and single objects ("single": "a red circle", as the training
    scenes name them; for texture every texture too, its phrase judged with the texture named even
    where the prompt, as in training, leaves "solid" out)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with open(os.path.join(W.PROMPT_DIR, f"{category}_val.txt")) as f:
        pairs = f.read().split("\n")[:-1]
    textures = W.TEXTURES if category == "texture" else ("solid",)
    singles = [W.Obj(c, s, t, 0, 0, 0) for t in textures for c in W.COLORS for s in W.SHAPES]
    single_prompts = [f"a {W.phrase_text(o, with_texture=o.texture != 'solid')}" for o in singles]
    single_judged = [f"a {W.phrase_text(o, with_texture=category == 'texture')}" for o in singles]
    result = {}
    for name, prompts, judged in [
        (f"{category}_val", pairs, pairs),
        ("single", single_prompts, single_judged),
    ]:
        generator = torch.Generator().manual_seed(0)
        images = pipe(
            prompts * seeds, generator=generator, output_type="pt", **sampler
        ).images  # (N, 3, 64, 64)
        scores = W.score(images, judged * seeds, category)
        result[name] = scores.mean().item()
        result[name + "_correct"] = (scores > 0.5).float().mean().item()
    return result


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, rng: random.Random, n: int, chunk: int = 256):
    """Render n training scenes once and keep their VAE posteriors: means, stds (n, 4, 16, 16), prompts."""
    means, stds, prompts = [], [], []
    for _ in tqdm(range(0, n, chunk), desc="encode scenes"):
        images, batch_prompts = scene_batch(rng, chunk)
        posterior = vae.encode(images * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        prompts += batch_prompts
    return torch.cat(means), torch.cat(stds), prompts


def train_diffusion(
    vae,
    unet,
    text_encoder,
    tokenizer,
    rng,
    out,
    steps,
    batch,
    lr,
    eval_every,
    max_minutes,
    log,
    n,
    first_step=1,
    category="color",
):
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())  # the DDIM sampler's betas
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    vae.eval().requires_grad_(False)
    means, stds, all_prompts = encode_dataset(vae, rng, n)
    start = time.time()
    bar = tqdm(range(first_step, steps + 1), desc="unet+text")
    for step in bar:
        index = torch.randint(0, len(all_prompts), (batch,))
        prompts = [
            all_prompts[i] if rng.random() > 0.1 else "" for i in index
        ]  # 10% unconditional, for CFG
        # z ~ q(z | x) = N(mean, std^2), scaled to unit variance as in SD: (B, 4, 16, 16)
        latents = (
            means[index] + stds[index] * torch.randn_like(means[index])
        ) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        # x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps ; loss = || eps - eps_theta(x_t, t, c) ||^2
        noisy = noise_scheduler.add_noise(latents, noise, t)
        eps_pred = unet(noisy, t, encode_text(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(eps_pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = (
            0.999 if step > first_step + 1000 else 0.99
        )  # short memory while the weights move fast
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            log(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": loss.item(),
                    "minutes": (time.time() - start) / 60,
                }
            )
        last = step == steps or (time.time() - start) / 60 > max_minutes
        if step % eval_every == 0 or last:
            folder = os.path.join(out, f"step_{step:06d}")
            save_pipeline(folder, vae, ema_unet, ema_text, tokenizer)
            scores = calibrate(folder, category=category)
            log(
                {
                    "stage": "calibration",
                    "step": step,
                    "minutes": (time.time() - start) / 60,
                    **scores,
                }
            )
            tqdm.write(f"step {step}: {scores}")
        if last:
            break


def main(
    out: str = "runs/tiny-train",
    seed: int = 0,
    vae_steps: int = 600,
    vae_batch: int = 32,
    steps: int = 20000,
    batch: int = 64,
    vae_lr: float = 2e-3,
    lr: float = 5e-4,
    eval_every: int = 500,
    max_minutes: float = 55.0,
    scenes: int = 32768,
    threads: int = 1,
    continue_from: str | None = None,
    finetune_decoder: str | None = None,
    decoder_steps: int = 700,
    ship: str | None = None,
    ship_to: str = "shapes_world/tiny-shapes",
    latent_factor: int = 4,
    vae_only: bool = False,
    decoder_scenes: str = "single,texture",
    category: str = "color",
) -> None:
    """Train the tiny pipeline (see the module docstring).

    --finetune_decoder SNAPSHOT: stage 2b only, on SNAPSHOT's VAE; saves it to OUT/decoder; its scenes
      are drawn equally from the categories of --decoder_scenes (single,texture for the shipped model).
    --continue_from SNAPSHOT: stage 3 again from SNAPSHOT's weights (a fresh optimizer), numbering steps on.
    --ship SNAPSHOT: copy OUT/SNAPSHOT to `ship_to`, with OUT/decoder as its VAE when it exists.
    --latent_factor 8: a VAE that compresses 8x per side (8x8x4 latents) and a UNet for that size.
    --vae_only: stop after the VAE stage; OUT/vae_stage is a pipeline with the trained VAE and an
      untrained UNet (for measuring reconstruction and the cost of a UNet call at that latent size).
    --category texture: the snapshots and the shipped model are calibrated on texture prompts (held-out
      two-object texture prompts, single objects of every texture), not on color ones.
    """
    if category not in ("color", "texture"):
        raise ValueError(f"--category {category!r}: calibrate on color or texture")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # 1: two busy threads on a shared 2-core machine run 5x slower
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "train_log.jsonl")

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if ship is not None:
        shutil.rmtree(ship_to, ignore_errors=True)
        shutil.copytree(os.path.join(out, ship), ship_to)
        if os.path.isdir(os.path.join(out, "decoder")):
            shutil.rmtree(os.path.join(ship_to, "vae"))
            shutil.copytree(os.path.join(out, "decoder"), os.path.join(ship_to, "vae"))
        scores = calibrate(ship_to, category=category)
        rl_scores = calibrate(ship_to, sampler=RL_SAMPLER, category=category)
        marker = os.path.join(ship_to, "shapes_world.json")
        with open(marker) as f:
            info = json.load(f)
        info.update(step=int(ship.split("_")[-1]), calibration={**SAMPLER, **scores})
        info.update(calibration_rl={**RL_SAMPLER, **rl_scores})
        with open(marker, "w") as f:
            json.dump(info, f, indent=1)
        log({"stage": "shipped", "snapshot": ship, **scores})
        print(f"shipped {os.path.join(out, ship)} -> {ship_to}: {scores}")
        return
    if finetune_decoder is not None:
        vae = AutoencoderKL.from_pretrained(os.path.join(finetune_decoder, "vae"))
        t0 = time.time()
        categories = (
            tuple(decoder_scenes.split(",")) if isinstance(decoder_scenes, str) else decoder_scenes
        )
        finetune_decoder_stage(vae, rng, decoder_steps, vae_batch, 5e-4, log, categories)
        recon = reconstruction_scores(vae, random.Random(seed + 1))
        log({"stage": "decoder_done", "minutes": (time.time() - t0) / 60, **recon})
        vae.save_pretrained(os.path.join(out, "decoder"), safe_serialization=True)
        print(f"decoder fine-tuned in {(time.time() - t0) / 60:.1f} min: {recon}")
        return
    if continue_from is not None:
        pipe = StableDiffusionPipeline.from_pretrained(continue_from)
        with open(
            os.path.join(continue_from, "shapes_world.json")
        ) as f:  # the shipped model says its step
            step = json.load(f).get("step")
        name = os.path.basename(os.path.normpath(continue_from))  # step_NNNNNN, or vae_stage
        first = (step or (int(name.split("_")[-1]) if name.startswith("step_") else 0)) + 1
        log({"stage": "continue", "from": continue_from, "threads": threads})
        train_diffusion(
            pipe.vae,
            pipe.unet.train(),
            pipe.text_encoder.train(),
            pipe.tokenizer,
            rng,
            out,
            steps,
            batch,
            lr,
            eval_every,
            max_minutes,
            log,
            scenes,
            first_step=first,
            category=category,
        )
        return
    t0 = time.time()
    tokenizer = build_tokenizer(os.path.join(out, "tokenizer_src"))
    vae, unet, text_encoder = build_models(len(tokenizer), latent_factor)
    models = [("vae", vae), ("unet", unet), ("text", text_encoder)]
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in models}
    print(f"parameters: {sizes}")
    config = {"seed": seed, "vae_steps": vae_steps, "steps": steps, "batch": batch,
              "latent_factor": latent_factor}  # fmt: skip
    log({"stage": "start", "parameters": sizes, "config": config})
    train_vae(vae, rng, vae_steps, vae_batch, vae_lr, log)
    recon = reconstruction_scores(vae, random.Random(seed + 1))
    print(f"judge scores on clean renders vs their VAE reconstructions: {recon}")
    log({"stage": "vae_reconstruction", **recon})
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, rng))
    log(
        {
            "stage": "vae_done",
            "scaling_factor": vae.config.scaling_factor,
            "minutes": (time.time() - t0) / 60,
        }
    )
    if vae_only:
        save_pipeline(os.path.join(out, "vae_stage"), vae, unet, text_encoder, tokenizer)
        print(f"VAE stage in {(time.time() - t0) / 60:.1f} min: {out}/vae_stage")
        return
    train_diffusion(
        vae,
        unet,
        text_encoder,
        tokenizer,
        rng,
        out,
        steps,
        batch,
        lr,
        eval_every,
        max_minutes,
        log,
        scenes,
        category=category,
    )
    log({"stage": "done", "minutes": (time.time() - t0) / 60})
    print(f"done in {(time.time() - t0) / 60:.1f} min; calibration in {out}/train_log.jsonl")


if __name__ == "__main__":
    fire.Fire(main)
