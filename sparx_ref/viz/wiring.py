"""Connectivity diagrams and feature-flow graphs of SparX backbones.

Both draw the plan returned by :func:`sparx_ref.models.wiring.ganglion_plan` (the one
wiring rule); nothing here re-derives which block feeds which.

Layout: one row per stage (stage 0 at the top). In each row the first node is the stage
input (the previous stage's downsampled output, "in"), then blocks 0, 1, ... Normal blocks
are grey circles, ganglion layers orange squares. Thin grey lines are the ordinary
block-to-block path; curved coloured arcs are the sparse cross-layer connections, drawn
from each source to the ganglion layer whose concatenated shortcut contains it.
"""
from __future__ import annotations

from typing import Mapping

from ..models.wiring import STAGE_INPUT, ganglion_plan
from ._common import finish, new_figure

__all__ = ["plan_for", "connectivity_diagram", "connectivity_diagrams", "feature_flow_graph"]

_GANGLION = "#e6862e"
_NORMAL = "#9a9a9a"
_ARC = "#2b6cb0"
_ROW = 1.3  # vertical distance between stage rows


def plan_for(model_or_variant):
    """A wiring plan from a variant name ("sparx_mamba_t", "sparx_swin_s", ...), a dict
    with ``depths``, ``dims`` and ``dense_config``, or an existing plan (returned as is)."""
    if isinstance(model_or_variant, list):
        return model_or_variant
    from ..models import configs
    if isinstance(model_or_variant, str):
        tables = {**configs.SPARX_MAMBA_VARIANTS}
        for name, cfg in configs.SPARX_SWIN_VARIANTS.items():
            tables[name] = dict(depths=cfg["depths"],
                                dims=[cfg["embed_dim"] * 2 ** i for i in range(len(cfg["depths"]))],
                                dense_config=cfg["dense_config"])
        if model_or_variant not in tables:
            raise ValueError(f"unknown variant {model_or_variant!r}; expected one of {sorted(tables)}")
        cfg = tables[model_or_variant]
    elif isinstance(model_or_variant, Mapping):
        cfg = model_or_variant
    else:
        raise TypeError(f"expected a variant name, a config dict or a plan, got {type(model_or_variant).__name__}")
    return ganglion_plan(cfg["depths"], cfg["dims"], cfg["dense_config"])


def _positions(plan):
    """Node name -> (x, y). The stage input of stage s is keyed ("in", s)."""
    pos = {}
    for stage, blocks in enumerate(plan):
        y = -_ROW * stage
        pos[("in", stage)] = (0.0, y)
        for b in blocks:
            pos[b.name] = (1.0 + b.idx, y)
    return pos


def _source_xy(pos, stage, source):
    return pos[("in", stage)] if source == STAGE_INPUT else pos[source]


def _draw_plan(ax, plan, title=None, weights=None, max_width=7.0, annotate=False):
    """Draw one plan on ``ax``; ``weights[(stage, idx)][source]`` (>= 0) scales arc widths."""
    from matplotlib.patches import FancyArrowPatch

    pos = _positions(plan)
    max_weight = None
    if weights is not None:
        vals = [float(v) for w in weights.values() for v in w.values()]
        max_weight = max(vals) if vals and max(vals) > 0 else 1.0
    for stage, blocks in enumerate(plan):
        # the ordinary sequential path
        xs = [pos[("in", stage)][0]] + [pos[b.name][0] for b in blocks]
        ax.plot(xs, [-_ROW * stage] * len(xs), color="#cccccc", lw=1.5, zorder=1)
        if stage + 1 < len(plan):  # downsample: last block -> next stage input
            x0, y0 = pos[blocks[-1].name]
            x1, y1 = pos[("in", stage + 1)]
            ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=8,
                                         color="#cccccc", lw=1.0, linestyle=":", zorder=1))
        for b in blocks:
            if not b.ganglion:
                continue
            xg, yg = pos[b.name]
            for k, source in enumerate(b.sources):
                xs_, ys_ = _source_xy(pos, stage, source)
                if weights is not None:
                    w = float(weights.get((stage, b.idx), {}).get(source, 0.0))
                    lw = 0.5 + max_width * w / max_weight
                else:
                    w, lw = None, 1.6
                span = max(xg - xs_, 1.0)
                rad = -2.0 * (0.25 + 0.06 * span) / span   # arc height 0.25 + 0.06 * span
                ax.add_patch(FancyArrowPatch((xs_, ys_ + 0.08), (xg, yg + 0.08),
                                             connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                             mutation_scale=9, color=_ARC, lw=lw, alpha=0.75,
                                             zorder=2))
                if annotate and w is not None:
                    xm = (xs_ + xg) / 2
                    ax.text(xm, yg + 0.08 + 0.5 * span * abs(rad), f"{w:.2g}",
                            ha="center", va="bottom", fontsize=7, color=_ARC, zorder=4,
                            bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.6))
    for stage, blocks in enumerate(plan):
        x, y = pos[("in", stage)]
        ax.scatter([x], [y], s=70, marker="D", color="#5a8f5a", zorder=3)
        for block in blocks:
            x, y = pos[block.name]
            ax.scatter([x], [y], s=110 if block.ganglion else 60, marker="s" if block.ganglion else "o",
                       color=_GANGLION if block.ganglion else _NORMAL, edgecolor="k", lw=0.5, zorder=3)
    ax.set_yticks([-_ROW * s for s in range(len(plan))])
    ax.set_yticklabels([f"stage {s}\n(d={plan[s][0].dim})" for s in range(len(plan))], fontsize=8)
    width = max(len(b) for b in plan)
    ax.set_xticks(range(0, width + 1))
    ax.set_xticklabels(["in"] + [str(i) for i in range(width)], fontsize=7)
    ax.set_xlim(-0.6, width + 0.6)
    ax.set_ylim(-_ROW * (len(plan) - 1) - 0.4, 1.3)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("block index (\"in\" = stage input)", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)


