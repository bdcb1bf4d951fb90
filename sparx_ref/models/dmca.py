"""``DMCA``: a NumPy Module around the functional ganglion input path
(:func:`sparx_ref.ref.dmca.dmca_fwd` / :func:`~sparx_ref.ref.dmca.dmca_bwd`).

Its parameters and buffers are registered under their dotted names *relative to the
released op* (``d_norm.weight``, ``d_proj.1.running_mean``, ``q.0.0.weight``, ...) in the
released state_dict order, so a parent that adds it as a transparent child (name ``""``)
gets keys like ``op.d_norm.weight`` exactly as in the released checkpoint.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..ref import dmca as ref_dmca
from .nn import Module

__all__ = ["DMCA"]


class DMCA(Module):
    """The ganglion layer's input path as a module.

    DMCA(dim, shortcut_channels, sr_ratio, out_channels, norm="group", eps=1e-5, *,
    dtype=np.float64, rng=None)

    forward(x, shortcut): x (B, dim, H, W), shortcut (B, shortcut_channels, H, W) ->
    (B, out_channels, H, W). After each forward ``self.recorded`` holds ``"attn"``
    (B, 4, dim/4, dim/4), ``"d_proj"`` (B, 2 dim, H, W) and ``"in_proj_padded"`` (the output);
    ``self._cache`` is the functional cache (it too has "attn" and "d_proj"). In train mode
    every BatchNorm uses batch statistics and the updated running stats (and
    num_batches_tracked + 1) are stored into the buffers.
    backward(dout) -> (dx, dshortcut); parameter gradients are accumulated.
    """

    def __init__(self, dim, shortcut_channels, sr_ratio, out_channels, norm="group", eps=1e-5,
                 *, dtype=np.float64, rng=None):
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")
        if rng is None:
            rng = np.random.default_rng()
        self.dim, self.shortcut_channels = dim, shortcut_channels
        self.sr_ratio, self.out_channels, self.norm, self.eps = sr_ratio, out_channels, norm, eps
        shapes = ref_dmca.dmca_param_shapes(dim, shortcut_channels, sr_ratio, out_channels)
        init = ref_dmca.dmca_init_params(dim, shortcut_channels, sr_ratio, out_channels, rng, dtype)
        for key, (_, kind) in shapes.items():
            (self.add_param if kind == "param" else self.add_buffer)(key, init[key])
        self.recorded = OrderedDict()

    def _state(self):
        return {**self._params, **self._buffers}

    def forward(self, x, shortcut):
        out, cache = ref_dmca.dmca_fwd(x, shortcut, self._state(), sr_ratio=self.sr_ratio,
                                       out_channels=self.out_channels, norm=self.norm,
                                       training=self.training, eps=self.eps)
        self._cache = cache
        if self.training:
            for key, value in cache["new_running_stats"].items():
                self._buffers[key] = value
        self.recorded = OrderedDict(attn=cache["attn"], d_proj=cache["d_proj"],
                                    in_proj_padded=out)
        return out

    def backward(self, dout):
        g = ref_dmca.dmca_bwd(dout, self._cache)
        for key in self._params:
            self.accumulate_grad(key, g[key])
        return g["x"], g["shortcut"]
