"""The one tolerance table of sparx_ref.

Every comparison in the test suite, the benchmarks' correctness checks and the
``sparx-ref check`` tool reads its threshold from here. Errors are *relative per
tensor*: ``max|got - ref| / max|ref|`` (see :func:`sparx_ref.testing.rel_err`).

Kinds of check:

- ``finite_diff``: a hand-written backward vs float64 central differences.
- ``autograd``:    a NumPy op or model vs PyTorch autograd, same dtype.
- ``two_views``:   two independent formulations of one function (sequential vs
  chunked vs materialised scan; window vs masked full attention).
- ``model``:       NumPy model vs PyTorch twin (logits, block outputs, grads).
- ``golden_out``:  a model's outputs vs a golden file of the released code.
- ``golden_grad``: a model's gradients vs a golden file.
- ``kernel``:      a fast kernel vs the reference op (the reference computed in
  float64 on the same inputs, so the error measured is the kernel's own).
- ``backend``:     one whole model run on two kernel backends.

Never loosen an entry to make a test pass: find the bug.
"""
from __future__ import annotations

import numpy as np

TOLERANCES: dict[tuple[str, str], float] = {
    # float64: the oracle dtype
    ("float64", "finite_diff"): 1e-6,
    ("float64", "autograd"): 1e-10,
    ("float64", "two_views"): 1e-12,
    ("float64", "model"): 1e-9,
    ("float64", "golden_out"): 1e-9,
    ("float64", "golden_grad"): 1e-8,
    ("float64", "kernel"): 1e-10,
    ("float64", "backend"): 1e-9,
    # float32: kernels and fast paths
    ("float32", "autograd"): 1e-5,
    ("float32", "two_views"): 1e-5,
    ("float32", "model"): 1e-4,
    ("float32", "golden_out"): 1e-4,
    ("float32", "golden_grad"): 1e-3,
    ("float32", "kernel"): 5e-5,
    ("float32", "backend"): 1e-3,
}


def _dtype_name(dtype) -> str:
    """'float32'/'float64' from a NumPy dtype or type, a string, or a torch dtype."""
    if isinstance(dtype, str) or type(dtype).__module__.startswith("torch"):
        return np.dtype(str(dtype).replace("torch.", "")).name
    return np.dtype(dtype).name


def tolerance(dtype, kind: str) -> float:
    """Return the tolerance for ``dtype`` (a NumPy/torch dtype or its name) and ``kind``."""
    name = _dtype_name(dtype)
    try:
        return TOLERANCES[(name, kind)]
    except KeyError:
        known = sorted({k for _, k in TOLERANCES})
        raise KeyError(
            f"no tolerance for dtype={name!r}, kind={kind!r}; kinds known: {known}"
        ) from None
