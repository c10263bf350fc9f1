"""loop.py's plumbing, which a reader of the method never needs: input checks, the run folder's
files, the distributed set-up, the command line's parsing. loop.py imports what it calls from here,
so these names are also reachable as loop.<name>, as the tests, scripts and notebooks use them."""

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
import shutil
import signal
import socket
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


class WriteFault(UsageError):
    """A file of the run folder could not be written (full disk, read-only, quota): one line."""


class NonFinite(Exception):
    """A sample, log-prob or gradient is inf/NaN; main turns it into advice that fits the cause."""


def check_finite_sample(latents, log_probs) -> None:
    if not (torch.isfinite(latents).all() and torch.isfinite(log_probs).all()):
        raise NonFinite("the sampler's latents or log-probs", False)


def non_finite_advice(error: NonFinite, cfg, epoch: int, updated: bool) -> str:
    """Why it went non-finite, and what to do, from whether any update has happened yet."""
    if not updated:  # the untrained model: the sampling settings or the model itself
        return (
            f"{error.args[0]} are non-finite before any update: --guidance_scale {cfg.guidance_scale:g} "
            f"or --eta {cfg.eta:g} overflows the sampler (or --model holds inf/NaN weights); "
            "pass a smaller --guidance_scale (the default is 5)"
        )
    smaller = min(cfg.lr / 4, type(cfg).lr)  # at most the default
    return (
        f"{error.args[0]} became non-finite in epoch {epoch + 1}: the LoRA weights diverged at --lr "
        f"{cfg.lr:g}; start a new run with a smaller one (e.g. --lr {smaller:g}) and another "
        "--out (this folder keeps its last checkpoint)"
    )


class Interrupted(UsageError):
    """Ctrl-C or SIGTERM: one line saying what was kept and how to go on; exit code 130."""


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
    minibatch = cfg.minibatch or default  # reinforce/rloo given more: stale samples, no ratio
    per_rank = minibatch // world
    micro = min(cfg.micro_batch, per_rank)
    if minibatch % world or cfg.images_per_epoch % minibatch:
        fits = [
            m for m in range(world, cfg.images_per_epoch + 1, world) if not cfg.images_per_epoch % m
        ]
        raise UsageError(
            f"--minibatch {minibatch} must divide --images_per_epoch {cfg.images_per_epoch} and "
            f"split evenly over {world} rank(s): pass one of {', '.join(map(str, fits))}"
        )
    if per_rank % micro:
        raise UsageError(
            f"--micro_batch {cfg.micro_batch} must divide the minibatch per rank, {per_rank} "
            f"(--minibatch {minibatch} over {world} rank(s)): pass a divisor of {per_rank}"
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
        "off_policy_without_ratio": on_policy
        and cfg.inner_epochs * cfg.images_per_epoch > minibatch,
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
            "shapes_world/train.py or pass --model"
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
        train = HERE / "shapes_world" / "prompts" / f"{category}_train.txt"
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


def check_prompts(model_path: str, reward: str, prompts: dict[str, list[str]]) -> None:
    """Every prompt fits the text encoder (its tokens beyond the limit would be cut for the model
    while the reward scores the whole prompt) and, for the shapes world's judges, names only things
    of that world. prompts: what -> its prompts."""
    from transformers import AutoTokenizer

    try:
        local = Path(model_path).is_dir()
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, subfolder="tokenizer", local_files_only=local
        )
    except (OSError, ValueError):
        return  # load_models says what is wrong with the model
    limit = tokenizer.model_max_length
    for what, texts in prompts.items():
        for n, text in enumerate(dict.fromkeys(texts), 1):
            if (count := len(tokenizer(text, verbose=False).input_ids)) > limit:
                raise UsageError(
                    f"{what} prompt {text[:40]!r}... has {count} tokens, more than the text "
                    f"encoder's {limit}: the model would see only its start while the reward "
                    "scores all of it; shorten it"
                )
            if reward.startswith("shapes_"):
                import shapes_world

                try:
                    shapes_world.parse_prompt(text)
                except ValueError as error:
                    raise UsageError(
                        f"{what} prompt {n} is not one the shapes world's judge can score: "
                        f"{one_line(error).split(' in phrase ')[0]} (known words: colors "
                        f"{', '.join(shapes_world.COLORS)}; shapes {', '.join(shapes_world.SHAPES)})"
                    ) from None


def check_num_steps(num_steps: int, model_path: str, flag: str = "--num_steps") -> None:
    """`flag` (the DDIM steps) at most the scheduler's training timesteps (a local folder's config)."""
    config = Path(model_path, "scheduler", "scheduler_config.json")
    if config.is_file():
        steps = json.loads(config.read_text()).get("num_train_timesteps", 1000)
        if num_steps > steps:
            raise UsageError(
                f"{flag} {num_steps}: the model's scheduler has {steps} training "
                f"timesteps; pass {flag} <= {steps}"
            )


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


