import math

import pytest

from sparsetrain.sparsity import layer_active_counts, layer_densities

# Linear 10 -> 20, Linear 20 -> 30, Conv2d 3 -> 8 with a 3x3 kernel: 200 + 600 + 216 = 1016 weights.
SHAPES = {"a": (20, 10), "b": (30, 20), "c": (8, 3, 3, 3)}


def test_erk_matches_hand_computed_values():
    # raw = sum(dims) / prod(dims): a 30/200, b 50/600, c 17/216; sum(raw * N) = 30 + 50 + 17 = 97.
    # eps = 0.5 * 1016 / 97 = 508 / 97; no density exceeds 1.
    d = layer_densities(SHAPES, 0.5, "erk")
    assert d["a"] == pytest.approx(0.7855670103092783, rel=1e-12)
    assert d["b"] == pytest.approx(0.436426116838488, rel=1e-12)
    assert d["c"] == pytest.approx(0.41218022145857197, rel=1e-12)


def test_erk_overflow_makes_the_largest_raw_layer_dense_and_resolves():
    # At S = 0.2, eps = 812.8 / 97 puts layer a at 1.257 > 1: a becomes dense, then
    # eps = (812.8 - 200) / (50 + 17) for b and c.
    d = layer_densities(SHAPES, 0.2, "erk")
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(0.7621890547263681, rel=1e-12)
    assert d["c"] == pytest.approx(0.719845218352681, rel=1e-12)


def test_er_ignores_kernel_dims_and_overflows_the_conv():
    # ER raw of the conv is (8 + 3) / 24 = 0.458 (largest): at S = 0.5 it would reach 1.30, so it
    # goes dense and eps = (508 - 216) / 80.
    d = layer_densities(SHAPES, 0.5, "er")
    assert d["c"] == 1.0
    assert d["a"] == pytest.approx(0.5475, rel=1e-12)
    assert d["b"] == pytest.approx(0.30416666666666664, rel=1e-12)


def test_uniform_gives_every_layer_the_target():
    assert layer_densities(SHAPES, 0.8, "uniform") == {"a": pytest.approx(0.2), "b": pytest.approx(0.2),
                                                       "c": pytest.approx(0.2)}


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_achieved_global_sparsity_equals_target(distribution, sparsity):
    shapes = {**SHAPES, "d": (256, 64), "e": (64, 256), "f": (7, 5)}
    n = {k: math.prod(s) for k, s in shapes.items()}
    d = layer_densities(shapes, sparsity, distribution)
    assert all(0.0 < v <= 1.0 for v in d.values())
    assert sum(d[k] * n[k] for k in shapes) == pytest.approx((1 - sparsity) * sum(n.values()), rel=1e-12)
    counts = layer_active_counts(shapes, sparsity, distribution)
    assert sum(counts.values()) == round((1 - sparsity) * sum(n.values()))
    assert all(1 <= counts[k] <= n[k] and abs(counts[k] - d[k] * n[k]) < 2 for k in shapes)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_rejects_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        layer_densities(SHAPES, sparsity, "erk")


def test_rejects_unknown_distribution_and_flat_shapes():
    with pytest.raises(ValueError, match="`distribution` must be one of erk, er, uniform, got 'gaussian'"):
        layer_densities(SHAPES, 0.5, "gaussian")
    with pytest.raises(ValueError, match="at least 2|>= 2 positive"):
        layer_densities({"bias": (10,)}, 0.5, "erk")
