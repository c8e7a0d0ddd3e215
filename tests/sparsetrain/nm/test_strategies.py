import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.nm import ForwardMasks, InPlace, MaskingStrategy, NMConfig, NMSparsifier, Parametrized
from sparsetrain.nm.strategies import strategy_for

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)
MLP = ["blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out"]


@pytest.mark.parametrize("kw,cls", [({}, Parametrized), ({"masks_in_forward": True}, ForwardMasks),
                                    ({"inplace": True}, InPlace)])
def test_the_config_chooses_one_strategy_once(kw, cls):
    config = NMConfig(include=["*.mlp.*"], **kw)
    assert strategy_for(config) is cls and issubclass(cls, MaskingStrategy)
    torch.manual_seed(0)
    sp = NMSparsifier(GPT(CFG), config)
    assert type(sp.strategy) is cls


@pytest.mark.parametrize("kw,key,parametrized", [
    ({}, "parametrizations.weight.original", True),
    ({"masks_in_forward": True}, "parametrizations.weight.original", True),
    ({"inplace": True}, "weight", False),
])
def test_state_dict_keys_per_strategy(kw, key, parametrized):
    # What docs/nm_sparsity.md and the strategies' docstring state: the key of a sparse layer's
    # weight in the model's state dict, holding the dense weight in every mode.
    torch.manual_seed(0)
    model = GPT(CFG)
    sp = NMSparsifier(model, NMConfig(include=["*.mlp.*"], **kw))
    assert sp.strategy.weight_key == key
    sd = model.state_dict()
    plain = set(GPT(CFG).state_dict())
    for name in MLP:
        assert torch.equal(sd[f"{name}.{key}"], sp.dense_weight(name))
        assert parametrize.is_parametrized(sp.layers[name], "weight") == parametrized
    expected = {k for k in plain if k.removesuffix(".weight") not in MLP} | {f"{n}.{key}" for n in MLP}
    assert set(sd) == expected


def test_a_strategy_must_implement_attach_and_dense_weight():
    class Half(MaskingStrategy):
        pass

    torch.manual_seed(0)
    sp = NMSparsifier(nn.Sequential(nn.Linear(8, 4)), NMConfig())
    half = Half(sp)
    with pytest.raises(NotImplementedError):
        half.attach()
    with pytest.raises(NotImplementedError):
        half.dense_weight(0)
