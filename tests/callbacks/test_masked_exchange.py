"""MaskedExchange next to DynamicSparsity on one Trainer: no extra user code, the dense run's result, logging."""

from __future__ import annotations

import os
import tempfile

import lightning.pytorch as pl
import pytest
import torch
from sparsetrain.callbacks import DynamicSparsity, MaskedExchange

from sparsetrain.demo.lightning import MLPDataModule, MLPTask
from tests.harness import quiet_trainer, run_distributed, save_after_first_epoch


class _Probe(pl.Callback):
    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.logged_metrics
        self.logged.append({k: float(m[k]) for k in ("exchange/packed_fraction", "exchange/mask_version",
                                                     "exchange/payload_bytes", "exchange/dense_payload_bytes")
                            if k in m})


def _ranks(rank, world, tmp):
    data = dict(n=512, batch_size=32, seed=0)  # 7 optimizer steps per epoch on 2 ranks

    def fit(epochs, masked, ckpt=None, extra=()):
        pl.seed_everything(0, verbose=False)
        model = MLPTask(optimizer="adamw", lr=0.01)
        cbs = [DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, verify_every=1)]
        if masked:
            cbs.append(MaskedExchange())
        probe = _Probe()
        trainer = quiet_trainer(tmp, [*cbs, probe, *extra], devices=world, strategy="ddp", max_epochs=epochs)
        trainer.fit(model, MLPDataModule(**data), ckpt_path=ckpt)
        return trainer, model, cbs, probe

    out = {}
    _, dense_model, dense_cbs, _ = fit(2, masked=False)
    _, model, cbs, probe = fit(2, masked=True)
    out["identical"] = all(torch.equal(a, b) for a, b in zip(dense_model.parameters(), model.parameters()))
    out["masks_identical"] = all(torch.equal(dense_cbs[0].sparsifier.masks()[k], v)
                                 for k, v in cbs[0].sparsifier.masks().items())
    out["grad_masking"] = cbs[0].sparsifier.config.grad_masking
    out["logged"] = probe.logged
    out["summary"] = cbs[1].summary()
    out["updates"] = cbs[0].sparsifier.update_count
    # checkpoint after one epoch of a two-epoch run, resume in a new Trainer with new callbacks
    path = os.path.join(tmp, "epoch1.ckpt")
    fit(2, masked=True, extra=[save_after_first_epoch(path)])
    _, resumed, rcbs, _ = fit(2, masked=True, ckpt=path)
    out["resume_identical"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    out["resumed_totals"] = rcbs[1].summary()
    return out


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_ranks, 2, tmp, timeout=400, lightning=True)


def test_same_result_as_dense_allreduce_without_extra_code(runs):
    for out in runs:
        assert out["grad_masking"] == "hook"  # the exchange asks the sparsity to mask in backward
        assert out["updates"] >= 3
        assert out["identical"] and out["masks_identical"]


def test_statistics_logged(runs):
    logged = runs[0]["logged"]
    assert len(logged) == 14 and all("exchange/packed_fraction" in step for step in logged)
    assert all(0.0 < step["exchange/packed_fraction"] < 0.5 for step in logged)
    versions = [step["exchange/mask_version"] for step in logged]
    assert versions == sorted(versions) and versions[-1] > versions[0]
    summary = runs[0]["summary"]
    assert summary["steps"] == 14 and summary["dense_steps"] == 0
    assert summary["payload_bytes"] < 0.5 * summary["dense_payload_bytes"]


def test_checkpoint_resume_is_bit_identical(runs):
    for out in runs:
        assert out["resume_identical"]
        assert out["resumed_totals"] == out["summary"]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`verify_every` must be an int >= 0, got -1"):
        MaskedExchange(verify_every=-1)


def test_non_ddp_strategy_is_refused():
    with tempfile.TemporaryDirectory() as tmp:
        trainer = quiet_trainer(tmp, [DynamicSparsity(method="rigl", sparsity=0.8), MaskedExchange()], devices=1)
        with pytest.raises(ValueError, match=r"needs the DDP strategy \(strategy='ddp'\), got SingleDeviceStrategy"):
            trainer.fit(MLPTask(optimizer="sgd", lr=0.05), MLPDataModule(n=256, batch_size=32))
