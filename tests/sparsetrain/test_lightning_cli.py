"""Our callbacks from a plain LightningCLI config (``trainer.callbacks: - class_path: ...``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (make install adds it)")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

PKG = "tests.sparsetrain.userpkg.models"

CONFIG = f"""\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: sparsetrain.callbacks.DynamicSparsity
      init_args:
        method: rigl
        sparsity: 0.5
        update_every: 2
        include: ["net.left", "net.right.*"]
model:
  class_path: {PKG}.TowerTask
  init_args: {{width: 32}}
data:
  class_path: {PKG}.Blobs
  init_args: {{batch_size: 16}}
"""


def test_dynamic_sparsity_trains_from_a_lightning_cli_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cli = LightningCLI(args=["fit", "--config", str(path)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "DynamicSparsity"]
    assert cli.trainer.global_step == 6
    assert callback.config.sparsity == 0.5 and callback.config.include == ("net.left", "net.right.*")
    net = cli.model.net
    for layer in (net.left, net.right[0]):
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (net.head.weight == 0).float().mean().item() < 0.1
    assert callback.statistics()  # the achieved figures are there


DDP_GLOO = """\
  strategy:
    class_path: lightning.pytorch.strategies.DDPStrategy
    init_args: {process_group_backend: gloo}
"""


def _fit_with_cli(rank, world_size, config_path):
    cli = LightningCLI(args=["fit", "--config", config_path], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradientCompression"]
    return (cli.trainer.global_step, callback.statistics(),
            {k: v.detach().clone() for k, v in cli.model.state_dict().items()})


@pytest.mark.slow
def test_gradient_compression_trains_from_a_lightning_cli_config(tmp_path):
    from tests.harness import run_distributed

    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("  devices: 1\n", "  devices: 2\n" + DDP_GLOO).replace(
        "class_path: sparsetrain.callbacks.DynamicSparsity\n      init_args:\n        method: rigl\n"
        "        sparsity: 0.5\n        update_every: 2\n        include: [\"net.left\", \"net.right.*\"]",
        "class_path: sparsetrain.callbacks.GradientCompression\n      init_args: {density: 0.05, warmup_steps: 2}"))
    (steps0, stats0, state0), (steps1, _, state1) = run_distributed(_fit_with_cli, 2, str(path), lightning=True,
                                                                    timeout=300)
    assert steps0 == steps1 == 6
    for key in state0:  # compressed all-reduce, same result on both ranks
        assert torch.equal(state0[key], state1[key]), key
    assert stats0 and any("bytes" in k or "ratio" in k for k in stats0), stats0


def test_gradient_compression_arguments_from_a_lightning_cli_config(tmp_path):
    # Compression needs DDP (a comm hook); here only that LightningCLI builds it from the config.
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace(
        "class_path: sparsetrain.callbacks.DynamicSparsity\n      init_args:\n        method: rigl\n"
        "        sparsity: 0.5\n        update_every: 2\n        include: [\"net.left\", \"net.right.*\"]",
        "class_path: sparsetrain.callbacks.GradientCompression\n      init_args: {density: 0.05, warmup_steps: 3}"))
    cli = LightningCLI(args=["--config", str(path)], run=False, save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradientCompression"]
    assert callback.config.density == 0.05 and callback.config.warmup_steps == 3


def test_nm_sparsity_trains_from_a_lightning_cli_config(tmp_path):
    from sparsetrain.nm import is_nm

    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace(
        "class_path: sparsetrain.callbacks.DynamicSparsity\n      init_args:\n        method: rigl\n"
        "        sparsity: 0.5\n        update_every: 2\n        include: [\"net.left\", \"net.right.*\"]",
        "class_path: sparsetrain.callbacks.NMSparsity\n      init_args: {n: 2, m: 4, include: [\"net.left\"]}"))
    cli = LightningCLI(args=["fit", "--config", str(path)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NMSparsity"]
    assert cli.trainer.global_step == 6 and callback.statistics()["nm/step"] == 6.0
    assert is_nm(cli.model.net.left.weight, 2, 4)  # finalized: plain weights, exactly 2:4
    assert not is_nm(cli.model.net.head.weight, 2, 4)
