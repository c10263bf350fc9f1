"""loop.py's plumbing, which a reader of the method never needs: flags and their checks, the run
folder (one process at a time, atomic writes, exact resume), ranks under torchrun, the printed lines.
Every bad input or fault ends in one line: `error: ...` and exit 2, or exit 130 when stopped."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import itertools
import json
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import sys
import textwrap
import time
import typing
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import rewards

HERE = Path(__file__).resolve().parent
EMBEDDED_MODEL = HERE / "shapes_world" / "tiny-shapes"
TEXTURE_MODEL = HERE / "shapes_world" / "tiny-shapes-texture"  # --reward texture's default
# a resume may change how long the run goes, how often it is scored and where it runs: no more
RESUMABLE = ("resume", "epochs", "eval_every", "eval_raw", "micro_batch", "device")
LOCK = "run.lock"  # held (flock) by the one process that trains the folder; says who it is
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "lora", "checkpoint", LOCK)
RNGS = {"torch": (torch.get_rng_state, torch.set_rng_state), "numpy": (np.random.get_state,
        np.random.set_state), "python": (random.getstate, random.setstate)}  # fmt: skip


class UsageError(Exception):
    """Bad input: one line naming the problem and the fix; exit code 2."""


class WriteFault(UsageError):
    """A run-folder file could not be written (full disk, read-only, quota)."""


class Interrupted(UsageError):
    """Ctrl-C or SIGTERM: one line saying what was kept and how to go on; exit code 130."""


class NonFinite(Exception):
    """A sample, log-prob or gradient is inf/NaN: (what, whether an update happened)."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def one_line_errors():
    """The command line's ending: a UsageError is `error: ...` and exit 2; an interruption 130."""
    try:
        yield
    except Interrupted as error:
        sys.exit(print(error, file=sys.stderr) or 130)
    except UsageError as error:
        sys.exit(print(f"error: {error}", file=sys.stderr) or 2)
    except KeyboardInterrupt:  # before the run folder was claimed
        sys.exit(
            print("interrupted before the run started: nothing written", file=sys.stderr) or 130
        )


# === Flags: the command line as typed; every value as its Config type, range and dtype
def config_docs(config_class) -> dict[str, str]:
    """Each Config field's doc: the string statement under the field."""
    pairs = itertools.pairwise(ast.parse(inspect.getsource(config_class)).body[0].body)
    return {a.target.id: b.value.value for a, b in pairs if isinstance(a, ast.AnnAssign)}


def help_text(config_class) -> str:
    hints, lines = typing.get_type_hints(config_class, include_extras=True), []
    for name, doc in config_docs(config_class).items():
        kind, meta = typing.get_args(hints[name]) or (hints[name], None)
        kind = " | ".join(meta) if isinstance(meta, tuple) else f"{kind.__name__} {meta or ''}"
        lines.append(f"  --{name} ({kind.strip()}; default {getattr(config_class, name)!r}): {doc}")
    return "python loop.py [--flag value ...]\n" + "\n".join(lines)


def check_argv(argv: list[str], names, positional: int = 0) -> list[str] | None:
    """The command line as typed, before fire reads it (fire would take `--lr` alone as True, keep
    the last of two `--epochs` and reject a stray word only after the run): every flag a known
    name with one value, given once; at most `positional` bare words, returned (None: --help)."""
    seen, words, tokens = {}, [], iter(argv)
    for token in tokens:
        if token in ("--help", "-h"):
            return None
        if not token.startswith("--") or token == "--":
            words.append(token)
            continue
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in names:
            raise UsageError(f"unknown flag --{name}; see --help for the flags")
        if not has_value and re.match("--[a-z]", value := next(tokens, "--")):
            raise UsageError(f"--{name} needs a value (--{name} VALUE); see --help")
        if name in seen:
            raise UsageError(f"--{name} given twice ({seen[name]!r}, {value!r}); give it once")
        seen[name] = value
    if extra := " ".join(words[positional:]):
        raise UsageError(f"unexpected argument(s) {extra!r}; flags are --name value (see --help)")
    return words


