"""Launch plans: what one call of a CuPy op launches, worked out once per set of shapes.

A call of a kernel wrapper does two kinds of work: deciding (check the shapes, pick the grid,
the compiled module and the scalar arguments, size the scratch buffers) and launching. The
deciding depends only on the shapes, the dtype and a few flags, so it is done once and kept as
a :class:`Plan`: the buffers to allocate and the launches to make, in order, where each pointer
argument is a buffer *name*. Running a plan allocates the buffers, replaces every name by its
buffer's device address and launches (:func:`run`).

The CuPy array functions (``depthwise_conv2d_fwd`` and the rest) run their plans on CuPy
arrays. The PyTorch twins run the same plans on tensors (:mod:`sparx_ref.torch_models.ops`):
the buffers are ``torch.empty`` tensors and the addresses ``Tensor.data_ptr()``, with no CuPy
array built at all, which takes a call's host time from hundreds of microseconds to tens
(``benchmarks/diag_function_host.py``). One plan serves both, so what the kernel tests check
against the reference is what the twins launch.

A wrapper that can be replayed this way carries its plan builder as ``fn.plan`` (see
:func:`replayable`); its signature is fixed per op and documented there.

The launches themselves go through CuPy's kernel objects, which convert every argument on every
call (some 20 microseconds a launch with a dozen arguments). :class:`DriverLaunches` instead
packs each launch's arguments into C storage once and, per call, only writes the buffer
addresses into it and calls the driver's ``cuLaunchKernel``; the twins use it on the GPU.

Allocations cost host time too (a few microseconds each through PyTorch's caching allocator), so
the buffers a call only needs while its kernels run (partial sums, transposed copies) are
*scratch*: one allocation holds them all, each at its own 256-byte aligned offset, and only their
addresses are handed out.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel(grid, block, args, shared_mem=shared_mem)`` where each ``str``
    in ``args`` is a buffer name, replaced by that buffer's device address at run time, a
    ``(name, n)`` tuple the address of that buffer's element n, and anything else (NumPy
    scalars) is passed as it is."""
    kernel: Any
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int = 0


SCRATCH_ALIGN = 256     # bytes: every scratch buffer starts on this boundary (vector loads)


@dataclass(frozen=True)
class Plan:
    """The buffers a call allocates (name, shape; all of ``dtype``) and its launches in order.
    Buffers named in ``zeroed`` must start at zero (the rest start undefined: a kernel writes
    every element). ``scratch`` buffers (name, shape) live in one allocation for the duration of
    the launches and are not returned. The names of the call's inputs are not listed: the caller
    gives them."""
    dtype: np.dtype
    buffers: tuple[tuple[str, tuple[int, ...]], ...]
    launches: tuple[Launch, ...]
    zeroed: frozenset = field(default_factory=frozenset)
    scratch: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        if self.zeroed & {name for name, _ in self.scratch}:
            raise ValueError("scratch buffers start undefined: a zeroed buffer must be a plain one")
        object.__setattr__(self, "scratch_layout", scratch_layout(self.scratch, self.dtype))
        object.__setattr__(self, "_again", None)

    def for_device(self) -> "Plan":
        """This plan as built for the CUDA device current now (a :func:`plan_cache` builder's plan;
        any other plan is returned as it is)."""
        return self if self._again is None else self._again()


