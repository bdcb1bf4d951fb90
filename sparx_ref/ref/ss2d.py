"""SS2D: the 2-D selective scan of VMamba / SparX-Mamba (``forward_ssm``), forward and backward.

A 2-D map is read as four 1-D sequences (the *cross scan*), each sequence is run through the
selective scan (:mod:`sparx_ref.ref.scan`) with its own parameters, and the four outputs are
added back onto the map (the *cross merge*, the adjoint of the cross scan).

Shapes: ``x (B, C, H, W)``, ``L = H * W``, ``K = 4`` directions. The scan directions
(spec sparx_mamba.md §8 step 1; VMamba's ``CrossScan``):

- direction 0: row-major, sequence index ``h*W + w``;
- direction 1: column-major, sequence index ``w*H + h`` (the transposed map, W x H, flattened);
- directions 2 and 3: directions 0 and 1 reversed along L.

Upstream: ``CrossScan``/``CrossMerge`` (VMamba ``csms6s.py`` and the Triton ``CrossScanTriton``)
and ``SparXSS2D.forward_ssm`` of the released SparX code (``models/sparx_mamba.py``).
"""
from __future__ import annotations

import numpy as np

from .._validate import as_float_array, check_same_dtype, check_shape
from .layers import group_norm_bwd, group_norm_fwd
from .scan import selective_scan_bwd, selective_scan_fwd

__all__ = [
    "cross_scan", "cross_merge", "ss2d_scan_fwd", "ss2d_scan_bwd",
    "forward_ssm_fwd", "forward_ssm_bwd", "FORWARD_SSM_PARAM_KEYS",
]

K_DIRECTIONS = 4

FORWARD_SSM_PARAM_KEYS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds",
                          "out_norm.weight", "out_norm.bias")


# ----------------------------------------------------------------------------------------
# cross scan / cross merge (pure data movement: adjoints of each other)
# ----------------------------------------------------------------------------------------
def cross_scan(x):
    """Read a map in four directions: ``x (B, C, H, W)`` -> ``xs (B, 4, C, H*W)``.

    ``xs[:, 0, :, h*W + w] = x[:, :, h, w]`` (row-major), ``xs[:, 1, :, w*H + h] = x[:, :, h, w]``
    (column-major), ``xs[:, 2] = xs[:, 0]`` reversed along L, ``xs[:, 3] = xs[:, 1]`` reversed.
    Its adjoint is :func:`cross_merge`. Mirrors VMamba's ``CrossScan.forward``.
    """
    x = as_float_array("x", x, ndim=4)
    Bn, C, H, W = x.shape
    L = H * W
    xs = np.empty((Bn, K_DIRECTIONS, C, L), dtype=x.dtype)
    xs[:, 0] = x.reshape(Bn, C, L)
    xs[:, 1] = x.transpose(0, 1, 3, 2).reshape(Bn, C, L)
    xs[:, 2:] = xs[:, :2, :, ::-1]
    return xs


def cross_merge(ys, H, W):
    """Add four directional sequences back onto the map: ``ys (B, 4, C, H*W)`` -> ``(B, C, H, W)``.

    At each (h, w): direction 0's value at ``h*W + w`` + direction 1's at ``w*H + h`` +
    direction 2's at ``L-1-(h*W + w)`` + direction 3's at ``L-1-(w*H + h)`` (added in that
    order, like the Triton kernel). This is the adjoint of :func:`cross_scan`:
    ``<cross_merge(y), x> == <y, cross_scan(x)>``. Mirrors VMamba's ``CrossMerge.forward``.
    """
    ys = as_float_array("ys", ys, ndim=4)
    H, W = int(H), int(W)
    if H < 1 or W < 1:
        raise ValueError(f"H and W must be positive, got H={H}, W={W}")
    Bn, _, C, _ = ys.shape
    check_shape("ys", ys, (Bn, K_DIRECTIONS, C, H * W))
    y = ys[:, 0].reshape(Bn, C, H, W)
    y = y + ys[:, 1].reshape(Bn, C, W, H).transpose(0, 1, 3, 2)
    y = y + ys[:, 2, :, ::-1].reshape(Bn, C, H, W)
    y = y + ys[:, 3, :, ::-1].reshape(Bn, C, W, H).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(y)


