"""Whole-model GPU speed of the twins on each kernel backend (issue 7, section 3). Needs CUDA.

sparx_mamba_t, swin_t and sparx_swin_t at 224x224, float32, one card, one run, for
``kernel_backend`` "torch" (plain PyTorch: the scan is a Python loop over the sequence) and
each GPU backend ("numba_cuda", "cupy"):

- training img/s at batch 64: forward, cross-entropy loss, backward, AdamW step (``--adamw``:
  PyTorch's default foreach implementation unless told, the same for every backend);
- inference img/s at batch 128: forward under ``torch.no_grad()`` in eval mode;
- peak memory of each phase (``torch.cuda.max_memory_allocated``; the kernels' own arrays
  come from PyTorch's caching allocator too, see :mod:`sparx_ref.torch_models.ops`), with
  ``torch.backends.cudnn.benchmark = False``; other precision flags stay PyTorch's defaults
  (printed);
- a correctness check: eval logits of 8 images vs kernel_backend "torch" on the same weights.

Each phase: warm-up iterations (the first one compiles the kernels), then timed iterations
back to back, as a training loop runs them, between two CUDA synchronisations (wall clock;
``--sync-each-step`` synchronises after each one, as the runs before 2026-11-27 16:00 did) until ``--iters`` or ``--phase-seconds`` is reached, at least
one. The pure-torch scan of SparX-Mamba takes tens of seconds an iteration at batch 64, so it
gets 1 warm-up and 1-2 timed iterations; the table says how many each figure averages.

    NUMBA_ENABLE_CUDASIM=0 python benchmarks/bench_models_gpu.py --json out.json
    python benchmarks/bench_models_gpu.py --from-json out.json --write   # RESULTS.md section

Acceptance (H100/H200): sparx_mamba_t with our GPU kernels trains >= 100x and infers >= 20x
faster than with kernel_backend "torch" in the same run. On an H200 the table also gives the
ratio to the released model with its compiled kernels, measured on an H200 on 2026-11-26:
439 img/s training, 1546 img/s inference.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import write_results_block  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Whole models"
MODELS = ("sparx_mamba_t", "swin_t", "sparx_swin_t")
GPU_BACKENDS = ("numba_cuda", "cupy")
RELEASED_H200 = {"train": 439.0, "infer": 1546.0}   # released SparX-Mamba-T, compiled kernels, H200
ACCEPT = {"train": 100.0, "infer": 20.0}            # min speed-up over kernel_backend "torch"


# ---------------------------------------------------------------------------------------
# RESULTS.md: this file owns the "## Whole models" section; each script one marked block
# ---------------------------------------------------------------------------------------
def write_block(tag: str, text: str) -> None:
    """Replace the block ``<!-- whole-models:{tag} -->`` in RESULTS.md's "Whole models"
    section (creating the section or block if missing); other sections are left alone."""
    intro = ("Issue 7: the PyTorch twins with kernel_backend \"torch\" vs our kernels "
             "(benchmarks/bench_models_gpu.py, benchmarks/bench_models_cpu.py).")
    write_results_block(SECTION, f"<!-- whole-models:{tag} -->", f"<!-- /whole-models:{tag} -->", text,
                        intro=intro, path=RESULTS)


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------
DEVICE = {"name": "cuda"}   # "--device cpu" only to smoke-test this script without a GPU


def sync():
    import torch
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def peak_gib():
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE["name"] == "cuda" else float("nan")


def reset_memory():
    import torch
    gc.collect()
    if DEVICE["name"] == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class GCPauses:
    """Seconds spent in Python's garbage collector while active (a ``gc.callbacks`` entry): a
    host-bound loop slows down by every collection, and a collection's cost grows with the number
    of live objects in the process (NumPy, Numba, CuPy and PyTorch loaded)."""

    def __init__(self):
        self.seconds, self._t0 = 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def timed_loop(step, warmup: int, iters: int, phase_seconds: float, sync_each_step: bool = False):
    """Run ``step`` warmup times, then time up to ``iters`` calls (at least one) within
    ``phase_seconds``; returns (seconds per iteration, iterations timed, first-call seconds,
    garbage-collector seconds per timed iteration).

    The timed calls run back to back, as in a training loop, with one CUDA synchronisation
    before and one after them: the host queues step i+1 while the GPU still runs step i, so a
    step costs the larger of its host time and its GPU time. ``sync_each_step`` synchronises after
    every call instead (each step then costs its host time plus the GPU work still queued when
    the host is done: the figures of the runs before 2026-11-27 16:00)."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    done = 0
    with GCPauses() as pauses:
        t0 = time.perf_counter()
        while done < iters:
            step()
            if sync_each_step:
                sync()
            done += 1
            spent = time.perf_counter() - t0   # host time so far: only decides when to stop
            if spent + spent / done > phase_seconds:
                break
        sync()
        spent = time.perf_counter() - t0
    return spent / done, done, first, pauses.seconds / done


