"""Warnings of the core and the callbacks are said once per run: by rank 0 (sparsetrain/_warn.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparsetrain import _warn
from tests.harness import run_distributed

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@pytest.fixture
def no_rank_variables(monkeypatch):
    for var in RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _said(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_a_single_process_warns(no_rank_variables):
    assert _warn.rank() == 0
    assert _said(lambda: _warn.warn("fc skipped")) == ["fc skipped"]


@pytest.mark.parametrize(("var", "value", "shown"), [
    ("RANK", "0", 1), ("RANK", "1", 0), ("LOCAL_RANK", "2", 0), ("SLURM_PROCID", "0", 1),
    ("SLURM_PROCID", "5", 0), ("JSM_NAMESPACE_RANK", "3", 0), ("RANK", "not a number", 1),
])
def test_before_the_process_group_the_launchers_rank_decides(no_rank_variables, var, value, shown):
    no_rank_variables.setenv(var, value)
    assert _said(lambda: _warn.warn("fc skipped")) == ["fc skipped"] * shown


def test_rank_variables_are_read_in_order(no_rank_variables):
    no_rank_variables.setenv("RANK", "0")
    no_rank_variables.setenv("LOCAL_RANK", "1")  # RANK comes first: this is rank 0
    assert _warn.rank() == 0


def test_category_and_stacklevel_point_at_the_caller(no_rank_variables):
    def library_function():
        _warn.warn("old argument", FutureWarning, stacklevel=2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library_function()  # the line the warning names
    assert len(caught) == 1 and caught[0].category is FutureWarning
    assert caught[0].filename == __file__


def _warnings_of_each_rank(rank: int, world: int) -> list[str]:
    """Every rank builds the same components with the same questionable settings: a sparsity that
    tiny layers cannot reach (core), a deprecated DGC argument (core), a deprecated callback argument."""
    from sparsetrain.callbacks import DynamicSparsity

    from sparsetrain.compression import DGCState
    from sparsetrain.sparsity import DynamicSparsifier

    def build() -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2))
        DynamicSparsifier(model, method="static", sparsity=0.99, total_steps=10)
        DGCState(module=nn.Linear(8, 8), density=0.5)
        DynamicSparsity(sparsity=0.5, update_interval=10)

    return _said(build)


def test_each_warning_appears_once_on_two_gloo_ranks():
    said = run_distributed(_warnings_of_each_rank, world_size=2)
    assert said[1] == []
    assert len(said[0]) == 3, said[0]
    assert "sparsity=0.99 cannot be reached" in said[0][0]
    assert "`module` is deprecated" in said[0][1]
    assert "`update_interval` is deprecated" in said[0][2]
