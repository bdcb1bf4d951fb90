"""A light launch path for already-compiled Numba-CUDA kernels.

``kernel[griddim, blockdim, stream, sharedmem](*args)`` costs 50-110 us of host time per
call on an H200 (4-14 arguments; benchmarks/NOTES_attention.md). What it does each time
(numba-cuda 0.30, ``numba/cuda/dispatcher.py``):

1. ``configure`` builds (lru-cached) a ``_LaunchConfiguration`` and a cuda.core stream;
2. ``CUDADispatcher.call`` types every argument (``typeof``) to pick the compiled overload
   (``dispatcher.overloads[argument types]``, a ``_Kernel``), compiling one if needed;
3. ``_Kernel.launch`` runs ``_prepare_args`` per argument: an array goes through
   ``wrap_arg(...).to_device`` and becomes the flattened fields of Numba's array data model,
   a scalar becomes a ctypes value of its Numba type;
4. ``cuda.core.launch(stream, LaunchConfig(...), cufunc.kernel, *kernelargs)``.

:func:`launch` does step 2 once per (dispatcher, argument kinds) and keeps a *plan*: the
compiled ``_Kernel`` and one scalar converter per argument. Later calls describe each
argument with a few attribute reads (pointer, shape, strides, dtype), look the plan up, pack
the fields and call the same ``cuda.core.launch`` with a cached ``LaunchConfig`` and stream.
Scalars go as NumPy scalars of the parameter's type rather than ctypes values: the same bytes,
but cuda.core packs them ~0.6 us faster each.
Same kernel, same argument bytes, same stream: only Python bookkeeping is skipped. When the
process sees exactly one CUDA device, the loaded CUfunction is taken from Numba's per-device
cache without the current-context lookup ``get_cufunc`` makes (:func:`_loaded_function`).

Allocation (:func:`empty_flat`, :func:`empty_flats`, :func:`as_array`): a call's outputs and
scratch start as FlatViews over raw ``memalloc`` memory, several from one allocation, and only
the arrays handed back become DeviceNDArrays, once, in their final shape. With one device
visible, the current context is looked up once per thread (:func:`current_context`), and a
returned array copies the attributes of the first one Numba built for its shape
(:func:`_device_ndarray`).

An array argument of Numba's data model (``numba.core.datamodel`` ``ArrayModel``, members
``meminfo, parent, nitems, itemsize, data, shape, strides``) is passed flattened, as
``_prepare_args`` does: ``0, 0, nitems, itemsize, data pointer, *shape, *strides`` (strides in
bytes), each a pointer-sized int. The first use checks this member list against the installed
data model and turns the fast path off (with a warning) if it ever differs.

The fast path takes: Numba device arrays, :class:`FlatView` (from :func:`flat`), CuPy arrays,
torch CUDA tensors and other ``__cuda_array_interface__`` objects, and int/float/bool/NumPy
scalars for integer/float32/float64/boolean parameters. Everything else (records, tuples,
cooperative or debug kernels, kernels with argument extensions, arrays whose producer stream
Numba would have to synchronise with) goes through the normal dispatcher call, as does the
first call of every plan (it compiles). So do all calls when

- the CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``), or
- ``SPARX_REF_NUMBA_FAST_LAUNCH=0`` (or :func:`set_mode` ``("0")``).

``SPARX_REF_NUMBA_FAST_LAUNCH=verify``: the first fast launch of every plan is checked. Every
array argument is copied twice to scratch device arrays; the kernel runs once through the
dispatcher and once through the fast path on the two copies; all arrays must then be
identical (NaN equal to NaN; fine for kernels without atomics or races). A mismatch raises
RuntimeError naming the kernel and the argument.

Streams: a Numba device array or FlatView never makes Numba synchronise, on any stream.
A CuPy array or torch tensor is taken only when its library's current stream is the legacy
default stream and the launch is on it (stream 0), where stream order already holds; another
``__cuda_array_interface__`` object only when its interface names no stream, or the legacy
default (1) with a stream-0 launch. Otherwise the dispatcher call does Numba's handshake.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings

import numpy as np
from numba.core import types

__all__ = ["launch", "flat", "foreign_flat", "FlatView", "current_context", "empty_flat", "empty_flats", "as_array", "pack_args",
           "array_field_names", "set_mode", "mode", "stats"]

# Numba's ArrayModel members, in order (numba.core.datamodel / numba.cuda.models); checked
# against the installed data model before the first fast launch (_check_numba_internals).
ARRAY_MEMBERS = ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
_MODES = ("0", "1", "verify")
_mode = os.environ.get("SPARX_REF_NUMBA_FAST_LAUNCH", "1").strip().lower() or "1"
if _mode not in _MODES:
    raise ValueError(f"SPARX_REF_NUMBA_FAST_LAUNCH must be one of {_MODES}, got {_mode!r}")

_PLANS: dict = {}           # (id(dispatcher), argument kinds) -> _Plan or _UNSUPPORTED (with its reason)
_CONFIGS: dict = {}         # (griddim, blockdim, sharedmem) -> cuda.core LaunchConfig
_STATS = {"fast": 0, "dispatcher": 0, "verified": 0}
_internals = None           # numba-cuda pieces the fast path needs, once checked; False if unusable


def mode():
    """The active mode: "1" (fast path), "0" (always the dispatcher) or "verify"."""
    return _mode


def set_mode(new):
    """Switch the mode at run time ("0", "1", "verify"); returns the previous one."""
    global _mode
    new = str(new).strip().lower()
    if new not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {new!r}")
    old, _mode = _mode, new
    return old


def stats():
    """Counts of launches by path since import: {"fast", "dispatcher", "verified"}."""
    return dict(_STATS)


def _fast_enabled():
    return not SIMULATOR and _mode != "0"


# ----------------------------------------------------------------------------------------
# argument description and packing (pure Python: testable without a GPU)
# ----------------------------------------------------------------------------------------
class _Unsupported(Exception):
    """This argument (or kernel) is not for the fast path: use the dispatcher."""


def array_field_names(ndim):
    """Names of the kernel parameters one ``ndim``-D array becomes, in order."""
    return (list(ARRAY_MEMBERS[:5]) + [f"shape[{i}]" for i in range(ndim)]
            + [f"strides[{i}]" for i in range(ndim)])


def _array_fields(ptr, shape, strides, itemsize):
    """The flattened ArrayModel of one array: meminfo, parent, nitems, itemsize, data,
    *shape, *strides (bytes); pointer-sized ints, as Numba's ``_prepare_args`` passes them."""
    nitems = 1
    for s in shape:
        nitems *= s
    return [0, 0, nitems, itemsize, ptr, *shape, *strides]


