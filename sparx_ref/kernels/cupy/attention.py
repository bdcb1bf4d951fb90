"""CuPy kernels (CUDA C compiled at run time) for the two attention cores of SparX.

Mirrors :mod:`sparx_ref.ref.window_attention` (``window_attention_fwd/bwd``: Swin's
attention inside every window, with the gathered relative-position bias and the shift
mask) and :mod:`sparx_ref.ref.dmca` (``dmca_attention_fwd/bwd``: the ganglion layers'
attention *across channels*, one g x g map per image and channel group).

Same signatures, semantics and returns as the reference ops, on CuPy arrays (anything with
``__cuda_array_interface__`` is accepted and viewed as CuPy). float32 is the target dtype;
float64 works too (a second compiled module); anything else raises TypeError.

The ladder (one idea per rung; registry rows in :mod:`sparx_ref.kernels.registry`):

Window attention (per window ``w`` and head ``h``: ``A = (s q) k^T + bias + mask``,
``P = softmax(A)``, ``out = P v``):

- ``naive``: the explicit form, one thread per output element. A strided batched matmul
  (one thread per score ``A[i, j]``), a softmax with one thread per row, a second matmul
  (one thread per ``out[i, d]``). Every intermediate goes through device memory.
- ``fused``: one block per (window, head). The ``N x N`` scores (49 x 49 for Swin) live in
  shared memory; q, k, v stream through it in head-dim chunks; bias, mask, softmax and
  ``P v`` happen in the same block, so only q, k, v, out and the probabilities the cache
  needs touch device memory. Each thread computes a 4 x 4 register tile of every product.
  The backward keeps ``P`` and ``dP -> dS`` in shared memory per window, and each block
  walks a strided set of windows of one head, adding its ``dS`` into its own slab of
  partial bias gradients (no atomics, deterministic); a last small kernel sums the slabs.
- ``static``: the fused kernels compiled for the call's (N, hd) (``-DWN=49 -DWHD=32 ...``):
  every loop bound is a constant, so the compiler unrolls the products, turns the index
  divisions into multiplies, keeps each thread's score tiles in registers across head-dim
  chunks and each thread's share of the bias gradient in registers across windows.
  Compiled once per shape (CuPy caches the binary); float64 windows whose tiles pass 48 KB
  of static shared memory use ``fused``.

DMCA attention (per image ``b`` and group: ``P = softmax(q_g k_g^T / sqrt(Ls))``,
``out_g = P v_g``):

- ``naive``: the same explicit form, one thread per output element.
- ``tiled``: the same five steps, but every matmul is a shared-memory tiled GEMM
  (64 x 64 output tile per block, 4 x 4 register tile per thread, k in chunks of 16, loads
  coalesced along whichever axis is contiguous) and the softmax rows are one warp each.
  ``out = P v`` is the only large product (g x g times g x L): it is memory bound, and
  tiling makes each v element read once per 64 output rows instead of once per row.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ._plan import Launch, Plan, plan_cache, replayable, run_on_cupy

__all__ = [
    "window_attention_fwd", "window_attention_bwd", "dmca_attention_fwd", "dmca_attention_bwd",
    "window_attention_fwd_naive", "window_attention_bwd_naive",
    "window_attention_fwd_fused", "window_attention_bwd_fused",
    "window_attention_fwd_static", "window_attention_bwd_static",
    "dmca_attention_fwd_naive", "dmca_attention_bwd_naive",
    "dmca_attention_fwd_tiled", "dmca_attention_bwd_tiled",
    "CUDA_SOURCES", "NVRTC_OPTIONS",
]

# --------------------------------------------------------------------------------------
# CUDA C source. ``real`` is float or double (one module per dtype).
# --------------------------------------------------------------------------------------
_SOURCE_TEMPLATE = r"""
typedef __REAL__ real;
typedef long long i64;

__device__ __forceinline__ float real_exp(float x) { return expf(x); }
__device__ __forceinline__ double real_exp(double x) { return exp(x); }

#define NEG_BIG ((real)-3.0e38)   /* below any logit; NVRTC has no INFINITY macro */
#define TILE 64          /* bmm_tiled: output tile TILE x TILE per block            */
#define TK 16            /* bmm_tiled: k chunk                                      */
#define MICRO 4          /* every thread owns a MICRO x MICRO register tile         */
#define TPD (TILE / MICRO)   /* threads per tile side: 16 -> 256 threads a block   */

/* ---------------------------------------------------------------------------------
 * C[b, m, n] = alpha * sum_k A[b](m, k) * B[b](k, n)   (C contiguous (batch, M, N))
 * A(m, k) lives at A + b*sAb + m*sAm + k*sAk (any strides: transposes are strides).
 * naive: one thread per output element.
 * ------------------------------------------------------------------------------- */
extern "C" __global__ void bmm_naive(const real* __restrict__ A, const real* __restrict__ B,
                                     real* __restrict__ C, int batch, int M, int N, int K,
                                     i64 sAb, i64 sAm, i64 sAk, i64 sBb, i64 sBk, i64 sBn,
                                     real alpha)
{
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 total = (i64)batch * M * N;
    if (idx >= total) return;
    const int n = (int)(idx % N);
    const i64 t = idx / N;
    const int m = (int)(t % M);
    const i64 b = t / M;
    const real* a = A + b * sAb + (i64)m * sAm;
    const real* bb = B + b * sBb + (i64)n * sBn;
    real acc = 0;
    for (int k = 0; k < K; ++k) acc += a[(i64)k * sAk] * bb[(i64)k * sBk];
    C[idx] = alpha * acc;
}

/* tiled: TILE x TILE outputs per block (grid.x over n, grid.y over m, grid.z batch),
 * thread (tx, ty) owns rows ty + TPD*r and columns tx + TPD*c (interleaved, so a warp
 * reads consecutive shared words and writes consecutive global words). */
extern "C" __global__ void bmm_tiled(const real* __restrict__ A, const real* __restrict__ B,
                                     real* __restrict__ C, int batch, int M, int N, int K,
                                     i64 sAb, i64 sAm, i64 sAk, i64 sBb, i64 sBk, i64 sBn,
                                     real alpha)
{
    __shared__ real As[TK][TILE + 1];
    __shared__ real Bs[TK][TILE + 1];
    const int tid = threadIdx.x;
    const int tx = tid % TPD, ty = tid / TPD;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    const i64 b = blockIdx.z;
    const real* Ab = A + b * sAb;
    const real* Bb = B + b * sBb;
    real acc[MICRO][MICRO];
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0;
    const bool a_k_contig = (sAk == 1);
    const bool b_n_contig = (sBn == 1);
    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = tid; e < TILE * TK; e += TPD * TPD) {
            int mm, kk;
            if (a_k_contig) { mm = e / TK; kk = e % TK; } else { kk = e / TILE; mm = e % TILE; }
            const int gm = m0 + mm, gk = k0 + kk;
            As[kk][mm] = (gm < M && gk < K) ? Ab[(i64)gm * sAm + (i64)gk * sAk] : (real)0;
            int nn, kb;
            if (b_n_contig) { kb = e / TILE; nn = e % TILE; } else { nn = e / TK; kb = e % TK; }
            const int gn = n0 + nn, gkb = k0 + kb;
            Bs[kb][nn] = (gn < N && gkb < K) ? Bb[(i64)gkb * sBk + (i64)gn * sBn] : (real)0;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            real a[MICRO], bv[MICRO];
#pragma unroll
            for (int r = 0; r < MICRO; ++r) a[r] = As[kk][ty + TPD * r];
#pragma unroll
            for (int c = 0; c < MICRO; ++c) bv[c] = Bs[kk][tx + TPD * c];
#pragma unroll
            for (int r = 0; r < MICRO; ++r)
#pragma unroll
                for (int c = 0; c < MICRO; ++c) acc[r][c] += a[r] * bv[c];
        }
        __syncthreads();
    }
    real* Cb = C + b * (i64)M * N;
#pragma unroll
    for (int r = 0; r < MICRO; ++r) {
        const int gm = m0 + ty + TPD * r;
        if (gm >= M) continue;
#pragma unroll
        for (int c = 0; c < MICRO; ++c) {
            const int gn = n0 + tx + TPD * c;
            if (gn < N) Cb[(i64)gm * N + gn] = alpha * acc[r][c];
        }
    }
}

/* ---------------------------------------------------------------------------------
 * Row softmax of S (rows, N) in place, after adding bias[h] and mask[w].
 * Row r = (bw*nH + h)*N + i ; w = bw % nW.  has_bias / has_mask switch the adds.
 * naive: one thread per row.  warp: one warp per row (lanes over keys).
 * ------------------------------------------------------------------------------- */
__device__ __forceinline__ real row_add(const real* bias, const real* mask, i64 r, int j,
                                        int N, int nH, int nW, int has_bias, int has_mask)
{
    const int i = (int)(r % N);
    const i64 bh = r / N;
    const int h = (int)(bh % nH);
    const int w = (int)((bh / nH) % nW);
    real add = 0;
    if (has_bias) add += bias[((i64)h * N + i) * N + j];
    if (has_mask) add += mask[((i64)w * N + i) * N + j];
    return add;
}

extern "C" __global__ void softmax_rows_naive(real* __restrict__ S, const real* __restrict__ bias,
                                              const real* __restrict__ mask, i64 rows, int N,
                                              int nH, int nW, int has_bias, int has_mask)
{
    const i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    real* s = S + r * N;
    real mx = NEG_BIG;
    for (int j = 0; j < N; ++j) {
        const real x = s[j] + row_add(bias, mask, r, j, N, nH, nW, has_bias, has_mask);
        s[j] = x;
        mx = fmax(mx, x);
    }
    real sum = 0;
    for (int j = 0; j < N; ++j) { const real e = real_exp(s[j] - mx); s[j] = e; sum += e; }
    for (int j = 0; j < N; ++j) s[j] = s[j] / sum;
}

__device__ __forceinline__ real warp_sum(real x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ real warp_max(real x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

extern "C" __global__ void softmax_rows_warp(real* __restrict__ S, const real* __restrict__ bias,
                                             const real* __restrict__ mask, i64 rows, int N,
                                             int nH, int nW, int has_bias, int has_mask)
{
    const int lane = threadIdx.x & 31;
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;               /* whole warps leave together */
    real* s = S + r * N;
    real mx = NEG_BIG;
    for (int j = lane; j < N; j += 32) {
        const real x = s[j] + row_add(bias, mask, r, j, N, nH, nW, has_bias, has_mask);
        s[j] = x;
        mx = fmax(mx, x);
    }
    mx = warp_max(mx);
    real sum = 0;
    for (int j = lane; j < N; j += 32) { const real e = real_exp(s[j] - mx); s[j] = e; sum += e; }
    sum = warp_sum(sum);
    for (int j = lane; j < N; j += 32) s[j] = s[j] / sum;
}

/* dS = P * (dP - sum_j P*dP), written over dP.  (rows, N) each. */
extern "C" __global__ void softmax_bwd_rows_naive(const real* __restrict__ P, real* __restrict__ dP,
                                                  i64 rows, int N)
{
    const i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const real* p = P + r * N;
    real* d = dP + r * N;
    real dot = 0;
    for (int j = 0; j < N; ++j) dot += p[j] * d[j];
    for (int j = 0; j < N; ++j) d[j] = p[j] * (d[j] - dot);
}

extern "C" __global__ void softmax_bwd_rows_warp(const real* __restrict__ P, real* __restrict__ dP,
                                                 i64 rows, int N)
{
    const int lane = threadIdx.x & 31;
    const i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    const real* p = P + r * N;
    real* d = dP + r * N;
    real dot = 0;
    for (int j = lane; j < N; j += 32) dot += p[j] * d[j];
    dot = warp_sum(dot);
    for (int j = lane; j < N; j += 32) d[j] = p[j] * (d[j] - dot);
}

/* out[e] = sum_b X[b, e] for X (nb, inner): one thread per e (coalesced over e). */
extern "C" __global__ void sum_leading(const real* __restrict__ X, real* __restrict__ out,
                                       i64 nb, i64 inner)
{
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= inner) return;
    real acc = 0;
    for (i64 b = 0; b < nb; ++b) acc += X[b * inner + e];
    out[e] = acc;
}

/* out[e] = alpha * x[e] */
extern "C" __global__ void scale_copy(const real* __restrict__ x, real* __restrict__ out, i64 n, real alpha)
{
    const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) out[e] = alpha * x[e];
}

/* ---------------------------------------------------------------------------------
 * Fused window attention. One block per (window bw, head h) in the forward.
 * Shared memory (dynamic): S [N][N+1] scores/probs, X and Y [N][DC+1] head-dim chunks.
 * Products use 4x4 register tiles: output rows i = ti + NT*r, columns j = tj + NT*c
 * (NT = ceil(N/4)); out-of-range rows/columns are clamped for the loads and not stored.
 * ------------------------------------------------------------------------------- */

/* acc[r][c] += sum_{kk<kn} X(ra[r], kk) * Y(cb[c], kk) where X(row, kk) = X[row*xs + kk*xk] */
__device__ __forceinline__ void tile_mm(const real* X, int xs, int xk, const real* Y, int ys, int yk,
                                        const int* ra, const int* cb, int kn, real acc[MICRO][MICRO])
{
    for (int kk = 0; kk < kn; ++kk) {
        real a[MICRO], bv[MICRO];
#pragma unroll
        for (int r = 0; r < MICRO; ++r) a[r] = X[ra[r] * xs + kk * xk];
#pragma unroll
        for (int c = 0; c < MICRO; ++c) bv[c] = Y[cb[c] * ys + kk * yk];
#pragma unroll
        for (int r = 0; r < MICRO; ++r)
#pragma unroll
            for (int c = 0; c < MICRO; ++c) acc[r][c] += a[r] * bv[c];
    }
}

__device__ __forceinline__ void zero_acc(real acc[MICRO][MICRO])
{
#pragma unroll
    for (int r = 0; r < MICRO; ++r)
#pragma unroll
        for (int c = 0; c < MICRO; ++c) acc[r][c] = 0;
}

/* load a (N, dc) chunk of a contiguous (N, HD) matrix, columns [d0, d0+dc), into dst [N][ld] */
__device__ __forceinline__ void load_chunk(real* dst, int ld, const real* src, int N, int HD, int d0,
                                           int dc, real mul)
{
    for (int e = threadIdx.x; e < N * dc; e += blockDim.x) {
        const int i = e / dc, dd = e % dc;
        dst[i * ld + dd] = mul * src[(i64)i * HD + d0 + dd];
    }
}