def checked(value, hint, where: str):
    """A value as its field's type (Annotated[type, range or choices]), inside its range as the
    float32 it becomes in a tensor or optimizer; `where` names it ("--lr", "config.json's lr")."""
    kind, meta = typing.get_args(hint) or (hint, None)
    try:
        if kind is bool:
            value = {"true": True, "1": True, "false": False, "0": False}[str(value).lower()]
        elif kind is int:  # "2", 2 or 2.0, never 2.5 or True; big ints exactly
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            value = int(value) if re.fullmatch(r"-?\d+", str(value)) else int(float(value))
        elif kind is float:
            value = float(value)
        elif isinstance(value, dict):  # fire hands a JSON object over parsed
            value = json.dumps(value)
        elif isinstance(value, str | int | float):
            value = str(value)
        else:
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError):
        raise UsageError(f"{where} {value!r}: expected {kind.__name__}") from None
    if isinstance(meta, tuple) and value not in meta:
        raise UsageError(f"unknown {where} {value!r}; choose one of {', '.join(meta)}")
    if isinstance(meta, str):
        left, low, high, right = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", meta).groups()
        low, high = (int(b) if b.isdigit() else float(b) for b in (low, high))
        with np.errstate(over="ignore", under="ignore"):  # as the float32 it becomes:
            single = float(np.float32(value)) if kind is float else value
        lost = (math.isinf(single) and not math.isinf(value)) or (single == 0 and value != 0)
        above = value > low if left == "(" else value >= low
        if lost or not (above and (value < high if right == ")" else value <= high)):
            why = f" (as a float32, the dtype it becomes, it is {single})" if lost else ""
            raise UsageError(f"{where} {value}: must be in {meta}{why}")
    return value


def config_from_flags(flags: dict, config_class):
    """A Config from --flags; with --resume, the run's config.json (read whole and checked as
    flags are), of which the flags may change only RESUMABLE ones."""
    hints = typing.get_type_hints(config_class, include_extras=True)
    if unknown := sorted(set(flags) - set(hints)):
        raise UsageError(f"unknown flag(s) {', '.join('--' + n for n in unknown)}; see --help")
    given = {name: checked(value, hints[name], f"--{name}") for name, value in flags.items()}
    if "resume" in flags and not given["resume"]:
        raise UsageError("--resume '': an empty path (an unset variable?); pass the run folder")
    if not given.get("resume"):
        return config_class(**given)
    run, values = Path(given["resume"]), read_run_config(Path(given["resume"]))
    if stale := sorted(set(values) - set(hints)):  # written by another version of loop.py
        raise UsageError(f"--resume {run}: config.json has {stale}, unknown here; delete them")
    if missing := sorted(set(hints) - set(values)):
        raise UsageError(f"--resume {run}: config.json lacks {missing}; restore them")
    where = f"{run / 'config.json'}'s"  # (fix it there)
    saved = config_class(**{n: checked(v, hints[n], f"{where} {n}") for n, v in values.items()})
    if changed := [
        f"--{n}" for n, v in given.items() if n not in RESUMABLE and v != getattr(saved, n)
    ]:
        raise UsageError(
            f"--resume {run}: {', '.join(changed)} would make another experiment than its config."
            f"json says; a resume may change only {', '.join('--' + n for n in RESUMABLE[1:])}"
        )
    state, modules = read_state(run), saved.lora_modules.split(",")
    read_metrics(run)  # the rest of the folder, before anything loads
    down = [(key, v.shape[0]) for key, v in state["lora"].items() if ".lora_A" in key]  # (r, in)
    fits = [
        any(f".{m}.lora_A" in key or key.startswith(f"{m}.lora_A") for m in modules)
        for key, _ in down
    ]
    if {r for _, r in down} != {saved.lora_rank} or not all(fits):
        raise UsageError(f"--resume {run}: checkpoint/state.pt's LoRA does not fit config.json's "
                         f"lora_rank {saved.lora_rank} and lora_modules {saved.lora_modules}")  # fmt: skip
    resumed = dataclasses.replace(saved, **given)
    if (done := state["next_epoch"]) >= resumed.epochs:  # (the state read above, not again)
        raise UsageError(f"--resume {run}: the run has trained {done} epochs, --epochs is "
                         f"{resumed.epochs}: nothing to train; pass --epochs above {done} to go on")  # fmt: skip
    return resumed


def read_run_config(run: Path) -> dict:
    """A run folder's config.json as an object (its fields are checked by config_from_flags)."""
    if int(os.environ.get("RANK", "0")) == 0 and (holder := lock_holder(run)):
        raise UsageError(f"{run} is being trained by {holder}; wait for it to end")
    state = run / "checkpoint" / "state.pt"
    if not (run / "config.json").is_file() or not state.is_file():
        raise UsageError(f"--resume {run}: no config.json and checkpoint/ there; pass a run folder")
    if not zipfile.is_zipfile(state):  # torch.save writes a zip file; a truncated one is none
        raise UsageError(f"--resume {run}: {state} is truncated or no checkpoint; start anew")
    try:
        values = json.loads((run / "config.json").read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"--resume {run}: config.json is not JSON ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--resume {run}: config.json holds no object of fields; restore it")
    return values


