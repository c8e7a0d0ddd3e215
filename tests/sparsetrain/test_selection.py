"""The one ranking rule of :mod:`sparsetrain.selection`, and every caller that selects by it.

The reference is written the plain way, in Python: positions sorted by (score, then lower index
first), NaN and -inf as the smallest finite float32, +inf as the largest.
"""

import math

import pytest
import torch

from sparsetrain.compression.topk import sample_stride, threshold_indices, threshold_indices_segments, topk_indices
from sparsetrain.nm import nm_mask
from sparsetrain.nm.masks import forward_mask
from sparsetrain.selection import _top_by_sort, select_topk, select_topk_rows, topk_positions
from sparsetrain.sparsity import (
    drop_smallest,
    grow_mask,
    keep_largest,
    magnitude_prune,
    rigl_update,
    set_update,
)

_F32 = torch.finfo(torch.float32)


def _key(v: float) -> float:
    if math.isnan(v) or v <= _F32.min:
        return _F32.min
    return min(v, _F32.max)


def _ranked(scores: torch.Tensor, eligible: torch.Tensor | None = None) -> list[int]:
    """Eligible flat positions, highest rank first."""
    s = scores.detach().reshape(-1).double().tolist()
    ok = [True] * len(s) if eligible is None else eligible.reshape(-1).tolist()
    return sorted((i for i in range(len(s)) if ok[i]), key=lambda i: (-_key(s[i]), i))


def _ref_mask(scores, k, largest=True, eligible=None) -> torch.Tensor:
    order = _ranked(scores, eligible)
    take = order[:k] if largest else order[len(order) - k :]
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[take] = True
    return out.view(scores.shape)


def _ref_positions(scores, k) -> torch.Tensor:
    return torch.tensor(sorted(_ranked(scores)[:k]), dtype=torch.long)


