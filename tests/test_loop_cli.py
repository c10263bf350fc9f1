"""The real command through subprocess: bad input, a smoke run of each --algo, and two ranks under torchrun."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env, write_prompts

import loop

LOOP = str(REPO / "loop.py")
TINY_BUDGET = [
    "--reward",
    "jpeg_compressibility",
    "--k",
    "2",
    "--images_per_epoch",
    "4",
    "--num_steps",
    "3",
    "--micro_batch",
    "2",
    "--epochs",
    "2",
    "--eval_every",
    "1",
    "--num_eval_prompts",
    "4",
]


def run_loop(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, LOOP, *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


BAD_INPUTS = {
    "unknown algo": (["--algo", "sgd"], "unknown --algo"),
    "unknown reward": (["--reward", "beauty"], "unknown --reward"),
    "rloo with K=1": (["--algo", "rloo", "--k", "1"], "K >= 2"),
    "loop with K=1": (["--algo", "loop", "--k", "1"], "K >= 2"),
    "eta zero": (["--eta", "0"], "--eta"),
    "eta negative": (["--eta", "-0.5"], "--eta"),
    "missing model folder": (["--model", "{tmp}/no-such-model"], "model folder not found"),
    "empty prompt file": (["--train_prompts", "{tmp}/empty.txt"], "is empty"),
    "missing prompt file": (["--train_prompts", "{tmp}/missing.txt"], "not found"),
    "unknown flag": (["--learning_rate", "1"], "unknown flag"),
    "groups split over ranks": (["--images_per_epoch", "5"], "multiple of K"),
    "no held-out images": (["--eval_images_per_prompt", "0"], "--eval_images_per_prompt"),
    "no step left to train": (["--min_train_sigma", "5"], "--min_train_sigma"),
    "EMA that never moves": (["--ema_decay", "1"], "--ema_decay"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_with_one_clear_line(case, tmp_path, tiny_model, prompt_file):
    (tmp_path / "empty.txt").write_text("\n \n")
    args, expected = BAD_INPUTS[case]
    base = {
        "--model": tiny_model,
        "--train_prompts": prompt_file,
        "--reward": "jpeg_compressibility",
    }
    base.update({"--out": tmp_path / "run", "--k": 2, "--images_per_epoch": 4})
    args = [a.format(tmp=tmp_path) for a in args]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    result = run_loop(args, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


@pytest.mark.parametrize("algo", loop.ALGOS)
def test_smoke_run_of_each_algo(algo, tmp_path, tiny_model, prompt_file):
    out = tmp_path / "run"
    args = ["--algo", algo, "--model", tiny_model, "--train_prompts", prompt_file, "--out", out]
    result = run_loop([*args, *TINY_BUDGET], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "derived:" in result.stdout and "updates_per_epoch" in result.stdout
    assert (
        "before/after grid:" in result.stdout and "held-out jpeg_compressibility" in result.stdout
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["eval_reward_mean"] is not None for r in rows)
    for key in (
        "reward_mean",
        "reward_std",
        "approx_kl",
        "clipfrac",
        "ratio_mean",
        "grad_norm",
        "seconds",
    ):
        assert isinstance(rows[-1][key], float), key
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "before_after.png").is_file()
    assert json.loads((out / "config.json").read_text())["algo"] == algo


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import loop

    captured, rewards_seen = {}, []
    real_load, real_score = loop.load_models, loop.score_images

    def spy_load(*args, **kwargs):
        captured["models"] = real_load(*args, **kwargs)
        return captured["models"]

    def spy_score(*args, **kwargs):
        reward = real_score(*args, **kwargs)
        rewards_seen.append(reward)
        return reward

    loop.load_models, loop.score_images = spy_load, spy_score
    if os.environ.get("NO_SYNC") == "1":  # show the test can fail: no gradient synchronisation
        loop.sync_gradients = lambda params: None
    flags = json.loads(sys.argv[1])
    loop.main(loop.config_from_flags(flags))
    unet = captured["models"].unet
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    path = os.path.join(flags["out"], "rank%s.pt" % os.environ["RANK"])
    torch.save({"lora": lora, "rewards": torch.cat(rewards_seen)}, path)
    """
)


