"""Benchmark the scan kernels (issue 5, section 4). Needs a CUDA GPU (the CPU part runs anywhere).

Float32, SparX-Mamba-T shapes at batch 64, side by side in one run on one card:

- selective scan, (channels x length) 4*192 x 3136, 4*384 x 784, 4*640 x 196, 4*1024 x 49,
  d_state 1, grouped B/C (K = 4), softplus, D and delta_bias: forward (every version) and
  forward+backward for every forward version paired with the backward of the same name (the
  backend's default backward where that name has none);
- cross_scan and cross_merge (every version) at x = (64, 192, 56, 56);
- ss2d_scan forward (and forward+backward): every fused rung vs composed (cross_scan + scan + cross_merge
  with our own kernels) at x = (64, 192, 56, 56);
- CPU: "numba_cpu" selective_scan_fwd at (1, 768, 3136) vs the reference op, 2 threads.

Per row: median time (CUDA events; in the scan section the median of --rounds rounds in which
the backends take turns, since a host-bound call at L = 49 swings with the host), the byte
floor (bytes at the device-copy bandwidth measured in this run), the fraction of the floor, and the ratio to the PyTorch equivalent
measured in this run (a pure-torch loop scan, mamba's ``selective_scan_ref`` style; plain-torch
cross-scan/merge as in VMamba; > 1: the kernel is faster). Floors count 4-byte elements:
scan fwd reads u, delta (b*KD*L each), B, C (b*K*N*L each), writes y (b*KD*L); scan bwd reads
u, delta, B, C, dy and writes du, ddelta, dB, dC; cross-scan reads x once and writes 4x,
cross-merge the reverse; ss2d fwd reads x (b*Di*L), delta, B, C and writes y (b*Di*L); ss2d bwd
reads x, dy, delta, B, C and writes dx, ddelta, dB, dC.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_scan.py [--json out.json] [--only scan,cross,ss2d,cpu]
        [--versions vec,warp] [--shapes 3136,784] [--backends cupy] [--no-torch]

``--versions``/``--shapes``/``--backends``/``--no-torch`` restrict the scan section (a short GPU call
comparing two rungs); the acceptance lines then judge only what ran. This script prints and
writes JSON; it does not edit RESULTS.md (its scan block is written from a full run's output).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")   # one stream: no host sync per array
HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import common  # noqa: E402

SCAN_SHAPES = [(64, 4 * 192, 3136), (64, 4 * 384, 784), (64, 4 * 640, 196), (64, 4 * 1024, 49)]
MAP_SHAPE = (64, 192, 56, 56)
K_GROUPS, NSTATE = 4, 1
GPU_BACKENDS = ("cupy", "numba_cuda")


# ---------------------------------------------------------------------------------------
# PyTorch equivalents
# ---------------------------------------------------------------------------------------
def torch_scan(u, delta, A, B, C, D, bias):
    """Pure-torch loop scan (grouped B/C, softplus): gates for all t at once, loop over L."""
    import torch
    import torch.nn.functional as F
    b, KD, L = u.shape
    K = B.shape[1]
    dt = F.softplus(delta + bias[:, None])
    Bx = B.repeat_interleave(KD // K, dim=1)                          # (b, KD, N, L)
    Cx = C.repeat_interleave(KD // K, dim=1)
    gate = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    dBu = dt[:, :, None, :] * Bx * u[:, :, None, :]
    h = u.new_zeros(b, KD, A.shape[1])
    ys = []
    for t in range(L):
        h = gate[..., t] * h + dBu[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    return torch.stack(ys, -1) + D[:, None] * u


def torch_cross_scan(x):
    B, C, H, W = x.shape
    xs = x.new_empty(B, 4, C, H * W)
    xs[:, 0] = x.flatten(2)
    xs[:, 1] = x.transpose(2, 3).flatten(2)
    xs[:, 2:] = xs[:, 0:2].flip(dims=[-1])
    return xs


def torch_cross_merge(ys, H, W):
    B, K, C, L = ys.shape
    ys = ys[:, 0:2] + ys[:, 2:4].flip(dims=[-1])
    y = ys[:, 0] + ys[:, 1].reshape(B, C, W, H).transpose(2, 3).reshape(B, C, L)
    return y.reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _time(fn, budget_ms=400.0, max_reps=30):
    """Median ms; the number of repetitions adapted to the call's length."""
    import torch
    torch.cuda.synchronize()
    t = common.median_ms(fn, reps=1, warmup=1)
    reps = int(max(3, min(max_reps, budget_ms / max(t, 1e-3))))
    return common.median_ms(fn, reps=reps, warmup=1)


