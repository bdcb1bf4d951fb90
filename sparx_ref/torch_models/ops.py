"""The op dispatch layer of the PyTorch twins: every hot op on any kernel backend.

Each hot operation of the twins has one entry point here, ``op(..., backend=...)``:

==================  =====================================================  ==========================
op                  shapes                                                 kernels (registry names)
==================  =====================================================  ==========================
selective_scan      u, delta (b, KD, L); A (KD, N); B, C (b, K, N, L);     selective_scan_fwd / _bwd
                    D, delta_bias (KD,) -> y (b, KD, L)
cross_scan          x (B, C, H, W) -> (B, 4, C, H*W)                       cross_scan (bwd: cross_merge)
cross_merge         ys (B, 4, C, H*W), H, W -> (B, C, H, W)                cross_merge (bwd: cross_scan)
ss2d_scan           x (b, Di, H, W); delta (b, 4Di, HW); B, C (b, 4, N,    ss2d_scan_fwd / _bwd
                    HW) -> y (b, Di, H, W) (fused cross-scan+scan+merge)
window_attention    q, k, v (Bw, heads, N, hd); bias (heads, N, N); mask   window_attention_fwd / _bwd
                    (nW, N, N) or None -> (out, probs)
dmca_attention      q, k (B, C, Ls); v (B, C, L); groups -> (out, attn)    dmca_attention_fwd / _bwd
depthwise_conv2d    x (B, C, H, W); weight (C, 1, kh, kw), kh, kw odd;     depthwise_conv2d_fwd / _bwd
                    bias (C,) or None -> (B, C, H, W) (stride 1, "same");
                    residual=True: x + that, fused in the CuPy kernels
group_norm          x (B, C, *spatial); weight, bias (C,) or None;          group_norm_fwd / _bwd
                    num_groups, eps -> x.shape
==================  =====================================================  ==========================

``backend="torch"`` is plain PyTorch (differentiated by autograd; the scan is a Python loop
over L, the baseline the kernels are measured against). Any other backend
(``"numba_cpu"``, ``"numba_cuda"``, ``"cupy"``) runs the kernel registered in
:mod:`sparx_ref.kernels` inside a ``torch.autograd.Function`` whose backward is the
kernel's own backward. Tensors cross over without a copy:

- ``numba_cpu``: CPU tensors as NumPy views (``tensor.numpy()``), results back through
  ``torch.from_numpy``.
- ``numba_cuda``: CUDA tensors as numba device arrays (``numba.cuda.as_cuda_array``, the
  ``__cuda_array_interface__``), results back through ``torch.as_tensor``. Numba launches on
  the legacy default stream; when PyTorch's current stream is another one the two streams
  are ordered with events (``wait_stream``), no host synchronisation. Numba's allocations
  are routed to PyTorch's caching allocator (an EMM plugin, see
  :func:`share_torch_memory_with_numba`), so no ``cudaMalloc``/``cudaFree`` per call and
  ``torch.cuda.max_memory_allocated`` counts them. Under the CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1``) CPU tensors are accepted and copied to the simulator's
  arrays: that is how the Functions are tested without a GPU (tiny shapes only).
- ``cupy``: CUDA tensors as CuPy views of their memory (``cupy.cuda.UnownedMemory`` owning a
  reference to the tensor); the kernels run on PyTorch's current stream
  (``cupy.cuda.Stream.from_external``) and allocate from PyTorch's caching allocator
  (``cupy.cuda.using_allocator``, scoped to the call: each allocation is a uint8 tensor), so
  results come back as typed views of those tensors. Both sides being on one stream, this skips
  DLPack's per-exchange stream handshake (tens of microseconds of host time per tensor); DLPack
  (``cupy.from_dlpack`` / ``torch.from_dlpack``) remains the fallback for anything else.
  Kernels whose CuPy wrapper carries a launch plan (``fn.plan``, see
  :mod:`sparx_ref.kernels.cupy._plan`: the depthwise convolution, the 2-D scan, DMCA, the
  cross-scan/merge, group normalisation) skip the CuPy arrays altogether: the ``Planned*`` Functions below replay the
  plan's launches with ``torch.empty`` buffers and ``data_ptr()`` arguments on PyTorch's current
  stream, a few tens of microseconds of host time a call instead of hundreds. They launch through
  the CUDA driver's ``cuLaunchKernel`` with each launch's arguments packed in C storage once
  (:class:`sparx_ref.kernels.cupy._plan.DriverLaunches`), or through CuPy's kernel objects where
  the driver library cannot be loaded or the tensors are on another device than the current one.

Inputs may be non-contiguous (they are made contiguous first, a no-op when they already
are); all floating inputs must share one dtype (float32 or float64; a kernel may support
fewer) and one device. A backend whose runtime is missing raises
:class:`sparx_ref.kernels.KernelUnavailable` naming it; tensors on the wrong device raise
``ValueError``; bad dtypes ``TypeError``.

An op with no kernel registered for a backend (window and DMCA attention have no
``numba_cpu`` kernels; group normalisation has CuPy kernels only) runs its plain-torch form on that backend; :func:`describe` says, per
op, which kernel (and version) or "torch" a backend uses.

Models choose the backend once: ``sparx_ref.torch_models.build_model(name,
kernel_backend=...)``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels as _kernels
from .._validate import check_shape
from ..kernels import KernelUnavailable
from .common import (channel_attention_torch, cross_merge_torch, cross_scan_torch,
                     selective_scan_torch)

BACKENDS = ("torch",) + tuple(_kernels.BACKENDS)

# op name here -> (forward kernel, backward kernel) in the registry
KERNEL_OPS = {
    "selective_scan": ("selective_scan_fwd", "selective_scan_bwd"),
    "cross_scan": ("cross_scan", "cross_merge"),
    "cross_merge": ("cross_merge", "cross_scan"),
    "ss2d_scan": ("ss2d_scan_fwd", "ss2d_scan_bwd"),
    "window_attention": ("window_attention_fwd", "window_attention_bwd"),
    "dmca_attention": ("dmca_attention_fwd", "dmca_attention_bwd"),
    "depthwise_conv2d": ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd"),
    "group_norm": ("group_norm_fwd", "group_norm_bwd"),
}

_DEVICE_TYPE = {"numba_cpu": "cpu", "numba_cuda": "cuda", "cupy": "cuda"}


# =========================================================================================
# plain-torch forms (kernel_backend="torch"); scan / cross-scan / merge live in .common
# =========================================================================================
def ss2d_scan_torch(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """cross_merge(selective_scan(cross_scan(x) as (b, 4*Di, L), ...), H, W): (b, Di, H, W)."""
    b, Di, H, W = x.shape
    xs = cross_scan_torch(x).reshape(b, 4 * Di, H * W)
    ys = selective_scan_torch(xs, delta, A, B, C, D, delta_bias, delta_softplus)
    return cross_merge_torch(ys.reshape(b, 4, Di, H * W), H, W)


def window_attention_torch(q, k, v, bias, mask=None, scale=None, attn_drop=None):
    """Swin's attention core, the released arithmetic (q scaled first, then q k^T).

    q, k, v: (Bw, heads, N, hd), Bw = B*nW batch-major; bias (heads, N, N); mask (nW, N, N)
    added to window b*nW + w as mask[w]. Returns (out (Bw, heads, N, hd), probs
    (Bw, heads, N, N)). ``attn_drop`` (a Dropout module or None) acts on probs before ``@ v``.
    """
    Bw, heads, N, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)                       # (Bw, heads, N, N)
    logits = logits + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        logits = logits.view(Bw // nW, nW, heads, N, N) + mask[None, :, None]
        logits = logits.view(Bw, heads, N, N)
    probs = logits.softmax(dim=-1)
    dropped = probs if attn_drop is None else attn_drop(probs)
    return dropped @ v, probs


def depthwise_conv2d_torch(x, weight, bias=None):
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)``: (B, C, H, W)."""
    kh, kw = weight.shape[2:]
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def group_norm_torch(x, weight, bias, num_groups, eps=1e-5):
    """``F.group_norm(x, num_groups, weight, bias, eps)``: x.shape."""
    return F.group_norm(x, num_groups, weight, bias, eps)


