import math

import pytest

from sparsetrain.sparsity import MaskSchedule, cosine_drop_fraction, gmp_sparsity


def test_cosine_drop_fraction_endpoints_and_midpoint():
    kw = dict(initial=0.3, begin_step=0, end_step=100)
    assert cosine_drop_fraction(0, **kw) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, **kw) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, **kw) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, **kw) == 0.0
    assert cosine_drop_fraction(150, **kw) == 0.0


def test_gmp_cubic_ramp():
    kw = dict(final=0.8, begin_step=10, end_step=110)
    assert gmp_sparsity(5, **kw) == 0.0
    assert gmp_sparsity(10, **kw) == 0.0
    assert gmp_sparsity(60, **kw) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert gmp_sparsity(110, **kw) == pytest.approx(0.8)
    assert gmp_sparsity(500, **kw) == pytest.approx(0.8)


def test_rigl_updates_every_interval_until_end_fraction():
    s = MaskSchedule.from_fractions(method="rigl", sparsity=0.9, total_steps=100, update_interval=10)
    assert s.end_step == 75
    assert s.update_steps() == [10, 20, 30, 40, 50, 60, 70]
    assert s.needs_gradient(20) and not s.needs_gradient(21)


def test_gmp_prunes_from_begin_to_end_including_the_end():
    s = MaskSchedule.from_fractions(method="gmp", sparsity=0.8, total_steps=100, update_interval=15,
                                    begin_fraction=0.1, end_fraction=0.5)
    assert (s.begin_step, s.end_step) == (10, 50)
    assert s.update_steps() == [10, 25, 40, 50]
    assert s.sparsity_at(50) == pytest.approx(0.8)
    assert not s.needs_gradient(25)


def test_static_never_updates_and_constant_schedule():
    assert MaskSchedule.from_fractions(method="static", sparsity=0.9, total_steps=50, update_interval=1
                                       ).update_steps() == []
    s = MaskSchedule.from_fractions(method="set", sparsity=0.9, total_steps=100, update_interval=10,
                                    drop_schedule="constant")
    assert s.drop_fraction_at(10) == s.drop_fraction_at(70) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(update_interval=0), r"`update_interval` must be >= 1, got 0"),
        (dict(end_fraction=0.0), r"`end_fraction` must be in \(0, 1\], got 0.0"),
        (dict(end_fraction=1.5), r"`end_fraction` must be in \(0, 1\], got 1.5"),
        (dict(begin_fraction=0.8), r"`begin_fraction` must be in \[0, end_fraction=0.75\)"),
        (dict(method="prune"), r"`method` must be one of rigl, set, gmp, static, topkast, got 'prune'"),
        (dict(drop_schedule="linear"), r"`drop_schedule` must be one of cosine, constant"),
        (dict(total_steps=0), r"`total_steps` must be an int >= 1, got 0"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    args = dict(method="rigl", sparsity=0.9, total_steps=100, update_interval=10) | kwargs
    with pytest.raises(ValueError, match=match):
        MaskSchedule.from_fractions(**args)
