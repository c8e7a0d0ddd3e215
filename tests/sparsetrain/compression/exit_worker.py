"""One rank of a plain loop with the dynamic sparsifier and the DGC hook that ends with
``destroy_process_group`` and exits (run by ``test_exit.py``; prints ``ok <rank>``)."""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain.compression import DGCState
from sparsetrain.sparsity import DynamicSparsifier

STEPS = 6

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sp = DynamicSparsifier(model, method="rigl", sparsity=0.5, update_every=2, total_steps=STEPS, verify_every=1,
                       optimizer=opt)
ddp = DDP(model, bucket_cap_mb=0.001)
DGCState(model, density=0.1, min_numel=10, warmup_steps=2, verify_every=1, optimizer=opt).register(ddp)
gen = torch.Generator().manual_seed(rank)
for _ in range(STEPS):
    x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
dist.destroy_process_group()
print("ok", rank, flush=True)
