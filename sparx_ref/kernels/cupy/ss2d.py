"""CuPy ladder rung "quad" of the 2-D scan forward (``ss2d_scan_fwd``): one block of four warps
per (batch, channel), warp k scanning direction k, the map read once into shared memory.

Same signature, semantics and return convention as :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`
(float32 CuPy arrays, or anything exposing ``__cuda_array_interface__``; a CuPy ``y``). The
backward is any registered ``ss2d_scan_bwd``: the cache is the inputs (``scan_cache``).

Why a new rung: the "fused" kernel (:mod:`sparx_ref.kernels.cupy.scan`) gives a block 2 warps
that walk 2 directions each, one 32-step warp scan after another: a long dependent chain on
16 warps per SM, latency-bound (3.61 ms vs 1.41 ms composed on an H200). Here:

- **Block** = 128 threads = 4 warps; warp k scans direction k (0 row-major, 1 column-major,
  2 and 3 their reversals) of map channel c, i.e. scan channel ``k*Di + c``.
- **Shared memory**: three H x P maps, P = W | 1 (odd pitch: a column walk by a warp hits 32
  banks): the x map (loaded once, coalesced, 8 loads in flight per thread, float4 when
  aligned), and two zeroed accumulators Pm (directions 0, 1) and Qm (directions 2, 3).
- **Scan**: a lane holds ITEMS consecutive steps of its direction. It composes its ITEMS affine
  maps h -> a h + b, the warp scans the 32 lane aggregates (Kogge-Stone, 5 shuffle pairs), the
  exclusive prefix (one more pair) applied to the carried state gives the state entering the
  lane, which then walks its ITEMS steps. The carry into the next round is lane 31's inclusive
  aggregate applied to the carry (one FMA: rounds do not wait on each other's walks). delta, B, C
  of round r+1 are loaded (float4 when L % 4 == 0 and aligned) before round r is scanned.
  ITEMS = 4 (rounds of 128 steps); 2 when L <= 64 (a 7x7 map's one round would leave 62% of
  the lanes idle with 4).
- **Merge** without ordering the warps: y_k is ``atomicAdd``-ed into Pm (k = 0, 1) or Qm
  (k = 2, 3). Each accumulator element receives exactly two addends onto +0, and
  ``(0 + a) + b == (0 + b) + a`` bitwise: IEEE addition is commutative, and ``0 + a`` only
  changes a = -0 into +0, where both orders give ``+0 + b`` (b != -0) or ``+0`` (b == -0). So
  Pm, Qm and ``y = Pm + Qm`` (written once, coalesced, after ``__syncthreads``) are
  deterministic whatever order the warps arrive in.

Rounding: y = (y0 + y1) + (y2 + y3), where the reference and the composed path add
((y0 + y1) + y2) + y3; the scan composes ITEMS maps per lane before the warp scan. So the
result is not bitwise equal to the composed path; it agrees with the float64 reference within
``tolerance("float32", "kernel")`` (tests/kernels/test_ss2d_kernels.py).

Shared memory 3*H*(W|1)*4 bytes (37.4 KB at 56x56: 5 blocks = 20 warps per SM on H100/H200);
above the device's opt-in limit the composed version runs instead.
"""
from __future__ import annotations

import numpy as np

from .._scan_common import K_DIRECTIONS, scan_cache, ss2d_shapes
from ._plan import Launch, Plan, plan_cache, replayable, run_on_cupy
from .scan import _dev, _empty, _max_shared, ss2d_scan_fwd_composed

__all__ = ["ss2d_scan_fwd_quad"]

