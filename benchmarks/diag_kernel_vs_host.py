"""Where does a kernel call's time go: the GPU kernels, or the host around them? (GPU only.)

For each case (the Numba-vs-CuPy gaps of issues 5 and 6 at SparX-Mamba-T shapes, batch 64),
both GPU backends side by side, every registered version or the ones named:

- ``event ms``: the median CUDA-event time of one call, as the benchmarks report it;
- ``kernel ms``: the summed device time of the CUDA kernels one call launches (torch.profiler,
  CUPTI sees Numba's and CuPy's kernels too), and how many kernels that is;
- ``host ms``: the wall time of issuing one call (many calls back to back, no synchronisation,
  so the GPU never makes the host wait).

event ~ kernel: the kernels are the limit; event ~ host > kernel: the host is.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/diag_kernel_vs_host.py [--cases scan49,cross,quad,dmca]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import common  # noqa: E402
from bench_attention import dmca_problem  # noqa: E402
from bench_scan import MAP_SHAPE, native, scan_inputs  # noqa: E402

BACKENDS = ("cupy", "numba_cuda")


def kernel_ms(fn, reps=20, per_kernel=None):
    """(summed CUDA kernel time per call in ms, kernels per call), from torch.profiler. A dict
    passed as ``per_kernel`` receives {kernel name: ms per call}."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "Memcpy" not in e.name
               and "Memset" not in e.name]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    if per_kernel is not None:
        for e in kernels:
            name = e.name.split("(")[0]
            per_kernel[name] = per_kernel.get(name, 0.0) + e.time_range.elapsed_us() / 1e3 / reps
    return total_us / 1e3 / reps, len(kernels) / reps


def host_ms(fn, reps=50):
    """Median over 5 batches of the wall time of issuing one call, no synchronisation inside."""
    import torch
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per.append((time.perf_counter() - t0) / reps * 1e3)
        torch.cuda.synchronize()
    return statistics.median(per)


def _versions(op, backend, wanted):
    from sparx_ref import kernels
    return [(e.version, kernels.get(op, backend, e.version)) for e in kernels.entries(op, backend)
            if (not wanted or e.version in wanted) and e.version != "naive"]


