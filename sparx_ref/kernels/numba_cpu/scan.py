"""Numba CPU kernels for the selective scan and the 2-D cross scan (NumPy in, NumPy out).

Same signatures, semantics and return conventions as :mod:`sparx_ref.ref.scan` and
:mod:`sparx_ref.ref.ss2d`; float32 and float64 (computed in the input dtype).

Idea: one CPU thread walks one (batch, channel) row along L, with the state h[n] in
registers, instead of the reference's Python loop over L vectorised over channels. Rows run in
parallel (``prange``). The 2-D versions read the map directly in each direction
(``_pos`` maps a scan index to a map index) instead of materialising ``cross_scan``.

Backward: per row, a forward pass stores h_t (L x N, per thread), then a reverse pass runs the
adjoint recurrence ``g_t = dy_t C_t + exp(dt_{t+1} A) g_{t+1}``. dB and dC are sums over the
channels of a group, so the parallel loop is over (batch, group) and a thread walks the
group's channels one after another (no two threads write one dB element: no race).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._scan_common import (K_DIRECTIONS, check_dy, check_merge_shapes, poisoning, scan_cache,
                            scan_shapes, ss2d_shapes)

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "cross_scan", "cross_merge",
           "ss2d_scan_fwd", "ss2d_scan_bwd"]


def _empty(shape, dtype):
    return np.full(shape, np.nan, dtype) if poisoning() else np.empty(shape, dtype)


# ---------------------------------------------------------------------------------------
# row kernels (one thread, one sequence)
# ---------------------------------------------------------------------------------------
@njit(inline="always", cache=True, error_model="numpy")
def _pos(kdir, t, H, W):
    """Map index (h*W + w) read at scan index t by direction kdir (0 row-major, 1 column-major,
    2 and 3 the same reversed). The plain scan uses kdir=0, H=1, W=L: the identity."""
    L = H * W
    s = L - 1 - t if kdir >= 2 else t
    if kdir == 1 or kdir == 3:
        return (s % H) * W + s // H
    return s


@njit(inline="always", cache=True, error_model="numpy")
def _softplus(z):
    # PyTorch's softplus: identity above the threshold 20
    return z if z > 20.0 else math.log1p(math.exp(z))


@njit(inline="always", cache=True, error_model="numpy")
def _dsoftplus(z):
    return 1.0 if z > 20.0 else 1.0 / (1.0 + math.exp(-z))


@njit(cache=True, error_model="numpy")
def _fwd_row(u, kdir, H, W, delta, A_c, B_g, C_g, D_c, bias, softplus, y, accumulate, h):
    """Scan one sequence. u, y: 1-D maps (read/written at _pos); delta: 1-D in scan order;
    A_c (N,), B_g, C_g (N, L) scan order; h (N,) scratch state. y[pos] = or += y_t."""
    L = H * W
    N = A_c.shape[0]
    for n in range(N):
        h[n] = 0.0
    for t in range(L):
        p = _pos(kdir, t, H, W)
        ut = u[p]
        z = delta[t] + bias
        dt = _softplus(z) if softplus else z
        yt = D_c * ut
        for n in range(N):
            h[n] = math.exp(dt * A_c[n]) * h[n] + dt * B_g[n, t] * ut
            yt += C_g[n, t] * h[n]
        if accumulate:
            y[p] += yt
        else:
            y[p] = yt


@njit(cache=True, error_model="numpy")
def _bwd_row(u, dy, kdir, H, W, delta, A_c, B_g, C_g, D_c, bias, softplus,
             du, du_accumulate, ddelta, dB_g, dC_g, dA_c, hs, g):
    """Backward of _fwd_row for one sequence. Writes du (at _pos; = or +=) and ddelta (scan
    order), adds into dB_g, dC_g (N, L) and dA_c (N,); returns (dD, ddelta_bias) of the row.
    hs (L, N) and g (N,) are scratch."""
    L = H * W
    N = A_c.shape[0]
    # forward pass: h_t for every t (hs[t] = h_t)
    for n in range(N):
        g[n] = 0.0
    for t in range(L):
        p = _pos(kdir, t, H, W)
        z = delta[t] + bias
        dt = _softplus(z) if softplus else z
        for n in range(N):
            prev = hs[t - 1, n] if t > 0 else 0.0
            hs[t, n] = math.exp(dt * A_c[n]) * prev + dt * B_g[n, t] * u[p]
    # reverse pass: g_t = dy_t C_t + a_{t+1} g_{t+1}, with a_{t+1} = exp(dt_{t+1} A)
    dD = 0.0
    dbias = 0.0
    for t in range(L - 1, -1, -1):
        p = _pos(kdir, t, H, W)
        ut = u[p]
        dyt = dy[p]
        z = delta[t] + bias
        dt = _softplus(z) if softplus else z
        dut = D_c * dyt
        ddt = 0.0
        for n in range(N):
            # g currently holds a_{t+1} g_{t+1} (0 at t = L-1)
            gn = g[n] + dyt * C_g[n, t]
            a = math.exp(dt * A_c[n])
            prev = hs[t - 1, n] if t > 0 else 0.0
            dut += gn * dt * B_g[n, t]
            ddt += gn * (B_g[n, t] * ut + prev * a * A_c[n])
            dA_c[n] += gn * prev * a * dt
            dB_g[n, t] += gn * dt * ut
            dC_g[n, t] += dyt * hs[t, n]
            g[n] = a * gn
        dz = ddt * _dsoftplus(z) if softplus else ddt
        ddelta[t] = dz
        dbias += dz
        dD += dyt * ut
        if du_accumulate:
            du[p] += dut
        else:
            du[p] = dut
    return dD, dbias


# ---------------------------------------------------------------------------------------
# float32 fast path of the forward: the transcendental functions vectorised (SIMD) over a block
# of T steps, the recurrence itself (a few FMAs per step) sequential.
# ---------------------------------------------------------------------------------------
_T = 512                        # steps per block: the block's buffers stay in L1
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


_F = np.float32
_EXP_C = tuple(_F(1.0 / math.factorial(i)) for i in range(8))


@njit(cache=True, error_model="numpy")
def _exp_block(x, out, k, m):
    """out[:m] = exp(x[:m]) for float32 buffers, written so LLVM vectorises it (libm's expf is
    a scalar call): exp(x) = 2^j * p(r), r = x - j ln2 in [-ln2/2, ln2/2], p the degree-7 Taylor
    polynomial (relative error ~1e-7, float32 rounding), 2^j added into the float's exponent
    bits. x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for anything smaller)."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _EXP_C
    for i in range(m):
        v = min(max(x[i], _F(-87.0)), _F(88.0))
        j = np.floor(v * _F(_LOG2E) + _F(0.5))
        r = (v - j * _F(0.693359375)) - j * _F(-2.12194440e-4)     # ln2 split in two parts
        out[i] = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
        k[i] = np.int32(j)
    bits = out.view(np.int32)
    for i in range(m):
        bits[i] += k[i] << 23


