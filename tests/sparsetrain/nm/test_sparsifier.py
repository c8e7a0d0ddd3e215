import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain import contract
from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.nm import NMConfig, NMSparsifier, is_nm, nm_export_state_dict, nm_mask, permute_for_nm
from tests.harness import run_distributed

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)


def _by_layer(sp):
    """The sparsifier's masks by layer name (``masks()`` keys them by parameter name)."""
    return {k.removesuffix(".weight"): v for k, v in sp.masks().items()}


def _batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, CFG.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _opt(params, sgd=False):
    # SGD where results are compared across processes: Adam turns rounding noise (k_proj.bias has
    # a zero true gradient) into full-size steps.
    return torch.optim.SGD(params, lr=0.5) if sgd else torch.optim.AdamW(params, lr=1e-2)


def _setup(seed=0, sgd=False, **kw):
    torch.manual_seed(seed)
    model = GPT(CFG)
    sp = NMSparsifier(model, NMConfig(**kw))
    opt = _opt(model.parameters(), sgd)  # built after attaching, as on resume
    return model, sp, opt


def _train(model, sp, opt, steps, start=0):
    for t in range(start, start + steps):
        model.loss(*_batch(t)).backward()
        sp.before_optimizer_step()  # a no-op without `inplace`
        opt.step()
        opt.zero_grad()
        sp.step()


@pytest.mark.parametrize("inplace", [False, True])
def test_masks_follow_the_dense_weights_every_step(inplace):
    model, sp, opt = _setup(method="srste", include=["*.mlp.*"], inplace=inplace)
    assert list(sp.layers) == ["blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out"]
    flips = []
    for t in range(4):
        before = {k: v.clone() for k, v in _by_layer(sp).items()}
        _train(model, sp, opt, 1, start=t)
        n_flip = sum(int((before[k] != _by_layer(sp)[k]).sum()) for k in before)
        flips.append(n_flip / sum(v.numel() for v in before.values()))
        for name, mask in _by_layer(sp).items():
            assert torch.equal(mask, nm_mask(sp.dense_weight(name), 2, 4))
            w = sp.layers[name].weight  # what the forward pass computes with
            assert torch.equal(w, torch.where(mask, sp.dense_weight(name), 0.0)) and is_nm(w, 2, 4)
        assert sp.statistics()["nm/mask_flip_fraction"] == pytest.approx(flips[-1])
    assert sp.statistics()["nm/mean_mask_flip_fraction"] == pytest.approx(sum(flips) / 4)


@pytest.mark.parametrize("every", [0, 3])
def test_update_every(every):
    model, sp, opt = _setup(method="ste", update_every=every, include=["*.fc_in"])
    seen = [_by_layer(sp)["blocks.0.mlp.fc_in"].clone()]
    dense = [sp.dense_weight("blocks.0.mlp.fc_in").clone()]  # the dense weight each mask was computed from
    for t in range(6):
        _train(model, sp, opt, 1, start=t)
        seen.append(_by_layer(sp)["blocks.0.mlp.fc_in"].clone())
        dense.append(sp.dense_weight("blocks.0.mlp.fc_in").clone())
    for t in range(1, 7):
        if every and t % every == 0:
            assert torch.equal(seen[t], nm_mask(dense[t], 2, 4))
            assert not torch.equal(seen[t], seen[t - 1])
        else:
            assert torch.equal(seen[t], seen[t - 1])


def test_sdgf_walks_its_ladder_and_mdgf_decays():
    model, sp, opt = _setup(method="sdgf", n=1, m=8, decay_steps=8, include=["*.mlp.*"])
    pats = [sp.pattern]
    for t in range(9):
        _train(model, sp, opt, 1, start=t)
        pats.append(sp.pattern)
        w = sp.layers["blocks.0.mlp.fc_in"].weight
        if sp.pattern is None:
            assert torch.equal(w, sp.dense_weight("blocks.0.mlp.fc_in"))
        else:
            assert is_nm(w, *sp.pattern) and (w != 0).sum() == w.numel() * sp.pattern[0] // sp.pattern[1]
    assert pats == [None, None, (7, 8), (7, 8), (4, 8), (4, 8), (2, 8), (2, 8), (1, 8), (1, 8)]

    model, sp, opt = _setup(method="mdgf", decay_steps=4, include=["*.mlp.*"])
    for t in range(5):
        name = "blocks.0.mlp.fc_out"
        mask, dense, beta = _by_layer(sp)[name], sp.dense_weight(name), max(0.0, 1 - t / 4)
        assert torch.allclose(sp.layers[name].weight, torch.where(mask, dense, dense * beta), atol=0, rtol=1e-6)
        _train(model, sp, opt, 1, start=t)
    assert is_nm(sp.layers["blocks.0.mlp.fc_out"].weight, 2, 4)


