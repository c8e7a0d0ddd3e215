"""A small regression problem shared by the launcher scripts and their single-process references.

Plain torch, imported by the script started under the DeepSpeed launcher and by the tests,
which train the same model on the whole batch in one process to compare.
"""

import torch

IN, HIDDEN, OUT = 8, 16, 4
PER_RANK = 4  # samples per rank and step
STEPS = 6
LR = 0.01


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def make_data(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shapes (STEPS, world_size * PER_RANK, IN / OUT); rank r takes rows r*PER_RANK..(r+1)*PER_RANK."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, world_size * PER_RANK, IN, generator=g)
    y = torch.randn(STEPS, world_size * PER_RANK, OUT, generator=g)
    return x, y


def reference(world_size: int) -> dict[str, torch.Tensor]:
    """Train on the whole batch in one process (the mean of equal per-rank mean losses is the full mean)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    x, y = make_data(world_size)
    for s in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[s]), y[s]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
