import pytest
import torch

from sparsetrain.sparsity import drop_smallest, grow_mask, keep_largest, magnitude_prune, rigl_update, set_update


def _reference_rigl(weight, grad, mask, n_drop):
    """RigL written out over Python lists: sort active |W|, keep the largest, grow by |grad| elsewhere.

    Python's sort is stable (also with ``reverse=True``), so among equal values the lower index
    comes first: the tie-breaking the library promises.
    """
    w, g, m = weight.flatten().tolist(), grad.flatten().tolist(), mask.flatten().tolist()
    active = [i for i in range(len(w)) if m[i]]
    kept = set(sorted(active, key=lambda i: abs(w[i]), reverse=True)[: len(active) - n_drop])
    candidates = [i for i in range(len(w)) if i not in kept]
    grown = set(sorted(candidates, key=lambda i: abs(g[i]), reverse=True)[:n_drop])
    return torch.tensor([i in kept or i in grown for i in range(len(w))]).view_as(mask)


def test_rigl_on_hand_built_tensors_drops_and_grows_the_expected_indices():
    weight = torch.tensor([[0.9, -0.1, 0.0, 0.5],
                           [0.0, 0.3, -0.7, 0.0],
                           [0.05, 0.0, 0.0, -0.2]])
    mask = torch.tensor([[1, 1, 0, 1],
                         [0, 1, 1, 0],
                         [1, 0, 0, 1]], dtype=torch.bool)
    grad = torch.tensor([[0.0, 0.2, -0.8, 0.1],
                         [0.6, 0.0, 0.0, -0.05],
                         [0.15, 0.4, 0.3, 0.0]])
    # Active |W|: 0.9 (0), 0.1 (1), 0.5 (3), 0.3 (5), 0.7 (6), 0.05 (8), 0.2 (11). Drop 3 smallest: 8, 1, 11.
    # Not kept: 1, 2, 4, 7, 8, 9, 10, 11 with |grad| .2 .8 .6 .05 .15 .4 .3 0 -> grow 2, 4, 9.
    new = rigl_update(weight, grad, mask, 3)
    expected = torch.zeros(12, dtype=torch.bool)
    expected[[0, 3, 5, 6, 2, 4, 9]] = True
    assert torch.equal(new, expected.view(3, 4))
    assert torch.equal(new, _reference_rigl(weight, grad, mask, 3))


def test_rigl_may_regrow_a_just_dropped_position():
    weight = torch.tensor([1.0, 0.1, 0.0, 0.0])
    mask = torch.tensor([True, True, False, False])
    grad = torch.tensor([0.0, 5.0, 1.0, 0.5])  # the dropped index 1 has the largest gradient
    assert rigl_update(weight, grad, mask, 1).tolist() == [True, True, False, False]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_drop", [0, 1, 17, 40])
def test_rigl_matches_reference_on_random_tensors(seed, n_drop):
    g = torch.Generator().manual_seed(seed)
    weight, grad = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    mask = torch.rand(8, 10, generator=g) < 0.5
    n_drop = min(n_drop, int(mask.sum()))
    new = rigl_update(weight * mask, grad, mask, n_drop)
    assert torch.equal(new, _reference_rigl(weight * mask, grad, mask, n_drop))
    assert int(new.sum()) == int(mask.sum())


def test_set_keeps_largest_and_regrows_randomly_outside_kept_identically_for_one_seed():
    g0 = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 16, generator=g0)
    mask = torch.rand(16, 16, generator=g0) < 0.3
    n_active, n_drop = int(mask.sum()), 20
    a = set_update(weight, mask, n_drop, torch.Generator().manual_seed(7))
    b = set_update(weight, mask, n_drop, torch.Generator().manual_seed(7))
    c = set_update(weight, mask, n_drop, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == n_active
    kept = keep_largest(weight.abs(), mask, n_active - n_drop)
    assert bool((a & kept).sum() == n_active - n_drop)  # every kept weight survives
    active_abs = weight.abs()[mask].sort().values
    assert bool((weight.abs()[kept] >= active_abs[n_drop]).all())  # kept = the largest ones


def test_magnitude_prune_only_shrinks():
    weight = torch.tensor([0.5, -0.4, 0.3, 0.2, 0.1, 9.0])
    mask = torch.tensor([True, True, True, True, True, False])
    assert magnitude_prune(weight, mask, 2).tolist() == [True, True, False, False, False, False]
    assert torch.equal(magnitude_prune(weight, mask, 10), mask)


def test_keep_largest_never_picks_outside_the_mask_even_with_nan_scores():
    scores = torch.tensor([float("nan"), 1.0, 2.0, float("nan"), 100.0])
    mask = torch.tensor([True, True, True, True, False])
    assert keep_largest(scores, mask, 3).tolist() == [True, True, True, False, False]  # NaNs tie: lower index
    assert drop_smallest(scores, mask, 1).tolist() == [False, False, False, True, False]
    assert keep_largest(scores, mask, 1).tolist() == [False, False, True, False, False]
    assert grow_mask(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False]), 1).tolist() == [
        False, True, False]


