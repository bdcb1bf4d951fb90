"""CuPy kernels (CUDA C compiled at run time by NVRTC, no build step) for the selective scan,
the cross scan/merge and the fused 2-D scan. float32 only (a TypeError says so).

Same signatures, semantics and return conventions as :mod:`sparx_ref.ref.scan` and
:mod:`sparx_ref.ref.ss2d`, with CuPy arrays (anything exposing ``__cuda_array_interface__``
is accepted and viewed without a copy; outputs are CuPy arrays).

The ladder (registry rows; :func:`sparx_ref.kernels.registered` and the registry's ``default``
column say which version is the default: ``vec`` for the selective scan, ``tiled`` for
cross-scan/merge, ``quad`` (:mod:`.ss2d`) for the ss2d forward and ``composed`` for its backward):

- selective_scan_fwd: ``naive`` (one thread per row, uncoalesced), ``warp`` (one warp per row,
  lanes = consecutive steps, a warp-shuffle scan of (a, b) pairs per 32 steps).
- selective_scan_fwd ``vec``: a lane holds ITEMS consecutive steps (16-byte loads), one warp
  scan per ITEMS elements over the lane aggregates, next round's loads in flight; rows of <= 64
  steps share a warp (SEG = 16 or 8 lanes per row). ``selective_scan_bwd`` ``vec``: the same
  per-lane idea in the two-pass backward.
- selective_scan_bwd: ``warp`` (recompute the forward per round of 32*CHUNKS steps from stored
  round-entry states, reverse warp scan for the adjoint, dB/dC summed over the block's channels
  in shared memory, then over blocks by ``sum_middle``: deterministic).
- cross_scan / cross_merge: ``naive`` (one thread per element), ``tiled`` (32x32 shared tiles
  so the transposed directions are coalesced too).
- ss2d_scan_fwd / ss2d_scan_bwd: ``composed`` (cross_scan + scan + cross_merge kernels, three
  passes over memory), ``fused`` (one block per (batch, channel) reads the map once into shared
  memory and scans all four directions from there; the merged result is written once). The
  ``quad`` forward (4 warps per block, one direction each) lives in :mod:`.ss2d`.

The CUDA source is ``CUDA_SOURCES["scan"]``; ``NSTATE`` (d_state) and ``CHUNKS`` are macros, one
compiled module per pair met (cached). The vec rung is ``CUDA_SOURCES["scan_vec"]`` (macros
NSTATE, SEG, ITEMS, VEC; one module per combination met).
"""
from __future__ import annotations

import functools

import numpy as np

from .._scan_common import (K_DIRECTIONS, check_dtype, check_dy, check_merge_shapes, poisoning,
                            scan_cache, scan_shapes, ss2d_shapes)
from ._plan import Launch, Plan, plan_cache, replayable, run_on_cupy

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "cross_scan", "cross_merge",
           "ss2d_scan_fwd", "ss2d_scan_bwd"]

# The source is cut in two so that the "vec" module shares the helpers (layouts, scan_pos,
# softplus): CUDA_SOURCES["scan"] = prelude + the naive/warp/fused kernels,
# CUDA_SOURCES["scan_vec"] = prelude + the "vec" kernels.
_SCAN_PRELUDE = r"""
// Selective scan, cross scan and fused 2-D scan kernels (float32), compiled at run time by CuPy
// (NVRTC). NSTATE (d_state N) and CHUNKS are compile-time constants; the host module compiles
// one module per (N, CHUNKS) it meets. The Numba-CUDA module mirrors this file line for line.
//
// Layouts (all C-contiguous): u, delta, y (batch, KD, L); A (KD, N); B, C (batch, K, N, L);
// x (batch, Di, H, W); xs/ys (batch, 4, Di, H*W). Channel c of the plain scan uses group
// c / (KD / K). In the 2-D scan, channel k*Di + c is map channel c read in direction k.
#ifndef NSTATE
#define NSTATE 1
#endif
#ifndef CHUNKS
#define CHUNKS 4
#endif
#define FULL_MASK 0xffffffffu

// (h, w) read at scan index t by direction kdir: 0 row-major, 1 column-major, 2/3 reversed.
// The plain scan is kdir = 0 on a 1 x L "map".
__device__ __forceinline__ void scan_pos(int kdir, int t, int H, int W, int &h, int &w) {
    int s = (kdir >= 2) ? (H * W - 1 - t) : t;
    if (kdir & 1) { h = s % H; w = s / H; } else { h = s / W; w = s % W; }
}

// PyTorch's softplus (identity above 20) and its derivative
__device__ __forceinline__ float softplus_f(float z) { return z > 20.f ? z : log1pf(expf(z)); }
__device__ __forceinline__ float dsoftplus_f(float z) { return z > 20.f ? 1.f : 1.f / (1.f + expf(-z)); }

"""