def _fns(op, backend):
    from sparx_ref import kernels
    return {e.version: kernels.get(op, backend, e.version) for e in kernels.entries(op, backend)}


def native(backend, t):
    """A zero-copy view of a torch CUDA tensor as the backend's own array type (CuPy array or
    Numba device array), made once outside the timed region: the timings then hold the
    kernels' host work (checks, allocation, launch), not a per-call import of a foreign array."""
    if t is None:
        return None
    if backend == "cupy":
        import cupy
        return cupy.asarray(t)
    from numba import cuda
    return cuda.as_cuda_array(t)


def _rel(a, b):
    from sparx_ref.testing import rel_err
    return rel_err(a, b)


def scan_inputs(b, KD, L, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)   # noqa: E731
    return dict(u=r(b, KD, L), delta=r(b, KD, L) * 0.5, A=-torch.exp(r(KD, NSTATE)),
                B=r(b, K_GROUPS, NSTATE, L), C=r(b, K_GROUPS, NSTATE, L), D=r(KD), bias=r(KD) * 0.5)


def scan_bytes(b, KD, L, K=K_GROUPS, N=NSTATE):
    fwd = 4 * (3 * b * KD * L + 2 * b * K * N * L)
    bwd = 4 * (5 * b * KD * L + 4 * b * K * N * L)
    return fwd, bwd


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
def _scan_pairs(backend, versions=None, quick=False):
    """[(fwd version, fwd fn, bwd version, bwd fn)]: every forward version (restricted to
    `versions` if given; no naive when quick) with the backward of the same name, else the
    backend's default backward."""
    from sparx_ref import kernels
    bwds = _fns("selective_scan_bwd", backend)
    bwd_default = next(e.version for e in kernels.entries("selective_scan_bwd", backend) if e.default)
    out = []
    for version, fn in _fns("selective_scan_fwd", backend).items():
        if (versions and version not in versions) or (quick and version == "naive"):
            continue
        bv = version if version in bwds else bwd_default
        out.append((version, fn, bv, bwds[bv]))
    return out


def _is_default(op, backend, version):
    from sparx_ref import kernels
    return any(e.default for e in kernels.entries(op, backend) if e.version == version)