CUDA_SOURCES = {"ss2d_quad": r"""
// ss2d_fwd_quad: the 2-D selective scan forward, one block of 4 warps per (batch, channel).
// Compile-time constants: NSTATE (d_state N), ITEMS (consecutive steps per lane; a multiple of
// 4 for the float4 path). Layouts (C-contiguous): x, y (batch, Di, H, W); delta
// (batch, 4*Di, L); A (4*Di, N); B, C (batch, 4, N, L) in scan order; D, bias (4*Di,).
// Channel k*Di + c is map channel c read in direction k.
#ifndef NSTATE
#define NSTATE 1
#endif
#ifndef ITEMS
#define ITEMS 4
#endif
#define QROUND (32 * ITEMS)
#define QMASK 0xffffffffu

// PyTorch's softplus (identity above the threshold 20)
__device__ __forceinline__ float quad_softplus(float z) { return z > 20.f ? z : log1pf(expf(z)); }

// First map position, as (major, minor), of scan index t in direction kdir: s = t (kdir 0, 1)
// or L-1-t (2, 3); minor runs fastest (w for row-major kdir 0/2, h for column-major 1/3).
// (For t >= L the result is meaningless and never used: those steps are masked.)
__device__ __forceinline__ void quad_start(int kdir, int t, int H, int W, int &major, int &minor) {
    int s = (kdir >= 2) ? (H * W - 1 - t) : t;
    int M = (kdir & 1) ? H : W;
    major = s / M;
    minor = s - major * M;
}

// Shared-memory offset of (major, minor) for pitch P, then step to the next scan index.
__device__ __forceinline__ int quad_addr(int kdir, int major, int minor, int P) {
    return (kdir & 1) ? minor * P + major : major * P + minor;
}
__device__ __forceinline__ void quad_next(int kdir, int H, int W, int &major, int &minor) {
    int M = (kdir & 1) ? H : W;
    if (kdir < 2) { if (++minor == M) { minor = 0; ++major; } }
    else          { if (--minor < 0) { minor = M - 1; --major; } }
}

// delta, B, C of the lane's ITEMS steps t0 .. t0+ITEMS-1 (zeros past L). vec: float4 loads
// (the host checked L % 4 == 0 and 16-byte aligned bases; t0 is a multiple of 4).
__device__ __forceinline__ void quad_load(const float* __restrict__ dg, const float* __restrict__ Bg,
                                          const float* __restrict__ Cg, int t0, int L, int vec,
                                          float z[ITEMS], float Bv[ITEMS][NSTATE], float Cv[ITEMS][NSTATE]) {
#if ITEMS % 4 == 0
    if (vec) {
#pragma unroll
        for (int q = 0; q < ITEMS / 4; ++q) {
            int t = t0 + 4 * q;
            float4 d4 = make_float4(0.f, 0.f, 0.f, 0.f);
            float4 b4[NSTATE], c4[NSTATE];
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) { b4[n] = d4; c4[n] = d4; }
            if (t < L) {
                d4 = *reinterpret_cast<const float4*>(dg + t);
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) {
                    b4[n] = *reinterpret_cast<const float4*>(Bg + n * L + t);
                    c4[n] = *reinterpret_cast<const float4*>(Cg + n * L + t);
                }
            }
            z[4 * q] = d4.x; z[4 * q + 1] = d4.y; z[4 * q + 2] = d4.z; z[4 * q + 3] = d4.w;
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) {
                Bv[4 * q][n] = b4[n].x; Bv[4 * q + 1][n] = b4[n].y; Bv[4 * q + 2][n] = b4[n].z; Bv[4 * q + 3][n] = b4[n].w;
                Cv[4 * q][n] = c4[n].x; Cv[4 * q + 1][n] = c4[n].y; Cv[4 * q + 2][n] = c4[n].z; Cv[4 * q + 3][n] = c4[n].w;
            }
        }
        return;
    }
#endif
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        int t = t0 + i;
        bool ok = t < L;
        z[i] = ok ? dg[t] : 0.f;
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            Bv[i][n] = ok ? Bg[n * L + t] : 0.f;
            Cv[i][n] = ok ? Cg[n * L + t] : 0.f;
        }
    }
}

extern "C" {

// Grid: batch*Di blocks of 128 threads; dynamic shared memory 3*H*P floats.
__global__ void ss2d_fwd_quad(const float* __restrict__ x, const float* __restrict__ delta,
                              const float* __restrict__ A, const float* __restrict__ B,
                              const float* __restrict__ C, const float* __restrict__ D,
                              const float* __restrict__ bias, float* __restrict__ y,
                              int batch, int Di, int H, int W, int P, int softplus, int vec) {
    extern __shared__ float smem[];
    float* xm = smem;                 // the x map, pitch P
    float* pm = smem + H * P;         // directions 0 and 1 add here
    float* qm = smem + 2 * H * P;     // directions 2 and 3 add here
    const int bc = blockIdx.x;        // b * Di + c
    const int b = bc / Di, c = bc - b * Di;
    const int L = H * W;
    const int tid = threadIdx.x, nthr = blockDim.x;
    const float* xg = x + (long long)bc * L;

    // 1. the map into shared memory (8 loads in flight per thread; float4 when vec) and the
    //    accumulators zeroed
    for (int e = tid; e < 2 * H * P; e += nthr) pm[e] = 0.f;
    if (vec) {
        const int L4 = L / 4;
        for (int p0 = tid; p0 < L4; p0 += 8 * nthr) {
            float4 v[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                int p = p0 + i * nthr;
                v[i] = p < L4 ? reinterpret_cast<const float4*>(xg)[p] : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                int p = 4 * (p0 + i * nthr);
                if (p < L) {
                    int h = p / W, w = p - h * W;
                    float e4[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        xm[h * P + w] = e4[j];
                        if (++w == W) { w = 0; ++h; }
                    }
                }
            }
        }
    } else {
        for (int p0 = tid; p0 < L; p0 += 8 * nthr) {
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) { int p = p0 + i * nthr; v[i] = p < L ? xg[p] : 0.f; }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                int p = p0 + i * nthr;
                if (p < L) { int h = p / W; xm[h * P + p - h * W] = v[i]; }
            }
        }
    }
    __syncthreads();

    // 2. warp kdir scans direction kdir
    const int lane = tid & 31, kdir = tid >> 5;
    const int ch = kdir * Di + c;
    const float* dg = delta + ((long long)b * 4 * Di + ch) * L;
    const float* Bg = B + ((long long)b * 4 + kdir) * NSTATE * L;
    const float* Cg = C + ((long long)b * 4 + kdir) * NSTATE * L;
    float* acc = kdir < 2 ? pm : qm;
    float An[NSTATE], carry[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { An[n] = A[ch * NSTATE + n]; carry[n] = 0.f; }
    const float Dc = D[ch], bch = bias[ch];
    const int nrounds = (L + QROUND - 1) / QROUND;
    // map position (major, minor) of the lane's first step, moved on by QROUND steps a round
    // (one division here instead of one a round)
    const int M = (kdir & 1) ? H : W;
    const int adv_major = QROUND / M, adv_minor = QROUND - adv_major * M;
    int major0, minor0;
    quad_start(kdir, lane * ITEMS, H, W, major0, minor0);

    float z[ITEMS], Bv[ITEMS][NSTATE], Cv[ITEMS][NSTATE];
    quad_load(dg, Bg, Cg, lane * ITEMS, L, vec, z, Bv, Cv);
    for (int r = 0; r < nrounds; ++r) {
        const int t0 = r * QROUND + lane * ITEMS;
        // the next round's loads go out before this round is scanned (zeros past the end)
        float zn[ITEMS], Bn[ITEMS][NSTATE], Cn[ITEMS][NSTATE];
        quad_load(dg, Bg, Cg, t0 + QROUND, L, vec, zn, Bn, Cn);

        // the lane's inputs: u from the shared map, dt = softplus(delta + bias)
        float u[ITEMS], dt[ITEMS], yv[ITEMS];
        int addr[ITEMS];
        int major = major0, minor = minor0;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            bool ok = t0 + i < L;
            addr[i] = ok ? quad_addr(kdir, major, minor, P) : 0;
            u[i] = ok ? xm[addr[i]] : 0.f;
            if (ok) quad_next(kdir, H, W, major, minor);
            float zz = z[i] + bch;
            dt[i] = softplus ? quad_softplus(zz) : zz;
            yv[i] = Dc * u[i];
        }
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            float a[ITEMS], bb[ITEMS];
            float ag = 1.f, bg = 0.f;          // the lane's ITEMS maps composed, in time order
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                bool ok = t0 + i < L;
                a[i] = ok ? expf(dt[i] * An[n]) : 1.f;
                bb[i] = ok ? dt[i] * Bv[i][n] * u[i] : 0.f;
                bg = a[i] * bg + bb[i];
                ag = a[i] * ag;
            }
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {      // inclusive Kogge-Stone over the lanes
                float a_up = __shfl_up_sync(QMASK, ag, off);
                float b_up = __shfl_up_sync(QMASK, bg, off);
                if (lane >= off) { bg = ag * b_up + bg; ag = ag * a_up; }
            }
            float ae = __shfl_up_sync(QMASK, ag, 1);       // exclusive prefix
            float be = __shfl_up_sync(QMASK, bg, 1);
            float a31 = __shfl_sync(QMASK, ag, 31);        // the whole round
            float b31 = __shfl_sync(QMASK, bg, 31);
            if (lane == 0) { ae = 1.f; be = 0.f; }
            float h = ae * carry[n] + be;                  // state entering the lane's first step
            carry[n] = a31 * carry[n] + b31;
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                h = a[i] * h + bb[i];
                yv[i] += Cv[i][n] * h;
            }
        }
        // two addends per accumulator element: deterministic (see the module docstring)
#pragma unroll
        for (int i = 0; i < ITEMS; ++i)
            if (t0 + i < L) atomicAdd(acc + addr[i], yv[i]);
        if (kdir < 2) { minor0 += adv_minor; major0 += adv_major; if (minor0 >= M) { minor0 -= M; ++major0; } }
        else          { minor0 -= adv_minor; major0 -= adv_major; if (minor0 < 0) { minor0 += M; --major0; } }
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            z[i] = zn[i];
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) { Bv[i][n] = Bn[i][n]; Cv[i][n] = Cn[i][n]; }
        }
    }
    __syncthreads();

    // 3. y = Pm + Qm, written once, coalesced
    float* yg = y + (long long)bc * L;
    for (int p = tid; p < L; p += nthr) {
        int h = p / W, o = h * P + p - h * W;
        yg[p] = pm[o] + qm[o];
    }
}

}  // extern "C"
"""}
NVRTC_OPTIONS = ("-DNSTATE=1", "-DITEMS=4")

