"""Attention kernels vs the reference ops (issue: attention kernels).

Every registered version of ``window_attention_fwd/bwd`` and ``dmca_attention_fwd/bwd`` for
the GPU backends is run on hypothesis-drawn shapes and compared, output by output and
gradient by gradient, with the float64 reference op on the same (float32-rounded) inputs,
at ``tolerance("float32", "kernel")``. Every buffer a kernel allocates is NaN-filled first,
so an element it never writes fails the comparison.

Without a GPU the ``numba_cuda`` kernels run under the CUDA simulator on tiny shapes (every
simulated thread is a Python thread); ``cupy`` kernels skip with the reason. On a GPU
(``NUMBA_ENABLE_CUDASIM=0``, ``scripts/gpu-check``) the same tests draw from the full ranges.
"""
from __future__ import annotations

import importlib
import inspect
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref.kernels import registry
from sparx_ref.ref import window_attention as ref_wa
from sparx_ref.testing import assert_close, assert_close_scaled

from ._devices import NaNDevice, ladder_params

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
BACKENDS = ("numba_cuda", "cupy")
WINDOW_OPS = ("window_attention_fwd", "window_attention_bwd")
DMCA_OPS = ("dmca_attention_fwd", "dmca_attention_bwd")

# Simulator budget: few examples on tiny shapes. On a GPU: the profile's examples, full ranges.
EXAMPLES = 4 if SIM else 20


def _ref_dmca():
    try:
        return importlib.import_module("sparx_ref.ref.dmca")
    except ImportError:
        pytest.skip("sparx_ref.ref.dmca (the DMCA reference op) is not in this checkout yet")


def _module(backend):
    return importlib.import_module(f"sparx_ref.kernels.{backend}.attention")


def _require(backend):
    missing = registry.runtime_missing(backend)
    if missing:
        pytest.skip(missing)


def _versions(ops):
    """(backend, version) pairs: the fwd and bwd ladders have the same rung names."""
    return ladder_params(ops, BACKENDS)


class _Device(NaNDevice):
    """The attention module of ``backend`` with NaN-poisoned allocations inside kernels."""

    def __init__(self, backend, monkeypatch):
        super().__init__(backend, _module(backend), monkeypatch)


@pytest.fixture
def device(request, monkeypatch):
    def make(backend):
        _require(backend)
        return _Device(backend, monkeypatch)
    return make


def _shift_mask(rng, nW, N):
    """A mask like Swin's: 0 inside a region, -100 across regions (random regions)."""
    labels = rng.integers(0, 3, size=(nW, N))
    labels[0] = 0                                   # one unmasked window, as in the real mask
    return np.where(labels[:, :, None] != labels[:, None, :], -100.0, 0.0)


# --------------------------------------------------------------------------------------
# window attention
# --------------------------------------------------------------------------------------
def _window_case(rng, M, heads, hd, batch, nW, masked):
    N = M * M
    Bw = batch * nW
    f = lambda *s: rng.standard_normal(s)  # noqa: E731
    inputs = dict(q=f(Bw, heads, N, hd), k=f(Bw, heads, N, hd), v=f(Bw, heads, N, hd),
                  bias=0.5 * f(heads, N, N), mask=_shift_mask(rng, nW, N) if masked else None)
    dout = f(Bw, heads, N, hd)
    return inputs, dout


def _check_window(dev, version, inputs, dout, dtype, scale=None):
    mod = _module(dev.backend)
    fwd = getattr(mod, f"window_attention_fwd_{version}")
    bwd = getattr(mod, f"window_attention_bwd_{version}")
    x = {k: (None if a is None else a.astype(dtype)) for k, a in inputs.items()}
    d = dout.astype(dtype)
    # the float64 reference on exactly the inputs the kernel sees
    ref_out, ref_cache = ref_wa.window_attention_fwd(
        **{k: (None if a is None else a.astype(np.float64)) for k, a in x.items()}, scale=scale)
    ref_grads = ref_wa.window_attention_bwd(d.astype(np.float64), ref_cache)
    out, cache = fwd(**{k: (None if a is None else dev.put(a)) for k, a in x.items()}, scale=scale)
    grads = bwd(dev.put(d), cache)
    assert_close(out, ref_out, dtype, "kernel", name=f"{version} out")
    assert_close(cache["probs"], ref_cache["probs"], dtype, "kernel", name=f"{version} probs")
    assert sorted(grads) == sorted(ref_grads)
    for key in ref_grads:
        assert_close(grads[key], ref_grads[key], dtype, "kernel", name=f"{version} d{key}")


