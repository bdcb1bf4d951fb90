"""Benchmark the attention kernels (issue: attention kernels, section 3). Needs a CUDA GPU.

Float32, side by side in one run on one card:

- Swin-T stage-0 window attention: batch 64 -> 4096 windows of 7x7 = 49 tokens, 3 heads,
  head dim 32, relative-position bias and shift mask; forward and forward+backward.
- DMCA channel attention at SparX-Mamba-T shapes, batch 64, 4 groups: C 192, reduced 7x7,
  full 28x28 (stage index 1) and C 320, reduced 7x7, full 14x14 (stage index 2).

For every kernel version of both backends and for two PyTorch forms (the explicit
matmul-softmax-matmul, and ``scaled_dot_product_attention`` with bias and mask folded into
the heads): median time (CUDA events, inputs rotated over several sets; the median of --rounds
rounds in which every version and torch form takes its turn), the byte and flop
floors from the copy bandwidth and fp32 matmul rate (TF32 off) measured in this run, the
fraction of the floor, and the ratio to each torch form (> 1: the kernel is faster).

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_attention.py [--json out.json] [--sweep] [--dmca-only]

Byte floors count each input read once and each output written once, with the outputs
the ops' contracts return: the forward writes ``out`` and the probabilities (the cache's
``probs``/``attn``); the backward reads ``dout``, q, k, v and the probabilities and writes
dq, dk, dv (and dbias). Flop floors count the four (forward) or eight (backward)
``N x N x d`` products' multiply-adds as 2 flops each; softmax arithmetic is not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import (copy_bandwidth_gbs, fmt_table, fp32_matmul_tflops, median_ms,  # noqa: E402
                               use_cupy_pool_for_numba, write_results_block)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Attention kernels"
BLOCK = ("<!-- attention:bench -->", "<!-- /attention:bench -->")


# ---------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------
def window_problem(batch=64, nW=64, heads=3, N=49, hd=32):
    Bw = batch * nW
    elem = 4
    qkv = Bw * heads * N * hd
    probs = Bw * heads * N * N
    tables = heads * N * N + nW * N * N
    fwd_bytes = elem * (3 * qkv + tables + qkv + probs)
    bwd_bytes = elem * (4 * qkv + probs + 3 * qkv + heads * N * N)
    pairs = Bw * heads
    return dict(name=f"window attn Bw={Bw} heads={heads} N={N} hd={hd}", batch=batch, nW=nW, heads=heads, N=N,
                hd=hd, fwd_bytes=fwd_bytes, fwdbwd_bytes=fwd_bytes + bwd_bytes,
                fwd_flops=pairs * 4 * N * N * hd, fwdbwd_flops=pairs * 12 * N * N * hd)


def dmca_problem(B=64, C=192, groups=4, Ls=49, L=784):
    g = C // groups
    elem = 4
    fwd_bytes = elem * (2 * B * C * Ls + B * C * L + B * C * L + B * groups * g * g)
    bwd_bytes = elem * (B * C * L + 2 * B * C * Ls + B * C * L + B * groups * g * g + 2 * B * C * Ls + B * C * L)
    pairs = B * groups
    fwd_flops = pairs * (2 * g * g * Ls + 2 * g * g * L)
    bwd_flops = pairs * (4 * g * g * L + 4 * g * g * Ls)
    return dict(name=f"DMCA B={B} C={C} groups={groups} Ls={Ls} L={L}", B=B, C=C, groups=groups, Ls=Ls, L=L,
                fwd_bytes=fwd_bytes, fwdbwd_bytes=fwd_bytes + bwd_bytes, fwd_flops=fwd_flops,
                fwdbwd_flops=fwd_flops + bwd_flops)


def _shift_mask(nW_side, M, shift):
    """Swin's mask for an (nW_side*M)^2 grid (spec swin.md section 7), as float32 (nW, N, N)."""
    H = nW_side * M
    img = np.zeros((H, H), np.int64)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
        for ws in (slice(0, -M), slice(-M, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(nW_side, M, nW_side, M).transpose(0, 2, 1, 3).reshape(-1, M * M)
    return np.where(win[:, None, :] != win[:, :, None], -100.0, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# torch forms
# ---------------------------------------------------------------------------------------
def torch_window_explicit(q, k, v, bias, mask, scale, nW):
    Bw, nH, N, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + bias
    attn = (attn.view(Bw // nW, nW, nH, N, N) + mask[None, :, None]).view(Bw, nH, N, N)
    return attn.softmax(-1) @ v


def torch_window_sdpa(q, k, v, bias, mask, scale, nW):
    import torch.nn.functional as F
    Bw, nH, N, hd = q.shape
    fold = lambda t: t.view(Bw // nW, nW * nH, N, hd)  # noqa: E731
    m = (mask[:, None] + bias[None]).reshape(nW * nH, N, N)
    return F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=m, scale=scale).reshape(Bw, nH, N, hd)


def torch_dmca_explicit(q, k, v, groups):
    B, C, Ls = q.shape
    g = C // groups
    qg, kg, vg = (t.view(B * groups, g, -1) for t in (q, k, v))
    attn = ((qg @ kg.transpose(-2, -1)) * (1.0 / math.sqrt(Ls))).softmax(-1)
    return (attn @ vg).view(B, C, -1)


def torch_dmca_sdpa(q, k, v, groups):
    import torch.nn.functional as F
    B, C, Ls = q.shape
    g = C // groups
    qg, kg, vg = (t.view(B * groups, g, -1) for t in (q, k, v))
    return F.scaled_dot_product_attention(qg, kg, vg).reshape(B, C, -1)


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def _kernel_versions(op):
    from sparx_ref.kernels import registry
    return [(e.backend, e.version, e.default) for e in registry.entries(op) if e.backend in ("cupy", "numba_cuda")]


def _fns(backend, kind, version):
    import importlib
    mod = importlib.import_module(f"sparx_ref.kernels.{backend}.attention")
    return getattr(mod, f"{kind}_attention_fwd_{version}"), getattr(mod, f"{kind}_attention_bwd_{version}")


def _kernel_runs(op):
    """(backend, version, default, launch mode) to time: every version as the library runs it
    (launch mode None), and each numba_cuda version once more with Numba's own dispatcher
    launch (mode "0" of sparx_ref/kernels/numba_cuda/_launch.py): before/after in one run."""
    out = []
    for backend, version, default in _kernel_versions(op):
        out.append((backend, version, default, None))
        if backend == "numba_cuda":
            out.append((backend, version, default, "0"))
    return out


def _label(backend, version, default, launch_mode):
    tail = " [dispatcher launch]" if launch_mode == "0" else ""
    return f"{backend} {version}{' (default)' if default else ''}{tail}"


def _with_launch_mode(fns, launch_mode):
    """The (fwd, bwd) pair, each run under the given Numba launch mode (None: unchanged)."""
    if launch_mode is None:
        return fns
    from sparx_ref.kernels.numba_cuda import _launch

    def wrap(fn):
        def run(*args, **kwargs):
            old = _launch.set_mode(launch_mode)
            try:
                return fn(*args, **kwargs)
            finally:
                _launch.set_mode(old)
        return run
    return tuple(wrap(fn) for fn in fns)


def _to_backend(backend, t):
    if backend == "cupy":
        import cupy
        return cupy.asarray(t)
    from numba import cuda
    return cuda.as_cuda_array(t)


def _time_rounds(pairs, reps, rounds):
    """[(fwd ms, fwd+bwd ms)] for [(fwd call, fwd+bwd call)]: every call is timed once per round,
    all of them taking turns, and each figure is the median of its rounds. The Numba DMCA calls
    are host-bound, and a slow spell of the host would otherwise land on whichever version
    happened to be measured then (one H100 run timed the same Numba launches at 0.44 and 0.59 ms)."""
    times = [([], []) for _ in pairs]
    for _ in range(rounds):
        for (fwd, fb), (t_fwd, t_fb) in zip(pairs, times):
            t_fwd.append(median_ms(fwd, reps))
            t_fb.append(median_ms(fb, reps))
    return [(statistics.median(t_fwd), statistics.median(t_fb)) for t_fwd, t_fb in times]


def _row(label, ms_fwd, ms_fb, prob, floors, torch_ms):
    bw, rate = floors
    fl_f = max(prob["fwd_bytes"] / (bw * 1e9), prob["fwd_flops"] / (rate * 1e12)) * 1e3
    fl_fb = max(prob["fwdbwd_bytes"] / (bw * 1e9), prob["fwdbwd_flops"] / (rate * 1e12)) * 1e3
    r = dict(label=label, fwd_ms=ms_fwd, fwdbwd_ms=ms_fb, fwd_floor_ms=fl_f, fwdbwd_floor_ms=fl_fb,
             fwd_frac=fl_f / ms_fwd, fwdbwd_frac=fl_fb / ms_fb)
    for tname, (tf, tfb) in torch_ms.items():
        r[f"fwd_vs_{tname}"] = tf / ms_fwd
        r[f"fwdbwd_vs_{tname}"] = tfb / ms_fb
    return r


def bench_window(floors, sets, reps, sweep, rounds=3):
    import torch
    from sparx_ref.ref.window_attention import window_attention_fwd as ref_fwd
    from sparx_ref.testing import rel_err
    prob = window_problem()
    batch, nW, nH, N, hd = prob["batch"], prob["nW"], prob["heads"], prob["N"], prob["hd"]
    Bw = batch * nW
    scale = hd ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    mask = torch.from_numpy(_shift_mask(8, 7, 3)).cuda()
    inputs = [dict(q=rnd(Bw, nH, N, hd), k=rnd(Bw, nH, N, hd), v=rnd(Bw, nH, N, hd), bias=0.5 * rnd(nH, N, N),
                   dout=rnd(Bw, nH, N, hd)) for _ in range(sets)]
    runs = []        # (label, fwd call, fwd+bwd call, output error vs float64 or None), timed together
    # torch forms
    for tname, form in (("explicit", torch_window_explicit), ("sdpa", torch_window_sdpa)):
        leaves = [{n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "bias")} for x in inputs]
        it = [0]

        def fwd(form=form, leaves=leaves, it=it):
            x = leaves[it[0] % sets]
            it[0] += 1
            with torch.no_grad():
                return form(x["q"], x["k"], x["v"], x["bias"], mask, scale, nW)

        def fb(form=form, leaves=leaves, it=it):
            i = it[0] % sets
            x = leaves[i]
            it[0] += 1
            out = form(x["q"], x["k"], x["v"], x["bias"], mask, scale, nW)
            return torch.autograd.grad(out, [x["q"], x["k"], x["v"], x["bias"]], inputs[i]["dout"])
        runs.append((f"torch {tname}", fwd, fb, None))
    # correctness of the kernels at this shape, on a slice of windows, vs the float64 reference
    sl = slice(0, 2 * nW)
    x0 = inputs[0]
    ref_out, _ = ref_fwd(*(x0[n][sl].double().cpu().numpy() for n in ("q", "k", "v")),
                         x0["bias"].double().cpu().numpy(), mask.double().cpu().numpy())
    sweeps = []
    for backend, version, default, launch_mode in _kernel_runs("window_attention_fwd"):
        fwd_k, bwd_k = _with_launch_mode(_fns(backend, "window", version), launch_mode)
        xs = [{n: _to_backend(backend, x[n]) for n in ("q", "k", "v", "bias", "dout")} for x in inputs]
        mk = _to_backend(backend, mask)
        out, _ = fwd_k(xs[0]["q"], xs[0]["k"], xs[0]["v"], xs[0]["bias"], mk)
        out_host = out.get() if hasattr(out, "get") else out.copy_to_host()
        err = rel_err(out_host[sl], ref_out)
        it = [0]

        def kf(fwd_k=fwd_k, xs=xs, mk=mk, it=it):
            x = xs[it[0] % sets]
            it[0] += 1
            return fwd_k(x["q"], x["k"], x["v"], x["bias"], mk)

        def kfb(fwd_k=fwd_k, bwd_k=bwd_k, xs=xs, mk=mk, it=it):
            x = xs[it[0] % sets]
            it[0] += 1
            _, cache = fwd_k(x["q"], x["k"], x["v"], x["bias"], mk)
            return bwd_k(x["dout"], cache)
        runs.append((_label(backend, version, default, launch_mode), kf, kfb, err))
        if sweep and version == "static" and launch_mode is None:
            sweeps.append((backend, version, kf, kfb))
    times = _time_rounds([(f, fb) for _, f, fb, _ in runs], reps, rounds)
    rows, torch_ms = _rows_from_runs(runs, times, prob, floors)
    for backend, version, kf, kfb in sweeps:
        rows += _sweep_window(backend, version, kf, kfb, prob, floors, torch_ms, reps)
    return prob, rows


def _sweep_window(backend, version, kf, kfb, prob, floors, torch_ms, reps):
    """Block size / slab count of the fused or static kernels (module knobs, restored after).
    Numba's static kernels are compiled per thread count (about 20 s each): only the slab
    count is swept there."""
    import importlib
    mod = importlib.import_module(f"sparx_ref.kernels.{backend}.attention")
    if backend == "cupy":
        tname, pname = ("_STATIC_THREADS" if version == "static" else "_FUSED_THREADS"), "_NPART_MAX"
        thread_opts = (128, 256)
    else:
        tname, pname = ("STATIC_THREADS" if version == "static" else "FUSED_THREADS"), "NPART_MAX"
        thread_opts = (getattr(mod, tname),)
    t0, p0 = getattr(mod, tname), getattr(mod, pname)
    rows = []
    try:
        for threads in thread_opts:
            for npart in (256, 512, 1024):
                setattr(mod, tname, threads)
                setattr(mod, pname, npart)
                r = _row(f"  sweep {backend} {version} threads={threads} npart={npart}", median_ms(kf, reps),
                         median_ms(kfb, reps), prob, floors, torch_ms)
                rows.append(r)
    finally:
        setattr(mod, tname, t0)
        setattr(mod, pname, p0)
    return rows


def numba_overheads():
    """Host-side cost of Numba's pieces of one kernel call (microseconds), to explain its times:
    Numba's own way (allocation, DeviceNDArray.reshape, dispatcher launch) and the light path of
    sparx_ref/kernels/numba_cuda/_launch.py (FlatView, launch), measured side by side."""
    import torch
    from numba import cuda

    from sparx_ref.kernels.numba_cuda import _launch
    from sparx_ref.kernels.numba_cuda import attention as A
    n = 200
    out = {}
    a = cuda.device_array(1024, dtype=np.float32)
    b = cuda.device_array(1024, dtype=np.float32)
    kern = A._k(np.float32, "sum_leading")
    bmm = A._k(np.float32, "bmm_naive")
    i1, i0, one = np.int64(1), np.int64(0), np.float32(1)
    bmm_scalars = (i1, i1, i1, i1, i0, i0, i0, i0, i0, i0, one)
    kern[1, 32](a, b, i1, np.int64(1024))
    bmm[1, 32](a, a, b, *bmm_scalars)
    old_mode = _launch.set_mode("1")
    try:
        fa, fb = _launch.flat(a), _launch.flat(b)
        for _ in range(2):                       # first call plans (through the dispatcher), second is fast
            _launch.launch(kern, 1, 32, fa, fb, i1, np.int64(1024))
            _launch.launch(bmm, 1, 32, fa, fa, fb, *bmm_scalars)
        torch.cuda.synchronize()
        cases = (
            ("device_array (allocation)", lambda: cuda.device_array((64, 49), dtype=np.float32)),
            ("reshape to 1-D (numba reshape)", lambda: a.reshape(1024)),
            ("launch, 4 arguments", lambda: kern[1, 32](a, b, i1, np.int64(1024))),
            ("launch, 14 arguments", lambda: bmm[1, 32](a, a, b, *bmm_scalars)),
            ("fast: flat view", lambda: _launch.flat(a)),
            ("fast: launch, 4 arguments", lambda: _launch.launch(kern, 1, 32, fa, fb, i1, np.int64(1024))),
            ("fast: launch, 14 arguments", lambda: _launch.launch(bmm, 1, 32, fa, fa, fb, *bmm_scalars)),
            ("fast: 3 flat views + launch, 14 arguments", lambda: _launch.launch(
                bmm, 1, 32, _launch.flat(a), _launch.flat(a), _launch.flat(b), *bmm_scalars)),
        )
        fast_before = _launch.stats()["fast"]
        for name, fn in cases:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            out[name] = (time.perf_counter() - t) / n * 1e6
        fast_launches = _launch.stats()["fast"] - fast_before
    finally:
        _launch.set_mode(old_mode)
    # the fast rows must really have taken the fast path (3 cases x (n + 1) calls)
    if fast_launches != 3 * (n + 1):
        print(f"WARNING: only {fast_launches} of {3 * (n + 1)} 'fast:' launches took the fast path")
        out["fast path launches (expected 603)"] = float(fast_launches)
    return out


def bench_dmca(prob, floors, sets, reps, rounds=3):
    import torch
    from sparx_ref.ref.dmca import dmca_attention_fwd as ref_fwd
    from sparx_ref.testing import rel_err
    B, C, G, Ls, L = prob["B"], prob["C"], prob["groups"], prob["Ls"], prob["L"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    inputs = [dict(q=rnd(B, C, Ls), k=rnd(B, C, Ls), v=rnd(B, C, L), dout=rnd(B, C, L)) for _ in range(sets)]
    runs = []        # (label, fwd call, fwd+bwd call, output error vs float64 or None), timed together
    for tname, form in (("explicit", torch_dmca_explicit), ("sdpa", torch_dmca_sdpa)):
        leaves = [{n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v")} for x in inputs]
        it = [0]

        def fwd(form=form, leaves=leaves, it=it):
            x = leaves[it[0] % sets]
            it[0] += 1
            with torch.no_grad():
                return form(x["q"], x["k"], x["v"], G)

        def fb(form=form, leaves=leaves, it=it):
            i = it[0] % sets
            x = leaves[i]
            it[0] += 1
            out = form(x["q"], x["k"], x["v"], G)
            return torch.autograd.grad(out, [x["q"], x["k"], x["v"]], inputs[i]["dout"])
        runs.append((f"torch {tname}", fwd, fb, None))
    x0 = inputs[0]
    ref_out, _ = ref_fwd(*(x0[n][:2].double().cpu().numpy() for n in ("q", "k", "v")), groups=G)
    for backend, version, default, launch_mode in _kernel_runs("dmca_attention_fwd"):
        fwd_k, bwd_k = _with_launch_mode(_fns(backend, "dmca", version), launch_mode)
        xs = [{n: _to_backend(backend, x[n]) for n in ("q", "k", "v", "dout")} for x in inputs]
        out, _ = fwd_k(xs[0]["q"], xs[0]["k"], xs[0]["v"], G)
        out_host = out.get() if hasattr(out, "get") else out.copy_to_host()
        err = rel_err(out_host[:2], ref_out)
        it = [0]

        def kf(fwd_k=fwd_k, xs=xs, it=it):
            x = xs[it[0] % sets]
            it[0] += 1
            return fwd_k(x["q"], x["k"], x["v"], G)

        def kfb(fwd_k=fwd_k, bwd_k=bwd_k, xs=xs, it=it):
            x = xs[it[0] % sets]
            it[0] += 1
            _, cache = fwd_k(x["q"], x["k"], x["v"], G)
            return bwd_k(x["dout"], cache)
        runs.append((_label(backend, version, default, launch_mode), kf, kfb, err))
    times = _time_rounds([(f, fb) for _, f, fb, _ in runs], reps, rounds)
    rows, _ = _rows_from_runs(runs, times, prob, floors)
    return rows


def _rows_from_runs(runs, times, prob, floors):
    """The table rows of one problem from its timed runs (torch forms first: the kernels' rows
    carry their ratios to them); also returns {torch form: (fwd ms, fwd+bwd ms)}."""
    torch_ms = {label.split(" ", 1)[1]: t for (label, *_), t in zip(runs, times) if label.startswith("torch ")}
    rows = []
    for (label, _, _, err), (t_fwd, t_fb) in zip(runs, times):
        if err is None:
            rows.append(dict(label=label, fwd_ms=t_fwd, fwdbwd_ms=t_fb))
        else:
            r = _row(label, t_fwd, t_fb, prob, floors, torch_ms)
            r["rel_err_out_vs_f64"] = err
            rows.append(r)
    return rows, torch_ms


def _print(title, prob, rows, floors):
    print(f"\n## {title}: {prob['name']}  (floor fwd {rows[-1].get('fwd_floor_ms', float('nan')):.4f} ms, "
          f"fwd+bwd {rows[-1].get('fwdbwd_floor_ms', float('nan')):.4f} ms)")
    print(f"{'version':44s} {'fwd ms':>9s} {'frac':>6s} {'/expl':>6s} {'/sdpa':>6s} | {'f+b ms':>9s} {'frac':>6s} "
          f"{'/expl':>6s} {'/sdpa':>6s} {'err':>8s}")
    for r in rows:
        f = lambda key, fmt="{:6.2f}": fmt.format(r[key]) if key in r else " " * 6  # noqa: E731
        print(f"{r['label']:44s} {r['fwd_ms']:9.4f} {f('fwd_frac')} {f('fwd_vs_explicit')} {f('fwd_vs_sdpa')} | "
              f"{r['fwdbwd_ms']:9.4f} {f('fwdbwd_frac')} {f('fwdbwd_vs_explicit')} {f('fwdbwd_vs_sdpa')} "
              f"{f('rel_err_out_vs_f64', '{:8.1e}')}")


def markdown(results):
    """The Markdown tables of one run (what RESULTS.md's attention block holds)."""
    out = [f"Card: {results['card']}, {results['date']}; measured in the same run: copy "
           f"{results['copy_gbs']:.0f} GB/s, fp32 matmul (TF32 off) {results['fp32_tflops']:.1f} TFLOP/s. "
           "frac = floor / time; /expl, /sdpa = torch time / kernel time (> 1: kernel faster)."]
    for item in results["problems"]:
        prob, rows = item["problem"], item["rows"]
        k = next(r for r in rows if "fwd_floor_ms" in r)
        out.append(f"\n**{prob['name']}** (floor: fwd {k['fwd_floor_ms']:.4f} ms, fwd+bwd {k['fwdbwd_floor_ms']:.4f} ms)\n")
        body = []
        for r in rows:
            if r["label"].lstrip().startswith("sweep"):
                continue                           # the sweeps stay in the log / JSON
            g = lambda key: r.get(key, "")  # noqa: E731
            body.append([r["label"].strip(), r["fwd_ms"], g("fwd_frac"), g("fwd_vs_explicit"), g("fwd_vs_sdpa"),
                         r["fwdbwd_ms"], g("fwdbwd_frac"), g("fwdbwd_vs_explicit"), g("fwdbwd_vs_sdpa")])
        out.append(fmt_table(["version", "fwd ms", "frac", "/expl", "/sdpa", "fwd+bwd ms", "frac", "/expl", "/sdpa"],
                             body))
    if "numba_overheads_us" in results:
        out.append("\nNumba host cost per call (us): " + ", ".join(
            f"{k} {v:.1f}" for k, v in results["numba_overheads_us"].items()))
    return "\n".join(out)


def write_results(text):
    """Replace this script's block in RESULTS.md's "Attention kernels" section (others untouched)."""
    write_results_block(SECTION, *BLOCK, text, path=RESULTS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of timings, every version and torch form "
                    "taking turns; each figure is the median over the rounds")
    ap.add_argument("--sets", type=int, default=3, help="input sets rotated between calls (defeats L2 reuse)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the fused kernels' block size and slab count")
    ap.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--dmca-only", action="store_true",
                    help="quick check: DMCA tables and Numba host costs only (RESULTS.md left alone)")
    ap.add_argument("--numba-own-allocator", action="store_true",
                    help="keep Numba's default allocator (its frees synchronise the device)")
    args = ap.parse_args(argv)
    if not args.numba_own_allocator:
        use_cupy_pool_for_numba()
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs()
    rate = fp32_matmul_tflops()
    floors = (bw, rate)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"card: {card}   date: {stamp}   torch {torch.__version__}   python {platform.python_version()}")
    print(f"measured: copy bandwidth {bw:.0f} GB/s, fp32 matmul (TF32 off) {rate:.1f} TFLOP/s")
    results = dict(card=card, date=stamp, copy_gbs=bw, fp32_tflops=rate, problems=[])
    if not args.dmca_only:
        prob, rows = bench_window(floors, args.sets, args.reps, args.sweep, args.rounds)
        _print("window attention", prob, rows, floors)
        results["problems"].append(dict(problem=prob, rows=rows))
    for p in (dmca_problem(C=192, L=784), dmca_problem(C=320, L=196)):
        rows = bench_dmca(p, floors, args.sets, args.reps, args.rounds)
        _print("DMCA attention", p, rows, floors)
        results["problems"].append(dict(problem=p, rows=rows))
    over = numba_overheads()
    print("\nNumba host overheads per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in over.items()))
    results["numba_overheads_us"] = over
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print("\n" + text)
    if not (args.no_results or args.dmca_only):
        write_results(text)
    return results


if __name__ == "__main__":
    main()