_SCAN_KERNELS = r"""// Inclusive warp scan of the affine maps h -> a h + b (lane order = time order).
__device__ __forceinline__ void warp_scan_fwd(float &a, float &b, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        float a_up = __shfl_up_sync(FULL_MASK, a, off);
        float b_up = __shfl_up_sync(FULL_MASK, b, off);
        if (lane >= off) { b = a * b_up + b; a = a * a_up; }
    }
}

// Inclusive suffix scan (lane order reversed) of g -> alpha g + beta.
__device__ __forceinline__ void warp_scan_rev(float &alpha, float &beta, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        float a_dn = __shfl_down_sync(FULL_MASK, alpha, off);
        float b_dn = __shfl_down_sync(FULL_MASK, beta, off);
        if (lane + off < 32) { beta = alpha * b_dn + beta; alpha = alpha * a_dn; }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// One warp scans one sequence of length L = H*W, 32*CHUNKS steps per round (the loads of a
// round are issued together, then CHUNKS warp scans run, the state carried in `carry`).
//   u at (h, w): u[h*pu + w]; delta, Bg, Cg (rows of length L) in scan order.
//   y at (h, w): y[h*py + w] (= or += when accumulate); y == nullptr: no output (backward's
//   pass 1). hstart != nullptr: the state entering round s is stored at hstart[s*NSTATE + n].
__device__ void fwd_row(const float* u, int pu, const float* __restrict__ delta,
                        const float* __restrict__ A, const float* __restrict__ Bg,
                        const float* __restrict__ Cg, float Dc, float bias, int softplus,
                        float* y, int py, int accumulate, int kdir, int H, int W,
                        float* hstart) {
    const int lane = threadIdx.x & 31;
    const int L = H * W;
    float carry[NSTATE], An[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { carry[n] = 0.f; An[n] = A[n]; }
    for (int base = 0, s = 0; base < L; base += 32 * CHUNKS, ++s) {
        if (hstart != nullptr && lane == 0) {
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) hstart[s * NSTATE + n] = carry[n];
        }
        float uv[CHUNKS], zv[CHUNKS], Bv[CHUNKS][NSTATE], Cv[CHUNKS][NSTATE];
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) {
            int t = base + j * 32 + lane;
            uv[j] = 0.f; zv[j] = 0.f;
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) { Bv[j][n] = 0.f; Cv[j][n] = 0.f; }
            if (t < L) {
                int h, w;
                scan_pos(kdir, t, H, W, h, w);
                uv[j] = u[h * pu + w];
                zv[j] = delta[t] + bias;
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) {
                    Bv[j][n] = Bg[n * L + t];
                    if (y != nullptr) Cv[j][n] = Cg[n * L + t];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) {
            int t = base + j * 32 + lane;
            bool valid = t < L;
            float dt = softplus ? softplus_f(zv[j]) : zv[j];
            float yv = Dc * uv[j];
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) {
                float a = valid ? expf(dt * An[n]) : 1.f;
                float b = valid ? dt * Bv[j][n] * uv[j] : 0.f;
                warp_scan_fwd(a, b, lane);
                float hn = a * carry[n] + b;
                yv += Cv[j][n] * hn;
                carry[n] = __shfl_sync(FULL_MASK, hn, 31);
            }
            if (y != nullptr && valid) {
                int h, w;
                scan_pos(kdir, t, H, W, h, w);
                if (accumulate) y[h * py + w] += yv; else y[h * py + w] = yv;
            }
        }
    }
}

// Backward of fwd_row for one sequence, one warp. Rounds are visited last to first; a round
// first recomputes its forward states from hstart (written by fwd_row in pass 1), then runs
// the adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1} as a reverse warp scan.
//   du at (h, w): du[h*pdu + w] (= or +=); ddelta in scan order.
//   dB/dC contributions (sum over the channels of a group):
//     sred != nullptr: written to this warp's slice of shared memory sred[warp][2][CHUNKS*32*NSTATE],
//       reduced over the block's warps and stored to partB/partC (N, L) (a deterministic
//       partial sum per block; all warps of the block must call this together);
//     otherwise atomicAdd into dBg/dCg (N, L).
//   Per-row sums (warp-reduced, lane 0 writes): dA_out[n], *dD_out, *dbias_out.
__device__ void bwd_row(const float* u, int pu, const float* dy, int pdy,
                        const float* __restrict__ delta, const float* __restrict__ A,
                        const float* __restrict__ Bg, const float* __restrict__ Cg, float Dc,
                        float bias, int softplus, int kdir, int H, int W, int active,
                        const float* hstart, float* du, int pdu, int du_accumulate,
                        float* ddelta, float* sred, float* partB, float* partC,
                        float* dBg, float* dCg, float* dA_out, float* dD_out, float* dbias_out) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    const int L = H * W;
    const int nrounds = (L + 32 * CHUNKS - 1) / (32 * CHUNKS);
    const int RED = CHUNKS * 32 * NSTATE;
    float An[NSTATE], gcarry[NSTATE], anext[NSTATE], dA_acc[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { An[n] = A[n]; gcarry[n] = 0.f; anext[n] = 0.f; dA_acc[n] = 0.f; }
    float dD_acc = 0.f, dbias_acc = 0.f;
    for (int s = nrounds - 1; s >= 0; --s) {
        const int base = s * 32 * CHUNKS;
        float uv[CHUNKS], zv[CHUNKS], dyv[CHUNKS], Bv[CHUNKS][NSTATE], Cv[CHUNKS][NSTATE];
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) {
            int t = base + j * 32 + lane;
            uv[j] = 0.f; zv[j] = 0.f; dyv[j] = 0.f;
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) { Bv[j][n] = 0.f; Cv[j][n] = 0.f; }
            if (active && t < L) {
                int h, w;
                scan_pos(kdir, t, H, W, h, w);
                uv[j] = u[h * pu + w];
                dyv[j] = dy[h * pdy + w];
                zv[j] = delta[t] + bias;
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) { Bv[j][n] = Bg[n * L + t]; Cv[j][n] = Cg[n * L + t]; }
            }
        }
        // forward recompute inside the round: gate a, state h_t and h_{t-1}
        float carry[NSTATE];
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) carry[n] = active ? hstart[s * NSTATE + n] : 0.f;
        float dtv[CHUNKS], gate[CHUNKS][NSTATE], hcur[CHUNKS][NSTATE], hprev[CHUNKS][NSTATE];
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) {
            bool valid = active && (base + j * 32 + lane < L);
            float dt = softplus ? softplus_f(zv[j]) : zv[j];
            dtv[j] = dt;
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) {
                float a0 = valid ? expf(dt * An[n]) : 1.f;
                float a = a0, b = valid ? dt * Bv[j][n] * uv[j] : 0.f;
                warp_scan_fwd(a, b, lane);
                float hn = a * carry[n] + b;
                float hp = __shfl_up_sync(FULL_MASK, hn, 1);
                if (lane == 0) hp = carry[n];
                gate[j][n] = a0; hcur[j][n] = hn; hprev[j][n] = hp;
                carry[n] = __shfl_sync(FULL_MASK, hn, 31);
            }
        }
        // reverse pass
#pragma unroll
        for (int j = CHUNKS - 1; j >= 0; --j) {
            int t = base + j * 32 + lane;
            bool valid = active && t < L;
            float dt = dtv[j];
            float duv = Dc * dyv[j], ddt = 0.f;
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) {
                float alpha = __shfl_down_sync(FULL_MASK, gate[j][n], 1);
                if (lane == 31) alpha = anext[n];
                float beta = valid ? dyv[j] * Cv[j][n] : 0.f;
                warp_scan_rev(alpha, beta, lane);
                float g = alpha * gcarry[n] + beta;      // dL/dh_t
                gcarry[n] = __shfl_sync(FULL_MASK, g, 0);
                anext[n] = __shfl_sync(FULL_MASK, gate[j][n], 0);
                float cb = 0.f, cc = 0.f;
                if (valid) {
                    float ga = g * hprev[j][n] * gate[j][n];
                    duv += g * dt * Bv[j][n];
                    ddt += g * Bv[j][n] * uv[j] + ga * An[n];
                    dA_acc[n] += ga * dt;
                    cb = g * dt * uv[j];
                    cc = dyv[j] * hcur[j][n];
                }
                if (sred != nullptr) {
                    sred[(warp * 2 + 0) * RED + (j * 32 + lane) * NSTATE + n] = cb;
                    sred[(warp * 2 + 1) * RED + (j * 32 + lane) * NSTATE + n] = cc;
                } else if (valid) {
                    atomicAdd(&dBg[n * L + t], cb);
                    atomicAdd(&dCg[n * L + t], cc);
                }
            }
            if (valid) {
                float dz = softplus ? ddt * dsoftplus_f(zv[j]) : ddt;
                ddelta[t] = dz;
                dbias_acc += dz;
                dD_acc += dyv[j] * uv[j];
                int h, w;
                scan_pos(kdir, t, H, W, h, w);
                if (du_accumulate) du[h * pdu + w] += duv; else du[h * pdu + w] = duv;
            }
        }
        if (sred != nullptr) {   // block reduction of dB/dC over the warps (channels) of the block
            __syncthreads();
            for (int e = threadIdx.x; e < RED; e += blockDim.x) {
                int t = base + e / NSTATE, n = e % NSTATE;
                if (t < L) {
                    float sb = 0.f, sc = 0.f;
                    for (int q = 0; q < nwarps; ++q) { sb += sred[(q * 2) * RED + e]; sc += sred[(q * 2 + 1) * RED + e]; }
                    partB[n * L + t] = sb;
                    partC[n * L + t] = sc;
                }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        float v = warp_sum(dA_acc[n]);
        if (active && lane == 0) dA_out[n] = v;
    }
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (active && lane == 0) { *dD_out = dD_acc; *dbias_out = dbias_acc; }
}

// Copy a (H, W) map from global memory (contiguous) into shared memory with row pitch P. Eight
// loads are issued before the first shared store (one load at a time would wait out the memory
// latency 49 times for a 56x56 map).
__device__ __forceinline__ void load_map(const float* __restrict__ g, float* s, int H, int W, int P) {
    const int L = H * W;
    for (int p0 = threadIdx.x; p0 < L; p0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { int p = p0 + i * blockDim.x; v[i] = p < L ? g[p] : 0.f; }
#pragma unroll
        for (int i = 0; i < 8; ++i) { int p = p0 + i * blockDim.x; if (p < L) s[(p / W) * P + p % W] = v[i]; }
    }
}

// g[p] += s[map position of p], eight global loads in flight at a time.
__device__ __forceinline__ void add_map(float* g, const float* s, int H, int W, int P) {
    const int L = H * W;
    for (int p0 = threadIdx.x; p0 < L; p0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { int p = p0 + i * blockDim.x; v[i] = p < L ? g[p] : 0.f; }
#pragma unroll
        for (int i = 0; i < 8; ++i) { int p = p0 + i * blockDim.x; if (p < L) g[p] = v[i] + s[(p / W) * P + p % W]; }
    }
}

extern "C" {

// ladder rung 1, "naive": one thread per (batch, channel) row, walking L sequentially. Adjacent
// threads read addresses L apart: every load is its own memory transaction.
__global__ void scan_fwd_naive(const float* u, const float* delta, const float* A, const float* B,
                               const float* C, const float* D, const float* bias, float* y,
                               int batch, int KD, int L, int K, int softplus) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= batch * KD) return;
    int b = row / KD, c = row % KD, k = c / (KD / K);
    const float* Bg = B + ((long long)(b * K + k) * NSTATE) * L;
    const float* Cg = C + ((long long)(b * K + k) * NSTATE) * L;
    float h[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) h[n] = 0.f;
    float Dc = D[c], bc = bias[c];
    for (int t = 0; t < L; ++t) {
        float ut = u[(long long)row * L + t];
        float z = delta[(long long)row * L + t] + bc;
        float dt = softplus ? softplus_f(z) : z;
        float yt = Dc * ut;
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            h[n] = expf(dt * A[c * NSTATE + n]) * h[n] + dt * Bg[n * L + t] * ut;
            yt += Cg[n * L + t] * h[n];
        }
        y[(long long)row * L + t] = yt;
    }
}

// ladder rung 2, "warp": one warp per row; lanes hold consecutive time steps (coalesced loads),
// a warp-shuffle scan of (a, b) pairs per 32 steps, the state carried between them.
__global__ void scan_fwd_warp(const float* u, const float* delta, const float* A, const float* B,
                              const float* C, const float* D, const float* bias, float* y,
                              int batch, int KD, int L, int K, int softplus) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= batch * KD) return;            // whole warps leave together
    int b = row / KD, c = row % KD, k = c / (KD / K);
    long long off = (long long)row * L;
    long long goff = (long long)(b * K + k) * NSTATE * L;
    fwd_row(u + off, L, delta + off, A + c * NSTATE, B + goff, C + goff, D[c], bias[c], softplus,
            y + off, L, 0, 0, 1, L, nullptr);
}

// Backward, one warp per row, the block's warps = consecutive channels of one group, so dB/dC
// are summed over the block in shared memory (deterministic partial sums per block, added by
// sum_middle afterwards). Grid (ceil(Dg / warps), K, batch). Pass 1 stores the state entering
// each round (hstart); pass 2 runs the rounds backwards.
__global__ void scan_bwd_warp(const float* u, const float* delta, const float* A, const float* B,
                              const float* C, const float* D, const float* bias, const float* dy,
                              float* hstart, float* du, float* ddelta, float* partB, float* partC,
                              float* partA, float* partD, float* partbias,
                              int batch, int KD, int L, int K, int softplus) {
    extern __shared__ float sred[];
    int nwarps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    int Dg = KD / K, k = blockIdx.y, b = blockIdx.z;
    int ci = blockIdx.x * nwarps + warp;
    int active = ci < Dg;
    int c = k * Dg + (active ? ci : 0);
    int row = b * KD + c;
    long long off = (long long)row * L;
    long long goff = (long long)(b * K + k) * NSTATE * L;
    int nrounds = (L + 32 * CHUNKS - 1) / (32 * CHUNKS);
    float* hs = hstart + (long long)row * nrounds * NSTATE;
    if (active)
        fwd_row(u + off, L, delta + off, A + c * NSTATE, B + goff, C + goff, D[c], bias[c],
                softplus, nullptr, L, 0, 0, 1, L, hs);
    __syncwarp();
    long long poff = ((long long)(b * K + k) * gridDim.x + blockIdx.x) * NSTATE * L;
    bwd_row(u + off, L, dy + off, L, delta + off, A + c * NSTATE, B + goff, C + goff, D[c], bias[c],
            softplus, 0, 1, L, active, hs, du + off, L, 0, ddelta + off, sred, partB + poff,
            partC + poff, nullptr, nullptr, partA + (long long)row * NSTATE, partD + row,
            partbias + row);
}

// out[o, i] = sum_p in[o, p, i] (in order p = 0, 1, ...: deterministic).
__global__ void sum_middle(const float* in0, float* out0, const float* in1, float* out1,
                           const float* in2, float* out2, const float* in3, float* out3,
                           const float* in4, float* out4, int n,
                           int outer0, int P0, int inner0, int outer1, int P1, int inner1,
                           int outer2, int P2, int inner2, int outer3, int P3, int inner3,
                           int outer4, int P4, int inner4) {
    // The backward's parameter sums, all in one launch. For each of the n <= 5 pairs (in_j,
    // out_j) of layout (outer_j, P_j, inner_j): out_j[o*inner_j + i] = sum_{p<P_j}
    // in_j[(o*P_j + p)*inner_j + i], p in order (deterministic). The threads walk the pairs'
    // outputs one after the other.
    const float* ins[5] = {in0, in1, in2, in3, in4};
    float* outs[5] = {out0, out1, out2, out3, out4};
    const int outer[5] = {outer0, outer1, outer2, outer3, outer4};
    const int P[5] = {P0, P1, P2, P3, P4};
    const int inner[5] = {inner0, inner1, inner2, inner3, inner4};
    long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (int j = 0; j < n; ++j) {
        const long long per = (long long)outer[j] * inner[j];
        if (e < per) {
            const long long o = e / inner[j], i = e % inner[j];
            float s = 0.f;
            for (int p = 0; p < P[j]; ++p) s += ins[j][(o * P[j] + p) * inner[j] + i];
            outs[j][e] = s;
            return;
        }
        e -= per;
    }
}

// cross scan, "naive": one thread per map element, writing its four copies. Directions 1 and 3
// write addresses H apart across a warp (uncoalesced).
__global__ void cross_scan_naive(const float* x, float* xs, int batch, int C, int H, int W) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int L = H * W;
    if (idx >= (long long)batch * C * L) return;
    int p = idx % L; long long bc = idx / L;
    int b = bc / C, c = bc % C, h = p / W, w = p % W;
    float v = x[idx];
    long long plane = (long long)C * L;
    long long o = (long long)b * 4 * plane + (long long)c * L;
    xs[o + p] = v;
    xs[o + plane + w * H + h] = v;
    xs[o + 2 * plane + L - 1 - p] = v;
    xs[o + 3 * plane + L - 1 - (w * H + h)] = v;
}

// cross scan, "tiled": a 32x32 tile through shared memory, so the transposed directions are
// written along h (coalesced) too. Block (32, 8), grid (ceil(W/32), ceil(H/32), batch*C).
__global__ void cross_scan_tiled(const float* x, float* xs, int batch, int C, int H, int W) {
    __shared__ float tile[32][33];
    int L = H * W;
    int bc = blockIdx.z, b = bc / C, c = bc % C;
    int h0 = blockIdx.y * 32, w0 = blockIdx.x * 32;
    long long plane = (long long)C * L;
    const float* xm = x + (long long)bc * L;
    float* o0 = xs + (long long)b * 4 * plane + (long long)c * L;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int h = h0 + i, w = w0 + threadIdx.x;
        if (h < H && w < W) {
            float v = xm[h * W + w];
            tile[i][threadIdx.x] = v;
            o0[h * W + w] = v;
            o0[2 * plane + L - 1 - (h * W + w)] = v;
        }
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        int w = w0 + i, h = h0 + threadIdx.x;
        if (h < H && w < W) {
            float v = tile[threadIdx.x][i];
            o0[plane + w * H + h] = v;
            o0[3 * plane + L - 1 - (w * H + h)] = v;
        }
    }
}

__global__ void cross_merge_naive(const float* ys, float* y, int batch, int C, int H, int W) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int L = H * W;
    if (idx >= (long long)batch * C * L) return;
    int p = idx % L; long long bc = idx / L;
    int b = bc / C, c = bc % C, h = p / W, w = p % W;
    long long plane = (long long)C * L;
    const float* i0 = ys + (long long)b * 4 * plane + (long long)c * L;
    int q = w * H + h;
    y[idx] = i0[p] + i0[plane + q] + i0[2 * plane + L - 1 - p] + i0[3 * plane + L - 1 - q];
}

// cross merge, "tiled": directions 1 and 3 are read along h (coalesced) into a shared tile.
__global__ void cross_merge_tiled(const float* ys, float* y, int batch, int C, int H, int W) {
    __shared__ float tile[32][33];
    int L = H * W;
    int bc = blockIdx.z, b = bc / C, c = bc % C;
    int h0 = blockIdx.y * 32, w0 = blockIdx.x * 32;
    long long plane = (long long)C * L;
    const float* i0 = ys + (long long)b * 4 * plane + (long long)c * L;
    for (int i = threadIdx.y; i < 32; i += 8) {
        int w = w0 + i, h = h0 + threadIdx.x;
        if (h < H && w < W) {
            int q = w * H + h;
            tile[threadIdx.x][i] = i0[plane + q] + i0[3 * plane + L - 1 - q];
        }
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        int h = h0 + i, w = w0 + threadIdx.x;
        if (h < H && w < W) {
            int p = h * W + w;
            y[(long long)bc * L + p] = (i0[p] + i0[2 * plane + L - 1 - p]) + tile[i][threadIdx.x];
        }
    }
}

// Fused 2-D scan forward: one block of 2 warps per (batch, channel). The map is loaded once
// (coalesced) into shared memory with an odd row pitch P (conflict-free column reads). Warp 0
// scans directions 0 then 2 and accumulates straight into y (same warp: ordered by __syncwarp);
// warp 1 scans directions 1 then 3 into a shared buffer; then the block adds the buffer to y.
// Every y element is the same fixed-order sum (d0 + d2) + (d1 + d3): deterministic.
// Dynamic shared memory: 2 * H * P floats.
__global__ void ss2d_fwd_fused(const float* x, const float* delta, const float* A, const float* B,
                               const float* C, const float* D, const float* bias, float* y,
                               int batch, int Di, int H, int W, int P, int softplus) {
    extern __shared__ float smem[];
    float* xm = smem;
    float* ybuf = smem + H * P;
    int bc = blockIdx.x, b = bc / Di, c = bc % Di;
    int L = H * W;
    const float* xg = x + (long long)bc * L;
    float* yg = y + (long long)bc * L;
    load_map(xg, xm, H, W, P);
    __syncthreads();
    int warp = threadIdx.x >> 5;
    for (int pass = 0; pass < 2; ++pass) {
        int kdir = warp + 2 * pass;
        int ch = kdir * Di + c;
        long long off = ((long long)b * 4 * Di + ch) * L;
        long long goff = (long long)(b * 4 + kdir) * NSTATE * L;
        if (warp == 0)
            fwd_row(xm, P, delta + off, A + ch * NSTATE, B + goff, C + goff, D[ch], bias[ch],
                    softplus, yg, W, pass, kdir, H, W, nullptr);
        else
            fwd_row(xm, P, delta + off, A + ch * NSTATE, B + goff, C + goff, D[ch], bias[ch],
                    softplus, ybuf, P, pass, kdir, H, W, nullptr);
        __syncwarp();
    }
    __syncthreads();
    add_map(yg, ybuf, H, W, P);
}

// Fused 2-D scan backward: the same block layout. Shared memory: x, dy and warp 1's dx buffer
// (3 * H * P floats); warp 0 accumulates directions 0 and 2 straight into dx. ddelta is written
// in scan order; dB/dC are sums over the Di channels (other blocks): atomicAdd into zeroed
// dB/dC (their low bits depend on the order of the atomics; everything else is deterministic).
__global__ void ss2d_bwd_fused(const float* x, const float* dy, const float* delta, const float* A,
                               const float* B, const float* C, const float* D, const float* bias,
                               float* hstart, float* dx, float* ddelta, float* dB, float* dC,
                               float* partA, float* partD, float* partbias,
                               int batch, int Di, int H, int W, int P, int softplus) {
    extern __shared__ float smem[];
    float* xm = smem;
    float* dym = smem + H * P;
    float* dxbuf = smem + 2 * H * P;
    int bc = blockIdx.x, b = bc / Di, c = bc % Di;
    int L = H * W;
    int nrounds = (L + 32 * CHUNKS - 1) / (32 * CHUNKS);
    const float* xg = x + (long long)bc * L;
    const float* dyg = dy + (long long)bc * L;
    float* dxg = dx + (long long)bc * L;
    load_map(xg, xm, H, W, P);
    load_map(dyg, dym, H, W, P);
    __syncthreads();
    int warp = threadIdx.x >> 5;
    for (int pass = 0; pass < 2; ++pass) {
        int kdir = warp + 2 * pass;
        int ch = kdir * Di + c;
        int row = b * 4 * Di + ch;
        long long off = (long long)row * L;
        long long goff = (long long)(b * 4 + kdir) * NSTATE * L;
        float* hs = hstart + (long long)row * nrounds * NSTATE;
        fwd_row(xm, P, delta + off, A + ch * NSTATE, B + goff, C + goff, D[ch], bias[ch], softplus,
                nullptr, 0, 0, kdir, H, W, hs);
        __syncwarp();
        bwd_row(xm, P, dym, P, delta + off, A + ch * NSTATE, B + goff, C + goff, D[ch], bias[ch],
                softplus, kdir, H, W, 1, hs, warp == 0 ? dxg : dxbuf, warp == 0 ? W : P, pass,
                ddelta + off, nullptr, nullptr, nullptr, dB + goff, dC + goff,
                partA + (long long)row * NSTATE, partD + row, partbias + row);
        __syncwarp();
    }
    __syncthreads();
    add_map(dxg, dxbuf, H, W, P);
}

}  // extern "C"
"""

