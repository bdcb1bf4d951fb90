"""Numba-CUDA kernels for the selective scan, the cross scan/merge and the fused 2-D scan.

The same kernels as the CuPy backend (:mod:`sparx_ref.kernels.cupy.scan`, whose module
docstring describes the ladder and the CUDA C source), written in Python for ``numba.cuda``:
read the two side by side. float32 only (a TypeError says so). Inputs: anything exposing
``__cuda_array_interface__`` (CuPy arrays, Numba device arrays, torch CUDA tensors); outputs are
Numba device arrays, or CuPy arrays when the first input was a CuPy array.

Simulator (``NUMBA_ENABLE_CUDASIM=1``, the CI): it has no warp shuffles and no ``syncwarp``, so
there the warp primitives below are emulated through shared memory and ``syncthreads``. That is
why every kernel keeps its control flow uniform over the block (no early return; idle warps run
the same loops with ``active = 0``): a block-wide barrier must be reached by all threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32

from ._launch import as_array, empty_flat, empty_flats, foreign_flat, launch
from ._launch import flat as flat_view

from .._scan_common import (K_DIRECTIONS, check_dtype, check_dy, check_merge_shapes, poisoning,
                            scan_cache, scan_shapes, ss2d_shapes)
from ..cupy.scan import vec_layout, vec_loads_ok   # host-side rules shared by both backends (no CuPy import)

__all__ = ["selective_scan_fwd", "selective_scan_bwd", "cross_scan", "cross_merge",
           "ss2d_scan_fwd", "ss2d_scan_bwd"]

SIMULATOR = bool(config.ENABLE_CUDASIM)
FULL_MASK = 0xFFFFFFFF
f32 = np.float32
# Unsigned 64-bit indices. Numba indexes with signed int64 and, for an index it cannot prove
# non-negative, adds the Python wrap-around fix-up (idx < 0 ? idx + len : idx) at every access;
# an uint64 index has none. Numba types uint64 op int64 as float64, so code that computes in
# uint64 makes every literal and counter uint64 too; elsewhere only the final index is cast.
_U = np.uint64

FWD_WARPS = 8          # rows (warps) per block of scan_fwd_warp
FWD_CHUNKS = 4         # 32-step chunks per round: loads in flight per lane
BWD_WARPS = 8          # channels per block of scan_bwd_warp (dB/dC reduced over them)
BWD_CHUNKS = 4
FUSED_CHUNKS = 8       # fused kernels have 2 warps per block: more loads per warp
SHARED_LIMIT = 48 * 1024   # Numba cannot raise a kernel's dynamic shared memory above 48 KB
if SIMULATOR:          # every simulated thread is a Python thread: small blocks, 32-step rounds
    FWD_WARPS = BWD_WARPS = 2
    FWD_CHUNKS = BWD_CHUNKS = FUSED_CHUNKS = 1


# ---------------------------------------------------------------------------------------
# warp primitives (real ones on a GPU; shared-memory emulation in the simulator)
# ---------------------------------------------------------------------------------------
if not SIMULATOR:
    @cuda.jit(device=True, inline=True)
    def shfl_up(v, off):
        return cuda.shfl_up_sync(FULL_MASK, v, off)

    @cuda.jit(device=True, inline=True)
    def shfl_down(v, off):
        return cuda.shfl_down_sync(FULL_MASK, v, off)

    @cuda.jit(device=True, inline=True)
    def shfl_idx(v, src):
        return cuda.shfl_sync(FULL_MASK, v, src)

    @cuda.jit(device=True, inline=True)
    def shfl_xor(v, mask):
        return cuda.shfl_xor_sync(FULL_MASK, v, mask)

    @cuda.jit(device=True, inline=True)
    def syncwarp():
        cuda.syncwarp()

    @cuda.jit(device=True, inline=True)
    def shfl_up2(a, b, off):
        return cuda.shfl_up_sync(FULL_MASK, a, off), cuda.shfl_up_sync(FULL_MASK, b, off)

    @cuda.jit(device=True, inline=True)
    def shfl_down2(a, b, off):
        return cuda.shfl_down_sync(FULL_MASK, a, off), cuda.shfl_down_sync(FULL_MASK, b, off)
else:  # pragma: no cover - exercised by the simulator tests
    import threading

    _PARITY = threading.local()     # simulated threads are Python threads

    def _exchange2(a, b):
        """Publish (a, b) to the block; one barrier per exchange: two buffers used in turn, so
        exchange k+2 cannot overwrite what a slow thread still reads from exchange k."""
        buf_a0 = cuda.shared.array(1024, float32)
        buf_a1 = cuda.shared.array(1024, float32)
        buf_b0 = cuda.shared.array(1024, float32)
        buf_b1 = cuda.shared.array(1024, float32)
        par = getattr(_PARITY, "p", 0)
        _PARITY.p = 1 - par
        buf_a, buf_b = (buf_a0, buf_b0) if par == 0 else (buf_a1, buf_b1)
        tid = cuda.threadIdx.x + cuda.blockDim.x * cuda.threadIdx.y
        buf_a[tid] = a
        buf_b[tid] = b
        cuda.syncthreads()
        return buf_a, buf_b, tid

    def shfl_up(v, off):
        buf, _, tid = _exchange2(v, v)
        return buf[tid - off] if (tid & 31) >= off else v

    def shfl_down(v, off):
        buf, _, tid = _exchange2(v, v)
        return buf[tid + off] if (tid & 31) + off < 32 else v

    def shfl_idx(v, src):
        buf, _, tid = _exchange2(v, v)
        return buf[(tid & ~31) + src]

    def shfl_xor(v, mask):
        buf, _, tid = _exchange2(v, v)
        return buf[(tid & ~31) + ((tid & 31) ^ mask)]

    def syncwarp():
        cuda.syncthreads()

    def shfl_up2(a, b, off):
        buf_a, buf_b, tid = _exchange2(a, b)
        if (tid & 31) >= off:
            return buf_a[tid - off], buf_b[tid - off]
        return a, b

    def shfl_down2(a, b, off):
        buf_a, buf_b, tid = _exchange2(a, b)
        if (tid & 31) + off < 32:
            return buf_a[tid + off], buf_b[tid + off]
        return a, b


@cuda.jit(device=True, inline=True)
def scan_pos(kdir, t, H, W):
    """Map index (h, w) read at scan index t by direction kdir (0 row-major, 1 column-major,
    2/3 reversed); the plain scan is kdir = 0 on a 1 x L map."""
    s = H * W - 1 - t if kdir >= 2 else t
    if kdir & 1:
        return s % H, s // H
    return s // W, s % W


@cuda.jit(device=True, inline=True)
def softplus_f(z):
    return z if z > f32(20.0) else f32(math.log1p(math.exp(z)))


@cuda.jit(device=True, inline=True)
def dsoftplus_f(z):
    return f32(1.0) if z > f32(20.0) else f32(1.0) / (f32(1.0) + f32(math.exp(-z)))


@cuda.jit(device=True, inline=True)
def warp_sum(v):
    off = 16
    while off > 0:
        v += shfl_xor(v, off)
        off //= 2
    return v


if not SIMULATOR:
    @cuda.jit(device=True, inline=True)
    def warp_sum_each(v, n):
        """v[k] <- warp_sum(v[k]) for k < n: a register array's sums over the warp (n a
        compile-time constant at the call: the loop unrolls and v stays in registers)."""
        for k in range(n):
            v[k] = warp_sum(v[k])
else:  # pragma: no cover - exercised by the simulator tests
    def _warp_sum_each_sim(v, n):
        """The n sums in one exchange (two barriers, not 5n: each emulated shuffle costs one):
        every thread publishes v[:n]; each then replays its warp's xor butterfly on the 32 rows
        (lane l at offset o adds lane l ^ o to its own value, as warp_sum does), element by
        element in v's dtype: the bits of the GPU's shuffles, float64 included."""
        buf = cuda.shared.array((1024, n), v.dtype)
        tid = cuda.threadIdx.x + cuda.blockDim.x * cuda.threadIdx.y
        buf[tid, :] = v[:n]
        cuda.syncthreads()
        rows = buf[tid & ~31:(tid & ~31) + 32].copy()
        cuda.syncthreads()                  # all have read: the next call may overwrite buf
        lanes = np.arange(32)
        for off in (16, 8, 4, 2, 1):
            rows = rows + rows[lanes ^ off]
        v[:n] = rows[tid & 31]

    warp_sum_each = cuda.jit(device=True)(_warp_sum_each_sim)   # so the simulator swaps ``cuda`` here


@cuda.jit(device=True, inline=True)
def load_map(g, goff, s, soff, H, W, P):
    """s[soff + h*P + w] = g[goff + h*W + w]; eight loads issued before the first shared store."""
    L = H * W
    v = cuda.local.array(8, float32)
    p0 = cuda.threadIdx.x
    while p0 < L:
        for i in range(8):
            p = p0 + i * cuda.blockDim.x
            v[i] = g[goff + p] if p < L else f32(0.0)
        for i in range(8):
            p = p0 + i * cuda.blockDim.x
            if p < L:
                s[soff + (p // W) * P + p % W] = v[i]
        p0 += 8 * cuda.blockDim.x


@cuda.jit(device=True, inline=True)
def add_map(g, goff, s, soff, H, W, P):
    """g[goff + p] += s[soff + map position of p], eight global loads in flight."""
    L = H * W
    v = cuda.local.array(8, float32)
    p0 = cuda.threadIdx.x
    while p0 < L:
        for i in range(8):
            p = p0 + i * cuda.blockDim.x
            v[i] = g[goff + p] if p < L else f32(0.0)
        for i in range(8):
            p = p0 + i * cuda.blockDim.x
            if p < L:
                g[goff + p] = v[i] + s[soff + (p // W) * P + p % W]
        p0 += 8 * cuda.blockDim.x


# ---------------------------------------------------------------------------------------
# kernels, built per (d_state, chunks): both are compile-time constants of the kernel
# ---------------------------------------------------------------------------------------
_BUILT: dict = {}


def _build(NSTATE: int, CHUNKS: int):
    """Return a namespace of kernels for d_state = NSTATE and CHUNKS 32-step chunks a round."""
    key = (NSTATE, CHUNKS)
    if key in _BUILT:
        return _BUILT[key]
    ROUND = 32 * CHUNKS
    RED = CHUNKS * 32 * NSTATE

    @cuda.jit(device=True, inline=True)
    def fwd_row(u, uoff, pu, delta, doff, A, aoff, B, C, goff, Dc, bias, softplus,
                y, yoff, py, has_y, accumulate, kdir, H, W, hs, hoff, has_hs, active):
        """One warp scans one sequence (see the CUDA C fwd_row): u at u[uoff + h*pu + w],
        delta[doff + t], B/C[goff + n*L + t], y at y[yoff + h*py + w] (= or +=)."""
        lane = cuda.threadIdx.x & 31
        L = H * W
        carry = cuda.local.array(NSTATE, float32)
        An = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            carry[n] = f32(0.0)
            An[n] = A[aoff + n]
        uv = cuda.local.array(CHUNKS, float32)
        zv = cuda.local.array(CHUNKS, float32)
        Bv = cuda.local.array((CHUNKS, NSTATE), float32)
        Cv = cuda.local.array((CHUNKS, NSTATE), float32)
        nrounds = (L + ROUND - 1) // ROUND
        for s in range(nrounds):
            base = s * ROUND
            if has_hs and active and lane == 0:
                for n in range(NSTATE):
                    hs[hoff + s * NSTATE + n] = carry[n]
            for j in range(CHUNKS):
                t = base + j * 32 + lane
                uv[j] = f32(0.0)
                zv[j] = f32(0.0)
                for n in range(NSTATE):
                    Bv[j, n] = f32(0.0)
                    Cv[j, n] = f32(0.0)
                if active and t < L:
                    h, w = scan_pos(kdir, t, H, W)
                    uv[j] = u[uoff + h * pu + w]
                    zv[j] = delta[doff + t] + bias
                    for n in range(NSTATE):
                        Bv[j, n] = B[goff + n * L + t]
                        if has_y:
                            Cv[j, n] = C[goff + n * L + t]
            for j in range(CHUNKS):
                t = base + j * 32 + lane
                valid = active and t < L
                dt = softplus_f(zv[j]) if softplus else zv[j]
                yv = Dc * uv[j]
                for n in range(NSTATE):
                    a = f32(math.exp(dt * An[n])) if valid else f32(1.0)
                    b = dt * Bv[j, n] * uv[j] if valid else f32(0.0)
                    off = 1
                    while off < 32:          # inclusive warp scan of h -> a h + b
                        a_up, b_up = shfl_up2(a, b, off)
                        if lane >= off:
                            b = a * b_up + b
                            a = a * a_up
                        off *= 2
                    hn = a * carry[n] + b
                    yv += Cv[j, n] * hn
                    carry[n] = shfl_idx(hn, 31)
                if has_y and valid:
                    h, w = scan_pos(kdir, t, H, W)
                    if accumulate:
                        y[yoff + h * py + w] += yv
                    else:
                        y[yoff + h * py + w] = yv

    @cuda.jit(device=True, inline=True)
    def bwd_row(u, dy, delta, A, B, C, hs, du, ddelta, sred, partB, partC, dB, dC,
                dA_out, dD_out, dbias_out, Dc, bias, offs, geo, flags):
        """Backward of fwd_row for one sequence (see the CUDA C bwd_row). Rounds last to first:
        recompute the round's forward states from hs, then the reverse warp scan of the adjoint
        g_t = dy_t C_t + a_{t+1} g_{t+1}. dB/dC: block reduction in shared memory (has_sred) or
        atomics into dB/dC. Per-row sums go to dA_out[rowidx*N + n], dD_out/dbias_out[rowidx]."""
        # (grouped in tuples: Python passes more than 30 arguments as *args, which Numba
        # cannot inline)
        uoff, pu, dyoff, pdy, doff, aoff, goff, hoff, duoff, pdu, poff, rowidx = offs
        kdir, H, W = geo
        softplus, active, du_accumulate, has_sred, use_atomics = flags
        lane = cuda.threadIdx.x & 31
        warp = cuda.threadIdx.x >> 5
        nwarps = cuda.blockDim.x >> 5
        L = H * W
        nrounds = (L + ROUND - 1) // ROUND
        An = cuda.local.array(NSTATE, float32)
        gcarry = cuda.local.array(NSTATE, float32)
        anext = cuda.local.array(NSTATE, float32)
        dA_acc = cuda.local.array(NSTATE, float32)
        carry = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            An[n] = A[aoff + n]
            gcarry[n] = f32(0.0)
            anext[n] = f32(0.0)
            dA_acc[n] = f32(0.0)
        dD_acc = f32(0.0)
        dbias_acc = f32(0.0)
        uv = cuda.local.array(CHUNKS, float32)
        zv = cuda.local.array(CHUNKS, float32)
        dyv = cuda.local.array(CHUNKS, float32)
        dtv = cuda.local.array(CHUNKS, float32)
        Bv = cuda.local.array((CHUNKS, NSTATE), float32)
        Cv = cuda.local.array((CHUNKS, NSTATE), float32)
        gate = cuda.local.array((CHUNKS, NSTATE), float32)
        hcur = cuda.local.array((CHUNKS, NSTATE), float32)
        hprev = cuda.local.array((CHUNKS, NSTATE), float32)
        for si in range(nrounds):
            s = nrounds - 1 - si
            base = s * ROUND
            for j in range(CHUNKS):
                t = base + j * 32 + lane
                uv[j] = f32(0.0)
                zv[j] = f32(0.0)
                dyv[j] = f32(0.0)
                for n in range(NSTATE):
                    Bv[j, n] = f32(0.0)
                    Cv[j, n] = f32(0.0)
                if active and t < L:
                    h, w = scan_pos(kdir, t, H, W)
                    uv[j] = u[uoff + h * pu + w]
                    dyv[j] = dy[dyoff + h * pdy + w]
                    zv[j] = delta[doff + t] + bias
                    for n in range(NSTATE):
                        Bv[j, n] = B[goff + n * L + t]
                        Cv[j, n] = C[goff + n * L + t]
            for n in range(NSTATE):
                carry[n] = hs[hoff + s * NSTATE + n] if active else f32(0.0)
            # forward recompute inside the round
            for j in range(CHUNKS):
                valid = active and (base + j * 32 + lane < L)
                dt = softplus_f(zv[j]) if softplus else zv[j]
                dtv[j] = dt
                for n in range(NSTATE):
                    a0 = f32(math.exp(dt * An[n])) if valid else f32(1.0)
                    a = a0
                    b = dt * Bv[j, n] * uv[j] if valid else f32(0.0)
                    off = 1
                    while off < 32:
                        a_up, b_up = shfl_up2(a, b, off)
                        if lane >= off:
                            b = a * b_up + b
                            a = a * a_up
                        off *= 2
                    hn = a * carry[n] + b
                    hp = shfl_up(hn, 1)
                    if lane == 0:
                        hp = carry[n]
                    gate[j, n] = a0
                    hcur[j, n] = hn
                    hprev[j, n] = hp
                    carry[n] = shfl_idx(hn, 31)
            # reverse pass
            for jj in range(CHUNKS):
                j = CHUNKS - 1 - jj
                t = base + j * 32 + lane
                valid = active and t < L
                dt = dtv[j]
                duv = Dc * dyv[j]
                ddt = f32(0.0)
                for n in range(NSTATE):
                    alpha = shfl_down(gate[j, n], 1)
                    if lane == 31:
                        alpha = anext[n]
                    beta = dyv[j] * Cv[j, n] if valid else f32(0.0)
                    off = 1
                    while off < 32:          # inclusive suffix scan of g -> alpha g + beta
                        a_dn, b_dn = shfl_down2(alpha, beta, off)
                        if lane + off < 32:
                            beta = alpha * b_dn + beta
                            alpha = alpha * a_dn
                        off *= 2
                    g = alpha * gcarry[n] + beta            # dL/dh_t
                    gcarry[n] = shfl_idx(g, 0)
                    anext[n] = shfl_idx(gate[j, n], 0)
                    cb = f32(0.0)
                    cc = f32(0.0)
                    if valid:
                        ga = g * hprev[j, n] * gate[j, n]
                        duv += g * dt * Bv[j, n]
                        ddt += g * Bv[j, n] * uv[j] + ga * An[n]
                        dA_acc[n] += ga * dt
                        cb = g * dt * uv[j]
                        cc = dyv[j] * hcur[j, n]
                    if has_sred:
                        sred[(warp * 2) * RED + (j * 32 + lane) * NSTATE + n] = cb
                        sred[(warp * 2 + 1) * RED + (j * 32 + lane) * NSTATE + n] = cc
                    elif use_atomics and valid:
                        cuda.atomic.add(dB, goff + n * L + t, cb)
                        cuda.atomic.add(dC, goff + n * L + t, cc)
                if valid:
                    dz = ddt * dsoftplus_f(zv[j]) if softplus else ddt
                    ddelta[doff + t] = dz
                    dbias_acc += dz
                    dD_acc += dyv[j] * uv[j]
                    h, w = scan_pos(kdir, t, H, W)
                    if du_accumulate:
                        du[duoff + h * pdu + w] += duv
                    else:
                        du[duoff + h * pdu + w] = duv
            if has_sred:      # dB/dC summed over the block's warps (channels): deterministic
                cuda.syncthreads()
                e = cuda.threadIdx.x
                while e < RED:
                    t = base + e // NSTATE
                    n = e % NSTATE
                    if t < L:
                        sb = f32(0.0)
                        sc = f32(0.0)
                        for q in range(nwarps):
                            sb += sred[(q * 2) * RED + e]
                            sc += sred[(q * 2 + 1) * RED + e]
                        partB[poff + n * L + t] = sb
                        partC[poff + n * L + t] = sc
                    e += cuda.blockDim.x
                cuda.syncthreads()
        for n in range(NSTATE):
            v = warp_sum(dA_acc[n])
            if active and lane == 0:
                dA_out[rowidx * NSTATE + n] = v
        dD_acc = warp_sum(dD_acc)
        dbias_acc = warp_sum(dbias_acc)
        if active and lane == 0:
            dD_out[rowidx] = dD_acc
            dbias_out[rowidx] = dbias_acc

    def scan_fwd_naive(u, delta, A, B, C, D, bias, y, batch, KD, L, K, softplus):
        """Ladder rung "naive": one thread per (batch, channel) row, walking L."""
        row = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if row < batch * KD:
            b = row // KD
            c = row % KD
            k = c // (KD // K)
            goff = (b * K + k) * NSTATE * L
            h = cuda.local.array(NSTATE, float32)
            for n in range(NSTATE):
                h[n] = f32(0.0)
            Dc = D[c]
            bc = bias[c]
            for t in range(L):
                ut = u[row * L + t]
                z = delta[row * L + t] + bc
                dt = softplus_f(z) if softplus else z
                yt = Dc * ut
                for n in range(NSTATE):
                    h[n] = f32(math.exp(dt * A[c * NSTATE + n])) * h[n] + dt * B[goff + n * L + t] * ut
                    yt += C[goff + n * L + t] * h[n]
                y[row * L + t] = yt

    def scan_fwd_warp(u, delta, A, B, C, D, bias, y, batch, KD, L, K, softplus):
        """Ladder rung "warp": one warp per row, lanes = consecutive steps (coalesced)."""
        nwarps = cuda.blockDim.x >> 5
        row0 = cuda.blockIdx.x * nwarps + (cuda.threadIdx.x >> 5)
        active = row0 < batch * KD
        row = row0 if active else 0
        b = row // KD
        c = row % KD
        k = c // (KD // K)
        fwd_row(u, row * L, L, delta, row * L, A, c * NSTATE, B, C, (b * K + k) * NSTATE * L, D[c],
                bias[c], softplus, y, row * L, L, True, False, 0, 1, L, y, 0, False, active)

    def scan_bwd_warp(u, delta, A, B, C, D, bias, dy, hstart, du, ddelta, partB, partC, partA,
                      partD, partbias, batch, KD, L, K, softplus):
        """Backward: a block = consecutive channels of one group (grid (ceil(Dg/warps), K, batch));
        dB/dC summed over the block in shared memory, then over blocks by sum_middle."""
        sred = cuda.shared.array(0, float32)
        nwarps = cuda.blockDim.x >> 5
        warp = cuda.threadIdx.x >> 5
        Dg = KD // K
        k = cuda.blockIdx.y
        b = cuda.blockIdx.z
        ci = cuda.blockIdx.x * nwarps + warp
        active = ci < Dg
        c = k * Dg + (ci if active else 0)
        row = b * KD + c
        goff = (b * K + k) * NSTATE * L
        nrounds = (L + ROUND - 1) // ROUND
        hoff = row * nrounds * NSTATE
        fwd_row(u, row * L, L, delta, row * L, A, c * NSTATE, B, C, goff, D[c], bias[c], softplus,
                du, 0, L, False, False, 0, 1, L, hstart, hoff, True, active)
        syncwarp()
        poff = ((b * K + k) * cuda.gridDim.x + cuda.blockIdx.x) * NSTATE * L
        bwd_row(u, dy, delta, A, B, C, hstart, du, ddelta, sred, partB, partC, partB, partC,
                partA, partD, partbias, D[c], bias[c],
                (row * L, L, row * L, L, row * L, c * NSTATE, goff, hoff, row * L, L, poff, row),
                (0, 1, L), (softplus, active, False, True, False))

    def ss2d_fwd_fused(x, delta, A, B, C, D, bias, y, batch, Di, H, W, P, softplus):
        """Fused 2-D scan forward, one block of 2 warps per (batch, channel): the map in shared
        memory (pitch P), warp 0 = directions 0 then 2 straight into y, warp 1 = directions 1
        then 3 into a shared buffer, then y += buffer (fixed order: deterministic)."""
        smem = cuda.shared.array(0, float32)
        bc = cuda.blockIdx.x
        b = bc // Di
        c = bc % Di
        L = H * W
        ybase = H * P
        load_map(x, bc * L, smem, 0, H, W, P)
        cuda.syncthreads()
        warp = cuda.threadIdx.x >> 5
        for ps in range(2):
            kdir = warp + 2 * ps
            ch = kdir * Di + c
            off = (b * 4 * Di + ch) * L
            goff = (b * 4 + kdir) * NSTATE * L
            if warp == 0:
                fwd_row(smem, 0, P, delta, off, A, ch * NSTATE, B, C, goff, D[ch], bias[ch], softplus,
                        y, bc * L, W, True, ps == 1, kdir, H, W, y, 0, False, True)
            else:
                fwd_row(smem, 0, P, delta, off, A, ch * NSTATE, B, C, goff, D[ch], bias[ch], softplus,
                        smem, ybase, P, True, ps == 1, kdir, H, W, y, 0, False, True)
            syncwarp()
        cuda.syncthreads()
        add_map(y, bc * L, smem, ybase, H, W, P)

    def ss2d_bwd_fused(x, dy, delta, A, B, C, D, bias, hstart, dx, ddelta, dB, dC, partA, partD,
                       partbias, batch, Di, H, W, P, softplus):
        """Fused 2-D scan backward, same block layout; shared: x, dy, warp 1's dx buffer. dB/dC
        by atomics (summed over channels in other blocks)."""
        smem = cuda.shared.array(0, float32)
        bc = cuda.blockIdx.x
        b = bc // Di
        c = bc % Di
        L = H * W
        nrounds = (L + ROUND - 1) // ROUND
        load_map(x, bc * L, smem, 0, H, W, P)
        load_map(dy, bc * L, smem, H * P, H, W, P)
        cuda.syncthreads()
        warp = cuda.threadIdx.x >> 5
        for ps in range(2):
            kdir = warp + 2 * ps
            ch = kdir * Di + c
            row = b * 4 * Di + ch
            off = row * L
            goff = (b * 4 + kdir) * NSTATE * L
            hoff = row * nrounds * NSTATE
            fwd_row(smem, 0, P, delta, off, A, ch * NSTATE, B, C, goff, D[ch], bias[ch], softplus,
                    dx, 0, 0, False, False, kdir, H, W, hstart, hoff, True, True)
            syncwarp()
            if warp == 0:      # directions 0, 2: dx straight into global memory
                bwd_row(smem, smem, delta, A, B, C, hstart, dx, ddelta, smem, dB, dC, dB, dC,
                        partA, partD, partbias, D[ch], bias[ch],
                        (0, P, H * P, P, off, ch * NSTATE, goff, hoff, bc * L, W, 0, row),
                        (kdir, H, W), (softplus, True, ps == 1, False, True))
            else:              # directions 1, 3: dx into the shared buffer
                bwd_row(smem, smem, delta, A, B, C, hstart, smem, ddelta, smem, dB, dC, dB, dC,
                        partA, partD, partbias, D[ch], bias[ch],
                        (0, P, H * P, P, off, ch * NSTATE, goff, hoff, 2 * H * P, P, 0, row),
                        (kdir, H, W), (softplus, True, ps == 1, False, True))
            syncwarp()
        cuda.syncthreads()
        add_map(dx, bc * L, smem, 2 * H * P, H, W, P)

    ns = {"scan_fwd_naive": cuda.jit(scan_fwd_naive), "scan_fwd_warp": cuda.jit(scan_fwd_warp),
          "scan_bwd_warp": cuda.jit(scan_bwd_warp), "ss2d_fwd_fused": cuda.jit(ss2d_fwd_fused),
          "ss2d_bwd_fused": cuda.jit(ss2d_bwd_fused),
          "py": {"scan_fwd_naive": scan_fwd_naive, "scan_fwd_warp": scan_fwd_warp,
                 "scan_bwd_warp": scan_bwd_warp, "ss2d_fwd_fused": ss2d_fwd_fused,
                 "ss2d_bwd_fused": ss2d_bwd_fused}}
    _BUILT[key] = ns
    return ns


# ---------------------------------------------------------------------------------------
# the "vec" rung (see the CUDA C in the CuPy module, CUDA_SOURCES["scan_vec"]): a lane holds
# ITEMS consecutive steps, SEG lanes per row; vector loads through the intrinsics below
# ---------------------------------------------------------------------------------------
VEC_WARPS = 2 if SIMULATOR else 8      # warps per block of the vec kernels


def _vector_access(width: int, store: bool):
    """An intrinsic loading (returning a UniTuple) or storing `width` consecutive float32 of a
    1-D C-contiguous array at index i as ONE vector access (ld/st.v2/.v4.f32: Numba has no
    vector loads of its own). The caller guarantees the 4*width-byte alignment."""
    from llvmlite import ir
    from numba.core import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic
    vty = ir.VectorType(ir.FloatType(), width)

    def pointer(context, builder, aryty, ary_val, idxty, idx_val):
        ary = context.make_array(aryty)(context, builder, ary_val)
        i = context.cast(builder, idx_val, idxty, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)
        return builder.bitcast(ptr, vty.as_pointer())

    if not store:
        @intrinsic
        def load(typingctx, arr, idx):
            sig = types.UniTuple(types.float32, width)(arr, idx)

            def codegen(context, builder, sig, args):
                v = builder.load(pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                                 align=4 * width)
                elems = [builder.extract_element(v, ir.Constant(ir.IntType(32), q)) for q in range(width)]
                return context.make_tuple(builder, sig.return_type, elems)
            return sig, codegen
        return load

    @intrinsic
    def store_(typingctx, arr, idx, vals):
        sig = types.void(arr, idx, vals)

        def codegen(context, builder, sig, args):
            v = ir.Constant(vty, ir.Undefined)
            for q in range(width):
                e = builder.extract_value(args[2], q)
                e = context.cast(builder, e, sig.args[2].dtype, types.float32)
                v = builder.insert_element(v, e, ir.Constant(ir.IntType(32), q))
            builder.store(v, pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                          align=4 * width)
            return context.get_dummy_value()
        return sig, codegen
    return store_


if not SIMULATOR:
    load4, store4 = _vector_access(4, False), _vector_access(4, True)
    load2, store2 = _vector_access(2, False), _vector_access(2, True)
else:  # pragma: no cover - the simulator runs Python: element by element
    def load4(arr, i):
        return arr[i], arr[i + 1], arr[i + 2], arr[i + 3]

    def load2(arr, i):
        return arr[i], arr[i + 1]

    def store4(arr, i, v):
        arr[i], arr[i + 1], arr[i + 2], arr[i + 3] = v

    def store2(arr, i, v):
        arr[i], arr[i + 1] = v


_VEC_BUILT: dict = {}


def vec_launch_bounds(kernel: str, nstate: int, vec: bool, one_round: bool = False):
    """The vec kernels' launch bounds: (threads per block, min blocks per SM) for N = 1, only the
    block size otherwise (larger N needs the registers). 3 blocks (80 registers) only for the
    vector-load forward: the scalar-load one spills 16 bytes there. One-round rows (no
    next-round registers, no pass 1): forward 4 blocks (64 registers), backward 3 (at 4 it
    spills 32 bytes)."""
    if nstate != 1:
        return 32 * VEC_WARPS
    if one_round:
        return (32 * VEC_WARPS, 4 if kernel == "scan_fwd_vec" else 3)
    return (32 * VEC_WARPS, 3 if kernel == "scan_fwd_vec" and vec else 2)


def _build_vec(NSTATE: int, SEG: int, ITEMS: int, VEC: bool, ONE_ROUND: bool = False):
    """The vec kernels for d_state NSTATE, SEG lanes per row, ITEMS steps per lane, vector
    (VEC) or scalar loads, rows of one round only (ONE_ROUND: L <= SEG*ITEMS, no next-round
    loads, no backward pass 1): all compile-time constants, as the CUDA C's macros."""
    key = (NSTATE, SEG, ITEMS, bool(VEC), bool(ONE_ROUND))
    ONE_ROUND = bool(ONE_ROUND)
    if key in _VEC_BUILT:
        return _VEC_BUILT[key]
    VROUND = SEG * ITEMS
    SEG_SHIFT = SEG.bit_length() - 1        # SEG is a power of two: x // SEG == x >> SEG_SHIFT for x >= 0
    assert SEG == 1 << SEG_SHIFT
    U_VROUND = _U(VROUND)                   # uint64 constants of the backward's dB/dC reduction
    U_STEPS = _U(NSTATE * VROUND)           # one slot's dB (or dC) part in shared memory
    U_TWO_STEPS = _U(2 * NSTATE * VROUND)   # one slot's dB and dC parts
    ITEMS1 = ITEMS + 1
    VW = 4 if ITEMS % 4 == 0 else (2 if ITEMS % 2 == 0 else 1)
    VEC = bool(VEC) and VW > 1

    @cuda.jit(device=True, inline=True)
    def vload(p, off, t0, L, v):
        """v[i] = p[off + t0 + i], 0 past L (vector loads when VEC: a vector is all in or out)."""
        for q in range(0, ITEMS, VW):
            t = t0 + q
            if VEC and VW == 4:
                if t < L:
                    v[q], v[q + 1], v[q + 2], v[q + 3] = load4(p, off + t)
                else:
                    v[q] = v[q + 1] = v[q + 2] = v[q + 3] = f32(0.0)
            elif VEC and VW == 2:
                if t < L:
                    v[q], v[q + 1] = load2(p, off + t)
                else:
                    v[q] = v[q + 1] = f32(0.0)
            else:   # uint64 index: no negative-index fix-up per scalar access (see _U)
                for r in range(VW):
                    v[q + r] = p[_U(off + t + r)] if t + r < L else f32(0.0)

    @cuda.jit(device=True, inline=True)
    def vstore(p, off, t0, L, v):
        """p[off + t0 + i] = v[i] for t0 + i < L."""
        for q in range(0, ITEMS, VW):
            t = t0 + q
            if VEC and VW == 4:
                if t < L:
                    store4(p, off + t, (v[q], v[q + 1], v[q + 2], v[q + 3]))
            elif VEC and VW == 2:
                if t < L:
                    store2(p, off + t, (v[q], v[q + 1]))
            else:
                for r in range(VW):
                    if t + r < L:
                        p[_U(off + t + r)] = v[q + r]

    @cuda.jit(device=True, inline=True)
    def load_round(u, delta, B, C, off, goff, t0, L, uv, zv, Bv, Cv, with_c):
        vload(u, off, t0, L, uv)
        vload(delta, off, t0, L, zv)
        for n in range(NSTATE):
            vload(B, goff + n * L, t0, L, Bv[n])
            if with_c:
                vload(C, goff + n * L, t0, L, Cv[n])

    @cuda.jit(device=True, inline=True)
    def gates(uv, zv, Bv, An, bias, softplus, t0, L, dtv, a, bb):
        """dt_i; a_i[n] = exp(dt_i A_n) (1 past L); b_i[n] = dt_i B_i[n] u_i (0 past L)."""
        for i in range(ITEMS):
            valid = t0 + i < L
            z = zv[i] + bias
            dt = softplus_f(z) if softplus else z
            dtv[i] = dt
            for n in range(NSTATE):
                a[n, i] = f32(math.exp(dt * An[n])) if valid else f32(1.0)
                bb[n, i] = dt * Bv[n, i] * uv[i] if valid else f32(0.0)

    @cuda.jit(device=True, inline=True)
    def lane_entry(a, bb, n, carry, sl, seg0):
        """State entering this lane's first step, and the state leaving the round (returned as
        (h_in, new carry)): lane aggregate, segment scan, one shfl_up."""
        la = a[n, 0]
        lb = bb[n, 0]
        for i in range(1, ITEMS):
            lb = a[n, i] * lb + bb[n, i]
            la = a[n, i] * la
        off = 1
        while off < SEG:                 # inclusive scan over the segment's lanes
            a_up, b_up = shfl_up2(la, lb, off)
            if sl >= off:
                lb = la * b_up + lb
                la = la * a_up
            off *= 2
        hincl = la * carry + lb
        hin = shfl_up(hincl, 1)
        if sl == 0:
            hin = carry
        return hin, shfl_idx(hincl, seg0 + SEG - 1)

    @cuda.jit(device=True, inline=True)
    def seg_sum(v):
        off = SEG // 2
        while off > 0:
            v += shfl_xor(v, off)
            off //= 2
        return v

    def scan_fwd_vec(u, delta, A, B, C, D, bias, y, batch, KD, L, K, softplus):
        """Ladder rung "vec": SEG lanes per row, ITEMS consecutive steps per lane, next round's
        loads issued before this round's arithmetic. Idle segments compute a copy of the last
        row and store nothing (uniform control flow: every lane reaches every shuffle)."""
        lane = cuda.threadIdx.x & 31
        sl = lane & (SEG - 1)
        seg0 = lane - sl
        nrows = batch * KD
        row = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> SEG_SHIFT   # // SEG, no sign fix-up
        active = row < nrows
        if not active:
            row = nrows - 1
        b = row // KD
        c = row % KD
        k = c // (KD // K)
        off = row * L
        goff = (b * K + k) * NSTATE * L
        An = cuda.local.array(NSTATE, float32)
        carry = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            An[n] = A[c * NSTATE + n]
            carry[n] = f32(0.0)
        Dc = D[c]
        bc = bias[c]
        uv = cuda.local.array(ITEMS, float32)
        zv = cuda.local.array(ITEMS, float32)
        Bv = cuda.local.array((NSTATE, ITEMS), float32)
        Cv = cuda.local.array((NSTATE, ITEMS), float32)
        uq = cuda.local.array(ITEMS, float32)
        zq = cuda.local.array(ITEMS, float32)
        Bq = cuda.local.array((NSTATE, ITEMS), float32)
        Cq = cuda.local.array((NSTATE, ITEMS), float32)
        dtv = cuda.local.array(ITEMS, float32)
        a = cuda.local.array((NSTATE, ITEMS), float32)
        bb = cuda.local.array((NSTATE, ITEMS), float32)
        yv = cuda.local.array(ITEMS, float32)
        load_round(u, delta, B, C, off, goff, sl * ITEMS, L, uv, zv, Bv, Cv, True)
        nrounds = 1 if ONE_ROUND else (L + VROUND - 1) // VROUND
        for s in range(nrounds):
            t0 = s * VROUND + sl * ITEMS
            more = not ONE_ROUND and s + 1 < nrounds
            if more:
                load_round(u, delta, B, C, off, goff, t0 + VROUND, L, uq, zq, Bq, Cq, True)
            gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb)
            for i in range(ITEMS):
                yv[i] = Dc * uv[i]
            for n in range(NSTATE):
                h, c_out = lane_entry(a, bb, n, carry[n], sl, seg0)
                carry[n] = c_out
                for i in range(ITEMS):
                    h = a[n, i] * h + bb[n, i]
                    yv[i] += Cv[n, i] * h
            if active:
                vstore(y, off, t0, L, yv)
            if more:
                for i in range(ITEMS):
                    uv[i] = uq[i]
                    zv[i] = zq[i]
                    for n in range(NSTATE):
                        Bv[n, i] = Bq[n, i]
                        Cv[n, i] = Cq[n, i]

    def scan_bwd_vec(u, delta, A, B, C, D, bias, dy, hstart, du, ddelta, partB, partC, partA,
                     partD, partbias, batch, KD, L, K, softplus):
        """Backward of scan_fwd_vec (see the CUDA C scan_bwd_vec): pass 1 stores the state
        entering every round, pass 2 walks the rounds backwards with a segment suffix scan of the
        adjoint; dB/dC summed over the block's rows in shared memory (deterministic). The
        indices of the per-round accesses are cast to uint64 (_U): never negative, and Numba then
        emits no negative-index fix-up for them."""
        sred = cuda.shared.array(0, float32)
        lane = cuda.threadIdx.x & 31
        sl = lane & (SEG - 1)
        seg0 = lane - sl
        slot = cuda.threadIdx.x // SEG
        nslots = cuda.blockDim.x // SEG
        Dg = KD // K
        k = cuda.blockIdx.y
        b = cuda.blockIdx.z
        ci = cuda.blockIdx.x * nslots + slot
        active = ci < Dg
        c = k * Dg + (ci if active else 0)
        row = b * KD + c
        off = row * L
        goff = (b * K + k) * NSTATE * L
        nrounds = 1 if ONE_ROUND else (L + VROUND - 1) // VROUND
        hoff = row * nrounds * NSTATE
        poff = ((b * K + k) * cuda.gridDim.x + cuda.blockIdx.x) * NSTATE * L
        An = cuda.local.array(NSTATE, float32)
        carry = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            An[n] = A[c * NSTATE + n]
            carry[n] = f32(0.0)
        Dc = D[c]
        bc = bias[c]
        uv = cuda.local.array(ITEMS, float32)
        zv = cuda.local.array(ITEMS, float32)
        dyv = cuda.local.array(ITEMS, float32)
        Bv = cuda.local.array((NSTATE, ITEMS), float32)
        Cv = cuda.local.array((NSTATE, ITEMS), float32)
        uq = cuda.local.array(ITEMS, float32)
        zq = cuda.local.array(ITEMS, float32)
        dyq = cuda.local.array(ITEMS, float32)
        Bq = cuda.local.array((NSTATE, ITEMS), float32)
        Cq = cuda.local.array((NSTATE, ITEMS), float32)
        dtv = cuda.local.array(ITEMS, float32)
        a = cuda.local.array((NSTATE, ITEMS), float32)
        bb = cuda.local.array((NSTATE, ITEMS), float32)
        # pass 1: the state entering every round (u, delta, B; next round's loads in flight).
        # The last round's gates are never needed here (no round follows it): a row of a single
        # round (L <= VROUND) does no pass-1 loads or arithmetic.
        # With ONE_ROUND pass 1 is compiled out (the one round starts from h = 0).
        if nrounds > 1:
            load_round(u, delta, B, C, off, goff, sl * ITEMS, L, uv, zv, Bv, Cv, False)
        for s in range(0 if ONE_ROUND else nrounds):
            t0 = s * VROUND + sl * ITEMS
            if active and sl == 0:
                for n in range(NSTATE):
                    hstart[_U(hoff + s * NSTATE + n)] = carry[n]
            if s == nrounds - 1:
                break
            more = s + 2 < nrounds          # round s + 1 is needed unless it is the last
            if more:
                load_round(u, delta, B, C, off, goff, t0 + VROUND, L, uq, zq, Bq, Cq, False)
            gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb)
            for n in range(NSTATE):
                h_unused, c_out = lane_entry(a, bb, n, carry[n], sl, seg0)
                carry[n] = c_out
            if more:
                for i in range(ITEMS):
                    uv[i] = uq[i]
                    zv[i] = zq[i]
                    for n in range(NSTATE):
                        Bv[n, i] = Bq[n, i]
        syncwarp()        # hstart written by the segment's lane 0 is read by all its lanes
        # pass 2: rounds last to first
        gcarry = cuda.local.array(NSTATE, float32)
        anext = cuda.local.array(NSTATE, float32)
        dA_acc = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            gcarry[n] = f32(0.0)
            anext[n] = f32(0.0)
            dA_acc[n] = f32(0.0)
        dD_acc = f32(0.0)
        dbias_acc = f32(0.0)
        hh = cuda.local.array((NSTATE, ITEMS1), float32)
        duv = cuda.local.array(ITEMS, float32)
        ddt = cuda.local.array(ITEMS, float32)
        dzv = cuda.local.array(ITEMS, float32)
        cb = cuda.local.array((NSTATE, ITEMS), float32)
        cc = cuda.local.array((NSTATE, ITEMS), float32)
        t0 = (nrounds - 1) * VROUND + sl * ITEMS
        load_round(u, delta, B, C, off, goff, t0, L, uv, zv, Bv, Cv, True)
        vload(dy, off, t0, L, dyv)
        for si in range(nrounds):
            s = nrounds - 1 - si
            base = s * VROUND
            t0 = base + sl * ITEMS
            more = not ONE_ROUND and s > 0
            if more:
                load_round(u, delta, B, C, off, goff, t0 - VROUND, L, uq, zq, Bq, Cq, True)
                vload(dy, off, t0 - VROUND, L, dyq)
            # forward recompute: hh[n, i] = state before step i, hh[n, ITEMS] after the last
            gates(uv, zv, Bv, An, bc, softplus, t0, L, dtv, a, bb)
            for n in range(NSTATE):
                cin = f32(0.0) if ONE_ROUND or not active else hstart[_U(hoff + s * NSTATE + n)]
                h, c_unused = lane_entry(a, bb, n, cin, sl, seg0)
                hh[n, 0] = h
                for i in range(ITEMS):
                    h = a[n, i] * h + bb[n, i]
                    hh[n, i + 1] = h
            # adjoint g_t = alpha_t g_{t+1} + beta_t, alpha_t = a_{t+1}, beta_t = C_t dy_t
            for i in range(ITEMS):
                duv[i] = Dc * dyv[i]
                ddt[i] = f32(0.0)
            for n in range(NSTATE):
                a_after = shfl_down(a[n, 0], 1)         # gate of the next lane's first step
                if sl == SEG - 1:
                    a_after = anext[n]
                la = f32(1.0)
                lb = f32(0.0)
                for ii in range(ITEMS):                 # this lane's maps, last step first
                    i = ITEMS - 1 - ii
                    alpha = a_after if i == ITEMS - 1 else a[n, min(i + 1, ITEMS - 1)]
                    lb = alpha * lb + dyv[i] * Cv[n, i]
                    la = alpha * la
                off2 = 1
                while off2 < SEG:            # inclusive suffix scan over the segment's lanes
                    a_dn, b_dn = shfl_down2(la, lb, off2)
                    if sl + off2 < SEG:
                        lb = la * b_dn + lb
                        la = la * a_dn
                    off2 *= 2
                gincl = la * gcarry[n] + lb                 # g at this lane's first step
                g = shfl_down(gincl, 1)                     # g at the next lane's first step
                if sl == SEG - 1:
                    g = gcarry[n]
                gcarry[n] = shfl_idx(gincl, seg0)
                anext[n] = shfl_idx(a[n, 0], seg0)
                for ii in range(ITEMS):
                    i = ITEMS - 1 - ii
                    alpha = a_after if i == ITEMS - 1 else a[n, min(i + 1, ITEMS - 1)]
                    g = alpha * g + dyv[i] * Cv[n, i]       # dL/dh_t
                    ga = g * hh[n, i] * a[n, i]
                    duv[i] += g * dtv[i] * Bv[n, i]
                    ddt[i] += g * Bv[n, i] * uv[i] + ga * An[n]
                    if t0 + i < L:
                        dA_acc[n] += ga * dtv[i]
                    cb[n, i] = g * dtv[i] * uv[i]
                    cc[n, i] = dyv[i] * hh[n, i + 1]
            for i in range(ITEMS):
                dz = ddt[i] * dsoftplus_f(zv[i] + bc) if softplus else ddt[i]
                dzv[i] = dz
                if t0 + i < L:
                    dbias_acc += dz
                    dD_acc += dyv[i] * uv[i]
            if active:
                vstore(du, off, t0, L, duv)
                vstore(ddelta, off, t0, L, dzv)
            # dB/dC: this row's contributions to shared memory, summed over the block's rows
            for n in range(NSTATE):
                sb = ((slot * 2) * NSTATE + n) * VROUND + sl * ITEMS
                sc = ((slot * 2 + 1) * NSTATE + n) * VROUND + sl * ITEMS
                for i in range(ITEMS):
                    sred[_U(sb + i)] = cb[n, i]
                    sred[_U(sc + i)] = cc[n, i]
            cuda.syncthreads()
            # all in uint64 (every constant too: uint64 op int64 is float64 in Numba); the slots
            # past Dg hold copies of the last row and are skipped
            first_row = _U(cuda.blockIdx.x * nslots)
            e = _U(cuda.threadIdx.x)
            while e < U_STEPS:
                n_u = e // U_VROUND
                tt = e % U_VROUND
                if _U(base) + tt < _U(L):
                    sbv = f32(0.0)
                    scv = f32(0.0)
                    q = _U(0)
                    while q < _U(nslots):                 # slot q's dB part, its dC part U_STEPS on
                        if first_row + q < _U(Dg):
                            at = (q * U_TWO_STEPS) + n_u * U_VROUND + tt
                            sbv += sred[at]
                            scv += sred[at + U_STEPS]
                        q += _U(1)
                    out = _U(poff) + n_u * _U(L) + _U(base) + tt
                    partB[out] = sbv
                    partC[out] = scv
                e += _U(cuda.blockDim.x)
            cuda.syncthreads()
            if more:
                for i in range(ITEMS):
                    uv[i] = uq[i]
                    zv[i] = zq[i]
                    dyv[i] = dyq[i]
                    for n in range(NSTATE):
                        Bv[n, i] = Bq[n, i]
                        Cv[n, i] = Cq[n, i]
        for n in range(NSTATE):
            v = seg_sum(dA_acc[n])
            if active and sl == 0:
                partA[row * NSTATE + n] = v
        dD_acc = seg_sum(dD_acc)
        dbias_acc = seg_sum(dbias_acc)
        if active and sl == 0:
            partD[row] = dD_acc
            partbias[row] = dbias_acc

    # Launch bounds (N = 1): Numba's int64 indexing costs registers (88 fwd / 136 bwd unbounded,
    # CUDA C: 70 / 96). Capped at 80 / 128 (3 / 2 blocks of 256 threads per SM) ptxas spills
    # nothing (frame size 0: tests/compile_checks.py links the PTX with nvJitLink for sm_90).
    def jit(fn):
        if SIMULATOR:
            return cuda.jit(fn)
        return cuda.jit(launch_bounds=vec_launch_bounds(fn.__name__, NSTATE, VEC, ONE_ROUND))(fn)

    ns = {"scan_fwd_vec": jit(scan_fwd_vec), "scan_bwd_vec": jit(scan_bwd_vec),
          "py": {"scan_fwd_vec": scan_fwd_vec, "scan_bwd_vec": scan_bwd_vec}}
    _VEC_BUILT[key] = ns
    return ns