if SIM:
    _M, _HEADS, _HD, _BATCH, _NW = st.integers(2, 4), st.integers(1, 2), st.integers(8, 12), st.integers(1, 2), \
        st.integers(1, 2)
else:
    _M, _HEADS, _HD, _BATCH, _NW = st.integers(2, 8), st.integers(1, 4), st.integers(8, 64), st.integers(1, 3), \
        st.integers(1, 4)


@pytest.mark.parametrize("backend,version", _versions(WINDOW_OPS))
@settings(max_examples=EXAMPLES)
@given(data=st.data(), heads=_HEADS, batch=_BATCH, nW=_NW, masked=st.booleans(), seed=st.integers(0, 2**31))
def test_window_attention_matches_reference(device, backend, version, data, heads, batch, nW, masked, seed):
    dev = device(backend)
    if version.startswith("static") and not SIM:
        # compiled once per (N, hd) (Numba: ~20 s a shape on a GPU machine): few shapes there
        M, hd = data.draw(st.just(7), label="M"), data.draw(st.sampled_from([13, 32]), label="hd")
    else:
        M, hd = data.draw(_M, label="M"), data.draw(_HD, label="hd")
    inputs, dout = _window_case(np.random.default_rng(seed), M, heads, hd, batch, nW, masked)
    _check_window(dev, version, inputs, dout, np.float32)


@pytest.mark.parametrize("backend,version", _versions(WINDOW_OPS))
def test_window_attention_largest_window_several_windows(device, backend, version, rng):
    """8x8 windows (N = 64: two 4x4 register tiles per side, two warps of keys), nW = 2,
    a head width that is not a multiple of 4, and an explicit scale."""
    dev = device(backend)
    inputs, dout = _window_case(rng, 8, 1, 9 if SIM else 37, 1, 2, True)
    _check_window(dev, version, inputs, dout, np.float32, scale=0.3)


@pytest.mark.parametrize("backend,version", _versions(WINDOW_OPS))
def test_window_attention_float64(device, backend, version, rng):
    dev = device(backend)
    inputs, dout = _window_case(rng, 3, 2, 8, 2, 2, True)
    _check_window(dev, version, inputs, dout, np.float64)


# --------------------------------------------------------------------------------------
# DMCA channel attention
# --------------------------------------------------------------------------------------
def _dmca_case(rng, B, groups, g, Ls, L):
    C = groups * g
    f = lambda *s: rng.standard_normal(s)  # noqa: E731
    return dict(q=f(B, C, Ls), k=f(B, C, Ls), v=f(B, C, L)), f(B, C, L)


def _dmca_grad_scales(x, dout, attn, groups):
    """For each gradient, the same sums over absolute values (float64): the scale of its rounding
    error. dS = P * (dP - rowsum(P * dP)) cancels (exactly, summed over a row), and so do
    dq = dS k / sqrt(Ls), dk = dS^T q / sqrt(Ls); a saturated softmax of a few channels leaves
    gradients far smaller than their terms (see sparx_ref.testing.rel_err_scaled)."""
    B, C, Ls = x["q"].shape
    G, g = groups, C // groups
    q, k, v, d = (np.abs(a.astype(np.float64)).reshape(B, G, g, -1) for a in (x["q"], x["k"], x["v"], dout))
    P = np.asarray(attn, dtype=np.float64)
    dP_terms = d @ v.transpose(0, 1, 3, 2)                                   # |dout| |v|^T
    dS_terms = P * (dP_terms + np.sum(P * dP_terms, axis=-1, keepdims=True))
    alpha = 1.0 / np.sqrt(Ls)
    return {"q": (dS_terms @ k * alpha).reshape(B, C, Ls),
            "k": (dS_terms.transpose(0, 1, 3, 2) @ q * alpha).reshape(B, C, Ls),
            "v": (P.transpose(0, 1, 3, 2) @ d).reshape(B, C, -1)}