# ----------------------------------------------------------------------------------------
# the 2-D scan: cross scan -> selective scan -> cross merge
# ----------------------------------------------------------------------------------------
def ss2d_scan_fwd(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan over the four directions of a map. Returns ``(y, cache)``.

    x: (batch, Di, H, W); delta: (batch, 4*Di, H*W); A: (4*Di, N); B, C: (batch, 4, N, H*W)
    (in scan order, per direction); D, delta_bias: (4*Di,) or None. Channel ``k*Di + c`` is
    channel c read in direction k. ::

        y = cross_merge(selective_scan(cross_scan(x).reshape(batch, 4*Di, L), delta, A, B, C,
                                       D, delta_bias, delta_softplus), H, W)   # (batch, Di, H, W)
    """
    x = as_float_array("x", x, ndim=4)
    batch, Di, H, W = x.shape
    L = H * W
    delta = as_float_array("delta", delta, ndim=3)
    check_same_dtype(x=x, delta=delta)
    check_shape("delta", delta, (batch, K_DIRECTIONS * Di, L))
    for name, arr in (("B", B), ("C", C)):
        arr = as_float_array(name, arr, ndim=4)
        check_shape(name, arr, (batch, K_DIRECTIONS, None, L))
    xs = cross_scan(x).reshape(batch, K_DIRECTIONS * Di, L)
    ys, scan_cache = selective_scan_fwd(xs, delta, A, B, C, D, delta_bias, delta_softplus)
    y = cross_merge(ys.reshape(batch, K_DIRECTIONS, Di, L), H, W)
    return y, {"scan": scan_cache, "shape": (batch, Di, H, W)}


def ss2d_scan_bwd(dy, cache):
    """Backward of :func:`ss2d_scan_fwd`: ``dy (batch, Di, H, W)`` -> dict keyed
    ``"x", "delta", "A", "B", "C", "D", "delta_bias"`` (None for inputs given as None).

    The adjoint of cross_merge is cross_scan and vice versa, so
    ``dys = cross_scan(dy)``, the scan backward, then ``dx = cross_merge(dxs)``.
    """
    batch, Di, H, W = cache["shape"]
    L = H * W
    dtype = cache["scan"]["u"].dtype
    dy = as_float_array("dy", dy, ndim=4, dtype=dtype)
    check_shape("dy", dy, (batch, Di, H, W))
    dys = cross_scan(dy).reshape(batch, K_DIRECTIONS * Di, L)
    grads = selective_scan_bwd(dys, cache["scan"])
    dxs = grads.pop("u")
    return {"x": cross_merge(dxs.reshape(batch, K_DIRECTIONS, Di, L), H, W), **grads}


# ----------------------------------------------------------------------------------------
# the whole released forward_ssm
# ----------------------------------------------------------------------------------------
def _check_ssm_params(params, Di, N, R, dtype):
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be a mapping keyed {FORWARD_SSM_PARAM_KEYS}, got {type(params).__name__}")
    missing = [k for k in FORWARD_SSM_PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params is missing keys {missing}")
    K = K_DIRECTIONS
    expected = {
        "x_proj_weight": (K * (R + 2 * N), Di, 1),
        "dt_projs_weight": (K, Di, R),
        "dt_projs_bias": (K, Di),
        "A_logs": (K * Di, N),
        "Ds": (K * Di,),
        "out_norm.weight": (Di,),
        "out_norm.bias": (Di,),
    }
    out = {}
    for key, shape in expected.items():
        p = as_float_array(f"params[{key!r}]", params[key], ndim=len(shape), dtype=dtype)
        check_shape(f"params[{key!r}]", p, shape)
        out[key] = p
    return out


def forward_ssm_fwd(u, params, *, d_state, dt_rank, eps=1e-5):
    """SparX-Mamba's ``SparXSS2D.forward_ssm`` (spec sparx_mamba.md §8). Returns ``(out, cache)``.

    u: (B, Di, H, W), L = H*W, K = 4, N = d_state, R = dt_rank. params (mapping, released
    names): ``x_proj_weight (K*(R+2N), Di, 1)``, ``dt_projs_weight (K, Di, R)``,
    ``dt_projs_bias (K, Di)``, ``A_logs (K*Di, N)``, ``Ds (K*Di,)``, ``out_norm.weight``,
    ``out_norm.bias (Di,)``. Steps::

        xs    = cross_scan(u)                                   (B, K, Di, L)
        x_dbl = x_proj_weight[k] @ xs[:, k]   per direction     (B, K, R+2N, L)  rows [dt | B | C]
        dts   = dt_projs_weight[k] @ x_dbl[:, k, :R]             (B, K*Di, L)     (no bias)
        A     = -exp(A_logs)
        ys    = selective_scan(xs, dts, A, Bs, Cs, D=Ds, delta_bias=dt_projs_bias.ravel(),
                               delta_softplus=True)             (B, K*Di, L)
        y     = cross_merge(ys, H, W)                           (B, Di, H, W)
        out   = GroupNorm(1 group, eps)(y) with out_norm.{weight,bias}

    The grouped 1x1 conv1d's (groups = K) are written as batched matrix products.
    ``cache["scan_out"]`` holds ``y`` (before out_norm); ``out`` is what the golden file
    records as ``ssm_out``.
    """
    u = as_float_array("u", u, ndim=4)
    batch, Di, H, W = u.shape
    L = H * W
    K, N, R = K_DIRECTIONS, int(d_state), int(dt_rank)
    if N < 1 or R < 1:
        raise ValueError(f"d_state and dt_rank must be >= 1, got d_state={d_state}, dt_rank={dt_rank}")
    p = _check_ssm_params(params, Di, N, R, u.dtype)

    xs = cross_scan(u)                                                    # (B, K, Di, L)
    Wx = p["x_proj_weight"].reshape(K, R + 2 * N, Di)
    x_dbl = np.matmul(Wx, xs)                                             # (B, K, R+2N, L)
    dt_low = x_dbl[:, :, :R]                                              # (B, K, R, L)
    Bs = np.ascontiguousarray(x_dbl[:, :, R:R + N])                       # (B, K, N, L)
    Cs = np.ascontiguousarray(x_dbl[:, :, R + N:])                        # (B, K, N, L)
    Wdt = p["dt_projs_weight"]                                            # (K, Di, R)
    dts = np.matmul(Wdt, dt_low).reshape(batch, K * Di, L)
    A = -np.exp(p["A_logs"])                                              # (K*Di, N)
    y, ss2d_cache = ss2d_scan_fwd(u, dts, A, Bs, Cs, D=p["Ds"],
                                  delta_bias=p["dt_projs_bias"].reshape(-1), delta_softplus=True)
    out, norm_cache = group_norm_fwd(y, p["out_norm.weight"], p["out_norm.bias"], 1, eps)
    cache = dict(xs=xs, Wx=Wx, dt_low=dt_low, Wdt=Wdt, A=A, ss2d=ss2d_cache, norm=norm_cache,
                 scan_out=y, shape=(batch, Di, H, W, N, R))
    return out, cache


def forward_ssm_bwd(dout, cache):
    """Backward of :func:`forward_ssm_fwd`: ``dout (B, Di, H, W)`` -> dict with ``"u"`` and
    every parameter key (``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``, ``A_logs``,
    ``Ds``, ``out_norm.weight``, ``out_norm.bias``), each in its parameter's shape.

    ``u`` reaches the output twice: as the scanned input (through ss2d) and through the
    projections that make dt, B and C; both paths are summed. ``dA_logs = dA * A`` since
    ``A = -exp(A_logs)``.
    """
    batch, Di, H, W, N, R = cache["shape"]
    K, L = K_DIRECTIONS, H * W
    dtype = cache["xs"].dtype
    dout = as_float_array("dout", dout, ndim=4, dtype=dtype)
    check_shape("dout", dout, (batch, Di, H, W))

    g_norm = group_norm_bwd(dout, cache["norm"])
    g = ss2d_scan_bwd(g_norm["x"], cache["ss2d"])
    ddts = g["delta"].reshape(batch, K, Di, L)
    Wx, Wdt, xs, dt_low = cache["Wx"], cache["Wdt"], cache["xs"], cache["dt_low"]
    ddt_low = np.matmul(Wdt.transpose(0, 2, 1), ddts)                     # (B, K, R, L)
    dWdt = np.matmul(ddts, dt_low.transpose(0, 1, 3, 2)).sum(axis=0)      # (K, Di, R)
    dx_dbl = np.concatenate([ddt_low, g["B"], g["C"]], axis=2)            # (B, K, R+2N, L)
    dWx = np.matmul(dx_dbl, xs.transpose(0, 1, 3, 2)).sum(axis=0)         # (K, R+2N, Di)
    dxs = np.matmul(Wx.transpose(0, 2, 1), dx_dbl)                        # (B, K, Di, L)
    du = g["x"] + cross_merge(dxs, H, W)
    grads = {
        "u": du,
        "x_proj_weight": dWx.reshape(K * (R + 2 * N), Di, 1),
        "dt_projs_weight": dWdt,
        "dt_projs_bias": g["delta_bias"].reshape(K, Di),
        "A_logs": g["A"] * cache["A"],
        "Ds": g["D"],
        "out_norm.weight": g_norm["weight"],
        "out_norm.bias": g_norm["bias"],
    }
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in grads.items()}