_VEC_KERNELS = r"""
// ===================================================================================
// Ladder rung "vec": a lane holds ITEMS consecutive time steps, so the warp scan (and its
// shuffles) runs once per ITEMS elements; loads and stores are 8/16-byte vectors when VEC.
// Compile-time constants (one module per combination the host meets):
//   ITEMS  steps per lane per round (2, 4 or 8);
//   SEG    lanes per row (32, 16 or 8): short rows put 32/SEG rows in one warp;
//   VEC    1: vector loads/stores (the host checked L % VW == 0 and 4*VW-byte aligned bases);
//          0: scalar loads of the same steps;
//   ONE_ROUND  1 when every row fits one round (L <= VROUND, e.g. L = 49): the round loops and
//          the registers of the next round's loads compile away.
// A round covers SEG*ITEMS steps of a row; lane sl of a segment holds steps
// base + sl*ITEMS + i, i < ITEMS.
// ===================================================================================
#ifndef ITEMS
#define ITEMS 4
#endif
#ifndef SEG
#define SEG 32
#endif
#ifndef VEC
#define VEC 1
#endif
#ifndef ONE_ROUND
#define ONE_ROUND 0   // 1: the host guarantees L <= VROUND: no next-round loads, no backward pass 1
#endif
#define VROUND (SEG * ITEMS)
#if ITEMS % 4 == 0
#define VW 4
#elif ITEMS % 2 == 0
#define VW 2
#else
#define VW 1
#endif

// v[i] = p[t0 + i], 0 past L. With VEC, L % VW == 0 and t0 % VW == 0: a vector is all in or all out.
__device__ __forceinline__ void vload(const float* __restrict__ p, int t0, int L, float (&v)[ITEMS]) {
#pragma unroll
    for (int q = 0; q < ITEMS; q += VW) {
        int t = t0 + q;
#if VEC && VW == 4
        float4 f = t < L ? *reinterpret_cast<const float4*>(p + t) : make_float4(0.f, 0.f, 0.f, 0.f);
        v[q] = f.x; v[q + 1] = f.y; v[q + 2] = f.z; v[q + 3] = f.w;
#elif VEC && VW == 2
        float2 f = t < L ? *reinterpret_cast<const float2*>(p + t) : make_float2(0.f, 0.f);
        v[q] = f.x; v[q + 1] = f.y;
#else
#pragma unroll
        for (int r = 0; r < VW; ++r) v[q + r] = (t + r < L) ? p[t + r] : 0.f;
#endif
    }
}

// p[t0 + i] = v[i] for t0 + i < L.
__device__ __forceinline__ void vstore(float* __restrict__ p, int t0, int L, const float (&v)[ITEMS]) {
#pragma unroll
    for (int q = 0; q < ITEMS; q += VW) {
        int t = t0 + q;
#if VEC && VW == 4
        if (t < L) *reinterpret_cast<float4*>(p + t) = make_float4(v[q], v[q + 1], v[q + 2], v[q + 3]);
#elif VEC && VW == 2
        if (t < L) *reinterpret_cast<float2*>(p + t) = make_float2(v[q], v[q + 1]);
#else
#pragma unroll
        for (int r = 0; r < VW; ++r) if (t + r < L) p[t + r] = v[q + r];
#endif
    }
}

// Inclusive scan over the SEG lanes of a segment of h -> a h + b (lane order = time order).
__device__ __forceinline__ void seg_scan_fwd(float &a, float &b, int sl) {
#pragma unroll
    for (int off = 1; off < SEG; off <<= 1) {
        float a_up = __shfl_up_sync(FULL_MASK, a, off);
        float b_up = __shfl_up_sync(FULL_MASK, b, off);
        if (sl >= off) { b = a * b_up + b; a = a * a_up; }
    }
}

// Inclusive suffix scan over the SEG lanes of a segment of g -> alpha g + beta.
__device__ __forceinline__ void seg_scan_rev(float &alpha, float &beta, int sl) {
#pragma unroll
    for (int off = 1; off < SEG; off <<= 1) {
        float a_dn = __shfl_down_sync(FULL_MASK, alpha, off);
        float b_dn = __shfl_down_sync(FULL_MASK, beta, off);
        if (sl + off < SEG) { beta = alpha * b_dn + beta; alpha = alpha * a_dn; }
    }
}

__device__ __forceinline__ float seg_sum(float v) {
#pragma unroll
    for (int off = SEG / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

// The per-step gates of one round for one lane: dt_i, a_i[n] = exp(dt_i A_n) (1 past L),
// b_i[n] = dt_i B_i[n] u_i (0 past L); then the lane's aggregate map (la, lb) = the ITEMS maps
// composed in time order.
__device__ __forceinline__ void vec_gates(const float (&uv)[ITEMS], const float (&zv)[ITEMS],
                                          const float (&Bv)[NSTATE][ITEMS], const float (&An)[NSTATE],
                                          float bias, int softplus, int t0, int L, float (&dtv)[ITEMS],
                                          float (&a)[NSTATE][ITEMS], float (&bb)[NSTATE][ITEMS]) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        bool valid = t0 + i < L;
        float z = zv[i] + bias;
        float dt = softplus ? softplus_f(z) : z;
        dtv[i] = dt;
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            a[n][i] = valid ? expf(dt * An[n]) : 1.f;
            bb[n][i] = valid ? dt * Bv[n][i] * uv[i] : 0.f;
        }
    }
}

// State entering this lane's first step, given the state `carry` entering the round; carry
// becomes the state leaving the round. (Lane aggregate, segment scan, one shfl_up.)
__device__ __forceinline__ float vec_lane_entry(const float (&a)[ITEMS], const float (&bb)[ITEMS],
                                                float &carry, int sl, int seg0) {
    float la = a[0], lb = bb[0];
#pragma unroll
    for (int i = 1; i < ITEMS; ++i) { lb = a[i] * lb + bb[i]; la = a[i] * la; }
    seg_scan_fwd(la, lb, sl);
    float hincl = la * carry + lb;                     // state after this lane's last step
    float hin = __shfl_up_sync(FULL_MASK, hincl, 1);
    if (sl == 0) hin = carry;
    carry = __shfl_sync(FULL_MASK, hincl, seg0 + SEG - 1);
    return hin;
}

__device__ __forceinline__ void vec_load_round(const float* __restrict__ u, const float* __restrict__ delta,
                                               const float* __restrict__ Bg, const float* __restrict__ Cg,
                                               int t0, int L, float (&uv)[ITEMS], float (&zv)[ITEMS],
                                               float (&Bv)[NSTATE][ITEMS], float (&Cv)[NSTATE][ITEMS], int withC) {
    vload(u, t0, L, uv);
    vload(delta, t0, L, zv);
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        vload(Bg + (long long)n * L, t0, L, Bv[n]);
        if (withC) vload(Cg + (long long)n * L, t0, L, Cv[n]);
    }
}

extern "C" {

// Forward, SEG lanes per (batch, channel) row (32/SEG rows per warp). Per round: gates, the
// lane's ITEMS maps composed, a segment scan of the lane aggregates, then each lane walks its
// ITEMS steps from its entry state. The next round's loads are issued before this round's
// arithmetic (two rounds of loads in flight). Idle segments (row >= batch*KD) compute a copy of
// the last row and store nothing: every lane of a warp reaches every shuffle.
__global__ void scan_fwd_vec(const float* __restrict__ u, const float* __restrict__ delta,
                             const float* __restrict__ A, const float* __restrict__ B,
                             const float* __restrict__ C, const float* __restrict__ D,
                             const float* __restrict__ bias, float* __restrict__ y,
                             int batch, int KD, int L, int K, int softplus) {
    const int lane = threadIdx.x & 31, sl = lane & (SEG - 1), seg0 = lane - sl;
    const int nrows = batch * KD;
    int row = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / SEG);
    const bool active = row < nrows;
    if (!active) row = nrows - 1;
    const int b = row / KD, c = row % KD, k = c / (KD / K);
    const long long off = (long long)row * L;
    const long long goff = (long long)(b * K + k) * NSTATE * L;
    float An[NSTATE], carry[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { An[n] = A[c * NSTATE + n]; carry[n] = 0.f; }
    const float Dc = D[c], bc = bias[c];
    float uv[ITEMS], zv[ITEMS], Bv[NSTATE][ITEMS], Cv[NSTATE][ITEMS];     // this round
    float uq[ITEMS], zq[ITEMS], Bq[NSTATE][ITEMS], Cq[NSTATE][ITEMS];     // next round, in flight
    vec_load_round(u + off, delta + off, B + goff, C + goff, sl * ITEMS, L, uv, zv, Bv, Cv, 1);
    for (int base = 0; base < L; base += VROUND) {
        const int t0 = base + sl * ITEMS;
        const bool more = !ONE_ROUND && base + VROUND < L;
        if (more) vec_load_round(u + off, delta + off, B + goff, C + goff, t0 + VROUND, L, uq, zq, Bq, Cq, 1);
        float dtv[ITEMS], a[NSTATE][ITEMS], bb[NSTATE][ITEMS], yv[ITEMS];
        vec_gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) yv[i] = Dc * uv[i];
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            float h = vec_lane_entry(a[n], bb[n], carry[n], sl, seg0);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) { h = a[n][i] * h + bb[n][i]; yv[i] += Cv[n][i] * h; }
        }
        if (active) vstore(y + off, t0, L, yv);
        if (more) {
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                uv[i] = uq[i]; zv[i] = zq[i];
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) { Bv[n][i] = Bq[n][i]; Cv[n][i] = Cq[n][i]; }
            }
        }
    }
}

// Backward, the "warp" backward's two passes with ITEMS steps per lane. Grid
// (ceil(Dg / rows per block), K, batch); a block's rows (blockDim.x / SEG of them) are
// consecutive channels of one group, so dB/dC are summed over them in shared memory
// (sred: [row slot][2][NSTATE][VROUND]) and written as per-block partials (sum_middle adds
// them). Pass 1 stores the state entering each round (hstart); pass 2 walks the rounds
// backwards: states recomputed from hstart, then a segment suffix scan of the adjoint
// g_t = a_{t+1} g_{t+1} + C_t dy_t over the lane aggregates.
__global__ void scan_bwd_vec(const float* __restrict__ u, const float* __restrict__ delta,
                             const float* __restrict__ A, const float* __restrict__ B,
                             const float* __restrict__ C, const float* __restrict__ D,
                             const float* __restrict__ bias, const float* __restrict__ dy,
                             float* __restrict__ hstart, float* __restrict__ du, float* __restrict__ ddelta,
                             float* __restrict__ partB, float* __restrict__ partC, float* __restrict__ partA,
                             float* __restrict__ partD, float* __restrict__ partbias,
                             int batch, int KD, int L, int K, int softplus) {
    extern __shared__ float sred[];
    const int lane = threadIdx.x & 31, sl = lane & (SEG - 1), seg0 = lane - sl;
    const int slot = threadIdx.x / SEG, nslots = blockDim.x / SEG;
    const int Dg = KD / K, k = blockIdx.y, b = blockIdx.z;
    const int ci = blockIdx.x * nslots + slot;
    const bool active = ci < Dg;
    const int c = k * Dg + (active ? ci : 0);
    const int row = b * KD + c;
    const long long off = (long long)row * L;
    const long long goff = (long long)(b * K + k) * NSTATE * L;
    const int nrounds = ONE_ROUND ? 1 : (L + VROUND - 1) / VROUND;
    float* hs = hstart + (long long)row * nrounds * NSTATE;
    float An[NSTATE], carry[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { An[n] = A[c * NSTATE + n]; carry[n] = 0.f; }
    const float Dc = D[c], bc = bias[c];
    float uv[ITEMS], zv[ITEMS], dyv[ITEMS], Bv[NSTATE][ITEMS], Cv[NSTATE][ITEMS];
    float uq[ITEMS], zq[ITEMS], dyq[ITEMS], Bq[NSTATE][ITEMS], Cq[NSTATE][ITEMS];
    float dtv[ITEMS], a[NSTATE][ITEMS], bb[NSTATE][ITEMS];

    // pass 1: the state entering every round (u, delta, B only; next round's loads in flight).
    // The last round's gates are never needed here (no round follows it), so a row of a single
    // round (L <= VROUND, e.g. L = 49) does no pass-1 loads or arithmetic at all; with ONE_ROUND
    // pass 1 is compiled out (the one round starts from h = 0).
    if (nrounds > 1) vec_load_round(u + off, delta + off, B + goff, C + goff, sl * ITEMS, L, uv, zv, Bv, Cv, 0);
    for (int s = 0; s < (ONE_ROUND ? 0 : nrounds); ++s) {
        const int t0 = s * VROUND + sl * ITEMS;
        if (active && sl == 0) {
#pragma unroll
            for (int n = 0; n < NSTATE; ++n) hs[s * NSTATE + n] = carry[n];
        }
        if (s == nrounds - 1) break;
        const bool more = s + 2 < nrounds;     // round s + 1 is needed unless it is the last
        if (more) vec_load_round(u + off, delta + off, B + goff, C + goff, t0 + VROUND, L, uq, zq, Bq, Cq, 0);
        vec_gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb);
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) vec_lane_entry(a[n], bb[n], carry[n], sl, seg0);
        if (more) {
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                uv[i] = uq[i]; zv[i] = zq[i];
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) Bv[n][i] = Bq[n][i];
            }
        }
    }
    __syncwarp();     // hstart written by lane 0 of the segment is read by all its lanes below

    // pass 2: rounds last to first
    float gcarry[NSTATE], anext[NSTATE], dA_acc[NSTATE];
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) { gcarry[n] = 0.f; anext[n] = 0.f; dA_acc[n] = 0.f; }
    float dD_acc = 0.f, dbias_acc = 0.f;
    {
        const int t0 = (nrounds - 1) * VROUND + sl * ITEMS;
        vec_load_round(u + off, delta + off, B + goff, C + goff, t0, L, uv, zv, Bv, Cv, 1);
        vload(dy + off, t0, L, dyv);
    }
    for (int s = nrounds - 1; s >= 0; --s) {
        const int base = s * VROUND, t0 = base + sl * ITEMS;
        const bool more = !ONE_ROUND && s > 0;
        if (more) {
            vec_load_round(u + off, delta + off, B + goff, C + goff, t0 - VROUND, L, uq, zq, Bq, Cq, 1);
            vload(dy + off, t0 - VROUND, L, dyq);
        }
        // forward recompute: gates, and hh[n][i] = state before step i (hh[n][ITEMS]: after the last)
        vec_gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb);
        float hh[NSTATE][ITEMS + 1];
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            float cin = (ONE_ROUND || !active) ? 0.f : hs[s * NSTATE + n];
            float h = vec_lane_entry(a[n], bb[n], cin, sl, seg0);
            hh[n][0] = h;
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) { h = a[n][i] * h + bb[n][i]; hh[n][i + 1] = h; }
        }
        // adjoint: g_t = alpha_t g_{t+1} + beta_t with alpha_t = a_{t+1}, beta_t = C_t dy_t
        float duv[ITEMS], ddt[ITEMS], cb[NSTATE][ITEMS], cc[NSTATE][ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) { duv[i] = Dc * dyv[i]; ddt[i] = 0.f; }
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            float a_after = __shfl_down_sync(FULL_MASK, a[n][0], 1);    // gate of the next lane's first step
            if (sl == SEG - 1) a_after = anext[n];
            float la = 1.f, lb = 0.f;            // this lane's maps composed, last step first
#pragma unroll
            for (int i = ITEMS - 1; i >= 0; --i) {
                float alpha = (i == ITEMS - 1) ? a_after : a[n][i + 1];
                lb = alpha * lb + dyv[i] * Cv[n][i];
                la = alpha * la;
            }
            seg_scan_rev(la, lb, sl);
            float gincl = la * gcarry[n] + lb;                        // g at this lane's first step
            float g = __shfl_down_sync(FULL_MASK, gincl, 1);           // g at the next lane's first step
            if (sl == SEG - 1) g = gcarry[n];
            gcarry[n] = __shfl_sync(FULL_MASK, gincl, seg0);
            anext[n] = __shfl_sync(FULL_MASK, a[n][0], seg0);
#pragma unroll
            for (int i = ITEMS - 1; i >= 0; --i) {
                float alpha = (i == ITEMS - 1) ? a_after : a[n][i + 1];
                g = alpha * g + dyv[i] * Cv[n][i];                     // dL/dh_t
                float ga = g * hh[n][i] * a[n][i];
                duv[i] += g * dtv[i] * Bv[n][i];
                ddt[i] += g * Bv[n][i] * uv[i] + ga * An[n];
                dA_acc[n] += (t0 + i < L) ? ga * dtv[i] : 0.f;
                cb[n][i] = g * dtv[i] * uv[i];
                cc[n][i] = dyv[i] * hh[n][i + 1];
            }
        }
        float dzv[ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            bool valid = t0 + i < L;
            float dz = softplus ? ddt[i] * dsoftplus_f(zv[i] + bc) : ddt[i];
            dzv[i] = dz;
            if (valid) { dbias_acc += dz; dD_acc += dyv[i] * uv[i]; }
        }
        if (active) { vstore(du + off, t0, L, duv); vstore(ddelta + off, t0, L, dzv); }
        // dB/dC: this row's contributions to shared memory, summed over the block's rows
#pragma unroll
        for (int n = 0; n < NSTATE; ++n) {
            float* sb = sred + ((slot * 2 + 0) * NSTATE + n) * VROUND + sl * ITEMS;
            float* sc = sred + ((slot * 2 + 1) * NSTATE + n) * VROUND + sl * ITEMS;
#pragma unroll
            for (int q = 0; q < ITEMS; q += VW) {
#if VW == 4
                *reinterpret_cast<float4*>(sb + q) = make_float4(cb[n][q], cb[n][q + 1], cb[n][q + 2], cb[n][q + 3]);
                *reinterpret_cast<float4*>(sc + q) = make_float4(cc[n][q], cc[n][q + 1], cc[n][q + 2], cc[n][q + 3]);
#else
#pragma unroll
                for (int r = 0; r < VW; ++r) { sb[q + r] = cb[n][q + r]; sc[q + r] = cc[n][q + r]; }
#endif
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < NSTATE * VROUND; e += blockDim.x) {
            int n = e / VROUND, t = base + e % VROUND;
            if (t < L) {
                float sbv = 0.f, scv = 0.f;
                for (int q = 0; q < nslots; ++q) {
                    if (blockIdx.x * nslots + q < Dg) {        // idle rows hold copies: skip them
                        sbv += sred[((q * 2 + 0) * NSTATE + n) * VROUND + e % VROUND];
                        scv += sred[((q * 2 + 1) * NSTATE + n) * VROUND + e % VROUND];
                    }
                }
                long long poff = ((long long)(b * K + k) * gridDim.x + blockIdx.x) * NSTATE * L;
                partB[poff + (long long)n * L + t] = sbv;
                partC[poff + (long long)n * L + t] = scv;
            }
        }
        __syncthreads();
        if (more) {
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                uv[i] = uq[i]; zv[i] = zq[i]; dyv[i] = dyq[i];
#pragma unroll
                for (int n = 0; n < NSTATE; ++n) { Bv[n][i] = Bq[n][i]; Cv[n][i] = Cq[n][i]; }
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NSTATE; ++n) {
        float v = seg_sum(dA_acc[n]);
        if (active && sl == 0) partA[(long long)row * NSTATE + n] = v;
    }
    dD_acc = seg_sum(dD_acc);
    dbias_acc = seg_sum(dbias_acc);
    if (active && sl == 0) { partD[row] = dD_acc; partbias[row] = dbias_acc; }
}

}  // extern "C"
"""
CUDA_SOURCES = {"scan": _SCAN_PRELUDE + _SCAN_KERNELS, "scan_vec": _SCAN_PRELUDE + _VEC_KERNELS}

