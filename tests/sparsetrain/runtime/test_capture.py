import pytest
import torch
from torch import nn

from sparsetrain.runtime import capture
from sparsetrain.runtime.capture import padded_count


def test_padded_count_is_the_next_captured_count():
    counts = (16, 64, 512)
    assert [padded_count(counts, t) for t in (1, 16, 17, 64, 65, 512, 513)] == [16, 16, 64, 64, 512, 512, None]


@pytest.mark.parametrize("kwargs, err, match", [
    ({"token_counts": ()}, ValueError, "token_counts"),
    ({"token_counts": "16"}, ValueError, "token_counts"),
    ({"token_counts": (16, 0)}, ValueError, "token_counts"),
    ({"token_counts": (16, 2.5)}, ValueError, "token_counts"),
    ({"token_dim": 3}, ValueError, "token_dim"),
    ({"token_dim": True}, ValueError, "token_dim"),
    ({"out_token_dim": "1"}, ValueError, "out_token_dim"),
    ({"warmup": 0}, ValueError, "warmup"),
])
def test_argument_validation(kwargs, err, match):
    args = {"token_counts": (16,), "token_dim": 1, **kwargs}
    with pytest.raises(err, match=match):
        capture(nn.Linear(4, 4), torch.zeros(1, 16, 4), **args)


def test_model_example_and_device_validation():
    with pytest.raises(TypeError, match="model"):
        capture(lambda x: x, torch.zeros(1, 16, 4), token_counts=(16,), token_dim=1)
    with pytest.raises(TypeError, match="example"):
        capture(nn.Linear(4, 4), [[0.0]], token_counts=(16,), token_dim=1)
    with pytest.raises(ValueError, match="must be on CUDA"):
        capture(nn.Linear(4, 4), torch.zeros(1, 16, 4), token_counts=(16,), token_dim=1)
