import pytest

from tests.harness import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield
