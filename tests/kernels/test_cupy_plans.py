"""CuPy launch plans (sparx_ref.kernels.cupy._plan) without a GPU: how a plan is run (buffer
names replaced by addresses, launches in order, zeroed buffers), and which kernel functions
carry a plan builder (the ones the twins call on every step). The plans' kernels themselves are
checked against the reference by the CuPy kernel tests on a GPU, which run through the plans."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from sparx_ref.kernels import registry
from sparx_ref.kernels.cupy import _plan
from sparx_ref.kernels.cupy._plan import Launch, Plan, plan_cache, replayable, run


def address(a):
    return a.__array_interface__["data"][0]


def test_run_allocates_buffers_and_replaces_names_by_addresses_in_order():
    calls = []

    def kernel(grid, block, args, shared_mem=0):
        calls.append((grid, block, args, shared_mem))
    plan = Plan(np.dtype(np.float32), (("out", (2, 3)), ("zero", (4,))),
                (Launch(kernel, (1,), (32,), ("x", "out", np.int32(5))),
                 Launch(kernel, (2, 1), (64,), ("zero", "x"), shared_mem=128)),
                frozenset({"zero"}))
    x = np.arange(3, dtype=np.float32)

    def poisoned(shape, dtype):
        return np.full(shape, np.nan, dtype)
    bufs = run(plan, {"x": x, "absent": None}, poisoned, np.zeros, address)
    assert bufs["x"] is x and bufs["absent"] is None
    assert bufs["out"].shape == (2, 3) and bufs["out"].dtype == np.float32
    assert np.isnan(bufs["out"]).all(), "non-zeroed buffers come from `empty`"
    assert bufs["zero"].shape == (4,) and not bufs["zero"].any(), "zeroed buffers come from `zeros`"
    assert [c[:2] for c in calls] == [((1,), (32,)), ((2, 1), (64,))]
    assert calls[0][2] == (address(x), address(bufs["out"]), 5) and type(calls[0][2][2]) is np.int32
    assert calls[1][2] == (address(bufs["zero"]), address(x)) and calls[1][3] == 128


def test_scratch_buffers_share_one_aligned_allocation_and_offsets_address_elements():
    calls, blocks = [], []

    def kernel(grid, block, args, shared_mem=0):
        calls.append(args)

    def empty(shape, dtype):
        blocks.append(np.full(shape, np.nan, dtype))
        return blocks[-1]
    # float64: 32 elements per 256-byte step; "a" takes 3 steps (70 elements), "b" one
    plan = Plan(np.dtype(np.float64), (("out", (5,)),),
                (Launch(kernel, (1,), (1,), ("a", "b", ("out", 2), ("b", 1))),), scratch=(("a", (7, 10)), ("b", (3,))))
    assert plan.scratch_layout == (128, (("a", 0), ("b", 768)))
    bufs = run(plan, {}, empty, np.zeros, address)
    assert set(bufs) == {"out"}, "scratch is not returned"
    block = next(b for b in blocks if b.shape == (128,))
    base = address(block)
    assert calls == [(base, base + 768, address(bufs["out"]) + 16, base + 768 + 8)]
    with pytest.raises(ValueError, match="zeroed"):
        Plan(np.dtype(np.float32), (), (), frozenset({"a"}), (("a", (2,)),))


def test_plan_cache_builds_one_plan_per_device_and_for_device_rebuilds_on_the_current_one(monkeypatch):
    """A plan holds kernels loaded on the device current when it was built: the cache keys plans by
    that device too, and ``for_device`` gives the same call's plan for the device current now."""
    built = []
    device = {"now": 0}
    monkeypatch.setattr(_plan, "current_device", lambda: device["now"])

    @plan_cache
    def builder(dims, dtype, *, flag=False):
        built.append((device["now"], dims, flag))
        return Plan(np.dtype(dtype), (("out", dims),), ())
    try:
        on0 = builder((2, 3), np.float32, flag=True)
        assert builder((2, 3), np.float32, flag=True) is on0 and len(built) == 1, "cached per device"
        device["now"] = 1
        on1 = builder((2, 3), np.float32, flag=True)
        assert on1 is not on0 and built[-1] == (1, (2, 3), True), "another device: its own plan"
        assert on0.for_device() is on1, "for_device: the plan of the device current now"
        device["now"] = 0
        assert on1.for_device() is on0 and len(built) == 2
        bare = Plan(np.dtype(np.float32), (), ())
        assert bare.for_device() is bare, "a plan built by hand has no builder: itself"
        builder.cache_clear()
        assert builder((2, 3), np.float32, flag=True) is not on0 and len(built) == 3
    finally:
        builder.cache_clear()


