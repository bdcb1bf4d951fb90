"""Every registered scan kernel (each backend, each version) against its reference op.

Inputs are float32; the reference runs in float64 on the same float32 values, so the error
measured is the kernel's own (tolerance("float32", "kernel")). Every output buffer starts as
NaN (``poison_outputs``): an element a kernel forgets to write fails the comparison.

- numba_cpu, and numba_cuda / cupy on a real GPU: hypothesis-drawn shapes (odd and non-square
  maps, L not a multiple of any block size, N = 1 and N > 1, gates near 1, softplus above its
  threshold, L = 1, batch 1).
- numba_cuda under the CUDA simulator (CI): a few tiny fixed cases (the simulator runs every
  thread as a Python thread), still covering several 32-step rounds, idle warps, L = 1 and 1x1
  maps.
- cupy without a GPU: skipped with the reason.
"""
import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref import kernels
from sparx_ref.kernels._scan_common import poison_outputs
from sparx_ref.kernels.cupy._plan import clear_plan_caches
from sparx_ref.ref import scan as ref_scan
from sparx_ref.ref import ss2d as ref_ss2d
from sparx_ref.testing import assert_all_close, assert_close

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
F32 = np.float32


# ---------------------------------------------------------------------------------------
# backends: moving arrays there and back
# ---------------------------------------------------------------------------------------
def _skip_if_missing(backend):
    missing = kernels.runtime_missing(backend)
    if missing:
        pytest.skip(missing)


def to_backend(backend, a):
    if a is None or backend == "numba_cpu":
        return a
    a = np.ascontiguousarray(a)
    if backend == "numba_cuda":
        from numba import cuda
        return cuda.to_device(a)
    import cupy
    return cupy.asarray(a)


def on_simulator(backend):
    return backend == "numba_cuda" and SIMULATOR


def _rows(*ops):
    return [pytest.param(e, id=f"{e.op}-{e.backend}-{e.version}")
            for op in ops for e in kernels.entries(op)]


def _kernel(entry):
    _skip_if_missing(entry.backend)
    return kernels.get(entry.op, entry.backend, entry.version)


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
REGIMES = ("normal", "near_one", "wide")


def scan_inputs(rng, batch, KD, L, K, N, regime, has_D, has_bias):
    """float32 scan inputs. regime: "normal" (softplus of N(0, .5)), "near_one" (tiny delta, no
    softplus: gates exp(delta A) within 1e-3 of 1, the state sums hundreds of inputs), "wide"
    (softplus of N(0, 12): many z above the threshold 20, gates near 0)."""
    u = rng.standard_normal((batch, KD, L))
    if regime == "near_one":
        delta = rng.uniform(0.0, 1e-3, (batch, KD, L))
        A = -rng.uniform(0.1, 1.0, (KD, N))
        softplus = False
    else:
        delta = rng.standard_normal((batch, KD, L)) * (0.5 if regime == "normal" else 12.0)
        A = -np.exp(rng.standard_normal((KD, N)))
        softplus = True
    B = rng.standard_normal((batch, K, N, L))
    C = rng.standard_normal((batch, K, N, L))
    D = rng.standard_normal(KD) if has_D else None
    bias = rng.standard_normal(KD) * 0.5 if has_bias else None
    if regime == "near_one":
        bias = None
    cast = (lambda a: None if a is None else a.astype(F32))
    return [cast(a) for a in (u, delta, A, B, C, D, bias)], softplus