def _c_strides(shape, itemsize):
    out = []
    acc = itemsize
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def _layout(shape, strides, itemsize):
    """'C' / 'F' if the memory really is C / Fortran contiguous (NumPy's rule: extents of 1
    and empty arrays don't matter), else 'A'. Broadcast (0) strides are never contiguous."""
    nitems = 1
    for s in shape:
        nitems *= s
    if nitems == 0:
        return "C"
    acc = itemsize
    c = True
    for s, st in zip(reversed(shape), reversed(strides)):
        if s != 1:
            if st != acc:
                c = False
                break
            acc *= s
    if c:
        return "C"
    acc = itemsize
    for s, st in zip(shape, strides):
        if s != 1:
            if st != acc:
                return "A"
            acc *= s
    return "F"


def _describe_parts(cls, ptr, shape, strides, dtype, readonly):
    shape = tuple(int(s) for s in shape)
    itemsize = dtype.itemsize
    strides = _c_strides(shape, itemsize) if strides is None else tuple(int(s) for s in strides)
    if len(strides) != len(shape):
        raise _Unsupported(f"strides {strides} do not match shape {shape}")
    key = (cls, dtype, len(shape), _layout(shape, strides, itemsize), bool(readonly))
    return key, _array_fields(int(ptr), shape, strides, itemsize)


def _stream_ok(producer, launch_stream):
    """May we skip Numba's synchronisation with an array's producer stream (CAI convention:
    None = nothing to wait for, 1 = legacy default, 2 = per-thread default, else a handle)?"""
    return producer is None or (producer == 1 and not launch_stream)


def _describe_numba(a, launch_stream):
    ptr = a.device_ctypes_pointer.value or 0
    return _describe_parts(type(a), ptr, a.shape, a.strides, np.dtype(a.dtype), False)


def _describe_flat(a, launch_stream):
    return a._key, a._fields


def _describe_cupy(a, launch_stream):
    import cupy
    current = cupy.cuda.get_current_stream().ptr
    if not _stream_ok(1 if current == 0 else current, launch_stream):
        raise _Unsupported("CuPy's current stream is not the legacy default stream")
    return _describe_parts(type(a), a.data.ptr, a.shape, a.strides, np.dtype(a.dtype), False)


