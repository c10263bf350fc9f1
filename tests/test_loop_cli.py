"""The real command through subprocess: bad input, a smoke run of each --algo, and two ranks under torchrun."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, REPO, subprocess_env, write_prompts

import loop
import loop_utils
import rewards

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


# case -> (flags, what the one `error: ...` line must say). {tmp}: the test's folder, where
# setup_bad_inputs writes the files the cases name. Cases that start with --resume get no other
# flag. Each is checked in-process (test_bad_input_in_process); SUBPROCESS_CASES also through the
# real command.
BAD_INPUTS = {
    "unknown algo": (["--algo", "sgd"], "unknown --algo"),
    "unknown reward": (["--reward", "beauty"], "unknown --reward"),
    "unknown device": (["--device", "tpu"], "unknown --device 'tpu'"),
    "unknown precision": (["--mixed_precision", "fp8"], "unknown --mixed_precision"),
    "rloo with K=1": (["--algo", "rloo", "--k", "1"], "K >= 2"),
    "loop with K=1": (["--algo", "loop", "--k", "1"], "K >= 2"),
    "eta zero": (["--eta", "0"], "--eta"),
    "eta negative": (["--eta", "-0.5"], "--eta"),
    "negative lr": (["--lr", "-1"], "--lr -1.0: must be in (0, inf)"),
    "lr nan": (["--lr", "nan"], "--lr nan"),
    "eval_every zero": (["--eval_every", "0"], "--eval_every 0: must be in [1, inf)"),
    "no images per epoch": (["--images_per_epoch", "0"], "--images_per_epoch 0"),
    "negative clip range": (["--clip_range", "-1"], "--clip_range -1.0: must be in (0, 1)"),
    "integer flag given a fraction": (["--k", "2.5"], "--k '2.5': expected int"),
    "bool flag given a word": (["--eval_raw", "maybe"], "--eval_raw 'maybe': expected bool"),
    "missing model folder": (["--model", "{tmp}/no-such-model"], "model folder not found"),
    "empty prompt file": (["--train_prompts", "{tmp}/empty.txt"], "is empty"),
    "missing prompt file": (["--train_prompts", "{tmp}/missing.txt"], "not found"),
    "prompt file not UTF-8": (["--train_prompts", "{tmp}/latin1.txt"], "not UTF-8"),
    "held-out file not UTF-8": (["--eval_prompts", "{tmp}/latin1.txt"], "not UTF-8"),
    "out names a file": (["--out", "{tmp}/file.txt"], "is a file"),
    "out inside a file": (["--out", "{tmp}/file.txt/run"], "is a file"),
    "reward options not JSON": (["--reward_options", "{quality: 9"], "is not JSON"),
    "reward option unknown": (["--reward_options", '{"blip_path": "x"}'], "not blip_path"),
    "reward options not an object": (["--reward_options", "[95]"], "need a JSON object"),
    "unknown flag": (["--learning_rate", "1"], "unknown flag"),
    "groups split over ranks": (["--images_per_epoch", "5"], "multiple of K"),
    "minibatch not dividing the rollout": (["--minibatch", "3"], "pass one of 1, 2, 4"),
    "micro-batch not dividing the minibatch": (
        ["--minibatch", "4", "--micro_batch", "3"],
        "--micro_batch 3 must divide the minibatch per rank, 4",
    ),
    "no held-out images": (["--eval_images_per_prompt", "0"], "--eval_images_per_prompt"),
    "no step left to train": (["--min_train_sigma", "5"], "--min_train_sigma"),
    "EMA that never moves": (["--ema_decay", "1"], "--ema_decay"),
    "resume of no run": (["--resume", "{tmp}"], "no config.json"),
    "resume changing K": (["--resume", "{tmp}/done", "--k", "2"], "--k would make another"),
    "resume changing the reward": (
        ["--resume", "{tmp}/done", "--reward", "jpeg_incompressibility", "--epochs", "9"],
        "--reward would make another",
    ),
    "resume of a truncated checkpoint": (["--resume", "{tmp}/truncated"], "truncated"),
    "resume of a broken config.json": (["--resume", "{tmp}/broken"], "config.json is not JSON"),
    "resume of a config.json that is a list": (["--resume", "{tmp}/listed"], "no object of fields"),
    "resume of an empty path": (["--resume", ""], "an empty path"),
    "out holds an earlier run's files": (["--out", "{tmp}/earlier"], "holds an earlier run's"),
    "lr overflowing float32": (["--lr", "1e39"], "as a float32, the dtype it becomes, it is inf"),
    "clip range underflowing float32": (["--clip_range", "1e-50"], "it is 0.0"),
    "seed beyond torch's range": (["--seed", "1e30"], "must be in [0, 9223372036854775807]"),
    "reward option outside its range": (
        ["--reward_options", '{"quality": 1000}'],
        "--reward_options' quality 1000: must be in [1, 100]",
    ),
    "reward option of the wrong type": (
        ["--reward_options", '{"quality": "high"}'],
        "expected int",
    ),
    "model missing a part": (
        ["--model", "{tmp}/novae"],
        "model_index.json names ['vae'], not there",
    ),
    "scheduler config not JSON": (["--model", "{tmp}/badsched"], "is not a scheduler config"),
}
NEEDS_THE_MODEL = {"no step left to train"}  # the scheduler's sigmas decide it
SUBPROCESS_CASES = ["unknown algo", "negative lr", "prompt file not UTF-8", "resume changing K"]


def checkpoint_of(config: loop.Config, next_epoch: int) -> dict:
    """A checkpoint/state.pt with every part save_epoch writes, its LoRA of config's rank (one
    layer): what the run-folder reader needs to get to the checks these tests are about."""
    lora = {"x.to_q.lora_A.weight": torch.zeros(config.lora_rank, 4)}
    return {"lora": lora, "optimizer": {}, "ema": [], "rng": {}, "next_epoch": next_epoch}


def setup_bad_inputs(tmp_path: Path, tiny_model: Path, prompt_file: Path) -> None:
    """The files BAD_INPUTS names, and run folders: done (K = 4), truncated, broken."""
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes("a red caf\xe9 table\n".encode("latin-1"))
    (tmp_path / "file.txt").write_text("not a folder\n")
    config = loop.Config(model=str(tiny_model), train_prompts=str(prompt_file), k=4)
    for name in ("done", "truncated", "broken"):
        (tmp_path / name / "checkpoint").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
        torch.save(checkpoint_of(config, next_epoch=1), tmp_path / name / "checkpoint" / "state.pt")
    (tmp_path / "listed").mkdir()
    shutil.copytree(tmp_path / "done" / "checkpoint", tmp_path / "listed" / "checkpoint")
    (tmp_path / "listed" / "config.json").write_text("[]")
    write_prompts(tmp_path / "earlier" / "metrics.jsonl", ['{"epoch": 0}'])  # no checkpoint/
    for name in ("novae", "badsched"):
        shutil.copytree(tiny_model, tmp_path / name)
    shutil.rmtree(tmp_path / "novae" / "vae")
    (tmp_path / "badsched" / "scheduler" / "scheduler_config.json").write_text('{"num_train')
    state = tmp_path / "truncated" / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # a write cut short
    (tmp_path / "broken" / "config.json").write_text('{"algo": "loop",')


def bad_input_args(case: str, tmp_path: Path, tiny_model: Path, prompt_file: Path) -> list[str]:
    args, _ = BAD_INPUTS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--model": tiny_model, "--train_prompts": prompt_file, "--epochs": 1}
    base |= {"--reward": "jpeg_compressibility", "--out": tmp_path / "run"}
    base |= {"--k": 2, "--images_per_epoch": 4, "--micro_batch": 2, "--num_steps": 2}
    for flag, value in base.items() if args[0] != "--resume" else []:
        if flag not in args:
            args += [flag, str(value)]
    return args


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_in_process(case, tmp_path, tiny_model, prompt_file, monkeypatch, capsys):
    """Every bad input: exit 2 with one `error: ...` line, before any model is loaded (but the
    checks that need the model's scheduler) and before anything is written."""
    setup_bad_inputs(tmp_path, tiny_model, prompt_file)
    args = bad_input_args(case, tmp_path, tiny_model, prompt_file)

    def too_far(*args, **kwargs):
        raise AssertionError(f"{case}: got past the input checks")

    if case not in NEEDS_THE_MODEL:
        monkeypatch.setattr(loop, "load_models", too_far)
    monkeypatch.setattr(loop_utils, "load_rewards", too_far)
    if case in NEEDS_THE_MODEL:  # the reward is loaded before the model: a cheap one
        monkeypatch.setattr(loop_utils, "load_rewards", lambda *args: (None, None))
    with pytest.raises(SystemExit) as exit_info:
        loop.cli(**dict(zip((a.removeprefix("--") for a in args[0::2]), args[1::2])))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and BAD_INPUTS[case][1] in lines[-1], lines
    assert not (tmp_path / "run").exists()  # nothing half-written
    if case not in NEEDS_THE_MODEL:  # rejected before the run's start-up lines
        assert "config:" not in captured.out, captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")
def test_cuda_asked_for_where_there_is_none(monkeypatch):
    monkeypatch.setattr(loop, "load_models", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(loop_utils.UsageError, match="sees no CUDA device; pass --device cpu"):
        loop.main(loop.Config(device="cuda"))


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_exits_with_one_clear_line(case, tmp_path, tiny_model, prompt_file):
    """The same through the real command: one line, no traceback."""
    setup_bad_inputs(tmp_path, tiny_model, prompt_file)
    result = run_loop(bad_input_args(case, tmp_path, tiny_model, prompt_file), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and BAD_INPUTS[case][1] in lines[-1], lines
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


HINTS = typing.get_type_hints(loop.Config, include_extras=True)
NUMERIC = [n for n, hint in HINTS.items() if typing.get_args(hint)[:1] in ((int,), (float,))]


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_flag_declares_its_range_and_is_checked(name):
    """Each int/float Config field declares its valid range in its type (Annotated[float, "(0, 1]"]),
    which check_config enforces: a value just outside either end is one clear UsageError."""
    kind, interval = typing.get_args(HINTS[name])
    match = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    assert match, f"--{name}: its range {interval!r} does not parse"
    left, low, high, right = match.groups()
    outside = [float(low) - (1 if left == "[" else 0)]
    if high != "inf":
        outside.append(float(high) + (1 if right == "]" else 0))
    for value in outside:
        cfg = dataclasses.replace(loop.Config(algo="ppo", k=2), **{name: kind(value)})
        with pytest.raises(loop_utils.UsageError, match=f"--{name} "):
            loop_utils.check_config(cfg, 1)
    loop_utils.check_config(loop.Config(), 1)  # the defaults lie inside


def test_a_resume_may_change_only_what_keeps_the_experiment(tmp_path, tiny_model, prompt_file):
    setup_bad_inputs(tmp_path, tiny_model, prompt_file)
    run = str(tmp_path / "done")
    allowed = {"epochs": 9, "eval_every": 3, "eval_raw": "true", "micro_batch": 1, "device": "cpu"}
    cfg = loop_utils.config_from_flags({"resume": run, **allowed}, loop.Config)
    assert (cfg.epochs, cfg.eval_every, cfg.eval_raw, cfg.micro_batch) == (9, 3, True, 1)
    assert cfg.k == 4 and cfg.resume == run
    assert (
        loop_utils.config_from_flags({"resume": run, "k": 4}, loop.Config).k == 4
    )  # the run's own value: fine
    with pytest.raises(loop_utils.UsageError, match="--lr, --seed would make another"):
        loop_utils.config_from_flags(
            {"resume": run, "lr": 1e-3, "seed": 3, "epochs": 9}, loop.Config
        )


def test_a_checkpoint_torch_cannot_read_is_one_line(tmp_path):
    """A zip file that is no torch checkpoint gets past the start-up check: load_checkpoint
    names it in one line instead of torch's error."""
    import zipfile

    (tmp_path / "checkpoint").mkdir()
    with zipfile.ZipFile(tmp_path / "checkpoint" / "state.pt", "w") as archive:
        archive.writestr("data.txt", "no pickle here")
    with pytest.raises(loop_utils.UsageError, match="state.pt is unreadable"):
        run = SimpleNamespace(folder=tmp_path, world=1, writer=True)
        loop_utils.load_checkpoint(run, None, None, [], None)


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
    import rewards

    captured, rewards_seen, eval_images = {}, [], []
    real_load, real_score, real_rollout = loop.load_models, loop.score_images, loop.rollout
    rank = int(os.environ["RANK"])

    def spy_load(*args, **kwargs):
        captured["models"] = real_load(*args, **kwargs)
        return captured["models"]

    def spy_score(*args, **kwargs):
        reward = real_score(*args, **kwargs)
        rewards_seen.append(reward)
        return reward

    def nan_on_cats(name, **options):  # NAN_RANK's reward is NaN for a cat
        reward_fn = real_load_reward(name, **options)

        def reward(images, prompts):
            scores = reward_fn(images, prompts)
            scores[[i for i, p in enumerate(prompts) if "cat" in p]] = float("nan")
            return scores

        return reward if str(rank) == os.environ.get("NAN_RANK") else reward_fn

    def spy_rollout(*args):
        if args[8:] == ("evaluating",):  # the held-out images this rank scores
            eval_images.append(len(args[2]))
        return real_rollout(*args)

    loop.load_models, loop.score_images, loop.rollout = spy_load, spy_score, spy_rollout
    real_load_reward, rewards.load_reward = rewards.load_reward, nan_on_cats
    if os.environ.get("NO_SYNC") == "1":  # show the test can fail: no gradient synchronisation
        loop.sync_gradients = lambda params: None
    flags = json.loads(sys.argv[1])
    loop.cli(**flags)
    unet = captured["models"].unet
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    path = os.path.join(flags["out"], "rank%s.pt" % rank)
    saved = {"lora": lora, "rewards": torch.cat(rewards_seen), "eval_images": sum(eval_images)}
    torch.save(saved, path)
    """
)
TORCHRUN_FLAGS = {
    "reward": "jpeg_compressibility",
    "algo": "loop",
    "k": 2,
    "images_per_epoch": 8,  # 4 per rank
    "minibatch": 4,  # 2 per rank: two updates per epoch
    "micro_batch": 2,
    "num_steps": 3,
    "epochs": 2,
    "eval_every": 2,
    "num_eval_prompts": 2,  # x 2 images: 4 held-out images, 2 micro-batches, one per rank
    "lr": 0.01,
    "clip_range": 0.1,
}


def torchrun(tmp_path, name, flags: dict, env: dict | None = None):
    """The worker on 2 gloo ranks; returns the finished process."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # the agent stops the other rank once one fails: 2 s between its looks lets a rank that is
    # stopping anyway print its message on a loaded machine
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--monitor-interval", "2", "--nproc_per_node", "2", str(worker)]
    flags = {**TORCHRUN_FLAGS, **flags, "out": str(tmp_path / name)}
    return subprocess.run(
        [*command, json.dumps(flags)],
        cwd=tmp_path,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )


def torchrun_ranks(tmp_path, tiny_model, prompt_file, name, no_sync=False):
    flags = {"model": str(tiny_model), "train_prompts": str(prompt_file)}
    result = torchrun(tmp_path, name, flags, {"NO_SYNC": "1" if no_sync else "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / name / f"rank{r}.pt") for r in (0, 1)]


def test_two_ranks_under_torchrun_keep_identical_lora_weights(tmp_path, tiny_model, prompt_file):
    """Gloo on CPU, each rank samples its own prompts, gradients all-reduced. The held-out
    score is sharded over the ranks and equals one process's score of the same images."""
    rank0, rank1 = torchrun_ranks(tmp_path, tiny_model, prompt_file, "synced")
    assert not torch.equal(rank0["rewards"], rank1["rewards"])  # different rollouts per rank
    assert any(p.abs().max() > 0 for n, p in rank0["lora"].items() if "lora_B" in n)  # updated
    assert all(torch.equal(rank0["lora"][n], rank1["lora"][n]) for n in rank0["lora"])
    # 2 evaluations (before training, epoch 2) of 4 held-out images: each rank scored half
    assert rank0["eval_images"] == rank1["eval_images"] == 4
    untrained = loop_utils.read_metrics(tmp_path / "synced")[0]["eval_reward_mean"]
    cfg = loop.Config(**TORCHRUN_FLAGS)
    models = loop.load_models(str(tiny_model), torch.device("cpu"), torch.float32,
                              cfg.lora_rank, cfg.seed, cfg.lora_modules)  # fmt: skip
    policy = loop.make_policy(models, cfg.num_steps, cfg.eta, cfg.guidance_scale)
    prompts = [p for p in PROMPTS[: cfg.num_eval_prompts] for _ in range(2)]
    reward_fn = rewards.load_reward(cfg.reward)
    one_process = loop.evaluate(models, policy, prompts, reward_fn, cfg.micro_batch)[0]
    assert one_process.mean().item() == untrained
    # the same run without the all-reduce diverges, so the check above can fail
    rank0, rank1 = torchrun_ranks(tmp_path, tiny_model, prompt_file, "unsynced", no_sync=True)
    assert not all(torch.equal(rank0["lora"][n], rank1["lora"][n]) for n in rank0["lora"])


def test_a_non_finite_reward_on_one_rank_stops_every_rank(tmp_path, tiny_model):
    """Rank 1's reward is NaN: both ranks stop with the message (rank 0 learns it through one
    all_reduce) instead of rank 0 waiting in its next collective until a timeout."""
    flags = {"model": str(tiny_model), "epochs": 1}
    flags["train_prompts"] = str(write_prompts(tmp_path / "cats.txt", ["a cat"]))
    flags["eval_prompts"] = str(write_prompts(tmp_path / "val.txt", PROMPTS[:2]))
    result = torchrun(tmp_path, "nan", flags, {"NAN_RANK": "1"})
    assert result.returncode != 0
    lines = re.findall(r"error: [^\r\n]*", result.stderr)  # (after rank 0's progress bars)
    assert len(lines) == 2 and all("the reward is non-finite" in line for line in lines), lines
    assert sorted("['a cat']" in line for line in lines) == [False, True]  # rank 1 names it
    assert any("on another rank" in line for line in lines)
    assert 'loop.py", line' not in result.stderr  # (torchrun's agent prints its own traceback)


ASSET = REPO / "shapes_world" / "tiny-shapes"


@pytest.mark.skipif(
    not (ASSET / "model_index.json").is_file(), reason="shapes_world/tiny-shapes not built"
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


def test_reward_texture_finds_the_texture_model(tmp_path, monkeypatch, capsys):
    """The embedded model draws no textures: the default --model with --reward texture means its
    texture twin; other rewards and other models stay as given; a missing twin is one line."""
    embedded, texture = tmp_path / "tiny-shapes", tmp_path / "tiny-shapes-texture"
    monkeypatch.setattr(loop_utils, "HERE", tmp_path)
    monkeypatch.setattr(loop_utils, "EMBEDDED_MODEL", embedded)
    monkeypatch.setattr(loop_utils, "TEXTURE_MODEL", texture)
    with pytest.raises(loop_utils.UsageError, match="tiny-shapes-texture is missing"):
        loop_utils.model_for_reward("tiny-shapes", "texture")
    texture.mkdir()
    (texture / "model_index.json").write_text("{}")
    assert loop_utils.model_for_reward("tiny-shapes", "texture") == str(texture)
    assert "draws no textures; using tiny-shapes-texture" in capsys.readouterr().out
    assert loop_utils.model_for_reward(str(embedded), "texture") == str(texture)
    assert loop_utils.model_for_reward("tiny-shapes", "color") == "tiny-shapes"
    assert loop_utils.model_for_reward("other", "texture") == "other"


def test_shapes_world_resolves_reward_and_prompt_files(tmp_path, monkeypatch, capsys):
    model = tmp_path / "shapes_world" / "tiny-shapes"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "shapes_world.json").write_text("{}")
    write_prompts(tmp_path / "shapes_world" / "prompts" / "color_train.txt", ["a red circle"])
    write_prompts(tmp_path / "shapes_world" / "prompts" / "color_val.txt", ["a blue square"])
    monkeypatch.setattr(loop_utils, "HERE", tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # the default --model is relative to loop.py's folder
    path = loop_utils.resolve_model_path("shapes_world/tiny-shapes")
    assert Path(path) == model
    cfg = loop.Config(reward="color", eval_images_per_prompt=1)
    reward, train, held_out = loop_utils.reward_and_prompts(cfg, path)
    assert (reward, train, held_out) == ("shapes_color", ["a red circle"], ["a blue square"])
    assert "resolves to shapes_color" in capsys.readouterr().out
    # a plain model keeps T2I-CompBench's reward and reads <category>_train/_val.txt from --prompt_dir
    plain = tmp_path / "plain"
    plain.mkdir()
    # (prompts of the world's template: BLIP's noun phrases need no spaCy for them)
    write_prompts(tmp_path / "compbench" / "color_train.txt", ["a red circle"])
    write_prompts(tmp_path / "compbench" / "color_val.txt", ["a green square"])
    cfg = loop.Config(reward="color", prompt_dir=str(tmp_path / "compbench"))
    assert loop_utils.reward_and_prompts(cfg, str(plain)) == (
        "color",
        ["a red circle"],
        ["a green square"] * cfg.eval_images_per_prompt,  # each held-out prompt, several noises
    )
    with pytest.raises(loop_utils.UsageError, match="--train_prompts"):
        loop_utils.reward_and_prompts(loop.Config(reward="color"), str(plain))


def test_complex_reward_reads_compbench_route_lists(tmp_path):
    """--reward complex --prompt_dir DIR routes prompts with DIR's complex_*_spatial/action lists."""
    folder = tmp_path / "compbench"
    write_prompts(folder / "complex_train.txt", ["a cat sat on a mat"])
    assert rewards.route_lists("complex", str(folder)) == {}  # no lists: relation words route
    write_prompts(folder / "complex_val_spatial.txt", ["a cat sat on a mat"])
    assert rewards.route_lists("complex", str(folder)) == {"lists": str(folder)}
    assert rewards.route_lists("color", str(folder)) == {}
    assert rewards.route_lists("complex", "") == {}


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
    torch.save(checkpoint_of(loop.Config(), next_epoch=1), run / "checkpoint" / "state.pt")
    fields = dataclasses.asdict(loop.Config()) | {"lr_half_life": 0.0}
    (run / "config.json").write_text(json.dumps(fields))
    with pytest.raises(loop_utils.UsageError, match="lr_half_life"):
        loop_utils.config_from_flags({"resume": str(run)}, loop.Config)
    del fields["lr_half_life"]
    (run / "config.json").write_text(json.dumps(fields))
    assert loop_utils.config_from_flags({"resume": str(run), "epochs": 3}, loop.Config).epochs == 3


def test_reward_options_are_checked_against_the_reward_loaders_names(tmp_path):
    """--reward_options: a JSON object of rewards.load_reward's options for this reward."""
    given = '{"model": "/data/blip-vqa", "image_size": 480, "dtype": "float32"}'
    expected = {"model": "/data/blip-vqa", "image_size": 480, "dtype": "float32"}
    assert loop_utils.reward_options("color", given) == expected
    with pytest.raises(loop_utils.UsageError, match="not blip_path"):
        loop_utils.reward_options("color", '{"blip_path": "/data/blip-vqa"}')
    assert loop_utils.reward_options("complex", '{"blip_model": "B"}') == {"blip_model": "B"}


def test_held_out_score_uses_the_original_scorers_precision_on_a_gpu(monkeypatch):
    """Training scores in bf16 on a GPU (dtype=None); the held-out score in the precision
    `bench/evaluate.py` uses, so the two numbers compare; on the CPU both are fp32: one."""
    calls = []
    monkeypatch.setattr(rewards, "load_reward", lambda name, **kw: calls.append(kw) or kw)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def run(options, device):
        return SimpleNamespace(reward="color", reward_options=options, device=device)

    train, held_out = loop_utils.load_rewards(run({"model": "M"}, cuda))
    assert train == {"device": cuda, "model": "M"}
    assert held_out == {"device": cuda, "model": "M", "dtype": "original"}
    calls.clear()
    train, held_out = loop_utils.load_rewards(run({"model": "M", "dtype": "float32"}, cuda))
    assert train is held_out and len(calls) == 1  # a dtype given: both scorers use it
    train, held_out = loop_utils.load_rewards(run({}, cpu))
    assert train is held_out and len(calls) == 2


def test_aesthetic_head_download_failing_offline_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(rewards.urllib.request, "urlopen", offline)
    with pytest.raises(loop_utils.UsageError) as error:
        cpu = torch.device("cpu")
        loop_utils.load_rewards(SimpleNamespace(reward="aesthetic", reward_options={}, device=cpu))
    message = str(error.value)
    assert "\n" not in message and "could not download the aesthetic head" in message
    assert "--reward_options" in message and "head" in message


def test_a_reward_without_its_spacy_pipeline_stops_before_anything_loads(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """BLIP (color, shape, texture), spatial and complex need spaCy's pipeline for prompts outside
    the shapes world's template: missing, the run stops at the input checks, one line naming the
    install command, before any model loads or any file is written (it used to crash after the
    first rollout). Shapes-world prompts need no spaCy."""
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` fails, as where it is missing
    monkeypatch.setattr(rewards, "SPACY", {})

    def too_far(*args, **kwargs):
        raise AssertionError("got past the input checks")

    monkeypatch.setattr(loop, "load_models", too_far)
    monkeypatch.setattr(loop_utils, "load_rewards", too_far)
    compbench = write_prompts(tmp_path / "compbench.txt", ["a red car"])
    for reward in ("color", "spatial", "complex"):
        with pytest.raises(SystemExit) as exit_info:
            loop.cli(model=str(tiny_model), reward=reward, train_prompts=str(compbench),
                     out=str(tmp_path / "run"))  # fmt: skip
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert "spaCy" in lines[0] and rewards.SPACY_INSTALL in lines[0], lines
        assert not (tmp_path / "run").exists()
    shapes = write_prompts(tmp_path / "shapes.txt", ["a red circle and a blue square"])
    rewards.check_prompts("color", rewards.read_prompt_file(shapes))  # no spaCy needed


def test_a_first_ratio_far_from_one_stops_the_run():
    """The clip range eps acts on |log rho_t|: if re-scoring a fresh rollout already gives more
    than eps / 10 (other kernels with grad than without, e.g. bf16 attention on a GPU), the clip
    would act on noise, so the run stops naming the fix. On the CPU the value is exactly 0
    (test_first_ratio_check_at_start_up)."""
    loop_utils.check_ratio_noise(0.0, 1e-4)
    loop_utils.check_ratio_noise(1e-5, 1e-4)  # a tenth of eps: still allowed
    with pytest.raises(loop_utils.UsageError, match="--mixed_precision no"):
        loop_utils.check_ratio_noise(1.1e-5, 1e-4)