def check_config(cfg, world: int) -> dict:
    """Every field as checked(), the rules between fields; returns the derived sizes."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):  # (a Config made in Python, not from flags)
        checked(getattr(cfg, f.name), hints[f.name], f"--{f.name}")
    if cfg.algo in ("rloo", "loop") and cfg.k < 2:
        raise UsageError(f"--algo {cfg.algo}: the leave-one-out baseline needs K >= 2; pass --k 2")
    if cfg.normalize_advantage == "group-std" and cfg.k < 2:
        raise UsageError("--normalize_advantage group-std needs --k >= 2; use batch")
    n = cfg.images_per_epoch
    if n % (world * cfg.k):
        raise UsageError(f"--images_per_epoch: need a multiple of K x ranks = {cfg.k * world}")
    on_policy = cfg.algo in ("reinforce", "rloo")  # one update; ppo and loop: two by default
    minibatch = cfg.minibatch or (n if on_policy else max(world, n // 2))
    per_rank, micro = minibatch // world, min(cfg.micro_batch, minibatch // world)
    if minibatch % world or n % minibatch:
        fits = ", ".join(str(m) for m in range(world, n + 1, world) if not n % m)
        raise UsageError(f"--minibatch {minibatch} must divide --images_per_epoch {n} and split "
                         f"evenly over {world} rank(s): pass one of {fits}")  # fmt: skip
    if per_rank % micro:
        raise UsageError(f"--micro_batch {cfg.micro_batch} must divide the minibatch per rank, "
                         f"{per_rank} (--minibatch {minibatch} over {world} rank(s)): pass a "
                         f"divisor of {per_rank}")  # fmt: skip
    updates = cfg.inner_epochs * n // minibatch
    return {"world_size": world, "prompts_per_epoch": n // cfg.k, "images_per_epoch": n,
            "images_per_rank": n // world, "minibatch": minibatch, "minibatch_per_rank": per_rank,
            "micro_batch": micro, "grad_accumulation": per_rank // micro, "updates_per_epoch": updates,
            "off_policy_without_ratio": on_policy and updates > 1}  # fmt: skip


# === Inputs: model, prompts and reward resolved and checked before anything is written
@dataclasses.dataclass
class Run:
    """What main needs besides Config, resolved once: where, on which rank, with what."""

    folder: Path
    rank: int
    world: int
    device: torch.device
    weight_dtype: torch.dtype
    sizes: dict
    model: str
    reward: str
    reward_options: dict
    train_prompts: list[str]
    eval_prompts: list[str]  # each held-out prompt eval_images_per_prompt times
    launcher: str  # the command that continues it: python loop.py, or torchrun with its ranks
    writer = property(lambda self: self.rank == 0)  # rank 0 prints and writes
    micro = property(lambda self: self.sizes["micro_batch"])
    images_per_rank = property(lambda self: self.sizes["images_per_rank"])


def prepare(cfg, algos: tuple) -> Run:
    """Every input checked (one line, exit 2, nothing written), the run resolved."""
    rank, world, device = setup_distributed(cfg)
    sizes = check_config(cfg, world)
    model = resolve_model_path(model_for_reward(cfg.model, cfg.reward, show=rank == 0))
    check_num_steps(cfg.num_steps, model)
    reward, train_prompts, eval_prompts = reward_and_prompts(cfg, model, show=rank == 0)
    options = reward_options(reward, cfg.reward_options) | rewards.route_lists(
        reward, cfg.prompt_dir
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.resume or cfg.out or f"runs/{cfg.algo}-{cfg.reward}-k{cfg.k}-{stamp}")
    if rank == 0 and not cfg.resume and any((folder / n).exists() for n in RUN_FILES[:-1]):
        raise UsageError(f"--out {folder} holds an earlier run's files; pass --resume "
                         f"{shlex.quote(str(folder))} or another --out")  # fmt: skip
    if not (existing := next(f for f in (folder, *folder.parents) if f.exists())).is_dir():
        raise UsageError(f"--out {folder}: {existing} is a file; pass a folder")
    launcher = f"torchrun --nproc_per_node {world} loop.py" if world > 1 else "python loop.py"
    return Run(folder, rank, world, device, weight_dtype_for(cfg.mixed_precision, device), sizes,
               model, reward, options, train_prompts, eval_prompts, launcher)  # fmt: skip


def model_for_reward(model: str, reward: str, show: bool = True) -> str:
    """--model, but the embedded model (it draws no textures) means its twin for --reward texture."""
    if reward != "texture" or (HERE / model).resolve() != EMBEDDED_MODEL:
        return model
    if not (TEXTURE_MODEL / "model_index.json").is_file():
        raise UsageError(f"--reward texture: {model} draws no textures; {TEXTURE_MODEL} is missing"
                         "; pass a --model that draws them")  # fmt: skip
    if show:
        print(f"--reward texture: {model} draws no textures; using {TEXTURE_MODEL.name}")
    return str(TEXTURE_MODEL)


def resolve_model_path(model: str) -> str:
    """A local diffusers folder (as given, or next to loop.py) with every part model_index.json
    names, or a hub id 'org/name'."""
    if folder := next((f for f in (Path(model).expanduser(), HERE / model) if f.is_dir()), None):
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError):
            raise UsageError(
                f"--model {folder}: no readable model_index.json; pass a diffusers folder"
            ) from None
        parts = [k for k, v in index.items() if isinstance(v, list) and v[0] is not None]
        if missing := [part for part in parts if not (folder / part).is_dir()]:
            raise UsageError(f"--model {folder}: model_index.json names {missing}, not there")
        return str(folder)
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and ".." not in model
    if not hub_id or Path(model).parent.is_dir() or (HERE / model).parent.is_dir():
        raise UsageError(f"--model {model}: model folder not found; pass an existing diffusers "
                         "folder or a hub id such as stabilityai/stable-diffusion-2-base")  # fmt: skip
    return model


def reward_and_prompts(cfg, model: str, show: bool = True) -> tuple[str, list[str], list[str]]:
    """The reward's name (shapes world: color -> shapes_color), the training prompts and the
    held-out ones (each eval_images_per_prompt times): the flags' files, --prompt_dir's CompBench
    files or the world's own, each checked."""
    reward = rewards.resolve_reward_name(model, cfg.reward)
    if reward not in rewards.REWARD_NAMES:
        names = ", ".join(rewards.REWARD_NAMES)
        raise UsageError(f"unknown --reward {cfg.reward!r}; choose one of {names}")
    if reward != cfg.reward and show:
        print(f"shapes-world model: --reward {cfg.reward} resolves to {reward}")
    category = reward.removeprefix("shapes_")
    if cfg.train_prompts:
        train = Path(cfg.train_prompts)
    elif cfg.prompt_dir:
        train = Path(cfg.prompt_dir) / f"{category}_train.txt"
    elif Path(model, rewards.SHAPES_MARKER).is_file() and category in rewards.COMPBENCH_CATEGORIES:
        train = HERE / "shapes_world" / "prompts" / f"{category}_train.txt"
    else:
        raise UsageError(f"no prompts for --reward {reward}; pass --train_prompts or --prompt_dir")
    held_out = Path(
        cfg.eval_prompts or train.with_name(train.name.replace("_train.txt", "_val.txt"))
    )
    if not cfg.eval_prompts and (held_out == train or not held_out.is_file()):
        held_out = train  # a plain prompt file without a *_val.txt
        print(f"no held-out prompt file next to {train}: evaluating on its first prompts")
    prompts = {"training": read_prompts(train, "training")}
    prompts["held-out"] = read_prompts(held_out, "held-out")[: cfg.num_eval_prompts]
    check_prompts(model, reward, prompts)
    repeated = [p for p in prompts["held-out"] for _ in range(cfg.eval_images_per_prompt)]
    return reward, prompts["training"], repeated


