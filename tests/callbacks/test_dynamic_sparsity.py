import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sparsetrain.callbacks import DynamicSparsity
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain.components import RecipeError, build_component
from sparsetrain.demo import make_classification
from sparsetrain.demo.lightning import MLPTask
from tests.harness import run_distributed


def _layer_masks(sp):
    """Module name -> mask (``masks()`` is keyed by parameter name)."""
    return {name.rpartition(".")[0]: mask for name, mask in sp.masks().items()}


class _Data(pl.LightningDataModule):
    """A fixed classification set, not shuffled, so a run is a pure function of its settings."""

    def __init__(self, n=64, batch_size=8, rank=0, world=1):
        super().__init__()
        x, y = make_classification(n, 64, 8, seed=0).tensors
        # Rank r of w takes samples r, r + w, ...: its batch i and the other ranks' batch i together
        # are the single-process batch i of w times the size.
        self.data = TensorDataset(x[rank::world], y[rank::world])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False, drop_last=True)


def _trainer(**kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    return pl.Trainer(**(args | kw))


def _task(seed=0):
    torch.manual_seed(seed)
    return MLPTask(optimizer="adamw", lr=0.01, weight_decay=0.05)


def _masked_weights(task):
    mods = dict(task.named_modules())
    return {name: (mods[name].weight, mods[name].weight_mask) for name in mods if hasattr(mods[name], "weight_mask")}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=1.0), r"`sparsity` must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.5), r"`sparsity` must be in \[0, 1\), got -0.5"),
        (dict(method="magnitude"), r"`method` must be one of rigl, set, gmp, static, topkast, got 'magnitude'"),
        (dict(distribution="erdos"), r"`distribution` must be one of erk, er, uniform, got 'erdos'"),
        (dict(update_every=0), r"`update_every` must be an int >= 1, got 0"),
        (dict(verify_every=-1), r"`verify_every` must be an int >= 0, got -1"),
        (dict(end_fraction=0.0), r"`end_fraction` must be in \(0, 1\], got 0.0"),
        (dict(end_fraction=2.0), r"`end_fraction` must be in \(0, 1\], got 2.0"),
        (dict(enforce_interval=0), r"`enforce_interval` must be 'auto' or an int >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsity(**kwargs)
    ((key, value),) = kwargs.items()
    with pytest.raises(RecipeError, match=rf"callbacks\[0\]\.{key}: .*got {value!r}"):
        build_component({"name": "dynamic_sparsity", **kwargs}, "callbacks[0]")


def test_filter_matching_no_module_fails_at_setup():
    cb = DynamicSparsity(include=["encoder.*"])
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder\.\*' matches no layer that can be sparsified"):
        _trainer(max_steps=2, callbacks=[cb]).fit(_task(), _Data())


def test_renamed_arguments_keep_working_with_a_future_warning():
    with pytest.warns(FutureWarning, match="`update_interval` is deprecated: use `update_every`") as caught:
        cb = DynamicSparsity(update_interval=25)
    assert cb.config.update_every == 25
    assert len([w for w in caught if w.category is FutureWarning]) == 1  # once, pointing at the caller
    assert caught[0].filename == __file__
    with pytest.warns(FutureWarning, match="`check_sync` is deprecated: use `verify_every`"):
        cb = DynamicSparsity(check_sync=False)
    assert cb.config.verify_every == 0
    assert DynamicSparsity().config.verify_every == 100 and DynamicSparsity().config.update_every == 100
    with pytest.raises(ValueError, match="give `update_every` only"):
        DynamicSparsity(update_every=3, update_interval=3)
    with pytest.warns(FutureWarning), pytest.raises(RecipeError, match=r"callbacks\[0\]\.update_interval: .*got 0"):
        build_component({"name": "dynamic_sparsity", "update_interval": 0}, "callbacks[0]")


def test_recipe_entry_builds_the_callback():
    cb = build_component({"name": "dynamic_sparsity", "method": "set", "sparsity": 0.9, "distribution": "uniform",
                          "update_every": 25, "exclude": ["model.net.4"]}, "callbacks[0]")
    assert isinstance(cb, DynamicSparsity)
    assert (cb.config.method, cb.config.sparsity, cb.config.exclude) == ("set", 0.9, ("model.net.4",))
    assert cb.config.enforce_interval == "auto"
    for value in ("auto", 5):
        cb = build_component({"name": "dynamic_sparsity", "enforce_interval": value}, "callbacks[0]")
        assert cb.config.enforce_interval == value


def test_schedule_from_estimated_stepping_batches_with_accumulation_logs_and_checkpoint(tmp_path):
    # 64 samples / batch 8 = 8 batches per epoch, accumulated by 2 -> 4 optimizer steps per epoch, 3 epochs.
    cb = DynamicSparsity(method="rigl", sparsity=0.9, update_every=2, end_fraction=1.0, log_per_layer=True)
    logged = {}

    class _Grab(Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.update({k: float(v) for k, v in trainer.logged_metrics.items()})

    task = _task()
    trainer = _trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[cb, _Grab()])
    trainer.fit(task, _Data())
    sp = cb.sparsifier
    assert sp.schedule.total_steps == 12 == trainer.global_step == sp.step_count
    assert sp.schedule.update_steps() == [2, 4, 6, 8, 10]
    assert logged["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    assert logged["sparsity/regrown"] >= 0 and 0.1 < logged["sparsity/itop_rate"] <= 1.0
    assert logged["sparsity/updates"] == 5 and logged["sparsity/regrown_total"] > 0
    assert "sparsity/layer/model.net.0" in logged
    opt = trainer.optimizers[0]
    assert sp.effective_enforce_interval is None  # AdamW keeps the zeros: no per-step pass
    for w, mask in _masked_weights(task).values():
        assert not bool(w[~mask].any())
        assert all(not bool(v[~mask].any()) for v in opt.state[w].values() if v.shape == w.shape)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert {k for k in ckpt["state_dict"] if k.endswith("weight_mask")} == {
        "model.net.0.weight_mask", "model.net.2.weight_mask", "model.net.4.weight_mask"}
    state = ckpt["callbacks"][cb.state_key]
    assert state["step"] == 12 and state["schedule"]["total_steps"] == 12


def test_a_second_fit_hooks_its_new_optimizer():
    cb = DynamicSparsity(method="static", sparsity=0.5)
    task = _task()
    _trainer(max_steps=2, callbacks=[cb]).fit(task, _Data())
    with pytest.warns(UserWarning, match="has seen 2 optimizer steps but the Trainer is at global_step 0"):
        trainer = _trainer(max_steps=3, callbacks=[cb])
        trainer.fit(task, _Data())
    assert cb.sparsifier.step_count == 5
    opt = trainer.optimizers[0]
    for w, mask in _masked_weights(task).values():
        assert all(not bool(v[~mask].any()) for v in opt.state[w].values() if v.shape == w.shape)


class _Crash(Callback):
    def __init__(self, at, path):
        self.at, self.path = at, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)
            raise KeyError("simulated crash")


def _lightning_run(method, ckpt=None, crash=None, seed=0, **kw):
    cb = DynamicSparsity(method=method, sparsity=0.8, update_every=3, drop_schedule="constant",
                         end_fraction=1.0, drop_fraction=0.4, seed=4, **kw.pop("callback", {}))
    callbacks = [cb] + ([_Crash(*crash)] if crash else [])
    task = _task(seed)
    # batch = the whole set: every epoch is one step, so any step is a clean resume point.
    trainer = _trainer(max_steps=12, callbacks=callbacks, **kw)
    trainer.fit(task, _Data(n=32, batch_size=32), ckpt_path=ckpt)
    return task, cb


@pytest.fixture(scope="module")
def uninterrupted():
    return {m: _lightning_run(m) for m in ("rigl", "set")}


# Updates after steps 3, 6, 9: stop between two (4, resume crosses 6) and right after one (6).
@pytest.mark.parametrize("stop", [4, 6])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_crash_and_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, uninterrupted, method, stop):
    path = str(tmp_path / "crash.ckpt")
    with pytest.raises(KeyError, match="simulated crash"):
        _lightning_run(method, crash=(stop, path))
    task, cb = _lightning_run(method, ckpt=path, seed=123)
    ref_task, ref_cb = uninterrupted[method]
    assert cb.sparsifier.step_count == ref_cb.sparsifier.step_count == 12
    ref_state = ref_task.state_dict()
    for k, v in task.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert cb.sparsifier.statistics() == ref_cb.sparsifier.statistics()
    assert cb.state_dict()["rng_state"].equal(ref_cb.state_dict()["rng_state"])


