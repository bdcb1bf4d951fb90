"""CuPy kernels (CUDA C compiled at run time) for group normalisation.

Mirrors :func:`sparx_ref.ref.layers.group_norm_fwd` / ``_bwd``: per sample and group of C/G
channels, over those channels and every spatial position, xhat = (x - mean) / sqrt(var + eps)
with the biased variance, then out = xhat * weight[c] + bias[c]. SparX-Mamba normalises with
G = 1 (``GroupNorm1``: per sample over all of (C, H, W)) about 50 times a forward, and
PyTorch's own kernel computes those statistics with one block per (sample, group): 64 blocks
at batch 64, too few to keep an H100's 132 multiprocessors busy (benchmarks/RESULTS.md).

Same signatures, semantics and returns as the reference ops, on CuPy arrays (anything with
``__cuda_array_interface__`` is viewed as CuPy without a copy); x is (B, C, *spatial), at least
one spatial axis. float32 and float64 (one compiled module per dtype); anything else raises
TypeError.

One rung, ``plane`` (registry rows in :mod:`sparx_ref.kernels.registry`). The statistics are
split over (sample, channel) *planes* of S = H*W elements, a warp per plane, so there are B*C
warps of work instead of B*G blocks:

- forward: ``gn_plane_moments`` gives each plane its mean and its sum of squared deviations
  M2 (two passes over the plane: its sum, then the squared deviations from its mean; the second
  pass reads the plane back from cache). ``gn_row_stats`` combines a group's P = C/G planes
  exactly (Chan et al.: for parts of equal count S, mean = the mean of the part means and
  M2 = sum M2_p + S * sum (mean_p - mean)^2), then rstd = 1 / sqrt(M2 / (P*S) + eps).
  ``gn_normalize`` writes out, one thread per element.
- backward: with g = dy * weight[c] and n = P*S elements per group,
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the group. ``gn_bwd_plane_sums`` sums
  dy and dy * xhat per plane (a warp per plane, one pass); ``gn_bwd_reduce`` adds those per
  channel over the batch, in batch order (dbias, dweight), and per group with the weights
  (n * mean(g), n * mean(g * xhat)); ``gn_bwd_dx`` writes dx, one thread per element.

Every sum has a fixed order: the results are the same bit for bit on every run, no atomics.

Bytes a call must move (the floor the benchmarks report): the forward reads x and writes out
(2 x B*C*S elements); the backward reads x and dy and writes dx (3 x). These kernels move more
than that from memory when a plane no longer sits in cache: x a second time in the forward
(3 x), x and dy a second time in the backward (5 x). Flops are a few per element: memory bound.
"""
from __future__ import annotations

import numpy as np

from .._norm_common import PLANES_PER_BLOCK, THREADS, group_norm_dims
from ._plan import Launch, Plan, plan_cache, replayable, run_on_cupy
from .attention import _device, _same_dtype, _shape

__all__ = ["group_norm_fwd", "group_norm_bwd", "CUDA_SOURCES", "NVRTC_OPTIONS", "nvrtc_options",
           "fwd_plan", "bwd_plan"]

