"""What the callbacks refuse on resume and at construction, and what they say when a resumed run is longer."""

from __future__ import annotations

import pytest
import torch
from sparsetrain.callbacks import DynamicSparsity, GradientCompression, NMSparsity

from tests.callbacks.test_dynamic_sparsity import _Data, _task, _trainer


def _fit(tmp_path, callbacks, max_steps, ckpt_path=None, name="run.ckpt"):
    trainer = _trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path)
    task = _task()
    trainer.fit(task, datamodule=_Data(), ckpt_path=ckpt_path)
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return trainer, task, path


@pytest.mark.parametrize("make", [
    lambda **kw: DynamicSparsity(method="rigl", sparsity=0.5, update_every=2, **kw),
    lambda **kw: NMSparsity(n=2, m=4, **kw),
    lambda **kw: GradientCompression(density=0.1, **kw),
])
def test_a_checkpoint_without_the_callback_state_is_refused_unless_fresh_state_is_ok(make):
    checkpoint = {"callbacks": {"SomethingElse": {"x": 1}}}
    with pytest.raises(ValueError, match=r"has no state for .*fresh_state_ok=True"):
        make().on_load_checkpoint(None, None, checkpoint)
    with pytest.warns(UserWarning, match="starting a fresh .* state"):
        make(fresh_state_ok=True).on_load_checkpoint(None, None, checkpoint)
    cb = make()
    cb.on_load_checkpoint(None, None, {"callbacks": {cb.state_key: {"version": 2}}})  # its own state: fine
    cb.on_load_checkpoint(None, None, {"callbacks": {cb._legacy_state_key: {"version": 1}}})  # first release's


def test_resuming_a_checkpoint_that_lost_the_callback_state_fails_before_training(tmp_path):
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)
    _, _, path = _fit(tmp_path, [cb], max_steps=4)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if "DynamicSparsity" not in k}
    torch.save(checkpoint, path)
    trainer = _trainer(max_steps=8, callbacks=[DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)])
    with pytest.raises(ValueError, match="has no state for DynamicSparsity"):
        trainer.fit(_task(), datamodule=_Data(), ckpt_path=path)
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2, fresh_state_ok=True)
    trainer = _trainer(max_steps=8, callbacks=[cb])
    with pytest.warns(UserWarning, match="fresh DynamicSparsity state"):
        trainer.fit(_task(), datamodule=_Data(), ckpt_path=path)
    assert trainer.global_step == 8 and cb.sparsifier.step_count == 4


def test_a_longer_resumed_run_recomputes_the_schedule_and_says_so(tmp_path):
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)
    _, _, path = _fit(tmp_path, [cb], max_steps=8)
    assert cb.sparsifier.schedule.total_steps == 8
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)
    trainer = _trainer(max_steps=12, callbacks=[cb])
    with pytest.warns(UserWarning, match="had 8 optimizer steps, this one has 12: the mask schedule is recomputed"):
        trainer.fit(_task(), datamodule=_Data(n=128), ckpt_path=path)
    assert cb.sparsifier.schedule.total_steps == 12
    assert cb.sparsifier.schedule == cb.config.schedule(12)
    assert cb.sparsifier.step_count == 12


@pytest.mark.parametrize(("make", "match"), [
    (lambda: DynamicSparsity(log_per_layer="yes"), "`log_per_layer` must be True or False, got 'yes'"),
    (lambda: DynamicSparsity(log_stats="no"), "`log_stats` must be True or False"),
    (lambda: DynamicSparsity(fresh_state_ok="no"), "`fresh_state_ok` must be True or False"),
    (lambda: NMSparsity(finalize="no"), "`finalize` must be True or False"),
    (lambda: NMSparsity(log_stats=1), "`log_stats` must be True or False"),
    (lambda: GradientCompression(fresh_state_ok="yes"), "`fresh_state_ok` must be True or False"),
])
def test_booleans_given_as_strings_are_refused(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_check_sync_as_a_string_is_refused():
    with pytest.raises(ValueError, match="`check_sync` must be a bool, got 'no'"):
        DynamicSparsity(check_sync="no")


def test_fresh_state_ok_is_in_the_signature():
    import inspect

    for cls in (DynamicSparsity, NMSparsity, GradientCompression):
        assert inspect.signature(cls).parameters["fresh_state_ok"].default is False


def _spawn_fit_and_save(tmp_path):
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)
    trainer = _trainer(max_steps=2, callbacks=[cb], strategy="ddp_spawn", devices=2, default_root_dir=tmp_path)
    trainer.fit(_task(), datamodule=_Data())
    assert cb.sparsifier is None  # the state lived in the spawned processes
    trainer.save_checkpoint(tmp_path / "after.ckpt")


@pytest.mark.slow
def test_a_checkpoint_after_a_ddp_spawn_fit_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="fit ran in processes that have ended.*use strategy='ddp'"):
        _spawn_fit_and_save(tmp_path)
    assert not (tmp_path / "after.ckpt").exists()


def test_a_checkpoint_of_a_finished_fit_in_this_process_is_written(tmp_path):
    cb = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2)
    _, _, path = _fit(tmp_path, [cb], max_steps=2)
    assert any("weight_mask" in k for k in torch.load(path, weights_only=False)["state_dict"])