def make_optimizer(model, impl: str):
    """AdamW(lr 1e-4, weight decay 0.05), the same for every backend. ``impl``: "fused" (one
    multi-tensor CUDA kernel family, PyTorch's fastest on a GPU) or "foreach" (PyTorch's default
    on CUDA: a handful of multi-tensor ops per parameter group)."""
    import torch
    flag = {"fused": {"fused": True}, "foreach": {"foreach": True}}[impl]
    if DEVICE["name"] != "cuda":
        flag = {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **flag)


def build(name: str, backend: str, state=None):
    import torch
    from sparx_ref.torch_models import build_model
    torch.manual_seed(0)
    model = build_model(name, kernel_backend=backend).to(DEVICE["name"])
    if state is not None:
        model.load_state_dict(state)
    return model


def check_logits(name, backend, state, ref_logits, x):
    import torch
    from sparx_ref.testing import rel_err
    model = build(name, backend, state).eval()
    with torch.no_grad():
        logits = model(x)
    return rel_err(logits, ref_logits)


def bench_one(name, backend, args, reference):
    """Train and infer figures of one (model, backend); ``reference`` caches the torch
    backend's weights and logits for the correctness check."""
    import torch
    import torch.nn.functional as F
    from sparx_ref.torch_models import ops

    row = {"model": name, "backend": backend, "ops": ops.describe(backend)}
    if name not in reference:
        torch.manual_seed(0)
        ref_model = build(name, "torch").eval()
        x8 = torch.randn(8, 3, 224, 224, device=DEVICE["name"])
        with torch.no_grad():
            reference[name] = ({k: v.detach().clone() for k, v in ref_model.state_dict().items()}, x8,
                               ref_model(x8))
        del ref_model
    state, x8, ref_logits = reference[name]
    if backend != "torch":
        row["rel_err_logits"] = check_logits(name, backend, state, ref_logits, x8)

    slow = backend == "torch" and name.startswith("sparx_mamba")
    # --- training, batch 64
    model = build(name, backend, state).train()
    opt = make_optimizer(model, args.adamw)
    xb = torch.randn(args.train_batch, 3, 224, 224, device=DEVICE["name"])
    yb = torch.randint(0, 1000, (args.train_batch,), device=DEVICE["name"])

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()

    reset_memory()
    sec, n, first, gc_sec = timed_loop(train_step, 1 if slow else args.warmup, 2 if slow else args.iters,
                                       args.slow_phase_seconds if slow else args.phase_seconds,
                                       args.sync_each_step)
    row.update(train_img_s=args.train_batch / sec, train_iters=n, train_first_s=first,
               train_peak_gib=peak_gib(), train_gc_ms=gc_sec * 1e3)
    del opt, xb, yb
    # --- inference, batch 128
    model.eval()
    xi = torch.randn(args.infer_batch, 3, 224, 224, device=DEVICE["name"])

    def infer_step():
        with torch.no_grad():
            model(xi)

    reset_memory()
    sec, n, first, gc_sec = timed_loop(infer_step, 1 if slow else args.warmup, 2 if slow else args.iters,
                                       args.slow_phase_seconds if slow else args.phase_seconds,
                                       args.sync_each_step)
    row.update(infer_img_s=args.infer_batch / sec, infer_iters=n, infer_first_s=first,
               infer_peak_gib=peak_gib(), infer_gc_ms=gc_sec * 1e3)
    del model, xi
    reset_memory()
    return row


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def render(meta, rows) -> str:
    card = meta.get("card", "?")
    lines = [f"### GPU: {card}, {meta.get('date', '?')}",
             "",
             f"float32, 224x224; training = forward + cross-entropy + backward + AdamW "
             f"({meta.get('adamw', 'foreach')}) step at batch {meta.get('train_batch')}, inference = no_grad forward at batch {meta.get('infer_batch')}; "
             f"peak = torch.cuda.max_memory_allocated of the phase (kernel arrays come from the same "
             f"pool); cudnn.benchmark off; {meta.get('flags', '')}; timed steps back to back, CUDA "
             f"synchronised {'after each step' if meta.get('timing', 'sync each step') == 'sync each step' else 'once after them'}. (n) = timed iterations behind a "
             f"figure; rel err = max|logits - torch| / max|torch| on 8 images, same weights. "
             f"torch {meta.get('torch', '?')}, numba {meta.get('numba', '?')}, cupy {meta.get('cupy', '?')}.",
             "",
             "| model | kernel_backend | train img/s | infer img/s | train peak GiB | infer peak GiB "
             "| rel err | first train step s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} | error: {r['error'][:120]} | | | | | |")
            continue
        err = f"{r['rel_err_logits']:.1e}" if "rel_err_logits" in r else "(ref)"
        lines.append(f"| {r['model']} | {r['backend']} | {r['train_img_s']:.1f} ({r['train_iters']}) | "
                     f"{r['infer_img_s']:.1f} ({r['infer_iters']}) | {r['train_peak_gib']:.1f} | "
                     f"{r['infer_peak_gib']:.1f} | {err} | {r['train_first_s']:.1f} |")
    by = {(r["model"], r["backend"]): r for r in rows if "error" not in r}
    lines += ["", "Speed-up over kernel_backend \"torch\" in the same run (acceptance for sparx_mamba_t: "
              f"train >= {ACCEPT['train']:.0f}x, infer >= {ACCEPT['infer']:.0f}x)"
              + ("; ratio to the released compiled SparX-Mamba-T on an H200 (439 / 1546 img/s)"
                 if "H200" in card else "") + ":", "",
              "| model | kernel_backend | train x | infer x |" + (" train / released | infer / released |"
                                                                 if "H200" in card else ""),
              "| --- | --- | ---: | ---: |" + (" ---: | ---: |" if "H200" in card else "")]
    for (model, backend), r in by.items():
        base = by.get((model, "torch"))
        if backend == "torch" or base is None:
            continue
        tx, ix = r["train_img_s"] / base["train_img_s"], r["infer_img_s"] / base["infer_img_s"]
        verdict = ""
        if model == "sparx_mamba_t":
            ok = tx >= ACCEPT["train"] and ix >= ACCEPT["infer"]
            verdict = " (met)" if ok else " (missed)"
        line = f"| {model} | {backend} | {tx:.1f} | {ix:.1f}{verdict} |"
        if "H200" in card:
            if model == "sparx_mamba_t":
                line += (f" {r['train_img_s'] / RELEASED_H200['train']:.2f} | "
                         f"{r['infer_img_s'] / RELEASED_H200['infer']:.2f} |")
            else:
                line += " | |"
        lines.append(line)
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS) + ["torch"],
                   help="order matters: torch last per model")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--infer-batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--phase-seconds", type=float, default=8.0)
    p.add_argument("--slow-phase-seconds", type=float, default=60.0)
    p.add_argument("--adamw", choices=["foreach", "fused"], default="foreach",
                   help="AdamW implementation, the same for every backend (default foreach, PyTorch's default on CUDA)")
    p.add_argument("--sync-each-step", action="store_true",
                   help="synchronise after every timed step (default: once after the timed steps)")
    p.add_argument("--budget", type=float, default=440.0, help="skip configs once this many seconds passed")
    p.add_argument("--json", type=Path)
    p.add_argument("--from-json", type=Path, help="only render a saved run")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke-test the script only")
    args = p.parse_args()

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        text = render(saved["meta"], saved["rows"])
        print(text)
        if args.write:
            write_block("gpu", text)
        return

    import torch
    DEVICE["name"] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_models_gpu.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = False
    import numba
    try:
        import cupy
        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "missing"
    from sparx_ref import kernels
    meta = {"card": torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "numba": numba.__version__, "cupy": cupy_version,
            "python": platform.python_version(), "train_batch": args.train_batch, "infer_batch": args.infer_batch,
            "adamw": args.adamw, "timing": "sync each step" if args.sync_each_step else "sync after the timed steps",
            "flags": (f"matmul allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                      f"cudnn allow_tf32={torch.backends.cudnn.allow_tf32}"),
            "notes": []}
    print(json.dumps(meta), flush=True)
    rows, reference, t_start = [], {}, time.perf_counter()

    def save():
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for name in args.models:
        for backend in args.backends:
            if backend != "torch" and (kernels.runtime_missing(backend)
                                       or (args.device == "cpu") != (backend == "numba_cpu")):
                rows.append({"model": name, "backend": backend,
                             "error": kernels.runtime_missing(backend) or f"not a {args.device} backend"})
                continue
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget:
                meta["notes"].append(f"{name}/{backend} skipped: time budget ({args.budget:.0f} s) spent")
                continue
            t0 = time.perf_counter()
            try:
                row = bench_one(name, backend, args, reference)
            except Exception as err:  # keep going: one broken backend must not hide the others
                traceback.print_exc()
                row = {"model": name, "backend": backend, "error": f"{type(err).__name__}: {err}"}
                reset_memory()
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
        reference.pop(name, None)
    if any(r["backend"] == "torch" and r["model"].startswith("sparx_mamba") and "error" not in r for r in rows):
        meta["notes"].append("sparx_mamba_t with kernel_backend \"torch\": 1 warm-up + 1-2 timed iterations "
                             "per phase (its Python-loop scan takes tens of seconds an iteration at batch 64)")
    save()
    text = render(meta, rows)
    print(text)
    if args.write:
        write_block("gpu", text)


if __name__ == "__main__":
    main()
