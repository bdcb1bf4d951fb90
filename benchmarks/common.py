"""Timing and ceiling helpers shared by the benchmarks (not part of pytest).

GPU (needs torch with CUDA; all backends share the legacy default stream, so CUDA events
recorded by torch bracket Numba and CuPy launches too):

- :func:`median_ms`: median CUDA-event time of one call, after warm-up calls.
- :func:`copy_bandwidth_gbs`: device-to-device copy, (bytes read + bytes written) / time: the
  bandwidth every byte floor is divided by.
- :func:`fp32_matmul_tflops`: fp32 matmul rate with TF32 off (the FFMA ceiling).
- :func:`use_cupy_pool_for_numba`: route Numba's allocations through CuPy's pool (Numba's
  own allocator frees with cuMemFree, which synchronises the device between timed calls).
- :func:`card`: the card's name, for the result tables.

CPU:

- :func:`cpu_median_ms`: median wall time.
- :func:`cpu_copy_bandwidth_gbs`: copy bandwidth of ``threads`` threads (a Numba prange copy):
  the CPU byte floor.

:func:`fmt_table` prints rows as a Markdown table (``scripts/gpu-check`` collects lines that
start with ``|``). :func:`profile_text`: cProfile of repeated calls, as text (the diag scripts).
:func:`write_results_block`: replace one script's marked block in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
def median_ms(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median over ``reps`` calls of the CUDA-event time of one call, after ``warmup`` calls."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of ``nbytes``: (bytes read + bytes written) / median time, GB/s."""
    import torch
    x = torch.randn(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), reps=20, warmup=3)
    del x, y
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fp32_matmul_tflops(n: int = 8192) -> float:
    """fp32 matmul rate with TF32 off, TFLOP/s."""
    import torch
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ms = median_ms(lambda: a @ b, reps=10, warmup=2)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def gpu_kernel_pairs(ops):
    """Yield (backend, version, forward, backward, put) for every registered version of the
    forward/backward kernel pair ``ops`` on each GPU backend whose runtime is here (printing why a
    backend is skipped); ``put`` moves a NumPy array to that backend's device. The sanitize
    scripts' loop."""
    import importlib

    from sparx_ref.kernels import registry
    for backend in ("cupy", "numba_cuda"):
        missing = registry.runtime_missing(backend)
        if missing or not registry.entries(ops[0], backend):
            print(f"skip {backend}: {missing or f'no {ops[0]} kernels registered'}")
            continue
        put = importlib.import_module("cupy").asarray if backend == "cupy" else \
            importlib.import_module("numba.cuda").to_device
        for version in registry.versions(ops[0], backend):
            yield (backend, version, *(registry.get(op, backend, version) for op in ops), put)


def to_host(a):
    """A CuPy or Numba device array as NumPy (None stays None)."""
    return None if a is None else (a.get() if hasattr(a, "get") else a.copy_to_host())


def card() -> str:
    import torch
    return torch.cuda.get_device_name()


def use_cupy_pool_for_numba() -> None:
    """Make Numba allocate device memory from CuPy's memory pool (no cuMemFree syncs)."""
    import ctypes

    import cupy
    from numba import cuda
    from numba.cuda import GetIpcHandleMixin, HostOnlyCUDAMemoryManager, MemoryPointer

    class CupyPool(GetIpcHandleMixin, HostOnlyCUDAMemoryManager):
        def memalloc(self, size):
            mem = cupy.cuda.alloc(size)

            def release(mem=mem):
                del mem
            return MemoryPointer(self.context, ctypes.c_void_p(int(mem.ptr)), size, finalizer=release)

        def initialize(self):
            pass

        def get_memory_info(self):
            return cupy.cuda.runtime.memGetInfo()

        @property
        def interface_version(self):
            return 1

    cuda.set_memory_manager(CupyPool)


# ---------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------
def cpu_median_ms(fn, reps: int = 7, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cpu_copy_bandwidth_gbs(nbytes: int = 1 << 28, threads: int | None = None) -> float:
    """(bytes read + bytes written) / time of a parallel copy with Numba's threads."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def pcopy(dst, src):
        n = src.size
        chunk = (n + 63) // 64
        for c in prange(64):
            lo = c * chunk
            hi = min(n, lo + chunk)
            for i in range(lo, hi):
                dst[i] = src[i]

    old = numba.get_num_threads()
    if threads:
        numba.set_num_threads(threads)
    try:
        src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
        dst = np.empty_like(src)
        ms = cpu_median_ms(lambda: pcopy(dst, src), reps=7, warmup=2)
    finally:
        numba.set_num_threads(old)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------
def fmt_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def env_threads(n: int) -> None:
    """Pin BLAS/OpenMP/Numba thread counts (call before importing numba/numpy-heavy code)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(n))


def profile_text(fn, calls, sorts=(("tottime", 25), ("cumulative", 30))):
    """cProfile of ``calls`` calls of ``fn``, as text: one listing per (sort key, rows) of ``sorts``."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    out = io.StringIO()
    for key, limit in sorts:
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(limit)
    return out.getvalue()


def write_results_block(section: str, start: str, end: str, text: str, intro: str = "", path=None) -> None:
    """Replace the block between the markers ``start`` and ``end`` in RESULTS.md (``path``), or add
    it at the end of ``section`` (a "## ..." heading; created, with ``intro``, if missing). The rest
    of the file is left alone."""
    import re
    from pathlib import Path
    path = Path(path) if path is not None else Path(__file__).resolve().parent / "RESULTS.md"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    elif section in old:
        head, rest = old.split(section, 1)
        nxt = re.search(r"^## ", rest, flags=re.M)
        cut = nxt.start() if nxt else len(rest)
        new = head + section + rest[:cut].rstrip() + "\n\n" + block + "\n\n" + rest[cut:]
    else:
        new = old.rstrip() + f"\n\n{section}\n\n" + (f"{intro}\n\n" if intro else "") + f"{block}\n"
    path.write_text(new.rstrip() + "\n")
