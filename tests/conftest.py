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


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_RECIPE = os.path.join(FIXTURES, "tiny.toml")


def write_idx(path: str, array: np.ndarray) -> None:
    """A gzip'd big-endian IDX file (the Fashion-MNIST format) holding uint8 `array`."""
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> str:
    """The real-data fixture (1,000 train / 500 test Fashion-MNIST images) as the four IDX files."""
    data = np.load(os.path.join(FIXTURES, "fmnist_small.npz"))
    folder = tmp_path_factory.mktemp("fashion-mnist")
    for stem, key in (("train-images-idx3-ubyte", "train_x"), ("train-labels-idx1-ubyte", "train_y"),
                      ("t10k-images-idx3-ubyte", "test_x"), ("t10k-labels-idx1-ubyte", "test_y")):
        array = data[key]
        write_idx(str(folder / f"{stem}.gz"), array.reshape(len(array), 28, 28) if array.ndim == 4 else array)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: its tensors are small and the CPUs are shared, so more
    threads only add OpenMP spinning (modules opt in with pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
