"""What one N:M training step costs beyond the mask computation itself.

The sparsifier's ``step()`` with the default (parametrized) masking must dispatch the operations of
the masks' recomputation and of the flip statistics, and nothing per layer besides: no finiteness
check, no per-parameter work of the strategy objects or of the component registry. On CUDA it must
take the grouped one-launch path and never wait for the device.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsetrain.demo import GPT, GPTConfig
from sparsetrain.nm import NMConfig, NMSparsifier, grouped
from sparsetrain.nm.masks import _nm_masks


class _Ops(TorchDispatchMode):
    """The aten operations dispatched inside it, views included."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _train(device: str, n_layer: int, **config):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, d_model=64)).to(device)
    sp = NMSparsifier(model, NMConfig(n=2, m=4, include=["*.attn.*", "*.mlp.*"], **config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 16), device=device)

    def step(sparsifier_step=None):
        model.loss(x, x).backward()
        sp.before_optimizer_step()  # a no-op with the parametrization
        opt.step()
        opt.zero_grad(set_to_none=True)
        (sparsifier_step or sp.step)()

    return sp, step


@pytest.mark.parametrize("n_layer", [1, 3])
def test_a_step_dispatches_the_mask_recomputation_and_three_statistics_ops(n_layer):
    sp, step = _train("cpu", n_layer, method="srste")
    for _ in range(2):
        step()
    # The reference: the masks of the same weights against the same previous masks, by hand.
    weights = sp.strategy.dense_weights()
    olds = [p.mask for p in sp.params.values()]
    with _Ops() as ref:
        _nm_masks(weights, 2, 4, olds, False, complements=True, check=False)
    with _Ops() as ops:
        sp.step()
    extra = list(ops.names)
    for name in ref.names:
        extra.remove(name)
    # last_flip_fraction = flips.double() / total; flip_count + flips (on the flips' device: no copy)
    assert sorted(extra) == sorted(["aten._to_copy", "aten.div", "aten.add"])


def test_a_step_without_a_due_update_dispatches_nothing():
    sp, step = _train("cpu", 2, method="srste", update_every=2)
    step()
    step()
    with _Ops() as ops:
        sp.step()  # step 3: no update due
    assert ops.names == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["srste", "ste"])
def test_a_cuda_step_takes_the_grouped_path_and_never_syncs(method):
    if not grouped.available([torch.zeros(4, 4, device="cuda")]):
        pytest.skip("needs Triton")
    sp, step = _train("cuda", 2, method=method)
    for _ in range(3):  # the launch tables are built at the first steps
        step()
    torch.cuda.synchronize()

    def sparsifier_step_raising_on_a_sync():
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sp.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    for _ in range(3):
        step(sparsifier_step_raising_on_a_sync)
    # The grouped kernel writes every mask as a view of one flat buffer.
    masks = [p.mask for p in sp.params.values()]
    base = masks[0]._base
    assert base is not None and all(m._base is base for m in masks)
    assert sp.last_flip_fraction is not None and sp.last_flip_fraction.is_cuda
