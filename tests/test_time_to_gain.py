"""scripts/time_to_gain.py, the measure of docs/record.md's default-run tables, on fake metrics."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("time_to_gain", REPO / "scripts" / "time_to_gain.py")
time_to_gain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_to_gain)


def metrics(evals: dict, epochs: int, seconds: float = 30.0) -> list[dict]:
    """metrics.jsonl rows as loop.py writes them: row 0 untrained, held-out only at `evals`."""
    rows = [{"epoch": 0, "reward_mean": None, "eval_reward_mean": evals[0], "seconds": 0.0}]
    for epoch in range(1, epochs + 1):
        rows.append({"epoch": epoch, "reward_mean": 0.4 + 0.01 * epoch,
                     "eval_reward_mean": evals.get(epoch), "seconds": seconds})  # fmt: skip
    return rows


def test_time_to_target_counts_training_seconds_until_the_first_evaluation_that_reaches_it():
    rows = metrics({0: 0.40, 4: 0.50, 8: 0.56, 12: 0.52}, epochs=12)
    result = time_to_gain.summarise(rows, default_epochs=8, target=0.15)
    assert result["hit"] == {"epoch": 8, "minutes": pytest.approx(4.0)}  # 8 epochs x 30 s
    assert result["default_gain"] == pytest.approx(0.16)
    assert result["last"] == {"epoch": 12, "gain": pytest.approx(0.12)}
    # training reward: epochs 1-8, so the last 10 and the first 10 are the same 8 epochs
    assert result["reward_rise"] == pytest.approx(0.0)
    assert result["cap_minutes"] == pytest.approx(6.0)


def test_a_run_that_never_reaches_the_target_is_reported_beyond_its_cap():
    rows = metrics({0: 0.40, 4: 0.45, 8: 0.54}, epochs=8)
    result = time_to_gain.summarise(rows, default_epochs=4, target=0.15)
    assert result["hit"] is None and result["default_gain"] == pytest.approx(0.05)
    text = time_to_gain.report("new", [0, 1], [result, result], target=0.15)
    assert "| 0 | > 4.0 min (> 8) | +0.050 |" in text
    assert "reached by 0/2 seeds" in text and "median time to +0.15: inf min" in text


def test_plot_draws_every_seed_folder(tmp_path):
    pytest.importorskip("matplotlib")
    for name in ("old-seed0", "new-seed0", "new-seed1"):
        (tmp_path / name).mkdir()
        rows = metrics({0: 0.40, 4: 0.50, 8: 0.45}, epochs=8)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = time_to_gain.plot_gains(["old", "new"], tmp_path, 0.15)
    assert path.is_file() and path.stat().st_size > 1000


def test_gains_at_equal_minutes_take_each_runs_last_evaluation_within_the_limit(tmp_path):
    for name, evals in (("new-seed0", {0: 0.4, 4: 0.5, 8: 0.45}), ("new-seed1", {0: 0.4, 8: 0.6})):
        (tmp_path / name).mkdir()
        rows = metrics(evals, epochs=8)  # 30 s an epoch: epoch 4 at 2.0 min, epoch 8 at 4.0 min
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = time_to_gain.gains_at_minutes(["new"], tmp_path, [1.0, 3.0, 4.0])
    assert "| 1.0 | +0.000, +0.000 | +0.000 |" in table
    assert "| 3.0 | +0.100, +0.000 | +0.050 |" in table
    assert "| 4.0 | +0.050, +0.200 | +0.125 |" in table


def test_previous_defaults_keep_their_updates_per_rollout():
    """OLD and SIX_STEPS spell out what their minibatch default was (4 updates of 8 images), so
    today's default rule (2 updates per rollout) does not change the runs they reproduce."""
    import loop

    for values in (time_to_gain.OLD, time_to_gain.SIX_STEPS):
        cfg = loop.Config(**{k: v for k, v in values.items() if k != "model"})
        sizes = loop.check_config(cfg, 1)
        assert (sizes["minibatch"], sizes["micro_batch"], cfg.images_per_epoch) == (8, 8, 32)
    default = loop.check_config(loop.Config(), 1)
    assert (default["minibatch"], default["micro_batch"]) == (32, 32)  # 2 updates of 32
    assert loop.check_config(loop.Config(algo="rloo"), 1)["minibatch"] == 64  # on-policy: one


def test_old_model_extracts_a_model_folder_from_git(tmp_path, monkeypatch):
    """old_model() writes the assets/tiny-shapes of a commit into a folder (here HEAD's, which any
    clone has), file for file, and leaves an existing folder alone."""
    monkeypatch.setattr(time_to_gain, "OLD_MODEL_COMMIT", "HEAD")
    folder = time_to_gain.old_model(str(tmp_path / "old"))
    shipped = REPO / "assets" / "tiny-shapes"
    names = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert (
        sorted(p.relative_to(folder) for p in (tmp_path / "old").rglob("*") if p.is_file()) == names
    )
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "old" / weights).read_bytes() == (shipped / weights).read_bytes()
    (tmp_path / "old" / "marker").write_text("kept")
    time_to_gain.old_model(folder)
    assert (tmp_path / "old" / "marker").read_text() == "kept"
