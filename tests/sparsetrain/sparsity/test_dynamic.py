import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sparsetrain import contract
from sparsetrain.demo import MLPClassifier
from sparsetrain.sparsity import (
    MASK_NAME,
    ZERO_PRESERVING_OPTIMIZERS,
    DynamicSparsifier,
    DynamicSparsityConfig,
    layer_active_counts,
    rigl_update,
)


def _layer_masks(sp):
    """Module name -> mask (``masks()`` is keyed by parameter name)."""
    return {name.rpartition(".")[0]: mask for name, mask in sp.masks().items()}


def _model(seed=0):
    torch.manual_seed(seed)
    return MLPClassifier(in_features=16, hidden=32, n_classes=4)


def _batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def _optimizer(model, name):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _train_step(model, opt, step):
    x, y = _batch(step)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _weights(model, sp):
    mods = dict(model.named_modules())
    return {name: mods[name].weight for name in sp.layer_names}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("method", ["rigl", "set", "gmp", "static"])
def test_invariants_after_every_step(method, distribution, optimizer):
    _check_invariants(method, distribution, optimizer, enforce_interval=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["rigl", "gmp"])
def test_invariants_hold_between_sparse_enforcements_for_elementwise_optimizers(method, optimizer):
    # Gradients are masked before the optimizer sees them, so SGD/AdamW keep zeros at zero on their own.
    _check_invariants(method, "erk", optimizer, enforce_interval=5)


def _check_invariants(method, distribution, optimizer, enforce_interval):
    model = _model()
    opt = _optimizer(model, optimizer)
    cfg = DynamicSparsityConfig(method=method, sparsity=0.8, distribution=distribution, update_every=2,
                                drop_fraction=0.5, enforce_interval=enforce_interval)
    sp = DynamicSparsifier(model, cfg, total_steps=16, optimizer=opt)
    shapes = {n: tuple(w.shape) for n, w in _weights(model, sp).items()}
    final_counts = layer_active_counts(shapes, 0.8, distribution)
    n_updates, n_regrown = 0, 0
    for step in range(16):
        before = {n: m.clone() for n, m in _layer_masks(sp).items()}
        updates_before = sp.update_count
        _train_step(model, opt, step)
        stats = sp.statistics() if sp.update_count != updates_before else None
        n_updates += stats is not None
        x, _ = _batch(99)
        masked = {f"{n}.weight": torch.where(_layer_masks(sp)[n], w, 0) for n, w in _weights(model, sp).items()}
        assert torch.equal(model(x), functional_call(model, masked, (x,)))  # the forward sees masked weights
        for name, w in _weights(model, sp).items():
            mask = _layer_masks(sp)[name]
            # exact per-layer sparsity
            if method == "gmp":
                target = sp.schedule.sparsity_at(step + 1) if sp.schedule.is_update_step(step + 1) else None
                if target is not None:
                    assert int(mask.sum()) == layer_active_counts(shapes, target, distribution)[name]
            else:
                assert int(mask.sum()) == final_counts[name]
            # weights and every same-shape optimizer state are zero outside the mask
            assert not bool(w[~mask].any())
            states = [v for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape]
            assert len(states) == (2 if optimizer == "adamw" else 1)
            for v in states:
                assert not bool(v[~mask].any())
            # newly grown connections start at zero, with zero optimizer state
            grown = mask & ~before[name]
            n_regrown += int(grown.sum())
            assert not bool(w[grown].any())
            assert all(not bool(v[grown].any()) for v in states)
    if method in ("rigl", "set"):
        assert n_updates == len(sp.schedule.update_steps()) == 5 and n_regrown > 0
        assert stats is None and sp.statistics()["sparsity/itop_rate"] > 0.2 + 1e-3  # some weights moved
    if method == "gmp":
        assert sp.statistics()["sparsity/global"] == pytest.approx(0.8, abs=1e-3)
        assert sp.statistics()["sparsity/regrown"] == 0
    if method == "static":
        assert n_updates == 0 and sp.statistics()["sparsity/itop_rate"] == pytest.approx(0.2, abs=1e-3)
    # the counts kept on the host agree with the masks
    stats = sp.statistics()
    assert stats["sparsity/active"] == sum(int(m.sum()) for m in _layer_masks(sp).values())
    assert stats["sparsity/itop_rate"] == sum(int(e.sum()) for e in sp._ever_active.values()) / stats["sparsity/total"]