def _describe_torch(a, launch_stream):
    import torch
    if not a.is_cuda or a.requires_grad:
        raise _Unsupported("a torch tensor must be on the GPU and not require grad")
    current = torch.cuda.current_stream(a.device).cuda_stream
    if not _stream_ok(1 if current == 0 else current, launch_stream):
        raise _Unsupported("torch's current stream is not the legacy default stream")
    dtype = np.dtype(str(a.dtype).replace("torch.", ""))
    strides = tuple(s * dtype.itemsize for s in a.stride())
    return _describe_parts(type(a), a.data_ptr(), tuple(a.shape), strides, dtype, False)


def _describe_cai(a, launch_stream):
    if hasattr(a, "__dlpack__"):
        raise _Unsupported("unknown DLPack producer: Numba would do a stream handshake")
    cai = a.__cuda_array_interface__
    if cai.get("mask") is not None:
        raise _Unsupported("masked __cuda_array_interface__")
    if not _stream_ok(cai.get("stream"), launch_stream):
        raise _Unsupported(f"__cuda_array_interface__ stream {cai.get('stream')} needs synchronisation")
    ptr, readonly = cai["data"]
    return _describe_parts(type(a), ptr or 0, cai["shape"], cai.get("strides"), np.dtype(cai["typestr"]),
                           readonly)


_SCALARS = (bool, int, float, np.bool_, np.integer, np.floating)


def _describe(a, launch_stream):
    """(key part, fields): fields is the flattened array (list) or None for a scalar.
    Raises _Unsupported for anything the fast path does not take."""
    f = _DESCRIBERS.get(type(a))
    if f is not None:
        return f(a, launch_stream)
    if isinstance(a, _SCALARS):
        _DESCRIBERS[type(a)] = _scalar
        return type(a), None
    mod = type(a).__module__
    if getattr(a, "__cuda_memory__", False) and hasattr(a, "device_ctypes_pointer"):
        f = _describe_numba
    elif mod.startswith("cupy"):
        f = _describe_cupy
    elif mod.startswith("torch"):
        f = _describe_torch
    elif hasattr(a, "__cuda_array_interface__"):
        f = _describe_cai
    else:
        raise _Unsupported(f"{type(a).__name__} is neither a device array nor a scalar")
    _DESCRIBERS[type(a)] = f
    return f(a, launch_stream)


def _scalar(a, launch_stream):
    return type(a), None


_DESCRIBERS: dict = {bool: _scalar, int: _scalar, float: _scalar}


def _is_numba_array(obj):
    """A Numba device array (not a bare MemoryPointer: both carry ``__cuda_memory__``)."""
    return getattr(obj, "__cuda_memory__", False) and hasattr(obj, "reshape")


class FlatView:
    """A flat (1-D, C-contiguous) view of a C-contiguous device array, without the cost of a
    Numba ``DeviceNDArray.reshape`` (~10 us). Holds the array it views (``owner``) so the
    memory lives as long as the view. The dispatcher path (first call of a plan, fallbacks)
    gets :meth:`as_device_array`; ``__cuda_array_interface__`` serves any other consumer."""

    __slots__ = ("owner", "ptr", "size", "dtype", "_key", "_fields")

    def __init__(self, owner, ptr, size, dtype):
        self.owner = owner
        self.ptr = int(ptr)
        self.size = int(size)
        self.dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        self._key = (FlatView, self.dtype, 1, "C", False)
        self._fields = [0, 0, self.size, self.dtype.itemsize, self.ptr, self.size, self.dtype.itemsize]

    @property
    def shape(self):
        return (self.size,)

    def as_device_array(self):
        """This view as a Numba ``DeviceNDArray`` (``owner.reshape(size)``, what Numba code passed
        before): what the dispatcher path and verify mode get, so they run as they always did."""
        if _is_numba_array(self.owner):
            return self.owner.reshape(self.size)
        return self          # raw memory or a foreign array: Numba takes the view through __cuda_array_interface__

    @property
    def __cuda_array_interface__(self):
        return {"shape": (self.size,), "strides": None, "data": (self.ptr, False),
                "typestr": self.dtype.str, "version": 3}

    def __repr__(self):
        return f"FlatView(size={self.size}, dtype={self.dtype}, ptr={self.ptr:#x})"


_DESCRIBERS[FlatView] = _describe_flat


# ----------------------------------------------------------------------------------------
# allocation without DeviceNDArray bookkeeping
# ----------------------------------------------------------------------------------------
# ``cuda.device_array`` resolves the current context twice (``require_context`` and the array's
# own ``memalloc``) and builds a DeviceNDArray; a ``reshape`` builds another. With kernels of a
# few tens of microseconds (the scan at L = 49, DMCA) that host work, ~10 us a context
# resolution, is the call's time. Outputs and scratch therefore start as FlatViews over a raw
# ``memalloc`` (one context resolution), and only the arrays handed back become DeviceNDArrays,
# once, in their final shape (:func:`as_array`).
_ALIGN = 256       # bytes: every piece of a shared allocation starts 16-byte (vector load) aligned


