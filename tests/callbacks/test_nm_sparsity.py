import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sparsetrain.callbacks import NMSparsity
from torch.utils.data import TensorDataset

from sparsetrain.components import RecipeError, build_component
from sparsetrain.demo import GPT
from sparsetrain.demo.lightning import DemoLM
from sparsetrain.demo.loader import ResumableLoader
from sparsetrain.nm import is_nm, nm_export_checkpoint
from tests.callbacks.tiny_lm import CFG, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from tests.callbacks.tiny_lm import loader as _loader
from tests.callbacks.tiny_lm import module as _module
from tests.callbacks.tiny_lm import trainer as _trainer
from tests.harness import run_distributed

MLP_LAYERS = ["model.blocks.0.mlp.fc_in", "model.blocks.0.mlp.fc_out"]


def _by_layer(sp):
    """The sparsifier's masks by layer name (``masks()`` keys them by parameter name)."""
    return {k.removesuffix(".weight"): v for k, v in sp.masks().items()}


@pytest.mark.parametrize("method,kw", [("srste", {}), ("mdgf", {}), ("sdgf", {"n": 1, "m": 8}),
                                       ("srste", {"inplace": True})])
def test_fit_ends_exactly_nm_with_plain_weights(method, kw):
    module = _module()
    cb = NMSparsity(method=method, include=["*.mlp.*"], **kw)
    trainer = _trainer(6, [cb])
    trainer.fit(module, _loader())
    n, m = cb.sparsifier.config.n, cb.sparsifier.config.m
    if method in ("mdgf", "sdgf"):
        assert cb.sparsifier.config.decay_steps == 1  # decay_fraction 0.25 of max_steps 6
    assert list(cb.sparsifier.layers) == MLP_LAYERS
    assert set(module.model.state_dict()) == set(GPT(CFG).state_dict())
    for name in MLP_LAYERS:
        assert is_nm(module.get_submodule(name).weight, n, m)
    assert not is_nm(module.model.blocks[0].attn.q_proj.weight, n, m)
    assert "nm/mask_flip_fraction" in trainer.callback_metrics
    assert set(cb.sparsifier.statistics()) <= set(trainer.callback_metrics)  # logs exactly statistics()
    s = cb.summary()
    assert s["nm/exact_nm"] and s["nm/step"] == 6.0 and s["nm/layers"] == MLP_LAYERS
    assert {k: v for k, v in s.items() if k in cb.sparsifier.statistics()} == cb.sparsifier.statistics()


class _Consumed(Callback):
    def __init__(self, loader):
        self.loader = loader

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loader.mark_consumed()


def _fit_to(max_steps, tmp_path, ckpt_path=None, inplace=False):
    module = _module(seed=7 if ckpt_path else 0)  # a resumed run must get everything from the checkpoint
    cb = NMSparsity(method="mdgf", decay_steps=5, update_every=2, include=["*.mlp.*", "*.out_proj"], inplace=inplace)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    # A stateful loader: Lightning restarts a plain DataLoader's epoch from its first batch on resume.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, CFG.block_size + 1), generator=g)
    loader = ResumableLoader(TensorDataset(x[:, :-1], x[:, 1:]), 4, seed=0)
    trainer = _trainer(max_steps, [_Consumed(loader), cb, ckpt], tmp_path=tmp_path, accumulate_grad_batches=2)
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
    return module, cb


@pytest.mark.parametrize("inplace", [False, True])
def test_resume_is_bit_exact_with_grad_accumulation(tmp_path, inplace):
    ref, _ = _fit_to(6, tmp_path / "a", inplace=inplace)
    _fit_to(3, tmp_path / "b", inplace=inplace)
    path = tmp_path / "b" / "step=3.ckpt"
    ckpt = torch.load(path, weights_only=True)
    # The checkpoint's exported view is exactly N:M and loads into the plain model.
    exported = nm_export_checkpoint(ckpt)
    for name in ("model.blocks.0.mlp.fc_in", "model.blocks.0.attn.out_proj"):
        assert is_nm(exported[name + ".weight"], 2, 4)
    plain = DemoLM(model=CFG)
    plain.load_state_dict(exported)
    got, cb = _fit_to(6, tmp_path / "c", ckpt_path=str(path), inplace=inplace)
    assert cb.sparsifier.step_count == 6
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k


def test_recipe_entry_builds_the_callback():
    cb = build_component({"name": "nm_sparsity", "n": 2, "m": 4, "method": "srste", "include": ["*.mlp.*"]},
                         "callbacks[0]")
    assert isinstance(cb, NMSparsity)
    cb = build_component({"name": "nm_sparsity", "n": 1, "m": 8, "method": "sdgf", "stages": ["4:8", "2:8"]},
                         "callbacks[0]")
    assert cb._kwargs["stages"] == [(4, 8), (2, 8)]
    with pytest.raises(RecipeError, match=r"callbacks\[0\]\.method"):
        build_component({"name": "nm_sparsity", "method": "magic"}, "callbacks[0]")
    with pytest.raises(RecipeError, match=r"callbacks\[0\]\.n"):
        build_component({"name": "nm_sparsity", "n": 4, "m": 4}, "callbacks[0]")


@pytest.mark.parametrize("kw,match", [
    ({"n": 4, "m": 4}, "`n` must be < `m`"),
    ({"n": 0}, "`n` must be an integer >= 1"),
    ({"m": 0}, "`m` must be an integer >= 1"),
    ({"method": "rigl"}, "`method` must be one of"),
    ({"decay_fraction": 0.0}, "`decay_fraction` must be in"),
    ({"method": "sdgf", "stages": ["4/8"]}, "`stages` entries must look like 'n:m'"),
    ({"update_every": -2}, "`update_every` must be"),
    ({"include": "*.mlp.*"}, "`include` must be a list of glob strings"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        NMSparsity(**kw)


def test_no_layer_takes_m():
    trainer = _trainer(1, [NMSparsity(n=1, m=128, include=["*.mlp.fc_in"])])
    with pytest.raises(ValueError, match="`m`=128 divides the reduction dim of none"):
        trainer.fit(_module(), _loader())


def _lightning_ddp(rank, world_size):
    torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's, the masks must follow
    module = DemoLM(model=CFG, lr=1e-2)
    cb = NMSparsity(method="srste", include=["*.mlp.*"], verify_every=1, finalize=False)
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, callbacks=[cb],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, _loader(seed=rank))
    return {k: v.clone() for k, v in _by_layer(cb.sparsifier).items()}, cb.sparsifier.exported_state_dict()


@pytest.mark.slow
def test_lightning_ddp_masks_identical_on_both_ranks():
    (m0, e0), (m1, e1) = run_distributed(_lightning_ddp, 2, timeout=240, lightning=True)
    assert set(m0) == set(MLP_LAYERS)
    for k in m0:
        assert torch.equal(m0[k], m1[k])
    for k in e0:
        assert torch.equal(e0[k], e1[k])
    for name in MLP_LAYERS:
        assert is_nm(e0[name + ".weight"], 2, 4)


def test_inplace_fit_equals_the_parametrization():
    # SR-STE: the term goes into the gradients before the optimizer step instead of in a hook.
    out = []
    for inplace in (False, True):
        module = _module()
        trainer = _trainer(5, [NMSparsity(method="srste", include=["*.mlp.*"], inplace=inplace, finalize=False)])
        trainer.fit(module, _loader())
        out.append(trainer.callbacks[0].sparsifier.exported_state_dict())
    assert set(out[0]) == set(out[1]) and all(torch.equal(out[0][k], out[1][k]) for k in out[0])
