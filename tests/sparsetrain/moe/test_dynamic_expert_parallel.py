"""DynamicSparsifier on expert-parallel stacks (2 gloo ranks, ep_size 2) against one process at ep_size 1 on
the same weights, tokens and gradients: RigL / SET masks of every global expert through several updates,
GMP's too, exact resume, masks re-sharded 2 -> 1 and 1 -> 2 through the sparsifier's state, the rank check comparing
only what must agree, and the refusals that remain. On 4 ranks (2 replicas per expert): the expert-data-parallel
group passed or derived from the layers' groups (consecutive or strided), inconsistent layouts refused, and the
Lightning callback."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.moe import (
    MoE,
    derive_expert_data_parallel_group,
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


def _setup(method, grad_masking="hook", ep_group=None, opt_cls=torch.optim.SGD, total_steps=20, **kw):
    torch.manual_seed(0)
    model = Net().double()
    if ep_group is not None:
        shard_experts(model, ep_group)
    sp = DynamicSparsifier(model, method=method, sparsity=0.75, update_every=1, drop_fraction=0.3,
                           drop_schedule="constant", end_fraction=1.0, seed=3, grad_masking=grad_masking,
                           include=["*.experts.w*", "inp", "head"], total_steps=total_steps, **kw)
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


def _reference(method, grad_masking, steps, start=0, ckpt=None, world=W, total_steps=20):
    model, sp, opt = _setup(method, grad_masking, total_steps=total_steps)
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


REPLICA_STEPS = 4  # RigL updates on 4 ranks


def _replica_worker(rank, world, layout, explicit):
    """ep_size 2 on 4 ranks (every expert has 2 replicas). ``layout``: the expert-parallel groups
    ``"consecutive"`` ({0, 1}, {2, 3}: ``expert_data_parallel_groups``) or ``"strided"`` ({0, 2}, {1, 3}: the
    replicas are then {0, 1} and {2, 3}); ``explicit``: pass ``expert_group``, else the sparsifier derives it."""
    if layout == "consecutive":
        ep_group, edp_group = expert_data_parallel_groups(W)
    else:
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        ep_group, edp_group = groups[rank % 2], None
    kw = {"expert_group": edp_group} if explicit else {}
    model, sp, opt = _setup("rigl", ep_group=ep_group, **kw)
    out = [_all_masks(sp)]
    for step in range(REPLICA_STEPS):
        _ep_step(model, opt, step, rank, sp.expert_group)
        out.append(_all_masks(sp))
    sp.check_ranks()  # the replicas' expert masks agree
    return {"masks": out, "replicas": dist.get_process_group_ranks(sp.expert_group), "updates": sp.update_count,
            "local": {s: sp.masks()[s].clone() for s in STACKS}}


@pytest.mark.slow
def test_experts_with_replicas_on_four_ranks_group_derived_or_passed():
    """ep_size 2 in a world of 4: RigL grows by the gradient averaged over an expert's 2 replicas; with the group
    derived from the layers' own expert-parallel groups the masks are those of the run given the group, and
    both are one process's."""
    want, _ = _reference("rigl", "hook", REPLICA_STEPS, world=4)
    passed = run_distributed(_replica_worker, 4, "consecutive", True, timeout=300)
    derived = run_distributed(_replica_worker, 4, "consecutive", False, timeout=300)
    for rank, (p, d) in enumerate(zip(passed, derived)):
        assert d["replicas"] == p["replicas"] == [rank % 2, rank % 2 + 2]
        assert d["updates"] == p["updates"] == REPLICA_STEPS
        _assert_masks_equal(d["masks"], p["masks"])
        _assert_masks_equal(d["masks"], want)
    for s in STACKS:
        assert not torch.equal(want[-1][s], want[0][s])  # the masks moved


@pytest.mark.slow
def test_replicas_derived_from_a_strided_layout():
    """Expert-parallel groups {0, 2} and {1, 3} (not the layout of ``expert_data_parallel_groups``): ranks 0 and 1
    hold experts 0-1, ranks 2 and 3 experts 2-3; the derived replicas give one process's masks."""
    want, _ = _reference("rigl", "hook", REPLICA_STEPS, world=4)
    results = run_distributed(_replica_worker, 4, "strided", False, timeout=300)
    for rank, r in enumerate(results):
        assert r["replicas"] == ([0, 1] if rank in (0, 1) else [2, 3])
        _assert_masks_equal(r["masks"], want)
        held = slice(0, 2) if rank in (0, 1) else slice(2, 4)
        for s in STACKS:
            assert torch.equal(r["local"][s], want[-1][s][held])


def _refusal(model):
    try:
        DynamicSparsifier(model, method="rigl", sparsity=0.5, include=["*.experts.w1_EFD"], total_steps=5)
    except ValueError as err:
        return str(err)
    return ""