@pytest.mark.parametrize("method,kw", [("ste", {}), ("srste", {}), ("sdgf", {"decay_steps": 20, "n": 1, "m": 8})])
def test_exported_view_and_finalize(method, kw):
    model, sp, opt = _setup(method=method, **kw)
    _train(model, sp, opt, 6)
    n, m = sp.config.n, sp.config.m
    exported = sp.exported_state_dict()
    plain = GPT(CFG)
    plain.load_state_dict(exported)  # plain keys, strict
    for name in sp.layers:
        w = exported[name + ".weight"]
        assert is_nm(w, n, m) and not torch.signbit(w[w == 0]).any()
        if sp.pattern == (n, m):
            assert torch.equal(w, sp.layers[name].weight)
    x, _ = _batch(99)
    with torch.no_grad():
        if sp.pattern == (n, m):
            assert torch.equal(plain(x), model(x))
    params_before = {id(p) for p in opt.param_groups[0]["params"]}
    sp.finalize()
    assert {id(p) for p in model.parameters()} == params_before  # the optimizer's tensors, unchanged
    assert set(model.state_dict()) == set(GPT(CFG).state_dict())
    for name, mod in sp.layers.items():
        assert isinstance(mod.weight, nn.Parameter) and torch.equal(mod.weight, exported[name + ".weight"])
    with pytest.raises(RuntimeError, match="finalized"):
        sp.step()
    sp.finalize()  # idempotent


def test_exported_view_during_a_dense_stage_is_the_target():
    model, sp, opt = _setup(method="sdgf", n=1, m=8, decay_steps=100, include=["*.mlp.*"])
    assert sp.pattern is None
    exported = sp.exported_state_dict()
    w = exported["blocks.0.mlp.fc_in.weight"]
    assert torch.equal(w, torch.where(nm_mask(sp.dense_weight("blocks.0.mlp.fc_in"), 1, 8),
                                      sp.dense_weight("blocks.0.mlp.fc_in"), 0.0))


def test_plain_dense_checkpoint_loads_into_the_sparse_model():
    torch.manual_seed(3)
    dense = GPT(CFG)
    model, sp, _ = _setup(method="ste", include=["*.mlp.*"])
    model.load_state_dict(dense.state_dict())
    assert torch.equal(sp.dense_weight("blocks.0.mlp.fc_in"), dense.blocks[0].mlp.fc_in.weight)


@pytest.mark.parametrize("method,kw", [
    ("ste", {"update_every": 2}), ("srste", {}), ("mdgf", {"decay_steps": 5, "decay": "exp"}),
    ("sdgf", {"decay_steps": 6, "n": 1, "m": 8, "update_every": 4}),
    ("srste", {"inplace": True}), ("sdgf", {"decay_steps": 6, "n": 1, "m": 8, "inplace": True}),
])
def test_resume_is_bit_exact(method, kw):
    model, sp, opt = _setup(method=method, **kw)
    _train(model, sp, opt, 8)
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    model, sp, opt = _setup(method=method, **kw)
    _train(model, sp, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "nm": sp.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model, sp, opt = _setup(seed=123, method=method, **kw)  # other init: everything must come from ckpt
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sp.load_state_dict(ckpt["nm"])
    assert sp.step_count == 3
    _train(model, sp, opt, 5, start=3)
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_optimizer_hook_steps_the_sparsifier():
    model, sp, opt = _setup(method="ste", include=["*.mlp.*"])
    torch.manual_seed(0)
    hooked_model = GPT(CFG)
    hopt = torch.optim.AdamW(hooked_model.parameters(), lr=1e-2)  # built before attaching: same tensors
    hooked = NMSparsifier(hooked_model, NMConfig(method="ste", include=["*.mlp.*"]), optimizer=hopt)
    _train(model, sp, opt, 3)
    for t in range(3):
        hooked_model.loss(*_batch(t)).backward()
        hopt.step()  # the hook steps the sparsifier
        hopt.zero_grad()
    assert hooked.step_count == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, hooked_model.state_dict()[k]), k
    hooked.finalize()
    hopt.step()
    assert hooked.step_count == 3  # the hook is gone


