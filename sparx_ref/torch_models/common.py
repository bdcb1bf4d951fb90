"""Shared pieces of the PyTorch twins: swappable compute kernels and small layers.

The hot operations of SparX-Mamba (selective scan, 2-D cross scan / merge, DMCA channel
attention) are reached through a :class:`TorchKernels` table, so a later backend (Numba-CUDA,
CuPy) can plug in without touching the model code. ``kernel_backend="torch"`` (plain
PyTorch, CPU and GPU, differentiable by autograd) is the only one today.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- kernels
def selective_scan_torch(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan, plain PyTorch (mirrors mamba-ssm ``selective_scan_ref`` semantics).

    u, delta: (b, KD, L); A: (KD, N); B, C: (b, K, N, L), channel c uses group c // (KD // K);
    D, delta_bias: (KD,) or None. Returns y: (b, KD, L) with
        delta_t = softplus(delta_t + delta_bias)  (if delta_softplus)
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,  h_0 = 0
        y_t = <C_t, h_t> + D u_t
    """
    b, KD, L = u.shape
    K = B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = B.repeat_interleave(KD // K, dim=1)                     # (b, KD, N, L)
    Cx = C.repeat_interleave(KD // K, dim=1)                     # (b, KD, N, L)
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # (b, KD, N, L)
    drive = (delta * u)[:, :, None, :] * Bx                      # (b, KD, N, L)
    h = torch.zeros_like(decay[..., 0])                          # (b, KD, N)
    states = []
    for t in range(L):  # the recurrence itself is sequential
        h = decay[..., t] * h + drive[..., t]
        states.append(h)
    hs = torch.stack(states, dim=-1)                             # (b, KD, N, L)
    y = (hs * Cx).sum(dim=2)                                     # (b, KD, L)
    if D is not None:
        y = y + D[None, :, None] * u
    return y


def cross_scan_torch(x):
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    row = x.flatten(2)                               # index h*W + w
    col = x.transpose(2, 3).flatten(2)               # index w*H + h
    fwd = torch.stack([row, col], dim=1)             # (B, 2, C, L)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)     # (B, 4, C, L)


def cross_merge_torch(ys, H, W):
    """(B, 4, C, H*W) -> (B, C, H, W): the adjoint of :func:`cross_scan_torch`."""
    B, K, C, L = ys.shape
    y_row = ys[:, 0] + ys[:, 2].flip(-1)                              # (B, C, L), row-major
    y_col = ys[:, 1] + ys[:, 3].flip(-1)                              # (B, C, L), laid out W x H
    return (y_row.view(B, C, H, W) + y_col.view(B, C, W, H).transpose(2, 3))


def channel_attention_torch(q, k, v):
    """DMCA core: per (image, group) softmax(q k^T / sqrt(Ls)) v.

    q, k: (B*G, g, Ls); v: (B*G, g, L). Returns (out (B*G, g, L), attn (B*G, g, g)).
    Same arithmetic as ``F.scaled_dot_product_attention(q, k, v)`` (scale 1/sqrt(Ls)),
    written out so the attention maps can be recorded.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B*G, g, g)
    attn = torch.softmax(scores, dim=-1)
    return torch.matmul(attn, v), attn


@dataclass(frozen=True)
class TorchKernels:
    """The swappable hot operations (one row per operation)."""

    name: str
    selective_scan: Callable
    cross_scan: Callable
    cross_merge: Callable
    channel_attention: Callable
    # SparX-Mamba's whole SSM core in one call (kernel backends: :mod:`.ss2d_core`); None: op by
    # op through the rows above, in the released order (:func:`ss2d_core_released`)
    ss2d_core: Callable | None = None


def ss2d_core_released(kernels: TorchKernels, u, x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias):
    """SparX-Mamba's SSM core op by op, in the released order, through ``kernels``' cross_scan,
    selective_scan and cross_merge (spec §8): u (B, Di, H, W) -> (B, Di, H, W), before out_norm.
    Parameter shapes: x_proj_weight (K*(R+2N), Di, 1), dt_projs_weight (K, Di, R), A_logs (K*Di, N),
    Ds (K*Di,), dt_projs_bias (K, Di); K = 4 directions. See :mod:`.ss2d_core` for the same in one
    autograd node."""
    B, D, H, W = u.shape
    K, R, N, L = dt_projs_weight.shape[0], dt_projs_weight.shape[2], A_logs.shape[1], H * W
    # The released grouped 1x1 conv1d's (groups = K) are per-direction matrix products;
    # written as batched matmuls because cuDNN runs these grouped conv1d's through slow
    # transposes on the GPU (2 ms each at batch 64: half of an inference step on an H100).
    x_proj = x_proj_weight.reshape(K, R + 2 * N, D)                              # (K, R+2N, Di)
    xs = kernels.cross_scan(u)                                                   # (B, K, Di, L)
    x_dbl = torch.matmul(x_proj, xs)                                             # (B, K, R+2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.matmul(dt_projs_weight, dts).reshape(B, K * D, L)                # (B, K*Di, L)
    ys = kernels.selective_scan(xs.reshape(B, K * D, L), dts, -torch.exp(A_logs), Bs.contiguous(),
                                Cs.contiguous(), Ds, dt_projs_bias.reshape(-1), delta_softplus=True)
    return kernels.cross_merge(ys.reshape(B, K, D, L), H, W)                    # (B, Di, H, W)


KERNEL_BACKENDS = {
    "torch": TorchKernels("torch", selective_scan_torch, cross_scan_torch, cross_merge_torch,
                          channel_attention_torch),
}


def get_kernels(kernel_backend: str) -> TorchKernels:
    if kernel_backend not in KERNEL_BACKENDS:
        from .ops import kernel_table  # numba_cpu / numba_cuda / cupy: registered kernels
        return kernel_table(kernel_backend)  # ValueError for an unknown name
    return KERNEL_BACKENDS[kernel_backend]


# ----------------------------------------------------------------------------- layers
class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: per sample over all of (C, H, W) (released ``GroupNorm``).
    Same parameters and state_dict keys as ``nn.GroupNorm(1, C)``; its forward runs on the
    model's kernel backend (``kernel_backend``, set by :func:`.ops.set_kernel_backend`), "torch"
    being ``nn.GroupNorm.forward`` itself. x (B, C, H, W) -> (B, C, H, W)."""

    kernel_backend = "torch"

    def __init__(self, num_channels, eps=1e-5):
        super().__init__(num_groups=1, num_channels=num_channels, eps=eps)

    def forward(self, x):
        if self.kernel_backend == "torch":
            return super().forward(x)
        from .ops import group_norm  # ops imports this module: import at call time
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, backend=self.kernel_backend)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels at every pixel of an NCHW tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _depthwise_on_backend(x, weight, bias, backend, residual=False):
    """The depthwise "same" conv on a kernel backend (:func:`.ops.depthwise_conv2d`)."""
    from .ops import depthwise_conv2d  # ops imports this module: import at call time
    return depthwise_conv2d(x, weight, bias, residual=residual, backend=backend)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, k, padding=k // 2, groups=C)``, the depthwise "same" convolution of the
    released models (same parameters and state_dict keys), whose forward runs on the model's
    kernel backend (``kernel_backend``, set by :func:`.ops.set_kernel_backend`); "torch" is
    ``nn.Conv2d.forward`` itself. x (B, C, H, W) -> (B, C, H, W); ``module(x, residual=True)``
    is ``x + module(x)`` in one pass on CuPy (the released ``x + pos_embed(x)``)."""

    kernel_backend = "torch"

    def __init__(self, channels, kernel_size, bias=True):
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a 'same' convolution), got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                         bias=bias)

    def forward(self, x, residual=False):
        if self.kernel_backend == "torch":
            return x + super().forward(x) if residual else super().forward(x)
        return _depthwise_on_backend(x, self.weight, self.bias, self.kernel_backend, residual)


class LayerScale(nn.Module):
    """Per-channel ``w * x + b``, the released depthwise 1x1 conv; weight (C, 1, 1, 1), bias (C,)
    (the released keys). x (B, C, H, W) -> (B, C, H, W).

    Computed as one ``torch.addcmul(b, x, w)`` on every kernel backend: the same arithmetic as the
    convolution, and at the stages that have LayerScale (SparX-Mamba's 2 and 3, small maps) a
    training step is bound by host time, where a cuDNN convolution costs several times more than
    an elementwise op, forward and backward (benchmarks/RESULTS.md, "Whole models")."""

    def __init__(self, dim, init_value=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1, 1) * init_value)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.bias.shape[0]:
            raise ValueError(f"LayerScale: x must be (B, {self.bias.shape[0]}, H, W), got shape {tuple(x.shape)}")
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's rule: keep with prob 1-p, scale by 1/(1-p))."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def released_init_(module: nn.Module) -> None:
    """SparX-Mamba ``_init_weights``: conv/linear weight trunc_normal(std .02, cut-offs ±2),
    biases 0; BatchNorm/GroupNorm/LayerNorm weight 1, bias 0 (spec §10)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
