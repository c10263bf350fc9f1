"""loop.py's plumbing, which a reader of the method never needs: input checks, the run folder's
files, the distributed set-up, the command line's parsing. loop.py imports what it calls from here,
so these names are also reachable as loop.<name>, as the tests, scripts and notebooks use them."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import math
import os
import pickle
import random
import re
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import rewards

HERE = Path(__file__).resolve().parent
NORMALIZATIONS = ("auto", "off", "batch", "group-std")
PRECISIONS = ("auto", "no", "bf16", "fp16")  # --mixed_precision: dtype of the frozen weights
SHAPES_MARKER = "shapes_world.json"  # a model folder with this file draws the shapes world
CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")  # T2I-CompBench


class UsageError(Exception):
    """Bad input: printed as one line naming the problem and the fix; exit code 2."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__


# === Input checks, prompt files and derived sizes: everything that can fail runs before any write
def config_docs(config_class) -> dict[str, str]:
    """Each Config field's doc: the string statement under the field."""
    pairs = itertools.pairwise(ast.parse(inspect.getsource(config_class)).body[0].body)
    return {a.target.id: b.value.value for a, b in pairs if isinstance(a, ast.AnnAssign)}


def check_ranges(cfg) -> None:
    """Every numeric flag against the range its Config doc states, e.g. 'in (0, 1]'."""
    for name, doc in config_docs(type(cfg)).items():
        if match := re.search(r"in ([\[(])(\S+), (\S+)([\])])$", doc):
            left, low, high, right = match.groups()
            value = getattr(cfg, name)
            above = value > float(low) if left == "(" else value >= float(low)
            below = value < float(high) if right == ")" else value <= float(high)
            if not (above and below):  # (NaN is neither)
                raise UsageError(f"--{name} {value}: must be in {left}{low}, {high}{right} ({doc})")


