"""Host time of the twins' autograd Functions on the GPU backends (issue 7). GPU only.

A SparX-Mamba-T training step makes ~230 calls of our Functions (forward and backward); when
each costs a few hundred microseconds of Python, the step is host-bound (``diag_models_gpu.py
--profile`` prints the step's GPU time next to its wall time). For each GPU backend this times
``ops.<op>`` forward and forward+backward on small CUDA tensors (the GPU work is negligible, so
the wall time per call is the host time), next to the same op in plain PyTorch, and prints a
cProfile listing of the forward+backward calls: where the host time goes.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/diag_function_host.py [--calls 300] [--ops depthwise_conv2d]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import profile_text  # noqa: E402


def inputs(op):
    """(args, kwargs) of a small problem for ``ops.<op>`` on the GPU, leaves requiring grad."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, device="cuda", generator=g).requires_grad_(True)
    if op == "depthwise_conv2d":
        return (t(2, 32, 7, 7), t(32, 1, 3, 3), t(32)), {}
    if op == "selective_scan":
        A = (-torch.rand(4 * 16, 1, device="cuda", generator=g) - 0.5).requires_grad_(True)
        return (t(2, 64, 49), t(2, 64, 49), A, t(2, 4, 1, 49), t(2, 4, 1, 49), t(64), t(64)), \
            {"delta_softplus": True}
    if op == "cross_merge":
        return (t(2, 4, 16, 49), 7, 7), {}
    if op == "ss2d_scan":
        A = (-torch.rand(4 * 16, 1, device="cuda", generator=g) - 0.5).requires_grad_(True)
        return (t(2, 16, 7, 7), t(2, 64, 49), A, t(2, 4, 1, 49), t(2, 4, 1, 49), t(64), t(64)), \
            {"delta_softplus": True}
    if op == "dmca_attention":
        return (t(2, 64, 16), t(2, 64, 16), t(2, 64, 49)), {"groups": 4}
    if op == "group_norm":
        return (t(2, 32, 7, 7), t(32), t(32), 1), {}
    raise KeyError(op)


def per_call_us(fn, calls):
    import torch
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def parts(calls):
    """Host us of the pieces a CuPy Function call is made of (each on its own, best of 3)."""
    import cupy
    import torch
    from sparx_ref.torch_models import ops
    t = torch.randn(2, 32, 7, 7, device="cuda")
    idx = t.device.index
    fn = cupy.RawKernel(r'extern "C" __global__ void noop(const float* a, float* b, int n) {}', "noop")
    a, b = ops._torch_to_cupy(t, idx), ops._torch_to_cupy(torch.empty_like(t), idx)
    ptr_a, ptr_b = t.data_ptr(), t.data_ptr()
    n = np.int32(t.numel())
    stream = ops._cupy_stream(idx)

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.new_empty(x.shape)

        @staticmethod
        def backward(ctx, g):
            return g
    leaf = t.clone().requires_grad_(True)

    def launch_ctx():
        with ops._Runtime("cupy", t.device).launch():
            pass

    def cupy_empty():
        with ops._cupy_torch_allocator():
            cupy.empty((2, 32, 7, 7), dtype=np.float32)
    items = [
        ("torch.empty", lambda: torch.empty((2, 32, 7, 7), device="cuda")),
        ("torch_to_cupy (one tensor)", lambda: ops._torch_to_cupy(t, idx)),
        ("cupy_to_torch (plain cupy array)", lambda: torch.from_dlpack(a)),
        ("Runtime.launch context", launch_ctx),
        ("cupy.empty via torch allocator", cupy_empty),
        ("RawKernel launch, cupy arrays", lambda: fn((1,), (32,), (a, b, n))),
        ("RawKernel launch, int pointers", lambda: fn((1,), (32,), (ptr_a, ptr_b, n))),
        ("RawKernel launch, int pointers + stream=", lambda: fn((1,), (32,), (ptr_a, ptr_b, n), stream=stream)
         if stream is not ops._NO_CONTEXT else fn((1,), (32,), (ptr_a, ptr_b, n))),
        ("current raw stream", lambda: ops._current_stream_ptr(idx)),
        ("empty Function forward+backward", lambda: Nothing.apply(leaf).backward(t)),
        ("F.conv2d depthwise forward+backward (torch)",
         lambda: ops.depthwise_conv2d_torch(leaf, torch.ones(32, 1, 3, 3, device="cuda")).backward(t)),
    ]
    print(f"\n# host us of the pieces of a CuPy call (best of 3 x {calls})")
    for name, f in items:
        print(f"{name:45s} {per_call_us(f, calls):7.1f} us", flush=True)


def main():
    import torch
    from sparx_ref.torch_models import ops
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--ops", nargs="+", default=["depthwise_conv2d", "selective_scan", "cross_merge"])
    p.add_argument("--backends", nargs="+", default=["torch", "cupy", "numba_cuda"])
    p.add_argument("--profile-backend", default="cupy")
    p.add_argument("--parts", action="store_true", help="also time the pieces of a CuPy call")
    p.add_argument("--compare-launchers", action="store_true",
                   help="time the CuPy plans twice: through cuLaunchKernel (the default) and CuPy's kernel objects")
    args = p.parse_args()
    if args.parts:
        parts(args.calls)
    print(f"# {torch.cuda.get_device_name()}, host us per call (best of 3 x {args.calls} calls)")
    for op in args.ops:
        a, kw = inputs(op)
        fn = getattr(ops, op)
        runs = [(b, None) for b in args.backends]
        if args.compare_launchers and "cupy" in args.backends:
            runs.append(("cupy", "kernel objects"))
        for backend, launcher in runs:
            driver = ops._driver_launches()
            if launcher:                      # plans launched by CuPy's kernel objects for this row
                ops._DRIVER[:] = [None]

            def fwd():
                with torch.no_grad():
                    fn(*a, backend=backend, **kw)

            def fb():
                out = fn(*a, backend=backend, **kw)
                out = out[0] if isinstance(out, tuple) else out
                out.sum().backward()
            label = backend + (f" ({launcher})" if launcher else "")
            print(f"{op:18s} {label:26s} forward {per_call_us(fwd, args.calls):7.1f} us   "
                  f"forward+backward {per_call_us(fb, args.calls):7.1f} us", flush=True)
            ops._DRIVER[:] = [driver]
        if args.profile_backend:
            # forward and backward on this thread (autograd's device thread is invisible to cProfile)
            def fb_profiled():
                out = fn(*a, backend=args.profile_backend, **kw)
                out = out[0] if isinstance(out, tuple) else out
                out.sum().backward()
            print(f"\n# cProfile: {op} forward+backward on {args.profile_backend}, {args.calls} calls")
            with torch.autograd.set_multithreading_enabled(False):
                print(profile_text(fb_profiled, args.calls, sorts=(("tottime", 30),)))


if __name__ == "__main__":
    main()
