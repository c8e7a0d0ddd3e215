"""DGCState as a component (docs/architecture.md): construct, step, statistics, masks, state, rank check, remove."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression import MATH_FIELDS, DGCConfig, DGCState
from tests.harness import run_distributed


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _state_dict(model: nn.Module, **overrides) -> dict:
    sd = {
        "version": 2, "step": 5, "loss_scale": None, "totals": {},
        "residuals": {"0.weight": torch.randn(128)}, "momenta": {"0.weight": torch.randn(128)},
        "config": dataclasses.asdict(DGCConfig(density=0.01)),
    }
    sd.update(overrides)
    return sd


def test_construction_attaches_and_claims_nothing():
    model = _model()
    state = DGCState(model, density=0.01)
    assert isinstance(state, contract.Component)
    assert state in contract.attached(model)
    assert contract.claims(model) == {}
    assert state.masks() == {} and state.masks_gradients is False
    assert state.config.density == 0.01
    state.remove()
    assert state not in contract.attached(model) and state.removed


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        DGCState("model")


def test_module_is_a_deprecated_alias_of_model():
    model = _model()
    with pytest.warns(FutureWarning, match="`module` is deprecated"):
        state = DGCState(module=model, density=0.01)
    assert state in contract.attached(model)
    with pytest.raises(ValueError, match="not both"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        DGCState(model, module=model)


def test_step_is_the_method_and_reads_as_the_deprecated_count():
    state = DGCState(_model())
    assert state.step_count == 0
    state.step()  # accounts for one optimizer step
    with pytest.warns(FutureWarning, match="read `step_count`"):
        assert state.step == 0


def test_optimizer_is_checked_and_its_step_hook_calls_step():
    model = _model()
    with pytest.raises(ValueError, match="optimizer `momentum` must be 0"):
        DGCState(model, momentum=0.9, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    class Masking:  # a component that masks gradients: step() clears the state outside its new masks
        masks_gradients = True
        mask_version = 0

        def masks(self):
            return {"0.weight": self.mask}

    masking = Masking()
    masking.mask = torch.ones(16, 8, dtype=torch.bool)
    contract.attach(model, masking, claimed=["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = DGCState(model, optimizer=opt)
    state.load_state_dict(_state_dict(model, config=None))
    masking.mask[:8] = False
    masking.mask_version = 1
    opt.step()
    assert not state.residuals["0.weight"].view(16, 8)[:8].any()
    assert state.residuals["0.weight"].view(16, 8)[8:].all()
    assert not state.momenta["0.weight"].view(16, 8)[:8].any()
    state.remove()
    masking.mask[:] = False
    masking.mask_version = 2
    opt.step()  # the hook is gone
    assert state.residuals["0.weight"].view(16, 8)[8:].all()


def test_statistics_are_flat_floats():
    state = DGCState(_model(), density=0.01, warmup_steps=3)
    stats = state.statistics()
    assert all(k.startswith("compression/") and type(v) is float for k, v in stats.items())
    for key in ("step", "density", "sent_fraction", "payload_bytes", "wire_bytes", "dense_wire_bytes", "ratio",
                "compress_s", "total_wire_bytes", "total_dense_wire_bytes", "total_steps", "total_ratio"):
        assert f"compression/{key}" in stats
    assert stats["compression/density"] == 1.0 and stats["compression/ratio"] == 1.0


def test_state_dict_round_trip_and_previous_version():
    model = _model()
    state = DGCState(model, density=0.01)
    state.load_state_dict(_state_dict(model))
    saved = state.state_dict()
    assert saved["version"] == 2 and saved["config"]["density"] == 0.01 and saved["step"] == 5
    other = DGCState(_model(), density=0.01, check_finite=False, verify_every=3)  # not math fields
    other.load_state_dict(saved)
    assert other.step_count == 5 and torch.equal(other.residuals["0.weight"], saved["residuals"]["0.weight"])
    other.load_state_dict({**saved, "version": 1})  # what the previous release wrote
    assert other.step_count == 5


@pytest.mark.parametrize("field", MATH_FIELDS)
def test_a_config_differing_in_a_math_field_is_refused(field):
    model = _model()
    live = DGCConfig(density=0.01, momentum=0.5)
    other = {"density": 0.02, "warmup_steps": 3, "ramp_steps": 7, "momentum": 0.9, "nesterov": True,
             "momentum_masking": False, "error_feedback": False, "clip_norm": 1.0, "selection": "topk",
             "sample_ratio": 0.5, "min_numel": 7, "value_dtype": "bf16", "cost_rule": False, "fallback_dtype": "bf16"}
    saved = _state_dict(model, config=dataclasses.asdict(DGCConfig(**{**dataclasses.asdict(live),
                                                                       field: other[field]})))
    with pytest.raises(ValueError, match=f"saved with {field}="):
        DGCState(model, live).load_state_dict(saved)


@pytest.mark.parametrize(
    "residual,match",
    [
        ({"0.weight": torch.full((128,), float("nan"))}, r"'0.weight'.* non-finite"),
        ({"0.weight": torch.zeros(16, 8)}, r"'0.weight'.* must be a 1-D float tensor"),
        ({"0.weight": torch.zeros(128, dtype=torch.int64)}, r"'0.weight'.* must be a 1-D float tensor"),
        ({"5.weight": torch.zeros(128)}, r"'5.weight'.* names no parameter"),
        ({"0.weight": torch.zeros(100)}, r"'0.weight'.* has 100 elements, the parameter has 128"),
    ],
)
def test_loaded_tensors_are_validated(residual, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        DGCState(model, density=0.01).load_state_dict(_state_dict(model, residuals=residual))


def test_bad_state_dicts():
    state = DGCState(_model())
    with pytest.raises(ValueError, match="version 1 or 2, got 3"):
        state.load_state_dict({"version": 3})
    with pytest.raises(ValueError, match="full_state_dict"):
        state.load_full_state_dict({"version": 0, "world_size": 2, "ranks": []})
    with pytest.raises(ValueError, match="holds no rank's state"):
        state.load_full_state_dict({"version": 2, "world_size": 2, "ranks": None})


# ----------------------------------------------------------------------------- on 2 gloo ranks


def _ranks(rank, world):
    out = {}
    # the previous positional order (process group, config) still works
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = DGCState(dist.group.WORLD, DGCConfig(density=0.01))
    out["legacy_warned"] = any(issubclass(w.category, FutureWarning) for w in caught)
    out["legacy_group"] = legacy.process_group is dist.group.WORLD and legacy.config.density == 0.01

    state = DGCState(_model(), density=0.01)
    state.check_ranks()  # identical: passes
    diverged = DGCState(_model(), density=0.01 if rank == 0 else 0.02)
    try:
        diverged.check_ranks()
        out["diverged"] = None
    except contract.RankDivergenceError as err:
        out["diverged"] = str(err)

    # verify_every runs the check from step()
    late = DGCState(_model(), density=0.01, verify_every=2, momentum=0.5 * rank)
    late.step()
    try:
        late.step()
        out["verify_every"] = None
    except contract.RankDivergenceError as err:
        out["verify_every"] = str(err)

    # after remove(), the hook is a plain averaging all-reduce
    model = _model()
    ddp = DDP(model)
    state = DGCState(model, density=0.01, warmup_steps=2, ramp_steps=0, min_numel=1).register(ddp)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        model.zero_grad()
        ddp(x).sum().backward()
    compressed = [p.grad.clone() for p in model.parameters()]
    state.remove()
    model.zero_grad()
    ddp(x).sum().backward()
    after = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    local = [p.grad.clone() for p in model.parameters()]
    for g in local:
        dist.all_reduce(g)
        g.div_(world)
    out["removed_is_allreduce"] = all(torch.allclose(a, b) for a, b in zip(after, local))
    out["compressed_differs"] = any(not torch.allclose(a, b) for a, b in zip(compressed, local))
    out["removed_steps"] = state.step_count
    return out


@pytest.mark.slow
def test_on_two_ranks():
    results = run_distributed(_ranks, 2, timeout=180)
    for rank, r in enumerate(results):
        assert r["legacy_warned"] is (rank == 0) and r["legacy_group"]  # the deprecation is said once, by rank 0
        assert r["diverged"] is not None and "config" in r["diverged"]
        assert r["verify_every"] is not None and "config" in r["verify_every"]
        assert r["removed_is_allreduce"] is True
        assert r["compressed_differs"] is True
        assert r["removed_steps"] == 3


def test_what_the_previous_release_wrote_still_loads():
    model = _model()
    v1 = _state_dict(model, version=1)
    state = DGCState(model, density=0.01)
    state.load_full_state_dict({"version": 1, "world_size": 1, "ranks": [v1]})  # Lightning checkpoints
    assert state.step_count == 5 and torch.equal(state.momenta["0.weight"], v1["momenta"]["0.weight"])
    # a DGCState pickled by the previous release: its slots
    legacy = {"config": DGCConfig(density=0.01), "step": 3, "residuals": dict(v1["residuals"]), "momenta": {},
              "loss_scale": torch.tensor(1024.0), "_bound": True, "last_stats": {"step": 2.0}, "totals": {},
              "_acc": {}, "_step_open": False, "_nonfinite": None}
    copy = DGCState.__new__(DGCState)
    with pytest.warns(UserWarning, match="default group"):
        copy.__setstate__(legacy)
    assert copy.step_count == 3 and float(copy.loss_scale) == 1024.0 and copy.last_stats == {"step": 2.0}
    assert torch.equal(copy.residuals["0.weight"], v1["residuals"]["0.weight"])
