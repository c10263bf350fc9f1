"""The CompBench-style evaluation command (`python bench/evaluate.py PROMPTS REWARD ...`) and the
shapes-world judges.

The pipeline is the tiny Stable Diffusion of tests/conftest.py (random weights, built from configs,
saved with `save_pretrained`), so the command loads it through `StableDiffusionPipeline.from_pretrained`
like a real model folder.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import loop_utils
import rewards

bench_evaluate = importlib.import_module("bench.evaluate")  # the script, imported as a module
EVALUATE = [sys.executable, "bench/evaluate.py"]  # the command, run from the repository root
torch.set_num_threads(1)

PROMPTS = [
    "a red circle and a blue square",
    "a green triangle on the left of a white circle",
]


@pytest.fixture(scope="module")
def tiny_sd(tiny_model) -> Path:
    """The shared tiny pipeline folder of tests/conftest.py (16x16 images, SD2-base DDIM config)."""
    return tiny_model


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "val.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def save_random_lora(model: Path, folder: Path) -> Path:
    """A LoRA on the UNet's attention with random A and B (so it changes the images), diffusers format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    torch.manual_seed(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet)
    )
    return folder


EVAL_ARGS = {"images_per_prompt": 2, "num_inference_steps": 3, "guidance_scale": 3.0}


