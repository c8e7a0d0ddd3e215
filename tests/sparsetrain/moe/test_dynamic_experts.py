"""DynamicSparsifier on MoE expert stacks (``GroupedExperts.w1_EFD`` / ``w2_EDF`` / ``w3_EFD``): selection by
parameter name, per-expert densities and masks, RigL / SET / GMP per expert slice against the per-layer
functions, enforcement, state and exact resume, the rank check on 2 gloo ranks, ``remove()``."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetrain import contract
from sparsetrain.compression.dgc import STACKED_ATTR as DGC_STACKED_ATTR
from sparsetrain.moe import MoE
from sparsetrain.sparsity import DynamicSparsifier, MaskDivergenceError, layer_active_counts, rigl_update
from sparsetrain.sparsity.density import floor_count
from sparsetrain.sparsity.gmp import magnitude_prune
from sparsetrain.sparsity.stacked import STACKED_ATTR
from tests.harness import run_distributed

D, F, E = 16, 24, 4
STACKS = ["moe.experts.w1_EFD", "moe.experts.w2_EDF", "moe.experts.w3_EFD"]


class Net(nn.Module):
    """A user model: embedding Linear, an MoE layer, a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, D)
        self.moe = MoE(d_model=D, d_hidden=F, num_experts=E, k=2, capacity_factor=2.0)
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        return self.head(self.moe(self.inp(x)))


def _model(seed=0):
    torch.manual_seed(seed)
    return Net()