def _dense_grad_reference(model, masks, batches):
    """Gradient of the masked forward w.r.t. the effective weights, summed over micro-batches."""
    weights = {n: torch.where(m, dict(model.named_modules())[n].weight, 0).detach().requires_grad_()
               for n, m in masks.items()}
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    for x, y in batches:
        params = {f"{n}.weight": w for n, w in weights.items()}
        loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(weights, grads):
            total[n] += g
    return total


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_rigl_grows_by_the_dense_gradient_of_the_masked_forward(micro_batches):
    model = _model(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put, so the reference is exact
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="rigl", sparsity=0.9, update_every=1,
                                                        drop_fraction=0.3, drop_schedule="constant"),
                           total_steps=4, optimizer=opt)
    old = {n: m.clone() for n, m in _layer_masks(sp).items()}
    batches = [_batch(s, n=4) for s in range(micro_batches)]
    expected_grad = _dense_grad_reference(model, old, batches)
    for x, y in batches:  # gradient accumulation: one optimizer step over several backward passes
        nn.functional.cross_entropy(model(x), y).backward()
    for name, w in _weights(model, sp).items():  # the optimizer only ever sees the masked gradient
        assert not bool(w.grad[~old[name]].any())
    assert sp.step_count == 0
    opt.step()
    assert sp.step_count == 1 and sp.statistics()["sparsity/updates"] == 1
    for name, w in _weights(model, sp).items():
        n_drop = math.floor(0.3 * int(old[name].sum()))
        expected = rigl_update(w, expected_grad[name], old[name], n_drop)
        assert torch.equal(_layer_masks(sp)[name], expected), name
        assert not torch.equal(expected, old[name])


def _run(method, steps, *, stop=None, state=None, seed_model=0, grad_masking="hook"):
    """Train ``steps`` optimizer steps; with ``stop`` return a checkpoint taken after that many steps."""
    model = _model(seed_model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method=method, sparsity=0.85, update_every=3, seed=5,
                                                            drop_schedule="constant", end_fraction=1.0,
                                                            grad_masking=grad_masking),
                           total_steps=steps, optimizer=opt)
    start = 0
    if state is not None:
        ckpt = torch.load(io.BytesIO(state), weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sp.load_state_dict(ckpt["sparsifier"])
        start = sp.step_count
    for step in range(start, steps):
        _train_step(model, opt, step)
        if stop is not None and step + 1 == stop:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "sparsifier": sp.state_dict()}, buf)
            return buf.getvalue()
    return model, sp


# Updates after steps 3, 6, 9, 12: stop between two, right after one, and just before one.
@pytest.mark.parametrize("stop", [4, 6, 8])
@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_crash_and_resume_is_bit_exact(method, stop):
    ref_model, ref_sp = _run(method, 14)
    ckpt = _run(method, 14, stop=stop)
    model, sp = _run(method, 14, state=ckpt, seed_model=1)  # a fresh process would start from other weights
    assert sp.step_count == 14
    for name in ref_sp.layer_names:
        assert torch.equal(_layer_masks(sp)[name], _layer_masks(ref_sp)[name])
    for (n1, p1), (n2, p2) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert sp.statistics() == ref_sp.statistics()


