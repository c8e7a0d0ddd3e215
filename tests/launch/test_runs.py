"""Real launches: torchrun across two hosts, crash recovery, the DeepSpeed launcher and horovodrun.

One uninterrupted ``sparsetrain-launch --backend torchrun --nproc-per-node 2`` run of a
small recipe is the reference. Every other way of running the same recipe with two
processes (two hosts x one process, a run whose worker is killed and restarted, the
DeepSpeed launcher, horovodrun) must end with exactly the same parameters: same seed,
same data order, same gloo reductions. The plain DeepSpeed engine script is compared with
the same training done in one process on the whole batch.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sparsetrain.launch import LaunchConfig, TwoHostTestbed, build_command, run_forwarding, unavailable_reason
from sparsetrain.launch.env import child_env

from . import _problem

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
VENV_BIN = os.path.dirname(sys.executable)
RECIPE = """\
version: 1
name: launch-test
model: {name: gpt, d_model: 64, n_layer: 1, n_head: 2, block_size: 32}
data: {name: stdlib_chars, batch_size: 8, byte_budget: 200000}
trainer: {devices: 2, strategy: ddp, max_steps: 40, val_check_interval: 1000, limit_val_batches: 2,
          checkpoint_every_n_steps: 10, seed: 0}
optimizer: {name: adamw, lr: 0.003}
callbacks: []
"""
TIMEOUT = 240


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _launcher(*args):
    return [sys.executable, "-m", "sparsetrain.launch.cli", *args]


def _run_launcher(*args, cwd):
    r = subprocess.run(_launcher(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _checkpoint(out):
    return torch.load(Path(out) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")


def _assert_equal_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k] - b[k]).abs().max().item()}"


def _assert_same_state(ckpt, ref):
    assert ckpt["global_step"] == ref["global_step"]
    _assert_equal_tensors(ckpt["state_dict"], ref["state_dict"], "parameters")
    (opt,), (ref_opt,) = ckpt["optimizer_states"], ref["optimizer_states"]
    for i in ref_opt["state"]:
        _assert_equal_tensors(opt["state"][i], ref_opt["state"][i], f"optimizer state {i}")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    (d / "launch-test.yaml").write_text(RECIPE)
    return d / "launch-test.yaml"


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """Uninterrupted run, one node x two processes, through torchrun."""
    out = tmp_path_factory.mktemp("reference")
    _run_launcher("--backend", "torchrun", "--nproc-per-node", "2", str(recipe), "--out", str(out), "--no-report",
                  cwd=out)
    ckpt = _checkpoint(out)
    assert ckpt["global_step"] == 40
    assert json.loads((out / "summary.json").read_text())["resumed_from"] is None
    return ckpt


# ------------------------------------------------------------------ torchrun: crash recovery
def _children():
    tree: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            tree.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    return tree


def _worker_pid(root: int, local_rank: int) -> int | None:
    """The training process with LOCAL_RANK=local_rank under ``root``."""
    tree, stack = _children(), [root]
    while stack:
        for pid in tree.get(stack.pop(), []):
            stack.append(pid)
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LOCAL_RANK={local_rank}".encode() in env and b"train" in cmd:
                return pid
    return None


def test_torchrun_restarts_a_killed_worker_and_matches_uninterrupted_run(recipe, reference, tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    log = open(tmp_path / "launcher.log", "w+")
    p = subprocess.Popen(_launcher("--backend", "torchrun", "--nproc-per-node", "2", "--max-restarts", "2",
                                   str(recipe), "--out", str(out), "--no-report"),
                         cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not last.exists():  # the first periodic checkpoint (step 10)
            assert p.poll() is None, "run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        victim = _worker_pid(p.pid, local_rank=1)
        assert victim is not None, "worker with LOCAL_RANK=1 not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = _checkpoint(out)["global_step"]
        rc = p.wait(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    log.seek(0)
    text = log.read()
    assert rc == 0, text[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(last), "the restarted group did not resume from the checkpoint"
    assert killed_at < 40
    _assert_same_state(_checkpoint(out), reference)


# ------------------------------------------------------------------ torchrun: two hosts
@pytest.mark.netns
def test_torchrun_two_hosts_end_with_identical_parameters(recipe, reference, tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "run"
    with TwoHostTestbed() as bed:
        argvs = [
            build_command(LaunchConfig(backend="torchrun", nnodes=2, nproc_per_node=1, node_rank=host,
                                       master_addr=bed.addresses[0], master_port=29500,
                                       entry=[sys.executable, str(HERE / "_train_dump.py"), str(recipe), str(out)]))
            for host in (0, 1)
        ]
        results = bed.run(argvs, env={"PATH": _env()["PATH"], "OMP_NUM_THREADS": "1"}, cwd=str(tmp_path),
                          timeout=TIMEOUT)
    for r in results:
        assert r.returncode == 0, f"host {r.host}:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    rank0 = torch.load(out / "params-rank0.pt", weights_only=True)
    rank1 = torch.load(out / "params-rank1.pt", weights_only=True)
    _assert_equal_tensors(rank0, rank1, "host 0 vs host 1")
    # two hosts x one process and one host x two processes are the same computation
    _assert_equal_tensors(rank0, reference["state_dict"], "two hosts vs one host")
    # the processes did talk over the link: rank 1 ran on host 1
    assert "GLOBAL_RANK: 1" in results[1].stdout + results[1].stderr


# ------------------------------------------------------------------ DeepSpeed launcher
def test_deepspeed_launcher_runs_the_recipe(recipe, reference, tmp_path):
    out = tmp_path / "run"
    _run_launcher("--backend", "deepspeed", "--nproc-per-node", "2", "--master-port", "29511", str(recipe),
                  "--out", str(out), "--no-report", cwd=tmp_path)
    _assert_same_state(_checkpoint(out), reference)


def test_deepspeed_engine_zero2_through_our_command(tmp_path):
    argv = build_command(LaunchConfig(backend="deepspeed", nproc_per_node=2, master_port=29512,
                                      entry=[sys.executable, str(HERE / "_ds_engine.py"), str(tmp_path), "2"]))
    assert run_forwarding(argv, env=child_env(_env(), {})) == 0
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    _assert_equal_tensors(rank0, rank1, "rank 0 vs rank 1")
    ref = _problem.reference(2)
    for k in ref:
        torch.testing.assert_close(rank0[k], ref[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(rank0[k], _problem.make_model().state_dict()[k]) for k in ref)


# ------------------------------------------------------------------ horovodrun
needs_horovod = pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None or shutil.which("horovodrun", path=VENV_BIN) is None,
    reason="horovod is not installed (make horovod)",
)


@needs_horovod
def test_horovodrun_runs_the_recipe(recipe, reference, tmp_path):
    out = tmp_path / "run"
    _run_launcher("--backend", "horovod", "--nproc-per-node", "2", "--master-port", "29513", str(recipe),
                  "--out", str(out), "--no-report", cwd=tmp_path)
    _assert_same_state(_checkpoint(out), reference)

