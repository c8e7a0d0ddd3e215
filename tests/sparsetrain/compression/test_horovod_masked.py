"""The masked exchange of the Horovod ``DistributedOptimizer`` (``masked=``) under real ``horovodrun``.

RigL at 80% with a mask update every 3 steps on 2 gloo ranks (``grad_masking="hook"``, and ``"step"``,
where RigL reads the dense gradient from the Horovod exchange on its update steps):

- lossless: parameters, masks and Adam state bit-identical after every step to plain
  ``hvd.allreduce`` (average) of every gradient followed by masking;
- with DGC top-k on the packed vector: every averaged gradient follows the DGC reference equations
  of ``test_masked.py`` (the same code as the DDP hook's), across the mask changes;
- with ``inactive_density`` (``grad_masking="step"``): bit-identical to the naive reference hook
  of ``test_masked_options.py``;
- the MoE model of ``test_masked_options.py``: the expert without tokens on either rank skipped (the
  ranks agree over ``hvd.allreduce``), bit-identical to DDP's dense all-reduce.
"""

from __future__ import annotations

import pytest
import torch

from sparsetrain.compression.horovod import DistributedOptimizer
from sparsetrain.compression.masked import MaskedExchangeConfig
from tests.sparsetrain.compression.test_horovod import run_horovod_worker
from tests.sparsetrain.compression.test_masked import STEPS, _assert_equal, _dgc_reference, _model


@pytest.fixture(scope="module")
def results():
    return run_horovod_worker("tests.sparsetrain.compression.horovod_masked_worker", timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("grad_masking", ["hook", "step"])
def test_lossless_bit_identical_to_allreduce_then_masking(results, grad_masking: str) -> None:
    for rank in range(2):
        masked, reference = results[rank][f"masked/{grad_masking}"], results[rank][f"reference/{grad_masking}"]
        assert masked["updates"] == reference["updates"] >= 3
        for t in range(STEPS):
            _assert_equal(masked["snaps"][t], reference["snaps"][t])
        masks = [m for _, m, _ in masked["snaps"]]
        changes = sum(any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(masks, masks[1:]))
        assert changes >= 3
        stats = masked["stats"][-1]
        assert stats["exchange/packed_fraction"] < 0.5
        assert stats["exchange/rebuilds"] >= changes  # rebuilt at every mask change
        assert stats["exchange/mask_version"] >= 3
        if grad_masking == "step":  # RigL took its dense gradients from the exchange before each update
            assert stats["exchange/total_dense_steps"] == masked["updates"]
        else:
            assert stats["exchange/total_dense_steps"] == 0
    _assert_equal(results[0][f"masked/{grad_masking}"]["snaps"][-1], results[1][f"masked/{grad_masking}"]["snaps"][-1])


@pytest.mark.slow
def test_topk_on_the_packed_vector_follows_the_dgc_equations(results) -> None:
    records = [results[r]["topk"] for r in range(2)]
    assert records[0]["updates"] >= 3
    expected = _dgc_reference(records, 2)
    for t in range(STEPS):
        for r in range(2):
            for names, _, got in records[r]["steps"][t]["buckets"]:
                want = torch.cat([expected[t][n].reshape(-1) for n in names])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"step {t} rank {r}")
    assert 0 < records[0]["stats"]["exchange/topk_sent_fraction"] < 0.5


@pytest.mark.slow
def test_inactive_topk_equals_the_naive_reference(results) -> None:
    """``inactive_density`` over Horovod (values and int32 positions in one ``hvd.allgather``) against
    the naive reference DDP hook of ``test_masked_options.py``, bit for bit."""
    for rank in range(2):
        got, want = results[rank]["inactive"], results[rank]["inactive_ddp_reference"]
        assert got["updates"] == want["updates"] >= 3
        assert got["dense_steps"] == got["updates"]
        for t in range(STEPS):
            _assert_equal(got["snaps"][t], want["snaps"][t])


@pytest.mark.slow
def test_idle_experts_skipped_over_horovod_equal_dense(results) -> None:
    for rank in range(2):
        got, want = results[rank]["moe"], results[rank]["moe_ddp_dense"]
        assert got["idle"] == [1.0] * 4  # the expert without tokens on either rank
        for t in range(4):
            for name, p in want["snaps"][t].items():
                assert torch.equal(got["snaps"][t][name], p), (t, rank, name)


def test_masked_arguments_are_checked() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="`masked` needs `model`"):
        DistributedOptimizer(opt, masked=True)
    with pytest.raises(TypeError, match="`masked` must be a bool or a MaskedExchangeConfig"):
        DistributedOptimizer(opt, model=model, masked="yes")
    with pytest.raises(ValueError, match="give the compression in it"):
        DistributedOptimizer(opt, model=model, masked=MaskedExchangeConfig(), density=0.1)
    with pytest.raises(ValueError, match="optimizer `momentum` must be 0"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, masked=True,
                             momentum=0.9)
    with pytest.raises(ValueError, match="inactive_density"):
        MaskedExchangeConfig(inactive_density=0.0)
