"""A table of bad inputs to the public entries: the core, the callbacks, a run's checkpoints, the launcher.

Every row builds what it needs on a fresh model (``setup``), takes a snapshot of the model's
``state_dict()``, makes the bad call (``act``) and checks that it fails with a ``ValueError`` /
``TypeError`` whose message names the argument, and that the model's state is unchanged: a bad
input is refused before anything is written. A row whose setup returns a run directory also checks
that no file in it was written, moved or removed. Bad recipes, ``--set`` overrides and arguments of
``sparsetrain train`` (exit 2, no run directory written, the recipe unchanged) are the table of
``tests/sparsetrain/test_bad_recipe_inputs.py``; the launcher's command line, ``tests/launch/test_cli.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sparsetrain.callbacks import DynamicSparsity, GradientCompression, NMSparsity
from sparsetrain.launch import LaunchConfig, SlurmOptions
from torch import nn

from sparsetrain.compression import DGCConfig, DGCState
from sparsetrain.moe import MoE, gather_expert_stack
from sparsetrain.nm import NMConfig, NMSparsifier, pack_mask, permute_for_nm, unpack_mask
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig
from sparsetrain.train import resume_checkpoint


class Net(nn.Module):
    """A user's model (not one of ours): two blocks of Linear layers around a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


@dataclass
class Row:
    id: str
    act: Callable[[nn.Module, Any], Any]
    error: type[Exception]
    match: str
    setup: Callable[[nn.Module], Any] = lambda model: None


def _dgc(model: nn.Module) -> DGCState:
    return DGCState(model, density=0.1)


def _dgc_state(model: nn.Module, **edit: Any) -> dict[str, Any]:
    state = DGCState(model, density=0.1).state_dict()
    state["residuals"] = {n: torch.randn(p.numel()) for n, p in model.named_parameters()}
    state["momenta"] = {n: torch.zeros(p.numel()) for n, p in model.named_parameters()}
    state.update(edit)
    return state


