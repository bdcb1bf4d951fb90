"""The light Numba-CUDA launch path (sparx_ref/kernels/numba_cuda/_launch.py), without a GPU.

The fast path itself needs a driver; what is tested here:

1. the argument packer gives exactly what Numba passes: for arrays of rank 1-4 (C, Fortran and
   strided layouts, three dtypes) and int32/int64/float32/float64/bool scalars, the parameter
   list equals the one numba-cuda's own ``_Kernel._prepare_args`` builds, and its names and
   sizes equal the flattening of Numba's data model (``ArrayModel``). Numba's real target is
   not importable under the simulator, so these oracles run in one subprocess with
   ``NUMBA_ENABLE_CUDASIM=0`` (no GPU needed: nothing is launched);
2. ``launch`` under the simulator falls back to the dispatcher and gives its results;
3. the plan / fast-path bookkeeping of ``launch`` with a stand-in dispatcher and driver:
   first call through the dispatcher, later calls packed like ``pack_args``, new argument
   kinds back through the dispatcher, unsupported arguments never on the fast path;
4. clear errors for a dtype / rank / layout / kind mismatch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from numba.core import types
from numba.np.numpy_support import from_dtype

from sparx_ref.kernels.numba_cuda import _launch as L

ROOT = Path(__file__).resolve().parents[2]


class FakeCAI:
    """A device array seen only through ``__cuda_array_interface__`` (never dereferenced)."""

    def __init__(self, ptr, shape, strides, dtype, stream=None, readonly=False):
        self.shape = tuple(shape)
        self.__cuda_array_interface__ = {"shape": self.shape, "strides": strides, "data": (ptr, readonly),
                                         "typestr": np.dtype(dtype).str, "version": 3, "stream": stream}


def _norm(values):
    """Parameter list -> comparable [kind, value] pairs (ints are pointer-sized for cuda.core)."""
    out = []
    for v in values:
        if isinstance(v, np.generic):
            out.append([type(v).__name__, v.item()])
        elif isinstance(v, bool):
            out.append(["bool", v])
        elif isinstance(v, int):
            out.append(["intptr", v])
        else:
            out.append([type(v).__name__, v.value])
    return out


# array cases: (shape, strides in elements or None for C, dtype); strides in bytes are built below
ARRAY_CASES = [
    ((7,), None, "float32"), ((7,), (3,), "float32"), ((1,), None, "int32"),
    ((3, 5), None, "float64"), ((3, 5), (1, 3), "float32"), ((3, 5), (10, 1), "float32"),
    ((2, 3, 4), None, "float32"), ((2, 3, 4), (1, 2, 6), "float64"), ((2, 3, 4), (24, 8, 2), "int32"),
    ((2, 1, 3, 2), None, "float32"), ((2, 3, 4, 5), (1, 2, 6, 24), "float32"),
    ((2, 2, 2, 2), (16, 8, 4, 1), "float64"),
]   # (no empty array: numba needs a driver context to build one)
SCALAR_CASES = [("int32", "np.int32(-5)"), ("int32", "-7"), ("int64", "7"), ("int64", "np.int64(-2**40)"),
                ("float32", "np.float32(1.5)"), ("float32", "0.1"), ("float64", "2.25"), ("float64", "np.float64(-3e-300)"),
                ("boolean", "True"), ("boolean", "np.bool_(False)"), ("uint32", "np.uint32(4000000000)")]


def _byte_strides(shape, strides, dtype):
    item = np.dtype(dtype).itemsize
    if strides is None:
        return None
    return tuple(s * item for s in strides)


_ORACLE = r'''
import ctypes, json, sys
import numpy as np
from numba.cuda.cudadrv.devicearray import DeviceNDArray
from numba.cuda.descriptor import cuda_target
from numba.cuda.dispatcher import _Kernel
from numba.cuda.typing.typeof import Purpose, typeof
from numba.core import types
from numba.np.numpy_support import from_dtype
from sparx_ref.kernels.numba_cuda import _launch as L

cases = json.loads(sys.argv[1])
ctx = cuda_target.target_context
dmm = ctx.data_model_manager

class FakeMemory:                      # stands for numba's MemoryPointer: only the address is read
    def __init__(self, ptr):
        self.device_ctypes_pointer = ctypes.c_size_t(ptr)

class FakeKernelSelf:                  # _prepare_args reads only self.extensions
    extensions = []

def param_bytes(values, sizes):
    """The bytes cuda.core's launch hands the driver for each parameter (its ParamHolder)."""
    from cuda.core._kernel_arg_handler import ParamHolder
    holder = ParamHolder(values)
    ptrs = (ctypes.c_void_p * len(values)).from_address(holder.ptr)
    return [ctypes.string_at(p, n).hex() for p, n in zip(ptrs, sizes)]

