"""The DGC communication hook: options, contract with DDP, the DGC equations, resume, AMP safety.

The math tests feed chosen per-rank gradients through a real DDP model (``_Injector``: its
loss is ``sum(p * G)``, so ``p.grad`` is exactly ``G``) on 2 and 4 gloo ranks, and compare
what DDP hands to the optimizer, step by step, with ``_reference``: the DGC equations for
all ranks written out in one process.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain.compression import DENSITY_RAMP, DGCConfig, DGCState, check_optimizer, dgc_hook
from sparsetrain.demo import MLPClassifier, make_classification
from tests.harness import run_distributed

# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 0.0}, r"`density` must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"`density` must be in \(0, 1\], got 1.5"),
        ({"density": -0.1}, r"`density` must be in \(0, 1\]"),
        ({"momentum": -0.9}, r"`momentum` must be in \[0, 1\), got -0.9"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\)"),
        ({"nesterov": True}, r"`nesterov` needs `momentum` > 0"),
        ({"warmup_steps": 1}, r"`warmup_steps` must be >= 2"),
        ({"ramp_steps": -1}, r"`ramp_steps` must be >= 0"),
        ({"clip_norm": 0.0}, r"`clip_norm` must be > 0"),
        ({"selection": "random"}, r"`selection` must be 'topk' or 'threshold'"),
        ({"sample_ratio": 0.0}, r"`sample_ratio` must be in \(0, 1\]"),
        ({"min_numel": 0}, r"`min_numel` must be >= 1"),
        ({"value_dtype": "int8"}, r"`value_dtype` must be 'fp32', 'fp16' or 'bf16'"),
        ({"fallback_dtype": "fp16"}, r"`fallback_dtype` must be 'fp32' or 'bf16'"),
        ({"density": "0.1"}, r"`density` must be a number"),
        ({"cost_rule": 1}, r"`cost_rule` must be a bool"),
        ({"densty": 0.1}, r"unknown option `densty`"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DGCState(**kwargs)


def test_config_and_kwargs_are_exclusive():
    with pytest.raises(ValueError, match="either `config` or keyword options"):
        DGCState(config=DGCConfig(), density=0.1)


def test_density_schedule():
    cfg = DGCConfig(density=0.001, warmup_steps=3, ramp_steps=8)
    got = [cfg.density_at(t) for t in range(13)]
    assert got == [1.0] * 3 + [0.25] * 2 + [0.0625] * 2 + [0.015625] * 2 + [0.00390625] * 2 + [0.001] * 2
    assert DENSITY_RAMP == (0.25, 0.0625, 0.015625, 0.00390625)
    # the ramp never goes below the target, and ramp_steps=0 goes straight to it
    assert [DGCConfig(density=0.05, warmup_steps=2, ramp_steps=4).density_at(t) for t in range(2, 7)] == [
        0.25, 0.0625, 0.05, 0.05, 0.05]
    assert DGCConfig(density=0.01, warmup_steps=2, ramp_steps=0).density_at(2) == 0.01


def test_check_optimizer():
    model = nn.Linear(4, 4)
    state = DGCState(momentum=0.9)
    with pytest.raises(ValueError, match=r"optimizer `momentum` must be 0 .* SGD\(momentum=0\)"):
        check_optimizer(state, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    check_optimizer(state, torch.optim.SGD(model.parameters(), lr=0.1))
    check_optimizer(DGCState(momentum=0.0), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.warns(UserWarning, match="assumes plain SGD"):
        check_optimizer(state, torch.optim.AdamW(model.parameters()))


def test_register_rejects_a_model_that_is_not_ddp():
    with pytest.raises(ValueError, match="`model` must be a torch.nn.parallel.DistributedDataParallel"):
        DGCState().register(nn.Linear(4, 4))


# ----------------------------------------------------------------------------- gradient injection

SHAPES = {
    "w_big": (160, 128),  # 20480: compressed (sampled threshold at every density used)
    "bias": (48,),  # 1-D: dense
    "w_conv": (8, 4, 3, 3),  # 288: compressed (min_numel=100)
    "w_small": (4, 4),  # 16 < min_numel: dense
    "w_mid": (32, 40),  # 1280: compressed
}
BUCKET_MB = 0.006  # a few parameters per bucket


class _Injector(nn.Module):
    """``forward(G) = sum(p * G_p)``: backward leaves exactly ``G`` in ``p.grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterDict({n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()})

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((self.ps[n] * grads[n]).sum() for n in SHAPES)


