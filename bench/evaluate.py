"""Score a model, and a LoRA from a loop.py run, on a prompt file as T2I-CompBench scores: M images per
prompt from fixed seeds (prompt i draws from seed + i), through diffusers' own StableDiffusionPipeline
and `load_lora_weights`, scored by a reward of rewards.py; prints the mean, --out gets the settings and
the per-prompt scores as JSON. A measuring instrument: it shares no code with loop.py's sampler, so it
checks a trained LoRA independently of the code that trained it.

    # the embedded shapes-world model, with a LoRA from a run (color: the exact pixel judge)
    python bench/evaluate.py shapes_world/prompts/color_val.txt color --lora runs/<run>/lora \\
        --images_per_prompt 4
    # Stable Diffusion 2 on T2I-CompBench's prompts (BLIP-VQA, CompBench's 10 images per prompt)
    python bench/evaluate.py T2I-CompBench/examples/dataset/color_val.txt color \\
        --model stabilityai/stable-diffusion-2-base --lora runs/<run>/lora --images_per_prompt 10

Sampling: --num_inference_steps, --guidance_scale and --eta default to the model's policy: for a
shapes-world folder (one with shapes_world.json) its `calibration_rl` (6 DDIM steps, w = 5, eta 1: the
policy loop.py trains), otherwise CompBench's 50 steps, w = 7.5, eta 0. One line says which were used.

What to expect (the embedded model, color_val.txt, --images_per_prompt 4, CPU, 2 threads): the base
model scores 0.435 on all 62 prompts (4 minutes) and 0.489 with --limit 16 (40 s). A LoRA adds about
its run's held-out gain, which 16 prompts x 4 images resolve only when it is large: the LoRA of a
4-epoch run (`python loop.py --epochs 4 --eval_every 4`, held-out 0.374 -> 0.409) scores 0.445 on all
62 prompts, but 0.474 with --limit 16, under the base model's 0.489.

Every bad input is one line (`error: ...`, exit code 2), found before any model loads; nothing is
written. `python bench/evaluate.py --help` lists the flags.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loop_utils
import rewards

COMPBENCH_SAMPLING = {"num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0}
USAGE = "python bench/evaluate.py PROMPTS REWARD [--flag VALUE ...]"


def resolve_reward_name(model: str, reward: str) -> str:
    """rewards.resolve_reward_name, saying so when a shapes-world model turns 'color' into its judge."""
    resolved = rewards.resolve_reward_name(model, reward)
    if resolved != reward:
        print(f"shapes-world model: {reward} resolves to {resolved} (the exact pixel judge)")
    return resolved


def sampling_policy(model: str, given: dict) -> tuple[dict, str]:
    """num_inference_steps, guidance_scale and eta: those given (not None), the others the model's
    (a shapes-world folder's calibration_rl, else CompBench's); and one line saying which were used."""
    marker = Path(model, rewards.SHAPES_MARKER)
    defaults, source = COMPBENCH_SAMPLING, "CompBench's"
    if marker.is_file():
        try:
            calibration = json.loads(marker.read_text()).get("calibration_rl")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{marker}: not a shapes-world JSON object ({error})") from None
        if isinstance(calibration, dict) and set(COMPBENCH_SAMPLING) <= set(calibration):
            defaults = {name: calibration[name] for name in COMPBENCH_SAMPLING}
            source = "the model's calibration_rl: loop.py's default policy"
        else:
            source += f" ({marker.name} has no calibration_rl)"
    sampling = {name: defaults[name] if given[name] is None else given[name] for name in defaults}
    values = ", ".join(f"{name} {value}" for name, value in sampling.items())
    chosen = [name for name in defaults if given[name] is not None]
    note = f"{', '.join(chosen)} given, the rest " if chosen else ""
    note = "all given" if len(chosen) == len(defaults) else f"{note}{source}"
    return sampling, f"sampling: {values} ({note})"


def evaluation_options(
    reward: str, prompts: str, reward_model: str | None, reward_options: dict | None
) -> dict:
    """The reward's options for `evaluate`, with a clear error where --reward_model means nothing;
    complex reads CompBench's route lists from the prompt file's folder when it has them."""
    if not isinstance(reward_options, dict | None):  # fire hands over what is not a dict literal
        raise TypeError(f"--reward_options {reward_options!r}: need a JSON object of options")
    options = dict(reward_options or {})
    if reward_model:
        if "model" not in rewards.reward_options_of(reward):
            raise ValueError(
                f"--reward_model does not apply to reward {reward!r}, which loads no single model "
                f"(its options: {', '.join(rewards.reward_options_of(reward))}); for complex pass "
                '--reward_options \'{"blip_model": ..., "detector_model": ..., "clip_model": ...}\''
            )
        options["model"] = reward_model
    if "lists" not in options:
        lists = rewards.route_lists(reward, Path(prompts).parent)
        if lists:
            print(f"complex: routing prompts with CompBench's lists in {lists['lists']}")
        options |= lists
    return options


def load_pipeline(model: str, lora: str | None, device: str, dtype: torch.dtype):
    """StableDiffusionPipeline (+ optional LoRA) with a DDIM scheduler; a local folder never touches
    the net."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    options = {"safety_checker": None, "requires_safety_checker": False}
    if os.path.isdir(model):
        options["local_files_only"] = True
    pipe = StableDiffusionPipeline.from_pretrained(
        model, **loop_utils.dtype_option(dtype), **options
    )
    if lora:
        try:
            pipe.load_lora_weights(lora)
        except (RuntimeError, ValueError, KeyError) as error:  # diffusers lists every layer
            first = str(error).strip().splitlines()[0][:200]
            raise ValueError(f"--lora {lora} does not fit --model {model} ({first}...); pass the "
                             "lora/ of a loop.py run of this model") from None  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# evaluate's numbers: flag -> (integer?, least, greatest valid value). Each must be finite, bool is
