import pytest
import torch
from torch import nn

from sparsetrain.nm import nm_exact


class TwoFour(nn.Module):
    """A user's own module: two 2:4 Linears, a dense head, a buffer, a layer that cannot take 2:4."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        self.odd = nn.Linear(8, 6)  # 8 columns fit 2:4 ...
        self.tail = nn.Linear(6, 3)  # ... 6 do not
        self.register_buffer("scale", torch.tensor(0.5))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.copy_(nm_exact(torch.randn(layer.weight.shape, generator=g), 2, 4))
            self.odd.weight.copy_(torch.randn(self.odd.weight.shape, generator=g))  # dense
        self.to(dtype)

    def forward(self, x):
        return self.tail(self.odd(torch.relu(self.fc2(torch.relu(self.fc1(x)))))) * self.scale


@pytest.fixture
def two_four():
    return TwoFour