NVRTC_OPTIONS = ("-DNSTATE=1", "-DCHUNKS=4")

FWD_WARPS = 8          # warps per block of scan_fwd_warp (one row each)
FWD_CHUNKS = 4         # 32-step chunks per round (loads in flight per lane)
BWD_WARPS = 8          # channels per block of scan_bwd_warp (dB/dC reduced over them)
BWD_CHUNKS = 4
FUSED_CHUNKS = 8       # the fused kernels have only 2 warps per block: more loads per warp
VEC_WARPS = 8          # warps per block of the vec kernels (SEG lanes per row: 32/SEG rows a warp)
_MODULES: dict = {}


def _cp():
    import cupy
    return cupy


def _module(nstate: int, chunks: int):
    key = (int(nstate), int(chunks))
    if key not in _MODULES:
        cp = _cp()
        _MODULES[key] = cp.RawModule(code=CUDA_SOURCES["scan"],
                                     options=(f"-DNSTATE={key[0]}", f"-DCHUNKS={key[1]}"))
    return _MODULES[key]


def _kernel(name, nstate=1, chunks=4, shared=0):
    k = _module(nstate, chunks).get_function(name)
    if shared > 48 * 1024 and k.max_dynamic_shared_size_bytes < shared:
        k.max_dynamic_shared_size_bytes = shared
    return k


def _vec_kernel(name, nstate, seg, items, vec, shared=0, one_round=False):
    """A kernel of CUDA_SOURCES["scan_vec"] compiled for (N, SEG, ITEMS, VEC, ONE_ROUND) (cached)."""
    key = ("vec", int(nstate), int(seg), int(items), int(vec), int(one_round))
    if key not in _MODULES:
        _MODULES[key] = _cp().RawModule(code=CUDA_SOURCES["scan_vec"], options=(
            f"-DNSTATE={key[1]}", f"-DSEG={key[2]}", f"-DITEMS={key[3]}", f"-DVEC={key[4]}",
            f"-DONE_ROUND={key[5]}"))
    k = _MODULES[key].get_function(name)
    if shared > 48 * 1024 and k.max_dynamic_shared_size_bytes < shared:
        k.max_dynamic_shared_size_bytes = shared
    return k


def vec_layout(L: int) -> tuple[int, int]:
    """(SEG, ITEMS) of the "vec" kernels for rows of length L: SEG lanes per row, ITEMS steps
    per lane, so a round covers SEG*ITEMS steps. Rows of at most 32 or 64 steps share a warp
    (4 or 2 rows per warp) instead of leaving most of its lanes idle."""
    if L <= 32:
        return 8, 4
    if L <= 64:
        return 16, 4
    return 32, 4