def f64(arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


def case_with_reference(case):
    """A scan case dict (seed, batch, K, Dg, L, N, regime, has_D, has_bias) -> float32 inputs,
    softplus flag, the float64 reference output, a cotangent dy and the reference gradients."""
    rng = np.random.default_rng(case["seed"])
    KD = case["K"] * case["Dg"]
    args, sp = scan_inputs(rng, case["batch"], KD, case["L"], case["K"], case["N"], case["regime"],
                           case["has_D"], case["has_bias"])
    y_ref, c_ref = ref_scan.selective_scan_fwd(*f64(args), delta_softplus=sp)
    dy = rng.standard_normal(y_ref.shape).astype(F32)
    return args, sp, y_ref, dy, ref_scan.selective_scan_bwd(dy.astype(np.float64), c_ref)


# ---------------------------------------------------------------------------------------
# cases: hypothesis strategies, and the simulator's fixed list
# ---------------------------------------------------------------------------------------
def _scan_strategy(gpu):
    return st.fixed_dictionaries({
        "batch": st.integers(1, 3 if gpu else 2),
        "K": st.integers(1, 4 if gpu else 3),
        "Dg": st.integers(1, 20 if gpu else 3),
        "N": st.sampled_from([1, 2] if gpu else [1, 2, 3]),
        "L": st.one_of(st.just(1), st.integers(1, 700 if gpu else 80)),
        "regime": st.sampled_from(REGIMES),
        "has_D": st.booleans(), "has_bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1)})


def _map_strategy(gpu):
    side = st.integers(1, 40 if gpu else 9)
    return st.fixed_dictionaries({
        "batch": st.integers(1, 2), "Di": st.integers(1, 5 if gpu else 3),
        "H": side, "W": side,
        "N": st.sampled_from([1, 2] if gpu else [1, 2, 3]),
        "regime": st.sampled_from(REGIMES),
        "has_D": st.booleans(), "has_bias": st.booleans(),
        "seed": st.integers(0, 2**31 - 1)})


# simulator: 2-4 blocks of 32-64 threads, 1-2 rounds of 32 steps
SIM_SCAN_CASES = [
    dict(batch=1, K=2, Dg=1, N=2, L=40, regime="normal", has_D=True, has_bias=True, seed=1),
    dict(batch=2, K=1, Dg=3, N=1, L=1, regime="wide", has_D=False, has_bias=True, seed=2),
    dict(batch=1, K=1, Dg=2, N=1, L=40, regime="near_one", has_D=True, has_bias=False, seed=3),
]
SIM_MAP_CASES = [
    dict(batch=1, Di=2, H=5, W=7, N=1, regime="normal", has_D=True, has_bias=True, seed=4),
    dict(batch=1, Di=1, H=1, W=1, N=1, regime="wide", has_D=False, has_bias=False, seed=5),
    dict(batch=1, Di=1, H=4, W=9, N=1, regime="near_one", has_D=True, has_bias=False, seed=6),
]


def run_cases(backend, strategy_fn, sim_cases, check, sim_only=None, examples=None):
    """check(case) for each case: fixed cases under the simulator (sim_only: a subset of their
    indices), hypothesis otherwise."""
    if on_simulator(backend):
        for i, case in enumerate(sim_cases):
            if sim_only is None or i in sim_only:
                check(case)
        return
    gpu = backend != "numba_cpu"

    @settings(max_examples=examples or (12 if gpu else 20))
    @given(case=strategy_fn(gpu))
    def inner(case):
        check(case)

    inner()


# ---------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _rows("selective_scan_fwd"))
def test_selective_scan_fwd_matches_reference(entry):
    fn = _kernel(entry)

    def check(case):
        rng = np.random.default_rng(case["seed"])
        KD = case["K"] * case["Dg"]
        args, softplus = scan_inputs(rng, case["batch"], KD, case["L"], case["K"], case["N"],
                                     case["regime"], case["has_D"], case["has_bias"])
        ref, _ = ref_scan.selective_scan_fwd(*f64(args), delta_softplus=softplus)
        with poison_outputs():
            y, _ = fn(*[to_backend(entry.backend, a) for a in args], delta_softplus=softplus)
        assert_close(y, ref, F32, "kernel", f"{entry.op}/{entry.backend}/{entry.version} {case}")

    run_cases(entry.backend, _scan_strategy, SIM_SCAN_CASES, check)


@pytest.mark.parametrize("entry", _rows("selective_scan_bwd"))
def test_selective_scan_bwd_matches_reference(entry):
    bwd = _kernel(entry)
    fwd = kernels.get("selective_scan_fwd", entry.backend)

    def check(case):
        rng = np.random.default_rng(case["seed"])
        KD = case["K"] * case["Dg"]
        args, softplus = scan_inputs(rng, case["batch"], KD, case["L"], case["K"], case["N"],
                                     case["regime"], case["has_D"], case["has_bias"])
        y_ref, cache_ref = ref_scan.selective_scan_fwd(*f64(args), delta_softplus=softplus)
        dy = rng.standard_normal(y_ref.shape).astype(F32)
        want = ref_scan.selective_scan_bwd(dy.astype(np.float64), cache_ref)
        with poison_outputs():
            _, cache = fwd(*[to_backend(entry.backend, a) for a in args], delta_softplus=softplus)
            got = bwd(to_backend(entry.backend, dy), cache)
        assert_all_close(got, want, F32, "kernel", prefix=f"{entry.backend}/{entry.version} {case} ")

    run_cases(entry.backend, _scan_strategy, SIM_SCAN_CASES, check, sim_only=(0, 1))


def test_numba_cpu_float64_is_exact_to_float64_kernel_tolerance():
    fwd = kernels.get("selective_scan_fwd", "numba_cpu")
    bwd = kernels.get("selective_scan_bwd", "numba_cpu")
    rng = np.random.default_rng(7)
    args, softplus = scan_inputs(rng, 2, 6, 37, 3, 2, "normal", True, True)
    args = f64(args)
    y_ref, cache_ref = ref_scan.selective_scan_fwd(*args, delta_softplus=softplus)
    dy = rng.standard_normal(y_ref.shape)
    with poison_outputs():
        y, cache = fwd(*args, delta_softplus=softplus)
        got = bwd(dy, cache)
    assert y.dtype == np.float64
    assert_close(y, y_ref, np.float64, "kernel", "y")
    assert_all_close(got, ref_scan.selective_scan_bwd(dy, cache_ref), np.float64, "kernel")


# ---------------------------------------------------------------------------------------
# cross scan / cross merge
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _rows("cross_scan", "cross_merge"))
def test_cross_scan_and_merge_match_reference(entry):
    fn = _kernel(entry)

    def check(case):
        rng = np.random.default_rng(case["seed"])
        b, C, H, W = case["batch"], case["Di"], case["H"], case["W"]
        with poison_outputs():
            if entry.op == "cross_scan":
                x = rng.standard_normal((b, C, H, W)).astype(F32)
                got, want = fn(to_backend(entry.backend, x)), ref_ss2d.cross_scan(x)
            else:
                ys = rng.standard_normal((b, 4, C, H * W)).astype(F32)
                got, want = fn(to_backend(entry.backend, ys), H, W), ref_ss2d.cross_merge(ys.astype(np.float64), H, W)
        assert_close(got, want, F32, "kernel", f"{entry.op}/{entry.backend}/{entry.version} {case}")
        if entry.op == "cross_scan":   # a permutation: exact
            from sparx_ref.testing import _to_numpy
            assert np.array_equal(_to_numpy(got), want)

    run_cases(entry.backend, _map_strategy, SIM_MAP_CASES, check)


def test_cross_scan_tile_edges_on_a_map_larger_than_one_tile():
    """A 33 x 65 map: partial 32x32 tiles on both axes (GPU tiled kernels; CPU too)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 33, 65)).astype(F32)
    ys = rng.standard_normal((1, 4, 2, 33 * 65)).astype(F32)
    for backend in kernels.BACKENDS:
        if kernels.runtime_missing(backend) or on_simulator(backend):
            continue     # the simulator's cases already cut partial tiles (maps < 32)
        for version in kernels.versions("cross_scan", backend):
            with poison_outputs():
                got = kernels.get("cross_scan", backend, version)(to_backend(backend, x))
            assert_close(got, ref_ss2d.cross_scan(x), F32, "kernel", f"cross_scan/{backend}/{version}")
        for version in kernels.versions("cross_merge", backend):
            with poison_outputs():
                merged = kernels.get("cross_merge", backend, version)(to_backend(backend, ys), 33, 65)
            assert_close(merged, ref_ss2d.cross_merge(ys.astype(np.float64), 33, 65), F32, "kernel",
                         f"cross_merge/{backend}/{version}")


# ---------------------------------------------------------------------------------------
# 2-D scan
# ---------------------------------------------------------------------------------------
def map_inputs(case):
    rng = np.random.default_rng(case["seed"])
    b, Di, H, W, N = case["batch"], case["Di"], case["H"], case["W"], case["N"]
    args, softplus = scan_inputs(rng, b, 4 * Di, H * W, 4, N, case["regime"], case["has_D"],
                                 case["has_bias"])
    x = rng.standard_normal((b, Di, H, W)).astype(F32)
    return [x] + args[1:], softplus, rng


@pytest.mark.parametrize("entry", _rows("ss2d_scan_fwd"))
def test_ss2d_scan_fwd_matches_reference(entry):
    fn = _kernel(entry)

    def check(case):
        args, softplus, _ = map_inputs(case)
        ref, _ = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
        with poison_outputs():
            y, _ = fn(*[to_backend(entry.backend, a) for a in args], delta_softplus=softplus)
        assert_close(y, ref, F32, "kernel", f"{entry.op}/{entry.backend}/{entry.version} {case}")

    run_cases(entry.backend, _map_strategy, SIM_MAP_CASES, check,
              sim_only=None if entry.default else (1,))   # composed = tested pieces: one tiny case


@pytest.mark.parametrize("entry", _rows("ss2d_scan_bwd"))
def test_ss2d_scan_bwd_matches_reference(entry):
    bwd = _kernel(entry)
    # the composed backward pairs with its own (composed) forward; the fused with the fused
    fwd_version = "rowwise" if entry.backend == "numba_cpu" else entry.version
    fwd = kernels.get("ss2d_scan_fwd", entry.backend, fwd_version)

    def check(case):
        args, softplus, rng = map_inputs(case)
        y_ref, cache_ref = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
        dy = rng.standard_normal(y_ref.shape).astype(F32)
        want = ref_ss2d.ss2d_scan_bwd(dy.astype(np.float64), cache_ref)
        with poison_outputs():
            _, cache = fwd(*[to_backend(entry.backend, a) for a in args], delta_softplus=softplus)
            got = bwd(to_backend(entry.backend, dy), cache)
        assert_all_close(got, want, F32, "kernel", prefix=f"{entry.backend}/{entry.version} {case} ")

    # simulator: the fused kernel on the 5x7 and 1x1 maps; the composed one (glue around
    # kernels tested above) on the 1x1 map
    run_cases(entry.backend, _map_strategy, SIM_MAP_CASES, check,
              sim_only=(0, 1) if entry.default else (1,))


# ---------------------------------------------------------------------------------------
# input checking
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_gpu_kernels_reject_float64_with_a_clear_typeerror(backend):
    _skip_if_missing(backend)
    rng = np.random.default_rng(9)
    args, _ = scan_inputs(rng, 1, 2, 4, 1, 1, "normal", True, True)
    with pytest.raises(TypeError, match="float32"):
        kernels.get("selective_scan_fwd", backend)(*[to_backend(backend, a) for a in f64(args)])
    with pytest.raises(TypeError, match="float32"):
        kernels.get("cross_scan", backend)(to_backend(backend, rng.standard_normal((1, 1, 2, 2))))


def test_bad_shapes_are_rejected_naming_the_argument():
    fn = kernels.get("selective_scan_fwd", "numba_cpu")
    rng = np.random.default_rng(10)
    args, _ = scan_inputs(rng, 1, 4, 8, 2, 1, "normal", True, True)
    bad = list(args)
    bad[1] = bad[1][:, :, :7]
    with pytest.raises(ValueError, match="delta"):
        fn(*bad)
    bad = list(args)
    bad[3] = np.repeat(bad[3], 3, axis=1)[:, :3]          # K = 3 does not divide KD = 4
    with pytest.raises(ValueError, match="B"):
        fn(*bad)
    bad = list(args)
    bad[2] = bad[2].astype(np.float64)
    with pytest.raises(TypeError, match="dtype"):
        fn(*bad)


def test_poisoning_really_fills_outputs_with_nan():
    """The NaN fill the kernel tests rely on: a kernel that wrote nothing would fail."""
    from sparx_ref.kernels.numba_cpu import scan as cpu
    with poison_outputs():
        buf = cpu._empty((3, 4), F32)
    assert np.isnan(buf).all()


# ---------------------------------------------------------------------------------------
# The CuPy backend's CUDA C on the CPU: every CUDA thread a std::thread, std::barrier for
# __syncthreads / __syncwarp and the warp shuffles. CI thus runs the CUDA C itself (not only the
# Numba twin) against the reference, without a GPU. Launch configurations mirror the host code.
# ---------------------------------------------------------------------------------------
_EMU_HEADER = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::unique_ptr<std::barrier<>> g_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
static float g_xchg[1024];
alignas(16) static float g_dyn_smem[1 << 16];
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
using std::min;                          // CUDA's integer min/max (same-typed arguments)
using std::max;
static inline int emu_tid() { return threadIdx.x + blockDim.x * threadIdx.y; }
static inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
static inline void __syncwarp() { g_warp_bar[emu_tid() / 32]->arrive_and_wait(); }
static inline float emu_exchange(float v, int src_tid) {
    int tid = emu_tid(), w = tid / 32;
    g_xchg[tid] = v;
    g_warp_bar[w]->arrive_and_wait();
    float r = g_xchg[src_tid];
    g_warp_bar[w]->arrive_and_wait();
    return r;
}
static inline float __shfl_up_sync(unsigned, float v, int d) {
    int tid = emu_tid(); return emu_exchange(v, (tid & 31) >= d ? tid - d : tid); }
static inline float __shfl_down_sync(unsigned, float v, int d) {
    int tid = emu_tid(); return emu_exchange(v, (tid & 31) + d < 32 ? tid + d : tid); }
static inline float __shfl_sync(unsigned, float v, int src) {
    int tid = emu_tid(); return emu_exchange(v, (tid & ~31) + src); }
static inline float __shfl_xor_sync(unsigned, float v, int m) {
    int tid = emu_tid(); return emu_exchange(v, (tid & ~31) + ((tid & 31) ^ m)); }
static inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class F> void launch(dim3 grid, dim3 block, F f) {
    gridDim = grid; blockDim = block;
    unsigned n = block.x * block.y;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_bar = std::make_unique<std::barrier<>>(n);
        g_warp_bar.clear();
        for (unsigned w = 0; w < (n + 31) / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t)
            ts.emplace_back([=]() { threadIdx = dim3{t % block.x, t / block.x, 1}; blockIdx = dim3{bx, by, bz}; f(); });
        for (auto& t : ts) t.join();
    }
}
"""

def _emu_harness(src):
    """extern "C" k_NAME(gx, gy, gz, bx, by, <the kernel's parameters>) launching each kernel."""
    import re
    out = ['#include "scan.cu"']
    for name, params in re.findall(r"__global__ void (\w+)\(([^)]*)\)", src):
        names = [p.strip().split()[-1].lstrip("*") for p in params.split(",")]
        out.append(f'extern "C" void k_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                   f'{params}) {{ launch(dim3{{gx, gy, gz}}, dim3{{bx, by, 1}}, [=]() {{ {name}({", ".join(names)}); }}); }}')
    return "\n".join(out)


class _FakeCupy:
    """Just enough of CuPy for sparx_ref.kernels.cupy.scan, on NumPy arrays, with RawModule
    kernels built by g++ from the same CUDA C source and run by the std::thread emulation."""

    def __init__(self, build):
        import types
        self.float32 = np.float32
        self.asarray = np.asarray
        self.ascontiguousarray = np.ascontiguousarray
        self.zeros, self.empty, self.full = np.zeros, np.empty, np.full
        self.is_available = lambda: False      # no GPU behind it: CuPy-backend tests skip as on any CPU
        self.cuda = types.SimpleNamespace(
            Device=lambda: types.SimpleNamespace(attributes={"MaxSharedMemoryPerBlockOptin": 227 * 1024}))

        class RawModule:
            def __init__(self, code, options=()):
                self.lib = build(code, tuple(options))

            def get_function(self, name):
                return _FakeKernel(self.lib, name)
        self.RawModule = RawModule


class _FakeKernel:
    max_dynamic_shared_size_bytes = 48 * 1024

    def __init__(self, lib, name):
        self.fn = getattr(lib, f"k_{name}")
        self.name = name

    def __call__(self, grid, block, args, shared_mem=0):
        import ctypes
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (2 - len(block))
        assert shared_mem <= 227 * 1024 and block[0] * block[1] <= 1024, (self.name, block, shared_mem)
        conv = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.dtype == np.float32 and a.flags.c_contiguous, self.name
                conv.append(ctypes.c_void_p(a.ctypes.data))
            elif type(a) is int:           # an address: launch plans pass buffers as plain ints
                conv.append(ctypes.c_void_p(a))
            elif isinstance(a, (np.floating, float)):
                conv.append(ctypes.c_float(a))
            else:
                conv.append(ctypes.c_int(int(a)))
        self.fn(*[ctypes.c_uint(int(v)) for v in grid + block[:2]], *conv)


@contextlib.contextmanager
def cuda_c_on_cpu(module, root):
    """While open, ``module`` (a sparx_ref.kernels.cupy module) runs with a CPU stand-in for
    CuPy: its host code as is, its CUDA C compiled by g++ -std=c++20 into ``root`` (one build
    per (source, NVRTC option set), like the real module cache) with every CUDA thread a
    std::thread. Skips the test when g++ (or its C++20 <barrier>) is missing."""
    import ctypes
    import shutil
    import subprocess
    import sys
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA C")
    built = {}

    def build(code, options):
        key = (code, options)
        if key not in built:
            src = code
            for name in ("sred", "smem"):
                src = src.replace(f"extern __shared__ float {name}[];", f"float* {name} = g_dyn_smem;")
            d = root / f"b{len(built)}"
            d.mkdir(exist_ok=True)      # a build that skipped the test left it behind
            (d / "scan.cu").write_text(src)
            (d / "harness.cpp").write_text(_EMU_HEADER + _emu_harness(code))
            # NVRTC's -std option would override the emulation's C++20 (<barrier>)
            cmd = [cxx, "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread",
                   *(o for o in options if not o.startswith("-std=")),
                   str(d / "harness.cpp"), "-o", str(d / "emu.so")]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
            if res.returncode != 0 and ("barrier" in res.stderr or "atomic_ref" in res.stderr):
                pytest.skip("this g++ lacks C++20 <barrier>/atomic_ref")
            assert res.returncode == 0, res.stderr[-3000:]
            built[key] = ctypes.CDLL(str(d / "emu.so"))
        return built[key]

    saved_modules, saved_cupy = dict(module._MODULES), sys.modules.get("cupy")
    module._MODULES.clear()
    clear_plan_caches()                    # plans hold kernels: none may cross into or out of here
    sys.modules["cupy"] = _FakeCupy(build)
    try:
        yield module
    finally:
        module._MODULES.clear()
        module._MODULES.update(saved_modules)
        clear_plan_caches()
        if saved_cupy is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved_cupy


@contextlib.contextmanager
def emulated_cupy_module(name, tmp_path_factory):
    """``sparx_ref.kernels.cupy.<name>`` with a CPU stand-in for CuPy (:func:`cuda_c_on_cpu`), for
    a module-scoped fixture; skips where a GPU is here (the CuPy backend is then tested for real)."""
    import importlib
    if kernels.runtime_missing("cupy") is None:
        pytest.skip("a GPU is here: the CuPy backend is tested for real")
    module = importlib.import_module(f"sparx_ref.kernels.cupy.{name}")
    with cuda_c_on_cpu(module, tmp_path_factory.mktemp(f"{name}_emu")) as emulated:
        yield emulated


@pytest.fixture(scope="module")
def fake_cupy(tmp_path_factory):
    """sparx_ref.kernels.cupy.scan with a CPU stand-in for CuPy (:func:`cuda_c_on_cpu`)."""
    with emulated_cupy_module("scan", tmp_path_factory) as module:
        yield module


@pytest.mark.parametrize("case", [
    dict(batch=1, K=2, Dg=9, N=2, L=200, regime="normal", has_D=True, has_bias=True, seed=11),
    dict(batch=1, K=1, Dg=3, N=1, L=1, regime="wide", has_D=False, has_bias=False, seed=12),
    dict(batch=1, K=3, Dg=2, N=1, L=70, regime="near_one", has_D=True, has_bias=False, seed=13),
], ids=["multi-round-N2", "L1", "near-one"])
def test_cupy_backend_on_cpu_emulation_selective_scan(fake_cupy, case):
    """The whole CuPy backend (host code, launch configurations, CUDA C) on the CPU: Dg = 9
    gives two channel blocks of 8 warps (7 idle warps), L = 200 two rounds of 128 steps."""
    args, sp, y_ref, dy, g_ref = case_with_reference(case)
    with poison_outputs():
        for fwd in (fake_cupy.selective_scan_fwd_naive, fake_cupy.selective_scan_fwd):
            y, cache = fwd(*args, delta_softplus=sp)
            assert_close(y, y_ref, F32, "kernel", f"cupy (emulated) {fwd.__name__}")
        got = fake_cupy.selective_scan_bwd(dy, cache)
    assert_all_close(got, g_ref, F32, "kernel", prefix="cupy (emulated) selective_scan_bwd ")


@pytest.mark.parametrize("shape", [(1, 2, 9, 7), (2, 1, 5, 6), (1, 1, 1, 1), (1, 1, 33, 40)],
                         ids=["9x7", "5x6", "1x1", "33x40"])
def test_cupy_backend_on_cpu_emulation_maps(fake_cupy, shape):
    b, Di, H, W = shape
    L = H * W
    rng = np.random.default_rng(H * 100 + W)
    x = rng.standard_normal((b, Di, H, W)).astype(F32)
    ys = rng.standard_normal((b, 4, Di, L)).astype(F32)
    with poison_outputs():
        for scan_fn, merge_fn in ((fake_cupy.cross_scan_naive, fake_cupy.cross_merge_naive),
                                  (fake_cupy.cross_scan, fake_cupy.cross_merge)):
            assert np.array_equal(scan_fn(x), ref_ss2d.cross_scan(x)), scan_fn.__name__
            assert_close(merge_fn(ys, H, W), ref_ss2d.cross_merge(ys.astype(np.float64), H, W), F32, "kernel",
                         merge_fn.__name__)
    if L > 400:
        return       # the tiles' edges were the point of the big map; its scan is slow as threads
    args, sp = scan_inputs(rng, b, 4 * Di, L, 4, 1, "normal", True, True)
    args = [x] + args[1:]
    y_ref, c_ref = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=sp)
    dy = rng.standard_normal(y_ref.shape).astype(F32)
    g_ref = ref_ss2d.ss2d_scan_bwd(dy.astype(np.float64), c_ref)
    versions = [(fake_cupy.ss2d_scan_fwd, fake_cupy.ss2d_scan_bwd)]
    if shape == (1, 2, 9, 7):
        versions.append((fake_cupy.ss2d_scan_fwd_composed, fake_cupy.ss2d_scan_bwd_composed))
    for fwd, bwd in versions:
        with poison_outputs():
            y, cache = fwd(*args, delta_softplus=sp)
            got = bwd(dy, cache)
        assert_close(y, y_ref, F32, "kernel", f"cupy (emulated) {fwd.__name__}")
        assert_all_close(got, g_ref, F32, "kernel", prefix=f"cupy (emulated) {bwd.__name__} ")


# ---------------------------------------------------------------------------------------
# The "vec" rung: its compile-time variants (SEG lanes per row, vector or scalar loads) are
# chosen on the host from L and the alignment, so these cases pin each variant down.
# ---------------------------------------------------------------------------------------
VEC_CASES = [
    # L % 4 == 0, aligned: float4 loads, SEG = 32, three rounds of 128, 9 channels = a block of
    # 8 rows plus one with 7 idle rows, N = 2
    dict(batch=1, K=2, Dg=9, N=2, L=300, regime="normal", has_D=True, has_bias=True, seed=21),
    # L % 4 != 0: the scalar-load variant, one round with its tail masked
    dict(batch=2, K=1, Dg=3, N=1, L=70, regime="wide", has_D=True, has_bias=True, seed=22),
    # L <= 64: two rows per warp (SEG = 16), float4 loads
    dict(batch=1, K=3, Dg=2, N=1, L=40, regime="near_one", has_D=True, has_bias=False, seed=23),
    # L <= 32: four rows per warp (SEG = 8), scalar loads, L shorter than one round
    dict(batch=1, K=1, Dg=5, N=1, L=13, regime="normal", has_D=False, has_bias=True, seed=24),
    # L = 1
    dict(batch=2, K=2, Dg=1, N=1, L=1, regime="wide", has_D=False, has_bias=False, seed=25),
    # two rounds (the carry and the software-pipelined loads), cheap enough for the simulator
    dict(batch=1, K=1, Dg=2, N=2, L=136, regime="normal", has_D=True, has_bias=True, seed=27),
]
VEC_IDS = ["float4-3rounds-N2", "scalar-L70", "seg16-L40", "seg8-L13", "L1", "2rounds-N2"]
VEC_SIM_CASES = (2, 3, 4, 5)   # the simulator runs Python threads: not the 300- and 70-step cases


def _misaligned(a):
    """A C-contiguous copy of a whose data starts 4 bytes past a 16-byte boundary."""
    buf = np.empty(a.size + 4, a.dtype)
    start = (-(buf.ctypes.data // 4) % 4 + 1) % 4
    out = buf[start:start + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 16 == 4
    return out


def _vec_check(fwd, bwd, case, convert, misalign=False):
    args, sp, y_ref, dy, g_ref = case_with_reference(case)
    if misalign:
        args = [None if a is None else _misaligned(a) for a in args]
        dy = _misaligned(dy)
    with poison_outputs():
        y, cache = fwd(*[convert(a) for a in args], delta_softplus=sp)
        got = bwd(convert(dy), cache)
    assert_close(y, y_ref, F32, "kernel", f"vec fwd {case}")
    assert_all_close(got, g_ref, F32, "kernel", prefix=f"vec bwd {case} ")


@pytest.mark.parametrize("case", VEC_CASES, ids=VEC_IDS)
def test_cupy_vec_on_cpu_emulation(fake_cupy, case):
    """The CuPy "vec" kernels (every SEG and load variant) on the CPU emulation."""
    seg, items = fake_cupy.vec_layout(case["L"])
    assert seg * items >= min(case["L"], 128)
    _vec_check(fake_cupy.selective_scan_fwd_vec, fake_cupy.selective_scan_bwd_vec, case, lambda a: a)


def test_cupy_vec_misaligned_views_take_the_scalar_path(fake_cupy):
    """Inputs whose data start 4 bytes off a 16-byte boundary (L % 4 == 0): the host must pick
    the scalar-load variant (a float4 load there would be a misaligned access on a GPU)."""
    case = dict(batch=1, K=2, Dg=3, N=1, L=136, regime="normal", has_D=True, has_bias=True, seed=26)
    assert not fake_cupy.vec_loads_ok(136, 4, _misaligned(np.zeros(136, F32)))
    assert fake_cupy.vec_loads_ok(136, 4, np.zeros(136, F32))
    _vec_check(fake_cupy.selective_scan_fwd_vec, fake_cupy.selective_scan_bwd_vec, case, lambda a: a,
               misalign=True)


def _gpu_vec_rows():
    return [pytest.param(backend, i, case, id=f"{backend}-{cid}")
            for backend in ("numba_cuda", "cupy") for i, (case, cid) in enumerate(zip(VEC_CASES, VEC_IDS))]


def _misaligned_on(backend, a):
    """a on the backend's device, its data starting 4 bytes past the allocation (misaligned for
    16-byte loads)."""
    padded = np.concatenate([np.zeros(1, a.dtype), a.ravel()])
    if backend == "numba_cuda":
        from numba import cuda
        d = cuda.to_device(padded)
    else:
        import cupy
        d = cupy.asarray(padded)
    return d[1:].reshape(a.shape)


@pytest.mark.parametrize("backend,index,case", _gpu_vec_rows())
def test_vec_variants_on_the_gpu_backends(backend, index, case):
    """The "vec" kernels of the GPU backends in each compile-time variant (SEG 32/16/8, vector
    and scalar loads, one and several rounds, L = 1); on the simulator the cheap cases only."""
    _skip_if_missing(backend)
    if on_simulator(backend) and index not in VEC_SIM_CASES:
        pytest.skip("too slow for the simulator (the CPU emulation of the CUDA C runs it)")
    _vec_check(kernels.get("selective_scan_fwd", backend, "vec"), kernels.get("selective_scan_bwd", backend, "vec"),
               case, lambda a: to_backend(backend, a))


@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_vec_misaligned_views_on_the_gpu_backends(backend):
    """Device views 4 bytes off the allocation: the host must take the scalar-load variant."""
    _skip_if_missing(backend)
    mod = __import__(f"sparx_ref.kernels.{backend}.scan", fromlist=["vec_loads_ok"])
    probe = _misaligned_on(backend, np.zeros(8, F32))
    assert not mod.vec_loads_ok(8, 4, probe)
    case = dict(batch=1, K=1, Dg=2, N=1, L=40, regime="normal", has_D=True, has_bias=True, seed=28)
    _vec_check(kernels.get("selective_scan_fwd", backend, "vec"), kernels.get("selective_scan_bwd", backend, "vec"),
               case, lambda a: None if a is None else _misaligned_on(backend, a))
