"""The model tests' fixtures: the harness every model spec goes through."""

import pytest

from tests import model_harness


@pytest.fixture(scope="session")
def harness():
    """tests/model_harness.py: `harness.run_model_spec_test(spec, tmp_path)`, and the same
    in a process of its own (`run_model_spec_test_in_subprocess`)."""
    yield model_harness
    model_harness.stop_subprocesses()