def _base_address(a) -> int:
    """Data address of a CuPy array, a Numba device array or (CPU stand-ins) a NumPy array.
    The cheap attributes first: ``__cuda_array_interface__`` builds a dict per access, which
    costs microseconds a call at L = 49 where the kernel itself runs ~40 us."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)          # CuPy MemoryPointer
    if ptr is not None:
        return int(ptr)
    dev = getattr(a, "device_ctypes_pointer", None)               # Numba device array
    if dev is not None:
        return int(dev.value or 0)
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return int(iface["data"][0])


def _vec_width(items: int) -> int:
    """Floats per vector load of the vec kernels with ITEMS steps per lane."""
    return 4 if items % 4 == 0 else (2 if items % 2 == 0 else 1)


def vec_loads_ok(L: int, items: int, *arrays) -> bool:
    """True when the vec kernels may use vector loads: L a multiple of the vector width and
    every base address aligned to it (then every row of u/delta/B/C/y starts aligned too)."""
    width = _vec_width(items)
    return L % width == 0 and all(_base_address(a) % (4 * width) == 0 for a in arrays if a is not None)


def _max_shared() -> int:
    cp = _cp()
    dev = cp.cuda.Device()
    return int(dev.attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))


def _empty(shape):
    cp = _cp()
    return cp.full(shape, np.nan, np.float32) if poisoning() else cp.empty(shape, np.float32)


def _plan_empty(shape, dtype):
    """:func:`_empty` with the signature plans allocate through (the dtype is always float32 here)."""
    return _empty(shape)


def _dev(x):
    """A C-contiguous CuPy view of x (CuPy or __cuda_array_interface__), no copy if possible."""
    cp = _cp()
    return cp.ascontiguousarray(cp.asarray(x))


def _or_zeros(v, n):
    cp = _cp()
    return cp.zeros(n, np.float32) if v is None else _dev(v)


def _i(v):
    return np.int32(v)


def _sum_middle_launch(jobs):
    """The launch of sum_middle for jobs [(part, out, outer, P, inner)] (at most five; part and
    out buffer names): out[o*inner + i] = sum_p part[(o*P + p)*inner + i] for every job at once."""
    total = sum(outer * inner for _, _, outer, _, inner in jobs)
    pad = 5 - len(jobs)                                      # unused slots: never read or written
    names = [name for part, out, *_ in jobs for name in (part, out)] + [jobs[0][1]] * (2 * pad)
    dims = [_i(d) for *_, outer, P, inner in jobs for d in (outer, P, inner)] + [_i(0)] * (3 * pad)
    return Launch(_kernel("sum_middle"), ((total + 255) // 256,), (256,), (*names, _i(len(jobs)), *dims))


def _sum_middle(jobs):
    """[out_j (outer_j*inner_j,)] for jobs [(part_j, outer_j, P_j, inner_j)] (at most five):
    out_j[o*inner_j + i] = sum_p part_j[(o*P_j + p)*inner_j + i], all in one launch, the outputs
    views of one allocation."""
    sizes = [outer * inner for _, outer, _, inner in jobs]
    buf = _empty((max(sum(sizes), 1),))
    starts = np.cumsum([0] + sizes)
    outs = [buf[a:b] for a, b in zip(starts[:-1], starts[1:])]
    given = {f"{kind}{j}": a for j, (job, out) in enumerate(zip(jobs, outs)) for kind, a in (("part", job[0]), ("out", out))}
    launch = _sum_middle_launch([(f"part{j}", f"out{j}", outer, P, inner)
                                 for j, (_, outer, P, inner) in enumerate(jobs)])
    run_on_cupy(Plan(np.dtype(np.float32), (), (launch,)), given, _plan_empty)
    return outs


def _parameter_grads(batch, KD, N, D, bias, partA, partD, partbias, B_C=None):
    """{"A": (KD, N), "D": (KD,) or None, "delta_bias": (KD,) or None} summed over the batch,
    and, with B_C = (partB, partC, outer, nblk, inner, shape), "B" and "C" summed over the nblk
    channel blocks: one sum_middle launch for all of them (fixed order: deterministic)."""
    jobs = [("A", partA, 1, batch, KD * N, (KD, N))]
    jobs += [(name, part, 1, batch, KD, (KD,)) for name, part, given in (("D", partD, D), ("delta_bias", partbias, bias))
             if given is not None]
    if B_C is not None:
        partB, partC, outer, nblk, inner, shape = B_C
        jobs += [("B", partB, outer, nblk, inner, shape), ("C", partC, outer, nblk, inner, shape)]
    sums = _sum_middle([job[1:5] for job in jobs])
    out = {"D": None, "delta_bias": None}
    out.update({job[0]: r.reshape(job[5]) for job, r in zip(jobs, sums)})
    return out


# ---------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------
def _scan_fwd(version, u, delta, A, B, C, D, delta_bias, delta_softplus):
    batch, KD, L, K, N, _ = scan_shapes(u, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="cupy")
    args = [_dev(u), _dev(delta), _dev(A), _dev(B), _dev(C), _or_zeros(D, KD), _or_zeros(delta_bias, KD)]
    y = _empty((batch, KD, L))
    rows = batch * KD
    tail = (y, _i(batch), _i(KD), _i(L), _i(K), _i(bool(delta_softplus)))
    if version == "naive":
        _kernel("scan_fwd_naive", N)(((rows + 127) // 128,), (128,), (*args, *tail))
    elif version == "vec":
        seg, items = vec_layout(L)
        vec = vec_loads_ok(L, items, *args[:5], y)
        rows_per_block = VEC_WARPS * 32 // seg
        _vec_kernel("scan_fwd_vec", N, seg, items, vec, one_round=L <= seg * items)(
            ((rows + rows_per_block - 1) // rows_per_block,), (32 * VEC_WARPS,), (*args, *tail))
    else:
        _kernel("scan_fwd_warp", N, FWD_CHUNKS)(((rows + FWD_WARPS - 1) // FWD_WARPS,), (32 * FWD_WARPS,),
                                                (*args, *tail))
    return y, scan_cache(u, delta, A, B, C, D, delta_bias, delta_softplus, (batch, KD, L, K, N))


def _scan_grads(du, ddelta, partA, partB, partC, partD, partbias, shape, nblk, D, bias):
    """The backward's gradient dict: du, ddelta as written; dA, dD, ddelta_bias summed over the
    batch and dB, dC over the nblk channel blocks of each group (sum_middle, fixed order)."""
    batch, KD, L, K, N = shape
    return {"u": du, "delta": ddelta, **_parameter_grads(
        batch, KD, N, D, bias, partA, partD, partbias, B_C=(partB, partC, batch * K, nblk, N * L, (batch, K, N, L)))}


def selective_scan_fwd_naive(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Ladder rung "naive": one thread per (batch, channel) row (uncoalesced loads)."""
    return _scan_fwd("naive", u, delta, A, B, C, D, delta_bias, delta_softplus)


