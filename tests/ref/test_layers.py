"""sparx_ref.ref.layers: every op vs PyTorch float64 autograd, every backward vs finite
differences, float32 accepted, bad input named, and a few algebraic properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref.ref import layers as L
from sparx_ref.testing import assert_close, numerical_vjp, rel_err
from sparx_ref.tolerances import tolerance


# ---------------------------------------------------------------------------------------
# cases: inputs (dict of arrays), static kwargs, our fwd/bwd, the torch function
# ---------------------------------------------------------------------------------------
def _conv2d_case(B, Cin, Cout, H, W, k, stride, padding, groups, bias=True):
    kh, kw = (k, k) if isinstance(k, int) else k

    def make(rng, dtype):
        arrays = {"x": rng.standard_normal((B, Cin, H, W)),
                  "weight": rng.standard_normal((Cout, Cin // groups, kh, kw))}
        if bias:
            arrays["bias"] = rng.standard_normal(Cout)
        return {n: a.astype(dtype) for n, a in arrays.items()}

    kw_ = dict(stride=stride, padding=padding, groups=groups)
    return dict(make=make, kwargs=kw_, fwd=L.conv2d_fwd, bwd=L.conv2d_bwd,
                torch=lambda t, **k_: F.conv2d(t["x"], t["weight"], t.get("bias"), **k_))


def _conv1d_case(B, Cin, Cout, Lx, k, groups):
    def make(rng, dtype):
        return {"x": rng.standard_normal((B, Cin, Lx)).astype(dtype),
                "weight": rng.standard_normal((Cout, Cin // groups, k)).astype(dtype),
                "bias": rng.standard_normal(Cout).astype(dtype)}
    return dict(make=make, kwargs=dict(groups=groups), fwd=L.conv1d_fwd, bwd=L.conv1d_bwd,
                torch=lambda t, **k_: F.conv1d(t["x"], t["weight"], t["bias"], **k_))


def _pointwise_case(name, shape, **kwargs):
    torch_fns = {
        "gelu": lambda t: F.gelu(t["x"], approximate="none"),
        "silu": lambda t: F.silu(t["x"]),
        "softplus": lambda t, beta=1.0, threshold=20.0: F.softplus(t["x"], beta, threshold),
        "softmax": lambda t, axis=-1: torch.softmax(t["x"], dim=axis),
    }

    def make(rng, dtype):
        x = rng.standard_normal(shape) * 3
        if name == "softplus":  # straddle the identity threshold
            x.reshape(-1)[:4] = np.array([19.9, 20.1, 25.0, -30.0]) / kwargs.get("beta", 1.0)
        return {"x": x.astype(dtype)}
    return dict(make=make, kwargs=kwargs, fwd=getattr(L, f"{name}_fwd"),
                bwd=getattr(L, f"{name}_bwd"), torch=torch_fns[name])


def _norm_case(kind, shape, groups=None, affine=True):
    C = shape[-1] if kind == "layer" else shape[1]

    def make(rng, dtype):
        a = {"x": (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)}
        if affine:
            a["weight"] = rng.standard_normal(C).astype(dtype)
            a["bias"] = rng.standard_normal(C).astype(dtype)
        return a

    if kind == "group":
        def fwd(x, weight=None, bias=None, num_groups=1):
            return L.group_norm_fwd(x, weight, bias, num_groups)
        tfn = lambda t, num_groups: F.group_norm(t["x"], num_groups, t.get("weight"), t.get("bias"), 1e-5)  # noqa: E731
        return dict(make=make, kwargs=dict(num_groups=groups), fwd=fwd, bwd=L.group_norm_bwd, torch=tfn)

    def fwd(x, weight=None, bias=None):
        return L.layer_norm_fwd(x, weight, bias)
    tfn = lambda t: F.layer_norm(t["x"], (C,), t.get("weight"), t.get("bias"), 1e-5)  # noqa: E731
    return dict(make=make, kwargs={}, fwd=fwd, bwd=L.layer_norm_bwd, torch=tfn)


def _bn_case(shape, training):
    C = shape[1]

    def make(rng, dtype):
        return {"x": (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype),
                "weight": rng.standard_normal(C).astype(dtype),
                "bias": rng.standard_normal(C).astype(dtype)}

    # the running stats are fixed non-trivial buffers (not differentiated)
    rm = np.linspace(-0.5, 0.5, C)
    rv = np.linspace(0.5, 2.0, C)

    def fwd(x, weight, bias, training):
        return L.batch_norm2d_fwd(x, weight, bias, rm.astype(x.dtype), rv.astype(x.dtype),
                                  training=training)

    def tfn(t, training):
        return F.batch_norm(t["x"], torch.tensor(rm), torch.tensor(rv), t["weight"], t["bias"],
                            training, 0.1, 1e-5)
    return dict(make=make, kwargs=dict(training=training), fwd=fwd, bwd=L.batch_norm2d_bwd, torch=tfn)


def _linear_case(shape, out, bias=True):
    def make(rng, dtype):
        a = {"x": rng.standard_normal(shape), "weight": rng.standard_normal((out, shape[-1]))}
        if bias:
            a["bias"] = rng.standard_normal(out)
        return {n: v.astype(dtype) for n, v in a.items()}
    return dict(make=make, kwargs={}, fwd=L.linear_fwd, bwd=L.linear_bwd,
                torch=lambda t: F.linear(t["x"], t["weight"], t.get("bias")))


def _pool_case(kind, shape, **kwargs):
    def make(rng, dtype):
        return {"x": rng.standard_normal(shape).astype(dtype)}
    if kind == "avg":
        tfn = lambda t, kernel_size, stride=None: F.avg_pool2d(t["x"], kernel_size, stride)  # noqa: E731
        return dict(make=make, kwargs=kwargs, fwd=L.avg_pool2d_fwd, bwd=L.avg_pool2d_bwd, torch=tfn)
    if kind == "global":
        tfn = lambda t: F.adaptive_avg_pool2d(t["x"], 1).flatten(1)  # noqa: E731
        return dict(make=make, kwargs={}, fwd=L.global_avg_pool_fwd, bwd=L.global_avg_pool_bwd,
                    torch=tfn)
    tfn = lambda t, output_size: F.adaptive_avg_pool1d(t["x"], output_size)  # noqa: E731
    return dict(make=make, kwargs=kwargs, fwd=L.adaptive_avg_pool1d_fwd,
                bwd=L.adaptive_avg_pool1d_bwd, torch=tfn)


def _channel_padding_case(P, target):
    def make(rng, dtype):
        return {"x": rng.standard_normal((2, P, 3, 4)).astype(dtype)}

    def tfn(t, target_channels):
        x = t["x"]
        pad = target_channels - x.shape[1]
        if pad == 0:
            return x * 1.0
        if pad == 1:
            return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)
        B, _, H, W = x.shape  # the released rearrange 'b c h w -> b (h w) c' + pool + back
        p = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(B, H * W, -1), pad)
        return torch.cat([x, p.reshape(B, H, W, pad).permute(0, 3, 1, 2)], dim=1)
    return dict(make=make, kwargs=dict(target_channels=target), fwd=L.channel_padding_fwd,
                bwd=L.channel_padding_bwd, torch=tfn)


# (full-size case for torch, tiny case for finite differences)
CASES = {
    "conv2d_general": (_conv2d_case(2, 4, 6, 7, 9, 3, 1, 1, 1), _conv2d_case(1, 2, 3, 4, 5, 3, 1, 1, 1)),
    "conv2d_strided_grouped": (_conv2d_case(2, 4, 8, 9, 8, 3, 2, 0, 2), _conv2d_case(1, 4, 2, 5, 4, 3, 2, 1, 2)),
    "conv2d_stem_like": (_conv2d_case(2, 3, 8, 11, 10, 3, 2, 1, 1, bias=False), _conv2d_case(1, 3, 2, 5, 4, 3, 2, 1, 1, bias=False)),
    "conv2d_rect_pairs": (_conv2d_case(2, 3, 5, 8, 9, (2, 3), (3, 2), (1, 2), 1), _conv2d_case(1, 1, 2, 5, 4, (2, 3), (2, 1), (1, 0), 1)),
    "conv2d_depthwise3": (_conv2d_case(2, 6, 6, 7, 5, 3, 1, 1, 6), _conv2d_case(1, 2, 2, 4, 3, 3, 1, 1, 2)),
    "conv2d_depthwise5": (_conv2d_case(2, 4, 4, 6, 7, 5, 1, 2, 4), _conv2d_case(1, 2, 2, 4, 4, 5, 1, 2, 2)),
    "conv2d_sr_odd": (_conv2d_case(2, 4, 4, 9, 7, 3, 2, 1, 4, bias=False), _conv2d_case(1, 2, 2, 5, 3, 3, 2, 1, 2, bias=False)),
    "conv2d_sr4": (_conv2d_case(2, 4, 4, 11, 9, 5, 4, 2, 4, bias=False), _conv2d_case(1, 1, 1, 5, 6, 5, 4, 2, 1, bias=False)),
    "conv2d_pointwise": (_conv2d_case(2, 6, 5, 4, 6, 1, 1, 0, 1), _conv2d_case(1, 3, 2, 2, 3, 1, 1, 0, 1)),
    "conv2d_pointwise_g3": (_conv2d_case(2, 9, 6, 4, 3, 1, 1, 0, 3), _conv2d_case(1, 6, 3, 2, 2, 1, 1, 0, 3)),
    "conv2d_depthwise_mult": (_conv2d_case(2, 3, 6, 5, 5, 3, 1, 1, 3), _conv2d_case(1, 2, 4, 3, 3, 3, 1, 1, 2)),
    "conv1d_grouped": (_conv1d_case(2, 8, 12, 10, 1, 4), _conv1d_case(1, 4, 6, 5, 1, 2)),
    "conv1d_k3": (_conv1d_case(2, 4, 6, 10, 3, 2), _conv1d_case(1, 2, 2, 5, 3, 1)),
    "linear": (_linear_case((2, 3, 5), 7), _linear_case((2, 4), 3)),
    "linear_nobias": (_linear_case((6, 5), 4, bias=False), _linear_case((3, 2), 2, bias=False)),
    "group_norm_1": (_norm_case("group", (2, 6, 5, 4), 1), _norm_case("group", (2, 3, 2, 2), 1)),
    "group_norm_3": (_norm_case("group", (2, 6, 5, 4), 3), _norm_case("group", (1, 4, 2, 2), 2)),
    "group_norm_3d_noaffine": (_norm_case("group", (3, 4, 7), 2, affine=False), _norm_case("group", (2, 2, 3), 1, affine=False)),
    "layer_norm": (_norm_case("layer", (2, 5, 8)), _norm_case("layer", (2, 2, 4))),
    "layer_norm_noaffine": (_norm_case("layer", (4, 6), affine=False), _norm_case("layer", (3, 4), affine=False)),
    "batch_norm_eval": (_bn_case((3, 4, 5, 6), False), _bn_case((2, 2, 2, 3), False)),
    "batch_norm_train": (_bn_case((3, 4, 5, 6), True), _bn_case((2, 2, 2, 3), True)),
    "gelu": (_pointwise_case("gelu", (3, 4, 5)), _pointwise_case("gelu", (7,))),
    "silu": (_pointwise_case("silu", (3, 4, 5)), _pointwise_case("silu", (7,))),
    "softplus": (_pointwise_case("softplus", (3, 4, 5)), _pointwise_case("softplus", (7,))),
    "softplus_beta": (_pointwise_case("softplus", (3, 4, 5), beta=2.0, threshold=10.0),
                      _pointwise_case("softplus", (7,), beta=2.0, threshold=10.0)),
    "softmax_last": (_pointwise_case("softmax", (3, 4, 5)), _pointwise_case("softmax", (2, 4))),
    "softmax_axis1": (_pointwise_case("softmax", (3, 4, 5), axis=1), _pointwise_case("softmax", (2, 3, 2), axis=1)),
    "avg_pool2d": (_pool_case("avg", (2, 3, 8, 7), kernel_size=2), _pool_case("avg", (1, 2, 4, 5), kernel_size=2)),
    "avg_pool2d_strided": (_pool_case("avg", (2, 3, 9, 8), kernel_size=3, stride=2), _pool_case("avg", (1, 1, 5, 5), kernel_size=(3, 2), stride=(2, 1))),
    "global_avg_pool": (_pool_case("global", (2, 3, 5, 4)), _pool_case("global", (1, 2, 3, 2))),
    "adaptive_avg_pool1d": (_pool_case("adaptive", (2, 3, 10), output_size=4), _pool_case("adaptive", (1, 2, 7), output_size=3)),
    "adaptive_avg_pool1d_up": (_pool_case("adaptive", (2, 3, 5), output_size=7), _pool_case("adaptive", (1, 2, 3), output_size=2)),
    "channel_padding_0": (_channel_padding_case(6, 6), _channel_padding_case(3, 3)),
    "channel_padding_1": (_channel_padding_case(9, 10), _channel_padding_case(3, 4)),
    "channel_padding_2": (_channel_padding_case(12, 14), _channel_padding_case(4, 6)),
    "channel_padding_2_odd": (_channel_padding_case(9, 11), _channel_padding_case(3, 5)),
}


def _ours(case, arrays, dout):
    out, cache = case["fwd"](**arrays, **case["kwargs"])
    return out, case["bwd"](dout, cache)


@pytest.mark.parametrize("name", list(CASES))
def test_vs_torch_autograd_float64(name, rng):
    case = CASES[name][0]
    arrays = case["make"](rng, np.float64)
    t = {n: torch.tensor(a, requires_grad=True) for n, a in arrays.items()}
    t_out = case["torch"](t, **case["kwargs"])
    dout = rng.standard_normal(tuple(t_out.shape))
    t_out.backward(torch.tensor(dout))
    out, grads = _ours(case, arrays, dout)
    assert out.dtype == np.float64
    assert_close(out, t_out, "float64", "autograd", f"{name} out")
    for n in arrays:
        assert_close(grads[n], t[n].grad, "float64", "autograd", f"{name} d{n}")


@pytest.mark.parametrize("name", list(CASES))
def test_backward_vs_finite_differences(name, rng):
    case = CASES[name][1]
    arrays = case["make"](rng, np.float64)
    out, cache = case["fwd"](**arrays, **case["kwargs"])
    dout = rng.standard_normal(out.shape)
    grads = case["bwd"](dout, cache)
    for n, a in arrays.items():
        num = numerical_vjp(lambda: case["fwd"](**arrays, **case["kwargs"])[0], a, dout)
        err = rel_err(grads[n], num)
        assert err <= tolerance("float64", "finite_diff"), f"{name} d{n}: {err:.2e}"


@pytest.mark.parametrize("name", list(CASES))
def test_float32_accepted(name, rng):
    case = CASES[name][0]
    a64 = case["make"](rng, np.float64)
    a32 = {n: a.astype(np.float32) for n, a in a64.items()}
    out64, cache64 = case["fwd"](**a64, **case["kwargs"])
    out32, cache32 = case["fwd"](**a32, **case["kwargs"])
    assert out32.dtype == np.float32
    assert_close(out32, out64, "float32", "autograd", f"{name} out")
    dout = rng.standard_normal(out64.shape)
    g64, g32 = case["bwd"](dout, cache64), case["bwd"](dout.astype(np.float32), cache32)
    for n in a64:
        assert g32[n].dtype == np.float32, f"d{n} dtype {g32[n].dtype}"
        assert_close(g32[n], g64[n], "float32", "autograd", f"{name} d{n}")


# ---------------------------------------------------------------------------------------
# batch norm running statistics
# ---------------------------------------------------------------------------------------
def test_batch_norm_running_stats_match_torch(rng):
    x = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    F.batch_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b), True, 0.1, 1e-5)
    _, cache = L.batch_norm2d_fwd(x, w, b, rm, rv, training=True)
    assert_close(cache["new_running_mean"], trm, "float64", "autograd", "running_mean")
    assert_close(cache["new_running_var"], trv, "float64", "autograd", "running_var")
    assert not np.allclose(cache["new_running_var"], rv)  # it did move
    _, cache_eval = L.batch_norm2d_fwd(x, w, b, rm, rv, training=False)
    assert cache_eval["new_running_mean"] is None


def test_batch_norm_train_without_running_stats(rng):
    x = rng.standard_normal((2, 3, 2, 2))
    out, cache = L.batch_norm2d_fwd(x, None, None, None, None, training=True)
    ref = F.batch_norm(torch.tensor(x), None, None, None, None, True)
    assert_close(out, ref, "float64", "autograd", "out")
    assert cache["new_running_mean"] is None
    with pytest.raises(ValueError, match="running_mean"):
        L.batch_norm2d_fwd(x, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        L.batch_norm2d_fwd(x[:1, :, :1, :1], None, None, None, None, training=True)


# ---------------------------------------------------------------------------------------
# channel shuffle
# ---------------------------------------------------------------------------------------
def test_channel_shuffle_matches_einops_rule(rng):
    B, n, g, H, W = 2, 4, 3, 2, 3
    x = rng.standard_normal((B, n * g, H, W))
    out = L.channel_shuffle(x, g)
    # torch reshape/permute form of 'b (c g) h w -> b (g c) h w'
    ref = torch.tensor(x).reshape(B, n, g, H, W).permute(0, 2, 1, 3, 4).reshape(B, n * g, H, W)
    assert np.array_equal(out, ref.numpy())
    for gi in range(g):
        for ci in range(n):
            assert np.array_equal(out[:, gi * n + ci], x[:, ci * g + gi])


@given(n=st.integers(1, 5), g=st.integers(1, 4), hw=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_channel_unshuffle_is_adjoint_and_inverse(n, g, hw, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n * g, hw, 2))
    y = rng.standard_normal((2, n * g, hw, 2))
    assert np.array_equal(L.channel_unshuffle(L.channel_shuffle(x, g), g), x)
    lhs = np.sum(L.channel_shuffle(x, g) * y)
    rhs = np.sum(x * L.channel_unshuffle(y, g))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


# ---------------------------------------------------------------------------------------
# hypothesis: conv2d on drawn shapes vs torch (forward and all gradients)
# ---------------------------------------------------------------------------------------
@settings(max_examples=15)
@given(B=st.integers(1, 2), cg=st.integers(1, 3), og=st.integers(1, 3), groups=st.integers(1, 3),
       H=st.integers(1, 8), W=st.integers(1, 8), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       depthwise=st.booleans(), seed=st.integers(0, 2**31))
def test_conv2d_drawn_shapes_vs_torch(B, cg, og, groups, H, W, kh, kw, sh, sw, ph, pw, depthwise, seed):
    if depthwise:
        cg, og = 1, 1
    Cin, Cout = cg * groups, og * groups
    if H + 2 * ph < kh or W + 2 * pw < kw:
        return
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((B, Cin, H, W)), rng.standard_normal((Cout, cg, kh, kw)), rng.standard_normal(Cout)
    out, cache = L.conv2d_fwd(x, w, b, (sh, sw), (ph, pw), groups)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    t_out = F.conv2d(tx, tw, tb, (sh, sw), (ph, pw), 1, groups)
    dout = rng.standard_normal(out.shape)
    t_out.backward(torch.tensor(dout))
    g = L.conv2d_bwd(dout, cache)
    assert_close(out, t_out, "float64", "autograd", "out")
    for n, t in (("x", tx), ("weight", tw), ("bias", tb)):
        assert_close(g[n], t.grad, "float64", "autograd", n)


@given(Lx=st.integers(1, 12), n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_adaptive_avg_pool1d_bins_vs_torch(Lx, n, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, Lx))
    out, _ = L.adaptive_avg_pool1d_fwd(x, n)
    assert_close(out, F.adaptive_avg_pool1d(torch.tensor(x), n), "float64", "autograd", "out")


def test_softplus_threshold_is_pytorch_switch():
    x = np.array([19.999, 20.0, 20.001, 40.0, -50.0])
    out, _ = L.softplus_fwd(x)
    assert out[2] == x[2] and out[3] == x[3]          # identity above the threshold
    assert out[1] == np.log1p(np.exp(20.0))           # at the threshold still the log form
    assert 0 < out[4] < 1e-20


def test_gelu_is_exact_erf_not_tanh():
    x = np.array([-2.5, -0.7, 0.3, 1.9])
    out, _ = L.gelu_fwd(x)
    exact = F.gelu(torch.tensor(x), approximate="none").numpy()
    tanh = F.gelu(torch.tensor(x), approximate="tanh").numpy()
    assert rel_err(out, exact) <= 1e-15
    assert rel_err(out, tanh) > 1e-6


def test_trunc_normal_is_bounded_and_scaled(rng):
    w = L.trunc_normal(rng, (4000,), std=0.02, dtype=np.float32)
    assert w.dtype == np.float32 and abs(w.std() - 0.02) < 0.002
    w = L.trunc_normal(rng, (2000,), std=1.0, a=-0.5, b=0.5)
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.2


def test_nan_propagates(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    x[0, 0, 1, 1] = np.nan
    out, _ = L.conv2d_fwd(x, rng.standard_normal((2, 1, 3, 3)), None, 1, 1, 2)
    assert np.isnan(out[0, 0, :3, :3]).all() and not np.isnan(out[0, 1]).any()
    out, _ = L.group_norm_fwd(x, None, None, 2)
    assert np.isnan(out[0, 0]).all() and not np.isnan(out[0, 1]).any()


# ---------------------------------------------------------------------------------------
# bad input: the message names the argument
# ---------------------------------------------------------------------------------------
def _x(*shape, dtype=np.float64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


BAD = [
    ("wrong rank x", lambda: L.conv2d_fwd(_x(2, 3, 4), _x(2, 3, 1, 1)), ValueError, "x"),
    ("wrong rank weight", lambda: L.conv2d_fwd(_x(1, 3, 4, 4), _x(2, 3, 1)), ValueError, "weight"),
    ("weight channels", lambda: L.conv2d_fwd(_x(1, 3, 4, 4), _x(2, 2, 1, 1)), ValueError, "weight"),
    ("groups divide Cin", lambda: L.conv2d_fwd(_x(1, 3, 4, 4), _x(2, 1, 1, 1), groups=2), ValueError, "groups"),
    ("groups divide Cout", lambda: L.conv2d_fwd(_x(1, 4, 4, 4), _x(3, 2, 1, 1), groups=2), ValueError, "out_channels"),
    ("bias shape", lambda: L.conv2d_fwd(_x(1, 3, 4, 4), _x(2, 3, 1, 1), _x(3)), ValueError, "bias"),
    ("mixed dtype", lambda: L.conv2d_fwd(_x(1, 3, 4, 4), _x(2, 3, 1, 1, dtype=np.float32)), TypeError, "weight"),
    ("int dtype", lambda: L.conv2d_fwd(np.ones((1, 3, 4, 4), dtype=np.int64), _x(2, 3, 1, 1)), TypeError, "x"),
    ("list input", lambda: L.gelu_fwd([1.0, 2.0]), TypeError, "x"),
    ("kernel too big", lambda: L.conv2d_fwd(_x(1, 1, 2, 2), _x(1, 1, 3, 3)), ValueError, "kernel"),
    ("negative padding", lambda: L.conv2d_fwd(_x(1, 1, 4, 4), _x(1, 1, 3, 3), padding=-1), ValueError, "padding"),
    ("zero stride", lambda: L.conv2d_fwd(_x(1, 1, 4, 4), _x(1, 1, 3, 3), stride=0), ValueError, "stride"),
    ("conv1d rank", lambda: L.conv1d_fwd(_x(1, 2, 3, 4), _x(1, 2, 1)), ValueError, "x"),
    ("linear in", lambda: L.linear_fwd(_x(2, 3), _x(4, 5)), ValueError, "weight"),
    ("linear bias dtype", lambda: L.linear_fwd(_x(2, 3), _x(4, 3), _x(4, dtype=np.float32)), TypeError, "bias"),
    ("gn groups", lambda: L.group_norm_fwd(_x(1, 6, 2, 2), None, None, 4), ValueError, "num_groups"),
    ("gn weight", lambda: L.group_norm_fwd(_x(1, 6, 2, 2), _x(5), None, 3), ValueError, "weight"),
    ("ln weight", lambda: L.layer_norm_fwd(_x(2, 6), _x(5), None), ValueError, "weight"),
    ("bn rank", lambda: L.batch_norm2d_fwd(_x(2, 3, 4), None, None, _x(3), _x(3)), ValueError, "x"),
    ("bn running_var", lambda: L.batch_norm2d_fwd(_x(2, 3, 4, 4), None, None, _x(3), _x(2)), ValueError, "running_var"),
    ("softmax axis", lambda: L.softmax_fwd(_x(2, 3), axis=2), ValueError, "axis"),
    ("avg_pool kernel", lambda: L.avg_pool2d_fwd(_x(1, 1, 2, 2), 3), ValueError, "kernel_size"),
    ("adaptive size", lambda: L.adaptive_avg_pool1d_fwd(_x(1, 4), 0), ValueError, "output_size"),
    ("shuffle groups", lambda: L.channel_shuffle(_x(1, 5, 2, 2), 3), ValueError, "groups"),
    ("padding amount", lambda: L.channel_padding_fwd(_x(1, 5, 2, 2), 9), ValueError, "target_channels"),
    ("conv bwd dout shape", lambda: L.conv2d_bwd(_x(1, 2, 3, 3), L.conv2d_fwd(_x(1, 1, 4, 4), _x(2, 1, 1, 1))[1]),
     ValueError, "dout"),
    ("gelu bwd dout dtype", lambda: L.gelu_bwd(_x(3, dtype=np.float32), L.gelu_fwd(_x(3))[1]), TypeError, "dout"),
]


@pytest.mark.parametrize("what,call,exc,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(what, call, exc, word):
    with pytest.raises(exc, match=word):
        call()