def bench_scan(bw, rows, results, backends, quick, versions=None, shapes=None, torch_baseline=True, rounds=3):
    import torch
    todo = SCAN_SHAPES[:1] + SCAN_SHAPES[-1:] if quick else SCAN_SHAPES
    if shapes:
        todo = [s for s in SCAN_SHAPES if s[2] in shapes]
    for (b, KD, L) in todo:
        x = scan_inputs(b, KD, L)
        args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["bias"])
        fwd_bytes, bwd_bytes = scan_bytes(b, KD, L)
        fl_fwd, fl_fb = fwd_bytes / bw * 1e3, (fwd_bytes + bwd_bytes) / bw * 1e3   # ms
        shape = f"{b}x{KD}x{L}"
        dy = torch.randn_like(x["u"])
        nan = float("nan")
        t_torch = t_torch_fb = y_torch = None
        if torch_baseline:
            with torch.no_grad():
                t_torch = _time(lambda: torch_scan(*args), budget_ms=300, max_reps=5)
                y_torch = torch_scan(*args)
            leaves = [a.clone().requires_grad_(True) for a in args]

            def torch_fb():
                for v in leaves:
                    v.grad = None
                torch_scan(*leaves).backward(dy)
            t_torch_fb = _time(torch_fb, budget_ms=300, max_reps=3)
            del leaves
            results.append(dict(section="scan", shape=shape, impl="torch loop", fwd_ms=t_torch, fb_ms=t_torch_fb))
            rows.append([f"scan fwd {shape}", "torch loop", t_torch, fl_fwd, fl_fwd / t_torch, 1.0])
            rows.append([f"scan fwd+bwd {shape}", "torch loop", t_torch_fb, fl_fb, fl_fb / t_torch_fb, 1.0])
        outs, grads = {}, {}
        calls = []      # (backend, fwd version, fwd fn, bwd version, forward call, forward+backward call)
        for backend in backends:
            nargs = [native(backend, a) for a in args]
            ndy = native(backend, dy)
            for version, fn, bversion, bfn in _scan_pairs(backend, versions, quick):
                def fwd_call(fn=fn, nargs=nargs):
                    return fn(*nargs, delta_softplus=True)

                def fb(fwd=fn, bwd=bfn, nargs=nargs, ndy=ndy):
                    _, cache = fwd(*nargs, delta_softplus=True)
                    return bwd(ndy, cache)
                calls.append((backend, version, bversion, fwd_call, fb))
        # Every call is timed once per round, the backends taking turns, and a figure is the median
        # of its rounds: at L = 49 a call is host-bound, and a slow spell of the host would
        # otherwise land on whichever backend happened to be measured then.
        t_fwd = [[] for _ in calls]
        t_fb = [[] for _ in calls]
        for _ in range(rounds):
            for i, (*_unused, fwd_call, fb) in enumerate(calls):
                t_fwd[i].append(_time(fwd_call))
                t_fb[i].append(_time(fb))
        for i, (backend, version, bversion, fwd_call, fb) in enumerate(calls):
            t = statistics.median(t_fwd[i])
            y, _ = fwd_call()
            outs[(backend, version)] = y
            err = _rel(y, y_torch) if y_torch is not None else nan
            vs = t_torch / t if t_torch else nan
            results.append(dict(section="scan", shape=shape, impl=f"{backend}/{version}", fwd_ms=t,
                                floor_ms=fl_fwd, frac=fl_fwd / t, vs_torch=vs, err_vs_torch=err,
                                rounds_ms=t_fwd[i], default=_is_default("selective_scan_fwd", backend, version)))
            rows.append([f"scan fwd {shape}", f"{backend}/{version}", t, fl_fwd, fl_fwd / t, vs])
            t = statistics.median(t_fb[i])
            grads[(backend, version, bversion)] = fb()
            vs = t_torch_fb / t if t_torch_fb else nan
            pair = version if bversion == version else f"{version}+bwd {bversion}"
            results.append(dict(section="scan", shape=shape, impl=f"{backend}/{pair} fwd+bwd", fb_ms=t,
                                floor_ms=fl_fb, frac=fl_fb / t, vs_torch=vs, bwd_version=bversion,
                                rounds_ms=t_fb[i],
                                default=_is_default("selective_scan_fwd", backend, version)
                                and _is_default("selective_scan_bwd", backend, bversion)))
            rows.append([f"scan fwd+bwd {shape}", f"{backend}/{pair}", t, fl_fb, fl_fb / t, vs])
        keys = list(outs)
        for k in keys[1:]:
            results.append(dict(section="check", shape=shape, a=str(keys[0]), b=str(k),
                                rel_err=_rel(outs[k], outs[keys[0]])))
        gkeys = list(grads)
        for k in gkeys[1:]:    # every gradient of every pair against the first pair's
            results.append(dict(section="check", shape=shape, a=str(gkeys[0]), b=str(k), rel_err=max(
                _rel(grads[k][name], grads[gkeys[0]][name]) for name in ("u", "delta", "A", "B", "C", "D",
                                                                          "delta_bias"))))
        del x, args, outs, grads, y_torch, calls
        torch.cuda.empty_cache()


def bench_cross(bw, rows, results, backends, quick):
    import torch
    b, C, H, W = MAP_SHAPE
    L = H * W
    x = torch.randn(b, C, H, W, device="cuda")
    ys = torch.randn(b, 4, C, L, device="cuda")
    floor = 4 * 5 * b * C * L / bw * 1e3
    t_scan = _time(lambda: torch_cross_scan(x))
    t_merge = _time(lambda: torch_cross_merge(ys, H, W))
    ref_scan, ref_merge = torch_cross_scan(x), torch_cross_merge(ys, H, W)
    shape = f"{b}x{C}x{H}x{W}"
    rows.append([f"cross_scan {shape}", "torch", t_scan, floor, floor / t_scan, 1.0])
    rows.append([f"cross_merge {shape}", "torch", t_merge, floor, floor / t_merge, 1.0])
    results.append(dict(section="cross", impl="torch", scan_ms=t_scan, merge_ms=t_merge, floor_ms=floor))
    for backend in backends:
        nx, nys = native(backend, x), native(backend, ys)
        for version, fn in _fns("cross_scan", backend).items():
            t = _time(lambda fn=fn: fn(nx))
            err = _rel(fn(nx), ref_scan)
            rows.append([f"cross_scan {shape}", f"{backend}/{version}", t, floor, floor / t, t_scan / t])
            results.append(dict(section="cross", op="cross_scan", impl=f"{backend}/{version}", ms=t,
                                floor_ms=floor, frac=floor / t, vs_torch=t_scan / t, err=err,
                                default=_is_default("cross_scan", backend, version)))
        for version, fn in _fns("cross_merge", backend).items():
            t = _time(lambda fn=fn: fn(nys, H, W))
            err = _rel(fn(nys, H, W), ref_merge)
            rows.append([f"cross_merge {shape}", f"{backend}/{version}", t, floor, floor / t, t_merge / t])
            results.append(dict(section="cross", op="cross_merge", impl=f"{backend}/{version}", ms=t,
                                floor_ms=floor, frac=floor / t, vs_torch=t_merge / t, err=err,
                                default=_is_default("cross_merge", backend, version)))
    del x, ys
    torch.cuda.empty_cache()


