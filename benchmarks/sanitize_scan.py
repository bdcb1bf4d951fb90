"""Run every GPU scan kernel once on small shapes, for compute-sanitizer. Needs a CUDA GPU.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python benchmarks/sanitize_scan.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_scan.py

Every version of both GPU backends runs forward and (every backward version) backward on shapes that exercise the
edges (L not a multiple of 32 or of a round, several rounds, channel blocks with idle warps,
N = 2, an odd non-square map with partial 32x32 tiles, a 1x1 map), and each result is checked
against the float64 reference op, so the exit status is 1 on a wrong answer as well as on a
sanitizer report.

``SANITIZE_VERSIONS=vec,quad`` (environment) keeps only those version names (e.g. the rungs
added since the last full sanitizer run; the ss2d backward then runs its default version).
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


def versions(op, backend):
    """The registered versions of ``op`` on ``backend``, kept to $SANITIZE_VERSIONS when set."""
    from sparx_ref import kernels
    only = [v for v in os.environ.get("SANITIZE_VERSIONS", "").split(",") if v]
    return [v for v in kernels.versions(op, backend) if not only or v in only]


def main():
    from sparx_ref import kernels
    from sparx_ref.kernels._scan_common import poison_outputs
    from sparx_ref.ref import scan as R
    from sparx_ref.ref import ss2d as S
    from sparx_ref.testing import assert_all_close, assert_close

    backends = [b for b in ("numba_cuda", "cupy") if kernels.available(b)]
    if not backends:
        print("no GPU backend available:", {b: kernels.runtime_missing(b) for b in ("numba_cuda", "cupy")})
        return 1
    rng = np.random.default_rng(0)
    f32 = np.float32

    def dev(backend, a):
        if a is None:
            return None
        if backend == "cupy":
            import cupy
            return cupy.asarray(a)
        from numba import cuda
        return cuda.to_device(np.ascontiguousarray(a))

    def scan_args(b, KD, L, K, N):
        return [rng.standard_normal((b, KD, L)).astype(f32), (rng.standard_normal((b, KD, L)) * 0.5).astype(f32),
                (-np.exp(rng.standard_normal((KD, N)))).astype(f32), rng.standard_normal((b, K, N, L)).astype(f32),
                rng.standard_normal((b, K, N, L)).astype(f32), rng.standard_normal(KD).astype(f32),
                rng.standard_normal(KD).astype(f32)]

    f64 = lambda xs: [None if a is None else a.astype(np.float64) for a in xs]   # noqa: E731
    n_checked = 0
    for backend in backends:
        # plain scan: Dg = 10 (two channel blocks of 8 warps, idle warps), L = 300 (3 rounds of 128,
        # float4 loads in "vec"), L = 1; for "vec": L = 40 (two rows per warp), L = 70 (scalar loads)
        for (b, K, Dg, N, L) in ((2, 2, 10, 2, 300), (1, 1, 3, 1, 1), (1, 2, 5, 1, 40), (1, 1, 3, 1, 70)):
            args = scan_args(b, K * Dg, L, K, N)
            y_ref, c_ref = R.selective_scan_fwd(*f64(args), delta_softplus=True)
            dy = rng.standard_normal(y_ref.shape).astype(f32)
            g_ref = R.selective_scan_bwd(dy.astype(np.float64), c_ref)
            for version in versions("selective_scan_fwd", backend):
                fn = kernels.get("selective_scan_fwd", backend, version)
                with poison_outputs():
                    y, cache = fn(*[dev(backend, a) for a in args], delta_softplus=True)
                assert_close(y, y_ref, f32, "kernel", f"{backend}/{version} scan fwd")
                n_checked += 1
            for version in versions("selective_scan_bwd", backend):
                with poison_outputs():
                    g = kernels.get("selective_scan_bwd", backend, version)(dev(backend, dy), cache)
                assert_all_close(g, g_ref, f32, "kernel", prefix=f"{backend}/{version} scan bwd ")
                n_checked += 1
        # maps: 37 x 45 (partial tiles, odd pitch), 1 x 1
        for (b, Di, H, W, N) in ((1, 3, 37, 45, 1), (2, 2, 1, 1, 2)):
            L = H * W
            x = rng.standard_normal((b, Di, H, W)).astype(f32)
            ys = rng.standard_normal((b, 4, Di, L)).astype(f32)
            for version in versions("cross_scan", backend):
                with poison_outputs():
                    got = kernels.get("cross_scan", backend, version)(dev(backend, x))
                    merged = kernels.get("cross_merge", backend, version)(dev(backend, ys), H, W)
                assert_close(got, S.cross_scan(x), f32, "kernel", f"{backend}/{version} cross_scan")
                assert_close(merged, S.cross_merge(ys.astype(np.float64), H, W), f32, "kernel",
                             f"{backend}/{version} cross_merge")
                n_checked += 2
            args = [x] + scan_args(b, 4 * Di, L, 4, N)[1:]
            y_ref, c_ref = S.ss2d_scan_fwd(*f64(args), delta_softplus=True)
            dy = rng.standard_normal(y_ref.shape).astype(f32)
            g_ref = S.ss2d_scan_bwd(dy.astype(np.float64), c_ref)
            for version in versions("ss2d_scan_fwd", backend):
                # a forward-only rung ("quad") pairs with the default backward (the cache is the inputs)
                bwd_version = version if version in kernels.versions("ss2d_scan_bwd", backend) else None
                with poison_outputs():
                    y, cache = kernels.get("ss2d_scan_fwd", backend, version)(
                        *[dev(backend, a) for a in args], delta_softplus=True)
                    g = kernels.get("ss2d_scan_bwd", backend, bwd_version)(dev(backend, dy), cache)
                assert_close(y, y_ref, f32, "kernel", f"{backend}/{version} ss2d fwd")
                assert_all_close(g, g_ref, f32, "kernel", prefix=f"{backend}/{version} ss2d bwd ")
                n_checked += 2
    print(f"sanitize_scan: {n_checked} kernel results checked on {backends}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
