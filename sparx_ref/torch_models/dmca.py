"""DMCA, the ganglion layer's input path (docs/spec/sparx_mamba.md §7 steps 1-8), in PyTorch.

Given the normed block input ``x`` (B, d, H, W) and the concatenated shortcut ``sc``
(B, c, H, W):

1. ``t = d_proj(d_norm(sc))`` (B, 2d, H, W); ``k_in, v_in = t.chunk(2)``.
2. ``q = q(x)``, ``k = k(k_in)`` (B, d, sH, sW) after the optional spatial reduction;
   ``v = v(v_in)`` (B, d, H, W).
3. Channel attention in 4 groups of g = d/4 channels: tokens are channels, features are the
   sH*sW reduced positions: ``attn = softmax(q k^T / sqrt(sH sW)) v`` per image and group.
4. If (sH, sW) == (H, W), x is replaced by q.
5. ``z = cat([x, attn, v])`` (B, 3d, H, W); channel shuffle with 3 groups.
6. ``in_proj``: depthwise 3x3 + GELU + grouped (3 groups) 1x1 to P = 3*floor(out/3).
7. Pad to ``out_channels`` (1 channel: the channel mean; 2: two half-means).

SparX-Mamba: ``out_channels`` = Di = 2d and ``norm="group"`` (GroupNorm, 1 group). SparX-Swin
(the project's reconstruction): ``out_channels`` = d and ``norm="layer"`` (LayerNorm over
channels per pixel).

The layers are built by :func:`add_dmca_layers` onto any host module, so the released keys
(``d_norm``, ``d_proj``, ``q``, ``k``, ``v``, ``in_proj``) sit directly in SparX-Mamba's
``op`` (where raw SSM parameters precede them) or in a standalone :class:`DMCA` child (SparX-Swin).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DepthwiseConv2d, GroupNorm1, LayerNorm2d, get_kernels

DMCA_GROUPS = 4


def spatial_reduction(dim: int, sr_ratio: int):
    """Depthwise conv (kernel sr+1, stride sr, padding (sr+1)//2, no bias) + BN + GELU, or
    None (an Identity placeholder that still uses up index 0 of the Sequential) if sr == 1."""
    if sr_ratio <= 1:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=(sr_ratio + 1) // 2,
                  groups=dim, bias=False),
        nn.BatchNorm2d(dim),
        nn.GELU(),
    )


def add_dmca_layers(host: nn.Module, dim: int, shortcut_channels: int, sr_ratio: int,
                    out_channels: int, norm: str = "group") -> None:
    """Register d_norm, d_proj, q, k, v, in_proj on ``host`` (released order and names)."""
    if dim % DMCA_GROUPS != 0:
        raise ValueError(f"a ganglion layer needs dim divisible by {DMCA_GROUPS} (channel "
                         f"attention in {DMCA_GROUPS} groups), got dim={dim}")
    if norm == "group":
        host.d_norm = GroupNorm1(shortcut_channels)
    elif norm == "layer":
        host.d_norm = LayerNorm2d(shortcut_channels, eps=1e-5)
    else:
        raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")
    c = shortcut_channels
    host.d_proj = nn.Sequential(
        DepthwiseConv2d(c, 3, bias=False),
        nn.BatchNorm2d(c),
        nn.GELU(),
        nn.Conv2d(c, 2 * dim, kernel_size=1),
        nn.GELU(),
    )
    host.q = nn.Sequential(spatial_reduction(dim, sr_ratio),
                           nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))
    host.k = nn.Sequential(spatial_reduction(dim, sr_ratio),
                           nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))
    host.v = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))
    fused = 3 * (out_channels // 3)
    host.in_proj = nn.Sequential(
        DepthwiseConv2d(3 * dim, 3),
        nn.GELU(),
        nn.Conv2d(3 * dim, fused, kernel_size=1, groups=3),
    )
    host.channel_padding = out_channels - fused


def channel_shuffle(x, groups: int = 3):
    """einops ``b (c g) h w -> b (g c) h w``: out[gi*n + ci] = in[ci*groups + gi]."""
    B, C, H, W = x.shape
    return x.view(B, C // groups, groups, H, W).transpose(1, 2).reshape(B, C, H, W)


def pad_channels(x, padding: int):
    """Append ``padding`` channels: 1 -> the channel mean; 2 -> adaptive_avg_pool1d over the
    channel axis with 2 bins (the released rule)."""
    if padding == 0:
        return x
    B, P, H, W = x.shape
    if padding == 1:
        pad = x.mean(dim=1, keepdim=True)
    else:
        pad = F.adaptive_avg_pool1d(x.flatten(2).transpose(1, 2), padding)  # (B, HW, padding)
        pad = pad.transpose(1, 2).reshape(B, padding, H, W)
    return torch.cat([x, pad], dim=1)


def dmca_forward(host: nn.Module, x, shortcut, kernels=None):
    """Run the DMCA path of ``host`` (built by :func:`add_dmca_layers`).

    x: (B, d, H, W) normed block input; shortcut: (B, c, H, W).
    Returns (out (B, out_channels, H, W), extras) with extras = {"d_proj": (B, 2d, H, W),
    "attn": (B, 4, g, g) attention maps, "in_proj_padded": out}.
    """
    kernels = kernels or get_kernels("torch")
    t = host.d_proj(host.d_norm(shortcut))           # (B, 2d, H, W)
    k_in, v_in = torch.chunk(t, 2, dim=1)
    q = host.q(x)                                    # (B, d, sH, sW)
    k = host.k(k_in)                                 # (B, d, sH, sW)
    v = host.v(v_in)                                 # (B, d, H, W)
    B, C, H, W = x.shape
    sH, sW = q.shape[2:]
    g = C // DMCA_GROUPS
    out, attn = kernels.channel_attention(q.reshape(B * DMCA_GROUPS, g, sH * sW),
                                          k.reshape(B * DMCA_GROUPS, g, sH * sW),
                                          v.reshape(B * DMCA_GROUPS, g, H * W))
    out = out.reshape(B, C, H, W)
    if (H, W) == (sH, sW):
        x = q
    z = channel_shuffle(torch.cat([x, out, v], dim=1), 3)  # (B, 3d, H, W)
    z = pad_channels(host.in_proj(z), host.channel_padding)
    extras = {"d_proj": t, "attn": attn.reshape(B, DMCA_GROUPS, g, g), "in_proj_padded": z}
    return z, extras


class DMCA(nn.Module):
    """Standalone DMCA (used as a child by SparX-Swin): keys d_norm.*, d_proj.*, q.*, k.*,
    v.*, in_proj.*; ``forward(x, shortcut) -> (B, out_channels, H, W)``.

    After a forward, ``self.extras`` holds the recorded intermediates (detached) when
    ``self.record`` is True.
    """

    def __init__(self, dim, shortcut_channels, sr_ratio, out_channels, norm="group",
                 kernel_backend="torch"):
        super().__init__()
        add_dmca_layers(self, dim, shortcut_channels, sr_ratio, out_channels, norm)
        self.kernels = get_kernels(kernel_backend)
        self.record = False
        self.extras = {}

    def forward(self, x, shortcut):
        out, extras = dmca_forward(self, x, shortcut, self.kernels)
        self.extras = {k: v.detach() for k, v in extras.items()} if self.record else {}
        return out
