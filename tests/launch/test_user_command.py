"""The launcher runs any command after ``--``: a user's own script (not ``sparsetrain train``) on 2 processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sparsetrain.launch import unavailable_reason

from . import _user_script

HERE = Path(__file__).parent
VENV_BIN = os.path.dirname(sys.executable)
TIMEOUT = 180


def _env():
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}


def _reference():
    """The same training in one process on the whole batch (DDP averages the two halves' gradients)."""
    net = _user_script.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = _user_script.problem()
    for _ in range(_user_script.STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net.state_dict()


def _check(out, world):
    ref = _reference()
    ranks = [torch.load(out / f"user-rank{r}.pt", weights_only=True) for r in range(world)]
    for r, got in enumerate(ranks):
        assert got["env"]["RANK"] == str(r) and got["env"]["WORLD_SIZE"] == str(world)
        assert got["argv"][0] == str(out)
        for k in ref:
            torch.testing.assert_close(got["params"][k], ref[k], rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")
    for k in ref:  # the ranks agree exactly
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    return ranks


@pytest.mark.slow
def test_user_script_through_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "sparsetrain.launch.cli", "--backend", "torchrun", "--nproc-per-node", "2",
           "--", "python", str(HERE / "_user_script.py"), str(tmp_path), "--my-flag", "a b"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ranks = _check(tmp_path, 2)
    assert ranks[1]["argv"] == [str(tmp_path), "--my-flag", "a b"]  # the user's arguments arrive intact


def test_user_script_exit_code_is_the_launchers(tmp_path):
    failing = tmp_path / "fail.py"
    failing.write_text("import sys, os\nsys.exit(3 if os.environ.get('RANK') == '0' else 0)\n")
    cmd = [sys.executable, "-m", "sparsetrain.launch.cli", "--backend", "torchrun", "--nproc-per-node", "1",
           "--", "python", str(failing)]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    # torchrun's own status (1 when a worker failed), with the worker's exit code in its report
    assert r.returncode == 1 and "exitcode  : 3" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.netns
def test_user_script_through_the_two_host_test_bed(tmp_path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    from sparsetrain.launch import TwoHostTestbed

    with TwoHostTestbed() as bed:
        argvs = [[sys.executable, "-m", "sparsetrain.launch.cli", "--backend", "torchrun", "--nnodes", "2",
                  "--node-rank", str(host), "--master-addr", bed.addresses[0], "--master-port", "29511",
                  "--", "python", str(HERE / "_user_script.py"), str(tmp_path)] for host in (0, 1)]
        results = bed.run(argvs, env={"PATH": _env()["PATH"], "OMP_NUM_THREADS": "1"}, cwd=str(tmp_path),
                          timeout=TIMEOUT)
    for r in results:
        assert r.returncode == 0, f"host {r.host}:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    ranks = _check(tmp_path, 2)
    assert ranks[0]["env"]["MASTER_ADDR"] == ranks[1]["env"]["MASTER_ADDR"] == bed.addresses[0]


NODE_LOCAL_RECIPE = """\
version: 1
name: node-local
model: {name: mlp, hidden: 32}
data: {name: synthetic_classification, n: 512, batch_size: 16}
trainer: {devices: 1, max_steps: 4, val_check_interval: 4, limit_val_batches: 1, checkpoint_every_n_steps: 2}
"""


@pytest.mark.slow
@pytest.mark.netns
def test_node_local_run_directories_fail_fast_on_two_hosts(tmp_path):
    """Each host launched with --out on its own disk: only host 0 holds the checkpoint rank 0 wrote.
    The second launch must stop at once on both hosts with one message, not hang in a collective."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    import time

    from sparsetrain.launch import TwoHostTestbed

    recipe = tmp_path / "r.yaml"
    recipe.write_text(NODE_LOCAL_RECIPE)
    outs = [tmp_path / "host0-disk" / "run", tmp_path / "host1-disk" / "run"]

    def launch(bed, max_steps):
        argvs = [[sys.executable, "-m", "sparsetrain.launch.cli", "--backend", "torchrun", "--nnodes", "2",
                  "--node-rank", str(h), "--master-addr", bed.addresses[0], "--master-port", "29512", str(recipe),
                  "--out", str(outs[h]), "--no-report", "--max-steps", str(max_steps)] for h in (0, 1)]
        return bed.run(argvs, env={"PATH": _env()["PATH"], "OMP_NUM_THREADS": "1"}, cwd=str(tmp_path),
                       timeout=TIMEOUT)

    with TwoHostTestbed() as bed:
        first = launch(bed, 4)
        assert all(r.returncode == 0 for r in first), [r.stderr[-3000:] for r in first]
        assert (outs[0] / "checkpoints" / "last.ckpt").is_file()
        assert not (outs[1] / "checkpoints" / "last.ckpt").exists()
        start = time.monotonic()
        second = launch(bed, 8)
        seconds = time.monotonic() - start
    assert all(r.returncode != 0 for r in second)
    message = ("node 1 (rank 1) cannot resume from checkpoints/last.ckpt at step 4 like rank 0 (cannot read it): "
               "the run directory must be on storage every node shares, or pass --no-resume")
    assert message in second[1].stderr, second[1].stderr[-4000:]
    assert seconds < 120, seconds  # not gloo's 30-minute collective timeout