def test_load_state_dict_rejects_a_mismatch():
    _, sp, _ = _setup(method="srste")
    state = sp.state_dict()
    _, other, _ = _setup(method="ste")
    with pytest.raises(ValueError, match="saved with method='srste' but this run has method='ste'"):
        other.load_state_dict(state)
    _, other, _ = _setup(method="srste", include=["*.mlp.*"])
    with pytest.raises(ValueError, match=r"saved with include=None but this run has include=\('\*.mlp.\*',\)"):
        other.load_state_dict(state)
    _, other, _ = _setup(method="srste", lambda_w=1e-3)
    with pytest.raises(ValueError, match="lambda_w=0.0002 but this run has lambda_w=0.001"):
        other.load_state_dict(state)
    _, other, _ = _setup(method="srste", verify_every=7, grad_accumulation=2)  # fields that keep the math
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="version 3"):
        other.load_state_dict({**state, "version": 3})


def test_attaching_twice_is_refused():
    model, sp, _ = _setup(include=["*.mlp.*"])
    with pytest.raises(ValueError, match="NMSparsifier and NMSparsifier both claim 'blocks.0.mlp.fc_in.weight'"):
        NMSparsifier(model, NMConfig(include=["*.mlp.*"]))
    other = GPT(CFG)
    parametrize.register_parametrization(other.blocks[0].mlp.fc_in, "weight", nn.Identity())
    with pytest.raises(ValueError, match="layer 'blocks.0.mlp.fc_in' already has a parametrized `weight`"):
        NMSparsifier(other, NMConfig(include=["*.mlp.*"]))
    assert contract.attached(other) == []
    with pytest.raises(ValueError, match="either `config` or keyword"):
        NMSparsifier(GPT(CFG), NMConfig(), n=1)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16(autocast):
    torch.manual_seed(0)
    model = GPT(CFG)
    if not autocast:
        model = model.to(torch.bfloat16)
    sp = NMSparsifier(model, NMConfig(method="srste"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(*_batch(t))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    exported = sp.exported_state_dict()
    for name in sp.layers:
        w = exported[name + ".weight"]
        assert w.dtype == (torch.float32 if autocast else torch.bfloat16) and is_nm(w, 2, 4)
        assert torch.equal(_by_layer(sp)[name], nm_mask(sp.dense_weight(name), 2, 4))


def test_pure_export_of_a_state_dict():
    torch.manual_seed(0)
    dense = GPT(CFG).state_dict()
    out = nm_export_state_dict(dense, 2, 4, layers=["blocks.0.mlp.fc_in"])
    assert is_nm(out["blocks.0.mlp.fc_in.weight"], 2, 4)
    assert out["blocks.0.mlp.fc_out.weight"] is dense["blocks.0.mlp.fc_out.weight"]
    assert not is_nm(dense["blocks.0.mlp.fc_in.weight"], 2, 4)  # input untouched
    with pytest.raises(ValueError, match="`layers` names layers with no weight"):
        nm_export_state_dict(dense, 2, 4, layers=["nope"])
    with pytest.raises(ValueError, match="not an 2:4 mask"):
        nm_export_state_dict(dense, 2, 4, layers=["lm_head"],
                             masks={"lm_head.weight": torch.ones_like(dense["lm_head.weight"], dtype=torch.bool)})


# --------------------------------------------------------------------------- distributed
def _ddp_ranks(rank, world_size, steps):
    out = {}
    # 1. Attaching to a DDP wrapper is refused (its gradient hooks would miss the parametrized weights).
    try:
        NMSparsifier(nn.parallel.DistributedDataParallel(GPT(CFG)), NMConfig())
        out["wrapped"] = "no error"
    except ValueError as err:
        out["wrapped"] = str(err)
    # 2. Different weights on each rank (no DDP broadcast): the rank check names the layers.
    torch.manual_seed(rank)
    try:
        NMSparsifier(GPT(CFG), NMConfig(include=["*.mlp.*"]))
        out["diverged"] = "no error"
    except RuntimeError as err:
        out["diverged"] = f"{type(err).__name__}: {err}"
    # 3. The DDP recipe: attach, wrap, refresh; train on each rank's half of the batch.
    torch.manual_seed(0)
    model = GPT(CFG)
    sp = NMSparsifier(model, NMConfig(method="srste", verify_every=1), verify_now=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    sp.refresh()
    opt = _opt(ddp.parameters(), sgd=True)
    for t in range(steps):
        x, y = _batch(t, b=4)
        loss = torch.nn.functional.cross_entropy(ddp(x[rank::world_size]).reshape(-1, 256),
                                                 y[rank::world_size].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step()  # verify_every=1: checks rank equality after every update
    out["masks"] = {k: v.clone() for k, v in _by_layer(sp).items()}
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    # 3b. The same with in-place masking, from other initial weights on each rank (DDP broadcasts
    # rank 0's when it wraps; refresh() masks them).
    torch.manual_seed(rank)
    model = GPT(CFG)
    sp = NMSparsifier(model, NMConfig(method="srste", verify_every=1, inplace=True), verify_now=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = _opt(ddp.parameters(), sgd=True)
    sp.refresh()
    for t in range(steps):
        x, y = _batch(t, b=4)
        torch.nn.functional.cross_entropy(ddp(x[rank::world_size]).reshape(-1, 256),
                                          y[rank::world_size].reshape(-1)).backward()
        sp.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sp.step()
    out["inplace_weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    # 4. Channel permutation: identical on every rank for the same weights and seed, refused otherwise.
    torch.manual_seed(0)
    out["perms"] = [site.info["perm"] for site in permute_for_nm(GPT(CFG), 2, 4, escapes=2)]
    torch.manual_seed(rank)
    try:
        permute_for_nm(GPT(CFG), 2, 4, escapes=0)
        out["perm_diverged"] = "no error"
    except RuntimeError as err:
        out["perm_diverged"] = str(err)
    return out


@pytest.mark.slow
def test_ddp_masks_identical_across_ranks_and_match_single_process():
    steps = 4
    r0, r1 = run_distributed(_ddp_ranks, 2, steps, timeout=180)
    for r in (r0, r1):
        assert "attach the sparsifier to the plain module before wrapping" in r["wrapped"]
        assert r["diverged"].startswith("RankDivergenceError")
        assert "differ across ranks" in r["diverged"] and "blocks.0.mlp.fc_in.weight" in r["diverged"]
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])
    plain_keys = {k.replace(".parametrizations.weight.original", ".weight"): v for k, v in r0["weights"].items()}
    for k, v in r0["inplace_weights"].items():
        assert torch.equal(v, r1["inplace_weights"][k])
        assert torch.allclose(v, plain_keys[k], atol=1e-6, rtol=1e-5), k  # SR-STE's term after averaging
    # Single-process reference: the full batch (the mean of the ranks' gradients).
    model, sp, opt = _setup(method="srste", sgd=True)
    _train(model, sp, opt, steps)
    ref = model.state_dict()
    for k in r0["weights"]:
        assert torch.allclose(r0["weights"][k], ref[k], atol=1e-5, rtol=1e-4), k
    agree = sum(int((r0["masks"][k] == _by_layer(sp)[k]).sum()) for k in _by_layer(sp))
    assert agree / sum(v.numel() for v in _by_layer(sp).values()) > 0.999
    # Permutations: equal across ranks and to a single process's.
    torch.manual_seed(0)
    ref_perms = [site.info["perm"] for site in permute_for_nm(GPT(CFG), 2, 4, escapes=2)]
    assert len(ref_perms) == 3  # residual stream, v->out_proj, fc_in->fc_out
    for a, b, c in zip(r0["perms"], r1["perms"], ref_perms):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "channel permutations differ across ranks" in r0["perm_diverged"]


def test_conv_layers_train_in_the_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 3))
    with pytest.warns(UserWarning, match=r"0 \(K=36\)"):  # 4*3*3 = 36 is not a multiple of 8
        sp = NMSparsifier(net, NMConfig(n=2, m=8, method="srste"))
    assert list(sp.layers) == ["2", "4"]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(6, 4, 4, 4), torch.randint(0, 3, (6,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    w = net[2].weight  # [8, 8, 1, 1]: groups of 8 along c_in
    assert is_nm(w, 2, 8) and torch.equal((w != 0).reshape(8, 8).sum(-1), torch.full((8,), 2))
    sp.finalize()
    assert is_nm(net[2].weight, 2, 8) and is_nm(net[4].weight, 2, 8) and not is_nm(net[0].weight, 2, 8)


def _small_run(compiled, steps, **config):
    """SR-STE on a small MLP, the model under torch.compile or not: losses, flip fractions, masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sp = NMSparsifier(model, NMConfig(n=2, m=4, method="srste", lambda_w=1e-2, **config))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    losses, flips = [], []
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
        loss = ((fwd(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sp.step()
        losses.append(loss.item())
        flips.append(sp.statistics().get("nm/mask_flip_fraction"))
    return losses, flips, list(_by_layer(sp).values())


def test_compiled_model_trains_like_eager_and_mask_changes_do_not_recompile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(compiled):
        return _small_run(compiled, 5)[:2]

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_flips = run(False)
    losses, flips = run(True)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert flips == pytest.approx(eager_flips)
    assert sum(flips) > 0  # the masks did change between steps...
    assert counters["stats"]["unique_graphs"] == 1  # ...and the graph was compiled once


# ----------------------------------------------------------------------------- masks in the forward pass


@pytest.mark.parametrize("kw", [dict(method="srste"), dict(method="ste", n=1, m=4),
                                dict(method="sdgf", n=1, m=8, decay_steps=6)])
def test_masks_in_forward_train_exactly_like_masks_after_each_step(kw):
    # Same masks, so the same training, bit for bit; the stored masks, the flips sampled every
    # verify_every steps, and checkpoints agree with the per-step recomputation.
    model, sp, opt = _setup(verify_every=3, **kw)
    live_model, live, live_opt = _setup(verify_every=3, masks_in_forward=True, **kw)
    for t in range(9):
        _train(model, sp, opt, 1, start=t)
        _train(live_model, live, live_opt, 1, start=t)
        if (t + 1) % 3 == 0 and sp.pattern == live.pattern == sp.config.pattern(t):  # not at a pattern change
            assert live.statistics()["nm/mask_flip_fraction"] == pytest.approx(sp.statistics()["nm/mask_flip_fraction"])
    for (name, a), b in zip(model.state_dict().items(), live_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(_by_layer(sp).values(), _by_layer(live).values()))
    assert live.pattern == sp.pattern
    state, ref = live.state_dict(), sp.state_dict()
    assert all(torch.equal(state["masks"][k], ref["masks"][k]) for k in ref["masks"])
    assert all(torch.equal(a, b) for a, b in zip(sp.exported_state_dict().values(),
                                                 live.exported_state_dict().values()))


def test_masks_in_forward_resume_is_exact():
    model, sp, opt = _setup(method="srste", masks_in_forward=True, verify_every=2)
    _train(model, sp, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
    _train(model, sp, opt, 3, start=3)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, sp2, opt2 = _setup(seed=5, method="srste", masks_in_forward=True, verify_every=2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sp"])
    _train(model2, sp2, opt2, 3, start=3)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_masks_in_forward_compiled_trains_like_eager_without_recompiling():
    import torch._dynamo
    from torch._dynamo.utils import counters

    def run(compiled):
        losses, flips, masks = _small_run(compiled, 6, masks_in_forward=compiled, verify_every=2)
        return losses, flips[-1], masks

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_flips, eager_masks = run(False)
    losses, flips, masks = run(True)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert flips == pytest.approx(eager_flips) and flips > 0  # the masks changed at step 6...
    assert all(torch.equal(a, b) for a, b in zip(masks, eager_masks))
    assert counters["stats"]["unique_graphs"] == 1  # ...and the graph was compiled once


def test_masks_in_forward_needs_update_every_one():
    with pytest.raises(ValueError, match="masks_in_forward.*update_every"):
        NMConfig(masks_in_forward=True, update_every=2)
    with pytest.raises(ValueError, match="masks_in_forward"):
        NMConfig(masks_in_forward=1)


def test_srste_term_comes_from_a_weight_hook_removed_by_finalize():
    # SR-STE's lambda * (1 - mask) * W is added by a gradient hook on the dense weight (once per
    # backward pass); finalize() removes it with the parametrization, leaving plain gradients.
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    sp = NMSparsifier(nn.Sequential(layer), NMConfig(method="srste", lambda_w=0.5))
    w = sp.dense_weight("0")
    mask = _by_layer(sp)["0"]
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    g_eff = torch.ones(3, 4).T @ x  # dL/dW_eff of sum(x @ W_eff.T + b)
    assert torch.allclose(w.grad, g_eff + 0.5 * (~mask) * w.detach(), atol=1e-6)
    sp.finalize()
    w.grad = None
    layer(x).sum().backward()
    assert torch.allclose(layer.weight.grad, g_eff, atol=1e-6)


def test_direct_weight_property_keeps_parametrize_semantics():
    # The layer's `weight` calls its NMMask directly; inside parametrize.cached() it is computed
    # once (parametrize's own cache), and removing the parametrization restores the plain class.
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    cls = type(layer)
    sp = NMSparsifier(nn.Sequential(layer), NMConfig(method="ste"))
    assert type(layer) is not cls
    assert torch.equal(layer.weight, torch.where(_by_layer(sp)["0"], sp.dense_weight("0"), 0))
    assert layer.weight is not layer.weight
    with parametrize.cached():
        assert layer.weight is layer.weight
    sp.finalize()
    assert type(layer) is cls and isinstance(layer.weight, nn.Parameter)


# ----------------------------------------------------------------------------- inplace


def _dense_view(sp):
    """name -> tensor of everything a sparsifier's model trains: dense weights and other parameters."""
    out = {name + ".weight": sp.dense_weight(name) for name in sp.layers}
    for k, v in sp.model.state_dict().items():
        if ".parametrizations." not in k and k not in out:
            out[k] = v
    return out


@pytest.mark.parametrize("kw", [dict(method="srste"), dict(method="ste", n=1, m=4, update_every=2),
                                dict(method="mdgf", decay_steps=5), dict(method="sdgf", n=1, m=8, decay_steps=6)])
def test_inplace_trains_exactly_like_the_parametrization(kw):
    model, sp, opt = _setup(**kw)
    torch.manual_seed(0)
    fast_model = GPT(CFG)
    fast_opt = _opt(fast_model.parameters())
    fast = NMSparsifier(fast_model, NMConfig(inplace=True, **kw), optimizer=fast_opt)
    assert not any(".parametrizations." in k for k in fast_model.state_dict())
    for t in range(8):
        _train(model, sp, opt, 1, start=t)
        fast_model.loss(*_batch(t)).backward()
        fast_opt.step()  # the hooks put the dense weights back before, and mask them again after
        fast_opt.zero_grad()
        for name in sp.layers:  # the weights the forward pass computes with, and the dense ones
            assert torch.equal(fast.layers[name].weight, sp.layers[name].weight), (t, name)
        ref = _dense_view(sp)
        got = fast_model.state_dict()  # dense weights under the plain keys
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), t
        assert fast.statistics() == sp.statistics()
    got, ref = fast.exported_state_dict(), sp.exported_state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    fast.finalize()
    sp.finalize()
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fast_model.state_dict().items())
    assert all(is_nm(mod.weight, sp.config.n, sp.config.m) for mod in fast.layers.values())


def test_inplace_grad_accumulation_matches_the_parametrization():
    # SR-STE's term: the parametrization adds lambda_w / 2 in each of two backward passes, in-place
    # masking adds lambda_w once before the step: equal up to rounding.
    runs = []
    for inplace in (False, True):
        model, sp, opt = _setup(method="srste", lambda_w=0.05, grad_accumulation=2, inplace=inplace, sgd=True)
        for t in range(4):
            for micro in range(2):
                model.loss(*_batch(10 * t + micro)).backward()
            sp.before_optimizer_step()
            opt.step()
            opt.zero_grad()
            sp.step()
        runs.append(_dense_view(sp))
    assert all(torch.allclose(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6) for k in runs[0])


def test_inplace_checkpoints_hold_dense_weights_and_load_while_masked():
    model, sp, opt = _setup(method="srste", inplace=True)
    _train(model, sp, opt, 2)
    name = "blocks.0.mlp.fc_in"
    layer, dense = sp.layers[name], sp.dense_weight(name)
    assert torch.equal(layer.weight, torch.where(_by_layer(sp)[name], dense, 0.0))
    assert not torch.equal(layer.weight, dense)
    assert torch.equal(model.state_dict()[name + ".weight"], dense)
    # Dense weights loaded while masked: kept as the dense weights, the forward pass sees them masked.
    torch.manual_seed(7)
    other = GPT(CFG).state_dict()
    model.load_state_dict(other)
    assert torch.equal(sp.dense_weight(name), other[name + ".weight"])
    assert torch.equal(layer.weight, torch.where(_by_layer(sp)[name], other[name + ".weight"], 0.0))
    sp.refresh()
    assert torch.equal(_by_layer(sp)[name], nm_mask(other[name + ".weight"], 2, 4))
    assert torch.equal(layer.weight, torch.where(_by_layer(sp)[name], other[name + ".weight"], 0.0))
    # A checkpoint of the parametrization loads too, and vice versa.
    pmodel, psp, popt = _setup(seed=3, method="srste")
    model.load_state_dict(pmodel.state_dict())
    assert torch.equal(sp.dense_weight(name), psp.dense_weight(name))
    pmodel.load_state_dict(other)
    assert torch.equal(psp.dense_weight(name), other[name + ".weight"])


def test_inplace_misuse_is_refused():
    with pytest.raises(ValueError, match="`inplace` must be True or False"):
        NMConfig(inplace=1)
    with pytest.raises(ValueError, match="`inplace` and `masks_in_forward` exclude each other"):
        NMConfig(inplace=True, masks_in_forward=True)
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"layer '0' shares it \(0.weight, 1.weight\)"):
        NMSparsifier(tied, NMConfig(inplace=True))
    # The optimizer stepped on the masked weights (no before_optimizer_step): step() refuses.
    model, sp, opt = _setup(method="srste", inplace=True)
    model.loss(*_batch(0)).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="call before_optimizer_step"):
        sp.step()
    # Attached with verify_now=False and never refreshed: the weights were never masked.
    torch.manual_seed(0)
    model = GPT(CFG)
    sp = NMSparsifier(model, NMConfig(inplace=True), verify_now=False)
    assert not any(torch.equal(m.weight, torch.where(_by_layer(sp)[n], m.weight, 0.0)) for n, m in sp.layers.items())
    with pytest.raises(RuntimeError, match="call refresh"):
        sp.before_optimizer_step()
    with pytest.raises(ValueError, match="`recompute` must be True or False, got 'no'"):
        sp.refresh(recompute="no")
    sp.refresh()
    sp.before_optimizer_step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(method="srste"), dict(method="mdgf", decay_steps=4)])
