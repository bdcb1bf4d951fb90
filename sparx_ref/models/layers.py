"""Leaf NumPy modules wrapping the reference ops of :mod:`sparx_ref.ref.layers`.

Each module mirrors one ``torch.nn`` module: same parameter and buffer names, same
state_dict order, same forward arithmetic. ``forward`` caches what ``backward`` needs;
``backward(dout)`` returns the input gradient and accumulates parameter gradients with
``self.accumulate_grad`` (see :class:`sparx_ref.models.nn.Module`).

Initialisation (``init`` argument of Conv2d / Linear):
- ``"trunc_normal"`` (default): the released SparX-Mamba and Swin ``_init_weights``:
  weight ~ trunc_normal(std=0.02, cut-offs +-2 absolute), bias = 0.
- ``"torch_default"``: PyTorch's own reset_parameters (Swin's patch-embedding conv keeps
  it): kaiming_uniform(a=sqrt 5), i.e. weight ~ U(+-1/sqrt(fan_in)), and
  bias ~ U(+-1/sqrt(fan_in)), fan_in = in_channels/groups * kh * kw.
Norm layers start at weight 1, bias 0; BatchNorm2d's running_mean 0, running_var 1,
num_batches_tracked 0 (int64, shape ()).

Every constructor takes ``dtype`` (float64 default, float32 accepted) and ``rng`` (a
``np.random.Generator``; None draws a fresh unseeded one).
"""
from __future__ import annotations

import math

import numpy as np

from .._validate import check_divisible
from ..ref import layers as L
from .nn import Module

__all__ = ["Conv2d", "Linear", "GroupNorm", "LayerNorm", "BatchNorm2d", "GELU", "SiLU",
           "INITS"]

INITS = ("trunc_normal", "torch_default")


def _rng(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
    return rng


def _dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _init_weight_bias(init, rng, wshape, fan_in, bias, dtype):
    if init == "trunc_normal":
        w = L.trunc_normal(rng, wshape, std=0.02, dtype=dtype)
        b = np.zeros(wshape[0], dtype=dtype) if bias else None
    elif init == "torch_default":
        # kaiming_uniform_(a=sqrt(5)): gain sqrt(2/(1+5)), bound gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        w = rng.uniform(-bound, bound, size=wshape).astype(dtype)
        b = rng.uniform(-bound, bound, size=wshape[0]).astype(dtype) if bias else None
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return w, b


class _WeightBiasLayer(Module):
    """Conv2d / Linear: a weight and an optional bias, both trainable."""

    def _accumulate_weight_bias(self, g):
        self.accumulate_grad("weight", g["weight"])
        if "bias" in self._params:
            self.accumulate_grad("bias", g["bias"])
        return g["x"]


class Conv2d(_WeightBiasLayer):
    """``torch.nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias)``.

    Params: weight (cout, cin/groups, kh, kw), bias (cout,) if bias. x: (B, cin, H, W).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 bias=True, *, dtype=np.float64, rng=None, init="trunc_normal"):
        super().__init__()
        dtype, rng = _dtype(dtype), _rng(rng)
        kh, kw = L._pair("kernel_size", kernel_size, 1)
        self.stride = L._pair("stride", stride, 1)
        self.padding = L._pair("padding", padding, 0)
        self.groups = L._positive_int("groups", groups)
        check_divisible("in_channels", in_channels, groups, "groups")
        check_divisible("out_channels", out_channels, groups, "groups")
        self.in_channels, self.out_channels = in_channels, out_channels
        wshape = (out_channels, in_channels // groups, kh, kw)
        w, b = _init_weight_bias(init, rng, wshape, wshape[1] * kh * kw, bias, dtype)
        self.add_param("weight", w)
        if bias:
            self.add_param("bias", b)

    def forward(self, x):
        out, self._cache = L.conv2d_fwd(x, self.weight, self._params.get("bias"), self.stride,
                                        self.padding, self.groups)
        return out

    def backward(self, dout):
        return self._accumulate_weight_bias(L.conv2d_bwd(dout, self._cache))


class Linear(_WeightBiasLayer):
    """``torch.nn.Linear(in_features, out_features, bias)``. x: (..., in) -> (..., out)."""

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float64, rng=None,
                 init="trunc_normal"):
        super().__init__()
        dtype, rng = _dtype(dtype), _rng(rng)
        self.in_features, self.out_features = in_features, out_features
        w, b = _init_weight_bias(init, rng, (out_features, in_features), in_features, bias, dtype)
        self.add_param("weight", w)
        if bias:
            self.add_param("bias", b)

    def forward(self, x):
        out, self._cache = L.linear_fwd(x, self.weight, self._params.get("bias"))
        return out

    def backward(self, dout):
        return self._accumulate_weight_bias(L.linear_bwd(dout, self._cache))


class _AffineNorm(Module):
    """Shared weight/bias registration of the norm layers (weight 1, bias 0)."""

    def __init__(self, num_channels, affine, dtype):
        super().__init__()
        dtype = _dtype(dtype)
        self.affine = affine
        if affine:
            self.add_param("weight", np.ones(num_channels, dtype=dtype))
            self.add_param("bias", np.zeros(num_channels, dtype=dtype))

    def _wb(self):
        return self._params.get("weight"), self._params.get("bias")

    def _accumulate(self, g):
        if self.affine:
            self.accumulate_grad("weight", g["weight"])
            self.accumulate_grad("bias", g["bias"])
        return g["x"]


class GroupNorm(_AffineNorm):
    """``torch.nn.GroupNorm(num_groups, num_channels, eps)``. x: (B, C, *)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, dtype=np.float64,
                 rng=None):
        check_divisible("num_channels", num_channels, num_groups, "num_groups")
        super().__init__(num_channels, affine, dtype)
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps

    def forward(self, x):
        out, self._cache = L.group_norm_fwd(x, *self._wb(), self.num_groups, self.eps)
        return out

    def backward(self, dout):
        return self._accumulate(L.group_norm_bwd(dout, self._cache))