LOCK = "run.lock"  # held (flock) by the one process that trains the folder; says who it is
RUN_FILES = ("config.json", "metrics.jsonl", "samples", "lora", "checkpoint", LOCK)


def run_folder(cfg, writer: bool = True) -> Path:
    """--resume DIR, --out DIR or runs/<algo>-<reward>-k<K>-<time>; never over another run. Only
    the writer (rank 0) asks who holds the lock: under torchrun that is soon rank 0 itself."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = Path(cfg.resume or cfg.out or f"runs/{cfg.algo}-{cfg.reward}-k{cfg.k}-{stamp}")
    if writer and (holder := lock_holder(run)):
        raise UsageError(
            f"{run} is being trained by {holder}; wait for it to end or pass another --out"
        )
    if not cfg.resume and (run / "checkpoint").exists():
        raise UsageError(f"--out {run} holds a run; pass --resume {run} or another --out")
    if not (existing := next(f for f in (run, *run.parents) if f.exists())).is_dir():
        raise UsageError(f"--out {run}: {existing} is a file; pass a folder")
    return run


def lock_holder(run: Path) -> str | None:
    """Who holds the run folder's lock ('pid N on HOST since T'), or None if no one does."""
    try:
        with open(run / LOCK) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return lock.read().strip() or "another process"
    except OSError:  # no lock file: no run ever trained here
        return None
    return None


def checkpoint_epoch(run: Path) -> int | None:
    """The epoch checkpoint/state.pt continues from; None if there is none (or it is unreadable)."""
    try:
        state = torch.load(run / "checkpoint" / "state.pt", weights_only=False, map_location="cpu")
        return int(state["next_epoch"])
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError):
        return None


def resume_advice(run: Path) -> str:
    """What was kept and the command that continues, true of the folder as it is now."""
    epoch = checkpoint_epoch(run)
    if epoch is None:
        return "no checkpoint was written, so there is nothing to resume: run the command again"
    return (
        f"the checkpoint of epoch {epoch} is intact; continue with: python loop.py --resume {run}"
    )


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler's stop) ends as Ctrl-C does


