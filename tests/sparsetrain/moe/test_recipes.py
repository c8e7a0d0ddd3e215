"""recipes/moe.yaml and recipes/upcycle.yaml, run tiny on 2 gloo ranks through the training runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sparsetrain.recipe import load_recipe
from tests.harness import run_distributed

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).parents[3] / "recipes"
TINY = ["model.init_args.d_model=64", "model.init_args.block_size=128", "data.byte_budget=200000",
        "data.batch_size=4", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=3", "trainer.progress_every_n_steps=0"]


def _train(rank, world, recipe, out, overrides, steps):
    from lightning.pytorch.callbacks import Callback

    from sparsetrain.moe import moe_layers
    from sparsetrain.train import train

    captured = {}

    class KeepModule(Callback):  # the live module after training, for comparing with the checkpoint
        def on_train_end(self, trainer, pl_module):
            captured["experts"] = {f"{n}.experts.{p}": (m.local_expert_ids(), t.detach().clone())
                                   for n, m in moe_layers(pl_module.model).items()
                                   for p, t in m.experts.named_parameters()}
            opt = trainer.optimizers[0]
            captured["exp_avg"] = {f"{n}.experts.{p}": opt.state[t]["exp_avg"].clone()
                                   for n, m in moe_layers(pl_module.model).items()
                                   for p, t in m.experts.named_parameters()}
            captured["dense"] = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()
                                 if ".experts." not in k}

    summary = train(load_recipe(recipe, overrides), out, max_steps=steps, report=rank == 0,
                    extra_callbacks=[KeepModule()])
    return summary, captured


def _expert_key(name):
    return f"model.{name}"


def test_moe_recipe_expert_parallel_on_2_ranks(tmp_path):
    out = tmp_path / "moe"
    results = run_distributed(_train, 2, str(RECIPES / "moe.yaml"), str(out), TINY, 6, lightning=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2
    with open(out / "metrics.csv") as f:
        header = next(csv.reader(f))
    for col in ("train_moe_loss", "train_lm_loss", "moe/model.blocks.0.mlp/load_e3", "moe/imbalance"):
        assert col in header, col
    assert (out / "report.png").is_file()
    # each rank trained its own 2 of the 4 experts; the dense weights agree (DDP)
    (_, live0), (_, live1) = results
    for name, (ids0, t0) in live0["experts"].items():
        ids1, t1 = live1["experts"][name]
        assert (list(ids0), list(ids1)) == ([0, 1], [2, 3]) and t0.shape[0] == 2
    for name, t in live0["dense"].items():
        assert torch.equal(t, live1["dense"][name]), name
    # the checkpoint holds all 4 experts, rank 1's included, weights and Adam moments
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    from sparsetrain.demo.moe import MoEDemoLM

    module = MoEDemoLM(**load_recipe(RECIPES / "moe.yaml", TINY).model.init_args)
    params = dict(module.named_parameters())
    index = {n: i for i, n in enumerate(params)}
    for name, (_, t0) in live0["experts"].items():
        full = sd[_expert_key(name)]
        assert full.shape[0] == 4
        assert torch.equal(full[:2], t0) and torch.equal(full[2:], live1["experts"][name][1])
        moments = ckpt["optimizer_states"][0]["state"][index[_expert_key(name)]]["exp_avg"]
        assert moments.shape[0] == 4
        assert torch.equal(moments[:2], live0["exp_avg"][name]) and torch.equal(moments[2:], live1["exp_avg"][name])
    # ... and loads at expert-parallel size 1, weights and optimizer state
    module.load_state_dict(sd)
    module.on_load_checkpoint(ckpt)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    opt.load_state_dict(ckpt["optimizer_states"][0])
    for name in live0["experts"]:
        p = params[_expert_key(name)]
        assert torch.equal(p.detach(), sd[_expert_key(name)])
        assert torch.equal(opt.state[p]["exp_avg"][2:], live1["exp_avg"][name])


def test_upcycle_recipe_warm_starts_from_a_dense_run(tmp_path):
    dense_out = tmp_path / "dense"
    dense = ["name=dense", "callbacks=[]", "model.d_model=64", "data.byte_budget=200000", "data.batch_size=4",
             "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=3",
             "trainer.progress_every_n_steps=0"]
    run_distributed(_train, 2, str(RECIPES / "quickstart.yaml"), str(dense_out), dense, 3, lightning=True,
                    timeout=300)
    ckpt = dense_out / "checkpoints" / "last.ckpt"
    over = [o for o in TINY if "expert_parallel" not in o] + [f"model.init_args.upcycle_from={ckpt}"]
    out = tmp_path / "up"
    # the upcycled model computes the dense function before training (eval, no dropping)
    from sparsetrain.demo import GPT, GPTConfig
    from sparsetrain.demo.moe import MoEDemoLM

    args = load_recipe(RECIPES / "upcycle.yaml", over).model.init_args
    up = MoEDemoLM(**args).eval()
    for layer in up.model.modules():
        if hasattr(layer, "router"):
            layer.config.dropless = True
    ref = GPT(GPTConfig(d_model=64, n_layer=2, n_head=2, block_size=128)).eval()
    ref.load_state_dict({k[6:]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()})
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(up.model(idx), ref(idx), rtol=1e-5, atol=1e-5)
    results = run_distributed(_train, 2, str(RECIPES / "upcycle.yaml"), str(out), over, 3, lightning=True,
                              timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_val_loss"] == summary["final_val_loss"]  # finite (not NaN)
    # training moved the experts apart from the dense MLP they copied
    (_, live0), _ = results
    w1 = live0["experts"]["blocks.0.mlp.experts.w1_EFD"][1]
    assert w1.shape[0] == 4 and not torch.equal(w1[0], w1[1])


def _train_in_parts(rank, world, recipe, out, overrides, parts):
    from sparsetrain.train import train

    for steps in parts:
        train(load_recipe(recipe, overrides), out, max_steps=steps, report=False)
    return None


def test_moe_recipe_resumes_exactly_with_expert_parallelism(tmp_path):
    """Stopped after 3 steps and resumed from its checkpoint (every expert by global id, cut back to each
    rank's on load) to 6: the same weights and optimizer state as the uninterrupted 6 steps, bit for bit."""
    recipe = str(RECIPES / "moe.yaml")
    over = TINY + ["trainer.val_check_interval=6"]
    run_distributed(_train_in_parts, 2, recipe, str(tmp_path / "full"), over, [6], lightning=True, timeout=300)
    run_distributed(_train_in_parts, 2, recipe, str(tmp_path / "resumed"), over, [3, 6], lightning=True,
                    timeout=300)
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == 6
    for key, t in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], t), key
    for i, entry in full["optimizer_states"][0]["state"].items():
        for name, t in entry.items():
            assert torch.equal(resumed["optimizer_states"][0]["state"][i][name], t), (i, name)


