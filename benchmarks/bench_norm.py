"""Group normalisation on our kernels vs PyTorch on the GPU (issue 7). Needs CUDA.

The GroupNorm(1, C) layers of SparX-Mamba-T at batch 64, float32, one row per distinct shape
the model meets (found by running the twin once on the CPU and recording every
:class:`~sparx_ref.torch_models.common.GroupNorm1` input), each timed through the twins' entry
point :func:`sparx_ref.torch_models.ops.group_norm` (what a training step runs, host time
included):

- forward under ``torch.no_grad()``;
- forward+backward: the forward, then dx, dweight, dbias for a given dout (``torch.autograd.grad``);

for ``backend="torch"`` (``F.group_norm``) and every GPU backend with group-norm kernels. The
backends take turns, ``--rounds`` times; each figure is the median of its rounds. Floors: the
forward must read x and write out (2 x B*C*H*W float32 elements), forward+backward also read x
and dy and write dx (5 x in all); a few flops an element, so the floor is bytes / the copy
bandwidth measured in the same run. The last rows weigh every shape by how many times one forward
of the model meets it: the group-norm time of one training step.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_norm.py [--json out.json] [--no-results]
    python benchmarks/bench_norm.py --from-json out.json     # RESULTS.md section from a saved run
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

from benchmarks.common import copy_bandwidth_gbs, fmt_table, median_ms, write_results_block  # noqa: E402

SECTION = "## Group normalisation kernels"
BLOCK = ("<!-- groupnorm:bench -->", "<!-- /groupnorm:bench -->")


def model_shapes(name="sparx_mamba_t"):
    """{(C, H, W): count} of the GroupNorm1 layers one forward of the twin runs (224x224, batch 1,
    on the CPU), largest maps first."""
    import torch
    from sparx_ref.torch_models import build_model
    from sparx_ref.torch_models.common import GroupNorm1
    model = build_model(name).eval()
    counts = collections.Counter()

    def hook(module, inputs, _out):
        _, C, H, W = inputs[0].shape
        counts[(int(C), int(H), int(W))] += 1
    for m in model.modules():
        if isinstance(m, GroupNorm1):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    return dict(sorted(counts.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2]))


def backends():
    from sparx_ref.torch_models import ops
    from sparx_ref.kernels import registry
    return ["torch"] + [b for b in ("cupy", "numba_cuda")
                        if not registry.runtime_missing(b) and ops.uses_kernel("group_norm", b)]


def _calls(backend, x, w, b, dy):
    """(forward call, forward+backward call) of ops.group_norm on ``backend``."""
    import torch
    from sparx_ref.torch_models import ops
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]

    def fwd():
        with torch.no_grad():
            return ops.group_norm(x, w, b, 1, backend=backend)

    def fb():
        out = ops.group_norm(*leaves, 1, backend=backend)
        return torch.autograd.grad(out, leaves, dy)
    return fwd, fb


def bench_shape(shape, batch, bw, reps, rounds, names):
    import torch
    C, H, W = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = 3 + torch.randn(batch, C, H, W, device="cuda", generator=g)
    dy = torch.randn(batch, C, H, W, device="cuda", generator=g)
    w = 1 + 0.1 * torch.randn(C, device="cuda", generator=g)
    b = torch.randn(C, device="cuda", generator=g)
    pairs = [_calls(be, x, w, b, dy) for be in names]
    ref = pairs[0][0]()
    for be, (fwd, _) in zip(names[1:], pairs[1:]):   # a wrong kernel must not be timed as a fast one
        err = ((fwd() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, (be, shape, err)
    times = [([], []) for _ in pairs]
    for _ in range(rounds):
        for (fwd, fb), (t_fwd, t_fb) in zip(pairs, times):
            t_fwd.append(median_ms(fwd, reps))
            t_fb.append(median_ms(fb, reps))
    n = batch * C * H * W
    floor_fwd, floor_fb = 2 * n * 4 / bw / 1e6, 5 * n * 4 / bw / 1e6     # ms
    return [dict(backend=be, fwd_ms=statistics.median(tf), fb_ms=statistics.median(tb), floor_fwd_ms=floor_fwd,
                 floor_fb_ms=floor_fb) for be, (tf, tb) in zip(names, times)]


def markdown(results):
    head = (f"### {results['card']}, {results['date']}\n\n"
            f"`python benchmarks/bench_norm.py --rounds {results['rounds']}`: SparX-Mamba-T's GroupNorm(1, C) at "
            f"batch {results['batch']}, float32, through `ops.group_norm` (host time included). Copy bandwidth "
            f"{results['copy_gbs']:.0f} GB/s (measured in this run). ms = median of {results['rounds']} rounds "
            f"(each a median of {results['reps']} calls); % = floor / time; x = torch time / this time. (n) = how "
            f"many times one forward of the model meets the shape. torch {results['torch']}.\n")
    header = ["shape (C, H=W) (n)", "backend", "fwd ms", "fwd % floor", "fwd x torch", "fwd+bwd ms",
              "fwd+bwd % floor", "fwd+bwd x torch"]
    rows, totals = [], collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for entry in results["shapes"]:
        (C, H, _), count = entry["shape"], entry["count"]
        t0 = entry["rows"][0]
        for r in entry["rows"]:
            rows.append([f"{C}, {H} ({count})", r["backend"], f"{r['fwd_ms']:.3f}",
                         f"{100 * r['floor_fwd_ms'] / r['fwd_ms']:.0f}%", f"{t0['fwd_ms'] / r['fwd_ms']:.1f}",
                         f"{r['fb_ms']:.3f}", f"{100 * r['floor_fb_ms'] / r['fb_ms']:.0f}%",
                         f"{t0['fb_ms'] / r['fb_ms']:.1f}"])
            tot = totals[r["backend"]]
            tot[0] += count * r["fwd_ms"]
            tot[1] += count * r["fb_ms"]
            tot[2] += count * r["floor_fwd_ms"]
            tot[3] += count * r["floor_fb_ms"]
    base = totals["torch"]
    for be, (tf, tb, ff, fb) in totals.items():
        rows.append(["**one model forward, all shapes**", be, f"{tf:.2f}", f"{100 * ff / tf:.0f}%",
                     f"{base[0] / tf:.1f}", f"{tb:.2f}", f"{100 * fb / tb:.0f}%", f"{base[1] / tb:.1f}"])
    return head + "\n" + fmt_table(header, rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--from-json", help="only render a saved run (no GPU needed)")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        return _report(results, args.no_results)
    import torch
    shapes = model_shapes()
    names = backends()
    bw = copy_bandwidth_gbs()
    results = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   torch=torch.__version__, copy_gbs=bw, batch=args.batch, reps=args.reps, rounds=args.rounds,
                   shapes=[])
    print(f"card: {results['card']}  copy {bw:.0f} GB/s  backends {names}")
    for shape, count in shapes.items():
        rows = bench_shape(shape, args.batch, bw, args.reps, args.rounds, names)
        results["shapes"].append(dict(shape=list(shape), count=count, rows=rows))
        print(shape, count, " ".join(f"{r['backend']} {r['fwd_ms']:.3f}/{r['fb_ms']:.3f}" for r in rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return _report(results, args.no_results)


def _report(results, no_results):
    text = markdown(results)
    print("\n" + text)
    if not no_results:
        write_results_block(SECTION, *BLOCK, text, intro=(
            "Issue 7: SparX-Mamba's GroupNorm(1, C) on our kernels vs PyTorch's (benchmarks/bench_norm.py)."))
    return results


if __name__ == "__main__":
    main()
