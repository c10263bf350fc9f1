"""Two gloo ranks train like one process: advantages from the global batch, statistics averaged."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loop
import loop_utils

# (algo, K, normalisation): every estimator, PPO at K = 1 (batch statistics) and K = 4 (per prompt)
CASES = [("reinforce", 1, "auto"), ("rloo", 4, "auto"), ("ppo", 1, "auto"), ("ppo", 4, "auto"),
         ("loop", 4, "auto"), ("loop", 2, "batch")]  # fmt: skip
WORLD, PER_RANK = 2, 8  # images a rank
CLIP = 2.0  # --adv_clip in std units: 5 cannot bind on 16 images (max |z| = sqrt(15))


def rewards_of(k: int) -> torch.Tensor:
    """A fixed batch of 16 rewards with one outlier (the advantage clip, at 2 std, binds on it)."""
    order = torch.randperm(WORLD * PER_RANK, generator=torch.Generator().manual_seed(k))
    reward = torch.linspace(0.0, 1.0, WORLD * PER_RANK)[order]
    reward[3] = 40.0
    return reward


def rank_main(rank: int, init: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        out = {}
        for algo, k, how in CASES:
            mine = rewards_of(k)[rank * PER_RANK : (rank + 1) * PER_RANK]  # this rank's images
            everyone = loop_utils.gather(mine)  # as loop.train: all ranks' rewards, rank-major
            stats = {}
            advantage = loop.compute_advantages(algo, everyone.view(-1, k), how, CLIP, stats)
            out[(algo, k, how)] = (advantage[rank * PER_RANK : (rank + 1) * PER_RANK], stats)
        out["stats"] = loop_utils.mean_over_ranks(
            {"clipfrac": float(rank), "by": [rank, 2.0], "kl": None}
        )
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_get_one_process_advantages(case, ranks):
    """On the same rewards, the advantages each rank keeps equal one process's rows (the
    batch statistics of PPO K = 1 and the advantage clip see every rank's images)."""
    algo, k, how = case
    stats = {}
    one_process = loop.compute_advantages(algo, rewards_of(k).view(-1, k), how, CLIP, stats)
    for rank in range(WORLD):
        advantage, rank_stats = ranks[rank][case]
        torch.testing.assert_close(advantage, one_process[rank * PER_RANK : (rank + 1) * PER_RANK])
        assert rank_stats == stats
    if algo == "reinforce":  # the clip binds: its mean and std must be the global batch's
        assert stats["adv_clipfrac"] > 0


def test_logged_statistics_are_rank_averages(ranks):
    for rank in range(WORLD):
        assert ranks[rank]["stats"] == {"clipfrac": 0.5, "by": [0.5, 2.0], "kl": None}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's advantages and statistics, from one 2-process gloo group."""
    init = f"file://{tmp_path_factory.mktemp('gloo') / 'init'}"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(init, results), nprocs=WORLD, join=True)
        return dict(results)