def dmca_attention_torch(q, k, v, groups=4):
    """DMCA channel attention: q, k (B, C, Ls); v (B, C, L) -> (out (B, C, L),
    attn (B, groups, g, g)); per image and group softmax(q_g k_g^T / sqrt(Ls)) v_g."""
    B, C, Ls = q.shape
    g = C // groups
    out, attn = channel_attention_torch(q.reshape(B * groups, g, Ls), k.reshape(B * groups, g, Ls),
                                        v.reshape(B * groups, g, v.shape[-1]))
    return out.reshape(B, C, v.shape[-1]), attn.reshape(B, groups, g, g)


_TORCH_FORMS = {
    "selective_scan": selective_scan_torch,
    "cross_scan": cross_scan_torch,
    "cross_merge": cross_merge_torch,
    "ss2d_scan": ss2d_scan_torch,
    "window_attention": window_attention_torch,
    "dmca_attention": dmca_attention_torch,
    "group_norm": group_norm_torch,
}


# =========================================================================================
# backend plumbing: checks, conversions, streams, memory
# =========================================================================================
def check_backend(backend: str) -> str:
    """Return ``backend`` if it is a known name, else raise ValueError listing them."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# Lookups are cached (a model calls these hundreds of times a step, and a runtime probe such
# as cupy.is_available() can cost ~0.5 ms); each entry remembers the registry it came from.
_CACHE: dict = {}


def _cached(key, compute):
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is _kernels:
        return hit[1]
    value = compute()
    _CACHE[key] = (_kernels, value)
    return value


def uses_kernel(op: str, backend: str) -> bool:
    """True if ``op`` runs a registered kernel on ``backend`` (False: its torch form)."""
    check_backend(backend)
    if backend == "torch":
        return False

    def compute():
        fwd, bwd = KERNEL_OPS[op]
        have = _kernels.registered()
        return (fwd, backend) in have and (bwd, backend) in have
    return _cached(("uses", op, backend), compute)


def describe(backend: str) -> dict:
    """{op: "torch" | "<kernel> (<version>)"} for every op on ``backend`` (no runtime needed)."""
    out = {}
    for op, (fwd, _) in KERNEL_OPS.items():
        if uses_kernel(op, backend):
            version = next(e.version for e in _kernels.entries(fwd, backend) if e.default)
            out[op] = f"{fwd} ({version})"
        else:
            out[op] = "torch"
    return out


def _cudasim() -> bool:
    """True when Numba's CUDA simulator is on (decided by the environment before import)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _kernel(op: str, backend: str, which: int):
    """The registered kernel (0 forward, 1 backward) with a clear error if unusable here."""
    name = KERNEL_OPS[op][which]

    def compute():
        try:
            return _kernels.get(name, backend)
        except KernelUnavailable as err:
            raise KernelUnavailable(f"{op} with kernel_backend={backend!r}: {err}") from None
    return _cached(("get", name, backend), compute)


def _check_tensors(op: str, backend: str, named: dict) -> torch.device:
    """Every tensor a float32/float64 torch.Tensor of one dtype, on one device that the
    backend can reach. Returns that device. A missing runtime is reported first."""
    _kernel(op, backend, 0)
    items = [(n, t) for n, t in named.items() if t is not None]
    for n, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {n} must be a torch.Tensor, got {type(t).__name__}")
    name0, t0 = items[0]
    if t0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name0} must be float32 or float64, got {t0.dtype}")
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {n} has dtype {t.dtype} but {name0} has {t0.dtype}; "
                            f"all inputs must share one dtype")
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {name0} is on {t0.device}; "
                             f"all inputs must be on one device")
    want = _DEVICE_TYPE[backend]
    got = t0.device.type
    if got != want and not (backend == "numba_cuda" and got == "cpu" and _cudasim()):
        hint = ("move the model and inputs with .cuda()" if want == "cuda"
                else "move the model and inputs with .cpu(), or use a GPU backend")
        raise ValueError(f"{op}: kernel_backend={backend!r} needs {want.upper()} tensors, got "
                         f"{name0} on {t0.device} ({hint})")
    return t0.device


