import pytest

from .solver_helpers import registered_data_layer


@pytest.fixture(autouse=True)
def _solver_test_data_layer():
    with registered_data_layer():
        yield