# ---------------------------------------------------------------------------------------
# kernels that do not depend on d_state
# ---------------------------------------------------------------------------------------
def _sum_middle_py(in0, out0, in1, out1, in2, out2, in3, out3, in4, out4, n,
                   outer0, P0, inner0, outer1, P1, inner1, outer2, P2, inner2, outer3, P3, inner3,
                   outer4, P4, inner4):
    """The backward's parameter sums in one launch: for each of the n <= 5 pairs (in_j, out_j)
    of layout (outer_j, P_j, inner_j), out_j[o, i] = sum_p in_j[o, p, i], p in order
    (deterministic). The threads walk the pairs' outputs one after the other."""
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    for j in range(n):
        if j == 0:
            inp, out, outer, P, inner = in0, out0, outer0, P0, inner0
        elif j == 1:
            inp, out, outer, P, inner = in1, out1, outer1, P1, inner1
        elif j == 2:
            inp, out, outer, P, inner = in2, out2, outer2, P2, inner2
        elif j == 3:
            inp, out, outer, P, inner = in3, out3, outer3, P3, inner3
        else:
            inp, out, outer, P, inner = in4, out4, outer4, P4, inner4
        per = outer * inner
        if e < per:
            o = e // inner
            i = e - o * inner
            s = f32(0.0)
            for p in range(P):
                s += inp[(o * P + p) * inner + i]
            out[e] = s
            return
        e -= per


