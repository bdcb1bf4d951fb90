"""Where the host time of a Numba-CUDA kernel call goes (issue 5 / 6: Numba within 1.5x of CuPy).
Needs CUDA. Not a benchmark: a cProfile of N calls of one small-shape op per backend, the GPU
synchronised only at the end, so the wall time per call is the host cost when it exceeds the
kernel time.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/profile_numba_host.py [--calls 200]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main():
    import torch
    from sparx_ref import kernels

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)   # noqa: E731
    b, KD, L = 64, 4096, 49
    scan_in = [r(b, KD, L), r(b, KD, L) * 0.5, -torch.exp(r(KD, 1)), r(b, 4, 1, L), r(b, 4, 1, L), r(KD),
               r(KD) * 0.5]
    B, C, Ls, Lf = 64, 192, 49, 784
    dmca_in = [r(B, C, Ls), r(B, C, Ls), r(B, C, Lf)]
    for backend in ("cupy", "numba_cuda"):
        if backend == "cupy":
            import cupy
            conv = cupy.asarray
        else:
            from numba import cuda
            conv = cuda.as_cuda_array
        scan = [conv(t) for t in scan_in]
        dmca = [conv(t) for t in dmca_in]
        fwd, bwd = kernels.get("selective_scan_fwd", backend), kernels.get("selective_scan_bwd", backend)
        dfwd, dbwd = kernels.get("dmca_attention_fwd", backend), kernels.get("dmca_attention_bwd", backend)
        dy = conv(r(b, KD, L))
        dout = conv(r(B, C, Lf))

        def calls():
            for _ in range(args.calls):
                y, cache = fwd(*scan, delta_softplus=True)
                bwd(dy, cache)
                out, dcache = dfwd(*dmca, 4)
                dbwd(dout, dcache)
        calls()                                   # compile, plan
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        calls()
        torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / args.calls * 1e6
        prof = cProfile.Profile()
        prof.enable()
        calls()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(f"\n# {backend}: scan fwd+bwd 64x4096x49 + DMCA fwd+bwd 64x192 (L 784): "
              f"{per:.0f} us per round of 4 calls (wall, unprofiled)")
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