_THREAD = threading.local()     # per thread: the Numba context found last (see current_context)
_ONE_DEVICE = None              # True once known that the process sees exactly one CUDA device


def _one_device():
    """True when the process sees exactly one CUDA device (asked once)."""
    global _ONE_DEVICE
    if _ONE_DEVICE is None:
        from numba import cuda
        _ONE_DEVICE = len(cuda.gpus) == 1
    return _ONE_DEVICE


def current_context():
    """``numba.cuda.current_context()``, which asks the driver for the current context each time
    (~10 us). With exactly one device visible, the answer is kept per thread and reused while it
    is still its device's primary context (``cuda.close()`` / a device reset drops it: the next
    call asks again). Numba only ever uses primary contexts, so on one device it cannot change
    otherwise."""
    ctx = getattr(_THREAD, "context", None)
    if ctx is not None and ctx.device.primary_context is ctx:
        return ctx
    from numba import cuda
    ctx = cuda.current_context()
    _THREAD.context = ctx if _one_device() else None
    return ctx


def empty_flat(n, dtype=np.float32):
    """A :class:`FlatView` over ``n`` fresh elements of ``dtype`` (fast path); a Numba device
    array of shape ``(n,)`` when the fast path is off, as before."""
    from numba import cuda
    dtype = np.dtype(dtype)
    n = int(n)
    if not _fast_enabled() or n == 0:
        return cuda.device_array(n, dtype)
    mem = current_context().memalloc(n * dtype.itemsize)
    return FlatView(mem, mem.device_pointer_value or 0, n, dtype)


def empty_flats(sizes, dtype=np.float32):
    """FlatViews of ``sizes`` elements, all carved from ONE allocation (each piece 256-byte
    aligned): scratch buffers of one call for the price of one allocation. Fast path off:
    one device array each."""
    from numba import cuda
    dtype = np.dtype(dtype)
    sizes = [int(n) for n in sizes]
    if not _fast_enabled():
        return [cuda.device_array(n, dtype) for n in sizes]
    step = _ALIGN // dtype.itemsize
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += (n + step - 1) // step * step
    mem = current_context().memalloc(max(total, 1) * dtype.itemsize)
    base = mem.device_pointer_value or 0
    return [FlatView(mem, base + off * dtype.itemsize, n, dtype) for off, n in zip(offsets, sizes)]


def as_array(x, shape):
    """The device array ``x`` (a FlatView of :func:`empty_flat` / :func:`empty_flats`, or any
    Numba device array) as a C-contiguous Numba DeviceNDArray of ``shape`` (same elements; a
    piece of a shared allocation keeps the whole allocation alive)."""
    shape = tuple(int(s) for s in shape)
    if isinstance(x, FlatView):
        owner = x.owner
        if _is_numba_array(owner):                           # a flat() of a Numba array
            return owner.reshape(shape)
        if math.prod(shape) != x.size:
            raise ValueError(f"as_array: {x!r} has {x.size} elements, not the {math.prod(shape)} of shape {shape}")
        start = x.ptr - (owner.device_pointer_value or 0)
        nbytes = x.size * x.dtype.itemsize
        if start < 0 or start + nbytes > owner.size:
            raise ValueError(f"as_array: {x!r} lies outside its allocation")
        mem = owner if start == 0 and nbytes == owner.size else _piece(owner, x.ptr, nbytes)
        return _device_ndarray(shape, x.dtype, mem)
    return x if tuple(x.shape) == shape else x.reshape(shape)


def _numba_classes():
    """(MemoryPointer, DeviceNDArray), imported once (an import statement costs ~1 us a call)."""
    global _CLASSES
    if _CLASSES is None:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.cudadrv.driver import MemoryPointer
        _CLASSES = (MemoryPointer, DeviceNDArray)
    return _CLASSES


_CLASSES = None


def _piece(owner, ptr, nbytes):
    """``nbytes`` of the allocation ``owner`` from device address ``ptr``, as a MemoryPointer
    that holds ``owner`` (so the allocation lives while the piece does). What ``owner.view``
    returns, without its OwnedPointer / weakref proxy wrapping (~3 us)."""
    return _numba_classes()[0](owner.context, ctypes.c_void_p(ptr), nbytes, owner=owner)