def test_run_refuses_a_launch_naming_an_absent_buffer():
    plan = Plan(np.dtype(np.float32), (), (Launch(lambda *a, **k: None, (1,), (1,), ("bias",)),))
    with pytest.raises(KeyError, match="bias"):
        run(plan, {"bias": None}, np.empty, np.zeros, address)


def test_replayable_marks_the_function():
    def planner(dims):
        return None

    @replayable(planner)
    def f(x):
        return x
    assert f.plan is planner and f(3) == 3


# The kernels the SparX-Mamba twin calls on every step (cross_scan feeds its x_proj): their CuPy defaults must be replayable,
# or the twin silently takes the slower CuPy-array route (tests/torch_models checks the route).
PLANNED_OPS = ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd", "ss2d_scan_fwd", "ss2d_scan_bwd",
               "dmca_attention_fwd", "dmca_attention_bwd", "cross_scan", "cross_merge", "group_norm_fwd",
               "group_norm_bwd")


@pytest.mark.parametrize("op", PLANNED_OPS)
def test_cupy_defaults_of_twin_ops_carry_a_plan(op):
    (entry,) = [e for e in registry.entries(op, "cupy") if e.default]
    module, name = entry.target.split(":")
    fn = getattr(importlib.import_module(module), name)      # imports no CuPy
    assert callable(getattr(fn, "plan", None)), f"{entry.target} has no .plan"


def test_driver_launch_packing_holds_each_argument_as_its_c_type():
    """What :class:`DriverLaunches` hands cuLaunchKernel: one C value per argument, the pointer
    slots rewritten from the buffer addresses on every call (no GPU needed to check the packing)."""
    import ctypes

    from sparx_ref.kernels.cupy._plan import _Packed
    kernel = type("FakeFunction", (), {"ptr": 0x1234})()
    launch = Launch(kernel, (3, 2), (128,), ("x", np.uint32(7), ("out", 5), np.float32(0.5), np.int32(-2),
                                             np.float64(1e-5)))
    p = _Packed(launch)
    assert p.kernel == 0x1234 and p.dims == (3, 2, 1, 128, 1, 1)
    kinds = [type(v) for v in p.values]
    assert kinds == [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, ctypes.c_double]
    assert [v.value for v in p.values[1:2] + p.values[3:]] == [7, 0.5, -2, 1e-5]
    assert [(name, offset) for _, name, offset in p.slots] == [("x", 0), ("out", 5)]
    assert list(p.params) == [ctypes.addressof(v) for v in p.values]
    with pytest.raises(TypeError, match="NumPy scalars"):
        _Packed(Launch(kernel, (1,), (1,), (3.0,)))


