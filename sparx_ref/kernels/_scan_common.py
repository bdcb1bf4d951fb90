"""Host-side pieces shared by the scan kernels of every backend (no runtime imported here).

- Shape/dtype checks that work on any array with ``.shape``/``.ndim``/``.dtype`` (NumPy,
  CuPy, Numba device arrays), with the reference ops' error messages.
- The kernels' cache: the inputs themselves (the backward recomputes the forward states
  instead of storing them: that costs one extra read of u and delta, and no (L x N) state).
- The output allocation hook: :func:`poison_outputs` makes every output buffer start as NaN,
  so a test catches any element a kernel forgot to write. Production calls use plain
  ``empty`` and pay nothing.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .._validate import check_same_dtype, check_shape

K_DIRECTIONS = 4
_POISON = {"on": False}


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Inside this context every output a scan kernel allocates is filled with NaN first."""
    old = _POISON["on"]
    _POISON["on"] = enabled
    try:
        yield
    finally:
        _POISON["on"] = old


def poisoning() -> bool:
    return _POISON["on"]


def _check_rank(name, x, ndim):
    if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)} ({len(x.shape)} dimensions)")


def as_numpy_dtype(dtype):
    """A NumPy dtype for the dtype of any backend's array (NumPy, CuPy and Numba carry NumPy
    dtypes already; a torch dtype goes through its name: ``str(np.dtype)`` costs ~7 us)."""
    return dtype if isinstance(dtype, np.dtype) else np.dtype(str(dtype).replace("torch.", ""))


def check_dtype(dtype, allowed, backend: str):
    dtype = as_numpy_dtype(dtype)
    if dtype not in [np.dtype(a) for a in allowed]:
        names = " or ".join(np.dtype(a).name for a in allowed)
        raise TypeError(f"backend {backend!r} scan kernels support {names} inputs, got {dtype.name}")
    return dtype


def scan_shapes(u, delta, A, B, C, D, delta_bias, *, u_name="u", allowed=(np.float32, np.float64),
                backend="numba_cpu"):
    """Validate selective-scan inputs; return (batch, KD, L, K, N, dtype)."""
    _check_rank(u_name, u, 3)
    _check_rank("delta", delta, 3)
    _check_rank("A", A, 2)
    _check_rank("B", B, 4)
    _check_rank("C", C, 4)
    if D is not None:
        _check_rank("D", D, 1)
    if delta_bias is not None:
        _check_rank("delta_bias", delta_bias, 1)
    dtype = check_same_dtype(**{u_name: u, "delta": delta, "A": A, "B": B, "C": C, "D": D,
                                "delta_bias": delta_bias})
    dtype = check_dtype(dtype, allowed, backend)
    batch, KD, L = (int(s) for s in u.shape)
    if min(batch, KD, L) < 1:
        raise ValueError(f"{u_name} must have a non-empty shape (batch, KD, L), got {tuple(u.shape)}")
    check_shape("delta", delta, (batch, KD, L))
    check_shape("A", A, (KD, None))
    N = int(A.shape[1])
    if N < 1:
        raise ValueError(f"A must have shape (KD, N) with N >= 1, got {tuple(A.shape)}")
    K = int(B.shape[1])
    if K < 1 or KD % K:
        raise ValueError(f"B.shape[1] (K, the number of B/C groups) must divide KD={KD}, got K={K}")
    check_shape("B", B, (batch, K, N, L))
    check_shape("C", C, (batch, K, N, L))
    if D is not None:
        check_shape("D", D, (KD,))
    if delta_bias is not None:
        check_shape("delta_bias", delta_bias, (KD,))
    return batch, KD, L, K, N, dtype


def ss2d_shapes(x, delta, A, B, C, D, delta_bias, *, allowed=(np.float32, np.float64), backend="numba_cpu"):
    """Validate ss2d_scan inputs; return (batch, Di, H, W, N, dtype)."""
    _check_rank("x", x, 4)
    batch, Di, H, W = (int(s) for s in x.shape)
    if min(batch, Di, H, W) < 1:
        raise ValueError(f"x must have a non-empty shape (batch, Di, H, W), got {tuple(x.shape)}")
    _check_rank("delta", delta, 3)
    check_shape("delta", delta, (batch, K_DIRECTIONS * Di, H * W))
    _check_rank("B", B, 4)
    if int(B.shape[1]) != K_DIRECTIONS:
        raise ValueError(f"B must have shape (batch, 4, N, H*W), got {tuple(B.shape)}")
    # the rest is the plain scan's contract on the (batch, 4*Di, L) view
    _, _, L, _, N, dtype = scan_shapes(delta, delta, A, B, C, D, delta_bias, u_name="delta",
                                       allowed=allowed, backend=backend)
    check_same_dtype(x=x, delta=delta)
    return batch, Di, H, W, N, dtype


def scan_cache(u, delta, A, B, C, D, delta_bias, delta_softplus, shape):
    """What a kernel's backward needs: the inputs (the forward is recomputed)."""
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                delta_softplus=bool(delta_softplus), shape=shape)


def check_dy(name, dy, expected, dtype):
    _check_rank(name, dy, len(expected))
    check_shape(name, dy, expected)
    if as_numpy_dtype(dy.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name} (like the forward inputs), got {dy.dtype}")


def check_merge_shapes(ys, H, W):
    _check_rank("ys", ys, 4)
    H, W = int(H), int(W)
    if H < 1 or W < 1:
        raise ValueError(f"H and W must be positive, got H={H}, W={W}")
    batch, _, C, _ = (int(s) for s in ys.shape)
    check_shape("ys", ys, (batch, K_DIRECTIONS, C, H * W))
    return batch, C, H, W


def scan_pos(kdir: int, t: int, H: int, W: int) -> tuple[int, int]:
    """(h, w) read at scan index t by direction kdir (pure-Python statement of the rule the
    kernels implement; direction 0 row-major, 1 column-major, 2 and 3 reversed)."""
    L = H * W
    s = L - 1 - t if kdir >= 2 else t
    if kdir in (1, 3):
        return s % H, s // H
    return s // W, s % W