# no number here (fire reads a bare --flag as True); --limit may be None (every prompt) and the
# sampling flags None (the model's, see sampling_policy).
EVALUATE_NUMBERS = {
    "images_per_prompt": (True, 1, math.inf),
    "num_inference_steps": (True, 1, math.inf),
    "limit": (True, 1, math.inf),
    "seed": (True, 0, 2**63 - 1),  # prompt i draws from seed + i, a 64-bit torch seed
    "guidance_scale": (False, 0, math.inf),
    "eta": (False, 0, 1),
}
MAY_BE_NONE = ("limit", *COMPBENCH_SAMPLING)
LORA_FIX = "pass the lora/ folder of a loop.py run"


def looks_like_hub_id(name: str) -> bool:
    """'org/name', as the hub spells a repository (runs/x/lora, ./lora or /data/lora are paths)."""
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name)
    return hub_id is not None and ".." not in name


def check_evaluate_args(args: dict) -> None:
    """`evaluate`'s arguments by name, checked before anything loads or is written; a bad one is a
    ValueError naming the flag, its value and what it needs: the numbers as EVALUATE_NUMBERS says,
    then --model, --device, the dtypes, --prompts, --lora and --out (`check_model_path`,
    `check_lora_path`, `check_out_path`)."""
    for name, (integer, least, greatest) in EVALUATE_NUMBERS.items():
        value = args[name]
        if name in MAY_BE_NONE and value is None:
            continue
        number = isinstance(value, int if integer else int | float) and not isinstance(value, bool)
        if not number or not (least <= value <= greatest and -math.inf < value < math.inf):
            need = "an integer" if integer else "a finite number"
            need += f" >= {least}" if greatest == math.inf else f" in [{least}, {greatest}]"
            need = "None (every prompt) or " + need if name == "limit" else need
            raise ValueError(f"--{name} {value!r}: need {need}")
    for name in ("prompts", "model", "lora", "out"):  # fire hands over 2024 as an int
        value = args[name]
        if not (isinstance(value, str | os.PathLike) or value is None and name in ("lora", "out")):
            raise ValueError(f"--{name} {value!r}: need a path (a string)")
    check_model_path(str(args["model"]))
    device = args["device"]
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(
            f"unknown --device {device!r}; choose cpu, cuda or cuda:N (or leave it out)"
        )
    for name in ("dtype", "reward_dtype"):
        try:
            rewards.resolve_dtype("cpu", args[name])
        except ValueError as error:
            raise ValueError(f"--{name} {args[name]!r}: {error}") from None
    prompts = Path(args["prompts"])
    if not prompts.is_file():
        what = "is a folder" if prompts.is_dir() else "not found"
        raise ValueError(f"--prompts {prompts}: {what}; pass a text file, one prompt per line")
    if args["lora"]:
        check_lora_path(str(args["lora"]))
    if args["out"]:
        check_out_path(str(args["out"]))