class _Runtime:
    """Moves tensors to a backend's arrays and back, and sets up the launch (stream,
    device, allocator). One instance per call; stored on the autograd ctx for backward."""

    def __init__(self, backend: str, device: torch.device):
        self.backend = backend
        self.device = device
        self.simulated = backend == "numba_cuda" and device.type == "cpu"

    # -- tensors -> kernel arrays ------------------------------------------------------
    def wrap(self, t):
        if t is None:
            return None
        t = t.detach().contiguous()
        if self.backend == "numba_cpu":
            return t.numpy()
        if self.backend == "numba_cuda":
            from numba import cuda
            if self.simulated:
                return cuda.to_device(t.numpy())
            return cuda.as_cuda_array(t)
        return _torch_to_cupy(t, self.device.index)

    # -- kernel arrays -> tensors ------------------------------------------------------
    def unwrap(self, a):
        if a is None:
            return None
        if isinstance(a, torch.Tensor):
            return a
        if self.backend == "numba_cpu":
            a = np.asarray(a)
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            return torch.from_numpy(a)
        if self.simulated:
            return torch.from_numpy(np.ascontiguousarray(a.copy_to_host()))
        if type(a).__module__.startswith("cupy"):
            return _cupy_to_torch(a)
        return torch.as_tensor(a, device=self.device)

    # -- the launch context -------------------------------------------------------------
    @contextlib.contextmanager
    def launch(self):
        if self.backend == "numba_cpu" or self.simulated:
            yield
            return
        if self.backend == "cupy":
            # only the contexts that change something: each costs microseconds, and a training
            # step of SparX-Mamba-T makes ~170 of these calls
            import cupy
            index = self.device.index
            with (torch.cuda.device(index) if torch.cuda.current_device() != index else _NO_CONTEXT), \
                    (cupy.cuda.Device(index) if cupy.cuda.runtime.getDevice() != index else _NO_CONTEXT), \
                    _cupy_stream(index), _cupy_torch_allocator():
                yield
            return
        with torch.cuda.device(self.device):
            # numba_cuda: kernels go to the legacy default stream
            share_torch_memory_with_numba()
            current = torch.cuda.current_stream()
            default = torch.cuda.default_stream()
            if current == default:
                yield
            else:
                default.wait_stream(current)
                yield
                current.wait_stream(default)


_CUPY_STREAMS: dict = {}
_NO_CONTEXT = contextlib.nullcontext()
# cudaStream_t of PyTorch's current stream on a device: the private accessor PyTorch's own
# kernels use (microseconds cheaper than torch.cuda.current_stream), the public API otherwise.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream_ptr(index: int) -> int:
    """cudaStream_t (as an int; 0 = the legacy default stream) of PyTorch's current stream."""
    if _RAW_STREAM is not None:
        return int(_RAW_STREAM(index))
    return torch.cuda.current_stream(index).cuda_stream


def _cupy_stream(index: int):
    """PyTorch's current stream on device ``index`` as CuPy's current stream (the legacy
    default stream, ptr 0, is CuPy's default too: nothing to do)."""
    ptr = _current_stream_ptr(index)
    if not ptr:
        return _NO_CONTEXT
    stream = _CUPY_STREAMS.get(ptr)
    if stream is None:
        import cupy
        current = torch.cuda.current_stream(index)
        try:
            stream = cupy.cuda.Stream.from_external(current)   # CuPy >= 14: the stream protocol
        except Exception:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                stream = cupy.cuda.ExternalStream(ptr, index)
        _CUPY_STREAMS[ptr] = stream
    return stream


# --- tensors <-> CuPy arrays by pointer --------------------------------------------------
# DLPack (cupy.from_dlpack / torch.from_dlpack) negotiates streams on every exchange, which
# costs ~50-100 us of host time per tensor; here both sides are already on one stream (the
# launch context makes PyTorch's current stream CuPy's), so the arrays are built directly.
_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_TORCH_DTYPE = {v: k for k, v in _NUMPY_DTYPE.items()}
# CuPy allocations made inside a launch: base pointer -> the uint8 tensor owning the memory
_CUPY_BLOCKS: dict = {}


def _torch_to_cupy(t, index):
    """A CuPy view of the contiguous CUDA tensor ``t`` (which it keeps alive); no copy."""
    import cupy
    dtype = _NUMPY_DTYPE.get(t.dtype)
    if dtype is None or t.numel() == 0:
        return cupy.from_dlpack(t)
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel() * dtype.itemsize, t, index)
    return cupy.ndarray(tuple(t.shape), dtype, cupy.cuda.MemoryPointer(mem, 0))


def _cupy_to_torch(a):
    """A tensor view of the CuPy array ``a`` (no copy): a typed view of the tensor block its
    memory came from (see :func:`_cupy_block_malloc`), else through DLPack."""
    block = _CUPY_BLOCKS.get(a.data.mem.ptr)
    dtype = _TORCH_DTYPE.get(a.dtype)
    if block is None or dtype is None or a.size == 0 or not a.flags.c_contiguous:
        return torch.from_dlpack(a)
    start = a.data.ptr - a.data.mem.ptr
    return block[start:start + a.nbytes].view(dtype).view(a.shape)


def _cupy_block_malloc(size, device_id):
    """CuPy's allocator inside a launch: a uint8 tensor from PyTorch's caching allocator (on
    PyTorch's current stream), kept until CuPy frees the memory; tensor views made by
    :func:`_cupy_to_torch` keep the block alive after that."""
    block = torch.empty(max(int(size), 1), dtype=torch.uint8, device=torch.device("cuda", device_id))
    ptr = block.data_ptr()
    _CUPY_BLOCKS[ptr] = block
    return ptr


def _cupy_block_free(ptr, device_id):
    _CUPY_BLOCKS.pop(ptr, None)


def _torch_malloc(size, device_id):
    """Numba's allocations (EMM plugin): raw memory from PyTorch's caching allocator."""
    return torch.cuda.caching_allocator_alloc(size, device_id, _current_stream_ptr(device_id))


