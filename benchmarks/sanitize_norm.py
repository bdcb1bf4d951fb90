"""Run every group-normalisation kernel once on edge shapes, for compute-sanitizer. Needs a CUDA GPU.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_norm.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_norm.py

Every version of every GPU backend with group-norm kernels runs forward and backward, float32
and float64, on shapes that exercise the edges: planes shorter than a warp, planes with an
unrolled part and a tail, more planes per group than threads per block (the per-group loops of
``gn_row_stats`` / ``gn_bwd_reduce``), several groups, a plane count that leaves the last block's
warps idle, and no weight or bias. Each result is checked against the float64 reference op, so
the exit status is 1 on a wrong answer as well as on a sanitizer report (``--error-exitcode``).
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

OPS = ("group_norm_fwd", "group_norm_bwd")
# (x shape, groups, weight, bias)
CASES = [((2, 3, 5, 3), 1, True, True), ((3, 4, 13, 11), 2, True, False), ((1, 300, 2, 3), 1, False, True),
         ((2, 9, 7, 7), 3, False, False), ((2, 6, 4, 5, 3), 6, True, True)]


def main():
    from sparx_ref.ref import layers as ref_layers
    from sparx_ref.testing import rel_err
    from sparx_ref.tolerances import tolerance

    rng = np.random.default_rng(0)
    failures = []
    for backend, version, fwd, bwd, put in gpu_kernel_pairs(OPS):
        for dtype in (np.float32, np.float64):
            tol = tolerance(dtype, "kernel")
            worst = 0.0
            for shape, G, with_w, with_b in CASES:
                C = shape[1]
                x = (3 + rng.standard_normal(shape)).astype(dtype)
                d = rng.standard_normal(shape).astype(dtype)
                w = rng.standard_normal(C).astype(dtype) if with_w else None
                b = rng.standard_normal(C).astype(dtype) if with_b else None
                f64 = [None if a is None else a.astype(np.float64) for a in (x, w, b)]
                ref_out, ref_cache = ref_layers.group_norm_fwd(*f64, G)
                ref_g = ref_layers.group_norm_bwd(d.astype(np.float64), ref_cache)
                out, cache = fwd(put(x), None if w is None else put(w), None if b is None else put(b), G)
                grads = bwd(put(d), cache)
                errs = {"out": rel_err(_host(out), ref_out), "dx": rel_err(_host(grads["x"]), ref_g["x"])}
                # the weight and bias gradients are batch sums: judged against their magnitude
                for n in ("weight", "bias"):
                    if ref_g[n] is not None:
                        errs[f"d{n}"] = float(np.abs(_host(grads[n]) - ref_g[n]).max()
                                              / max(np.abs(ref_g[n]).max(), 1.0))
                worst = max(worst, *errs.values())
                bad = {n: e for n, e in errs.items() if not e <= tol}
                if bad:
                    failures.append((backend, version, np.dtype(dtype).name, shape, G, bad))
                    print(f"FAIL {backend} {version} {np.dtype(dtype).name} {shape} G={G} {bad}")
            print(f"group norm {backend:10s} {version:6s} {np.dtype(dtype).name} max err {worst:.2e}")
    if failures:
        print(f"{len(failures)} case(s) disagree with the reference")
        return 1
    print("all group-norm kernels agree with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