def test_bad_counts_are_rejected():
    w, m = torch.randn(4), torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match=r"`n_drop` must be in \[0, 2\]"):
        rigl_update(w, w, m, 3)
    with pytest.raises(ValueError, match="`n_drop` must be in"):
        set_update(w, m, -1, torch.Generator())
    with pytest.raises(ValueError, match="one shape"):
        rigl_update(w, torch.randn(5), m, 1)


def _reference_keep(scores, mask, k):
    """The k active positions first in (score descending, index ascending) order; NaN and -inf lowest."""
    s = [float("-inf") if v != v else v for v in scores.flatten().tolist()]
    active = [i for i, m in enumerate(mask.flatten().tolist()) if m]
    out = torch.zeros(len(s), dtype=torch.bool)
    out[sorted(active, key=lambda i: (-s[i], i))[:k]] = True
    return out.view_as(mask)


def _tied(seed, shape=(6, 7)):
    """Scores with many ties (a few integer values, some NaN and infinities), and a random mask."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, shape, generator=g).float()
    scores[torch.rand(shape, generator=g) < 0.1] = float("nan")
    scores[torch.rand(shape, generator=g) < 0.05] = float("inf")
    scores[torch.rand(shape, generator=g) < 0.05] = float("-inf")
    return scores, torch.rand(shape, generator=g) < 0.6


@pytest.mark.parametrize("seed", range(4))
def test_selections_with_ties_follow_score_then_position_and_are_exact_complements(seed):
    scores, mask = _tied(seed)
    n_active = int(mask.sum())
    for k in range(n_active + 1):  # both sides of the split (k below and above n_active / 2)
        kept = keep_largest(scores, mask, k)
        assert torch.equal(kept, _reference_keep(scores, mask, k)), k
        assert torch.equal(mask & ~drop_smallest(scores, mask, n_active - k), kept), k
        assert torch.equal(keep_largest(scores, mask, k, n_active=n_active), kept)
    n_free = mask.numel() - n_active
    for k in range(n_free + 1):
        grown = grow_mask(scores, mask, k)
        assert torch.equal(grown, _reference_keep(scores, ~mask, k)), k
        assert torch.equal(grow_mask(scores, mask, k, n_kept=n_active), grown)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_drop", [1, 5, 11])
def test_rigl_with_tied_magnitudes_and_gradients_matches_the_reference(seed, n_drop):
    g = torch.Generator().manual_seed(100 + seed)
    weight = torch.randint(-2, 3, (6, 8), generator=g).float()  # many equal |W|, zeros among the active
    grad = torch.randint(-1, 2, (6, 8), generator=g).float()  # many equal |grad|, zeros among the free
    mask = torch.rand(6, 8, generator=g) < 0.4
    n_drop = min(n_drop, int(mask.sum()))
    new = rigl_update(weight, grad, mask, n_drop)
    assert torch.equal(new, _reference_rigl(weight, grad, mask, n_drop))
    assert torch.equal(rigl_update(weight, grad, mask, n_drop, n_active=int(mask.sum())), new)
    assert torch.equal(magnitude_prune(weight, mask, int(mask.sum()) - n_drop),
                       _reference_keep(weight.abs(), mask, int(mask.sum()) - n_drop))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(3))
def test_masks_are_the_same_on_cuda_as_on_cpu(seed):
    g = torch.Generator().manual_seed(seed)
    weight, grad = torch.randn(256, 300, generator=g), torch.randn(256, 300, generator=g)
    weight[torch.rand(256, 300, generator=g) < 0.3] = 0.0  # ties
    grad = grad.round()  # more ties
    mask = torch.rand(256, 300, generator=g) < 0.1
    n_drop = int(mask.sum()) // 3
    cpu = rigl_update(weight, grad, mask, n_drop)
    cuda = rigl_update(weight.cuda(), grad.cuda(), mask.cuda(), n_drop, n_active=int(mask.sum()))
    assert torch.equal(cuda.cpu(), cpu)
    assert torch.equal(keep_largest(weight.abs().cuda(), mask.cuda(), 10).cpu(), keep_largest(weight.abs(), mask, 10))
    s_cpu = set_update(weight, mask, n_drop, torch.Generator().manual_seed(1))
    s_cuda = set_update(weight.cuda(), mask.cuda(), n_drop, torch.Generator().manual_seed(1))
    assert torch.equal(s_cuda.cpu(), s_cpu)