def scratch_layout(scratch, dtype) -> tuple[int, tuple[tuple[str, int], ...]]:
    """(elements of the one scratch allocation, ((name, byte offset), ...)): the buffers in order,
    each starting on a SCRATCH_ALIGN boundary."""
    item = np.dtype(dtype).itemsize
    step = SCRATCH_ALIGN // item
    offsets, at = [], 0
    for name, shape in scratch:
        offsets.append((name, at * item))
        at += -(-int(np.prod(shape, dtype=np.int64)) // step) * step
    return at, tuple(offsets)


def run(plan: Plan, given: dict, empty: Callable, zeros: Callable, address: Callable, launcher=None,
        stream: int = 0) -> dict:
    """Allocate ``plan``'s buffers (``empty(shape, dtype)``, or ``zeros`` for the zeroed ones)
    and its scratch block, then launch its kernels on the current stream with every buffer name
    replaced by ``address(buffer)``. ``given`` maps the names of the inputs to their arrays (None
    for an absent optional input: no launch may name it). Returns ``given`` and the new buffers by
    name (not the scratch: it is released once the launches are queued, which the stream-ordered
    allocators of PyTorch and CuPy make safe). ``launcher`` (a :class:`DriverLaunches`) launches
    on the raw ``stream`` instead of calling the kernel objects."""
    bufs = dict(given)
    for name, shape in plan.buffers:
        bufs[name] = (zeros if name in plan.zeroed else empty)(shape, plan.dtype)
    addresses = {name: address(a) for name, a in bufs.items() if a is not None}
    if plan.scratch:
        total, offsets = plan.scratch_layout
        block = empty((total,), plan.dtype)
        base = address(block)
        for name, offset in offsets:
            addresses[name] = base + offset
    item = plan.dtype.itemsize
    if launcher is not None:
        launcher.launch_plan(plan, addresses, stream)
        return bufs
    for launch in plan.launches:
        launch.kernel(launch.grid, launch.block,
                      tuple(addresses[a] if type(a) is str else
                            addresses[a[0]] + a[1] * item if type(a) is tuple else a for a in launch.args),
                      shared_mem=launch.shared_mem)
    return bufs


_C_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
              np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
              np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class _Packed:
    """One launch's arguments in C storage: ``params`` (void*[]) points at one C value per
    argument; the pointer arguments' values are rewritten before each launch (``slots``)."""

    def __init__(self, launch: Launch):
        values, self.slots = [], []
        for a in launch.args:
            if type(a) is str or type(a) is tuple:
                v = ctypes.c_void_p(0)
                name, offset = (a, 0) if type(a) is str else a
                self.slots.append((v, name, offset))
            else:
                kind = _C_SCALARS.get(getattr(a, "dtype", None))
                if kind is None:
                    raise TypeError(f"kernel argument {a!r}: plans pass NumPy scalars of "
                                    f"{sorted(d.name for d in _C_SCALARS)} or buffer names")
                v = kind(a.item())
            values.append(v)
        self.values = values                        # keeps the C storage alive
        self.params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        self.params_address = ctypes.addressof(self.params)
        self.kernel = _cu_function(launch.kernel)
        self.dims = tuple(launch.grid) + (1,) * (3 - len(launch.grid)) + tuple(launch.block) + (1,) * (3 - len(launch.block))
        self.call = (self.kernel,) + self.dims + (launch.shared_mem,)    # cuLaunchKernel's leading arguments
        self.launch = launch


def _cu_function(kernel) -> int:
    """The CUfunction handle of a CuPy kernel (a RawModule function, or a RawKernel's)."""
    fn = getattr(kernel, "kernel", kernel)          # RawKernel -> its cupy.cuda.function.Function
    return int(fn.ptr)


class DriverLaunches:
    """Launch plan kernels with the CUDA driver's ``cuLaunchKernel`` on a raw stream (a
    cudaStream_t as an int, 0 for the legacy default stream), in the calling thread's current
    context: the plan's kernels must have been loaded in it (:func:`plan_cache` builds a plan per
    device; :meth:`Plan.for_device`).
    Each launch's packed arguments are built once per thread (so concurrent runs of one plan in
    two threads never share the storage being rewritten).

    A driver launch needs a context current in the calling thread, which the runtime API binds
    only lazily: a thread that has made no runtime call yet has none. PyTorch's autograd worker
    for device 0 is such a thread when a backward starts with one of our nodes (its device is
    already "0", so it never calls cudaSetDevice). So the first launch in each thread checks
    (``cuCtxGetCurrent``) and, where there is none, lets the runtime bind the current device's
    primary context (``cudaFree(0)``)."""

    _lib = None

    def __init__(self):
        if DriverLaunches._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernel.restype = ctypes.c_int
            lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
            lib.cuCtxGetCurrent.restype = ctypes.c_int
            lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            DriverLaunches._lib = lib
        self._launch = DriverLaunches._lib.cuLaunchKernel
        self._ctx_get_current = DriverLaunches._lib.cuCtxGetCurrent
        self._local = threading.local()

    def _has_context(self) -> bool:
        ctx = ctypes.c_void_p()
        return self._ctx_get_current(ctypes.byref(ctx)) == 0 and bool(ctx.value)

    def _ensure_context(self) -> None:
        """Make sure a CUDA context is current in this thread (checked once per thread)."""
        if getattr(self._local, "context_ok", False):
            return
        if not self._has_context():
            bind_runtime_context()
            if not self._has_context():
                raise RuntimeError("no CUDA context is current in this thread, and cudaFree(0) did not bind "
                                   "one: cuLaunchKernel cannot launch the plan's kernels here")
        self._local.context_ok = True

    def _packed(self, key, build):
        """This thread's packed arguments for ``key`` (a Launch or a Plan), built on first use."""
        cache = getattr(self._local, "packed", None)
        if cache is None:
            cache = self._local.packed = {}
        entry = cache.get(id(key))
        if entry is None or entry[0] is not key:     # id() reused by a newer object: repack
            entry = cache[id(key)] = (key, build())
        return entry[1]

    def _fire(self, p: _Packed, addresses: dict, item: int, stream: int) -> None:
        for value, name, offset in p.slots:
            value.value = addresses[name] + offset * item
        err = self._launch(*p.call, stream, p.params_address, None)
        if err:
            launch = p.launch
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {err} for {getattr(launch.kernel, 'name', launch.kernel)} "
                               f"(grid {launch.grid}, block {launch.block}, shared {launch.shared_mem} bytes)")

    def __call__(self, launch: Launch, addresses: dict, item: int, stream: int) -> None:
        """One launch; pointer arguments from ``addresses`` (element offsets of ``item`` bytes)."""
        self._ensure_context()
        self._fire(self._packed(launch, lambda: _Packed(launch)), addresses, item, stream)

    def launch_plan(self, plan: Plan, addresses: dict, stream: int) -> None:
        """Every launch of ``plan`` in order (one cache lookup for the plan, not one a launch)."""
        self._ensure_context()
        item = plan.dtype.itemsize
        for p in self._packed(plan, lambda: tuple(_Packed(launch) for launch in plan.launches)):
            self._fire(p, addresses, item, stream)