extern "C" __global__ void window_fwd_fused(const real* __restrict__ q, const real* __restrict__ k,
                                            const real* __restrict__ v, const real* __restrict__ bias,
                                            const real* __restrict__ mask, real* __restrict__ out,
                                            real* __restrict__ probs, int nH, int N, int HD, int nW,
                                            int has_mask, int DC, real scale)
{
    extern __shared__ unsigned char smem_raw[];
    real* sm = reinterpret_cast<real*>(smem_raw);
    const int LDS = N + 1, LDC = DC + 1;
    real* S = sm;
    real* X = S + N * LDS;
    real* Y = X + N * LDC;
    const i64 bh = blockIdx.x;
    const int h = (int)(bh % nH);
    const int w = (int)((bh / nH) % nW);
    const i64 base = bh * N * HD;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int NT = (N + MICRO - 1) / MICRO;

    for (int e = tid; e < N * LDS; e += nt) S[e] = 0;
    /* scores S = (scale q) k^T, accumulated over head-dim chunks */
    for (int d0 = 0; d0 < HD; d0 += DC) {
        const int dc = min(DC, HD - d0);
        load_chunk(X, LDC, q + base, N, HD, d0, dc, scale);
        load_chunk(Y, LDC, k + base, N, HD, d0, dc, (real)1);
        __syncthreads();
        for (int t = tid; t < NT * NT; t += nt) {
            const int ti = t / NT, tj = t % NT;
            int ra[MICRO], cb[MICRO];
#pragma unroll
            for (int r = 0; r < MICRO; ++r) { ra[r] = min(ti + NT * r, N - 1); cb[r] = min(tj + NT * r, N - 1); }
            real acc[MICRO][MICRO];
            zero_acc(acc);
            tile_mm(X, LDC, 1, Y, LDC, 1, ra, cb, dc, acc);
#pragma unroll
            for (int r = 0; r < MICRO; ++r) {
                const int i = ti + NT * r;
#pragma unroll
                for (int c = 0; c < MICRO; ++c) {
                    const int j = tj + NT * c;
                    if (i < N && j < N) S[i * LDS + j] += acc[r][c];
                }
            }
        }
        __syncthreads();
    }
    /* + bias (+ mask), softmax over keys: one warp per row; probabilities to the cache */
    const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
    real* P = probs + bh * N * N;
    for (int i = warp; i < N; i += nwarps) {
        real mx = NEG_BIG;
        for (int j = lane; j < N; j += 32) {
            real x = S[i * LDS + j] + bias[((i64)h * N + i) * N + j];
            if (has_mask) x += mask[((i64)w * N + i) * N + j];
            S[i * LDS + j] = x;
            mx = fmax(mx, x);
        }
        mx = warp_max(mx);
        real sum = 0;
        for (int j = lane; j < N; j += 32) {
            const real e = real_exp(S[i * LDS + j] - mx);
            S[i * LDS + j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        for (int j = lane; j < N; j += 32) {
            const real p = S[i * LDS + j] / sum;
            S[i * LDS + j] = p;
            P[(i64)i * N + j] = p;
        }
    }
    __syncthreads();
    /* out = P v, one head-dim chunk at a time */
    for (int d0 = 0; d0 < HD; d0 += DC) {
        const int dc = min(DC, HD - d0);
        const int DT = (dc + MICRO - 1) / MICRO;
        load_chunk(Y, LDC, v + base, N, HD, d0, dc, (real)1);
        __syncthreads();
        for (int t = tid; t < NT * DT; t += nt) {
            const int ti = t / DT, td = t % DT;
            int ra[MICRO], cb[MICRO];
#pragma unroll
            for (int r = 0; r < MICRO; ++r) { ra[r] = min(ti + NT * r, N - 1); cb[r] = min(td + DT * r, dc - 1); }
            real acc[MICRO][MICRO];
            zero_acc(acc);
            /* O(i, d) = sum_j S(i, j) Y(j, d): X(row=i, kk=j) = S[i*LDS + j], Y(col=d, kk=j) = Y[j*LDC + d] */
            tile_mm(S, LDS, 1, Y, 1, LDC, ra, cb, N, acc);
#pragma unroll
            for (int r = 0; r < MICRO; ++r) {
                const int i = ti + NT * r;
#pragma unroll
                for (int c = 0; c < MICRO; ++c) {
                    const int dd = td + DT * c;
                    if (i < N && dd < dc) out[base + (i64)i * HD + d0 + dd] = acc[r][c];
                }
            }
        }
        __syncthreads();
    }
}

/* Backward, grid (npart, nH): block (p, h) handles windows bw = p, p + npart, ... of head h.
 * Shared: P [N][N+1], D [N][N+1] (dP, then dS), X and Y [N][DC+1].
 * partial[p, h, i, j] accumulates dS over the block's windows (its own slab: no atomics). */
extern "C" __global__ void window_bwd_fused(const real* __restrict__ q, const real* __restrict__ k,
                                            const real* __restrict__ v, const real* __restrict__ probs,
                                            const real* __restrict__ dout, real* __restrict__ dq,
                                            real* __restrict__ dk, real* __restrict__ dv,
                                            real* __restrict__ partial, int Bw, int nH, int N, int HD,
                                            int DC, real scale)
{
    extern __shared__ unsigned char smem_raw[];
    real* sm = reinterpret_cast<real*>(smem_raw);
    const int LDS = N + 1, LDC = DC + 1;
    real* P = sm;
    real* D = P + N * LDS;
    real* X = D + N * LDS;
    real* Y = X + N * LDC;
    const int p = blockIdx.x, npart = gridDim.x, h = blockIdx.y;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
    const int NT = (N + MICRO - 1) / MICRO;
    real* slab = partial + ((i64)p * nH + h) * N * N;

    for (int e = tid; e < N * N; e += nt) slab[e] = 0;   /* each thread zeroes what it later owns? no: */
    __syncthreads();                                        /* row pass owns (i, j) by warp/lane; keep simple */

    for (int bw = p; bw < Bw; bw += npart) {
        const i64 bh = (i64)bw * nH + h;
        const i64 base = bh * N * HD;
        for (int e = tid; e < N * N; e += nt) {
            const int i = e / N, j = e % N;
            P[i * LDS + j] = probs[bh * N * N + e];
            D[i * LDS + j] = 0;
        }
        /* dP = dout v^T over head-dim chunks */
        for (int d0 = 0; d0 < HD; d0 += DC) {
            const int dc = min(DC, HD - d0);
            load_chunk(X, LDC, dout + base, N, HD, d0, dc, (real)1);
            load_chunk(Y, LDC, v + base, N, HD, d0, dc, (real)1);
            __syncthreads();
            for (int t = tid; t < NT * NT; t += nt) {
                const int ti = t / NT, tj = t % NT;
                int ra[MICRO], cb[MICRO];
#pragma unroll
                for (int r = 0; r < MICRO; ++r) { ra[r] = min(ti + NT * r, N - 1); cb[r] = min(tj + NT * r, N - 1); }
                real acc[MICRO][MICRO];
                zero_acc(acc);
                tile_mm(X, LDC, 1, Y, LDC, 1, ra, cb, dc, acc);
#pragma unroll
                for (int r = 0; r < MICRO; ++r) {
                    const int i = ti + NT * r;
#pragma unroll
                    for (int c = 0; c < MICRO; ++c) {
                        const int j = tj + NT * c;
                        if (i < N && j < N) D[i * LDS + j] += acc[r][c];
                    }
                }
            }
            __syncthreads();
        }
        /* dS = P * (dP - rowsum(P * dP)); add into this block's bias-gradient slab */
        for (int i = warp; i < N; i += nwarps) {
            real dot = 0;
            for (int j = lane; j < N; j += 32) dot += P[i * LDS + j] * D[i * LDS + j];
            dot = warp_sum(dot);
            for (int j = lane; j < N; j += 32) {
                const real ds = P[i * LDS + j] * (D[i * LDS + j] - dot);
                D[i * LDS + j] = ds;
                slab[(i64)i * N + j] += ds;
            }
        }
        __syncthreads();
        /* per head-dim chunk: dv = P^T dout, dq = scale dS k, then dk = scale dS^T q */
        for (int d0 = 0; d0 < HD; d0 += DC) {
            const int dc = min(DC, HD - d0);
            const int DT = (dc + MICRO - 1) / MICRO;
            load_chunk(X, LDC, dout + base, N, HD, d0, dc, (real)1);
            load_chunk(Y, LDC, k + base, N, HD, d0, dc, (real)1);
            __syncthreads();
            for (int t = tid; t < NT * DT; t += nt) {
                const int ti = t / DT, td = t % DT;
                int ra[MICRO], cb[MICRO];
#pragma unroll
                for (int r = 0; r < MICRO; ++r) { ra[r] = min(ti + NT * r, N - 1); cb[r] = min(td + DT * r, dc - 1); }
                real acc[MICRO][MICRO];
                /* dv(j, d) = sum_i P(i, j) dout(i, d): rows are keys j */
                zero_acc(acc);
                tile_mm(P, 1, LDS, X, 1, LDC, ra, cb, N, acc);
#pragma unroll
                for (int r = 0; r < MICRO; ++r) {
                    const int j = ti + NT * r;
#pragma unroll
                    for (int c = 0; c < MICRO; ++c) {
                        const int dd = td + DT * c;
                        if (j < N && dd < dc) dv[base + (i64)j * HD + d0 + dd] = acc[r][c];
                    }
                }
                /* dq(i, d) = scale * sum_j dS(i, j) k(j, d) */
                zero_acc(acc);
                tile_mm(D, LDS, 1, Y, 1, LDC, ra, cb, N, acc);
#pragma unroll
                for (int r = 0; r < MICRO; ++r) {
                    const int i = ti + NT * r;
#pragma unroll
                    for (int c = 0; c < MICRO; ++c) {
                        const int dd = td + DT * c;
                        if (i < N && dd < dc) dq[base + (i64)i * HD + d0 + dd] = scale * acc[r][c];
                    }
                }
            }
            __syncthreads();
            load_chunk(X, LDC, q + base, N, HD, d0, dc, scale);
            __syncthreads();
            for (int t = tid; t < NT * DT; t += nt) {
                const int ti = t / DT, td = t % DT;
                int ra[MICRO], cb[MICRO];
#pragma unroll
                for (int r = 0; r < MICRO; ++r) { ra[r] = min(ti + NT * r, N - 1); cb[r] = min(td + DT * r, dc - 1); }
                real acc[MICRO][MICRO];
                /* dk(j, d) = sum_i dS(i, j) (scale q)(i, d) */
                zero_acc(acc);
                tile_mm(D, 1, LDS, X, 1, LDC, ra, cb, N, acc);
#pragma unroll
                for (int r = 0; r < MICRO; ++r) {
                    const int j = ti + NT * r;
#pragma unroll
                    for (int c = 0; c < MICRO; ++c) {
                        const int dd = td + DT * c;
                        if (j < N && dd < dc) dk[base + (i64)j * HD + d0 + dd] = acc[r][c];
                    }
                }
            }
            __syncthreads();
        }
    }
}
"""


# --------------------------------------------------------------------------------------
# "static" rung: the fused window kernels with the shape baked in at compile time.
# WN tokens, WHD head width, WDC head-dim chunk (a multiple of 4), WT threads a block:
# every loop has a constant trip count, so NVRTC unrolls them, strength-reduces the
# divisions and keeps each thread's score tiles (and its share of the bias gradient) in
# registers. Compiled once per shape (CuPy caches the binary).
# --------------------------------------------------------------------------------------
_STATIC_TEMPLATE = r"""
typedef __REAL__ real;
typedef long long i64;
#ifndef WN
#define WN 49
#endif
#ifndef WHD
#define WHD 32
#endif
#ifndef WDC
#define WDC __DEFAULT_DC__
#endif
#ifndef WT
#define WT 128
#endif
#define W_NTL ((WN + 3) / 4)                 /* 4x4 tiles per token side            */
#define W_LDS (WN + 1)                       /* shared row length of N x N tables   */
#define W_LDC (WDC + 1)                      /* shared row length of head chunks    */
#define W_NCH ((WHD + WDC - 1) / WDC)        /* head-dim chunks                     */
#define W_DTL (WDC / 4)                      /* 4-wide tiles per chunk              */
#define W_SQ ((W_NTL * W_NTL + WT - 1) / WT) /* rounds of N x N tiles per thread    */
#define W_NV ((W_NTL * W_DTL + WT - 1) / WT) /* rounds of N x chunk tiles           */
#define W_NB ((WN * WN + WT - 1) / WT)       /* bias-gradient entries per thread    */

__device__ __forceinline__ float real_exp(float x) { return expf(x); }
__device__ __forceinline__ double real_exp(double x) { return exp(x); }

__device__ __forceinline__ real warp_sum(real x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ real warp_max(real x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* dst[i][dd] = mul * src[i*WHD + c*WDC + dd] (zero past the head width): a (WN, WDC) chunk */
__device__ __forceinline__ void s_load(real* dst, const real* __restrict__ src, int c, real mul)
{
#pragma unroll 4
    for (int e = threadIdx.x; e < WN * WDC; e += WT) {
        const int i = e / WDC, dd = e % WDC;
        const int d = c * WDC + dd;
        dst[i * W_LDC + dd] = (d < WHD) ? mul * src[i * WHD + d] : (real)0;
    }
}

/* acc[r][c] += sum_{kk<KN} A[ra[r]*AS + kk*AK] * B[cb[c]*BS + kk*BK] */
template <int KN, int AS, int AK, int BS, int BK>
__device__ __forceinline__ void s_tile(const real* A, const real* B, const int* ra, const int* cb,
                                       real (&acc)[4][4])
{
#pragma unroll 7
    for (int kk = 0; kk < KN; ++kk) {
        real a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = A[ra[r] * AS + kk * AK];
#pragma unroll
        for (int c = 0; c < 4; ++c) b[c] = B[cb[c] * BS + kk * BK];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] += a[r] * b[c];
    }
}

__device__ __forceinline__ void tok_tile(int t, int (&ra)[4], int (&cb)[4])
{
    const int ti = t / W_NTL, tj = t % W_NTL;
#pragma unroll
    for (int r = 0; r < 4; ++r) { ra[r] = min(ti + W_NTL * r, WN - 1); cb[r] = min(tj + W_NTL * r, WN - 1); }
}

__device__ __forceinline__ void chunk_tile(int t, int (&ra)[4], int (&cb)[4])
{
    const int ti = t / W_DTL, td = t % W_DTL;
#pragma unroll
    for (int r = 0; r < 4; ++r) { ra[r] = min(ti + W_NTL * r, WN - 1); cb[r] = td + W_DTL * r; }
}

/* store a chunk tile: dst[base + row*WHD + c*WDC + col] = mul * acc, rows < WN, columns < WHD */
__device__ __forceinline__ void chunk_store(real* __restrict__ dst, i64 base, int t, int c, real mul,
                                            const real (&acc)[4][4])
{
    const int ti = t / W_DTL, td = t % W_DTL;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int row = ti + W_NTL * r;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
            const int d = c * WDC + td + W_DTL * cc;
            if (row < WN && d < WHD) dst[base + row * WHD + d] = mul * acc[r][cc];
        }
    }
}

/* W_ONLY_FWD / W_ONLY_BWD: the forward and the backward pick their own chunk width (the
 * backward holds two N x N tables), so each is compiled alone at run time; the default
 * (neither defined, as in the compile check) builds both. */
#ifndef W_ONLY_BWD
extern "C" __global__ void __launch_bounds__(WT)
window_fwd_static(const real* __restrict__ q, const real* __restrict__ k, const real* __restrict__ v,
                  const real* __restrict__ bias, const real* __restrict__ mask, real* __restrict__ out,
                  real* __restrict__ probs, int nH, int nW, int has_mask, real scale)
{
    __shared__ real S[WN * W_LDS];
    __shared__ real X[WN * W_LDC];
    __shared__ real Y[WN * W_LDC];
    const int tid = threadIdx.x;
    const i64 bh = blockIdx.x;
    const int h = (int)(bh % nH);
    const int w = (int)((bh / nH) % nW);
    const i64 base = bh * (WN * WHD);

    /* scores (scale q) k^T: each thread keeps its 4x4 tiles in registers over the chunks */
    real acc[W_SQ][4][4];
#pragma unroll
    for (int rd = 0; rd < W_SQ; ++rd)
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[rd][r][c] = 0;
#pragma unroll
    for (int c = 0; c < W_NCH; ++c) {
        if (c > 0) __syncthreads();
        s_load(X, q + base, c, scale);
        s_load(Y, k + base, c, (real)1);
        __syncthreads();
#pragma unroll
        for (int rd = 0; rd < W_SQ; ++rd) {
            const int t = tid + rd * WT;
            if (t < W_NTL * W_NTL) {
                int ra[4], cb[4];
                tok_tile(t, ra, cb);
                s_tile<WDC, W_LDC, 1, W_LDC, 1>(X, Y, ra, cb, acc[rd]);
            }
        }
    }
#pragma unroll
    for (int rd = 0; rd < W_SQ; ++rd) {
        const int t = tid + rd * WT;
        if (t < W_NTL * W_NTL) {
            const int ti = t / W_NTL, tj = t % W_NTL;
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int i = ti + W_NTL * r, j = tj + W_NTL * c;
                    if (i < WN && j < WN) S[i * W_LDS + j] = acc[rd][r][c];
                }
        }
    }
    __syncthreads();
    /* + bias (+ mask), softmax: one warp per row; probabilities to the cache */
    const int lane = tid & 31, warp = tid >> 5;
    real* P = probs + bh * (WN * WN);
    const real* brow = bias + (i64)h * (WN * WN);
    const real* mrow = mask + (i64)w * (WN * WN);
    for (int i = warp; i < WN; i += WT / 32) {
        real x[(WN + 31) / 32];
        real mx = (real)-3.0e38;
#pragma unroll
        for (int u = 0; u < (WN + 31) / 32; ++u) {
            const int j = lane + 32 * u;
            if (j < WN) {
                real s = S[i * W_LDS + j] + brow[i * WN + j];
                if (has_mask) s += mrow[i * WN + j];
                x[u] = s;
                mx = fmax(mx, s);
            }
        }
        mx = warp_max(mx);
        real sum = 0;
#pragma unroll
        for (int u = 0; u < (WN + 31) / 32; ++u) {
            const int j = lane + 32 * u;
            if (j < WN) { x[u] = real_exp(x[u] - mx); sum += x[u]; }
        }
        sum = warp_sum(sum);
        const real inv = (real)1 / sum;
#pragma unroll
        for (int u = 0; u < (WN + 31) / 32; ++u) {
            const int j = lane + 32 * u;
            if (j < WN) {
                const real p = x[u] * inv;
                S[i * W_LDS + j] = p;
                P[i * WN + j] = p;
            }
        }
    }
    __syncthreads();
    /* out = P v, one chunk at a time */
#pragma unroll
    for (int c = 0; c < W_NCH; ++c) {
        if (c > 0) __syncthreads();
        s_load(Y, v + base, c, (real)1);
        __syncthreads();
#pragma unroll
        for (int rd = 0; rd < W_NV; ++rd) {
            const int t = tid + rd * WT;
            if (t < W_NTL * W_DTL) {
                int ra[4], cb[4];
                chunk_tile(t, ra, cb);
                real a[4][4] = {};
                s_tile<WN, W_LDS, 1, 1, W_LDC>(S, Y, ra, cb, a);
                chunk_store(out, base, t, c, (real)1, a);
            }
        }
    }
}

