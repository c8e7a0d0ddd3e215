"""Upcycling, the balancer component (state, rank check on 2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain import contract
from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.moe import MoE, MoEBalancer, dense_mlps, moe_losses, upcycle
from tests.harness import run_distributed

CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, d_model=64)


@pytest.mark.parametrize("k,order", [(1, "softmax_topk"), (2, "softmax_topk"), (3, "topk_softmax")])
def test_upcycled_gpt_computes_the_dense_function(k, order):
    torch.manual_seed(0)
    gpt = GPT(CFG).eval()
    idx = torch.randint(0, 256, (3, 16))
    want = gpt(idx)
    layers = upcycle(gpt, num_experts=4, k=k, score_order=order, dropless=True)
    assert list(layers) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert isinstance(gpt.blocks[0].mlp, MoE)
    torch.testing.assert_close(gpt(idx), want)
    gpt.train()
    loss = gpt(idx).sum() + moe_losses(gpt)
    loss.backward()
    assert gpt.blocks[0].mlp.router.weight_ED.grad is not None


def test_upcycle_is_exact_for_k1_in_fp64_and_on_foreign_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    want = model(x)
    assert list(dense_mlps(model)) == ["1"]
    upcycle(model, num_experts=3, k=1, dropless=True)
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-12)


def test_upcycle_include_and_refusals():
    gpt = GPT(CFG)
    assert list(upcycle(gpt, num_experts=2, k=1, include=["blocks.1.*"])) == ["blocks.1.mlp"]
    assert isinstance(gpt.blocks[0].mlp, nn.Module) and not isinstance(gpt.blocks[0].mlp, MoE)
    with pytest.raises(ValueError, match="include"):
        upcycle(GPT(CFG), num_experts=2, k=1, include=["nothing.*"])
    with pytest.raises(ValueError, match="`k`"):
        upcycle(GPT(CFG), num_experts=2, k=3)
    relu = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="differs from the dense module"):
        upcycle(relu, num_experts=2, k=1)
    with pytest.raises(ValueError, match="no dense MLP"):
        upcycle(nn.Sequential(nn.Linear(4, 4)), num_experts=2, k=1)


def _moe_model(seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Sequential(MoE(8, 16, 4, 1, bias_update_rate=0.01, dropless=True, **kw), nn.Linear(8, 8))


def test_balancer_updates_once_per_optimizer_step_and_resumes():
    model = _moe_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bal = MoEBalancer(model, optimizer=opt, verify_every=1)
    assert contract.attached(model) == [bal] and bal.masks() == {}
    x = torch.randn(4, 8, 8)
    for _ in range(3):
        for micro in x.chunk(2):  # two micro-batches per step
            (model(micro).square().mean() + moe_losses(model)).backward()
        opt.step()
        opt.zero_grad()
    assert bal.num_steps == 3
    bias = model[0].router.selection_bias_E
    assert bias.abs().sum() > 0
    torch.testing.assert_close(bias, (bias / 0.01).round() * 0.01)  # three steps of +-u
    assert bias.abs().max() <= 0.03 + 1e-6
    stats = bal.statistics()
    assert {"moe/0/imbalance", "moe/0/load_e3", "moe/aux_loss", "moe/bias_range"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())
    state = bal.state_dict()
    other = _moe_model(seed=1)
    bal2 = MoEBalancer(other)
    bal2.load_state_dict(state)
    assert bal2.num_steps == 3 and torch.equal(other[0].router.selection_bias_E, bias)
    with pytest.raises(ValueError, match="selection_bias"):
        bal2.load_state_dict({**state, "selection_bias": {}})
    with pytest.raises(ValueError, match="version"):
        bal2.load_state_dict({**state, "version": 99})
    bal.remove()
    assert contract.attached(model) == []
    with pytest.raises(ValueError, match="no MoE layer"):
        MoEBalancer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="verify_every"):
        MoEBalancer(model, verify_every=-1)


def _rank_check(rank, world):
    model = _moe_model()
    bal = MoEBalancer(model)
    # different tokens on each rank: the update uses the summed load, so the biases stay equal
    torch.manual_seed(100 + rank)
    model(torch.randn(32, 8) * (1 + 3 * rank))
    bal.step()
    bal.check_ranks()
    out = {"bias": model[0].router.selection_bias_E.clone()}
    with torch.no_grad():
        model[0].router.selection_bias_E[0] += rank
    try:
        bal.check_ranks()
        out["raised"] = False
    except contract.RankDivergenceError as err:
        out["raised"] = "selection_bias" in str(err)
    return out


@pytest.mark.slow
def test_selection_bias_identical_on_ranks_and_checked():
    results = run_distributed(_rank_check, world_size=2)
    assert torch.equal(results[0]["bias"], results[1]["bias"])
    assert results[0]["raised"] and results[1]["raised"]


def _train_steps(model, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
        for micro in x.chunk(2):
            (model(micro).square().mean() + moe_losses(model)).backward()
        opt.step()
        opt.zero_grad()


def test_resume_is_exact():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(MoE(8, 16, 4, 2, bias_update_rate=0.01, capacity_factor=1.0), nn.Linear(8, 8)).double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, MoEBalancer(model, optimizer=opt)

    model, opt, bal = build()
    _train_steps(model, opt, range(6))
    model2, opt2, bal2 = build()
    _train_steps(model2, opt2, range(3))
    saved = (model2.state_dict(), opt2.state_dict(), bal2.state_dict())
    model3, opt3, bal3 = build()
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    bal3.load_state_dict(saved[2])
    _train_steps(model3, opt3, range(3, 6))
    assert bal3.num_steps == bal.num_steps == 6
    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), n
    assert model[0].router.selection_bias_E.abs().sum() > 0
