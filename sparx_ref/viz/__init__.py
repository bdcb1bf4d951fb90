"""Figures shared by the lessons, the demo and the README.

Every function builds a ``matplotlib.figure.Figure`` with the object-oriented API (no
pyplot state; files are rendered by the Agg canvas), returns it, and saves it when given
``save=path``. Notebooks display the returned Figure inline.

- wiring:  :func:`connectivity_diagram`, :func:`connectivity_diagrams`, :func:`feature_flow_graph`
- maps:    :func:`dmca_attention_maps`, :func:`scan_orders`, :func:`scan_attention_maps`,
           :func:`feature_maps`
- windows: :func:`shifted_window_regions`
- costs:   :func:`cross_layer_cost`, :func:`cost_plot`
- flow:    measurements on a trained PyTorch twin (:mod:`sparx_ref.viz.flow`): ablation
           contributions, d_proj weight shares, source vs aggregated feature maps
"""
from . import flow
from .costs import cost_plot, cross_layer_cost
from .maps import (dmca_attention_maps, feature_maps, query_attention, scan_attention_maps,
                   scan_orders, scan_pixel_order)
from .wiring import connectivity_diagram, connectivity_diagrams, feature_flow_graph, plan_for
from .windows import mask_from_labels, region_labels, shifted_window_regions

__all__ = ["connectivity_diagram", "connectivity_diagrams", "feature_flow_graph", "plan_for",
           "dmca_attention_maps", "feature_maps", "query_attention", "scan_attention_maps",
           "scan_orders", "scan_pixel_order", "mask_from_labels", "region_labels",
           "shifted_window_regions", "cost_plot", "cross_layer_cost"]