def test_masks_live_in_the_state_dict_and_loading_remasks_the_weights():
    model = _model()
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.7), total_steps=10)
    sd = model.state_dict()
    assert {k for k in sd if k.endswith(MASK_NAME)} == {f"net.{i}.{MASK_NAME}" for i in (0, 2, 4)}
    assert sd[f"net.0.{MASK_NAME}"].dtype == torch.bool
    other = _model(7)  # dense weights, different masks after loading
    dense = {k: v for k, v in other.state_dict().items()}
    model.load_state_dict(dense, strict=False)
    for name, w in _weights(model, sp).items():
        assert not bool(w[~_layer_masks(sp)[name]].any())
        assert torch.equal(w[_layer_masks(sp)[name]], dict(other.named_modules())[name].weight[_layer_masks(sp)[name]])


def test_explicit_step_without_hook_and_remove():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="set", sparsity=0.5, update_every=1),
                           total_steps=5, optimizer=opt, hook_optimizer=False)
    _train_step(model, opt, 0)
    assert sp.step_count == 0
    assert sp.step() is None and sp.statistics()["sparsity/updates"] == 1
    sp.remove()
    _train_step(model, opt, 1)
    assert sp.step_count == 1


def test_step_before_schedule_and_second_driving_optimizer_are_rejected():
    model = _model()
    sp = DynamicSparsifier(model, DynamicSparsityConfig())
    with pytest.raises(RuntimeError, match="set_total_steps"):
        sp.step()
    sp.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="only one optimizer may drive"):
        sp.attach_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already has a `weight_mask`"):
        DynamicSparsifier(model, DynamicSparsityConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sparsity=1.0), r"`sparsity` must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.2), r"`sparsity` must be in \[0, 1\), got -0.2"),
        (dict(method="lottery"), r"`method` must be one of rigl, set, gmp, static, topkast, got 'lottery'"),
        (dict(distribution="normal"), r"`distribution` must be one of erk, er, uniform, got 'normal'"),
        (dict(update_every=0), r"`update_every` must be an int >= 1, got 0"),
        (dict(verify_every=-1), r"`verify_every` must be an int >= 0, got -1"),
        (dict(end_fraction=0.0), r"`end_fraction` must be in \(0, 1\], got 0.0"),
        (dict(end_fraction=1.01), r"`end_fraction` must be in \(0, 1\], got 1.01"),
        (dict(drop_fraction=1.5), r"`drop_fraction` must be in \[0, 1\], got 1.5"),
        (dict(include="fc"), r"`include` must be a list of glob strings"),
        (dict(enforce_interval=0), r"`enforce_interval` must be 'auto' or an int >= 1, got 0"),
        (dict(enforce_interval="always"), r"`enforce_interval` must be 'auto' or an int >= 1, got 'always'"),
        (dict(enforce_interval=True), r"`enforce_interval` must be 'auto' or an int >= 1, got True"),
        (dict(enforce_interval=2.0), r"`enforce_interval` must be 'auto' or an int >= 1, got 2.0"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsityConfig(**kwargs)


def test_filter_matching_no_module_is_rejected_by_the_sparsifier():
    with pytest.raises(ValueError, match=r"`exclude` pattern 'head' matches no layer that can be sparsified"):
        DynamicSparsifier(_model(), DynamicSparsityConfig(exclude=["head"]))


def test_parametrized_weights_are_refused_and_frozen_weights_are_masked_without_hooks():
    class Identity(nn.Module):
        def forward(self, w):
            return w

    model = _model()
    torch.nn.utils.parametrize.register_parametrization(model.net[0], "weight", Identity())
    with pytest.raises(ValueError, match=r"module 'net\.0' has a parametrized `weight`.*`exclude`"):
        DynamicSparsifier(model, DynamicSparsityConfig())
    frozen = _model()
    frozen.net[0].weight.requires_grad_(False)
    sp = DynamicSparsifier(frozen, DynamicSparsityConfig(method="static", sparsity=0.5))
    assert not bool(frozen.net[0].weight[~_layer_masks(sp)["net.0"]].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_masking_is_nan_safe_and_equals_torch_where_bit_for_bit(dtype):
    model = _model().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.6), total_steps=4, optimizer=opt)
    w, mask = model.net[0].weight, _layer_masks(sp)["net.0"]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.5], dtype=dtype)
    with torch.no_grad():
        w.copy_(special[torch.randint(0, 5, w.shape, generator=torch.Generator().manual_seed(0))])
    expected = torch.where(mask, w, torch.zeros((), dtype=dtype)).clone()
    grad = w.detach().clone()
    assert torch.equal(contract.masked(grad, mask, sp._bits).view(torch.uint8), expected.view(torch.uint8))
    sp.apply_masks()
    assert torch.equal(w.detach().view(torch.uint8), expected.view(torch.uint8))  # NaN/inf/-0.0 kept inside
    assert not bool(w[~mask].isnan().any()) and not bool(w[~mask].any())


