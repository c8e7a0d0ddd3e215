"""The worker adapter turns DeepSpeed's and Horovod's variables into torchrun's."""

import json
import subprocess
import sys

import pytest
from sparsetrain.launch.worker import torchrun_env

DS = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2",
      "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}
HVD = {"HOROVOD_RANK": "2", "HOROVOD_LOCAL_RANK": "0", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2",
       "HOROVOD_CROSS_RANK": "1", "HOROVOD_CROSS_SIZE": "2"}


def test_deepspeed_mapping():
    assert torchrun_env("deepspeed", DS) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}


def test_horovod_mapping():
    assert torchrun_env("horovod", HVD, master_addr="h0", master_port=29600) == {
        "RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "NODE_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29600"}


@pytest.mark.parametrize(
    "source, env, kw, match",
    [
        ("deepspeed", {k: v for k, v in DS.items() if k != "LOCAL_SIZE"}, {},
         r"LOCAL_SIZE is not set: run this under the DeepSpeed launcher"),
        ("horovod", {}, {"master_addr": "h", "master_port": 1}, r"HOROVOD_RANK is not set: run this under horovodrun"),
        ("horovod", HVD, {"master_port": 1}, r"`master_addr` is required with source='horovod'"),
        ("horovod", HVD, {"master_addr": "h"}, r"`master_port` is required with source='horovod'"),
        ("mpi", HVD, {}, r"`source` must be 'deepspeed' or 'horovod', got 'mpi'"),
    ],
)
def test_missing_variables_are_named(source, env, kw, match):
    with pytest.raises(ValueError, match=match):
        torchrun_env(source, env, **kw)


def test_main_execs_program_with_translated_environment():
    code = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
    keys = ["RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "HOROVOD_RANK"]
    out = subprocess.run(
        [sys.executable, "-m", "sparsetrain.launch.worker", "--from", "horovod", "--master-addr", "h0",
         "--master-port", "2222", "--", sys.executable, "-c", code, *keys],
        env={"PATH": "/usr/bin:/bin", **HVD}, capture_output=True, text=True, check=True,
    ).stdout
    assert json.loads(out) == {"RANK": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "h0",
                               "MASTER_PORT": "2222", "HOROVOD_RANK": "2"}


def test_main_outside_launcher_fails_clearly():
    r = subprocess.run([sys.executable, "-m", "sparsetrain.launch.worker", "--from", "deepspeed", "--", "true"],
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert r.returncode == 2
    assert "RANK is not set: run this under the DeepSpeed launcher (deepspeed)" in r.stderr