def torchrun(tmp_path, tiny_model, prompt_file, name, no_sync=False):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    flags = {
        "model": str(tiny_model),
        "reward": "jpeg_compressibility",
        "train_prompts": str(prompt_file),
        "out": str(tmp_path / name),
        "algo": "loop",
        "k": 2,
        "images_per_epoch": 8,  # 4 per rank
        "minibatch": 4,  # 2 per rank: two updates per epoch
        "micro_batch": 2,
        "num_steps": 3,
        "epochs": 2,
        "eval_every": 2,
        "num_eval_prompts": 2,
        "lr": 0.01,
        "clip_range": 0.1,
    }
    env = {**subprocess_env(), "NO_SYNC": "1" if no_sync else "0"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    result = subprocess.run(
        [*command, str(worker), json.dumps(flags)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / name / f"rank{r}.pt") for r in (0, 1)]


def test_two_ranks_under_torchrun_keep_identical_lora_weights(tmp_path, tiny_model, prompt_file):
    """PITFALLS #5: gloo on CPU, each rank samples its own prompts, gradients all-reduced."""
    rank0, rank1 = torchrun(tmp_path, tiny_model, prompt_file, "synced")
    assert not torch.equal(rank0["rewards"], rank1["rewards"])  # different rollouts per rank
    assert any(p.abs().max() > 0 for n, p in rank0["lora"].items() if "lora_B" in n)  # updated
    assert all(torch.equal(rank0["lora"][n], rank1["lora"][n]) for n in rank0["lora"])
    # the same run without the all-reduce diverges, so the check above can fail
    rank0, rank1 = torchrun(tmp_path, tiny_model, prompt_file, "unsynced", no_sync=True)
    assert not all(torch.equal(rank0["lora"][n], rank1["lora"][n]) for n in rank0["lora"])


ASSET = REPO / "assets" / "tiny-shapes"


@pytest.mark.skipif(
    not (ASSET / "model_index.json").is_file(), reason="assets/tiny-shapes not built"
)
def test_default_model_runs_with_the_shapes_reward(tmp_path):
    """The README's default command (default --model, --reward color) with a tiny budget."""
    budget = [
        "--epochs",
        "1",
        "--images_per_epoch",
        "8",
        "--num_steps",
        "3",
        "--num_eval_prompts",
        "8",
    ]
    result = run_loop(
        ["--algo", "loop", "--k", "4", "--reward", "color", *budget, "--out", tmp_path / "run"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolves to shapes_color" in result.stdout
    assert "before/after grid:" in result.stdout


def test_shapes_world_resolves_reward_and_prompt_files(tmp_path, monkeypatch, capsys):
    model = tmp_path / "assets" / "tiny-shapes"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "shapes_world.json").write_text("{}")
    write_prompts(tmp_path / "prompts" / "shapes" / "color_train.txt", ["a red cube"])
    write_prompts(tmp_path / "prompts" / "shapes" / "color_val.txt", ["a blue ball"])
    monkeypatch.setattr(loop, "HERE", tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # the default --model is relative to loop.py's folder
    path = loop.resolve_model_path("assets/tiny-shapes")
    assert Path(path) == model
    cfg = loop.Config(reward="color", eval_images_per_prompt=1)
    reward, train, held_out = loop.resolve_reward_and_prompts(cfg, path)
    assert (reward, train, held_out) == ("shapes_color", ["a red cube"], ["a blue ball"])
    assert "resolves to shapes_color" in capsys.readouterr().out
    # a plain model keeps T2I-CompBench's reward and reads <category>_train/_val.txt from --prompt_dir
    plain = tmp_path / "plain"
    plain.mkdir()
    write_prompts(tmp_path / "compbench" / "color_train.txt", ["a red bench"])
    write_prompts(tmp_path / "compbench" / "color_val.txt", ["a green car"])
    cfg = loop.Config(reward="color", prompt_dir=str(tmp_path / "compbench"))
    assert loop.resolve_reward_and_prompts(cfg, str(plain)) == (
        "color",
        ["a red bench"],
        ["a green car"] * cfg.eval_images_per_prompt,  # each held-out prompt, several noises
    )
    with pytest.raises(loop.UsageError, match="--train_prompts"):
        loop.resolve_reward_and_prompts(loop.Config(reward="color"), str(plain))


def test_complex_reward_reads_compbench_route_lists(tmp_path):
    """--reward complex --prompt_dir DIR routes prompts with DIR's complex_*_spatial/action lists."""
    folder = tmp_path / "compbench"
    write_prompts(folder / "complex_train.txt", ["a cat sat on a mat"])
    assert loop.reward_options("complex", str(folder)) == {}  # no lists: relation words route
    write_prompts(folder / "complex_val_spatial.txt", ["a cat sat on a mat"])
    assert loop.reward_options("complex", str(folder)) == {"lists": str(folder)}
    assert loop.reward_options("color", str(folder)) == {}
    assert loop.reward_options("complex", "") == {}


def test_help_lists_every_flag():
    result = subprocess.run(
        [sys.executable, LOOP, "--help"],
        env=subprocess_env(),
        capture_output=True,
        check=False,
        text=True,
    )
    assert result.returncode == 0
    for name in loop.Config.__dataclass_fields__:
        assert f"--{name} " in result.stdout


def test_resume_names_config_fields_another_version_wrote(tmp_path):
    """A run folder whose config.json holds a field this loop.py lacks (written by another
    version) is a clear UsageError naming the field, not a TypeError from Config."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "state.pt").write_bytes(b"")
    fields = dataclasses.asdict(loop.Config()) | {"lr_half_life": 0.0}
    (run / "config.json").write_text(json.dumps(fields))
    with pytest.raises(loop.UsageError, match="lr_half_life"):
        loop.config_from_flags({"resume": str(run)})
    del fields["lr_half_life"]
    (run / "config.json").write_text(json.dumps(fields))
    assert loop.config_from_flags({"resume": str(run), "epochs": 3}).epochs == 3
