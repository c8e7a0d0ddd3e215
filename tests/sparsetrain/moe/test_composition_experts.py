"""Dynamic sparsity (RigL, SET) on MoE expert stacks together with DGC gradient compression, on 2 gloo ranks.

A user's ``nn.Module`` holding a ``sparsetrain.moe.MoE`` layer; DynamicSparsifier masks the expert stacks
(``*.experts.w*``, per expert slice) and one Linear; DGCState compresses every gradient, an expert stack per
expert slice (residuals and momenta keyed ``"<stack>.<e>"``). Checked after EVERY optimizer step: no weight
and no same-shape optimizer state nonzero outside its mask, no DGC residual or momentum nonzero outside the
mask of its expert slice (rule 3 of docs/architecture.md: nothing pruned by a mask update is revived by
gradient sent later from a residual), both ranks identical; and a run stopped halfway and resumed from its
saved state ends bit for bit where the uninterrupted run ends. The same through Lightning (the
``DynamicSparsity`` and ``GradientCompression`` callbacks, resumed from a checkpoint).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.harness import outside_mask_counts, run_distributed, state_digest, stop_and_save

STEPS = 10
HALF = 5
CASES = {"rigl/sgd": ("rigl", "sgd", 0.0), "rigl/adamw": ("rigl", "adamw", 0.0),
         "rigl+dgc-momentum/sgd": ("rigl", "sgd", 0.9), "set/sgd": ("set", "sgd", 0.0)}


class UserMoENet(nn.Module):
    """A user's model: an input Linear, a top-2 MoE layer of 4 SwiGLU experts with a residual, a head."""

    def __init__(self) -> None:
        from sparsetrain.moe import MoE

        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.moe = MoE(d_model=16, d_hidden=32, num_experts=4, k=2, capacity_factor=2.0)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.head(h + self.moe(h))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(24, 12, generator=g), torch.randint(0, 4, (24,), generator=g)



def _violations(model, opt, dyn, dgc, step_masks) -> dict[str, int]:
    """Broken invariants right after an optimizer step; DGC's state is held to the masks the step ran with
    (``step_masks``: a mask update at the end of the step is followed at the start of the next one)."""
    n_weights, n_state = outside_mask_counts(model, opt, dyn.masks())
    out = {"weights_outside_mask": n_weights, "state_outside_mask": n_state, "dgc_outside_mask": 0, "dgc_slices": 0}
    masks = step_masks
    state = dgc.state_dict() if dgc is not None else {"residuals": {}, "momenta": {}}
    for table in (state["residuals"], state["momenta"]):
        for key, t in table.items():
            stack, _, e = key.rpartition(".")
            if stack in masks and e.isdigit():  # an expert slice of a sparsified stack
                out["dgc_slices"] += 1
                out["dgc_outside_mask"] += int(((t.reshape(-1) != 0) & ~masks[stack][int(e)].reshape(-1)).sum())
            elif key in masks:
                out["dgc_outside_mask"] += int(((t.reshape(-1) != 0) & ~masks[key].reshape(-1)).sum())
    return out


def _build(case):
    from sparsetrain.compression import DGCState
    from sparsetrain.sparsity import DynamicSparsifier

    method, optim, momentum = case
    torch.manual_seed(0)
    model = UserMoENet()
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    dyn = DynamicSparsifier(model, method=method, sparsity=0.85, update_every=2, drop_fraction=0.5, end_fraction=1.0,
                            include=["*.experts.w*", "inp"], total_steps=STEPS, optimizer=opt)
    ddp = DDP(model)
    dgc = DGCState(model, density=0.05, min_numel=16, warmup_steps=2, ramp_steps=0, momentum=momentum)
    dgc.register(ddp)
    return model, ddp, opt, dyn, dgc


def _train(ddp, opt, model, dyn, dgc, rank, steps, record):
    for step in steps:
        step_masks = {n: m.clone() for n, m in dyn.masks().items()}
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        if record is not None:
            record.append({"digest": state_digest(model), "updates": dyn.update_count,
                           **_violations(model, opt, dyn, dgc, step_masks)})


