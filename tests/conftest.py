"""Shared test setup: hypothesis profiles and seeded random generators.

HYPOTHESIS_PROFILE=dev (default, 50 examples) or ci (200 examples, derandomized).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: a small torch.compile test, kept under 60 s on a CPU")


@pytest.fixture
def rng() -> np.random.Generator:
    """A numpy generator with a fixed seed, fresh for every test."""
    return np.random.default_rng(20240611)


@pytest.fixture
def gen() -> torch.Generator:
    """A torch CPU generator with a fixed seed, fresh for every test."""
    return torch.Generator().manual_seed(20240611)
