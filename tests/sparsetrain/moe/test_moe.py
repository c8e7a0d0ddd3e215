"""Router and layer against straightforward references (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.moe import MoE, RouterConfig, TopKRouter, capacity, moe_losses
from sparsetrain.moe.experts import _grouped_mm, _loop_mm


def _expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    h = x_D @ ex.w1_EFD[e].t()
    if ex.b1_EF is not None:
        h = h + ex.b1_EF[e]
    h = F.silu(h) * (x_D @ ex.w3_EFD[e].t()) if ex.w3_EFD is not None else F.gelu(h)
    y = h @ ex.w2_EDF[e].t()
    return y + ex.b2_ED[e] if ex.b2_ED is not None else y


def _reference(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and experts, routing recomputed the plain way (dense softmax, sort, capacity loop)."""
    cfg = layer.config
    logits = x_TD @ layer.router.weight_ED.t()
    probs = torch.softmax(logits, -1)
    out = torch.zeros_like(x_TD)
    T = x_TD.shape[0]
    factor = cfg.capacity_factor if layer.training else cfg.eval_capacity_factor
    cap = math.inf if cfg.dropless else capacity(T, cfg.num_experts, cfg.k, factor, cfg.min_capacity)
    choices = []
    for t in range(T):
        idx = sorted(range(cfg.num_experts), key=lambda e: (-float(probs[t, e].detach()), e))[: cfg.k]
        p = probs[t, idx]
        g = p / p.sum() if cfg.renormalize else p
        choices.append((idx, g))
    used = [0] * cfg.num_experts
    kept = [[False] * cfg.k for _ in range(T)]
    for j in range(cfg.k):  # first choices have priority, then token order
        for t in range(T):
            e = choices[t][0][j]
            if used[e] < cap:
                used[e] += 1
                kept[t][j] = True
    for t in range(T):
        for j, e in enumerate(choices[t][0]):
            if kept[t][j]:
                out[t] = out[t] + choices[t][1][j] * _expert(layer, e, x_TD[t])
    return out


def _layer(E=4, k=2, activation="swiglu", bias=False, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    return MoE(16, 24, E, k, activation=activation, bias=bias, **kw).double()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dropless,capacity_factor", [(True, 1.0), (False, 1.0), (False, 0.5)])
def test_layer_equals_loop_over_experts(activation, k, dropless, capacity_factor):
    layer = _layer(E=5, k=k, activation=activation, bias=activation == "gelu", dropless=dropless,
                   capacity_factor=capacity_factor, min_capacity=1)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    y_ref = _reference(layer, x2.view(-1, 16)).view(3, 7, 16)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x1, *layer.parameters()])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x2, *layer.parameters()], allow_unused=True)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, msg=lambda m, name=name: f"{name}: {m}")


def test_expert_receiving_no_tokens():
    layer = _layer(E=6, k=1, dropless=True)
    with torch.no_grad():  # everything to expert 2
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[2] = 5.0
    x = torch.rand(9, 16, dtype=torch.float64) + 0.1
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    torch.testing.assert_close(y, _reference(layer, x))
    y.sum().backward()
    assert layer.experts.w1_EFD.grad[[0, 1, 3, 4, 5]].abs().sum() == 0
    assert layer.experts.w1_EFD.grad[2].abs().sum() > 0
    assert layer.statistics()["moe/load_e2"] == 1.0


def test_topk_softmax_gates_sum_to_one_over_kept():
    router = TopKRouter(8, num_experts=6, k=3, score_order="topk_softmax", dropless=True).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    out = router(x)
    logits = x @ router.weight_ED.t()
    top = logits.topk(3, dim=-1)
    assert torch.equal(out.indices_TK, top.indices)
    torch.testing.assert_close(out.gates_TK, torch.softmax(top.values, -1))


def test_softmax_topk_without_renormalize_keeps_probabilities():
    router = TopKRouter(8, num_experts=6, k=2, renormalize=False, dropless=True).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    out = router(x)
    probs = torch.softmax(x @ router.weight_ED.t(), -1)
    torch.testing.assert_close(out.gates_TK, probs.gather(1, out.indices_TK))


def test_top1_gate_is_the_probability_by_default_so_the_router_learns():
    layer = _layer(E=4, k=1, dropless=True)
    assert layer.config.renormalize is False and _layer(E=4, k=2).config.renormalize is True
    x = torch.randn(12, 16, dtype=torch.float64)
    layer(x).sum().backward()  # no auxiliary loss in this gradient
    assert layer.router.weight_ED.grad.abs().sum() > 0
    r = layer.router(x)
    torch.testing.assert_close(r.gates_TK, r.probs_TE.gather(1, r.indices_TK))