def _batch(step, n=32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _loss(model, step):
    x, y = _batch(step)
    return nn.functional.cross_entropy(model(x), y)


def _sp(model, method="rigl", **kw):
    cfg = dict(method=method, sparsity=0.8, update_every=1, drop_fraction=0.3, drop_schedule="constant",
               end_fraction=1.0, seed=3, include=["*.experts.w*", "head"])
    cfg.update(kw)
    return DynamicSparsifier(model, total_steps=20, **cfg)


def test_stacked_mark_is_the_one_gradient_compression_reads():
    assert STACKED_ATTR == DGC_STACKED_ATTR
    assert all(getattr(p, STACKED_ATTR, False) for p in _model().moe.experts.parameters())


def test_the_per_expert_functions_are_written_once():
    from sparsetrain.moe import sparsity as moe_sparsity
    from sparsetrain.sparsity import stacked

    for name in moe_sparsity.__all__:
        assert getattr(moe_sparsity, name) is getattr(stacked, name)


def test_stacks_are_selected_by_parameter_name_and_only_when_named():
    sp = _sp(_model())
    masks = sp.masks()
    assert list(masks) == ["moe.experts.w1_EFD", "moe.experts.w2_EDF", "moe.experts.w3_EFD", "head.weight"]
    assert masks["moe.experts.w1_EFD"].shape == (E, F, D) and masks["moe.experts.w2_EDF"].shape == (E, D, F)
    assert all(m.dtype == torch.bool for m in masks.values())
    assert contract.gradient_masks(sp.model)[1].keys() == masks.keys()
    # the default selection (every Linear) leaves the stacks dense
    dense = DynamicSparsifier(_model(), method="static", sparsity=0.5, total_steps=5)
    assert list(dense.masks()) == ["inp.weight", "head.weight"]
    # exclude removes a stack; a pattern matching nothing names both kinds
    sp2 = _sp(_model(), exclude=["*.w3_EFD"])
    assert "moe.experts.w3_EFD" not in sp2.masks() and "moe.experts.w1_EFD" in sp2.masks()
    with pytest.raises(ValueError, match="expert stacks .by parameter name.: moe.experts.w1_EFD"):
        _sp(_model(), include=["*.experts.nothing"])


def test_each_expert_gets_the_count_of_a_separate_matrix():
    sp = _sp(_model())
    # reference: the experts written out as separate layers (ERK with E not a fan dimension)
    shapes = {"head": (4, D)}
    for s in STACKS:
        one = tuple(sp.masks()[s].shape[1:])
        shapes.update({f"{s}.{e}": one for e in range(E)})
    want = layer_active_counts(shapes, 0.8, "erk")
    for s in STACKS:
        assert [int(m.sum()) for m in sp.masks()[s]] == [want[f"{s}.{e}"] for e in range(E)]
    assert int(sp.masks()["head.weight"].sum()) == want["head"]
    assert sp.statistics()["sparsity/global"] == pytest.approx(0.8, abs=1e-3)
    assert f"sparsity/layer/{STACKS[0]}" in sp.statistics()


def _dense_grads(model, step):
    """The dense gradient of the masked forward, with fresh leaves (no hook of the sparsifier fires)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    x, y = _batch(step)
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    names = list(params)
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("grad_masking", ["hook", "step"])
def test_rigl_update_is_rigl_of_every_expert_slice(grad_masking, grouped, monkeypatch):
    # grouped: the expert slices of one shape selected together, as on an accelerator
    monkeypatch.setattr(DynamicSparsifier, "_group_on_cpu", grouped)
    model = _model()
    sp = _sp(model, grad_masking=grad_masking)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach_optimizer(opt, hook=False)
    for step in range(3):
        dense = _dense_grads(model, step)
        _loss(model, step).backward()
        opt.step()
        before = {s: (getattr(model.moe.experts, s.rsplit(".", 1)[1]).detach().clone(), sp.masks()[s].clone())
                  for s in STACKS}
        drop = sp.schedule.drop_fraction_at(step + 1)
        sp.step()
        opt.zero_grad()
        for s in STACKS:
            w, m = before[s]
            g = dense[s]
            want = torch.stack([rigl_update(w[e], g[e], m[e], floor_count(drop * int(m[e].sum())))
                                for e in range(E)])
            assert torch.equal(sp.masks()[s], want), (step, s)
            assert not torch.equal(sp.masks()[s], m)
    assert sp.statistics()["sparsity/updates"] == 3


def test_set_keeps_each_experts_count_and_is_reproducible(monkeypatch):
    runs = []
    for grouped in (False, True):  # grouped or not, the same growth (drawn per slice, in order)
        monkeypatch.setattr(DynamicSparsifier, "_group_on_cpu", grouped)
        model = _model()
        sp = _sp(model, method="set")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp.attach_optimizer(opt)
        counts = {s: sp.masks()[s].reshape(E, -1).sum(1) for s in STACKS}
        start = {s: sp.masks()[s].clone() for s in STACKS}
        for step in range(2):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
        for s in STACKS:
            assert torch.equal(sp.masks()[s].reshape(E, -1).sum(1), counts[s])
            assert not torch.equal(sp.masks()[s], start[s])
        runs.append({s: sp.masks()[s].clone() for s in STACKS})
    assert all(torch.equal(runs[0][s], runs[1][s]) for s in STACKS)


def test_gmp_prunes_each_expert_to_its_own_count():
    model = _model()
    sp = DynamicSparsifier(model, method="gmp", sparsity=0.75, update_every=1, begin_fraction=0.0,
                           end_fraction=0.5, include=["*.experts.w1_EFD"], total_steps=4)
    assert bool(sp.masks()["moe.experts.w1_EFD"].all())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.attach_optimizer(opt, hook=False)
    for step in range(4):
        _loss(model, step).backward()
        opt.step()
        w, m = model.moe.experts.w1_EFD.detach().clone(), sp.masks()["moe.experts.w1_EFD"].clone()
        sp.step()
        opt.zero_grad()
        if sp.schedule.is_update_step(step + 1):
            target = sp.schedule.sparsity_at(step + 1)
            keep = layer_active_counts({f"s{e}": (F, D) for e in range(E)}, target, "erk") if target else None
            want = torch.stack([m[e] if keep is None else magnitude_prune(w[e], m[e], keep[f"s{e}"])
                                for e in range(E)])
            assert torch.equal(sp.masks()["moe.experts.w1_EFD"], want)
    kept = sp.masks()["moe.experts.w1_EFD"].reshape(E, -1).sum(1)
    assert kept.tolist() == [round(0.25 * F * D)] * E


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad])
def test_weights_gradients_and_optimizer_state_stay_zero_outside_the_masks(opt_cls):
    model = _model()
    sp = _sp(model, update_every=2)
    kw = {"momentum": 0.9, "weight_decay": 1e-3} if opt_cls is torch.optim.SGD else {"weight_decay": 1e-3}
    opt = opt_cls(model.parameters(), lr=0.05, **kw)
    sp.attach_optimizer(opt)
    params = dict(model.named_parameters())
    for step in range(5):
        _loss(model, step).backward()
        for s in STACKS:
            assert not params[s].grad[~sp.masks()[s]].any()
        opt.step()
        opt.zero_grad(set_to_none=False)
        for s, m in sp.masks().items():
            p = params[s]
            assert not p.detach()[~m].any(), (step, s)
            for v in opt.state[p].values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    assert not v[~m].any(), (step, s)


def _run(steps, resume_at=None):
    model = _model()
    sp = _sp(model, update_every=2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp.attach_optimizer(opt)
    for step in range(steps):
        if step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=True)
            model = _model(seed=1)  # other weights and masks: everything comes from the checkpoint
            sp = _sp(model, update_every=2)  # its masks are the initial ones: the saved ones moved since
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            sp.attach_optimizer(opt)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sp.load_state_dict(ckpt["sp"])
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    return model, sp


def test_resume_is_exact():
    m1, sp1 = _run(6)
    m2, sp2 = _run(6, resume_at=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert "moe.experts.w1_EFD_mask" in s1 and s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert sp1.statistics() == sp2.statistics()


def test_a_mask_with_another_count_per_expert_is_refused():
    model = _model()
    sp = _sp(model)
    state = model.state_dict()
    mask = state["moe.experts.w1_EFD_mask"].clone()
    # move one kept position from expert 0 to expert 1: the stack's total stays, the slices do not
    i = int(mask[0].flatten().nonzero()[0])
    j = int((~mask[1].flatten()).nonzero()[0])
    mask[0].view(-1)[i] = False
    mask[1].view(-1)[j] = True
    state["moe.experts.w1_EFD_mask"] = mask
    with pytest.raises(ValueError, match="weights of expert 0"):
        model.load_state_dict(state)
    assert sp.masks()["moe.experts.w1_EFD"].reshape(E, -1).sum(1).tolist()[0] == mask[0].sum() + 1


def test_topkast_refuses_expert_stacks():
    with pytest.raises(ValueError, match="expert stack 'moe.experts.w1_EFD'.*topkast"):
        _sp(_model(), method="topkast")


def test_remove_leaves_a_plain_model():
    model = _model()
    sp = _sp(model)
    before = set(_model().state_dict())
    sp.remove()
    assert set(model.state_dict()) == before
    assert contract.claims(model) == {}
    _loss(model, 0).backward()
    w = model.moe.experts.w1_EFD
    assert bool((w.grad != 0).float().mean() > 0.5)  # no longer masked


def _ranks_worker(rank, world):
    out = {}
    model = _model()
    sp = _sp(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp.attach_optimizer(opt)
    for step in range(2):
        _loss(model, step).backward()  # the same batch on both ranks; the dense gradients are all-reduced
        opt.step()
        opt.zero_grad()
    sp.check_ranks()
    out["masks"] = {k: v.clone() for k, v in sp.masks().items()}
    if rank == 1:  # one expert's mask drifts on one rank
        m = sp.masks()["moe.experts.w2_EDF"]
        i = int(m[2].flatten().nonzero()[0])
        j = int((~m[2].flatten()).nonzero()[0])
        m[2].view(-1)[i], m[2].view(-1)[j] = False, True
    try:
        sp.check_ranks()
    except MaskDivergenceError as err:
        out["divergence"] = str(err)
    dist.barrier()
    return out


def test_rank_check_on_two_ranks():
    """Data-parallel experts (ep_size 1): their masks are compared across the ranks like any layer's
    (expert-parallel stacks: tests/sparsetrain/moe/test_dynamic_expert_parallel.py)."""
    r0, r1 = run_distributed(_ranks_worker, 2, timeout=240)
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    for r in (r0, r1):
        assert "moe.experts.w2_EDF" in r["divergence"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_expert_slices_on_cuda(method):
    """On CUDA the expert slices of one shape are selected together (the grouped path); RigL's masks are the
    per-slice reference's, SET keeps every expert's count, weights stay zero outside the masks."""
    model = _model().cuda()
    sp = _sp(model, method=method)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sp.attach_optimizer(opt, hook=False)
    counts = {s: sp.masks()[s].reshape(E, -1).sum(1) for s in STACKS}
    for step in range(3):
        x, y = (t.cuda() for t in _batch(step))
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        out = torch.func.functional_call(model, params, (x,))
        dense = dict(zip(params, torch.autograd.grad(nn.functional.cross_entropy(out, y), list(params.values()),
                                                     allow_unused=True)))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        before = {s: (dict(model.named_parameters())[s].detach().clone(), sp.masks()[s].clone()) for s in STACKS}
        drop = sp.schedule.drop_fraction_at(step + 1)
        sp.step()
        opt.zero_grad()
        for s in STACKS:
            mask = sp.masks()[s]
            assert mask.is_cuda and torch.equal(mask.reshape(E, -1).sum(1), counts[s])
            assert not dict(model.named_parameters())[s].detach()[~mask].any()
            if method == "rigl":
                w, m = before[s]
                want = torch.stack([rigl_update(w[e], dense[s][e], m[e], floor_count(drop * int(m[e].sum())))
                                    for e in range(E)])
                assert torch.equal(mask, want), (step, s)
