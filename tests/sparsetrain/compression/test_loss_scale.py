"""The one private read of the GradScaler (its ``_scale`` tensor), held to the public ``get_scale()``."""

import pytest
import torch

from sparsetrain.compression._loss_scale import current_scale


def _scaler(init_scale):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    scaler.scale(torch.ones(()))  # initialises the scale tensor lazily
    return scaler


def test_torch_keeps_the_scale_in_a_private_tensor():
    scaler = _scaler(1024.0)
    assert isinstance(getattr(scaler, "_scale", None), torch.Tensor), (
        "torch.amp.GradScaler no longer keeps its scale in `_scale`: sparsetrain.compression._loss_scale now "
        "falls back to get_scale(), a host sync per step")


@pytest.mark.parametrize("init_scale", [1.0, 1024.0, 2.0**16])
def test_fast_path_equals_the_public_path(init_scale):
    scaler = _scaler(init_scale)
    fast = current_scale(scaler, torch.device("cpu"))
    assert fast.dtype == torch.float32 and fast.shape == ()
    assert float(fast) == scaler.get_scale() == init_scale


def test_fallback_without_the_private_tensor():
    class Public:
        def get_scale(self):
            return 8.0

    assert float(current_scale(Public(), torch.device("cpu"))) == 8.0