def _fill_py(out, value, n):
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx < n:
        out[idx] = value


def _cross_scan_naive_py(x, xs, batch, C, H, W):
    """Ladder rung "naive": one thread per element; directions 1/3 written H apart."""
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    L = H * W
    if idx < batch * C * L:
        p = idx % L
        bc = idx // L
        b = bc // C
        c = bc % C
        h = p // W
        w = p % W
        v = x[idx]
        plane = C * L
        o = b * 4 * plane + c * L
        xs[o + p] = v
        xs[o + plane + w * H + h] = v
        xs[o + 2 * plane + L - 1 - p] = v
        xs[o + 3 * plane + L - 1 - (w * H + h)] = v


def _cross_scan_tiled_py(x, xs, batch, C, H, W):
    """Ladder rung "tiled": a 32x32 shared tile so the transposed directions are coalesced.
    Block (32, 8), grid (ceil(W/32), ceil(H/32), batch*C)."""
    tile = cuda.shared.array((32, 33), float32)
    L = H * W
    bc = cuda.blockIdx.z
    b = bc // C
    c = bc % C
    h0 = cuda.blockIdx.y * 32
    w0 = cuda.blockIdx.x * 32
    tx = cuda.threadIdx.x
    plane = C * L
    o = b * 4 * plane + c * L
    i = cuda.threadIdx.y
    while i < 32:
        h = h0 + i
        w = w0 + tx
        if h < H and w < W:
            v = x[bc * L + h * W + w]
            tile[i, tx] = v
            xs[o + h * W + w] = v
            xs[o + 2 * plane + L - 1 - (h * W + w)] = v
        i += 8
    cuda.syncthreads()
    i = cuda.threadIdx.y
    while i < 32:
        w = w0 + i
        h = h0 + tx
        if h < H and w < W:
            v = tile[tx, i]
            xs[o + plane + w * H + h] = v
            xs[o + 3 * plane + L - 1 - (w * H + h)] = v
        i += 8


def _cross_merge_naive_py(ys, y, batch, C, H, W):
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    L = H * W
    if idx < batch * C * L:
        p = idx % L
        bc = idx // L
        b = bc // C
        c = bc % C
        h = p // W
        w = p % W
        plane = C * L
        o = b * 4 * plane + c * L
        q = w * H + h
        y[idx] = ys[o + p] + ys[o + plane + q] + ys[o + 2 * plane + L - 1 - p] + ys[o + 3 * plane + L - 1 - q]


def _cross_merge_tiled_py(ys, y, batch, C, H, W):
    tile = cuda.shared.array((32, 33), float32)
    L = H * W
    bc = cuda.blockIdx.z
    b = bc // C
    c = bc % C
    h0 = cuda.blockIdx.y * 32
    w0 = cuda.blockIdx.x * 32
    tx = cuda.threadIdx.x
    plane = C * L
    o = b * 4 * plane + c * L
    i = cuda.threadIdx.y
    while i < 32:
        w = w0 + i
        h = h0 + tx
        if h < H and w < W:
            q = w * H + h
            tile[tx, i] = ys[o + plane + q] + ys[o + 3 * plane + L - 1 - q]
        i += 8
    cuda.syncthreads()
    i = cuda.threadIdx.y
    while i < 32:
        h = h0 + i
        w = w0 + tx
        if h < H and w < W:
            p = h * W + w
            y[bc * L + p] = (ys[o + p] + ys[o + 2 * plane + L - 1 - p]) + tile[i, tx]
        i += 8


# Ladder rung "tiled_unsigned" (Numba only): the same tiles with every index an unsigned 64-bit
# integer (_U, see the top of the module). PTX for sm_90: 639 -> 153 instructions (cross-scan),
# 652 -> 156 (merge).


@cuda.jit(device=True, inline=True)
def _tile_origin(C, H, W):
    """Where this block's 32x32 tile of the (b, c) map lies, all uint64 (rung "tiled_unsigned"):
    (H, W, L = H*W, b*C + c, first row h0, first column w0, thread column tx, the offset o of
    direction 0 of (b, c) in the (B, 4, C, L) array (direction k at o + k * plane), plane = C*L,
    and last = the end of direction 2, which holds position p at last - p)."""
    Hu, Wu = _U(H), _U(W)
    L = Hu * Wu
    bc = _U(cuda.blockIdx.z)
    b = bc // _U(C)
    c = bc - b * _U(C)
    plane = _U(C) * L
    o = b * _U(4) * plane + c * L
    return (Hu, Wu, L, bc, _U(cuda.blockIdx.y) * _U(32), _U(cuda.blockIdx.x) * _U(32), _U(cuda.threadIdx.x),
            o, plane, o + _U(2) * plane + L - _U(1))


def _cross_scan_tiled_unsigned_py(x, xs, batch, C, H, W):
    """Rung "tiled_unsigned": _cross_scan_tiled_py with uint64 indices (no wrap-around fix-ups).
    Block (32, 8), grid (ceil(W/32), ceil(H/32), batch*C)."""
    tile = cuda.shared.array(32 * 33, float32)          # [32][33]: the pad avoids bank conflicts
    Hu, Wu, L, bc, h0, w0, tx, o, plane, last = _tile_origin(C, H, W)
    i = _U(cuda.threadIdx.y)
    w = w0 + tx
    while i < _U(32):                      # rows of the tile: read x, write directions 0 and 2
        h = h0 + i
        if h < Hu and w < Wu:
            p = h * Wu + w
            v = x[bc * L + p]
            tile[i * _U(33) + tx] = v
            xs[o + p] = v
            xs[last - p] = v
        i += _U(8)
    cuda.syncthreads()
    i = _U(cuda.threadIdx.y)
    h = h0 + tx
    while i < _U(32):                      # columns of the tile: directions 1 and 3 (w-major)
        w = w0 + i
        if h < Hu and w < Wu:
            v = tile[tx * _U(33) + i]
            q = w * Hu + h
            xs[o + plane + q] = v
            xs[last + plane - q] = v
        i += _U(8)


def _cross_merge_tiled_unsigned_py(ys, y, batch, C, H, W):
    """Rung "tiled_unsigned": _cross_merge_tiled_py with uint64 indices (no wrap-around fix-ups)."""
    tile = cuda.shared.array(32 * 33, float32)          # [32][33]: the pad avoids bank conflicts
    Hu, Wu, L, bc, h0, w0, tx, o, plane, last = _tile_origin(C, H, W)
    i = _U(cuda.threadIdx.y)
    h = h0 + tx
    while i < _U(32):                      # directions 1 and 3, read along w-major rows
        w = w0 + i
        if h < Hu and w < Wu:
            q = w * Hu + h
            tile[tx * _U(33) + i] = ys[o + plane + q] + ys[last + plane - q]
        i += _U(8)
    cuda.syncthreads()
    i = _U(cuda.threadIdx.y)
    w = w0 + tx
    while i < _U(32):                      # (d0 + d2) + (d1 + d3), as the signed rung adds them
        h = h0 + i
        if h < Hu and w < Wu:
            p = h * Wu + w
            y[bc * L + p] = (ys[o + p] + ys[last - p]) + tile[i * _U(33) + tx]
        i += _U(8)


_sum_middle = cuda.jit(_sum_middle_py)
_fill = cuda.jit(_fill_py)
_cross_scan_naive = cuda.jit(_cross_scan_naive_py)
_cross_scan_tiled = cuda.jit(_cross_scan_tiled_py)
_cross_merge_naive = cuda.jit(_cross_merge_naive_py)
_cross_merge_tiled = cuda.jit(_cross_merge_tiled_py)
_cross_scan_tiled_unsigned = cuda.jit(_cross_scan_tiled_unsigned_py)
_cross_merge_tiled_unsigned = cuda.jit(_cross_merge_tiled_unsigned_py)

# ---------------------------------------------------------------------------------------
# what tests/compile_checks.py compiles for sm_90 (name, python function, signature)
# ---------------------------------------------------------------------------------------
_A = "float32[::1]"
_I = "int32"


def _sig(n_arrays, n_ints):
    return "void(" + ", ".join([_A] * n_arrays + [_I] * n_ints) + ")"


PTX_KERNELS = [
    ("sum_middle", _sum_middle_py, _sig(10, 16)),
    ("fill", _fill_py, "void(float32[::1], float32, int32)"),
    ("cross_scan_naive", _cross_scan_naive_py, _sig(2, 4)),
    ("cross_scan_tiled", _cross_scan_tiled_py, _sig(2, 4)),
    ("cross_merge_naive", _cross_merge_naive_py, _sig(2, 4)),
    ("cross_merge_tiled", _cross_merge_tiled_py, _sig(2, 4)),
    ("cross_scan_tiled_unsigned", _cross_scan_tiled_unsigned_py, _sig(2, 4)),
    ("cross_merge_tiled_unsigned", _cross_merge_tiled_unsigned_py, _sig(2, 4)),
]
# vec: the three row layouts the host picks (SEG 32/16/8), vector and scalar loads, N = 1 and 2
for _n, _seg, _items, _vec in ((1, 32, 4, True), (1, 32, 4, False), (1, 16, 4, True), (1, 8, 4, False),
                               (2, 32, 4, True), (1, 32, 2, True)):
    _py = _build_vec(_n, _seg, _items, _vec)["py"]
    _tag = f"N{_n}_S{_seg}_I{_items}_{'v' if _vec else 's'}"
    PTX_KERNELS += [(f"scan_fwd_vec_{_tag}", _py["scan_fwd_vec"], _sig(8, 5)),
                    (f"scan_bwd_vec_{_tag}", _py["scan_bwd_vec"], _sig(16, 5))]
# ... and the one-round kernels of short rows (L <= SEG*ITEMS: L = 49 at SEG 16)
for _n, _seg, _items, _vec in ((1, 16, 4, False), (1, 16, 4, True), (1, 8, 4, False)):
    _py = _build_vec(_n, _seg, _items, _vec, True)["py"]
    _tag = f"N{_n}_S{_seg}_I{_items}_{'v' if _vec else 's'}_1r"
    PTX_KERNELS += [(f"scan_fwd_vec_{_tag}", _py["scan_fwd_vec"], _sig(8, 5)),
                    (f"scan_bwd_vec_{_tag}", _py["scan_bwd_vec"], _sig(16, 5))]
for _n, _ch in ((1, FWD_CHUNKS), (2, BWD_CHUNKS), (1, FUSED_CHUNKS)):
    _py = _build(_n, _ch)["py"]
    PTX_KERNELS += [
        (f"scan_fwd_naive_N{_n}", _py["scan_fwd_naive"], _sig(8, 5)),
        (f"scan_fwd_warp_N{_n}_C{_ch}", _py["scan_fwd_warp"], _sig(8, 5)),
        (f"scan_bwd_warp_N{_n}_C{_ch}", _py["scan_bwd_warp"], _sig(16, 5)),
        (f"ss2d_fwd_fused_N{_n}_C{_ch}", _py["ss2d_fwd_fused"], _sig(8, 6)),
        (f"ss2d_bwd_fused_N{_n}_C{_ch}", _py["ss2d_bwd_fused"], _sig(16, 6)),
    ]


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
def _flat(x):
    """A flat float32 device view of x (Numba device array or __cuda_array_interface__)."""
    if not (hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")):
        raise TypeError(f"backend 'numba_cuda' needs device arrays (__cuda_array_interface__), got "
                        f"{type(x).__name__}; move the data with numba.cuda.to_device or cupy.asarray")
    view = foreign_flat(x)     # CuPy / torch without Numba's import (and its stream synchronisation)
    if view is not None:
        return view
    a = x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)
    if not a.is_c_contiguous():
        raise ValueError("backend 'numba_cuda' needs C-contiguous arrays")
    return flat_view(a)   # a light 1-D view (see _launch.flat): no Numba reshape per call


def _poison(*bufs):
    """Fill fresh outputs with NaN while poison_outputs() is on (tests: unwritten elements fail)."""
    if poisoning():
        for buf in bufs:
            launch(_fill, (buf.size + 255) // 256, 256, buf, f32(np.nan), np.int32(buf.size))
    return bufs


def _empty(shape):
    """A fresh flat float32 buffer of prod(shape) elements (a FlatView on the fast path; see
    _launch.empty_flat), NaN-poisoned under poison_outputs(); _wrap gives it its shape."""
    out = empty_flat(math.prod(shape), np.float32)
    _poison(out)
    return out


def _scratch(*sizes):
    """Flat float32 buffers a call needs only internally, all from one allocation."""
    return _poison(*empty_flats(sizes, np.float32))


def _outputs(*sizes):
    """Fresh flat float32 outputs of one call, from one allocation (_wrap shapes each one);
    NaN-poisoned under poison_outputs()."""
    return _poison(*empty_flats(sizes, np.float32))


def _zeros(n):
    out = empty_flat(n, np.float32)
    launch(_fill, (n + 255) // 256, 256, out, f32(0.0), np.int32(n))
    return out


def _or_zeros(v, n):
    return _zeros(n) if v is None else _flat(v)


def _wrap(flat, shape, like):
    """A flat output as an array of ``shape``; CuPy when the caller gave CuPy."""
    out = as_array(flat, shape)
    if type(like).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy.asarray(out)
    return out


def _i(v):
    return np.int32(v)


def _sum(jobs):
    """[flat out_j] for jobs [(part_j, outer_j, P_j, inner_j)] (at most five): out_j[o*inner_j + i]
    = sum_p part_j[(o*P_j + p)*inner_j + i], all in one launch (_sum_middle_py), the outputs
    carved from one allocation."""
    sizes = [outer * inner for _, outer, _, inner in jobs]
    outs = _outputs(*sizes)
    pad = 5 - len(jobs)                                      # unused slots: never read or written
    ptrs = [a for (part, *_), out in zip(jobs, outs) for a in (part, out)] + [outs[0], outs[0]] * pad
    dims = [_i(d) for _, outer, P, inner in jobs for d in (outer, P, inner)] + [_i(0)] * (3 * pad)
    launch(_sum_middle, (sum(sizes) + 255) // 256, 256, *ptrs, _i(len(jobs)), *dims)
    return outs


def _parameter_grads(partA, partD, partbias, cache, B_C=None):
    """{"A", "D", "delta_bias"} summed over the batch (None for a parameter the forward did not
    get) and, with B_C = (partB, partC, outer, nblk, inner, shape), "B" and "C" summed over the
    nblk channel blocks: one launch for all of them."""
    batch, N = cache["shape"][0], cache["shape"][-1]
    KD = partD.size // batch
    jobs = [("A", partA, 1, batch, KD * N, (KD, N))]
    jobs += [(name, part, 1, batch, KD, (KD,)) for name, part in (("D", partD), ("delta_bias", partbias))
             if cache[name] is not None]
    if B_C is not None:
        partB, partC, outer, nblk, inner, shape = B_C
        jobs += [("B", partB, outer, nblk, inner, shape), ("C", partC, outer, nblk, inner, shape)]
    sums = _sum([job[1:5] for job in jobs])
    out = {"D": None, "delta_bias": None}
    out.update({job[0]: _wrap(r, job[5], cache["u"]) for job, r in zip(jobs, sums)})
    return out


def _scan_fwd(version, u, delta, A, B, C, D, delta_bias, delta_softplus):
    batch, KD, L, K, N, _ = scan_shapes(u, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="numba_cuda")
    args = (_flat(u), _flat(delta), _flat(A), _flat(B), _flat(C), _or_zeros(D, KD), _or_zeros(delta_bias, KD))
    y = _empty((batch, KD, L))
    rows = batch * KD
    tail = (_i(batch), _i(KD), _i(L), _i(K), _i(bool(delta_softplus)))
    if version == "naive":
        launch(_build(N, FWD_CHUNKS)["scan_fwd_naive"], (rows + 63) // 64, 64, *args, y, *tail)
    elif version == "vec":
        seg, items = vec_layout(L)
        per_block = VEC_WARPS * 32 // seg
        launch(_build_vec(N, seg, items, vec_loads_ok(L, items, *args[:5], y), L <= seg * items)["scan_fwd_vec"],
               (rows + per_block - 1) // per_block, 32 * VEC_WARPS, *args, y, *tail)
    else:
        launch(_build(N, FWD_CHUNKS)["scan_fwd_warp"], (rows + FWD_WARPS - 1) // FWD_WARPS, 32 * FWD_WARPS,
               *args, y, *tail)
    cache = scan_cache(u, delta, A, B, C, D, delta_bias, delta_softplus, (batch, KD, L, K, N))
    cache["_flat_inputs"] = args
    return _wrap(y, (batch, KD, L), u), cache


def _flat_inputs(cache):
    """Flat views of u, delta, A, B, C, D, delta_bias (zeros for a missing D / delta_bias): the
    ones the forward made and kept in its cache, else made now (a cache built elsewhere)."""
    kept = cache.get("_flat_inputs")
    if kept is not None:
        return kept
    KD = cache["shape"][1]
    return (*(_flat(cache[name]) for name in ("u", "delta", "A", "B", "C")),
            _or_zeros(cache["D"], KD), _or_zeros(cache["delta_bias"], KD))


def _scan_grads(du, ddelta, partA, partB, partC, partD, partbias, cache, nblk):
    """The backward's gradient dict: du, ddelta as written; dA, dD, ddelta_bias summed over the
    batch and dB, dC over the nblk channel blocks of each group (sum_middle, fixed order)."""
    batch, KD, L, K, N = cache["shape"]
    like = cache["u"]
    return {"u": _wrap(du, (batch, KD, L), like), "delta": _wrap(ddelta, (batch, KD, L), like),
            **_parameter_grads(partA, partD, partbias, cache,
                               B_C=(partB, partC, batch * K, nblk, N * L, (batch, K, N, L)))}


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


def selective_scan_bwd_vec(dy, cache):
    """Ladder rung "vec" of the backward (the CUDA C scan_bwd_vec's twin): the two-pass backward
    with ITEMS steps per lane; dB/dC summed over the block's rows in shared memory."""
    batch, KD, L, K, N = cache["shape"]
    check_dy("dy", dy, (batch, KD, L), np.float32)
    seg, items = vec_layout(L)
    warps = min(VEC_WARPS, SHARED_LIMIT // (2 * N * 32 * items * 4))
    if warps < 1:                  # too large a d_state for 48 KB of shared memory
        return selective_scan_bwd(dy, cache)
    slots = warps * 32 // seg      # rows (channels of one group) per block
    Dg = KD // K
    nblk = (Dg + slots - 1) // slots
    nrounds = (L + seg * items - 1) // (seg * items)
    ins = _flat_inputs(cache)
    dyd = _flat(dy)
    du, ddelta = _outputs(batch * KD * L, batch * KD * L)
    hstart, partB, partC, partA, partD, partbias = _scratch(
        batch * KD * nrounds * N, batch * K * nblk * N * L, batch * K * nblk * N * L, batch * KD * N, batch * KD,
        batch * KD)
    vec = vec_loads_ok(L, items, *ins[:2], *ins[3:5], dyd, du, ddelta)
    shared = slots * 2 * N * seg * items * 4
    launch(_build_vec(N, seg, items, vec, nrounds == 1)["scan_bwd_vec"], (nblk, K, batch), 32 * warps,
           *ins, dyd, hstart, du, ddelta, partB, partC, partA, partD,
           partbias, _i(batch), _i(KD), _i(L), _i(K), _i(bool(cache["delta_softplus"])), sharedmem=shared)
    return _scan_grads(du, ddelta, partA, partB, partC, partD, partbias, cache, nblk)


def selective_scan_bwd(dy, cache):
    """Backward of :func:`selective_scan_fwd`: dict keyed u, delta, A, B, C, D, delta_bias."""
    batch, KD, L, K, N = cache["shape"]
    check_dy("dy", dy, (batch, KD, L), np.float32)
    Dg = KD // K
    nblk = (Dg + BWD_WARPS - 1) // BWD_WARPS
    nrounds = (L + 32 * BWD_CHUNKS - 1) // (32 * BWD_CHUNKS)
    du, ddelta = _outputs(batch * KD * L, batch * KD * L)
    hstart, partB, partC, partA, partD, partbias = _scratch(
        batch * KD * nrounds * N, batch * K * nblk * N * L, batch * K * nblk * N * L, batch * KD * N, batch * KD,
        batch * KD)
    shared = BWD_WARPS * 2 * BWD_CHUNKS * 32 * N * 4
    launch(_build(N, BWD_CHUNKS)["scan_bwd_warp"], (nblk, K, batch), 32 * BWD_WARPS,
        *_flat_inputs(cache), _flat(dy), hstart, du, ddelta, partB, partC, partA, partD,
        partbias, _i(batch), _i(KD), _i(L), _i(K), _i(bool(cache["delta_softplus"])), sharedmem=shared)
    return _scan_grads(du, ddelta, partA, partB, partC, partD, partbias, cache, nblk)


def _check_map(x):
    if not hasattr(x, "shape") or len(x.shape) != 4:
        raise ValueError(f"x must have 4 dimensions (B, C, H, W), got {getattr(x, 'shape', type(x))}")
    check_dtype(x.dtype, (np.float32,), "numba_cuda")
    return tuple(int(s) for s in x.shape)


def _launch_2d(naive, tiled, src, dst, batch, C, H, W, version):
    if version in ("tiled", "tiled_unsigned") and batch * C <= 65535:
        launch(tiled, ((W + 31) // 32, (H + 31) // 32, batch * C), (32, 8), src, dst, _i(batch), _i(C), _i(H), _i(W))
    else:
        total = batch * C * H * W
        launch(naive, (total + 255) // 256, 256, src, dst, _i(batch), _i(C), _i(H), _i(W))


def _cross_scan(x, version):
    batch, C, H, W = _check_map(x)
    xs = _empty((batch, K_DIRECTIONS, C, H * W))
    tiled = _cross_scan_tiled_unsigned if version == "tiled_unsigned" else _cross_scan_tiled
    _launch_2d(_cross_scan_naive, tiled, _flat(x), xs, batch, C, H, W, version)
    return _wrap(xs, (batch, K_DIRECTIONS, C, H * W), x)


def _cross_merge(ys, H, W, version):
    batch, C, H, W = check_merge_shapes(ys, H, W)
    check_dtype(ys.dtype, (np.float32,), "numba_cuda")
    y = _empty((batch, C, H, W))
    tiled = _cross_merge_tiled_unsigned if version == "tiled_unsigned" else _cross_merge_tiled
    _launch_2d(_cross_merge_naive, tiled, _flat(ys), y, batch, C, H, W, version)
    return _wrap(y, (batch, C, H, W), ys)


def cross_scan_naive(x):
    """Ladder rung "naive": one thread per element; directions 1/3 written uncoalesced."""
    return _cross_scan(x, "naive")


def cross_scan_tiled(x):
    """Ladder rung "tiled": 32x32 shared tiles, signed (int64) indices as Numba types them."""
    return _cross_scan(x, "tiled")


def cross_scan(x):
    """``x (B, C, H, W)`` -> ``(B, 4, C, H*W)`` through 32x32 shared tiles with unsigned indices
    (rung "tiled_unsigned", the default)."""
    return _cross_scan(x, "tiled_unsigned")


def cross_merge_naive(ys, H, W):
    """Ladder rung "naive": one thread per output element; directions 1/3 read uncoalesced."""
    return _cross_merge(ys, H, W, "naive")


def cross_merge_tiled(ys, H, W):
    """Ladder rung "tiled": 32x32 shared tiles, signed (int64) indices as Numba types them."""
    return _cross_merge(ys, H, W, "tiled")


def cross_merge(ys, H, W):
    """``ys (B, 4, C, H*W)`` -> ``(B, C, H, W)`` through 32x32 shared tiles with unsigned indices
    (rung "tiled_unsigned", the default)."""
    return _cross_merge(ys, H, W, "tiled_unsigned")


def _pitch(W):
    return W | 1


def ss2d_scan_fwd_composed(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Ladder rung "composed": cross_scan, selective_scan_fwd, cross_merge kernels in turn."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="numba_cuda")
    xs = cross_scan(x).reshape(batch, K_DIRECTIONS * Di, H * W)
    ys, _ = selective_scan_fwd_vec(xs, delta, A, B, C, D, delta_bias, delta_softplus)
    y = cross_merge(ys.reshape(batch, K_DIRECTIONS, Di, H * W), H, W)
    return y, scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N))


def ss2d_scan_bwd_composed(dy, cache):
    """Ladder rung "composed" of the backward: cross_scan(dy), the scan backward, cross_merge."""
    batch, Di, H, W, N = cache["shape"]
    check_dy("dy", dy, (batch, Di, H, W), np.float32)
    KD, L = K_DIRECTIONS * Di, H * W
    xs = cross_scan(cache["u"]).reshape(batch, KD, L)
    sc = scan_cache(xs, cache["delta"], cache["A"], cache["B"], cache["C"], cache["D"],
                    cache["delta_bias"], cache["delta_softplus"], (batch, KD, L, K_DIRECTIONS, N))
    g = selective_scan_bwd_vec(cross_scan(dy).reshape(batch, KD, L), sc)
    dxs = g.pop("u")
    return {"x": cross_merge(dxs.reshape(batch, K_DIRECTIONS, Di, L), H, W), **g}


def ss2d_scan_fwd(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Fused 2-D scan forward (rung "fused"); the composed version when the map does not fit in
    48 KB of shared memory. Returns ``(y, cache)``; see :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="numba_cuda")
    P = _pitch(W)
    shared = 2 * H * P * 4
    if shared > SHARED_LIMIT:
        return ss2d_scan_fwd_composed(x, delta, A, B, C, D, delta_bias, delta_softplus)
    KD = K_DIRECTIONS * Di
    y = _empty((batch, Di, H, W))
    launch(_build(N, FUSED_CHUNKS)["ss2d_fwd_fused"], batch * Di, 64,
        _flat(x), _flat(delta), _flat(A), _flat(B), _flat(C), _or_zeros(D, KD), _or_zeros(delta_bias, KD), y,
        _i(batch), _i(Di), _i(H), _i(W), _i(P), _i(bool(delta_softplus)), sharedmem=shared)
    return (_wrap(y, (batch, Di, H, W), x),
            scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N)))


def ss2d_scan_bwd(dy, cache):
    """Fused 2-D scan backward (rung "fused"): dict keyed x, delta, A, B, C, D, delta_bias.
    dx, ddelta deterministic; dB/dC summed with atomics (their low bits may vary)."""
    batch, Di, H, W, N = cache["shape"]
    check_dy("dy", dy, (batch, Di, H, W), np.float32)
    P = _pitch(W)
    shared = 3 * H * P * 4
    if shared > SHARED_LIMIT:
        return ss2d_scan_bwd_composed(dy, cache)
    KD, L = K_DIRECTIONS * Di, H * W
    nrounds = (L + 32 * BWD_CHUNKS - 1) // (32 * BWD_CHUNKS)
    D, bias = cache["D"], cache["delta_bias"]
    dx, ddelta = _empty((batch, Di, H, W)), _empty((batch, KD, L))
    dB, dC = _zeros(batch * K_DIRECTIONS * N * L), _zeros(batch * K_DIRECTIONS * N * L)
    hstart, partA, partD, partbias = _scratch(batch * KD * nrounds * N, batch * KD * N, batch * KD, batch * KD)
    launch(_build(N, BWD_CHUNKS)["ss2d_bwd_fused"], batch * Di, 64,
        _flat(cache["u"]), _flat(dy), _flat(cache["delta"]), _flat(cache["A"]), _flat(cache["B"]),
        _flat(cache["C"]), _or_zeros(D, KD), _or_zeros(bias, KD), hstart, dx, ddelta, dB, dC, partA, partD,
        partbias, _i(batch), _i(Di), _i(H), _i(W), _i(P), _i(bool(cache["delta_softplus"])), sharedmem=shared,
        deterministic=False)   # dB, dC are atomicAdd sums
    like = cache["u"]
    return {"x": _wrap(dx, (batch, Di, H, W), like), "delta": _wrap(ddelta, (batch, KD, L), like),
            "B": _wrap(dB, (batch, K_DIRECTIONS, N, L), like), "C": _wrap(dC, (batch, K_DIRECTIONS, N, L), like),
            **_parameter_grads(partA, partD, partbias, cache)}
