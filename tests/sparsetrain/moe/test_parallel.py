"""Expert parallelism on 2 and 4 gloo ranks against the 1-rank layer on the same weights and tokens;
expert checkpoints by global id across expert-parallel sizes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetrain.moe import (
    MoE,
    expert_state_dict,
    full_expert_optimizer_state_dict,
    full_expert_state_dict,
    load_expert_optimizer_state_dict,
    load_expert_state_dict,
    moe_losses,
)
from tests.harness import run_distributed

E, D, FH = 8, 16, 24
TOKENS = [7, 0, 5, 2]  # tokens per rank: rank 1 (of 2 or 4) has none


def _tokens(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(TOKENS[rank], D, generator=g, dtype=torch.float64)


def _reference_layer(k, kw):
    torch.manual_seed(0)
    return MoE(D, FH, E, k, activation="gelu", bias=True, **kw).double()


def _ep_worker(rank, world, k, kw):
    ref = _reference_layer(k, kw)
    full = expert_state_dict(ref)  # the 1-rank layer's experts by global id
    torch.manual_seed(123 + rank)  # different init on every rank: everything must come from the state
    layer = MoE(D, FH, E, k, activation="gelu", bias=True, ep_group=dist.group.WORLD, **kw).double()
    layer.router.load_state_dict(ref.router.state_dict())
    load_expert_state_dict(layer, full)
    x = _tokens(rank).requires_grad_()
    y = layer(x)
    loss = (y * torch.linspace(-1, 1, D, dtype=torch.float64)).sum() + moe_losses(layer)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"y": y.detach(), "x_grad": x.grad.clone(), "grads": grads, "local": list(layer.local_expert_ids()),
            "stats": layer.statistics(), "full": full_expert_state_dict(layer)}


def _expected(world, k, kw):
    """Per rank, the 1-rank layer on that rank's tokens; expert gradients summed over the ranks."""
    out, expert_grad = [], None
    for rank in range(world):
        ref = _reference_layer(k, kw)
        x = _tokens(rank).requires_grad_()
        y = ref(x)
        ((y * torch.linspace(-1, 1, D, dtype=torch.float64)).sum() + moe_losses(ref)).backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        eg = {n: g for n, g in grads.items() if n.startswith("experts.")}
        expert_grad = eg if expert_grad is None else {n: expert_grad[n] + eg[n] for n in eg}
        out.append({"y": y.detach(), "x_grad": x.grad.clone(), "grads": grads})
    return out, expert_grad


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k,kw", [(2, {"dropless": True}), (1, {"capacity_factor": 1.0, "min_capacity": 1})])
def test_expert_parallel_equals_one_rank(world, k, kw):
    results = run_distributed(_ep_worker, world, k, kw)
    expected, expert_grad = _expected(world, k, kw)
    L = E // world
    for rank, (got, want) in enumerate(zip(results, expected)):
        assert got["local"] == list(range(rank * L, (rank + 1) * L))
        torch.testing.assert_close(got["y"], want["y"])
        torch.testing.assert_close(got["x_grad"], want["x_grad"])
        torch.testing.assert_close(got["grads"]["router.weight_ED"], want["grads"]["router.weight_ED"])
        for name, g in expert_grad.items():
            torch.testing.assert_close(got["grads"][name], g[rank * L:(rank + 1) * L], msg=name)
        assert got["full"].keys() == results[0]["full"].keys()
        for key, t in got["full"].items():
            assert torch.equal(t, results[0]["full"][key])
    # some expert received no token from some rank (rank 1 sends nothing at all)
    assert TOKENS[1] == 0


def _reshard_worker(rank, world, saved):
    torch.manual_seed(999 + rank)
    group = dist.group.WORLD if world > 1 else None
    layer = MoE(D, FH, E, 2, activation="swiglu", ep_group=group, dropless=True).double()
    load_expert_state_dict(layer, saved)
    return {"local": expert_state_dict(layer), "full": full_expert_state_dict(layer)}


def _save_at_2(rank, world):
    torch.manual_seed(rank)  # each rank's experts differ
    layer = MoE(D, FH, E, 2, activation="swiglu", ep_group=dist.group.WORLD, dropless=True).double()
    return expert_state_dict(layer)