def _tied(kind: str, n: int, seed: int) -> torch.Tensor:
    """Scores with many ties: few distinct values, zeros, NaN and infinities mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n,), generator=g).float() / 2
    if kind in ("nan", "special"):
        x[torch.randperm(n, generator=g)[: n // 10]] = float("nan")
    if kind == "special":
        x[torch.randperm(n, generator=g)[:3]] = float("inf")
        x[torch.randperm(n, generator=g)[:3]] = float("-inf")
    if kind == "zeros":
        x[torch.rand(n, generator=g) < 0.9] = 0.0
    return x


_KINDS = ["ties", "nan", "special", "zeros"]


# ----------------------------------------------------------------------------- the module itself


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_select_topk_follows_the_rule(kind, largest, dtype):
    x = _tied(kind, 60, seed=1).to(dtype)
    eligible = torch.rand(60, generator=torch.Generator().manual_seed(2)) < 0.7
    for k in (0, 1, 5, 17, int(eligible.sum()) - 1, int(eligible.sum())):
        expected = _ref_mask(x, k, largest, eligible)
        assert torch.equal(select_topk(x, k, largest=largest, eligible=eligible), expected), (k, kind)
        assert torch.equal(select_topk(x, k, largest=largest, eligible=eligible, n_eligible=int(eligible.sum())),
                           expected)
    for k in (0, 1, 7, 30, 59, 60):
        assert torch.equal(select_topk(x.view(6, 10), k, largest=largest), _ref_mask(x, k, largest).view(6, 10))


@pytest.mark.parametrize("kind", _KINDS)
def test_smallest_is_the_complement_of_largest(kind):
    x = _tied(kind, 80, seed=3)
    for k in range(0, 81, 7):
        assert torch.equal(~select_topk(x, 80 - k, largest=False), select_topk(x, k))


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("largest", [True, False])
def test_rows_are_selected_as_alone(kind, largest):
    x_LN = torch.stack([_tied(kind, 40, seed=s) for s in range(5)])
    got = select_topk_rows(x_LN, 9, largest=largest)
    assert torch.equal(got, torch.stack([_ref_mask(row, 9, largest) for row in x_LN]))
    eligible_LN = torch.zeros(5, 40, dtype=torch.bool)
    for r in range(5):
        eligible_LN[r, torch.randperm(40, generator=torch.Generator().manual_seed(r))[:25]] = True
    got = select_topk_rows(x_LN, 9, largest=largest, eligible_LN=eligible_LN)
    assert torch.equal(got, torch.stack([_ref_mask(x_LN[r], 9, largest, eligible_LN[r]) for r in range(5)]))


@pytest.mark.parametrize("kind", _KINDS + ["distinct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_topk_positions_follows_the_rule(kind, dtype):
    if kind == "distinct":
        x = torch.randn(500, generator=torch.Generator().manual_seed(4))
    else:
        x = _tied(kind, 500, seed=4)
    if dtype == torch.int64:
        x = torch.nan_to_num(x * 2, nan=-7, posinf=9, neginf=-9)
    x = x.to(dtype)
    for k in (0, 1, 2, 50, 149, 250, 499, 500):
        assert torch.equal(topk_positions(x, k), _ref_positions(x, k)), (kind, k)
        assert torch.equal(torch.sort(topk_positions(x, k, ascending=False)).values, _ref_positions(x, k))
        if x.is_floating_point():  # the stable-sort ranking CUDA uses for small tensors
            assert torch.equal(_top_by_sort(x, k, ascending=True), _ref_positions(x, k))
        assert torch.equal(topk_positions(x, k, largest=False), _ref_mask(x, k, largest=False).nonzero().view(-1))


def test_topk_positions_with_extreme_values_at_the_boundary():
    big = _F32.max
    cases = [
        [big, float("inf"), 1.0, big],  # +inf ties with the largest finite value
        [-big, float("-inf"), float("nan"), 0.0, -big],  # so do -inf, NaN and the smallest
        [float("nan"), 1.0, float("nan"), 2.0],
    ]
    for values in cases:
        x = torch.tensor(values)
        for k in range(len(values) + 1):
            assert torch.equal(topk_positions(x, k), _ref_positions(x, k)), (values, k)
            assert torch.equal(_top_by_sort(x, k, ascending=True), _ref_positions(x, k)), (values, k)


def test_inputs_are_checked():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="`k` must be an integer in \\[0, 10\\]"):
        select_topk(x, 11)
    with pytest.raises(ValueError, match="`k` must be an integer in \\[0, 3\\]"):
        select_topk(x, 4, eligible=torch.arange(10) < 3)
    with pytest.raises(ValueError, match="`eligible` must be a bool tensor"):
        select_topk(x, 1, eligible=torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="`scores_LN` must be 2-D"):
        select_topk_rows(x, 1)
    with pytest.raises(ValueError, match="same number of eligible positions"):
        select_topk_rows(x.view(2, 5), 1, eligible_LN=torch.tensor([[True] * 5, [True] * 4 + [False]]))
    with pytest.raises(ValueError, match="`scores_N` must be 1-D"):
        topk_positions(x.view(2, 5), 1)
    with pytest.raises(ValueError, match="`k` must be an integer"):
        topk_positions(x, -1)
    with pytest.raises(TypeError, match="`scores` must be a torch.Tensor"):
        topk_positions([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="`scores` must be real numbers"):
        select_topk(torch.ones(3, dtype=torch.bool), 1)


# ----------------------------------------------------------------------------- every caller, tied inputs


@pytest.mark.parametrize("kind", _KINDS)
def test_dynamic_sparsity_primitives_follow_the_rule(kind):
    w = _tied(kind, 96, seed=5).view(8, 12)
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(6)) < 0.6
    n_active = int(mask.sum())
    for k in (0, 3, n_active // 2, n_active):
        assert torch.equal(keep_largest(w, mask, k), _ref_mask(w, k, True, mask))
        assert torch.equal(drop_smallest(w, mask, k), _ref_mask(w, k, False, mask))
        assert torch.equal(magnitude_prune(w, mask, k), _ref_mask(w.abs(), k, True, mask))
    n_free = 96 - n_active
    for k in (0, 4, n_free):
        assert torch.equal(grow_mask(w, mask, k), _ref_mask(w, k, True, ~mask))


@pytest.mark.parametrize("kind", _KINDS)
def test_rigl_and_set_follow_the_rule(kind):
    w = _tied(kind, 96, seed=7).view(8, 12)
    grad = _tied(kind, 96, seed=8).view(8, 12)
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(9)) < 0.5
    n_drop = int(mask.sum()) // 3
    dropped = _ref_mask(w.abs(), n_drop, False, mask)
    kept = mask & ~dropped
    assert torch.equal(rigl_update(w, grad, mask, n_drop), kept | _ref_mask(grad.abs(), n_drop, True, ~kept))
    scores = torch.rand(8, 12, generator=torch.Generator().manual_seed(10))  # SET's draw
    got = set_update(w, mask, n_drop, torch.Generator().manual_seed(10))
    assert torch.equal(got, kept | _ref_mask(scores, n_drop, True, ~kept))


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (5, 16), (8, 32)])
def test_nm_mask_follows_the_rule_with_nan_as_largest(kind, n, m):
    w = _tied(kind, 8 * 64, seed=m).view(8, 64)
    score = torch.nan_to_num(w.abs(), nan=float("inf"))  # N:M's score: a NaN weight is kept
    expected = torch.stack([_ref_mask(g, n) for g in score.view(-1, m)]).view(8, 64)
    assert torch.equal(nm_mask(w, n, m), expected)
    assert torch.equal(forward_mask(w, n, m), expected)
    assert torch.equal(select_topk_rows(score.view(-1, m), n).view(8, 64), expected)


@pytest.mark.parametrize("kind", _KINDS)
def test_compression_selection_follows_the_rule(kind):
    x = _tied(kind, 50_000, seed=11)
    mag = x.abs()
    for k in (1, 40, 5000, 30_000):
        assert torch.equal(topk_indices(x, k), _ref_positions(mag, k)), k
        assert torch.equal(threshold_indices(x, k, stride=1), _ref_positions(mag, k))
    # the sampled threshold: the rule's top-C for some C <= k (NaN never passes the threshold)
    ranked = _ranked(mag)
    for k, offset in ((50, 0), (500, 3), (2000, 7)):
        got = threshold_indices(x, k, stride=sample_stride(x.numel(), k / x.numel(), 0.01), offset=offset)
        assert got.numel() <= k
        assert torch.equal(torch.sort(got).values, torch.tensor(sorted(ranked[: got.numel()]), dtype=torch.long))
    segments = [(0, 20_000, 100, 4), (20_000, 10_000, 10_000, 1), (30_000, 20_000, 300, 8)]
    got, counts = threshold_indices_segments(x, segments, offset=1)
    for part, (s, n, _k, _st) in zip(got.split(counts), segments):
        top = _ranked(mag[s : s + n])[: part.numel()]
        assert torch.equal(torch.sort(part).values - s, torch.tensor(sorted(top), dtype=torch.long))


@pytest.mark.parametrize("spacing", [1, 3, 1000, 70_000])
def test_topk_positions_takes_the_first_ties_however_far_apart(spacing):
    # ties at the k-th place spread over the tensor: found chunk by chunk, in index order
    x = torch.zeros(1_000_003)
    x[::spacing] = 1.0
    x[[7, 400_000]] = 2.0
    ties = torch.arange(0, x.numel(), spacing)
    ties = ties[(ties != 7) & (ties != 400_000)]
    for k in (3, 2 + ties.numel() // 2, 2 + ties.numel()):
        expected = torch.sort(torch.cat([torch.tensor([7, 400_000]), ties[: k - 2]])).values
        assert torch.equal(topk_positions(x, k), expected), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [1000, 100_000, 5_000_000])
@pytest.mark.parametrize("kind", _KINDS + ["distinct"])
def test_cuda_selection_equals_the_cpu_one(n, kind):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) if kind == "distinct" else _tied(kind, n, seed=n)
    for k in (1, n // 1000 + 1, n // 3):
        assert torch.equal(topk_positions(x.cuda(), k).cpu(), topk_positions(x, k)), (kind, k)
        assert torch.equal(select_topk(x.cuda(), k).cpu(), select_topk(x, k)), (kind, k)