def cases(names, versions, sets=1):
    """Yield (case, backend/version, fn) for the named case groups; the scan and DMCA cases
    rotate over ``sets`` input sets (> 1: inputs no longer stay in L2 between calls, as in the
    benchmarks)."""
    import torch
    if "scan49" in names or "scan196" in names:
        for L, KD in ((49, 4096), (196, 2560)):
            if f"scan{L}" not in names:
                continue
            xs = [scan_inputs(64, KD, L, seed=i) for i in range(sets)]
            for backend in BACKENDS:
                from sparx_ref import kernels
                sets_args = [[native(backend, x[n]) for n in ("u", "delta", "A", "B", "C", "D", "bias")] for x in xs]
                sets_dy = [native(backend, torch.randn_like(x["u"])) for x in xs]
                bwd = kernels.get("selective_scan_bwd", backend)
                for v, fn in _versions("selective_scan_fwd", backend, versions):
                    nxt = _rotation(len(xs))
                    yield (f"scan fwd L={L}", f"{backend}/{v}",
                           (lambda fn=fn, nxt=nxt, sa=sets_args: fn(*sa[nxt()], delta_softplus=True)))

                    def fb(fn=fn, nxt=_rotation(len(xs)), sa=sets_args, sd=sets_dy, bwd=bwd):
                        i = nxt()
                        _, cache = fn(*sa[i], delta_softplus=True)
                        return bwd(sd[i], cache)
                    yield f"scan fwd+bwd L={L}", f"{backend}/{v}", fb
    if "cross" in names:
        b, C, H, W = MAP_SHAPE
        xm = torch.randn(b, C, H, W, device="cuda")
        ys = torch.randn(b, 4, C, H * W, device="cuda")
        for backend in BACKENDS:
            nx, nys = native(backend, xm), native(backend, ys)
            for v, fn in _versions("cross_scan", backend, versions):
                yield "cross_scan", f"{backend}/{v}", (lambda fn=fn: fn(nx))
            for v, fn in _versions("cross_merge", backend, versions):
                yield "cross_merge", f"{backend}/{v}", (lambda fn=fn: fn(nys, H, W))
    if "quad" in names:
        b, Di, H, W = MAP_SHAPE
        x = scan_inputs(b, 4 * Di, H * W, seed=1)
        xm = torch.randn(b, Di, H, W, device="cuda")
        args = (xm, x["delta"], x["A"], x["B"], x["C"], x["D"], x["bias"])
        for backend in BACKENDS:
            nargs = [native(backend, a) for a in args]
            for v, fn in _versions("ss2d_scan_fwd", backend, versions or ("quad", "composed")):
                yield "ss2d fwd", f"{backend}/{v}", (lambda fn=fn, a=nargs: fn(*a, delta_softplus=True))
    if "dmca" in names:
        for prob in (dmca_problem(), dmca_problem(C=320, L=196)):
            inputs = []
            for _ in range(sets):
                q = torch.randn(prob["B"], prob["C"], prob["Ls"], device="cuda")
                inputs.append((q, torch.randn_like(q), torch.randn(prob["B"], prob["C"], prob["L"], device="cuda"),
                               torch.randn(prob["B"], prob["C"], prob["L"], device="cuda")))
            for backend in BACKENDS:
                nat = [[native(backend, t) for t in x] for x in inputs]
                from sparx_ref import kernels
                bwd = kernels.get("dmca_attention_bwd", backend)
                for ver, fn in _versions("dmca_attention_fwd", backend, versions):
                    name = f"dmca C={prob['C']} L={prob['L']}"

                    def f(fn=fn, nxt=_rotation(sets), g=prob["groups"]):
                        nq, nk, nv, _ = nat[nxt()]
                        return fn(nq, nk, nv, g)
                    yield name + " fwd", f"{backend}/{ver}", f

                    def fb(fn=fn, bwd=bwd, nxt=_rotation(sets), g=prob["groups"]):
                        nq, nk, nv, nd = nat[nxt()]
                        _, cache = fn(nq, nk, nv, g)
                        return bwd(nd, cache)
                    yield name + " fwd+bwd", f"{backend}/{ver}", fb


def _rotation(n):
    """A counter 0, 1, ..., n-1, 0, ...: which input set the next call takes."""
    state = [-1]

    def nxt():
        state[0] = (state[0] + 1) % n
        return state[0]
    return nxt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="scan49,cross,quad,dmca")
    p.add_argument("--sets", type=int, default=1, help="input sets the scan and DMCA cases rotate over "
                   "(bench_attention.py uses 3)")
    p.add_argument("--per-kernel", action="store_true", help="also print each case's time by kernel name")
    p.add_argument("--versions", default="", help="comma-separated versions to keep (default: all but naive)")
    p.add_argument("--cprofile", default="", help="also cProfile the host side of the cases whose "
                   "'case impl' contains one of these ';'-separated texts (200 calls each; top 25 by own time)")
    args = p.parse_args(argv)
    common.use_cupy_pool_for_numba()
    names = set(args.cases.split(","))
    versions = tuple(v for v in args.versions.split(",") if v)
    print(f"# {common.card()}; device copy {common.copy_bandwidth_gbs():.0f} GB/s; {args.sets} input set(s)")
    rows = []
    for case, impl, fn in cases(names, versions, args.sets):
        ev = common.median_ms(fn, reps=30, warmup=3)
        by_name = {} if args.per_kernel else None
        kms, nk = kernel_ms(fn, per_kernel=by_name)
        if by_name:
            print(f"# {case} {impl} by kernel (ms per call): "
                  + "; ".join(f"{k} {v:.4f}" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])))
        hms = host_ms(fn)
        rows.append([case, impl, ev, kms, nk, hms])
        print(f"| {case} | {impl} | {ev:.4g} | {kms:.4g} | {nk:.3g} | {hms:.4g} |", flush=True)
        if args.cprofile and any(c and c in f"{case} {impl}" for c in args.cprofile.split(";")):
            print(f"# cProfile, 200 calls of {case} {impl}:\n" + common.profile_text(fn, 200), flush=True)
    print(common.fmt_table(["case", "impl", "event ms", "kernel ms", "kernels/call", "host ms"], rows))


if __name__ == "__main__":
    main()
