"""Bad input and loaded state that the N:M pieces refuse, naming the argument or the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.nm import NMConfig, NMSparsifier, pack_mask, permute_for_nm, unpack_mask

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPT(CFG)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_weights_are_refused_when_masks_are_computed_naming_the_layer():
    model = _gpt()
    sp = NMSparsifier(model, NMConfig(n=2, m=4, include=["*.mlp.*"]))
    with torch.no_grad():
        sp.dense_weight("blocks.0.mlp.fc_out")[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer\(s\) blocks.0.mlp.fc_out hold NaN or inf"):
        sp.refresh()


def test_permute_for_nm_refuses_nan_weights_and_changes_nothing():
    model = _gpt()
    with torch.no_grad():
        model.blocks[0].mlp.fc_out.weight[1, 2] = float("inf")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc_out hold NaN or inf.*nothing was permuted"):
        permute_for_nm(model, 2, 4, escapes=0)
    assert _same(before, _snapshot(model))


@pytest.mark.parametrize(("model", "kw", "error", "match"), [
    ("model", {}, TypeError, "`model` must be a torch.nn.Module, got str"),
    (None, {"seed": "x"}, TypeError, "`seed` must be an int, got 'x'"),
    (None, {"seed": 1.5}, TypeError, "`seed` must be an int"),
])
def test_permute_for_nm_names_bad_arguments(model, kw, error, match):
    with pytest.raises(error, match=match):
        permute_for_nm(_gpt() if model is None else model, 2, 4, **kw)


def test_a_truncated_packed_mask_is_refused():
    mask = torch.rand(8, 16) > 0.5
    packed = pack_mask(mask)
    assert torch.equal(unpack_mask(packed, (8, 16)), mask)
    with pytest.raises(ValueError, match="`packed` holds 15 bytes, a mask of shape .8, 16. packs into 16"):
        unpack_mask(packed[:-1], (8, 16))
    with pytest.raises(ValueError, match="`packed` must be a uint8 tensor"):
        unpack_mask(packed.float(), (8, 16))


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s.pop("step"), "truncated: it has no 'step'"),
    (lambda s: s.pop("masks"), "truncated: it has no 'masks'"),
    (lambda s: s.update(step=-2), r"`state\['step'\]` must be an int >= 0"),
    (lambda s: s["masks"].update({k: v[:-1] for k, v in s["masks"].items()}), r"`state\['masks'\]\[.*is truncated"),
    (lambda s: s["mask_shapes"].update({k: [1, 1] for k in s["mask_shapes"]}), r"`state\['mask_shapes'\]"),
])
def test_a_truncated_sparsifier_state_is_refused_and_changes_nothing(edit, match):
    model = _gpt()
    sp = NMSparsifier(model, NMConfig(n=2, m=4, include=["*.mlp.*"]))
    state = sp.state_dict()
    edit(state)
    before = {k: v.clone() for k, v in sp.masks().items()}
    step = sp.schedule.step
    with pytest.raises(ValueError, match=match):
        sp.load_state_dict(state)
    assert sp.schedule.step == step
    assert all(torch.equal(before[k], v) for k, v in sp.masks().items())