def check_model_path(model: str) -> None:
    """A local --model is a diffusers pipeline folder (model_index.json); a hub id is diffusers'."""
    fix = "pass a pipeline folder (save_pretrained's, with model_index.json) or a hub id"
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"--model {model}: that folder has no model_index.json; {fix}")
    elif os.path.exists(model):
        raise ValueError(f"--model {model} is a file; {fix}")
    elif not looks_like_hub_id(model):
        raise ValueError(f"--model {model}: no such folder, nor a hub id (org/name); {fix}")


def check_lora_path(lora: str) -> None:
    """A local --lora is weights that diffusers' load_lora_weights reads: a folder with a
    *.safetensors or pytorch_lora_weights.* file, or a .safetensors/.bin file (hub ids: its own)."""
    path = Path(lora)
    if path.is_dir():
        if not [*path.glob("*.safetensors"), *path.glob("pytorch_lora_weights.*")]:
            raise ValueError(
                f"--lora {lora}: no LoRA weights (*.safetensors) in that folder; {LORA_FIX}"
            )
    elif path.exists():
        if path.suffix not in (".safetensors", ".bin"):
            raise ValueError(
                f"--lora {lora}: not a LoRA weights file (.safetensors, .bin); {LORA_FIX}"
            )
    elif not looks_like_hub_id(lora):
        raise ValueError(f"--lora {lora}: no such file or folder; {LORA_FIX}")


