"""Run a function in N spawned gloo processes on CPU and collect what each rank returns.

Every distributed test uses :func:`run_distributed`. The function must be importable by
the spawned children (defined at module level in a test module or in ``sparsetrain``).
It is called as ``fn(rank, world_size, *args)`` after ``init_process_group("gloo")``
on a fresh ``FileStore``; its return value must be picklable (tensors are fine).

A rank that raises makes the whole run fail with that rank's traceback; a run that does
not finish within ``timeout`` seconds (a hung collective) is killed and fails too, so
neither can hang CI.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["DistributedRunError", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank raised, died or hung."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, store_path, timeout, args, results, env):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(env)
    if env:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors by value; the queue's own pickler would pass
        # shared-memory handles that die with this process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - everything a rank raises is reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, lightning: bool = False
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    With ``lightning=True`` each rank also gets the environment of an externally launched
    job (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``NODE_RANK``), so a ``Trainer(accelerator="cpu", devices=world_size, strategy="ddp")``
    built inside ``fn`` joins the existing process group instead of spawning processes.

    Raises:
        ValueError: ``world_size`` < 1.
        DistributedRunError: a rank raised (its traceback is in the message), exited
            without a result, or the run exceeded ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="sparsetrain-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        env = {}
        if lightning:
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world_size)}
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, store_path, timeout, args, results, env),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        collected: dict[int, tuple[str, Any]] = {}
        try:
            while len(collected) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(collected))
                    raise DistributedRunError(
                        f"distributed run timed out after {timeout:.0f}s; ranks {missing} did not finish"
                    )
                try:
                    rank, status, payload = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [
                        r for r, p in enumerate(procs)
                        if r not in collected and not p.is_alive() and p.exitcode not in (None, 0)
                    ]
                    if dead:
                        # Give a dying rank's queue write a moment to arrive.
                        try:
                            rank, status, payload = results.get(timeout=2.0)
                        except queue.Empty:
                            codes = {r: procs[r].exitcode for r in dead}
                            raise DistributedRunError(f"ranks exited without a result: {codes}") from None
                    else:
                        continue
                collected[rank] = (status, payload)
                if status == "error":
                    raise DistributedRunError(f"rank {rank} raised:\n{payload}")
        finally:
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [pickle.loads(collected[r][1]) for r in range(world_size)]


def run_triton_interpreted(code: str, marker: str = "interpreted ok") -> None:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton's interpreter runs its
    kernels on CPU tensors; it reads the variable once, on import, so a subprocess) and assert that it
    exited cleanly after printing ``marker``. Skips the calling test where Triton is missing."""
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and marker in out.stdout, out.stderr[-3000:]


def state_digest(model) -> str:
    """SHA-1 of a model's state dict (names and raw bytes, in name order): equal digests are bit-identical states."""
    import hashlib

    import torch

    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside: with tiny models more threads only add contention on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def stop_and_save(path, step: int):
    """A Lightning callback that saves a checkpoint to ``path`` after ``step`` optimizer steps and stops there:
    a planned run, interrupted (for resume tests)."""
    import lightning.pytorch as pl

    class StopAndSave(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                trainer.save_checkpoint(path)
                trainer.should_stop = True

    return StopAndSave()


def quiet_trainer(tmp, callbacks, **kwargs):
    """A CPU Lightning Trainer without logger, checkpoints, progress bar, summary or validation, logging every
    step; ``kwargs`` override (``devices``, ``strategy``, ``max_epochs``...)."""
    import lightning.pytorch as pl

    defaults = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=tmp, log_every_n_steps=1)
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def save_after_first_epoch(path):
    """A Lightning callback that saves a checkpoint to ``path`` at the end of the first epoch (training goes on)."""
    import lightning.pytorch as pl

    class SaveAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(path)

    return SaveAfterFirstEpoch()


def outside_mask_counts(model, opt, masks) -> tuple[int, int]:
    """Nonzero weights, and nonzero entries of the optimizer's weight-shaped state, outside ``masks``
    (parameter name -> bool mask): both 0 when a sparsifier's invariant holds."""
    import torch

    weights = state = 0
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        w = params[name]
        weights += int(((w != 0) & ~mask).sum())
        for value in opt.state.get(w, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == w.shape:
                state += int(((value != 0) & ~mask).sum())
    return weights, state
