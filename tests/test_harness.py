"""The distributed test harness itself."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedRunError, run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    gathered = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    return t.item(), torch.cat(gathered)


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise KeyError("rank one is broken")
    return rank


def _hang_on_rank_zero(rank, world_size):
    if rank == 0:
        time.sleep(300)
    return rank


def test_collective_across_three_ranks():
    results = run_distributed(_allreduce_rank, 3)
    assert [r[0] for r in results] == [6.0, 6.0, 6.0]
    for _, gathered in results:
        assert torch.equal(gathered, torch.tensor([0.0, 1.0, 2.0]))


def test_failing_rank_surfaces_its_traceback():
    with pytest.raises(DistributedRunError, match=r"rank 1 raised:(.|\n)*KeyError: 'rank one is broken'"):
        run_distributed(_fail_on_rank_one, 2)


def test_hung_rank_times_out():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"timed out after 20s; ranks \[0(, 1)?\] did not finish"):
        run_distributed(_hang_on_rank_zero, 2, timeout=20)
    assert time.monotonic() - start < 60


def test_world_size_is_checked():
    with pytest.raises(ValueError, match="`world_size` must be >= 1, got 0"):
        run_distributed(_allreduce_rank, 0)
