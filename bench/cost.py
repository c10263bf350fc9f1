"""What each phase of loop.py costs, against the floor it runs on; ratios measured side by side.

1. Sampling: loop.rollout (DDIM with log-probs, trajectories stored in fp32, VAE decode; the reward
   replaced by zeros so that only sampling is timed) against diffusers' StableDiffusionPipeline built
   from the same modules (same UNet with LoRA, VAE, text encoder), the same steps, eta, guidance and
   batch (loop's micro-batch), and the same noise: the script checks the two give the same images
   (max |diff| reported), so the timing compares the same computation. Target <= 1.05x.
2. Update phase: one epoch's loop.train_on_rollout (the configured algorithm; AdamW as loop.main)
   against a bare UNet forward+backward over the same (sample, step) pairs: the same micro-batches,
   the same CFG-batched call (2n rows: the policy is the guided UNet), the same LoRA, loss = mean of
   the output, no optimizer. Target <= 1.15x.
Both are timed alternately (A B, B A, ...) in one process, `--repeats` times; the table shows medians.
3. Per-epoch time and peak memory of each algorithm at equal images per epoch, and against K: each
   configuration runs loop.main for `--epochs` epochs in its own forked child; seconds per epoch is
   the median over the epochs without a held-out evaluation; peak memory is the child's ru_maxrss
   (see bench/common.py; on a GPU also torch.cuda.max_memory_allocated). A `load` row is a child that
   only loads the model: the floor every configuration starts from. The children score only
   EVAL_PROMPTS held-out prompts (same micro-batches, so the same peak): epochs are timed, not evals.

    python bench/cost.py                 # loop.Config's model and budget
    python bench/cost.py --tiny          # the test suite's tiny random model, seconds
Writes cost.md and cost.json to --results (default runs/bench/results, untracked; the committed
results were made with --results bench/results).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop
import loop_utils
from bench.common import (
    BenchError,
    cli_main,
    default_threads,
    fork_map,
    markdown_table,
    preload,
    tiny_model,
)

# part 3: (algo, K) at equal images per epoch
CONFIGS = (
    ("reinforce", 1), ("rloo", 2), ("rloo", 4), ("rloo", 8), ("ppo", 1), ("ppo", 4),
    ("loop", 2), ("loop", 4), ("loop", 8),
)  # fmt: skip
TINY = {"reward": "jpeg_compressibility", "images_per_epoch": 4, "num_steps": 3, "micro_batch": 2}
TINY_CONFIGS = (("reinforce", 1), ("loop", 2))
TARGETS = {"sampling": 1.05, "update": 1.15}
EVAL_PROMPTS = 4  # held-out prompts of part 3's children (evaluated at the start and the end only)


def zero_reward(images, prompts) -> torch.Tensor:
    """Stands in for r(x_0, c) so that only sampling is timed."""
    return torch.zeros(len(prompts))


def timed(function) -> float:
    """Wall seconds of function() (synchronising a GPU before and after)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    tic = time.perf_counter()
    function()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def epoch_noise(n: int, micro: int, num_steps: int, latent_shape: tuple):
    """x_T (n, C, h, w) and step noise (n, T, C, h, w), drawn per micro-batch from seed = index,
    in diffusers' draw order, so that the pipeline given that seed draws the same step noise."""
    parts = [
        loop.draw_noise(
            torch.Generator().manual_seed(i), min(micro, n - start), num_steps, latent_shape
        )
        for i, start in enumerate(range(0, n, micro))
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def diffusers_pipeline(models: loop.Models):
    """StableDiffusionPipeline over loop's modules (the same UNet with its LoRA)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
        unet=models.unet, scheduler=DDIMScheduler.from_config(models.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_with_diffusers(pipe, cfg: loop.Config, prompts, x_T, micro: int) -> torch.Tensor:
    """The pipeline over the same micro-batches and noise as epoch_noise: images (N, 3, H, W)."""
    images = []
    for i, start in enumerate(range(0, len(prompts), micro)):
        rows = slice(start, start + micro)
        generator = torch.Generator().manual_seed(i)
        torch.randn(x_T[rows].shape, generator=generator)  # x_T was drawn first from this seed
        out = pipe(
            prompts[rows], num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
            eta=cfg.eta, latents=x_T[rows].to(pipe.device, pipe.unet.dtype),
            generator=generator, output_type="pt",
        )  # fmt: skip
        images.append(out.images.float().cpu())
    return torch.cat(images)


def bare_forward_backward(policy: loop.Policy, batch: loop.Rollout, cfg, sizes: dict) -> None:
    """The floor of an update: the guided UNet's forward+backward over the (sample, step) pairs
    train_on_rollout visits (same micro-batches and steps), loss = mean output, no optimizer."""
    steps = loop.trained_steps(policy.schedule, cfg.min_train_sigma)
    n_steps = max(1, round(cfg.timestep_fraction * len(steps)))
    n, micro = len(batch.latents), sizes["micro_batch"]
    unet, uncond = policy.unet, policy.uncond
    for _ in range(cfg.inner_epochs):
        for start in range(0, n, micro):
            rows = slice(start, start + micro)
            for j in steps[:n_steps]:
                x_t, cond = batch.latents[rows, j], batch.cond[rows]
                latent_in = torch.cat([x_t, x_t]).to(unet.dtype)  # (2n, C, h, w): CFG
                embeds = torch.cat([uncond.expand(len(cond), -1, -1), cond]).to(unet.dtype)
                t = policy.schedule.timesteps[j]
                unet(latent_in, t, encoder_hidden_states=embeds).sample.float().mean().backward()
    for p in loop.lora_parameters(unet):
        p.grad = None


def side_by_side(models: loop.Models, cfg: loop.Config, prompts: list[str], repeats: int) -> dict:
    """Parts 1 and 2: medians of alternating timings, ratios, and the same-images check."""
    sizes = loop_utils.check_config(cfg, 1)
    micro, n = sizes["micro_batch"], len(prompts)
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    pipe = diffusers_pipeline(models)
    x_T, noise = epoch_noise(n, micro, cfg.num_steps, models.latent_shape)
    params = loop.lora_parameters(models.unet)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)  # as loop.main
    result = {"ours": {}, "floor": {}}

    def ours_sampling():
        result["batch"], result["reward"] = loop.rollout(
            models, policy, prompts, x_T, noise, zero_reward, micro
        )

    def floor_sampling():
        result["pipe_images"] = sample_with_diffusers(pipe, cfg, prompts, x_T, micro)

    ours_sampling()  # warm-up, and the rollout the updates train on
    floor_sampling()
    gap = (result["batch"].images - result["pipe_images"]).abs().max().item()
    advantage = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(models.device)

    def ours_update():
        loop.train_on_rollout(
            policy, result["batch"], advantage, cfg, optimizer, random.Random(0), sizes
        )

    def floor_update():
        bare_forward_backward(policy, result["batch"], cfg, sizes)

    floor_update()  # warm-up of the backward kernels (it leaves the weights as they are)
    phases = {"sampling": (ours_sampling, floor_sampling), "update": (ours_update, floor_update)}
    times = {phase: ([], []) for phase in phases}
    for r in tqdm(range(repeats), "side by side"):
        for phase, (ours, floor) in phases.items():
            order = ((0, ours), (1, floor)) if r % 2 == 0 else ((1, floor), (0, ours))
            for side, function in order:
                times[phase][side].append(timed(function))
    out = {"images": n, "micro_batch": micro, "max_abs_image_diff": gap, "repeats": repeats}
    for phase, (ours, floor) in times.items():
        o, f = statistics.median(ours), statistics.median(floor)
        out[phase] = {"ours_s": o, "floor_s": f, "ratio": o / f, "target": TARGETS[phase]}
    return out


def load_only(cfg: loop.Config) -> dict:
    """The floor of part 3: load the model and build the policy, nothing else."""
    device = loop_utils.setup_distributed(cfg)[2]
    dtype = loop_utils.weight_dtype_for(cfg.mixed_precision, device)
    models = loop.load_models(
        loop_utils.resolve_model_path(cfg.model),
        device,
        dtype,
        cfg.lora_rank,
        cfg.seed,
        cfg.lora_modules,
    )
    loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    return {"seconds_per_epoch": None}


def train_epochs(cfg: loop.Config) -> dict:
    """loop.main for cfg.epochs; seconds per epoch = median over the epochs without evaluation."""
    torch.set_flush_denormal(True)
    run = loop.main(cfg)
    rows = [r for r in loop_utils.read_metrics(run)[1:] if r["eval_reward_mean"] is None]
    return {"seconds_per_epoch": statistics.median(r["seconds"] for r in rows) if rows else None}


def per_algorithm(cfg: loop.Config, configs, epochs: int, threads: int, work: Path) -> list[dict]:
    """Part 3: a forked child per configuration (and the load-only floor), one at a time."""
    items, names = [(cfg,)], ["load"]
    for algo, k in configs:
        run = loop.Config(**{**vars(cfg), "algo": algo, "k": k, "epochs": epochs,
                             "eval_every": epochs, "out": str(work / f"{algo}-k{k}")})  # fmt: skip
        loop_utils.check_config(run, 1)
        items.append((run,))
        names.append(f"{algo} K={k}")
    functions = [load_only] + [train_epochs] * (len(items) - 1)
    done = []
    for function, item in tqdm(list(zip(functions, items)), "per-algorithm children"):
        done.append(fork_map(function, [item], threads=threads, logs=[work / "children.log"])[0])
    return [{"config": name, **d["value"], "peak_rss_mb": d["peak_rss_mb"],
             "cuda_peak_mb": d["cuda_peak_mb"]} for name, d in zip(names, done)]  # fmt: skip


def main(
    tiny: bool = False,
    model: str = "",
    repeats: int = 3,
    epochs: int = 4,
    algorithms: bool = True,
    threads: int = 0,
    results: str = "runs/bench/results",
    work: str = "runs/bench-cost",
) -> dict:
    """Parts 1-3 (part 3 unless --noalgorithms); writes cost.md and cost.json, returns the dict."""
    if repeats < 1 or epochs < 2:
        raise BenchError("need --repeats >= 1 and --epochs >= 2 (the last epoch evaluates)")
    work_dir = Path(work)
    base: dict = dict(TINY) if tiny else {}
    if tiny:
        tiny_path, prompt_file = tiny_model(work_dir / "tiny-model")
        base |= {"model": str(tiny_path), "train_prompts": str(prompt_file)}
    if model:
        base["model"] = model
    # part 3 times epochs, not evaluations: a few held-out prompts keep its children short
    base.setdefault("num_eval_prompts", EVAL_PROMPTS)
    cfg = loop.Config(**base)
    loop_utils.check_config(cfg, 1)
    threads = threads or default_threads(1)
    preload()
    report: dict = {"config": vars(cfg), "threads": threads}
    if algorithms:  # first: the children fork before this process touches a GPU
        configs = TINY_CONFIGS if tiny else CONFIGS
        report["per_algorithm"] = per_algorithm(cfg, configs, epochs, threads, work_dir)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    device = loop_utils.setup_distributed(cfg)[2]
    path = loop_utils.resolve_model_path(cfg.model)
    _, train_prompts, _ = loop_utils.reward_and_prompts(cfg, path)
    dtype = loop_utils.weight_dtype_for(cfg.mixed_precision, device)
    models = loop.load_models(path, device, dtype, cfg.lora_rank, cfg.seed, cfg.lora_modules)
    chosen = random.Random(cfg.seed).choices(train_prompts, k=cfg.images_per_epoch // cfg.k)
    prompts = [p for p in chosen for _ in range(cfg.k)]
    report["side_by_side"] = side_by_side(models, cfg, prompts, repeats)
    write_results(report, Path(results))
    return report


def write_results(report: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "cost.json").write_text(json.dumps(report, indent=2, default=str))
    s = report["side_by_side"]
    rows = []
    for phase, floor in (("sampling", "StableDiffusionPipeline"), ("update", "bare UNet fwd+bwd")):
        p = s[phase]
        verdict = "met" if p["ratio"] <= p["target"] else "MISSED"
        rows.append([phase, f"{p['ours_s']:.3f}", floor, f"{p['floor_s']:.3f}",
                     f"{p['ratio']:.3f}x", f"<= {p['target']}x ({verdict})"])  # fmt: skip
    header = ["phase", "loop.py s", "floor", "floor s", "ratio", "target"]
    cfg = report["config"]
    text = (
        f"{s['images']} images (micro-batch {s['micro_batch']}), {cfg['num_steps']} DDIM steps, "
        f"algo {cfg['algo']} K={cfg['k']}, medians of {s['repeats']} alternating repeats, "
        f"{report['threads']} thread(s); loop's and the pipeline's images differ by at most "
        f"{s['max_abs_image_diff']:.2e}.\n\n" + markdown_table(header, rows)
    )
    if "per_algorithm" in report:
        floor = report["per_algorithm"][0]["peak_rss_mb"]
        table = [
            [
                r["config"],
                "" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.2f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['peak_rss_mb'] - floor:+.0f}",
                "" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}",
            ]
            for r in report["per_algorithm"]
        ]
        header = ["config", "s / epoch (median)", "peak RSS MB", "above load", "peak CUDA MB"]
        text += (
            f"\nPer algorithm, {cfg['images_per_epoch']} images per epoch:\n\n"
            + markdown_table(header, table)
        )
    (results / "cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    import fire

    fire.Fire(lambda **flags: cli_main(main, **flags))