def _train_dynamic(rank, world, recipe, out, overrides, steps):
    from lightning.pytorch.callbacks import Callback
    from sparsetrain.callbacks import DynamicSparsity

    from sparsetrain.train import train

    dyn = DynamicSparsity(method="rigl", sparsity=0.5, update_every=2, include=["*.experts.w1_EFD"], seed=1)
    seen = {}

    class Masks(Callback):  # the stacks' masks after training, and which global experts they are
        def on_train_end(self, trainer, pl_module):
            seen.update({name: mask.clone() for name, mask in dyn.sparsifier.masks().items()})

    summary = train(load_recipe(recipe, overrides), out, max_steps=steps, report=False, extra_callbacks=[dyn, Masks()])
    return summary["steps"], dyn.sparsifier.update_count, seen


def test_moe_recipe_with_dynamic_sparsity_on_its_expert_stacks(tmp_path):
    # MoEDemoLM splits its experts at setup, which Lightning runs after the callbacks' setup: the callback
    # has the module split them first, so its masks are those of this rank's 2 experts of 4
    results = run_distributed(_train_dynamic, 2, str(RECIPES / "moe.yaml"), str(tmp_path / "moe"), TINY, 4,
                              lightning=True, timeout=300)
    for steps, updates, masks in results:
        assert steps == 4 and updates >= 1
        assert masks and all(m.shape[0] == 2 for m in masks.values())
        for m in masks.values():  # half of every expert's slice kept (sparsity 0.5, per-expert counts)
            kept = m.reshape(2, -1).sum(dim=1)
            assert torch.equal(kept, torch.full_like(kept, m[0].numel() // 2))