def read_prompts(path: Path, what: str) -> list[str]:
    try:
        return rewards.read_prompt_file(path)
    except ValueError as error:
        raise UsageError(f"{what} prompt file {error}; fix --*_prompts or --prompt_dir") from None


def check_prompts(model: str, reward: str, prompts: dict[str, list[str]]) -> None:
    """Every prompt fits the text encoder (else the model sees only its start while the reward
    scores all of it), and the reward has what it needs to score them (rewards.check_prompts)."""
    from transformers import AutoTokenizer

    tokenizer = None
    with contextlib.suppress(OSError, ValueError):  # load_models says what is wrong with the model
        local = Path(model).is_dir()
        tokenizer = AutoTokenizer.from_pretrained(
            model, subfolder="tokenizer", local_files_only=local
        )
    for what, texts in prompts.items():
        for text in dict.fromkeys(texts) if tokenizer else []:
            if (
                count := len(tokenizer(text, verbose=False).input_ids)
            ) > tokenizer.model_max_length:
                raise UsageError(f"{what} prompt {text[:40]!r}... has {count} tokens, more than the "
                                 f"text encoder's {tokenizer.model_max_length}; shorten it")  # fmt: skip
        try:
            rewards.check_prompts(reward, texts)
        except ValueError as error:
            raise UsageError(f"{what} {one_line(error)}") from None


def check_num_steps(num_steps: int, model: str, flag: str = "--num_steps") -> None:
    """`flag` (DDIM steps) at most a local model's scheduler's training timesteps."""
    config = Path(model, "scheduler", "scheduler_config.json")
    try:
        steps = json.loads(config.read_text()).get("num_train_timesteps", 1000)
    except FileNotFoundError:  # a hub id: diffusers checks it
        return
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(
            f"{config} is not a scheduler config ({one_line(error)}); restore it"
        ) from None
    if num_steps > steps:
        raise UsageError(f"{flag} {num_steps}: the model's scheduler has {steps} training "
                         f"timesteps; pass {flag} <= {steps}")  # fmt: skip