def width(v):
    return ctypes.sizeof(v) if isinstance(v, ctypes._SimpleCData) else 1 if isinstance(v, bool) else np.asarray(v).itemsize

def norm(values):
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append(["bool", v])
        elif isinstance(v, int):
            out.append(["intptr", v])
        else:
            out.append([type(v).__name__, v.value])
    return out

def model_fields(ty):
    """(name, byte size) of every kernel parameter Numba's data model flattens ty into."""
    model = dmm[ty]
    if not hasattr(model, "_fields"):
        return [[str(ty), ctx.get_abi_sizeof(model.get_argument_type())]]
    out = []
    for name, member in zip(model._fields, model._members):
        argty = dmm[member].get_argument_type()
        if isinstance(argty, tuple):
            out += [[f"{name}[{i}]", ctx.get_abi_sizeof(t)] for i, t in enumerate(argty)]
        else:
            out.append([name, ctx.get_abi_sizeof(argty)])
    return out

res = {"arrays": [], "scalars": [], "internals_ok": L._check_numba_internals() is not None}
for i, (shape, strides, dtype) in enumerate(cases["arrays"]):
    dt = np.dtype(dtype)
    if strides is None:
        strides = L._c_strides(tuple(shape), dt.itemsize)
    d = DeviceNDArray(tuple(shape), tuple(strides), dt, gpu_data=FakeMemory(0x10000 * (i + 1)))
    ty = d._numba_type_
    numba_args = []
    _Kernel._prepare_args(FakeKernelSelf(), ty, d, 0, [], numba_args)
    fields = model_fields(ty)
    ours = L.pack_args([ty], [d])
    sizes = [f[1] for f in fields]
    res["arrays"].append({"type": str(ty), "layout": ty.layout, "numba": norm(numba_args), "ours": norm(ours),
                          "model": fields, "numba_bytes": param_bytes(numba_args, sizes),
                          "ours_bytes": param_bytes(ours, sizes)})
fv = L.FlatView(None, 0x5000, 10, np.float32)
d1 = DeviceNDArray((10,), (4,), np.float32, gpu_data=FakeMemory(0x5000))
res["flatview_type"] = [str(typeof(fv, Purpose.argument)), str(d1._numba_type_)]
res["flatview_same_type"] = typeof(fv, Purpose.argument) == d1._numba_type_
for tyname, expr in cases["scalars"]:
    ty = getattr(types, tyname)
    val = eval(expr)
    numba_args = []
    _Kernel._prepare_args(FakeKernelSelf(), ty, val, 0, [], numba_args)
    ours = L.pack_args([ty], [val])
    fields = model_fields(ty)
    sizes = [f[1] for f in fields]
    res["scalars"].append({"type": tyname, "expr": expr, "model": fields,
                           "numba_size": [width(v) for v in numba_args], "ours_size": [width(v) for v in ours],
                           "numba_bytes": param_bytes(numba_args, sizes), "ours_bytes": param_bytes(ours, sizes)})