def check_out_path(out: str) -> None:
    """--out is a file that can be written: no folder, and its folder (made only after the
    evaluation) can be created there. Creates nothing."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(
            f"--out {out} is a folder; pass a file path such as {path / 'scores.json'}"
        )
    folder = path.absolute().parent
    while not folder.exists():  # the nearest folder that exists: the missing ones are made in it
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, so no folder can be made there")
    if path.is_file():  # overwrite an earlier result, never another file
        try:
            earlier = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and "per_prompt" in earlier):
            raise ValueError(
                f"--out {out} exists and is not an earlier `bench/evaluate.py` result; "
                "pass a new path (only such a result is overwritten)"
            )
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK | (0 if target is path else os.X_OK)):
        raise ValueError(f"--out {out}: {target} is not writable; pass a path you can write")


def generate(pipe, prompt: str, seed: int, images_per_prompt: int, **sampling) -> torch.Tensor:
    """(M, 3, H, W) images in [0, 1] of one prompt, from a generator seeded with `seed`."""
    generator = torch.Generator(pipe.device).manual_seed(seed)
    return pipe(
        prompt,
        num_images_per_prompt=images_per_prompt,
        generator=generator,
        output_type="pt",
        **sampling,
    ).images.float()


def evaluate(
    prompts: str,
    reward: str,
    model: str = str(loop_utils.EMBEDDED_MODEL),
    lora: str | None = None,
    images_per_prompt: int = 10,
    seed: int = 0,
    out: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    reward_dtype: str = "original",
    reward_model: str | None = None,
    reward_options: dict | None = None,
    limit: int | None = None,
) -> float:
    """Score `model` (+ `lora`) on a prompt file, CompBench style; returns the mean score.

    prompts: file, one prompt per line; reward: a name in rewards.REWARD_NAMES (color, shape,
    texture, spatial mean the exact judges for a shapes-world model); model: a pipeline folder or hub
    id (default: the repository's shapes_world/tiny-shapes); lora: a loop.py run's lora/ folder;
    images_per_prompt: M (CompBench uses 10), drawn from seed + prompt index; limit: the first
    `limit` prompts only; num_inference_steps, guidance_scale, eta: DDIM sampling, default the
    model's (a shapes-world folder's calibration_rl, else CompBench's 50, 7.5, 0); dtype: the
    pipeline's precision (default bfloat16 on CUDA, float32 on CPU); reward_dtype: the scorer's
    ("original": the original scorers' precision on CUDA, see rewards.resolve_dtype);
    reward_model: the reward's model id, for the rewards that load one model; reward_options: any
    other options of the reward, e.g. '{"blip_model": "DIR"}' for complex (whose CompBench route
    lists are read from the prompt file's folder when it has them). Prints the sampling used and the
    mean; `out` gets the settings and the per-prompt scores as JSON.
    """
    check_evaluate_args(locals())  # bad input fails here: before any model loads, nothing written
    given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    sampling, sampling_line = sampling_policy(model, given | {"eta": eta})
    try:  # a local pipeline: diffusers would refuse more steps only after loading
        loop_utils.check_num_steps(
            sampling["num_inference_steps"], str(model), "--num_inference_steps"
        )
    except loop_utils.UsageError as error:
        raise ValueError(str(error)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu")
    pipe_dtype = rewards.resolve_dtype(device, dtype)
    reward = resolve_reward_name(model, reward)
    options = evaluation_options(reward, prompts, reward_model, reward_options)
    prompt_list = rewards.read_prompt_file(prompts, limit)
    print(sampling_line)
    from tqdm import tqdm

    reward_fn = rewards.load_reward(reward, device=device, dtype=reward_dtype, **options)
    pipe = load_pipeline(model, lora, device, pipe_dtype)
    results, start = [], time.time()
    for index, prompt in enumerate(tqdm(prompt_list, desc="evaluate", leave=False)):
        images = generate(pipe, prompt, seed + index, images_per_prompt, **sampling)
        scores = reward_fn(images, [prompt] * len(images))  # (M,)
        row = {"prompt": prompt, "seed": seed + index, "mean": scores.mean().item()}
        results.append({**row, "scores": scores.tolist()})
    mean = sum(r["mean"] for r in results) / len(results)
    print(
        f"{reward} on {len(results)} prompts x {images_per_prompt} images: mean {mean:.4f} "
        f"({time.time() - start:.1f} s)"
    )
    if out:
        settings = {"model": model, "lora": lora, "prompts": prompts, "reward": reward,
                    "reward_options": options}  # fmt: skip
        settings["reward_dtype"] = str(reward_dtype)
        settings.update(images_per_prompt=images_per_prompt, seed=seed, **sampling)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        document = {**settings, "mean": mean, "per_prompt": results}
        Path(out).write_text(json.dumps(document, indent=1))
    return mean


@functools.wraps(evaluate)
def evaluate_command(*args, **flags) -> None:
    """`python bench/evaluate.py ...`: bad options, missing files or weights are one line
    (`error: ...`, exit code 2), not a traceback. Returns nothing, so that fire prints no second
    mean."""
    try:
        evaluate(*args, **flags)
    except (OSError, RuntimeError, TypeError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


def check_command_line(argv: list[str]) -> None:
    """`python bench/evaluate.py ARGV` as typed, before fire reads it (fire would take `--lora` alone
    as True, keep the last of two --seed, and reject a typo, --lorra x, or a stray word only after
    the whole evaluation): loop_utils.check_argv's rules with PROMPTS and REWARD as the only bare
    words. Raises loop_utils.UsageError."""
    names = inspect.signature(evaluate).parameters
    for before, token in zip(["", *argv], argv):  # fire reads -word as a flag, check_argv a word
        if re.match("-[a-zA-Z]", token) and token != "-h":  # -s: fire's short --seed, unchecked
            short = [name for name in names if re.match(f"-{name[0]}(=|$)", token)]
            fix = f"write --{short[0]}" if len(short) == 1 else "flags take two dashes (--name)"
            if before.startswith("--") and "=" not in before:  # a value such as -inf
                fix = f"write {before}={token}"
            raise loop_utils.UsageError(f"{token}: fire would read it as a flag; {fix}")
    flags = {token[2:].partition("=")[0].replace("-", "_") for token in argv if token[:2] == "--"}
    words = 0 if "prompts" in flags else 1 if "reward" in flags else 2  # PROMPTS REWARD, in order
    given = loop_utils.check_argv(argv, names, words)
    if given is None:  # --help: fire prints it
        return
    missing = [name.upper() for name in ("prompts", "reward") if name not in flags][len(given) :]
    if missing:
        raise loop_utils.UsageError(f"missing {' and '.join(missing)}: {USAGE} (see --help)")


if __name__ == "__main__":
    import fire

    try:
        check_command_line(sys.argv[1:])
    except loop_utils.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    fire.Fire(evaluate_command)