@functools.lru_cache(maxsize=None)
def _cupy_allocator():
    import cupy
    return cupy.cuda.memory.PythonFunctionAllocator(_cupy_block_malloc, _cupy_block_free).malloc


def _cupy_torch_allocator():
    """Scoped: CuPy's allocations inside the call come from PyTorch's caching allocator."""
    if os.environ.get("SPARX_REF_SHARE_TORCH_MEMORY", "1") == "0":
        return contextlib.nullcontext()
    import cupy
    return cupy.cuda.using_allocator(_cupy_allocator())


_NUMBA_SHARED = {"done": False, "ok": False}


@functools.lru_cache(maxsize=None)
def numba_torch_memory_manager():
    """The EMM plugin class (built on first use, so importing this module needs no Numba)."""
    import weakref

    from numba import cuda

    class TorchCUDAMemoryManager(cuda.GetIpcHandleMixin, cuda.HostOnlyCUDAMemoryManager):
        """Numba EMM plugin: device memory from torch.cuda.caching_allocator_alloc."""

        def initialize(self):
            pass

        def memalloc(self, size):
            size = max(int(size), 1)
            ptr = _torch_malloc(size, torch.cuda.current_device())
            return cuda.MemoryPointer(weakref.proxy(self.context), ctypes.c_void_p(ptr), size,
                                      finalizer=functools.partial(torch.cuda.caching_allocator_delete, ptr))

        def get_memory_info(self):
            free, total = torch.cuda.mem_get_info()
            return cuda.MemoryInfo(free=free, total=total)

        @property
        def interface_version(self):
            return 1

    return TorchCUDAMemoryManager


def share_torch_memory_with_numba() -> bool:
    """Make Numba's current CUDA context allocate from PyTorch's caching allocator.

    Numba's own manager calls ``cuMemAlloc`` per array and frees in batches with
    ``cuMemFree`` (which synchronises the device). This installs an EMM plugin on the
    context instead, so numba arrays are carved out of PyTorch's pool (freed back to it when
    the array is collected, stream-ordered on the current stream) and count in
    ``torch.cuda.max_memory_allocated``. Done once; returns whether it is active.
    Disabled by ``SPARX_REF_SHARE_TORCH_MEMORY=0``.
    """
    if _NUMBA_SHARED["done"]:
        return _NUMBA_SHARED["ok"]
    _NUMBA_SHARED["done"] = True
    if os.environ.get("SPARX_REF_SHARE_TORCH_MEMORY", "1") == "0" or _cudasim():
        return False
    try:
        from numba import cuda
        manager = numba_torch_memory_manager()
        ctx = cuda.current_context()
        if not isinstance(ctx.memory_manager, manager):
            ctx.memory_manager = manager(context=ctx)
            ctx.memory_manager.initialize()
        _NUMBA_SHARED["ok"] = True
    except Exception as err:  # an older/newer numba-cuda: keep its own allocator
        warnings.warn(f"could not route Numba's CUDA allocations to PyTorch's allocator ({err!r}); "
                      f"numba_cuda kernels allocate with cudaMalloc", RuntimeWarning, stacklevel=2)
    return _NUMBA_SHARED["ok"]


# --- CuPy launch plans run on tensors -----------------------------------------------------
# A CuPy kernel whose wrapper carries ``.plan`` (sparx_ref.kernels.cupy._plan) is replayed from
# shapes: the plan's buffers are torch tensors and its pointer arguments their data_ptr(), with
# no CuPy array built. This takes a call's host time from hundreds of microseconds to tens (a
# SparX-Mamba-T training step makes ~140 of these calls; benchmarks/diag_function_host.py).
def _planner(op: str, backend: str, which: int):
    """The plan builder of ``op``'s registered kernel (0 forward, 1 backward) or None."""
    if backend != "cupy":
        return None
    return getattr(_kernel(op, backend, which), "plan", None)


def uses_plans(op: str, backend: str) -> bool:
    """True if ``op`` runs on ``backend`` through launch plans replayed on tensors."""
    if not uses_kernel(op, backend):
        return False
    return _cached(("plans", op, backend),
                   lambda: _planner(op, backend, 0) is not None and _planner(op, backend, 1) is not None)


def _run_plan(plan, device: torch.device, **given):
    """Run a CuPy plan with tensors: the given inputs (contiguous, on ``device``) and new buffers
    from PyTorch's caching allocator, on PyTorch's current stream. Returns every buffer by name."""
    from ..kernels.cupy import _plan as plans
    dtype = _TORCH_DTYPE[plan.dtype]
    for name, t in given.items():     # the kernels read memory as plan.dtype: never reinterpret
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; these CuPy kernels were planned for {dtype}")

    def empty(shape, _dtype):
        return torch.empty(shape, dtype=dtype, device=device)

    def zeros(shape, _dtype):
        return torch.zeros(shape, dtype=dtype, device=device)

    def launch(plan):
        driver = _driver_launches()
        if driver is not None:
            return plans.run(plan, given, empty, zeros, torch.Tensor.data_ptr, driver,
                             _current_stream_ptr(device.index))
        with _cupy_stream(device.index):
            return plans.run(plan, given, empty, zeros, torch.Tensor.data_ptr)
    if _cupy_device() == device.index:
        return launch(plan)
    # the tensors live on another device than the current one: that device's plan (its kernels
    # are loaded there), launched with that device current
    import cupy
    with cupy.cuda.Device(device.index):
        return launch(plan.for_device())


_DRIVER: list = []


def _driver_launches():
    """The process's :class:`..kernels.cupy._plan.DriverLaunches`, or None where the CUDA driver
    library cannot be loaded (the plans then launch through CuPy's kernel objects)."""
    if not _DRIVER:
        from ..kernels.cupy import _plan as plans
        try:
            _DRIVER.append(plans.DriverLaunches())
        except OSError:
            _DRIVER.append(None)
    return _DRIVER[0]


def _cupy_device() -> int:
    import cupy
    return cupy.cuda.runtime.getDevice()


