"""CPU forward time of Swin vs SparX-Swin (T, S, B) at 224x224, batch 1, float32, side by side.

SparX-Swin is the project's reconstruction (docs/spec/sparx_swin.md), not the authors' model.

For each pair the two models are timed alternately in one process (swin, sparx, swin,
sparx, ...), so drift of a shared machine hits both alike; the table gives the median.
Also prints parameters and FLOPs. FLOPs are counted by ``torch.utils.flop_counter`` on
the twin (matmuls, convolutions; softmax/norm/GELU not counted) and reported as GMACs
(= counted FLOPs / 2), the convention of the Swin paper's "4.5G" for Swin-T.

    python benchmarks/cpu_swin.py                      # PyTorch twin, 2 threads, 10 reps
    python benchmarks/cpu_swin.py --numpy --reps 3     # also the NumPy models
    python benchmarks/cpu_swin.py --flops-only         # the parameter/FLOP table only

Absolute times hold only for the CPU they were taken on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

THREADS_DEFAULT = 2
if __name__ == "__main__":  # thread pools are sized when NumPy / torch first load
    _threads = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), str(THREADS_DEFAULT))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cpu_sparx_mamba import cpu_name, time_pair  # noqa: E402  (sibling script: shared helpers)

from sparx_ref import build_model  # noqa: E402
from sparx_ref.torch_models import build_model as build_twin  # noqa: E402

VARIANTS = ("t", "s", "b")


def count_flops(model, x) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def median_pair(run_a, run_b, reps: int, warmup: int = 2):
    """Alternate the two callables (swin, sparx, swin, ...); medians in seconds."""
    ta, tb = time_pair(run_a, run_b, reps, warmup=warmup)
    return statistics.median(ta), statistics.median(tb)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--numpy", action="store_true", help="also time the NumPy models")
    parser.add_argument("--numpy-reps", type=int, default=3)
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--variants", default="tsb")
    args = parser.parse_args([a for a in (argv or sys.argv[1:]) if not a.startswith("--threads=")])
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    x = torch.from_numpy(x_np)
    print(f"# Swin vs SparX-Swin (our reconstruction), CPU forward, batch 1, 224x224, float32")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}; {args.threads} threads; "
          f"torch {torch.__version__}; numpy {np.__version__}")
    rows = []
    for v in args.variants:
        swin, sparx = build_twin(f"swin_{v}", seed=0), build_twin(f"sparx_swin_{v}", seed=0)
        row = dict(variant=v,
                   params=[sum(p.numel() for p in m.parameters()) for m in (swin, sparx)],
                   gmacs=[count_flops(m, x) / 2e9 for m in (swin, sparx)])
        if not args.flops_only:
            with torch.inference_mode():
                row["torch"] = median_pair(lambda: swin(x), lambda: sparx(x), args.reps)
            if args.numpy:
                np_swin = build_model(f"swin_{v}", dtype=np.float32, seed=0)
                np_sparx = build_model(f"sparx_swin_{v}", dtype=np.float32, seed=0)
                row["numpy"] = median_pair(lambda: np_swin.forward(x_np), lambda: np_sparx.forward(x_np),
                                         args.numpy_reps, warmup=1)
                del np_swin, np_sparx
        rows.append(row)
        print(f"# done {v}: {row}", flush=True)

    print()
    print("| variant | params (M) | GMACs | " + ("" if args.flops_only else "twin fwd (ms) | ")
          + ("NumPy fwd (ms) |" if args.numpy and not args.flops_only else ""))
    print("|---|---|---|" + ("" if args.flops_only else "---|") + ("---|" if args.numpy and not args.flops_only else ""))
    for row in rows:
        for i, name in enumerate((f"swin_{row['variant']}", f"sparx_swin_{row['variant']}")):
            cells = [name, f"{row['params'][i] / 1e6:.2f}", f"{row['gmacs'][i]:.2f}"]
            if "torch" in row:
                cells.append(f"{row['torch'][i] * 1e3:.1f}")
            if "numpy" in row:
                cells.append(f"{row['numpy'][i] * 1e3:.0f}")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