@pytest.mark.slow
def test_expert_checkpoint_reshards_from_2_to_1_and_4():
    shards = run_distributed(_save_at_2, 2)
    saved = {**shards[0], **shards[1]}
    assert len(saved) == E * 3  # w1, w2, w3 of 8 experts, by global id
    assert not torch.equal(saved["experts.w1_EFD.0"], saved["experts.w1_EFD.4"])
    at1 = _reshard_worker(0, 1, saved)
    assert at1["full"].keys() == saved.keys()
    for key, t in saved.items():
        assert torch.equal(at1["full"][key], t)
    at4 = run_distributed(_reshard_worker, 4, saved)
    for rank in range(4):
        assert set(at4[rank]["local"]) == {f"experts.{p}.{g}" for p in ("w1_EFD", "w2_EDF", "w3_EFD")
                                           for g in (2 * rank, 2 * rank + 1)}
        for key, t in at4[rank]["full"].items():
            assert torch.equal(t, saved[key])


def _bad_size(rank, world):
    try:
        MoE(D, FH, 6, 2, ep_group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.slow
def test_num_experts_not_divisible_by_ep_size():
    msgs = run_distributed(_bad_size, 4)
    assert all("`num_experts`" in m for m in msgs)


def test_load_expert_state_refusals():
    layer = MoE(D, FH, E, 2)
    state = expert_state_dict(layer)
    with pytest.raises(ValueError, match="no 'experts.w1_EFD.3'"):
        load_expert_state_dict(layer, {k: v for k, v in state.items() if k != "experts.w1_EFD.3"})
    with pytest.raises(ValueError, match="shape"):
        load_expert_state_dict(layer, {**state, "experts.w2_EDF.0": torch.zeros(3)})


def _ddp_net(ep_group):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, D), MoE(D, FH, E, 2, ep_group=ep_group, dropless=True,
                                                          bias_update_rate=1e-2)).double()


def _ddp_tokens(rank):
    return torch.randn(6, D, generator=torch.Generator().manual_seed(50 + rank), dtype=torch.float64)


def _ddp_worker(rank, world, full_state):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.moe import MoEBalancer

    net = _ddp_net(dist.group.WORLD)
    load_expert_state_dict(net, full_state)
    # the recipe of docs/moe.md: experts and the per-rank load counters are not DDP's
    ignore = [n for n, _ in net.named_parameters() if ".experts." in f".{n}"]
    ignore += [n for n, _ in net.named_buffers() if n.endswith("pending_load_E")]
    DDP._set_params_and_buffers_to_ignore_for_model(net, ignore)
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    bal = MoEBalancer(net, optimizer=opt)
    out = ddp(_ddp_tokens(rank))
    (out.square().mean() + moe_losses(net)).backward()
    for n, p in net.named_parameters():
        if n in ignore:
            p.grad /= world  # expert-data-parallel group of size 1 here: only the scaling
    opt.step()
    bal.check_ranks()
    return {"dense": {n: p.detach().clone() for n, p in net.named_parameters() if n not in ignore},
            "experts": expert_state_dict(net), "bias": net[1].router.selection_bias_E.clone()}


@pytest.mark.slow
def test_ddp_recipe_with_expert_parallel_experts_matches_one_process():
    ref = _ddp_net(None)
    full_state = expert_state_dict(ref)
    world = 2
    results = run_distributed(_ddp_worker, world, full_state)
    # reference: one process, all experts, the mean over ranks of each rank's loss
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = 0
    for rank in range(world):
        loss = loss + (ref(_ddp_tokens(rank)).square().mean() + moe_losses(ref)) / world
    loss.backward()
    opt.step()
    want = {n: p.detach() for n, p in ref.named_parameters()}
    for rank in range(world):
        for n, t in results[rank]["dense"].items():
            torch.testing.assert_close(t, want[n], msg=lambda m, n=n: f"{n}: {m}")
        for key, t in results[rank]["experts"].items():
            pname, gid = key.rsplit(".", 1)
            torch.testing.assert_close(t, want[pname][int(gid)], msg=lambda m, k=key: f"{k}: {m}")
    assert torch.equal(results[0]["bias"], results[1]["bias"]) and results[0]["bias"].abs().sum() > 0


# ---------------------------------------------------------------------- optimizer state by global expert id


def _fixed_expert_grads(layer):
    """A gradient for every local expert that depends only on its global id and parameter."""
    for j, p in enumerate(layer.experts.parameters()):
        ids = layer.local_expert_ids()
        p.grad = torch.stack([torch.linspace(-1, 1, p[0].numel(), dtype=p.dtype).view(p.shape[1:]) * (g + 1 + j)
                              for g in ids])


