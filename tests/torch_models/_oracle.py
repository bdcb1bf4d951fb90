"""The NumPy oracle standing in as a kernel backend (a fake registry) for the twin-dispatch tests."""
from __future__ import annotations

import types

from sparx_ref import kernels
from sparx_ref.ref import dmca as ref_dmca
from sparx_ref.ref import layers as ref_layers
from sparx_ref.ref import scan as ref_scan
from sparx_ref.ref import ss2d as ref_ss2d
from sparx_ref.ref import window_attention as ref_wa

REF_KERNELS = {
    "selective_scan_fwd": ref_scan.selective_scan_fwd, "selective_scan_bwd": ref_scan.selective_scan_bwd,
    "cross_scan": ref_ss2d.cross_scan, "cross_merge": ref_ss2d.cross_merge,
    "ss2d_scan_fwd": ref_ss2d.ss2d_scan_fwd, "ss2d_scan_bwd": ref_ss2d.ss2d_scan_bwd,
    "window_attention_fwd": ref_wa.window_attention_fwd, "window_attention_bwd": ref_wa.window_attention_bwd,
    "dmca_attention_fwd": ref_dmca.dmca_attention_fwd, "dmca_attention_bwd": ref_dmca.dmca_attention_bwd,
    "depthwise_conv2d_fwd": ref_layers.depthwise_conv2d_fwd, "depthwise_conv2d_bwd": ref_layers.depthwise_conv2d_bwd,
    "group_norm_fwd": ref_layers.group_norm_fwd, "group_norm_bwd": ref_layers.group_norm_bwd,
}


def oracle_registry():
    """A stand-in for sparx_ref.kernels where backend "numba_cpu" serves the NumPy oracle ops
    (they have the kernels' exact signatures and NumPy arrays)."""
    def get(op, backend, version=None):
        assert backend == "numba_cpu"
        return REF_KERNELS[op]
    rows = [kernels.Entry(op, "numba_cpu", "oracle", "", True) for op in REF_KERNELS]
    return types.SimpleNamespace(
        BACKENDS=kernels.BACKENDS, get=get, registered=lambda: [(r.op, r.backend) for r in rows],
        entries=lambda op=None, backend=None: [r for r in rows if (op is None or r.op == op)
                                               and (backend is None or r.backend == backend)])