def _ddp_fit(rank, world):
    cb = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, drop_fraction=0.5)
    task = _task()
    trainer = _trainer(devices=world, strategy="ddp", max_steps=6, callbacks=[cb], use_distributed_sampler=False)
    trainer.fit(task, _Data(n=96, batch_size=16 // world, rank=rank, world=world))
    return {n: m.clone() for n, m in _layer_masks(cb.sparsifier).items()}, {
        k: v.clone() for k, v in task.state_dict().items()}


@pytest.mark.slow
def test_ddp_ranks_reach_the_masks_of_a_single_process_run():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_distributed(_ddp_fit, 2, timeout=240, lightning=True)
    cb = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, drop_fraction=0.5)
    task = _task()
    _trainer(max_steps=6, callbacks=[cb]).fit(task, _Data(n=96, batch_size=16))
    initial = DynamicSparsity(method="rigl", sparsity=0.8)
    initial.setup(None, _task(), "fit")
    moved = False
    for masks, state in results:
        for name, mask in _layer_masks(cb.sparsifier).items():
            assert torch.equal(masks[name], mask), name
            moved |= not torch.equal(mask, _layer_masks(initial.sparsifier)[name])
        for k, v in task.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)
    assert moved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's DeepSpeed strategy needs CUDA")
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_strategy_keeps_master_weights_masked(stage):
    pytest.importorskip("deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class MasterCheck(Callback):
        """Reads DeepSpeed's fp32 master copies at the end of training, before the
        strategy's teardown moves the module to the CPU (the gathers need the GPU)."""

        outside: dict = {}

        def on_train_end(self, trainer, pl_module):
            for name, (w, mask) in _masked_weights(pl_module).items():
                self.outside[name] = [
                    int(w[~mask].count_nonzero()),
                    int(safe_get_full_fp32_param(w)[~mask].count_nonzero()),
                    *(int(safe_get_full_optimizer_state(w, k)[~mask].count_nonzero())
                      for k in ("exp_avg", "exp_avg_sq")),
                ]

    cb = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, drop_fraction=0.5)
    check = MasterCheck()
    task = _task()
    trainer = _trainer(accelerator="gpu", devices=1, strategy=DeepSpeedStrategy(stage=stage), precision="bf16-mixed",
                       max_steps=8, callbacks=[cb, check])
    trainer.fit(task, _Data())
    assert cb.sparsifier.step_count == 8 and cb.sparsifier.statistics()["sparsity/updates"] == 3
    assert check.outside and all(counts == [0, 0, 0, 0] for counts in check.outside.values()), check.outside


