"""Diagnostics of the twins on the GPU backends (issue 7): are the kernels really called, and
do whole-model logits agree with kernel_backend "torch"? Needs CUDA. Not a benchmark.

For each model and GPU backend, on the same weights and 4 images:

- the number of calls of each kernel-backed autograd Function in one eval forward (0 would
  mean the backend silently ran its torch form);
- max|logits - torch| / max|torch| and whether the two logits tensors share memory;
- the same after the model's memory has been churned (a training step on another batch),
  which is when a use-after-free in the torch <-> CuPy / Numba memory sharing would show;
- ``--profile``: the 15 CUDA kernels taking the most time in one inference batch of
  sparx_mamba_t on each GPU backend (torch.profiler), then the same for a forward+backward
  at batch 64 with its GPU time next to its wall time;
- ``--host-profile``: where a whole training step's host time goes (forward, loss, backward,
  AdamW step at batch 64; cProfile of three steps with autograd on the calling thread, so the
  backward's Python is seen too), next to the step's wall time.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/diag_models_gpu.py [--profile] [--host-profile]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def count_calls():
    """Wrap every kernel autograd Function's ``apply`` to count calls; returns the Counter."""
    from sparx_ref.torch_models import ops, ss2d_core
    counts = collections.Counter()
    for module, name in [(ops, name) for name in (
            "SelectiveScanFn", "SS2DScanFn", "CrossScanFn", "CrossMergeFn", "WindowAttentionFn",
            "DMCAAttentionFn", "DepthwiseConv2dFn", "PlannedSS2DScanFn", "PlannedDMCAAttentionFn",
            "PlannedDepthwiseConv2dFn", "PlannedCrossScanFn", "PlannedCrossMergeFn", "GroupNormFn",
            "PlannedGroupNormFn")] + [(ss2d_core, "SS2DCoreFn")]:
        fn = getattr(module, name)
        original = fn.apply

        def counted(*args, _original=original, _name=name):
            counts[_name] += 1
            return _original(*args)
        fn.apply = counted
    return counts