_TEMPLATES: dict = {}       # (shape, dtype) -> attributes of a C-contiguous DeviceNDArray but gpu_data


def _device_ndarray(shape, dtype, gpu_data):
    """Numba's C-contiguous DeviceNDArray of ``shape`` around existing memory (no allocation, no
    context lookup). The first array of each (shape, dtype) is built by Numba's constructor and
    its attributes other than ``gpu_data`` (shape, strides, size, the index helper ``_dummy``,
    never modified after construction) are kept; later ones copy them (~0.3 us instead of ~2-10 us)."""
    DeviceNDArray = _numba_classes()[1]
    key = (shape, dtype)
    template = _TEMPLATES.get(key)
    if template is None:
        arr = DeviceNDArray(shape, _c_strides(shape, dtype.itemsize), dtype, gpu_data=gpu_data)
        if len(_TEMPLATES) > 4096:
            _TEMPLATES.clear()
        _TEMPLATES[key] = {k: v for k, v in vars(arr).items() if k != "gpu_data"}
        return arr
    arr = DeviceNDArray.__new__(DeviceNDArray)
    arr.__dict__.update(template)
    arr.gpu_data = gpu_data
    return arr


def flat(x):
    """A 1-D view of the C-contiguous device array ``x`` for a kernel argument.

    Fast path on: a :class:`FlatView` (no Numba array is built). Off (simulator,
    ``SPARX_REF_NUMBA_FAST_LAUNCH=0``): ``x.reshape(x.size)``, exactly what Numba code did
    before. ``x`` is a Numba device array, or anything ``numba.cuda.as_cuda_array`` takes."""
    if not _fast_enabled():
        return x.reshape(math.prod(x.shape))
    if isinstance(x, FlatView):
        return x
    if not getattr(x, "__cuda_memory__", False):
        view = foreign_flat(x)
        if view is not None:
            return view
        from numba import cuda
        x = cuda.as_cuda_array(x)
    if not x.is_c_contiguous():
        raise ValueError(f"flat() needs a C-contiguous array, got shape {tuple(x.shape)} strides {tuple(x.strides)}")
    return FlatView(x, x.device_ctypes_pointer.value or 0, x.size, x.dtype)


def foreign_flat(x, launch_stream=0):
    """A :class:`FlatView` of the C-contiguous foreign device array ``x`` (CuPy, torch, another
    ``__cuda_array_interface__`` object), built from its pointer, shape and strides alone; or
    None, and the caller takes ``numba.cuda.as_cuda_array`` instead.

    Why: ``as_cuda_array`` builds a DeviceNDArray and looks the context up, and when the
    interface names a stream it *synchronises* that stream. CuPy names the legacy default stream
    (1), so each import waits until the GPU has finished all queued work: host and GPU no longer
    overlap, and a call costs its kernels' time plus its Python's. Skipping that wait is safe
    exactly when the kernels reading ``x`` are launched on the legacy default stream after the
    producer's work on that stream (stream order), the rule the launch's describers apply
    (:func:`_stream_ok`).

    None when that rule does not hold (another current stream, a masked interface, a torch
    tensor that requires grad), when ``x`` is not C-contiguous (``as_cuda_array`` then gives the
    usual error), or when the fast path is off (simulator, ``SPARX_REF_NUMBA_FAST_LAUNCH=0``)."""
    if not _fast_enabled() or getattr(x, "__cuda_memory__", False):
        return None
    try:
        (_, dtype, _, layout, _), fields = _describe(x, launch_stream)
    except _Unsupported:
        return None
    if fields is None or layout != "C":
        return None
    nitems, _, ptr = fields[2:5]
    return FlatView(x, ptr, nitems, dtype)


def _scalar_converter(ty):
    """The NumPy scalar type that carries a scalar parameter of Numba type ``ty``, or None.

    Numba's ``_prepare_args`` passes ctypes values (``c_int64(v)``, ``c_float(v)``, bool as is);
    cuda.core's argument packer writes a NumPy scalar with the same bytes (its dtype's width) but
    takes ~8 us less per 14 arguments than it takes for ctypes values. The tests compare the
    packed bytes of both."""
    if isinstance(ty, (types.Boolean, types.Integer)) or ty in (types.float32, types.float64):
        return np.dtype(str(ty)).type
    return None


def _describe_expected(ty):
    return f"a {ty.dtype} array ({ty.ndim}-D, layout '{ty.layout}')"