def reward_options(reward: str, given: str) -> dict:
    """--reward_options: a JSON object of the options the reward's loader takes."""
    try:
        options = json.loads(given or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"--reward_options {given!r} is not JSON ({error})") from None
    valid = rewards.reward_options_of(reward)
    unknown = sorted(set(options) - set(valid)) if isinstance(options, dict) else []
    if not isinstance(options, dict) or unknown:
        raise UsageError(f"--reward_options {given}: need a JSON object of {reward}'s options "
                         f"({', '.join(valid)})" + (f", not {', '.join(unknown)}" if unknown else ""))  # fmt: skip
    hints = typing.get_type_hints(rewards.LOADERS[reward], include_extras=True)
    for name, value in options.items():  # each as the loader declares it (Annotated: its range)
        if typing.get_origin(hints.get(name)) is typing.Annotated:
            options[name] = checked(value, hints[name], f"--reward_options' {name}")
    return options


def load_rewards(run: Run):
    """r for training and for the held-out score, which on a GPU runs in the original scorers'
    precision (as bench/evaluate.py, so the two numbers compare) unless the options set dtype."""
    name, options = run.reward, run.reward_options
    if on_ranks() is not None and run.rank > 0:
        dist.barrier()  # rank 0 downloads what the reward needs first, alone
    try:
        train = rewards.load_reward(name, device=run.device, **options)
        held_out = train
        if run.device.type == "cuda" and "dtype" not in options:
            held_out = rewards.load_reward(name, device=run.device, dtype="original", **options)
        if on_ranks() is not None and run.rank == 0:
            dist.barrier()  # the others load from its cache
        return train, held_out
    except (OSError, RuntimeError, ValueError) as error:
        raise UsageError(f"could not load reward {name}: {one_line(error)} (pass local copies with "
                         f"--reward_options; {name}'s options: {', '.join(rewards.reward_options_of(name))})") from None  # fmt: skip


def check_steps(steps: list[int], sigma_t: torch.Tensor, min_sigma: float, cfg) -> None:
    if not (sigma_t >= min_sigma).any():
        raise UsageError(f"--eta {cfg.eta} leaves every sigma_t < {min_sigma}; raise --eta")
    if not steps:
        raise UsageError(f"--min_train_sigma {cfg.min_train_sigma} excludes every step (the largest "
                         f"sigma_t is {sigma_t.max():.3g}); pass --min_train_sigma 0 to train all")  # fmt: skip


def check_ratio_noise(worst: float, clip_range: float) -> None:
    """A fresh rollout re-scored must give rho = 1: noise near eps would be clipped as if learned."""
    if worst > clip_range / 10:
        raise UsageError(f"re-scoring a fresh rollout gives max |log rho_t| = {worst:.2e}, over a "
                         f"tenth of --clip_range {clip_range:g}: sampling and training ran different "
                         "kernels; pass --mixed_precision no")  # fmt: skip


