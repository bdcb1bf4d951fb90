"""Fast kernels (Numba CPU, Numba-CUDA, CuPy) for the hot reference ops.

>>> from sparx_ref import kernels
>>> kernels.registered()          # [(op, backend), ...], no runtime needed
>>> scan = kernels.get("selective_scan_fwd", "numba_cpu")
"""
from .registry import (BACKENDS, Entry, KernelUnavailable, available, entries, get,  # noqa: F401
                       registered, runtime_missing, versions)