def _rank(rank, world, tmp):
    results = {}
    for name, case in CASES.items():
        model, ddp, opt, dyn, dgc = _build(case)
        initial = {n: m.clone() for n, m in dyn.masks().items()}
        history: list[dict] = []
        _train(ddp, opt, model, dyn, dgc, rank, range(STEPS), history)
        moved = [n for n, m in dyn.masks().items() if not torch.equal(m, initial[n])]
        full = state_digest(model)

        model, ddp, opt, dyn, dgc = _build(case)
        _train(ddp, opt, model, dyn, dgc, rank, range(HALF), None)
        path = os.path.join(tmp, f"{name.replace('/', '_')}-{rank}.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dyn": dyn.state_dict(),
                    "dgc": dgc.state_dict()}, path)
        saved = torch.load(path, weights_only=True)
        model, ddp, opt, dyn, dgc = _build(case)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        dyn.load_state_dict(saved["dyn"])
        dgc.load_state_dict(saved["dgc"])
        _train(ddp, opt, model, dyn, dgc, rank, range(HALF, STEPS), None)
        results[name] = {"history": history, "full": full, "resumed": state_digest(model), "moved": moved}
    return results


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_rank, 2, tmp, timeout=600)


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_hold_after_every_step_with_dgc(runs, case):
    for rank, result in enumerate(runs):
        history = result[case]["history"]
        assert len(history) == STEPS and history[-1]["updates"] >= 3
        for step, rec in enumerate(history, 1):
            assert rec["weights_outside_mask"] == 0, f"rank {rank} step {step}: {rec}"
            assert rec["state_outside_mask"] == 0, f"rank {rank} step {step}: {rec}"
            assert rec["dgc_outside_mask"] == 0, f"rank {rank} step {step}: {rec}"
        # DGC keeps its state per expert slice (3 stacks x 4 experts, residuals at least)
        assert history[-1]["dgc_slices"] >= 12
        assert {"moe.experts.w1_EFD", "moe.experts.w2_EDF", "moe.experts.w3_EFD"} <= set(result[case]["moved"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_identical_and_resume_exact_with_dgc(runs, case):
    first, second = (r[case] for r in runs)
    assert [h["digest"] for h in first["history"]] == [h["digest"] for h in second["history"]]
    for result in runs:
        assert result[case]["resumed"] == result[case]["full"]


# ---------------------------------------------------------------------- through Lightning: the callbacks

LIGHTNING_STEPS, LIGHTNING_HALF = 8, 4


def _lightning_rank(rank, world, tmp):
    import lightning.pytorch as pl
    from sparsetrain.callbacks import DynamicSparsity, GradientCompression
    from torch.utils.data import DataLoader, TensorDataset

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = UserMoENet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Probe(pl.Callback):
        """The invariants after every optimizer step (it runs after the components' callbacks)."""

        def __init__(self, dyn, comp):
            self.dyn, self.comp, self.history, self.step_masks = dyn, comp, [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step_masks = {n: m.clone() for n, m in self.dyn.sparsifier.masks().items()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec = _violations(pl_module, trainer.optimizers[0], self.dyn.sparsifier, self.comp.state, self.step_masks)
            self.history.append({"digest": state_digest(pl_module), "updates": self.dyn.sparsifier.update_count, **rec})

    g = torch.Generator().manual_seed(7)
    n = 24 * LIGHTNING_HALF * world  # one epoch is LIGHTNING_HALF steps per rank
    data = TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g))

    def fit(stop_at=None, ckpt=None):
        pl.seed_everything(0, verbose=False)
        dyn = DynamicSparsity(method="rigl", sparsity=0.85, update_every=2, drop_fraction=0.5, end_fraction=1.0,
                              include=["net.moe.experts.w*", "net.inp"])
        comp = GradientCompression(density=0.05, min_numel=16, warmup_steps=2, ramp_steps=0)
        probe = Probe(dyn, comp)
        callbacks = [dyn, comp, probe] + ([stop_and_save(stop_at, LIGHTNING_HALF)] if stop_at else [])
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=LIGHTNING_STEPS,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             default_root_dir=tmp, callbacks=callbacks)
        task = Task()
        trainer.fit(task, DataLoader(data, batch_size=24), ckpt_path=ckpt)
        return task, probe, dyn

    task, probe, dyn = fit()
    masks = sorted(dyn.sparsifier.masks())
    full = state_digest(task)
    path = os.path.join(tmp, "moe.ckpt")  # written by rank 0, read by both
    fit(stop_at=path)
    task, _, _ = fit(ckpt=path)
    return {"history": probe.history, "full": full, "resumed": state_digest(task), "masks": masks}


def test_lightning_callbacks_on_expert_stacks_with_dgc():
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_distributed(_lightning_rank, 2, tmp, timeout=600, lightning=True)
    for rank, result in enumerate(runs):
        assert result["masks"] == ["net.inp.weight", "net.moe.experts.w1_EFD", "net.moe.experts.w2_EDF",
                                   "net.moe.experts.w3_EFD"]
        history = result["history"]
        assert len(history) == LIGHTNING_STEPS and history[-1]["updates"] >= 3
        for step, rec in enumerate(history, 1):
            for key in ("weights_outside_mask", "state_outside_mask", "dgc_outside_mask"):
                assert rec[key] == 0, f"rank {rank} step {step}: {rec}"
        assert history[-1]["dgc_slices"] >= 12
        assert result["resumed"] == result["full"]
    assert [h["digest"] for h in runs[0]["history"]] == [h["digest"] for h in runs[1]["history"]]


def test_dgc_clears_each_expert_slice_outside_its_mask():
    """Rule 3 per expert slice, one process: state keyed ``"<stack>.<e>"`` is zeroed outside slice e of the
    stack's ``[E, ...]`` gradient mask when the masks change; state of other parameters is left alone."""
    from sparsetrain.compression import DGCState
    from sparsetrain.sparsity import DynamicSparsifier

    torch.manual_seed(0)
    model = UserMoENet()
    dyn = DynamicSparsifier(model, method="static", sparsity=0.8, include=["*.experts.w1_EFD"], total_steps=4)
    dgc = DGCState(model, density=0.05, min_numel=16)
    mask = dyn.masks()["moe.experts.w1_EFD"]
    engine = dgc.engine
    engine.residuals = {f"moe.experts.w1_EFD.{e}": torch.ones(mask[e].numel()) for e in range(4)}
    engine.residuals["head.weight"] = torch.ones(64)
    engine.momenta = {"moe.experts.w1_EFD.3": torch.full((mask[3].numel(),), 2.0)}
    engine.follow_masks()
    for e in range(4):
        assert torch.equal(engine.residuals[f"moe.experts.w1_EFD.{e}"], mask[e].reshape(-1).float())
    assert torch.equal(engine.momenta["moe.experts.w1_EFD.3"], 2.0 * mask[3].reshape(-1).float())
    assert torch.equal(engine.residuals["head.weight"], torch.ones(64))
