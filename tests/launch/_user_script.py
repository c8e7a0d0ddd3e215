"""A user's own training script, launched as ``sparsetrain-launch ... -- python _user_script.py OUT``.

Nothing of sparsetrain: plain torch.distributed with torchrun's variables. Every rank trains
the same seeded linear model with DDP on its half of a fixed batch for a few SGD steps and
writes ``OUT/user-rank{R}.pt`` (its parameters and what it saw of the launch).
"""

import os
import sys

import torch
import torch.distributed as dist

STEPS, BATCH = 5, 16


def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4)


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = torch.nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = problem()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[shard]), y[shard]).backward()
        opt.step()
    seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    torch.save({"params": {k: v.detach().clone() for k, v in net.module.state_dict().items()},
                "env": seen, "argv": sys.argv[1:]}, os.path.join(out, f"user-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