CUDA_SOURCE = r"""
// Group normalisation. REAL (float/double) and BLOCK are compile-time constants (-D options).
// Layouts (C-contiguous): x, out, dy, dx (B, C, S) with S the spatial size; a "plane" is one
// (b, c), index b*C + c; a "row" is one (b, g), index b*G + g, holding planes row*P .. row*P+P-1
// (P = C/G channels per group). Indices are 32-bit unsigned: the host refuses 2^31 elements.
#ifndef REAL
#define REAL float
#endif
#ifndef BLOCK
#define BLOCK 256
#endif
#define NWARPS (BLOCK / 32)

__device__ __forceinline__ REAL warp_sum(REAL v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Sum of v over the block, returned to every thread (warp sums, then the warps in order).
__device__ __forceinline__ REAL block_sum(REAL v, REAL* red) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    REAL total = 0;
    for (int w = 0; w < NWARPS; ++w) total += red[w];
    __syncthreads();                                  // red is reused by the next call
    return total;
}

// ---- forward ---------------------------------------------------------------------------
// A warp per plane: its mean, then its sum of squared deviations from that mean (M2).
// Four independent partial sums per lane keep four loads in flight.
extern "C" __global__ void gn_plane_moments(const REAL* __restrict__ x, REAL* __restrict__ pmean,
                                            REAL* __restrict__ pm2, unsigned planes, unsigned S) {
    const unsigned plane = blockIdx.x * NWARPS + (threadIdx.x >> 5);
    const unsigned lane = threadIdx.x & 31;
    if (plane >= planes) return;                      // whole warps leave together
    const REAL* p = x + plane * S;
    REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    unsigned i = lane;
    for (; i + 96 < S; i += 128) { s0 += p[i]; s1 += p[i + 32]; s2 += p[i + 64]; s3 += p[i + 96]; }
    for (; i < S; i += 32) s0 += p[i];
    const REAL mean = warp_sum((s0 + s1) + (s2 + s3)) / (REAL)S;
    REAL q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    i = lane;
    for (; i + 96 < S; i += 128) {
        const REAL d0 = p[i] - mean, d1 = p[i + 32] - mean, d2 = p[i + 64] - mean, d3 = p[i + 96] - mean;
        q0 += d0 * d0; q1 += d1 * d1; q2 += d2 * d2; q3 += d3 * d3;
    }
    for (; i < S; i += 32) { const REAL d = p[i] - mean; q0 += d * d; }
    const REAL m2 = warp_sum((q0 + q1) + (q2 + q3));
    if (lane == 0) { pmean[plane] = mean; pm2[plane] = m2; }
}

// A block per row: combine its P planes (equal counts S) into the row's mean and rstd.
extern "C" __global__ void gn_row_stats(const REAL* __restrict__ pmean, const REAL* __restrict__ pm2,
                                        REAL* __restrict__ mean, REAL* __restrict__ rstd, unsigned P,
                                        unsigned S, REAL eps) {
    __shared__ REAL red[NWARPS];
    const unsigned row = blockIdx.x;
    const REAL* pm = pmean + row * P;
    const REAL* q = pm2 + row * P;
    REAL s = 0;
    for (unsigned i = threadIdx.x; i < P; i += BLOCK) s += pm[i];
    const REAL mu = block_sum(s, red) / (REAL)P;
    REAL m2 = 0;                                      // M2_p + S * (mean_p - mean)^2, summed
    for (unsigned i = threadIdx.x; i < P; i += BLOCK) {
        const REAL d = pm[i] - mu;
        m2 += q[i] + (REAL)S * d * d;
    }
    m2 = block_sum(m2, red);
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = (REAL)1 / sqrt(m2 / ((REAL)P * (REAL)S) + eps);
    }
}

// One thread per element: out = (x - mean) * rstd * weight[c] + bias[c].
extern "C" __global__ void gn_normalize(const REAL* __restrict__ x, const REAL* __restrict__ mean,
                                        const REAL* __restrict__ rstd, const REAL* __restrict__ weight,
                                        const REAL* __restrict__ bias, int has_weight, int has_bias,
                                        REAL* __restrict__ out, unsigned total, unsigned C, unsigned S,
                                        unsigned P) {
    const unsigned idx = blockIdx.x * BLOCK + threadIdx.x;
    if (idx >= total) return;
    const unsigned plane = idx / S, c = plane % C, row = plane / P;   // row = b*G + c/P
    REAL v = (x[idx] - mean[row]) * rstd[row];
    if (has_weight) v *= weight[c];
    if (has_bias) v += bias[c];
    out[idx] = v;
}

// ---- backward --------------------------------------------------------------------------
// A warp per plane: sdy = sum dy, sdyx = sum dy * xhat.
extern "C" __global__ void gn_bwd_plane_sums(const REAL* __restrict__ x, const REAL* __restrict__ dy,
                                             const REAL* __restrict__ mean, const REAL* __restrict__ rstd,
                                             REAL* __restrict__ sdy, REAL* __restrict__ sdyx,
                                             unsigned planes, unsigned S, unsigned P) {
    const unsigned plane = blockIdx.x * NWARPS + (threadIdx.x >> 5);
    const unsigned lane = threadIdx.x & 31;
    if (plane >= planes) return;
    const REAL mu = mean[plane / P], r = rstd[plane / P];
    const REAL* xp = x + plane * S;
    const REAL* dp = dy + plane * S;
    REAL a0 = 0, a1 = 0, b0 = 0, b1 = 0;
    unsigned i = lane;
    for (; i + 32 < S; i += 64) {
        const REAL d0 = dp[i], d1 = dp[i + 32];
        a0 += d0; a1 += d1;
        b0 += d0 * ((xp[i] - mu) * r); b1 += d1 * ((xp[i + 32] - mu) * r);
    }
    for (; i < S; i += 32) { const REAL d = dp[i]; a0 += d; b0 += d * ((xp[i] - mu) * r); }
    const REAL a = warp_sum(a0 + a1), b = warp_sum(b0 + b1);
    if (lane == 0) { sdy[plane] = a; sdyx[plane] = b; }
}

// Blocks [0, chan_blocks): a thread per channel c adds the planes (b, c) over b in order:
// dbias[c] = sum sdy, dweight[c] = sum sdyx. Blocks chan_blocks + row: the row's
// n * mean(g) = sum_c weight[c] * sdy and n * mean(g * xhat) = sum_c weight[c] * sdyx.
extern "C" __global__ void gn_bwd_reduce(const REAL* __restrict__ sdy, const REAL* __restrict__ sdyx,
                                         const REAL* __restrict__ weight, int has_weight, int has_bias,
                                         REAL* __restrict__ dweight, REAL* __restrict__ dbias,
                                         REAL* __restrict__ row_g, REAL* __restrict__ row_gx, unsigned B,
                                         unsigned C, unsigned P, unsigned chan_blocks) {
    __shared__ REAL red[NWARPS];
    if (blockIdx.x < chan_blocks) {                   // uniform per block: no barrier below
        const unsigned c = blockIdx.x * BLOCK + threadIdx.x;
        if (c >= C) return;
        REAL gb = 0, gw = 0;
        for (unsigned b = 0; b < B; ++b) { gb += sdy[b * C + c]; gw += sdyx[b * C + c]; }
        if (has_weight) dweight[c] = gw;
        if (has_bias) dbias[c] = gb;
        return;
    }
    const unsigned row = blockIdx.x - chan_blocks;
    REAL g = 0, gx = 0;
    for (unsigned i = threadIdx.x; i < P; i += BLOCK) {
        const unsigned plane = row * P + i;
        const REAL w = has_weight ? weight[plane % C] : (REAL)1;
        g += w * sdy[plane];
        gx += w * sdyx[plane];
    }
    g = block_sum(g, red);
    gx = block_sum(gx, red);
    if (threadIdx.x == 0) { row_g[row] = g; row_gx[row] = gx; }
}

// One thread per element: dx = rstd * (dy * weight[c] - mean(g) - xhat * mean(g * xhat)).
extern "C" __global__ void gn_bwd_dx(const REAL* __restrict__ x, const REAL* __restrict__ dy,
                                     const REAL* __restrict__ mean, const REAL* __restrict__ rstd,
                                     const REAL* __restrict__ weight, int has_weight,
                                     const REAL* __restrict__ row_g, const REAL* __restrict__ row_gx,
                                     REAL* __restrict__ dx, unsigned total, unsigned C, unsigned S,
                                     unsigned P) {
    const unsigned idx = blockIdx.x * BLOCK + threadIdx.x;
    if (idx >= total) return;
    const unsigned plane = idx / S, c = plane % C, row = plane / P;
    const REAL r = rstd[row], n = (REAL)P * (REAL)S;
    const REAL xhat = (x[idx] - mean[row]) * r;
    const REAL g = has_weight ? dy[idx] * weight[c] : dy[idx];
    dx[idx] = r * (g - row_g[row] / n - xhat * (row_gx[row] / n));
}
"""