def selective_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan forward, one warp per row with a warp-shuffle scan (rung "warp"). Returns
    ``(y, cache)``; see :func:`sparx_ref.ref.scan.selective_scan_fwd`."""
    return _scan_fwd("warp", u, delta, A, B, C, D, delta_bias, delta_softplus)


def selective_scan_fwd_vec(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Ladder rung "vec": a lane holds ITEMS consecutive steps (vector loads), the warp scan runs
    over lane aggregates, short rows share a warp (:func:`vec_layout`)."""
    return _scan_fwd("vec", u, delta, A, B, C, D, delta_bias, delta_softplus)


def selective_scan_bwd(dy, cache):
    """Backward of :func:`selective_scan_fwd`: dict keyed u, delta, A, B, C, D, delta_bias."""
    cp = _cp()
    batch, KD, L, K, N = cache["shape"]
    check_dy("dy", dy, (batch, KD, L), np.float32)
    Dg = KD // K
    nblk = (Dg + BWD_WARPS - 1) // BWD_WARPS
    nrounds = (L + 32 * BWD_CHUNKS - 1) // (32 * BWD_CHUNKS)
    D, bias = cache["D"], cache["delta_bias"]
    hstart = cp.empty((batch * KD * nrounds * N,), np.float32)
    du, ddelta = _empty((batch, KD, L)), _empty((batch, KD, L))
    partB, partC = _empty((batch * K * nblk * N * L,)), _empty((batch * K * nblk * N * L,))
    partA, partD, partbias = _empty((batch * KD * N,)), _empty((batch * KD,)), _empty((batch * KD,))
    shared = BWD_WARPS * 2 * BWD_CHUNKS * 32 * N * 4
    k = _kernel("scan_bwd_warp", N, BWD_CHUNKS, shared)
    k((nblk, K, batch), (32 * BWD_WARPS,),
      (_dev(cache["u"]), _dev(cache["delta"]), _dev(cache["A"]), _dev(cache["B"]), _dev(cache["C"]),
       _or_zeros(D, KD), _or_zeros(bias, KD), _dev(dy), hstart, du, ddelta, partB, partC, partA, partD,
       partbias, _i(batch), _i(KD), _i(L), _i(K), _i(bool(cache["delta_softplus"]))),
      shared_mem=shared)
    return _scan_grads(du, ddelta, partA, partB, partC, partD, partbias, cache["shape"], nblk, D, bias)


