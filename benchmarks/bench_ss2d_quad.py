"""Quick GPU timing of the 2-D scan forward rungs: composed, fused and quad (+ quad with ITEMS = 8
on CuPy), both GPU backends, at the four SparX-Mamba-T stage shapes (batch 64). Not pytest.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_ss2d_quad.py

Prints per rung: median ms, fraction of the byte floor (x and y once, delta, B, C; copy bandwidth
measured in the same run), speed-up vs composed of the same backend, max error relative to
CuPy's composed result, and whether two calls gave the same bits. ~40-70 s, mostly Numba JIT.
bench_scan.py times the same rungs (through the registry) at 56x56 among everything else.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

SHAPES = ((64, 192, 56, 56), (64, 384, 28, 28), (64, 640, 14, 14), (64, 1024, 7, 7))


def main():
    import cupy as cp

    from sparx_ref import kernels
    from sparx_ref.kernels.cupy import ss2d as quad_cupy
    common.use_cupy_pool_for_numba()
    bw = common.copy_bandwidth_gbs() * 1e9
    print(f"# {common.card()}: copy {bw / 1e9:.0f} GB/s", flush=True)
    cp.random.seed(0)

    def g(*shape):
        return cp.random.standard_normal(shape, dtype=cp.float32)

    for b, Di, H, W in SHAPES:
        L = H * W
        args = [g(b, Di, H, W), g(b, 4 * Di, L) * 0.5, -cp.exp(g(4 * Di, 1)), g(b, 4, 1, L), g(b, 4, 1, L),
                g(4 * Di), g(4 * Di) * 0.5]
        floor = 4 * (2 * b * Di * L + b * 4 * Di * L + 2 * b * 4 * L) / bw * 1e3
        ref = kernels.get("ss2d_scan_fwd", "cupy", "composed")(*args, delta_softplus=True)[0]
        for backend in ("cupy", "numba_cuda"):
            times = {}
            for rung in ("composed", "fused", "quad") + (("quad8",) if backend == "cupy" else ()):
                quad_cupy.QUAD_ITEMS = 8 if rung == "quad8" else 4
                fn = kernels.get("ss2d_scan_fwd", backend, "quad" if rung == "quad8" else rung)
                y1, y2 = (cp.asarray(fn(*args, delta_softplus=True)[0]) for _ in range(2))
                times[rung] = ms = common.median_ms(lambda fn=fn: fn(*args, delta_softplus=True),
                                                    reps=20, warmup=2)
                err = float(cp.abs(y1 - ref).max() / cp.abs(ref).max())
                print(f"| {b}x{Di}x{H}x{W} | {backend}/{rung} | {ms:.3f} ms | {floor / ms:.0%} of {floor:.3f} | "
                      f"x{times['composed'] / ms:.2f} vs composed | err {err:.1e} | "
                      f"deterministic {bool((y1 == y2).all())} |", flush=True)
            quad_cupy.QUAD_ITEMS = 4
        del args, ref
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
