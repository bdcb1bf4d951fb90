"""Whole-model CPU speed of the twins: kernel_backend "torch" vs "numba_cpu" (issue 7, section 3).

sparx_mamba_t, swin_t and sparx_swin_t at 224x224, float32, batch 1, on a fixed number of
threads, the two backends alternating (torch, numba_cpu, torch, ...) so drift of a shared
machine hits both alike; median of ``--reps`` after one warm-up (which compiles the Numba
kernels). Same weights for both backends; their logits are compared first.

- inference: forward under ``torch.no_grad()`` in eval mode;
- training: forward + cross-entropy + backward + AdamW step, train mode.

Only the ops with a ``numba_cpu`` kernel change (selective scan, cross-scan/merge: SparX-Mamba);
Swin and SparX-Swin have no CPU attention kernels, so their two columns time the same code
(a check of the noise).

    python benchmarks/bench_models_cpu.py [--threads 2] [--reps 3] [--write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

THREADS_DEFAULT = 2
if __name__ == "__main__":  # thread pools are sized when NumPy / torch / Numba first load
    _threads = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), str(THREADS_DEFAULT))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _threads
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_models_gpu import write_block  # noqa: E402
from sparx_ref.testing import rel_err  # noqa: E402
from sparx_ref.torch_models import build_model, ops  # noqa: E402

MODELS = ("sparx_mamba_t", "swin_t", "sparx_swin_t")
BACKENDS = ("torch", "numba_cpu")
CALLS = {"sparx_mamba_t": ("ss2d_scan", "cross_scan", "dmca_attention"),   # ss2d_core: fused scan + projection cross-scan
         "swin_t": ("window_attention",), "sparx_swin_t": ("window_attention", "dmca_attention")}  # hot ops


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def make_steps(name, state, x, y):
    """{backend: (infer_step, train_step)} on shared weights."""
    steps, logits = {}, {}
    for backend in BACKENDS:
        model = build_model(name, kernel_backend=backend)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            logits[backend] = model(x)
        train_model = build_model(name, kernel_backend=backend)
        train_model.load_state_dict(state)
        train_model.train()
        opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)

        def infer(model=model):
            with torch.no_grad():
                model(x)

        def train(model=train_model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[backend] = (infer, train)
    return steps, rel_err(logits["numba_cpu"], logits["torch"])


def time_alternating(fns: dict, reps: int) -> dict:
    for fn in fns.values():      # warm-up: Numba compiles here
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 224, 224)
    y = torch.randint(0, 1000, (1,))
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        state = build_model(name).state_dict()
        steps, err = make_steps(name, state, x, y)
        infer = time_alternating({b: steps[b][0] for b in BACKENDS}, args.reps)
        train = time_alternating({b: steps[b][1] for b in BACKENDS}, args.reps)
        kernel_ops = [op for op in CALLS.get(name, ops.KERNEL_OPS) if ops.uses_kernel(op, "numba_cpu")]
        rows.append(dict(model=name, err=err, infer=infer, train=train, kernel_ops=kernel_ops))
        print(name, f"rel err {err:.1e}", {k: f"{v:.3f}s" for k, v in infer.items()},
              {k: f"{v:.3f}s" for k, v in train.items()}, flush=True)

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"### CPU: {cpu_name()}, {args.threads} threads, {date}", "",
             f"float32, 224x224, batch 1; median of {args.reps} after a warm-up, the backends alternating; "
             f"seconds per image (img/s in brackets). Ops on numba_cpu kernels: "
             f"{'; '.join(r['model'] + ': ' + (', '.join(r['kernel_ops']) or 'none') for r in rows)}; "
             f"every other op runs its torch form. "
             f"rel err = max|logits(numba_cpu) - logits(torch)| / max|logits(torch)|. torch {torch.__version__}.",
             "", "| model | inference torch | inference numba_cpu | x | training step torch | "
             "training step numba_cpu | x | rel err |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        it, inb = r["infer"]["torch"], r["infer"]["numba_cpu"]
        tt, tn = r["train"]["torch"], r["train"]["numba_cpu"]
        lines.append(f"| {r['model']} | {it:.3f} s ({1 / it:.2f}) | {inb:.3f} s ({1 / inb:.2f}) | {it / inb:.2f} | "
                     f"{tt:.3f} s ({1 / tt:.2f}) | {tn:.3f} s ({1 / tn:.2f}) | {tt / tn:.2f} | {r['err']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_block("cpu", text)


if __name__ == "__main__":
    main()
