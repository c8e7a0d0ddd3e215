"""GradientCompression: strategy checks, hook registration on CPU, checkpointed state, logging."""

from __future__ import annotations

import os
import tempfile
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from sparsetrain.callbacks import GradientCompression
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from sparsetrain.components import RecipeError, build_component
from sparsetrain.demo.lightning import MLPDataModule, MLPTask
from tests.harness import run_distributed

CFG = {"density": 0.05, "warmup_steps": 2, "ramp_steps": 2, "momentum": 0.9, "min_numel": 100,
       "selection": "threshold"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 1.5}, r"`density` must be in \(0, 1\], got 1.5"),
        ({"density": 0}, r"`density` must be in \(0, 1\]"),
        ({"momentum": -0.5}, r"`momentum` must be in \[0, 1\), got -0.5"),
        ({"log_every_n_steps": -1}, r"`log_every_n_steps` must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientCompression(**kwargs)


def test_recipe_entry():
    cb = build_component({"name": "gradient_compression", "density": 0.01, "momentum": 0.9, "clip_norm": None},
                         "callbacks[0]")
    assert isinstance(cb, GradientCompression) and cb.config.density == 0.01
    with pytest.raises(RecipeError, match=r"callbacks\[0\]\.density: `density` must be in \(0, 1\]"):
        build_component({"name": "gradient_compression", "density": 2.0}, "callbacks[0]")
    with pytest.raises(RecipeError, match=r"callbacks\[0\]\.selection: must be one of"):
        build_component({"name": "gradient_compression", "selection": "sorted"}, "callbacks[0]")


def _trainer(tmp, callbacks, **kwargs):
    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=tmp)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def test_non_ddp_strategy_is_refused():
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(tmp, [GradientCompression(**CFG)], devices=1)
        with pytest.raises(ValueError, match=r"needs the DDP strategy \(strategy='ddp'\), got SingleDeviceStrategy"):
            trainer.fit(MLPTask(optimizer="sgd", lr=0.05), MLPDataModule(n=256, batch_size=32))


class _Params(pl.Callback):
    """Records the logged statistics and which comm hook DDP reports."""

    def __init__(self):
        self.seen = []
        self.comm_hook = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(trainer.logged_metrics.get("compression/sent_fraction"))
        self.comm_hook = trainer.strategy.model._get_ddp_logging_data().get("comm_hook")


def _ranks(rank, world, tmp):
    out = {}
    data = dict(n=512, batch_size=32, seed=0)  # 448 train samples: 7 steps per epoch on 2 ranks

    def fit(epochs, ckpt=None, cb=None, **kw):
        pl.seed_everything(0, verbose=False)
        model = MLPTask(optimizer="sgd", lr=0.05, momentum=kw.pop("sgd_momentum", 0.0))
        cb = cb or GradientCompression(**CFG)
        probe = _Params()
        trainer = _trainer(tmp, [cb, probe], devices=world, strategy=kw.pop("strategy", "ddp"), max_epochs=epochs,
                           **kw)
        trainer.fit(model, MLPDataModule(**data), ckpt_path=ckpt)
        return trainer, model, cb, probe

    # uninterrupted: 2 epochs
    trainer, model, cb, probe = fit(2)
    out["steps"] = cb.state.step_count
    out["stats"] = dict(cb.state.last_stats)
    out["logged"] = [None if v is None else float(v) for v in probe.seen]
    out["summary"] = cb.summary()
    full = [p.detach().clone() for p in model.parameters()]
    out["comm_hook"] = probe.comm_hook

    # 1 epoch, checkpoint, resume for the second epoch in a new Trainer with a new callback
    trainer, model, cb, _ = fit(1)
    path = os.path.join(tmp, "epoch1.ckpt")
    trainer.save_checkpoint(path)
    trainer, model, cb2, _ = fit(2, ckpt=path)
    out["resumed_steps"] = cb2.state.step_count
    out["resume_identical"] = all(torch.equal(a, b) for a, b in zip(full, model.parameters()))
    out["ckpt"] = path

    # SGD momentum while the hook owns momentum
    try:
        fit(1, sgd_momentum=0.9)
        out["momentum_error"] = None
    except ValueError as err:
        out["momentum_error"] = str(err)

    # a comm hook given to Lightning's DDPStrategy on CPU is ignored by Lightning: warn, use ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)
        _, _, cb3, _ = fit(1, strategy=strategy)
    out["hook_warning"] = [str(w.message) for w in caught if "ignores" in str(w.message)]
    out["hook_used"] = cb3.state.step_count
    return out


@pytest.fixture(scope="module")
def lightning_runs():
    with tempfile.TemporaryDirectory() as tmp:
        results = run_distributed(_ranks, 2, tmp, timeout=300, lightning=True)
        ckpt = torch.load(results[0]["ckpt"], weights_only=True)
    return results, ckpt


@pytest.mark.slow
def test_hook_registered_on_cpu_and_statistics_logged(lightning_runs):
    results, _ = lightning_runs
    for r in results:
        assert r["comm_hook"] == "dgc_hook"
        assert r["steps"] == 14
        assert r["stats"]["density"] == 0.05 and r["stats"]["sent_fraction"] < 0.2
        logged = [v for v in r["logged"] if v is not None]
        assert len(logged) >= 10 and logged[0] == 1.0 and logged[-1] < 0.2  # warm-up dense, then sparse
        assert r["summary"]["ratio"] > 1.0 and r["summary"]["steps"] == 14


@pytest.mark.slow
def test_checkpoint_resume_is_bit_identical(lightning_runs):
    results, ckpt = lightning_runs
    for r in results:
        assert r["resume_identical"] is True
        assert r["resumed_steps"] == 14
    # the checkpoint holds every rank's residuals and loads with weights_only=True
    state = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "GradientCompression" in k)]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["ranks"][0]["step"] == 7 and state["ranks"][0]["residuals"]
    r0, r1 = (state["ranks"][i]["residuals"] for i in range(2))
    assert any(not torch.equal(r0[k], r1[k]) for k in r0)  # ranks keep different residuals


@pytest.mark.slow
def test_sgd_momentum_with_momentum_correction_is_refused(lightning_runs):
    results, _ = lightning_runs
    for r in results:
        assert r["momentum_error"] is not None
        assert "optimizer `momentum` must be 0" in r["momentum_error"]
        assert "SGD(momentum=0)" in r["momentum_error"]


@pytest.mark.slow
def test_strategy_hook_on_cpu_warns_and_ours_is_used(lightning_runs):
    results, _ = lightning_runs
    for rank, r in enumerate(results):
        if rank == 0:  # said once, by rank 0
            assert r["hook_warning"] and "fp16_compress_hook" in r["hook_warning"][0]
        else:
            assert r["hook_warning"] == []
        assert r["hook_used"] == 7
