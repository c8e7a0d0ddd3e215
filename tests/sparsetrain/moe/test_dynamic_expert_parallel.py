"""DynamicSparsifier on expert-parallel stacks (2 gloo ranks, ep_size 2) against one process at ep_size 1 on
the same weights, tokens and gradients: RigL / SET masks of every global expert through several updates,
GMP's too, exact resume, masks re-sharded 2 -> 1 and 1 -> 2 through the sparsifier's state, the rank check comparing
only what must agree, and the refusals that remain."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.moe import (
    MoE,
    expert_data_parallel_groups,
    expert_parameter_names,
    full_expert_state_dict,
    load_expert_state_dict,
    reduce_expert_gradients,
    shard_experts,
)
from sparsetrain.sparsity import DynamicSparsifier, MaskDivergenceError
from tests.harness import run_distributed

D, F, E, W = 8, 12, 4, 2  # width, hidden, experts, ranks (ep_size 2: two experts per rank)
STACKS = ["moe.experts.w1_EFD", "moe.experts.w2_EDF", "moe.experts.w3_EFD"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.moe = MoE(d_model=D, d_hidden=F, num_experts=E, k=2, dropless=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.moe(self.inp(x)))


def _setup(method, grad_masking="hook", ep_group=None, opt_cls=torch.optim.SGD, **kw):
    torch.manual_seed(0)
    model = Net().double()
    if ep_group is not None:
        shard_experts(model, ep_group)
    sp = DynamicSparsifier(model, method=method, sparsity=0.75, update_every=1, drop_fraction=0.3,
                           drop_schedule="constant", end_fraction=1.0, seed=3, grad_masking=grad_masking,
                           include=["*.experts.w*", "inp", "head"], total_steps=20, **kw)
    opt = opt_cls(model.parameters(), lr=0.05)
    sp.attach_optimizer(opt)
    return model, sp, opt


def _loss(model, step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def _reference_step(model, opt, step, world=W):
    """One process: the mean of the ranks' losses."""
    (sum(_loss(model, step, r) for r in range(world)) / world).backward()
    opt.step()  # the sparsifier's step-post hook updates the masks
    opt.zero_grad()


def _ep_step(model, opt, step, rank, edp_group=None):
    """Expert parallel: this rank's loss; the dense gradients averaged over the ranks (what DDP does), the
    experts' by their own reduction (summed over their replicas, divided by the world size)."""
    _loss(model, step, rank).backward()
    world = dist.get_world_size()
    experts = set(expert_parameter_names(model))
    for name, p in model.named_parameters():
        if name not in experts and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    reduce_expert_gradients(model, edp_group, world)
    opt.step()
    opt.zero_grad()


def _all_masks(sp):
    """Every mask, expert stacks whole by global expert id (collective at ep_size > 1)."""
    stacks = sp.state_dict()["stack_masks"]
    return {k: (stacks[k] if k in stacks else m).clone() for k, m in sp.masks().items()}


def _portable(model, sp):
    """A checkpoint that loads at any expert-parallel size: the dense state, the experts by global id and
    the sparsifier's state (its stack masks whole)."""
    dense = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("moe.experts.")}
    return {"dense": dense, "experts": full_expert_state_dict(model), "sp": sp.state_dict()}


def _load_portable(model, sp, ckpt):
    model.load_state_dict(ckpt["dense"], strict=False)
    load_expert_state_dict(model, ckpt["experts"])
    sp.load_state_dict(ckpt["sp"])


def _reference(method, grad_masking, steps, start=0, ckpt=None, world=W):
    model, sp, opt = _setup(method, grad_masking)
    if ckpt is not None:
        _load_portable(model, sp, ckpt)
    out = [_all_masks(sp)]
    for step in range(start, start + steps):
        _reference_step(model, opt, step, world)
        out.append(_all_masks(sp))
    return out, _portable(model, sp)


