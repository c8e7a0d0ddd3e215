import pytest
import torch
from torch import nn

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.sparsity import random_mask, select_modules


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv1d(8, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(8, 2)


def test_default_selection_is_linear_and_conv_in_registration_order():
    assert select_modules(ConvNet()) == ["conv1", "conv2", "fc"]


def test_include_exclude_globs_and_keep_first_last_dense():
    model = GPT(GPTConfig(d_model=64, n_layer=2, n_head=1, block_size=16))
    all_ = select_modules(model)
    assert all_[0] == "blocks.0.attn.q_proj" and all_[-1] == "lm_head" and len(all_) == 13
    assert select_modules(model, include=["blocks.*.mlp.*"]) == [
        "blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out", "blocks.1.mlp.fc_in", "blocks.1.mlp.fc_out"]
    assert "lm_head" not in select_modules(model, exclude=["lm_head"])
    trimmed = select_modules(model, keep_first_dense=True, keep_last_dense=True)
    assert trimmed == all_[1:-1]


@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_a_filter_matching_no_module_is_rejected(arg):
    with pytest.raises(ValueError, match=rf"`{arg}` pattern 'decoder\.\*' matches no layer that can be sparsified"):
        select_modules(ConvNet(), **{arg: ["decoder.*"]})


def test_nothing_left_is_rejected():
    with pytest.raises(ValueError, match="no layer left to sparsify"):
        select_modules(nn.Sequential(nn.Linear(2, 2)), keep_first_dense=True)


def test_random_mask_has_the_exact_count_and_depends_only_on_the_seed():
    a = random_mask((7, 9), 20, torch.Generator().manual_seed(3))
    b = random_mask((7, 9), 20, torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and int(a.sum()) == 20 and torch.equal(a, b)
    with pytest.raises(ValueError, match=r"`n_active` must be in \[0, 63\], got 64"):
        random_mask((7, 9), 64, torch.Generator())
