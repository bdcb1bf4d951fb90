"""CuPy kernels (CUDA C compiled at run time) for the depthwise "same" convolution.

Mirrors :func:`sparx_ref.ref.layers.depthwise_conv2d_fwd` / ``_bwd``: stride 1, zero padding
``(kh // 2, kw // 2)``, one filter per channel, odd kernel sizes from 1 to 7. SparX-Mamba runs
about 40 of these a forward (the MLP's 3x3 on 4x the width, the SS2D's 5x5 or 3x3, the
positional 3x3, the ganglion layers' 3x3, and LayerScale as a 1x1), and PyTorch's own
float32 depthwise backward was the largest single item of a training step (benchmarks/RESULTS.md).

Same signatures, semantics and returns as the reference ops, on CuPy arrays (anything with
``__cuda_array_interface__`` is viewed as CuPy without a copy). float32 and float64 (one
compiled module per (dtype, kh, kw)); anything else raises TypeError.

The ladder (registry rows in :mod:`sparx_ref.kernels.registry`):

- ``naive``: one thread per output element reads its kh*kw neighbours. The input gradient is
  the same kernel with the filter turned 180 degrees (the convolution's adjoint); the filter
  and bias gradients are one block per (channel, tap), each summing over the whole batch:
  the input is read kh*kw + 1 times.
- ``strip``: a thread computes V = 4 neighbouring outputs of one row. Each of the kh input
  rows it needs is read once into registers (V + kw - 1 values) and reused by all V outputs,
  so a thread issues kh*(V + kw - 1) loads for V outputs instead of V*kh*kw. The backward is
  one fused pass: a block owns one channel of a slice of the batch; every thread computes its
  V input-gradient values from dy *and* adds dy times the x it has just read into kh*kw + 1
  register sums (filter taps and bias). The sums are reduced over the block (warp shuffles,
  then the block's warps in order) into one partial per (slice, channel), and a last small
  kernel adds the slices in order. x and dy are each read once, dx written once; no atomics,
  so the result is the same bit for bit on every run.

The plans (:func:`fwd_plan`, :func:`bwd_plan`) also take ``residual``: the forward then writes
x + conv(x) and the backward adds dout into dx, in the same kernels (the pattern ``x + dwconv(x)``
of SparX-Mamba's positional and MLP convolutions: no separate add over the map, forward or
backward). The array functions keep the reference ops' signatures (no residual).

Bytes a call must move (the floor the benchmarks report): forward reads x and writes out
(2 x B*C*H*W elements); backward reads x and dy and writes dx (3 x). Flops: 2*kh*kw per
output forward, 4*kh*kw per element backward (input and filter gradients).
"""
from __future__ import annotations

import functools

import numpy as np

from .._conv_common import MAX_KERNEL, STRIP, THREADS, batch_slices, conv_dims
from ._plan import Launch, Plan, plan_cache, replayable, run_on_cupy
from .attention import _device, _same_dtype, _shape

__all__ = ["depthwise_conv2d_fwd", "depthwise_conv2d_bwd", "depthwise_conv2d_fwd_naive",
           "depthwise_conv2d_bwd_naive", "CUDA_SOURCES", "NVRTC_OPTIONS", "MAX_KERNEL", "STRIP",
           "nvrtc_options"]

_THREADS = THREADS   # every launch; BLOCK in the source