def test_driver_launches_of_a_plan_hand_cuLaunchKernel_each_launch_in_order():
    """``run(..., launcher=DriverLaunches)`` with cuLaunchKernel replaced by a recorder (no GPU):
    each launch gets its kernel handle, grid, block, shared memory, the stream, and parameters
    whose pointer slots hold this call's addresses (element offsets scaled by the dtype's size)."""
    import ctypes
    import threading

    from sparx_ref.kernels.cupy._plan import DriverLaunches
    k1, k2 = (type("FakeFunction", (), {"ptr": ptr})() for ptr in (0x1000, 0x2000))
    plan = Plan(np.dtype(np.float64), (("out", (4,)),),
                (Launch(k1, (3,), (64,), ("x", np.int32(9), ("out", 2))),
                 Launch(k2, (2, 5), (32, 4), ("out",), shared_mem=256)))
    calls, n_args = [], {0x1000: 3, 0x2000: 1}

    def cu_launch_kernel(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        calls.append(((fn, gx, gy, gz, bx, by, bz, shared, stream), [slots[i] for i in range(n_args[fn])]))
        return 0
    launcher = DriverLaunches.__new__(DriverLaunches)
    launcher._launch, launcher._local = cu_launch_kernel, threading.local()
    launcher._ctx_get_current = lambda out: setattr(out._obj, "value", 0xC0) or 0   # a context is current
    x = np.arange(3.0)
    for _ in range(2):                                   # the second call reuses the packing
        calls.clear()
        bufs = run(plan, {"x": x}, lambda shape, dtype: np.zeros(shape, dtype), np.zeros, address, launcher, 7)
        (head1, slots1), (head2, slots2) = calls
        assert head1 == (0x1000, 3, 1, 1, 64, 1, 1, 0, 7) and head2 == (0x2000, 2, 5, 1, 32, 4, 1, 256, 7)
        assert ctypes.c_void_p.from_address(slots1[0]).value == address(x)
        assert ctypes.c_int32.from_address(slots1[1]).value == 9
        assert ctypes.c_void_p.from_address(slots1[2]).value == address(bufs["out"]) + 2 * 8
        assert ctypes.c_void_p.from_address(slots2[0]).value == address(bufs["out"])


def test_driver_launches_bind_a_context_in_a_thread_that_has_none(monkeypatch):
    """A thread where no CUDA runtime call has run yet (PyTorch's autograd worker for device 0)
    has no current context, and cuLaunchKernel would fail there with CUDA_ERROR_INVALID_CONTEXT:
    the first launch in each thread binds one through the runtime, then launches; a thread that
    already has one is left alone, and a failed binding is a clear error (no GPU needed)."""
    import threading

    from sparx_ref.kernels.cupy import _plan as plan_module
    from sparx_ref.kernels.cupy._plan import DriverLaunches
    kernel = type("FakeFunction", (), {"ptr": 0x1000})()
    plan = Plan(np.dtype(np.float32), (), (Launch(kernel, (1,), (32,), ("x",)),))
    context = {"current": 0}             # per process here; the check is once per thread
    binds, launches = [], []

    def ctx_get_current(out):
        out._obj.value = context["current"]
        return 0
    monkeypatch.setattr(plan_module, "bind_runtime_context",
                        lambda: binds.append(threading.get_ident()) or context.update(current=0xC0))
    launcher = DriverLaunches.__new__(DriverLaunches)
    launcher._local, launcher._ctx_get_current = threading.local(), ctx_get_current
    launcher._launch = lambda *args: launches.append(context["current"]) or 0
    x = np.zeros(4, np.float32)
    run(plan, {"x": x}, np.empty, np.zeros, address, launcher, 0)
    assert binds == [threading.get_ident()] and launches == [0xC0], "bound first, then launched"
    run(plan, {"x": x}, np.empty, np.zeros, address, launcher, 0)
    assert len(binds) == 1 and len(launches) == 2, "checked once per thread"
    other = threading.Thread(target=run, args=(plan, {"x": x}, np.empty, np.zeros, address, launcher, 0))
    other.start()
    other.join()
    assert len(binds) == 1 and len(launches) == 3, "a thread with a current context binds nothing"

    context["current"] = 0
    monkeypatch.setattr(plan_module, "bind_runtime_context", lambda: None)   # binding does nothing
    failing = DriverLaunches.__new__(DriverLaunches)
    failing._local, failing._ctx_get_current, failing._launch = threading.local(), ctx_get_current, launcher._launch
    with pytest.raises(RuntimeError, match="no CUDA context is current in this thread"):
        run(plan, {"x": x}, np.empty, np.zeros, address, failing, 0)
    assert len(launches) == 3, "nothing launched without a context"


def test_driver_launches_match_cupy_kernel_calls_on_the_gpu():
    """The same plan (group norm forward and backward) through cuLaunchKernel and through CuPy's
    kernel objects: identical results bit for bit."""
    if registry.runtime_missing("cupy"):
        pytest.skip("needs a GPU with CuPy")
    import cupy

    from sparx_ref.kernels.cupy import norm
    from sparx_ref.kernels.cupy._plan import DriverLaunches, cupy_address
    rng = np.random.default_rng(0)
    B, C, S, G = dims = (3, 8, 50, 2)
    x = cupy.asarray(3 + rng.standard_normal((B, C, S)), dtype=cupy.float32)
    w, b = (cupy.asarray(rng.standard_normal(C), dtype=cupy.float32) for _ in range(2))
    dout = cupy.asarray(rng.standard_normal((B, C, S)), dtype=cupy.float32)
    fwd, bwd = norm.fwd_plan(dims, np.float32, True, True, 1e-5), norm.bwd_plan(dims, np.float32, True, True)
    results = []
    for launcher in (None, DriverLaunches()):
        f = run(fwd, {"x": x, "weight": w, "bias": b}, norm._empty, cupy.zeros, cupy_address, launcher, 0)
        g = run(bwd, {"x": x, "weight": w, "stats": f["stats"], "dout": dout}, norm._empty, cupy.zeros, cupy_address,
                launcher, 0)
        results.append([a.get() for a in (f["out"], g["dx"], g["dweight"], g["dbias"])])
    for a, b_ in zip(*results):
        np.testing.assert_array_equal(a, b_)