CUDA_SOURCES = {"group_norm": CUDA_SOURCE}
NVRTC_OPTIONS = ("-std=c++17",)
_MODULES: dict = {}
_FUNCTIONS: dict = {}


def nvrtc_options(dtype):
    """The -D options of the module compiled for ``dtype``."""
    real = "float" if np.dtype(dtype) == np.float32 else "double"
    return NVRTC_OPTIONS + (f"-DREAL={real}", f"-DBLOCK={THREADS}")


def _cupy():
    import cupy
    return cupy


def _kernel(dtype, name):
    """Kernel ``name`` of CUDA_SOURCE compiled for ``dtype`` (module and function cached per
    process)."""
    key = (np.dtype(dtype).name, name)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        if key[0] not in _MODULES:
            _MODULES[key[0]] = _cupy().RawModule(code=CUDA_SOURCE, options=nvrtc_options(dtype))
        fn = _FUNCTIONS[key] = _MODULES[key[0]].get_function(name)
    return fn


def _empty(shape, dtype):
    """Every output and scratch buffer comes from here (tests swap in a NaN-filled one)."""
    return _cupy().empty(tuple(int(d) for d in shape), dtype=dtype)


def _blocks(n, per_block=THREADS):
    return (int((n + per_block - 1) // per_block),)


def _u(v):
    return np.uint32(v)


def _i(v):
    return np.int32(v)


@plan_cache
def fwd_plan(dims, dtype, has_weight, has_bias, eps):
    """The :class:`._plan.Plan` of a forward: inputs "x" (B, C, S) and, if present, "weight" and
    "bias" (C,); output buffers "out" (B, C, S) and "stats" (2, B*G): the mean and rstd of each
    (sample, group); scratch "pmean" and "pm2" (B*C,). dims = (B, C, S, G)
    (:func:`.._norm_common.group_norm_dims`)."""
    dtype = np.dtype(dtype)
    B, C, S, G = dims
    P, planes, total = C // G, B * C, B * C * S
    w_arg = "weight" if has_weight else "x"           # never read when the flag is 0
    b_arg = "bias" if has_bias else "x"
    rstd = ("stats", B * G)                           # (buffer, element offset): row 1 of stats
    launches = () if B == 0 else (                   # an empty batch: nothing to launch
        Launch(_kernel(dtype, "gn_plane_moments"), _blocks(planes, PLANES_PER_BLOCK), (THREADS,),
               ("x", "pmean", "pm2", _u(planes), _u(S))),
        Launch(_kernel(dtype, "gn_row_stats"), (B * G,), (THREADS,),
               ("pmean", "pm2", "stats", rstd, _u(P), _u(S), dtype.type(eps))),
        Launch(_kernel(dtype, "gn_normalize"), _blocks(total), (THREADS,),
               ("x", "stats", rstd, w_arg, b_arg, _i(has_weight), _i(has_bias), "out", _u(total), _u(C),
                _u(S), _u(P))))
    return Plan(dtype, (("out", (B, C, S)), ("stats", (2, B * G))), launches,
                scratch=(("pmean", (planes,)), ("pm2", (planes,))))


@plan_cache
def bwd_plan(dims, dtype, has_weight, has_bias):
    """The plan of a backward: inputs "x" (B, C, S), "weight" (if present), "stats" (the forward's)
    and "dout" (B, C, S); output buffers "dx" (B, C, S) and, if present, "dweight" and "dbias"
    (C,); scratch "sdy", "sdyx" (B*C,), "row_g", "row_gx" (B*G,)."""
    dtype = np.dtype(dtype)
    B, C, S, G = dims
    P, planes, total = C // G, B * C, B * C * S
    rstd = ("stats", B * G)
    buffers = [("dx", (B, C, S))]
    buffers += [("dweight", (C,))] if has_weight else []
    buffers += [("dbias", (C,))] if has_bias else []
    w_arg = "weight" if has_weight else "dx"          # never read / written when the flag is 0
    dw_arg = "dweight" if has_weight else "dx"
    db_arg = "dbias" if has_bias else "dx"
    chan_blocks = _blocks(C)[0]
    launches = [] if B == 0 else [
        Launch(_kernel(dtype, "gn_bwd_plane_sums"), _blocks(planes, PLANES_PER_BLOCK), (THREADS,),
               ("x", "dout", "stats", rstd, "sdy", "sdyx", _u(planes), _u(S), _u(P)))]
    # with B == 0 only the channel blocks run: they write zero weight and bias gradients
    launches.append(Launch(_kernel(dtype, "gn_bwd_reduce"), (chan_blocks + B * G,), (THREADS,),
                           ("sdy", "sdyx", w_arg, _i(has_weight), _i(has_bias), dw_arg, db_arg, "row_g", "row_gx",
                            _u(B), _u(C), _u(P), _u(chan_blocks))))
    if B:
        launches.append(Launch(_kernel(dtype, "gn_bwd_dx"), _blocks(total), (THREADS,),
                               ("x", "dout", "stats", rstd, w_arg, _i(has_weight), "row_g", "row_gx", "dx",
                                _u(total), _u(C), _u(S), _u(P))))
    scratch = (("sdy", (planes,)), ("sdyx", (planes,)), ("row_g", (B * G,)), ("row_gx", (B * G,)))
    return Plan(dtype, tuple(buffers), tuple(launches), scratch=scratch)


def _check_inputs(x, weight, bias, num_groups):
    if not hasattr(x, "ndim"):
        raise TypeError(f"x must be a CuPy array or expose __cuda_array_interface__, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(f"x must have at least 3 dimensions (B, C, *spatial), got shape {tuple(x.shape)}")
    x = _device("x", x, x.ndim)
    weight = None if weight is None else _device("weight", weight, 1)
    bias = None if bias is None else _device("bias", bias, 1)
    dtype = _same_dtype(x=x, weight=weight, bias=bias)
    dims = group_norm_dims(x, weight, bias, num_groups, _shape)
    return x, weight, bias, dtype, dims


@replayable(fwd_plan)
def group_norm_fwd(x, weight, bias, num_groups, eps=1e-5):
    """``x (B, C, *spatial)``, ``weight``/``bias (C,)`` or None, ``num_groups`` dividing C ->
    ``(out (x.shape), cache)``; the cache holds x, weight and the per-(sample, group) mean and
    rstd ("stats", (2, B*G)) for :func:`group_norm_bwd`."""
    x, weight, bias, dtype, dims = _check_inputs(x, weight, bias, num_groups)
    B, C, S, G = dims
    plan = fwd_plan(dims, dtype, weight is not None, bias is not None, float(eps))
    bufs = run_on_cupy(plan, {"x": x.reshape(B, C, S), "weight": weight, "bias": bias}, _empty)
    cache = {"x": x.reshape(B, C, S), "weight": weight, "has_bias": bias is not None, "stats": bufs["stats"],
             "dims": dims, "dtype": dtype, "shape": tuple(x.shape)}
    return bufs["out"].reshape(x.shape), cache


@replayable(bwd_plan)
def group_norm_bwd(dout, cache):
    """``dout`` (the forward's x.shape) -> ``{"x", "weight", "bias"}`` (None for an absent weight
    or bias)."""
    B, C, S, G = dims = cache["dims"]
    dtype, weight, has_bias = cache["dtype"], cache["weight"], cache["has_bias"]
    if not hasattr(dout, "ndim"):
        raise TypeError(f"dout must be a CuPy array or expose __cuda_array_interface__, got {type(dout).__name__}")
    dout = _device("dout", dout, len(cache["shape"]))
    _shape("dout", dout, cache["shape"])
    if dout.dtype != dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but the forward ran in {np.dtype(dtype).name}")
    plan = bwd_plan(dims, dtype, weight is not None, has_bias)
    bufs = run_on_cupy(plan, {"x": cache["x"], "weight": weight, "stats": cache["stats"],
                              "dout": dout.reshape(B, C, S)}, _empty)
    return {"x": bufs["dx"].reshape(cache["shape"]), "weight": bufs.get("dweight"), "bias": bufs.get("dbias")}
