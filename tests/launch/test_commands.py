"""Exact command lines per backend and option combination, and argument validation."""

import pytest
from sparsetrain.launch import LaunchConfig, build_command
from sparsetrain.launch.commands import deepspeed_hostfile, deepspeed_hostfile_path, launcher_env

TRAIN = ["sparsetrain", "train", "r.yaml", "--max-steps", "20", "--out", "runs/x"]


def cfg(**kw):
    kw.setdefault("recipe", "r.yaml")
    kw.setdefault("overrides", ["--max-steps", "20", "--out", "runs/x"])
    return LaunchConfig(**kw)


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(backend="torchrun", nproc_per_node=2),
         ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--no-python", *TRAIN]),
        (dict(backend="torchrun", nproc_per_node=2, max_restarts=3),
         ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "3",
          "--no-python", *TRAIN]),
        (dict(backend="torchrun", nnodes=2, node_rank=1, master_addr="10.0.0.1"),
         ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "1", "--master-addr", "10.0.0.1",
          "--master-port", "29500", "--no-python", *TRAIN]),
        (dict(backend="torchrun", nnodes=4, nproc_per_node=8, node_rank=0, master_addr="head", master_port=1234,
              max_restarts=2),
         ["torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--node-rank", "0", "--master-addr", "head",
          "--master-port", "1234", "--max-restarts", "2", "--no-python", *TRAIN]),
        (dict(backend="torchrun", nnodes=1, master_addr="127.0.0.1"),
         ["torchrun", "--nnodes", "1", "--nproc-per-node", "1", "--node-rank", "0", "--master-addr", "127.0.0.1",
          "--master-port", "29500", "--no-python", *TRAIN]),
        (dict(backend="torchrun", nnodes=2, rdzv_endpoint="head:29400", rdzv_id="job7", local_addr="10.0.0.2",
              max_restarts=1),
         ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
          "head:29400", "--rdzv-id", "job7", "--local-addr", "10.0.0.2", "--max-restarts", "1", "--no-python",
          *TRAIN]),
        (dict(backend="deepspeed", nproc_per_node=2),
         ["deepspeed", "--num_nodes", "1", "--num_gpus", "2", "--no_ssh", "--node_rank", "0", "--master_addr",
          "127.0.0.1", "--master_port", "29500", "--no_local_rank", "--module", "sparsetrain.launch.worker",
          "--from", "deepspeed", "--", *TRAIN]),
        (dict(backend="deepspeed", nnodes=2, node_rank=1, master_addr="10.0.0.1", hostfile="/etc/hosts.ds"),
         ["deepspeed", "--hostfile", "/etc/hosts.ds", "--num_nodes", "2", "--num_gpus", "1", "--no_ssh",
          "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500", "--no_local_rank",
          "--module", "sparsetrain.launch.worker", "--from", "deepspeed", "--", *TRAIN]),
        (dict(backend="horovod", nproc_per_node=2),
         ["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", "python", "-m", "sparsetrain.launch.worker",
          "--from", "horovod", "--master-addr", "localhost", "--master-port", "29500", "--", *TRAIN]),
        (dict(backend="horovod", nnodes=2, nproc_per_node=4, hosts=["a", "b:4"], master_port=1111),
         ["horovodrun", "--gloo", "-np", "8", "-H", "a:4,b:4", "python", "-m", "sparsetrain.launch.worker",
          "--from", "horovod", "--master-addr", "a", "--master-port", "1111", "--", *TRAIN]),
        (dict(backend="slurm", nnodes=2), ["sbatch", "sparsetrain.sbatch"]),
    ],
)
def test_command_lines_pinned(kw, expected):
    assert build_command(cfg(**kw)) == expected