def test_evaluate_command_end_to_end(tiny_sd, prompt_file, tmp_path):
    out = tmp_path / "scores.json"
    command = [*EVALUATE, "--model", str(tiny_sd)]
    command += ["--prompts", str(prompt_file), "--reward", "jpeg_compressibility"]
    command += ["--images_per_prompt", "2", "--num_inference_steps", "3", "--seed", "0"]
    command += ["--guidance_scale", "3.0", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        command,
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "jpeg_compressibility on 2 prompts x 2 images: mean" in run.stdout
    assert run.stdout.count("mean") == 1  # once, with the seconds (fire printed it a second time)
    assert "sampling: num_inference_steps 3, guidance_scale 3.0, eta 0.0 (" in run.stdout
    result = json.loads(out.read_text())
    assert [r["prompt"] for r in result["per_prompt"]] == PROMPTS
    assert [r["seed"] for r in result["per_prompt"]] == [0, 1]
    assert all(len(r["scores"]) == 2 and max(r["scores"]) < 0 for r in result["per_prompt"])
    means = [sum(r["scores"]) / 2 for r in result["per_prompt"]]
    assert result["mean"] == pytest.approx(sum(means) / 2)
    assert result["reward_dtype"] == "original"  # evaluation scores at the originals' precision
    assert (result["num_inference_steps"], result["guidance_scale"], result["eta"]) == (3, 3.0, 0.0)
    # the same command in-process gives the same numbers: seeds are fixed per prompt
    same = bench_evaluate.evaluate(
        str(prompt_file),
        "jpeg_compressibility",
        str(tiny_sd),
        device="cpu",
        **EVAL_ARGS,
    )
    assert same == pytest.approx(result["mean"], abs=1e-6)


def test_evaluate_with_lora_changes_the_images(tiny_sd, prompt_file, tmp_path):
    lora = save_random_lora(tiny_sd, tmp_path / "lora")
    base = tmp_path / "base.json"
    tuned = tmp_path / "tuned.json"
    common = {
        "prompts": str(prompt_file),
        "reward": "jpeg_incompressibility",
        "model": str(tiny_sd),
    }
    bench_evaluate.evaluate(**common, device="cpu", out=str(base), **EVAL_ARGS)
    bench_evaluate.evaluate(**common, lora=str(lora), device="cpu", out=str(tuned), **EVAL_ARGS)
    base_scores = [r["scores"] for r in json.loads(base.read_text())["per_prompt"]]
    tuned_scores = [r["scores"] for r in json.loads(tuned.read_text())["per_prompt"]]
    assert base_scores != tuned_scores
    assert json.loads(tuned.read_text())["lora"] == str(lora)


@pytest.mark.parametrize("reward", ["complex", "jpeg_compressibility", "shapes_color"])
def test_reward_model_only_where_it_means_something(reward, tiny_sd, prompt_file):
    """--reward_model used to raise a TypeError deep in the loader for rewards without one model."""
    with pytest.raises(ValueError, match="--reward_model does not apply to reward"):
        bench_evaluate.evaluate(
            str(prompt_file), reward, str(tiny_sd), device="cpu", reward_model="DIR"
        )


def test_evaluation_options(tmp_path, capsys):
    prompts = tmp_path / "complex_val.txt"
    prompts.write_text("The red cup was on the left of the blue bowl.\n")
    assert bench_evaluate.evaluation_options("color", str(prompts), "DIR", None) == {"model": "DIR"}
    # complex: CompBench's route lists are used when the prompt file's folder has them
    assert bench_evaluate.evaluation_options("complex", str(prompts), None, None) == {}
    (tmp_path / "complex_val_spatial.txt").write_text(
        "The red cup was on the left of the blue bowl.\n"
    )
    options = {"blip_model": "B"}
    expected = {"blip_model": "B", "lists": str(tmp_path)}
    assert bench_evaluate.evaluation_options("complex", str(prompts), None, options) == expected
    assert "routing prompts with CompBench's lists" in capsys.readouterr().out


def test_evaluate_rejects_an_empty_prompt_file(tiny_sd, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt is empty; write one prompt per line"):
        bench_evaluate.evaluate(str(empty), "jpeg_compressibility", str(tiny_sd), device="cpu")


def test_shapes_world_model_resolves_compbench_names(tmp_path, capsys):
    (tmp_path / "shapes_world.json").write_text(json.dumps({"world": "shapes"}))
    assert rewards.resolve_reward_name(str(tmp_path), "color") == "shapes_color"
    assert capsys.readouterr().out == ""  # rewards.py only answers; the command says it
    assert bench_evaluate.resolve_reward_name(str(tmp_path), "color") == "shapes_color"
    said = "shapes-world model: color resolves to shapes_color (the exact pixel judge)\n"
    assert capsys.readouterr().out == said
    assert rewards.resolve_reward_name(str(tmp_path), "spatial") == "shapes_spatial"
    assert rewards.resolve_reward_name(str(tmp_path), "aesthetic") == "aesthetic"
    assert rewards.resolve_reward_name(str(tmp_path.parent), "color") == "color"


def test_evaluate_records_the_diffusion_model_and_the_reward_options_apart(
    tiny_sd, prompt_file, tmp_path, monkeypatch
):
    """--reward_model once overwrote the diffusion model's "model" entry in the JSON."""
    monkeypatch.setattr(
        rewards, "load_reward", lambda name, **kw: lambda im, p: torch.zeros(len(im))
    )
    out = tmp_path / "scores.json"
    bench_evaluate.evaluate(str(prompt_file), "aesthetic", str(tiny_sd), device="cpu", out=str(out),
                            reward_model="/data/clip-l14", **EVAL_ARGS)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["model"] == str(tiny_sd)
    assert result["reward_options"] == {"model": "/data/clip-l14"}


def test_evaluate_on_a_shapes_world_folder_uses_the_exact_judge(
    tiny_sd, prompt_file, tmp_path, capsys
):
    model = tmp_path / "shapes-model"
    shutil.copytree(tiny_sd, model)
    (model / "shapes_world.json").write_text(json.dumps({"world": "shapes"}))
    out = tmp_path / "scores.json"
    bench_evaluate.evaluate(
        str(prompt_file), "color", str(model), device="cpu", out=str(out), **EVAL_ARGS
    )
    assert "color resolves to shapes_color" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["reward"] == "shapes_color"
    assert all(0 <= s <= 1 for r in result["per_prompt"] for s in r["scores"])


# ----------------------------------------------------------------------------------------------------
# The shapes-world judges through load_reward
# ----------------------------------------------------------------------------------------------------
def rendered_scene() -> tuple[torch.Tensor, str]:
    """A red circle left of a blue square, drawn by the world's renderer, and a prompt that matches it."""
    import shapes_world as W

    objects = [
        W.Obj("red", "circle", "solid", 16, 32, 10),
        W.Obj("blue", "square", "solid", 48, 32, 10),
    ]
    return W.to_tensor(W.render(objects)), "a red circle on the left of a blue square"


@pytest.mark.parametrize("category", ["color", "shape", "texture", "spatial"])
def test_shapes_judges_wrap_shapes_world_score(category):
    import shapes_world as W

    image, prompt = rendered_scene()
    reward = rewards.load_reward(f"shapes_{category}")
    prompts = [prompt, prompt.replace("red", "green").replace("left", "right")]
    images = torch.stack([image, image])
    if category == "texture":
        prompts = [
            "a solid circle and a solid square",
            "a striped circle and a dotted square",
        ]
    if category != "spatial":
        prompts = [
            p.replace(" on the left of ", " and ").replace(" on the right of ", " and ")
            for p in prompts
        ]
    scores = reward(images, prompts)
    torch.testing.assert_close(scores, W.score(images, prompts, category))
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > 0.5 > scores[1]  # the matching prompt scores high, the mismatched one low


EVALUATE_BAD_OPTIONS = {
    "unknown reward option": (["--reward_options", '{"nonsense": 1}'], "has no option nonsense"),
    "reward options not an object": (["--reward_options", "[95"], "need a JSON object"),
    "missing prompt file": (["--prompts", "{tmp}/missing.txt"], "missing.txt"),
}


@pytest.mark.parametrize("case", list(EVALUATE_BAD_OPTIONS))
def test_evaluate_command_bad_options_are_one_line(case, tiny_sd, prompt_file, tmp_path):
    """The command's errors for bad options were clear but printed under a traceback."""
    args, expected = EVALUATE_BAD_OPTIONS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--prompts": str(prompt_file), "--reward": "jpeg_compressibility"}
    base |= {"--model": str(tiny_sd), "--device": "cpu"}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([*EVALUATE, *args], check=False, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-3:]
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------------------------------------------------
# Every bad input: one line (`error: ...`), exit code 2, checked before anything loads, nothing written
# ----------------------------------------------------------------------------------------------------
def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def make_inputs(tmp: Path) -> dict[str, str]:
    """The placeholders of the bad-input tables: folders and files that are no model, LoRA or --out."""
    (tmp / "empty").mkdir()
    (tmp / "lora-config-only").mkdir()
    (tmp / "lora-config-only" / "adapter_config.json").write_text("{}")
    (tmp / "notes.txt").write_text("no weights\n")
    (tmp / "blank.txt").write_text("\n \n")
    (tmp / "latin1.txt").write_bytes("a caf\xe9 on the left of a circle\n".encode("latin-1"))
    return {"tmp": str(tmp), "out": str(tmp / "scores.json")}


# fire took `--lora` alone as True, kept the last of two --seed, and rejected a typo or a stray word
# only after the whole evaluation (printing its score first); the command line is checked first now
CLI_BAD_INPUTS = {
    "typo flag": ("{prompts} jpeg_compressibility --lorra x", "unknown flag --lorra"),
    "valueless flag at the end": ("{prompts} jpeg_compressibility --lora", "--lora needs a value"),
    "valueless flag before a flag": (
        "{prompts} jpeg_compressibility --images_per_prompt --eta 0",
        "--images_per_prompt needs a value",
    ),
    "repeated flag": ("{prompts} jpeg_compressibility --eta 0 --eta 1", "--eta given twice"),
    "stray word": ("{prompts} jpeg_compressibility stray", "unexpected argument(s) 'stray'"),
    "stray word after --prompts": (
        "--prompts {prompts} --reward jpeg_compressibility stray",
        "unexpected argument(s) 'stray'",
    ),
    "one-dash typo flag": ("{prompts} jpeg_compressibility -lorra x", "-lorra: fire would read"),
    "one-dash value": (
        "{prompts} jpeg_compressibility --guidance_scale -inf",
        "write --guidance_scale=-inf",
    ),
    "no prompts": (
        "--reward jpeg_compressibility",
        "missing PROMPTS: python bench/evaluate.py PROMPTS REWARD",
    ),
    "no reward": ("{prompts}", "missing REWARD: python bench/evaluate.py PROMPTS REWARD"),
    "the old command word": (
        "evaluate {prompts} jpeg_compressibility",
        "unexpected argument(s) 'jpeg_compressibility'",
    ),
    "neither prompts nor reward": ("--seed 1", "missing PROMPTS and REWARD"),
    "numbers: --images_per_prompt 0": (
        "{prompts} jpeg_compressibility --images_per_prompt 0",
        "--images_per_prompt 0: need an integer >= 1",
    ),
    "numbers: --guidance_scale nan": (
        "{prompts} jpeg_compressibility --guidance_scale nan",
        "--guidance_scale 'nan': need a finite number >= 0",
    ),
    "empty --lora folder": ("{prompts} jpeg_compressibility --lora {tmp}/empty", "no LoRA weights"),
    "--out a folder": ("{prompts} jpeg_compressibility --out {tmp}/empty", "is a folder"),
}


@pytest.mark.parametrize("case", list(CLI_BAD_INPUTS))
def test_evaluate_command_line_bad_input(case, tiny_sd, prompt_file, tmp_path):
    """Through the real command: exit 2, one `error:` line naming the problem, nothing written."""
    words, expected = CLI_BAD_INPUTS[case]
    names = make_inputs(tmp_path) | {"prompts": str(prompt_file)}
    args = [word.format(**names) for word in words.split()]
    args += ["--model", str(tiny_sd), "--device", "cpu", "--num_inference_steps", "1"]
    args += [] if "--out" in args else ["--out", names["out"]]  # a run that goes ahead writes it
    before = files_under(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([*EVALUATE, *args], check=False, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines[-3:]
    assert "Traceback" not in run.stderr and "mean" not in run.stdout
    assert files_under(tmp_path) == before and not Path(names["out"]).exists()


# evaluate's own checks: keyword -> bad value ({tmp}: the test's folder, see make_inputs), and the
# words of the one line that must name it
BAD_INPUTS = {
    "images_per_prompt 0": (
        {"images_per_prompt": 0},
        "--images_per_prompt 0: need an integer >= 1",
    ),
    "images_per_prompt -2": ({"images_per_prompt": -2}, "--images_per_prompt -2: need an integer"),
    "images_per_prompt True": ({"images_per_prompt": True}, "--images_per_prompt True: need an"),
    "images_per_prompt 2.0": ({"images_per_prompt": 2.0}, "--images_per_prompt 2.0: need an"),
    "images_per_prompt '2'": ({"images_per_prompt": "2"}, "--images_per_prompt '2': need an"),
    "num_inference_steps 0": ({"num_inference_steps": 0}, "--num_inference_steps 0: need an"),
    "limit 0": ({"limit": 0}, "--limit 0: need None (every prompt) or an integer >= 1"),
    "limit -1": ({"limit": -1}, "--limit -1: need None"),
    "limit 1.5": ({"limit": 1.5}, "--limit 1.5: need None"),
    "guidance_scale nan": ({"guidance_scale": math.nan}, "--guidance_scale nan: need a finite"),
    "guidance_scale inf": ({"guidance_scale": math.inf}, "--guidance_scale inf: need a finite"),
    "guidance_scale -1": ({"guidance_scale": -1.0}, "--guidance_scale -1.0: need a finite number"),
    "guidance_scale 'nan'": ({"guidance_scale": "nan"}, "--guidance_scale 'nan': need a finite"),
    "eta -0.1": ({"eta": -0.1}, "--eta -0.1: need a finite number in [0, 1]"),
    "eta 1.5": ({"eta": 1.5}, "--eta 1.5: need a finite number in [0, 1]"),
    "eta nan": ({"eta": math.nan}, "--eta nan: need a finite number in [0, 1]"),
    "eta True": ({"eta": True}, "--eta True: need a finite number"),
    "seed -1": ({"seed": -1}, "--seed -1: need an integer in [0, "),
    "seed 2**64": ({"seed": 2**64}, f"--seed {2**64}: need an integer in [0, "),
    "seed 0.5": ({"seed": 0.5}, "--seed 0.5: need an integer"),
    "model an empty folder": (
        {"model": "{tmp}/empty"},
        "empty: that folder has no model_index.json",
    ),
    "model a file": ({"model": "{tmp}/notes.txt"}, "notes.txt is a file"),
    "model a missing path": ({"model": "{tmp}/runs/sd"}, "sd: no such folder, nor a hub id"),
    "model an int": ({"model": 2024}, "--model 2024: need a path"),
    "lora a missing folder": ({"lora": "{tmp}/run/lora"}, "run/lora: no such file or folder"),
    "lora an empty folder": ({"lora": "{tmp}/empty"}, "empty: no LoRA weights"),
    "lora without weights": ({"lora": "{tmp}/lora-config-only"}, "only: no LoRA weights"),
    "lora not a weights file": ({"lora": "{tmp}/notes.txt"}, "notes.txt: not a LoRA weights file"),
    "out a folder": ({"out": "{tmp}/empty"}, "empty is a folder; pass a file path"),
    "out under a file": ({"out": "{tmp}/notes.txt/a/scores.json"}, "notes.txt is a file, so no"),
    "prompts missing": ({"prompts": "{tmp}/missing.txt"}, "missing.txt: not found; pass a text"),
    "prompts a folder": ({"prompts": "{tmp}/empty"}, "empty: is a folder; pass a text file"),
    "prompts empty": ({"prompts": "{tmp}/blank.txt"}, "blank.txt is empty; write one prompt"),
    "prompts not UTF-8": ({"prompts": "{tmp}/latin1.txt"}, "latin1.txt is not UTF-8 text"),
    "num_inference_steps past the scheduler's": (
        {"num_inference_steps": 1001},
        "--num_inference_steps 1001: the model's scheduler has 1000 training timesteps",
    ),
    "device unknown": ({"device": "tpu"}, "unknown --device 'tpu'; choose cpu, cuda"),
    "reward_dtype unknown": ({"reward_dtype": "float8x"}, "--reward_dtype 'float8x': unknown"),
    "out a file that is no result": (
        {"out": "{tmp}/notes.txt"},
        "notes.txt exists and is not an earlier `bench/evaluate.py` result",
    ),
    "dtype unknown": ({"dtype": "float64x"}, "unknown dtype 'float64x'"),
}


def evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, **kwargs):
    """bench/evaluate.py's evaluate_command with loaders that fail the test if reached: a check that runs only
    after loading (or not at all) cannot pass."""

    def loaded(*args, **options):
        raise AssertionError("a model or reward was loaded before the bad input was rejected")

    monkeypatch.setattr(rewards, "load_reward", loaded)
    monkeypatch.setattr(bench_evaluate, "load_pipeline", loaded)
    settings = {"prompts": str(prompt_file), "reward": "jpeg_compressibility"}
    settings |= {"model": str(tiny_sd), "device": "cpu"}
    return bench_evaluate.evaluate_command(**(settings | kwargs))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_evaluate_bad_input_is_one_line_before_loading(
    case, tiny_sd, prompt_file, tmp_path, monkeypatch, capsys
):
    given, expected = BAD_INPUTS[case]
    names = make_inputs(tmp_path)
    given = {k: v.format(**names) if isinstance(v, str) else v for k, v in given.items()}
    out = {"out": names["out"]} if "out" not in given else {}
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as exit:
        evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, **given, **out)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert files_under(tmp_path) == before and not Path(names["out"]).exists()


def test_evaluate_out_in_a_folder_that_cannot_be_written(
    tiny_sd, prompt_file, tmp_path, monkeypatch, capsys
):
    """(Tests run as root here, where every folder is writable: os.access stands in for the OS.)"""
    out = tmp_path / "new" / "scores.json"
    monkeypatch.setattr(bench_evaluate.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(SystemExit):
        evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, out=str(out))
    assert f"{tmp_path} is not writable" in capsys.readouterr().err
    assert files_under(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_cuda_without_a_gpu(tiny_sd, prompt_file, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, device="cuda")
    assert "--device cuda: no CUDA GPU here" in capsys.readouterr().err


def test_evaluate_checks_let_good_input_through(tiny_sd, prompt_file, tmp_path, monkeypatch):
    """Edge values, hub ids and real LoRA weights pass the checks and reach the loaders."""
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "lora.bin").write_bytes(b"")
    edges = {"images_per_prompt": 1, "num_inference_steps": 1, "seed": 2**63 - 1, "limit": 1}
    edges |= {"guidance_scale": 0, "eta": 1.0, "out": str(tmp_path / "new" / "scores.json")}
    for lora in (None, "org/a-lora", str(tmp_path / "lora"), str(tmp_path / "lora.bin")):
        with pytest.raises(AssertionError, match="was loaded before"):
            evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, lora=lora, **edges)
    with pytest.raises(AssertionError, match="was loaded before"):
        evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, model="org/a-pipeline")
    assert not (tmp_path / "new").exists()
    earlier = tmp_path / "scores.json"  # an earlier result may be overwritten
    earlier.write_text(json.dumps({"mean": 0.5, "per_prompt": []}))
    with pytest.raises(AssertionError, match="was loaded before"):
        evaluate_until_loading(monkeypatch, tiny_sd, prompt_file, out=str(earlier))


