"""After the launch tests, no network namespace (nor the veth inside it) made by their test beds may remain.

Beds are named after the process that made them, so beds of other programs running at the
same time (a benchmark) are not counted; a bed whose owner died without teardown is.
"""

import os

import pytest
from sparsetrain.launch.testbed import _NAME_RE, _pid_alive, list_testbed_namespaces


def _ours_or_orphaned():
    out = set()
    for ns in list_testbed_namespaces():
        pid = int(_NAME_RE.match(ns).group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            out.add(ns)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_testbed_left_behind():
    before = _ours_or_orphaned()
    yield
    left = _ours_or_orphaned() - before
    assert not left, f"test bed namespaces left behind: {sorted(left)}"


VALID_RECIPE = ("version: 1\nmodel: {name: mlp}\ndata: {name: synthetic_classification}\n"
                "trainer: {devices: 1, max_steps: 3}\n")


@pytest.fixture
def recipe_in_cwd(tmp_path, monkeypatch):
    """Run in ``tmp_path`` holding a valid ``r.yaml`` (and ``my r.yaml``): the launcher checks a recipe
    before it launches anything."""
    for name in ("r.yaml", "my r.yaml"):
        (tmp_path / name).write_text(VALID_RECIPE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_rendezvous_environment(monkeypatch):
    """The launcher reads MASTER_ADDR / MASTER_PORT / NODE_RANK from the environment; in-process Lightning runs
    of other test modules leave them set (Lightning picks a free port and exports it). Each launch test
    starts without them and sets what it needs."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