def test_deepspeed_multi_node_generated_hostfile(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    path = deepspeed_hostfile_path(2, 3)
    assert path == str(tmp_path / "sparsetrain-deepspeed-hostfile-2x3")
    argv = build_command(cfg(backend="deepspeed", nnodes=2, nproc_per_node=3, node_rank=0, master_addr="h0"))
    assert argv[:3] == ["deepspeed", "--hostfile", path]
    assert deepspeed_hostfile(2, 3) == "node0 slots=3\nnode1 slots=3\n"


def test_entry_replaces_sparsetrain_train():
    c = LaunchConfig(backend="torchrun", nproc_per_node=2, entry=["python", "script.py", "--x"])
    assert build_command(c)[-4:] == ["--no-python", "python", "script.py", "--x"]
    c = LaunchConfig(backend="deepspeed", nproc_per_node=2, entry=["python", "s.py"])
    assert build_command(c)[-3:] == ["--", "python", "s.py"]


def test_argv_is_never_split_or_quoted():
    c = cfg(backend="torchrun", recipe="my recipe; rm -rf ~.yaml", overrides=["--out", "$HOME/`x`"])
    assert build_command(c)[-5:] == ["sparsetrain", "train", "my recipe; rm -rf ~.yaml", "--out", "$HOME/`x`"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(backend="mpirun"), r"`backend` must be one of torchrun, deepspeed, horovod, slurm, got 'mpirun'"),
        (dict(backend="torchrun", nnodes=0), r"`nnodes` must be >= 1, got 0"),
        (dict(backend="torchrun", nnodes=-3), r"`nnodes` must be >= 1, got -3"),
        (dict(backend="torchrun", nnodes=2.0), r"`nnodes` must be an integer, got 2.0"),
        (dict(backend="torchrun", nproc_per_node=0), r"`nproc_per_node` must be >= 1, got 0"),
        (dict(backend="torchrun", nnodes=2, node_rank=2, master_addr="h"),
         r"`node_rank` must be in \[0, nnodes\) = \[0, 2\), got 2"),
        (dict(backend="torchrun", nnodes=2, node_rank=-1, master_addr="h"), r"`node_rank` must be in"),
        (dict(backend="torchrun", nnodes=2, node_rank=0),
         r"multi-node torchrun \(nnodes=2\) needs `master_addr` \(--master-addr or MASTER_ADDR\)"),
        (dict(backend="torchrun", nnodes=2, master_addr="h"), r"needs `node_rank` \(--node-rank or NODE_RANK\)"),
        (dict(backend="deepspeed", nnodes=2, node_rank=1),
         r"multi-node deepspeed \(nnodes=2\) needs `master_addr`"),
        (dict(backend="deepspeed", nnodes=2, master_addr="h"), r"multi-node deepspeed \(nnodes=2\) needs `node_rank`"),
        (dict(backend="torchrun", master_port=0), r"`master_port` must be in 1..65535, got 0"),
        (dict(backend="torchrun", master_port=70000), r"`master_port` must be in 1..65535, got 70000"),
        (dict(backend="torchrun", max_restarts=-1), r"`max_restarts` must be >= 0, got -1"),
        (dict(backend="deepspeed", max_restarts=2), r"`max_restarts` is supported by the torchrun and slurm"),
        (dict(backend="horovod", max_restarts=2), r"`max_restarts` is supported by the torchrun and slurm"),
        (dict(backend="torchrun", nnodes=2, rdzv_endpoint="nohostport"), r"`rdzv_endpoint` must look like HOST:PORT"),
        (dict(backend="torchrun", nnodes=2, rdzv_endpoint="h:99999"), r"`rdzv_endpoint` must look like HOST:PORT"),
        (dict(backend="torchrun", nnodes=2, rdzv_endpoint="h:1", node_rank=0),
         r"`rdzv_endpoint` assigns node ranks on arrival"),
        (dict(backend="deepspeed", rdzv_endpoint="h:1"), r"`rdzv_endpoint` is supported by the torchrun and slurm"),
        (dict(backend="torchrun", master_addr="-oProxyCommand=x"), r"`master_addr` must be a host name or IP"),
        (dict(backend="torchrun", master_addr="a b"), r"`master_addr` must be a host name or IP"),
        (dict(backend="horovod", nnodes=2), r"horovod with nnodes=2 needs `hosts` \(--hosts\)"),
        (dict(backend="horovod", nnodes=2, hosts=["a"]), r"`hosts` must list nnodes=2 hosts"),
        (dict(backend="horovod", nnodes=1, hosts=["a:3"], nproc_per_node=2), r"slots must equal nproc_per_node=2"),
        (dict(backend="horovod", nnodes=2, node_rank=1, hosts=["a", "b"]), r"`node_rank` does not apply to horovod"),
        (dict(backend="torchrun", hosts=["a"]), r"`hosts` is for the horovod backend"),
        (dict(backend="torchrun", hostfile="x"), r"`hostfile` is for the deepspeed backend"),
        (dict(backend="deepspeed", local_addr="x"), r"`local_addr` is for the torchrun backend"),
        (dict(backend="slurm", nnodes=2, node_rank=0), r"the slurm backend assigns nodes itself"),
        (dict(backend="slurm", nnodes=2, master_addr="h"), r"the slurm backend assigns nodes itself"),
        (dict(backend="torchrun", rdzv_id="a/b"), r"`rdzv_id` must be letters"),
        (dict(backend="torchrun", recipe=""), r"`recipe` must be a path to a recipe file"),
        (dict(backend="torchrun", recipe=None), r"`recipe` must be a path to a recipe file"),
        (dict(backend="torchrun", overrides="--max-steps 3"), r"`overrides` must be a list of strings"),
        (dict(backend="torchrun", entry=[]), r"`entry` must be a non-empty list of strings"),
        (dict(backend="torchrun", entry=["x"], overrides=["--y"]), r"`overrides` apply to `sparsetrain train`"),
    ],
)
def test_bad_arguments(kw, match):
    kw.setdefault("recipe", "r.yaml")
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**kw)


def test_build_command_rejects_non_config():
    with pytest.raises(ValueError, match="`cfg` must be a LaunchConfig"):
        build_command({"backend": "torchrun"})


@pytest.mark.parametrize("backend,restarts,expected", [
    ("torchrun", 2, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}),
    ("slurm", 1, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}),
    ("torchrun", 0, {}),
    ("deepspeed", 0, {}),
    ("horovod", 0, {}),
])
def test_restarting_torchrun_gets_a_store_per_attempt(backend, restarts, expected):
    extra = {"nnodes": 2, "rdzv_endpoint": "head:29500"} if backend == "slurm" else {}
    cfg = LaunchConfig(backend=backend, recipe="r.yaml", max_restarts=restarts, **extra)
    assert launcher_env(cfg) == expected
    with pytest.raises(ValueError, match="`cfg` must be a LaunchConfig"):
        launcher_env({"backend": backend})