def bind_runtime_context() -> None:
    """Let the CUDA runtime bind the current device's primary context to the calling thread
    (``cudaFree(0)``: the runtime initialises itself in the thread and frees nothing)."""
    import cupy
    cupy.cuda.runtime.free(0)


def cupy_address(a) -> int:
    """Device address of a CuPy array's first element (the kernel tests' CPU stand-in for CuPy
    hands NumPy arrays: their data address)."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    return ptr if ptr is not None else a.__array_interface__["data"][0]


_PLAN_CACHES: list = []


def current_device() -> int:
    """The CUDA device current in the calling thread, as CuPy sees it (0 where CuPy is missing or
    has no CUDA runtime behind it, as in the kernel tests' CPU stand-in)."""
    try:
        import cupy
    except ImportError:
        return 0
    runtime = getattr(getattr(cupy, "cuda", None), "runtime", None)
    return runtime.getDevice() if runtime is not None else 0


def plan_cache(builder: Callable) -> Callable:
    """Decorator: memoise a plan builder (its arguments are shapes, dtypes and flags) per CUDA
    device: a plan holds kernels loaded on the device current when it was built, sized for it
    (shared memory opt-in, multiprocessor count), so a call on another device must use that
    device's plan (:meth:`Plan.for_device`). The plans hold compiled kernels, so every such cache
    is emptied with the modules' kernel caches by :func:`clear_plan_caches` (the kernel tests swap
    CuPy for a CPU stand-in and back)."""
    @functools.lru_cache(maxsize=None)
    def build(device, args, kwargs):
        plan = builder(*args, **dict(kwargs))
        if isinstance(plan, Plan):       # how to build this plan again, on another device
            object.__setattr__(plan, "_again", functools.partial(cached, *args, **dict(kwargs)))
        return plan

    @functools.wraps(builder)
    def cached(*args, **kwargs):
        return build(current_device(), args, tuple(sorted(kwargs.items())))
    cached.cache_clear = build.cache_clear
    _PLAN_CACHES.append(build)
    return cached


def clear_plan_caches() -> None:
    """Forget every plan built so far (they are rebuilt, with freshly looked-up kernels, on use)."""
    for cached in _PLAN_CACHES:
        cached.cache_clear()


def run_on_cupy(plan: Plan, given: dict, empty: Callable) -> dict:
    """:func:`run` on CuPy arrays: buffers from ``empty`` (a kernel module's allocator, which tests
    swap for a NaN-filled one) or ``cupy.zeros``."""
    import cupy
    return run(plan, given, empty, lambda shape, dtype: cupy.zeros(shape, dtype), cupy_address)


def replayable(planner: Callable):
    """Decorator: mark a CuPy array function as replayable from shapes; ``fn.plan`` is
    ``planner``, which returns the :class:`Plan` of a call (or None where the function would take
    another route for these shapes, e.g. a fallback: then only the array function will do)."""
    def mark(fn):
        fn.plan = planner
        return fn
    return mark
