"""Fixtures of the twin-dispatch tests."""
from __future__ import annotations

import pytest

from sparx_ref.torch_models import ops
from tests.torch_models._oracle import oracle_registry


@pytest.fixture
def oracle_backend(monkeypatch):
    """Route backend "numba_cpu" to the NumPy oracle for the duration of a test."""
    monkeypatch.setattr(ops, "_kernels", oracle_registry())
    return "numba_cpu"