#endif  /* W_ONLY_BWD */

#ifndef W_ONLY_FWD
extern "C" __global__ void __launch_bounds__(WT)
window_bwd_static(const real* __restrict__ q, const real* __restrict__ k, const real* __restrict__ v,
                  const real* __restrict__ probs, const real* __restrict__ dout, real* __restrict__ dq,
                  real* __restrict__ dk, real* __restrict__ dv, real* __restrict__ partial, int Bw, int nH,
                  real scale)
{
    __shared__ real P[WN * W_LDS];
    __shared__ real D[WN * W_LDS];
    __shared__ real X[WN * W_LDC];
    __shared__ real Y[WN * W_LDC];
    const int p = blockIdx.x, npart = gridDim.x, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    real breg[W_NB];
#pragma unroll
    for (int u = 0; u < W_NB; ++u) breg[u] = 0;

    for (int bw = p; bw < Bw; bw += npart) {
        const i64 bh = (i64)bw * nH + h;
        const i64 base = bh * (WN * WHD);
        for (int e = tid; e < WN * WN; e += WT) P[(e / WN) * W_LDS + e % WN] = probs[bh * (WN * WN) + e];
        /* dP = dout v^T, tiles in registers over the chunks */
        real acc[W_SQ][4][4];
#pragma unroll
        for (int rd = 0; rd < W_SQ; ++rd)
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[rd][r][c] = 0;
#pragma unroll
        for (int c = 0; c < W_NCH; ++c) {
            if (c > 0) __syncthreads();
            s_load(X, dout + base, c, (real)1);
            s_load(Y, v + base, c, (real)1);
            __syncthreads();
#pragma unroll
            for (int rd = 0; rd < W_SQ; ++rd) {
                const int t = tid + rd * WT;
                if (t < W_NTL * W_NTL) {
                    int ra[4], cb[4];
                    tok_tile(t, ra, cb);
                    s_tile<WDC, W_LDC, 1, W_LDC, 1>(X, Y, ra, cb, acc[rd]);
                }
            }
        }
#pragma unroll
        for (int rd = 0; rd < W_SQ; ++rd) {
            const int t = tid + rd * WT;
            if (t < W_NTL * W_NTL) {
                const int ti = t / W_NTL, tj = t % W_NTL;
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const int i = ti + W_NTL * r, j = tj + W_NTL * c;
                        if (i < WN && j < WN) D[i * W_LDS + j] = acc[rd][r][c];
                    }
            }
        }
        __syncthreads();
        /* dS = P * (dP - rowsum(P * dP)): one warp per row */
        for (int i = warp; i < WN; i += WT / 32) {
            real dot = 0;
#pragma unroll
            for (int u = 0; u < (WN + 31) / 32; ++u) {
                const int j = lane + 32 * u;
                if (j < WN) dot += P[i * W_LDS + j] * D[i * W_LDS + j];
            }
            dot = warp_sum(dot);
#pragma unroll
            for (int u = 0; u < (WN + 31) / 32; ++u) {
                const int j = lane + 32 * u;
                if (j < WN) D[i * W_LDS + j] = P[i * W_LDS + j] * (D[i * W_LDS + j] - dot);
            }
        }
        __syncthreads();
        /* this thread's share of the bias gradient stays in registers across windows */
#pragma unroll
        for (int u = 0; u < W_NB; ++u) {
            const int e = tid + u * WT;
            if (e < WN * WN) breg[u] += D[(e / WN) * W_LDS + e % WN];
        }
#pragma unroll
        for (int c = 0; c < W_NCH; ++c) {
            s_load(X, dout + base, c, (real)1);
            s_load(Y, k + base, c, (real)1);
            __syncthreads();
#pragma unroll
            for (int rd = 0; rd < W_NV; ++rd) {
                const int t = tid + rd * WT;
                if (t < W_NTL * W_DTL) {
                    int ra[4], cb[4];
                    chunk_tile(t, ra, cb);
                    real a[4][4] = {};
                    s_tile<WN, 1, W_LDS, 1, W_LDC>(P, X, ra, cb, a);     /* dv = P^T dout (rows: keys) */
                    chunk_store(dv, base, t, c, (real)1, a);
                    real b[4][4] = {};
                    s_tile<WN, W_LDS, 1, 1, W_LDC>(D, Y, ra, cb, b);     /* dq = scale dS k (rows: queries) */
                    chunk_store(dq, base, t, c, scale, b);
                }
            }
            __syncthreads();
            s_load(X, q + base, c, scale);
            __syncthreads();
#pragma unroll
            for (int rd = 0; rd < W_NV; ++rd) {
                const int t = tid + rd * WT;
                if (t < W_NTL * W_DTL) {
                    int ra[4], cb[4];
                    chunk_tile(t, ra, cb);
                    real a[4][4] = {};
                    s_tile<WN, 1, W_LDS, 1, W_LDC>(D, X, ra, cb, a);     /* dk = dS^T (scale q) */
                    chunk_store(dk, base, t, c, (real)1, a);
                }
            }
            __syncthreads();
        }
    }
    real* slab = partial + ((i64)p * nH + h) * (WN * WN);