CUDA_SOURCE = r"""
// Depthwise "same" convolution, stride 1: REAL (float/double), KH, KW (odd), V and BLOCK are
// compile-time constants (-D options); the host compiles one module per (REAL, KH, KW).
// Layouts (C-contiguous): x, out, dy, dx (B, C, H, W); weight (C, KH*KW); bias (C,).
// Indices are 32-bit unsigned (cheap divisions): the host refuses maps of 2^31 elements or more.
#ifndef REAL
#define REAL float
#endif
#ifndef KH
#define KH 3
#endif
#ifndef KW
#define KW 3
#endif
#ifndef V
#define V 4
#endif
#ifndef BLOCK
#define BLOCK 256
#endif
#define PH (KH / 2)
#define PW (KW / 2)
#define KK (KH * KW)
#define SEG (V + KW - 1)        // input columns one strip of V outputs touches
#define NWARPS (BLOCK / 32)

// Tap (i, j) of channel c's filter, or of the filter turned 180 degrees when flip != 0:
//   dx[h, w] = sum_{i, j} weight[KH-1-i, KW-1-j] * dy[h + i - PH, w + j - PW]
// (the adjoint of the forward correlation, since KH - 1 = 2 PH).
__device__ __forceinline__ REAL tap(const REAL* __restrict__ weight, int c, int i, int j, int flip) {
    return flip ? weight[c * KK + (KH - 1 - i) * KW + (KW - 1 - j)] : weight[c * KK + i * KW + j];
}

__device__ __forceinline__ REAL warp_sum(REAL v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// ---- naive: one thread per output element --------------------------------------------
extern "C" __global__ void dw_fwd_naive(const REAL* __restrict__ x, const REAL* __restrict__ weight,
                                        const REAL* __restrict__ bias, int has_bias, int flip, int residual,
                                        REAL* __restrict__ out, unsigned total, unsigned C, unsigned H,
                                        unsigned W) {
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int w = idx % W;
    const unsigned rest = idx / W;
    const int h = rest % H;
    const unsigned plane = rest / H;                   // b * C + c
    const int c = plane % C;
    const REAL* xp = x + plane * H * W;
    REAL acc = has_bias ? bias[c] : (REAL)0;
    for (int i = 0; i < KH; ++i) {
        const int r = h + i - PH;
        if (r < 0 || r >= (int)H) continue;
        for (int j = 0; j < KW; ++j) {
            const int s = w + j - PW;
            if (s >= 0 && s < (int)W) acc += tap(weight, c, i, j, flip) * xp[r * W + s];
        }
    }
    if (residual) acc += xp[h * W + w];              // x + conv(x): the source added last
    out[idx] = acc;
}

// Filter / bias gradient, naive: block (c, k) sums dy * (x shifted by tap k) over the batch;
// k == KK is the bias (sum of dy). Thread-strided partial sums, then a tree in shared memory.
extern "C" __global__ void dw_wgrad_naive(const REAL* __restrict__ x, const REAL* __restrict__ dy,
                                          REAL* __restrict__ dweight, REAL* __restrict__ dbias,
                                          int has_bias, unsigned B, unsigned C, unsigned H,
                                          unsigned W) {
    __shared__ REAL red[BLOCK];
    const unsigned c = blockIdx.x, k = blockIdx.y;
    if (k == KK && !has_bias) return;
    const int i = k / KW, j = k % KW;
    const unsigned per_image = H * W, n = B * per_image;
    REAL acc = 0;
    for (unsigned e = threadIdx.x; e < n; e += BLOCK) {
        const unsigned b = e / per_image, p = e % per_image;
        const int h = p / W, w = p % W;
        const unsigned base = (b * C + c) * per_image;
        if (k == KK) { acc += dy[base + p]; continue; }
        const int r = h + i - PH, s = w + j - PW;
        if (r >= 0 && r < (int)H && s >= 0 && s < (int)W) acc += dy[base + p] * x[base + r * W + s];
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (k == KK) dbias[c] = red[0]; else dweight[c * KK + k] = red[0];
    }
}

// ---- strip: V outputs of one row per thread ------------------------------------------
// Item = ((b * C + c) * H + h) * NQ + q covers outputs (h, q*V .. q*V + V-1) of plane (b, c).
extern "C" __global__ void dw_fwd_strip(const REAL* __restrict__ x, const REAL* __restrict__ weight,
                                        const REAL* __restrict__ bias, int has_bias, int flip, int residual,
                                        REAL* __restrict__ out, unsigned items, unsigned C, unsigned H,
                                        unsigned W, unsigned NQ) {
    const unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= items) return;
    const int q = idx % NQ;
    const unsigned rest = idx / NQ;
    const int h = rest % H;
    const unsigned plane = rest / H;
    const int c = plane % C;
    const int w0 = q * V;
    const REAL* xp = x + plane * H * W;
    REAL acc[V], centre[V];                          // centre: the source at the outputs (residual)
    const REAL b0 = has_bias ? bias[c] : (REAL)0;
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = b0;
#pragma unroll
    for (int i = 0; i < KH; ++i) {
        const int r = h + i - PH;
        if (r < 0 || r >= (int)H) continue;          // a zero-padding row adds nothing
        const REAL* row = xp + r * W;
        REAL seg[SEG];                               // x[r, w0 - PW .. w0 + V - 1 + PW]
#pragma unroll
        for (int s = 0; s < SEG; ++s) {
            const int col = w0 - PW + s;
            seg[s] = (col >= 0 && col < (int)W) ? row[col] : (REAL)0;
        }
        if (i == PH) {                               // the outputs' own row (r == h, always inside)
#pragma unroll
            for (int v = 0; v < V; ++v) centre[v] = seg[v + PW];
        }
#pragma unroll
        for (int j = 0; j < KW; ++j) {
            const REAL t = tap(weight, c, i, j, flip);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += t * seg[v + j];
        }
    }
    REAL* op = out + plane * H * W + h * W;
#pragma unroll
    for (int v = 0; v < V; ++v)
        if (w0 + v < (int)W) op[w0 + v] = residual ? acc[v] + centre[v] : acc[v];
}

// Fused backward. Block (c, slice) covers images [slice*BPS, slice*BPS + BPS) of channel c.
// Each item (image, h, q): dx for V outputs from the flipped filter over dy, and the filter /
// bias sums dy[h, w] * x[h + i - PH, w + j - PW] from the same rows. part[(slice*C + c)*(KK+1) + k]
// gets the block's sum for tap k (k == KK: the bias).
extern "C" __global__ void dw_bwd_strip(const REAL* __restrict__ x, const REAL* __restrict__ dy,
                                        const REAL* __restrict__ weight, REAL* __restrict__ dx,
                                        REAL* __restrict__ part, int residual, unsigned B, unsigned C,
                                        unsigned H, unsigned W, unsigned NQ, unsigned BPS) {
    __shared__ REAL red[NWARPS][KK + 1];
    const unsigned c = blockIdx.x, slice = blockIdx.y;
    const unsigned b_start = slice * BPS;
    const unsigned nb = min(BPS, B - b_start);
    const unsigned per_image = H * W;
    const unsigned items = nb * H * NQ;
    REAL gw[KK + 1];                                 // filter taps, then the bias
#pragma unroll
    for (int k = 0; k <= KK; ++k) gw[k] = 0;
    for (unsigned it = threadIdx.x; it < items; it += BLOCK) {
        const int q = it % NQ;
        const unsigned rest = it / NQ;
        const int h = rest % H;
        const unsigned b = b_start + rest / H;
        const unsigned base = (b * C + c) * per_image;
        const REAL* xp = x + base;
        const REAL* dp = dy + base;
        const int w0 = q * V;
        REAL centre[V], acc[V];                     // dy at this strip; dx accumulators
#pragma unroll
        for (int v = 0; v < V; ++v) {
            centre[v] = (w0 + v < (int)W) ? dp[h * W + w0 + v] : (REAL)0;
            gw[KK] += centre[v];
            acc[v] = 0;
        }
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const int r = h + i - PH;
            if (r < 0 || r >= (int)H) continue;
            REAL xs[SEG], ds[SEG];
#pragma unroll
            for (int s = 0; s < SEG; ++s) {
                const int col = w0 - PW + s;
                const bool in = col >= 0 && col < (int)W;
                xs[s] = in ? xp[r * W + col] : (REAL)0;
                ds[s] = in ? dp[r * W + col] : (REAL)0;
            }
#pragma unroll
            for (int j = 0; j < KW; ++j) {
                const REAL t = tap(weight, c, i, j, 1);
#pragma unroll
                for (int v = 0; v < V; ++v) {
                    acc[v] += t * ds[v + j];
                    gw[i * KW + j] += centre[v] * xs[v + j];
                }
            }
        }
        REAL* dxp = dx + base + h * W;
#pragma unroll
        for (int v = 0; v < V; ++v)
            if (w0 + v < (int)W) dxp[w0 + v] = residual ? acc[v] + centre[v] : acc[v];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k <= KK; ++k) {
        const REAL s = warp_sum(gw[k]);
        if (lane == 0) red[warp][k] = s;
    }
    __syncthreads();
    for (int k = threadIdx.x; k <= KK; k += BLOCK) {
        REAL s = 0;
        for (int wp = 0; wp < NWARPS; ++wp) s += red[wp][k];
        part[(slice * C + c) * (KK + 1) + k] = s;
    }
}

// dweight[c, k] (and dbias[c] from k == KK) = sum over slices, in slice order.
extern "C" __global__ void dw_bwd_finish(const REAL* __restrict__ part, REAL* __restrict__ dweight,
                                         REAL* __restrict__ dbias, int has_bias, int slices, int C) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= C * (KK + 1)) return;
    const int c = idx / (KK + 1), k = idx % (KK + 1);
    REAL s = 0;
    for (int sl = 0; sl < slices; ++sl) s += part[(sl * C + c) * (KK + 1) + k];
    if (k < KK) dweight[c * KK + k] = s;
    else if (has_bias) dbias[c] = s;
}
"""

