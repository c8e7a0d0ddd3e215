"""Environment resolution and warnings; exit statuses of run_forwarding."""

import os
import signal
import sys
import warnings

import pytest
from sparsetrain.launch import EnvOverrideWarning, run_forwarding
from sparsetrain.launch.env import child_env, parse_env_assignments, resolve_from_env
from sparsetrain.launch.process import exit_status


def test_resolve_takes_missing_values_from_environment():
    got = resolve_from_env({"master_addr": None, "master_port": None, "node_rank": 1},
                           {"MASTER_ADDR": "h", "MASTER_PORT": "123", "NODE_RANK": "1"})
    assert got == {"master_addr": "h", "master_port": 123, "node_rank": 1}


def test_resolve_leaves_missing_when_environment_lacks_it():
    assert resolve_from_env({"master_addr": None}, {"MASTER_ADDR": ""}) == {"master_addr": None}


def test_resolve_warns_when_argument_beats_variable():
    with pytest.warns(EnvOverrideWarning, match=r"--node-rank 0 overrides NODE_RANK=1 from the environment"):
        got = resolve_from_env({"node_rank": 0}, {"NODE_RANK": "1"})
    assert got == {"node_rank": 0}


def test_resolve_rejects_malformed_integer():
    with pytest.raises(ValueError, match=r"MASTER_PORT in the environment must be an integer, got '80a'"):
        resolve_from_env({"master_port": None}, {"MASTER_PORT": "80a"})


def test_parse_env_assignments():
    assert parse_env_assignments(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    with pytest.raises(ValueError, match=r"`--env` must be KEY=VALUE with KEY a variable name, got 'A-B=1'"):
        parse_env_assignments(["A-B=1"])


def test_child_env_warns_only_on_real_override():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = child_env({"A": "1", "B": "2", "PATH": "/usr/bin"}, {"A": "1", "B": "3", "C": "4"})
    assert [str(w.message) for w in caught] == ["B=3 overrides B=2 from the environment"]
    assert (env["A"], env["B"], env["C"]) == ("1", "3", "4")
    assert env["PATH"] == os.path.dirname(sys.executable) + os.pathsep + "/usr/bin"


@pytest.mark.parametrize("code, status", [(0, 0), (3, 3), (-signal.SIGTERM, 143), (-signal.SIGKILL, 137)])
def test_exit_status(code, status):
    assert exit_status(code) == status


@pytest.mark.parametrize("code", [0, 5])
def test_run_forwarding_returns_exit_code(code):
    assert run_forwarding([sys.executable, "-c", f"import sys; sys.exit({code})"]) == code


def test_run_forwarding_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run_forwarding([sys.executable, "-c", "pass"])
    assert {s: signal.getsignal(s) for s in before} == before


def test_run_forwarding_missing_program():
    with pytest.raises(FileNotFoundError):
        run_forwarding(["/nonexistent/program"])