def test_evaluate_finds_the_embedded_model_from_any_folder(tmp_path, prompt_file, monkeypatch):
    """Outside the repository the default --model is still the repository's shapes_world/tiny-shapes
    (not the hub id 'shapes_world/tiny-shapes'), so 'color' is the shapes world's exact judge, not
    BLIP from the network."""
    monkeypatch.chdir(tmp_path)
    loaded = {}

    def stop(name, **options):
        loaded["reward"] = name
        raise AssertionError("reached the loader")

    monkeypatch.setattr(rewards, "load_reward", stop)
    with pytest.raises(AssertionError, match="reached the loader"):
        bench_evaluate.evaluate(str(prompt_file), "color", images_per_prompt=1, device="cpu")
    assert loaded["reward"] == "shapes_color"


# ----------------------------------------------------------------------------------------------------
# Sampling: the model's policy unless given (issue 35: the tiny model sampled CompBench's 50 DDIM steps
# at w = 7.5, eta 0, not the policy loop.py trains), and the command as a new user types it
# ----------------------------------------------------------------------------------------------------
CALIBRATED = {"num_inference_steps": 6, "guidance_scale": 5.0, "eta": 1.0}
COMPBENCH = {"num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0}


def test_shapes_world_model_samples_its_calibrated_policy(
    prompt_file, tmp_path, monkeypatch, capsys
):
    """Without sampling flags the embedded model samples 6 DDIM steps at w = 5, eta 1: its
    shapes_world.json's calibration_rl, what loop.py trains."""
    marker = loop_utils.EMBEDDED_MODEL / "shapes_world.json"
    calibration = json.loads(marker.read_text())["calibration_rl"]
    assert {name: calibration[name] for name in CALIBRATED} == CALIBRATED
    loaded, drawn = [], []
    monkeypatch.setattr(
        rewards, "load_reward", lambda name, **kw: lambda im, p: torch.zeros(len(im))
    )
    monkeypatch.setattr(bench_evaluate, "load_pipeline", lambda model, *args: loaded.append(model))

    def generate(pipe, prompt, seed, images_per_prompt, **sampling):
        drawn.append(sampling)
        return torch.zeros(images_per_prompt, 3, 8, 8)

    monkeypatch.setattr(bench_evaluate, "generate", generate)
    out = tmp_path / "scores.json"
    bench_evaluate.evaluate(str(prompt_file), "color", images_per_prompt=1, device="cpu",
                            out=str(out))  # fmt: skip
    assert loaded == [str(loop_utils.EMBEDDED_MODEL)] and drawn == [CALIBRATED, CALIBRATED]
    result = json.loads(out.read_text())
    assert {name: result[name] for name in CALIBRATED} == CALIBRATED
    said = (
        "sampling: num_inference_steps 6, guidance_scale 5.0, eta 1.0 (the model's calibration_rl"
    )
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith(said)]