def _scan_bwd_vec_parts(shape, delta_softplus, vec, names):
    """(buffers, launch, nblk) of the vec backward kernel for shape (batch, KD, L, K, N);
    ``names`` maps the kernel's array parameters (u, delta, A, B, C, D, delta_bias, dy and the
    outputs du, ddelta, partB, partC, partA, partD, partbias) to buffer names. The buffers are
    the outputs and the round-entry states (named by ``names`` too, "hstart")."""
    batch, KD, L, K, N = shape
    seg, items = vec_layout(L)
    slots = VEC_WARPS * 32 // seg                 # rows (channels of one group) per block
    nblk = (KD // K + slots - 1) // slots
    nrounds = (L + seg * items - 1) // (seg * items)
    shared = slots * 2 * N * seg * items * 4
    buffers = ((names["hstart"], (batch * KD * nrounds * N,)), (names["du"], (batch, KD, L)),
               (names["ddelta"], (batch, KD, L)), (names["partB"], (batch * K * nblk * N * L,)),
               (names["partC"], (batch * K * nblk * N * L,)), (names["partA"], (batch * KD * N,)),
               (names["partD"], (batch * KD,)), (names["partbias"], (batch * KD,)))
    k = _vec_kernel("scan_bwd_vec", N, seg, items, vec, shared, one_round=nrounds == 1)
    args = tuple(names[n] for n in ("u", "delta", "A", "B", "C", "D", "delta_bias", "dy", "hstart", "du", "ddelta",
                                    "partB", "partC", "partA", "partD", "partbias"))
    launch = Launch(k, (nblk, K, batch), (32 * VEC_WARPS,),
                    args + (_i(batch), _i(KD), _i(L), _i(K), _i(bool(delta_softplus))), shared_mem=shared)
    return buffers, launch, nblk


_SCAN_BWD_NAMES = {n: n for n in ("u", "delta", "A", "B", "C", "D", "delta_bias", "dy", "hstart", "du", "ddelta",
                                  "partB", "partC", "partA", "partD", "partbias")}


def selective_scan_bwd_vec(dy, cache):
    """Ladder rung "vec" of the backward: the "warp" backward's two passes with ITEMS steps per
    lane; dB/dC summed over the block's rows in shared memory (deterministic, no atomics)."""
    batch, KD, L, K, N = cache["shape"]
    check_dy("dy", dy, (batch, KD, L), np.float32)
    seg, items = vec_layout(L)
    D, bias = cache["D"], cache["delta_bias"]
    given = {name: _dev(cache[name]) for name in ("u", "delta", "A", "B", "C")}
    given.update(D=_or_zeros(D, KD), delta_bias=_or_zeros(bias, KD), dy=_dev(dy))
    # the outputs du, ddelta are fresh allocations (aligned): only the inputs decide
    vec = vec_loads_ok(L, items, *(given[n] for n in ("u", "delta", "B", "C", "dy")))
    buffers, launch, nblk = _scan_bwd_vec_parts(cache["shape"], cache["delta_softplus"], vec, _SCAN_BWD_NAMES)
    bufs = run_on_cupy(Plan(np.dtype(np.float32), buffers, (launch,)), given, _plan_empty)
    return _scan_grads(bufs["du"], bufs["ddelta"], bufs["partA"], bufs["partB"], bufs["partC"], bufs["partD"],
                       bufs["partbias"], cache["shape"], nblk, D, bias)


# ---------------------------------------------------------------------------------------
# cross scan / cross merge
# ---------------------------------------------------------------------------------------
def _check_map(x):
    if not hasattr(x, "shape") or len(x.shape) != 4:
        raise ValueError(f"x must have 4 dimensions (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    check_dtype(x.dtype, (np.float32,), "cupy")
    return tuple(int(s) for s in x.shape)


def _launch_2d_spec(name, src, dst, batch, C, H, W, version):
    """The Launch of cross_scan / cross_merge (``name``) from buffer ``src`` into ``dst``."""
    if version == "tiled" and batch * C <= 65535:
        return Launch(_kernel(name + "_tiled"), ((W + 31) // 32, (H + 31) // 32, batch * C), (32, 8),
                      (src, dst, _i(batch), _i(C), _i(H), _i(W)))
    total = batch * C * H * W
    return Launch(_kernel(name + "_naive"), ((total + 255) // 256,), (256,), (src, dst, _i(batch), _i(C), _i(H), _i(W)))


@plan_cache
def cross_scan_plan(version, dims):
    """The :class:`._plan.Plan` of a cross-scan of a (batch, C, H, W) = dims map: input "x",
    output buffer "xs" (batch, 4, C, H*W)."""
    batch, C, H, W = dims
    return Plan(np.dtype(np.float32), (("xs", (batch, K_DIRECTIONS, C, H * W)),),
                (_launch_2d_spec("cross_scan", "x", "xs", batch, C, H, W, version),))


@plan_cache
def cross_merge_plan(version, dims):
    """The plan of a cross-merge into a (batch, C, H, W) = dims map: input "ys"
    (batch, 4, C, H*W), output buffer "y" (batch, C, H, W)."""
    batch, C, H, W = dims
    return Plan(np.dtype(np.float32), (("y", (batch, C, H, W)),),
                (_launch_2d_spec("cross_merge", "ys", "y", batch, C, H, W, version),))


def _cross_scan(x, version):
    dims = _check_map(x)
    return run_on_cupy(cross_scan_plan(version, dims), {"x": _dev(x)}, _plan_empty)["xs"]


def _cross_merge(ys, H, W, version):
    dims = check_merge_shapes(ys, H, W)
    check_dtype(ys.dtype, (np.float32,), "cupy")
    return run_on_cupy(cross_merge_plan(version, dims), {"ys": _dev(ys)}, _plan_empty)["y"]


@replayable(functools.partial(cross_scan_plan, "naive"))
def cross_scan_naive(x):
    """Ladder rung "naive": one thread per element; directions 1/3 written uncoalesced."""
    return _cross_scan(x, "naive")


@replayable(functools.partial(cross_scan_plan, "tiled"))
def cross_scan(x):
    """``x (B, C, H, W)`` -> ``(B, 4, C, H*W)`` through 32x32 shared tiles (default)."""
    return _cross_scan(x, "tiled")


@replayable(functools.partial(cross_merge_plan, "naive"))
def cross_merge_naive(ys, H, W):
    """Ladder rung "naive": one thread per output element; directions 1/3 read uncoalesced."""
    return _cross_merge(ys, H, W, "naive")


@replayable(functools.partial(cross_merge_plan, "tiled"))
def cross_merge(ys, H, W):
    """``ys (B, 4, C, H*W)`` -> ``(B, C, H, W)`` through 32x32 shared tiles (default)."""
    return _cross_merge(ys, H, W, "tiled")


# ---------------------------------------------------------------------------------------
# 2-D scan
# ---------------------------------------------------------------------------------------
def _pitch(W):
    return W | 1            # odd row pitch: column reads hit 32 different banks


def ss2d_scan_fwd_composed(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Ladder rung "composed": cross_scan, selective_scan_fwd_vec and cross_merge kernels in turn
    (the released code's three passes; the (batch, 4, Di, L) intermediates go through memory)."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="cupy")
    xs = cross_scan(x).reshape(batch, K_DIRECTIONS * Di, H * W)
    ys, _ = selective_scan_fwd_vec(xs, delta, A, B, C, D, delta_bias, delta_softplus)
    y = cross_merge(ys.reshape(batch, K_DIRECTIONS, Di, H * W), H, W)
    return y, scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N))


def composed_bwd_plan(dims, delta_softplus, has_D, has_bias, aligned):
    """The :class:`._plan.Plan` of the "composed" backward. dims = (batch, Di, H, W, N); inputs
    "x" (the forward's map), "delta", "A", "B", "C", "D" and "delta_bias" (if given; zeros stand
    in otherwise) and "dy" (batch, Di, H, W); output buffers "dx", "ddelta", "dA", "dB", "dC" and,
    if given, "dD", "ddelta_bias", shaped like their inputs. ``aligned``: delta, B and C start on
    16-byte boundaries (the other arrays the kernels read are the plan's own buffers)."""
    return _composed_bwd_plan(tuple(int(d) for d in dims), bool(delta_softplus), bool(has_D), bool(has_bias),
                              bool(aligned))


@plan_cache
def _composed_bwd_plan(dims, delta_softplus, has_D, has_bias, aligned):
    batch, Di, H, W, N = dims
    K, KD, L = K_DIRECTIONS, K_DIRECTIONS * Di, H * W
    _, items = vec_layout(L)
    names = dict(_SCAN_BWD_NAMES, u="xs", dy="dys", A="A", D="D" if has_D else "D0",
                 delta_bias="delta_bias" if has_bias else "delta_bias0")
    scan_buffers, scan_launch, nblk = _scan_bwd_vec_parts(
        (batch, KD, L, K, N), delta_softplus, aligned and L % _vec_width(items) == 0, names)
    # the parameter gradients: A, D and delta_bias summed over the batch, B and C over the nblk
    # channel blocks of each direction (fixed order: deterministic)
    jobs = [("partA", "dA", 1, batch, KD * N)]
    jobs += [(part, out, 1, batch, KD) for part, out, given in (("partD", "dD", has_D), ("partbias", "ddelta_bias", has_bias))
             if given]
    jobs += [("partB", "dB", batch * K, nblk, N * L), ("partC", "dC", batch * K, nblk, N * L)]
    zeroed = [name for name, given in (("D0", has_D), ("delta_bias0", has_bias)) if not given]
    # everything but the gradients is scratch (one allocation): the cross-scanned x and dy, the
    # scan's round-entry states, du and the partial sums
    scratch = (("xs", (batch, KD, L)), ("dys", (batch, KD, L))) + tuple(b for b in scan_buffers if b[0] != "ddelta")
    buffers = tuple(b for b in scan_buffers if b[0] == "ddelta") + (
        ("dA", (KD, N)), ("dB", (batch, K, N, L)), ("dC", (batch, K, N, L)), ("dx", (batch, Di, H, W)))
    buffers += tuple((out, (KD,)) for _, out, *_ in jobs[1:-2]) + tuple((z, (KD,)) for z in zeroed)
    launches = (_launch_2d_spec("cross_scan", "x", "xs", batch, Di, H, W, "tiled"),
                _launch_2d_spec("cross_scan", "dy", "dys", batch, Di, H, W, "tiled"),
                scan_launch,
                _sum_middle_launch(jobs),
                _launch_2d_spec("cross_merge", "du", "dx", batch, Di, H, W, "tiled"))
    return Plan(np.dtype(np.float32), buffers, launches, frozenset(zeroed), scratch)


@replayable(composed_bwd_plan)
def ss2d_scan_bwd_composed(dy, cache):
    """Ladder rung "composed" of the backward: cross_scan(dy) + scan backward + cross_merge(du),
    with the map's cross-scan recomputed (five launches, :func:`composed_bwd_plan`)."""
    batch, Di, H, W, N = cache["shape"]
    check_dy("dy", dy, (batch, Di, H, W), np.float32)
    D, bias = cache["D"], cache["delta_bias"]
    given = {name: _dev(cache[name]) for name in ("delta", "A", "B", "C")}
    given.update(x=_dev(cache["u"]), dy=_dev(dy), D=None if D is None else _dev(D),
                 delta_bias=None if bias is None else _dev(bias))
    plan = composed_bwd_plan(cache["shape"], cache["delta_softplus"], D is not None, bias is not None,
                             all(_base_address(given[n]) % 16 == 0 for n in ("delta", "B", "C")))
    bufs = run_on_cupy(plan, given, _plan_empty)
    return {"x": bufs["dx"], "delta": bufs["ddelta"].reshape(batch, K_DIRECTIONS * Di, H * W), "A": bufs["dA"],
            "B": bufs["dB"], "C": bufs["dC"], "D": bufs.get("dD"), "delta_bias": bufs.get("ddelta_bias")}


def ss2d_scan_fwd(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Fused 2-D scan forward (rung "fused"): one block per (batch, channel) reads the map once into
    shared memory, two warps scan the four directions from there, y is written once. Falls back
    to the composed version when the map does not fit in shared memory. Returns ``(y, cache)``;
    see :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="cupy")
    P = _pitch(W)
    shared = 2 * H * P * 4
    if shared > _max_shared():
        return ss2d_scan_fwd_composed(x, delta, A, B, C, D, delta_bias, delta_softplus)
    KD = K_DIRECTIONS * Di
    y = _empty((batch, Di, H, W))
    k = _kernel("ss2d_fwd_fused", N, FUSED_CHUNKS, shared)
    k((batch * Di,), (64,),
      (_dev(x), _dev(delta), _dev(A), _dev(B), _dev(C), _or_zeros(D, KD), _or_zeros(delta_bias, KD), y,
       _i(batch), _i(Di), _i(H), _i(W), _i(P), _i(bool(delta_softplus))), shared_mem=shared)
    return y, scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N))


def ss2d_scan_bwd(dy, cache):
    """Fused 2-D scan backward (rung "fused"): dict keyed x, delta, A, B, C, D, delta_bias.
    dx and ddelta are deterministic; dB/dC are summed with atomics (low bits may vary)."""
    cp = _cp()
    batch, Di, H, W, N = cache["shape"]
    check_dy("dy", dy, (batch, Di, H, W), np.float32)
    P = _pitch(W)
    shared = 3 * H * P * 4
    if shared > _max_shared():
        return ss2d_scan_bwd_composed(dy, cache)
    KD, L = K_DIRECTIONS * Di, H * W
    nrounds = (L + 32 * BWD_CHUNKS - 1) // (32 * BWD_CHUNKS)
    D, bias = cache["D"], cache["delta_bias"]
    hstart = cp.empty((batch * KD * nrounds * N,), np.float32)
    dx, ddelta = _empty((batch, Di, H, W)), _empty((batch, KD, L))
    dB = cp.zeros((batch, K_DIRECTIONS, N, L), np.float32)      # atomics add into these
    dC = cp.zeros((batch, K_DIRECTIONS, N, L), np.float32)
    partA, partD, partbias = _empty((batch * KD * N,)), _empty((batch * KD,)), _empty((batch * KD,))
    k = _kernel("ss2d_bwd_fused", N, BWD_CHUNKS, shared)
    k((batch * Di,), (64,),
      (_dev(cache["u"]), _dev(dy), _dev(cache["delta"]), _dev(cache["A"]), _dev(cache["B"]),
       _dev(cache["C"]), _or_zeros(D, KD), _or_zeros(bias, KD), hstart, dx, ddelta, dB, dC, partA,
       partD, partbias, _i(batch), _i(Di), _i(H), _i(W), _i(P), _i(bool(cache["delta_softplus"]))),
      shared_mem=shared)
    return {"x": dx, "delta": ddelta, "B": dB, "C": dC,
            **_parameter_grads(batch, KD, N, D, bias, partA, partD, partbias)}
