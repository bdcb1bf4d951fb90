"""``make demo`` / ``sparx-ref demo``: sparx_mamba_t on a real photograph, every way we have.

1. Load a photograph that ships with matplotlib and preprocess it as the released model
   expects (224x224, bicubic, crop_pct 0.9, ImageNet mean/std).
2. Weights: a released checkpoint (``--checkpoint PATH``) or the released initialisation
   (seeded). The same weights go into the NumPy oracle and the PyTorch twin.
3. Run the NumPy oracle in float64 (the reference), then the NumPy model in float32, the
   PyTorch twin (plain torch) in float64 and float32, and the twin on every kernel backend
   available here (``numba_cpu`` on a CPU; ``numba_cuda`` and ``cupy`` where a GPU is
   present). Print one table: logits error relative to the oracle, the worst block output,
   and the time of each forward pass.
4. With a checkpoint, print the top-5 ImageNet classes by name.
5. Write the feature-flow figures to ``figures/demo_*.png`` (git-ignored: they depend on the
   weights): the connectivity diagrams of T, S and B, DMCA attention maps, the measured
   feature-flow graph and source vs aggregated maps. The committed figures the README shows
   come from the same ``sparx_ref.viz`` functions (``python -m sparx_ref.viz.gallery``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .testing import rel_err

VARIANT = "sparx_mamba_t"
REPO_FIGURES = Path(__file__).resolve().parent.parent / "figures"


def _progress(total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _twin_forward(twin, x_numpy, dtype, device):
    """Forward the twin with recording on; return (logits, {block name: array}) as NumPy."""
    import torch
    x = torch.from_numpy(x_numpy.astype(dtype)).to(device)
    twin.record = True
    with torch.no_grad():
        logits = twin(x)
    if device != "cpu":
        torch.cuda.synchronize()
    recorded = {k: v.detach().cpu().numpy() for k, v in twin.recorded.items()}
    twin.record = False
    return logits.detach().cpu().numpy(), recorded


def _worst_block(recorded, reference):
    """(name, error) of the recorded block output that differs most from the oracle's."""
    worst = ("-", 0.0)
    for name, ref in reference.items():
        if name in recorded and recorded[name].shape == ref.shape:
            err = rel_err(recorded[name], ref)
            if err > worst[1]:
                worst = (name, err)
    return worst


def _backends_here():
    """Kernel backends whose runtime is present, and the device their tensors live on."""
    from .kernels import available
    rows = []
    if available("numba_cpu"):
        rows.append(("numba_cpu", "cpu"))
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        for backend in ("numba_cuda", "cupy"):
            if available(backend):
                rows.append((backend, "cuda"))
    return rows


