"""Numba-CUDA kernels for the two attention cores of SparX (Python written for the GPU).

Mirrors :mod:`sparx_ref.ref.window_attention` (``window_attention_fwd/bwd``) and
:mod:`sparx_ref.ref.dmca` (``dmca_attention_fwd/bwd``) with the same signatures, semantics
and returns, on device arrays: numba device arrays, CuPy arrays or anything exposing
``__cuda_array_interface__`` (outputs are CuPy arrays when the inputs were CuPy, numba
device arrays otherwise). float32 is the target; float64 works too; anything else raises
TypeError. The kernels also run under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
which is how CI tests them; there the fused and tiled kernels use smaller blocks.

The ladder is the one of :mod:`sparx_ref.kernels.cupy.attention` (read its docstring):
``naive`` (one thread per output element, every intermediate in device memory) and
``fused`` (window attention: one block per window and head, scores in shared memory),
``static`` (the fused kernels built per (N, hd) with constant loop bounds, tiles and bias-gradient
shares in registers; Numba compiles each shape once, about 20 s on a GPU machine) /
``tiled`` (DMCA: shared-memory tiled GEMMs), plus rungs of Numba's own with uint64 indices,
``tiled_unsigned`` (DMCA, see ``bmm_tiled_unsigned``) and ``static_unsigned`` (window attention,
see ``_build_static_unsigned``). Two differences,
both because the simulator has no warp shuffles: softmax rows are one thread per row (inside
the fused kernels, with separate coalesced passes for the device-memory reads and writes),
and the fused kernels fall back to ``naive`` when their shared-memory tiles would pass 48 KB
(float64 with 8 x 8 windows), since Numba cannot raise a kernel's dynamic shared-memory limit.

Every kernel works on flat, C-contiguous 1-D views; shapes and strides travel as ints.
Kernels are built per dtype by factories (``_build``): the dtype is a compile-time
constant there, so float32 arithmetic never widens to float64 through a Python literal.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

from ._launch import as_array, empty_flat, empty_flats, flat, foreign_flat, launch

__all__ = [
    "window_attention_fwd", "window_attention_bwd", "dmca_attention_fwd", "dmca_attention_bwd",
    "window_attention_fwd_naive", "window_attention_bwd_naive",
    "window_attention_fwd_fused", "window_attention_bwd_fused",
    "window_attention_fwd_static", "window_attention_bwd_static",
    "window_attention_fwd_static_unsigned", "window_attention_bwd_static_unsigned",
    "dmca_attention_fwd_naive", "dmca_attention_bwd_naive",
    "dmca_attention_fwd_tiled", "dmca_attention_bwd_tiled",
    "dmca_attention_fwd_tiled_unsigned", "dmca_attention_bwd_tiled_unsigned",
    "dmca_attention_fwd_tiled_staged", "dmca_attention_bwd_tiled_staged",
    "PTX_KERNELS",
]

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

MICRO = 4                         # every thread owns a MICRO x MICRO register tile
TK = 16                           # k chunk of the tiled GEMM
TILE = 32 if SIMULATOR else 64    # output tile side of the tiled GEMM (64 threads in the simulator)
THREADS = 64 if SIMULATOR else 256          # 1-D launches
FUSED_THREADS = 64 if SIMULATOR else 128    # fused window kernels
SMEM_LIMIT = 48 * 1024
NPART_MAX = 4 if SIMULATOR else 512         # bias-gradient slabs per head (fused/static backward)
STATIC_THREADS = 64 if SIMULATOR else 128   # static-shape window kernels
STAGED_THREADS = 64 if SIMULATOR else 128   # staged softmax rows (DMCA "tiled_staged")
_U = np.uint64                    # index type of the "tiled_unsigned" and "static_unsigned" kernels


def _build(T, tile):
    """Compile-once factory: every kernel for element type ``T`` (numba float32/float64)."""
    tpd = tile // MICRO
    tile_ld = tile + 1      # shared tile row length (+1 against bank conflicts); a compile-time constant
    zero = T(0)
    neg_big = T(-3.0e38)

    # ------------------------------------------------------------------ generic pieces
    @cuda.jit
    def bmm_naive(A, B, C, batch, M, N, K, sAb, sAm, sAk, sBb, sBk, sBn, alpha):
        """C[b, m, n] = alpha * sum_k A(b, m, k) B(b, k, n); one thread per output."""
        idx = cuda.grid(1)
        if idx >= batch * M * N:
            return
        n = idx % N
        t = idx // N
        m = t % M
        b = t // M
        a0 = b * sAb + m * sAm
        b0 = b * sBb + n * sBn
        acc = zero
        for k in range(K):
            acc += A[a0 + k * sAk] * B[b0 + k * sBk]
        C[idx] = alpha * acc

    @cuda.jit
    def bmm_tiled(A, B, C, batch, M, N, K, sAb, sAm, sAk, sBb, sBk, sBn, alpha):
        """tile x tile outputs per block, k in chunks of TK through shared memory,
        4x4 interleaved register tile per thread (rows ty + tpd*r, cols tx + tpd*c)."""
        As = cuda.shared.array((TK, tile_ld), T)
        Bs = cuda.shared.array((TK, tile_ld), T)
        tid = cuda.threadIdx.x
        tx = tid % tpd
        ty = tid // tpd
        m0 = cuda.blockIdx.y * tile
        n0 = cuda.blockIdx.x * tile
        b = cuda.blockIdx.z
        a_base = b * sAb
        b_base = b * sBb
        acc = cuda.local.array((MICRO, MICRO), T)
        for r in range(MICRO):
            for c in range(MICRO):
                acc[r, c] = zero
        a_k_contig = sAk == 1
        b_n_contig = sBn == 1
        for k0 in range(0, K, TK):
            for e in range(tid, tile * TK, tpd * tpd):
                if a_k_contig:
                    mm = e // TK
                    kk = e % TK
                else:
                    kk = e // tile
                    mm = e % tile
                gm = m0 + mm
                gk = k0 + kk
                if gm < M and gk < K:
                    As[kk, mm] = A[a_base + gm * sAm + gk * sAk]
                else:
                    As[kk, mm] = zero
                if b_n_contig:
                    kb = e // tile
                    nn = e % tile
                else:
                    nn = e // TK
                    kb = e % TK
                gn = n0 + nn
                gkb = k0 + kb
                if gn < N and gkb < K:
                    Bs[kb, nn] = B[b_base + gkb * sBk + gn * sBn]
                else:
                    Bs[kb, nn] = zero
            cuda.syncthreads()
            for kk in range(TK):
                a0 = As[kk, ty]
                a1 = As[kk, ty + tpd]
                a2 = As[kk, ty + 2 * tpd]
                a3 = As[kk, ty + 3 * tpd]
                for c in range(MICRO):
                    bv = Bs[kk, tx + tpd * c]
                    acc[0, c] += a0 * bv
                    acc[1, c] += a1 * bv
                    acc[2, c] += a2 * bv
                    acc[3, c] += a3 * bv
            cuda.syncthreads()
        c_base = b * M * N
        for r in range(MICRO):
            gm = m0 + ty + tpd * r
            if gm < M:
                for c in range(MICRO):
                    gn = n0 + tx + tpd * c
                    if gn < N:
                        C[c_base + gm * N + gn] = alpha * acc[r, c]

    # Rung "tiled_unsigned" (Numba only): bmm_tiled with every index an unsigned 64-bit integer.
    # Numba types integer indices as signed int64 and, wherever it cannot prove an index >= 0, adds
    # Python's negative-index wrap-around fix-up at the access (and floor-division fix-ups to // and
    # %); with uint64 indices there are none. Numba types uint64 op int64 as float64, so every
    # constant and counter here is uint64 (the u_* values), the loops are while loops, and the
    # shared tiles are flat 1-D arrays (a [kk, mm] index would be two signed indices again).
    u_tk, u_tile, u_tpd, u_ld = _U(TK), _U(tile), _U(tpd), _U(tile_ld)
    u_threads, u_micro = _U(tpd * tpd), _U(MICRO)
    flat_tile = TK * tile_ld    # a compile-time constant for cuda.shared.array
    assert tile * TK % (tpd * tpd) == 0
    u_loads = _U(tile * TK // (tpd * tpd))      # elements of each (TK, tile) tile every thread loads

    @cuda.jit
    def bmm_tiled_unsigned(A, B, C, batch, M, N, K, sAb, sAm, sAk, sBb, sBk, sBn, alpha):
        """bmm_tiled (same tiles, same sums in the same order) with uint64 index arithmetic.
        Shared As, Bs [TK][tile_ld] flat: element (kk, mm) at kk * tile_ld + mm."""
        As = cuda.shared.array(flat_tile, T)
        Bs = cuda.shared.array(flat_tile, T)
        Mu, Nu, Ku = _U(M), _U(N), _U(K)
        s_am, s_ak, s_bk, s_bn = _U(sAm), _U(sAk), _U(sBk), _U(sBn)
        tid = _U(cuda.threadIdx.x)
        tx = tid % u_tpd
        ty = tid // u_tpd
        m0 = _U(cuda.blockIdx.y) * u_tile
        n0 = _U(cuda.blockIdx.x) * u_tile
        b = _U(cuda.blockIdx.z)
        a_base = b * _U(sAb)
        b_base = b * _U(sBb)
        acc = cuda.local.array((MICRO, MICRO), T)
        for r in range(MICRO):
            for c in range(MICRO):
                acc[r, c] = zero
        a_k_contig = sAk == 1
        b_n_contig = sBn == 1
        k0 = _U(0)
        while k0 < Ku:
            j = _U(0)
            while j < u_loads:                  # element e = tid + j * threads of each tile
                e = tid + j * u_threads
                if a_k_contig:
                    mm = e // u_tk
                    kk = e % u_tk
                else:
                    kk = e // u_tile
                    mm = e % u_tile
                gm = m0 + mm
                gk = k0 + kk
                if gm < Mu and gk < Ku:
                    As[kk * u_ld + mm] = A[a_base + gm * s_am + gk * s_ak]
                else:
                    As[kk * u_ld + mm] = zero
                if b_n_contig:
                    kb = e // u_tile
                    nn = e % u_tile
                else:
                    nn = e // u_tk
                    kb = e % u_tk
                gn = n0 + nn
                gkb = k0 + kb
                if gn < Nu and gkb < Ku:
                    Bs[kb * u_ld + nn] = B[b_base + gkb * s_bk + gn * s_bn]
                else:
                    Bs[kb * u_ld + nn] = zero
                j += _U(1)
            cuda.syncthreads()
            kk = _U(0)
            while kk < u_tk:
                row = kk * u_ld
                a0 = As[row + ty]
                a1 = As[row + ty + u_tpd]
                a2 = As[row + ty + _U(2) * u_tpd]
                a3 = As[row + ty + _U(3) * u_tpd]
                c = _U(0)
                while c < u_micro:
                    bv = Bs[row + tx + u_tpd * c]
                    acc[0, c] += a0 * bv
                    acc[1, c] += a1 * bv
                    acc[2, c] += a2 * bv
                    acc[3, c] += a3 * bv
                    c += _U(1)
                kk += _U(1)
            cuda.syncthreads()
            k0 += u_tk
        c_base = b * Mu * Nu
        r = _U(0)
        while r < u_micro:
            gm = m0 + ty + u_tpd * r
            if gm < Mu:
                c = _U(0)
                while c < u_micro:
                    gn = n0 + tx + u_tpd * c
                    if gn < Nu:
                        C[c_base + gm * Nu + gn] = alpha * acc[r, c]
                    c += _U(1)
            r += _U(1)

    @cuda.jit
    def softmax_rows(S, bias, mask, rows, N, nH, nW, has_bias, has_mask):
        """Row r = (bw*nH + h)*N + i of S (rows, N): add bias[h], mask[bw % nW]; softmax in place.
        One thread per row."""
        r = cuda.grid(1)
        if r >= rows:
            return
        i = r % N
        bh = r // N
        h = bh % nH
        w = (bh // nH) % nW
        s0 = r * N
        mx = neg_big
        for j in range(N):
            x = S[s0 + j]
            if has_bias:
                x += bias[(h * N + i) * N + j]
            if has_mask:
                x += mask[(w * N + i) * N + j]
            S[s0 + j] = x
            mx = max(mx, x)
        total = zero
        for j in range(N):
            e = math.exp(S[s0 + j] - mx)
            S[s0 + j] = e
            total += e
        for j in range(N):
            S[s0 + j] = S[s0 + j] / total

    @cuda.jit
    def softmax_bwd_rows(P, dP, rows, N):
        """dS = P * (dP - sum_j P*dP) over dP; one thread per row."""
        r = cuda.grid(1)
        if r >= rows:
            return
        s0 = r * N
        dot = zero
        for j in range(N):
            dot += P[s0 + j] * dP[s0 + j]
        for j in range(N):
            dP[s0 + j] = P[s0 + j] * (dP[s0 + j] - dot)

    # One softmax row's arithmetic with uint64 indices, on a row of a global or a shared array
    # (the "tiled_unsigned" and "tiled_staged" kernels share it).
    @cuda.jit(device=True, inline=True)
    def row_exp_normalize(buf, s0, Nu, mx):
        """buf[s0 + j] <- exp(buf[s0 + j] - mx) / sum_j exp(buf[s0 + j] - mx), j < N."""
        total = zero
        j = _U(0)
        while j < Nu:
            e = math.exp(buf[s0 + j] - mx)
            buf[s0 + j] = e
            total += e
            j += _U(1)
        j = _U(0)
        while j < Nu:
            buf[s0 + j] = buf[s0 + j] / total
            j += _U(1)

    @cuda.jit(device=True, inline=True)
    def row_softmax_bwd(p, p0, d, d0, Nu):
        """d[d0 + j] <- p[p0 + j] * (d[d0 + j] - sum_j p[p0 + j] * d[d0 + j]), j < N."""
        dot = zero
        j = _U(0)
        while j < Nu:
            dot += p[p0 + j] * d[d0 + j]
            j += _U(1)
        j = _U(0)
        while j < Nu:
            d[d0 + j] = p[p0 + j] * (d[d0 + j] - dot)
            j += _U(1)

    @cuda.jit
    def softmax_rows_unsigned(S, bias, mask, rows, N, nH, nW, has_bias, has_mask):
        """softmax_rows with uint64 index arithmetic (see bmm_tiled_unsigned); one thread per row."""
        r = _U(cuda.grid(1))
        Nu = _U(N)
        if r >= _U(rows):
            return
        i = r % Nu
        bh = r // Nu
        h = bh % _U(nH)
        w = (bh // _U(nH)) % _U(nW)
        s0 = r * Nu
        b0 = (h * Nu + i) * Nu
        m0 = (w * Nu + i) * Nu
        mx = neg_big
        j = _U(0)
        while j < Nu:
            x = S[s0 + j]
            if has_bias:
                x += bias[b0 + j]
            if has_mask:
                x += mask[m0 + j]
            S[s0 + j] = x
            mx = max(mx, x)
            j += _U(1)
        row_exp_normalize(S, s0, Nu, mx)

    @cuda.jit
    def softmax_bwd_rows_unsigned(P, dP, rows, N):
        """softmax_bwd_rows with uint64 index arithmetic (see bmm_tiled_unsigned)."""
        r = _U(cuda.grid(1))
        Nu = _U(N)
        if r >= _U(rows):
            return
        s0 = r * Nu
        row_softmax_bwd(P, s0, dP, s0, Nu)

    # Softmax rows staged through shared memory (rung "tiled_staged"). One thread per row reads
    # its row with a stride of N elements between neighbouring threads: every load and store is
    # uncoalesced. Here a block first copies R consecutive rows (R * N contiguous elements) into
    # shared memory with consecutive threads on consecutive elements, one thread per row then works
    # on its shared row (row pitch N | 1 is odd: the R threads hit R different banks), and the
    # block copies the rows back the same coalesced way. The row arithmetic is that of
    # softmax_rows_unsigned / softmax_bwd_rows_unsigned (row_exp_normalize, row_softmax_bwd).
    @cuda.jit(device=True, inline=True)
    def stage_rows(tile, at, src, base, count, Nu, pitch, tid, nthreads):
        """tile[at + (e // N) * pitch + e % N] = src[base + e] for e < count (coalesced reads)."""
        e = tid
        while e < count:
            tile[at + (e // Nu) * pitch + e % Nu] = src[base + e]
            e += nthreads

    @cuda.jit(device=True, inline=True)
    def unstage_rows(dst, base, tile, at, count, Nu, pitch, tid, nthreads):
        """dst[base + e] = tile[at + (e // N) * pitch + e % N] for e < count (coalesced writes)."""
        e = tid
        while e < count:
            dst[base + e] = tile[at + (e // Nu) * pitch + e % Nu]
            e += nthreads

    @cuda.jit(device=True, inline=True)
    def staged_block(rows, N, R, pitch):
        """This block's share, all uint64: (N, R, pitch, thread, threads, rows it holds (<= R),
        offset of its first element)."""
        Nu, Ru = _U(N), _U(R)
        r0 = _U(cuda.blockIdx.x) * Ru
        return Nu, Ru, _U(pitch), _U(cuda.threadIdx.x), _U(cuda.blockDim.x), min(Ru, _U(rows) - r0), r0 * Nu

    @cuda.jit
    def softmax_rows_staged(S, rows, N, R, pitch):
        """Softmax in place over each row of S (rows, N), R rows per block through shared memory
        (dynamic: R * pitch elements, pitch = N | 1). No bias or mask (the DMCA softmax)."""
        tile = cuda.shared.array(0, T)
        Nu, Ru, pu, tid, nthreads, nrows, base = staged_block(rows, N, R, pitch)
        stage_rows(tile, _U(0), S, base, nrows * Nu, Nu, pu, tid, nthreads)
        cuda.syncthreads()
        if tid < nrows:
            s0 = tid * pu
            mx = neg_big
            j = _U(0)
            while j < Nu:
                mx = max(mx, tile[s0 + j])
                j += _U(1)
            row_exp_normalize(tile, s0, Nu, mx)
        cuda.syncthreads()
        unstage_rows(S, base, tile, _U(0), nrows * Nu, Nu, pu, tid, nthreads)

    @cuda.jit
    def softmax_bwd_rows_staged(P, dP, rows, N, R, pitch):
        """dS = P * (dP - sum_j P*dP) over dP, R rows per block through shared memory (dynamic:
        2 * R * pitch elements: the P rows, then the dP rows)."""
        tile = cuda.shared.array(0, T)
        Nu, Ru, pu, tid, nthreads, nrows, base = staged_block(rows, N, R, pitch)
        d_off = Ru * pu                      # where the dP rows start in the shared array
        stage_rows(tile, _U(0), P, base, nrows * Nu, Nu, pu, tid, nthreads)
        stage_rows(tile, d_off, dP, base, nrows * Nu, Nu, pu, tid, nthreads)
        cuda.syncthreads()
        if tid < nrows:
            s0 = tid * pu
            row_softmax_bwd(tile, s0, tile, d_off + s0, Nu)
        cuda.syncthreads()
        unstage_rows(dP, base, tile, d_off, nrows * Nu, Nu, pu, tid, nthreads)

    @cuda.jit
    def sum_leading(X, out, nb, inner):
        """out[e] = sum_b X[b*inner + e]; one thread per e (coalesced)."""
        e = cuda.grid(1)
        if e >= inner:
            return
        acc = zero
        for b in range(nb):
            acc += X[b * inner + e]
        out[e] = acc

    # ------------------------------------------------------------------ fused window attention
    @cuda.jit(device=True, inline=True)
    def tile_mm(sm, xo, xs, xk, yo, ys, yk, ra, cb, kn, acc):
        """acc[r, c] += sum_{kk<kn} X(ra[r], kk) Y(cb[c], kk), X(row, kk) = sm[xo + row*xs + kk*xk]."""
        for kk in range(kn):
            a0 = sm[xo + ra[0] * xs + kk * xk]
            a1 = sm[xo + ra[1] * xs + kk * xk]
            a2 = sm[xo + ra[2] * xs + kk * xk]
            a3 = sm[xo + ra[3] * xs + kk * xk]
            for c in range(MICRO):
                bv = sm[yo + cb[c] * ys + kk * yk]
                acc[0, c] += a0 * bv
                acc[1, c] += a1 * bv
                acc[2, c] += a2 * bv
                acc[3, c] += a3 * bv

    @cuda.jit(device=True, inline=True)
    def zero_acc(acc):
        for r in range(MICRO):
            for c in range(MICRO):
                acc[r, c] = zero

    @cuda.jit(device=True, inline=True)
    def load_chunk(sm, dst, ld, src, base, N, HD, d0, dc, mul):
        """sm[dst + i*ld + dd] = mul * src[base + i*HD + d0 + dd] for i < N, dd < dc."""
        for e in range(cuda.threadIdx.x, N * dc, cuda.blockDim.x):
            i = e // dc
            dd = e % dc
            sm[dst + i * ld + dd] = mul * src[base + i * HD + d0 + dd]

    @cuda.jit
    def window_fwd_fused(q, k, v, bias, mask, out, probs, nH, N, HD, nW, has_mask, DC, scale):
        """One block per (window bw, head h), blockIdx.x = bw*nH + h.
        Shared: S [N][N+1] scores then probabilities; X, Y [N][DC+1] head-dim chunks."""
        sm = cuda.shared.array(0, T)
        LDS = N + 1
        LDC = DC + 1
        S = 0
        X = N * LDS
        Y = X + N * LDC
        bh = cuda.blockIdx.x
        h = bh % nH
        w = (bh // nH) % nW
        base = bh * N * HD
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        NT = (N + MICRO - 1) // MICRO
        ra = cuda.local.array(MICRO, np.int32)
        cb = cuda.local.array(MICRO, np.int32)
        acc = cuda.local.array((MICRO, MICRO), T)
        for e in range(tid, N * LDS, nt):
            sm[S + e] = zero
        # scores S = (scale q) k^T accumulated over head-dim chunks
        for d0 in range(0, HD, DC):
            dc = min(DC, HD - d0)
            load_chunk(sm, X, LDC, q, base, N, HD, d0, dc, scale)
            load_chunk(sm, Y, LDC, k, base, N, HD, d0, dc, T(1))
            cuda.syncthreads()
            for t in range(tid, NT * NT, nt):
                ti = t // NT
                tj = t % NT
                for r in range(MICRO):
                    ra[r] = min(ti + NT * r, N - 1)
                    cb[r] = min(tj + NT * r, N - 1)
                zero_acc(acc)
                tile_mm(sm, X, LDC, 1, Y, LDC, 1, ra, cb, dc, acc)
                for r in range(MICRO):
                    i = ti + NT * r
                    for c in range(MICRO):
                        j = tj + NT * c
                        if i < N and j < N:
                            sm[S + i * LDS + j] += acc[r, c]
            cuda.syncthreads()
        # + bias (+ mask): coalesced pass over the (N, N) tables
        for e in range(tid, N * N, nt):
            i = e // N
            j = e % N
            x = sm[S + i * LDS + j] + bias[h * N * N + e]
            if has_mask:
                x += mask[w * N * N + e]
            sm[S + i * LDS + j] = x
        cuda.syncthreads()
        # softmax: one thread per row
        for i in range(tid, N, nt):
            mx = neg_big
            for j in range(N):
                mx = max(mx, sm[S + i * LDS + j])
            total = zero
            for j in range(N):
                ex = math.exp(sm[S + i * LDS + j] - mx)
                sm[S + i * LDS + j] = ex
                total += ex
            for j in range(N):
                sm[S + i * LDS + j] = sm[S + i * LDS + j] / total
        cuda.syncthreads()
        # probabilities to the cache: coalesced
        for e in range(tid, N * N, nt):
            probs[bh * N * N + e] = sm[S + (e // N) * LDS + e % N]
        # out = P v per head-dim chunk
        for d0 in range(0, HD, DC):
            dc = min(DC, HD - d0)
            DT = (dc + MICRO - 1) // MICRO
            load_chunk(sm, Y, LDC, v, base, N, HD, d0, dc, T(1))
            cuda.syncthreads()
            for t in range(tid, NT * DT, nt):
                ti = t // DT
                td = t % DT
                for r in range(MICRO):
                    ra[r] = min(ti + NT * r, N - 1)
                    cb[r] = min(td + DT * r, dc - 1)
                zero_acc(acc)
                tile_mm(sm, S, LDS, 1, Y, 1, LDC, ra, cb, N, acc)
                for r in range(MICRO):
                    i = ti + NT * r
                    for c in range(MICRO):
                        dd = td + DT * c
                        if i < N and dd < dc:
                            out[base + i * HD + d0 + dd] = acc[r, c]
            cuda.syncthreads()

    @cuda.jit
    def window_bwd_fused(q, k, v, probs, dout, dq, dk, dv, partial, Bw, nH, N, HD, DC, scale):
        """Grid (npart, nH): block (p, h) walks windows bw = p, p+npart, ... of head h.
        Shared: P, D [N][N+1] (D = dP, then dS), X, Y [N][DC+1]. partial[p, h] += dS."""
        sm = cuda.shared.array(0, T)
        LDS = N + 1
        LDC = DC + 1
        P = 0
        D = N * LDS
        X = D + N * LDS
        Y = X + N * LDC
        p = cuda.blockIdx.x
        npart = cuda.gridDim.x
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        NT = (N + MICRO - 1) // MICRO
        slab = (p * nH + h) * N * N
        ra = cuda.local.array(MICRO, np.int32)
        cb = cuda.local.array(MICRO, np.int32)
        acc = cuda.local.array((MICRO, MICRO), T)
        for e in range(tid, N * N, nt):
            partial[slab + e] = zero
        for bw in range(p, Bw, npart):
            bh = bw * nH + h
            base = bh * N * HD
            for e in range(tid, N * N, nt):
                i = e // N
                j = e % N
                sm[P + i * LDS + j] = probs[bh * N * N + e]
                sm[D + i * LDS + j] = zero
            # dP = dout v^T over head-dim chunks
            for d0 in range(0, HD, DC):
                dc = min(DC, HD - d0)
                load_chunk(sm, X, LDC, dout, base, N, HD, d0, dc, T(1))
                load_chunk(sm, Y, LDC, v, base, N, HD, d0, dc, T(1))
                cuda.syncthreads()
                for t in range(tid, NT * NT, nt):
                    ti = t // NT
                    tj = t % NT
                    for r in range(MICRO):
                        ra[r] = min(ti + NT * r, N - 1)
                        cb[r] = min(tj + NT * r, N - 1)
                    zero_acc(acc)
                    tile_mm(sm, X, LDC, 1, Y, LDC, 1, ra, cb, dc, acc)
                    for r in range(MICRO):
                        i = ti + NT * r
                        for c in range(MICRO):
                            j = tj + NT * c
                            if i < N and j < N:
                                sm[D + i * LDS + j] += acc[r, c]
                cuda.syncthreads()
            # dS = P * (dP - rowsum(P * dP)): one thread per row
            for i in range(tid, N, nt):
                dot = zero
                for j in range(N):
                    dot += sm[P + i * LDS + j] * sm[D + i * LDS + j]
                for j in range(N):
                    sm[D + i * LDS + j] = sm[P + i * LDS + j] * (sm[D + i * LDS + j] - dot)
            cuda.syncthreads()
            # this block's bias-gradient slab: coalesced, each element always by the same thread
            for e in range(tid, N * N, nt):
                partial[slab + e] += sm[D + (e // N) * LDS + e % N]
            # per chunk: dv = P^T dout and dq = scale dS k; then dk = dS^T (scale q)
            for d0 in range(0, HD, DC):
                dc = min(DC, HD - d0)
                DT = (dc + MICRO - 1) // MICRO
                load_chunk(sm, X, LDC, dout, base, N, HD, d0, dc, T(1))
                load_chunk(sm, Y, LDC, k, base, N, HD, d0, dc, T(1))
                cuda.syncthreads()
                for t in range(tid, NT * DT, nt):
                    ti = t // DT
                    td = t % DT
                    for r in range(MICRO):
                        ra[r] = min(ti + NT * r, N - 1)
                        cb[r] = min(td + DT * r, dc - 1)
                    zero_acc(acc)
                    tile_mm(sm, P, 1, LDS, X, 1, LDC, ra, cb, N, acc)   # rows are keys j
                    for r in range(MICRO):
                        j = ti + NT * r
                        for c in range(MICRO):
                            dd = td + DT * c
                            if j < N and dd < dc:
                                dv[base + j * HD + d0 + dd] = acc[r, c]
                    zero_acc(acc)
                    tile_mm(sm, D, LDS, 1, Y, 1, LDC, ra, cb, N, acc)   # rows are queries i
                    for r in range(MICRO):
                        i = ti + NT * r
                        for c in range(MICRO):
                            dd = td + DT * c
                            if i < N and dd < dc:
                                dq[base + i * HD + d0 + dd] = scale * acc[r, c]
                cuda.syncthreads()
                load_chunk(sm, X, LDC, q, base, N, HD, d0, dc, scale)
                cuda.syncthreads()
                for t in range(tid, NT * DT, nt):
                    ti = t // DT
                    td = t % DT
                    for r in range(MICRO):
                        ra[r] = min(ti + NT * r, N - 1)
                        cb[r] = min(td + DT * r, dc - 1)
                    zero_acc(acc)
                    tile_mm(sm, D, 1, LDS, X, 1, LDC, ra, cb, N, acc)   # rows are keys j
                    for r in range(MICRO):
                        j = ti + NT * r
                        for c in range(MICRO):
                            dd = td + DT * c
                            if j < N and dd < dc:
                                dk[base + j * HD + d0 + dd] = acc[r, c]
                cuda.syncthreads()

    return {"bmm_naive": bmm_naive, "bmm_tiled": bmm_tiled, "bmm_tiled_unsigned": bmm_tiled_unsigned,
            "softmax_rows": softmax_rows, "softmax_bwd_rows": softmax_bwd_rows,
            "softmax_rows_unsigned": softmax_rows_unsigned, "softmax_bwd_rows_unsigned": softmax_bwd_rows_unsigned,
            "softmax_rows_staged": softmax_rows_staged, "softmax_bwd_rows_staged": softmax_bwd_rows_staged,
            "sum_leading": sum_leading,
            "window_fwd_fused": window_fwd_fused, "window_bwd_fused": window_bwd_fused}


def _static_dims(N, HD, DC, NTH):
    """Compile-time sizes of the static kernels (both rungs) for N tokens, head dim HD, head-dim
    chunk DC and NTH threads."""
    NTL = (N + MICRO - 1) // MICRO      # 4x4 tiles per token side
    LDS = N + 1                         # shared row length of N x N tables
    LDC = DC + 1                        # shared row length of head chunks
    NCH = (HD + DC - 1) // DC           # head-dim chunks
    DTL = DC // MICRO                   # 4-wide tiles per chunk
    SQ = (NTL * NTL + NTH - 1) // NTH   # rounds of N x N tiles per thread
    NV = (NTL * DTL + NTH - 1) // NTH   # rounds of N x chunk tiles per thread
    NB = (N * N + NTH - 1) // NTH       # bias-gradient entries per thread
    return NTL, LDS, LDC, NCH, DTL, SQ, NV, NB, N * LDS, N * LDC   # ..., S_SIZE, C_SIZE


def _build_static(T, N, HD, DC, NTH):
    """The "static" rung: fused window kernels for one (N, hd) with every loop bound a
    compile-time constant (closure constants), score tiles and the thread's share of the bias
    gradient in registers. Mirrors ``window_fwd_static``/``window_bwd_static`` of the CuPy module,
    except that softmax rows are one thread each (the simulator has no warp shuffles)."""
    NTL, LDS, LDC, NCH, DTL, SQ, NV, NB, S_SIZE, C_SIZE = _static_dims(N, HD, DC, NTH)
    NN = N * N
    NHD = N * HD
    zero = T(0)
    one = T(1)
    neg_big = T(-3.0e38)

    @cuda.jit(device=True, inline=True)
    def s_load(dst, src, base, c, mul):
        """dst[i][dd] = mul * src[base + i*HD + c*DC + dd], zero past the head width."""
        for e in range(cuda.threadIdx.x, N * DC, NTH):
            i = e // DC
            dd = e % DC
            d = c * DC + dd
            if d < HD:
                dst[i * LDC + dd] = mul * src[base + i * HD + d]
            else:
                dst[i * LDC + dd] = zero

    @cuda.jit(device=True, inline=True)
    def s_tile(A, AS, AK, B, BS, BK, ra, cb, KN, acc, rd):
        """acc[rd, r, c] += sum_{kk<KN} A[ra[r]*AS + kk*AK] * B[cb[c]*BS + kk*BK]."""
        a0o = ra[0] * AS
        a1o = ra[1] * AS
        a2o = ra[2] * AS
        a3o = ra[3] * AS
        b0o = cb[0] * BS
        b1o = cb[1] * BS
        b2o = cb[2] * BS
        b3o = cb[3] * BS
        for kk in range(KN):
            a0 = A[a0o + kk * AK]
            a1 = A[a1o + kk * AK]
            a2 = A[a2o + kk * AK]
            a3 = A[a3o + kk * AK]
            b0 = B[b0o + kk * BK]
            b1 = B[b1o + kk * BK]
            b2 = B[b2o + kk * BK]
            b3 = B[b3o + kk * BK]
            acc[rd, 0, 0] += a0 * b0
            acc[rd, 0, 1] += a0 * b1
            acc[rd, 0, 2] += a0 * b2
            acc[rd, 0, 3] += a0 * b3
            acc[rd, 1, 0] += a1 * b0
            acc[rd, 1, 1] += a1 * b1
            acc[rd, 1, 2] += a1 * b2
            acc[rd, 1, 3] += a1 * b3
            acc[rd, 2, 0] += a2 * b0
            acc[rd, 2, 1] += a2 * b1
            acc[rd, 2, 2] += a2 * b2
            acc[rd, 2, 3] += a2 * b3
            acc[rd, 3, 0] += a3 * b0
            acc[rd, 3, 1] += a3 * b1
            acc[rd, 3, 2] += a3 * b2
            acc[rd, 3, 3] += a3 * b3

    @cuda.jit(device=True, inline=True)
    def zero3(acc, rounds):
        for rd in range(rounds):
            for r in range(MICRO):
                for c in range(MICRO):
                    acc[rd, r, c] = zero

    @cuda.jit(device=True, inline=True)
    def tok_tile(t, ra, cb):
        ti = t // NTL
        tj = t % NTL
        for r in range(MICRO):
            ra[r] = min(ti + NTL * r, N - 1)
            cb[r] = min(tj + NTL * r, N - 1)

    @cuda.jit(device=True, inline=True)
    def chunk_tile(t, ra, cb):
        ti = t // DTL
        td = t % DTL
        for r in range(MICRO):
            ra[r] = min(ti + NTL * r, N - 1)
            cb[r] = td + DTL * r

    @cuda.jit(device=True, inline=True)
    def chunk_store(dst, base, t, c, mul, acc):
        ti = t // DTL
        td = t % DTL
        for r in range(MICRO):
            row = ti + NTL * r
            for cc in range(MICRO):
                d = c * DC + td + DTL * cc
                if row < N and d < HD:
                    dst[base + row * HD + d] = mul * acc[0, r, cc]

    @cuda.jit(device=True, inline=True)
    def tok_store(S, t, acc, rd):
        ti = t // NTL
        tj = t % NTL
        for r in range(MICRO):
            i = ti + NTL * r
            for c in range(MICRO):
                j = tj + NTL * c
                if i < N and j < N:
                    S[i * LDS + j] = acc[rd, r, c]

    @cuda.jit
    def window_fwd_static(q, k, v, bias, mask, out, probs, nH, nW, has_mask, scale):
        S = cuda.shared.array(S_SIZE, T)
        X = cuda.shared.array(C_SIZE, T)
        Y = cuda.shared.array(C_SIZE, T)
        tid = cuda.threadIdx.x
        bh = cuda.blockIdx.x
        h = bh % nH
        w = (bh // nH) % nW
        base = bh * NHD
        ra = cuda.local.array(MICRO, np.int32)
        cb = cuda.local.array(MICRO, np.int32)
        acc = cuda.local.array((SQ, MICRO, MICRO), T)
        a1 = cuda.local.array((1, MICRO, MICRO), T)
        zero3(acc, SQ)
        for c in range(NCH):
            if c > 0:
                cuda.syncthreads()
            s_load(X, q, base, c, scale)
            s_load(Y, k, base, c, one)
            cuda.syncthreads()
            for rd in range(SQ):
                t = tid + rd * NTH
                if t < NTL * NTL:
                    tok_tile(t, ra, cb)
                    s_tile(X, LDC, 1, Y, LDC, 1, ra, cb, DC, acc, rd)
        for rd in range(SQ):
            t = tid + rd * NTH
            if t < NTL * NTL:
                tok_store(S, t, acc, rd)
        cuda.syncthreads()
        # + bias (+ mask): coalesced over the (N, N) tables
        for e in range(tid, NN, NTH):
            i = e // N
            j = e % N
            x = S[i * LDS + j] + bias[h * NN + e]
            if has_mask:
                x += mask[w * NN + e]
            S[i * LDS + j] = x
        cuda.syncthreads()
        for i in range(tid, N, NTH):            # softmax: one thread per row
            mx = neg_big
            for j in range(N):
                mx = max(mx, S[i * LDS + j])
            total = zero
            for j in range(N):
                ex = math.exp(S[i * LDS + j] - mx)
                S[i * LDS + j] = ex
                total += ex
            inv = one / total
            for j in range(N):
                S[i * LDS + j] = S[i * LDS + j] * inv
        cuda.syncthreads()
        for e in range(tid, NN, NTH):
            probs[bh * NN + e] = S[(e // N) * LDS + e % N]
        for c in range(NCH):
            if c > 0:
                cuda.syncthreads()
            s_load(Y, v, base, c, one)
            cuda.syncthreads()
            for rd in range(NV):
                t = tid + rd * NTH
                if t < NTL * DTL:
                    chunk_tile(t, ra, cb)
                    zero3(a1, 1)
                    s_tile(S, LDS, 1, Y, 1, LDC, ra, cb, N, a1, 0)
                    chunk_store(out, base, t, c, one, a1)

    @cuda.jit
    def window_bwd_static(q, k, v, probs, dout, dq, dk, dv, partial, Bw, nH, scale):
        P = cuda.shared.array(S_SIZE, T)
        D = cuda.shared.array(S_SIZE, T)
        X = cuda.shared.array(C_SIZE, T)
        Y = cuda.shared.array(C_SIZE, T)
        p = cuda.blockIdx.x
        npart = cuda.gridDim.x
        h = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        ra = cuda.local.array(MICRO, np.int32)
        cb = cuda.local.array(MICRO, np.int32)
        acc = cuda.local.array((SQ, MICRO, MICRO), T)
        a1 = cuda.local.array((1, MICRO, MICRO), T)
        breg = cuda.local.array(NB, T)
        for u in range(NB):
            breg[u] = zero
        for bw in range(p, Bw, npart):
            bh = bw * nH + h
            base = bh * NHD
            for e in range(tid, NN, NTH):
                P[(e // N) * LDS + e % N] = probs[bh * NN + e]
            zero3(acc, SQ)
            for c in range(NCH):
                if c > 0:
                    cuda.syncthreads()
                s_load(X, dout, base, c, one)
                s_load(Y, v, base, c, one)
                cuda.syncthreads()
                for rd in range(SQ):
                    t = tid + rd * NTH
                    if t < NTL * NTL:
                        tok_tile(t, ra, cb)
                        s_tile(X, LDC, 1, Y, LDC, 1, ra, cb, DC, acc, rd)
            for rd in range(SQ):
                t = tid + rd * NTH
                if t < NTL * NTL:
                    tok_store(D, t, acc, rd)
            cuda.syncthreads()
            for i in range(tid, N, NTH):        # dS = P * (dP - rowsum(P dP)): one thread per row
                dot = zero
                for j in range(N):
                    dot += P[i * LDS + j] * D[i * LDS + j]
                for j in range(N):
                    D[i * LDS + j] = P[i * LDS + j] * (D[i * LDS + j] - dot)
            cuda.syncthreads()
            for u in range(NB):                 # bias-gradient shares stay in registers
                e = tid + u * NTH
                if e < NN:
                    breg[u] += D[(e // N) * LDS + e % N]
            for c in range(NCH):
                s_load(X, dout, base, c, one)
                s_load(Y, k, base, c, one)
                cuda.syncthreads()
                for rd in range(NV):
                    t = tid + rd * NTH
                    if t < NTL * DTL:
                        chunk_tile(t, ra, cb)
                        zero3(a1, 1)
                        s_tile(P, 1, LDS, X, 1, LDC, ra, cb, N, a1, 0)     # dv = P^T dout
                        chunk_store(dv, base, t, c, one, a1)
                        zero3(a1, 1)
                        s_tile(D, LDS, 1, Y, 1, LDC, ra, cb, N, a1, 0)     # dq = scale dS k
                        chunk_store(dq, base, t, c, scale, a1)
                cuda.syncthreads()
                s_load(X, q, base, c, scale)
                cuda.syncthreads()
                for rd in range(NV):
                    t = tid + rd * NTH
                    if t < NTL * DTL:
                        chunk_tile(t, ra, cb)
                        zero3(a1, 1)
                        s_tile(D, 1, LDS, X, 1, LDC, ra, cb, N, a1, 0)     # dk = dS^T (scale q)
                        chunk_store(dk, base, t, c, one, a1)
                cuda.syncthreads()
        slab = (p * nH + h) * NN
        for u in range(NB):
            e = tid + u * NTH
            if e < NN:
                partial[slab + e] = breg[u]

    return {"window_fwd_static": window_fwd_static, "window_bwd_static": window_bwd_static}


def _build_static_unsigned(T, N, HD, DC, NTH):
    """Rung "static_unsigned" (Numba only): the static kernels of :func:`_build_static` (same
    tiles, same sums in the same order) with every index an unsigned 64-bit integer, the idea of
    ``bmm_tiled_unsigned``. Signed, Numba adds the negative-index wrap-around fix-up to every
    access whose index it cannot prove >= 0 (all of them here: the row/column indices of a tile
    come out of a local array) and floor-division fix-ups to every ``//`` and ``%``.
    Numba types uint64 op int64 as float64, so every constant here is uint64 (the ``u_`` names),
    strided loops are while loops, and a compile-time ``range(CONST)`` counter is cast (``_U(r)``)
    before it meets an index; those loops unroll, so local arrays indexed by them stay registers.
    Python ints (the unprefixed names) only size the shared and local arrays. A second builder
    rather than a flag of ``_build_static``: the signed rung, the measured baseline, keeps its PTX
    byte for byte. PTX at Swin-T stage 0 (N 49, hd 32, DC 32, 128 threads, numba 0.68): the tile
    loops 157 -> 57 instructions (16 ld.shared + 32 fma each), fwd 3167 -> 1388, bwd 5180 -> 2154."""
    NTL, LDS, LDC, NCH, DTL, SQ, NV, NB, S_SIZE, C_SIZE = _static_dims(N, HD, DC, NTH)
    u_n, u_hd, u_dc, u_nth, u_ntl, u_lds, u_ldc, u_dtl = (_U(x) for x in (N, HD, DC, NTH, NTL, LDS, LDC, DTL))
    u_nn, u_nhd, u_ndc = _U(N * N), _U(N * HD), _U(N * DC)
    u_sq_tiles, u_chunk_tiles = _U(NTL * NTL), _U(NTL * DTL)
    u_zero, u_one, u_last = _U(0), _U(1), _U(N - 1)
    zero = T(0)
    one = T(1)
    neg_big = T(-3.0e38)

    @cuda.jit(device=True, inline=True)
    def s_load(dst, src, base, c, mul):
        """dst[i][dd] = mul * src[base + i*HD + c*DC + dd], zero past the head width."""
        e = _U(cuda.threadIdx.x)
        while e < u_ndc:
            i = e // u_dc
            dd = e % u_dc
            d = c * u_dc + dd
            if d < u_hd:
                dst[i * u_ldc + dd] = mul * src[base + i * u_hd + d]
            else:
                dst[i * u_ldc + dd] = zero
            e += u_nth

    @cuda.jit(device=True, inline=True)
    def s_tile(A, AS, AK, B, BS, BK, ra, cb, KN, acc, rd):
        """acc[rd, r, c] += sum_{kk<KN} A[ra[r]*AS + kk*AK] * B[cb[c]*BS + kk*BK] (all uint64)."""
        a0o = ra[0] * AS
        a1o = ra[1] * AS
        a2o = ra[2] * AS
        a3o = ra[3] * AS
        b0o = cb[0] * BS
        b1o = cb[1] * BS
        b2o = cb[2] * BS
        b3o = cb[3] * BS
        kk = u_zero
        while kk < KN:
            a0 = A[a0o + kk * AK]
            a1 = A[a1o + kk * AK]
            a2 = A[a2o + kk * AK]
            a3 = A[a3o + kk * AK]
            b0 = B[b0o + kk * BK]
            b1 = B[b1o + kk * BK]
            b2 = B[b2o + kk * BK]
            b3 = B[b3o + kk * BK]
            acc[rd, 0, 0] += a0 * b0
            acc[rd, 0, 1] += a0 * b1
            acc[rd, 0, 2] += a0 * b2
            acc[rd, 0, 3] += a0 * b3
            acc[rd, 1, 0] += a1 * b0
            acc[rd, 1, 1] += a1 * b1
            acc[rd, 1, 2] += a1 * b2
            acc[rd, 1, 3] += a1 * b3
            acc[rd, 2, 0] += a2 * b0
            acc[rd, 2, 1] += a2 * b1
            acc[rd, 2, 2] += a2 * b2
            acc[rd, 2, 3] += a2 * b3
            acc[rd, 3, 0] += a3 * b0
            acc[rd, 3, 1] += a3 * b1
            acc[rd, 3, 2] += a3 * b2
            acc[rd, 3, 3] += a3 * b3
            kk += u_one

    @cuda.jit(device=True, inline=True)
    def zero3(acc, rounds):
        for rd in range(rounds):
            for r in range(MICRO):
                for c in range(MICRO):
                    acc[rd, r, c] = zero

    @cuda.jit(device=True, inline=True)
    def tok_tile(t, ra, cb):
        ti = t // u_ntl
        tj = t % u_ntl
        for r in range(MICRO):
            ra[r] = min(ti + u_ntl * _U(r), u_last)
            cb[r] = min(tj + u_ntl * _U(r), u_last)

    @cuda.jit(device=True, inline=True)
    def chunk_tile(t, ra, cb):
        ti = t // u_dtl
        td = t % u_dtl
        for r in range(MICRO):
            ra[r] = min(ti + u_ntl * _U(r), u_last)
            cb[r] = td + u_dtl * _U(r)

    @cuda.jit(device=True, inline=True)
    def chunk_store(dst, base, t, c, mul, acc):
        ti = t // u_dtl
        td = t % u_dtl
        for r in range(MICRO):
            row = ti + u_ntl * _U(r)
            for cc in range(MICRO):
                d = c * u_dc + td + u_dtl * _U(cc)
                if row < u_n and d < u_hd:
                    dst[base + row * u_hd + d] = mul * acc[0, r, cc]

    @cuda.jit(device=True, inline=True)
    def tok_store(S, t, acc, rd):
        ti = t // u_ntl
        tj = t % u_ntl
        for r in range(MICRO):
            i = ti + u_ntl * _U(r)
            for c in range(MICRO):
                j = tj + u_ntl * _U(c)
                if i < u_n and j < u_n:
                    S[i * u_lds + j] = acc[rd, r, c]

    @cuda.jit
    def window_fwd_static_unsigned(q, k, v, bias, mask, out, probs, nH, nW, has_mask, scale):
        S = cuda.shared.array(S_SIZE, T)
        X = cuda.shared.array(C_SIZE, T)
        Y = cuda.shared.array(C_SIZE, T)
        tid = _U(cuda.threadIdx.x)
        bh = _U(cuda.blockIdx.x)
        nHu, nWu = _U(nH), _U(nW)
        h = bh % nHu
        w = (bh // nHu) % nWu
        base = bh * u_nhd
        ra = cuda.local.array(MICRO, _U)
        cb = cuda.local.array(MICRO, _U)
        acc = cuda.local.array((SQ, MICRO, MICRO), T)
        a1 = cuda.local.array((1, MICRO, MICRO), T)
        zero3(acc, SQ)
        for c in range(NCH):
            if c > 0:
                cuda.syncthreads()
            s_load(X, q, base, _U(c), scale)
            s_load(Y, k, base, _U(c), one)
            cuda.syncthreads()
            for rd in range(SQ):
                t = tid + _U(rd * NTH)
                if t < u_sq_tiles:
                    tok_tile(t, ra, cb)
                    s_tile(X, u_ldc, u_one, Y, u_ldc, u_one, ra, cb, u_dc, acc, rd)
        for rd in range(SQ):
            t = tid + _U(rd * NTH)
            if t < u_sq_tiles:
                tok_store(S, t, acc, rd)
        cuda.syncthreads()
        # + bias (+ mask): coalesced over the (N, N) tables
        e = tid
        while e < u_nn:
            i = e // u_n
            j = e % u_n
            x = S[i * u_lds + j] + bias[h * u_nn + e]
            if has_mask:
                x += mask[w * u_nn + e]
            S[i * u_lds + j] = x
            e += u_nth
        cuda.syncthreads()
        i = tid
        while i < u_n:                          # softmax: one thread per row
            row = i * u_lds
            mx = neg_big
            j = u_zero
            while j < u_n:
                mx = max(mx, S[row + j])
                j += u_one
            total = zero
            j = u_zero
            while j < u_n:
                ex = math.exp(S[row + j] - mx)
                S[row + j] = ex
                total += ex
                j += u_one
            inv = one / total
            j = u_zero
            while j < u_n:
                S[row + j] = S[row + j] * inv
                j += u_one
            i += u_nth
        cuda.syncthreads()
        e = tid
        while e < u_nn:
            probs[bh * u_nn + e] = S[(e // u_n) * u_lds + e % u_n]
            e += u_nth
        for c in range(NCH):
            if c > 0:
                cuda.syncthreads()
            s_load(Y, v, base, _U(c), one)
            cuda.syncthreads()
            for rd in range(NV):
                t = tid + _U(rd * NTH)
                if t < u_chunk_tiles:
                    chunk_tile(t, ra, cb)
                    zero3(a1, 1)
                    s_tile(S, u_lds, u_one, Y, u_one, u_ldc, ra, cb, u_n, a1, 0)
                    chunk_store(out, base, t, _U(c), one, a1)

    @cuda.jit
    def window_bwd_static_unsigned(q, k, v, probs, dout, dq, dk, dv, partial, Bw, nH, scale):
        P = cuda.shared.array(S_SIZE, T)
        D = cuda.shared.array(S_SIZE, T)
        X = cuda.shared.array(C_SIZE, T)
        Y = cuda.shared.array(C_SIZE, T)
        p = _U(cuda.blockIdx.x)
        npart = _U(cuda.gridDim.x)
        h = _U(cuda.blockIdx.y)
        tid = _U(cuda.threadIdx.x)
        Bwu, nHu = _U(Bw), _U(nH)
        ra = cuda.local.array(MICRO, _U)
        cb = cuda.local.array(MICRO, _U)
        acc = cuda.local.array((SQ, MICRO, MICRO), T)
        a1 = cuda.local.array((1, MICRO, MICRO), T)
        breg = cuda.local.array(NB, T)
        for u in range(NB):
            breg[u] = zero
        bw = p
        while bw < Bwu:
            bh = bw * nHu + h
            base = bh * u_nhd
            e = tid
            while e < u_nn:
                P[(e // u_n) * u_lds + e % u_n] = probs[bh * u_nn + e]
                e += u_nth
            zero3(acc, SQ)
            for c in range(NCH):
                if c > 0:
                    cuda.syncthreads()
                s_load(X, dout, base, _U(c), one)
                s_load(Y, v, base, _U(c), one)
                cuda.syncthreads()
                for rd in range(SQ):
                    t = tid + _U(rd * NTH)
                    if t < u_sq_tiles:
                        tok_tile(t, ra, cb)
                        s_tile(X, u_ldc, u_one, Y, u_ldc, u_one, ra, cb, u_dc, acc, rd)
            for rd in range(SQ):
                t = tid + _U(rd * NTH)
                if t < u_sq_tiles:
                    tok_store(D, t, acc, rd)
            cuda.syncthreads()
            i = tid
            while i < u_n:                      # dS = P * (dP - rowsum(P dP)): one thread per row
                row = i * u_lds
                dot = zero
                j = u_zero
                while j < u_n:
                    dot += P[row + j] * D[row + j]
                    j += u_one
                j = u_zero
                while j < u_n:
                    D[row + j] = P[row + j] * (D[row + j] - dot)
                    j += u_one
                i += u_nth
            cuda.syncthreads()
            for u in range(NB):                 # bias-gradient shares stay in registers
                e = tid + _U(u * NTH)
                if e < u_nn:
                    breg[u] += D[(e // u_n) * u_lds + e % u_n]
            for c in range(NCH):
                s_load(X, dout, base, _U(c), one)
                s_load(Y, k, base, _U(c), one)
                cuda.syncthreads()
                for rd in range(NV):
                    t = tid + _U(rd * NTH)
                    if t < u_chunk_tiles:
                        chunk_tile(t, ra, cb)
                        zero3(a1, 1)
                        s_tile(P, u_one, u_lds, X, u_one, u_ldc, ra, cb, u_n, a1, 0)     # dv = P^T dout
                        chunk_store(dv, base, t, _U(c), one, a1)
                        zero3(a1, 1)
                        s_tile(D, u_lds, u_one, Y, u_one, u_ldc, ra, cb, u_n, a1, 0)     # dq = scale dS k
                        chunk_store(dq, base, t, _U(c), scale, a1)
                cuda.syncthreads()
                s_load(X, q, base, _U(c), scale)
                cuda.syncthreads()
                for rd in range(NV):
                    t = tid + _U(rd * NTH)
                    if t < u_chunk_tiles:
                        chunk_tile(t, ra, cb)
                        zero3(a1, 1)
                        s_tile(D, u_one, u_lds, X, u_one, u_ldc, ra, cb, u_n, a1, 0)     # dk = dS^T (scale q)
                        chunk_store(dk, base, t, _U(c), one, a1)
                cuda.syncthreads()
            bw += npart
        slab = (p * nHu + h) * u_nn
        for u in range(NB):
            e = tid + _U(u * NTH)
            if e < u_nn:
                partial[slab + e] = breg[u]

    return {"window_fwd_static_unsigned": window_fwd_static_unsigned,
            "window_bwd_static_unsigned": window_bwd_static_unsigned}


_STATIC: dict = {}


def _static_k(dtype, name, N, hd, DC, threads):
    """Kernel ``name`` of the static rungs (``window_{fwd,bwd}_static[_unsigned]``), built once per shape."""
    unsigned = name.endswith("_unsigned")
    key = (np.dtype(dtype).name, unsigned, N, hd, DC, threads)
    if key not in _STATIC:
        from numba import float32, float64
        build = _build_static_unsigned if unsigned else _build_static
        _STATIC[key] = build(float32 if key[0] == "float32" else float64, N, hd, DC, threads)
    return _STATIC[key][name]


def _static_chunk(N, hd, itemsize, n_square):
    """Head-dim chunk (a multiple of 4, at most 32) whose static shared arrays fit in 48 KB, or None."""
    widest = min(32, (hd + 3) // 4 * 4)
    for DC in (widest, 16, 8, 4):
        if DC <= widest and (n_square * N * (N + 1) + 2 * N * (DC + 1)) * itemsize <= SMEM_LIMIT:
            return DC
    return None


_KERNELS: dict = {}


def _k(dtype, name):
    """The kernel ``name`` built for ``dtype`` (float32 / float64), built on first use. Keyed by
    the dtype object itself: ``np.dtype(...).name`` costs ~4 us a call."""
    kernels = _KERNELS.get(dtype)
    if kernels is None:
        from numba import float32, float64
        key = np.dtype(dtype)
        kernels = _KERNELS.get(key)
        if kernels is None:
            kernels = _build(float32 if key == np.float32 else float64, TILE)
            _KERNELS[key] = kernels
        _KERNELS[dtype] = kernels
    return kernels[name]


def _ptx_kernels():
    """(name, python function, signature) of every kernel, for the sm_90 compile check."""
    from numba import float32, float64
    out = []
    for T, tn in ((float32, "float32"), (float64, "float64")):
        ks = _build(T, 64)
        a = f"{tn}[::1]"
        i64 = "int64"
        sigs = {
            "bmm_naive": [a, a, a, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, tn],
            "bmm_tiled": [a, a, a, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, tn],
            "bmm_tiled_unsigned": [a, a, a, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, tn],
            "softmax_rows": [a, a, a, i64, i64, i64, i64, i64, i64],
            "softmax_bwd_rows": [a, a, i64, i64],
            "softmax_rows_unsigned": [a, a, a, i64, i64, i64, i64, i64, i64],
            "softmax_bwd_rows_unsigned": [a, a, i64, i64],
            "softmax_rows_staged": [a, i64, i64, i64, i64],
            "softmax_bwd_rows_staged": [a, a, i64, i64, i64, i64],
            "sum_leading": [a, a, i64, i64],
            "window_fwd_fused": [a] * 7 + [i64] * 6 + [tn],
            "window_bwd_fused": [a] * 9 + [i64] * 5 + [tn],
        }
        for name, args in sigs.items():
            out.append((f"{name}_{tn}", ks[name].py_func, f"void({', '.join(args)})"))
        # the static rungs at their benchmark shape, float32 only: every shape and dtype compiles
        # the same code, and each kernel takes seconds of the CI budget
        if tn != "float32":
            continue
        st = _build_static(T, 49, 32, 32, 128)
        out.append((f"window_fwd_static_{tn}", st["window_fwd_static"].py_func,
                    f"void({', '.join([a] * 7 + [i64] * 3 + [tn])})"))
        out.append((f"window_bwd_static_{tn}", st["window_bwd_static"].py_func,
                    f"void({', '.join([a] * 9 + [i64] * 2 + [tn])})"))
        su = _build_static_unsigned(T, 49, 32, 32, 128)
        out.append((f"window_fwd_static_unsigned_{tn}", su["window_fwd_static_unsigned"].py_func,
                    f"void({', '.join([a] * 7 + [i64] * 3 + [tn])})"))
        out.append((f"window_bwd_static_unsigned_{tn}", su["window_bwd_static_unsigned"].py_func,
                    f"void({', '.join([a] * 9 + [i64] * 2 + [tn])})"))
    return out


PTX_KERNELS = _ptx_kernels()   # decorating only: nothing compiles until a launch or compile_ptx


# --------------------------------------------------------------------------------------
# array plumbing
# --------------------------------------------------------------------------------------
def _is_cupy(x):
    return type(x).__module__.startswith("cupy")


def _device(name, x, ndim):
    """``x`` checked as a C-contiguous float32/float64 device array of rank ``ndim``: a Numba
    device array as given, a CuPy array as given when :func:`flat` can view it directly (no
    Numba import, whose stream synchronisation would stall the GPU queue: see
    ``_launch.foreign_flat``), anything else with ``__cuda_array_interface__`` as a Numba view."""
    if isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a device array (numba device array, CuPy, or __cuda_array_interface__), "
                        f"got numpy.ndarray; move it with numba.cuda.to_device first")
    if hasattr(x, "copy_to_host") and hasattr(x, "is_c_contiguous"):
        d = x                                  # numba device array (or the simulator's fake one)
    elif _is_cupy(x) and foreign_flat(x) is not None:
        d = x                                  # C-contiguous, on the legacy default stream
    elif hasattr(x, "__cuda_array_interface__"):
        d = cuda.as_cuda_array(x)
    else:
        raise TypeError(f"{name} must be a device array exposing __cuda_array_interface__, got {type(x).__name__}")
    if np.dtype(d.dtype) not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {d.dtype}")
    if len(d.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(d.shape)} ({len(d.shape)} dimensions)")
    if not _is_cupy(d) and not d.is_c_contiguous():      # a CuPy d passed foreign_flat: C-contiguous
        raise ValueError(f"{name} must be C-contiguous (got strides {d.strides}); copy it first")
    return d


def _empty(shape, dtype):
    """A fresh C-contiguous device array (one context lookup: see _launch.empty_flat)."""
    return as_array(empty_flat(math.prod(shape), dtype), shape)


def _empties(shapes, dtype):
    """Fresh C-contiguous device arrays of ``shapes`` carved from one allocation (the outputs of
    one call: one context lookup and one allocation instead of one each)."""
    return [as_array(v, shape) for v, shape in zip(empty_flats([math.prod(s) for s in shapes], dtype), shapes)]


def _wrap(arr, like_cupy):
    if like_cupy:
        import cupy
        return cupy.asarray(arr)
    return arr


def _same_dtype(**arrays):
    items = [(k, a) for k, a in arrays.items() if a is not None]
    d0 = np.dtype(items[0][1].dtype)
    for k, a in items[1:]:
        if np.dtype(a.dtype) != d0:
            raise TypeError(f"{k} has dtype {a.dtype} but {items[0][0]} has {d0}; all inputs must share one dtype")
    return d0


def _shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def _blocks(n, threads=THREADS):
    return max(1, int((n + threads - 1) // threads))


def _bmm(version, dt, A, B, C, batch, M, N, K, sA, sB, alpha):
    """C (batch, M, N) = alpha * A @ B, element strides sA = (b, m, k), sB = (b, k, n)."""
    args = (flat(A), flat(B), flat(C), np.int64(batch), np.int64(M), np.int64(N), np.int64(K),
            np.int64(sA[0]), np.int64(sA[1]), np.int64(sA[2]), np.int64(sB[0]), np.int64(sB[1]),
            np.int64(sB[2]), dt.type(alpha))
    if version == "naive":
        launch(_k(dt, "bmm_naive"), _blocks(batch * M * N), THREADS, *args)
    else:           # "tiled" or "tiled_unsigned": the same tiles and launch
        grid = ((N + TILE - 1) // TILE, (M + TILE - 1) // TILE, batch)
        launch(_k(dt, f"bmm_{version}"), grid, (TILE // MICRO) ** 2, *args)


def _softmax_rows(dt, S, rows, N, bias=None, mask=None, nH=1, nW=1, kernel="softmax_rows"):
    S = flat(S)
    unused = S      # stands in for a missing bias / mask: the kernel never reads it (has_bias / has_mask 0)
    launch(_k(dt, kernel), _blocks(rows), THREADS,
        S, unused if bias is None else flat(bias), unused if mask is None else flat(mask), np.int64(rows),
        np.int64(N), np.int64(nH), np.int64(nW), np.int64(bias is not None), np.int64(mask is not None))


def _softmax_bwd_rows(dt, P, dP, rows, N, kernel="softmax_bwd_rows"):
    launch(_k(dt, kernel), _blocks(rows), THREADS, flat(P), flat(dP), np.int64(rows), np.int64(N))


def _sum_leading(dt, X, nb, inner, out):
    launch(_k(dt, "sum_leading"), _blocks(inner), THREADS, flat(X), flat(out), np.int64(nb), np.int64(inner))


def _fused_chunk(N, itemsize, n_square):
    """Largest head-dim chunk (32, 16, 8) whose shared-memory tiles fit in 48 KB, or None."""
    for DC in (32, 16, 8):
        if (n_square * N * (N + 1) + 2 * N * (DC + 1)) * itemsize <= SMEM_LIMIT:
            return DC
    return None


# --------------------------------------------------------------------------------------
# window attention
# --------------------------------------------------------------------------------------
def _window_inputs(q, k, v, bias, mask, scale):
    like_cupy = _is_cupy(q)
    q = _device("q", q, 4)
    k = _device("k", k, 4)
    v = _device("v", v, 4)
    bias = _device("bias", bias, 3)
    mask = None if mask is None else _device("mask", mask, 3)
    dt = _same_dtype(q=q, k=k, v=v, bias=bias, mask=mask)
    Bw, nH, N, hd = (int(s) for s in q.shape)
    _shape("k", k, q.shape)
    _shape("v", v, q.shape)
    _shape("bias", bias, (nH, N, N))
    nW = 1
    if mask is not None:
        nW = int(mask.shape[0])
        _shape("mask", mask, (nW, N, N))
        if nW == 0 or Bw % nW:
            raise ValueError(f"Bw (q.shape[0])={Bw} must be divisible by nW (mask.shape[0])={nW}")
    scale = float(hd ** -0.5 if scale is None else scale)
    return q, k, v, bias, mask, scale, dt, like_cupy, (Bw, nH, N, hd, nW)


def _window_fwd(version, q, k, v, bias, mask, scale):
    q, k, v, bias, mask, scale, dt, like_cupy, (Bw, nH, N, hd, nW) = _window_inputs(q, k, v, bias, mask, scale)
    out, probs = _empties([q.shape, (Bw, nH, N, N)], dt)
    static = version in ("static", "static_unsigned")
    SDC = _static_chunk(N, hd, dt.itemsize, 1) if static else None
    DC = _fused_chunk(N, dt.itemsize, 1) if static or version == "fused" else None
    if SDC is not None:
        bias_f = flat(bias)     # also stands in for a missing mask: never read when has_mask is 0
        launch(_static_k(dt, f"window_fwd_{version}", N, hd, SDC, STATIC_THREADS), Bw * nH, STATIC_THREADS,
            flat(q), flat(k), flat(v), bias_f, bias_f if mask is None else flat(mask), flat(out),
            flat(probs), np.int64(nH), np.int64(nW), np.int64(mask is not None), dt.type(scale))
    elif DC is None:
        BH = Bw * nH
        _bmm("naive", dt, q, k, probs, BH, N, N, hd, (N * hd, hd, 1), (N * hd, 1, hd), scale)
        _softmax_rows(dt, probs, BH * N, N, bias=bias, mask=mask, nH=nH, nW=nW)
        _bmm("naive", dt, probs, v, out, BH, N, hd, N, (N * N, N, 1), (N * hd, hd, 1), 1.0)
    else:
        smem = (N * (N + 1) + 2 * N * (DC + 1)) * dt.itemsize
        bias_f = flat(bias)     # also stands in for a missing mask: never read when has_mask is 0
        launch(_k(dt, "window_fwd_fused"), Bw * nH, FUSED_THREADS,
            flat(q), flat(k), flat(v), bias_f, bias_f if mask is None else flat(mask), flat(out),
            flat(probs), np.int64(nH), np.int64(N), np.int64(hd), np.int64(nW), np.int64(mask is not None),
            np.int64(DC), dt.type(scale), sharedmem=smem)
    cache = {"q": q, "k": k, "v": v, "probs": _wrap(probs, like_cupy), "scale": scale,
             "_probs_dev": probs, "_like_cupy": like_cupy}
    return _wrap(out, like_cupy), cache


def _window_bwd(version, dout, cache):
    q, k, v, probs, scale = cache["q"], cache["k"], cache["v"], cache["_probs_dev"], cache["scale"]
    like_cupy = cache["_like_cupy"]
    dout = _device("dout", dout, 4)
    dt = np.dtype(q.dtype)
    if np.dtype(dout.dtype) != dt:
        raise TypeError(f"dout must have dtype {dt} (like the forward inputs), got {dout.dtype}")
    _shape("dout", dout, q.shape)
    Bw, nH, N, hd = (int(s) for s in q.shape)
    dq, dk, dv, dbias = _empties([q.shape, q.shape, q.shape, (nH, N, N)], dt)
    static = version in ("static", "static_unsigned")
    SDC = _static_chunk(N, hd, dt.itemsize, 2) if static else None
    DC = _fused_chunk(N, dt.itemsize, 2) if static or version == "fused" else None
    if SDC is not None:
        npart = min(Bw, NPART_MAX)
        partial = _empty((npart, nH, N, N), dt)
        launch(_static_k(dt, f"window_bwd_{version}", N, hd, SDC, STATIC_THREADS), (npart, nH), STATIC_THREADS,
            flat(q), flat(k), flat(v), flat(probs), flat(dout), flat(dq), flat(dk), flat(dv),
            flat(partial), np.int64(Bw), np.int64(nH), dt.type(scale))
        _sum_leading(dt, partial, npart, nH * N * N, dbias)
    elif DC is None:
        BH = Bw * nH
        _bmm("naive", dt, probs, dout, dv, BH, N, hd, N, (N * N, 1, N), (N * hd, hd, 1), 1.0)
        dS = _empty((Bw, nH, N, N), dt)
        _bmm("naive", dt, dout, v, dS, BH, N, N, hd, (N * hd, hd, 1), (N * hd, 1, hd), 1.0)
        _softmax_bwd_rows(dt, probs, dS, BH * N, N)
        _bmm("naive", dt, dS, k, dq, BH, N, hd, N, (N * N, N, 1), (N * hd, hd, 1), scale)
        _bmm("naive", dt, dS, q, dk, BH, N, hd, N, (N * N, 1, N), (N * hd, hd, 1), scale)
        _sum_leading(dt, dS, Bw, nH * N * N, dbias)
    else:
        smem = (2 * N * (N + 1) + 2 * N * (DC + 1)) * dt.itemsize
        npart = min(Bw, NPART_MAX)
        partial = _empty((npart, nH, N, N), dt)
        launch(_k(dt, "window_bwd_fused"), (npart, nH), FUSED_THREADS,
            flat(q), flat(k), flat(v), flat(probs), flat(dout), flat(dq), flat(dk), flat(dv),
            flat(partial), np.int64(Bw), np.int64(nH), np.int64(N), np.int64(hd), np.int64(DC), dt.type(scale),
            sharedmem=smem)
        _sum_leading(dt, partial, npart, nH * N * N, dbias)
    return {"q": _wrap(dq, like_cupy), "k": _wrap(dk, like_cupy), "v": _wrap(dv, like_cupy),
            "bias": _wrap(dbias, like_cupy)}


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
    """The fused kernel compiled for this (N, hd): constant loop bounds, score tiles in registers."""
    return _window_fwd("static", q, k, v, bias, mask, scale)


def window_attention_bwd_static(dout, cache):
    """The fused backward compiled for this (N, hd); bias-gradient shares in registers across windows."""
    return _window_bwd("static", dout, cache)


def window_attention_fwd_static_unsigned(q, k, v, bias, mask=None, scale=None):
    """The static kernel with unsigned 64-bit indices: Numba adds no negative-index or
    floor-division fix-ups to its tile loops (see ``_build_static_unsigned``)."""
    return _window_fwd("static_unsigned", q, k, v, bias, mask, scale)


def window_attention_bwd_static_unsigned(dout, cache):
    """The static backward with unsigned 64-bit indices (see ``_build_static_unsigned``)."""
    return _window_bwd("static_unsigned", dout, cache)


def window_attention_fwd(q, k, v, bias, mask=None, scale=None):
    """Mirrors :func:`sparx_ref.ref.window_attention.window_attention_fwd` on device arrays.

    q, k, v ``(Bw, heads, N, hd)``; bias ``(heads, N, N)``; mask ``(nW, N, N)`` or None;
    scale multiplies q (default ``hd ** -0.5``). Returns ``out`` ``(Bw, heads, N, hd)`` and a
    cache with ``"probs"`` ``(Bw, heads, N, N)``, ``"q"`` (unscaled), ``"k"``, ``"v"``, ``"scale"``.
    Default version: ``static_unsigned`` (the fused kernels when a shape's tiles do not fit).
    """
    return window_attention_fwd_static_unsigned(q, k, v, bias, mask, scale)


def window_attention_bwd(dout, cache):
    """Mirrors :func:`sparx_ref.ref.window_attention.window_attention_bwd`:
    ``{"q", "k", "v"}`` ``(Bw, heads, N, hd)`` and ``"bias"`` ``(heads, N, N)`` (summed over windows).
    Default version: ``static_unsigned`` (the fused kernels when a shape's tiles do not fit)."""
    return window_attention_bwd_static_unsigned(dout, cache)


# --------------------------------------------------------------------------------------
# DMCA channel attention
# --------------------------------------------------------------------------------------
def _dmca_inputs(q, k, v, groups):
    like_cupy = _is_cupy(q)
    q = _device("q", q, 3)
    k = _device("k", k, 3)
    v = _device("v", v, 3)
    dt = _same_dtype(q=q, k=k, v=v)
    B, C, Ls = (int(s) for s in q.shape)
    _shape("k", k, (B, C, Ls))
    if int(v.shape[0]) != B or int(v.shape[1]) != C:
        raise ValueError(f"v must have shape ({B}, {C}, L), got {tuple(v.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if C % groups:
        raise ValueError(f"C (q.shape[1])={C} must be divisible by groups={groups}")
    return q, k, v, int(groups), dt, like_cupy, (B, C, Ls, int(v.shape[2]))


def _staged_rows(N, itemsize, tables):
    """(rows per block, row pitch) of the staged softmax kernels: ``tables`` (1 or 2) shared
    tables of R rows of pitch N | 1 within 48 KB, R at most 32 (one thread per row)."""
    pitch = N | 1
    return max(1, min(32, SMEM_LIMIT // (tables * pitch * itemsize))), pitch


def _dmca_softmax(version, dt, S, rows, N):
    """Softmax over the rows of S (rows, N) in place, as the rung ``version`` does it."""
    if version == "tiled_staged":
        R, pitch = _staged_rows(N, dt.itemsize, 1)
        launch(_k(dt, "softmax_rows_staged"), (rows + R - 1) // R, STAGED_THREADS, S, np.int64(rows),
               np.int64(N), np.int64(R), np.int64(pitch), sharedmem=R * pitch * dt.itemsize)
    else:
        _softmax_rows(dt, S, rows, N, kernel="softmax_rows_unsigned" if version == "tiled_unsigned" else "softmax_rows")


def _dmca_softmax_bwd(version, dt, P, dP, rows, N):
    """dP <- P * (dP - rowsum(P * dP)), as the rung ``version`` does it."""
    if version == "tiled_staged":
        R, pitch = _staged_rows(N, dt.itemsize, 2)
        launch(_k(dt, "softmax_bwd_rows_staged"), (rows + R - 1) // R, STAGED_THREADS, P, dP, np.int64(rows),
               np.int64(N), np.int64(R), np.int64(pitch), sharedmem=2 * R * pitch * dt.itemsize)
    else:
        _softmax_bwd_rows(dt, P, dP, rows, N,
                          kernel="softmax_bwd_rows_unsigned" if version == "tiled_unsigned" else "softmax_bwd_rows")


def _gemm_version(version):
    """The GEMM kernels a rung uses ("tiled_staged" keeps the uint64-index GEMMs)."""
    return "tiled_unsigned" if version == "tiled_staged" else version


def _dmca_fwd(version, q, k, v, groups):
    q, k, v, G, dt, like_cupy, (B, C, Ls, L) = _dmca_inputs(q, k, v, groups)
    g = C // G
    BG = B * G
    qf, kf, vf = flat(q), flat(k), flat(v)       # flat views made once, kept for the backward
    attn_f, out_f = empty_flats([B * C * g, B * C * L], dt)
    alpha = 1.0 / math.sqrt(Ls)
    gemm = _gemm_version(version)
    _bmm(gemm, dt, qf, kf, attn_f, BG, g, g, Ls, (g * Ls, Ls, 1), (g * Ls, 1, Ls), alpha)
    _dmca_softmax(version, dt, attn_f, BG * g, g)
    _bmm(gemm, dt, attn_f, vf, out_f, BG, g, L, g, (g * g, g, 1), (g * L, L, 1), 1.0)
    attn = as_array(attn_f, (B, G, g, g))
    cache = {"q": q, "k": k, "v": v, "attn": _wrap(attn, like_cupy), "groups": G,
             "_flat": (qf, kf, vf, attn_f), "_like_cupy": like_cupy}
    return _wrap(as_array(out_f, (B, C, L)), like_cupy), cache


def _dmca_bwd(version, dout, cache):
    q, v, G = cache["q"], cache["v"], cache["groups"]
    qf, kf, vf, attn_f = cache["_flat"]
    like_cupy = cache["_like_cupy"]
    dout = _device("dout", dout, 3)
    dt = np.dtype(q.dtype)
    if np.dtype(dout.dtype) != dt:
        raise TypeError(f"dout must have dtype {dt} (like the forward inputs), got {dout.dtype}")
    _shape("dout", dout, v.shape)
    B, C, Ls = (int(s) for s in q.shape)
    L = int(v.shape[2])
    g = C // G
    BG = B * G
    alpha = 1.0 / math.sqrt(Ls)
    doutf = flat(dout)
    # dq, dk, dv (returned) and dS (internal) from one allocation
    dq_f, dk_f, dv_f, dS = empty_flats([B * C * Ls, B * C * Ls, B * C * L, B * G * g * g], dt)
    gemm = _gemm_version(version)
    _bmm(gemm, dt, attn_f, doutf, dv_f, BG, g, L, g, (g * g, 1, g), (g * L, L, 1), 1.0)
    _bmm(gemm, dt, doutf, vf, dS, BG, g, g, L, (g * L, L, 1), (g * L, 1, L), 1.0)
    _dmca_softmax_bwd(version, dt, attn_f, dS, BG * g, g)
    _bmm(gemm, dt, dS, kf, dq_f, BG, g, Ls, g, (g * g, g, 1), (g * Ls, Ls, 1), alpha)
    _bmm(gemm, dt, dS, qf, dk_f, BG, g, Ls, g, (g * g, 1, g), (g * Ls, Ls, 1), alpha)
    return {"q": _wrap(as_array(dq_f, (B, C, Ls)), like_cupy), "k": _wrap(as_array(dk_f, (B, C, Ls)), like_cupy),
            "v": _wrap(as_array(dv_f, (B, C, L)), like_cupy)}


def dmca_attention_fwd_naive(q, k, v, groups=4):
    """Explicit form, one thread per output element."""
    return _dmca_fwd("naive", q, k, v, groups)


def dmca_attention_bwd_naive(dout, cache):
    """Explicit backward, one thread per gradient element."""
    return _dmca_bwd("naive", dout, cache)


def dmca_attention_fwd_tiled(q, k, v, groups=4):
    """Shared-memory tiled GEMMs (4x4 register tile per thread); one thread per softmax row."""
    return _dmca_fwd("tiled", q, k, v, groups)


def dmca_attention_bwd_tiled(dout, cache):
    """Tiled backward: dv = P^T dout, dP = dout v^T, dS, dq = dS k, dk = dS^T q."""
    return _dmca_bwd("tiled", dout, cache)


def dmca_attention_fwd_tiled_unsigned(q, k, v, groups=4):
    """The tiled GEMMs and the softmax rows with unsigned 64-bit indices: Numba adds no
    negative-index wrap-around fix-ups (PTX of the GEMM's inner loop 126 -> 53 instructions)."""
    return _dmca_fwd("tiled_unsigned", q, k, v, groups)


def dmca_attention_bwd_tiled_unsigned(dout, cache):
    """Tiled backward with unsigned 64-bit indices (the kernels of dmca_attention_fwd_tiled_unsigned)."""
    return _dmca_bwd("tiled_unsigned", dout, cache)


def dmca_attention_fwd_tiled_staged(q, k, v, groups=4):
    """The uint64-index GEMMs of "tiled_unsigned"; the softmax rows staged through shared memory
    so that their loads and stores are coalesced (one thread per row had neighbouring threads
    N elements apart)."""
    return _dmca_fwd("tiled_staged", q, k, v, groups)


def dmca_attention_bwd_tiled_staged(dout, cache):
    """Backward of "tiled_staged": its GEMMs and the staged softmax backward."""
    return _dmca_bwd("tiled_staged", dout, cache)


def dmca_attention_fwd(q, k, v, groups=4):
    """Mirrors :func:`sparx_ref.ref.dmca.dmca_attention_fwd` on device arrays.

    q, k ``(B, C, Ls)``, v ``(B, C, L)``; per image and group of ``g = C/groups`` channels
    ``out_g = softmax(q_g k_g^T / sqrt(Ls)) v_g``. Returns ``out`` ``(B, C, L)`` and a cache
    with ``"attn"`` ``(B, groups, g, g)``. Default version: ``tiled_staged``.
    """
    return dmca_attention_fwd_tiled_staged(q, k, v, groups)


def dmca_attention_bwd(dout, cache):
    """Mirrors :func:`sparx_ref.ref.dmca.dmca_attention_bwd`: ``{"q", "k", "v"}``. Default version: ``tiled_staged``."""
    return dmca_attention_bwd_tiled_staged(dout, cache)
