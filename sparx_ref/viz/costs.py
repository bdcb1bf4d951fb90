"""What sparse cross-layer connections save: channels read per layer and FLOPs, dense vs sparse.

"Sparse" is a variant's released dense_config. "Dense" is the same backbone with every block
of stages 1-3 a ganglion layer, uncapped (``dense_step 1, dense_start 0,
max_dense_depth 100``): through the same wiring rule, block i of a stage then reads the
outputs of all i blocks before it (block 0 reads the stage input), a DenseNet-like
all-to-all pattern. Both plans come from :func:`sparx_ref.models.wiring.ganglion_plan`.

The cost that grows with a ganglion layer's shortcut width ``c`` is its ``d_proj``:
a depthwise 3x3 conv on c channels (9 c MACs per pixel) and a 1x1 conv c -> 2d
(2 d c MACs per pixel), so ``MACs = (9 + 2d) c H W``; FLOPs = 2 MACs. (``d_norm`` and the BN
add O(c H W) more, left out.)
"""
from __future__ import annotations

import numpy as np

from ..models.wiring import ganglion_plan
from ._common import finish, new_figure
from .wiring import plan_for

__all__ = ["dense_config_all_ganglion", "cross_layer_cost", "cost_plot"]


def dense_config_all_ganglion(num_stages: int = 4) -> dict:
    """Every block of stages 1.. a ganglion layer, no cap (stage 0 cannot hold one)."""
    return dict(dense_step=[1] * num_stages, dense_start=[100] + [0] * (num_stages - 1),
                max_dense_depth=[100] * num_stages, cross_stage=[False] * num_stages)


def cross_layer_cost(variant="sparx_mamba_t", image_size: int = 224) -> dict:
    """Per block (in order), channels read through cross-layer connections and the d_proj FLOPs.

    variant: a name or {depths, dims, dense_config}. Returns a dict of equal-length lists:
    ``names`` ("s2.l3"), ``stage``, ``sparse_channels``, ``dense_channels``, ``sparse_flops``,
    ``dense_flops``, plus totals ``sparse_total_flops`` and ``dense_total_flops``.
    """
    sparse = plan_for(variant)
    depths = [len(s) for s in sparse]
    dims = [s[0].dim for s in sparse]
    dense = ganglion_plan(depths, dims, dense_config_all_ganglion(len(depths)))
    out = dict(names=[], stage=[], sparse_channels=[], dense_channels=[], sparse_flops=[], dense_flops=[])
    side = image_size // 4
    for stage, (sp_blocks, de_blocks) in enumerate(zip(sparse, dense)):
        hw = side * side
        for sp, de in zip(sp_blocks, de_blocks):
            d = sp.dim
            out["names"].append(sp.name)
            out["stage"].append(stage)
            out["sparse_channels"].append(sp.shortcut_channels)
            out["dense_channels"].append(de.shortcut_channels)
            out["sparse_flops"].append(2 * (9 + 2 * d) * sp.shortcut_channels * hw)
            out["dense_flops"].append(2 * (9 + 2 * d) * de.shortcut_channels * hw)
        side //= 2
    out["sparse_total_flops"] = int(np.sum(out["sparse_flops"]))
    out["dense_total_flops"] = int(np.sum(out["dense_flops"]))
    return out


def cost_plot(variants=("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"), image_size: int = 224, save=None):
    """Two rows per figure: channels read per block and d_proj GFLOPs per block, dense vs sparse."""
    variants = list(variants)
    fig, axes = new_figure(4.6 * len(variants), 6.0, nrows=2, ncols=len(variants))
    for j, v in enumerate(variants):
        cost = cross_layer_cost(v, image_size)
        x = np.arange(len(cost["names"]))
        for row, key, scale, ylabel in ((0, "channels", 1.0, "channels read via cross-layer links"),
                                        (1, "flops", 1e-9, "d_proj GFLOPs (224x224)")):
            ax = axes[row, j]
            ax.bar(x - 0.2, np.asarray(cost[f"dense_{key}"]) * scale, width=0.4, color="#bbbbbb",
                   label="dense (every block a ganglion layer)")
            ax.bar(x + 0.2, np.asarray(cost[f"sparse_{key}"]) * scale, width=0.4, color="#e6862e",
                   label="sparse (released SparX)")
            ax.set_ylabel(ylabel, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xticks(x[::2] if len(x) > 16 else x)
            ax.set_xticklabels((cost["names"][::2] if len(x) > 16 else cost["names"]), rotation=90, fontsize=5)
        axes[0, j].set_title(f"{v}: total {cost['sparse_total_flops'] / 1e9:.2f} vs "
                             f"{cost['dense_total_flops'] / 1e9:.2f} GFLOPs", fontsize=8)
        if j == 0:
            axes[0, j].legend(fontsize=6)
    return finish(fig, save)
