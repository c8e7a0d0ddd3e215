"""Every pair of components on one model, on 2 gloo ranks, checked after EVERY optimizer step.

The composition rules of docs/architecture.md, tested together rather than one component at a time:

- no weight is nonzero outside its dynamic-sparsity mask, and no same-shape optimizer state either,
  even while gradient compression keeps residuals across mask updates (rule 3);
- the forward weight of every N:M layer is exactly N:M;
- the ranks hold identical parameters after every step;
- a run stopped halfway and resumed from its saved state ends bit for bit where the uninterrupted run ends.

Each case runs in a plain loop (components constructed by hand, DDP with the compression hook) and
through Lightning (the callbacks); one spawned group of processes runs all cases of a kind.
The model is a user's own ``nn.Module``, not the demo's.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.harness import outside_mask_counts, run_distributed, state_digest, stop_and_save

STEPS = 12
HALF = 6
WORLD = 2


class UserNet(nn.Module):
    """A user's model: three Linears, one of them (``head``) too small to sparsify meaningfully."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(32, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.body(x)))))


# name: (dynamic method or None, N:M or None, compression, optimizer)
PLAIN_CASES = {
    **{f"{m}+dgc/{o}": (m, False, True, o) for m in ("rigl", "set", "gmp", "static") for o in ("sgd", "adamw")},
    "rigl+dgc-momentum/sgd": ("rigl", False, "momentum", "sgd"),
    "nm+dgc/sgd": (None, True, True, "sgd"),
    "rigl+nm/adamw": ("rigl", True, False, "adamw"),
    "set+nm+dgc/sgd": ("set", True, True, "sgd"),
}


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)



def _violations(model: nn.Module, opt, dyn, nm) -> dict[str, int]:
    """Counts of broken invariants right after an optimizer step."""
    weights, state = outside_mask_counts(model, opt, dyn.masks()) if dyn is not None else (0, 0)
    out = {"weights_outside_mask": weights, "state_outside_mask": state, "not_nm": 0}
    if nm is not None:
        from sparsetrain.nm import is_nm

        modules = dict(model.named_modules())
        for name in nm.masks():
            weight = modules[name.rsplit(".", 1)[0]].weight
            out["not_nm"] += int(not is_nm(weight.detach(), 2, 4))
    return out


def _build(case, total_steps=STEPS):
    """The model, its components (constructed by hand) and the optimizer of one case."""
    from sparsetrain.compression import DGCState
    from sparsetrain.nm import NMSparsifier
    from sparsetrain.sparsity import DynamicSparsifier

    method, use_nm, compression, optim = case
    torch.manual_seed(0)
    model = UserNet()
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    dyn = nm = dgc = None
    if use_nm:  # the parametrization keeps the parameter objects: the optimizer built before still holds them
        nm = NMSparsifier(model, n=2, m=4, method="srste", include=["mid"], optimizer=opt)
    if method is not None:  # attached before DDP wraps the model (the masks stay out of its broadcast)
        dyn = DynamicSparsifier(model, method=method, sparsity=0.9, update_every=2, drop_fraction=0.5,
                                end_fraction=1.0, include=["body"] if use_nm else ["body", "mid"],
                                total_steps=total_steps, optimizer=opt)
    ddp = DDP(model)
    if compression:
        momentum = 0.9 if compression == "momentum" else 0.0
        dgc = DGCState(model, density=0.01, min_numel=16, warmup_steps=2, ramp_steps=0, momentum=momentum)
        dgc.register(ddp)
    return model, ddp, opt, dyn, nm, dgc


def _train(ddp, opt, model, dyn, nm, rank, steps, record):
    for step in steps:
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        if record is not None:
            record.append({"digest": state_digest(model), **_violations(model, opt, dyn, nm)})


def _plain_rank(rank, world, tmp):
    results = {}
    for name, case in PLAIN_CASES.items():
        model, ddp, opt, dyn, nm, dgc = _build(case)
        history: list[dict] = []
        _train(ddp, opt, model, dyn, nm, rank, range(STEPS), history)
        full = state_digest(model)

        # stopped halfway: save everything, build it all anew, load, finish
        model, ddp, opt, dyn, nm, dgc = _build(case)
        _train(ddp, opt, model, dyn, nm, rank, range(HALF), None)
        saved = {"model": model.state_dict(), "opt": opt.state_dict(),
                 **{k: c.state_dict() for k, c in (("dyn", dyn), ("nm", nm), ("dgc", dgc)) if c is not None}}
        path = os.path.join(tmp, f"{name.replace('/', '_')}-{rank}.pt")
        torch.save(saved, path)
        saved = torch.load(path, weights_only=True)
        model, ddp, opt, dyn, nm, dgc = _build(case)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        for key, c in (("dyn", dyn), ("nm", nm), ("dgc", dgc)):
            if c is not None:
                c.load_state_dict(saved[key])
        _train(ddp, opt, model, dyn, nm, rank, range(HALF, STEPS), None)
        results[name] = {"history": history, "full": full, "resumed": state_digest(model)}
    return results


