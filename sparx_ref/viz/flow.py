"""Measuring how features flow through the ganglion layers of a PyTorch SparX-Mamba twin.

- :func:`ablation_contributions`: a source's contribution to a ganglion layer is the
  relative change of that layer's output when the source's channels are zeroed in the
  concatenated shortcut, averaged over images:
  ``mean_b ||out_b(ablated) - out_b|| / ||out_b||``.
  "The layer's output" is the output of the ganglion layer's token mixer (``op``, the only
  part of the block that reads the shortcut; ``which="op"``) or of the whole block
  (``which="block"``, residual path included, so the changes are smaller).
- :func:`d_proj_weight_shares`: each source's share of the squared Frobenius norm of the
  ``d_proj`` 1x1 conv (``d_proj.3``, c -> 2d), split by the input-channel ranges of the
  sources. A static, data-free proxy; the ablation is the measurement.
- :func:`source_feature_maps`: the sources of one ganglion layer and what the layer makes of
  them (``d_proj`` output, the fused SSM input), ready for :func:`sparx_ref.viz.feature_maps`.

Note that zeroing a source also changes the statistics of ``d_norm`` (one GroupNorm over the
whole concatenation), so the ablation measures the full effect of removing a source, not
just its direct linear term. And DMCA's attention mixes *channels* of the projected
concatenation (after ``d_proj`` mixed all sources), not sources.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ganglion_blocks", "ablation_contributions", "d_proj_weight_shares", "source_feature_maps"]


def ganglion_blocks(model):
    """[(stage, idx, BlockPlan, block module)] for every ganglion layer of a twin."""
    out = []
    for stage, (layer, stage_plan) in enumerate(zip(model.layers, model.plan)):
        for block, bp in zip(layer.blocks, stage_plan):
            if bp.ganglion:
                out.append((stage, bp.idx, bp, block))
    return out


def _forward_recorded(model, images, batch_size):
    """Run the model with recording on; return {key: numpy array} for op and block outputs."""
    import torch
    was_recording = model.record
    model.record = True
    collected = {}
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i:i + batch_size])
                for key, value in model.recorded.items():
                    collected.setdefault(key, []).append(value.cpu().numpy())
    finally:
        model.record = was_recording
    return {k: np.concatenate(v) for k, v in collected.items()}


def _relative_change(new, ref):
    axes = tuple(range(1, ref.ndim))
    return np.sqrt(((new - ref) ** 2).sum(axes)) / np.maximum(np.sqrt((ref ** 2).sum(axes)), 1e-30)


def ablation_contributions(model, images, batch_size: int = 250) -> dict:
    """Contributions of every source to every ganglion layer of a twin, by ablation.

    model: a PyTorch SparX-Mamba twin (``sparx_ref.torch_models``), put in eval mode here.
    images: a float tensor (n, 3, H, W), already normalised.
    Returns ``{"op": {(stage, idx): {source: mean relative change}}, "block": {...}}``: the
    change of the token mixer's output and of the whole block's output (one ablated forward
    pass per source serves both).
    """
    import torch
    model.eval()
    baseline = _forward_recorded(model, images, batch_size)
    result = {"op": {}, "block": {}}
    for stage, idx, bp, block in ganglion_blocks(model):
        name = f"layers.{stage}.blocks.{idx}"
        result["op"][(stage, idx)], result["block"][(stage, idx)] = {}, {}
        for j, source in enumerate(bp.sources):
            def zero_source(module, args, j=j):
                x, shortcut = args[0], list(args[1])
                shortcut[j] = torch.zeros_like(shortcut[j])
                return (x, shortcut) + tuple(args[2:])
            handle = block.register_forward_pre_hook(zero_source)
            try:
                ablated = _forward_recorded(model, images, batch_size)
            finally:
                handle.remove()
            for which, key in (("op", name + ".op"), ("block", name)):
                change = _relative_change(ablated[key], baseline[key])
                result[which][(stage, idx)][source] = float(change.mean())
    return result


def d_proj_weight_shares(model) -> dict:
    """{(stage, idx): {source: share}}: each source's share of ||d_proj.3.weight||_F^2 (sums to 1)."""
    shares = {}
    for stage, idx, bp, block in ganglion_blocks(model):
        weight = block.op.d_proj[3].weight.detach().cpu().numpy()      # (2d, c, 1, 1)
        total = float((weight ** 2).sum())
        start = 0
        shares[(stage, idx)] = {}
        for source, width in zip(bp.sources, bp.source_channels):
            shares[(stage, idx)][source] = float((weight[:, start:start + width] ** 2).sum()) / total
            start += width
    return shares


def source_feature_maps(model, image, stage: int, idx: int) -> dict:
    """For ganglion layer ``layers.{stage}.blocks.{idx}`` and one normalised image (1, 3, H, W):
    an ordered dict name -> (C, h, w) array: each source, then "d_proj (aggregated)" and
    "fused SSM input" (after DMCA's in_proj and padding)."""
    recorded = _forward_recorded(model, image, batch_size=1)
    bp = model.plan[stage][idx]
    if not bp.ganglion:
        raise ValueError(f"layers.{stage}.blocks.{idx} is not a ganglion layer")
    rows = {}
    for source in bp.sources:
        key = f"layers.{stage - 1}.out" if source == "stage_input" else \
            f"layers.{stage}.blocks.{int(source.split('.l')[1])}"
        rows[f"source {source}"] = recorded[key][0]
    rows["d_proj (aggregated)"] = recorded[f"layers.{stage}.blocks.{idx}.op.d_proj"][0]
    rows["fused SSM input"] = recorded[f"layers.{stage}.blocks.{idx}.op.in_proj_padded"][0]
    return rows