def bench_ss2d(bw, rows, results, backends, quick):
    import torch
    b, Di, H, W = MAP_SHAPE
    L = H * W
    x = scan_inputs(b, 4 * Di, L, seed=1)
    xm = torch.randn(b, Di, H, W, device="cuda")
    args = (xm, x["delta"], x["A"], x["B"], x["C"], x["D"], x["bias"])
    dy = torch.randn(b, Di, H, W, device="cuda")
    fwd_bytes = 4 * (2 * b * Di * L + b * 4 * Di * L + 2 * b * 4 * NSTATE * L)
    bwd_bytes = 4 * (11 * b * Di * L + 4 * b * 4 * NSTATE * L)
    fl_fwd, fl_fb = fwd_bytes / bw * 1e3, (fwd_bytes + bwd_bytes) / bw * 1e3
    shape = f"x {b}x{Di}x{H}x{W}"

    def torch_ss2d():
        xs = torch_cross_scan(xm).reshape(b, 4 * Di, L)
        y = torch_scan(xs, x["delta"], x["A"], x["B"], x["C"], x["D"], x["bias"])
        return torch_cross_merge(y.reshape(b, 4, Di, L), H, W)
    with torch.no_grad():
        t_torch = _time(torch_ss2d, budget_ms=300, max_reps=3)
        y_torch = torch_ss2d()
    rows.append([f"ss2d fwd {shape}", "torch", t_torch, fl_fwd, fl_fwd / t_torch, 1.0])
    results.append(dict(section="ss2d", impl="torch", fwd_ms=t_torch, floor_ms=fl_fwd))
    for backend in backends:
        times = {}
        nargs = [native(backend, a) for a in args]
        ndy = native(backend, dy)
        for version, fn in _fns("ss2d_scan_fwd", backend).items():
            t = _time(lambda fn=fn: fn(*nargs, delta_softplus=True))
            times[version] = t
            err = _rel(fn(*nargs, delta_softplus=True)[0], y_torch)
            rows.append([f"ss2d fwd {shape}", f"{backend}/{version}", t, fl_fwd, fl_fwd / t, t_torch / t])
            results.append(dict(section="ss2d", impl=f"{backend}/{version}", fwd_ms=t, floor_ms=fl_fwd,
                                frac=fl_fwd / t, vs_torch=t_torch / t, err_vs_torch=err))
        # acceptance: the default fused forward (the fastest fused rung) against composed
        from sparx_ref import kernels
        fused = next(e.version for e in kernels.entries("ss2d_scan_fwd", backend) if e.default)
        if fused == "composed":
            fused = min((v for v in times if v != "composed"), key=times.get)
        results.append(dict(section="ss2d", impl=f"{backend}/{fused}", fused_speedup=times["composed"] / times[fused],
                            fused_ms=times[fused], floor_ms=fl_fwd, frac=fl_fwd / times[fused]))
        bwds = _fns("ss2d_scan_bwd", backend)
        fwds = _fns("ss2d_scan_fwd", backend)
        for version in bwds:
            def fb(f=fwds[version], g=bwds[version], nargs=nargs, ndy=ndy):
                _, cache = f(*nargs, delta_softplus=True)
                return g(ndy, cache)
            t = _time(fb)
            rows.append([f"ss2d fwd+bwd {shape}", f"{backend}/{version}", t, fl_fb, fl_fb / t, float("nan")])
            results.append(dict(section="ss2d", impl=f"{backend}/{version} fwd+bwd", fb_ms=t, floor_ms=fl_fb,
                                frac=fl_fb / t))
    del x, xm, args, dy
    torch.cuda.empty_cache()


