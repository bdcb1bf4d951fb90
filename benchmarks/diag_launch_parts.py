"""Where a host-bound Numba-CUDA call's host time goes, on the GPU machine itself. (GPU only.)

``diag_kernel_vs_host.py`` shows that at small shapes (scan L = 49, DMCA) a Numba call's
CUDA-event time is its host time; ``diag_numba_host_cpu.py`` times its Python on a CPU with the
driver stood in for. This script splits the host time on the lent machine:

1. one kernel launch of 7 arrays + 7 int64 scalars (56 parameters), issued five ways:
   ``_launch.launch`` (describe, plan lookup, pack, cuda.core), cuda.core's ``launch`` with the
   arguments packed once, ``cuda.bindings`` ``cuLaunchKernel``, ctypes ``cuLaunchKernel`` from a
   filled parameter buffer, and CuPy's ``RawKernel`` with the same parameter list;
2. one allocation: ``_launch.empty_flats`` (four pieces) and ``cupy.empty`` (CuPy's pool);
3. whole calls (Numba device arrays in, as the benchmarks pass them): host us per call as is,
   with the kernel launches stood in for (argument description only), and the CuPy backend's.

Host time = wall time of many calls back to back, synchronising only between batches
(``diag_kernel_vs_host.host_ms``: the median of 5 batches).

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/diag_launch_parts.py [--calls 200]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import common  # noqa: E402
from diag_kernel_vs_host import cases, host_ms  # noqa: E402


def host_us(fn, calls=200):
    """Host wall time of one call in us (calls back to back; diag_kernel_vs_host.host_ms)."""
    return host_ms(fn, reps=calls) * 1e3


CUPY_SOURCE = r"""
extern "C" __global__ void touch7(float* a0, float* a1, float* a2, float* a3, float* a4, float* a5, float* a6,
                                  long long n0, long long n1, long long n2, long long n3, long long n4,
                                  long long n5, long long n6) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n0 && n1 < 0) a0[i] = a1[i] + a2[i] + a3[i] + a4[i] + a5[i] + a6[i] + (float)(n2 + n3 + n4 + n5 + n6);
}
"""


def launch_rows(calls):
    import cupy
    from numba import cuda

    from sparx_ref.kernels.numba_cuda import _launch as L

    @cuda.jit
    def touch7(a0, a1, a2, a3, a4, a5, a6, n0, n1, n2, n3, n4, n5, n6):
        i = cuda.grid(1)
        if i < n0 and n1 < 0:                          # never true: the launch is all we time
            a0[i] = a1[i] + a2[i] + a3[i] + a4[i] + a5[i] + a6[i] + np.float32(n2 + n3 + n4 + n5 + n6)

    n = 1024
    arrays = L.empty_flats([n] * 7, np.float32)
    scalars = [np.int64(n)] + [np.int64(1)] * 6
    args = (*arrays, *scalars)
    L.launch(touch7, 4, 256, *args)                     # compiles, builds the plan
    L.launch(touch7, 4, 256, *args)
    rows = [("_launch.launch (describe + plan + pack + cuda.core)",
             host_us(lambda: L.launch(touch7, 4, 256, *args), calls))]

    descs = [L._describe(a, 0) for a in args]
    plan = L._PLANS[(id(touch7), tuple(d[0] for d in descs))]
    it = L._internals
    kargs = []
    for a, (_, fields) in zip(args, descs):
        kargs += fields if fields is not None else [a]
    core_stream = it["to_core_stream"](0)
    cfg = L._config(4, 256, 0, it)
    kern = L._loaded_function(plan.kernel._codelibrary).kernel
    rows.append(("cuda.core launch, arguments packed once",
                 host_us(lambda: it["launch"](core_stream, cfg, kern, *kargs), calls)))

    from cuda.bindings import driver as drv
    handle = kern.handle
    values = tuple(int(v) for v in kargs)
    ctypes_of = (ctypes.c_int64,) * len(values)
    rows.append(("cuda.bindings cuLaunchKernel",
                 host_us(lambda: drv.cuLaunchKernel(handle, 4, 1, 1, 256, 1, 1, 0, 0, (values, ctypes_of), 0), calls)))

    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernel
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    buf = (ctypes.c_int64 * len(values))(*values)
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(buf) + 8 * i for i in range(len(values))])
    hptr = int(handle)

    def raw():
        buf[:] = values
        rc = fn(hptr, 4, 1, 1, 256, 1, 1, 0, None, params, None)
        if rc:
            raise RuntimeError(f"cuLaunchKernel returned {rc}")
    rows.append(("ctypes cuLaunchKernel, buffer refilled per call", host_us(raw, calls)))

    kernel = cupy.RawKernel(CUPY_SOURCE, "touch7")
    carrs = [cupy.empty(n, cupy.float32) for _ in range(7)]
    cargs = (*carrs, *scalars)
    rows.append(("CuPy RawKernel, same 14 arguments", host_us(lambda: kernel((4,), (256,), cargs), calls)))
    return rows


def alloc_rows(calls):
    import cupy

    from sparx_ref.kernels.numba_cuda import _launch as L
    sizes = [64 * 192 * 49, 64 * 192 * 49, 64 * 192 * 784, 64 * 4 * 48 * 48]
    return [("_launch.empty_flats, 4 pieces (CuPy pool under Numba)",
             host_us(lambda: L.empty_flats(sizes, np.float32), calls)),
            ("_launch.as_array of one piece", host_us(lambda: L.as_array(L.empty_flats(sizes[:1])[0], (64, 192, 49)),
                                                     calls)),
            ("cupy.empty, one array", host_us(lambda: cupy.empty(sizes[0], cupy.float32), calls))]


def call_rows(calls):
    """(case, Numba event us, Numba host us, Numba host us with launches stood in, CuPy host us,
    CuPy event us) for each backend's default version (the cases of diag_kernel_vs_host)."""
    from sparx_ref import kernels
    from sparx_ref.kernels.numba_cuda import _launch as L
    from sparx_ref.kernels.numba_cuda import attention, scan
    defaults = {b: {e.version for op in ("selective_scan_fwd", "dmca_attention_fwd")
                    for e in kernels.entries(op, b) if e.default} for b in ("cupy", "numba_cuda")}
    calls_by = {}
    for case, impl, fn in cases({"scan49", "dmca"}, None):
        backend, version = impl.split("/")
        if version in defaults[backend]:
            calls_by.setdefault(case, {})[backend] = fn

    def describe_only(kernel, griddim, blockdim, *args, stream=0, sharedmem=0, deterministic=True):
        for a in args:
            (L._DESCRIBERS.get(type(a)) or L._describe)(a, stream)

    rows = []
    for case, by in calls_by.items():
        call, cupy_call = by["numba_cuda"], by["cupy"]
        real = host_us(call, calls)
        event = common.median_ms(call, reps=30, warmup=3) * 1e3
        saved = scan.launch, attention.launch
        scan.launch = attention.launch = describe_only
        try:
            no_launch = host_us(call, calls)
        finally:
            scan.launch, attention.launch = saved
        rows.append((case, event, real, no_launch, host_us(cupy_call, calls),
                     common.median_ms(cupy_call, reps=30, warmup=3) * 1e3))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    common.use_cupy_pool_for_numba()
    print(f"# {common.card()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(common.fmt_table(["one launch, 56 parameters", "host us"],
                           [(n, f"{us:.1f}") for n, us in launch_rows(args.calls)]), flush=True)
    print(common.fmt_table(["one allocation", "host us"],
                           [(n, f"{us:.1f}") for n, us in alloc_rows(args.calls)]), flush=True)
    print(common.fmt_table(["call (Numba)", "event us", "host us", "host us, launches stood in",
                            "CuPy host us", "CuPy event us"],
                           [(n, *(f"{x:.1f}" for x in xs)) for n, *xs in call_rows(args.calls)]), flush=True)


if __name__ == "__main__":
    main()