def test_grad_masking_step_trains_like_the_hooks_with_clipping():
    # The callback masks the gradients before Lightning clips them, so clipping sees what it sees
    # with the per-layer hooks, and the run is the same bit for bit.
    runs = [_lightning_run("rigl", callback=dict(grad_masking=g), gradient_clip_val=0.05) for g in ("hook", "step")]
    (ref_task, ref_cb), (task, cb) = runs
    assert cb.sparsifier.statistics() == ref_cb.sparsifier.statistics()
    for (name, a), b in zip(ref_task.state_dict().items(), task.state_dict().values()):
        assert torch.equal(a, b), name
    for name, (w, mask) in _masked_weights(task).items():
        assert not w[~mask].any(), name


def test_grad_masking_auto_picks_step_unless_something_reads_gradients_before_the_step():
    from lightning.pytorch.strategies import DDPStrategy
    from sparsetrain.callbacks import GradientCompression
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def resolved(trainer_kw, **cb_kw):
        cb = DynamicSparsity(method="set", sparsity=0.5, **cb_kw)
        trainer = _trainer(callbacks=[cb, *trainer_kw.pop("extra", [])], **trainer_kw)
        cb.setup(trainer, _task(), "fit")
        return cb.sparsifier.config.grad_masking

    assert resolved({}) == "step"
    assert resolved({"extra": [GradientCompression()]}) == "hook"
    assert resolved({"strategy": DDPStrategy(ddp_comm_hook=allreduce_hook)}) == "hook"
    assert resolved({"strategy": DDPStrategy()}) == "step"
    assert resolved({}, grad_masking="hook") == "hook"
    with pytest.raises(ValueError, match="`grad_masking` must be 'auto', 'hook' or 'step', got 'both'"):
        DynamicSparsity(grad_masking="both")