def _check_array(i, ty, key, a):
    """Raise a clear error unless the described array fits the compiled array type ``ty``."""
    from numba.np.numpy_support import as_dtype
    _, dtype, ndim, layout, _ = key
    got = f"{dtype} array of shape {tuple(getattr(a, 'shape', ()))} ({ndim}-D, layout '{layout}')"
    if as_dtype(ty.dtype) != dtype:
        raise TypeError(f"argument {i}: the kernel was compiled for {_describe_expected(ty)}, got a {got}")
    if ty.ndim != ndim:
        raise ValueError(f"argument {i}: the kernel was compiled for {_describe_expected(ty)}, got a {got}")
    if ty.layout != "A" and ty.layout != layout:
        raise ValueError(f"argument {i}: the kernel was compiled for {_describe_expected(ty)} and would ignore "
                         f"the strides of a {got}; pass a {'C' if ty.layout == 'C' else 'Fortran'}-contiguous array")


def pack_args(argtypes, args, launch_stream=0):
    """Check ``args`` against a compiled signature ``argtypes`` (Numba types) and flatten them
    into the parameter list ``cuda.core.launch`` takes: what Numba's ``_prepare_args`` builds.

    Raises TypeError (wrong dtype, array for scalar or scalar for array, unsupported type) or
    ValueError (wrong number of dimensions or arguments, non-contiguous array for a 'C'/'F'
    parameter), naming the argument's position, the expected and the received."""
    if len(argtypes) != len(args):
        raise ValueError(f"the kernel takes {len(argtypes)} arguments, got {len(args)}")
    out = []
    for i, (ty, a) in enumerate(zip(argtypes, args)):
        if isinstance(ty, types.Array):
            try:
                key, fields = _describe(a, launch_stream)
            except _Unsupported as e:
                raise TypeError(f"argument {i}: expected {_describe_expected(ty)}, got {type(a).__name__} ({e})")
            if fields is None:
                raise TypeError(f"argument {i}: expected {_describe_expected(ty)}, got the scalar {a!r}")
            _check_array(i, ty, key, a)
            out += fields
            continue
        conv = _scalar_converter(ty)
        if conv is None:
            raise TypeError(f"argument {i}: parameters of type {ty} are not supported by the fast path")
        if not isinstance(a, _SCALARS):
            raise TypeError(f"argument {i}: expected a {ty} scalar, got {type(a).__name__}")
        if isinstance(ty, types.Integer) and not isinstance(a, (bool, int, np.bool_, np.integer)):
            raise TypeError(f"argument {i}: expected a {ty} scalar, got {a!r} ({type(a).__name__})")
        out.append(a if type(a) is conv else conv(a))
    return out


# ----------------------------------------------------------------------------------------
# numba-cuda internals (real driver only)
# ----------------------------------------------------------------------------------------
def _check_numba_internals():
    """The numba-cuda pieces the fast path relies on, checked once; None if unusable."""
    global _internals
    if _internals is not None:
        return _internals or None
    try:
        from numba.cuda import dispatcher as nd
        from numba.cuda.cudadrv import driver
        from numba.cuda.descriptor import cuda_target
        from numba.cuda.errors import normalize_kernel_dimensions
        ctx = cuda_target.target_context
        for ndim in (1, 3):
            ty = types.Array(types.float32, ndim, "C")
            model = ctx.data_model_manager[ty]
            flat_params = ctx.get_arg_packer([ty]).argument_types
            if tuple(model._fields) != ARRAY_MEMBERS or len(flat_params) != len(array_field_names(ndim)):
                raise RuntimeError(f"Numba's array data model is {model._fields} ({len(flat_params)} parameters)")
        for name in ("launch", "LaunchConfig", "CUDA_CORE_GE_1_0", "_Kernel"):
            if not hasattr(nd, name):
                raise RuntimeError(f"numba.cuda.dispatcher has no {name}")
        if not hasattr(driver, "_to_core_stream"):
            raise RuntimeError("numba.cuda.cudadrv.driver has no _to_core_stream")
        _internals = dict(launch=nd.launch, LaunchConfig=nd.LaunchConfig, ge_1_0=nd.CUDA_CORE_GE_1_0,
                          Kernel=nd._Kernel, to_core_stream=driver._to_core_stream,
                          normalize=normalize_kernel_dimensions, default_stream=None)
    except Exception as e:  # noqa: BLE001 - any surprise means: stay on the dispatcher path
        warnings.warn(f"sparx_ref fast Numba launch disabled, using the dispatcher: {e}", RuntimeWarning)
        _internals = False
        return None
    return _internals


