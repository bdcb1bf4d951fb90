"""Helpers shared by the GPU kernel tests: the (backend, version) ladders of an op pair, and a
device whose kernel module allocates NaN-filled buffers (so an element a kernel never writes
fails the comparison with the reference)."""
from __future__ import annotations

import numpy as np
import pytest

import importlib

from sparx_ref.kernels import registry


def ladder_params(ops, backends):
    """pytest params (backend, version) for the forward/backward op pair ``ops``; both ops must
    have the same rung names."""
    out = []
    for backend in backends:
        fwd = registry.versions(ops[0], backend)
        assert fwd == registry.versions(ops[1], backend), f"{backend}: fwd/bwd ladders differ"
        out += [pytest.param(backend, v, id=f"{backend}-{v}") for v in fwd]
    return out


class NaNDevice:
    """``put`` moves NumPy arrays to ``backend``'s device; ``module``'s ``_empty`` (every output
    and scratch buffer of its kernels) is swapped for a NaN-filled allocation for the test."""

    def __init__(self, backend, module, monkeypatch):
        self.backend = backend
        self.mod = module
        if backend == "cupy":
            import cupy
            self.put = cupy.asarray

            def nan_empty(shape, dtype):
                return cupy.full(tuple(int(s) for s in shape), np.nan, dtype=dtype)
        else:
            from numba import cuda
            self.put = cuda.to_device

            def nan_empty(shape, dtype):
                return cuda.to_device(np.full(tuple(int(s) for s in shape), np.nan, dtype=dtype))
        monkeypatch.setattr(module, "_empty", nan_empty)


class OpPairDevice(NaNDevice):
    """The kernel module ``sparx_ref.kernels.<backend>.<module>`` with NaN-filled allocations, and
    the registry's (forward, backward) pair ``ops`` of any version; skips without the runtime."""

    def __init__(self, backend, module, ops, monkeypatch):
        missing = registry.runtime_missing(backend)
        if missing:
            pytest.skip(missing)
        self.ops = ops
        super().__init__(backend, importlib.import_module(f"sparx_ref.kernels.{backend}.{module}"), monkeypatch)

    def kernels(self, version):
        """(forward, backward) of ``version`` (None: the default), looked up through the registry."""
        return tuple(registry.get(op, self.backend, version) for op in self.ops)