def test_sampling_policy_elsewhere_and_given(tiny_sd, tmp_path):
    """Any other model: CompBench's 50 / 7.5 / 0; a flag given wins; the line says which is which."""
    none = dict.fromkeys(CALIBRATED)
    sampling, line = bench_evaluate.sampling_policy(str(tiny_sd), none)
    assert sampling == COMPBENCH and line.endswith("(CompBench's)")
    sampling, line = bench_evaluate.sampling_policy("org/a-pipeline", none | {"eta": 0.5})
    assert sampling == COMPBENCH | {"eta": 0.5}
    assert line == (
        "sampling: num_inference_steps 50, guidance_scale 7.5, eta 0.5 "
        "(eta given, the rest CompBench's)"
    )
    given = {"num_inference_steps": 3, "guidance_scale": 2.0, "eta": 0.0}
    sampling, line = bench_evaluate.sampling_policy(str(loop_utils.EMBEDDED_MODEL), given)
    assert sampling == given and line.endswith("(all given)")
    sampling, line = bench_evaluate.sampling_policy(
        str(loop_utils.EMBEDDED_MODEL), none | {"num_inference_steps": 10}
    )
    assert sampling == CALIBRATED | {"num_inference_steps": 10}
    (tmp_path / "shapes_world.json").write_text(json.dumps({"world": "shapes"}))
    sampling, line = bench_evaluate.sampling_policy(str(tmp_path), none)
    assert sampling == COMPBENCH and "shapes_world.json has no calibration_rl" in line
    (tmp_path / "shapes_world.json").write_text("[1")
    with pytest.raises(ValueError, match="shapes_world.json: not a shapes-world JSON object"):
        bench_evaluate.sampling_policy(str(tmp_path), none)


def test_evaluate_the_embedded_model_as_a_new_user_types_it(tmp_path):
    """The README's command on the embedded model, from another folder, no sampling flags: the
    exact judge, the calibrated policy, the mean printed once with the seconds."""
    prompts = REPO / "shapes_world" / "prompts" / "color_val.txt"
    command = [sys.executable, str(REPO / "bench" / "evaluate.py"), str(prompts), "color"]
    command += ["--images_per_prompt", "1", "--limit", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "shapes-world model: color resolves to shapes_color (the exact pixel judge)"
    assert lines[1].startswith("sampling: num_inference_steps 6, guidance_scale 5.0, eta 1.0 (")
    assert len(lines) == 3 and lines[2].startswith("shapes_color on 2 prompts x 1 images: mean ")
    assert lines[2].endswith(" s)") and run.stdout.count("mean") == 1
    assert files_under(tmp_path) == []


def test_evaluate_help():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PAGER="cat")
    run = subprocess.run([*EVALUATE, "--help"], check=False, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout + run.stderr  # fire writes help to stderr when that is no terminal
    assert "evaluate.py PROMPTS REWARD <flags>" in text and "--images_per_prompt" in text
    assert "--num_inference_steps" in text and "error:" not in text