QUAD_ITEMS = 4            # consecutive steps per lane (a multiple of 4: float4 loads)
SHORT_ITEMS = 2           # for L <= 64 (7x7 maps): one round of 64 steps wastes fewer lanes than 128
QUAD_THREADS = 128        # four warps, one per direction
_MODULES: dict = {}
_SHARED_CAP: dict = {}     # device id -> opt-in shared memory per block
_ALLOW_VEC = {"on": True}   # tests switch float4 off to run the scalar path on aligned maps


def _module(nstate: int, items: int):
    key = (int(nstate), int(items))
    if key not in _MODULES:
        import cupy
        _MODULES[key] = cupy.RawModule(code=CUDA_SOURCES["ss2d_quad"],
                                       options=(f"-DNSTATE={key[0]}", f"-DITEMS={key[1]}"))
    return _MODULES[key]


def _kernel(nstate, items, shared):
    k = _module(nstate, items).get_function("ss2d_fwd_quad")
    if shared > 48 * 1024 and k.max_dynamic_shared_size_bytes < shared:
        k.max_dynamic_shared_size_bytes = shared
    return k


def _shared_cap() -> int:
    """The device's opt-in shared memory per block, asked once per device (``attributes`` reads
    every attribute: ~0.1 ms of host time a call)."""
    import cupy
    dev = getattr(cupy.cuda.Device(), "id", 0)
    if dev not in _SHARED_CAP:
        _SHARED_CAP[dev] = _max_shared()
    return _SHARED_CAP[dev]