@njit(cache=True, error_model="numpy")
def _softplus_block(z, tmp, e, k, dt, m):
    """dt[:m] = softplus(z[:m]) = max(z, 0) + log1p(exp(-|z|)), vectorisable: log1p(e) for e in
    (0, 1] as 2 atanh(e / (2 + e)) (series to s^15, error < 1e-9). For z > 20 this is z to
    float32 rounding, PyTorch's threshold rule."""
    for i in range(m):
        tmp[i] = -abs(z[i])
    _exp_block(tmp, e, k, m)        # separate buffers: in-place (aliased) loops do not vectorise
    for i in range(m):
        ei = e[i]
        s = ei / (_F(2.0) + ei)
        s2 = s * s
        series = _F(1.0) + s2 * (_F(1 / 3) + s2 * (_F(1 / 5) + s2 * (_F(1 / 7) + s2 * (_F(1 / 9) + s2 * (
            _F(1 / 11) + s2 * (_F(1 / 13) + s2 * _F(1 / 15)))))))
        dt[i] = max(z[i], _F(0.0)) + _F(2.0) * s * series


@njit(cache=True, error_model="numpy", fastmath={"contract"})   # a h + x as one FMA: the chain's latency
def _fwd_row_f32(u, kdir, H, W, delta, A_c, B_g, C_g, D_c, bias, softplus, y, accumulate, h,
                 zb, dtb, eb, kb, gate):
    """_fwd_row for float32: gates for T steps at a time with _exp_block, then the recurrence.
    Scratch: zb, dtb, eb (T,), kb (T,) int32, gate (N, T)."""
    L = H * W
    N = A_c.shape[0]
    for n in range(N):
        h[n] = 0.0
    for t0 in range(0, L, _T):
        m = min(_T, L - t0)
        for i in range(m):
            zb[i] = delta[t0 + i] + bias
        if softplus:
            _softplus_block(zb, gate[0], eb, kb, dtb, m)
        else:
            for i in range(m):
                dtb[i] = zb[i]
        for n in range(N):
            an = A_c[n]
            for i in range(m):
                eb[i] = dtb[i] * an
            _exp_block(eb, gate[n], kb, m)
        if N == 1:              # the SparX case: the state in a register, not in h[]
            h0 = h[0]
            for i in range(m):
                t = t0 + i
                p = _pos(kdir, t, H, W)
                ut = u[p]
                h0 = gate[0, i] * h0 + dtb[i] * B_g[0, t] * ut
                yt = D_c * ut + C_g[0, t] * h0
                if accumulate:
                    y[p] += yt
                else:
                    y[p] = yt
            h[0] = h0
            continue
        for i in range(m):
            t = t0 + i
            p = _pos(kdir, t, H, W)
            ut = u[p]
            dt = dtb[i]
            yt = D_c * ut
            for n in range(N):
                h[n] = gate[n, i] * h[n] + dt * B_g[n, t] * ut
                yt += C_g[n, t] * h[n]
            if accumulate:
                y[p] += yt
            else:
                y[p] = yt


