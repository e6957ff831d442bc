import pytest

from .solver_helpers import test_data_layer


@pytest.fixture(autouse=True)
def _solver_test_data_layer():
    with test_data_layer():
        yield