def _aligned(*tensors) -> bool:
    """Every given tensor's data starts on a 16-byte boundary (vector loads allowed)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)


def _contiguous(*tensors):
    return tuple(None if t is None else t.detach().contiguous() for t in tensors)


def _call_fwd(ctx, op, backend, device, args, kwargs):
    """Run the forward kernel; keep what backward needs on ctx; return its output tensor(s)."""
    rt = _Runtime(backend, device)
    fwd = _kernel(op, backend, 0)
    with rt.launch():
        result = fwd(*[rt.wrap(a) if isinstance(a, torch.Tensor) else a for a in args],
                     **{k: rt.wrap(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    ctx.rt, ctx.op = rt, op
    return result, rt


def needed_grads(ctx, grads, leading=0, trailing=0, convert=None):
    """A backward's return value from ``grads``, the gradients of the forward's tensor inputs in
    order: None for the ``leading`` arguments before them and the ``trailing`` ones after (flags,
    plans, sizes), and None where autograd does not need a gradient (``ctx.needs_input_grad``).
    ``convert`` (e.g. array -> tensor) is applied to the needed ones only."""
    wanted = ctx.needs_input_grad[leading:leading + len(grads)]
    return ((None,) * leading
            + tuple((g if convert is None else convert(g)) if need else None for g, need in zip(grads, wanted))
            + (None,) * trailing)


def _input_grads(ctx, grads, keys, leading):
    """A backward's return value on the array path: :func:`needed_grads` of ``grads[key]`` for each
    tensor input in ``keys`` order, made tensors."""
    return needed_grads(ctx, [grads[k] for k in keys], leading, convert=ctx.rt.unwrap)


def _call_bwd(ctx, *douts):
    rt = ctx.rt
    bwd = _kernel(ctx.op, rt.backend, 1)
    with rt.launch():
        return bwd(*[rt.wrap(d) for d in douts], ctx.cache)


# =========================================================================================
# autograd Functions (kernel backends)
# =========================================================================================
_SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


class SelectiveScanFn(torch.autograd.Function):
    """selective_scan on a kernel backend; backward = the kernel's selective_scan_bwd."""

    @staticmethod
    def forward(ctx, backend, delta_softplus, u, delta, A, B, C, D, delta_bias):
        device = _check_tensors("selective_scan", backend, dict(u=u, delta=delta, A=A, B=B, C=C, D=D,
                                                                 delta_bias=delta_bias))
        (y, cache), rt = _call_fwd(ctx, "selective_scan", backend, device, (u, delta, A, B, C, D, delta_bias),
                                   {"delta_softplus": bool(delta_softplus)})
        ctx.cache = cache
        return rt.unwrap(y)

    @staticmethod
    def backward(ctx, dy):
        return _input_grads(ctx, _call_bwd(ctx, dy), _SCAN_GRADS, leading=2)


class SS2DScanFn(torch.autograd.Function):
    """ss2d_scan (fused cross-scan + scan + merge) on a kernel backend."""

    @staticmethod
    def forward(ctx, backend, delta_softplus, x, delta, A, B, C, D, delta_bias):
        device = _check_tensors("ss2d_scan", backend, dict(x=x, delta=delta, A=A, B=B, C=C, D=D,
                                                            delta_bias=delta_bias))
        (y, cache), rt = _call_fwd(ctx, "ss2d_scan", backend, device, (x, delta, A, B, C, D, delta_bias),
                                   {"delta_softplus": bool(delta_softplus)})
        ctx.cache = cache
        return rt.unwrap(y)

    @staticmethod
    def backward(ctx, dy):
        return _input_grads(ctx, _call_bwd(ctx, dy), ("x",) + _SCAN_GRADS[1:], leading=2)


class CrossScanFn(torch.autograd.Function):
    """cross_scan on a kernel backend; backward = the kernel cross_merge (its adjoint)."""

    @staticmethod
    def forward(ctx, backend, x):
        device = _check_tensors("cross_scan", backend, dict(x=x))
        xs, rt = _call_fwd(ctx, "cross_scan", backend, device, (x,), {})
        ctx.cache = None
        ctx.hw = tuple(x.shape[2:])
        return rt.unwrap(xs)

    @staticmethod
    def backward(ctx, dxs):
        H, W = ctx.hw
        rt = ctx.rt
        with rt.launch():
            dx = _kernel("cross_scan", rt.backend, 1)(rt.wrap(dxs), H, W)
        return None, rt.unwrap(dx)


class CrossMergeFn(torch.autograd.Function):
    """cross_merge on a kernel backend; backward = the kernel cross_scan (its adjoint)."""

    @staticmethod
    def forward(ctx, backend, ys, H, W):
        device = _check_tensors("cross_merge", backend, dict(ys=ys))
        y, rt = _call_fwd(ctx, "cross_merge", backend, device, (ys, int(H), int(W)), {})
        ctx.cache = None
        return rt.unwrap(y)

    @staticmethod
    def backward(ctx, dy):
        rt = ctx.rt
        with rt.launch():
            dys = _kernel("cross_merge", rt.backend, 1)(rt.wrap(dy))
        return None, rt.unwrap(dys), None, None


class WindowAttentionFn(torch.autograd.Function):
    """Swin's attention core on a kernel backend -> (out, probs); probs carry no gradient."""

    @staticmethod
    def forward(ctx, backend, scale, q, k, v, bias, mask):
        device = _check_tensors("window_attention", backend, dict(q=q, k=k, v=v, bias=bias, mask=mask))
        (out, cache), rt = _call_fwd(ctx, "window_attention", backend, device, (q, k, v, bias, mask, scale), {})
        ctx.cache = cache
        probs = rt.unwrap(cache["probs"])
        ctx.mark_non_differentiable(probs)
        return rt.unwrap(out), probs

    @staticmethod
    def backward(ctx, dout, _dprobs):
        return _input_grads(ctx, _call_bwd(ctx, dout), ("q", "k", "v", "bias"), leading=2) + (None,)


