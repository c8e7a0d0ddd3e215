import pytest
import torch
from torch import nn

from sparsetrain.runtime import first_bad_group, is_24
from sparsetrain.runtime.eligibility import ineligible_reason

from .conftest import random_24


def _reference_bad_groups(w):
    """Every (row, group) with more than 2 nonzeros, by a plain loop."""
    bad = []
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // 4):
            if sum(1 for v in w[r, 4 * g:4 * g + 4].tolist() if v != 0) > 2:
                bad.append((r, g))
    return bad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pattern_detection_matches_a_plain_loop(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = random_24(8, 32, dtype=dtype, seed=seed)
    assert is_24(w) and first_bad_group(w) is None and _reference_bad_groups(w) == []
    # break a few random groups by filling a dropped slot
    for _ in range(seed + 1):
        r, c = int(torch.randint(8, (1,), generator=g)), int(torch.randint(32, (1,), generator=g))
        w[r, c] = 1.0
    bad = _reference_bad_groups(w)
    assert is_24(w) == (not bad)
    assert first_bad_group(w) == (bad[0] if bad else None)


def test_nan_counts_as_nonzero_and_negative_zero_as_zero():
    w = torch.zeros(1, 8)
    w[0, :2] = 1.0
    w[0, 2] = -0.0
    w[0, 3] = -0.0
    assert is_24(w)
    w[0, 2] = float("nan")
    assert not is_24(w) and first_bad_group(w) == (0, 0)


def test_in_features_not_divisible_by_4():
    assert not is_24(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="divisible by 4"):
        first_bad_group(torch.zeros(4, 6))


@pytest.mark.parametrize("bad, err", [(torch.zeros(4), ValueError), ([[0.0] * 4], TypeError)])
def test_weight_validation(bad, err):
    with pytest.raises(err, match="weight"):
        is_24(bad)


def _linear(out_f, in_f, dtype=torch.bfloat16, two_four=True):
    layer = nn.Linear(in_f, out_f, dtype=dtype)
    if two_four:
        with torch.no_grad():
            layer.weight.copy_(random_24(out_f, in_f, dtype=dtype))
    return layer


def test_ineligible_reasons():
    assert ineligible_reason(_linear(32, 64), needs_cuda=False) is None
    assert "on cpu" in ineligible_reason(_linear(32, 64), needs_cuda=True)
    assert "dtype float32" in ineligible_reason(_linear(32, 64, dtype=torch.float32), needs_cuda=False)
    assert "multiples of 16" in ineligible_reason(_linear(32, 40), needs_cuda=False)
    assert "multiples of 16" in ineligible_reason(_linear(24, 64), needs_cuda=False)
    assert "not 2:4 (row 0, columns 0..3" in ineligible_reason(_linear(32, 64, two_four=False), needs_cuda=False)
    mha = nn.MultiheadAttention(32, 2, dtype=torch.bfloat16)
    assert "NonDynamicallyQuantizableLinear" in ineligible_reason(mha.out_proj, needs_cuda=False)
