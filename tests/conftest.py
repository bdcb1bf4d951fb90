"""Root test configuration.

The CUDA simulator must be chosen before Numba is first imported; setdefault lets a GPU
run (scripts/gpu-check) set NUMBA_ENABLE_CUDASIM=0 and use the real device.
"""
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Numba's first-call compile breaks hypothesis' default 200 ms deadline.
settings.register_profile("sparx", deadline=None, max_examples=20, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sparx"))

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    """tests/data: copies of the spec's key lists, wiring lists and golden files."""
    return DATA


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name (reproducible, not zeros)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
