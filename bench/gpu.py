"""Stable Diffusion 2 base at full size, random weights, no download: what one GPU does per second.

Builds the SD 2 base UNet, VAE and text encoder from their public configs (written out below, from
stabilityai/stable-diffusion-2-base's */config.json), with random weights, saves them as a diffusers
folder and loads that with loop.load_models (the real path: frozen bf16 weights, fp32 LoRA on the
attention), then runs bench/cost.py's side-by-side measurement at 512 px, K = 4, with the GPU
quickstart's settings (SD2_FLAGS, from loop.py's docstring; a test keeps them in step) and reports:
images/s of sampling (loop.rollout) and of the update phase (loop.train_on_rollout), peak GPU memory
(torch.cuda.max_memory_allocated), the update phase as a multiple of the bare UNet forward+backward
over the same (sample, step) pairs, and loop's sampler against diffusers' pipeline.
Random weights change no cost: the work per step does not depend on the values.

    python bench/gpu.py                 # one GPU: 32 images (8 prompts x K = 4), 50 steps, bf16
    python bench/gpu.py --tiny          # CPU, the same architecture scaled down, seconds (tests)
Writes gpu.json and gpu.md to --results. The tokenizer is a character-level CLIP tokenizer (the
real one needs a download); prompts are short, so sequence length (77) and cost are the same.
"""

from __future__ import annotations

import json
import re
import string
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
from bench.common import BenchError, cli_main, markdown_table
from bench.cost import side_by_side

# stabilityai/stable-diffusion-2-base: unet/config.json (fields that differ from diffusers' defaults)
SD2_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
# vae/config.json
SD2_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# text_encoder/config.json (OpenCLIP ViT-H/14's text tower, penultimate layer: 23 layers)
SD2_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# scheduler/scheduler_config.json
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
# Public parameter counts of those modules (a test builds them on the meta device and compares)
SD2_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
# The GPU quickstart of loop.py's docstring (the paper's settings), except the images per epoch
SD2_FLAGS = {
    "num_steps": 50,
    "guidance_scale": 7.5,
    "micro_batch": 8,
    "lr": 3e-4,
    "min_train_sigma": 0.0,
    "ema_decay": 0.0,
}
# --tiny: the same architecture scaled down (4 levels, same block types), 32 px, CPU
TINY_UNET = {"sample_size": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
             "attention_head_dim": [2, 2, 4, 4], "cross_attention_dim": 16, "norm_num_groups": 4}  # fmt: skip
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 32}  # fmt: skip
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "projection_dim": 16}  # fmt: skip
TINY_FLAGS = {"num_steps": 2, "micro_batch": 2, "min_train_sigma": 0.0}
PROMPTS = ["a red cube and a blue ball", "a green cone on the left of a white cat"]


def char_tokenizer(folder: Path, max_length: int):
    """A CLIPTokenizer over characters (the real BPE vocabulary needs a download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}  # ids as SD 2's tokenizer: pad = 1
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits + ",.":
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token="!")


def configs(tiny: bool) -> tuple[dict, dict, dict]:
    """UNet, VAE and text-encoder configs: SD 2 base, or its scaled-down copy."""
    if not tiny:
        return SD2_UNET, SD2_VAE, SD2_TEXT
    return SD2_UNET | TINY_UNET, SD2_VAE | TINY_VAE, SD2_TEXT | TINY_TEXT


def build_random_pipeline(folder: Path, tiny: bool, device: torch.device) -> Path:
    """Random-weight SD 2 base (or tiny) saved as a diffusers folder that loop.load_models reads."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config, vae_config, text_config = configs(tiny)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: an SD 2 UNet inits in seconds on a GPU
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    tokenizer = char_tokenizer(
        folder.parent / "tokenizer_src", text_config["max_position_embeddings"]
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD2_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(folder)
    del pipe, unet, vae, text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def main(
    tiny: bool = False,
    images: int = 32,
    k: int = 4,
    repeats: int = 2,
    device: str = "auto",
    results: str = "bench/results",
) -> dict:
    """Build, load, measure; writes gpu.json and gpu.md and returns the report."""
    if images < k or images % k or k < 2:
        raise BenchError(f"--images {images} must be a multiple of --k {k} >= 2")
    flags = SD2_FLAGS | TINY_FLAGS if tiny else SD2_FLAGS
    precision = "no" if tiny else "bf16"
    cfg = loop.Config(algo="loop", k=k, images_per_epoch=images, mixed_precision=precision,
                      device="cpu" if tiny else device, **flags)  # fmt: skip
    loop.check_config(cfg, 1)
    torch.set_flush_denormal(True)
    dev = loop.setup_distributed(cfg)[2]
    if not tiny and dev.type != "cuda":
        raise BenchError("no GPU here: run with --tiny on a CPU, or on a machine with CUDA")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = build_random_pipeline(Path(tmp) / "sd2-random", tiny, dev)
        models = loop.load_models(
            str(folder),
            dev,
            loop.weight_dtype_for(precision, dev),
            cfg.lora_rank,
            0,
            cfg.lora_modules,
        )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images // k) for _ in range(k)]
    measured = side_by_side(models, cfg, prompts, repeats)
    s, u = measured["sampling"], measured["update"]
    report = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "tiny": tiny, "resolution": models.resolution, "dtype": str(models.unet.dtype),
        "lora_parameters": sum(p.numel() for p in loop.lora_parameters(models.unet)),
        "images": images, "k": k, "flags": flags,
        "sampling_images_per_s": images / s["ours_s"],
        "update_images_per_s": images / u["ours_s"],
        "update_over_bare_fwd_bwd": u["ratio"], "sampling_over_diffusers": s["ratio"],
        "max_abs_image_diff": measured["max_abs_image_diff"],
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }  # fmt: skip
    write_results(report, Path(results))
    return report


def write_results(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu.json").write_text(json.dumps(report, indent=2))
    peak = report["peak_gpu_memory_gb"]
    rows = [
        ["sampling (loop.rollout)", f"{report['sampling_images_per_s']:.2f}"],
        ["update (loop.train_on_rollout)", f"{report['update_images_per_s']:.2f}"],
        ["update / bare UNet fwd+bwd", f"{report['update_over_bare_fwd_bwd']:.3f}x"],
        ["loop sampler / StableDiffusionPipeline", f"{report['sampling_over_diffusers']:.3f}x"],
        ["peak GPU memory", "n/a (CPU)" if peak is None else f"{peak:.1f} GB"],
    ]
    head = (
        f"{'tiny SD 2 architecture' if report['tiny'] else 'SD 2 base (random weights)'}, "
        f"{report['resolution']} px, {report['dtype']}, LoRA {report['lora_parameters']} weights, "
        f"{report['images']} images, K = {report['k']}, {report['flags']}, on {report['device']}"
    )
    text = head + "\n\n" + markdown_table(["", "images / s or ratio"], rows)
    (results / "gpu.md").write_text(text)
    print(text)


def quickstart_flags() -> dict:
    """The --flag value pairs of loop.py's GPU quickstart (its docstring), as numbers where numeric."""
    quickstart = (loop.__doc__ or "").split("Quickstart:")[-1].split("Deviations")[0]
    flags = {}
    for name, value in re.findall(r"--(\w+) (\S+)", quickstart):
        try:
            flags[name] = float(value)
        except ValueError:
            flags[name] = value
    return flags


if __name__ == "__main__":
    import fire

    fire.Fire(lambda **flags: cli_main(main, **flags))