def check_config(cfg, world: int, algos: tuple) -> dict:
    """Reject bad input with one clear line; return the derived sizes printed at start-up."""
    choices = {"algo": algos, "normalize_advantage": NORMALIZATIONS, "mixed_precision": PRECISIONS}
    for name, allowed in choices.items():
        if (value := getattr(cfg, name)) not in allowed:
            raise UsageError(f"unknown --{name} {value!r}; choose one of {', '.join(allowed)}")
    check_ranges(cfg)
    if cfg.algo in ("rloo", "loop") and cfg.k < 2:
        raise UsageError(f"--algo {cfg.algo}: the leave-one-out baseline needs K >= 2; pass --k 2")
    if cfg.normalize_advantage == "group-std" and cfg.k < 2:
        raise UsageError("--normalize_advantage group-std needs --k >= 2; use batch")
    if cfg.images_per_epoch % (world * cfg.k):
        raise UsageError(f"--images_per_epoch: need a multiple of K x ranks = {cfg.k * world}")
    on_policy = cfg.algo in ("reinforce", "rloo")
    default = cfg.images_per_epoch if on_policy else max(world, cfg.images_per_epoch // 2)
    minibatch = cfg.minibatch or default
    if on_policy and (minibatch != cfg.images_per_epoch or cfg.inner_epochs != 1):
        raise UsageError(f"--algo {cfg.algo} is on-policy: leave --minibatch, --inner_epochs unset")
    per_rank = minibatch // world
    micro = min(cfg.micro_batch, per_rank)
    if minibatch % world or cfg.images_per_epoch % minibatch or per_rank % micro:
        raise UsageError(
            f"--minibatch {minibatch} must divide --images_per_epoch, split evenly "
            f"over {world} rank(s), and be a multiple of --micro_batch {micro}"
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
    }


def resolve_model_path(model: str, embedded: str) -> str:
    """A local folder (as given, or next to loop.py) or a hub id 'org/name'."""
    folder = next((f for f in (Path(model).expanduser(), HERE / model) if f.is_dir()), None)
    if folder and not (folder / "model_index.json").is_file():
        raise UsageError(f"--model: {folder} has no model_index.json; pass a diffusers folder")
    if folder:
        return str(folder)
    if model == embedded:
        raise UsageError(
            f"the embedded model {HERE / model} is missing; build it with "
            "scripts/train_tiny_pipeline.py or pass --model"
        )
    first = model.split("/")[0]
    hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not hub_id or Path(first).is_dir() or (HERE / first).is_dir():
        raise UsageError(
            f"--model {model}: model folder not found; pass an existing diffusers "
            "folder or a hub id such as stabilityai/stable-diffusion-2-base"
        )
    return model


def read_prompts(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UsageError(f"{what} prompt file {path} not found; fix --*_prompts or --prompt_dir")
    try:
        prompts = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        message = f"{what} prompt file {path} is not UTF-8 text ({error}); save it as UTF-8"
        raise UsageError(message) from None
    if not prompts:
        raise UsageError(f"{what} prompt file {path} is empty; write one prompt per line")
    return prompts


def resolve_reward_and_prompts(cfg, model_path: str):
    """The reward's name (shapes world: color -> shapes_color), training and held-out prompts."""
    shapes_world, names = Path(model_path, SHAPES_MARKER).is_file(), rewards.REWARD_NAMES
    reward = cfg.reward
    if shapes_world and f"shapes_{reward}" in names:
        reward = f"shapes_{reward}"
        print(f"shapes-world model: --reward {cfg.reward} resolves to {reward}")
    if reward not in names:
        raise UsageError(f"unknown --reward {cfg.reward!r}; choose one of {', '.join(names)}")
    category = reward.removeprefix("shapes_")
    if cfg.train_prompts:
        train = Path(cfg.train_prompts)
    elif cfg.prompt_dir:
        train = Path(cfg.prompt_dir) / f"{category}_train.txt"
    elif shapes_world and category in CATEGORIES:
        train = HERE / "prompts" / "shapes" / f"{category}_train.txt"
    else:
        raise UsageError(f"no prompts for --reward {reward}; pass --train_prompts or --prompt_dir")
    train_prompts = read_prompts(train, "training")
    held_out = train.with_name(train.name.replace("_train.txt", "_val.txt"))
    if cfg.eval_prompts:
        held_out = Path(cfg.eval_prompts)
    elif held_out == train or not held_out.is_file():
        held_out = train  # a plain prompt file without a *_val.txt
        print(f"no held-out prompt file next to {train}: evaluating on its first prompts")
    held_out_prompts = read_prompts(held_out, "held-out")[: cfg.num_eval_prompts]
    held_out_prompts = [p for p in held_out_prompts for _ in range(cfg.eval_images_per_prompt)]
    return reward, train_prompts, held_out_prompts


def reward_options(reward: str, prompt_dir: str, given: str = "") -> dict:
    """rewards.load_reward's options: --reward_options (JSON, checked against the names the
    reward's loader takes), and for complex CompBench's route lists in --prompt_dir."""
    try:
        options = json.loads(given or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"--reward_options {given!r} is not JSON ({error})") from None
    valid = rewards.reward_options_of(reward)
    unknown = sorted(set(options) - set(valid)) if isinstance(options, dict) else []
    if not isinstance(options, dict) or unknown:
        raise UsageError(
            f"--reward_options {given}: need a JSON object of {reward}'s options "
            f"({', '.join(valid)})" + (f", not {', '.join(unknown)}" if unknown else "")
        )
    if reward == "complex" and prompt_dir and any(Path(prompt_dir).glob("complex_*_spatial.txt")):
        options.setdefault("lists", prompt_dir)
    return options


def load_rewards(name: str, options: dict, device: torch.device):
    """r for training and for the held-out score, which on a GPU runs in the original scorers'
    precision (as `rewards.py evaluate`, so the two numbers compare) unless options set dtype."""
    try:
        train = rewards.load_reward(name, device=device, **options)
        if device.type != "cuda" or "dtype" in options:  # the same precision: one scorer
            return train, train
        return train, rewards.load_reward(name, device=device, dtype="original", **options)
    except (OSError, RuntimeError, ValueError) as error:
        raise UsageError(
            f"could not load reward {name}: {one_line(error)} (pass local copies with "
            f"--reward_options; {name}'s options: {', '.join(rewards.reward_options_of(name))})"
        ) from None


def run_folder(cfg) -> Path:
    """--resume DIR, --out DIR or runs/<algo>-<reward>-k<K>-<time>; never over another run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(cfg.resume or cfg.out or f"runs/{cfg.algo}-{cfg.reward}-k{cfg.k}-{stamp}")
    if not cfg.resume and (run / "checkpoint").exists():
        raise UsageError(f"--out {run} holds a run; pass --resume {run} or another --out")
    if not (existing := next(f for f in (run, *run.parents) if f.exists())).is_dir():
        raise UsageError(f"--out {run}: {existing} is a file; pass a folder")
    return run


# === Command line: --flags as a Config. A resume may change how long the run goes, how often it
# is scored and where it runs; any other flag would make it another experiment than config.json says
RESUMABLE = ("resume", "epochs", "eval_every", "eval_raw", "micro_batch", "device")


def parse_flag(name: str, value, kind: type):
    """One --flag's value as its Config type (fire hands over ints, floats, dicts, strings)."""
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[str(value).lower()]
        if kind in (int, float):
            if kind is int and float(value) != int(value):
                raise ValueError
            return kind(value)
        return json.dumps(value) if isinstance(value, dict) else str(value)
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"--{name} {value!r}: expected {kind.__name__}") from None


def config_from_flags(flags: dict, config_class):
    """A Config from --flags, type-checked; with --resume, the run's config.json, of which the
    flags may change only RESUMABLE ones."""
    hints = typing.get_type_hints(config_class)
    if unknown := sorted(set(flags) - set(hints)):
        names = ", ".join("--" + name for name in unknown)
        raise UsageError(f"unknown flag(s) {names}; see python loop.py --help")
    given = {name: parse_flag(name, value, hints[name]) for name, value in flags.items()}
    if not given.get("resume"):
        return config_class(**given)
    run = Path(given["resume"])
    state = run / "checkpoint" / "state.pt"
    if not (run / "config.json").is_file() or not state.is_file():
        raise UsageError(f"--resume {run}: no config.json and checkpoint/ there; pass a run")
    if not zipfile.is_zipfile(state):  # torch.save writes a zip file; a truncated one is none
        raise UsageError(f"--resume {run}: {state} is truncated or no checkpoint; start anew")
    try:
        values = json.loads((run / "config.json").read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--resume {run}: config.json is not JSON ({error})") from None
    if stale := sorted(set(values) - set(hints)):  # written by another version of loop.py
        raise UsageError(f"--resume {run}: config.json has {stale}, unknown here; delete them")
    saved = config_class(**values)
    changed = [f"--{n}" for n, v in given.items() if n not in RESUMABLE and v != getattr(saved, n)]
    if changed:
        allowed = ", ".join(f"--{name}" for name in RESUMABLE[1:])
        raise UsageError(
            f"--resume {run}: {', '.join(changed)} would make another experiment than its "
            f"config.json says; a resume may change only {allowed} (else start a new run)"
        )
    return dataclasses.replace(saved, **given)


# === Distributed: torchrun's ranks, the device and its precision, statistics over ranks
def setup_distributed(cfg):
    """Rank, world size and device; torchrun sets RANK/WORLD_SIZE (gloo on CPU, nccl on GPU)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device not in ("auto", "cpu", "cuda") or (use_cuda and not torch.cuda.is_available()):
        raise UsageError(f"--device {cfg.device}: not available here; use cpu, cuda or auto")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:  # this rank's GPU, also the one NCCL's collectives and object gathers use
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """--mixed_precision as a dtype; auto: bf16 on a GPU that computes in it (compute capability
    >= 8.0; V100 and T4 only emulate it, slowly), else fp32."""
    bf16_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    choice = ("bf16" if bf16_gpu else "no") if mixed_precision == "auto" else mixed_precision
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def mean_and_std_over_ranks(reward: torch.Tensor, device) -> tuple[float, float]:
    moments = torch.tensor([reward.mean(), (reward**2).mean()], dtype=torch.float64, device=device)
    if dist.is_initialized():  # every rank holds as many rewards: the mean of the ranks' moments
        dist.all_reduce(moments)
        moments /= dist.get_world_size()
    mean, second = moments.tolist()
    return mean, math.sqrt(max(0.0, second - mean**2))  # std = sqrt(E[r^2] - E[r]^2)


def check_finite(reward, prompts: list[str], device) -> None:
    """Stop every rank together when a reward is non-finite on any, naming its prompts: one
    all_reduce, else the other ranks would wait in their next collective until a timeout."""
    bad = sorted({p for p, r in zip(prompts, reward.tolist()) if not math.isfinite(r)})
    flag = torch.tensor(float(bool(bad)), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise UsageError(
            f"the reward is non-finite {f'for prompts {bad}' if bad else 'on another rank'}; fix "
            "the reward or drop these prompts (training stopped, the last checkpoint is intact)"
        )


# === The run folder: config.json, metrics.jsonl (appended), samples/, lora/, checkpoint/ (atomic)
def atomic_write(path: Path, write) -> None:
    """Write a temporary file, then rename it: a kill mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_config(run: Path, cfg) -> None:
    """Start a new run folder: samples/, no metrics.jsonl, config.json."""
    (run / "samples").mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    config = json.dumps(dataclasses.asdict(cfg), indent=2)
    atomic_write(run / "config.json", lambda tmp: tmp.write_text(config))


def held_out_path(run: Path, epoch: int) -> Path:
    return run / "samples" / f"eval_epoch_{epoch:04d}.png"


def save_grid(path: Path, images, prompts: list[str], reward) -> None:
    """PNG grid of (N, 3, H, W) images in [0, 1], 8 a row, and a .txt of 'prompt | r=reward'."""
    from PIL import Image

    n, _, h, w = images.shape
    grid = torch.zeros(3, math.ceil(n / 8) * h, min(n, 8) * w)  # (3, rows*H, cols*W)
    for i, image in enumerate(images):
        row, col = divmod(i, 8)
        grid[:, row * h : (row + 1) * h, col * w : (col + 1) * w] = image
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H', W', 3)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    text = "".join(f"{p} | r={r:.3f}\n" for p, r in zip(prompts, reward.tolist()))
    atomic_write(path.with_suffix(".txt"), lambda tmp: tmp.write_text(text))


def before_after_grid(run: Path, first: int, last: int, height: int) -> Path:
    """First row of the first and last held-out grids: top = before, bottom = after training."""
    from PIL import Image

    before, after = (Image.open(held_out_path(run, epoch)) for epoch in (first, last))
    out = Image.new("RGB", (before.width, 2 * height))
    out.paste(before.crop((0, 0, before.width, height)), (0, 0))
    out.paste(after.crop((0, 0, after.width, height)), (0, height))
    path = run / "samples" / "before_after.png"
    atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
    return path


def save_lora(unet, folder: Path) -> Path:
    """lora/pytorch_lora_weights.safetensors in diffusers' format (load_lora_weights reads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    save = StableDiffusionPipeline.save_lora_weights
    path = folder / "pytorch_lora_weights.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save(tmp.parent, unet_lora_layers=state, weight_name=tmp.name))
    return path


def save_checkpoint(run: Path, unet, optimizer, ema: list, next_epoch: int, scaler=None) -> None:
    """checkpoint/state.pt: LoRA, optimizer, EMA, RNG states, fp16's loss scale, next epoch."""
    from peft.utils import get_peft_model_state_dict

    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    rng["numpy"] = np.random.get_state()
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state = {"lora": get_peft_model_state_dict(unet), "optimizer": optimizer.state_dict()}
    state |= {"ema": ema, "next_epoch": next_epoch, "rng": rng}
    state["scaler"] = scaler.state_dict() if scaler else {}
    (run / "checkpoint").mkdir(exist_ok=True)
    atomic_write(run / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(run: Path, unet, optimizer, ema: list, scaler=None) -> int:
    """Restore what save_checkpoint wrote; returns the epoch to continue from."""
    from peft.utils import set_peft_model_state_dict

    path = run / "checkpoint" / "state.pt"
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise UsageError(f"--resume: {path} is unreadable ({one_line(error)})") from None
    set_peft_model_state_dict(unet, state["lora"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    optimizer.load_state_dict(state["optimizer"])
    for average, saved in zip(ema, state["ema"], strict=True):
        average.copy_(saved)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["next_epoch"]


def append_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def truncate_metrics(run: Path, next_epoch: int) -> None:
    """On resume, drop rows the checkpoint does not cover (a kill between row and checkpoint)."""
    text = "".join(json.dumps(r) + "\n" for r in read_metrics(run) if r["epoch"] < next_epoch)
    atomic_write(run / "metrics.jsonl", lambda tmp: tmp.write_text(text))


def print_summary(run: Path, reward_name: str, resolution: int) -> None:
    """The run's last lines: held-out score before -> after, the before/after grid, the LoRA."""
    evals = [r for r in read_metrics(run) if r["eval_reward_mean"] is not None]
    first, last = evals[0], evals[-1]
    print(
        f"held-out {reward_name}: before {first['eval_reward_mean']:.4f} -> after "
        f"{last['eval_reward_mean']:.4f} (epoch {last['epoch']})"
    )
    grid = before_after_grid(run, first["epoch"], last["epoch"], resolution)
    print(f"before/after grid: {grid}")
    print(f"LoRA: {run / 'lora' / 'pytorch_lora_weights.safetensors'}")