def _check_dmca(dev, version, inputs, dout, groups, dtype):
    ref = _ref_dmca()
    mod = _module(dev.backend)
    fwd = getattr(mod, f"dmca_attention_fwd_{version}")
    bwd = getattr(mod, f"dmca_attention_bwd_{version}")
    x = {k: a.astype(dtype) for k, a in inputs.items()}
    d = dout.astype(dtype)
    ref_out, ref_cache = ref.dmca_attention_fwd(**{k: a.astype(np.float64) for k, a in x.items()}, groups=groups)
    ref_grads = ref.dmca_attention_bwd(d.astype(np.float64), ref_cache)
    out, cache = fwd(**{k: dev.put(a) for k, a in x.items()}, groups=groups)
    grads = bwd(dev.put(d), cache)
    assert_close(out, ref_out, dtype, "kernel", name=f"{version} out")
    assert_close(cache["attn"], ref_cache["attn"], dtype, "kernel", name=f"{version} attn")
    assert sorted(grads) == sorted(ref_grads)
    scales = _dmca_grad_scales(x, d, ref_cache["attn"], groups)
    for key in ref_grads:
        assert_close_scaled(grads[key], ref_grads[key], scales[key], dtype, "kernel", name=f"{version} d{key}")


if SIM:
    _G, _g, _LS, _L, _B = st.integers(1, 2), st.integers(2, 12), st.integers(1, 12), st.integers(1, 40), \
        st.integers(1, 2)
else:
    _G, _g, _LS, _L, _B = st.integers(1, 4), st.integers(2, 64), st.integers(1, 64), st.integers(1, 3000), \
        st.integers(1, 3)


@pytest.mark.parametrize("backend,version", _versions(DMCA_OPS))
@settings(max_examples=EXAMPLES)
@given(B=_B, groups=_G, g=_g, Ls=_LS, L=_L, seed=st.integers(0, 2**31))
def test_dmca_attention_matches_reference(device, backend, version, B, groups, g, Ls, L, seed):
    dev = device(backend)
    inputs, dout = _dmca_case(np.random.default_rng(seed), B, groups, g, Ls, L)
    _check_dmca(dev, version, inputs, dout, groups, np.float32)


@pytest.mark.parametrize("backend,version", _versions(DMCA_OPS))
def test_dmca_attention_long_full_length(device, backend, version, rng):
    """A full-resolution length of a few thousand (many 64-wide column tiles, a ragged last
    one) and a group wider than one tile (g = 70 on a GPU)."""
    dev = device(backend)
    if SIM:
        inputs, dout = _dmca_case(rng, 1, 2, 3, 5, 300)
        groups = 2
    else:
        inputs, dout = _dmca_case(rng, 2, 4, 70, 49, 3136)
        groups = 4
    _check_dmca(dev, version, inputs, dout, groups, np.float32)


@pytest.mark.parametrize("backend,version", _versions(DMCA_OPS))
def test_dmca_attention_float64(device, backend, version, rng):
    dev = device(backend)
    inputs, dout = _dmca_case(rng, 2, 2, 5, 7, 30)
    _check_dmca(dev, version, inputs, dout, 2, np.float64)