CUDA_SOURCES = {"depthwise_conv2d": CUDA_SOURCE}
NVRTC_OPTIONS = ("-std=c++17",)
_MODULES: dict = {}
_FUNCTIONS: dict = {}


def nvrtc_options(dtype, kh, kw):
    """The -D options of the module compiled for (dtype, kh, kw)."""
    real = "float" if np.dtype(dtype) == np.float32 else "double"
    return NVRTC_OPTIONS + (f"-DREAL={real}", f"-DKH={kh}", f"-DKW={kw}", f"-DV={STRIP}",
                            f"-DBLOCK={_THREADS}")


def _cupy():
    import cupy
    return cupy


def _kernel(dtype, kh, kw, name):
    """Kernel ``name`` of CUDA_SOURCE compiled for (dtype, kh, kw) (module and function cached
    per process: a SparX-Mamba training step makes ~140 of these calls)."""
    key = (dtype, kh, kw, name)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        module_key = (np.dtype(dtype).name, kh, kw)
        if module_key not in _MODULES:
            _MODULES[module_key] = _cupy().RawModule(code=CUDA_SOURCE, options=nvrtc_options(dtype, kh, kw))
        fn = _FUNCTIONS[key] = _MODULES[module_key].get_function(name)
    return fn


def _empty(shape, dtype):
    """Every output and scratch buffer comes from here (tests swap in a NaN-filled one)."""
    return _cupy().empty(tuple(int(d) for d in shape), dtype=dtype)