def test_loading_other_masks_reapplies_the_new_masks():
    model = _model()
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.5, seed=1), total_steps=4)
    donor = _model(5)
    donor_sp = DynamicSparsifier(donor, DynamicSparsityConfig(method="static", sparsity=0.5, seed=2), total_steps=4)
    dense_weights = {n: m.weight.detach().clone() for n, m in [("net.0", model.net[0])]}
    state = model.state_dict() | {k: v for k, v in donor.state_dict().items() if k.endswith(MASK_NAME)}
    sp.apply_masks()  # warm the cached masks of the old pattern
    old_mask = _layer_masks(sp)["net.0"].clone()
    model.load_state_dict(state)
    new_mask = _layer_masks(donor_sp)["net.0"]
    assert torch.equal(_layer_masks(sp)["net.0"], new_mask) and not torch.equal(new_mask, old_mask)
    w = model.net[0].weight
    assert not bool(w[~new_mask].any())
    assert torch.equal(w[new_mask], torch.where(new_mask, dense_weights["net.0"], 0)[new_mask])


# ---------------------------------------------------------------------- enforcement modes

# (optimizer, hyperparameters) for every class in ZERO_PRESERVING_OPTIMIZERS, each option of its update at least once.
_ZERO_PRESERVING_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
    ("Adagrad", dict(lr=0.1, weight_decay=0.01, lr_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.01)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.01, weight_decay=0.01)),  # 30 steps cover both branches (rho_t <= 5, then > 5)
    ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RMSprop", dict(lr=0.01, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, weight_decay=0.01, momentum=0.9, centered=True)),
    ("Adadelta", dict(lr=1.0, weight_decay=0.01)),
    ("ASGD", dict(lr=0.05, weight_decay=0.01, t0=3)),
]
_FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}  # the classes with a fused CPU kernel


def test_every_zero_preserving_optimizer_is_tested():
    assert {c.__name__ for c in ZERO_PRESERVING_OPTIMIZERS} == {n for n, _ in _ZERO_PRESERVING_CASES}
    assert all(getattr(torch.optim, c.__name__) is c for c in ZERO_PRESERVING_OPTIMIZERS)


def _masks_enforced(sp, opt):
    """Every sparsified weight and same-shape optimizer state is exactly zero outside its mask."""
    for name, w in _weights(sp.model, sp).items():
        mask = _layer_masks(sp)[name]
        if w[~mask].any():
            return False
        for v in opt.state[w].values():
            if torch.is_tensor(v) and v.shape == w.shape and v[~mask].any():
                return False
    return True


def _counting(sp):
    """Count the sparsifier's full enforcement passes."""
    calls = [0]
    apply = sp.apply_masks

    def counted():
        calls[0] += 1
        apply()

    sp.apply_masks = counted
    return calls


