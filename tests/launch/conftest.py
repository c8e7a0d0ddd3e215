"""After the launch tests, no network namespace or veth made by a test bed may remain."""

import pytest
from sparsetrain.launch.testbed import list_testbed_namespaces


@pytest.fixture(scope="session", autouse=True)
def no_testbed_left_behind():
    before = set(list_testbed_namespaces())
    yield
    left = set(list_testbed_namespaces()) - before
    assert not left, f"test bed namespaces left behind: {sorted(left)}"