class _Plan:
    __slots__ = ("dispatcher", "kernel", "converters", "verified")

    def __init__(self, dispatcher, kernel, converters):
        self.dispatcher = dispatcher      # keeps id(dispatcher) in the key unique
        self.kernel = kernel              # numba's _Kernel: its code library gives the CUfunction
        self.converters = converters      # per argument: None (array, or a scalar passed as is) or a NumPy type
        self.verified = False


class _UnsupportedPlan:
    __slots__ = ("dispatcher", "reason")

    def __init__(self, dispatcher, reason):
        self.dispatcher = dispatcher
        self.reason = reason


def _build_plan(dispatcher, args, seen, descs, launch_stream):
    """After a dispatcher call (which saw ``seen``, i.e. ``args`` with FlatViews as Numba views):
    the overload it compiled for them and how to pack ``args``-like arguments for it."""
    it = _check_numba_internals()
    if it is None:
        return _UnsupportedPlan(dispatcher, "numba-cuda internals not as expected")
    if getattr(dispatcher, "_launch_config_sensitive", False):
        return _UnsupportedPlan(dispatcher, "launch-config sensitive kernel")
    argtypes = tuple(dispatcher.typeof_pyval(a) for a in seen)
    kernel = dispatcher.overloads.get(argtypes)
    if not isinstance(kernel, it["Kernel"]):
        return _UnsupportedPlan(dispatcher, f"no overload compiled for exactly {argtypes}")
    if any(getattr(kernel, name, True) for name in ("debug", "cooperative", "extensions", "launch_config_sensitive")):
        return _UnsupportedPlan(dispatcher, "debug, cooperative, extension or launch-config-sensitive kernel")
    if tuple(kernel.argument_types) != argtypes:
        return _UnsupportedPlan(dispatcher, "overload's argument types differ from its key")
    converters = []
    for i, (ty, (key, fields)) in enumerate(zip(argtypes, descs)):
        if isinstance(ty, types.Array):
            if fields is None:
                return _UnsupportedPlan(dispatcher, f"argument {i} typed {ty} but described as a scalar")
            try:
                _check_array(i, ty, key, args[i])
            except (TypeError, ValueError) as e:
                return _UnsupportedPlan(dispatcher, str(e))
            converters.append(None)
        else:
            conv = _scalar_converter(ty)
            if conv is None or fields is not None:
                return _UnsupportedPlan(dispatcher, f"argument {i} of type {ty}")
            converters.append(None if type(args[i]) is conv else conv)   # the key fixes type(args[i])
    try:
        pack_args(argtypes, args, launch_stream)  # one full check of the packer on real arguments
    except (TypeError, ValueError) as e:
        return _UnsupportedPlan(dispatcher, str(e))
    return _Plan(dispatcher, kernel, converters)


def _config(griddim, blockdim, sharedmem, it):
    key = (griddim, blockdim, sharedmem)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        grid, block = it["normalize"](griddim, blockdim)
        if it["ge_1_0"]:
            cfg = it["LaunchConfig"](grid=grid, block=block, shmem_size=sharedmem, is_cooperative=False)
        else:
            cfg = it["LaunchConfig"](grid=grid, block=block, shmem_size=sharedmem, cooperative_launch=False)
        if len(_CONFIGS) > 4096:
            _CONFIGS.clear()
        _CONFIGS[key] = cfg
    return cfg


def _loaded_function(library):
    """The kernel's loaded CUfunction for the current device, as _Kernel.launch gets it
    (``get_cufunc``, which looks the current context up: ~10 us a launch). With exactly one
    device visible and the function already loaded (Numba keeps it per device id in
    ``_cufunc_cache``), that one entry is the answer and the lookup is skipped."""
    loaded = getattr(library, "_cufunc_cache", None)
    if loaded is not None and len(loaded) == 1 and _one_device():
        return next(iter(loaded.values()))
    return library.get_cufunc()


def _fast_launch(plan, descs, args, griddim, blockdim, stream, sharedmem):
    it = _internals
    kargs = []
    for conv, a, (_, fields) in zip(plan.converters, args, descs):
        if fields is not None:
            kargs += fields
        elif conv is None:
            kargs.append(a)
        else:
            kargs.append(conv(a))
    if not stream:
        core_stream = it["default_stream"]
        if core_stream is None:                         # the legacy default stream, as numba builds it
            core_stream = it["default_stream"] = it["to_core_stream"](0)
    else:
        core_stream = it["to_core_stream"](stream)
    cufunc = _loaded_function(plan.kernel._codelibrary)
    it["launch"](core_stream, _config(griddim, blockdim, sharedmem, it), cufunc.kernel, *kargs)


