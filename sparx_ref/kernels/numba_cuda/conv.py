"""Numba-CUDA kernels for the depthwise "same" convolution (Python written for the GPU).

Mirrors :func:`sparx_ref.ref.layers.depthwise_conv2d_fwd` / ``_bwd``: stride 1, zero padding
``(kh // 2, kw // 2)``, one filter per channel, odd kernel sizes from 1 to 7. The same kernels
as the CuPy backend (:mod:`sparx_ref.kernels.cupy.conv`, whose module docstring derives the
ladder and whose CUDA C source is the specification): read the two side by side.

Inputs: Numba device arrays, CuPy arrays, torch CUDA tensors or anything exposing
``__cuda_array_interface__`` (C-contiguous); outputs are Numba device arrays, or CuPy arrays
when ``x`` was a CuPy array. float32 and float64; anything else raises TypeError.

The ladder (registry rows in :mod:`sparx_ref.kernels.registry`):

- ``naive``: one thread per output element reads its kh*kw neighbours (``dw_fwd_naive``). The
  input gradient is the same kernel with the filter turned 180 degrees (the adjoint of the
  correlation); the filter and bias gradients are one block per (channel, tap) summing over
  the whole batch, then a tree in shared memory (``dw_wgrad_naive``).
- ``strip`` (the default): a thread computes V = 4 neighbouring outputs of one row; each of the
  kh input rows it needs is read once into a register array of V + kw - 1 values and reused by
  all V outputs (``dw_fwd_strip``). The backward is one fused pass (``dw_bwd_strip``): a block
  owns one channel of a slice of the batch, every thread writes its V input-gradient values and
  adds dy * x into kh*kw + 1 register sums (filter taps, then the bias); the block reduces them
  (warp shuffles, then its warps in a fixed order through shared memory) into partials
  ``(slices, C, kh*kw + 1)``, and ``dw_bwd_finish`` adds the slices in order. No atomics: the
  same bits on every run.

Numba specifics:

- Register arrays. ``cuda.local.array`` lives in registers only if every index is a constant
  after LLVM has unrolled the loops. So the kernels are built per (dtype, kh, kw) by a factory
  (:func:`_build`, cached): KH, KW, V, the segment length and the dtype are closure constants,
  every loop over them is ``range(CONSTANT)`` and unrolls completely (tests/compile_checks.py
  checks the PTX of the strip kernels for ``.local``). The dtype as a constant also keeps
  float32 arithmetic from widening to float64 through a Python literal.
- Unsigned indices. Numba types integers as int64 and adds a negative-index wrap-around fix-up
  to every access whose index it cannot prove >= 0, plus floor-division fix-ups to ``//`` and
  ``%`` (see the ``*_unsigned`` kernels of :mod:`.scan` and :mod:`.attention`). Here the sizes
  arrive as uint32 parameters and every index is computed in uint64 (``_U``; Numba widens any
  integer arithmetic to 64 bits, and uint64 op int64 would be float64, so every constant is
  ``_U`` too). Where LLVM cannot see that a dividend fits in 32 bits (a thread's global index,
  a loop counter) :func:`u32` says so, and every ``//`` and ``%`` becomes a 32-bit division, as
  the CUDA C's ``unsigned`` ones (without it, LLVM tests the operands' high halves at run time
  before each division). A padded coordinate (``rp = h + i``, row ``rp - PH`` of the map) is
  tested with ``PH <= rp < H + PH`` instead of ``0 <= r < H``: no value is ever negative.
- Simulator (``NUMBA_ENABLE_CUDASIM=1``, the CI): blocks of 64 threads (two warps) instead of
  256, and the warp sums (:func:`.scan.warp_sum_each`) are emulated through shared memory with
  block barriers, the same butterfly as the shuffles; so every thread of a strip-backward block
  reaches the reduction (no early return there). A GPU's SM count is asked once per device;
  the simulator claims 2, so the batch still splits into slices.

Bytes and flops as in the CuPy module: forward reads x and writes out (2 x B*C*H*W elements),
backward reads x and dy and writes dx (3 x).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from .._conv_common import MAX_KERNEL, STRIP, batch_slices, conv_dims
from .._conv_common import THREADS as _THREADS
from ._launch import current_context, flat, launch
from .attention import _blocks, _device, _is_cupy, _same_dtype, _shape, _wrap
from .attention import _empty   # every output and scratch buffer comes from here (tests: NaN-filled)
from .scan import _U, SIMULATOR, warp_sum_each

__all__ = ["depthwise_conv2d_fwd", "depthwise_conv2d_bwd", "depthwise_conv2d_fwd_naive",
           "depthwise_conv2d_bwd_naive", "MAX_KERNEL", "STRIP", "THREADS", "PTX_KERNELS"]

THREADS = 64 if SIMULATOR else _THREADS     # every launch (simulated threads are Python threads)
_SIM_SMS = 2                                # "SMs" of the simulator (see _slices)


@cuda.jit(device=True, inline=True)
def u32(v):
    """The uint64 ``v`` (< 2**32) with its high half known to be zero: LLVM then divides in 32
    bits (as the CUDA C's ``unsigned`` does) instead of testing the operands at run time."""
    return _U(np.uint32(v))


def _build(T, KH, KW):
    """Every kernel for element type ``T`` (numba float32/float64) and a KH x KW filter.

    Layouts (flat, C-contiguous): x, out, dy, dx (B, C, H, W); weight (C, KH*KW); bias (C,);
    part (slices, C, KH*KW + 1). Sizes are uint32 parameters, flags int32."""
    V = STRIP
    PH, PW = KH // 2, KW // 2
    KK = KH * KW
    KK1 = KK + 1                 # filter taps, then the bias
    SEG = V + KW - 1             # input columns one strip of V outputs touches
    NWARPS = THREADS // 32
    RED = NWARPS * KK1           # shared partial sums of the strip backward, [warp][k]
    zero = T(0)
    u_v, u_ph, u_pw, u_kw = _U(V), _U(PH), _U(PW), _U(KW)
    u_kk, u_kk1, u_threads = _U(KK), _U(KK1), _U(THREADS)
    u_zero, u_one, u_warp = _U(0), _U(1), _U(32)

    @cuda.jit(device=True, inline=True)
    def tap(weight, c, i, j, flip):
        """Tap (i, j) of channel c's filter, or of the filter turned 180 degrees if flip:
        dx[h, w] = sum_{i, j} weight[KH-1-i, KW-1-j] * dy[h + i - PH, w + j - PW]
        (the adjoint of the forward correlation, since KH - 1 = 2 PH)."""
        k = (KH - 1 - i) * KW + (KW - 1 - j) if flip else i * KW + j
        return weight[c * u_kk + _U(k)]

    # ---- naive: one thread per output element ------------------------------------------
    @cuda.jit
    def dw_fwd_naive(x, weight, bias, has_bias, flip, out, total, C, H, W):
        """out[idx] for idx = ((b*C + c)*H + h)*W + w: the kh*kw taps around (h, w)."""
        Hu, Wu = _U(H), _U(W)
        idx = u32(_U(cuda.blockIdx.x) * u_threads + _U(cuda.threadIdx.x))
        if idx >= _U(total):
            return
        w = idx % Wu
        rest = idx // Wu
        h = rest % Hu
        plane = rest // Hu                    # b * C + c
        c = plane % _U(C)
        xp = plane * Hu * Wu
        acc = bias[c] if has_bias else zero
        for i in range(KH):
            rp = h + _U(i)                    # row rp - PH of the map
            if rp >= u_ph and rp < Hu + u_ph:     # a zero-padding row adds nothing
                row = xp + (rp - u_ph) * Wu
                for j in range(KW):
                    sp = w + _U(j)            # column sp - PW
                    if sp >= u_pw and sp < Wu + u_pw:
                        acc += tap(weight, c, i, j, flip) * x[row + sp - u_pw]
        out[idx] = acc

    @cuda.jit
    def dw_wgrad_naive(x, dy, dweight, dbias, has_bias, B, C, H, W):
        """Block (c, k) sums dy * (x shifted by tap k) over the batch; k == KK is the bias (sum
        of dy). Thread-strided partial sums, then a tree in shared memory."""
        red = cuda.shared.array(THREADS, T)
        Hu, Wu = _U(H), _U(W)
        c = _U(cuda.blockIdx.x)
        k = _U(cuda.blockIdx.y)
        tid = _U(cuda.threadIdx.x)
        if k == u_kk and not has_bias:
            return                            # the whole block: no barrier is left waiting
        i = k // u_kw
        j = k % u_kw
        per_image = u32(Hu * Wu)              # < 2**31 (the host checks): 32-bit divisions
        n = _U(B) * per_image
        acc = zero
        e = tid
        while e < n:
            b = u32(e) // per_image
            p = u32(e) % per_image
            base = (b * _U(C) + c) * per_image
            if k == u_kk:
                acc += dy[base + p]
            else:
                rp = p // Wu + i              # x row rp - PH, column sp - PW
                sp = p % Wu + j
                if rp >= u_ph and rp < Hu + u_ph and sp >= u_pw and sp < Wu + u_pw:
                    acc += dy[base + p] * x[base + (rp - u_ph) * Wu + sp - u_pw]
            e += u_threads
        red[tid] = acc
        cuda.syncthreads()
        half = u_threads // _U(2)
        while half > u_zero:
            if tid < half:
                red[tid] += red[tid + half]
            cuda.syncthreads()
            half //= _U(2)
        if tid == u_zero:
            if k == u_kk:
                dbias[c] = red[0]
            else:
                dweight[c * u_kk + k] = red[0]

    # ---- strip: V outputs of one row per thread -----------------------------------------
    @cuda.jit
    def dw_fwd_strip(x, weight, bias, has_bias, flip, out, items, C, H, W, NQ):
        """Item idx = ((b*C + c)*H + h)*NQ + q: outputs (h, q*V .. q*V + V-1) of plane (b, c)."""
        Hu, Wu, NQu = _U(H), _U(W), _U(NQ)
        idx = u32(_U(cuda.blockIdx.x) * u_threads + _U(cuda.threadIdx.x))
        if idx >= _U(items):
            return
        q = idx % NQu
        rest = idx // NQu
        h = rest % Hu
        plane = rest // Hu
        c = plane % _U(C)
        w0 = q * u_v
        xp = plane * Hu * Wu
        acc = cuda.local.array(V, T)
        seg = cuda.local.array(SEG, T)        # x[r, w0 - PW .. w0 + V - 1 + PW]
        b0 = bias[c] if has_bias else zero
        for v in range(V):
            acc[v] = b0
        for i in range(KH):
            rp = h + _U(i)
            if rp >= u_ph and rp < Hu + u_ph:     # a zero-padding row adds nothing
                row = xp + (rp - u_ph) * Wu
                for s in range(SEG):
                    sp = w0 + _U(s)               # column sp - PW
                    seg[s] = x[row + sp - u_pw] if sp >= u_pw and sp < Wu + u_pw else zero
                for j in range(KW):
                    t = tap(weight, c, i, j, flip)
                    for v in range(V):
                        acc[v] += t * seg[v + j]
        op = xp + h * Wu + w0
        for v in range(V):
            if w0 + _U(v) < Wu:
                out[op + _U(v)] = acc[v]

    @cuda.jit
    def dw_bwd_strip(x, dy, weight, dx, part, B, C, H, W, NQ, BPS):
        """Fused backward. Block (c, slice) covers images [slice*BPS, slice*BPS + BPS) of channel
        c. Each item (image, h, q): dx for V outputs from the flipped filter over dy, and the
        filter / bias sums dy[h, w] * x[h + i - PH, w + j - PW] from the same rows.
        part[(slice*C + c)*(KK+1) + k] gets the block's sum for tap k (k == KK: the bias)."""
        red = cuda.shared.array(RED, T)        # [warp][k]
        Hu, Wu, NQu, Cu = _U(H), _U(W), _U(NQ), _U(C)
        c = _U(cuda.blockIdx.x)
        slice_ = _U(cuda.blockIdx.y)
        tid = _U(cuda.threadIdx.x)
        b_start = slice_ * _U(BPS)
        nb = min(_U(BPS), _U(B) - b_start)
        per_image = Hu * Wu
        items = nb * Hu * NQu
        gw = cuda.local.array(KK1, T)          # filter taps, then the bias
        centre = cuda.local.array(V, T)        # dy at this strip
        acc = cuda.local.array(V, T)           # dx accumulators
        xs = cuda.local.array(SEG, T)
        ds = cuda.local.array(SEG, T)
        for k in range(KK1):
            gw[k] = zero
        it = tid
        while it < items:
            q = u32(it) % NQu
            rest = u32(it) // NQu
            h = rest % Hu
            b = b_start + rest // Hu
            base = (b * Cu + c) * per_image
            w0 = q * u_v
            hrow = base + h * Wu + w0
            for v in range(V):
                centre[v] = dy[hrow + _U(v)] if w0 + _U(v) < Wu else zero
                gw[KK] += centre[v]
                acc[v] = zero
            for i in range(KH):
                rp = h + _U(i)
                if rp >= u_ph and rp < Hu + u_ph:
                    row = base + (rp - u_ph) * Wu
                    for s in range(SEG):
                        sp = w0 + _U(s)
                        if sp >= u_pw and sp < Wu + u_pw:
                            xs[s] = x[row + sp - u_pw]
                            ds[s] = dy[row + sp - u_pw]
                        else:
                            xs[s] = zero
                            ds[s] = zero
                    for j in range(KW):
                        t = tap(weight, c, i, j, 1)
                        for v in range(V):
                            acc[v] += t * ds[v + j]
                            gw[i * KW + j] += centre[v] * xs[v + j]
            for v in range(V):
                if w0 + _U(v) < Wu:
                    dx[hrow + _U(v)] = acc[v]
            it += u_threads
        # block reduction: each warp's sums by shuffles, then the warps in order
        warp_sum_each(gw, KK1)
        warp = tid // u_warp
        if tid % u_warp == u_zero:
            for k in range(KK1):
                red[warp * u_kk1 + _U(k)] = gw[k]
        cuda.syncthreads()
        k = tid
        while k < u_kk1:
            s = zero
            for wp in range(NWARPS):
                s += red[_U(wp) * u_kk1 + k]
            part[(slice_ * Cu + c) * u_kk1 + k] = s
            k += u_threads

    @cuda.jit
    def dw_bwd_finish(part, dweight, dbias, has_bias, slices, C):
        """dweight[c, k] (and dbias[c] from k == KK) = sum over slices, in slice order."""
        Cu = _U(C)
        idx = u32(_U(cuda.blockIdx.x) * u_threads + _U(cuda.threadIdx.x))
        if idx >= Cu * u_kk1:
            return
        c = idx // u_kk1
        k = idx % u_kk1
        s = zero
        sl = u_zero
        while sl < _U(slices):
            s += part[(sl * Cu + c) * u_kk1 + k]
            sl += u_one
        if k < u_kk:
            dweight[c * u_kk + k] = s
        elif has_bias:
            dbias[c] = s

    return {"dw_fwd_naive": dw_fwd_naive, "dw_wgrad_naive": dw_wgrad_naive, "dw_fwd_strip": dw_fwd_strip,
            "dw_bwd_strip": dw_bwd_strip, "dw_bwd_finish": dw_bwd_finish}


_KERNELS: dict = {}


def _k(dtype, kh, kw, name):
    """Kernel ``name`` built for (dtype, kh, kw), built on first use (one set per key)."""
    key = (dtype, kh, kw)
    kernels = _KERNELS.get(key)
    if kernels is None:
        from numba import float32, float64
        kernels = _KERNELS[key] = _build(float32 if np.dtype(dtype) == np.float32 else float64, kh, kw)
    return kernels[name]


# ---------------------------------------------------------------------------------------
# what tests/compile_checks.py compiles for sm_90 (name, python function, signature)
# ---------------------------------------------------------------------------------------
def _signatures(tn):
    a, i, u = f"{tn}[::1]", "int32", "uint32"
    return {
        "dw_fwd_naive": [a, a, a, i, i, a, u, u, u, u],
        "dw_wgrad_naive": [a, a, a, a, i, u, u, u, u],
        "dw_fwd_strip": [a, a, a, i, i, a, u, u, u, u, u],
        "dw_bwd_strip": [a, a, a, a, a, u, u, u, u, u, u],
        "dw_bwd_finish": [a, a, a, i, u, u],
    }


def _ptx_kernels():
    """Every kernel at 3x3 in both dtypes; the strip kernels (the register arrays) also at every
    other size the twins use (1, 5), the largest (7) and a mixed one, in float32."""
    from numba import float32, float64
    out = []
    for T, tn in ((float32, "float32"), (float64, "float64")):
        sizes = ((3, 3), (1, 1), (5, 5), (7, 7), (3, 5)) if tn == "float32" else ((3, 3),)
        for kh, kw in sizes:
            ks = _build(T, kh, kw)
            for name, args in _signatures(tn).items():
                if (kh, kw) == (3, 3) or name in ("dw_fwd_strip", "dw_bwd_strip"):
                    out.append((f"{name}_k{kh}x{kw}_{tn}", ks[name].py_func, f"void({', '.join(args)})"))
    return out


PTX_KERNELS = _ptx_kernels()   # decorating only: nothing compiles until a launch or compile_ptx


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
def _u(v):
    return np.uint32(v)


def _i(v):
    return np.int32(v)


def _check_inputs(x, weight, bias):
    """Device views of (x, weight, bias or None), the dtype and (B, C, H, W, kh, kw)."""
    x = _device("x", x, 4)
    weight = _device("weight", weight, 4)
    bias = None if bias is None else _device("bias", bias, 1)
    dtype = _same_dtype(x=x, weight=weight, bias=bias)
    return x, weight, bias, dtype, conv_dims(x, weight, bias, _shape)


def _correlate(version, src, weight, bias, flip, dims, dtype):
    """out (B, C, H, W) = src correlated with each channel's filter (turned 180 degrees if
    flip) + bias; src, weight, bias flat device views (bias may be None)."""
    B, C, H, W, kh, kw = dims
    out = _empty((B, C, H, W), dtype)
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight          # never read when has_bias == 0
    if version == "naive":
        total = B * C * H * W
        launch(_k(dtype, kh, kw, "dw_fwd_naive"), _blocks(total, THREADS), THREADS,
               src, weight, bias_arg, _i(has_bias), _i(flip), flat(out), _u(total), _u(C), _u(H), _u(W))
    else:
        nq = (W + STRIP - 1) // STRIP
        items = B * C * H * nq
        launch(_k(dtype, kh, kw, "dw_fwd_strip"), _blocks(items, THREADS), THREADS,
               src, weight, bias_arg, _i(has_bias), _i(flip), flat(out), _u(items), _u(C), _u(H), _u(W),
               _u(nq))
    return out


def _fwd(version, x, weight, bias):
    like_cupy = _is_cupy(x)
    x, weight, bias, dtype, dims = _check_inputs(x, weight, bias)
    xf, wf = flat(x), flat(weight)       # flat views made once, kept for the backward
    out = _correlate(version, xf, wf, None if bias is None else flat(bias), 0, dims, dtype)
    cache = {"x": x, "weight": weight, "has_bias": bias is not None, "dims": dims, "dtype": dtype,
             "_flat": (xf, wf), "_like_cupy": like_cupy}
    return _wrap(out, like_cupy), cache


_SMS: dict = {}


def _sm_count():
    """Streaming multiprocessors of the current device, asked once per device (a driver call)."""
    if SIMULATOR:
        return _SIM_SMS
    dev = current_context().device
    if dev.id not in _SMS:
        _SMS[dev.id] = int(dev.MULTIPROCESSOR_COUNT)
    return _SMS[dev.id]


def _slices(B, C):
    """Batch slices of the strip backward (:func:`.._conv_common.batch_slices`)."""
    return batch_slices(B, C, _sm_count())


def _bwd(version, dout, cache):
    B, C, H, W, kh, kw = dims = cache["dims"]
    dtype, has_bias, like_cupy = cache["dtype"], cache["has_bias"], cache["_like_cupy"]
    xf, wf = cache["_flat"]
    dout = _device("dout", dout, 4)
    _shape("dout", dout, (B, C, H, W))
    if dout.dtype != dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but the forward ran in {np.dtype(dtype).name}")
    df = flat(dout)
    kk = kh * kw
    slices, per_slice = _slices(B, C) if version == "strip" else (0, 0)
    # the filter and bias gradients and the strip backward's partial sums (slices, C, kk + 1):
    # one allocation (each one costs a driver call)
    small = _empty((C * kk + C + slices * C * (kk + 1),), dtype)
    dweight = small[:C * kk].reshape(C, 1, kh, kw)
    dbias = small[C * kk:C * kk + C] if has_bias else None
    dwf = flat(dweight)
    db_arg = flat(dbias) if has_bias else dwf        # never written when has_bias == 0
    if version == "naive":
        dx = _correlate("naive", df, wf, None, 1, dims, dtype)
        launch(_k(dtype, kh, kw, "dw_wgrad_naive"), (C, kk + 1), THREADS,      # C >= 1 (conv_dims)
               xf, df, dwf, db_arg, _i(has_bias), _u(B), _u(C), _u(H), _u(W))
    else:
        dx = _empty((B, C, H, W), dtype)
        nq = (W + STRIP - 1) // STRIP
        pf = flat(small[C * kk + C:])
        launch(_k(dtype, kh, kw, "dw_bwd_strip"), (C, slices), THREADS,
               xf, df, wf, flat(dx), pf, _u(B), _u(C), _u(H), _u(W), _u(nq), _u(per_slice))
        launch(_k(dtype, kh, kw, "dw_bwd_finish"), _blocks(C * (kk + 1), THREADS), THREADS,
               pf, dwf, db_arg, _i(has_bias), _u(slices), _u(C))
    return {"x": _wrap(dx, like_cupy), "weight": _wrap(dweight, like_cupy),
            "bias": None if dbias is None else _wrap(dbias, like_cupy)}


def depthwise_conv2d_fwd_naive(x, weight, bias=None):
    """Ladder rung "naive": one thread per output element. Returns (out, cache)."""
    return _fwd("naive", x, weight, bias)


def depthwise_conv2d_bwd_naive(dout, cache):
    """Rung "naive": dx by the flipped-filter kernel; filter/bias sums one block per (channel, tap)."""
    return _bwd("naive", dout, cache)


def depthwise_conv2d_fwd(x, weight, bias=None):
    """``x (B, C, H, W)``, ``weight (C, 1, kh, kw)`` (kh, kw odd <= 7), ``bias (C,)`` or None
    -> ``(out (B, C, H, W), cache)``: rung "strip" (V outputs per thread), the default."""
    return _fwd("strip", x, weight, bias)


def depthwise_conv2d_bwd(dout, cache):
    """``dout (B, C, H, W)`` -> ``{"x", "weight", "bias"}`` (bias None when the forward had
    none): rung "strip", one fused pass over x and dy plus an in-order sum over batch slices."""
    return _bwd("strip", dout, cache)