class DMCAAttentionFn(torch.autograd.Function):
    """DMCA channel attention on a kernel backend -> (out, attn); attn carries no gradient."""

    @staticmethod
    def forward(ctx, backend, groups, q, k, v):
        device = _check_tensors("dmca_attention", backend, dict(q=q, k=k, v=v))
        (out, cache), rt = _call_fwd(ctx, "dmca_attention", backend, device, (q, k, v, int(groups)), {})
        ctx.cache = cache
        attn = rt.unwrap(cache["attn"])
        ctx.mark_non_differentiable(attn)
        return rt.unwrap(out), attn

    @staticmethod
    def backward(ctx, dout, _dattn):
        return _input_grads(ctx, _call_bwd(ctx, dout), ("q", "k", "v"), leading=2)


class DepthwiseConv2dFn(torch.autograd.Function):
    """The depthwise "same" convolution on a kernel backend; backward = the kernel's."""

    @staticmethod
    def forward(ctx, backend, x, weight, bias):
        device = _check_tensors("depthwise_conv2d", backend, dict(x=x, weight=weight, bias=bias))
        (out, cache), rt = _call_fwd(ctx, "depthwise_conv2d", backend, device, (x, weight, bias), {})
        ctx.cache = cache
        return rt.unwrap(out)

    @staticmethod
    def backward(ctx, dout):
        return _input_grads(ctx, _call_bwd(ctx, dout), ("x", "weight", "bias"), leading=1)


class PlannedDepthwiseConv2dFn(torch.autograd.Function):
    """The depthwise convolution on CuPy through launch plans (:func:`_run_plan`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual=False):
        from ..kernels._conv_common import conv_dims
        device = _check_tensors("depthwise_conv2d", "cupy", dict(x=x, weight=weight, bias=bias))
        x, weight, bias = _contiguous(x, weight, bias)
        dims = conv_dims(x, weight, bias, check_shape)
        plan = _planner("depthwise_conv2d", "cupy", 0)(dims, _NUMPY_DTYPE[x.dtype], bias is not None, residual)
        out = _run_plan(plan, device, x=x, weight=weight, bias=bias)["out"]
        ctx.save_for_backward(x, weight)
        ctx.dims, ctx.has_bias, ctx.residual = dims, bias is not None, residual
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        plan = _planner("depthwise_conv2d", "cupy", 1)(ctx.dims, _NUMPY_DTYPE[x.dtype], ctx.has_bias, ctx.residual)
        g = _run_plan(plan, x.device, x=x, weight=weight, dout=dout.contiguous())
        return needed_grads(ctx, (g["dx"], g["dweight"], g.get("dbias")), trailing=1)


class GroupNormFn(torch.autograd.Function):
    """Group normalisation on a kernel backend (array path); backward = the kernel's."""

    @staticmethod
    def forward(ctx, backend, num_groups, eps, x, weight, bias):
        device = _check_tensors("group_norm", backend, dict(x=x, weight=weight, bias=bias))
        (out, cache), rt = _call_fwd(ctx, "group_norm", backend, device, (x, weight, bias, num_groups, eps), {})
        ctx.cache = cache
        return rt.unwrap(out)

    @staticmethod
    def backward(ctx, dout):
        return _input_grads(ctx, _call_bwd(ctx, dout), ("x", "weight", "bias"), leading=3)


class PlannedGroupNormFn(torch.autograd.Function):
    """Group normalisation on CuPy through launch plans; saves x, weight and the forward's
    per-(sample, group) mean and rstd ("stats") for the backward."""

    @staticmethod
    def forward(ctx, num_groups, eps, x, weight, bias):
        from ..kernels._norm_common import group_norm_dims
        device = _check_tensors("group_norm", "cupy", dict(x=x, weight=weight, bias=bias))
        x, weight, bias = _contiguous(x, weight, bias)
        B, C, S, G = dims = group_norm_dims(x, weight, bias, num_groups, check_shape)
        plan = _planner("group_norm", "cupy", 0)(dims, _NUMPY_DTYPE[x.dtype], weight is not None, bias is not None,
                                                  float(eps))
        bufs = _run_plan(plan, device, x=x.view(B, C, S), weight=weight, bias=bias)
        ctx.save_for_backward(x, weight, bufs["stats"])
        ctx.dims, ctx.has_bias = dims, bias is not None
        return bufs["out"].view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x, weight, stats = ctx.saved_tensors
        B, C, S, G = ctx.dims
        plan = _planner("group_norm", "cupy", 1)(ctx.dims, _NUMPY_DTYPE[x.dtype], weight is not None, ctx.has_bias)
        g = _run_plan(plan, x.device, x=x.view(B, C, S), weight=weight, stats=stats,
                      dout=dout.contiguous().view(B, C, S))
        return needed_grads(ctx, (g["dx"].view(x.shape), g.get("dweight"), g.get("dbias")), leading=2)


class PlannedCrossScanFn(torch.autograd.Function):
    """cross_scan on CuPy through launch plans; backward = the cross_merge plan (its adjoint)."""

    @staticmethod
    def forward(ctx, x):
        from ..kernels._scan_common import check_dtype
        device = _check_tensors("cross_scan", "cupy", dict(x=x))
        if x.dim() != 4:
            raise ValueError(f"cross_scan: x must have 4 dimensions (B, C, H, W), got shape {tuple(x.shape)}")
        check_dtype(x.dtype, (np.float32,), "cupy")
        (x,) = _contiguous(x)
        ctx.dims = tuple(int(d) for d in x.shape)
        return _run_plan(_planner("cross_scan", "cupy", 0)(ctx.dims), device, x=x)["xs"]

    @staticmethod
    def backward(ctx, dxs):
        return _run_plan(_planner("cross_scan", "cupy", 1)(ctx.dims), dxs.device, ys=dxs.contiguous())["y"]


class PlannedCrossMergeFn(torch.autograd.Function):
    """cross_merge on CuPy through launch plans; backward = the cross_scan plan (its adjoint)."""

    @staticmethod
    def forward(ctx, ys, H, W):
        from ..kernels._scan_common import check_dtype, check_merge_shapes
        device = _check_tensors("cross_merge", "cupy", dict(ys=ys))
        check_dtype(ys.dtype, (np.float32,), "cupy")
        (ys,) = _contiguous(ys)
        ctx.dims = check_merge_shapes(ys, H, W)
        return _run_plan(_planner("cross_merge", "cupy", 0)(ctx.dims), device, ys=ys)["y"]

    @staticmethod
    def backward(ctx, dy):
        return _run_plan(_planner("cross_merge", "cupy", 1)(ctx.dims), dy.device, x=dy.contiguous())["xs"], None, None