def test_cuda_inplace_trains_exactly_like_the_parametrization(dtype, kw):
    from sparsetrain.nm import grouped

    runs = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = GPT(CFG).cuda().to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sp = NMSparsifier(model, NMConfig(inplace=inplace, **kw), optimizer=opt)
        grouped._swap_tables.clear()
        for t in range(7):
            if t == 4:  # masks loaded from a state: separate tensors, gathered into one buffer
                sp.load_state_dict(sp.state_dict())
            x, y = _batch(t)
            model.loss(x.cuda(), y.cuda()).backward()
            opt.step()
            opt.zero_grad()
        assert bool(grouped._swap_tables) == inplace  # in-place: the one-launch kernel ran
        runs.append((_dense_view(sp), {n: m.weight.clone() for n, m in sp.layers.items()}))
    (dense_a, fwd_a), (dense_b, fwd_b) = runs
    assert set(dense_a) == set(dense_b) and all(torch.equal(dense_a[k], dense_b[k]) for k in dense_a)
    assert all(torch.equal(fwd_a[k], fwd_b[k]) for k in fwd_a)


# ----------------------------------------------------------------------------- the component contract


def test_construction_from_fields_or_config_and_the_registry():
    torch.manual_seed(0)
    model = GPT(CFG)
    sp = NMSparsifier(model, n=1, m=4, method="ste", include=["*.mlp.*"])
    assert sp.config == NMConfig(n=1, m=4, method="ste", include=["*.mlp.*"])
    assert NMSparsifier.masks_gradients is False and isinstance(sp, contract.Component)
    assert contract.attached(model) == [sp]
    assert sorted(contract.claims(model)) == ["blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.weight"]
    assert contract.gradient_masks(model) == ((), {})  # N:M keeps dense gradients
    with pytest.raises(ValueError, match="both claim 'blocks.0.mlp.fc_in.weight'"):
        NMSparsifier(model, NMConfig(include=["*.fc_in"], inplace=True))
    other = NMSparsifier(model, NMConfig(include=["*.attn.*"], inplace=True))  # disjoint layers: fine
    assert contract.attached(model) == [sp, other]
    with pytest.raises(ValueError, match="`verify_now` must be True or False"):
        NMSparsifier(GPT(CFG), verify_now="yes")


