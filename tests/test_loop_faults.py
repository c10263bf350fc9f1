"""Faults as classes: a second process on a run folder, Ctrl-C and SIGTERM, a full disk, files deleted
between runs, non-finite samples or gradients. Each ends in one line that says what was kept, and the
advice in that line is followed here and works."""

from __future__ import annotations

import errno
import fcntl
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env, write_prompts

import loop
import loop_utils


def flags(tmp_path: Path, tiny_model: Path, name: str, **overrides) -> dict:
    """A tiny run of the test model (seconds): the flags loop.cli takes."""
    prompts = write_prompts(tmp_path / "prompts.txt")
    return {
        "model": str(tiny_model),
        "reward": "jpeg_compressibility",
        "train_prompts": str(prompts),
        "num_eval_prompts": 2,
        "out": str(tmp_path / name),
        "k": 2,
        "images_per_epoch": 4,
        "num_steps": 3,
        "micro_batch": 2,
        "epochs": 3,
        "eval_every": 3,
        "min_train_sigma": 0.0,  # the test scheduler's sigmas are not the shipped model's
        **overrides,
    }


def cli(capsys, **given) -> tuple[int, list[str]]:
    """loop.cli in-process: its exit code (0 if it returned) and the lines it wrote to stderr."""
    try:
        loop.cli(**given)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, message_lines(capsys.readouterr().err)


def message_lines(err: str) -> list[str]:
    """stderr without tqdm's progress bars (redrawn with \r and cursor-up escapes)."""
    lines = (line.replace("\x1b[A", "").strip() for line in re.split(r"[\r\n]", err))
    return [line for line in lines if line and not re.search(r"\d+/\d+ \[|it/s\]|s/it\]", line)]


