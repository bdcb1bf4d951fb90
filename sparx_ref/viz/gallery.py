"""Regenerate the figures the README shows: ``python -m sparx_ref.viz.gallery [OUT_DIR] [--train]``.

Without ``--train`` (a few seconds): the connectivity diagrams of SparX-Mamba T/S/B and of
SparX-Swin T (the project's reconstruction), the dense vs sparse cost plot, the four SS2D
scan orders, the scan read as attention on a synthetic image, Swin's nine shifted-window
regions, and DMCA's attention maps at initialisation.

With ``--train`` (about 2 minutes on 2 cores) also the feature-flow figures of lesson 6:
the small SparX-Mamba trained on the synthetic data, its connectivity graph with arc widths
from measured ablation contributions, its DMCA attention, and source vs aggregated maps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import flow
from .costs import cost_plot
from .maps import dmca_attention_maps, feature_maps, scan_attention_maps, scan_orders
from .windows import shifted_window_regions
from .wiring import connectivity_diagram, connectivity_diagrams, feature_flow_graph


def edge_selective_scan_matrices(image: np.ndarray, edge_gain: float = 6.0, base_delta: float = 0.05):
    """The per-direction scan matrices (4, L, L) of a hand-made *selective* SS2D on ``image``
    (3, H, W): one channel (the grey image), A = -1, B = C = 1, and a step delta that is large
    on the image's edges, so the scan's memory resets where a path crosses an edge.
    Returns (matrices, grey image (H, W), delta (1, 4, L) in scan order)."""
    from ..ref import scan, ss2d
    gray = np.asarray(image, dtype=np.float64).mean(0)
    H, W = gray.shape
    L = H * W
    smooth = (gray + np.roll(gray, 1, 0) + np.roll(gray, -1, 0) + np.roll(gray, 1, 1)
              + np.roll(gray, -1, 1)) / 5
    edges = np.hypot(np.diff(smooth, axis=0, append=smooth[-1:]), np.diff(smooth, axis=1, append=smooth[:, -1:]))
    edges = edges / max(edges.max(), 1e-12)
    delta = ss2d.cross_scan((base_delta + edge_gain * edges)[None, None]).reshape(1, 4, L)
    ones = np.ones((1, 4, 1, L))
    return scan.scan_matrix(delta, -np.ones((4, 1)), ones, ones)[0], gray, delta


def static_figures(out_dir) -> list:
    """Write the figures that need no training; return their paths."""
    from ..data.synthetic import CLASS_NAMES, generate
    from ..ref import dmca
    out = Path(out_dir)
    paths = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=110)
        paths.append(path)

    out.mkdir(parents=True, exist_ok=True)
    save(connectivity_diagrams(("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b")), "connectivity_sparx_mamba.png")
    save(connectivity_diagram("sparx_swin_t", title="sparx_swin_t (the project's reconstruction)"),
         "connectivity_sparx_swin_t.png")
    save(cost_plot(("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b")), "dense_vs_sparse_cost.png")
    save(scan_orders(4, 5), "ss2d_scan_orders.png")
    data = generate(4, seed=5, size=24)
    image = data.images[int(np.nonzero(data.labels == CLASS_NAMES.index("disk"))[0][0])].astype(np.float64)
    matrices, gray, _ = edge_selective_scan_matrices(image)
    dev = np.abs(gray - np.median(gray))
    ys, xs = np.nonzero(dev > 0.5 * dev.max())
    query = (int(round(ys.mean())), int(round(xs.mean())))
    save(scan_attention_maps(matrices, *gray.shape, query, image=image), "ss2d_scan_as_attention.png")
    save(shifted_window_regions(8, 8, 4, 2), "swin_shifted_window_regions.png")
    rng = np.random.default_rng(0)
    d, c, sr = 32, 96, 2
    params = dmca.dmca_init_params(d, c, sr, 2 * d, rng)
    _, cache = dmca.dmca_fwd(rng.standard_normal((1, d, 8, 8)), rng.standard_normal((1, c, 8, 8)), params,
                             sr_ratio=sr, out_channels=2 * d)
    save(dmca_attention_maps(cache["attn"], title="DMCA channel attention (random input, released init)"),
         "dmca_attention_init.png")
    return paths


def trained_figures(out_dir, progress: bool = True) -> tuple:
    """Train lesson 6's small SparX-Mamba and write its feature-flow figures; return
    (paths, training result, contributions)."""
    import torch
    from ..data import synthetic
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = synthetic.make_dataset()
    result = synthetic.train_small_sparx_mamba(train, test, progress=progress)
    model = result.model.eval()
    held_out = torch.from_numpy(synthetic.normalize(test.images[:500]))
    contributions = flow.ablation_contributions(model, held_out)["op"]
    paths = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=110)
        paths.append(path)

    title = (f"small SparX-Mamba on synthetic data ({result.test_accuracy:.1%} held-out): "
             f"relative change of each ganglion layer when a source is removed")
    save(feature_flow_graph(model.plan, contributions, title=title), "feature_flow_small_sparx_mamba.png")
    model.record = True
    with torch.no_grad():
        model(held_out[:8])
    model.record = False
    save(dmca_attention_maps(model.recorded["layers.2.blocks.2.op.attn"],
                             title="trained small SparX-Mamba, layers.2.blocks.2: DMCA attention over channels"),
         "dmca_attention_trained.png")
    mosaic = test.images[:16].reshape(4, 4, 3, 32, 32).transpose(2, 0, 3, 1, 4).reshape(1, 3, 128, 128)
    rows = flow.source_feature_maps(model, torch.from_numpy(synthetic.normalize(mosaic)), stage=1, idx=1)
    save(feature_maps(rows, title="layers.1.blocks.1: sources and what the ganglion layer makes of them"),
         "feature_maps_sources_vs_aggregated.png")
    return paths, result, contributions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="figures")
    parser.add_argument("--train", action="store_true", help="also train lesson 6's model (~2 min)")
    args = parser.parse_args(argv)
    for path in static_figures(args.out_dir):
        print("wrote", path)
    if args.train:
        paths, result, _ = trained_figures(args.out_dir)
        print(f"trained in {result.seconds:.0f} s, held-out accuracy {result.test_accuracy:.4f}")
        for path in paths:
            print("wrote", path)


if __name__ == "__main__":
    main()