def test_router_logits_are_fp32():
    router = TopKRouter(8, num_experts=4, k=2).to(torch.bfloat16)
    assert router.selection_bias_E.dtype == torch.float32  # kept fp32 under .to(bfloat16)
    out = router(torch.randn(10, 8, dtype=torch.bfloat16))
    assert out.probs_TE.dtype == torch.float32 and out.gates_TK.dtype == torch.float32


def test_under_autocast_router_stays_fp32_and_output_keeps_input_dtype():
    torch.manual_seed(0)
    layer = MoE(16, 24, 4, 2, dropless=True)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x)
        y = layer(x)
    assert r.probs_TE.dtype == torch.float32
    torch.testing.assert_close(r.probs_TE, layer.router(x).probs_TE)  # same fp32 result as without autocast
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x), atol=5e-2, rtol=5e-2)


def test_eval_routing_is_deterministic_and_jitter_only_in_training():
    layer = _layer(E=4, k=2, jitter_eps=0.2, dropless=True)
    x = torch.randn(64, 16, dtype=torch.float64)
    layer.eval()
    torch.manual_seed(0)
    first = layer.router(x)
    for seed in range(1, 4):
        torch.manual_seed(seed)
        again = layer.router(x)
        assert torch.equal(again.indices_TK, first.indices_TK) and torch.equal(again.gates_TK, first.gates_TK)
    layer.train()
    routes = {tuple(layer.router(x).indices_TK.reshape(-1).tolist()) for _ in range(4)}
    assert len(routes) > 1  # the noise is on in training


def test_aux_and_z_loss_by_hand():
    router = TopKRouter(4, num_experts=3, k=1, aux_loss_coef=0.5, z_loss_coef=0.25, dropless=True).double()
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    out = router(x)
    # logits rows: (2,0,0), (0,2,0), (3,0,0), (0,0,0) -> choices 0, 1, 0, 0 (tie: lowest index)
    assert out.indices_TK.reshape(-1).tolist() == [0, 1, 0, 0]
    e2, e3 = math.exp(2), math.exp(3)
    p = [[e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], [1 / (e2 + 2), e2 / (e2 + 2), 1 / (e2 + 2)],
         [e3 / (e3 + 2), 1 / (e3 + 2), 1 / (e3 + 2)], [1 / 3, 1 / 3, 1 / 3]]
    P = [sum(row[i] for row in p) / 4 for i in range(3)]
    f = [3 / 4, 1 / 4, 0]
    aux = 0.5 * 3 * sum(fi * Pi for fi, Pi in zip(f, P))
    lse = [math.log(e2 + 2), math.log(e2 + 2), math.log(e3 + 2), math.log(3)]
    z = 0.25 * sum(v * v for v in lse) / 4
    assert out.aux_loss.item() == pytest.approx(aux, rel=1e-12)
    assert out.z_loss.item() == pytest.approx(z, rel=1e-12)


def test_aux_loss_is_alpha_at_perfect_balance():
    router = TopKRouter(2, num_experts=2, k=1, aux_loss_coef=0.01, dropless=True).double()
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert router(x).aux_loss.item() == pytest.approx(0.01)


def test_aux_f_uses_pre_capacity_assignments():
    # every token to expert 0, capacity 1: f is still (1, 0), not the kept share
    router = TopKRouter(2, num_experts=2, k=1, capacity_factor=0.25, min_capacity=1).double()
    with torch.no_grad():
        router.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.ones(4, 2, dtype=torch.float64)
    out = router(x)
    assert out.kept_TK.sum() == 1
    p0 = math.e / (math.e + 1)
    assert out.aux_loss.item() == pytest.approx(0.01 * 2 * (1.0 * p0), rel=1e-12)


def test_capacity_and_drop_counting():
    layer = _layer(E=2, k=1, capacity_factor=1.0, min_capacity=0)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 1.0
    x = torch.zeros(8, 16, dtype=torch.float64)
    x[:, 0] = 1.0  # all 8 tokens prefer expert 0; capacity = ceil(1 * 8 / 2) = 4
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    s = layer.statistics()
    assert s["moe/drop_rate"] == 0.5 and s["moe/token_drop_rate"] == 0.5
    assert s["moe/load_e0"] == 1.0 and s["moe/imbalance"] == 2.0
    assert torch.all(y[4:] == 0) and torch.all(y[:4].abs().sum(-1) > 0)  # the first 4 tokens are kept
    layer.eval()  # eval factor 2.0: capacity 8, nothing dropped
    layer(x)
    assert layer.statistics()["moe/drop_rate"] == 0.0