def resume_command(line: str) -> dict:
    """The flags of the 'python loop.py --resume RUN' a message tells the user to run."""
    match = re.search(r"python loop\.py --resume (\S+)", line)
    assert match, f"no resume command in {line!r}"
    return {"resume": match.group(1)}


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_process_on_a_run_folder_is_told_who_holds_it(tmp_path, tiny_model, capsys):
    """Two fresh runs on one --out, or a resume of a folder being trained: the second stops
    with one line naming the holder, writing nothing; once the holder is gone it works."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / loop_utils.LOCK, "w") as lock:  # this test process trains the folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 4242 on host since 12:00:00")
        lock.flush()
        for given in (flags(tmp_path, tiny_model, "run"), {"resume": str(run)}):
            code, err = cli(capsys, **given)
            assert code == 2 and len(err) == 1, err
            assert err[0].startswith("error: ") and "being trained by pid 4242" in err[0], err
            assert sorted(p.name for p in run.iterdir()) == [loop_utils.LOCK]
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run"))
    assert code == 0, err
    assert epochs_logged(run) == [0, 1, 2, 3]


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(
    tmp_path, tiny_model, capsys, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_models", interrupted)
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run"))
    assert code == 130 and len(err) == 1, err
    assert "nothing was kept" in err[0] and "run it again" in err[0] and "RUN" not in err[0]
    assert not (tmp_path / "run").exists()
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "runs/run"))  # runs/ made for it
    assert code == 130 and not (tmp_path / "runs").exists(), err
    monkeypatch.undo()  # "run it again"
    assert cli(capsys, **flags(tmp_path, tiny_model, "run"))[0] == 0


@pytest.mark.parametrize(
    "fault", ["ctrl-c", "ctrl-c in epoch 1", "disk full (PIL, fsync)", "disk full (torch.save)"]
)
def test_a_fault_mid_run_names_the_checkpoint_and_its_resume_works(
    fault, tmp_path, tiny_model, capsys, monkeypatch
):
    """In epoch 2 (or 1: the checkpoint is the untrained model's, written with row 0): one line
    naming the intact checkpoint and the exact command; running that command finishes the run
    with each epoch logged once, as an uninterrupted run would."""
    calls, real_train = {"n": 0}, loop.train_on_rollout
    real_fsync, real_save = loop_utils.os.fsync, loop_utils.torch.save
    at = 1 if fault.endswith("epoch 1") else 2

    def counted(*args, **kwargs):  # calls["n"] == at: in epoch `at`
        calls["n"] += 1
        if fault.startswith("ctrl-c") and calls["n"] == at:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    def full_disk(fd):
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def torch_full(obj, path, *args, **kwargs):
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(loop, "train_on_rollout", counted)
    if "fsync" in fault:
        monkeypatch.setattr(loop_utils.os, "fsync", full_disk)
    elif "torch" in fault:
        monkeypatch.setattr(loop_utils.torch, "save", torch_full)
    given = flags(tmp_path, tiny_model, "run")
    code, err = cli(capsys, **given)
    assert len(err) == 1, err
    if fault.startswith("ctrl-c"):
        assert code == 130 and err[0].startswith("interrupted: "), err
    else:
        assert code == 2 and "the disk is full" in err[0], err
    assert f"checkpoint of epoch {at - 1} is intact" in err[0], err
    assert not list((tmp_path / "run").rglob("*.tmp*"))  # no temporary file left behind
    monkeypatch.undo()
    code, err = cli(capsys, **resume_command(err[0]))  # the advice, followed
    assert code == 0, err
    assert epochs_logged(tmp_path / "run") == [0, 1, 2, 3]
    if at == 1:  # the resumed run is the uninterrupted one, row for row (timings aside)
        assert cli(capsys, **flags(tmp_path, tiny_model, "straight"))[0] == 0
        rows = [[{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                 for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("run", "straight")]  # fmt: skip
        assert rows[0] == rows[1]


def test_a_resume_recreates_deleted_samples_and_metrics_and_clears_stale_temporaries(
    tmp_path, tiny_model, capsys
):
    run = tmp_path / "run"
    assert cli(capsys, **flags(tmp_path, tiny_model, "run", epochs=2, eval_every=1))[0] == 0
    for path in (run / "samples").iterdir():
        path.unlink()
    (run / "samples").rmdir()
    (run / "metrics.jsonl").unlink()
    (run / "checkpoint" / "state.pt.tmp12345").write_bytes(b"a kill mid-write")
    code, err = cli(capsys, resume=str(run), epochs=4)
    assert code == 0, err
    assert epochs_logged(run) == [3, 4]
    assert (run / "samples" / "eval_epoch_0004.png").is_file()
    assert not list(run.rglob("*.tmp*"))


def test_resuming_a_finished_run_with_no_epochs_left_says_so(tmp_path, tiny_model, capsys):
    run = tmp_path / "run"
    assert cli(capsys, **flags(tmp_path, tiny_model, "run", epochs=2, eval_every=1))[0] == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for epochs in (1, 2):
        code, err = cli(capsys, resume=str(run), epochs=epochs)
        assert code == 2 and len(err) == 1 and "nothing to train" in err[0], err
        assert "--epochs above 2" in err[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert cli(capsys, resume=str(run), epochs=3)[0] == 0  # the advice, followed


def test_a_diverging_lr_is_named_and_the_suggested_one_trains(tmp_path, tiny_model, capsys):
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run", lr=1e30))
    assert code == 2 and len(err) == 1, err
    assert "diverged at --lr 1e+30" in err[0] and "--guidance_scale" not in err[0], err
    lr = float(re.search(r"e\.g\. --lr (\S+)\)", err[0]).group(1))
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run2", lr=lr))  # the advice, followed
    assert code == 0, err


def test_an_overflowing_guidance_scale_is_named_not_the_lr(tmp_path, tiny_model, capsys):
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run", guidance_scale=1e30))
    assert code == 2 and len(err) == 1, err
    assert "before any update" in err[0] and "--guidance_scale 1e+30" in err[0], err
    assert "--lr" not in err[0]
    assert not (tmp_path / "run").exists()  # it stopped before the first checkpoint
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run", guidance_scale=5.0))
    assert code == 0, err


def test_sigterm_mid_run_through_the_real_command(tmp_path, tiny_model):
    """kill (SIGTERM) ends like Ctrl-C: exit 130, one line, the resume it names finishes the run."""
    given = flags(tmp_path, tiny_model, "run", epochs=200, eval_every=200)
    args = [str(a) for name, value in given.items() for a in (f"--{name}", value)]
    command = [sys.executable, str(REPO / "loop.py"), *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    state, deadline = tmp_path / "run" / "checkpoint" / "state.pt", time.time() + 120
    while (loop_utils.checkpoint_epoch(tmp_path / "run") or 0) < 1 and time.time() < deadline:
        time.sleep(0.5)
    assert state.is_file(), "no checkpoint within 120 s"
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    lines = message_lines(err)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith("interrupted: the checkpoint of epoch "), lines[-1]
    resume = resume_command(lines[-1])["resume"]
    done = loop_utils.checkpoint_epoch(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, str(REPO / "loop.py"), "--resume", resume, "--epochs", str(done + 1)],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert epochs_logged(tmp_path / "run")[-1] == done + 1


def test_the_advice_is_a_shell_command_that_works_for_any_folder_name(
    tmp_path, tiny_model, capsys, monkeypatch
):
    """A folder name with a space: the advice quotes it, and the pasted command continues the run."""
    calls, real_train = {"n": 0}, loop.train_on_rollout

    def interrupted_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train_on_rollout", interrupted_in_epoch_2)
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "my run"))
    assert code == 130 and len(err) == 1, err
    command = shlex.split(err[0].split("continue with: ")[1])
    assert command[:3] == ["python", "loop.py", "--resume"] and command[3] == str(
        tmp_path / "my run"
    )
    monkeypatch.undo()
    assert cli(capsys, resume=command[3])[0] == 0
    assert epochs_logged(tmp_path / "my run") == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "edit, says",
    [
        ("metrics.jsonl: an epoch as text", "rows need increasing integer epochs"),
        ("metrics.jsonl: a folder", "metrics.jsonl is unreadable"),
        ("config.json: lr null", "config.json's lr None: expected float"),
        ("config.json: a field deleted", "config.json lacks ['seed']"),
        ("config.json: lora_rank edited", "LoRA does not fit config.json's lora_rank 4"),
        ("state.pt: without its EMA", "is not a loop.py checkpoint (no ['ema'])"),
        ("state.pt: trained on 2 ranks", "trained on 2 rank(s); resume it on as many"),
    ],
)
def test_a_hand_edited_run_folder_is_read_whole_before_anything_loads(
    edit, says, tmp_path, tiny_model, capsys, monkeypatch, finished_run
):
    """--resume reads config.json (every field, checked as its flag), state.pt (its parts, rank count
    and LoRA shape) and metrics.jsonl (integer epochs in order) before any model loads: one line
    naming the file and the fix, exit 2, nothing written."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config, state = json.loads((run / "config.json").read_text()), run / "checkpoint" / "state.pt"
    if edit == "metrics.jsonl: an epoch as text":
        rows = (run / "metrics.jsonl").read_text().replace('"epoch": 1,', '"epoch": "1",')
        (run / "metrics.jsonl").write_text(rows)
    elif edit == "metrics.jsonl: a folder":
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").mkdir()
    elif edit.startswith("config.json"):
        if "null" in edit:
            config["lr"] = None
        elif "deleted" in edit:
            del config["seed"]
        else:
            config["lora_rank"] = 4
        (run / "config.json").write_text(json.dumps(config))
    else:
        saved = torch.load(state, weights_only=False)
        if "EMA" in edit:
            del saved["ema"]
        else:
            saved["world"] = 2
        torch.save(saved, state)
    monkeypatch.setattr(loop, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, err = cli(capsys, resume=str(run), epochs=4)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    """A finished 3-epoch tiny run, copied by each test that edits it."""
    folder = tmp_path_factory.mktemp("finished")
    loop.cli(**flags(folder, tiny_model, "run"))
    return folder / "run"


def test_metrics_rows_are_strict_json_and_a_non_finite_statistic_is_named(
    tmp_path, tiny_model, capsys, monkeypatch
):
    """A statistic that overflows (approx_kl of a ratio near 0) is logged as null with a warning
    naming it, never as the non-JSON token Infinity that other readers reject."""
    real_train = loop.train_on_rollout

    def overflowing(*args, **kwargs):
        return real_train(*args, **kwargs) | {"approx_kl": float("inf")}

    monkeypatch.setattr(loop, "train_on_rollout", overflowing)
    code, err = cli(capsys, **flags(tmp_path, tiny_model, "run", epochs=1))
    assert code == 0 and "warning: epoch 1: approx_kl is inf; logged as null" in err, err

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    assert rows[1]["approx_kl"] is None