def _grads(rank: int, step: int, spike: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        out[name] = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * (1 + i) * spike
    return out


def _ddp_injector(**ddp_kwargs) -> tuple[_Injector, DDP]:
    model = _Injector()
    return model, DDP(model, bucket_cap_mb=BUCKET_MB, **ddp_kwargs)


def _by_short_name(table):
    """State keys are parameter names (``ps.w_big``); give them back under the short name, shaped."""
    return {k.split(".")[-1]: v.clone().view(SHAPES[k.split(".")[-1]]) for k, v in table.items()}


def _run_hook(rank, steps, cfg, ddp_kwargs=None, grads_fn=_grads):
    model, ddp = _ddp_injector(**(ddp_kwargs or {}))
    state = DGCState(**cfg).register(ddp)
    out = []
    for t in range(steps):
        model.zero_grad(set_to_none=True)
        ddp(grads_fn(rank, t)).backward()
        out.append({
            "grad": {n: model.ps[n].grad.clone() for n in SHAPES},
            "residual": _by_short_name(state.residuals),
            "momentum": _by_short_name(state.momenta),
            "stats": dict(state.last_stats),
        })
    return out


# ----------------------------------------------------------------------------- the reference


def _ref_density(t: int, cfg: dict) -> float | None:
    """None during the dense warm-up."""
    if t < cfg["warmup_steps"]:
        return None
    t -= cfg["warmup_steps"]
    ramp = cfg.get("ramp_steps", 0)
    if ramp and t < ramp:
        return max(cfg["density"], [0.25, 0.0625, 0.015625, 0.00390625][t * 4 // ramp])
    return cfg["density"]


def _ref_select(x: torch.Tensor, k: int, t: int, density: float, cfg: dict) -> torch.Tensor:
    """Top-k of |x|; or DGC's sampled threshold: the (1.3 k)-th largest of a strided sample (scaled
    to the sample), lowered x0.8 until 0.8k pass (10 rounds at most), exact top-k among the
    candidates when more than k pass."""
    mag = x.abs()
    n = x.numel()
    by_size = torch.sort(mag, descending=True).indices
    if cfg.get("selection", "threshold") == "topk":
        return by_size[:k]
    stride = max(1, n // max(math.ceil(n * cfg.get("sample_ratio", 0.01)), math.ceil(32 / density)))
    if stride == 1:
        return by_size[:k]
    sample = mag[t % stride :: stride]
    ks = min(sample.numel(), max(1, math.ceil(1.3 * k * sample.numel() / n)))
    threshold = torch.sort(sample, descending=True).values[ks - 1]
    for round_ in range(10):
        cand = torch.nonzero(mag >= threshold).view(-1)
        if cand.numel() >= 0.8 * k or round_ == 9:
            break
        threshold = threshold * 0.8
    if cand.numel() > k:
        cand = cand[torch.sort(mag[cand], descending=True).indices[:k]]
    return cand


def _ref_fp16(vals: torch.Tensor) -> torch.Tensor:
    """Values as sent in fp16: scaled by the power of two that puts max |v| in [2^14, 2^15)."""
    amax = vals.abs().max()
    if not amax > 0:
        return vals.half().float()
    scale = 2.0 ** (math.floor(math.log2(amax.item())) + 1 - 15)
    return (vals / scale).half().float() * scale


def _reference(cfg: dict, world: int, steps: int, grads_fn=_grads):
    """Per step: the averaged gradient every rank must see, and each rank's residual and momentum."""
    m = cfg.get("momentum", 0.0)
    min_numel = cfg.get("min_numel", 1024)
    vbytes = {"fp32": 4, "fp16": 2, "bf16": 2}[cfg.get("value_dtype", "fp32")]
    u = [dict() for _ in range(world)]
    v = [dict() for _ in range(world)]
    out = []
    for t in range(steps):
        density = _ref_density(t, cfg)
        sent = [dict() for _ in range(world)]
        for r in range(world):
            grads = grads_fn(r, t)
            for name, shape in SHAPES.items():
                g = grads[name].flatten()
                n = g.numel()
                if cfg.get("clip_norm") is not None:
                    c = cfg["clip_norm"] / math.sqrt(world)
                    g = g * (c / (torch.linalg.vector_norm(g) + 1e-6)).clamp(max=1.0)
                if m > 0:
                    u_old = u[r].get(name, torch.zeros(n))
                    if cfg.get("nesterov"):
                        u[r][name] = (u_old + g) * m
                        a = u[r][name] + g
                    else:
                        u[r][name] = u_old * m + g
                        a = u[r][name]
                else:
                    a = g
                compressible = len(shape) >= 2 and n >= min_numel
                sparse = False
                if compressible and density is not None:
                    k = max(1, math.ceil(n * density))
                    sparse = not cfg.get("cost_rule", True) or world * k * (4 + vbytes) < 2 * n * 4
                total = a + v[r][name] if name in v[r] else a.clone()
                if sparse:
                    idx = _ref_select(total, k, t, density, cfg)
                    vals = total[idx]
                    if cfg.get("value_dtype", "fp32") == "fp16":
                        vals = _ref_fp16(vals)
                    elif cfg.get("value_dtype", "fp32") == "bf16":
                        vals = vals.bfloat16().float()
                    msg = torch.zeros(n)
                    msg[idx] = vals
                    sent[r][name] = msg
                    if cfg.get("error_feedback", True):
                        total[idx] = total[idx] - vals
                        v[r][name] = total
                    if m > 0 and cfg.get("momentum_masking", True):
                        u[r][name][idx] = 0.0
                else:
                    sent[r][name] = total
                    if name in v[r]:
                        v[r][name] = torch.zeros(n)
        avg = {}
        for name, shape in SHAPES.items():
            acc = sent[0][name] / world
            for r in range(1, world):
                acc = acc + sent[r][name] / world
            avg[name] = acc.view(shape)
        out.append({
            "grad": avg,
            "residual": [{k: x.view(SHAPES[k]).clone() for k, x in v[r].items()} for r in range(world)],
            "momentum": [{k: x.view(SHAPES[k]).clone() for k, x in u[r].items()} for r in range(world)],
        })
    return out


MATH_CONFIGS = {
    "error_feedback": {"density": 0.05, "warmup_steps": 2, "ramp_steps": 0, "min_numel": 100},
    "momentum_clip_ramp": {"density": 0.02, "warmup_steps": 3, "ramp_steps": 8, "momentum": 0.9, "clip_norm": 5.0,
                           "min_numel": 100},
    "nesterov_fp16_nomask": {"density": 0.05, "warmup_steps": 2, "ramp_steps": 0, "momentum": 0.5,
                             "nesterov": True, "momentum_masking": False, "value_dtype": "fp16",
                             "min_numel": 100},
    "no_feedback_bf16": {"density": 0.1, "warmup_steps": 2, "ramp_steps": 0, "error_feedback": False,
                         "value_dtype": "bf16", "cost_rule": False, "min_numel": 100},
}
MATH_STEPS = 20


# 4 ranks on 2 cores are slow: there, the two configurations that carry every rule of the algorithm
# (feedback, momentum correction, masking, clipping, ramp, cost rule); 2 ranks run all four.
CONFIGS_BY_WORLD = {2: tuple(MATH_CONFIGS), 4: ("error_feedback", "momentum_clip_ramp")}


def _math_ranks(rank, world):
    return {(selection, name): _run_hook(rank, MATH_STEPS, {**MATH_CONFIGS[name], "selection": selection})
            for selection in ("topk", "threshold") for name in CONFIGS_BY_WORLD[world]}


_MATH_RUNS: dict[int, list] = {}


def _math_results(world: int, selection: str) -> list[dict]:
    """Per rank: {config name: per-step records}; one spawn per world size serves every test."""
    if world not in _MATH_RUNS:
        _MATH_RUNS[world] = run_distributed(_math_ranks, world, timeout=300)
    return [{name: r[(selection, name)] for name in CONFIGS_BY_WORLD[world]} for r in _MATH_RUNS[world]]


def _close(actual, expected, what):
    # A dense all-reduce on 4 gloo ranks sums in gloo's order, not rank order: allow rounding.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["topk", "threshold"])
@pytest.mark.parametrize("world", [2, 4])
def test_updates_match_the_dgc_equations(world, selection):
    results = _math_results(world, selection)
    for name in CONFIGS_BY_WORLD[world]:
        cfg = MATH_CONFIGS[name]
        ref = _reference({**cfg, "selection": selection}, world, MATH_STEPS)
        for t in range(MATH_STEPS):
            for r in range(world):
                got = results[r][name][t]
                for p in SHAPES:
                    # every rank applies the same update, bit for bit
                    assert torch.equal(got["grad"][p], results[0][name][t]["grad"][p]), (name, t, r, p)
                    _close(got["grad"][p], ref[t]["grad"][p], f"{name} step {t} rank {r} grad {p}")
                assert set(got["residual"]) >= set(ref[t]["residual"][r]), (name, t)
                for p, x in got["residual"].items():  # a compressible tensor not yet sent sparsely: zeros
                    x = ref[t]["residual"][r].get(p, torch.zeros_like(x))
                    _close(got["residual"][p], x, f"{name} step {t} rank {r} residual {p}")
                assert set(got["momentum"]) == set(ref[t]["momentum"][r]), (name, t)
                for p, x in ref[t]["momentum"][r].items():
                    _close(got["momentum"][p], x, f"{name} step {t} rank {r} momentum {p}")
        # the compressed steps really were compressed
        assert results[0][name][-1]["stats"]["sent_fraction"] < 0.5


@pytest.mark.slow
def test_nothing_is_lost_residual_plus_sent_is_the_accumulated_gradient():
    world = 2
    cfg = MATH_CONFIGS["error_feedback"]
    results = _math_results(world, "threshold")
    prev = {p: torch.zeros(s) for p, s in SHAPES.items()}
    for t in range(MATH_STEPS):
        for p, shape in SHAPES.items():
            residual = sum(results[r]["error_feedback"][t]["residual"].get(p, torch.zeros(shape)) for r in range(world))
            sent = world * results[0]["error_feedback"][t]["grad"][p]
            grads = sum(_grads(r, t)[p] for r in range(world))
            torch.testing.assert_close(residual + sent, prev[p] + grads, rtol=1e-5, atol=1e-5)
            prev[p] = residual
        assert cfg["density"] < 1


# ----------------------------------------------------------------------------- DDP contract


def _mlp_ddp(hook_state=None, hook=None, **ddp_kwargs):
    torch.manual_seed(0)
    model = MLPClassifier(in_features=64, hidden=128, n_classes=8)
    ddp = DDP(model, bucket_cap_mb=0.05, **ddp_kwargs)
    if hook is not None:
        ddp.register_comm_hook(hook_state, hook)
    return model, ddp


def _mlp_batches(rank, steps):
    x, y = make_classification(64 * steps * 2, 64, 8, seed=rank).tensors
    return [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(steps * 2)]


def _train_mlp(model, ddp, batches, steps, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads = []
    for t in range(steps):
        x, y = batches[t]
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def _contract_ranks(rank, world, ckpt_dir):
    out = {"resume": _resume_part(rank, ckpt_dir), "amp": _amp_part(rank)}
    steps = 5
    batches = _mlp_batches(rank, steps)
    # parity with allreduce_hook at density 1, through the cost rule and through the sparse path
    base = _train_mlp(*_mlp_ddp(None, default_hooks.allreduce_hook), batches, steps)
    for name, cost_rule in (("dense_rule", True), ("sparse_path", False)):
        state = DGCState(density=1.0, warmup_steps=2, ramp_steps=0, cost_rule=cost_rule, min_numel=1)
        got = _train_mlp(*_mlp_ddp(state, dgc_hook), batches, steps)
        out[name] = all(torch.equal(a, b) for ga, gb in zip(base, got) for a, b in zip(ga, gb))
        out[name + "_sparse_buckets"] = state.totals and state.last_stats["sparse_buckets"]

    # registering twice
    model, ddp = _mlp_ddp()
    state = DGCState().register(ddp)
    try:
        ddp.register_comm_hook(state, dgc_hook)
        out["twice"] = "no error"
    except RuntimeError as err:
        out["twice"] = str(err)

    # no_sync: two micro-batches accumulated, against one backward of their sum
    cfg = {"density": 0.05, "warmup_steps": 2, "ramp_steps": 0, "min_numel": 100, "momentum": 0.9}
    model, ddp = _ddp_injector()
    state = DGCState(**cfg).register(ddp)
    acc_grads = []
    for t in range(6):
        model.zero_grad(set_to_none=True)
        with ddp.no_sync():
            ddp(_grads(rank, 2 * t)).backward()
        ddp(_grads(rank, 2 * t + 1)).backward()
        acc_grads.append({n: model.ps[n].grad.clone() for n in SHAPES})
    out["no_sync_steps"] = state.step_count

    def summed(r, t):
        a, b = _grads(r, 2 * t), _grads(r, 2 * t + 1)
        return {n: a[n] + b[n] for n in SHAPES}

    single = _run_hook(rank, 6, cfg, grads_fn=summed)
    out["no_sync"] = all(torch.equal(acc_grads[t][n], single[t]["grad"][n]) for t in range(6) for n in SHAPES)

    # static_graph and gradient_as_bucket_view give the same gradients as the default DDP
    plain = _run_hook(rank, 8, cfg)
    for flag in ("static_graph", "gradient_as_bucket_view"):
        other = _run_hook(rank, 8, cfg, ddp_kwargs={flag: True})
        out[flag] = all(torch.equal(plain[t]["grad"][n], other[t]["grad"][n]) for t in range(8) for n in SHAPES)

    # pickling round trip
    model, ddp = _ddp_injector()
    state = DGCState(**cfg).register(ddp)
    for t in range(4):
        model.zero_grad(set_to_none=True)
        ddp(_grads(rank, t)).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy = pickle.loads(pickle.dumps(state))
    out["pickle_warned"] = any("default group" in str(w.message) for w in caught)
    out["pickle_equal"] = (
        copy.step_count == state.step_count == 4
        and copy.config == state.config
        and copy.process_group is None
        and set(copy.residuals) == set(state.residuals) != set()
        and all(torch.equal(copy.residuals[k], state.residuals[k]) for k in state.residuals)
        and all(torch.equal(copy.momenta[k], state.momenta[k]) for k in state.momenta)
    )
    buf = io.BytesIO()
    torch.save(state.full_state_dict(), buf)
    buf.seek(0)
    full = torch.load(buf, weights_only=True)
    # gathered on rank 0 only, which writes the checkpoint
    out["full_ranks"] = None if full["ranks"] is None else len(full["ranks"])
    out["full_own"] = rank != 0 or all(torch.equal(full["ranks"][rank]["residuals"][k], state.residuals[k])
                                       for k in state.residuals)
    return out


@pytest.fixture(scope="module")
def contract():
    """One 2-rank spawn runs every DDP-contract, resume and AMP scenario; the tests below read it."""
    with tempfile.TemporaryDirectory() as tmp:
        return run_distributed(_contract_ranks, 2, tmp, timeout=300)


@pytest.mark.slow
def test_density_one_equals_allreduce_hook(contract):
    for r in contract:
        assert r["dense_rule"] is True
        assert r["sparse_path"] is True
        assert r["sparse_path_sparse_buckets"] > 0  # really went through the all-gather
        assert r["dense_rule_sparse_buckets"] == 0


@pytest.mark.slow
def test_registering_twice_raises(contract):
    assert "only be called once" in contract[0]["twice"]


@pytest.mark.slow
def test_no_sync_accumulation(contract):
    for r in contract:
        assert r["no_sync"] is True
        assert r["no_sync_steps"] == 6  # only synced steps count


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["static_graph", "gradient_as_bucket_view"])
def test_ddp_modes(contract, flag):
    for r in contract:
        assert r[flag] is True


@pytest.mark.slow
def test_pickling_and_state_dict(contract):
    for r in contract:
        assert r["pickle_equal"] is True
        assert r["pickle_warned"] is True
        assert r["full_own"] is True
    assert [r["full_ranks"] for r in contract] == [2, None]


# ----------------------------------------------------------------------------- resume

RESUME_CFG = {"density": 0.02, "warmup_steps": 2, "ramp_steps": 4, "momentum": 0.9, "min_numel": 100,
              "value_dtype": "fp16"}


def _resume_part(rank, ckpt_dir):
    steps, stop = 12, 7
    batches = _mlp_batches(rank, steps)

    def fresh():
        model, ddp = _mlp_ddp()
        state = DGCState(**RESUME_CFG).register(ddp)
        return model, ddp, state, torch.optim.SGD(model.parameters(), lr=0.05)

    def train(model, ddp, opt, ts):
        for t in ts:
            x, y = batches[t]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    model, ddp, state, opt = fresh()
    train(model, ddp, opt, range(steps))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, ddp, state, opt = fresh()
    train(model, ddp, opt, range(stop))
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "dgc": state.full_state_dict()}
    path = os.path.join(ckpt_dir, "ckpt.pt")
    if rank == 0:
        torch.save(ckpt, path)
    dist.barrier()
    del model, ddp, state, opt

    model, ddp, state, opt = fresh()
    loaded = torch.load(path, weights_only=True)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["opt"])
    state.load_full_state_dict(loaded["dgc"])
    train(model, ddp, opt, range(stop, steps))
    resumed = [p.detach().clone() for p in model.parameters()]
    return all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)), state.step_count