# --------------------------------------------------------------------------------------
# the table, signatures and bad input
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", WINDOW_OPS + DMCA_OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_with_one_default_and_reference_signature(op, backend):
    rows = registry.entries(op, backend)
    assert len(rows) >= 2, f"{op}/{backend}: expected a ladder of versions"
    assert sum(e.default for e in rows) == 1
    assert all(e.idea for e in rows)
    ref_mod = "window_attention" if op.startswith("window") else "dmca"
    mod = _module(backend)
    try:
        ref_fn = getattr(importlib.import_module(f"sparx_ref.ref.{ref_mod}"), op)
    except ImportError:
        ref_fn = None
    for e in rows:
        module, attr = e.target.split(":")
        fn = getattr(importlib.import_module(module), attr)
        assert module == mod.__name__
        if ref_fn is not None:
            assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref_fn).parameters)
            got = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
            want = {p.name: p.default for p in inspect.signature(ref_fn).parameters.values()}
            assert got == want, f"{attr}: defaults differ from the reference"
    default = [e for e in rows if e.default][0]
    assert getattr(mod, op).__doc__ and default.version in getattr(mod, op).__doc__


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(device, backend, rng):
    dev = device(backend)
    mod = _module(backend)
    q = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    bias = rng.standard_normal((1, 4, 4)).astype(np.float32)
    with pytest.raises(TypeError, match="q must be a device array"):
        mod.window_attention_fwd(q, q, q, bias)
    with pytest.raises(TypeError, match="float32 or float64"):
        mod.window_attention_fwd(*(dev.put(q.astype(np.float16)),) * 3, dev.put(bias.astype(np.float16)))
    with pytest.raises(TypeError, match="bias has dtype float64"):
        mod.window_attention_fwd(*(dev.put(q),) * 3, dev.put(bias.astype(np.float64)))
    with pytest.raises(ValueError, match="bias must have shape"):
        mod.window_attention_fwd(*(dev.put(q),) * 3, dev.put(bias[:, :3]))
    with pytest.raises(ValueError, match="divisible by nW"):
        mod.window_attention_fwd(*(dev.put(q),) * 3, dev.put(bias), mask=dev.put(np.zeros((3, 4, 4), np.float32)))
    x = dev.put(rng.standard_normal((1, 6, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="divisible by groups"):
        mod.dmca_attention_fwd(x, x, x, groups=4)
    with pytest.raises(TypeError, match="int32"):
        xi = dev.put(np.ones((1, 4, 5), np.int32))
        mod.dmca_attention_fwd(xi, xi, xi, groups=2)


# --------------------------------------------------------------------------------------
# the CuPy CUDA C on the CPU: a small emulation (one std::thread per CUDA thread, barriers for
# __syncthreads and warp shuffles), so CI checks the CUDA C of the window kernels without a GPU
# --------------------------------------------------------------------------------------
_EMU_HEADER = r"""
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <algorithm>
#include <memory>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::unique_ptr<std::barrier<>> g_block_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
static double g_xchg[1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __restrict__
using std::min; using std::max; using std::fmax;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T x, int o) {
    const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    g_xchg[tid] = (double)x;
    g_warp_bar[w]->arrive_and_wait();
    T y = (T)g_xchg[w * 32 + (lane ^ o)];
    g_warp_bar[w]->arrive_and_wait();
    return y;
}
template <class F> void launch(dim3 grid, dim3 block, F f) {
    gridDim = grid; blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_bar = std::make_unique<std::barrier<>>(block.x);
        g_warp_bar.clear();
        for (unsigned w = 0; w < (block.x + 31) / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block.x; ++t)
            ts.emplace_back([=]() { threadIdx = dim3{t, 0, 0}; blockIdx = dim3{bx, by, bz}; f(); });
        for (auto& t : ts) t.join();
    }
}
"""

_EMU_HARNESS = r"""
namespace generic {
#include "generic.cu"
}
namespace fixed {
#include "static.cu"
}
typedef float R;
extern "C" void fused_fwd(const R* q, const R* k, const R* v, const R* bias, const R* mask, R* out, R* probs,
                          int Bw, int nH, int N, int HD, int nW, int has_mask, int DC, R scale, int threads) {
    launch(dim3{(unsigned)(Bw * nH), 1, 1}, dim3{(unsigned)threads, 1, 1}, [=]() {
        generic::window_fwd_fused(q, k, v, bias, mask, out, probs, nH, N, HD, nW, has_mask, DC, scale); });
}
extern "C" void fused_bwd(const R* q, const R* k, const R* v, const R* probs, const R* dout, R* dq, R* dk, R* dv,
                          R* partial, int npart, int Bw, int nH, int N, int HD, int DC, R scale, int threads) {
    launch(dim3{(unsigned)npart, (unsigned)nH, 1}, dim3{(unsigned)threads, 1, 1}, [=]() {
        generic::window_bwd_fused(q, k, v, probs, dout, dq, dk, dv, partial, Bw, nH, N, HD, DC, scale); });
}
extern "C" void static_fwd(const R* q, const R* k, const R* v, const R* bias, const R* mask, R* out, R* probs,
                           int Bw, int nH, int nW, int has_mask, R scale) {
    launch(dim3{(unsigned)(Bw * nH), 1, 1}, dim3{WT, 1, 1}, [=]() {
        fixed::window_fwd_static(q, k, v, bias, mask, out, probs, nH, nW, has_mask, scale); });
}
extern "C" void static_bwd(const R* q, const R* k, const R* v, const R* probs, const R* dout, R* dq, R* dk, R* dv,
                           R* partial, int npart, int Bw, int nH, R scale) {
    launch(dim3{(unsigned)npart, (unsigned)nH, 1}, dim3{WT, 1, 1}, [=]() {
        fixed::window_bwd_static(q, k, v, probs, dout, dq, dk, dv, partial, Bw, nH, scale); });
}
"""

_EMU_SHAPE = dict(Bw=6, nH=2, N=9, hd=12, nW=3, threads=64, npart=4)


@pytest.fixture(scope="module")
def emulated_cuda_c(tmp_path_factory):
    """The CuPy module's float32 CUDA C (generic + static at _EMU_SHAPE) built for the CPU."""
    import ctypes
    import shutil
    import subprocess
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA C")
    src = importlib.import_module("sparx_ref.kernels.cupy.attention").CUDA_SOURCES
    d = tmp_path_factory.mktemp("cuda_emu")
    generic = src["attention_f32"].replace("extern __shared__ unsigned char smem_raw[];",
                                           "alignas(16) static unsigned char smem_raw[1 << 16];")
    (d / "generic.cu").write_text(generic)
    (d / "static.cu").write_text(src["attention_static_f32"])
    (d / "harness.cpp").write_text(_EMU_HEADER + _EMU_HARNESS)
    s = _EMU_SHAPE
    dc = importlib.import_module("sparx_ref.kernels.cupy.attention")._static_chunk(s["N"], s["hd"], 4, 2)
    lib = d / "emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread", f"-DWN={s['N']}", f"-DWHD={s['hd']}",
           f"-DWDC={dc}", f"-DWT={s['threads']}", str(d / "harness.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
    if res.returncode != 0 and "barrier" in res.stderr:
        pytest.skip("this g++ has no C++20 <barrier>")
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(lib)), dc


@pytest.mark.parametrize("version", ["fused", "static"])
def test_cupy_window_cuda_c_on_cpu_emulation(emulated_cuda_c, version, rng):
    import ctypes
    lib, dc_static = emulated_cuda_c
    s = _EMU_SHAPE
    Bw, nH, N, hd, nW = s["Bw"], s["nH"], s["N"], s["hd"], s["nW"]
    inputs, dout = _window_case(rng, 3, nH, hd, Bw // nW, nW, True)
    x = {k: a.astype(np.float32) for k, a in inputs.items()}
    d = dout.astype(np.float32)
    ref_out, ref_cache = ref_wa.window_attention_fwd(**{k: a.astype(np.float64) for k, a in x.items()})
    ref_g = ref_wa.window_attention_bwd(d.astype(np.float64), ref_cache)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    nan = lambda *shape: np.full(shape, np.nan, np.float32)  # noqa: E731
    out, probs = nan(Bw, nH, N, hd), nan(Bw, nH, N, N)
    dq, dk, dv, part = nan(Bw, nH, N, hd), nan(Bw, nH, N, hd), nan(Bw, nH, N, hd), nan(s["npart"], nH, N, N)
    scale = ctypes.c_float(hd ** -0.5)
    q, k, v, bias, mask = (x[n] for n in ("q", "k", "v", "bias", "mask"))
    if version == "fused":
        lib.fused_fwd(p(q), p(k), p(v), p(bias), p(mask), p(out), p(probs), Bw, nH, N, hd, nW, 1, 8, scale,
                      s["threads"])
        lib.fused_bwd(p(q), p(k), p(v), p(probs), p(d), p(dq), p(dk), p(dv), p(part), s["npart"], Bw, nH, N, hd, 8,
                      scale, s["threads"])
    else:
        lib.static_fwd(p(q), p(k), p(v), p(bias), p(mask), p(out), p(probs), Bw, nH, nW, 1, scale)
        lib.static_bwd(p(q), p(k), p(v), p(probs), p(d), p(dq), p(dk), p(dv), p(part), s["npart"], Bw, nH, scale)
    assert_close(out, ref_out, np.float32, "kernel", name=f"{version} out")
    assert_close(probs, ref_cache["probs"], np.float32, "kernel", name=f"{version} probs")
    for name, got in (("q", dq), ("k", dk), ("v", dv), ("bias", part.sum(axis=0))):
        assert_close(got, ref_g[name], np.float32, "kernel", name=f"{version} d{name}")