@pytest.mark.parametrize(
    ("name", "kwargs", "impl"),
    [(n, kw, impl) for n, kw in _ZERO_PRESERVING_CASES for impl in ("for-loop", "foreach", "fused")
     if impl != "fused" or n in _FUSED],
)
def test_auto_mode_skips_the_per_step_pass_and_trains_exactly_like_enforcing_every_step(name, kwargs, impl):
    kwargs = kwargs | {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    runs = {}
    for interval in ("auto", 1):
        model = _model()
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
        cfg = DynamicSparsityConfig(method="rigl", sparsity=0.8, update_every=5, drop_fraction=0.5,
                                    drop_schedule="constant", end_fraction=1.0, enforce_interval=interval)
        sp = DynamicSparsifier(model, cfg, total_steps=30, optimizer=opt)
        passes = _counting(sp)
        for step in range(30):
            _train_step(model, opt, step)
            assert _masks_enforced(sp, opt), (interval, step)
        runs[interval] = (model, opt, sp, passes[0])
    model, opt, sp, passes = runs["auto"]
    assert sp.effective_enforce_interval is None and name in sp.enforcement_reason()
    assert sp.statistics()["sparsity/updates"] == 5 and sp.statistics()["sparsity/regrown_total"] > 0
    assert passes == 5  # one full pass per mask update, none in between
    ref_model, ref_opt, ref_sp, ref_passes = runs[1]
    assert ref_passes == 30
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    for p, ref_p in zip(model.parameters(), ref_model.parameters()):
        for key, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ref_opt.state[ref_p][key])), key