def op_agreement(backends, dev="cuda"):
    """selective_scan / cross_scan / cross_merge on the inputs sparx_mamba_t's first block of each
    stage really sees (batch 2): each backend vs the torch form, and how many elements agree
    bit for bit."""
    import dataclasses

    import torch
    from sparx_ref.testing import rel_err
    from sparx_ref.torch_models import build_model, ops

    torch.manual_seed(0)
    model = build_model("sparx_mamba_t", kernel_backend="torch").to(dev).eval()
    captured, attention, merges = [], [], []
    for module in model.modules():
        table = getattr(module, "kernels", None)
        if table is None or not hasattr(table, "selective_scan"):
            continue

        def record(*a, _orig=table.selective_scan, **kw):
            if len(captured) < 16:
                captured.append((a, kw))
            return _orig(*a, **kw)

        def record_attention(q, k, v, _orig=table.channel_attention):
            attention.append((q, k, v))
            return _orig(q, k, v)

        def record_merge(ys, H, W, _orig=table.cross_merge):
            merges.append((ys, H, W))
            return _orig(ys, H, W)
        module.kernels = dataclasses.replace(table, selective_scan=record, channel_attention=record_attention,
                                             cross_merge=record_merge)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224, device=dev))
    print("\n# per-op agreement at sparx_mamba_t's layer inputs (rel err; fraction of elements equal bit for bit)")
    for i, (a, kw) in enumerate(captured[::3]):
        ref = ops.selective_scan(*a, **kw, backend="torch")
        u, delta = a[0], a[1]
        dt = torch.nn.functional.softplus(delta + a[6][None, :, None])
        line = [f"scan {tuple(u.shape)} dt in [{dt.min():.2g}, {dt.max():.2g}]"]
        for backend in backends:
            got = ops.selective_scan(*a, **kw, backend=backend)
            line.append(f"{backend} {rel_err(got, ref):.2e} / {(got == ref).float().mean():.4f}")
        x = torch.randn(2, 96, 56 // (i + 1) + 1, 56 // (i + 1), device=dev)
        for backend in backends:
            xs = ops.cross_scan(x, backend=backend)
            line.append(f"{backend} cross_scan exact {bool((xs == ops.cross_scan(x)).all())}")
        print("  " + "; ".join(line))
    for ys, H, W in merges[::4]:
        ref = ops.cross_merge(ys, H, W)
        line = [f"cross_merge {tuple(ys.shape)}"]
        for backend in backends:
            got = ops.cross_merge(ys, H, W, backend=backend)
            line.append(f"{backend} {rel_err(got, ref):.2e} / {(got == ref).float().mean():.4f}")
        print("  " + "; ".join(line))
    for q, k, v in attention:
        ref_out, ref_attn = ops.dmca_attention(q, k, v, groups=1)
        scores = (q @ k.transpose(-1, -2)).abs().max() / q.shape[-1] ** 0.5
        line = [f"dmca {tuple(q.shape)} {tuple(v.shape)} max|score| {scores:.3g}"]
        for backend in backends:
            out, attn = ops.dmca_attention(q, k, v, groups=1, backend=backend)
            line.append(f"{backend} out {rel_err(out, ref_out):.2e} / {(out == ref_out).float().mean():.4f}, "
                        f"attn {rel_err(attn, ref_attn):.2e}")
        print("  " + "; ".join(line))


def main():
    import torch
    import torch.nn.functional as F
    from sparx_ref.testing import rel_err
    from sparx_ref.torch_models import build_model, ops

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sparx_mamba_t", "swin_t", "sparx_swin_t"])
    p.add_argument("--backends", nargs="+", default=["cupy", "numba_cuda"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--ops", action="store_true", help="per-op agreement at sparx_mamba_t's own layer inputs")
    p.add_argument("--host-profile", action="store_true", help="cProfile of three sparx_mamba_t training steps")
    args = p.parse_args()
    counts = count_calls()
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.models:
        torch.manual_seed(0)
        ref = build_model(name, kernel_backend="torch").to(dev).eval()
        state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        x = torch.randn(4, 3, 224, 224, device=dev)
        with torch.no_grad():
            ref_logits = ref(x)
        ref_copy = ref_logits.clone()
        for backend in args.backends:
            torch.manual_seed(0)
            model = build_model(name, kernel_backend=backend).to(dev)
            model.load_state_dict(state)
            model.eval()
            counts.clear()
            with torch.no_grad():
                logits = model(x)
            torch.cuda.synchronize()
            calls = dict(counts)
            err = rel_err(logits, ref_copy)
            same = logits.data_ptr() == ref_logits.data_ptr()
            ref_changed = rel_err(ref_logits, ref_copy)
            # churn the allocator: one training step at batch 8, then the eval forward again
            model.train()
            xb = torch.randn(8, 3, 224, 224, device=dev)
            loss = F.cross_entropy(model(xb), torch.randint(0, 1000, (8,), device=dev))
            loss.backward()
            model.load_state_dict(state)   # the train-mode forward moved BatchNorm running stats
            model.eval()
            with torch.no_grad():
                logits2 = model(x)
            torch.cuda.synchronize()
            err2 = rel_err(logits2, ref_copy)
            repeat = rel_err(logits2, logits)
            print(f"{name:14s} {backend:10s} kernel calls {calls}  describe {ops.describe(backend)}")
            print(f"{name:14s} {backend:10s} rel err vs torch {err:.3e} (after churn {err2:.3e}; "
                  f"repeat vs first {repeat:.3e}); shares memory with ref: {same}; ref changed: {ref_changed:.1e}")
            del model, logits, logits2, xb, loss
            torch.cuda.empty_cache()
        del ref
    if args.ops:
        op_agreement(args.backends)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for backend in args.backends:
            model = build_model("sparx_mamba_t", kernel_backend=backend).to(dev).eval()
            xi = torch.randn(64, 3, 224, 224, device=dev)
            with torch.no_grad():
                model(xi)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    model(xi)
                    torch.cuda.synchronize()
            print(f"\n# profile: sparx_mamba_t inference, batch 64, {backend}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
            model.train()
            yb = torch.randint(0, 1000, (64,), device=dev)
            for step in range(2):   # the second step is profiled
                model.zero_grad(set_to_none=True)   # as a training step does: no accumulation into .grad
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    torch.nn.functional.cross_entropy(model(xi), yb).backward()
                    torch.cuda.synchronize()
            print(f"\n# profile: sparx_mamba_t forward+backward, batch 64, {backend}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
            print("\n# the same step's host side: the 15 ops taking the most CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            gpu_ms = sum(e.self_device_time_total for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
            wall = []
            for _ in range(4):   # the same step without the profiler: is it host-bound?
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.nn.functional.cross_entropy(model(xi), yb).backward()
                torch.cuda.synchronize()
                wall.append((time.perf_counter() - t0) * 1e3)
            print(f"# forward+backward: GPU time of the profiled step {gpu_ms:.1f} ms; wall time without the "
                  f"profiler {sorted(wall)[1]:.1f} ms (second best of 4): host-bound if wall >> GPU")
            del model, xi
            torch.cuda.empty_cache()


    if args.host_profile:
        for backend in args.backends:
            host_profile(backend, dev)


def host_profile(backend, dev):
    """cProfile of three sparx_mamba_t training steps (batch 64, AdamW) on ``backend``."""
    import torch
    import torch.nn.functional as F
    from sparx_ref.torch_models import build_model

    from benchmarks.common import profile_text
    torch.manual_seed(0)
    model = build_model("sparx_mamba_t", kernel_backend=backend).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    xb = torch.randn(64, 3, 224, 224, device=dev)
    yb = torch.randint(0, 1000, (64,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        print(f"\n# host profile: sparx_mamba_t training step, batch 64, {backend}: wall "
              f"{(time.perf_counter() - t0) / 5 * 1e3:.1f} ms a step (autograd on this thread); "
              f"cProfile of 3 steps (divide by 3 for a step):")
        print(profile_text(step, 3, sorts=(("tottime", 30),)))


if __name__ == "__main__":
    main()