@pytest.mark.parametrize("kw", [dict(), dict(inplace=True), dict(masks_in_forward=True)])
def test_masks_by_parameter_name_and_mask_version(kw):
    model, sp, opt = _setup(method="srste", include=["*.mlp.*"], **kw)
    masks = sp.masks()
    assert list(masks) == ["blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.weight"]
    assert set(masks) <= {k for k, _ in GPT(CFG).named_parameters()}  # the plain model's names
    for key, mask in masks.items():
        assert mask.dtype == torch.bool and torch.equal(mask, nm_mask(sp.dense_weight(key[:-7]), 2, 4))
    version = sp.mask_version
    _train(model, sp, opt, 1)
    assert sp.mask_version > version
    with pytest.warns(FutureWarning, match="masks as a mapping"):
        assert torch.equal(sp.masks["blocks.0.mlp.fc_in"], sp.masks()["blocks.0.mlp.fc_in.weight"])


def test_masks_leave_out_a_dense_stage_and_finalized_layers():
    model, sp, opt = _setup(method="sdgf", n=1, m=8, decay_steps=100, include=["*.mlp.*"])
    assert sp.pattern is None and sp.masks() == {}
    with pytest.warns(FutureWarning):
        assert dict(sp.masks) == {"blocks.0.mlp.fc_in": None, "blocks.0.mlp.fc_out": None}
    model, sp, opt = _setup(method="ste")
    sp.finalize()
    assert sp.masks() == {}


