"""Masks under DDP on 2 and 3 gloo ranks: identical on every rank and equal to one process on the full batch."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain.demo import MLPClassifier
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig, MaskDivergenceError
from tests.harness import run_distributed

STEPS = 8
GLOBAL_BATCH = 12  # divisible by 2 and 3 ranks, and by 2 micro-batches per rank
def _layer_masks(sp):
    """Module name -> mask (``masks()`` is keyed by parameter name)."""
    return {name.rpartition(".")[0]: mask for name, mask in sp.masks().items()}


def _global_batch(step):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def _config(method, grad_masking="hook"):
    return DynamicSparsityConfig(method=method, sparsity=0.8, update_every=2, drop_fraction=0.4,
                                 drop_schedule="constant", end_fraction=1.0, seed=11, grad_masking=grad_masking)


def _setup(method, grad_masking="hook"):
    torch.manual_seed(0)
    model = MLPClassifier(in_features=16, hidden=32, n_classes=4)
    sp = DynamicSparsifier(model, _config(method, grad_masking), total_steps=STEPS)  # before wrapping in DDP
    return model, sp


def _history_recorder(sp, history):
    seen = [sp.update_count]

    def record():
        if sp.update_count != seen[0]:  # masks updated at this step
            seen[0] = sp.update_count
            history.append({n: m.clone() for n, m in _layer_masks(sp).items()})
    return record


def _reference(method):
    model, sp = _setup(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sp.attach_optimizer(opt)
    history = []
    record = _history_recorder(sp, history)
    for step in range(STEPS):
        x, y = _global_batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        record()
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_run(rank, world, method, accumulate, grad_masking="hook"):
    model, sp = _setup(method, grad_masking)
    ddp = DDP(model)  # broadcast_buffers=True: the masks must still not be overwritten by rank 0's
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    sp.attach_optimizer(opt)
    history = []
    record = _history_recorder(sp, history)
    for step in range(STEPS):
        x, y = _global_batch(step)
        x, y = x[rank::world], y[rank::world]
        chunks = list(zip(x.chunk(accumulate), y.chunk(accumulate)))
        for i, (xb, yb) in enumerate(chunks):
            loss = nn.functional.cross_entropy(ddp(xb), yb) / accumulate
            if i < accumulate - 1:
                with ddp.no_sync():
                    loss.backward()
            else:
                loss.backward()
        opt.step()
        opt.zero_grad()
        record()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return history, state, sp, ddp


def _worker(rank, world):
    out = {}
    for method, accumulate, grad_masking in (("rigl", 2, "step"), ("rigl", 2, "hook"), ("set", 1, "hook")):
        history, state, sp, ddp = _ddp_run(rank, world, method, accumulate, grad_masking)
        out[method if grad_masking == "hook" else f"{method}, {grad_masking}"] = (history, state)
    # Corrupt one rank's mask: the next forward must not paper over it (masks are not DDP-broadcast
    # buffers) and the rank check must catch it on every rank.
    if rank == world - 1:
        first = sp.layer_names[0]
        _layer_masks(sp)[first].view(-1)[0] ^= True
    ddp(torch.randn(2, 16))
    try:
        sp.check_ranks()
        out["divergence"] = None
    except MaskDivergenceError as err:
        out["divergence"] = str(err)
    dist.barrier()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_masks_identical_across_ranks_and_equal_to_single_process(world):
    results = run_distributed(_worker, world, timeout=180)
    for method in ("rigl", "set", "rigl, step"):  # "step": gradients masked before the step, not by hooks
        ref_history, ref_state = _reference(method.split(",")[0])
        assert len(ref_history) == 3  # after steps 2, 4, 6 (RigL/SET stop updating at end_step = 8)
        for rank_out in results:
            history, state = rank_out[method]
            assert len(history) == len(ref_history)
            for got, want in zip(history, ref_history):
                for name in want:
                    assert torch.equal(got[name], want[name]), (method, name)
            for k, v in ref_state.items():
                if v.dtype == torch.bool:
                    assert torch.equal(state[k], v), k
                else:
                    torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)
        # masks actually moved during the run
        assert any(not torch.equal(ref_history[0][n], ref_history[-1][n]) for n in ref_history[0])
    for rank_out in results:
        assert rank_out["divergence"] is not None
        assert "masks after step 8 differ across ranks in 1 of 4: net.0.weight" in rank_out["divergence"]