def _ep_worker(rank, world, method, grad_masking, steps, start=0, ckpt=None):
    ep_group, edp_group = expert_data_parallel_groups(W)  # ep_size 2; with 4 ranks, 2 replicas per expert
    kw = {"expert_group": edp_group} if world > W else {}
    model, sp, opt = _setup(method, grad_masking, ep_group=ep_group, **kw)
    if ckpt is not None:
        _load_portable(model, sp, ckpt)
    out = [_all_masks(sp)]
    for step in range(start, start + steps):
        _ep_step(model, opt, step, rank, edp_group)
        out.append(_all_masks(sp))
    sp.check_ranks()
    local = {k: v.clone() for k, v in sp.masks().items()}
    return {"masks": out, "local": local, "ckpt": _portable(model, sp), "updates": sp.update_count}


def _assert_masks_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), (i, k)


@pytest.mark.slow
@pytest.mark.parametrize("method,grad_masking", [("rigl", "hook"), ("rigl", "step"), ("set", "hook"), ("gmp", "hook")])
def test_expert_parallel_masks_equal_one_process(method, grad_masking):
    steps = 4
    r0, r1 = run_distributed(_ep_worker, W, method, grad_masking, steps, timeout=240)
    want, _ = _reference(method, grad_masking, steps)
    _assert_masks_equal(r0["masks"], want)
    _assert_masks_equal(r1["masks"], want)
    assert r0["updates"] == steps
    for s in STACKS:  # each rank holds its two experts' masks, every expert keeps its count
        assert torch.equal(r0["local"][s], want[-1][s][:2]) and torch.equal(r1["local"][s], want[-1][s][2:])
        if method != "gmp":  # RigL and SET keep every expert's count (GMP prunes towards it)
            assert torch.equal(want[-1][s].reshape(E, -1).sum(1), want[0][s].reshape(E, -1).sum(1))
        assert not torch.equal(want[-1][s], want[0][s])  # the masks moved


@pytest.mark.slow
def test_masks_reshard_from_2_to_1_and_from_1_to_2():
    # 2 -> 1: train at ep_size 2, go on at ep_size 1 from the portable checkpoint
    r0, _ = run_distributed(_ep_worker, W, "rigl", "hook", 2, timeout=240)
    ref_all, _ = _reference("rigl", "hook", 4)
    _assert_masks_equal(r0["masks"], ref_all[:3])
    got, _ = _reference("rigl", "hook", 2, start=2, ckpt=r0["ckpt"])
    _assert_masks_equal(got, ref_all[2:])
    # 1 -> 2: train at ep_size 1, go on at ep_size 2
    _, ckpt = _reference("rigl", "hook", 2)
    r0, r1 = run_distributed(_ep_worker, W, "rigl", "hook", 2, 2, ckpt, timeout=240)
    _assert_masks_equal(r0["masks"], ref_all[2:])
    for s in STACKS:
        assert torch.equal(r1["local"][s], ref_all[-1][s][2:])


def _resume_worker(rank, world, resume_at):
    model, sp, opt = _setup("set", ep_group=dist.group.WORLD, opt_cls=torch.optim.Adam)
    for step in range(6):
        if step == resume_at:  # this rank's own checkpoint (the same expert-parallel size)
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            torch.manual_seed(5)
            model, sp, opt = _setup("set", ep_group=dist.group.WORLD, opt_cls=torch.optim.Adam)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sp.load_state_dict(ckpt["sp"])
        _ep_step(model, opt, step, rank)
    return {"model": model.state_dict(), "sp": sp.state_dict()}


@pytest.mark.slow
def test_resume_at_expert_parallel_size_2_is_exact():
    straight = run_distributed(_resume_worker, W, None, timeout=240)
    resumed = run_distributed(_resume_worker, W, 3, timeout=240)
    for a, b in zip(straight, resumed):
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        for k in ("stack_masks", "ever_active"):
            assert all(torch.equal(a["sp"][k][n], b["sp"][k][n]) for n in a["sp"][k])
        assert a["sp"]["rng_state"].equal(b["sp"]["rng_state"]) and a["sp"]["updates"] == b["sp"]["updates"] == 6