@pytest.mark.parametrize("method,kw,keys", [
    ("srste", {}, set()), ("mdgf", {"decay_steps": 4}, {"nm/beta"}), ("sdgf", {"decay_steps": 4}, set()),
])
def test_statistics_are_flat_plain_floats(method, kw, keys):
    model, sp, opt = _setup(method=method, **kw)
    base = {"nm/step", "nm/n", "nm/m", "nm/density"}
    assert set(sp.statistics()) == base | keys  # nothing measured yet
    _train(model, sp, opt, 3)  # sdgf: dense, dense, 3:4, 3:4 (flips counted within a stage)
    stats = sp.statistics()
    assert set(stats) == base | keys | {"nm/mask_flip_fraction", "nm/mean_mask_flip_fraction"}
    assert all(type(v) is float for v in stats.values())
    assert stats["nm/step"] == 3.0 and stats["nm/n"] == 2.0 and stats["nm/m"] == 4.0
    with pytest.warns(FutureWarning, match="use statistics"):
        old = sp.stats()
    assert old["step"] == 3 and old["mask_flip_fraction"] == stats["nm/mask_flip_fraction"]
    assert old["density"] == stats["nm/density"]


@pytest.mark.parametrize("kw", [dict(method="srste"), dict(method="srste", inplace=True),
                                dict(method="sdgf", n=1, m=8, decay_steps=6)])