@pytest.fixture(scope="module")
def plain_runs():
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_plain_rank, WORLD, tmp, timeout=600)


def _check_invariants(runs, case):
    for rank, result in enumerate(runs):
        history = result[case]["history"]
        assert len(history) == STEPS
        for step, rec in enumerate(history, 1):
            assert rec["weights_outside_mask"] == 0, f"rank {rank} step {step}: {rec}"
            assert rec["state_outside_mask"] == 0, f"rank {rank} step {step}: {rec}"
            assert rec["not_nm"] == 0, f"rank {rank} step {step}: {rec}"


def _check_ranks_and_resume(runs, case):
    first, second = (r[case] for r in runs)
    assert [h["digest"] for h in first["history"]] == [h["digest"] for h in second["history"]]
    for result in runs:
        assert result[case]["resumed"] == result[case]["full"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PLAIN_CASES))
def test_plain_loop_invariants_after_every_step(plain_runs, case):
    _check_invariants(plain_runs, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PLAIN_CASES))
def test_plain_loop_ranks_identical_and_resume_exact(plain_runs, case):
    _check_ranks_and_resume(plain_runs, case)


# ---------------------------------------------------------------------- through Lightning

# name: (DynamicSparsity kwargs or None, NMSparsity kwargs or None, GradientCompression, optimizer)
LIGHTNING_CASES = {
    "rigl+dgc/sgd": (dict(method="rigl", include=["net.body", "net.mid"]), None, True, "sgd"),
    "set+dgc/sgd": (dict(method="set", include=["net.body", "net.mid"]), None, True, "sgd"),
    "nm+dgc/sgd": (None, dict(include=["net.mid"]), True, "sgd"),
    "rigl+nm/adamw": (dict(method="rigl", include=["net.body"]), dict(include=["net.mid"]), False, "adamw"),
    "set+nm+dgc/sgd": (dict(method="set", include=["net.body"]), dict(include=["net.mid"]), True, "sgd"),
}


def _lightning_rank(rank, world, tmp):
    import lightning.pytorch as pl
    from sparsetrain.callbacks import DynamicSparsity, GradientCompression, NMSparsity
    from torch.utils.data import DataLoader, TensorDataset

    class Task(pl.LightningModule):
        def __init__(self, optim):
            super().__init__()
            self.net = UserNet()
            self.optim = optim

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            if self.optim == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.1)
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)

    class Probe(pl.Callback):
        """Checks the invariants after every optimizer step (it runs after the components' callbacks)."""

        def __init__(self, components):
            self.components = components
            self.history = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dyn, nm = self.components
            rec = _violations(pl_module, trainer.optimizers[0], dyn and dyn.sparsifier, nm and nm.sparsifier)
            self.history.append({"digest": state_digest(pl_module), **rec})

    # one epoch is HALF steps per rank: the run interrupted after HALF steps resumes at an epoch boundary
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(16 * HALF * world, 32, generator=g),
                         torch.randint(0, 4, (16 * HALF * world,), generator=g))

    def fit(case, stop_at=None, ckpt=None):
        dyn_kw, nm_kw, compression, optim = case
        pl.seed_everything(0, verbose=False)
        dyn = nm = None
        callbacks = []
        if dyn_kw is not None:
            dyn = DynamicSparsity(sparsity=0.9, update_every=2, drop_fraction=0.5, end_fraction=1.0, **dyn_kw)
            callbacks.append(dyn)
        if nm_kw is not None:
            nm = NMSparsity(n=2, m=4, method="srste", finalize=False, **nm_kw)
            callbacks.append(nm)
        if compression:
            callbacks.append(GradientCompression(density=0.01, min_numel=16, warmup_steps=2, ramp_steps=0))
        probe = Probe((dyn, nm))
        callbacks.append(probe)
        if stop_at is not None:
            callbacks.append(stop_and_save(stop_at, HALF))
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=STEPS, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
                             callbacks=callbacks)
        task = Task(optim)
        trainer.fit(task, DataLoader(data, batch_size=16), ckpt_path=ckpt)
        return task, probe

    results = {}
    for name, case in LIGHTNING_CASES.items():
        task, probe = fit(case)
        full = state_digest(task)
        path = os.path.join(tmp, f"{name.replace('/', '_')}.ckpt")
        fit(case, stop_at=path)
        task, _ = fit(case, ckpt=path)
        results[name] = {"history": probe.history, "full": full, "resumed": state_digest(task)}
    return results


@pytest.fixture(scope="module")
def lightning_runs():
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_lightning_rank, WORLD, tmp, timeout=900, lightning=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LIGHTNING_CASES))
def test_lightning_invariants_after_every_step(lightning_runs, case):
    _check_invariants(lightning_runs, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LIGHTNING_CASES))
def test_lightning_ranks_identical_and_resume_exact(lightning_runs, case):
    _check_ranks_and_resume(lightning_runs, case)