@contextlib.contextmanager
def claimed(run: Path, fresh: bool, writer: bool = True):
    """The run folder for this process alone, for the whole run: created (checked writable before
    any model loads), locked (a second process on it stops with who holds it), cleared of
    temporary files a kill left. A fresh run that ends before its first checkpoint leaves nothing;
    a write error, Ctrl-C or SIGTERM ends in one line that says what was kept."""
    if not writer:  # ranks > 0 write nothing
        yield run
        return
    existed = {name for name in RUN_FILES if (run / name).exists()}
    created = [f for f in (run, *run.parents) if not f.exists()]  # deepest first, e.g. runs/x, runs
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = open(run / LOCK, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError as error:
        raise UsageError(f"--out {run} is not writable ({error.strerror}); pass another") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UsageError(
            f"{run} is being trained by {holder}; wait for it to end or pass another --out"
        ) from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
    lock.flush()
    for stale in run.rglob("*.tmp[0-9]*"):  # left by a kill mid-write; ours alone now
        stale.unlink(missing_ok=True)
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # (not the main thread: no handler)
        signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield run
    except (KeyboardInterrupt, WriteFault) as error:
        kept = resume_advice(run)
        if fresh and checkpoint_epoch(run) is None:
            remove_new_files(run, existed, created)
            kept = "nothing was kept (no checkpoint yet; the folder is removed): run it again"
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        kind = Interrupted if isinstance(error, KeyboardInterrupt) else WriteFault
        raise kind(f"{what}: {kept}") from None
    except BaseException:
        if fresh and checkpoint_epoch(run) is None:
            remove_new_files(run, existed, created)
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
        lock.close()


def remove_new_files(run: Path, existed: set, created: list[Path]) -> None:
    """Undo a fresh run that ended before its first checkpoint: what it wrote (files, and the
    folders it made: the run's and a new runs/ above it), no more."""
    for name in set(RUN_FILES) - existed:
        path = run / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


# === Command line: --flags as a Config. A resume may change how long the run goes, how often it
# is scored and where it runs; any other flag would make it another experiment than config.json says
RESUMABLE = ("resume", "epochs", "eval_every", "eval_raw", "micro_batch", "device")


def check_argv(argv: list[str], names, positional: int = 0) -> list[str] | None:
    """The command line as typed, checked before fire reads it (fire would take `--lr` alone as
    lr = 1.0, keep the last of two `--epochs`, and reject a stray word only after the whole run):
    every flag is a known name with one value, given once; at most `positional` bare words.
    Returns the bare words, or None when help was asked for (fire answers it)."""
    seen, words, i = {}, [], 0
    while i < len(argv):
        token = argv[i]
        if token in ("--help", "-h"):
            return None
        if not token.startswith("--") or token == "--":
            words.append(token)
            i += 1
            continue
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in names:
            raise UsageError(f"unknown flag --{name}; see --help for the flags")
        if not has_value:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise UsageError(f"--{name} needs a value (--{name} VALUE); see --help")
            value, i = argv[i + 1], i + 1
        if name in seen:
            raise UsageError(f"--{name} given twice ({seen[name]!r}, {value!r}); give it once")
        seen[name] = value
        i += 1
    if len(words) > positional:
        extra = " ".join(words[positional:])
        raise UsageError(f"unexpected argument(s) {extra!r}; flags are --name value (see --help)")
    return words


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
    if holder := lock_holder(run):
        raise UsageError(f"{run} is being trained by {holder}; wait for it to end")
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
    for name, value in values.items():  # a hand-edited config.json: "k": "four"
        kind = hints[name]
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not (fits or kind is float and type(value) is int):
            raise UsageError(
                f"--resume {run}: config.json's {name} is {value!r}, not {kind.__name__}; "
                "fix it there (or start a new run)"
            )
    saved = config_class(**values)
    changed = [f"--{n}" for n, v in given.items() if n not in RESUMABLE and v != getattr(saved, n)]
    if changed:
        allowed = ", ".join(f"--{name}" for name in RESUMABLE[1:])
        raise UsageError(
            f"--resume {run}: {', '.join(changed)} would make another experiment than its "
            f"config.json says; a resume may change only {allowed} (else start a new run)"
        )
    resumed = dataclasses.replace(saved, **given)
    done = checkpoint_epoch(run)  # None: unreadable, which load_checkpoint says in one line
    if done is not None and done >= resumed.epochs:
        raise UsageError(
            f"--resume {run}: the run has trained {done} epochs, --epochs is "
            f"{resumed.epochs}: nothing to train; pass --epochs above {done} to go on"
        )
    return resumed


# === Distributed: torchrun's ranks, the device and its precision, statistics over ranks
def setup_distributed(cfg):
    """Rank, world size and device; torchrun sets RANK/WORLD_SIZE (gloo on CPU, nccl on GPU)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {cfg.device!r}; choose one of auto, cpu, cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: this torch sees no CUDA device; pass --device cpu (or auto)"
        )
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
        path.parent.mkdir(parents=True, exist_ok=True)  # recreated if deleted mid-run
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save on a full disk: RuntimeError
        raise write_fault(path, error) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_fault(path: Path, error: BaseException) -> WriteFault:
    """One line for a failed write: the file and the reason (ENOSPC: the disk is full)."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)
    reason = "the disk is full" if full else one_line(error)
    return WriteFault(f"could not write {path} ({reason})")


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
    try:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise write_fault(run / "metrics.jsonl", error) from None


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's rows ([] if it was deleted: a resume starts it again)."""
    if not (path := run / "metrics.jsonl").is_file():
        return []
    rows, lines = [], path.read_text().splitlines()
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n + 1 < len(lines):  # only the last row can be cut short (by a full disk)
                raise UsageError(f"{path}: line {n + 1} is not JSON; fix or delete it") from None
    return rows


def truncate_metrics(run: Path, next_epoch: int) -> None:
    """On resume, drop rows the checkpoint does not cover (a kill between row and checkpoint)."""
    text = "".join(json.dumps(r) + "\n" for r in read_metrics(run) if r["epoch"] < next_epoch)
    atomic_write(run / "metrics.jsonl", lambda tmp: tmp.write_text(text))


def print_summary(run: Path, reward_name: str, resolution: int) -> None:
    """The run's last lines: held-out score before -> after, the before/after grid, the LoRA."""
    evals = [r for r in read_metrics(run) if r["eval_reward_mean"] is not None]
    first, last = evals[0], evals[-1]
    if first["epoch"] > 0:  # a resume after metrics.jsonl was deleted: the untrained row is gone
        print(f"held-out {reward_name}: {last['eval_reward_mean']:.4f} (epoch {last['epoch']})")
    else:
        print(
            f"held-out {reward_name}: before {first['eval_reward_mean']:.4f} -> after "
            f"{last['eval_reward_mean']:.4f} (epoch {last['epoch']})"
        )
    if all(held_out_path(run, r["epoch"]).is_file() for r in (first, last)):
        grid = before_after_grid(run, first["epoch"], last["epoch"], resolution)
        print(f"before/after grid: {grid}")
    print(f"LoRA: {run / 'lora' / 'pytorch_lora_weights.safetensors'}")
