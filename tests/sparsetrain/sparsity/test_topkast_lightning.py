"""``DynamicSparsity(method="topkast")`` through Lightning on 2 gloo ranks, with no extra user code.

With :class:`~sparsetrain.callbacks.MaskedExchange` on the same Trainer the run equals the dense
all-reduce run bit for bit, the exchange packs exactly the backward sets (never dense), and a run
resumed from a checkpoint written after the first epoch ends where the uninterrupted run ends.
With :class:`~sparsetrain.callbacks.GradientCompression` (DGC) instead, no dense weight outside the
backward set changes at any step, and the weights stay zero outside the forward set.
"""

from __future__ import annotations

import os
import tempfile

import lightning.pytorch as pl
import pytest
import torch
from sparsetrain.callbacks import DynamicSparsity, GradientCompression, MaskedExchange

from sparsetrain.demo.lightning import MLPDataModule, MLPTask
from sparsetrain.sparsity import TopKastSparsifier
from tests.harness import quiet_trainer, run_distributed, save_after_first_epoch


class _OutsideProbe(pl.Callback):
    """After every optimizer step: dense weights changed outside the step's backward set, weights outside A."""

    def __init__(self, dyn):
        self.dyn, self.before, self.changed, self.outside_a = dyn, None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sp = self.dyn.sparsifier
        self.before = {k: (t.clone(), sp.gradient_masks()[k].clone()) for k, t in sp.dense_weights().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sp = self.dyn.sparsifier
        params = dict(pl_module.named_parameters())
        for k, theta in sp.dense_weights().items():
            theta0, b0 = self.before[k]
            self.changed += int((theta != theta0)[~b0].sum())
            self.outside_a += int((params[k].detach() != 0)[~sp.masks()[k]].sum())


def _ranks(rank, world, tmp):
    data = dict(n=512, batch_size=32, seed=0)  # 8 optimizer steps per epoch on 2 ranks

    def fit(masked, ckpt=None, extra=(), dgc=False):
        pl.seed_everything(0, verbose=False)
        model = MLPTask(optimizer="sgd" if dgc else "adamw", lr=0.05 if dgc else 0.01)
        cbs = [DynamicSparsity(method="topkast", sparsity=0.8, backward_extra=0.1, update_every=2,
                               end_fraction=1.0, verify_every=1)]
        if masked:
            cbs.append(MaskedExchange())
        if dgc:
            cbs += [GradientCompression(density=0.05, momentum=0.9, warmup_steps=2, ramp_steps=0, min_numel=16),
                    _OutsideProbe(cbs[0])]
        trainer = quiet_trainer(tmp, [*cbs, *extra], devices=world, strategy="ddp", max_epochs=2)
        trainer.fit(model, MLPDataModule(**data), ckpt_path=ckpt)
        return model, cbs

    dense_model, dense_cbs = fit(masked=False)
    model, cbs = fit(masked=True)
    sp = cbs[0].sparsifier
    out = {
        "topkast": isinstance(sp, TopKastSparsifier),
        "identical": all(torch.equal(a, b) for a, b in zip(dense_model.parameters(), model.parameters())),
        "buffers_identical": all(torch.equal(a, b) for a, b in zip(dense_model.buffers(), model.buffers())),
        "updates": sp.update_count,
        "regrown": sp.statistics()["sparsity/regrown_total"],
        "summary": cbs[1].summary(),
        "backward": sum(int(b.sum()) for b in sp.gradient_masks().values()),
        "biases": sum(p.numel() for n, p in model.named_parameters() if n not in sp.masks()),  # dense ones
    }
    path = os.path.join(tmp, "epoch1.ckpt")
    fit(masked=True, extra=[save_after_first_epoch(path)])
    resumed, _ = fit(masked=True, ckpt=path)
    out["resume_identical"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    out["resume_buffers"] = all(torch.equal(a, b) for a, b in zip(model.buffers(), resumed.buffers()))
    _, dgc_cbs = fit(masked=False, dgc=True)
    probe = dgc_cbs[-1]
    out["dgc"] = {"changed_outside_B": probe.changed, "weights_outside_A": probe.outside_a,
                  "sparse_buckets": dgc_cbs[1].component.statistics()["compression/sparse_buckets"]}
    return out


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_ranks, 2, tmp, timeout=500, lightning=True)


@pytest.mark.slow
def test_masked_exchange_equals_dense_and_packs_the_backward_set(runs):
    for out in runs:
        assert out["topkast"]
        assert out["updates"] >= 3 and out["regrown"] > 0
        assert out["identical"] and out["buffers_identical"]
        summary = out["summary"]
        assert summary["dense_steps"] == 0
        # every step packs B (the sets hold their size) plus the dense parameters, in fp32
        assert summary["payload_bytes"] == summary["steps"] * 4 * (out["backward"] + out["biases"])


@pytest.mark.slow
def test_with_gradient_compression_nothing_outside_the_backward_set_moves(runs):
    for out in runs:
        assert out["dgc"]["changed_outside_B"] == 0 and out["dgc"]["weights_outside_A"] == 0, out["dgc"]
        assert out["dgc"]["sparse_buckets"] > 0  # DGC really compressed (the last step)


@pytest.mark.slow
def test_checkpoint_resume_is_bit_identical(runs):
    for out in runs:
        assert out["resume_identical"] and out["resume_buffers"]
