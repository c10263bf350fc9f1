"""The one script a GPU session runs: Stable Diffusion 2 base at full size, random weights, no download.

Builds the SD 2 base UNet, VAE and text encoder from their public configs (written out below, from
stabilityai/stable-diffusion-2-base's */config.json), with random weights, saves them as a diffusers
folder, and measures, at 512 px, K = 4, with the GPU quickstart's settings (SD2_FLAGS, from the README's
GPU command; a test keeps them in step):
1. a short real run: loop.main for --epochs epochs (jpeg_compressibility reward, held-out score of
   --images / K prompts before and after): seconds per epoch (the last, without its held-out score;
   also scaled to the quickstart's 256 images) and peak GPU memory (torch.cuda.max_memory_allocated);
2. the first importance ratio: a fresh micro-batch re-scored with grad (loop.check_first_ratio),
   max |log rho_t| against loop.RATIO_TOLERANCE (on a CPU exactly 0; a GPU may differ);
3. bench/cost.py's side-by-side floors: images/s of sampling (loop.rollout) against diffusers'
   StableDiffusionPipeline over the same modules and noise (target <= 1.05x), and of the update
   phase (loop.train_on_rollout) against the bare UNet forward+backward over the same (sample, step)
   pairs (target <= 1.15x); peak GPU memory of this part too.
Random weights change no cost: the work per step does not depend on the values.

    python bench/gpu.py                 # one GPU: 16 images (4 prompts x K = 4), 50 steps, ~5 min (est.)
    python bench/gpu.py --micro_batch 4 # what a 24 GB card should try if 8 does not fit
    python bench/gpu.py --tiny          # CPU, the same architecture scaled down, seconds (tests)
Writes gpu.json and gpu.md to --results (default runs/bench/results, untracked). The tokenizer is a
character-level CLIP tokenizer (the real one needs a download); prompts are padded to 77 tokens, so
sequence length and cost are the same.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
import loop_utils
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
# The README's GPU command (the paper's settings), except the images per epoch
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


def short_run(folder: Path, cfg: loop.Config, epochs: int, work: Path) -> dict:
    """loop.main on the random pipeline: seconds of its last epoch, the run's peak GPU memory."""
    prompts = work / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    run_cfg = dataclasses.replace(cfg, model=str(folder), reward="jpeg_compressibility",
        train_prompts=str(prompts), epochs=epochs, eval_every=epochs, out=str(work / "run"),
        num_eval_prompts=cfg.images_per_epoch // cfg.k, eval_images_per_prompt=1)  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = loop.main(run_cfg)
    last = loop_utils.read_metrics(run)[-1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"seconds_per_epoch": last["seconds"], "run_peak_gpu_memory_gb": peak}


def main(
    tiny: bool = False,
    images: int = 16,
    k: int = 4,
    epochs: int = 2,
    micro_batch: int = 8,
    repeats: int = 1,
    precision: str = "auto",
    device: str = "auto",
    results: str = "runs/bench/results",
) -> dict:
    """Build, run, check, measure; writes gpu.json and gpu.md and returns the report."""
    if images < k or images % k or k < 2 or epochs < 1 or repeats < 1:
        raise BenchError(f"--images {images}: a multiple of --k {k} >= 2; --epochs, --repeats >= 1")
    flags = SD2_FLAGS | {"micro_batch": micro_batch} | (TINY_FLAGS if tiny else {})
    cfg = loop.Config(algo="loop", k=k, images_per_epoch=images, mixed_precision=precision,
                      device="cpu" if tiny else device, **flags)  # fmt: skip
    sizes = loop_utils.check_config(cfg, 1)
    torch.set_flush_denormal(True)
    dev = loop_utils.setup_distributed(cfg)[2]
    if not tiny and dev.type != "cuda":
        raise BenchError("no GPU here: run with --tiny on a CPU, or on a machine with CUDA")
    dtype = loop_utils.weight_dtype_for(precision, dev)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images // k) for _ in range(k)]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = build_random_pipeline(Path(tmp) / "sd2-random", tiny, dev)
        report = short_run(folder, cfg, epochs, Path(tmp))
        models = loop.load_models(str(folder), dev, dtype, cfg.lora_rank, 0, cfg.lora_modules)
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    steps = loop.trained_steps(policy.schedule, cfg.min_train_sigma)
    micro = sizes["micro_batch"]
    log_ratio = loop.check_first_ratio(models, policy, prompts[:micro], steps, show=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    measured = side_by_side(models, cfg, prompts, repeats)
    s, u = measured["sampling"], measured["update"]
    report |= {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "tiny": tiny, "resolution": models.resolution, "dtype": str(models.unet.dtype),
        "lora_parameters": sum(p.numel() for p in loop.lora_parameters(models.unet)),
        "images": images, "k": k, "epochs": epochs, "flags": flags,
        "seconds_per_256_images": report["seconds_per_epoch"] * 256 / images,
        "max_abs_log_ratio": log_ratio, "ratio_tolerance": loop.RATIO_TOLERANCE,
        "sampling_images_per_s": images / s["ours_s"],
        "update_images_per_s": images / u["ours_s"],
        "update_over_bare_fwd_bwd": u["ratio"], "sampling_over_diffusers": s["ratio"],
        "update_target": u["target"], "sampling_target": s["target"],
        "max_abs_image_diff": measured["max_abs_image_diff"],
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }  # fmt: skip
    write_results(report, Path(results))
    return report


def write_results(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu.json").write_text(json.dumps(report, indent=2))

    def gb(value):
        return "n/a (CPU)" if value is None else f"{value:.1f} GB"

    def against(ratio, target):
        return f"{ratio:.3f}x (target <= {target}x: {'met' if ratio <= target else 'MISSED'})"

    ratio_ok = report["max_abs_log_ratio"] <= report["ratio_tolerance"]
    rows = [
        ["seconds per epoch (last of the short run)", f"{report['seconds_per_epoch']:.1f}"],
        ["... scaled to 256 images an epoch", f"{report['seconds_per_256_images']:.0f}"],
        ["peak GPU memory, short run", gb(report["run_peak_gpu_memory_gb"])],
        ["peak GPU memory, side by side", gb(report["peak_gpu_memory_gb"])],
        ["first ratio: max |log rho_t|", (f"{report['max_abs_log_ratio']:.2e} "
         f"({'ok' if ratio_ok else 'ABOVE'} {report['ratio_tolerance']})")],
        ["sampling (loop.rollout), images / s", f"{report['sampling_images_per_s']:.2f}"],
        ["update (loop.train_on_rollout), images / s", f"{report['update_images_per_s']:.2f}"],
        ["loop sampler / StableDiffusionPipeline",
         against(report["sampling_over_diffusers"], report["sampling_target"])],
        ["update / bare UNet fwd+bwd",
         against(report["update_over_bare_fwd_bwd"], report["update_target"])],
    ]  # fmt: skip
    head = (
        f"{'tiny SD 2 architecture' if report['tiny'] else 'SD 2 base (random weights)'}, "
        f"{report['resolution']} px, {report['dtype']}, LoRA {report['lora_parameters']} weights, "
        f"{report['images']} images, K = {report['k']}, {report['flags']}, on {report['device']}"
    )
    text = head + "\n\n" + markdown_table(["", "measured"], rows)
    (results / "gpu.md").write_text(text)
    print(text)


def quickstart_flags() -> dict:
    """The --flag value pairs of the README's GPU command (its "Stable Diffusion on GPUs" block),
    as numbers where numeric."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- gpu -->")[-1].split("<!-- /gpu -->")[0]
    quickstart = block.split("```bash")[1].split("```")[0]  # its command, not the prose
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
