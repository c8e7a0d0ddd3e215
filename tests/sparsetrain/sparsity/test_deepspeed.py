"""DeepSpeed ZeRO-1/2 on CPU (gloo, 2 ranks): the fp32 master weights and Adam moments stay masked."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.demo import MLPClassifier, make_classification
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig
from tests.harness import run_distributed

pytest.importorskip("deepspeed")

STEPS = 8
def _layer_masks(sp):
    """Module name -> mask (``masks()`` is keyed by parameter name)."""
    return {name.rpartition(".")[0]: mask for name, mask in sp.masks().items()}


DATA = make_classification(n=16 * STEPS, in_features=16, n_classes=4, seed=0).tensors


def _batch(step, rank, world):
    x, y = DATA[0][16 * step : 16 * (step + 1)], DATA[1][16 * step : 16 * (step + 1)]
    return x[rank::world], y[rank::world]


def _full_loss(engine):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(engine(DATA[0]), DATA[1]))


def _train(rank, world, stage, mask_master):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sparsetrain.sparsity.deepspeed import DeepSpeedSparsity

    torch.manual_seed(0)
    model = MLPClassifier(in_features=16, hidden=32, n_classes=4)
    config = {
        "train_micro_batch_size_per_gpu": 8 // world,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # Attached after the engine copied the dense weights into its fp32 master partitions.
    sp = DynamicSparsifier(engine.module, DynamicSparsityConfig(method="rigl", sparsity=0.8, update_every=2,
                                                                drop_fraction=0.5, seed=3), total_steps=STEPS)
    if mask_master:
        ds = DeepSpeedSparsity(sp, engine)
    else:  # control: count steps, mask the module parameters only
        applied = [0]

        class _ModuleOnly:
            def step(self):
                while applied[0] < engine.global_steps:
                    applied[0] += 1
                    sp.step()

        ds = _ModuleOnly()
    modules = dict(engine.module.named_modules())
    violations, updates = 0, 0
    initial_loss = _full_loss(engine)
    for step in range(STEPS):
        x, y = _batch(step, rank, world)
        for xb, yb in zip(x.chunk(2), y.chunk(2)):  # two micro-batches per optimizer step
            loss = nn.functional.cross_entropy(engine(xb), yb)
            engine.backward(loss)
            engine.step()
        before = sp.update_count
        assert ds.step() is None
        updates += sp.update_count != before
        for name, mask in _layer_masks(sp).items():
            w = modules[name].weight
            master = safe_get_full_fp32_param(w)  # collective: every rank calls it
            moments = [safe_get_full_optimizer_state(w, k) for k in ("exp_avg", "exp_avg_sq")]
            violations += int(master[~mask].ne(0).sum()) + int(w.detach()[~mask].ne(0).sum())
            violations += sum(int(m[~mask].ne(0).sum()) for m in moments)
    out = {
        "violations": violations,
        "updates": updates,
        "steps": sp.step_count,
        "sparsity": sp.statistics()["sparsity/global"],
        "losses": (initial_loss, _full_loss(engine)),
        "masks": {n: m.clone() for n, m in _layer_masks(sp).items()},
    }
    dist.barrier()
    return out


def _worker(rank, world):
    import deepspeed

    # On CPU, DeepSpeed would JIT-compile its shared-memory comm kernel at every start (minutes on
    # 2 cores); gloo does the same reductions.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    runs = [(1, True), (2, True), (2, False)]  # the control (module-only masking) once, on ZeRO-2
    results = {(stage, master): _train(rank, world, stage, master) for stage, master in runs}
    dist.barrier()
    return results


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero_master_weights_stay_masked_and_training_proceeds():
    results = run_distributed(_worker, 2, timeout=800, lightning=True)
    for stage in (1, 2):
        ours = [r[(stage, True)] for r in results]
        for r in ours:
            assert r["violations"] == 0, stage
            assert r["steps"] == STEPS and r["updates"] == 2  # RigL updates after steps 2 and 4 (< end 6)
            assert r["sparsity"] == pytest.approx(0.8, abs=1e-3)
            assert r["losses"][1] < r["losses"][0] - 0.05  # the sparse model learns
        for name in ours[0]["masks"]:
            assert torch.equal(ours[0]["masks"][name], ours[1]["masks"][name])
    # Without master-weight masking the dense master copy revives pruned weights.
    assert all(r[(2, False)]["violations"] > 0 for r in results)