@pytest.mark.slow
def test_resume_is_bit_identical(contract):
    for same, step in (r["resume"] for r in contract):
        assert same is True
        assert step == 12


# ----------------------------------------------------------------------------- AMP safety

AMP_CFG = {"density": 0.05, "warmup_steps": 2, "ramp_steps": 0, "momentum": 0.9, "min_numel": 100}
BAD_STEP = 4


def _inf_on_rank1(rank, step):
    grads = _grads(rank, step)
    if rank == 1 and step == BAD_STEP:
        grads["w_mid"][3, 5] = float("inf")
    return grads


def _amp_part(rank):
    out = {}
    # a non-finite gradient on one rank: every rank gets non-finite gradients, no state moves
    model, ddp = _ddp_injector()
    state = DGCState(**AMP_CFG).register(ddp)
    before = after = None
    for t in range(BAD_STEP + 3):
        if t == BAD_STEP:
            before = ({k: v.clone() for k, v in state.residuals.items()},
                      {k: v.clone() for k, v in state.momenta.items()})
        model.zero_grad(set_to_none=True)
        ddp(_inf_on_rank1(rank, t)).backward()
        if t == BAD_STEP:
            after = (state.residuals, state.momenta)
            out["bad_grad_finite"] = {n: bool(torch.isfinite(model.ps[n].grad).all()) for n in SHAPES}
            out["state_unchanged"] = all(
                torch.equal(before[i][k], after[i][k]) for i in range(2) for k in before[i]
            ) and set(before[0]) == set(after[0])
        else:
            out.setdefault("later_finite", []).append(all(torch.isfinite(model.ps[n].grad).all() for n in SHAPES))
    out["state_finite"] = all(torch.isfinite(v).all() for v in (*state.residuals.values(), *state.momenta.values()))
    out["nonfinite_steps"] = state.nonfinite_steps

    # a GradScaler's changing loss scale: the state follows it, so the unscaled updates are those
    # of an unscaled run
    scales = [2.0**16, 2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**17, 2.0**10, 2.0**10]
    scaler = torch.amp.GradScaler("cpu", init_scale=scales[0])
    scaler.scale(torch.ones(()))  # creates the scale tensor
    model, ddp = _ddp_injector()
    state = DGCState(**AMP_CFG, grad_scaler=scaler).register(ddp)
    scaled = []
    for t, s in enumerate(scales):
        scaler.update(new_scale=s)
        model.zero_grad(set_to_none=True)
        ddp({n: g * s for n, g in _grads(rank, t).items()}).backward()
        scaled.append({n: model.ps[n].grad / s for n in SHAPES})
    plain = _run_hook(rank, len(scales), AMP_CFG)
    out["scaler_exact"] = all(torch.equal(scaled[t][n], plain[t]["grad"][n]) for t in range(len(scales))
                              for n in SHAPES)
    return out


@pytest.mark.slow
def test_amp_safety(contract):
    for r in (c["amp"] for c in contract):
        # the bucket holding w_mid is non-finite on every rank (so a GradScaler skips the step) ...
        assert r["bad_grad_finite"]["w_mid"] is False
        # ... and no residual or momentum took the step, on either rank
        assert r["state_unchanged"] is True
        assert r["nonfinite_steps"] == 1
        assert all(r["later_finite"])
        assert r["state_finite"] is True
        assert r["scaler_exact"] is True
