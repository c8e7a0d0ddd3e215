"""Compression next to a component that masks gradients (rule 3 of ``docs/architecture.md``).

A stand-in for dynamic sparsity (``_MaskingComponent``: masks some weights' gradients in a
gradient hook, changes its masks every few optimizer steps and zeroes the weights outside them,
announcing each change through ``mask_version``) is attached to the model with
``contract.attach``. Plain SGD is used: nothing masks the weights after a step, so a residual or
momentum that re-sends gradient at a position a mask update has dropped revives the weight.
After every optimizer step, on 2 gloo ranks: no weight is nonzero outside its mask, and the
residuals and momenta are zero there.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression import DGCState
from sparsetrain.compression.horovod import DistributedOptimizer
from tests.harness import run_distributed
from tests.sparsetrain.compression.test_horovod import _gloo_horovod

STEPS = 14
CHANGE_AT = (3, 6, 9)  # optimizer steps after which the masks change
KEEP = 0.3


class _MaskingComponent:
    """Masks the gradients of ``names`` in a gradient hook; new random masks on request."""

    masks_gradients = True

    def __init__(self, model: nn.Module, names: list[str], seed: int = 0) -> None:
        self.params = dict(model.named_parameters())
        self.names = names
        self.gen = torch.Generator().manual_seed(seed)  # the same on every rank
        self.mask_version = 0
        self._masks = {n: self._draw(n) for n in names}
        for n in names:
            self.params[n].register_hook(lambda g, n=n: torch.where(self._masks[n], g, 0.0))
        contract.attach(model, self, claimed=names)
        self._zero_weights()

    def _draw(self, name: str) -> torch.Tensor:
        p = self.params[name]
        keep = int(KEEP * p.numel())
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[torch.randperm(p.numel(), generator=self.gen)[:keep]] = True
        return mask.view_as(p)

    def _zero_weights(self) -> None:
        with torch.no_grad():
            for n in self.names:
                self.params[n].masked_fill_(~self._masks[n], 0.0)

    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)

    def change(self) -> None:
        for n in self.names:
            self._masks[n].copy_(self._draw(n))  # in place: the gradient hooks read the live mask
        self.mask_version += 1
        self._zero_weights()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))


def _outside(masks: dict[str, torch.Tensor], table: dict[str, torch.Tensor]) -> float:
    """Largest magnitude outside the masks of the state tensors in ``table``."""
    worst = 0.0
    for name, mask in masks.items():
        t = table.get(name)
        if t is not None:
            worst = max(worst, float(t.reshape(-1)[~mask.reshape(-1)].abs().max()))
    return worst


CFG = {"density": 0.02, "warmup_steps": 2, "ramp_steps": 0, "min_numel": 100, "selection": "topk"}


def _ranks(rank, world, momentum, exchange):
    model = _model()
    masked = _MaskingComponent(model, ["0.weight", "2.weight"])  # before DDP, as dynamic sparsity
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if exchange == "ddp":
        ddp = DDP(model, bucket_cap_mb=0.01)
        state = DGCState(**CFG, momentum=momentum).register(ddp)
    else:  # the Horovod optimizer, over a stand-in for Horovod's collectives
        sys.modules["horovod"] = types.ModuleType("horovod")
        sys.modules["horovod.torch"] = _gloo_horovod()
        ddp = model
        opt = DistributedOptimizer(opt, model=model, bucket_cap_mb=0.01, **CFG, momentum=momentum)
        state = opt.dgc_state
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for t in range(STEPS):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        masks = masked.masks()
        out.append({
            "weights_outside": sum(int((params[n].detach() != 0)[~m].sum()) for n, m in masks.items()),
            "residual_outside": _outside(masks, state.residuals),
            "momentum_outside": _outside(masks, state.momenta),
            "sparse": state.last_stats["sparse_buckets"],
            "weights": [p.detach().clone() for p in model.parameters()],
        })
        if t in CHANGE_AT:
            masked.change()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["ddp", "horovod"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_no_gradient_reaches_a_pruned_weight(momentum, exchange):
    results = run_distributed(_ranks, 2, momentum, exchange, timeout=240)
    for r, steps in enumerate(results):
        assert sum(s["sparse"] for s in steps) > 0  # compression really ran
        for t, s in enumerate(steps):
            assert s["weights_outside"] == 0, (r, t, s["weights_outside"])
            assert s["residual_outside"] == 0.0, (r, t)
            assert s["momentum_outside"] == 0.0, (r, t)
            for a, b in zip(s["weights"], results[0][t]["weights"]):
                assert torch.equal(a, b), (r, t)  # ranks stay identical


# ----------------------------------------------------------------------------- through Lightning


def _lightning_ranks(rank, world, tmp):
    import lightning.pytorch as pl
    from sparsetrain.callbacks import GradientCompression

    from sparsetrain.demo.lightning import MLPDataModule, MLPTask

    names = ["model.net.0.weight", "model.net.2.weight"]

    class Masking(pl.Callback):
        """Attaches the masking component in setup (before DDP wraps the module), checks after every
        optimizer step, and changes the masks every third step."""

        def __init__(self, compression):
            self.compression, self.component, self.seen = compression, None, []

        def setup(self, trainer, pl_module, stage):
            self.component = _MaskingComponent(pl_module, names)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks, state = self.component.masks(), self.compression.state
            params = dict(pl_module.named_parameters())
            self.seen.append((
                sum(int((params[n].detach() != 0)[~m].sum()) for n, m in masks.items()),
                _outside(masks, state.residuals), _outside(masks, state.momenta), state.last_stats["sparse_buckets"],
            ))
            if trainer.global_step % 3 == 0:
                self.component.change()

    pl.seed_everything(0, verbose=False)
    compression = GradientCompression(density=0.02, warmup_steps=2, ramp_steps=0, momentum=0.9, min_numel=100,
                                      selection="topk")
    masking = Masking(compression)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
                         callbacks=[masking, compression])
    trainer.fit(MLPTask(optimizer="sgd", lr=0.05), MLPDataModule(n=512, batch_size=32, seed=0))
    return masking.seen


@pytest.mark.slow
def test_no_gradient_reaches_a_pruned_weight_through_lightning(tmp_path):
    results = run_distributed(_lightning_ranks, 2, str(tmp_path), timeout=240, lightning=True)
    for r, seen in enumerate(results):
        assert len(seen) == 7 and sum(s[3] for s in seen) > 0
        for t, (weights, residual, momentum, _) in enumerate(seen):
            assert (weights, residual, momentum) == (0, 0.0, 0.0), (r, t)
