"""Top-KAST (``DynamicSparsifier(method="topkast")``) against a straightforward reference.

- the sets: a sort of ``|theta|`` by hand (equal magnitudes: the lower flat index first);
- the penalty and its gradient: element by element from the definition;
- training: a plain reference loop that keeps ``theta`` itself, runs the forward with
  ``where(A, theta, 0)``, keeps the gradient on ``B``, adds the penalty and applies SGD with
  momentum on ``B``, re-choosing the sets every ``update_every`` steps; the sparsifier must give the
  same parameters, ``theta`` and sets bit for bit;
- validation of the config fields, state checks, ``grad_masking="step"`` equal to ``"hook"``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetrain import contract
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig, TopKastSparsifier
from sparsetrain.sparsity.topkast import (
    BACKWARD_MASK_NAME,
    DENSE_NAME,
    exploration_penalty,
    exploration_penalty_grad,
    topkast_sets,
)

LR, MOMENTUM, PENALTY, EVERY, STEPS = 0.1, 0.9, 1e-2, 3, 14


def _reference_sets(theta: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = theta.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    fwd = torch.zeros(len(flat), dtype=torch.bool)
    bwd = torch.zeros(len(flat), dtype=torch.bool)
    fwd[order[:a]] = True
    bwd[order[:b]] = True
    return fwd.reshape(theta.shape), bwd.reshape(theta.shape)


def test_sets_are_the_top_magnitudes_ties_by_index():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(12, 10, generator=g)
    theta[0, :6] = 0.5  # ties
    theta[3, 2] = -0.5
    for a, b in [(0, 0), (7, 30), (30, 30), (60, 120), (1, 119)]:
        fwd, bwd = topkast_sets(theta, a, b)
        ref_fwd, ref_bwd = _reference_sets(theta, a, b)
        assert torch.equal(fwd, ref_fwd) and torch.equal(bwd, ref_bwd), (a, b)
        assert not (fwd & ~bwd).any()
    with pytest.raises(ValueError, match="forward_count <= backward_count"):
        topkast_sets(theta, 10, 5)


def test_penalty_and_its_gradient_follow_the_definition():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64)
    fwd, bwd = _reference_sets(w, 8, 20)
    w = torch.where(bwd, w, 0.0)
    scale, density = 0.3, 8 / 42
    value = sum(0.5 * scale * (x * x if f else x * x / density)
                for x, f, b in zip(w.reshape(-1).tolist(), fwd.reshape(-1).tolist(), bwd.reshape(-1).tolist()) if b)
    assert math.isclose(float(exploration_penalty(w, fwd, bwd, scale, density)), value, rel_tol=1e-12)
    grad = exploration_penalty_grad(w, fwd, bwd, scale, density)
    for x, gx, f, b in zip(w.reshape(-1).tolist(), grad.reshape(-1).tolist(), fwd.reshape(-1).tolist(),
                           bwd.reshape(-1).tolist()):
        expected = scale * x if f else (scale * x / density if b else 0.0)
        assert math.isclose(gx, expected, rel_tol=1e-12, abs_tol=1e-300)
    # the gradient is the derivative of the value (autograd on the penalty as a function of w)
    wr = w.clone().requires_grad_(True)
    exploration_penalty(wr, fwd, bwd, scale, density).backward()
    torch.testing.assert_close(wr.grad, grad)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))


def _batch(t: int):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)


def _reference(steps: int, sparsity: float, extra: float) -> list[dict[str, torch.Tensor]]:
    """Top-KAST written out: uniform densities, SGD with momentum, sets re-chosen every EVERY steps."""
    model = _model()
    layers = [0, 2]
    theta = {i: model[i].weight.detach().clone() for i in layers}
    bias = {i: model[i].bias.detach().clone() for i in layers}
    counts = {}
    for i in layers:
        n = theta[i].numel()
        a = math.floor((1 - sparsity) * n + 1e-9)
        counts[i] = (a, min(n, a + math.floor(extra * n + 1e-9)))
    sets = {i: _reference_sets(theta[i], *counts[i]) for i in layers}
    buf_w = {i: None for i in layers}
    buf_b = {i: None for i in layers}
    out = []
    end_step = round(0.75 * steps)
    for t in range(steps):
        alpha = {i: torch.where(sets[i][0], theta[i], 0.0).requires_grad_(True) for i in layers}
        b_leaf = {i: bias[i].clone().requires_grad_(True) for i in layers}
        x, y = _batch(t)
        h = torch.tanh(nn.functional.linear(x, alpha[0], b_leaf[0]))
        loss = nn.functional.mse_loss(nn.functional.linear(h, alpha[2], b_leaf[2]), y)
        loss.backward()
        for i in layers:
            fwd, bwd = sets[i]
            density = counts[i][0] / theta[i].numel()
            g = torch.where(bwd, alpha[i].grad, 0.0)
            g = g + torch.where(bwd, PENALTY * torch.where(fwd, theta[i], theta[i] / density), 0.0)
            # torch's SGD: buf = buf * momentum + g; p = p + (-lr) * buf
            buf_w[i] = g.clone() if buf_w[i] is None else buf_w[i].mul(MOMENTUM).add(g)
            theta[i] = torch.where(bwd, theta[i].add(buf_w[i], alpha=-LR), theta[i])
            gb = b_leaf[i].grad
            buf_b[i] = gb.clone() if buf_b[i] is None else buf_b[i].mul(MOMENTUM).add(gb)
            bias[i] = bias[i].add(buf_b[i], alpha=-LR)
        step = t + 1
        if step % EVERY == 0 and step < end_step:
            for i in layers:
                sets[i] = _reference_sets(theta[i], *counts[i])
                buf_w[i] = torch.where(sets[i][1], buf_w[i], 0.0)  # states leave with B
        out.append({f"{i}.theta": theta[i].clone() for i in layers}
                   | {f"{i}.A": sets[i][0].clone() for i in layers} | {f"{i}.B": sets[i][1].clone() for i in layers}
                   | {f"{i}.bias": bias[i].clone() for i in layers})
    return out


def _sparsifier_run(steps: int, sparsity: float, extra: float, grad_masking: str = "hook"):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sp = DynamicSparsifier(model, method="topkast", sparsity=sparsity, backward_extra=extra, distribution="uniform",
                           exploration_penalty=PENALTY, update_every=EVERY, total_steps=steps, optimizer=opt,
                           grad_masking=grad_masking)
    out = []
    for t in range(steps):
        x, y = _batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        snap = {}
        for i in (0, 2):
            m = model[i]
            snap |= {f"{i}.theta": m._buffers[DENSE_NAME].clone(), f"{i}.A": m.weight_mask.clone(),
                     f"{i}.B": m._buffers[BACKWARD_MASK_NAME].clone(), f"{i}.bias": m.bias.detach().clone(),
                     f"{i}.weight": m.weight.detach().clone()}
        out.append(snap)
    return sp, out


@pytest.mark.parametrize("sparsity,extra", [(0.8, 0.1), (0.5, 0.3)])
def test_training_equals_the_reference_loop(sparsity, extra):
    ref = _reference(STEPS, sparsity, extra)
    sp, got = _sparsifier_run(STEPS, sparsity, extra)
    assert isinstance(sp, TopKastSparsifier)
    assert sp.update_count >= 2 and sp.statistics()["sparsity/regrown_total"] > 0  # the sets did change
    for t, (r, s) in enumerate(zip(ref, got)):
        for i in (0, 2):
            assert torch.equal(r[f"{i}.A"], s[f"{i}.A"]) and torch.equal(r[f"{i}.B"], s[f"{i}.B"]), (t, i)
            torch.testing.assert_close(s[f"{i}.theta"], r[f"{i}.theta"], rtol=0, atol=0, msg=f"theta {t} {i}")
            torch.testing.assert_close(s[f"{i}.bias"], r[f"{i}.bias"], rtol=0, atol=0)
            # the parameter is the forward weight alpha = where(A, theta, 0)
            assert torch.equal(s[f"{i}.weight"], torch.where(s[f"{i}.A"], s[f"{i}.theta"], 0.0))


def test_weights_outside_the_backward_set_never_change():
    _, got = _sparsifier_run(STEPS, 0.8, 0.1)
    for before, after in zip(got, got[1:]):
        for i in (0, 2):
            outside = ~before[f"{i}.B"]
            assert torch.equal(before[f"{i}.theta"][outside], after[f"{i}.theta"][outside])


def test_grad_masking_step_equals_hook():
    _, hook = _sparsifier_run(STEPS, 0.8, 0.1, "hook")
    _, step = _sparsifier_run(STEPS, 0.8, 0.1, "step")
    for a, b in zip(hook, step):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_gradient_masks_are_the_backward_set_and_versioned():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sp = DynamicSparsifier(model, method="topkast", sparsity=0.8, backward_extra=0.2, update_every=1,
                           total_steps=10, optimizer=opt)
    version, masks = contract.gradient_masks(model)
    assert set(masks) == set(sp.masks()) == {"0.weight", "2.weight"}
    for name, b in masks.items():
        assert b is sp.gradient_masks()[name]
        assert int(b.sum()) > int(sp.masks()[name].sum())
    versions = {version}
    for t in range(4):
        x, y = _batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        for name, p in model.named_parameters():  # the gradient is zero outside B, not outside A
            if name in masks:
                assert not p.grad[~masks[name]].any()
        opt.step()
        opt.zero_grad()
        versions.add(contract.gradient_masks(model)[0])
    assert len(versions) > 1  # the sets moved, and the version with them


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(backward_extra="x"), TypeError, r"`backward_extra` must be a finite number, got 'x'"),
    (dict(backward_extra=1.5), ValueError, r"`backward_extra` must be in \[0, 1\].*got 1.5"),
    (dict(exploration_penalty=-1.0), ValueError, r"`exploration_penalty` must be >= 0.*got -1.0"),
    (dict(exploration_penalty=float("nan")), TypeError, r"`exploration_penalty` must be a finite number"),
    (dict(backward_extra=0.0), ValueError, r"needs `backward_extra` > 0"),
    (dict(sparsity=0.0, backward_extra=0.0), ValueError, r"needs `sparsity` > 0"),
    (dict(sparsity=0.2, backward_extra=0.9), ValueError, r"D \+ M = 1\.7 > 1; use backward_extra <= 0\.2"),
])
def test_config_fields_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        DynamicSparsityConfig(method="topkast", **kwargs)


def test_other_methods_ignore_the_fields_but_check_their_type():
    DynamicSparsityConfig(method="rigl", backward_extra=0.0)  # M = 0 is fine where it is unused
    with pytest.raises(TypeError, match="backward_extra"):
        DynamicSparsityConfig(method="rigl", backward_extra=None)


def test_needs_its_optimizer_and_one_only():
    model = _model()
    sp = DynamicSparsifier(model, method="topkast", sparsity=0.8, total_steps=5)
    with pytest.raises(RuntimeError, match="needs its optimizer attached"):
        sp.step()
    sp.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="one optimizer"):
        sp.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="state maskers"):
        sp.add_state_masker(lambda pairs: None)
    with pytest.raises(ValueError, match="method='topkast'"):
        TopKastSparsifier(_model(), method="rigl")


def _saved_after(steps: int):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sp = DynamicSparsifier(model, method="topkast", sparsity=0.8, backward_extra=0.1, update_every=EVERY,
                           total_steps=STEPS, optimizer=opt)
    for t in range(steps):
        x, y = _batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, sp


def test_bad_states_are_refused_naming_the_entry():
    model, _, sp = _saved_after(4)
    state = sp.state_dict()
    assert state["topkast"]["version"] == 1
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    other, _, osp = _saved_after(0)
    bad = dict(model_state)
    bad["0.weight_backward_mask"] = torch.zeros_like(bad["0.weight_backward_mask"])
    with pytest.raises(ValueError, match=r"`0.weight_backward_mask` keeps 0 weights"):
        other.load_state_dict(bad)
    bad = dict(model_state)
    bad["2.weight_dense"] = bad["2.weight_dense"].clone()
    bad["2.weight_dense"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`2.weight_dense` holds NaN or inf"):
        other.load_state_dict(bad)
    bad = dict(model_state)
    bad["2.weight_dense"] = bad["2.weight_dense"].double()
    with pytest.raises(ValueError, match=r"`2.weight_dense` must be a torch.float32 tensor"):
        other.load_state_dict(bad)
    bad = dict(model_state)  # a B that misses part of A
    a, b = bad["0.weight_mask"], bad["0.weight_backward_mask"].clone()
    first_a = int(a.reshape(-1).nonzero()[0])
    first_out = int((~b).reshape(-1).nonzero()[0])
    b.view(-1)[first_a], b.view(-1)[first_out] = False, True
    bad["0.weight_backward_mask"] = b
    with pytest.raises(ValueError, match="does not contain the forward set"):
        other.load_state_dict(bad)
    for key, value, match in [("version", 2, "version must be 1"), ("penalty", -1.0, "penalty"),
                              ("set_changes", {"forward": -1, "backward": 0}, "set_changes"),
                              ("backward_counts", {}, "backward_counts")]:
        broken = {**state, "topkast": {**state["topkast"], key: value}}
        with pytest.raises(ValueError, match=match):
            osp.load_state_dict(broken)
    with pytest.raises(ValueError, match="no 'topkast' entry"):
        osp.load_state_dict({k: v for k, v in state.items() if k != "topkast"})


def test_remove_keeps_the_forward_weights():
    model, _, sp = _saved_after(5)
    alpha = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp.remove()
    assert set(model.state_dict()) == set(_model().state_dict())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), alpha[n])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_chooses_its_sets_as_the_reference():
    """The same training on CUDA: before the first set update within float rounding of the CPU run; at
    every update the sets are the reference sets of the CUDA run's own ``theta`` (same ranking rule)."""
    _, cpu = _sparsifier_run(STEPS, 0.8, 0.1)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sp = DynamicSparsifier(model, method="topkast", sparsity=0.8, backward_extra=0.1, distribution="uniform",
                           exploration_penalty=PENALTY, update_every=EVERY, total_steps=STEPS, optimizer=opt)
    counts = {i: (int(model[i].weight_mask.sum()), int(model[i]._buffers[BACKWARD_MASK_NAME].sum())) for i in (0, 2)}
    for t in range(STEPS):
        x, y = _batch(t)
        nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
        opt.step()
        opt.zero_grad()
        for i in (0, 2):
            m = model[i]
            theta = m._buffers[DENSE_NAME].cpu()
            if t + 1 < EVERY:
                torch.testing.assert_close(theta, cpu[t][f"{i}.theta"], rtol=1e-4, atol=1e-5)
            if (t + 1) % EVERY == 0 and t + 1 < round(0.75 * STEPS):
                fwd, bwd = _reference_sets(theta, *counts[i])
                assert torch.equal(m.weight_mask.cpu(), fwd) and torch.equal(m._buffers[BACKWARD_MASK_NAME].cpu(), bwd)
            assert not m.weight.detach()[~m.weight_mask].any()
    assert sp.update_count >= 2


def test_other_methods_do_not_check_the_topkast_fields_on_load():
    model = _model()
    state = DynamicSparsifier(model, method="set", sparsity=0.5, total_steps=5, backward_extra=0.3).state_dict()
    DynamicSparsifier(_model(), method="set", sparsity=0.5, total_steps=5, backward_extra=0.1).load_state_dict(state)
    _, _, topkast = _saved_after(0)
    saved = topkast.state_dict()
    model2 = _model()
    other = DynamicSparsifier(model2, method="topkast", sparsity=0.8, backward_extra=0.1, update_every=EVERY,
                              total_steps=STEPS, exploration_penalty=0.5,
                              optimizer=torch.optim.SGD(model2.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="exploration_penalty"):
        other.load_state_dict(saved)
