"""Writes the checkpoints of ``tests/data/release1/``, with the release they are named for.

They are what the first release (state version 1 of every component) wrote, kept so that
``tests/sparsetrain/test_checkpoint_compat.py`` can check that they still load and resume. They were
made by running this script against an installation of that release::

    pip install --no-deps --target /tmp/release1 <checkout of that release>
    PYTHONPATH=/tmp/release1:. python tests/data/make_release1_checkpoints.py tests/data/release1

It uses only the APIs of that release. The model and data are defined here and in the test alike.
Each core file holds a rank's state after ``STEPS`` steps and, under ``final_model``, the model after
``2 * STEPS`` steps of the same, uninterrupted run: a resume with today's code must end there exactly.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

STEPS = 4


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.body(x)))))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _build(with_dgc):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.compression import DGCState, dgc_hook
    from sparsetrain.nm import NMConfig, NMSparsifier
    from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig

    torch.manual_seed(0)
    model = UserNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    parts = {}
    if with_dgc:
        ddp = DDP(model)
        parts["dgc"] = DGCState(density=0.1, warmup_steps=2, ramp_steps=0, momentum=0.9, min_numel=16, module=model)
        ddp.register_comm_hook(parts["dgc"], dgc_hook)
    else:
        parts["nm"] = NMSparsifier(model, NMConfig(n=2, m=4, method="srste", include=["mid"]), optimizer=opt)
        parts["dynamic"] = DynamicSparsifier(
            model, DynamicSparsityConfig(method="set", sparsity=0.5, update_interval=2, include=["body"], seed=3),
            total_steps=12, optimizer=opt)
        ddp = DDP(model)
    return model, ddp, opt, parts


def _core(rank, world, out):
    for name, with_dgc in (("dgc", True), ("sparsity", False)):
        model, ddp, opt, parts = _build(with_dgc)
        for step in range(2 * STEPS):
            x, y = batch(rank, step)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
            if step + 1 == STEPS:
                # cloned: a state dict shares the live tensors, which the next steps change
                saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       **{k: c.state_dict() for k, c in parts.items()}})
        saved["final_model"] = model.state_dict()  # where the uninterrupted run of that release ended
        torch.save(saved, os.path.join(out, f"{name}_rank{rank}.pt"))


def _lightning(rank, world, out):
    import lightning.pytorch as pl
    from sparsetrain.callbacks import DynamicSparsity, GradientCompression
    from torch.utils.data import DataLoader, TensorDataset

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = UserNet()

        def training_step(self, b, i):
            return nn.functional.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(8 * STEPS * world, 16, generator=g),
                         torch.randint(0, 4, (8 * STEPS * world,), generator=g))
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DynamicSparsity(method="rigl", sparsity=0.8, update_interval=2,
                                                    include=["net.body", "net.mid"]),
                                    GradientCompression(density=0.1, warmup_steps=2, ramp_steps=0, min_numel=16)])
    trainer.fit(Task(), DataLoader(data, batch_size=8))
    trainer.save_checkpoint(os.path.join(out, "lightning.ckpt"))


if __name__ == "__main__":
    sys.path.insert(1, os.getcwd())
    from tests.harness import run_distributed

    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    run_distributed(_core, 2, out, timeout=300)
    run_distributed(_lightning, 2, out, timeout=300, lightning=True)
    print("wrote", sorted(os.listdir(out)))
