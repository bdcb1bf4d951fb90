"""Comparison and finite-difference helpers shared by the tests, the benchmarks and
``sparx-ref check``.

All errors are relative per tensor: ``max|got - ref| / max|ref|``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .tolerances import _dtype_name, tolerance


def _to_numpy(a):
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    elif hasattr(a, "get") and not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):
        a = a.get()  # cupy
    elif hasattr(a, "copy_to_host"):  # numba device array
        a = a.copy_to_host()
    return np.asarray(a)


def _error_over_scale(got, ref, scale) -> float:
    """``max|got - ref| / max|scale|`` in float64 (``max|got - ref|`` when the scale is all
    zeros). Shapes must match exactly; NaN anywhere in ``got`` gives ``inf`` so an unwritten
    (NaN-poisoned) element never passes."""
    got = _to_numpy(got).astype(np.float64)
    ref = _to_numpy(ref).astype(np.float64)
    scale = _to_numpy(scale).astype(np.float64)
    if not got.shape == ref.shape == scale.shape:
        raise ValueError(f"shape mismatch: got {got.shape}, ref {ref.shape}, scale {scale.shape}")
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return float("inf")
    diff = float(np.max(np.abs(got - ref)))
    top = float(np.max(np.abs(scale)))
    return diff / top if top > 0.0 else diff


def rel_err(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (0 when both are all zeros).

    Shapes must match exactly; NaN anywhere in ``got`` gives ``inf`` so an
    unwritten (NaN-poisoned) element never passes.
    """
    ref = _to_numpy(ref)
    return _error_over_scale(got, ref, ref)


def rel_err_scaled(got, ref, scale) -> float:
    """``max|got - ref| / max|scale|``: the error of a sum with cancellation, measured against the
    magnitude of its terms rather than of its (possibly tiny) value.

    Rounding bounds the error of a computed sum ``sum_i t_i`` by about ``eps * sum_i |t_i|``,
    so where the terms cancel (a gradient through a saturated softmax, say) ``rel_err`` would
    ask for more digits than the inputs carry. ``scale`` is the same sums over absolute values
    (same shape as ``ref``). NaN anywhere in ``got`` gives ``inf``.
    """
    return _error_over_scale(got, ref, scale)


def assert_close_scaled(got, ref, scale, dtype, kind: str, name: str = "tensor") -> float:
    """Assert ``rel_err_scaled(got, ref, scale) <= tolerance(dtype, kind)``; return the error."""
    err = rel_err_scaled(got, ref, scale)
    tol = tolerance(dtype, kind)
    assert err <= tol, f"{name}: error {err:.3e} relative to its terms > {tol:.1e} ({_dtype_name(dtype)}, {kind})"
    return err


def assert_close(got, ref, dtype, kind: str, name: str = "tensor") -> float:
    """Assert ``rel_err(got, ref) <= tolerance(dtype, kind)``; return the error."""
    err = rel_err(got, ref)
    tol = tolerance(dtype, kind)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({_dtype_name(dtype)}, {kind})"
    return err


def assert_all_close(got: Mapping, ref: Mapping, dtype, kind: str, prefix: str = "") -> dict:
    """``assert_close`` over every key of ``ref`` (keys must match exactly)."""
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    assert not missing and not extra, f"{prefix}key mismatch: missing {missing}, unexpected {extra}"
    errs = {}
    for k in ref:
        if ref[k] is None:
            assert got[k] is None, f"{prefix}{k}: expected None"
            continue
        errs[k] = assert_close(got[k], ref[k], dtype, kind, name=f"{prefix}{k}")
    return errs


def numerical_vjp(f: Callable[[], np.ndarray], x: np.ndarray, dout: np.ndarray,
                  eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``sum(f() * dout)`` with respect to ``x``.

    ``x`` is perturbed in place (and restored); ``f`` must read it. float64 only.
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical_vjp needs float64 x, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = float(np.sum(f() * dout))
        flat[i] = old - eps
        minus = float(np.sum(f() * dout))
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad
