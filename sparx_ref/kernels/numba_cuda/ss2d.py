"""Numba-CUDA ladder rung "quad" of the 2-D scan forward (``ss2d_scan_fwd``): one block of four
warps per (batch, channel), warp k scanning direction k, the map read once into shared memory.

The same kernel as :mod:`sparx_ref.kernels.cupy.ss2d` (whose docstring gives the design and the
determinism argument of the merge), written in Python for ``numba.cuda``; read the two side by
side. Differences: delta/B/C come in 16-byte vector loads as in CUDA C (through scan.py's
``load4`` intrinsic) when L % 4 == 0 and the bases are aligned, else in scalar loads; the x map
is read with scalar loads; and Numba cannot raise a kernel's dynamic shared memory above 48 KB, so maps with 3*H*(W|1)*4 > 48 KB
(larger than ~63 x 63) run the composed version.

Same signature and semantics as :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd` (float32 device
arrays); y is ``(y0 + y1) + (y2 + y3)``: deterministic, not bitwise equal to the composed path.
Under the CUDA simulator the warp shuffles are shared-memory emulations with block barriers
(see :mod:`sparx_ref.kernels.numba_cuda.scan`), so the control flow is uniform over the block.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32

from .._scan_common import K_DIRECTIONS, scan_cache, ss2d_shapes
from ._launch import launch
from ..cupy.scan import vec_loads_ok   # host-side rule shared by both backends (no CuPy import)
from .scan import (SHARED_LIMIT, SIMULATOR, _empty, _flat, _or_zeros, _wrap, load4, load_map, shfl_idx,
                   shfl_up2, softplus_f, ss2d_scan_fwd_composed)

__all__ = ["ss2d_scan_fwd_quad"]

if SIMULATOR:  # pragma: no cover - the simulator swaps ``cuda`` only in the globals of jitted
    # functions; scan.py's emulated shuffles are plain Python there, so wrap them to get the swap
    shfl_up2, shfl_idx = cuda.jit(device=True)(shfl_up2), cuda.jit(device=True)(shfl_idx)

f32 = np.float32
QUAD_ITEMS = 2 if SIMULATOR else 4   # consecutive steps per lane (simulator: 64-step rounds)
SHORT_ITEMS = 2                      # for L <= 64 (7x7 maps): fewer idle lanes in the one round
QUAD_THREADS = 128                   # four warps, one per direction


@cuda.jit(device=True, inline=True)
def quad_start(kdir, t, H, W):
    """First map position (major, minor) of scan index t in direction kdir; minor runs fastest
    (w for the row-major directions 0/2, h for the column-major 1/3); unused when t >= L."""
    s = H * W - 1 - t if kdir >= 2 else t
    M = H if kdir & 1 else W
    major = s // M
    return major, s - major * M


@cuda.jit(device=True, inline=True)
def quad_addr(kdir, major, minor, P):
    return minor * P + major if kdir & 1 else major * P + minor


@cuda.jit(device=True, inline=True)
def quad_next(kdir, H, W, major, minor):
    M = H if kdir & 1 else W
    if kdir < 2:
        minor += 1
        if minor == M:
            minor = 0
            major += 1
    else:
        minor -= 1
        if minor < 0:
            minor = M - 1
            major -= 1
    return major, minor


_BUILT: dict = {}


def _build(NSTATE: int, ITEMS: int, VEC: bool = False):
    """The kernel for d_state = NSTATE, ITEMS consecutive steps per lane and 16-byte loads of
    delta/B/C (VEC; needs ITEMS % 4 == 0, L % 4 == 0 and aligned bases): compile-time."""
    VEC = bool(VEC) and ITEMS % 4 == 0
    key = (NSTATE, ITEMS, VEC)
    if key in _BUILT:
        return _BUILT[key]
    ROUND = 32 * ITEMS

    @cuda.jit(device=True, inline=True)
    def quad_load(delta, doff, B, C, goff, t0, L, z, Bv, Cv):
        """delta/B/C of the lane's steps t0 .. t0+ITEMS-1 (zeros past L). VEC: one 16-byte load per
        4 steps (t0 and L multiples of 4: a vector is all in or all out)."""
        if VEC:
            for q in range(0, ITEMS, 4):
                if t0 + q < L:
                    z[q], z[q + 1], z[q + 2], z[q + 3] = load4(delta, doff + t0 + q)
                    for n in range(NSTATE):
                        Bv[q, n], Bv[q + 1, n], Bv[q + 2, n], Bv[q + 3, n] = load4(B, goff + n * L + t0 + q)
                        Cv[q, n], Cv[q + 1, n], Cv[q + 2, n], Cv[q + 3, n] = load4(C, goff + n * L + t0 + q)
                else:
                    for i in range(q, q + 4):
                        z[i] = f32(0.0)
                        for n in range(NSTATE):
                            Bv[i, n] = f32(0.0)
                            Cv[i, n] = f32(0.0)
            return
        for i in range(ITEMS):
            t = t0 + i
            ok = t < L
            z[i] = delta[doff + t] if ok else f32(0.0)
            for n in range(NSTATE):
                Bv[i, n] = B[goff + n * L + t] if ok else f32(0.0)
                Cv[i, n] = C[goff + n * L + t] if ok else f32(0.0)

    def ss2d_fwd_quad(x, delta, A, B, C, D, bias, y, batch, Di, H, W, P, softplus):
        """One block of 4 warps per (batch, channel); warp k scans direction k from the shared
        map; y_k atomically added into Pm (k = 0, 1) or Qm (k = 2, 3); then y = Pm + Qm."""
        smem = cuda.shared.array(0, float32)
        pm = H * P                    # offsets: x map at 0, Pm, Qm
        qm = 2 * H * P
        bc = cuda.blockIdx.x
        b = bc // Di
        c = bc - b * Di
        L = H * W
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        xoff = bc * L

        # 1. the map into shared memory (8 loads in flight per thread), accumulators zeroed
        e = tid
        while e < 2 * H * P:
            smem[pm + e] = f32(0.0)
            e += nthr
        load_map(x, xoff, smem, 0, H, W, P)
        cuda.syncthreads()

        # 2. warp kdir scans direction kdir
        lane = tid & 31
        kdir = tid >> 5
        ch = kdir * Di + c
        doff = (b * 4 * Di + ch) * L
        goff = (b * 4 + kdir) * NSTATE * L
        acc = pm if kdir < 2 else qm
        An = cuda.local.array(NSTATE, float32)
        carry = cuda.local.array(NSTATE, float32)
        for n in range(NSTATE):
            An[n] = A[ch * NSTATE + n]
            carry[n] = f32(0.0)
        Dc = D[ch]
        bch = bias[ch]
        nrounds = (L + ROUND - 1) // ROUND
        # map position of the lane's first step, moved on by ROUND steps a round
        M = H if kdir & 1 else W
        adv_major = ROUND // M
        adv_minor = ROUND - adv_major * M
        major0, minor0 = quad_start(kdir, lane * ITEMS, H, W)
        z = cuda.local.array(ITEMS, float32)
        Bv = cuda.local.array((ITEMS, NSTATE), float32)
        Cv = cuda.local.array((ITEMS, NSTATE), float32)
        zn = cuda.local.array(ITEMS, float32)
        Bn = cuda.local.array((ITEMS, NSTATE), float32)
        Cn = cuda.local.array((ITEMS, NSTATE), float32)
        u = cuda.local.array(ITEMS, float32)
        dt = cuda.local.array(ITEMS, float32)
        yv = cuda.local.array(ITEMS, float32)
        a = cuda.local.array(ITEMS, float32)
        bb = cuda.local.array(ITEMS, float32)
        addr = cuda.local.array(ITEMS, int32)
        quad_load(delta, doff, B, C, goff, lane * ITEMS, L, z, Bv, Cv)
        for r in range(nrounds):
            t0 = r * ROUND + lane * ITEMS
            # the next round's loads go out before this round is scanned
            quad_load(delta, doff, B, C, goff, t0 + ROUND, L, zn, Bn, Cn)
            major = major0
            minor = minor0
            for i in range(ITEMS):
                ok = t0 + i < L
                addr[i] = quad_addr(kdir, major, minor, P) if ok else 0
                u[i] = smem[addr[i]] if ok else f32(0.0)
                if ok:
                    major, minor = quad_next(kdir, H, W, major, minor)
                zz = z[i] + bch
                dt[i] = softplus_f(zz) if softplus else zz
                yv[i] = Dc * u[i]
            for n in range(NSTATE):
                ag = f32(1.0)         # the lane's ITEMS maps h -> a h + b composed, in time order
                bg = f32(0.0)
                for i in range(ITEMS):
                    ok = t0 + i < L
                    a[i] = f32(math.exp(dt[i] * An[n])) if ok else f32(1.0)
                    bb[i] = dt[i] * Bv[i, n] * u[i] if ok else f32(0.0)
                    bg = a[i] * bg + bb[i]
                    ag = a[i] * ag
                off = 1
                while off < 32:       # inclusive Kogge-Stone over the lanes
                    a_up, b_up = shfl_up2(ag, bg, off)
                    if lane >= off:
                        bg = ag * b_up + bg
                        ag = ag * a_up
                    off *= 2
                ae, be = shfl_up2(ag, bg, 1)      # exclusive prefix
                a31 = shfl_idx(ag, 31)            # the whole round
                b31 = shfl_idx(bg, 31)
                if lane == 0:
                    ae = f32(1.0)
                    be = f32(0.0)
                h = ae * carry[n] + be            # state entering the lane's first step
                carry[n] = a31 * carry[n] + b31
                for i in range(ITEMS):
                    h = a[i] * h + bb[i]
                    yv[i] += Cv[i, n] * h
            for i in range(ITEMS):      # two addends per element: deterministic
                if t0 + i < L:
                    cuda.atomic.add(smem, acc + addr[i], yv[i])
            if kdir < 2:
                minor0 += adv_minor
                major0 += adv_major
                if minor0 >= M:
                    minor0 -= M
                    major0 += 1
            else:
                minor0 -= adv_minor
                major0 -= adv_major
                if minor0 < 0:
                    minor0 += M
                    major0 -= 1
            for i in range(ITEMS):
                z[i] = zn[i]
                for n in range(NSTATE):
                    Bv[i, n] = Bn[i, n]
                    Cv[i, n] = Cn[i, n]
        cuda.syncthreads()

        # 3. y = Pm + Qm, written once, coalesced
        p = tid
        while p < L:
            h = p // W
            o = h * P + p - h * W
            y[xoff + p] = smem[pm + o] + smem[qm + o]
            p += nthr

    ns = {"ss2d_fwd_quad": cuda.jit(ss2d_fwd_quad), "py": ss2d_fwd_quad}
    _BUILT[key] = ns
    return ns


# what tests/compile_checks.py compiles for sm_90 (name, python function, signature)
_SIG = "void(" + ", ".join(["float32[::1]"] * 8 + ["int32"] * 6) + ")"
PTX_KERNELS = [(f"ss2d_fwd_quad_N{_n}_I{_it}{'_v' if _v else ''}", _build(_n, _it, _v)["py"], _SIG)
               for _n, _it, _v in ((1, QUAD_ITEMS, False), (2, QUAD_ITEMS, False), (1, SHORT_ITEMS, False),
                                   (1, 4, True), (2, 4, True))]


def ss2d_scan_fwd_quad(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """2-D scan forward, ladder rung "quad": one block of 4 warps per (batch, channel), warp k
    scanning direction k from the map in shared memory, ITEMS consecutive steps per lane, the
    directions merged by two deterministic shared accumulators. Returns ``(y, cache)``; see
    :func:`sparx_ref.ref.ss2d.ss2d_scan_fwd`. The composed version runs when 3*H*(W|1)*4
    bytes exceed Numba's 48 KB of dynamic shared memory."""
    batch, Di, H, W, N, _ = ss2d_shapes(x, delta, A, B, C, D, delta_bias, allowed=(np.float32,),
                                        backend="numba_cuda")
    P = W | 1
    shared = 3 * H * P * 4
    if shared > SHARED_LIMIT:
        return ss2d_scan_fwd_composed(x, delta, A, B, C, D, delta_bias, delta_softplus)
    KD, L = K_DIRECTIONS * Di, H * W
    y = _empty((batch, Di, H, W))
    i32 = np.int32
    items = SHORT_ITEMS if L <= 32 * SHORT_ITEMS else QUAD_ITEMS
    ins = (_flat(x), _flat(delta), _flat(A), _flat(B), _flat(C))
    vec = items % 4 == 0 and vec_loads_ok(L, items, ins[1], ins[3], ins[4])
    launch(_build(N, items, vec)["ss2d_fwd_quad"], batch * Di, QUAD_THREADS,
           *ins, _or_zeros(D, KD), _or_zeros(delta_bias, KD), y,
           i32(batch), i32(Di), i32(H), i32(W), i32(P), i32(bool(delta_softplus)), sharedmem=shared)
    return (_wrap(y, (batch, Di, H, W), x),
            scan_cache(x, delta, A, B, C, D, delta_bias, delta_softplus, (batch, Di, H, W, N)))
