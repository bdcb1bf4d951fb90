"""Run every attention kernel once on small shapes, for compute-sanitizer. Needs a CUDA GPU.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_attention.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_attention.py

Every version of both backends runs forward and backward on shapes that exercise the edges
(a 7x7 window with a ragged 4x4 tile, a head width that is not a multiple of 4, a mask,
several windows per bias slab; DMCA with a group wider than one 64-wide tile and a ragged
last column tile), and each result is checked against the float64 reference op, so the
exit status is 1 on a wrong answer as well as on a sanitizer report (``--error-exitcode``).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _host(a):
    return a.get() if hasattr(a, "get") else a.copy_to_host()


def main():
    from sparx_ref.kernels import registry
    from sparx_ref.ref import dmca as ref_dmca
    from sparx_ref.ref import window_attention as ref_wa
    from sparx_ref.testing import rel_err
    from sparx_ref.tolerances import tolerance

    tol = tolerance("float32", "kernel")
    rng = np.random.default_rng(0)
    failures = []

    # window attention: Bw = 2 images x 4 windows, 2 heads, 7x7 windows, hd 13
    Bw, nH, N, hd, nW = 8, 2, 49, 13, 4
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    q, k, v, dout = f(Bw, nH, N, hd), f(Bw, nH, N, hd), f(Bw, nH, N, hd), f(Bw, nH, N, hd)
    bias = 0.5 * f(nH, N, N)
    labels = rng.integers(0, 3, size=(nW, N))
    mask = np.where(labels[:, :, None] != labels[:, None, :], -100.0, 0.0).astype(np.float32)
    d64 = lambda a: a.astype(np.float64)  # noqa: E731
    ref_out, ref_cache = ref_wa.window_attention_fwd(d64(q), d64(k), d64(v), d64(bias), d64(mask))
    ref_g = ref_wa.window_attention_bwd(d64(dout), ref_cache)

    # DMCA: B 2, groups 2, g 70 (two 64-row tiles), Ls 49, L 200 (ragged last column tile)
    B, G, g, Ls, L = 2, 2, 70, 49, 200
    dq_, dk_, dv_, ddo = f(B, G * g, Ls), f(B, G * g, Ls), f(B, G * g, L), f(B, G * g, L)
    dref_out, dref_cache = ref_dmca.dmca_attention_fwd(d64(dq_), d64(dk_), d64(dv_), groups=G)
    dref_g = ref_dmca.dmca_attention_bwd(d64(ddo), dref_cache)

    for backend in ("cupy", "numba_cuda"):
        missing = registry.runtime_missing(backend)
        if missing:
            print(f"skip {backend}: {missing}")
            continue
        put = importlib.import_module("cupy").asarray if backend == "cupy" else \
            importlib.import_module("numba.cuda").to_device
        mod = importlib.import_module(f"sparx_ref.kernels.{backend}.attention")
        for version in registry.versions("window_attention_fwd", backend):
            out, cache = getattr(mod, f"window_attention_fwd_{version}")(put(q), put(k), put(v), put(bias), put(mask))
            grads = getattr(mod, f"window_attention_bwd_{version}")(put(dout), cache)
            errs = {"out": rel_err(_host(out), ref_out), "probs": rel_err(_host(cache["probs"]), ref_cache["probs"])}
            errs.update({f"d{n}": rel_err(_host(grads[n]), ref_g[n]) for n in ref_g})
            bad = {n: e for n, e in errs.items() if not e <= tol}
            print(f"window {backend:10s} {version:6s} max err {max(errs.values()):.2e}" + (f" FAIL {bad}" if bad else ""))
            if bad:
                failures.append((backend, "window", version, bad))
        for version in registry.versions("dmca_attention_fwd", backend):
            out, cache = getattr(mod, f"dmca_attention_fwd_{version}")(put(dq_), put(dk_), put(dv_), G)
            grads = getattr(mod, f"dmca_attention_bwd_{version}")(put(ddo), cache)
            errs = {"out": rel_err(_host(out), dref_out), "attn": rel_err(_host(cache["attn"]), dref_cache["attn"])}
            errs.update({f"d{n}": rel_err(_host(grads[n]), dref_g[n]) for n in dref_g})
            bad = {n: e for n, e in errs.items() if not e <= tol}
            print(f"dmca   {backend:10s} {version:6s} max err {max(errs.values()):.2e}" + (f" FAIL {bad}" if bad else ""))
            if bad:
                failures.append((backend, "dmca", version, bad))
    if failures:
        print(f"{len(failures)} kernel(s) disagree with the reference")
        return 1
    print("all attention kernels agree with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