def test_a_version_1_state_still_loads(kw):
    # The previous release's state: no config, version 1; it resumes as the new one does.
    model, sp, opt = _setup(**kw)
    _train(model, sp, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "nm": sp.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    _train(model, sp, opt, 3, start=3)
    old = {k: v for k, v in ckpt["nm"].items() if k != "config"}
    old["version"] = 1
    model2, sp2, opt2 = _setup(seed=4, **kw)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(old)
    _train(model2, sp2, opt2, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    _, other, _ = _setup(**{**kw, "method": "ste"} if kw["method"] == "srste" else {**kw, "n": 2})
    with pytest.raises(ValueError, match="saved with"):
        other.load_state_dict(old)


@pytest.mark.parametrize("kw", [dict(method="srste"), dict(method="srste", inplace=True),
                                dict(method="srste", masks_in_forward=True)])
def test_remove_leaves_a_plain_model(kw):
    model, sp, opt = _setup(include=["*.mlp.*"], **kw)
    _train(model, sp, opt, 2)
    exported = sp.exported_state_dict()
    sp.remove()
    assert contract.attached(model) == [] and contract.claims(model) == {}
    assert set(model.state_dict()) == set(GPT(CFG).state_dict())
    for name, mod in sp.layers.items():
        assert type(mod) is nn.Linear and isinstance(mod.weight, nn.Parameter)
        assert not mod._forward_hooks and not mod._state_dict_hooks and not mod._load_state_dict_pre_hooks
        assert mod.weight._backward_hooks is None or not mod.weight._backward_hooks
        assert torch.equal(mod.weight, exported[name + ".weight"]) and is_nm(mod.weight, 2, 4)
    sp.remove()  # idempotent
    NMSparsifier(model, NMConfig(include=["*.mlp.*"]))  # the layers can be claimed again
