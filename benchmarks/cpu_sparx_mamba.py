"""CPU time of sparx_mamba_t: NumPy model vs PyTorch twin, forward and forward+backward,
224x224, batch 1, float32, side by side in one process on a fixed number of threads.

The two implementations run alternately (numpy, twin, numpy, twin, ...) so drift of a shared
machine hits both alike; the table gives the median (and the minimum). Both hold the same
weights (the twin's released init, copied into the NumPy model), and the logits are checked
against each other before timing.

    python benchmarks/cpu_sparx_mamba.py                  # 2 threads, 3 reps, prints the table
    python benchmarks/cpu_sparx_mamba.py --write          # ... and updates benchmarks/RESULTS.md

"forward" is the NumPy model's ``forward`` (which keeps the caches its backward needs) and the
twin's forward under ``torch.no_grad()``; "forward+backward" is ``forward`` + ``backward(dlogits)``
for NumPy and ``forward`` + ``autograd backward`` for the twin (its selective scan is a plain
Python loop over the sequence, so autograd records one node per step). Acceptance for the NumPy
model on 2 cores: forward <= 1.5 s, forward+backward <= 10 s.
Absolute times hold only for the CPU they were taken on.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

THREADS_DEFAULT = 2
if __name__ == "__main__":  # thread pools are sized when NumPy / torch first load
    _threads = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")),
                    str(THREADS_DEFAULT))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparx_ref import build_model  # noqa: E402
from sparx_ref.checkpoint import to_numpy_state_dict  # noqa: E402
from sparx_ref.testing import rel_err  # noqa: E402
from sparx_ref.torch_models import build_model as build_twin  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## SparX-Mamba CPU"
LIMITS = {"forward": 1.5, "forward+backward": 10.0}  # NumPy model acceptance, seconds


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_pair(run_a, run_b, reps: int, warmup: int = 1):
    """Alternate the two callables; return ([times_a], [times_b]) in seconds."""
    for _ in range(warmup):
        run_a()
        run_b()
    ta, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_b()
        tb.append(time.perf_counter() - t0)
    return ta, tb


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a line added under the table")
    args = parser.parse_args([a for a in (argv or sys.argv[1:]) if not a.startswith("--threads=")])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    twin = build_twin("sparx_mamba_t").eval()
    model = build_model("sparx_mamba_t", dtype=np.float32).eval()
    model.load_state_dict(to_numpy_state_dict(twin.state_dict()))
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    g_np = rng.standard_normal((1, 1000)).astype(np.float32)
    x, g = torch.from_numpy(x_np), torch.from_numpy(g_np)
    with torch.no_grad():
        err = rel_err(model.forward(x_np), twin(x))
    print(f"# logits NumPy vs twin (float32): rel err {err:.2e}", flush=True)

    def np_fwd():
        model.forward(x_np)

    def np_fwd_bwd():
        model.zero_grad()
        model.backward(g_np * np.ones_like(model.forward(x_np)))

    def t_fwd():
        with torch.no_grad():
            twin(x)

    def t_fwd_bwd():
        twin.zero_grad(set_to_none=True)
        (twin(x) * g).sum().backward()

    results = {}
    results["forward"] = time_pair(np_fwd, t_fwd, args.reps)
    print(f"# forward done: {results['forward']}", flush=True)
    results["forward+backward"] = time_pair(np_fwd_bwd, t_fwd_bwd, args.reps)
    print(f"# forward+backward done: {results['forward+backward']}", flush=True)

    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    lines = [SECTION, "",
             f"`python benchmarks/cpu_sparx_mamba.py` — sparx_mamba_t, batch 1, "
             f"{args.size}x{args.size}, float32, {args.threads} threads "
             f"(`torch.set_num_threads({args.threads})`, OMP/OpenBLAS/MKL = {args.threads}); "
             f"median (min) of {args.reps} alternating runs after 1 warm-up.",
             f"{stamp}; CPU: {cpu_name()} ({os.cpu_count()} logical CPUs visible); "
             f"numpy {np.__version__}, torch {torch.__version__}; logits NumPy vs twin rel err "
             f"{err:.1e}.", "",
             "| pass | NumPy model (s) | PyTorch twin (s) | NumPy / twin | NumPy limit (s) |",
             "|---|---|---|---|---|"]
    for name, (ta, tb) in results.items():
        ma, mb = statistics.median(ta), statistics.median(tb)
        ok = "ok" if ma <= LIMITS[name] else "OVER"
        lines.append(f"| {name} | {ma:.2f} ({min(ta):.2f}) | {mb:.2f} ({min(tb):.2f}) | "
                     f"{ma / mb:.2f} | {LIMITS[name]:.1f} {ok} |")
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n\n"
    print()
    print(text)
    if args.write:
        write_section(text)
        print(f"# wrote {RESULTS}")


if __name__ == "__main__":
    main()
