import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.nm import NMConfig, NMSparsifier, masked_weight, mdgf_beta, nm_mask, sdgf_ladder, sdgf_pattern

W = torch.tensor([[0.5, -1.0, 0.25, 2.0, -0.125, 0.75, -3.0, 1.5],
                  [1.0, 0.0, -0.5, 0.25, 4.0, -2.0, 0.5, -0.25]], dtype=torch.float64)
MASK = torch.tensor([[False, True, False, True, False, True, True, False],
                     [True, False, True, False, True, True, False, False]])
C = torch.arange(16, dtype=torch.float64).reshape(2, 8) / 7 - 1


@pytest.mark.parametrize("beta,lam", [(0.0, 0.0), (0.0, 2e-4), (0.0, 0.3), (0.4, 0.0), (0.4, 0.3), (1.0, 0.0)])
def test_masked_weight_forward_and_gradient_formula(beta, lam):
    w = W.clone().requires_grad_()
    out = masked_weight(w, MASK, beta, lam)
    m = MASK.double()
    assert torch.equal(out.detach(), W * (m + (1 - m) * beta))
    (out * C).sum().backward()
    assert torch.allclose(w.grad, C + lam * (1 - m) * W, rtol=0, atol=1e-15)


def test_hard_mask_does_not_leak_inf_or_nan():
    w = torch.tensor([[1.0, float("inf"), float("nan"), 2.0]])
    out = masked_weight(w, torch.tensor([[True, False, False, True]]))
    assert out.tolist() == [[1.0, 0.0, 0.0, 2.0]]


def test_masked_weight_bad_input():
    with pytest.raises(ValueError, match="`mask` must be a bool tensor"):
        masked_weight(W, MASK.double())
    with pytest.raises(ValueError, match="`beta` must be in"):
        masked_weight(W, MASK, beta=1.5)
    with pytest.raises(ValueError, match="`lambda_w` must be >= 0"):
        masked_weight(W, MASK, lambda_w=-1.0)


