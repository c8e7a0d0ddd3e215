"""Resume: checkpoints kept and checked, corrupt ones skipped, history kept, ranks that disagree stop at once."""

from __future__ import annotations

import csv
import time
import warnings

import pytest
import torch

from sparsetrain.recipe import parse_recipe
from sparsetrain.train import AtomicCheckpointIO, read_checkpoint_step, resume_checkpoint
from tests.harness import run_distributed


def _ckpt(step):
    return {"state_dict": {"w": torch.full((3,), float(step))}, "global_step": step}


def test_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(3), tmp_path / "last.ckpt")
    io.save_checkpoint(_ckpt(6), tmp_path / "last.ckpt")
    assert read_checkpoint_step(tmp_path / "last.ckpt") == 6
    assert read_checkpoint_step(tmp_path / "last.prev.ckpt") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_save_that_does_not_load_back_leaves_the_old_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(3), tmp_path / "last.ckpt")
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    def write_garbage(self, checkpoint, path, storage_options=None):  # a disk that loses the write
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 cut short")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", write_garbage)
    with pytest.raises(RuntimeError, match=r"does not load back, .*last\.ckpt is left as it was"):
        io.save_checkpoint(_ckpt(6), tmp_path / "last.ckpt")
    assert read_checkpoint_step(tmp_path / "last.ckpt") == 3
    assert not (tmp_path / "last.ckpt.tmp").exists()


@pytest.mark.parametrize("garbage", [b"", b"\x80\x02}q\x00.", b"PK\x03\x04 truncated zip", b"not a checkpoint"])
def test_corrupt_last_falls_back_to_previous_with_a_warning(tmp_path, garbage):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(3), tmp_path / "last.ckpt")
    io.save_checkpoint(_ckpt(6), tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes(garbage)
    with pytest.warns(UserWarning, match=r"resuming from .*last\.prev\.ckpt \(step 3\): .*last\.ckpt: not a"):
        assert resume_checkpoint(tmp_path) == (tmp_path / "last.prev.ckpt", 3)


def test_checkpoint_without_lightning_keys_is_not_valid(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"^no valid checkpoint to resume from in .*: .*last\.ckpt: not a Lightning "
                                         r"checkpoint \(no state_dict / global_step\); remove it or pass --no-resume"):
        resume_checkpoint(tmp_path)


def test_no_valid_checkpoint_is_one_line(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "last.prev.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^no valid checkpoint to resume from") as info:
        resume_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and "last.prev.ckpt" in str(info.value)


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume_checkpoint(tmp_path) is None


def _recipe(max_steps: int):
    return parse_recipe({
        "version": 1, "name": "tiny",
        "model": {"name": "mlp", "in_features": 64, "hidden": 32, "n_classes": 8},
        "data": {"name": "synthetic_classification", "n": 1024, "batch_size": 32},
        "trainer": {"devices": 2, "max_steps": max_steps, "val_check_interval": 3, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "checkpoint_every_n_steps": 3},
    })


def _steps(path, column):
    with open(path, newline="") as f:
        return sorted({int(float(r["step"])) for r in csv.DictReader(f) if r.get(column)})


def _resume_sequence(rank, world_size, base):
    import torch.distributed as dist

    from sparsetrain.train import train

    out = f"{base}/run"
    train(_recipe(6), out, report=False)
    first = _steps(f"{out}/metrics.csv", "train_loss") if rank == 0 else None
    second = train(_recipe(9), out, report=False)  # resumes from step 6
    history = _steps(f"{out}/metrics.csv", "train_loss") if rank == 0 else None
    if rank == 0:
        with open(f"{out}/checkpoints/last.ckpt", "r+b") as f:
            f.truncate(100)  # a copy cut short
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = train(_recipe(12), out, report=False)  # last.ckpt (step 9) is corrupt: from last.prev.ckpt (6)
    named = [str(w.message) for w in caught if "last.ckpt: not a readable checkpoint" in str(w.message)]
    return first, second["resumed_from"], history, third["resumed_from"], third["steps"], named


@pytest.mark.slow
def test_resumed_runs_keep_metrics_and_skip_a_corrupt_checkpoint(tmp_path):
    results = run_distributed(_resume_sequence, 2, str(tmp_path), lightning=True, timeout=300)
    first, resumed, history, resumed_again, steps, named = results[0]
    assert first and max(first) >= 4
    assert resumed.endswith("checkpoints/last.ckpt")
    assert set(first) <= set(history) and max(history) >= 7  # the first run's rows are still there
    assert resumed_again.endswith("checkpoints/last.prev.ckpt") and steps == 12
    assert named and "last.prev.ckpt (step 6)" in named[0]
    rows = _steps(tmp_path / "run" / "metrics.csv", "train_loss")
    assert set(first) <= set(rows) and max(rows) >= 10
    assert results[1][3] == resumed_again  # both ranks resumed from the same file


def _node_local(rank, world_size, base):
    from sparsetrain.train import train

    train(_recipe(3), f"{base}/node0", report=False)  # rank 0 writes node0/checkpoints/last.ckpt
    # Second launch: each "node" has its own run directory; only node0's holds the checkpoint.
    start = time.monotonic()
    try:
        train(_recipe(6), f"{base}/node{rank}", report=False)
    except ValueError as err:
        return str(err), time.monotonic() - start
    return None, time.monotonic() - start


@pytest.mark.slow
def test_node_local_run_directories_fail_fast_with_one_message(tmp_path):
    results = run_distributed(_node_local, 2, str(tmp_path), lightning=True, timeout=240)
    for msg, seconds in results:
        assert msg == ("node 0 (rank 1) cannot resume from checkpoints/last.ckpt at step 3 like rank 0 (cannot read "
                       "it): the run directory must be on storage every node shares, or pass --no-resume"), msg
        assert seconds < 60  # not gloo's 30-minute timeout