def dtype_option(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype keyword: `dtype=` from diffusers 0.40 on (`torch_dtype=` before)."""
    import diffusers

    new = tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 40)
    return {"dtype" if new else "torch_dtype": dtype}


# === Ranks: torchrun's processes, the device and its precision, statistics over ranks
def setup_distributed(cfg):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: this torch sees no CUDA device; pass --device cpu (or auto)"
        )
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:  # this rank's GPU, also the one NCCL's collectives use
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that computes in it (compute capability >= 8.0), else fp32."""
    bf16_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    choice = ("bf16" if bf16_gpu else "no") if mixed_precision == "auto" else mixed_precision
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def on_ranks() -> torch.device | None:
    """None in one process; else where collectives' tensors live (the rank's GPU under NCCL)."""
    if not dist.is_initialized():
        return None
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def broadcast(params) -> None:
    for p in params if on_ranks() else []:
        dist.broadcast(p.data, src=0)


def gather(values: torch.Tensor) -> torch.Tensor:
    """Every rank's (n,) values, rank-major: (world*n,) on the CPU (each rank holds as many)."""
    if (device := on_ranks()) is None:
        return values
    parts = [torch.zeros_like(values, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.to(device).contiguous())
    return torch.cat(parts).cpu()


def mean_over_ranks(stats: dict) -> dict:
    """Logged statistics (numbers or lists), each averaged over ranks (as DDPO's); None stays."""
    if on_ranks() is None:
        return stats
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, stats)
    return {
        k: None if v is None else np.mean([s[k] for s in shards], 0).tolist()
        for k, v in stats.items()
    }


def mean_and_std(reward: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the rewards in float64: std = sqrt(E[r^2] - E[r]^2)."""
    mean, second = torch.tensor([reward.mean(), (reward**2).mean()], dtype=torch.float64).tolist()
    return mean, math.sqrt(max(0.0, second - mean**2))


def check_finite(prompts: list[str], reward: torch.Tensor, *samples: torch.Tensor) -> None:
    """Stop every rank together on a non-finite sample (NonFinite) or reward (naming its prompts)."""
    bad = sorted({p for p, r in zip(prompts, reward.tolist()) if not math.isfinite(r)})
    finite = all(torch.isfinite(s).all() for s in samples)
    flags = torch.tensor([float(not finite), float(bool(bad))], device=on_ranks())
    if on_ranks():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0]:
        raise NonFinite("the sampler's latents or log-probs", False)
    if flags[1]:
        raise UsageError(
            f"the reward is non-finite {f'for prompts {bad}' if bad else 'on another rank'}; fix "
            "the reward or drop these prompts (training stopped, the last checkpoint is intact)"
        )


# === The run folder: config.json, metrics.jsonl, samples/, lora/, checkpoint/; one process at a time
def lock_holder(folder: Path) -> str | None:
    """Who holds the run folder's lock ('pid N on HOST since T'), or None."""
    with contextlib.suppress(OSError), open(folder / LOCK) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return lock.read().strip() or "another process"
    return None


def advice(run: Run, cfg, error: BaseException) -> str:
    """What was kept and what to do, true of the folder as it is now: a command that works."""
    epoch = checkpoint_epoch(run.folder)
    if isinstance(error, NonFinite) and not (epoch or error.args[1]):  # the untrained model
        return (f"{error.args[0]} are non-finite before any update: --guidance_scale "
                f"{cfg.guidance_scale:g} or --eta {cfg.eta:g} overflows the sampler (or --model "
                "holds inf/NaN weights); pass a smaller --guidance_scale (the default is 5)")  # fmt: skip
    if isinstance(error, NonFinite):
        return (f"{error.args[0]} became non-finite: the LoRA weights diverged at --lr {cfg.lr:g}; "
                f"start a new run with a smaller one (e.g. --lr {min(cfg.lr / 4, 4e-3):g}) and "
                "another --out (this folder keeps its last checkpoint)")  # fmt: skip
    if epoch is None:
        return "nothing was kept (no checkpoint yet; the folder is removed): run it again"
    if epoch >= cfg.epochs:
        return f"the run is complete: the LoRA is at {run.folder / 'lora'}"
    command = f"{run.launcher} --resume {shlex.quote(str(run.folder))}"
    return f"the checkpoint of epoch {epoch} is intact; continue with: {command}"


def stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) ends as Ctrl-C does


@contextlib.contextmanager
def claimed(run: Run, cfg):
    """The run folder for this process alone (flock), checked writable before any model loads.
    A fresh run that ends before its first checkpoint leaves nothing; a write fault, Ctrl-C or
    SIGTERM ends in one line that says what was kept and the command that continues."""
    folder, lock, signals = run.folder, None, (signal.SIGINT, signal.SIGTERM)
    handlers = [signal.getsignal(sig) for sig in signals]
    existed = {name for name in RUN_FILES if (folder / name).exists()}
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    try:
        if run.writer:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock = open(folder / LOCK, "a+")  # noqa: SIM115 (held for the whole run)
            except OSError as error:
                fix = "make it writable" if cfg.resume else "pass another --out"
                raise UsageError(f"{folder} is not writable ({error.strerror}); {fix}") from None
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UsageError(f"{folder} is being trained by {lock_holder(folder)}; wait for it "
                                 "to end or pass another --out") from None  # fmt: skip
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%X')}")
            lock.flush()
            for stale in folder.rglob("*.tmp[0-9]*"):  # left by a kill mid-write; ours alone now
                stale.unlink(missing_ok=True)
            if not cfg.resume:
                config = json.dumps(dataclasses.asdict(cfg), indent=2)
                atomic_write(folder / "config.json", lambda tmp: tmp.write_text(config))
        with contextlib.suppress(ValueError):  # (not the main thread: no handler)
            signal.signal(signal.SIGTERM, stop)
        yield
    except NonFinite as error:
        raise UsageError(advice(run, cfg, error)) from None
    except (KeyboardInterrupt, WriteFault) as error:
        with contextlib.suppress(ValueError):  # a second signal does not cut the message short
            for sig in signals:
                signal.signal(sig, signal.SIG_IGN)
        what, kind = (
            ("interrupted", Interrupted)
            if isinstance(error, KeyboardInterrupt)
            else (error, WriteFault)
        )
        raise kind(f"{what}: {advice(run, cfg, error)}") from None
    finally:
        if lock and not cfg.resume and checkpoint_epoch(folder) is None:
            for name in set(RUN_FILES) - existed:  # undo a fresh run: what it wrote, no more
                path = folder / name
                shutil.rmtree(path, True) if path.is_dir() else path.unlink(missing_ok=True)
            for made in created:
                with contextlib.suppress(OSError):
                    made.rmdir()  # only if empty
        with contextlib.suppress(ValueError):
            for sig, handler in zip(signals, handlers):
                signal.signal(sig, handler)
        if lock:
            lock.close()


def atomic_write(path: Path, write) -> None:
    """Write a temporary file, then rename it: a kill mid-write never leaves a broken file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # recreated if deleted mid-run
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save on a full disk: RuntimeError
        full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)
        reason = "the disk is full" if full else one_line(error)
        raise WriteFault(f"could not write {path} ({reason})") from None
    finally:
        with contextlib.suppress(OSError):  # a failed cleanup must not hide the write fault
            tmp.unlink(missing_ok=True)


def save_grid(path: Path, images, prompts: list[str], reward) -> None:
    """PNG grid of (N, 3, H, W) images in [0, 1], 8 a row, and a .txt of 'prompt | r=reward'."""
    from diffusers.utils import make_image_grid, numpy_to_pil
    from PIL import Image

    pil = numpy_to_pil(images.permute(0, 2, 3, 1).numpy())  # (N, H, W, 3) -> N images
    cols = min(len(pil), 8)
    rows = -(-len(pil) // cols)
    grid = make_image_grid(
        pil + [Image.new("RGB", pil[0].size)] * (rows * cols - len(pil)), rows, cols
    )
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    text = "".join(f"{p} | r={r:.3f}\n" for p, r in zip(prompts, reward.tolist()))
    atomic_write(path.with_suffix(".txt"), lambda tmp: tmp.write_text(text))


def save_lora(run: Run, unet) -> None:
    """lora/pytorch_lora_weights.safetensors in diffusers' format (load_lora_weights reads it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if run.writer:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        save = StableDiffusionPipeline.save_lora_weights
        path = run.folder / "lora" / "pytorch_lora_weights.safetensors"
        atomic_write(
            path, lambda tmp: save(tmp.parent, unet_lora_layers=state, weight_name=tmp.name)
        )


def checkpoint_epoch(folder: Path) -> int | None:
    """The epoch checkpoint/state.pt continues from; None if there is none or it is unreadable."""
    with contextlib.suppress(
        RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError
    ):
        return int(torch.load(folder / "checkpoint" / "state.pt", weights_only=False)["next_epoch"])
    return None


def read_state(folder: Path) -> dict:
    """checkpoint/state.pt, with every part save_epoch writes, of as many ranks as this run has."""
    path = folder / "checkpoint" / "state.pt"
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise UsageError(f"--resume: {path} is unreadable ({one_line(error)})") from None
    keys = ("lora", "optimizer", "ema", "next_epoch", "rng")
    if missing := [k for k in keys if not isinstance(state, dict) or k not in state]:
        raise UsageError(f"--resume: {path} is not a loop.py checkpoint (no {missing}); start anew")
    if (world := state.get("world", 1)) != (here := int(os.environ.get("WORLD_SIZE", "1"))):
        raise UsageError(f"--resume: the run was trained on {world} rank(s); resume it on as many "
                         f"(on {here} it would not continue exactly)")  # fmt: skip
    return state


def load_checkpoint(run: Run, unet, optimizer, ema: list, scaler) -> int:
    """Restore what save_epoch wrote, each part checked against this run; the next epoch.
    metrics.jsonl keeps the rows the checkpoint covers (a kill between row and checkpoint)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state, path = read_state(run.folder), run.folder / "checkpoint" / "state.pt"
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    if {k: tuple(v.shape) for k, v in state["lora"].items()} != shapes:
        raise UsageError(f"--resume: {path}'s LoRA (rank, modules) does not fit config.json's")
    set_peft_model_state_dict(unet, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for average, saved in zip(ema, state["ema"], strict=True):
        average.copy_(saved)
    for name, (_, restore) in RNGS.items():
        restore(state["rng"][name])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    epoch = state["next_epoch"]
    if run.writer:
        rows = [r for r in read_metrics(run.folder) if r["epoch"] <= epoch]  # row N: epoch N's
        if (kept := [r["epoch"] for r in rows]) != list(range(epoch + 1)):
            print(f"warning: {run.folder}/metrics.jsonl holds epochs {kept} of 0-{epoch}")
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(run.folder / "metrics.jsonl", lambda tmp: tmp.write_text(text))
        print(f"resumed {run.folder} at epoch {epoch}")
    return epoch


def read_metrics(folder: Path) -> list[dict]:
    """metrics.jsonl's rows ([] if it was deleted), objects with increasing integer epochs."""
    path = folder / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(
            f"{path} is unreadable ({one_line(error)}); delete it to start it anew"
        ) from None
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n + 1 < len(lines):  # only the last row can be cut short (by a full disk)
                raise UsageError(f"{path}: line {n + 1} is not JSON; fix or delete it") from None
    epochs = [r.get("epoch") if isinstance(r, dict) else None for r in rows]
    if any(type(e) is not int for e in epochs) or epochs != sorted(set(epochs)):
        raise UsageError(
            f"{path}: rows need increasing integer epochs, not {epochs[:6]}...; fix it"
        )
    return rows


def save_epoch(run: Run, row: dict, grids: dict, unet, optimizer, ema: list, scaler) -> None:
    """Rank 0 writes the epoch: its grids, its metrics row (strict JSON), the checkpoint last."""
    from peft.utils import get_peft_model_state_dict
    from tqdm import tqdm

    if not run.writer:
        return
    for kind, (images, prompts, reward) in grids.items():
        save_grid(
            run.folder / "samples" / f"{kind}_epoch_{row['epoch']:04d}.png", images, prompts, reward
        )
    for key, value in row.items():  # metrics.jsonl is strict JSON: null, and a warning
        if isinstance(value, float) and not math.isfinite(value):
            print(
                f"warning: epoch {row['epoch']}: {key} is {value}; logged as null", file=sys.stderr
            )
            row[key] = None
    try:
        with open(run.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise WriteFault(
            f"could not write {run.folder / 'metrics.jsonl'} ({one_line(error)})"
        ) from None
    rng = {name: get() for name, (get, _) in RNGS.items()}
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state = {
        "lora": get_peft_model_state_dict(unet),
        "optimizer": optimizer.state_dict(),
        "ema": ema,
    }
    state |= {
        "rng": rng,
        "next_epoch": row["epoch"],
        "world": run.world,
        "scaler": scaler.state_dict(),
    }
    atomic_write(run.folder / "checkpoint" / "state.pt", lambda tmp: torch.save(state, tmp))
    if (held_out := row["eval_reward_mean"]) is not None and row["epoch"] == 0:
        return print(f"held-out {run.reward} before training: {held_out:.4f}")
    line = f"epoch {row['epoch']}: reward {row['reward_mean']:.4f} clipfrac {row['clipfrac']:.3f}"
    tqdm.write(line + (f" held-out {held_out:.4f}" if held_out is not None else ""))
    if not row["grad_norm"]:  # None: every step skipped; 0: every gradient 0
        tqdm.write(f"warning: epoch {row['epoch']}: the LoRA gradient was exactly zero (or non-"
                   "finite) at every update: nothing learned (all advantages zero? fp16 underflow?)")  # fmt: skip


def print_start(cfg, run: Run, models, steps: list[int], n_lora: int) -> None:
    if run.writer:
        print("config:", json.dumps(dataclasses.asdict(cfg)), "\nderived:", json.dumps(run.sizes))
        print(
            f"reward {run.reward}: {len(run.train_prompts)} training prompts, "
            f"{len(run.eval_prompts)} held-out images ({cfg.eval_images_per_prompt} per prompt)"
        )
        print(f"model {run.model}: {models.resolution}px, latent {models.latent_shape}, {n_lora} "
              f"LoRA weights, {run.device}, {run.weight_dtype}, {len(steps)}/{cfg.num_steps} "
              "steps trained")  # fmt: skip


def finish(run: Run, size: int) -> None:
    """The run's last lines: held-out score before -> after, the labelled before/after picture:
    the first 8 held-out images before (top) and after training (bottom), 2x, each row labelled
    with its epoch and mean score, each column with its prompt and its two scores."""
    from PIL import Image, ImageDraw

    if dist.is_initialized():
        dist.destroy_process_group()
    if not run.writer:
        return
    evals = [r for r in read_metrics(run.folder) if r["eval_reward_mean"] is not None]
    (first, last), samples = (evals[0], evals[-1]), run.folder / "samples"
    before = f"before {first['eval_reward_mean']:.4f} -> after " if first["epoch"] == 0 else ""
    print(f"held-out {run.reward}: {before}{last['eval_reward_mean']:.4f} (epoch {last['epoch']})")
    grids = [samples / f"eval_epoch_{r['epoch']:04d}.png" for r in (first, last)]
    if all(grid.is_file() for grid in grids):
        s, left = 2 * size, 72  # each image drawn 2x; a label column on the left
        out = Image.new("RGB", (left + 8 * s, 2 * s + 46), "white")
        draw, texts = (
            ImageDraw.Draw(out),
            [g.with_suffix(".txt").read_text().splitlines() for g in grids],
        )
        for i, (grid, row) in enumerate(zip(grids, (first, last))):
            strip = Image.open(grid).crop((0, 0, 8 * size, size)).resize((8 * s, s), Image.NEAREST)
            out.paste(strip, (left, i * s))
            label = f"{'after' if i else 'before'}\nepoch {row['epoch']}\nmean {row['eval_reward_mean']:.3f}"
            draw.text((4, i * s + 4), label, fill="black")
        for col, (a, b) in enumerate(zip(texts[0][:8], texts[1][:8])):
            prompt, r0 = a.rsplit(" | r=", 1)
            caption = textwrap.wrap(prompt, s // 6)[:2] + [f"{r0} -> {b.rsplit('=', 1)[1]}"]
            draw.text((left + col * s + 2, 2 * s + 2), "\n".join(caption), fill="black")
        atomic_write(samples / "before_after.png", lambda tmp: out.save(tmp, format="PNG"))
        print(f"before/after grid: {samples / 'before_after.png'}")
    print(f"LoRA: {run.folder / 'lora' / 'pytorch_lora_weights.safetensors'}")
