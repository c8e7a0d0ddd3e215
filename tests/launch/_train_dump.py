"""``sparsetrain train RECIPE --out OUT`` plus one thing: every rank saves its final parameters.

    python _train_dump.py RECIPE OUT

Only rank 0 writes checkpoints, so to show that every process ends with the same model,
each rank writes ``OUT/params-rank{R}.pt`` at the end of training.
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain.recipe import load_recipe
from sparsetrain.train import train


class SaveParams(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"params-rank{trainer.global_rank}.pt")


def main() -> None:
    recipe, out = sys.argv[1], sys.argv[2]
    train(load_recipe(recipe), out, extra_callbacks=[SaveParams(out)], report=False)


if __name__ == "__main__":
    main()