def bench_cpu(rows, results, threads=2):
    import numba
    from sparx_ref.kernels.numba_cpu.scan import selective_scan_fwd as cpu_fwd
    from sparx_ref.ref.scan import selective_scan_fwd as ref_fwd
    b, KD, L = 1, 768, 3136
    rng = np.random.default_rng(0)
    f = np.float32
    u, delta = rng.standard_normal((b, KD, L)).astype(f), (rng.standard_normal((b, KD, L)) * 0.5).astype(f)
    A = (-np.exp(rng.standard_normal((KD, 1)))).astype(f)
    B, C = rng.standard_normal((b, 4, 1, L)).astype(f), rng.standard_normal((b, 4, 1, L)).astype(f)
    D, bias = rng.standard_normal(KD).astype(f), (rng.standard_normal(KD) * 0.5).astype(f)
    args = (u, delta, A, B, C, D, bias, True)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        t_kernel = common.cpu_median_ms(lambda: cpu_fwd(*args), reps=9, warmup=2)
    finally:
        numba.set_num_threads(old)
    t_ref = common.cpu_median_ms(lambda: ref_fwd(*args), reps=5, warmup=1)
    err = _rel(cpu_fwd(*args)[0], ref_fwd(*[a.astype(np.float64) if isinstance(a, np.ndarray) else a
                                            for a in args])[0])
    bw = common.cpu_copy_bandwidth_gbs(threads=min(threads, numba.config.NUMBA_NUM_THREADS)) * 1e9
    floor = 4 * (3 * b * KD * L + 2 * b * 4 * L) / bw * 1e3
    rows.append([f"cpu scan fwd {b}x{KD}x{L}", f"numba_cpu ({threads} thr)", t_kernel, floor, floor / t_kernel,
                 t_ref / t_kernel])
    rows.append([f"cpu scan fwd {b}x{KD}x{L}", "ref (numpy)", t_ref, floor, floor / t_ref, 1.0])
    results.append(dict(section="cpu", kernel_ms=t_kernel, ref_ms=t_ref, speedup=t_ref / t_kernel,
                        cpu_copy_gbs=bw / 1e9, floor_ms=floor, frac=floor / t_kernel, err=err, threads=threads))


def acceptance(results):
    """The issue's acceptance criteria on this run's numbers, one line each: the faster GPU
    backend's default version must reach the fraction of the floor, and the other backend must
    be within 1.5x of it."""
    out = []
    by = {}
    for r in results:
        by.setdefault(r.get("section"), []).append(r)

    def judge(label, rows, need):
        """rows: {backend: result with 'frac'}."""
        best = max(rows, key=lambda k: rows[k]["frac"])
        slow = max((rows[best]["frac"] / rows[k]["frac"] for k in rows if k != best), default=1.0)
        ok = rows[best]["frac"] >= need and slow <= 1.5
        out.append(f"{'PASS' if ok else 'FAIL'} {label}: {best} {rows[best]['frac']:.0%} of floor (need "
                   f"{need:.0%}); other backend {slow:.2f}x slower (need <= 1.5x)")

    scan = by.get("scan", [])
    for (b, KD, L) in SCAN_SHAPES:
        shape = f"{b}x{KD}x{L}"
        rows = [r for r in scan if r["shape"] == shape]
        fwd = {r["impl"].split("/")[0]: r for r in rows if r.get("default") and "fwd_ms" in r}
        fb = {r["impl"].split("/")[0]: r for r in rows if r.get("default") and "fb_ms" in r}
        for kind, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fb_ms")):   # the best rung of each backend
            for backend in sorted({r["impl"].split("/")[0] for r in rows if key in r} - {"torch loop"}):
                best = max((r for r in rows if key in r and r["impl"].startswith(backend + "/")),
                           key=lambda r: r["frac"])
                out.append(f"INFO scan {kind} {shape}: best {best['impl']} {best['frac']:.0%} of floor")
        if fwd:
            judge(f"scan fwd {shape}", fwd, 0.3 if L == 49 else 0.5)
        if fb:
            judge(f"scan fwd+bwd {shape}", fb, 0.35)
    for op in ("cross_scan", "cross_merge"):      # each backend's default version
        rows = {r["impl"].split("/")[0]: r for r in by.get("cross", []) if r.get("op") == op and r.get("default")}
        if rows:
            judge(op, rows, 0.6)
    # ss2d: the faster backend's default fused forward >= 1.3x faster than its own composed path;
    # the other backend's fused forward within 1.5x of it
    fused = {r["impl"].split("/")[0]: r for r in by.get("ss2d", []) if "fused_speedup" in r}
    if fused:
        best = min(fused, key=lambda k: fused[k]["fused_ms"])
        slow = max((fused[k]["fused_ms"] / fused[best]["fused_ms"] for k in fused if k != best), default=1.0)
        ok = fused[best]["fused_speedup"] >= 1.3 and slow <= 1.5
        others = "; ".join(f"{r['impl']} {r['fused_speedup']:.2f}x its composed" for k, r in fused.items() if k != best)
        out.append(f"{'PASS' if ok else 'FAIL'} ss2d fused fwd: {fused[best]['impl']} {fused[best]['fused_speedup']:.2f}x "
                   f"faster than composed (need 1.3x); other backend {slow:.2f}x slower (need <= 1.5x)"
                   + (f" [{others}]" if others else ""))
    for r in by.get("cpu", []):
        out.append(f"{'PASS' if r['speedup'] >= 4 else 'FAIL'} numba_cpu scan fwd: {r['speedup']:.1f}x the "
                   f"reference on {r['threads']} threads (need 4x); {r['frac']:.0%} of the CPU copy floor "
                   f"({r['cpu_copy_gbs']:.1f} GB/s)")
    return out