# ---------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, error_model="numpy")
def _scan_fwd_kernel(u, delta, A, B, C, D, bias, softplus, y, fast):
    batch, KD, L = u.shape
    K, N = B.shape[1], B.shape[2]
    Dg = KD // K
    rows = batch * KD
    nchunks = min(rows, 64)
    for chunk in prange(nchunks):       # scratch allocated once per chunk of rows, not per row
        h = np.empty(N, u.dtype)
        zb = np.empty(_T, np.float32)
        dtb = np.empty(_T, np.float32)
        eb = np.empty(_T, np.float32)
        kb = np.empty(_T, np.int32)
        gate = np.empty((N, _T), np.float32)
        for r in range(chunk * rows // nchunks, (chunk + 1) * rows // nchunks):
            _scan_fwd_one(u, delta, A, B, C, D, bias, softplus, y, fast, r, KD, L, Dg, h, zb, dtb, eb, kb,
                          gate)


@njit(cache=True, error_model="numpy")
def _scan_fwd_one(u, delta, A, B, C, D, bias, softplus, y, fast, r, KD, L, Dg, h, zb, dtb, eb, kb, gate):
    """Row r = (b, c) of the selective scan forward."""
    b, c = r // KD, r % KD
    if fast:
        _fwd_row_f32(u[b, c], 0, 1, L, delta[b, c], A[c], B[b, c // Dg], C[b, c // Dg], D[c],
                     bias[c], softplus, y[b, c], False, h, zb, dtb, eb, kb, gate)
    else:
        _fwd_row(u[b, c], 0, 1, L, delta[b, c], A[c], B[b, c // Dg], C[b, c // Dg], D[c], bias[c],
                 softplus, y[b, c], False, h)


@njit(parallel=True, cache=True, error_model="numpy")
def _scan_bwd_kernel(u, delta, A, B, C, D, bias, softplus, dy, du, ddelta, dA_part, dB, dC, dD_part,
                     dbias_part):
    batch, KD, L = u.shape
    K, N = B.shape[1], B.shape[2]
    Dg = KD // K
    for r in prange(batch * K):          # one (batch, group): its channels share dB, dC
        b, k = r // K, r % K
        hs = np.empty((L, N), u.dtype)
        g = np.empty(N, u.dtype)
        dB[b, k] = 0.0
        dC[b, k] = 0.0
        for c in range(k * Dg, (k + 1) * Dg):
            dA_part[b, c] = 0.0
            dD_part[b, c], dbias_part[b, c] = _bwd_row(
                u[b, c], dy[b, c], 0, 1, L, delta[b, c], A[c], B[b, k], C[b, k], D[c], bias[c],
                softplus, du[b, c], False, ddelta[b, c], dB[b, k], dC[b, k], dA_part[b, c], hs, g)


def _or_zeros(v, n, dtype):
    return np.zeros(n, dtype) if v is None else np.ascontiguousarray(v)


def selective_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan, one thread per (batch, channel) row. Returns ``(y, cache)``; see
    :func:`sparx_ref.ref.scan.selective_scan_fwd` for shapes and equations."""
    batch, KD, L, K, N, dtype = scan_shapes(u, delta, A, B, C, D, delta_bias, backend="numba_cpu")
    y = _empty((batch, KD, L), dtype)
    _scan_fwd_kernel(np.ascontiguousarray(u), np.ascontiguousarray(delta), np.ascontiguousarray(A),
                     np.ascontiguousarray(B), np.ascontiguousarray(C), _or_zeros(D, KD, dtype),
                     _or_zeros(delta_bias, KD, dtype), bool(delta_softplus), y, dtype == np.float32)
    return y, scan_cache(u, delta, A, B, C, D, delta_bias, delta_softplus, (batch, KD, L, K, N))


def selective_scan_bwd(dy, cache):
    """Backward of :func:`selective_scan_fwd`: dict keyed u, delta, A, B, C, D, delta_bias
    (None for inputs that were None)."""
    batch, KD, L, K, N = cache["shape"]
    u = cache["u"]
    dtype = u.dtype
    check_dy("dy", dy, (batch, KD, L), dtype)
    du = _empty((batch, KD, L), dtype)
    ddelta = _empty((batch, KD, L), dtype)
    dB = _empty((batch, K, N, L), dtype)
    dC = _empty((batch, K, N, L), dtype)
    dA_part = _empty((batch, KD, N), dtype)
    dD_part = _empty((batch, KD), dtype)
    dbias_part = _empty((batch, KD), dtype)
    D, bias = cache["D"], cache["delta_bias"]
    _scan_bwd_kernel(np.ascontiguousarray(u), np.ascontiguousarray(cache["delta"]),
                     np.ascontiguousarray(cache["A"]), np.ascontiguousarray(cache["B"]),
                     np.ascontiguousarray(cache["C"]), _or_zeros(D, KD, dtype),
                     _or_zeros(bias, KD, dtype), cache["delta_softplus"], np.ascontiguousarray(dy),
                     du, ddelta, dA_part, dB, dC, dD_part, dbias_part)
    return {"u": du, "delta": ddelta, "A": dA_part.sum(0), "B": dB, "C": dC,
            "D": None if D is None else dD_part.sum(0),
            "delta_bias": None if bias is None else dbias_part.sum(0)}


# ---------------------------------------------------------------------------------------
# cross scan / cross merge
# ---------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, error_model="numpy")
def _cross_scan_kernel(x, xs):
    batch, C, H, W = x.shape
    L = H * W
    for r in prange(batch * C):
        b, c = r // C, r % C
        for h in range(H):
            for w in range(W):
                v = x[b, c, h, w]
                xs[b, 0, c, h * W + w] = v
                xs[b, 1, c, w * H + h] = v
                xs[b, 2, c, L - 1 - (h * W + w)] = v
                xs[b, 3, c, L - 1 - (w * H + h)] = v


@njit(parallel=True, cache=True, error_model="numpy")
def _cross_merge_kernel(ys, y):
    batch, C, H, W = y.shape
    L = H * W
    for r in prange(batch * C):
        b, c = r // C, r % C
        for h in range(H):
            for w in range(W):
                i, j = h * W + w, w * H + h
                y[b, c, h, w] = ys[b, 0, c, i] + ys[b, 1, c, j] + ys[b, 2, c, L - 1 - i] + ys[b, 3, c, L - 1 - j]


def cross_scan(x):
    """``x (B, C, H, W)`` -> ``xs (B, 4, C, H*W)``; see :func:`sparx_ref.ref.ss2d.cross_scan`."""
    if not hasattr(x, "shape") or len(x.shape) != 4:
        raise ValueError(f"x must have 4 dimensions (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    from .._scan_common import check_dtype
    dtype = check_dtype(x.dtype, (np.float32, np.float64), "numba_cpu")
    batch, C, H, W = x.shape
    xs = _empty((batch, K_DIRECTIONS, C, H * W), dtype)
    _cross_scan_kernel(np.ascontiguousarray(x), xs)
    return xs


def cross_merge(ys, H, W):
    """``ys (B, 4, C, H*W)`` -> ``(B, C, H, W)``; see :func:`sparx_ref.ref.ss2d.cross_merge`."""
    batch, C, H, W = check_merge_shapes(ys, H, W)
    from .._scan_common import check_dtype
    dtype = check_dtype(ys.dtype, (np.float32, np.float64), "numba_cpu")
    y = _empty((batch, C, H, W), dtype)
    _cross_merge_kernel(np.ascontiguousarray(ys), y)
    return y


# ---------------------------------------------------------------------------------------
# fused 2-D scan
# ---------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, error_model="numpy")
def _ss2d_fwd_kernel(x, delta, A, B, C, D, bias, softplus, y, fast):
    batch, Di, H, W = x.shape
    N = A.shape[1]
    for r in prange(batch * Di):      # one thread: all four directions of one channel
        b, c = r // Di, r % Di
        h = np.empty(N, x.dtype)
        zb = np.empty(_T, np.float32)
        dtb = np.empty(_T, np.float32)
        eb = np.empty(_T, np.float32)
        kb = np.empty(_T, np.int32)
        gate = np.empty((N, _T), np.float32)
        xm = x[b, c].reshape(H * W)
        ym = y[b, c].reshape(H * W)
        for k in range(K_DIRECTIONS):
            ch = k * Di + c
            if fast:
                _fwd_row_f32(xm, k, H, W, delta[b, ch], A[ch], B[b, k], C[b, k], D[ch], bias[ch],
                             softplus, ym, k > 0, h, zb, dtb, eb, kb, gate)
            else:
                _fwd_row(xm, k, H, W, delta[b, ch], A[ch], B[b, k], C[b, k], D[ch], bias[ch], softplus,
                         ym, k > 0, h)


@njit(parallel=True, cache=True, error_model="numpy")
def _ss2d_bwd_kernel(x, delta, A, B, C, D, bias, softplus, dy, dxs, ddelta, dA_part, dB, dC, dD_part,
                     dbias_part):
    batch, Di, H, W = x.shape
    L = H * W
    N = A.shape[1]
    for r in prange(batch * K_DIRECTIONS):   # one (batch, direction): its channels share dB, dC
        b, k = r // K_DIRECTIONS, r % K_DIRECTIONS
        hs = np.empty((L, N), x.dtype)
        g = np.empty(N, x.dtype)
        dB[b, k] = 0.0
        dC[b, k] = 0.0
        for c in range(Di):
            ch = k * Di + c
            dA_part[b, ch] = 0.0
            dD_part[b, ch], dbias_part[b, ch] = _bwd_row(
                x[b, c].reshape(L), dy[b, c].reshape(L), k, H, W, delta[b, ch], A[ch], B[b, k],
                C[b, k], D[ch], bias[ch], softplus, dxs[b, k, c], False, ddelta[b, ch], dB[b, k],
                dC[b, k], dA_part[b, ch], hs, g)


@njit(parallel=True, cache=True, error_model="numpy")
def _sum_directions(dxs, dx):
    batch, K, Di, L = dxs.shape
    for r in prange(batch * Di):
        b, c = r // Di, r % Di
        for p in range(L):
            dx[b, c, p] = dxs[b, 0, c, p] + dxs[b, 1, c, p] + dxs[b, 2, c, p] + dxs[b, 3, c, p]


def ss2d_scan_fwd(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Fused cross-scan + selective scan + cross-merge: one thread per (batch, channel) reads
    the map in all four directions and adds each direction's output onto y. Returns
    ``(y, cache)``; see :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`."""
    batch, Di, H, W, N, dtype = ss2d_shapes(x, delta, A, B, C, D, delta_bias, backend="numba_cpu")
    KD = K_DIRECTIONS * Di
    y = _empty((batch, Di, H, W), dtype)
    _ss2d_fwd_kernel(np.ascontiguousarray(x), np.ascontiguousarray(delta), np.ascontiguousarray(A),
                     np.ascontiguousarray(B), np.ascontiguousarray(C), _or_zeros(D, KD, dtype),
                     _or_zeros(delta_bias, KD, dtype), bool(delta_softplus), y, dtype == np.float32)
    cache = scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N))
    return y, cache


def ss2d_scan_bwd(dy, cache):
    """Backward of :func:`ss2d_scan_fwd`: dict keyed x, delta, A, B, C, D, delta_bias.

    Threads own a (batch, direction) (so dB, dC need no atomics); each direction's dx goes to
    its own plane (in map order) and the four planes are added in a fixed order."""
    batch, Di, H, W, N = cache["shape"]
    x = cache["u"]
    dtype = x.dtype
    L, KD = H * W, K_DIRECTIONS * Di
    check_dy("dy", dy, (batch, Di, H, W), dtype)
    dxs = _empty((batch, K_DIRECTIONS, Di, L), dtype)
    ddelta = _empty((batch, KD, L), dtype)
    dB = _empty((batch, K_DIRECTIONS, N, L), dtype)
    dC = _empty((batch, K_DIRECTIONS, N, L), dtype)
    dA_part = _empty((batch, KD, N), dtype)
    dD_part = _empty((batch, KD), dtype)
    dbias_part = _empty((batch, KD), dtype)
    D, bias = cache["D"], cache["delta_bias"]
    _ss2d_bwd_kernel(np.ascontiguousarray(x), np.ascontiguousarray(cache["delta"]),
                     np.ascontiguousarray(cache["A"]), np.ascontiguousarray(cache["B"]),
                     np.ascontiguousarray(cache["C"]), _or_zeros(D, KD, dtype), _or_zeros(bias, KD, dtype),
                     cache["delta_softplus"], np.ascontiguousarray(dy), dxs, ddelta, dA_part, dB, dC,
                     dD_part, dbias_part)
    dx = _empty((batch, Di, L), dtype)
    _sum_directions(dxs, dx)
    return {"x": dx.reshape(batch, Di, H, W), "delta": ddelta, "A": dA_part.sum(0), "B": dB, "C": dC,
            "D": None if D is None else dD_part.sum(0),
            "delta_bias": None if bias is None else dbias_part.sum(0)}
