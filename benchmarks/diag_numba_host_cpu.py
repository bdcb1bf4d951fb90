"""The Python host cost of the Numba-CUDA kernel wrappers, measured on a CPU (no GPU needed).

At small shapes (the scan at L = 49, DMCA) a Numba-CUDA call is host-bound: the GPU waits on
Python. This script times the wrappers' own Python work with the GPU parts replaced: device
memory by made-up addresses (Numba's real ``MemoryPointer`` / ``DeviceNDArray`` classes, never
dereferenced) and each kernel launch by the argument description ``_launch.launch`` does before
it calls the driver. What it leaves out: the driver launch itself (cuda.core, ~10 us a launch on
an H100 host) and the allocator's own time. Use it to find and check host-side savings between
GPU runs; the GPU figures (``diag_kernel_vs_host.py``, the benchmarks) remain the verdict.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/diag_numba_host_cpu.py [--profile] [--calls 2000]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"        # the real driver classes (the simulator replaces them)
HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import common  # noqa: E402


class _FakeContext:
    """Stands in for Numba's context: memalloc hands out made-up, never-dereferenced addresses."""

    def __init__(self):
        from numba.cuda.cudadrv.driver import MemoryPointer
        self._pointer_class = MemoryPointer
        self._next = 0x7F00_0000_0000
        self.device = type("Device", (), {})()
        self.device.primary_context = self

    def memalloc(self, nbytes):
        ptr = self._next
        self._next += (nbytes + 4095) // 4096 * 4096
        return self._pointer_class(self, ctypes.c_void_p(ptr), nbytes, finalizer=lambda: None)


def _install_fakes():
    """Route allocation and launches of the Numba kernel modules to the stand-ins."""
    from sparx_ref.kernels.numba_cuda import _launch, attention, scan
    ctx = _FakeContext()
    _launch._THREAD.context = ctx
    _launch._ONE_DEVICE = True
    _launch._fast_enabled = lambda: True

    def describe_only(kernel, griddim, blockdim, *args, stream=0, sharedmem=0, deterministic=True):
        for a in args:                      # what launch() does per argument before the driver call
            (_launch._DESCRIBERS.get(type(a)) or _launch._describe)(a, stream)
    scan.launch = describe_only
    attention.launch = describe_only
    return ctx


def _device_array(ctx, shape):
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from sparx_ref.kernels.numba_cuda._launch import _c_strides
    nbytes = int(np.prod(shape)) * 4
    return DeviceNDArray(shape, _c_strides(shape, 4), np.dtype(np.float32), gpu_data=ctx.memalloc(nbytes))


def cases(ctx):
    """(name, call) at the SparX-Mamba-T shapes of the GPU diagnostics (batch 64)."""
    from sparx_ref.kernels.numba_cuda import attention, scan
    b, KD, L, K = 64, 4096, 49, 4
    u, delta, dy = (_device_array(ctx, (b, KD, L)) for _ in range(3))
    A, D, bias = _device_array(ctx, (KD, 1)), _device_array(ctx, (KD,)), _device_array(ctx, (KD,))
    B, C = _device_array(ctx, (b, K, 1, L)), _device_array(ctx, (b, K, 1, L))

    def scan_fwd():
        return scan.selective_scan_fwd_vec(u, delta, A, B, C, D, bias, True)

    def scan_fwd_bwd():
        _, cache = scan_fwd()
        return scan.selective_scan_bwd_vec(dy, cache)
    q, k = _device_array(ctx, (64, 192, 49)), _device_array(ctx, (64, 192, 49))
    v, dout = _device_array(ctx, (64, 192, 784)), _device_array(ctx, (64, 192, 784))

    def dmca_fwd_bwd():
        _, cache = attention.dmca_attention_fwd(q, k, v, 4)
        return attention.dmca_attention_bwd(dout, cache)
    return [("scan fwd L=49", scan_fwd), ("scan fwd+bwd L=49", scan_fwd_bwd), ("dmca fwd+bwd C=192", dmca_fwd_bwd)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="also print each case's cProfile (cumulative)")
    args = p.parse_args(argv)
    ctx = _install_fakes()
    for name, call in cases(ctx):
        for _ in range(50):
            call()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us of Python per call (launches and "
              "allocations stood in for)", flush=True)
        if args.profile:
            print(common.profile_text(call, 500, (("cumulative", 25),)))


if __name__ == "__main__":
    main()