def _layer_grads(method, step, **kw):
    """Run one parametrized Linear at schedule ``step``; return (dense grad, reference grad, pattern, beta)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 4).double()
    sp = NMSparsifier(layer, NMConfig(method=method, **kw))
    for _ in range(step):
        sp.step()
    x = torch.randn(5, 16, dtype=torch.float64)
    target = torch.randn(5, 4, dtype=torch.float64)
    F.mse_loss(layer(x), target).backward()
    dense = sp.dense_weight("").detach()
    pat, beta = sp.pattern, sp.config.beta(step)
    mask = nm_mask(dense, *pat) if pat else torch.ones_like(dense, dtype=torch.bool)
    # Reference: the effective weight as an explicit leaf, its gradient, plus the SR-STE term by hand.
    w_eff = torch.where(mask, dense, dense * beta).requires_grad_()
    F.mse_loss(F.linear(x, w_eff, layer.bias.detach()), target).backward()
    lam = sp.config.lambda_w
    ref = w_eff.grad + torch.where(mask, 0.0, lam * dense)
    return sp.dense_weight("").grad, ref, pat, beta


@pytest.mark.parametrize("method,step,kw,pattern,beta", [
    ("ste", 0, {}, (2, 4), 0.0),
    ("srste", 0, {}, (2, 4), 0.0),
    ("srste", 0, {"lambda_w": 0.5}, (2, 4), 0.0),
    ("mdgf", 3, {"decay_steps": 12}, (2, 4), 0.75),
    ("mdgf", 3, {"decay_steps": 12, "decay": "exp"}, (2, 4), math.exp(-math.log(1000) / 4)),
    ("mdgf", 12, {"decay_steps": 12}, (2, 4), 0.0),
    ("sdgf", 0, {"decay_steps": 8, "n": 1, "m": 8}, None, 0.0),
    ("sdgf", 2, {"decay_steps": 8, "n": 1, "m": 8}, (7, 8), 0.0),
    ("sdgf", 5, {"decay_steps": 8, "n": 1, "m": 8}, (4, 8), 0.0),
    ("sdgf", 6, {"decay_steps": 8, "n": 1, "m": 8}, (2, 8), 0.0),
    ("sdgf", 8, {"decay_steps": 8, "n": 1, "m": 8}, (1, 8), 0.0),
])
def test_parametrized_layer_gradient_equals_formula(method, step, kw, pattern, beta):
    got, ref, pat, b = _layer_grads(method, step, **kw)
    assert pat == pattern and b == pytest.approx(beta)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_srste_term_is_applied_once_per_step_under_grad_accumulation():
    torch.manual_seed(0)
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)

    def grad(accum):
        torch.manual_seed(1)
        layer = nn.Linear(16, 4).double()
        NMSparsifier(layer, NMConfig(method="srste", lambda_w=0.5, grad_accumulation=accum))
        for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
            (F.mse_loss(layer(xb), yb) / accum).backward()
        return layer.parametrizations.weight.original.grad

    assert torch.allclose(grad(2), grad(1), rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad(4), grad(1), rtol=1e-12, atol=1e-14)


def test_grad_scaler_scales_the_srste_term():
    layer = nn.Linear(8, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sp = NMSparsifier(layer, NMConfig(method="srste", grad_accumulation=2), grad_scaler=scaler)
    assert layer.parametrizations.weight[0].lambda_w == pytest.approx(2e-4 / 2 * 1024)
    scaler.scale(layer(torch.randn(2, 8)).sum()).backward()
    scaler.update(512.0)
    sp.step()
    assert layer.parametrizations.weight[0].lambda_w == pytest.approx(2e-4 / 2 * 512)


def test_mdgf_beta_schedules():
    assert mdgf_beta(0, 100) == 1.0
    assert mdgf_beta(25, 100) == pytest.approx(0.75)
    assert mdgf_beta(100, 100) == 0.0 and mdgf_beta(150, 100) == 0.0
    assert mdgf_beta(0, 100, "exp") == 1.0
    assert mdgf_beta(50, 100, "exp") == pytest.approx(1000 ** -0.5)
    assert mdgf_beta(99, 100, "exp") == pytest.approx(1000 ** -0.99)
    assert mdgf_beta(100, 100, "exp") == 0.0
    betas = [mdgf_beta(t, 40, "exp") for t in range(41)]
    assert all(a > b for a, b in zip(betas, betas[1:]))
    with pytest.raises(ValueError, match="`decay` must be"):
        mdgf_beta(0, 10, "cosine")
    with pytest.raises(ValueError, match="`decay_steps` must be >= 1"):
        mdgf_beta(0, 0)


@pytest.mark.parametrize("n,m,ladder", [(1, 8, [(7, 8), (4, 8), (2, 8)]), (2, 4, [(3, 4)]), (1, 2, []),
                                        (4, 8, [(7, 8)]), (2, 8, [(7, 8), (4, 8)]), (1, 16, [(15, 16), (8, 16),
                                                                                          (4, 16), (2, 16)])])
def test_sdgf_ladder(n, m, ladder):
    assert sdgf_ladder(n, m) == ladder


def test_sdgf_pattern_stages():
    ladder = [(7, 8), (4, 8), (2, 8)]
    pats = [sdgf_pattern(t, (1, 8), ladder, 8) for t in range(10)]
    assert pats == [None, None, (7, 8), (7, 8), (4, 8), (4, 8), (2, 8), (2, 8), (1, 8), (1, 8)]


@pytest.mark.parametrize("kw,match", [
    ({"method": "rigl"}, "`method` must be one of"),
    ({"n": 4, "m": 4}, "`n` must be < `m`"),
    ({"n": 0}, "`n` must be an integer >= 1"),
    ({"m": 0}, "`m` must be an integer >= 1"),
    ({"method": "mdgf"}, "`decay_steps` must be an integer >= 1 for method 'mdgf'"),
    ({"method": "sdgf", "decay_steps": 0}, "`decay_steps` must be an integer >= 1"),
    ({"method": "srste", "decay_steps": 10}, "`decay_steps` applies to 'mdgf' and 'sdgf' only"),
    ({"lambda_w": -1.0}, "`lambda_w` must be a finite number >= 0"),
    ({"update_every": -1}, "`update_every` must be an integer >= 0"),
    ({"grad_accumulation": 0}, "`grad_accumulation` must be an integer >= 1"),
    ({"decay": "cos"}, "`decay` must be 'linear' or 'exp'"),
    ({"method": "sdgf", "decay_steps": 4, "stages": [(1, 8)], "n": 2, "m": 8}, "`stages` must be denser"),
    ({"method": "ste", "stages": [(3, 4)]}, "`stages` applies to 'sdgf' only"),
])
def test_config_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        NMConfig(**kw)


def test_lambda_defaults():
    assert NMConfig(method="srste").lambda_w == 2e-4
    assert NMConfig(method="ste").lambda_w == 0.0
    assert NMConfig(method="mdgf", decay_steps=3).lambda_w == NMConfig(method="sdgf", decay_steps=3).lambda_w == 2e-4
    assert NMConfig(method="sdgf", decay_steps=3, stages=[(7, 8), (2, 8)], n=1, m=8).ms == [8]
    assert NMConfig(method="sdgf", decay_steps=3, stages=[(8, 16)], n=1, m=8).ms == [8, 16]
