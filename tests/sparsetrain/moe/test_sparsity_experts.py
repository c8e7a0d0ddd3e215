"""Dynamic sparsity on stacked expert weights: per-expert densities (E is not a fan dimension), masks and
updates per expert slice, against the straightforward per-layer functions on separate matrices."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrain.moe import MoE
from sparsetrain.moe.sparsity import (
    expert_active_counts,
    expert_densities,
    expert_random_masks,
    expert_slice_shapes,
    update_expert_masks,
)
from sparsetrain.sparsity import layer_densities, rigl_update, set_update

E, F, D = 4, 24, 16


def test_erk_density_of_a_stack_is_that_of_its_experts_as_separate_layers():
    shapes = {"attn": (D, D), "experts.w1_EFD": (E, F, D), "experts.w2_EDF": (E, D, F)}
    got = expert_densities(shapes, 0.8, "erk", stacked=["experts.w1_EFD", "experts.w2_EDF"])
    # reference: the E experts written out as 2E separate Linear layers
    separate = {"attn": (D, D), **{f"w1.{e}": (F, D) for e in range(E)}, **{f"w2.{e}": (D, F) for e in range(E)}}
    want = layer_densities(separate, 0.8, "erk")
    assert got["attn"] == pytest.approx(want["attn"])
    assert got["experts.w1_EFD"] == pytest.approx(want["w1.0"])
    assert got["experts.w2_EDF"] == pytest.approx(want["w2.0"])
    # reading the stack as one 3-D tensor counts E as a fan dimension: another density
    naive = layer_densities(shapes, 0.8, "erk")
    assert abs(naive["experts.w1_EFD"] - got["experts.w1_EFD"]) > 0.1 * got["experts.w1_EFD"]
    # the number of experts does not change an expert's density when the rest scales with it
    more = expert_densities({"experts.w1_EFD": (2 * E, F, D), "b": (2 * E, F, D)}, 0.8, "erk",
                            stacked=["experts.w1_EFD", "b"])
    fewer = expert_densities({"experts.w1_EFD": (E, F, D), "b": (E, F, D)}, 0.8, "erk",
                             stacked=["experts.w1_EFD", "b"])
    assert more["experts.w1_EFD"] == pytest.approx(fewer["experts.w1_EFD"])


def test_active_counts_per_expert_sum_to_the_global_budget():
    shapes = {"attn": (D, D), "w1": (E, F, D)}
    counts = expert_active_counts(shapes, 0.75, "erk", stacked=["w1"])
    assert len(counts["w1"]) == E and max(counts["w1"]) - min(counts["w1"]) <= 1
    total = counts["attn"] + sum(counts["w1"])
    assert total == round(0.25 * (D * D + E * F * D))


def test_random_masks_have_each_experts_count():
    counts = [10, 0, 384, 57]
    mask = expert_random_masks((E, F, D), counts, torch.Generator().manual_seed(0))
    assert mask.shape == (E, F, D) and mask.dtype == torch.bool
    assert [int(m.sum()) for m in mask] == counts
    with pytest.raises(ValueError, match="counts"):
        expert_random_masks((E, F, D), [1, 2], torch.Generator())


def _stack():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(E, F, D, generator=g)
    w[0] *= 100.0  # expert 0's weights dwarf the others': a whole-stack selection would keep only them
    grad = torch.randn(E, F, D, generator=g)
    counts = [96] * E
    mask = expert_random_masks((E, F, D), counts, torch.Generator().manual_seed(2))
    return w * mask, grad, mask


def test_rigl_update_per_expert_equals_rigl_on_each_matrix():
    w, grad, mask = _stack()
    n_drop = [10, 0, 30, 96]
    new = update_expert_masks("rigl", w, mask, n_drop, grad=grad)
    for e in range(E):
        assert torch.equal(new[e], rigl_update(w[e], grad[e], mask[e], n_drop[e]))
        assert int(new[e].sum()) == int(mask[e].sum())  # each expert keeps its own count
    assert not torch.equal(new[3], mask[3])


def test_set_update_per_expert_equals_set_on_each_matrix():
    w, _, mask = _stack()
    new = update_expert_masks("set", w, mask, [5] * E, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for e in range(E):
        assert torch.equal(new[e], set_update(w[e], mask[e], 5, g))


def test_update_refusals():
    w, grad, mask = _stack()
    with pytest.raises(ValueError, match="`method`"):
        update_expert_masks("gmp", w, mask, [1] * E)
    with pytest.raises(ValueError, match="`grad`"):
        update_expert_masks("rigl", w, mask, [1] * E)
    with pytest.raises(ValueError, match="`n_drop`"):
        update_expert_masks("rigl", w, mask, [1], grad=grad)
    with pytest.raises(ValueError, match="`generator`"):
        update_expert_masks("set", w, mask, [1] * E)
    with pytest.raises(ValueError, match="not in `shapes`"):
        expert_slice_shapes({"a": (2, 3, 4)}, ["b"])


def test_masks_on_a_live_moe_layer_keep_experts_sparse_through_training():
    """The functions in a training loop on a real MoE layer: masked weights and gradients, one RigL update."""
    torch.manual_seed(0)
    layer = MoE(D, F, E, 2, activation="gelu", dropless=True)
    names = ["w1_EFD", "w2_EDF"]
    params = dict(layer.experts.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    counts = expert_active_counts(shapes, 0.8, "erk", stacked=names)
    gen = torch.Generator().manual_seed(0)
    masks = {n: expert_random_masks(shapes[n], counts[n], gen) for n in names}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with torch.no_grad():
        for n in names:
            params[n].mul_(masks[n])
    for step in range(3):
        layer.zero_grad()
        layer(torch.randn(32, D)).square().mean().backward()
        if step == 2:  # RigL: drop / grow 10% of each expert's active weights, from the dense gradient
            for n in names:
                drops = [math.floor(0.1 * c) for c in counts[n]]
                masks[n] = update_expert_masks("rigl", params[n].detach(), masks[n], drops, grad=params[n].grad)
        for n in names:
            params[n].grad.mul_(masks[n])
        opt.step()
        with torch.no_grad():
            for n in names:
                params[n].mul_(masks[n])
    for n in names:
        for e in range(E):
            assert int((params[n][e] != 0).sum()) <= counts[n][e]
            assert int(masks[n][e].sum()) == counts[n][e]