print("ORACLE" + json.dumps(res))
'''


@pytest.fixture(scope="module")
def oracle():
    """Numba's own packing and data model for every case (one subprocess, simulator off)."""
    cases = {"arrays": [[list(s), None if st_ is None else list(_byte_strides(s, st_, dt)), dt]
                        for s, st_, dt in ARRAY_CASES],
             "scalars": SCALAR_CASES}
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _ORACLE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ORACLE"))
    return json.loads(line[len("ORACLE"):])


@pytest.mark.parametrize("idx", range(len(ARRAY_CASES)), ids=[f"{c[2]}-{len(c[0])}d-{'C' if c[1] is None else c[1]}"
                                                             for c in ARRAY_CASES])
def test_array_packing_equals_numba(oracle, idx):
    got = oracle["arrays"][idx]
    shape, strides, dtype = ARRAY_CASES[idx]
    ndim = len(shape)
    # the packer's parameter list is the one numba-cuda's _prepare_args builds (same DeviceNDArray),
    # down to the bytes cuda.core hands the driver
    assert got["ours"] == got["numba"], got["type"]
    assert got["ours_bytes"] == got["numba_bytes"], got["type"]
    # ... and it is the flattening of Numba's ArrayModel, name by name, 8 bytes each
    assert [f[0] for f in got["model"]] == L.array_field_names(ndim)
    assert all(kind == "intptr" for kind, _ in got["ours"])
    assert all(size == 8 for _, size in got["model"])
    # the same array seen through __cuda_array_interface__ (CuPy / torch route) packs identically
    cai = FakeCAI(0x10000 * (idx + 1), shape, _byte_strides(shape, strides, dtype), dtype)
    ty = types.Array(from_dtype(np.dtype(dtype)), ndim, "A")
    assert _norm(L.pack_args([ty], [cai])) == got["numba"]


def test_numba_layout_agrees_with_ours(oracle):
    """Numba types a DeviceNDArray 'C'/'F' exactly when our layout check says so."""
    for (shape, strides, dtype), got in zip(ARRAY_CASES, oracle["arrays"]):
        item = np.dtype(dtype).itemsize
        bstrides = L._c_strides(shape, item) if strides is None else _byte_strides(shape, strides, dtype)
        assert L._layout(shape, bstrides, item) == got["layout"], (shape, strides, got["type"])


def test_scalar_packing_equals_numba(oracle):
    """Scalars: same width as Numba's data model and the same bytes as Numba's ctypes values
    (ours are NumPy scalars: cuda.core packs those much faster)."""
    for got in oracle["scalars"]:
        sizes = [f[1] for f in got["model"]]
        assert got["numba_size"] == sizes and got["ours_size"] == sizes, got
        assert got["ours_bytes"] == got["numba_bytes"], got


def test_installed_numba_cuda_has_what_the_fast_path_needs(oracle):
    assert oracle["internals_ok"]
    # a FlatView falls back to the dispatcher typed like the flat DeviceNDArray (no second compile)
    assert oracle["flatview_same_type"], oracle["flatview_type"]


@settings(max_examples=20)
@given(st.data())
def test_layout_matches_numpy_flags(data):
    """_layout on NumPy arrays of every kind of view equals NumPy's own contiguity flags."""
    ndim = data.draw(st.integers(1, 4))
    shape = data.draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    base = np.zeros([s + 2 for s in shape], np.float32)
    a = base[tuple(slice(0, s) for s in shape)]
    if data.draw(st.booleans()):
        a = a.transpose(data.draw(st.permutations(range(ndim))))
    if data.draw(st.booleans()):
        a = a[tuple(slice(None, None, data.draw(st.integers(1, 2))) for _ in range(ndim))]
    if data.draw(st.booleans()):
        a = np.ascontiguousarray(a) if data.draw(st.booleans()) else np.asfortranarray(a)
    if data.draw(st.booleans()) and a.size:
        axis = data.draw(st.integers(0, ndim - 1))
        a = np.broadcast_to(a.take([0], axis=axis), a.shape[:axis] + (3,) + a.shape[axis + 1:])
    want = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"
    assert L._layout(a.shape, a.strides, a.itemsize) == want, (a.shape, a.strides)


# ----------------------------------------------------------------------------------------
# 2. simulator: launch falls back to the dispatcher
# ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not L.SIMULATOR, reason="checks the simulator fallback")
def test_simulator_falls_back_with_same_results(rng):
    @cuda.jit
    def axpb(out, x, y, a, n):
        i = cuda.grid(1)
        if i < n:
            out[i] = a * x[i] + y[i]

    n = 37
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    ref = cuda.to_device(np.full(n, np.nan, np.float32))
    got = cuda.to_device(np.full(n, np.nan, np.float32))
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    axpb[2, 32](ref, dx, dy, np.float32(1.5), np.int64(n))
    before = L.stats()
    for mode in ("1", "verify"):
        old = L.set_mode(mode)
        try:
            L.launch(axpb, 2, 32, L.flat(got), L.flat(dx), L.flat(dy), np.float32(1.5), np.int64(n))
        finally:
            L.set_mode(old)
    after = L.stats()
    assert after["dispatcher"] - before["dispatcher"] == 2 and after["fast"] == before["fast"]
    np.testing.assert_array_equal(got.copy_to_host(), ref.copy_to_host())
    np.testing.assert_allclose(got.copy_to_host(), 1.5 * x + y, rtol=1e-6)


# ----------------------------------------------------------------------------------------
# 3. launch's bookkeeping with a stand-in dispatcher and driver
# ----------------------------------------------------------------------------------------
class _StandInKernel:
    """Plays numba's _Kernel: argument types and a code library giving a CUfunction."""

    debug = cooperative = launch_config_sensitive = False
    extensions = []

    def __init__(self, argtypes):
        self.argument_types = argtypes
        self._codelibrary = self

    def get_cufunc(self):
        return self

    @property
    def kernel(self):
        return ("cufunc", tuple(self.argument_types))


class _StandInDispatcher:
    """Plays numba's CUDADispatcher: ``[grid, block, stream, shmem](*args)`` compiles (records an
    overload for the argument types) and records the call."""

    __name__ = "stand_in"

    def __init__(self):
        self.overloads = {}
        self.calls = []

    def typeof_pyval(self, a):
        from numba.cuda.typing.typeof import Purpose, typeof
        return typeof(a, Purpose.argument)

    def __getitem__(self, config):
        def call(*args):
            argtypes = tuple(self.typeof_pyval(a) for a in args)
            self.overloads.setdefault(argtypes, _StandInKernel(argtypes))
            self.calls.append((config, args))
        return call


@pytest.fixture
def stand_in_driver(monkeypatch):
    launches = []
    internals = dict(launch=lambda stream, cfg, kern, *kargs: launches.append((stream, cfg, kern, kargs)),
                     LaunchConfig=lambda **kw: ("cfg", tuple(sorted(kw.items()))), ge_1_0=True,
                     Kernel=_StandInKernel, to_core_stream=lambda s: ("stream", s),
                     normalize=lambda g, b: (g if isinstance(g, tuple) else (g, 1, 1),
                                             b if isinstance(b, tuple) else (b, 1, 1)),
                     default_stream=None)
    monkeypatch.setattr(L, "SIMULATOR", False)
    monkeypatch.setattr(L, "_mode", "1")
    monkeypatch.setattr(L, "_internals", internals)
    monkeypatch.setattr(L, "_PLANS", {})
    monkeypatch.setattr(L, "_CONFIGS", {})
    return launches


def test_launch_plans_and_packs_like_pack_args(stand_in_driver):
    launches = stand_in_driver
    disp = _StandInDispatcher()
    a = L.FlatView(None, 0x1000, 12, np.float32)
    b = FakeCAI(0x2000, (3, 4), None, np.float32)
    args = (a, b, np.int64(5), np.float32(0.5), 3)
    L.launch(disp, 4, 64, *args)                       # first call: the dispatcher (it compiles)
    assert len(disp.calls) == 1 and not launches
    L.launch(disp, 4, 64, *args, sharedmem=256)        # then the fast path
    assert len(disp.calls) == 1 and len(launches) == 1
    stream, cfg, kern, kargs = launches[0]
    argtypes = tuple(disp.typeof_pyval(x) for x in args)
    assert kern == ("cufunc", argtypes)
    assert _norm(kargs) == _norm(L.pack_args(argtypes, args))
    assert stream == ("stream", 0)
    assert cfg == ("cfg", (("block", (64, 1, 1)), ("grid", (4, 1, 1)), ("is_cooperative", False),
                           ("shmem_size", 256)))
    # other arrays of the same kind: fast, with their own pointers and shapes
    c = FakeCAI(0x3000, (2, 7), None, np.float32)
    L.launch(disp, 4, 64, L.FlatView(None, 0x4000, 3, np.float32), c, np.int64(6), np.float32(1.0), 4)
    assert len(disp.calls) == 1 and len(launches) == 2
    assert _norm(launches[1][3])[:7] == _norm([0, 0, 3, 4, 0x4000, 3, 4])
    assert _norm(launches[1][3])[7:16] == _norm([0, 0, 14, 4, 0x3000, 2, 7, 28, 4])
    # a new argument kind (float64 array, strided array, float for the int) goes through the dispatcher
    for new in [(L.FlatView(None, 0x1000, 12, np.float64), b, np.int64(5), np.float32(0.5), 3),
                (a, FakeCAI(0x2000, (3, 4), (32, 4), np.float32), np.int64(5), np.float32(0.5), 3),
                (a, b, np.int32(5), np.float32(0.5), 3)]:
        n = len(disp.calls)
        L.launch(disp, 4, 64, *new)
        assert len(disp.calls) == n + 1 and len(launches) == 2


def test_launch_never_fast_for_unsupported_arguments(stand_in_driver):
    launches = stand_in_driver
    disp = _StandInDispatcher()
    needs_sync = FakeCAI(0x1000, (8,), None, np.float32, stream=12345)     # producer on another stream
    for _ in range(3):
        L.launch(disp, 1, 32, needs_sync, np.int64(8))
    on_legacy = FakeCAI(0x1000, (8,), None, np.float32, stream=1)
    for _ in range(2):
        L.launch(disp, 1, 32, on_legacy, np.int64(8), stream=7)               # non-default launch stream
    assert len(disp.calls) == 5 and not launches
    for _ in range(2):
        L.launch(disp, 1, 32, on_legacy, np.int64(8))                        # legacy default: fast
    assert len(disp.calls) == 6 and len(launches) == 1


def test_dispatcher_path_gets_the_numba_view_of_a_flatview(stand_in_driver):
    """The dispatcher (first call of a plan, fallbacks) sees what Numba code always passed:
    ``owner.reshape(size)``, not the FlatView."""
    class NumbaLikeOwner:
        __cuda_memory__ = True

        def reshape(self, n):
            return FakeCAI(0x1000, (n,), None, np.float32)
    disp = _StandInDispatcher()
    L.launch(disp, 3, 32, L.FlatView(NumbaLikeOwner(), 0x1000, 12, np.float32), np.int64(12), sharedmem=64)
    (config, args), = disp.calls
    assert config == (3, 32, 0, 64)
    assert isinstance(args[0], FakeCAI) and args[0].shape == (12,)


def test_mode_zero_always_uses_the_dispatcher(stand_in_driver, monkeypatch):
    launches = stand_in_driver
    monkeypatch.setattr(L, "_mode", "0")
    disp = _StandInDispatcher()
    for _ in range(3):
        L.launch(disp, 1, 32, L.FlatView(None, 0x1000, 8, np.float32), np.int64(8))
    assert len(disp.calls) == 3 and not launches
    with pytest.raises(ValueError, match="mode must be one of"):
        L.set_mode("fast")


# ----------------------------------------------------------------------------------------
# 4. clear errors
# ----------------------------------------------------------------------------------------
F32_1C = types.Array(types.float32, 1, "C")


@pytest.mark.parametrize("argtypes,arg,exc,words", [
    ([F32_1C], FakeCAI(0x1000, (8,), None, np.float64), TypeError, ["argument 0", "float32", "float64"]),
    ([F32_1C], FakeCAI(0x1000, (2, 4), None, np.float32), ValueError, ["argument 0", "1-D", "2-D"]),
    ([types.Array(types.float32, 2, "C")], FakeCAI(0x1000, (2, 4), (4, 8), np.float32), ValueError,
     ["argument 0", "contiguous", "layout 'C'"]),
    ([F32_1C], 3.0, TypeError, ["argument 0", "scalar"]),
    ([types.int64], FakeCAI(0x1000, (8,), None, np.float32), TypeError, ["argument 0", "int64", "FakeCAI"]),
    ([types.int32], 2.5, TypeError, ["argument 0", "int32", "2.5"]),
    ([types.Record.make_c_struct([("x", types.int32)])], 1, TypeError, ["argument 0", "not supported"]),
    ([F32_1C], object(), TypeError, ["argument 0", "object"]),
])
def test_pack_args_clear_errors(argtypes, arg, exc, words):
    with pytest.raises(exc) as info:
        L.pack_args(argtypes, [arg])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_pack_args_wrong_count():
    with pytest.raises(ValueError, match="takes 2 arguments, got 1"):
        L.pack_args([F32_1C, types.int64], [FakeCAI(0x1000, (8,), None, np.float32)])


def test_fortran_parameter_takes_fortran_array_only():
    f = types.Array(types.float32, 2, "F")
    ok = FakeCAI(0x1000, (3, 4), (4, 12), np.float32)
    assert _norm(L.pack_args([f], [ok])) == _norm([0, 0, 12, 4, 0x1000, 3, 4, 4, 12])
    with pytest.raises(ValueError, match="Fortran-contiguous"):
        L.pack_args([f], [FakeCAI(0x1000, (3, 4), None, np.float32)])


# ----------------------------------------------------------------------------------------
# 5. on a GPU (skipped here): the fast path against the dispatcher, verify mode on
# ----------------------------------------------------------------------------------------
def _gpu():
    return not L.SIMULATOR and cuda.is_available()


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with the simulator off")
def test_gpu_fast_launch_equals_dispatcher(rng):
    @cuda.jit
    def scale_add(out, x, y, a, n):
        i = cuda.grid(1)
        if i < n:
            out[i] = a * x[i] + y[i]

    @cuda.jit
    def twice_2d(out, x):
        i, j = cuda.grid(2)
        if i < x.shape[0] and j < x.shape[1]:
            out[i, j] = 2 * x[i, j]

    old = L.set_mode("verify")
    try:
        before = L.stats()
        n = 1000
        x, y = rng.standard_normal(2 * n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        dx, dy = cuda.to_device(x), cuda.to_device(y)
        cases = [("FlatView", lambda: L.flat(dx[:n]), x[:n]), ("C", lambda: dx[:n], x[:n]),
                 ("strided", lambda: dx[::2], x[::2])]
        for name, make_x, xs in cases:
            for _ in range(3):
                out = cuda.to_device(np.full(n, np.nan, np.float32))
                with warnings.catch_warnings():         # verify mode skips (and says so) non-C arrays
                    warnings.simplefilter("ignore", RuntimeWarning)
                    L.launch(scale_add, (n + 127) // 128, 128, out, make_x(), dy, np.float32(0.5), np.int64(n))
            np.testing.assert_allclose(out.copy_to_host(), np.float32(0.5) * xs + y, rtol=1e-6, atol=1e-6,
                                       err_msg=name)
        a2 = rng.standard_normal((40, 24)).astype(np.float32)
        d2 = cuda.to_device(np.asfortranarray(a2))                                    # 'F' layout
        for _ in range(3):
            o2 = cuda.to_device(np.full((40, 24), np.nan, np.float32))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                L.launch(twice_2d, (5, 3), (8, 8), o2, d2)
        np.testing.assert_array_equal(o2.copy_to_host(), 2 * a2)
        after = L.stats()
        assert after["fast"] - before["fast"] >= 8, (before, after)
        assert after["verified"] - before["verified"] >= 2, (before, after)    # the two C-contiguous plans
    finally:
        L.set_mode(old)


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with the simulator off")
def test_gpu_fast_launch_takes_cupy_and_torch(rng):
    @cuda.jit
    def add(out, x, n):
        i = cuda.grid(1)
        if i < n:
            out[i] = out[i] + x[i]

    n = 777
    x = rng.standard_normal(n).astype(np.float32)
    libs = []
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        libs.append(("cupy", cupy.asarray, lambda a: cupy.asnumpy(a)))
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch
        if torch.cuda.is_available():
            libs.append(("torch", lambda a: torch.from_numpy(a).cuda(), lambda a: a.cpu().numpy()))
    except Exception:  # noqa: BLE001
        pass
    if not libs:
        pytest.skip("neither CuPy nor CUDA torch can allocate")
    old = L.set_mode("verify")
    try:
        for name, put, get in libs:
            before = L.stats()
            out, dx = put(np.ones(n, np.float32)), put(x)
            for _ in range(3):
                L.launch(add, (n + 127) // 128, 128, out, dx, np.int64(n))
            # three float32 additions in turn: ((1 + x) + x) + x, not 1 + 3x (rounding differs)
            expected = ((np.float32(1) + x) + x) + x
            np.testing.assert_array_equal(get(out), expected, err_msg=name)
            assert L.stats()["fast"] - before["fast"] == 2, name
    finally:
        L.set_mode(old)


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with the simulator off")
@pytest.mark.parametrize("version", ["naive", "tiled"])
def test_gpu_dmca_fast_equals_dispatcher_bitwise(rng, version):
    from sparx_ref.kernels.numba_cuda import attention as A
    B, C, G, Ls, Lf = 2, 48, 4, 9, 50
    q, k = rng.standard_normal((B, C, Ls)).astype(np.float32), rng.standard_normal((B, C, Ls)).astype(np.float32)
    v, dout = rng.standard_normal((B, C, Lf)).astype(np.float32), rng.standard_normal((B, C, Lf)).astype(np.float32)
    results = {}
    for mode in ("0", "verify", "1"):
        old = L.set_mode(mode)
        try:
            for _ in range(2):                          # the second call of each plan is the fast one
                out, cache = getattr(A, f"dmca_attention_fwd_{version}")(*(cuda.to_device(a) for a in (q, k, v)), G)
                grads = getattr(A, f"dmca_attention_bwd_{version}")(cuda.to_device(dout), cache)
            results[mode] = [out.copy_to_host()] + [grads[n].copy_to_host() for n in ("q", "k", "v")]
        finally:
            L.set_mode(old)
    for mode in ("verify", "1"):
        for a, b in zip(results["0"], results[mode]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with the simulator off")
def test_gpu_kernels_take_cupy_inputs_without_numbas_synchronising_import(rng, monkeypatch):
    """With CuPy inputs on the default stream, the Numba kernels view the arrays directly
    (``_launch.foreign_flat``): ``numba.cuda.as_cuda_array`` would synchronise the stream CuPy
    names, stalling the GPU queue on every call. Results equal those of Numba device arrays."""
    cupy = pytest.importorskip("cupy")
    from sparx_ref.kernels.numba_cuda import attention as A
    from sparx_ref.kernels.numba_cuda import scan as S
    b, KD, L_, K = 2, 8, 13, 2
    host = dict(u=rng.standard_normal((b, KD, L_)), delta=rng.standard_normal((b, KD, L_)),
                A=-np.exp(rng.standard_normal((KD, 1))), B=rng.standard_normal((b, K, 1, L_)),
                C=rng.standard_normal((b, K, 1, L_)), D=rng.standard_normal(KD),
                delta_bias=rng.standard_normal(KD))
    host = {k: v.astype(np.float32) for k, v in host.items()}
    dy = rng.standard_normal((b, KD, L_)).astype(np.float32)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 8, 5), (2, 8, 5), (2, 8, 30)))
    dout = rng.standard_normal((2, 8, 30)).astype(np.float32)

    def run(put):
        y, cache = S.selective_scan_fwd_vec(**{k: put(v) for k, v in host.items()}, delta_softplus=True)
        grads = S.selective_scan_bwd_vec(put(dy), cache)
        out, dcache = A.dmca_attention_fwd(put(q), put(k), put(v), 2)
        dgrads = A.dmca_attention_bwd(put(dout), dcache)
        arrays = [y, grads["u"], grads["delta"], grads["A"], grads["B"], out, dgrads["q"], dgrads["k"], dgrads["v"]]
        cuda.synchronize()     # the kernels ran on the legacy stream; a non-blocking CuPy stream would not wait
        return [cupy.asnumpy(a) if type(a).__module__.startswith("cupy") else a.copy_to_host() for a in arrays]

    expected = run(cuda.to_device)
    run(cupy.asarray)                                             # compile and plan outside the check

    def refuse(*args, **kwargs):
        raise AssertionError("numba.cuda.as_cuda_array called on a CuPy input of the default stream")
    monkeypatch.setattr(cuda, "as_cuda_array", refuse)
    for got, want in zip(run(cupy.asarray), expected):
        np.testing.assert_array_equal(got, want)
    monkeypatch.undo()
    with cupy.cuda.Stream(non_blocking=True):     # another stream: Numba's import and its handshake
        others = run(cupy.asarray)
    for got, want in zip(others, expected):
        np.testing.assert_array_equal(got, want)


def test_foreign_flat_views_default_stream_arrays_directly(monkeypatch):
    """``foreign_flat``: a C-contiguous array whose interface names no stream or the legacy
    default one becomes a FlatView over its own memory; ``flat`` then never calls Numba's
    (synchronising) ``as_cuda_array``. Another stream, a strided array or the fast path off:
    None, and ``flat`` takes Numba's import."""
    monkeypatch.setattr(L, "_fast_enabled", lambda: True)
    imported = []

    def numba_import(x):
        imported.append(x)
        raise LookupError("stand-in: Numba's import reached")
    monkeypatch.setattr(cuda, "as_cuda_array", numba_import, raising=False)   # (the simulator has none)
    for stream in (None, 1):
        x = FakeCAI(0x7000_0000, (3, 4), None, np.float32, stream=stream)
        view = L.foreign_flat(x)
        assert isinstance(view, L.FlatView)
        assert (view.owner, view.ptr, view.size, view.dtype) == (x, 0x7000_0000, 12, np.dtype(np.float32))
        assert L.flat(x).ptr == 0x7000_0000 and imported == []
    other_stream = FakeCAI(0x7000_0000, (3, 4), None, np.float32, stream=0x5000)
    strided = FakeCAI(0x7000_0000, (3, 4), (32, 4), np.float32)
    assert L.foreign_flat(other_stream) is None and L.foreign_flat(strided) is None
    with pytest.raises(LookupError, match="stand-in"):
        L.flat(other_stream)
    assert imported == [other_stream]
    monkeypatch.setattr(L, "_fast_enabled", lambda: False)
    assert L.foreign_flat(FakeCAI(0x7000_0000, (3, 4), None, np.float32)) is None


# ----------------------------------------------------------------------------------------
# 4. allocation helpers (empty_flat, empty_flats, as_array) with a stand-in context
# ----------------------------------------------------------------------------------------
class _StandInMemory:
    __cuda_memory__ = True          # as Numba's MemoryPointer: marked, but not an array (no reshape)

    def __init__(self, ptr, size):
        self.device_pointer_value, self.size = ptr, size


@pytest.fixture
def stand_in_context(monkeypatch):
    allocations = []

    class Context:
        def memalloc(self, nbytes):
            mem = _StandInMemory(0x7000_0000 + 0x100_0000 * len(allocations), nbytes)
            allocations.append(mem)
            return mem

    context = Context()
    monkeypatch.setattr(L, "_fast_enabled", lambda: True)
    monkeypatch.setattr(L, "current_context", lambda: context)
    return allocations


def test_empty_flats_carves_aligned_pieces_from_one_allocation(stand_in_context):
    views = L.empty_flats([5, 0, 64, 3], np.float32)
    assert len(stand_in_context) == 1
    mem = stand_in_context[0]
    assert [v.size for v in views] == [5, 0, 64, 3]
    assert all(v.owner is mem and v.dtype == np.float32 for v in views)
    starts = [v.ptr - mem.device_pointer_value for v in views]
    assert starts == [0, 256, 256, 512]                     # 256-byte aligned, in order
    assert all(s + 4 * v.size <= mem.size for s, v in zip(starts, views))   # inside the allocation


def test_as_array_shapes_a_whole_allocation_and_refuses_a_piece(stand_in_context, monkeypatch):
    from types import SimpleNamespace
    # no DeviceNDArray / MemoryPointer in the simulator: stand-ins record what as_array asks for
    # (the real classes: tests/numba_driver_checks.py)
    monkeypatch.setattr(L, "_device_ndarray", lambda shape, dtype, gpu_data: SimpleNamespace(
        shape=shape, dtype=dtype, gpu_data=gpu_data))
    monkeypatch.setattr(L, "_piece", lambda owner, ptr, nbytes: SimpleNamespace(owner=owner, ptr=ptr, size=nbytes))
    whole = L.empty_flat(24, np.float32)
    arr = L.as_array(whole, (2, 3, 4))
    assert arr.shape == (2, 3, 4) and arr.dtype == np.float32 and arr.gpu_data is whole.owner
    assert whole.as_device_array() is whole      # the dispatcher path takes raw memory through the CAI
    first, piece = L.empty_flats([4, 6])
    arr = L.as_array(piece, (2, 3))                # a piece: memory of the shared allocation
    assert arr.gpu_data.owner is piece.owner and arr.gpu_data.ptr == piece.ptr and arr.gpu_data.size == 24
    assert arr.shape == (2, 3)
    with pytest.raises(ValueError, match="has 6 elements, not the 25"):
        L.as_array(piece, (5, 5))
    outside = L.FlatView(first.owner, first.ptr + 500, 4, np.float32)   # the allocation is 512 bytes
    with pytest.raises(ValueError, match="outside its allocation"):
        L.as_array(outside, (4,))


def test_current_context_is_kept_per_thread_with_one_device_until_it_is_no_longer_primary(monkeypatch):
    import threading
    from types import SimpleNamespace
    asked = []

    def fresh_context():
        ctx = SimpleNamespace(device=SimpleNamespace())
        ctx.device.primary_context = ctx
        asked.append(ctx)
        return ctx

    monkeypatch.setattr(cuda, "current_context", fresh_context, raising=False)
    monkeypatch.setattr(L, "_THREAD", threading.local())
    monkeypatch.setattr(L, "_ONE_DEVICE", True)
    first = L.current_context()
    assert L.current_context() is first and len(asked) == 1            # kept: no second lookup
    other = []
    t = threading.Thread(target=lambda: other.append(L.current_context()))
    t.start()
    t.join()
    assert other[0] is not first and len(asked) == 2                   # another thread asks for itself
    first.device.primary_context = None                                # cuda.close() / a device reset
    again = L.current_context()
    assert again is not first and len(asked) == 3
    monkeypatch.setattr(L, "_ONE_DEVICE", False)                       # several devices: always ask
    monkeypatch.setattr(L, "_THREAD", threading.local())
    L.current_context()
    L.current_context()
    assert len(asked) == 5


def test_loaded_function_skips_the_context_lookup_only_with_one_device(monkeypatch):
    class Library:
        def __init__(self, cache):
            self._cufunc_cache, self.looked_up = cache, 0

        def get_cufunc(self):
            self.looked_up += 1
            return "looked up"

    monkeypatch.setattr(L, "_ONE_DEVICE", True)
    assert L._loaded_function(Library({0: "loaded"})) == "loaded"
    lib = Library({})                                  # not loaded yet: Numba loads it
    assert L._loaded_function(lib) == "looked up" and lib.looked_up == 1
    monkeypatch.setattr(L, "_ONE_DEVICE", False)       # several devices: always ask Numba
    lib = Library({0: "loaded"})
    assert L._loaded_function(lib) == "looked up" and lib.looked_up == 1