HEADER = ["problem", "impl", "ms", "floor ms", "frac of floor", "x vs torch/ref"]


class _Rows(list):
    """Rows printed as table lines the moment they exist (a run cut short keeps its rows)."""

    def append(self, row):
        super().append(row)
        print(common.fmt_table(HEADER, [row]).splitlines()[-1], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--only", default="scan,cross,ss2d,cpu", help="comma list of sections")
    ap.add_argument("--quick", action="store_true", help="two scan shapes, no naive versions")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--versions", help="scan section: only these selective_scan_fwd versions, e.g. vec,warp "
                                       "(each timed fwd and fwd+bwd with the backward of the same name)")
    ap.add_argument("--rounds", type=int, default=3, help="scan section: rounds of timings, the backends taking "
                    "turns; each figure is the median over the rounds")
    ap.add_argument("--shapes", help="scan section: only the shapes with these L, e.g. 3136,49")
    ap.add_argument("--backends", help="GPU backends to run, e.g. cupy (default: every available one)")
    ap.add_argument("--no-torch", action="store_true", help="skip the pure-torch baselines of the scan "
                                                            "section (tens of seconds at L = 3136)")
    args = ap.parse_args(argv)
    versions = set(args.versions.split(",")) if args.versions else None
    shapes = {int(v) for v in args.shapes.split(",")} if args.shapes else None
    only = set(args.only.split(","))
    rows, results = _Rows(), []
    print(common.fmt_table(HEADER, []), flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    gpu_sections = only & {"scan", "cross", "ss2d"}
    if gpu_sections:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA GPU: GPU sections skipped")
            gpu_sections = set()
    if gpu_sections:
        from sparx_ref import kernels
        backends = [b for b in GPU_BACKENDS if kernels.available(b)
                    and (not args.backends or b in args.backends.split(","))]
        if "cupy" in backends:
            common.use_cupy_pool_for_numba()
        bw = common.copy_bandwidth_gbs() * 1e9
        meta.update(card=common.card(), copy_gbs=bw / 1e9, fp32_tflops=common.fp32_matmul_tflops())
        print(f"# {meta['card']}, {meta['date']}: device copy {meta['copy_gbs']:.0f} GB/s, "
              f"fp32 matmul (no TF32) {meta['fp32_tflops']:.1f} TFLOP/s", flush=True)
        for name, fn in (("scan", bench_scan), ("cross", bench_cross), ("ss2d", bench_ss2d)):
            if name in gpu_sections:
                if name == "scan":
                    bench_scan(bw, rows, results, backends, args.quick, versions, shapes, not args.no_torch,
                               args.rounds)
                else:
                    fn(bw, rows, results, backends, args.quick)
                if args.json:        # after every section: a run cut short keeps its numbers
                    Path(args.json).write_text(json.dumps(dict(meta=meta, results=results, rows=rows), indent=1))
    if "cpu" in only:
        bench_cpu(rows, results, args.cpu_threads)
    for line in acceptance(results):
        print("#", line)
    for r in results:
        if r.get("section") == "check":
            print("#", json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results, rows=rows), indent=1))


if __name__ == "__main__":
    main()