_SS2D_INPUTS = ("x", "delta", "A", "B", "C", "D", "delta_bias")


def _ss2d_dims(named) -> tuple:
    """(batch, Di, H, W, N) of checked ss2d_scan inputs given by name."""
    return tuple(int(d) for d in named["x"].shape) + (int(named["A"].shape[1]),)


def _ss2d_fwd_plan(named, delta_softplus):
    """The CuPy plan of the 2-D scan forward for these (checked, contiguous) inputs, or None
    where the maps do not fit the "quad" kernel's shared memory."""
    return _planner("ss2d_scan", "cupy", 0)(_ss2d_dims(named), bool(delta_softplus), named["D"] is not None,
                                            named["delta_bias"] is not None,
                                            _aligned(named["x"], named["delta"], named["B"], named["C"]))


def _ss2d_bwd_plan(named, delta_softplus):
    """The CuPy plan of the 2-D scan backward for the forward's inputs ``named``."""
    return _planner("ss2d_scan", "cupy", 1)(_ss2d_dims(named), bool(delta_softplus), named["D"] is not None,
                                            named["delta_bias"] is not None,
                                            _aligned(named["delta"], named["B"], named["C"]))


class PlannedSS2DScanFn(torch.autograd.Function):
    """ss2d_scan on CuPy through launch plans; ``plan`` is the forward's (built by the caller,
    who falls back to :class:`SS2DScanFn` where there is none)."""

    @staticmethod
    def forward(ctx, plan, delta_softplus, device, *tensors):
        tensors = _contiguous(*tensors)
        named = dict(zip(_SS2D_INPUTS, tensors))
        y = _run_plan(plan, device, **named)["y"]
        ctx.save_for_backward(*tensors)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        named = dict(zip(_SS2D_INPUTS, ctx.saved_tensors))
        g = _run_plan(_ss2d_bwd_plan(named, ctx.delta_softplus), named["x"].device, dy=dy.contiguous(), **named)
        return needed_grads(ctx, [g.get("d" + name) for name in _SS2D_INPUTS], leading=3)


class PlannedDMCAAttentionFn(torch.autograd.Function):
    """DMCA channel attention on CuPy through launch plans -> (out, attn); attn has no gradient."""

    @staticmethod
    def forward(ctx, groups, q, k, v):
        from ..kernels.cupy.attention import dmca_dims
        device = _check_tensors("dmca_attention", "cupy", dict(q=q, k=k, v=v))
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 3:
                raise ValueError(f"dmca_attention: {name} must have 3 dimensions, got shape {tuple(t.shape)}")
        q, k, v = _contiguous(q, k, v)
        dims = dmca_dims(q, k, v, groups)
        plan = _planner("dmca_attention", "cupy", 0)(dims, int(groups), _NUMPY_DTYPE[q.dtype])
        bufs = _run_plan(plan, device, q=q, k=k, v=v)
        ctx.save_for_backward(q, k, v, bufs["attn"])
        ctx.dims, ctx.groups = dims, int(groups)
        ctx.mark_non_differentiable(bufs["attn"])
        return bufs["out"], bufs["attn"]

    @staticmethod
    def backward(ctx, dout, _dattn):
        q, k, v, attn = ctx.saved_tensors
        plan = _planner("dmca_attention", "cupy", 1)(ctx.dims, ctx.groups, _NUMPY_DTYPE[q.dtype])
        g = _run_plan(plan, q.device, q=q, k=k, v=v, attn=attn, dout=dout.contiguous())
        return needed_grads(ctx, (g["dq"], g["dk"], g["dv"]), leading=1)


def _planned_ss2d_scan(x, delta, A, B, C, D, delta_bias, delta_softplus):
    """ss2d_scan through plans, or None where the forward has no plan for these shapes."""
    from ..kernels._scan_common import ss2d_shapes
    device = _check_tensors("ss2d_scan", "cupy", dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias))
    # contiguous, still tracked by autograd (a no-op for the usual contiguous inputs)
    tensors = tuple(None if t is None else t.contiguous() for t in (x, delta, A, B, C, D, delta_bias))
    ss2d_shapes(*tensors, allowed=(np.float32,), backend="cupy")
    plan = _ss2d_fwd_plan(dict(zip(_SS2D_INPUTS, tensors)), delta_softplus)
    if plan is None:
        return None
    return PlannedSS2DScanFn.apply(plan, bool(delta_softplus), device, *tensors)


# =========================================================================================
# the entry points
# =========================================================================================
def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, backend="torch"):
    """y (b, KD, L): h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> + D u_t, with
    dt = softplus(delta + delta_bias) if delta_softplus (see :func:`.common.selective_scan_torch`)."""
    if not uses_kernel("selective_scan", backend):
        return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return SelectiveScanFn.apply(backend, delta_softplus, u, delta, A, B, C, D, delta_bias)


def cross_scan(x, *, backend="torch"):
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    if not uses_kernel("cross_scan", backend):
        return cross_scan_torch(x)
    if uses_plans("cross_scan", backend):
        return PlannedCrossScanFn.apply(x)
    return CrossScanFn.apply(backend, x)


def cross_merge(ys, H, W, *, backend="torch"):
    """(B, 4, C, H*W) -> (B, C, H, W), the adjoint of :func:`cross_scan`."""
    if not uses_kernel("cross_merge", backend):
        return cross_merge_torch(ys, H, W)
    if uses_plans("cross_merge", backend):
        return PlannedCrossMergeFn.apply(ys, H, W)
    return CrossMergeFn.apply(backend, ys, H, W)