def _dispatch(kernel, griddim, blockdim, args, stream, sharedmem):
    """Numba's own call; FlatViews become the DeviceNDArray views Numba code always passed.
    Returns the arguments the dispatcher saw."""
    _STATS["dispatcher"] += 1
    args = [a.as_device_array() if type(a) is FlatView else a for a in args]
    kernel[griddim, blockdim, stream, sharedmem](*args)
    return args


def launch(kernel, griddim, blockdim, *args, stream=0, sharedmem=0, deterministic=True):
    """``kernel[griddim, blockdim, stream, sharedmem](*args)``, with less host work.

    ``kernel`` is a ``@cuda.jit`` dispatcher. The first call with given argument kinds (array
    class, dtype, rank, layout; scalar types) goes through the dispatcher (it compiles);
    later ones launch the same compiled kernel directly. See the module docstring for
    what falls back and for the ``verify`` mode. ``deterministic=False`` marks a kernel whose
    results may differ in their low bits from run to run (float atomics): the ``verify`` mode
    cannot compare two runs of it bit for bit and skips it."""
    if not _fast_enabled():
        return _dispatch(kernel, griddim, blockdim, args, stream, sharedmem)
    try:
        descs = []
        known = _DESCRIBERS.get                      # inlined first step of _describe: the common case
        for a in args:
            f = known(type(a))
            descs.append(f(a, stream) if f is not None else _describe(a, stream))
    except _Unsupported:
        return _dispatch(kernel, griddim, blockdim, args, stream, sharedmem)
    key = (id(kernel), tuple(d[0] for d in descs))
    plan = _PLANS.get(key)
    if plan is None or plan.dispatcher is not kernel:
        seen = _dispatch(kernel, griddim, blockdim, args, stream, sharedmem)
        _PLANS[key] = _build_plan(kernel, args, seen, descs, stream)
        return None
    if type(plan) is _UnsupportedPlan:
        return _dispatch(kernel, griddim, blockdim, args, stream, sharedmem)
    if _mode == "verify" and not plan.verified and deterministic:
        _verify(plan, griddim, blockdim, args, descs, stream, sharedmem)
    _fast_launch(plan, descs, args, griddim, blockdim, stream, sharedmem)
    _STATS["fast"] += 1
    return None


# ----------------------------------------------------------------------------------------
# verify mode
# ----------------------------------------------------------------------------------------
def _verify(plan, griddim, blockdim, args, descs, stream, sharedmem):
    """Run the kernel both ways on two scratch copies of every array argument; compare."""
    from numba import cuda
    plan.verified = True
    if any(fields is not None and key[3] != "C" for key, fields in descs):
        warnings.warn(f"{plan.dispatcher.__name__}: verify mode checks C-contiguous arguments only; skipped",
                      RuntimeWarning)
        return
    cuda.synchronize()
    hosts = {}                          # (nitems, itemsize, pointer, shape, strides) -> host copy
    for a, (_, fields) in zip(args, descs):        # the same view passed twice shares one copy
        if fields is not None and tuple(fields[2:]) not in hosts:
            dev = a.as_device_array() if type(a) is FlatView else a
            if not getattr(dev, "__cuda_memory__", False):
                dev = cuda.as_cuda_array(dev)
            hosts[tuple(fields[2:])] = dev.copy_to_host()
    scratch = []
    for _ in range(2):
        copies = {v: cuda.to_device(h) for v, h in hosts.items()}
        scratch.append((copies, [copies[tuple(f[2:])] if f is not None else a for a, (_, f) in zip(args, descs)]))
    (ref_copies, ref_args), (got_copies, got_args) = scratch
    plan.dispatcher[griddim, blockdim, stream, sharedmem](*ref_args)
    got_descs = [(key, _describe(g, stream)[1] if f is not None else None)
                 for g, (key, f) in zip(got_args, descs)]
    _fast_launch(plan, got_descs, got_args, griddim, blockdim, stream, sharedmem)
    cuda.synchronize()
    for i, (_, f) in enumerate(descs):
        if f is None:
            continue
        ref = ref_copies[tuple(f[2:])].copy_to_host()
        got = got_copies[tuple(f[2:])].copy_to_host()
        if not np.array_equal(ref, got, equal_nan=ref.dtype.kind in "fc"):
            raise RuntimeError(f"fast launch of {plan.dispatcher.__name__} differs from the dispatcher's in "
                               f"argument {i} (dtype {ref.dtype}, shape {ref.shape}); run with "
                               "SPARX_REF_NUMBA_FAST_LAUNCH=0 and report")
    _STATS["verified"] += 1
