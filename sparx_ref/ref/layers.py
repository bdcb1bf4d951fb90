"""Reference NumPy layers: forward and hand-derived backward of the building blocks.

Every op here is the oracle for one PyTorch function (named in its docstring). The
pattern is CS231n's:

    out, cache = op_fwd(x, ...)      # cache keeps exactly what backward needs
    grads = op_bwd(dout, cache)      # dict: gradient of every input and parameter

Pure data-movement ops (``channel_shuffle``/``channel_unshuffle``) return just the array;
their backward is the adjoint (here also the inverse).

Conventions
-----------
- Tensors are NCHW: ``x: (B, C, H, W)``. ``B`` batch, ``C`` channels, ``H, W`` height, width.
- float64 is the oracle dtype; float32 is accepted everywhere. All array inputs of one call
  must share one dtype and the outputs have that dtype (nothing is silently cast).
- Gradients of inputs that were ``None`` (an absent bias) are ``None``.
- Bad input raises ``ValueError``/``TypeError`` naming the argument, the expected and the
  received value (see :mod:`sparx_ref._validate`).
- NaN and inf are *not* checked for: they propagate through forward and backward the way
  IEEE arithmetic carries them (a NaN pixel makes its conv outputs NaN, a NaN in a
  normalisation group makes the whole group NaN, an inf in a softmax row makes that row
  NaN). Validation is about shapes and dtypes only.

Speed: the ops are vectorised so that a whole 224x224 model runs in about a second.
Depthwise convolutions accumulate over the ``kh*kw`` kernel offsets on a padded array;
1x1 convolutions are (batched, grouped) matrix products; general convolutions build an
im2col view with stride tricks and do one grouped matrix product.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf

from .._validate import as_float_array, check_divisible, check_same_dtype, check_shape

__all__ = [
    "conv2d_fwd", "conv2d_bwd", "depthwise_conv2d_fwd", "depthwise_conv2d_bwd", "conv1d_fwd", "conv1d_bwd", "linear_fwd", "linear_bwd",
    "group_norm_fwd", "group_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
    "batch_norm2d_fwd", "batch_norm2d_bwd", "gelu_fwd", "gelu_bwd", "silu_fwd", "silu_bwd",
    "softplus_fwd", "softplus_bwd", "sigmoid", "softmax_fwd", "softmax_bwd",
    "avg_pool2d_fwd", "avg_pool2d_bwd", "global_avg_pool_fwd", "global_avg_pool_bwd",
    "adaptive_avg_pool1d_fwd", "adaptive_avg_pool1d_bwd", "adaptive_pool_matrix",
    "channel_shuffle", "channel_unshuffle", "channel_padding_fwd", "channel_padding_bwd",
    "trunc_normal",
]


# ---------------------------------------------------------------------------------------
# small argument helpers
# ---------------------------------------------------------------------------------------
def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (each >= minimum) -> (int, int)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v), int(v))
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    v = (int(v[0]), int(v[1]))
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _optional(name: str, x, ndim: int, dtype):
    return None if x is None else as_float_array(name, x, ndim=ndim, dtype=dtype)


# ---------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------
def conv2d_fwd(x, weight, bias=None, stride=1, padding=0, groups=1):
    """2-D cross-correlation, mirrors ``torch.nn.functional.conv2d`` (zero padding).

    x: (B, Cin, H, W); weight: (Cout, Cin/groups, kh, kw); bias: (Cout,) or None.
    stride, padding: int or (sh, sw) / (ph, pw). groups divides Cin and Cout
    (depthwise: groups = Cin = Cout, weight (C, 1, kh, kw)).
    out: (B, Cout, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1 (likewise Wo).

        out[b, o, i, j] = bias[o] + sum_{c in group(o), u, v}
                          weight[o, c, u, v] * xpad[b, c, i*sh + u, j*sw + v]
    """
    x = as_float_array("x", x, ndim=4)
    weight = as_float_array("weight", weight, ndim=4, dtype=x.dtype)
    bias = _optional("bias", bias, 1, x.dtype)
    groups = _positive_int("groups", groups)
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    B, Cin, H, W = x.shape
    Cout, Cg, kh, kw = weight.shape
    check_divisible("in_channels (x.shape[1])", Cin, groups, "groups")
    check_divisible("out_channels (weight.shape[0])", Cout, groups, "groups")
    check_shape("weight", weight, (Cout, Cin // groups, None, None))
    if bias is not None:
        check_shape("bias", bias, (Cout,))
    (sh, sw), (ph, pw) = stride, padding
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1 or kh < 1 or kw < 1:
        raise ValueError(f"x spatial size {(H, W)} with padding {padding} is smaller than the "
                         f"kernel {(kh, kw)}")
    G, Og = groups, Cout // groups
    cache = dict(x_shape=x.shape, weight=weight, has_bias=bias is not None, stride=stride,
                 padding=padding, groups=groups, out_hw=(Ho, Wo))

    if kh == kw == 1 and stride == (1, 1) and padding == (0, 0):
        # pointwise: a (grouped) matrix product over the channel axis
        cache["path"] = "pointwise"
        xg = x.reshape(B, G, Cg, H * W)
        out = np.matmul(weight.reshape(G, Og, Cg), xg)  # (B, G, Og, H*W)
        cache["xg"] = xg
    elif Cg == 1 and G == Cin and Cout == Cin:
        # depthwise: accumulate one scaled shifted view per kernel offset
        cache["path"] = "depthwise"
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x
        out = np.zeros((B, Cout, Ho, Wo), dtype=x.dtype)
        tmp = np.empty_like(out)
        for u in range(kh):
            for v in range(kw):
                view = xp[:, :, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw]
                np.multiply(view, weight[:, 0, u, v][None, :, None, None], out=tmp)
                out += tmp
        cache["xp"] = xp
    else:
        # general: im2col (B, G, Cg*kh*kw, Ho*Wo) from a strided window view, one matmul
        cache["path"] = "im2col"
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if (ph or pw) else x
        win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :Ho, :Wo]
        cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(B, G, Cg * kh * kw, Ho * Wo)
        out = np.matmul(weight.reshape(G, Og, Cg * kh * kw), cols)  # (B, G, Og, Ho*Wo)
        cache["cols"] = cols
    out = out.reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out += bias[None, :, None, None]
    return out, cache


def conv2d_bwd(dout, cache):
    """Backward of :func:`conv2d_fwd`. dout: (B, Cout, Ho, Wo) -> {"x", "weight", "bias"}.

    dx is the transposed convolution of dout (scatter-add over kernel offsets), dweight the
    correlation of dout with the padded input, dbias the sum of dout over (B, Ho, Wo).
    """
    weight = cache["weight"]
    B, Cin, H, W = cache["x_shape"]
    Cout, Cg, kh, kw = weight.shape
    Ho, Wo = cache["out_hw"]
    (sh, sw), (ph, pw) = cache["stride"], cache["padding"]
    G, Og = cache["groups"], Cout // cache["groups"]
    dout = as_float_array("dout", dout, ndim=4, dtype=weight.dtype)
    check_shape("dout", dout, (B, Cout, Ho, Wo))
    dbias = dout.sum(axis=(0, 2, 3)) if cache["has_bias"] else None
    path = cache["path"]
    if path == "pointwise":
        xg = cache["xg"]
        dg = dout.reshape(B, G, Og, H * W)
        dx = np.matmul(weight.reshape(G, Og, Cg).transpose(0, 2, 1), dg).reshape(B, Cin, H, W)
        dw = np.matmul(dg, xg.transpose(0, 1, 3, 2)).sum(axis=0).reshape(weight.shape)
    elif path == "depthwise":
        xp = cache["xp"]
        dxp = np.zeros(xp.shape, dtype=weight.dtype)
        dw = np.empty_like(weight)
        tmp = np.empty_like(dout)
        for u in range(kh):
            for v in range(kw):
                sl = (slice(None), slice(None), slice(u, u + sh * (Ho - 1) + 1, sh),
                      slice(v, v + sw * (Wo - 1) + 1, sw))
                dw[:, 0, u, v] = np.einsum("bchw,bchw->c", dout, xp[sl])
                np.multiply(dout, weight[:, 0, u, v][None, :, None, None], out=tmp)
                dxp[sl] += tmp
        dx = dxp[:, :, ph:ph + H, pw:pw + W]
    else:
        cols = cache["cols"]
        dg = dout.reshape(B, G, Og, Ho * Wo)
        dw = np.matmul(dg, cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(weight.shape)
        dcols = np.matmul(weight.reshape(G, Og, Cg * kh * kw).transpose(0, 2, 1), dg)
        dcols = dcols.reshape(B, Cin, kh, kw, Ho, Wo)
        dxp = np.zeros((B, Cin, H + 2 * ph, W + 2 * pw), dtype=weight.dtype)
        for u in range(kh):  # col2im: scatter every offset's columns back
            for v in range(kw):
                dxp[:, :, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] += dcols[:, :, u, v]
        dx = dxp[:, :, ph:ph + H, pw:pw + W]
    return {"x": np.ascontiguousarray(dx), "weight": dw, "bias": dbias}


def depthwise_conv2d_fwd(x, weight, bias=None):
    """Depthwise "same" convolution: ``conv2d_fwd(x, weight, bias, stride=1,
    padding=(kh // 2, kw // 2), groups=C)``, the form of every depthwise conv of SparX
    (``nn.Conv2d(C, C, k, padding=k // 2, groups=C)``) and of its LayerScale (k = 1). The
    kernel op ``depthwise_conv2d_fwd`` of :mod:`sparx_ref.kernels` mirrors this one.

    x: (B, C, H, W); weight: (C, 1, kh, kw) with kh, kw odd; bias: (C,) or None.
    out: (B, C, H, W), out[b, c, h, w] = bias[c] + sum_{u, v} weight[c, 0, u, v] *
    x[b, c, h + u - kh // 2, w + v - kw // 2] (zero outside the map).
    """
    x = as_float_array("x", x, ndim=4)
    weight = as_float_array("weight", weight, ndim=4, dtype=x.dtype)
    C = x.shape[1]
    if C == 0:
        raise ValueError(f"x must have at least one channel, got shape {x.shape}")
    check_shape("weight", weight, (C, 1, None, None))
    kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight's kernel size must be odd in both dimensions (a 'same' "
                         f"convolution), got {(kh, kw)}")
    return conv2d_fwd(x, weight, bias, stride=1, padding=(kh // 2, kw // 2), groups=C)


def depthwise_conv2d_bwd(dout, cache):
    """Backward of :func:`depthwise_conv2d_fwd`: dout (B, C, H, W) -> {"x", "weight", "bias"}."""
    return conv2d_bwd(dout, cache)


def conv1d_fwd(x, weight, bias=None, groups=1):
    """1-D cross-correlation, stride 1, no padding; mirrors ``torch.nn.functional.conv1d``.

    x: (B, Cin, L); weight: (Cout, Cin/groups, k); bias: (Cout,) or None.
    out: (B, Cout, L - k + 1). Computed as a conv2d on a height-1 image.
    """
    x = as_float_array("x", x, ndim=3)
    weight = as_float_array("weight", weight, ndim=3, dtype=x.dtype)
    out, c2 = conv2d_fwd(x[:, :, None, :], weight[:, :, None, :], bias, 1, 0, groups)
    return out[:, :, 0, :], {"conv2d": c2}


def conv1d_bwd(dout, cache):
    """Backward of :func:`conv1d_fwd`. dout: (B, Cout, Lout) -> {"x", "weight", "bias"}."""
    dout = as_float_array("dout", dout, ndim=3)
    g = conv2d_bwd(dout[:, :, None, :], cache["conv2d"])
    return {"x": g["x"][:, :, 0, :], "weight": g["weight"][:, :, 0, :], "bias": g["bias"]}


# ---------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------
def linear_fwd(x, weight, bias=None):
    """Affine map over the last axis, mirrors ``torch.nn.functional.linear``.

    x: (..., in); weight: (out, in); bias: (out,) or None. out: (..., out) = x W^T + b.
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {x.shape}")
    weight = as_float_array("weight", weight, ndim=2, dtype=x.dtype)
    bias = _optional("bias", bias, 1, x.dtype)
    check_shape("weight", weight, (None, x.shape[-1]))
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))
    out = x @ weight.T
    if bias is not None:
        out += bias
    return out, {"x": x, "weight": weight, "has_bias": bias is not None}


def linear_bwd(dout, cache):
    """Backward of :func:`linear_fwd`. dout: (..., out) -> {"x", "weight", "bias"}."""
    x, weight = cache["x"], cache["weight"]
    dout = as_float_array("dout", dout, dtype=weight.dtype)
    check_shape("dout", dout, x.shape[:-1] + (weight.shape[0],))
    d2 = dout.reshape(-1, weight.shape[0])
    dw = d2.T @ x.reshape(-1, weight.shape[1])
    db = d2.sum(axis=0) if cache["has_bias"] else None
    return {"x": dout @ weight, "weight": dw, "bias": db}


# ---------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------
def _normalise_bwd(dxhat, xhat, rstd, axes):
    """Shared backward of xhat = (x - mean) * rstd, mean/var (biased) over ``axes``:
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    m1 = dxhat.mean(axis=axes, keepdims=True)
    m2 = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return rstd * (dxhat - m1 - xhat * m2)


def group_norm_fwd(x, weight, bias, num_groups, eps=1e-5):
    """Group normalisation, mirrors ``torch.nn.functional.group_norm``.

    x: (B, C, *spatial); weight, bias: (C,) or None; num_groups divides C.
    Per sample and group of C/num_groups channels, over those channels and all spatial
    positions: xhat = (x - mean) / sqrt(var + eps) (biased variance), then
    out = xhat * weight[c] + bias[c]. With num_groups = 1 (SparX-Mamba's "norm") it
    normalises jointly over (C, H, W).
    """
    x = as_float_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (B, C, *), got shape {x.shape}")
    weight = _optional("weight", weight, 1, x.dtype)
    bias = _optional("bias", bias, 1, x.dtype)
    num_groups = _positive_int("num_groups", num_groups)
    B, C = x.shape[:2]
    check_divisible("channels (x.shape[1])", C, num_groups, "num_groups")
    for nm, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_shape(nm, p, (C,))
    xg = x.reshape(B, num_groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    xc = xg - mean
    var = np.mean(xc * xc, axis=2, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (xc * rstd).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    out = xhat * weight.reshape(bshape) if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.reshape(bshape)
    cache = dict(xhat=xhat, rstd=rstd, weight=weight, has_bias=bias is not None,
                 num_groups=num_groups)
    return out, cache


def group_norm_bwd(dout, cache):
    """Backward of :func:`group_norm_fwd`. dout: x.shape -> {"x", "weight", "bias"}."""
    xhat, weight, G = cache["xhat"], cache["weight"], cache["num_groups"]
    dout = as_float_array("dout", dout, dtype=xhat.dtype)
    check_shape("dout", dout, xhat.shape)
    B, C = xhat.shape[:2]
    red = (0,) + tuple(range(2, xhat.ndim))
    dw = (dout * xhat).sum(axis=red) if weight is not None else None
    db = dout.sum(axis=red) if cache["has_bias"] else None
    bshape = (1, C) + (1,) * (xhat.ndim - 2)
    dxhat = dout * weight.reshape(bshape) if weight is not None else dout
    dx = _normalise_bwd(dxhat.reshape(B, G, -1), xhat.reshape(B, G, -1), cache["rstd"], 2)
    return {"x": dx.reshape(xhat.shape), "weight": dw, "bias": db}


def layer_norm_fwd(x, weight, bias, eps=1e-5):
    """Layer normalisation over the LAST axis, mirrors ``torch.nn.functional.layer_norm``
    with ``normalized_shape = (C,)``.

    x: (..., C); weight, bias: (C,) or None. out = (x - mean)/sqrt(var + eps) * w + b,
    mean and biased var over the last axis.
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {x.shape}")
    weight = _optional("weight", weight, 1, x.dtype)
    bias = _optional("bias", bias, 1, x.dtype)
    C = x.shape[-1]
    for nm, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_shape(nm, p, (C,))
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * rstd
    out = xhat * weight if weight is not None else xhat.copy()
    if bias is not None:
        out += bias
    return out, dict(xhat=xhat, rstd=rstd, weight=weight, has_bias=bias is not None)


def layer_norm_bwd(dout, cache):
    """Backward of :func:`layer_norm_fwd`. dout: x.shape -> {"x", "weight", "bias"}."""
    xhat, weight = cache["xhat"], cache["weight"]
    dout = as_float_array("dout", dout, dtype=xhat.dtype)
    check_shape("dout", dout, xhat.shape)
    C = xhat.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0) if weight is not None else None
    db = dout.reshape(-1, C).sum(axis=0) if cache["has_bias"] else None
    dxhat = dout * weight if weight is not None else dout
    return {"x": _normalise_bwd(dxhat, xhat, cache["rstd"], -1), "weight": dw, "bias": db}


def batch_norm2d_fwd(x, weight, bias, running_mean, running_var, training=False,
                     momentum=0.1, eps=1e-5):
    """Batch normalisation of NCHW maps, mirrors ``torch.nn.functional.batch_norm``.

    x: (B, C, H, W); weight, bias, running_mean, running_var: (C,) (weight/bias may be None).
    - eval (training=False): out = (x - running_mean)/sqrt(running_var + eps) * w + b.
    - train: mean and *biased* var over (B, H, W) normalise x; the updated running stats
      new = (1 - momentum) * old + momentum * batch_stat, with the *unbiased* variance
      (n/(n-1) * var, n = B*H*W), are returned in cache["new_running_mean"] and
      cache["new_running_var"] (None when the running stats are None). The inputs are not
      modified: the caller stores the new stats (and bumps num_batches_tracked).
    """
    x = as_float_array("x", x, ndim=4)
    weight = _optional("weight", weight, 1, x.dtype)
    bias = _optional("bias", bias, 1, x.dtype)
    running_mean = _optional("running_mean", running_mean, 1, x.dtype)
    running_var = _optional("running_var", running_var, 1, x.dtype)
    C = x.shape[1]
    for nm, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                  ("running_var", running_var)):
        if p is not None:
            check_shape(nm, p, (C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    bshape = (1, C, 1, 1)
    cache = dict(weight=weight, has_bias=bias is not None, training=bool(training),
                 new_running_mean=None, new_running_var=None)
    if training:
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n <= 1:
            raise ValueError(f"x: batch norm in training needs more than 1 value per channel, "
                             f"got shape {x.shape}")
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        xc = x - mean
        var = np.mean(xc * xc, axis=(0, 2, 3), keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = xc * rstd
        if running_mean is not None:
            cache["new_running_mean"] = (1 - momentum) * running_mean + momentum * mean.reshape(C)
            cache["new_running_var"] = ((1 - momentum) * running_var
                                        + momentum * var.reshape(C) * (n / (n - 1)))
            cache["new_running_mean"] = cache["new_running_mean"].astype(x.dtype, copy=False)
            cache["new_running_var"] = cache["new_running_var"].astype(x.dtype, copy=False)
    else:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        rstd = (1.0 / np.sqrt(running_var + eps)).reshape(bshape)
        xhat = (x - running_mean.reshape(bshape)) * rstd
    out = xhat * weight.reshape(bshape) if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.reshape(bshape)
    cache.update(xhat=xhat, rstd=rstd)
    return out, cache


def batch_norm2d_bwd(dout, cache):
    """Backward of :func:`batch_norm2d_fwd`. dout: (B, C, H, W) -> {"x", "weight", "bias"}.

    Train mode differentiates through the batch statistics; eval mode is an affine map
    (the running stats are buffers, not differentiated).
    """
    xhat, weight = cache["xhat"], cache["weight"]
    dout = as_float_array("dout", dout, ndim=4, dtype=xhat.dtype)
    check_shape("dout", dout, xhat.shape)
    C = xhat.shape[1]
    dw = (dout * xhat).sum(axis=(0, 2, 3)) if weight is not None else None
    db = dout.sum(axis=(0, 2, 3)) if cache["has_bias"] else None
    dxhat = dout * weight.reshape(1, C, 1, 1) if weight is not None else dout
    if cache["training"]:
        dx = _normalise_bwd(dxhat, xhat, cache["rstd"], (0, 2, 3))
    else:
        dx = dxhat * cache["rstd"]
    return {"x": dx, "weight": dw, "bias": db}


# ---------------------------------------------------------------------------------------
# pointwise activations
# ---------------------------------------------------------------------------------------
def sigmoid(x):
    """Numerically stable logistic function 1/(1+exp(-x)) (no overflow for large |x|)."""
    e = np.exp(-np.abs(x))                      # in (0, 1]: never overflows
    s = 1.0 / (1.0 + e)                         # sigmoid(|x|)
    np.multiply(s, e, out=s, where=x < 0)       # sigmoid(-|x|) = e / (1 + e)
    return s.astype(x.dtype, copy=False)


def gelu_fwd(x):
    """Exact GELU, mirrors ``torch.nn.functional.gelu(x, approximate='none')``.

    x: any shape. out = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
    """
    x = as_float_array("x", x)
    cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    return (x * cdf).astype(x.dtype, copy=False), {"x": x, "cdf": cdf}


def gelu_bwd(dout, cache):
    """d/dx GELU = Phi(x) + x phi(x), phi the standard normal pdf. -> {"x"}."""
    x = cache["x"]
    dout = as_float_array("dout", dout, dtype=x.dtype)
    check_shape("dout", dout, x.shape)
    pdf = np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return {"x": (dout * (cache["cdf"] + x * pdf)).astype(x.dtype, copy=False)}


def silu_fwd(x):
    """SiLU (swish), mirrors ``torch.nn.functional.silu``: out = x * sigmoid(x)."""
    x = as_float_array("x", x)
    s = sigmoid(x)
    return x * s, {"x": x, "sig": s}


def silu_bwd(dout, cache):
    """d/dx SiLU = s (1 + x (1 - s)), s = sigmoid(x). -> {"x"}."""
    x, s = cache["x"], cache["sig"]
    dout = as_float_array("dout", dout, dtype=x.dtype)
    check_shape("dout", dout, x.shape)
    return {"x": dout * (s * (1.0 + x * (1.0 - s)))}


def softplus_fwd(x, beta=1.0, threshold=20.0):
    """Softplus, mirrors ``torch.nn.functional.softplus(x, beta, threshold)``.

    out = log1p(exp(beta x)) / beta, except out = x where beta x > threshold (PyTorch's
    and the selective-scan kernel's switch to the identity; default threshold 20).
    """
    x = as_float_array("x", x)
    bx = x * beta
    linear = bx > threshold
    soft = np.log1p(np.exp(np.minimum(bx, threshold))) / beta  # min() avoids overflow warnings
    return np.where(linear, x, soft).astype(x.dtype, copy=False), {"x": x, "beta": beta,
                                                                   "linear": linear}


def softplus_bwd(dout, cache):
    """d/dx softplus = sigmoid(beta x) (1 in the identity region). -> {"x"}."""
    x = cache["x"]
    dout = as_float_array("dout", dout, dtype=x.dtype)
    check_shape("dout", dout, x.shape)
    g = np.where(cache["linear"], 1.0, sigmoid(x * cache["beta"])).astype(x.dtype, copy=False)
    return {"x": dout * g}


def softmax_fwd(x, axis=-1):
    """Softmax along ``axis``, mirrors ``torch.softmax``: exp(x - max) / sum exp(x - max)."""
    x = as_float_array("x", x)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [-{x.ndim}, {x.ndim}), got {axis}")
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, {"y": y, "axis": axis}


def softmax_bwd(dout, cache):
    """dx = y * (dout - sum(dout * y)) along the softmax axis. -> {"x"}."""
    y, axis = cache["y"], cache["axis"]
    dout = as_float_array("dout", dout, dtype=y.dtype)
    check_shape("dout", dout, y.shape)
    return {"x": y * (dout - (dout * y).sum(axis=axis, keepdims=True))}


# ---------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------
def avg_pool2d_fwd(x, kernel_size, stride=None):
    """Average pooling without padding, mirrors ``torch.nn.functional.avg_pool2d(x, k, s)``.

    x: (B, C, H, W); kernel_size, stride: int or pair (stride None = kernel_size).
    out: (B, C, Ho, Wo), Ho = (H - kh) // sh + 1; each output = mean of its kh x kw window.
    """
    x = as_float_array("x", x, ndim=4)
    kh, kw = _pair("kernel_size", kernel_size, 1)
    sh, sw = (kh, kw) if stride is None else _pair("stride", stride, 1)
    B, C, H, W = x.shape
    if H < kh or W < kw:
        raise ValueError(f"x spatial size {(H, W)} is smaller than kernel_size {(kh, kw)}")
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    out = np.zeros((B, C, Ho, Wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            out += x[:, :, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw]
    out /= kh * kw
    return out, dict(x_shape=x.shape, dtype=x.dtype, k=(kh, kw), s=(sh, sw))


def avg_pool2d_bwd(dout, cache):
    """Backward of :func:`avg_pool2d_fwd`: every window pixel gets dout / (kh kw). -> {"x"}."""
    B, C, H, W = cache["x_shape"]
    (kh, kw), (sh, sw) = cache["k"], cache["s"]
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    dout = as_float_array("dout", dout, ndim=4, dtype=cache["dtype"])
    check_shape("dout", dout, (B, C, Ho, Wo))
    dx = np.zeros((B, C, H, W), dtype=cache["dtype"])
    share = dout / (kh * kw)
    for u in range(kh):
        for v in range(kw):
            dx[:, :, u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] += share
    return {"x": dx}


def global_avg_pool_fwd(x):
    """Mean over H and W: (B, C, H, W) -> (B, C); mirrors ``adaptive_avg_pool2d(x, 1)``
    followed by ``flatten(1)``."""
    x = as_float_array("x", x, ndim=4)
    return x.mean(axis=(2, 3)), {"x_shape": x.shape, "dtype": x.dtype}


def global_avg_pool_bwd(dout, cache):
    """dx[b, c, h, w] = dout[b, c] / (H W). -> {"x"}."""
    B, C, H, W = cache["x_shape"]
    dout = as_float_array("dout", dout, ndim=2, dtype=cache["dtype"])
    check_shape("dout", dout, (B, C))
    dx = np.broadcast_to((dout / (H * W))[:, :, None, None], (B, C, H, W)).copy()
    return {"x": dx}


def adaptive_pool_matrix(length: int, output_size: int, dtype=np.float64) -> np.ndarray:
    """(length, output_size) averaging matrix of PyTorch's adaptive pooling bin rule:
    bin i covers [floor(i L / n), ceil((i + 1) L / n)); bins may overlap when n does not
    divide L. ``x @ M`` pools the last axis."""
    M = np.zeros((length, output_size), dtype=dtype)
    for i in range(output_size):
        start = (i * length) // output_size
        end = -((-(i + 1) * length) // output_size)  # ceil
        M[start:end, i] = 1.0 / (end - start)
    return M


def adaptive_avg_pool1d_fwd(x, output_size):
    """Adaptive average pooling over the LAST axis, mirrors
    ``torch.nn.functional.adaptive_avg_pool1d`` (which pools the last axis of (B, C, L)).

    x: (..., L); output_size n with 1 <= n. out: (..., n), bins as in
    :func:`adaptive_pool_matrix`.
    """
    x = as_float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {x.shape}")
    n = _positive_int("output_size", output_size)
    M = adaptive_pool_matrix(x.shape[-1], n, x.dtype)
    return x @ M, {"M": M, "x_shape": x.shape}


def adaptive_avg_pool1d_bwd(dout, cache):
    """dx = dout @ M^T (the pooling matrix transposed). -> {"x"}."""
    M = cache["M"]
    dout = as_float_array("dout", dout, dtype=M.dtype)
    check_shape("dout", dout, cache["x_shape"][:-1] + (M.shape[1],))
    return {"x": dout @ M.T}


# ---------------------------------------------------------------------------------------
# channel data movement
# ---------------------------------------------------------------------------------------
def _check_channels(x, groups):
    x = as_float_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (B, C, *), got shape {x.shape}")
    groups = _positive_int("groups", groups)
    check_divisible("channels (x.shape[1])", x.shape[1], groups, "groups")
    return x, groups


def channel_shuffle(x, groups):
    """Channel shuffle, einops ``'b (c g) h w -> b (g c) h w'`` with g = groups.

    x: (B, C, *rest), C = n * groups. out[:, gi*n + ci] = x[:, ci*groups + gi]: output
    group gi collects every groups-th input channel starting at gi. Adjoint (and inverse):
    :func:`channel_unshuffle`.
    """
    x, groups = _check_channels(x, groups)
    B, C = x.shape[:2]
    rest = x.shape[2:]
    return np.ascontiguousarray(
        x.reshape((B, C // groups, groups) + rest).swapaxes(1, 2)).reshape(x.shape)


def channel_unshuffle(x, groups):
    """Inverse (= adjoint, a permutation) of :func:`channel_shuffle`:
    out[:, ci*groups + gi] = x[:, gi*n + ci]."""
    x, groups = _check_channels(x, groups)
    B, C = x.shape[:2]
    rest = x.shape[2:]
    return np.ascontiguousarray(
        x.reshape((B, groups, C // groups) + rest).swapaxes(1, 2)).reshape(x.shape)


def channel_padding_fwd(x, target_channels):
    """Append channels up to ``target_channels`` (SparX's ganglion ``channel_padding``,
    spec sparx_mamba.md §7 step 8).

    x: (B, P, H, W) -> out: (B, target, H, W), pad = target - P:
    - 0: out = x (copied);
    - 1: append the mean over the P channels at each pixel;
    - 2: append ``adaptive_avg_pool1d`` over the channel axis with 2 bins (for even P:
      the mean of channels [0, P/2) and the mean of [P/2, P)).
    Any other pad raises ValueError.
    """
    x = as_float_array("x", x, ndim=4)
    target = _positive_int("target_channels", target_channels)
    B, P, H, W = x.shape
    pad = target - P
    if pad not in (0, 1, 2):
        raise ValueError(f"target_channels - x.shape[1] must be 0, 1 or 2, got "
                         f"target_channels={target} with x.shape[1]={P}")
    if pad == 0:
        return x.copy(), {"pad": 0, "M": None, "P": P, "dtype": x.dtype}
    M = adaptive_pool_matrix(P, pad, x.dtype)  # pad 1 -> a plain channel mean
    extra = np.einsum("bphw,pk->bkhw", x, M, optimize=True)
    return np.concatenate([x, extra], axis=1), {"pad": pad, "M": M, "P": P, "dtype": x.dtype}


def channel_padding_bwd(dout, cache):
    """Backward of :func:`channel_padding_fwd`: the real channels' gradient plus each
    appended channel's gradient spread back over the channels it averaged. -> {"x"}."""
    P, pad = cache["P"], cache["pad"]
    dout = as_float_array("dout", dout, ndim=4, dtype=cache["dtype"])
    check_shape("dout", dout, (None, P + pad, None, None))
    dx = dout[:, :P].copy()
    if pad:
        dx += np.einsum("bkhw,pk->bphw", dout[:, P:], cache["M"], optimize=True)
    return {"x": dx}


# ---------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------
def trunc_normal(rng, shape, std=0.02, a=-2.0, b=2.0, dtype=np.float64, mean=0.0):
    """Samples of N(mean, std^2) truncated to [a, b] (ABSOLUTE cut-offs, like timm's
    ``trunc_normal_``; with std 0.02 the default +-2 is +-100 std, i.e. a plain normal).

    Implemented by resampling the out-of-range draws (same distribution as timm's inverse
    CDF method, not the same random stream). rng: np.random.Generator.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not a < b:
        raise ValueError(f"need a < b, got a={a}, b={b}")
    out = rng.normal(mean, std, size=shape)
    bad = (out < a) | (out > b)
    while bad.any():
        out[bad] = rng.normal(mean, std, size=int(bad.sum()))
        bad = (out < a) | (out > b)
    return out.astype(dtype)