#pragma unroll
    for (int u = 0; u < W_NB; ++u) {
        const int e = tid + u * WT;
        if (e < WN * WN) slab[e] = breg[u];
    }
}
#endif  /* W_ONLY_FWD */
"""


def _static_source(real: str, default_dc: int) -> str:
    return _STATIC_TEMPLATE.replace("__REAL__", real).replace("__DEFAULT_DC__", str(default_dc))


def _source(real: str) -> str:
    return _SOURCE_TEMPLATE.replace("__REAL__", real)


CUDA_SOURCES = {"attention_f32": _source("float"), "attention_f64": _source("double"),
                # the static rung at its default shape (N 49, hd 32); each shape compiles the same text
                "attention_static_f32": _static_source("float", 32),
                "attention_static_f64": _static_source("double", 4)}
NVRTC_OPTIONS = ("-std=c++17",)

_THREADS = 256          # 1-D launches
_FUSED_THREADS = 128    # fused window kernels (4 warps)
_TILE = 64              # must match TILE in the source
_SMEM_LIMIT = 48 * 1024  # default dynamic shared-memory limit per block
_NPART_MAX = 512        # bias-gradient slabs per head in the fused/static backward
_STATIC_THREADS = 128   # static-shape window kernels


# --------------------------------------------------------------------------------------
# runtime plumbing
# --------------------------------------------------------------------------------------
_MODULES: dict = {}


def _cupy():
    import cupy
    return cupy


def _fn(dtype, name, smem=0):
    """The compiled kernel ``name`` for ``dtype`` (CuPy compiles each source once and caches it).

    ``smem``: dynamic shared memory the launch will ask for; above 48 KB the kernel's limit
    is raised (Hopper allows up to 227 KB a block).
    """
    cp = _cupy()
    key = (np.dtype(dtype).name, name)
    kern = _MODULES.get(key)
    if kern is None:
        src = CUDA_SOURCES["attention_f32" if key[0] == "float32" else "attention_f64"]
        kern = cp.RawKernel(src, name, options=NVRTC_OPTIONS)
        _MODULES[key] = kern
    if smem > _SMEM_LIMIT and kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
    return kern


def _static_fn(dtype, name, N, hd, DC, threads):
    """The static-shape kernel ``name`` compiled for (N, hd, DC, threads)."""
    cp = _cupy()
    dt = np.dtype(dtype).name
    key = (dt, name, N, hd, DC, threads)
    kern = _MODULES.get(key)
    if kern is None:
        src = CUDA_SOURCES["attention_static_f32" if dt == "float32" else "attention_static_f64"]
        only = "-DW_ONLY_FWD" if name == "window_fwd_static" else "-DW_ONLY_BWD"
        defs = (f"-DWN={N}", f"-DWHD={hd}", f"-DWDC={DC}", f"-DWT={threads}", only)
        kern = cp.RawKernel(src, name, options=NVRTC_OPTIONS + defs)
        _MODULES[key] = kern
    return kern


def _static_chunk(N, hd, itemsize, n_square):
    """Head-dim chunk (a multiple of 4, at most 32) whose static shared arrays fit in 48 KB, or None."""
    widest = min(32, (hd + 3) // 4 * 4)
    for DC in (widest, 16, 8, 4):
        if DC <= widest and (n_square * N * (N + 1) + 2 * N * (DC + 1)) * itemsize <= _SMEM_LIMIT:
            return DC
    return None


def _device(name, x, ndim):
    """View ``x`` as a C-contiguous CuPy array of rank ``ndim`` (float32/float64)."""
    cp = _cupy()
    if isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a device array (CuPy or __cuda_array_interface__), got numpy.ndarray; "
                        f"move it with cupy.asarray first")
    if not isinstance(x, cp.ndarray):
        if not hasattr(x, "__cuda_array_interface__"):
            raise TypeError(f"{name} must be a CuPy array or expose __cuda_array_interface__, got {type(x).__name__}")
        x = cp.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)} ({x.ndim} dimensions)")
    return cp.ascontiguousarray(x)


def _same_dtype(**arrays):
    items = [(k, a) for k, a in arrays.items() if a is not None]
    d0 = items[0][1].dtype
    for k, a in items[1:]:
        if a.dtype != d0:
            raise TypeError(f"{k} has dtype {a.dtype} but {items[0][0]} has {d0}; all inputs must share one dtype")
    return d0


def _shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def _empty(shape, dtype):
    """Every output and scratch buffer comes from here (tests swap in a NaN-filled one)."""
    return _cupy().empty(tuple(int(d) for d in shape), dtype=dtype)


def _blocks(n, threads=_THREADS):
    return (int((n + threads - 1) // threads),)


def _sc(dtype, value):
    return np.dtype(dtype).type(value)


def _bmm_launch(version, dtype, A, B, C, batch, M, N, K, sA, sB, alpha):
    """The launch of C (batch, M, N) = alpha * A @ B, element strides sA = (b, m, k), sB = (b, k, n);
    A, B, C are buffer names (:mod:`._plan`)."""
    args = (A, B, C, np.int32(batch), np.int32(M), np.int32(N), np.int32(K),
            np.int64(sA[0]), np.int64(sA[1]), np.int64(sA[2]),
            np.int64(sB[0]), np.int64(sB[1]), np.int64(sB[2]), _sc(dtype, alpha))
    if version == "naive":
        return Launch(_fn(dtype, "bmm_naive"), _blocks(batch * M * N), (_THREADS,), args)
    grid = ((N + _TILE - 1) // _TILE, (M + _TILE - 1) // _TILE, batch)
    return Launch(_fn(dtype, "bmm_tiled"), grid, ((_TILE // 4) ** 2,), args)


def _run(launch, dtype, **arrays):
    """Make one launch on CuPy arrays (the buffer names of ``launch`` are the keywords)."""
    run_on_cupy(Plan(np.dtype(dtype), (), (launch,)), arrays, _empty)


def _bmm(version, A, B, C, batch, M, N, K, sA, sB, alpha):
    """C (batch, M, N) = alpha * A @ B with element strides sA = (b, m, k), sB = (b, k, n)."""
    _run(_bmm_launch(version, C.dtype, "A", "B", "C", batch, M, N, K, sA, sB, alpha), C.dtype, A=A, B=B, C=C)


def _softmax_launch(version, dtype, S, rows, N, bias=None, mask=None, nH=1, nW=1):
    """The launch of the in-place row softmax of buffer S (+ bias, + mask: buffer names or None)."""
    args = (S, S if bias is None else bias, S if mask is None else mask,   # S: never read as bias/mask
            np.int64(rows), np.int32(N), np.int32(nH), np.int32(nW), np.int32(bias is not None),
            np.int32(mask is not None))
    if version == "naive":
        return Launch(_fn(dtype, "softmax_rows_naive"), _blocks(rows), (_THREADS,), args)
    return Launch(_fn(dtype, "softmax_rows_warp"), _blocks(rows * 32), (_THREADS,), args)


def _softmax_rows(version, S, rows, N, bias=None, mask=None, nH=1, nW=1):
    launch = _softmax_launch(version, S.dtype, "S", rows, N, None if bias is None else "bias",
                             None if mask is None else "mask", nH, nW)
    _run(launch, S.dtype, S=S, bias=bias, mask=mask)


def _softmax_bwd_launch(version, dtype, P, dP, rows, N):
    """The launch of dP <- dS = P * (dP - rowsum(P * dP)) in place (P, dP buffer names)."""
    args = (P, dP, np.int64(rows), np.int32(N))
    if version == "naive":
        return Launch(_fn(dtype, "softmax_bwd_rows_naive"), _blocks(rows), (_THREADS,), args)
    return Launch(_fn(dtype, "softmax_bwd_rows_warp"), _blocks(rows * 32), (_THREADS,), args)


def _softmax_bwd_rows(version, P, dP, rows, N):
    _run(_softmax_bwd_launch(version, P.dtype, "P", "dP", rows, N), P.dtype, P=P, dP=dP)


def _sum_leading(X, nb, inner, out):
    _fn(X.dtype, "sum_leading")(_blocks(inner), (_THREADS,), (X, out, np.int64(nb), np.int64(inner)))


# --------------------------------------------------------------------------------------
# window attention
# --------------------------------------------------------------------------------------
def _window_inputs(q, k, v, bias, mask, scale):
    q = _device("q", q, 4)
    k = _device("k", k, 4)
    v = _device("v", v, 4)
    bias = _device("bias", bias, 3)
    mask = None if mask is None else _device("mask", mask, 3)
    _same_dtype(q=q, k=k, v=v, bias=bias, mask=mask)
    Bw, nH, N, hd = q.shape
    _shape("k", k, q.shape)
    _shape("v", v, q.shape)
    _shape("bias", bias, (nH, N, N))
    nW = 1
    if mask is not None:
        nW = mask.shape[0]
        _shape("mask", mask, (nW, N, N))
        if nW == 0 or Bw % nW:
            raise ValueError(f"Bw (q.shape[0])={Bw} must be divisible by nW (mask.shape[0])={nW}")
    scale = float(hd ** -0.5 if scale is None else scale)
    return q, k, v, bias, mask, scale, (Bw, nH, N, hd, nW)


def _window_fwd(version, q, k, v, bias, mask, scale):
    q, k, v, bias, mask, scale, (Bw, nH, N, hd, nW) = _window_inputs(q, k, v, bias, mask, scale)
    dt = q.dtype
    out = _empty(q.shape, dt)
    probs = _empty((Bw, nH, N, N), dt)
    DC = _static_chunk(N, hd, dt.itemsize, 1) if version == "static" else None
    if version == "static" and DC is None:
        version = "fused"          # float64 windows too large for static shared memory
    if version == "static":
        dummy = _empty((1,), dt)
        _static_fn(dt, "window_fwd_static", N, hd, DC, _STATIC_THREADS)(
            (Bw * nH,), (_STATIC_THREADS,),
            (q, k, v, bias, dummy if mask is None else mask, out, probs, np.int32(nH), np.int32(nW),
             np.int32(mask is not None), _sc(dt, scale)))
    elif version == "naive":
        BH = Bw * nH
        # A = (scale q) k^T: A(i, j) = sum_d q[i, d] k[j, d]
        _bmm("naive", q, k, probs, BH, N, N, hd, (N * hd, hd, 1), (N * hd, 1, hd), scale)
        _softmax_rows("naive", probs, BH * N, N, bias=bias, mask=mask, nH=nH, nW=nW)
        _bmm("naive", probs, v, out, BH, N, hd, N, (N * N, N, 1), (N * hd, hd, 1), 1.0)
    else:
        DC = _fused_chunk(N, hd, dt.itemsize, n_square=1)
        smem = (N * (N + 1) + 2 * N * (DC + 1)) * dt.itemsize
        dummy = _empty((1,), dt)
        _fn(dt, "window_fwd_fused", smem)(
            (Bw * nH,), (_FUSED_THREADS,),
            (q, k, v, bias, dummy if mask is None else mask, out, probs, np.int32(nH), np.int32(N),
             np.int32(hd), np.int32(nW), np.int32(mask is not None), np.int32(DC), _sc(dt, scale)),
            shared_mem=smem)
    cache = {"q": q, "k": k, "v": v, "probs": probs, "scale": scale}
    return out, cache


def _fused_chunk(N, hd, itemsize, n_square):
    """Largest head-dim chunk (32, 16, 8) whose shared-memory tiles fit in 48 KB (else 8,
    and the launch raises the kernel's dynamic shared-memory limit)."""
    for DC in (32, 16):
        if (n_square * N * (N + 1) + 2 * N * (DC + 1)) * itemsize <= _SMEM_LIMIT:
            return DC
    return 8


def _window_bwd(version, dout, cache):
    q, k, v, probs, scale = cache["q"], cache["k"], cache["v"], cache["probs"], cache["scale"]
    dout = _device("dout", dout, 4)
    if dout.dtype != q.dtype:
        raise TypeError(f"dout must have dtype {q.dtype} (like the forward inputs), got {dout.dtype}")
    _shape("dout", dout, q.shape)
    Bw, nH, N, hd = q.shape
    dt = q.dtype
    dq, dk, dv = _empty(q.shape, dt), _empty(k.shape, dt), _empty(v.shape, dt)
    dbias = _empty((nH, N, N), dt)
    DC = _static_chunk(N, hd, dt.itemsize, 2) if version == "static" else None
    if version == "static" and DC is None:
        version = "fused"
    if version == "static":
        npart = min(Bw, _NPART_MAX)
        partial = _empty((npart, nH, N, N), dt)
        _static_fn(dt, "window_bwd_static", N, hd, DC, _STATIC_THREADS)(
            (npart, nH), (_STATIC_THREADS,),
            (q, k, v, probs, dout, dq, dk, dv, partial, np.int32(Bw), np.int32(nH), _sc(dt, scale)))
        _sum_leading(partial, npart, nH * N * N, dbias)
    elif version == "naive":
        BH = Bw * nH
        # dv = P^T dout: dv(j, d) = sum_i P[i, j] dout[i, d]
        _bmm("naive", probs, dout, dv, BH, N, hd, N, (N * N, 1, N), (N * hd, hd, 1), 1.0)
        # dP = dout v^T
        dS = _empty((Bw, nH, N, N), dt)
        _bmm("naive", dout, v, dS, BH, N, N, hd, (N * hd, hd, 1), (N * hd, 1, hd), 1.0)
        _softmax_bwd_rows("naive", probs, dS, BH * N, N)
        # dq = scale dS k ; dk = dS^T (scale q)
        _bmm("naive", dS, k, dq, BH, N, hd, N, (N * N, N, 1), (N * hd, hd, 1), scale)
        _bmm("naive", dS, q, dk, BH, N, hd, N, (N * N, 1, N), (N * hd, hd, 1), scale)
        _sum_leading(dS, Bw, nH * N * N, dbias)
    else:
        DC = _fused_chunk(N, hd, dt.itemsize, n_square=2)
        smem = (2 * N * (N + 1) + 2 * N * (DC + 1)) * dt.itemsize
        npart = min(Bw, _NPART_MAX)
        partial = _empty((npart, nH, N, N), dt)
        _fn(dt, "window_bwd_fused", smem)(
            (npart, nH), (_FUSED_THREADS,),
            (q, k, v, probs, dout, dq, dk, dv, partial, np.int32(Bw), np.int32(nH), np.int32(N), np.int32(hd),
             np.int32(DC), _sc(dt, scale)),
            shared_mem=smem)
        _sum_leading(partial, npart, nH * N * N, dbias)
    return {"q": dq, "k": dk, "v": dv, "bias": dbias}


def window_attention_fwd_naive(q, k, v, bias, mask=None, scale=None):
    """Explicit form, one thread per output element (score, softmax row, output entry)."""
    return _window_fwd("naive", q, k, v, bias, mask, scale)


def window_attention_bwd_naive(dout, cache):
    """Explicit backward, one thread per gradient element; dS goes through device memory."""
    return _window_bwd("naive", dout, cache)


def window_attention_fwd_fused(q, k, v, bias, mask=None, scale=None):
    """One block per (window, head): scores in shared memory, fused bias+mask+softmax+P v."""
    return _window_fwd("fused", q, k, v, bias, mask, scale)


def window_attention_bwd_fused(dout, cache):
    """One block per (head, set of windows): P, dS in shared memory, bias gradient in per-block slabs."""
    return _window_bwd("fused", dout, cache)


def window_attention_fwd_static(q, k, v, bias, mask=None, scale=None):
    """The fused kernel compiled for this (N, hd): unrolled loops, score tiles in registers."""
    return _window_fwd("static", q, k, v, bias, mask, scale)


def window_attention_bwd_static(dout, cache):
    """The fused backward compiled for this (N, hd); bias-gradient shares in registers across windows."""
    return _window_bwd("static", dout, cache)


def window_attention_fwd(q, k, v, bias, mask=None, scale=None):
    """Mirrors :func:`sparx_ref.ref.window_attention.window_attention_fwd` on CuPy arrays.

    q, k, v ``(Bw, heads, N, hd)``; bias ``(heads, N, N)``; mask ``(nW, N, N)`` or None;
    scale multiplies q (default ``hd ** -0.5``). Returns ``out`` ``(Bw, heads, N, hd)`` and a
    cache with ``"probs"`` ``(Bw, heads, N, N)``, ``"q"`` (unscaled), ``"k"``, ``"v"``, ``"scale"``.
    Default version: ``static`` (fastest measured: benchmarks/RESULTS.md).
    """
    return window_attention_fwd_static(q, k, v, bias, mask, scale)


def window_attention_bwd(dout, cache):
    """Mirrors :func:`sparx_ref.ref.window_attention.window_attention_bwd`:
    ``{"q", "k", "v"}`` ``(Bw, heads, N, hd)`` and ``"bias"`` ``(heads, N, N)`` (summed over windows).
    Default version: ``static`` (fastest measured: benchmarks/RESULTS.md)."""
    return window_attention_bwd_static(dout, cache)


# --------------------------------------------------------------------------------------
# DMCA channel attention
# --------------------------------------------------------------------------------------
def dmca_dims(q, k, v, groups):
    """(B, C, Ls, L) of DMCA inputs q, k (B, C, Ls), v (B, C, L) of rank 3 (any array type: only
    the shapes are read), after checking them and that ``groups`` is a positive int dividing C."""
    B, C, Ls = (int(d) for d in q.shape)
    _shape("k", k, (B, C, Ls))
    if v.shape[0] != B or v.shape[1] != C:
        raise ValueError(f"v must have shape ({B}, {C}, L), got {tuple(v.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if C % groups:
        raise ValueError(f"C (q.shape[1])={C} must be divisible by groups={groups}")
    return B, C, Ls, int(v.shape[2])


def _dmca_inputs(q, k, v, groups):
    q = _device("q", q, 3)
    k = _device("k", k, 3)
    v = _device("v", v, 3)
    _same_dtype(q=q, k=k, v=v)
    dims = dmca_dims(q, k, v, groups)
    return q, k, v, int(groups), dims


@plan_cache
def dmca_fwd_plan(version, dims, groups, dtype):
    """The :class:`._plan.Plan` of a forward: dims = (B, C, Ls, L); inputs "q", "k" (B, C, Ls),
    "v" (B, C, L); output buffers "attn" (B, groups, g, g) and "out" (B, C, L)."""
    B, C, Ls, L = dims
    G, dtype = int(groups), np.dtype(dtype)
    g, BG = C // G, B * G
    alpha = 1.0 / math.sqrt(Ls)
    launches = (
        # scores(i, j) = sum_s q[i, s] k[j, s] / sqrt(Ls) per (image, group)
        _bmm_launch(version, dtype, "q", "k", "attn", BG, g, g, Ls, (g * Ls, Ls, 1), (g * Ls, 1, Ls), alpha),
        _softmax_launch(version, dtype, "attn", BG * g, g),
        # out(i, l) = sum_j P[i, j] v[j, l]
        _bmm_launch(version, dtype, "attn", "v", "out", BG, g, L, g, (g * g, g, 1), (g * L, L, 1), 1.0))
    return Plan(dtype, (("attn", (B, G, g, g)), ("out", (B, C, L))), launches)


@plan_cache
def dmca_bwd_plan(version, dims, groups, dtype):
    """The plan of a backward: inputs "q", "k", "v", "attn" (the forward's) and "dout" (B, C, L);
    output buffers "dq", "dk" (B, C, Ls), "dv" (B, C, L), scratch "dS" (B, groups, g, g)."""
    B, C, Ls, L = dims
    G, dtype = int(groups), np.dtype(dtype)
    g, BG = C // G, B * G
    alpha = 1.0 / math.sqrt(Ls)
    launches = (
        # dv(j, l) = sum_i P[i, j] dout[i, l]
        _bmm_launch(version, dtype, "attn", "dout", "dv", BG, g, L, g, (g * g, 1, g), (g * L, L, 1), 1.0),
        # dP(i, j) = sum_l dout[i, l] v[j, l], then dS in place
        _bmm_launch(version, dtype, "dout", "v", "dS", BG, g, g, L, (g * L, L, 1), (g * L, 1, L), 1.0),
        _softmax_bwd_launch(version, dtype, "attn", "dS", BG * g, g),
        # dq = dS k / sqrt(Ls) ; dk = dS^T q / sqrt(Ls)
        _bmm_launch(version, dtype, "dS", "k", "dq", BG, g, Ls, g, (g * g, g, 1), (g * Ls, Ls, 1), alpha),
        _bmm_launch(version, dtype, "dS", "q", "dk", BG, g, Ls, g, (g * g, 1, g), (g * Ls, Ls, 1), alpha))
    return Plan(dtype, (("dq", (B, C, Ls)), ("dk", (B, C, Ls)), ("dv", (B, C, L))), launches,
                scratch=(("dS", (B, G, g, g)),))


def _dmca_fwd(version, q, k, v, groups):
    q, k, v, G, dims = _dmca_inputs(q, k, v, groups)
    bufs = run_on_cupy(dmca_fwd_plan(version, dims, G, q.dtype), {"q": q, "k": k, "v": v}, _empty)
    return bufs["out"], {"q": q, "k": k, "v": v, "attn": bufs["attn"], "groups": G}


def _dmca_bwd(version, dout, cache):
    q, k, v, attn, G = cache["q"], cache["k"], cache["v"], cache["attn"], cache["groups"]
    dout = _device("dout", dout, 3)
    if dout.dtype != q.dtype:
        raise TypeError(f"dout must have dtype {q.dtype} (like the forward inputs), got {dout.dtype}")
    _shape("dout", dout, v.shape)
    dims = tuple(q.shape) + (v.shape[2],)
    bufs = run_on_cupy(dmca_bwd_plan(version, dims, G, q.dtype),
                       {"q": q, "k": k, "v": v, "attn": attn, "dout": dout}, _empty)
    return {"q": bufs["dq"], "k": bufs["dk"], "v": bufs["dv"]}


@replayable(functools.partial(dmca_fwd_plan, "naive"))
def dmca_attention_fwd_naive(q, k, v, groups=4):
    """Explicit form, one thread per output element."""
    return _dmca_fwd("naive", q, k, v, groups)


@replayable(functools.partial(dmca_bwd_plan, "naive"))
def dmca_attention_bwd_naive(dout, cache):
    """Explicit backward, one thread per gradient element."""
    return _dmca_bwd("naive", dout, cache)


@replayable(functools.partial(dmca_fwd_plan, "tiled"))
def dmca_attention_fwd_tiled(q, k, v, groups=4):
    """Shared-memory tiled GEMMs (64x64 tiles, 4x4 per thread), one warp per softmax row."""
    return _dmca_fwd("tiled", q, k, v, groups)


@replayable(functools.partial(dmca_bwd_plan, "tiled"))
def dmca_attention_bwd_tiled(dout, cache):
    """Tiled backward: dv = P^T dout, dP = dout v^T, dS, dq = dS k, dk = dS^T q."""
    return _dmca_bwd("tiled", dout, cache)


@replayable(functools.partial(dmca_fwd_plan, "tiled"))
def dmca_attention_fwd(q, k, v, groups=4):
    """Mirrors :func:`sparx_ref.ref.dmca.dmca_attention_fwd` on CuPy arrays.

    q, k ``(B, C, Ls)``, v ``(B, C, L)``; per image and group of ``g = C/groups`` channels
    ``out_g = softmax(q_g k_g^T / sqrt(Ls)) v_g``. Returns ``out`` ``(B, C, L)`` and a cache
    with ``"attn"`` ``(B, groups, g, g)``. Default version: ``tiled``.
    """
    return dmca_attention_fwd_tiled(q, k, v, groups)


@replayable(functools.partial(dmca_bwd_plan, "tiled"))
def dmca_attention_bwd(dout, cache):
    """Mirrors :func:`sparx_ref.ref.dmca.dmca_attention_bwd`: ``{"q", "k", "v"}``. Default version: ``tiled``."""
    return dmca_attention_bwd_tiled(dout, cache)
