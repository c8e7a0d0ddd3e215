"""Export from a live N:M-sparse model, in every masking mode, read through the contract."""

import pytest
import torch

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.export import load_24, save_24
from sparsetrain.nm import NMConfig, NMSparsifier, nm_export_state_dict

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)
MODES = {"parametrized": dict(), "masks_in_forward": dict(masks_in_forward=True), "inplace": dict(inplace=True)}


def _batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, CFG.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _setup(**kw):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = NMSparsifier(model, NMConfig(include=["*.mlp.*"], **kw), optimizer=opt)
    return model, opt, sp


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        model.loss(*_batch(t)).backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()])


@pytest.mark.parametrize("mode", list(MODES))
def test_export_of_a_live_model_is_its_exact_nm_view(tmp_path, mode):
    model, opt, sp = _setup(**MODES[mode])
    _train(model, opt, 3)
    out = save_24(model, tmp_path)
    assert out.targets == ("blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out")  # the masked layers, read via masks()
    loaded = load_24(tmp_path)
    ref = nm_export_state_dict(model.state_dict(), 2, 4, masks=sp.masks())
    assert list(loaded) == list(ref)
    for k in ref:
        assert torch.equal(loaded[k], ref[k]), k
    ref2 = sp.exported_state_dict()
    assert all(torch.equal(loaded[k], ref2[k]) for k in ref2)
    plain = GPT(CFG)
    load_24(plain, tmp_path)
    x, _ = _batch(99)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))  # the forward the sparse model computes


@pytest.mark.parametrize("mode", list(MODES))
def test_export_during_training_leaves_the_run_untouched(tmp_path, mode):
    model, opt, sp = _setup(**MODES[mode])
    _train(model, opt, 2)
    before = _snapshot(model, opt)
    masks_before = {k: v.clone() for k, v in sp.masks().items()}
    save_24(model, tmp_path, dtype=torch.bfloat16)
    after = _snapshot(model, opt)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(masks_before[k], v) for k, v in sp.masks().items())
    _train(model, opt, 2, start=2)

    ref_model, ref_opt, _ = _setup(**MODES[mode])  # the same run without the export
    _train(ref_model, ref_opt, 4)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_sdgf_before_the_target_exports_the_target_view(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = NMSparsifier(model, NMConfig(include=["*.mlp.*"], method="sdgf", decay_steps=100), optimizer=opt)
    _train(model, opt, 2)
    assert sp.pattern != (2, 4)
    save_24(model, tmp_path)
    loaded = load_24(tmp_path)
    ref = sp.exported_state_dict()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)


def test_after_remove_the_plain_model_exports_its_linears(tmp_path):
    model, opt, sp = _setup()
    _train(model, opt, 2)
    sp.remove()
    out = save_24(model, tmp_path, targets=["*.mlp.*"])
    assert out.targets == ("blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_24(tmp_path).items())


def test_with_dynamic_sparsity_on_other_layers(tmp_path):
    """N:M on the MLPs, dynamic sparsity on attention: both are read through masks(); the unstructured
    layers are not 2:4, so they are refused until ignored, then stored dense as trained (zeros kept)."""
    from sparsetrain.sparsity import DynamicSparsifier

    model, opt, sp = _setup()
    dyn = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=2, include=["*.attn.*"],
                            total_steps=10, optimizer=opt)
    _train(model, opt, 3)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.\w+ is not 2:4: row \d+, group \d+"):
        save_24(model, tmp_path)
    out = save_24(model, tmp_path, ignore=["*.attn.*"], overwrite=True)
    assert out.targets == ("blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out")
    assert set(out.dense_layers) == {k[: -len(".weight")] for k in dyn.masks()}
    loaded = load_24(tmp_path)
    for key, mask in dyn.masks().items():
        assert torch.equal(loaded[key], model.state_dict()[key]) and not loaded[key][~mask].any()
    for key, mask in sp.masks().items():
        assert torch.equal(loaded[key], nm_export_state_dict(model.state_dict(), 2, 4, masks={key: mask})[key])
