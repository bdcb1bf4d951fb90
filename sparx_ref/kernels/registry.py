"""The kernel registry: every fast kernel, keyed by (op, backend, version).

A kernel has the same signature, semantics and return convention as the reference op
of the same name in ``sparx_ref.ref`` (``selective_scan_fwd`` mirrors
``sparx_ref.ref.scan.selective_scan_fwd``), with arrays of its backend:

- ``numba_cpu``:  NumPy arrays.
- ``numba_cuda``: CuPy arrays or anything exposing ``__cuda_array_interface__``
  (numba device arrays, torch CUDA tensors); outputs are numba device arrays unless the
  inputs were CuPy arrays (then CuPy).
- ``cupy``:       CuPy arrays (or ``__cuda_array_interface__`` objects).

The table below is static text: listing it imports no runtime, so ``registered()`` works
on a machine without Numba, CuPy or a GPU. ``get`` imports the module on demand and
raises :class:`KernelUnavailable` naming what is missing. Tests enumerate this table, so
a kernel added here is tested by the existing tests automatically.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

BACKENDS = ("numba_cpu", "numba_cuda", "cupy")


class KernelUnavailable(RuntimeError):
    """The kernel exists but its runtime (Numba, CuPy, a GPU) is missing here."""


@dataclass(frozen=True)
class Entry:
    op: str          # reference op name, e.g. "selective_scan_fwd"
    backend: str     # one of BACKENDS
    version: str     # ladder rung, e.g. "naive", "coalesced", "fused"
    target: str      # "module:function"
    default: bool    # the fastest correct version: what get(op, backend) returns
    idea: str = ""   # one-line idea of this version


# ---------------------------------------------------------------------------------------
# The table. One row per (op, backend, version). Exactly one default per (op, backend).
# ---------------------------------------------------------------------------------------
_TABLE: list[Entry] = [
    # --- scan kernels (issue: scan kernels) -------------------------------------------
    # rows added by sparx_ref/kernels/*/scan.py work
    # --- attention kernels (issue: attention kernels) ---------------------------------
    Entry("window_attention_fwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element, intermediates in device memory"),
    Entry("window_attention_fwd", "numba_cuda", "fused", "sparx_ref.kernels.numba_cuda.attention:window_attention_fwd_fused", True,
          "one block per (window, head): N x N scores in shared memory, fused bias+mask+softmax+P v, 4x4 register tiles"),
    Entry("window_attention_bwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element, dS through device memory, dbias by a column sum"),
    Entry("window_attention_bwd", "numba_cuda", "fused", "sparx_ref.kernels.numba_cuda.attention:window_attention_bwd_fused", True,
          "one block per (head, window set): P and dS in shared memory, dbias in per-block slabs (no atomics)"),
    Entry("dmca_attention_fwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element"),
    Entry("dmca_attention_fwd", "numba_cuda", "tiled", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_fwd_tiled", True,
          "shared-memory tiled GEMMs (64x64 tile, 4x4 per thread), coalesced along the contiguous axis"),
    Entry("dmca_attention_bwd", "numba_cuda", "naive", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element"),
    Entry("dmca_attention_bwd", "numba_cuda", "tiled", "sparx_ref.kernels.numba_cuda.attention:dmca_attention_bwd_tiled", True,
          "tiled GEMMs for dv = P^T dout, dP = dout v^T, dq = dS k, dk = dS^T q"),
    Entry("window_attention_fwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:window_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element, intermediates in device memory"),
    Entry("window_attention_fwd", "cupy", "fused", "sparx_ref.kernels.cupy.attention:window_attention_fwd_fused", True,
          "one block per (window, head): N x N scores in shared memory, fused bias+mask+softmax+P v, 4x4 register tiles"),
    Entry("window_attention_bwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:window_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element, dS through device memory, dbias by a column sum"),
    Entry("window_attention_bwd", "cupy", "fused", "sparx_ref.kernels.cupy.attention:window_attention_bwd_fused", True,
          "one block per (head, window set): P and dS in shared memory, dbias in per-block slabs (no atomics)"),
    Entry("dmca_attention_fwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:dmca_attention_fwd_naive", False,
          "explicit form: one thread per score / softmax row / output element"),
    Entry("dmca_attention_fwd", "cupy", "tiled", "sparx_ref.kernels.cupy.attention:dmca_attention_fwd_tiled", True,
          "shared-memory tiled GEMMs (64x64 tile, 4x4 per thread), coalesced along the contiguous axis"),
    Entry("dmca_attention_bwd", "cupy", "naive", "sparx_ref.kernels.cupy.attention:dmca_attention_bwd_naive", False,
          "explicit backward: one thread per gradient element"),
    Entry("dmca_attention_bwd", "cupy", "tiled", "sparx_ref.kernels.cupy.attention:dmca_attention_bwd_tiled", True,
          "tiled GEMMs for dv = P^T dout, dP = dout v^T, dq = dS k, dk = dS^T q"),
]


def entries(op: str | None = None, backend: str | None = None) -> list[Entry]:
    """All table rows, optionally filtered by op and/or backend."""
    return [e for e in _TABLE if (op is None or e.op == op) and (backend is None or e.backend == backend)]


def registered() -> list[tuple[str, str]]:
    """Every (op, backend) pair that has a kernel, whether or not its runtime is present."""
    seen: list[tuple[str, str]] = []
    for e in _TABLE:
        if (e.op, e.backend) not in seen:
            seen.append((e.op, e.backend))
    return seen


def versions(op: str, backend: str) -> list[str]:
    """The ladder of versions registered for (op, backend), in table order."""
    return [e.version for e in entries(op, backend)]


def runtime_missing(backend: str) -> str | None:
    """None if ``backend`` can run here, else a sentence saying what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba_cpu":
        try:
            import numba  # noqa: F401
        except ImportError:
            return "backend 'numba_cpu' needs Numba: pip install numba"
        return None
    if backend == "numba_cuda":
        try:
            from numba import cuda
        except ImportError:
            return "backend 'numba_cuda' needs Numba with CUDA support: pip install 'numba-cuda[cu13]'"
        try:
            ok = cuda.is_available()
        except Exception as exc:  # driver problems
            return f"backend 'numba_cuda' found no usable GPU ({exc})"
        if not ok:
            return "backend 'numba_cuda' found no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
        return None
    # cupy
    try:
        import cupy
    except ImportError:
        return "backend 'cupy' needs CuPy: pip install cupy-cuda13x"
    try:
        ok = cupy.is_available()
    except Exception as exc:
        return f"backend 'cupy' found no usable GPU ({exc})"
    if not ok:
        return "backend 'cupy' found no CUDA GPU (CuPy imports on a CPU machine but cannot allocate)"
    return None


def available(backend: str) -> bool:
    return runtime_missing(backend) is None


def get(op: str, backend: str, version: str | None = None):
    """Return the kernel for (op, backend[, version]); the default version if none given.

    Raises KeyError for an unknown combination (listing what exists) and
    KernelUnavailable when the backend's runtime is missing on this machine.
    """
    rows = entries(op, backend)
    if not rows:
        raise KeyError(f"no kernel registered for op={op!r}, backend={backend!r}; registered: {registered()}")
    if version is None:
        rows = [e for e in rows if e.default]
    else:
        rows = [e for e in rows if e.version == version]
        if not rows:
            raise KeyError(f"no version {version!r} of ({op!r}, {backend!r}); versions: {versions(op, backend)}")
    missing = runtime_missing(backend)
    if missing:
        raise KernelUnavailable(missing)
    module, attr = rows[0].target.split(":")
    return getattr(importlib.import_module(module), attr)