class _DriftingSGD(torch.optim.SGD):
    """An SGD subclass whose step also adds a constant to every weight: it would revive pruned weights."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(1e-3)


@pytest.mark.parametrize("interval", ["auto", 1])
def test_an_optimizer_not_in_the_list_is_enforced_after_every_step(interval):
    model = _model()
    opt = _DriftingSGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="rigl", sparsity=0.8, update_every=3,
                                                        enforce_interval=interval), total_steps=12, optimizer=opt)
    assert sp.effective_enforce_interval == 1
    if interval == "auto":
        assert "_DriftingSGD is not in ZERO_PRESERVING_OPTIMIZERS" in sp.enforcement_reason()
    passes = _counting(sp)
    for step in range(12):
        _train_step(model, opt, step)
        assert _masks_enforced(sp, opt), step
    assert passes[0] == 12


def test_without_the_per_step_pass_the_drifting_optimizer_revives_pruned_weights():
    # The control of the test above: were auto mode to trust this optimizer, the masks would break.
    model = _model()
    opt = _DriftingSGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8, enforce_interval=1000),
                           total_steps=4, optimizer=opt)
    _train_step(model, opt, 0)
    assert not _masks_enforced(sp, opt)


def test_adamax_is_not_trusted_because_its_state_leaves_zero():
    # exp_inf = max(beta2 * exp_inf, |g| + eps) is eps where the gradient is masked.
    for interval, enforced in (("auto", True), (1000, False)):
        model = _model()
        opt = torch.optim.Adamax(model.parameters(), lr=0.01)
        sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8, enforce_interval=interval),
                               total_steps=4, optimizer=opt)
        _train_step(model, opt, 0)
        assert _masks_enforced(sp, opt) == enforced
        assert not bool(model.net[0].weight[~_layer_masks(sp)["net.0"]].any())  # its weights do stay zero
    assert sp.effective_enforce_interval == 1000


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01, eps=0.0), "Adam has eps=0.0"),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=0), "RMSprop has eps=0"),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1),
         "Adagrad has initial_accumulator_value=0.1"),
    ],
)
def test_auto_mode_enforces_every_step_when_a_hyperparameter_breaks_the_argument(make, reason):
    model = _model()
    opt = make(model.parameters())
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8), total_steps=4, optimizer=opt)
    assert sp.effective_enforce_interval == 1 and reason in sp.enforcement_reason()
    _train_step(model, opt, 0)
    assert _masks_enforced(sp, opt)


def test_auto_mode_enforces_every_step_with_a_state_masker_and_calls_it_once_per_pass():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8), total_steps=4, optimizer=opt)
    assert sp.effective_enforce_interval is None
    calls = []
    sp.add_state_masker(lambda pairs: calls.append(len(pairs)))
    assert calls == [3] and sp.effective_enforce_interval == 1 and "state maskers" in sp.enforcement_reason()
    _train_step(model, opt, 0)
    assert calls == [3, 3]
    sp.apply_masks()
    assert calls == [3, 3, 3]


def test_auto_mode_needs_every_trainable_sparsified_weight_hooked_and_held_by_an_attached_optimizer():
    model = _model()
    model.net[0].weight.requires_grad_(False)  # frozen at attach: no gradient hook
    first = torch.optim.SGD(model.net[2].parameters(), lr=0.1, momentum=0.9)
    rest = torch.optim.SGD(list(model.net[0].parameters()) + list(model.net[4].parameters()), lr=0.1)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8), total_steps=8)
    assert sp.effective_enforce_interval == 1 and "no optimizer is attached" in sp.enforcement_reason()
    sp.attach_optimizer(first)
    assert "'net.4' is in no attached optimizer" in sp.enforcement_reason()
    sp.attach_optimizer(rest, hook=False)
    assert sp.effective_enforce_interval is None  # net.0 is frozen: no gradient, no update
    model.net[0].weight.requires_grad_(True)  # trainable now, but its gradient is not masked
    assert sp.effective_enforce_interval == 1 and "'net.0' has no gradient hook" in sp.enforcement_reason()
    sp.remove()
    assert sp.effective_enforce_interval == 1


def test_loading_an_optimizer_state_reapplies_the_masks_to_it():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8), total_steps=8, optimizer=opt)
    _train_step(model, opt, 0)

    def dense_state():  # e.g. a state saved by a dense run (a fresh copy: loading may alias its tensors)
        state = copy.deepcopy(opt.state_dict())
        for per_param in state["state"].values():
            for v in per_param.values():
                if v.dim() > 0:
                    v.fill_(0.5)
        return state

    opt.load_state_dict(dense_state())
    assert _masks_enforced(sp, opt)
    assert all(bool(v[_layer_masks(sp)["net.0"]].eq(0.5).all()) for k, v in opt.state[model.net[0].weight].items()
               if k != "step")
    sp.detach_optimizers()  # the load hook goes with the optimizer
    opt.load_state_dict(dense_state())
    assert not _masks_enforced(sp, opt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_a_mask_update_waits_for_the_device_once_whatever_the_layer_count(method):
    syncs = {}
    for n_layers in (2, 6):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(n_layers)]).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = DynamicSparsityConfig(method=method, sparsity=0.9, update_every=1, end_fraction=1.0)
        sp = DynamicSparsifier(model, cfg, total_steps=4, optimizer=opt, hook_optimizer=False)
        for _ in range(2):  # the first update also pays one-time (per process) device syncs: time the second
            model(torch.randn(8, 256, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if sp.step_count == 0:
                sp.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sp.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert sp.update_count == 2 and sp.step_count == 2  # an update happened
        syncs[n_layers] = sum("synchroniz" in str(w.message) for w in caught)
    # A constant number of waits, not one per layer: one for the check that every weight is finite before
    # the update, one for the copy of all the layers' counts (an H200 measured {2: 3, 6: 2} for RigL; {2: 2,
    # 6: 1} before the finite check, {2: 1, 6: 1} for SET and GMP).
    assert syncs[6] <= syncs[2] <= 3, syncs


# ----------------------------------------------------------------------------- grad_masking="step"


def _masking_run(grad_masking, method, optimizer, steps=12, clip=None):
    model = _model()
    opt = _optimizer(model, optimizer)
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method=method, sparsity=0.8, update_every=3, seed=2,
                                                            end_fraction=1.0, grad_masking=grad_masking),
                           total_steps=steps, optimizer=opt)
    history = []
    for step in range(steps):
        for micro in range(2):  # gradient accumulation
            x, y = _batch(100 * step + micro)
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
        if clip is not None:
            sp.mask_gradients()  # before clipping, as the Lightning callback does
            sp.mask_gradients()  # a second call changes nothing (and captures nothing twice)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        history.append({n: m.clone() for n, m in _layer_masks(sp).items()})
    return model, sp, history


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_masking_gradients_before_the_step_trains_exactly_like_the_hooks(method, optimizer, clip):
    ref_model, ref_sp, ref_history = _masking_run("hook", method, optimizer, clip=clip)
    model, sp, history = _masking_run("step", method, optimizer, clip=clip)
    assert sp.effective_enforce_interval == ref_sp.effective_enforce_interval
    for got, want in zip(history, ref_history):
        assert all(torch.equal(got[n], want[n]) for n in want)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert sp.statistics() == ref_sp.statistics()
    assert sp.statistics() == ref_sp.statistics()
    assert ref_sp.statistics()["sparsity/regrown_total"] > 0 or method == "gmp"


def test_masking_gradients_before_the_step_survives_a_skipped_step():
    # A step skipped after the gradients were masked (e.g. by a GradScaler that found an inf):
    # the next step's new gradients are masked again.
    model = _model()
    opt = _optimizer(model, "adamw")
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.8, grad_masking="step"),
                           total_steps=10, optimizer=opt)
    for set_to_none in (False, True):
        x, y = _batch(0)
        nn.functional.cross_entropy(model(x), y).backward()
        sp.mask_gradients()
        opt.zero_grad(set_to_none=set_to_none)  # the step never happens
        x, y = _batch(1)
        nn.functional.cross_entropy(model(x), y).backward()
        sp.mask_gradients()
        for name, w in _weights(model, sp).items():
            assert not w.grad[~_layer_masks(sp)[name]].any(), name
            assert w.grad[_layer_masks(sp)[name]].any(), name


def test_grad_masking_is_checked():
    with pytest.raises(ValueError, match="grad_masking"):
        DynamicSparsityConfig(grad_masking="optimizer")


@pytest.mark.parametrize("keyword", [False, True])
def test_masking_gradients_before_the_step_with_a_closure(keyword):
    # A closure computes the gradients inside step(): they are masked after it ran, before the update.
    ref_model, ref_sp, _ = _masking_run("hook", "rigl", "sgd", steps=6)
    model = _model()
    opt = _optimizer(model, "sgd")
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="rigl", sparsity=0.8, update_every=3, seed=2,
                                                            end_fraction=1.0, grad_masking="step"),
                           total_steps=6, optimizer=opt)
    for step in range(6):
        def closure(step=step):
            opt.zero_grad()
            for micro in range(2):
                x, y = _batch(100 * step + micro)
                (nn.functional.cross_entropy(model(x), y) / 2).backward()
        opt.step(closure=closure) if keyword else opt.step(closure)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert sp.statistics() == ref_sp.statistics()


@pytest.mark.parametrize("stop", [4, 6])
def test_crash_and_resume_is_bit_exact_with_masking_before_the_step(stop):
    ref_model, ref_sp = _run("rigl", 14, grad_masking="step")
    ckpt = _run("rigl", 14, stop=stop, grad_masking="step")
    model, sp = _run("rigl", 14, state=ckpt, seed_model=1, grad_masking="step")
    for (n1, p1), (n2, p2) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert sp.statistics() == ref_sp.statistics()


def test_the_config_is_importable_from_every_path_it_had():
    from sparsetrain import sparsity
    from sparsetrain.sparsity import config, dynamic

    assert sparsity.DynamicSparsityConfig is dynamic.DynamicSparsityConfig is config.DynamicSparsityConfig
    assert dynamic.MATH_FIELDS is config.MATH_FIELDS
    assert {"DynamicSparsityConfig", "MATH_FIELDS"} <= set(dynamic.__all__)