def ss2d_scan(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, backend="torch"):
    """cross_merge(selective_scan(cross_scan(x), ...)) in one call: (b, Di, H, W)."""
    if not uses_kernel("ss2d_scan", backend):
        return ss2d_scan_torch(x, delta, A, B, C, D, delta_bias, delta_softplus)
    if uses_plans("ss2d_scan", backend):
        y = _planned_ss2d_scan(x, delta, A, B, C, D, delta_bias, delta_softplus)
        if y is not None:
            return y
    return SS2DScanFn.apply(backend, delta_softplus, x, delta, A, B, C, D, delta_bias)


def window_attention(q, k, v, bias, mask=None, scale=None, *, backend="torch", attn_drop=None):
    """Swin's attention core -> (out (Bw, heads, N, hd), probs (Bw, heads, N, N)).

    ``attn_drop``: the block's attention Dropout; the kernels have none, so on a kernel
    backend it must be inactive (eval mode or p == 0), else NotImplementedError.
    """
    if not uses_kernel("window_attention", backend):
        return window_attention_torch(q, k, v, bias, mask, scale, attn_drop)
    if attn_drop is not None and attn_drop.training and attn_drop.p > 0:
        raise NotImplementedError(f"attention dropout (p={attn_drop.p}) is not supported by the "
                                  f"{backend!r} window-attention kernels; use kernel_backend='torch'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return WindowAttentionFn.apply(backend, scale, q, k, v, bias, mask)


def dmca_attention(q, k, v, groups=4, *, backend="torch"):
    """DMCA channel attention -> (out (B, C, L), attn (B, groups, g, g))."""
    if not uses_kernel("dmca_attention", backend):
        return dmca_attention_torch(q, k, v, groups)
    if uses_plans("dmca_attention", backend):
        return PlannedDMCAAttentionFn.apply(groups, q, k, v)
    return DMCAAttentionFn.apply(backend, int(groups), q, k, v)


# =========================================================================================
# wiring into the twins
# =========================================================================================
def depthwise_conv2d(x, weight, bias=None, *, residual=False, backend="torch"):
    """x (B, C, H, W), weight (C, 1, kh, kw) with kh, kw odd, bias (C,) or None -> (B, C, H, W):
    the depthwise convolution with stride 1 and zero padding (kh // 2, kw // 2); with
    ``residual``, x + that convolution (on CuPy added inside the kernels, forward and backward)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv2d: x must be (B, C, H, W) and weight (C, 1, kh, kw) with the same C, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0:
        raise ValueError(f"depthwise_conv2d: weight's kernel size must be odd (a 'same' convolution), "
                         f"got {tuple(weight.shape[2:])}")
    if uses_plans("depthwise_conv2d", backend):
        return PlannedDepthwiseConv2dFn.apply(x, weight, bias, bool(residual))
    if not uses_kernel("depthwise_conv2d", backend):
        out = depthwise_conv2d_torch(x, weight, bias)
    else:
        out = DepthwiseConv2dFn.apply(backend, x, weight, bias)
    return x + out if residual else out


def group_norm(x, weight, bias, num_groups, eps=1e-5, *, backend="torch"):
    """x (B, C, *spatial); weight, bias (C,) or None; ``num_groups`` dividing C -> x.shape:
    ``F.group_norm(x, num_groups, weight, bias, eps)`` (biased variance per sample and group).
    The kernels need at least one spatial axis."""
    if not uses_kernel("group_norm", backend):
        return group_norm_torch(x, weight, bias, num_groups, eps)
    if isinstance(x, torch.Tensor) and x.dim() < 3:
        raise ValueError(f"group_norm: the kernels of kernel_backend={backend!r} take x (B, C, *spatial) with at "
                         f"least one spatial axis, got shape {tuple(x.shape)} (kernel_backend='torch' takes (B, C))")
    if uses_plans("group_norm", backend):
        return PlannedGroupNormFn.apply(num_groups, eps, x, weight, bias)
    return GroupNormFn.apply(backend, num_groups, eps, x, weight, bias)


def kernel_table(backend: str):
    """The :class:`.common.TorchKernels` row of ``backend`` (the table SparX-Mamba and the
    torch DMCA call): scan, cross-scan/merge and channel attention routed through this module."""
    from .common import TorchKernels
    check_backend(backend)

    def channel_attention(q, k, v):   # (B*G, g, Ls), (B*G, g, Ls), (B*G, g, L): one group each
        out, attn = dmca_attention(q, k, v, groups=1, backend=backend)
        return out, attn[:, 0]

    from .ss2d_core import ss2d_core  # it imports this module
    return TorchKernels(backend, functools.partial(selective_scan, backend=backend),
                        functools.partial(cross_scan, backend=backend),
                        functools.partial(cross_merge, backend=backend), channel_attention,
                        functools.partial(ss2d_core, backend=backend))


def set_kernel_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Switch every hot-op call of a built twin to ``backend`` (in place; returns the model):
    modules with a ``kernels`` table get :func:`kernel_table`, modules with a
    ``kernel_backend`` attribute get the name."""
    check_backend(backend)
    table = kernel_table(backend)
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = backend
        if hasattr(module, "kernels") and hasattr(module.kernels, "selective_scan"):
            module.kernels = table
    model.kernel_backend = backend
    return model


__all__ = ["BACKENDS", "KERNEL_OPS", "check_backend", "uses_kernel", "describe", "selective_scan",
           "cross_scan", "cross_merge", "ss2d_scan", "window_attention", "dmca_attention", "depthwise_conv2d",
           "group_norm", "GroupNormFn", "PlannedGroupNormFn", "group_norm_torch",
           "kernel_table", "set_kernel_backend", "share_torch_memory_with_numba",
           "SelectiveScanFn", "SS2DScanFn", "CrossScanFn", "CrossMergeFn", "WindowAttentionFn",
           "DMCAAttentionFn", "DepthwiseConv2dFn", "PlannedDepthwiseConv2dFn", "PlannedSS2DScanFn",
           "PlannedCrossScanFn", "PlannedCrossMergeFn",
           "PlannedDMCAAttentionFn", "uses_plans", "window_attention_torch", "dmca_attention_torch",
           "depthwise_conv2d_torch", "ss2d_scan_torch"]
