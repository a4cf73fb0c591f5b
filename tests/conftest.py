"""Shared pytest configuration: deterministic, float64-friendly, few threads."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two workers share two cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)
