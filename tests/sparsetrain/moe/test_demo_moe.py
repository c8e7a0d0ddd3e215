"""The demo LightningModule adds the MoE losses to its training loss, with its coefficient."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsetrain.demo import GPTConfig
from sparsetrain.demo.lightning import DemoLM
from sparsetrain.demo.moe import MoEDemoLM
from sparsetrain.moe import moe_layers, moe_losses, upcycle


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 32), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _step(module, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        return module.training_step(batch, 0)


@pytest.mark.parametrize("coef", [0.0, 1.0, 3.5])
def test_training_loss_is_lm_plus_coef_times_moe_losses(coef):
    torch.manual_seed(0)
    lm = DemoLM(GPTConfig(d_model=64, n_layer=2), moe_loss_coef=coef)
    upcycle(lm.model, num_experts=4, k=2)
    batch = _batch()
    loss = _step(lm, batch)
    # reference: the same forward by hand
    lm_loss = lm.model.loss(*batch)
    want = lm_loss + coef * moe_losses(lm.model)
    torch.testing.assert_close(loss, want)
    if coef:
        assert moe_losses(lm.model) > 0 and not torch.equal(loss, lm_loss)


def test_dense_demo_loss_unchanged_and_bad_coef_refused():
    torch.manual_seed(0)
    lm = DemoLM(GPTConfig(d_model=64, n_layer=1))
    batch = _batch()
    torch.testing.assert_close(_step(lm, batch), lm.model.loss(*batch))
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="`moe_loss_coef`"):
            DemoLM(moe_loss_coef=bad)


def test_moe_demo_module_builds_and_refuses_bad_input(tmp_path):
    m = MoEDemoLM(d_model=64, n_layer=2, num_experts=4, k=2)
    layers = moe_layers(m.model)
    assert list(layers) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert layers["blocks.0.mlp"].experts.d_hidden == 4 * 64 // 2  # the dense MLP's active weights per token
    with pytest.raises(ValueError, match="`expert_parallel`"):
        MoEDemoLM(d_model=64, num_experts=4, expert_parallel=3)
    with pytest.raises(ValueError, match="`upcycle_from`"):
        MoEDemoLM(d_model=64, upcycle_from=str(tmp_path / "none.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="`upcycle_from`"):
        MoEDemoLM(d_model=64, upcycle_from=str(tmp_path / "junk.ckpt"))
    with pytest.raises(ValueError, match="`k`"):
        MoEDemoLM(d_model=64, num_experts=4, k=5)
    with pytest.raises(ValueError, match="expert_parallel"):  # a distributed run is needed for P > 1
        MoEDemoLM(d_model=64, num_experts=4, expert_parallel=2).setup("fit")