def _blocks(n):
    return (int((n + _THREADS - 1) // _THREADS),)


def _i(v):
    return np.int32(v)


def _u(v):
    return np.uint32(v)


def _check_inputs(x, weight, bias):
    """Device views of (x, weight as (C, kh*kw), bias or None) and (B, C, H, W, kh, kw)."""
    x = _device("x", x, 4)
    weight = _device("weight", weight, 4)
    bias = None if bias is None else _device("bias", bias, 1)
    dtype = _same_dtype(x=x, weight=weight, bias=bias)
    B, C, H, W, kh, kw = dims = conv_dims(x, weight, bias, _shape)
    return x, weight.reshape(C, kh * kw), bias, dtype, dims


def _correlate_launch(version, src, weight, bias, flip, out, dims, dtype, residual=False):
    """The launch of out = src correlated with each channel's filter (turned 180 degrees if
    flip) + bias (+ src itself if residual); the array arguments are buffer names (bias None: no
    bias)."""
    B, C, H, W, kh, kw = dims
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight          # never read when has_bias == 0
    if version == "naive":
        total = B * C * H * W
        return Launch(_kernel(dtype, kh, kw, "dw_fwd_naive"), _blocks(total), (_THREADS,), (
            src, weight, bias_arg, _i(has_bias), _i(flip), _i(residual), out, _u(total), _u(C), _u(H), _u(W)))
    nq = (W + STRIP - 1) // STRIP
    items = B * C * H * nq
    return Launch(_kernel(dtype, kh, kw, "dw_fwd_strip"), _blocks(items), (_THREADS,), (
        src, weight, bias_arg, _i(has_bias), _i(flip), _i(residual), out, _u(items), _u(C), _u(H), _u(W), _u(nq)))


@plan_cache
def fwd_plan(version, dims, dtype, has_bias, residual=False):
    """The :class:`._plan.Plan` of a forward: inputs "x" (B, C, H, W), "weight" (C, kh*kw) and,
    if has_bias, "bias" (C,); output buffer "out" (B, C, H, W) = conv(x), or x + conv(x) if
    ``residual`` (the sum computed as conv(x) + x, in the kernel). dims = (B, C, H, W, kh, kw)."""
    dtype = np.dtype(dtype)
    B, C, H, W, kh, kw = dims
    launches = () if B * H * W == 0 else (   # an empty map: no (empty) grid to launch
        _correlate_launch(version, "x", "weight", "bias" if has_bias else None, 0, "out", dims, dtype, residual),)
    return Plan(dtype, (("out", (B, C, H, W)),), launches)


@plan_cache
def bwd_plan(version, dims, dtype, has_bias, residual=False):
    """The plan of a backward: inputs "x", "weight" (as in :func:`fwd_plan`) and "dout"; output
    buffers "dx" (B, C, H, W), "dweight" (C, 1, kh, kw) and, if has_bias, "dbias" (C,). With
    ``residual`` (the forward was x + conv(x)) dx gets dout added in the kernel."""
    dtype = np.dtype(dtype)
    B, C, H, W, kh, kw = dims
    kk = kh * kw
    db_arg = "dbias" if has_bias else "dweight"      # never written when has_bias == 0
    scratch = ()
    buffers = [("dx", (B, C, H, W)), ("dweight", (C, 1, kh, kw))] + ([("dbias", (C,))] if has_bias else [])
    if version == "naive":
        launches = [] if B * H * W == 0 else [
            _correlate_launch("naive", "dout", "weight", None, 1, "dx", dims, dtype, residual)]
        launches.append(Launch(_kernel(dtype, kh, kw, "dw_wgrad_naive"), (C, kk + 1), (_THREADS,), (
            "x", "dout", "dweight", db_arg, _i(has_bias), _u(B), _u(C), _u(H), _u(W))))
    else:
        # one fused pass per (channel, batch slice) writes dx and the slice's partial filter and
        # bias sums; the last launch adds the slices in order
        slices, per_slice = _slices(B, C)
        nq = (W + STRIP - 1) // STRIP
        scratch = (("part", (slices * C * (kk + 1),)),)
        launches = [
            Launch(_kernel(dtype, kh, kw, "dw_bwd_strip"), (C, slices), (_THREADS,), (
                "x", "dout", "weight", "dx", "part", _i(residual), _u(B), _u(C), _u(H), _u(W), _u(nq),
                _u(per_slice))),
            Launch(_kernel(dtype, kh, kw, "dw_bwd_finish"), _blocks(C * (kk + 1)), (_THREADS,), (
                "part", "dweight", db_arg, _i(has_bias), _i(slices), _i(C)))]
    return Plan(dtype, tuple(buffers), tuple(launches), scratch=scratch)


def _fwd(version, x, weight, bias):
    x, w2, bias, dtype, dims = _check_inputs(x, weight, bias)
    bufs = run_on_cupy(fwd_plan(version, dims, dtype, bias is not None), {"x": x, "weight": w2, "bias": bias},
                       _empty)
    return bufs["out"], {"x": x, "weight": w2, "has_bias": bias is not None, "dims": dims, "dtype": dtype}


_SM_COUNT: dict = {}


def _sm_count():
    """Multiprocessors of the current device (cached: reading the attributes takes ~0.1 ms)."""
    cp = _cupy()
    device = cp.cuda.runtime.getDevice()
    if device not in _SM_COUNT:
        _SM_COUNT[device] = int(cp.cuda.runtime.deviceGetAttribute(
            cp.cuda.runtime.cudaDevAttrMultiProcessorCount, device))
    return _SM_COUNT[device]


def _slices(B, C):
    """Batch slices of the strip backward (:func:`.._conv_common.batch_slices`)."""
    return batch_slices(B, C, _sm_count())


def _bwd(version, dout, cache):
    B, C, H, W, kh, kw = dims = cache["dims"]
    dtype, has_bias = cache["dtype"], cache["has_bias"]
    dout = _device("dout", dout, 4)
    _shape("dout", dout, (B, C, H, W))
    if dout.dtype != dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but the forward ran in {np.dtype(dtype).name}")
    bufs = run_on_cupy(bwd_plan(version, dims, dtype, has_bias),
                       {"x": cache["x"], "weight": cache["weight"], "dout": dout}, _empty)
    return {"x": bufs["dx"], "weight": bufs["dweight"], "bias": bufs.get("dbias")}


@replayable(functools.partial(fwd_plan, "naive"))
def depthwise_conv2d_fwd_naive(x, weight, bias=None):
    """Ladder rung "naive": one thread per output element. Returns (out, cache)."""
    return _fwd("naive", x, weight, bias)


@replayable(functools.partial(bwd_plan, "naive"))
def depthwise_conv2d_bwd_naive(dout, cache):
    """Rung "naive": dx by the flipped-filter kernel; filter/bias sums one block per (channel, tap)."""
    return _bwd("naive", dout, cache)


@replayable(functools.partial(fwd_plan, "strip"))
def depthwise_conv2d_fwd(x, weight, bias=None):
    """``x (B, C, H, W)``, ``weight (C, 1, kh, kw)`` (kh, kw odd <= 7), ``bias (C,)`` or None
    -> ``(out (B, C, H, W), cache)``: rung "strip" (V outputs per thread), the default."""
    return _fwd("strip", x, weight, bias)


@replayable(functools.partial(bwd_plan, "strip"))
def depthwise_conv2d_bwd(dout, cache):
    """``dout (B, C, H, W)`` -> ``{"x", "weight", "bias"}`` (bias None when the forward had
    none): rung "strip", one fused pass over x and dy plus an in-order sum over batch slices."""
    return _bwd("strip", dout, cache)
