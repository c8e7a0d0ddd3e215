import pytest
import torch

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.nm import NMConfig, NMSparsifier, is_nm, nm_export_state_dict, nm_mask

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)
MODES = [dict(), dict(masks_in_forward=True), dict(inplace=True)]


def _batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, CFG.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _trained(steps=3, **kw):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = NMSparsifier(model, NMConfig(include=["*.mlp.*", "*.attn.*"], **kw), optimizer=opt)
    for t in range(steps):
        model.loss(*_batch(t)).backward()
        opt.step()
        opt.zero_grad()
    return model, sp


@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("nm", [(), (2, 4)])
def test_the_documented_call_is_exact_in_every_mode(kw, nm):
    model, sp = _trained(**kw)
    exported = nm_export_state_dict(model.state_dict(), *nm, masks=sp.masks())
    plain = GPT(CFG)
    plain.load_state_dict(exported)  # plain keys, strict
    ref = sp.exported_state_dict()
    assert set(exported) == set(ref) and all(torch.equal(exported[k], ref[k]) for k in ref)
    for key, mask in sp.masks().items():
        w = exported[key]
        assert is_nm(w, 2, 4) and torch.equal(w != 0, mask & (sp.dense_weight(key[:-7]) != 0))
    x, _ = _batch(99)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))  # the exported model computes what the sparse one does


@pytest.mark.parametrize("kw", [dict(), dict(inplace=True)])  # masks_in_forward needs update_every=1
def test_stale_masks_are_the_forward_pass_masks_not_magnitude(kw):
    # update_every=3: after 4 steps the masks in use are those of step 3, not the weights' magnitude masks.
    model, sp = _trained(steps=4, method="srste", update_every=3, **kw)
    exported = nm_export_state_dict(model.state_dict(), 2, 4, masks=sp.masks())
    magnitude = {k: nm_mask(sp.dense_weight(k[:-7]), 2, 4) for k in sp.masks()}
    assert any(not torch.equal(magnitude[k], m) for k, m in sp.masks().items())
    plain = GPT(CFG)
    plain.load_state_dict(exported)
    x, _ = _batch(99)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_the_ambiguous_call_on_an_inplace_model_is_refused():
    # The call the docs showed: on an in-place model it returned the dense, not N:M, weights.
    model, sp = _trained(inplace=True)
    with pytest.raises(ValueError, match="nothing to export.*masks=sparsifier.masks()"):
        nm_export_state_dict(model.state_dict(), 2, 4)
    # With the parametrization it still converts every parametrized weight (by magnitude).
    model, sp = _trained()
    out = nm_export_state_dict(model.state_dict(), 2, 4)
    assert all(is_nm(out[k], 2, 4) for k in sp.masks())
    GPT(CFG).load_state_dict(out)


def test_mask_keys_and_arguments_are_checked():
    model, sp = _trained(steps=1)
    sd = model.state_dict()
    by_layer = {k[:-7]: v for k, v in sp.masks().items()}
    with pytest.warns(FutureWarning, match="keyed by layer name"):
        old = nm_export_state_dict(sd, 2, 4, masks=by_layer)
    new = nm_export_state_dict(sd, 2, 4, masks=sp.masks())
    assert all(torch.equal(old[k], new[k]) for k in new)
    with pytest.raises(ValueError, match="`masks` names 'nope.weight', which has no weight"):
        nm_export_state_dict(sd, masks={"nope.weight": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="pass both `n` and `m`"):
        nm_export_state_dict(sd, 2, masks=sp.masks())
    with pytest.raises(ValueError, match="`n` and `m` are needed"):
        nm_export_state_dict(sd, masks={})
    with pytest.raises(ValueError, match="not an 1:4 mask"):
        nm_export_state_dict(sd, 1, 4, masks=sp.masks())


def test_a_dense_sdgf_stage_exports_the_target():
    model, sp = _trained(steps=1, method="sdgf", n=1, m=8, decay_steps=100)
    assert sp.pattern is None and sp.masks() == {}
    out = sp.exported_state_dict()
    for name in sp.layers:
        w = sp.dense_weight(name)
        assert torch.equal(out[name + ".weight"], torch.where(nm_mask(w, 1, 8), w, 0.0))
