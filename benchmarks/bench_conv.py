"""Depthwise "same" convolution kernels vs PyTorch on the GPU (issue 7). Needs CUDA.

The depthwise convolutions of SparX-Mamba-T at batch 64, float32, one per distinct shape the
model meets (found by running the twin once on the CPU and recording every
:class:`~sparx_ref.torch_models.common.DepthwiseConv2d` and LayerScale input; the twin runs its
LayerScales, the 1x1 rows, through PyTorch on every backend), each timed:

- forward: ``out = conv(x, weight, bias)``;
- forward+backward: the forward, then dx, dweight, dbias for a given dout;

for every registered version of each GPU backend and for PyTorch's ``F.conv2d`` (NCHW, the
twins' layout; ``cudnn.benchmark`` off, as in the whole-model benchmark). Versions and torch take
turns, ``--rounds`` times; each figure is the median of its rounds. Floors: forward moves
2 x B*C*H*W elements (x in, out out) and does 2*kh*kw flops an element; the backward moves
3 x (x, dy in; dx out) and does 4*kh*kw; the floor is max(bytes / copy bandwidth, flops /
fp32 rate), both measured in the same run. The last row weighs every shape by how many times
one forward of the model meets it: the depthwise-conv time of one training step.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_conv.py [--json out.json] [--no-results]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (copy_bandwidth_gbs, fmt_table, fp32_matmul_tflops, median_ms,  # noqa: E402
                               use_cupy_pool_for_numba, write_results_block)

SECTION = "## Depthwise convolution kernels"
BLOCK = ("<!-- dwconv:bench -->", "<!-- /dwconv:bench -->")
OPS = ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd")


def model_shapes(name="sparx_mamba_t"):
    """{(C, H, W, k, has_bias): count} of the depthwise convs one forward of the twin runs
    (224x224 input, batch 1, on the CPU)."""
    import torch
    from sparx_ref.torch_models import build_model
    from sparx_ref.torch_models.common import DepthwiseConv2d, LayerScale
    model = build_model(name).eval()
    counts = collections.Counter()

    def hook(module, inputs, _out):
        _, C, H, W = inputs[0].shape
        counts[(int(C), int(H), int(W), int(module.weight.shape[-1]), module.bias is not None)] += 1
    for m in model.modules():
        if isinstance(m, (DepthwiseConv2d, LayerScale)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    return dict(sorted(counts.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]))


def _versions(backend):
    from sparx_ref.kernels import registry
    if registry.runtime_missing(backend) or not registry.entries(OPS[0], backend):
        return []
    return [(e.version, e.default) for e in registry.entries(OPS[0], backend)]


def _calls(backend, version, x, w, b, dy):
    """(forward call, forward+backward call) on tensors x, w, b, dy (torch CUDA)."""
    if backend == "torch":
        import torch
        import torch.nn.functional as F
        k = w.shape[-1]
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b) if t is not None]

        def fwd():
            return F.conv2d(x, w, b, padding=k // 2, groups=x.shape[1])

        def fb():
            out = F.conv2d(*leaves, padding=k // 2, groups=x.shape[1])
            return torch.autograd.grad(out, leaves, dy)
        return fwd, fb
    from sparx_ref.kernels import registry
    kf, kb = (registry.get(op, backend, version) for op in OPS)
    if backend == "cupy":
        import cupy
        put = cupy.asarray
    else:
        from numba import cuda
        put = cuda.as_cuda_array
    xa, wa, ba, da = (None if t is None else put(t) for t in (x, w, b, dy))

    def fb_kernel():
        _, cache = kf(xa, wa, ba)
        return kb(da, cache)
    return (lambda: kf(xa, wa, ba)), fb_kernel


def bench_shape(shape, batch, floors, reps, rounds):
    import torch
    C, H, W, k, has_bias = shape
    bw, rate = floors
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, C, H, W, device="cuda", generator=g)
    dy = torch.randn(batch, C, H, W, device="cuda", generator=g)
    w = torch.randn(C, 1, k, k, device="cuda", generator=g)
    b = torch.randn(C, device="cuda", generator=g) if has_bias else None
    runs = [("torch", "F.conv2d", True)] + [(be, v, d) for be in ("cupy", "numba_cuda") for v, d in _versions(be)]
    pairs = [_calls(be, v, x, w, b, dy) for be, v, _ in runs]
    times = [([], []) for _ in pairs]
    for _ in range(rounds):
        for (fwd, fb), (t_fwd, t_fb) in zip(pairs, times):
            t_fwd.append(median_ms(fwd, reps))
            t_fb.append(median_ms(fb, reps))
    n = batch * C * H * W
    floor_fwd = max(2 * n * 4 / bw / 1e6, 2 * k * k * n / rate / 1e9)      # ms
    floor_fb = max(5 * n * 4 / bw / 1e6, 6 * k * k * n / rate / 1e9)
    rows = []
    for (be, v, d), (t_fwd, t_fb) in zip(runs, times):
        rows.append(dict(backend=be, version=v, default=d, fwd_ms=statistics.median(t_fwd),
                         fb_ms=statistics.median(t_fb), floor_fwd_ms=floor_fwd, floor_fb_ms=floor_fb))
    return rows


def markdown(results):
    head = (f"### {results['card']}, {results['date']}\n\n"
            f"`python benchmarks/bench_conv.py --rounds {results['rounds']}`: SparX-Mamba-T's depthwise convs at "
            f"batch {results['batch']}, float32, NCHW. Copy bandwidth {results['copy_gbs']:.0f} GB/s, fp32 "
            f"{results['fp32_tflops']:.1f} TFLOP/s (measured in this run). ms = median of {results['rounds']} rounds "
            f"(each a median of {results['reps']} calls); % = floor / time; x = torch time / this time. "
            f"(n) = how many times one forward of the model meets the shape. torch {results['torch']}, cudnn.benchmark "
            f"off.\n")
    header = ["shape (C, H=W, k) (n)", "backend / version", "fwd ms", "fwd % floor", "fwd x torch",
              "fwd+bwd ms", "fwd+bwd % floor", "fwd+bwd x torch"]
    rows = []
    totals = collections.defaultdict(lambda: [0.0, 0.0])
    for entry in results["shapes"]:
        C, H, W, k, has_bias = entry["shape"]
        count = entry["count"]
        torch_row = entry["rows"][0]
        for r in entry["rows"]:
            label = f"{r['backend']} {r['version']}" + (" (default)" if r["default"] and r["backend"] != "torch" else "")
            rows.append([f"{C}, {H}, {k}{'' if has_bias else ', no bias'} ({count})", label, f"{r['fwd_ms']:.3f}",
                         f"{100 * r['floor_fwd_ms'] / r['fwd_ms']:.0f}%", f"{torch_row['fwd_ms'] / r['fwd_ms']:.1f}",
                         f"{r['fb_ms']:.3f}", f"{100 * r['floor_fb_ms'] / r['fb_ms']:.0f}%",
                         f"{torch_row['fb_ms'] / r['fb_ms']:.1f}"])
            totals[label][0] += count * r["fwd_ms"]
            totals[label][1] += count * r["fb_ms"]
    t_torch = totals["torch F.conv2d"]
    for label, (tf, tfb) in totals.items():
        rows.append(["**one model forward, all shapes**", label, f"{tf:.2f}", "", f"{t_torch[0] / tf:.1f}",
                     f"{tfb:.2f}", "", f"{t_torch[1] / tfb:.1f}"])
    return head + "\n" + fmt_table(header, rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    use_cupy_pool_for_numba()
    import torch
    torch.backends.cudnn.benchmark = False
    shapes = model_shapes()
    bw, rate = copy_bandwidth_gbs(), fp32_matmul_tflops()
    results = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   torch=torch.__version__, copy_gbs=bw, fp32_tflops=rate, batch=args.batch, reps=args.reps,
                   rounds=args.rounds, shapes=[])
    print(f"card: {results['card']}  copy {bw:.0f} GB/s  fp32 {rate:.1f} TFLOP/s")
    for shape, count in shapes.items():
        rows = bench_shape(shape, args.batch, (bw, rate), args.reps, args.rounds)
        results["shapes"].append(dict(shape=list(shape), count=count, rows=rows))
        print(shape, count, " ".join(f"{r['backend']}/{r['version']} {r['fwd_ms']:.3f}/{r['fb_ms']:.3f}"
                                     for r in rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = markdown(results)
    print("\n" + text)
    if not args.no_results:
        write_results_block(SECTION, *BLOCK, text, intro=(
            "Issue 7: SparX-Mamba's depthwise convolutions on our kernels vs PyTorch's "
            "(benchmarks/bench_conv.py)."))
    return results


if __name__ == "__main__":
    main()