def test_second_choices_dropped_before_first_choices():
    router = TopKRouter(2, num_experts=2, k=2, capacity_factor=0.5, min_capacity=0).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    out = router(x)  # capacity = ceil(0.5 * 2 * 8 / 2) = 4 per expert, 8 slots for 16 assignments
    first = out.indices_TK[:, 0]
    for e in range(2):
        n_first = int((first == e).sum())
        kept_first = int((out.kept_TK[:, 0] & (first == e)).sum())
        assert kept_first == min(n_first, 4)
    assert int(out.kept_TK.sum()) == 8


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_never_drops(k):
    layer = _layer(E=4, k=k, dropless=True, capacity_factor=0.01, min_capacity=0)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[:, 0] = torch.tensor([4.0, 3.0, 0.0, 0.0])
    layer(torch.rand(50, 16, dtype=torch.float64))
    assert layer.statistics()["moe/drop_rate"] == 0.0


def test_selection_bias_changes_selection_not_gates():
    router = TopKRouter(4, num_experts=3, k=1, bias_update_rate=1e-3, dropless=True, renormalize=True).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    before = router(x)
    with torch.no_grad():
        router.selection_bias_E.copy_(torch.tensor([10.0, 0.0, 0.0]))
    after = router(x)
    assert torch.all(after.indices_TK == 0)
    torch.testing.assert_close(after.gates_TK, torch.ones_like(after.gates_TK))  # renormalised, k=1
    torch.testing.assert_close(after.probs_TE, before.probs_TE)  # losses see unbiased probabilities


def test_bias_update_moves_toward_balance():
    router = TopKRouter(4, num_experts=3, k=1, bias_update_rate=0.1, dropless=True).double()
    with torch.no_grad():
        router.weight_ED.zero_()
        router.weight_ED[0, 0] = 1.0
    x = torch.zeros(6, 4, dtype=torch.float64)
    x[:, 0] = 1.0
    router(x)
    router(x)  # two micro-batches, one update
    router.update_bias()
    torch.testing.assert_close(router.selection_bias_E.float(), torch.tensor([-0.1, 0.1, 0.1]))
    assert router.pending_load_E.sum() == 0
    router.eval()
    router(x)  # eval forward does not count
    assert router.pending_load_E.sum() == 0


def test_loop_and_grouped_mm_agree_on_cpu():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    x = torch.randn(10, 8)
    w = torch.randn(3, 8, 4)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    try:
        ref = torch._grouped_mm(x, w, offs=offs)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"no CPU grouped_mm here: {err}")
    torch.testing.assert_close(_loop_mm(x, w, offs), ref)
    torch.testing.assert_close(_grouped_mm(x, w, offs), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [{"dropless": True}, {"capacity_factor": 0.5}])
def test_grouped_kernel_matches_loop_in_bf16_on_gpu_without_host_sync(monkeypatch, kw):
    from sparsetrain.moe import experts as experts_mod

    torch.manual_seed(0)
    layer = MoE(64, 128, 8, 2, **kw).cuda().to(torch.bfloat16)
    with torch.no_grad():
        layer.router.weight_ED[5:] = -10.0  # experts 5-7 get no token: empty groups in the grouped GEMM
    # positive inputs: the rows of -10 give experts 5-7 scores far below the others' for every token
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16).abs()
    assert experts_mod._use_grouped_kernel(x, layer.experts.w1_EFD.transpose(-2, -1))

    def run():
        xg = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = layer(xg)
        y.float().square().sum().backward()
        return y.float(), xg.grad.float(), layer.experts.w1_EFD.grad.float()

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(experts_mod, "_use_grouped_kernel", lambda *a: False)  # the loop, same routing
    want = run()
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert got[2][5:].abs().sum() == 0


def test_losses_collected_and_differentiable():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoE(16, 24, 4, 2), torch.nn.Linear(16, 16), MoE(16, 24, 4, 1))
    assert moe_losses(model).item() == 0.0
    model(torch.randn(10, 16))
    a, b = model[0], model[2]
    torch.testing.assert_close(moe_losses(model), a.aux_loss + a.z_loss + b.aux_loss + b.z_loss)
    moe_losses(model).backward()
    assert a.router.weight_ED.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,arg",
    [({"k": 5}, "`k`"), ({"k": 0}, "`k`"), ({"capacity_factor": 0.0}, "capacity_factor"),
     ({"capacity_factor": -1.0}, "capacity_factor"), ({"eval_capacity_factor": 0}, "eval_capacity_factor"),
     ({"min_capacity": -1}, "min_capacity"), ({"score_order": "x"}, "score_order"),
     ({"jitter_eps": 1.5}, "jitter_eps"), ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
     ({"activation": "relu"}, "activation"), ({"num_experts": 0, "k": 1}, "num_experts")],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    args = {"d_model": 16, "d_hidden": 24, "num_experts": 4, "k": 2, **kwargs}
    with pytest.raises(ValueError, match=arg):
        MoE(**args)


def test_d_model_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="d_model"):
        _layer()(torch.randn(3, 15, dtype=torch.float64))


def test_router_config_mismatch():
    with pytest.raises(ValueError, match="num_experts"):
        MoE(16, 24, 4, 2, router=RouterConfig(num_experts=3, k=2))