def _adam_at_2(rank, world, path):
    torch.manual_seed(rank)  # each rank's experts (and router) differ
    layer = MoE(D, FH, E, 2, activation="swiglu", ep_group=dist.group.WORLD, dropless=True).double()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for step in range(3):
        layer(torch.randn(6, D, generator=torch.Generator().manual_seed(7 * step + rank),
                          dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = {"weights": full_expert_state_dict(layer), "optimizer": full_expert_optimizer_state_dict(layer, opt)}
    if rank == 0:
        torch.save(saved, path)
    _fixed_expert_grads(layer)
    opt.step()
    return full_expert_state_dict(layer)


def _adam_load(rank, world, path):
    torch.manual_seed(500 + rank)  # a different init: everything must come from the file
    group = dist.group.WORLD if world > 1 else None
    layer = MoE(D, FH, E, 2, activation="swiglu", ep_group=group, dropless=True).double()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    saved = torch.load(path, weights_only=True)
    load_expert_state_dict(layer, saved["weights"])
    load_expert_optimizer_state_dict(layer, opt, saved["optimizer"])
    state = full_expert_optimizer_state_dict(layer, opt)
    _fixed_expert_grads(layer)
    opt.step()
    return {"optimizer": state, "after_step": full_expert_state_dict(layer)}


@pytest.mark.slow
def test_optimizer_state_by_global_id_reshards_from_2_to_1_and_4(tmp_path):
    path = str(tmp_path / "experts.pt")
    after = run_distributed(_adam_at_2, 2, path)[0]
    saved = torch.load(path, weights_only=True)
    assert saved["optimizer"].keys() == saved["weights"].keys()
    assert set(saved["optimizer"]["experts.w1_EFD.5"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert not torch.equal(saved["optimizer"]["experts.w1_EFD.0"]["exp_avg"],
                           saved["optimizer"]["experts.w1_EFD.4"]["exp_avg"])
    loaded = [_adam_load(0, 1, path), *run_distributed(_adam_load, 4, path)]
    for result in loaded:
        for key, entry in saved["optimizer"].items():  # the optimizer state, identical, expert by expert
            for name, t in entry.items():
                assert torch.equal(result["optimizer"][key][name], t), (key, name)
        for key, t in after.items():  # the next Adam step from it, identical to the one taken at size 2
            assert torch.equal(result["after_step"][key], t), key


def test_load_expert_optimizer_state_refusals():
    layer = MoE(D, FH, E, 2).double()
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(5, D, dtype=torch.float64)).sum().backward()
    opt.step()
    state = full_expert_optimizer_state_dict(layer, opt)
    with pytest.raises(ValueError, match="no 'experts.w1_EFD.3'"):
        load_expert_optimizer_state_dict(layer, opt, {k: v for k, v in state.items() if k != "experts.w1_EFD.3"})
    bad = {**state, "experts.w2_EDF.1": {**state["experts.w2_EDF.1"], "exp_avg": torch.full((D, FH), float("nan"))}}
    with pytest.raises(ValueError, match="finite"):
        load_expert_optimizer_state_dict(layer, opt, bad)
    bad = {**state, "experts.w2_EDF.1": {**state["experts.w2_EDF.1"], "step": torch.tensor(99.0)}}
    with pytest.raises(ValueError, match="differs between experts"):
        load_expert_optimizer_state_dict(layer, opt, bad)
    with pytest.raises(ValueError, match="`state`"):
        load_expert_optimizer_state_dict(layer, opt, [1])


def _load_full_stack(rank, world, full_sd, full_opt_state):
    from sparsetrain.moe import localize_optimizer_state

    torch.manual_seed(77 + rank)
    layer = MoE(D, FH, E, 2, activation="swiglu", ep_group=dist.group.WORLD, dropless=True).double()
    layer.load_state_dict(full_sd)  # all E experts stacked, as written at size 1: each rank keeps its slice
    opt = torch.optim.Adam(layer.parameters())
    opt.load_state_dict(localize_optimizer_state(layer, list(layer.parameters()), full_opt_state))
    return {n: p.detach().clone() for n, p in layer.experts.named_parameters()}, \
        {n: opt.state[p]["exp_avg"].clone() for n, p in layer.experts.named_parameters()}


@pytest.mark.slow
def test_full_stack_state_and_optimizer_state_load_at_expert_parallel_size_2():
    torch.manual_seed(0)
    ref = MoE(D, FH, E, 2, activation="swiglu", dropless=True).double()
    opt = torch.optim.Adam(ref.parameters())
    ref(torch.randn(9, D, dtype=torch.float64)).square().sum().backward()
    opt.step()
    results = run_distributed(_load_full_stack, 2, ref.state_dict(), opt.state_dict())
    L = E // 2
    for rank, (weights, moments) in enumerate(results):
        for n, p in ref.experts.named_parameters():
            assert torch.equal(weights[n], p.detach()[rank * L:(rank + 1) * L]), n
            assert torch.equal(moments[n], opt.state[p]["exp_avg"][rank * L:(rank + 1) * L]), n