def connectivity_diagram(model_or_variant, title=None, save=None):
    """Draw one backbone's sparse cross-layer connections; returns the Figure.

    ``model_or_variant``: a variant name, a {depths, dims, dense_config} dict or a plan.
    """
    plan = plan_for(model_or_variant)
    width = max(len(b) for b in plan)
    fig, axes = new_figure(1.6 + 0.55 * (width + 1), 1.0 + 1.0 * len(plan))
    if title is None and isinstance(model_or_variant, str):
        title = model_or_variant
    _draw_plan(axes[0, 0], plan, title=title)
    return finish(fig, save)


def connectivity_diagrams(variants=("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"), save=None):
    """Several connectivity diagrams stacked vertically (default: SparX-Mamba T, S, B)."""
    plans = [plan_for(v) for v in variants]
    width = max(len(b) for plan in plans for b in plan)
    heights = [len(p) for p in plans]
    fig, axes = new_figure(1.6 + 0.5 * (width + 1), sum(1.0 * h + 0.7 for h in heights),
                           nrows=len(plans), ncols=1, gridspec_kw=dict(height_ratios=heights))
    for ax, plan, v in zip(axes[:, 0], plans, variants):
        _draw_plan(ax, plan, title=v if isinstance(v, str) else None)
        ax.set_xlim(-0.6, width + 0.6)
    return finish(fig, save)


def feature_flow_graph(model_or_variant, contributions: Mapping, title="measured contribution of each source",
                       annotate=True, save=None):
    """The connectivity diagram with arc widths proportional to measured contributions.

    contributions: ``{(stage, idx): {source_name: value >= 0}}`` for the ganglion layers
    (source names as in the plan: "stage_input", "s1.l0", ...). Values are drawn relative
    to the largest one; ``annotate`` writes them beside the arcs.
    """
    plan = plan_for(model_or_variant)
    for (stage, idx), per_source in contributions.items():
        block = plan[stage][idx]
        if not block.ganglion:
            raise ValueError(f"contributions given for layers.{stage}.blocks.{idx}, which is not a ganglion layer")
        unknown = set(per_source) - set(block.sources)
        if unknown:
            raise ValueError(f"layers.{stage}.blocks.{idx} has sources {list(block.sources)}, "
                             f"not {sorted(unknown)}")
    import textwrap
    width = max(len(b) for b in plan)
    fig_width = max(2.0 + 0.9 * (width + 1), 6.0)
    fig, axes = new_figure(fig_width, 1.2 + 1.3 * len(plan))
    title = "\n".join(textwrap.wrap(title, width=int(8.5 * fig_width))) if title else title
    _draw_plan(axes[0, 0], plan, title=title, weights=contributions, annotate=annotate)
    return finish(fig, save)


def _demo_weights(plan):  # used by tests: uniform weights for every arc
    return {(b.stage, b.idx): {s: 1.0 for s in b.sources} for stage in plan for b in stage if b.ganglion}


def arc_count(fig) -> int:
    """Number of drawn arrows (connections and downsample links) in a figure's first axes."""
    from matplotlib.patches import FancyArrowPatch
    return sum(isinstance(p, FancyArrowPatch) for p in fig.axes[0].patches)