def _bad_layout_worker(rank, world):
    pairs = {g: dist.new_group(list(g)) for g in [(0, 1), (2, 3), (0, 2), (1, 3), (1, 2)]}
    consecutive = pairs[(0, 1)] if rank < 2 else pairs[(2, 3)]
    strided = pairs[(0, 2)] if rank % 2 == 0 else pairs[(1, 3)]
    cases = {
        "sizes": consecutive if rank < 2 else dist.group.WORLD,  # ep_size 2 on ranks 0-1, 4 on ranks 2-3
        "overlap": [pairs[(0, 1)], pairs[(1, 2)], pairs[(1, 2)], pairs[(2, 3)]][rank],  # {0, 1} and {1, 2}
    }
    out = {}
    for case, group in cases.items():
        torch.manual_seed(0)
        model = Net().double()
        shard_experts(model, group)
        out[case] = _refusal(model)
    torch.manual_seed(0)
    two = nn.ModuleDict({"a": Net(), "b": Net()}).double()  # two MoE layers over different ranks
    shard_experts(two["a"], consecutive)
    shard_experts(two["b"], strided)
    out["stacks"] = _refusal(two)
    return out


@pytest.mark.slow
def test_inconsistent_expert_parallel_layouts_are_refused():
    results = run_distributed(_bad_layout_worker, 4, timeout=300)
    for rank, r in enumerate(results):
        assert ("the expert-parallel groups differ in size across ranks: ep_size 2 on ranks [0, 1], ep_size 4 on "
                "ranks [2, 3]") in r["sizes"]
        assert ("the expert-parallel groups do not partition the 4 ranks into groups of 2: the ranks [0] name rank 0 "
                "as the first of their group, at indices [0]") in r["overlap"]
        first, second = ([0, 1], [0, 2]) if rank == 0 else ([0, 1], [1, 3]) if rank == 1 else \
            ([2, 3], [0, 2]) if rank == 2 else ([2, 3], [1, 3])
        assert (f"the expert-parallel layers of rank {rank} do not share one layout: 'a.moe.experts.w1_EFD' is "
                f"expert-parallel over ranks {first}, 'b.moe.experts.w1_EFD' over ranks {second}") in r["stacks"]


def test_derive_expert_data_parallel_group_without_expert_parallelism():
    with pytest.raises(TypeError, match="`layers` must be a mapping of name -> MoE layer, got list"):
        derive_expert_data_parallel_group([])
    assert derive_expert_data_parallel_group({"moe": Net().moe}) is None  # ep_size 1: nothing to derive


def _lightning_replica_worker(rank, world, steps):
    """The DynamicSparsity callback on an expert-parallel model (ep_size 2, 4 ranks: 2 replicas per expert),
    nothing passed about the replicas; per step the whole masks (collective)."""
    import lightning.pytorch as pl
    from sparsetrain.callbacks import DynamicSparsity

    class Task(pl.LightningModule):
        """``Net``'s layers under the same names and init; experts sharded, out of DDP, reduced before the step."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(6, D)
            self.moe = MoE(d_model=D, d_hidden=F, num_experts=E, k=2, dropless=True)
            self.head = nn.Linear(D, 3)
            self.double()
            ep_group, self.edp_group = expert_data_parallel_groups(W)
            shard_experts(self, ep_group)
            ignore = expert_parameter_names(self) + [n for n, _ in self.named_buffers() if n.endswith("pending_load_E")]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignore)

        def forward(self, x):
            return self.head(self.moe(self.inp(x)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def on_before_optimizer_step(self, optimizer):
            reduce_expert_gradients(self, self.edp_group, dist.get_world_size())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Record(pl.Callback):
        def __init__(self, dyn):
            self.dyn, self.masks = dyn, []

        def on_train_start(self, trainer, pl_module):
            self.masks.append(_all_masks(self.dyn.sparsifier))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.masks.append(_all_masks(self.dyn.sparsifier))

    batches = []
    for step in range(steps):  # this rank's batch of step `step`, as `_loss` draws it
        g = torch.Generator().manual_seed(1000 * step + rank)
        batches.append((torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)))
    dyn = DynamicSparsity(method="rigl", sparsity=0.75, update_every=1, drop_fraction=0.3, drop_schedule="constant",
                          end_fraction=1.0, seed=3, include=["*.experts.w*", "inp", "head"])
    record = Record(dyn)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                         callbacks=[dyn, record])
    trainer.fit(Task(), torch.utils.data.DataLoader(batches, batch_size=None))
    sp = dyn.sparsifier
    return {"masks": record.masks, "replicas": dist.get_process_group_ranks(sp.expert_group),
            "updates": sp.update_count, "step": trainer.global_step}


@pytest.mark.slow
def test_lightning_callback_with_expert_replicas():
    """Under Lightning (DDP, 4 CPU ranks, ep_size 2) the callback derives the replicas itself: its masks after every
    step are one process's. The module reduces the experts' gradients in its `on_before_optimizer_step`, after the
    callback (grad_masking "step") kept the local ones: the update averages them over the replicas."""
    results = run_distributed(_lightning_replica_worker, 4, REPLICA_STEPS, timeout=600, lightning=True)
    want, ckpt = _reference("rigl", "step", REPLICA_STEPS, world=4, total_steps=REPLICA_STEPS)
    assert ckpt["sp"]["updates"] >= 2
    for rank, r in enumerate(results):
        assert r["step"] == REPLICA_STEPS and r["updates"] == ckpt["sp"]["updates"]
        assert r["replicas"] == [rank % 2, rank % 2 + 2]
        _assert_masks_equal(r["masks"], want)


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