def _check_worker(rank, world):
    model, sp, opt = _setup("rigl", ep_group=dist.group.WORLD)
    out = {}
    for step in range(2):
        _ep_step(model, opt, step, rank)
    sp.check_ranks()  # the experts differ between the ranks: not compared (no replica)
    m = sp.masks()["head.weight"]
    if rank == 1:  # a dense layer's mask drifts on one rank
        i, j = int(m.flatten().nonzero()[0]), int((~m.flatten()).nonzero()[0])
        m.view(-1)[i], m.view(-1)[j] = False, True
    try:
        sp.check_ranks()
    except MaskDivergenceError as err:
        out["divergence"] = str(err)
    for bad in ({"expert_group": dist.group.WORLD}, {"method": "topkast"}):
        try:
            torch.manual_seed(0)
            m2 = Net().double()
            shard_experts(m2, dist.group.WORLD)
            kw = {"method": "rigl", **bad}
            DynamicSparsifier(m2, sparsity=0.5, include=["*.experts.w1_EFD"], total_steps=5, **kw)
        except ValueError as err:
            out[next(iter(bad))] = str(err)
    return out


@pytest.mark.slow
def test_rank_check_compares_dense_layers_only_and_refusals_remain():
    for r in run_distributed(_check_worker, W, timeout=240):
        assert "head.weight" in r["divergence"] and "moe.experts" not in r["divergence"]
        assert "`expert_group` has 2 ranks, but the experts of stack 'moe.experts.w1_EFD' have 1" in r["expert_group"]
        assert "expert stack 'moe.experts.w1_EFD': method='topkast'" in r["method"]


def _no_group_worker(rank, world):
    ep_group, _ = expert_data_parallel_groups(W)
    torch.manual_seed(0)
    model = Net().double()
    shard_experts(model, ep_group)
    try:
        DynamicSparsifier(model, method="rigl", sparsity=0.5, include=["*.experts.w1_EFD"], total_steps=5)
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.slow
def test_experts_with_replicas_on_four_ranks():
    """ep_size 2 in a world of 4: every expert has 2 replicas; RigL grows by the gradient averaged over them
    (through `expert_group`), the replicas' masks agree and equal one process's; without `expert_group`,
    refused."""
    results = run_distributed(_ep_worker, 4, "rigl", "hook", 3, timeout=300)
    want, _ = _reference("rigl", "hook", 3, world=4)
    for r in results:
        _assert_masks_equal(r["masks"], want)
    for msg in run_distributed(_no_group_worker, 4, timeout=300):
        assert "each expert has 2 replicas: pass `expert_group`" in msg


def _whole_state_worker(rank, world, state):
    model, sp, _ = _setup("rigl", ep_group=dist.group.WORLD)
    model.load_state_dict(state)  # written at ep_size 1: whole [E, ...] weights and masks, this rank's slice kept
    return {k: v.clone() for k, v in sp.masks().items()}


@pytest.mark.slow
def test_a_whole_model_state_from_ep_size_1_loads_its_masks_at_ep_size_2():
    model, sp, opt = _setup("rigl")
    for step in range(2):
        _reference_step(model, opt, step)
    state = model.state_dict()
    for rank, got in enumerate(run_distributed(_whole_state_worker, W, state, timeout=240)):
        for s in STACKS:
            assert torch.equal(got[s], sp.masks()[s][2 * rank:2 * rank + 2])
        assert torch.equal(got["head.weight"], sp.masks()["head.weight"])


def test_a_sparsifier_state_with_bad_stack_masks_is_refused():
    model, sp, _ = _setup("rigl")
    state = sp.state_dict()
    before = {k: v.clone() for k, v in sp.masks().items()}
    with pytest.raises(ValueError, match=r"`state\['stack_masks'\]\['moe.experts.w1_EFD'\]` must be a bool tensor "
                                         r"of shape \(4, 12, 8\)"):
        sp.load_state_dict({**state, "stack_masks": {**state["stack_masks"], STACKS[0]: torch.ones(2, 12, 8).bool()}})
    with pytest.raises(ValueError, match="must map every sparsified expert stack"):
        sp.load_state_dict({**state, "stack_masks": {STACKS[0]: state["stack_masks"][STACKS[0]]}})
    bad = state["stack_masks"][STACKS[1]].clone()
    bad[3] = False
    with pytest.raises(ValueError, match="keeps no weight of expert 3"):
        sp.load_state_dict({**state, "stack_masks": {**state["stack_masks"], STACKS[1]: bad}})
    assert all(torch.equal(before[k], v) for k, v in sp.masks().items())  # nothing changed