def _with_nan(table: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    table = dict(table)
    table[name] = table[name].clone()
    table[name][0] = float("nan")
    return table


def _dyn(model: nn.Module) -> DynamicSparsifier:
    return DynamicSparsifier(model, method="rigl", sparsity=0.5, update_every=2, total_steps=10)


def _dyn_state(sp: DynamicSparsifier, drop: str | None = None, **edit: Any) -> dict[str, Any]:
    state = sp.state_dict()
    if drop:
        state.pop(drop)
    state.update(edit)
    return state


def _model_state(model: nn.Module, key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[key] = value(state[key])
    return state


def _nm(model: nn.Module) -> NMSparsifier:
    return NMSparsifier(model, NMConfig(n=2, m=4, include=["body.*"]))


def _nm_state(sp: NMSparsifier, drop: str | None = None, **edit: Any) -> dict[str, Any]:
    state = sp.state_dict()
    if drop:
        state.pop(drop)
    state.update(edit)
    return state


def _nan_weight(model: nn.Module, nm: bool = False) -> Any:
    with torch.no_grad():
        model.body[2].weight[0, 0] = float("nan")
    return _nm(model) if nm else None


ROWS = [
    # ---------------------------------------------------------------- DGCState: construction
    Row("dgc-process-group-name", lambda m, _: DGCState(m, process_group="gloo"), TypeError, "`process_group`.*'gloo'"),
    Row("dgc-model-string", lambda m, _: DGCState("net"), TypeError, "`model` must be a torch.nn.Module"),
    Row("dgc-density", lambda m, _: DGCState(m, density=2), ValueError, r"`density` must be in \(0, 1\], got 2"),
    Row("dgc-momentum", lambda m, _: DGCState(m, momentum=1.5), ValueError, "`momentum` must be in"),
    Row("dgc-warmup", lambda m, _: DGCState(m, warmup_steps=1), ValueError, "`warmup_steps` must be >= 2"),
    Row("dgc-unknown-option", lambda m, _: DGCState(m, densty=0.1), ValueError, "unknown option `densty`"),
    Row("dgc-config-dict", lambda m, _: DGCState(m, config={"density": 0.1}), ValueError,
        "`config` must be a DGCConfig"),
    Row("dgc-bool-string", lambda m, _: DGCConfig(momentum_masking="no"), ValueError,
        "`momentum_masking` must be a bool, got 'no'"),
    Row("dgc-sparse-embedding", lambda m, _: DGCState(nn.Sequential(m, nn.Embedding(4, 4, sparse=True))), ValueError,
        r"sparse=True \(1\)"),
    # ---------------------------------------------------------------- DGCState: loaded state
    Row("dgc-nan-residual", lambda m, s: s.load_state_dict(
        _dgc_state(m, residuals=_with_nan(_dgc_state(m)["residuals"], "stem.weight"))), ValueError,
        "'stem.weight' holds non-finite values", _dgc),
    Row("dgc-inf-momentum", lambda m, s: s.load_state_dict(
        _dgc_state(m, momenta={**_dgc_state(m)["momenta"], "head.bias": torch.full((4,), float("inf"))})),
        ValueError, "'head.bias' holds non-finite values", _dgc),
    Row("dgc-unknown-parameter", lambda m, s: s.load_state_dict(
        _dgc_state(m, residuals={"ghost.weight": torch.zeros(3)})), ValueError,
        "'ghost.weight' names no parameter", _dgc),
    Row("dgc-residual-size", lambda m, s: s.load_state_dict(
        _dgc_state(m, residuals={"stem.weight": torch.zeros(3)})), ValueError, "has 3 elements", _dgc),
    Row("dgc-residual-int", lambda m, s: s.load_state_dict(
        _dgc_state(m, residuals={"stem.bias": torch.zeros(32, dtype=torch.int64)})), ValueError,
        "must be a 1-D float tensor", _dgc),
    Row("dgc-truncated-step", lambda m, s: s.load_state_dict(
        {k: v for k, v in _dgc_state(m).items() if k != "step"}), ValueError, r"`state_dict\['step'\]`", _dgc),
    Row("dgc-version", lambda m, s: s.load_state_dict(_dgc_state(m, version=9)), ValueError, "version 1 or 2, got 9",
        _dgc),
    Row("dgc-math-change", lambda m, s: s.load_state_dict(_dgc_state(m, config={**asdict_dgc(), "density": 0.5})),
        ValueError, "saved with density=0.5", _dgc),
    Row("dgc-full-ranks-empty", lambda m, s: s.load_full_state_dict({"version": 2, "ranks": []}), ValueError,
        r"`full\['ranks'\]` holds no rank's state", _dgc),
    Row("dgc-full-not-full", lambda m, s: s.load_full_state_dict(_dgc_state(m)), ValueError,
        "must come from DGCState.full_state_dict", _dgc),
    Row("dgc-full-truncated-ranks", lambda m, s: s.load_full_state_dict(
        {"version": 2, "ranks": [_dgc_state(m), {"version": 2}]}), ValueError,
        r"`full\['ranks'\]\[1\]\['residuals'\]`", _dgc),
    # ---------------------------------------------------------------- DynamicSparsifier: construction
    Row("dyn-model-string", lambda m, _: DynamicSparsifier("net", sparsity=0.5), TypeError,
        "`model` must be a torch.nn.Module, got str"),
    Row("dyn-drop-fraction-string", lambda m, _: DynamicSparsifier(m, drop_fraction="0.3"), TypeError,
        "`drop_fraction` must be a finite number, got '0.3'"),
    Row("dyn-total-steps-nan", lambda m, _: DynamicSparsifier(m, sparsity=0.5, total_steps=float("nan")), ValueError,
        "`total_steps` must be an int >= 1, got nan"),
    Row("dyn-sparsity-one", lambda m, _: DynamicSparsifier(m, sparsity=1.0), ValueError,
        r"`sparsity` must be in \[0, 1\)"),
    Row("dyn-method", lambda m, _: DynamicSparsifier(m, method="lottery"), ValueError, "`method` must be one of"),
    Row("dyn-update-every", lambda m, _: DynamicSparsifier(m, update_every=0), ValueError,
        "`update_every` must be an int >= 1"),
    Row("dyn-include-string", lambda m, _: DynamicSparsifier(m, include="stem"), ValueError,
        "`include` must be a list of glob strings"),
    Row("dyn-include-no-match", lambda m, _: DynamicSparsifier(m, include=["encoder.*"]), ValueError,
        "`include` pattern 'encoder.\\*' matches no layer"),
    Row("dyn-bool-string", lambda m, _: DynamicSparsifier(m, keep_first_dense="no"), TypeError,
        "`keep_first_dense` must be a bool"),
    Row("moe-gather-not-a-layer", lambda m, _: gather_expert_stack(nn.Linear(2, 2), torch.zeros(4, 2)), TypeError,
        "`layer` must be an MoE layer"),
    Row("moe-gather-wrong-experts", lambda m, _: gather_expert_stack(MoE(8, 16, 4, 2), torch.zeros(3, 2)), ValueError,
        r"`t` must hold this rank's 4 experts along dim 0, got shape \(3, 2\)"),
    Row("dyn-expert-group-string", lambda m, _: DynamicSparsifier(m, sparsity=0.5, expert_group="edp"), TypeError,
        "`expert_group` must be a torch.distributed ProcessGroup or None, got str"),
    Row("dyn-config-and-fields", lambda m, _: DynamicSparsifier(m, DynamicSparsityConfig(), sparsity=0.5), ValueError,
        "give either `config` or its fields"),
    # ---------------------------------------------------------------- DynamicSparsifier: loaded masks and state
    Row("dyn-mask-all-false", lambda m, _: m.load_state_dict(
        _model_state(m, "stem.weight_mask", torch.zeros_like)), ValueError, "keeps no weight", _dyn),
    Row("dyn-mask-float", lambda m, _: m.load_state_dict(
        _model_state(m, "stem.weight_mask", lambda t: t.float())), ValueError, "must be a bool tensor", _dyn),
    Row("dyn-mask-shape", lambda m, _: m.load_state_dict(
        _model_state(m, "stem.weight_mask", lambda t: t.t().contiguous())), ValueError, "has shape", _dyn),
    Row("dyn-mask-density", lambda m, _: m.load_state_dict(
        _model_state(m, "stem.weight_mask", torch.ones_like)), ValueError, "keeps 512 of 512 weights", _dyn),
    Row("dyn-state-truncated-step", lambda m, s: s.load_state_dict(_dyn_state(s, drop="step")), ValueError,
        "truncated: it has no 'step'", _dyn),
    Row("dyn-state-truncated-method", lambda m, s: s.load_state_dict(_dyn_state(s, drop="method")), ValueError,
        "truncated: it has no 'method'", _dyn),
    Row("dyn-state-version", lambda m, s: s.load_state_dict(_dyn_state(s, version=7)), ValueError,
        "version must be 1 or 2, got 7", _dyn),
    Row("dyn-state-rng", lambda m, s: s.load_state_dict(_dyn_state(s, rng_state=torch.zeros(4))), ValueError,
        r"`state\['rng_state'\]` must be a uint8 tensor", _dyn),
    Row("dyn-state-ever-active-float", lambda m, s: s.load_state_dict(_dyn_state(
        s, ever_active={k: v.float() for k, v in s.state_dict()["ever_active"].items()})), ValueError,
        r"`state\['ever_active'\]\['stem'\]` must be a bool tensor", _dyn),
    Row("dyn-state-math-change", lambda m, s: s.load_state_dict(_dyn_state(
        s, config={**s.state_dict()["config"], "sparsity": 0.9})), ValueError, "saved with sparsity=0.9", _dyn),
    Row("dyn-state-not-a-dict", lambda m, s: s.load_state_dict([1, 2]), ValueError, "`state` must be a dict", _dyn),
    Row("dyn-nan-weight-update", lambda m, s: s.step(), ValueError, r"layer\(s\) body.2 hold NaN",
        lambda m: (_nan_weight(m), DynamicSparsifier(m, method="gmp", sparsity=0.5, update_every=1,
                                                     total_steps=10))[1]),
    # ---------------------------------------------------------------- N:M
    Row("nm-n-equals-m", lambda m, _: NMConfig(n=4, m=4), ValueError, "`n` must be < `m`"),
    Row("nm-method", lambda m, _: NMConfig(n=2, m=4, method="magic"), ValueError, "`method` must be one of"),
    Row("nm-include-string", lambda m, _: NMConfig(n=2, m=4, include="body.*"), ValueError,
        "`include` must be a list of glob strings"),
    Row("nm-update-every", lambda m, _: NMConfig(n=2, m=4, update_every=-1), ValueError, "`update_every` must be"),
    Row("nm-model-string", lambda m, _: NMSparsifier("net", NMConfig(n=2, m=4)), TypeError,
        "`model` must be a torch.nn.Module, got str"),
    Row("nm-nan-weight", lambda m, s: s.refresh(), ValueError, r"layer\(s\) body.2 hold NaN",
        lambda m: _nan_weight(m, nm=True)),
    Row("nm-state-truncated-step", lambda m, s: s.load_state_dict(_nm_state(s, drop="step")), ValueError,
        "truncated: it has no 'step'", _nm),
    Row("nm-state-truncated-mask", lambda m, s: s.load_state_dict(_nm_state(
        s, masks={k: v[:-1] for k, v in s.state_dict()["masks"].items()})), ValueError, "is truncated", _nm),
    Row("nm-state-version", lambda m, s: s.load_state_dict(_nm_state(s, version=5)), ValueError, "version 5", _nm),
    Row("nm-unpack-truncated", lambda m, _: unpack_mask(pack_mask(torch.ones(4, 16, dtype=torch.bool))[:-1], (4, 16)),
        ValueError, "`packed` holds 7 bytes"),
    Row("permute-model-string", lambda m, _: permute_for_nm("net", 2, 4), TypeError,
        "`model` must be a torch.nn.Module"),
    Row("permute-seed-string", lambda m, _: permute_for_nm(m, 2, 4, seed="x"), TypeError, "`seed` must be an int"),
    Row("permute-n-m", lambda m, _: permute_for_nm(m, 3, 2), ValueError, "`n`"),
    # ---------------------------------------------------------------- callbacks
    Row("cb-dyn-bool-string", lambda m, _: DynamicSparsity(log_per_layer="yes"), TypeError,
        "`log_per_layer` must be True or False, got 'yes'"),
    Row("cb-dyn-check-sync-string", lambda m, _: DynamicSparsity(check_sync="no"), ValueError,
        "`check_sync` must be a bool, got 'no'"),
    Row("cb-dyn-unknown", lambda m, _: DynamicSparsity(sparsty=0.9), TypeError, "unexpected argument `sparsty`"),
    Row("cb-dyn-sparsity-string", lambda m, _: DynamicSparsity(sparsity="0.9"), ValueError, "`sparsity` must be in"),
    Row("cb-dyn-grad-masking", lambda m, _: DynamicSparsity(grad_masking="always"), ValueError, "`grad_masking`"),
    Row("cb-dyn-drop-fraction-string", lambda m, _: DynamicSparsity(drop_fraction="0.3"), TypeError,
        "`drop_fraction` must be a finite number"),
    Row("cb-nm-finalize-string", lambda m, _: NMSparsity(finalize="no"), TypeError, "`finalize` must be True or False"),
    Row("cb-nm-stages", lambda m, _: NMSparsity(stages=["4-8"]), ValueError, "`stages` entries must look like"),
    Row("cb-nm-decay-fraction", lambda m, _: NMSparsity(decay_fraction=0), ValueError, "`decay_fraction` must be in"),
    Row("cb-gc-fresh-state-string", lambda m, _: GradientCompression(fresh_state_ok="yes"), TypeError,
        "`fresh_state_ok` must be True or False"),
    Row("cb-gc-density", lambda m, _: GradientCompression(density=-1), ValueError, "`density` must be in"),
    Row("cb-gc-log-every", lambda m, _: GradientCompression(log_every_n_steps=-1), ValueError,
        "`log_every_n_steps` must be an int >= 0"),
    Row("cb-missing-state", lambda m, _: DynamicSparsity(sparsity=0.5).on_load_checkpoint(
        None, None, {"callbacks": {}}), ValueError, "has no state for DynamicSparsity.*fresh_state_ok=True"),
    Row("cb-nm-missing-state", lambda m, _: NMSparsity(n=2, m=4).on_load_checkpoint(
        None, None, {"callbacks": {"Other": {}}}), ValueError, "has no state for NMSparsity"),
    # ---------------------------------------------------------------- checkpoints of a run
    Row("run-corrupt-checkpoints", lambda m, d: resume_checkpoint(d), ValueError,
        "no valid checkpoint to resume from in .*last.ckpt", lambda m: _corrupt_run_dir()),
    # ---------------------------------------------------------------- launcher
    Row("launch-backend", lambda m, _: LaunchConfig(backend="mpi"), ValueError, "`backend` must be one of"),
    Row("launch-nnodes", lambda m, _: LaunchConfig(backend="torchrun", nnodes=0), ValueError,
        "`nnodes` must be >= 1, got 0"),
    Row("launch-node-rank", lambda m, _: LaunchConfig(backend="torchrun", nnodes=2, node_rank=5, master_addr="h"),
        ValueError, r"`node_rank` must be in \[0, nnodes\)"),
    Row("launch-nproc-string", lambda m, _: LaunchConfig(backend="torchrun", nproc_per_node="2"), ValueError,
        "`nproc_per_node` must be an integer, got '2'"),
    Row("slurm-time", lambda m, _: SlurmOptions(time="soon"), ValueError, "`time` must be a SLURM time"),
    Row("slurm-env-name", lambda m, _: SlurmOptions(env={"1X": "3"}), ValueError, "`env` entries must be NAME"),
]


def _corrupt_run_dir() -> Path:
    """A run's checkpoint directory whose only checkpoint is cut short (the act must leave it as is)."""
    d = Path(tempfile.mkdtemp())
    (d / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    return d


def _files(ctx: Any) -> dict[str, bytes] | None:
    if not isinstance(ctx, Path):
        return None
    return {str(f.relative_to(ctx)): f.read_bytes() for f in sorted(ctx.rglob("*")) if f.is_file()}


def asdict_dgc() -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(DGCConfig(density=0.1))


def test_the_table_is_large_and_its_ids_unique():
    assert len(ROWS) >= 60
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_fails_clearly_and_changes_nothing(row: Row):
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings of the setup (e.g. deprecated spellings) are not under test
        ctx = row.setup(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = _files(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(row.error, match=row.match):
            row.act(model, ctx)
    assert _files(ctx) == files  # a run directory: nothing written, moved or removed
    if isinstance(ctx, Path):
        shutil.rmtree(ctx)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() and torch.equal(
            before[k].nan_to_num(), after[k].nan_to_num()), k
