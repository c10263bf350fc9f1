"""Shared test fixtures: a tiny Stable-Diffusion pipeline built from configs, saved to a tmp folder.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are randomly initialised from small configs, the
CLIP tokenizer is built from a 55-token character vocabulary, and the scheduler is a DDIMScheduler with
Stable Diffusion 2-base's config. `save_tiny_pipeline` writes the folder with `save_pretrained`, so loop.py
loads it through its normal `from_pretrained` path, exactly like a real model folder.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests run on CPU next to other jobs: one thread keeps them predictable.
torch.set_num_threads(1)

# Stable Diffusion 2-base's scheduler_config.json (the DDIM settings that matter for the last step).
SD2_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

PROMPTS = ["a red cube", "a blue ball", "a green cone", "two red balls", "a cat", "a dog"]


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over lowercase characters (every word becomes letters + an end-of-word letter)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits + ",.!":
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # from the files, as transformers 4.x and 5.x both read them
    return CLIPTokenizer.from_pretrained(folder, model_max_length=16)


def build_tiny_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0):
    """A randomly initialised StableDiffusionPipeline: 8x8x4 latents, 16x16 images, 1-layer CLIP."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    tokenizer = tiny_tokenizer(tmp / "tokenizer_src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(**{**SD2_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    pipe = build_tiny_pipeline(folder.parent, prediction_type)
    pipe.save_pretrained(folder)
    return folder


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of a tiny epsilon-prediction SD pipeline (SD2-base scheduler config)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory) -> Path:
    """Same as tiny_model but with v-prediction (like stable-diffusion-2 at 768px)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "tiny-sd-v", "v_prediction")


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "train.txt")


def subprocess_env() -> dict:
    """Environment for running loop.py in a subprocess: one thread, offline, repo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