def run(checkpoint=None, figures_dir=REPO_FIGURES, seed=0, make_figures=True) -> dict:
    import torch

    from . import build_model
    from .checkpoint import load_checkpoint, to_torch_state_dict
    from .data.images import imagenet_class_names, preprocess, sample_image_path
    from .torch_models import build_model as build_twin

    torch.manual_seed(seed)
    image_path = sample_image_path()
    x = preprocess(image_path, VARIANT, dtype=np.float64)           # (1, 3, 224, 224)
    print(f"image: {image_path.name} (ships with matplotlib), preprocessed to {x.shape}")

    twin = build_twin(VARIANT).eval()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        twin.load_state_dict(to_torch_state_dict(state), strict=True)
        print(f"weights: {checkpoint}")
    else:
        print(f"weights: released initialisation, seed {seed} (pass --checkpoint for the trained model)")
    state = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}

    rows = []
    steps = 4 + len(_backends_here())
    bar = _progress(steps, "forward passes")

    oracle = build_model(VARIANT, dtype=np.float64).eval()
    oracle.load_state_dict(state)
    oracle.record = True
    logits_ref, t = _timed(oracle.forward, x)
    reference = {k: np.asarray(v) for k, v in oracle.recorded.items() if k.startswith("layers.")}
    rows.append(("NumPy oracle", "float64", "cpu", 0.0, ("-", 0.0), t))
    bar.update()

    numpy32 = build_model(VARIANT, dtype=np.float32).eval()
    numpy32.load_state_dict(state)
    numpy32.record = True
    logits32, t = _timed(numpy32.forward, x.astype(np.float32))
    rows.append(("NumPy model", "float32", "cpu", rel_err(logits32, logits_ref),
                 _worst_block({k: np.asarray(v) for k, v in numpy32.recorded.items()}, reference), t))
    bar.update()

    for dtype, torch_dtype in ((np.float64, torch.float64), (np.float32, torch.float32)):
        twin_d = twin.to(torch_dtype)
        (logits, recorded), t = _timed(_twin_forward, twin_d, x, dtype, "cpu")
        rows.append(("twin, torch ops", np.dtype(dtype).name, "cpu", rel_err(logits, logits_ref),
                     _worst_block(recorded, reference), t))
        bar.update()

    for backend, device in _backends_here():
        fast = build_twin(VARIANT, kernel_backend=backend).eval()
        fast.load_state_dict(twin.state_dict())
        fast = fast.to(device=device, dtype=torch.float32)
        _twin_forward(fast, x, np.float32, device)                   # warm-up: JIT compiles
        (logits, recorded), t = _timed(_twin_forward, fast, x, np.float32, device)
        rows.append((f"twin, {backend} kernels", "float32", device, rel_err(logits, logits_ref),
                     _worst_block(recorded, reference), t))
        bar.update()
    bar.close()

    print()
    print(f"{VARIANT} at 224x224, batch 1: agreement with the NumPy float64 oracle")
    print(f"{'implementation':<26} {'dtype':<8} {'device':<6} {'logits rel err':>14}  "
          f"{'worst block output':<28} {'rel err':>9} {'time (s)':>9}")
    for name, dtype, device, err, (block, block_err), t in rows:
        print(f"{name:<26} {dtype:<8} {device:<6} {err:>14.2e}  {block:<28} {block_err:>9.2e} {t:>9.3f}")
    print("errors are max|got - ref| / max|ref| per tensor")

    if checkpoint is not None:
        names = imagenet_class_names()
        probs = np.exp(logits_ref[0] - logits_ref[0].max())
        probs /= probs.sum()
        print("\ntop-5 ImageNet classes (NumPy oracle):")
        for i in np.argsort(-probs)[:5]:
            print(f"  {probs[i]:6.1%}  {names[i]}")

    written = []
    if make_figures:
        written = write_figures(twin.to(torch.float32), x.astype(np.float32), figures_dir,
                                oracle.recorded, trained=checkpoint is not None)
        print("\nfigures written:")
        for p in written:
            print(f"  {p}")
    return {"rows": rows, "logits": logits_ref, "figures": written}


def write_figures(twin, x, figures_dir, oracle_recorded, trained: bool) -> list:
    """The feature-flow figures of the demo, written to ``figures_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .viz import flow, maps, wiring

    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if trained else " (untrained weights)"
    written = []
    bar = _progress(4, "figures")

    path = figures_dir / "demo_connectivity_sparx_mamba.png"
    plt.close(wiring.connectivity_diagrams(save=path))
    written.append(path)
    bar.update()

    attn_key = next(k for k in oracle_recorded if k.endswith(".op.attn"))
    path = figures_dir / "demo_dmca_attention.png"
    plt.close(maps.dmca_attention_maps(np.asarray(oracle_recorded[attn_key]),
                                       title=f"DMCA channel attention, {attn_key}{suffix}", save=path))
    written.append(path)
    bar.update()

    images = torch.from_numpy(x)
    contributions = flow.ablation_contributions(twin, images, batch_size=1)
    path = figures_dir / "demo_feature_flow_sparx_mamba_t.png"
    plt.close(wiring.feature_flow_graph(twin.plan, contributions["op"],
                                        title=f"measured contribution of each source{suffix}", save=path))
    written.append(path)
    bar.update()

    stage, idx = 2, 6
    rows = flow.source_feature_maps(twin, images, stage, idx)
    path = figures_dir / "demo_sources_vs_aggregated.png"
    plt.close(maps.feature_maps(rows, save=path))
    written.append(path)
    bar.update()
    bar.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparx-ref demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a released sparx_mamba_tiny_in1k.pth (prints the top-5 classes)")
    parser.add_argument("--figures", type=Path, default=REPO_FIGURES, help="where to write figures")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the released initialisation")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.exists():
        parser.error(f"--checkpoint: no such file: {args.checkpoint}")
    run(args.checkpoint, args.figures, args.seed, make_figures=not args.no_figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
