"""The CompBench-style evaluation command (`python rewards.py evaluate ...`) and the shapes-world judges.

The pipeline is the tiny Stable Diffusion of tests/conftest.py (random weights, built from configs,
saved with `save_pretrained`), so the command loads it through `StableDiffusionPipeline.from_pretrained`
like a real model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import rewards

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
    command = [sys.executable, "rewards.py", "evaluate", "--model", str(tiny_sd)]
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
    result = json.loads(out.read_text())
    assert [r["prompt"] for r in result["per_prompt"]] == PROMPTS
    assert [r["seed"] for r in result["per_prompt"]] == [0, 1]
    assert all(len(r["scores"]) == 2 and max(r["scores"]) < 0 for r in result["per_prompt"])
    means = [sum(r["scores"]) / 2 for r in result["per_prompt"]]
    assert result["mean"] == pytest.approx(sum(means) / 2)
    assert result["reward_dtype"] == "original"  # evaluation scores at the originals' precision
    # the same command in-process gives the same numbers: seeds are fixed per prompt
    same = rewards.evaluate(
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
    rewards.evaluate(**common, device="cpu", out=str(base), **EVAL_ARGS)
    rewards.evaluate(**common, lora=str(lora), device="cpu", out=str(tuned), **EVAL_ARGS)
    base_scores = [r["scores"] for r in json.loads(base.read_text())["per_prompt"]]
    tuned_scores = [r["scores"] for r in json.loads(tuned.read_text())["per_prompt"]]
    assert base_scores != tuned_scores
    assert json.loads(tuned.read_text())["lora"] == str(lora)


@pytest.mark.parametrize("reward", ["complex", "jpeg_compressibility", "shapes_color"])
def test_reward_model_only_where_it_means_something(reward, tiny_sd, prompt_file):
    """--reward_model used to raise a TypeError deep in the loader for rewards without one model."""
    with pytest.raises(ValueError, match="--reward_model does not apply to reward"):
        rewards.evaluate(str(prompt_file), reward, str(tiny_sd), device="cpu", reward_model="DIR")


def test_evaluation_options(tmp_path, capsys):
    prompts = tmp_path / "complex_val.txt"
    prompts.write_text("The red cup was on the left of the blue bowl.\n")
    assert rewards.evaluation_options("color", str(prompts), "DIR", None) == {"model": "DIR"}
    # complex: CompBench's route lists are used when the prompt file's folder has them
    assert rewards.evaluation_options("complex", str(prompts), None, None) == {}
    (tmp_path / "complex_val_spatial.txt").write_text(
        "The red cup was on the left of the blue bowl.\n"
    )
    options = {"blip_model": "B"}
    expected = {"blip_model": "B", "lists": str(tmp_path)}
    assert rewards.evaluation_options("complex", str(prompts), None, options) == expected
    assert "routing prompts with CompBench's lists" in capsys.readouterr().out


def test_evaluate_rejects_an_empty_prompt_file(tiny_sd, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        rewards.evaluate(str(empty), "jpeg_compressibility", str(tiny_sd), device="cpu")


def test_shapes_world_model_resolves_compbench_names(tmp_path, capsys):
    (tmp_path / "shapes_world.json").write_text(json.dumps({"world": "shapes"}))
    assert rewards.resolve_reward_name(str(tmp_path), "color") == "shapes_color"
    assert "resolved to 'shapes_color'" in capsys.readouterr().out
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
    rewards.evaluate(str(prompt_file), "aesthetic", str(tiny_sd), device="cpu", out=str(out),
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
    rewards.evaluate(str(prompt_file), "color", str(model), device="cpu", out=str(out), **EVAL_ARGS)
    assert "resolved to 'shapes_color'" in capsys.readouterr().out
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
    run = subprocess.run([sys.executable, "rewards.py", "evaluate", *args], check=False,
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-3:]
    assert "Traceback" not in run.stderr