def test_logs_and_summarises_exactly_the_sparsifier_statistics():
    logged = {}

    class _Grab(Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.update({k: float(v) for k, v in trainer.logged_metrics.items()})

    for per_layer in (False, True):
        logged.clear()
        cb = DynamicSparsity(method="set", sparsity=0.8, update_every=2, end_fraction=1.0, log_per_layer=per_layer)
        _trainer(max_steps=4, log_every_n_steps=1, callbacks=[cb, _Grab()]).fit(_task(), _Data())
        stats = cb.sparsifier.statistics()
        assert cb.summary() == stats and all(type(v) is float for v in stats.values())
        expected = {k for k in stats if per_layer or not k.startswith("sparsity/layer/")}
        assert {k for k in logged if k.startswith("sparsity/")} == expected
        assert logged["sparsity/updates"] == 1 and logged["sparsity/regrown"] > 0
    assert DynamicSparsity().summary() == {}


def test_two_callbacks_on_different_layers_coexist_and_resume(tmp_path):
    def run(ckpt=None, crash=None):
        cbs = [DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, include=["model.net.0"],
                               seed=1),
               DynamicSparsity(method="set", sparsity=0.5, update_every=3, end_fraction=1.0, include=["model.net.2"],
                               seed=2)]
        task = _task(seed=0 if ckpt is None else 5)
        trainer = _trainer(max_steps=8, callbacks=cbs + ([_Crash(*crash)] if crash else []))
        trainer.fit(task, _Data(n=32, batch_size=32), ckpt_path=ckpt)
        return task, cbs

    ref_task, ref = run()
    assert ref[0].state_key != ref[1].state_key
    assert [list(cb.sparsifier.masks()) for cb in ref] == [["model.net.0.weight"], ["model.net.2.weight"]]
    assert [cb.sparsifier.update_count for cb in ref] == [3, 2]  # after steps 2, 4, 6 and 3, 6
    path = str(tmp_path / "two.ckpt")
    with pytest.raises(KeyError, match="simulated crash"):
        run(crash=(4, path))
    states = torch.load(path, weights_only=True)["callbacks"]
    assert states[ref[0].state_key]["layers"] == ["model.net.0"] and states[ref[0].state_key]["step"] == 4
    assert states[ref[1].state_key]["layers"] == ["model.net.2"] and states[ref[1].state_key]["step"] == 4
    task, resumed = run(ckpt=path)
    for cb, ref_cb in zip(resumed, ref):
        assert cb.sparsifier.statistics() == ref_cb.sparsifier.statistics()
    ref_state = ref_task.state_dict()
    for k, v in task.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_a_checkpoint_keyed_by_the_class_name_still_resumes(tmp_path):
    cb = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0)
    trainer = _trainer(max_steps=3, callbacks=[cb])
    trainer.fit(_task(), _Data())
    assert cb.sparsifier.update_count == 1
    path = tmp_path / "new.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    # the previous release kept the state under the class name
    ckpt["callbacks"] = {"DynamicSparsity": ckpt["callbacks"].pop(cb.state_key)}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    again = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0)
    with pytest.warns(UserWarning, match="had 3 optimizer steps, this one has 5: the mask schedule is recomputed"):
        _trainer(max_steps=5, callbacks=[again]).fit(_task(seed=3), _Data(), ckpt_path=old)
    # a longer run: the schedule is recomputed for 5 steps (docs/dynamic_sparsity.md), one more update at step 4
    assert again.sparsifier.step_count == 5 and again.sparsifier.update_count == 2
    assert again.sparsifier.schedule == again.config.schedule(5) != cb.sparsifier.schedule


def test_dynamic_sparsity_and_nm_on_disjoint_layers_train_together():
    from sparsetrain.callbacks import NMSparsity

    for order in (0, 1):
        dyn = DynamicSparsity(method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, include=["model.net.0"])
        nm = NMSparsity(n=2, m=4, include=["model.net.2"])
        task = _task()
        _trainer(max_steps=4, callbacks=[dyn, nm] if order == 0 else [nm, dyn]).fit(task, _Data())
        assert dyn.sparsifier.update_count == 1 and list(dyn.sparsifier.masks()) == ["model.net.0.weight"]
        w, mask = task.model.net[0].weight, task.model.net[0].weight_mask
        assert not w[~mask].any()
        assert float((task.model.net[2].weight.reshape(-1, 4) != 0).sum(1).max()) <= 2  # exactly 2:4 at the end


@pytest.mark.parametrize("order", ["dynamic first", "nm first"])
def test_a_layer_masked_by_dynamic_sparsity_and_nm_is_refused_naming_it(order):
    from sparsetrain.callbacks import NMSparsity

    dyn = DynamicSparsity(method="rigl", sparsity=0.8, include=["model.net.0"])
    nm = NMSparsity(n=2, m=4)  # every layer, model.net.0 included
    callbacks = [dyn, nm] if order == "dynamic first" else [nm, dyn]
    with pytest.raises(ValueError, match=r"'model\.net\.0(\.weight)?'.*one layer can be masked by one component only"):
        _trainer(max_steps=2, callbacks=callbacks).fit(_task(), _Data())
