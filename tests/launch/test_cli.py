"""``sparsetrain-launch``: dry-run output, argument errors, environment handling, running a command.

Real runs use fake launcher programs (small Python scripts named ``torchrun`` / ``deepspeed``
put first on ``PATH``) that record what they were given, so exit codes and signals can be
checked without starting a training job.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from sparsetrain.launch import cli

pytestmark = pytest.mark.usefixtures("recipe_in_cwd")

VENV_BIN = os.path.dirname(sys.executable)


def dry(capsys, *args):
    assert cli.main(["--dry-run", *args]) == 0
    return capsys.readouterr()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--backend", "torchrun", "--nproc-per-node", "2", "r.yaml", "--max-steps", "20", "--out", "runs/x"],
         "torchrun --standalone --nnodes 1 --nproc-per-node 2 --no-python sparsetrain train r.yaml --max-steps 20 "
         "--out runs/x\n"),
        (["--backend", "torchrun", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
          "--master-port", "2345", "--max-restarts", "3", "r.yaml"],
         "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 "
         "--master-addr 10.0.0.1 --master-port 2345 --max-restarts 3 --no-python sparsetrain train r.yaml\n"),
        (["--backend", "torchrun", "--nnodes", "3", "--rdzv-endpoint", "head:29400", "--rdzv-id", "j1", "r.yaml"],
         "torchrun --nnodes 3 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id j1 "
         "--no-python sparsetrain train r.yaml\n"),
        (["--backend", "deepspeed", "--nproc-per-node", "2", "r.yaml", "--max-steps", "5"],
         "deepspeed --num_nodes 1 --num_gpus 2 --no_ssh --node_rank 0 --master_addr 127.0.0.1 --master_port 29500 "
         "--no_local_rank --module sparsetrain.launch.worker --from deepspeed -- sparsetrain train r.yaml "
         "--max-steps 5\n"),
        (["--backend", "horovod", "--nnodes", "2", "--nproc-per-node", "2", "--hosts", "a, b", "r.yaml"],
         "horovodrun --gloo -np 4 -H a:2,b:2 python -m sparsetrain.launch.worker --from horovod --master-addr a "
         "--master-port 29500 -- sparsetrain train r.yaml\n"),
        (["--backend", "torchrun", "--env", "OMP_NUM_THREADS=4", "--env", "A=b c", "my r.yaml", "--out", "$x"],
         "OMP_NUM_THREADS=4 'A=b c' torchrun --standalone --nnodes 1 --nproc-per-node 1 --no-python sparsetrain "
         "train 'my r.yaml' --out '$x'\n"),
        (["--backend", "torchrun", "r.yaml", "--", "--max-steps", "1"],
         "torchrun --standalone --nnodes 1 --nproc-per-node 1 --no-python sparsetrain train r.yaml --max-steps 1\n"),
    ],
)
def test_dry_run_pinned(capsys, monkeypatch, args, expected):
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "OMP_NUM_THREADS", "A",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.delenv(var, raising=False)
    out = dry(capsys, *args)
    assert out.out == expected
    assert out.err == ""


def test_dry_run_deepspeed_multi_node_shows_hostfile(capsys, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = dry(capsys, "--backend", "deepspeed", "--nnodes", "2", "--node-rank", "0", "--master-addr", "h0",
              "r.yaml").out
    hostfile = tmp_path / "sparsetrain-deepspeed-hostfile-2x1"
    assert out.splitlines() == [
        f"# {hostfile}:",
        "#   node0 slots=1",
        "#   node1 slots=1",
        f"deepspeed --hostfile {hostfile} --num_nodes 2 --num_gpus 1 --no_ssh --node_rank 0 --master_addr h0 "
        "--master_port 29500 --no_local_rank --module sparsetrain.launch.worker --from deepspeed -- "
        "sparsetrain train r.yaml",
    ]
    assert not hostfile.exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "mpi", "r.yaml"], "--backend must be one of torchrun, deepspeed, horovod, slurm, got 'mpi'"),
        (["--backend", "torchrun", "--nnodes", "0", "r.yaml"], "`nnodes` must be >= 1, got 0"),
        (["--backend", "torchrun", "--nnodes", "2", "--node-rank", "5", "--master-addr", "h", "r.yaml"],
         "`node_rank` must be in [0, nnodes) = [0, 2), got 5"),
        (["--backend", "torchrun", "--nnodes", "2", "--node-rank", "1", "r.yaml"],
         "multi-node torchrun (nnodes=2) needs `master_addr` (--master-addr or MASTER_ADDR)"),
        (["--backend", "deepspeed", "--nnodes", "2", "--master-addr", "h", "r.yaml"],
         "multi-node deepspeed (nnodes=2) needs `node_rank` (--node-rank or NODE_RANK)"),
        (["--backend", "torchrun", "--gpus-per-node", "4", "--submit", "r.yaml"],
         "--gpus-per-node, --submit only apply to --backend slurm, got --backend torchrun"),
        (["--backend", "torchrun", "--env", "1X=3", "r.yaml"], "`--env` must be KEY=VALUE with KEY a variable name"),
        (["--backend", "torchrun", "--env", "NOEQUALS", "r.yaml"], "`--env` must be KEY=VALUE"),
        (["--backend", "slurm", "--time", "soon", "r.yaml"], "`time` must be a SLURM time"),
        (["--backend", "torchrun", "--nnodes", "two", "r.yaml"], "argument --nnodes: invalid int value: 'two'"),
        (["--backend", "torchrun"], "give a RECIPE, or a command to run after `--`"),
        (["--backend", "torchrun", "--"], "`--` must be followed by the command to run"),
        (["--backend", "slurm", "--script", "/no/such/dir/j.sbatch", "r.yaml"],
         "--script: the directory of '/no/such/dir/j.sbatch' does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_message(capsys, monkeypatch, args, message):
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["--dry-run", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_master_addr_and_node_rank_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.1.1.1")
    monkeypatch.setenv("MASTER_PORT", "4444")
    monkeypatch.setenv("NODE_RANK", "1")
    out = dry(capsys, "--backend", "torchrun", "--nnodes", "2", "r.yaml")
    assert out.out == ("torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --master-addr 10.1.1.1 "
                       "--master-port 4444 --no-python sparsetrain train r.yaml\n")
    assert out.err == ""


def test_argument_overriding_environment_warns(capsys, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.1.1.1")
    monkeypatch.setenv("NODE_RANK", "0")
    out = dry(capsys, "--backend", "torchrun", "--nnodes", "2", "--master-addr", "10.2.2.2", "--node-rank", "0",
              "r.yaml")
    assert "--master-addr 10.2.2.2" in out.out
    assert out.err == ("sparsetrain-launch: warning: --master-addr 10.2.2.2 overrides MASTER_ADDR=10.1.1.1 "
                       "from the environment\n")


def test_env_assignment_overriding_environment_warns(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    out = dry(capsys, "--backend", "torchrun", "--env", "OMP_NUM_THREADS=1", "r.yaml")
    assert out.err == (
        "sparsetrain-launch: warning: OMP_NUM_THREADS=1 overrides OMP_NUM_THREADS=8 from the environment\n"
    )
    out = dry(capsys, "--backend", "torchrun", "--env", "OMP_NUM_THREADS=8", "r.yaml")
    assert out.err == ""  # same value: nothing is overridden


def test_malformed_environment_variable_is_named(capsys, monkeypatch):
    monkeypatch.setenv("NODE_RANK", "first")
    monkeypatch.setenv("MASTER_ADDR", "h")
    with pytest.raises(SystemExit):
        cli.main(["--dry-run", "--backend", "torchrun", "--nnodes", "2", "r.yaml"])
    assert "NODE_RANK in the environment must be an integer, got 'first'" in capsys.readouterr().err


# ------------------------------------------------------------------ running (fake launchers)
FAKE = textwrap.dedent(
    """\
    #!{python}
    import json, os, signal, sys, time
    log = os.environ["FAKE_LOG"]
    def record(**kw):
        with open(log, "a") as f:
            f.write(json.dumps(kw) + "\\n")
    record(argv=sys.argv, path=os.environ["PATH"], omp=os.environ.get("OMP_NUM_THREADS"),
           pgid=os.getpgid(0), pid=os.getpid(), hostfile=(open(sys.argv[2]).read() if sys.argv[1:2] == ["--hostfile"]
           else None))
    mode = os.environ.get("FAKE_MODE", "exit")
    if mode == "exit":
        sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    if mode == "suicide":
        os.kill(os.getpid(), signal.SIGKILL)
    def handler(signum, frame):
        record(signal=signum)
        sys.exit(42)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, handler)
    open(log + ".ready", "w").close()
    time.sleep(60)
    sys.exit(3)
    """
)


@pytest.fixture
def fake_launchers(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("torchrun", "deepspeed", "horovodrun", "sbatch"):
        p = bindir / name
        p.write_text(FAKE.format(python=sys.executable))
        p.chmod(0o755)
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{VENV_BIN}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)

    def records():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return bindir, log, records


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_code_is_propagated(fake_launchers, monkeypatch, code):
    bindir, _, records = fake_launchers
    monkeypatch.setenv("FAKE_EXIT", str(code))
    assert cli.main(["--backend", "torchrun", "--env", "OMP_NUM_THREADS=2", "r.yaml", "--max-steps", "3"]) == code
    (rec,) = records()
    assert rec["argv"] == [str(bindir / "torchrun"), "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
                           "--no-python", "sparsetrain", "train", "r.yaml", "--max-steps", "3"]
    assert rec["omp"] == "2"


def test_killed_by_signal_gives_128_plus_n(fake_launchers, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "suicide")
    assert cli.main(["--backend", "torchrun", "r.yaml"]) == 128 + signal.SIGKILL


def test_path_gets_this_environment_bin(fake_launchers, monkeypatch):
    # The launched command must find the torchrun/sparsetrain installed beside the running Python.
    bindir, _, records = fake_launchers
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    assert cli.main(["--backend", "torchrun", "r.yaml"]) == 0
    assert records()[0]["path"] == f"{bindir}{os.pathsep}/usr/bin"


def test_missing_launcher_program_gives_127(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert cli.main(["--backend", "deepspeed", "r.yaml"]) == 127
    assert "'deepspeed' not found on PATH" in capsys.readouterr().err


def test_deepspeed_multi_node_writes_hostfile(fake_launchers, monkeypatch, tmp_path):
    import tempfile

    _, _, records = fake_launchers
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["--backend", "deepspeed", "--nnodes", "3", "--nproc-per-node", "2", "--node-rank", "2",
                     "--master-addr", "h0", "r.yaml"]) == 0
    (rec,) = records()
    assert rec["argv"][1:3] == ["--hostfile", str(tmp_path / "sparsetrain-deepspeed-hostfile-3x2")]
    assert rec["hostfile"] == "node0 slots=2\nnode1 slots=2\nnode2 slots=2\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signals_are_forwarded(fake_launchers, monkeypatch, sig):
    _, log, records = fake_launchers
    monkeypatch.setenv("FAKE_MODE", "wait")
    launcher = subprocess.Popen([sys.executable, "-m", "sparsetrain.launch.cli", "--backend", "torchrun", "r.yaml"])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(str(log) + ".ready"):
            assert time.monotonic() < deadline, "fake torchrun did not start"
            assert launcher.poll() is None, "launcher exited early"
            time.sleep(0.02)
        launcher.send_signal(sig)
        assert launcher.wait(timeout=30) == 42  # the child's own exit code, after it handled the signal
    finally:
        if launcher.poll() is None:
            launcher.kill()
    start, got = records()
    assert got == {"signal": int(sig)}
    assert start["pgid"] == start["pid"] != os.getpgid(0)  # own session: the terminal's Ctrl-C reaches it once


def test_bad_recipe_is_refused_before_anything_is_launched(fake_launchers, capsys):
    _, _, records = fake_launchers
    with open("bad.yaml", "w") as f:
        f.write("version: 1\ntrainer: {max_steps: 0}\n")
    assert cli.main(["--backend", "torchrun", "--nproc-per-node", "2", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == ("sparsetrain-launch: error: invalid recipe bad.yaml: trainer.max_steps: `max_steps` must be >= 1, "
                   "got 0 (nothing was launched)\n")
    assert records() == []


def test_bad_set_in_overrides_is_refused_before_launch(fake_launchers, capsys):
    _, _, records = fake_launchers
    assert cli.main(["--backend", "torchrun", "r.yaml", "--set", "callbacks[0].sparsity=0.5"]) == 2
    assert "invalid recipe r.yaml: callbacks[0]: --set: no list entry 0 (the list has 0)" in capsys.readouterr().err
    assert records() == []


def test_no_check_launches_an_unreadable_recipe(fake_launchers):
    _, _, records = fake_launchers
    assert cli.main(["--backend", "torchrun", "--no-check", "only-on-the-nodes.yaml"]) == 0
    assert records()[0]["argv"][-3:] == ["sparsetrain", "train", "only-on-the-nodes.yaml"]


def test_command_after_double_dash_is_run_as_given(fake_launchers):
    bindir, _, records = fake_launchers
    assert cli.main(["--backend", "torchrun", "--nproc-per-node", "2", "--", "python", "my_train.py", "--lr",
                     "0.1", "--", "x"]) == 0
    assert records()[0]["argv"] == [str(bindir / "torchrun"), "--standalone", "--nnodes", "1", "--nproc-per-node",
                                    "2", "--no-python", "python", "my_train.py", "--lr", "0.1", "--", "x"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--backend", "deepspeed", "--nproc-per-node", "2", "--", "python", "t.py"],
         "deepspeed --num_nodes 1 --num_gpus 2 --no_ssh --node_rank 0 --master_addr 127.0.0.1 --master_port 29500 "
         "--no_local_rank --module sparsetrain.launch.worker --from deepspeed -- python t.py\n"),
        (["--backend", "horovod", "--nproc-per-node", "2", "--", "python", "t.py", "--a"],
         "horovodrun --gloo -np 2 -H localhost:2 python -m sparsetrain.launch.worker --from horovod --master-addr "
         "localhost --master-port 29500 -- python t.py --a\n"),
    ],
)
def test_dry_run_of_a_command(capsys, monkeypatch, args, expected):
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dry(capsys, *args).out == expected


def test_slurm_script_runs_the_command(capsys):
    out = dry(capsys, "--backend", "slurm", "--nnodes", "2", "--", "python", "my train.py", "--x").out
    assert out.endswith("--no-python python 'my train.py' --x\n")