class LayerNorm(_AffineNorm):
    """``torch.nn.LayerNorm(normalized_shape=C, eps)``: normalises the LAST axis of x."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, *,
                 dtype=np.float64, rng=None):
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"normalized_shape must be one int (the last axis), got "
                                 f"{normalized_shape}")
            normalized_shape = normalized_shape[0]
        super().__init__(normalized_shape, elementwise_affine, dtype)
        self.normalized_shape, self.eps = (normalized_shape,), eps

    def forward(self, x):
        out, self._cache = L.layer_norm_fwd(x, *self._wb(), self.eps)
        return out

    def backward(self, dout):
        return self._accumulate(L.layer_norm_bwd(dout, self._cache))


class BatchNorm2d(_AffineNorm):
    """``torch.nn.BatchNorm2d(C, eps=1e-5, momentum=0.1)``. x: (B, C, H, W).

    State order: weight, bias, running_mean, running_var, num_batches_tracked.
    Train mode normalises with the batch statistics (biased variance) and then stores
    running_mean/running_var updated with momentum (unbiased variance) and increments
    num_batches_tracked; eval mode uses the running statistics.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, *, dtype=np.float64,
                 rng=None):
        super().__init__(num_features, affine, dtype)
        dtype = _dtype(dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.add_buffer("running_mean", np.zeros(num_features, dtype=dtype))
        self.add_buffer("running_var", np.ones(num_features, dtype=dtype))
        self.add_buffer("num_batches_tracked", np.array(0, dtype=np.int64))

    def forward(self, x):
        out, self._cache = L.batch_norm2d_fwd(x, *self._wb(), self.running_mean,
                                              self.running_var, training=self.training,
                                              momentum=self.momentum, eps=self.eps)
        if self.training:
            self._buffers["running_mean"] = self._cache["new_running_mean"]
            self._buffers["running_var"] = self._cache["new_running_var"]
            self._buffers["num_batches_tracked"] = np.array(
                int(self._buffers["num_batches_tracked"]) + 1, dtype=np.int64)
        return out

    def backward(self, dout):
        return self._accumulate(L.batch_norm2d_bwd(dout, self._cache))


class GELU(Module):
    """``torch.nn.GELU()`` (exact erf form)."""

    def forward(self, x):
        out, self._cache = L.gelu_fwd(x)
        return out

    def backward(self, dout):
        return L.gelu_bwd(dout, self._cache)["x"]


class SiLU(Module):
    """``torch.nn.SiLU()``."""

    def forward(self, x):
        out, self._cache = L.silu_fwd(x)
        return out

    def backward(self, dout):
        return L.silu_bwd(dout, self._cache)["x"]