def _address(a) -> int:
    """Device address of an array's first element (CuPy, or NumPy in the CPU stand-in)."""
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(iface["data"][0])


def quad_plan(dims, delta_softplus, has_D, has_bias, aligned):
    """The :class:`._plan.Plan` of a "quad" forward, or None when the maps do not fit in shared
    memory (the array function then runs the composed version). dims = (batch, Di, H, W, N);
    inputs "x", "delta", "A", "B", "C" and, if given, "D" and "delta_bias" (zeros stand in
    otherwise); output buffer "y" (batch, Di, H, W). ``aligned``: x, delta, B and C start on
    16-byte boundaries (then the float4 loads may be used)."""
    return _quad_plan(tuple(int(d) for d in dims), bool(delta_softplus), bool(has_D), bool(has_bias),
                      bool(aligned), _ALLOW_VEC["on"], _shared_cap())


@plan_cache
def _quad_plan(dims, delta_softplus, has_D, has_bias, aligned, allow_vec, shared_cap):
    batch, Di, H, W, N = dims
    P = W | 1
    shared = 3 * H * P * 4
    if shared > shared_cap:
        return None
    KD, L = K_DIRECTIONS * Di, H * W
    items = SHORT_ITEMS if L <= 32 * SHORT_ITEMS else QUAD_ITEMS
    vec = allow_vec and items % 4 == 0 and L % 4 == 0 and aligned
    zeroed = [name for name, given in (("D0", has_D), ("delta_bias0", has_bias)) if not given]
    launch = Launch(_kernel(N, items, shared), (batch * Di,), (QUAD_THREADS,), (
        "x", "delta", "A", "B", "C", "D" if has_D else "D0", "delta_bias" if has_bias else "delta_bias0", "y",
        np.int32(batch), np.int32(Di), np.int32(H), np.int32(W), np.int32(P), np.int32(delta_softplus),
        np.int32(vec)), shared_mem=shared)
    return Plan(np.dtype(np.float32), (("y", (batch, Di, H, W)),) + tuple((z, (KD,)) for z in zeroed),
                (launch,), frozenset(zeroed))


@replayable(quad_plan)
def ss2d_scan_fwd_quad(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """2-D scan forward, ladder rung "quad": one block of 4 warps per (batch, channel), warp k
    scanning direction k from the map in shared memory, ITEMS consecutive steps per lane, the
    four directions merged by two deterministic shared accumulators. Returns ``(y, cache)``;
    see :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`. Falls back to the composed version when
    3*H*(W|1)*4 bytes exceed the device's shared memory per block."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="cupy")
    xd, dd, Bd, Cd = _dev(x), _dev(delta), _dev(B), _dev(C)
    plan = quad_plan((batch, Di, H, W, N), delta_softplus, D is not None, delta_bias is not None,
                     all(_address(a) % 16 == 0 for a in (xd, dd, Bd, Cd)))
    if plan is None:
        return ss2d_scan_fwd_composed(x, delta, A, B, C, D, delta_bias, delta_softplus)
    given = {"x": xd, "delta": dd, "A": _dev(A), "B": Bd, "C": Cd,
             "D": None if D is None else _dev(D), "delta_bias": None if delta_bias is None else _dev(delta_bias)}
    y = run_on_cupy(plan, given, lambda shape, dtype: _empty(shape))["y"]
    return y, scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N))
