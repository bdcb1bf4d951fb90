"""Run every depthwise-conv kernel once on edge shapes, for compute-sanitizer. Needs a CUDA GPU.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_conv.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_conv.py

Every version of both backends runs forward and backward, float32 and float64, on shapes that
exercise the edges: a width that is not a multiple of the 4-wide strip (the last strip's
out-of-map columns), a single row, kernel sizes 1, 3, 5 and 7 and a 3x5 filter, with and
without bias, and a batch that the strip backward splits into several slices with a ragged last
one. The CuPy launch plans also run with ``residual`` (x + conv(x), as the twins call them),
both versions. Each result is checked against the float64 reference op, so the exit status is 1 on a
wrong answer as well as on a sanitizer report (``--error-exitcode``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import gpu_kernel_pairs, to_host as _host  # noqa: E402

OPS = ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd")
# (B, C, H, W, kh, kw, bias): B = 7 with 3 channels gives several batch slices, the last ragged
CASES = [(2, 5, 9, 11, 3, 3, True), (7, 3, 6, 7, 5, 5, False), (1, 4, 1, 13, 1, 1, True),
         (3, 2, 8, 5, 7, 7, True), (2, 3, 5, 6, 3, 5, False)]


def case_with_reference(rng, dtype, B, C, H, W, kh, kw, with_bias):
    """Random x, weight, bias (or None) and dout of one case in ``dtype``, with the float64
    reference forward output and gradients (keys "x", "weight", "bias")."""
    from sparx_ref.ref import layers as ref_layers
    x, w, d = (rng.standard_normal(s).astype(dtype) for s in ((B, C, H, W), (C, 1, kh, kw), (B, C, H, W)))
    b = rng.standard_normal(C).astype(dtype) if with_bias else None
    ref_out, ref_cache = ref_layers.depthwise_conv2d_fwd(
        x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64))
    return x, w, b, d, ref_out, ref_layers.depthwise_conv2d_bwd(d.astype(np.float64), ref_cache)


def main():
    from sparx_ref.testing import rel_err
    from sparx_ref.tolerances import tolerance

    rng = np.random.default_rng(0)
    failures = []
    for backend, version, fwd, bwd, put in gpu_kernel_pairs(OPS):
        for dtype in (np.float32, np.float64):
            tol = tolerance(dtype, "kernel")
            worst = 0.0
            for B, C, H, W, kh, kw, with_bias in CASES:
                x, w, b, d, ref_out, ref_g = case_with_reference(rng, dtype, B, C, H, W, kh, kw, with_bias)
                out, cache = fwd(put(x), put(w), None if b is None else put(b))
                grads = bwd(put(d), cache)
                errs = {"out": rel_err(_host(out), ref_out)}
                errs.update({f"d{n}": rel_err(_host(grads[n]), ref_g[n]) for n in ref_g if ref_g[n] is not None})
                worst = max(worst, *errs.values())
                bad = {n: e for n, e in errs.items() if not e <= tol}
                if bad:
                    failures.append((backend, version, np.dtype(dtype).name, (B, C, H, W, kh, kw), bad))
                    print(f"FAIL {backend} {version} {np.dtype(dtype).name} {(B, C, H, W, kh, kw)} {bad}")
            print(f"depthwise {backend:10s} {version:6s} {np.dtype(dtype).name} max err {worst:.2e}")
    failures += residual_plans(rng)
    if failures:
        print(f"{len(failures)} case(s) disagree with the reference")
        return 1
    print("all depthwise conv kernels agree with the reference")
    return 0


def residual_plans(rng):
    """The CuPy plans with ``residual``: out = x + conv(x), dx = dout + conv^T(dout); both versions,
    float32 and float64, every case. Returns the failures."""
    try:
        import cupy as cp
        from sparx_ref.kernels.cupy import conv as cupy_conv
        from sparx_ref.kernels.cupy._plan import run_on_cupy
    except ImportError as err:
        print(f"residual plans skipped: {err}")
        return []
    from sparx_ref.testing import rel_err
    from sparx_ref.tolerances import tolerance

    failures = []
    for version in ("naive", "strip"):
        for dtype in (np.float32, np.float64):
            tol, worst = tolerance(dtype, "kernel"), 0.0
            for B, C, H, W, kh, kw, with_bias in CASES:
                x, w, b, d, ref_out, ref_g = case_with_reference(rng, dtype, B, C, H, W, kh, kw, with_bias)
                given = {"x": cp.asarray(x), "weight": cp.asarray(w.reshape(C, kh * kw)),
                         "bias": None if b is None else cp.asarray(b)}
                dims = (B, C, H, W, kh, kw)
                out = run_on_cupy(cupy_conv.fwd_plan(version, dims, dtype, with_bias, True), given,
                                  cupy_conv._empty)["out"]
                grads = run_on_cupy(cupy_conv.bwd_plan(version, dims, dtype, with_bias, True),
                                    dict(given, dout=cp.asarray(d)), cupy_conv._empty)
                errs = {"out": rel_err(cp.asnumpy(out), ref_out + x),
                        "dx": rel_err(cp.asnumpy(grads["dx"]), ref_g["x"] + d),
                        "dweight": rel_err(cp.asnumpy(grads["dweight"]), ref_g["weight"])}
                if with_bias:
                    errs["dbias"] = rel_err(cp.asnumpy(grads["dbias"]), ref_g["bias"])
                worst = max(worst, *errs.values())
                bad = {n: e for n, e in errs.items() if not e <= tol}
                if bad:
                    failures.append(("cupy residual", version, np.dtype(dtype).name, dims, bad))
                    print(f"FAIL cupy residual {version} {np.dtype(dtype).name} {dims} {bad}")
            print(f"depthwise cupy residual plan {version:6s} {np.dtype(dtype).name} max err {worst:.2e}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
