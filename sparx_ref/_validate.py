"""Input validation with messages that name the argument, what was expected and what came.

Every public op calls these before touching data, so bad input fails loudly and early
instead of being broadcast, truncated or silently cast.
"""
from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)


def as_float_array(name: str, x, ndim: int | None = None, dtype=None) -> np.ndarray:
    """Return ``x`` as a NumPy float32/float64 array, checking rank.

    Raises TypeError for non-arrays or non-float dtypes, ValueError for a wrong rank.
    ``dtype`` (if given) is the dtype the array must already have (no silent cast).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if dtype is not None and x.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)} (like the other inputs), got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape} ({x.ndim} dimensions)")
    return x


def check_shape(name: str, x: np.ndarray, expected: tuple) -> None:
    """Raise ValueError unless ``x.shape == expected`` (entries None are free)."""
    ok = x.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {exp}, got {tuple(x.shape)}")


def check_divisible(name: str, value: int, by: int, what: str) -> None:
    """Raise ValueError unless ``value % by == 0``."""
    if by <= 0 or value % by != 0:
        raise ValueError(f"{name}={value} must be divisible by {what}={by}")


def check_same_dtype(**arrays) -> np.dtype:
    """All given (non-None) arrays share one dtype; return it."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    d0 = items[0][1].dtype
    for k, v in items[1:]:
        if v.dtype != d0:
            raise TypeError(f"{k} has dtype {v.dtype} but {items[0][0]} has {d0}; all inputs must share one dtype")
    return d0
