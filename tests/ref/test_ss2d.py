"""Tests of sparx_ref.ref.ss2d: cross scan/merge, the 2-D selective scan and forward_ssm.

Oracles: the spec's index formulas, the adjoint identity (hypothesis), PyTorch float64
autograd of a torch composition written here from the spec, and finite differences.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from sparx_ref.ref.ss2d import (FORWARD_SSM_PARAM_KEYS, cross_merge, cross_scan, forward_ssm_bwd,
                                forward_ssm_fwd, ss2d_scan_bwd, ss2d_scan_fwd)
from sparx_ref.testing import assert_all_close, assert_close, numerical_vjp
from tests.ref.test_scan import torch_selective_scan

F64 = "float64"


# ------------------------------------------------------------------------------------------
# torch composition, written from spec sparx_mamba.md §8
# ------------------------------------------------------------------------------------------
def torch_cross_scan(x):
    """(B, C, H, W) -> (B, 4, C, L): row-major, column-major, and both reversed."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def torch_cross_merge(ys, H, W):
    """(B, 4, C, L) -> (B, C, H, W), by gathering each direction's value at (h, w)."""
    Bn, _, C, L = ys.shape
    h = torch.arange(H)[:, None]
    w = torch.arange(W)[None, :]
    i_row, i_col = (h * W + w).reshape(-1), (w * H + h).reshape(-1)
    y = ys[:, 0][..., i_row] + ys[:, 1][..., i_col] + ys[:, 2][..., L - 1 - i_row] + ys[:, 3][..., L - 1 - i_col]
    return y.reshape(Bn, C, H, W)


def torch_ss2d_scan(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    Bn, Di, H, W = x.shape
    xs = torch_cross_scan(x).reshape(Bn, 4 * Di, H * W)
    ys = torch_selective_scan(xs, delta, A, B, C, D, delta_bias, delta_softplus)
    return torch_cross_merge(ys.reshape(Bn, 4, Di, H * W), H, W)


def torch_forward_ssm(u, p, N, R, eps=1e-5):
    """Released forward_ssm: grouped conv1d x_proj -> [dt, B, C] -> dt_projs -> scan -> merge -> GroupNorm."""
    Bn, Di, H, W = u.shape
    K, L = 4, H * W
    xs = torch_cross_scan(u)
    x_dbl = F.conv1d(xs.reshape(Bn, K * Di, L), p["x_proj_weight"], groups=K).view(Bn, K, R + 2 * N, L)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = F.conv1d(dts.reshape(Bn, K * R, L), p["dt_projs_weight"].reshape(K * Di, R, 1), groups=K)
    ys = torch_selective_scan(xs.reshape(Bn, K * Di, L), dts, -torch.exp(p["A_logs"]), Bs, Cs,
                              p["Ds"], p["dt_projs_bias"].reshape(-1), delta_softplus=True)
    y = torch_cross_merge(ys.view(Bn, K, Di, L), H, W)
    return F.group_norm(y, 1, p["out_norm.weight"], p["out_norm.bias"], eps), y


def to_torch(d):
    return {k: (None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True))
            for k, v in d.items()}


def grads_of(t):
    return {k: (None if v is None else v.grad.numpy()) for k, v in t.items()}


# ------------------------------------------------------------------------------------------
# cross scan / merge
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W", [(3, 4), (4, 3), (1, 5), (5, 1), (1, 1), (2, 2)])
def test_cross_scan_index_formulas(rng, H, W):
    x = rng.normal(size=(2, 3, H, W))
    xs = cross_scan(x)
    L = H * W
    assert xs.shape == (2, 4, 3, L)
    for h in range(H):
        for w in range(W):
            v = x[:, :, h, w]
            np.testing.assert_array_equal(xs[:, 0, :, h * W + w], v)
            np.testing.assert_array_equal(xs[:, 1, :, w * H + h], v)
            np.testing.assert_array_equal(xs[:, 2, :, L - 1 - (h * W + w)], v)
            np.testing.assert_array_equal(xs[:, 3, :, L - 1 - (w * H + h)], v)


@pytest.mark.parametrize("H,W", [(3, 5), (4, 4), (1, 6)])
def test_cross_scan_merge_vs_torch_autograd(rng, H, W):
    x = rng.normal(size=(2, 3, H, W))
    ys = rng.normal(size=(2, 4, 3, H * W))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.tensor(ys, requires_grad=True)
    xs_t = torch_cross_scan(xt)
    assert_close(cross_scan(x), xs_t.detach().numpy(), F64, "autograd", "cross_scan")
    merged_t = torch_cross_merge(yt, H, W)
    assert_close(cross_merge(ys, H, W), merged_t.detach().numpy(), F64, "autograd", "cross_merge")
    # the backward of each op is the other op
    (xs_t * torch.tensor(ys)).sum().backward()
    assert_close(cross_merge(ys, H, W), xt.grad.numpy(), F64, "autograd", "d cross_scan")
    (merged_t * torch.tensor(x)).sum().backward()
    assert_close(cross_scan(x), yt.grad.numpy(), F64, "autograd", "d cross_merge")


@given(Bn=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7),
       seed=st.integers(0, 2**31))
def test_cross_merge_is_adjoint_of_cross_scan(Bn, C, H, W, seed):
    g = np.random.default_rng(seed)
    x = g.normal(size=(Bn, C, H, W))
    y = g.normal(size=(Bn, 4, C, H * W))
    lhs = float(np.sum(cross_merge(y, H, W) * x))
    rhs = float(np.sum(y * cross_scan(x)))
    scale = float(np.sum(np.abs(y * cross_scan(x))))
    assert abs(lhs - rhs) <= 1e-12 * scale


def test_cross_scan_merge_float32_and_errors(rng):
    x = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    assert cross_scan(x).dtype == np.float32
    assert cross_merge(cross_scan(x), 3, 4).dtype == np.float32
    # merge(scan(x)) = 4 x (each pixel is read once per direction)
    np.testing.assert_allclose(cross_merge(cross_scan(x), 3, 4), 4 * x, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\bx must have 4 dimensions"):
        cross_scan(x[0])
    with pytest.raises(ValueError, match=r"\bys must have shape"):
        cross_merge(cross_scan(x), 4, 4)
    with pytest.raises(ValueError, match=r"\bys must have shape"):
        cross_merge(np.zeros((1, 3, 2, 12)), 3, 4)


# ------------------------------------------------------------------------------------------
# ss2d_scan
# ------------------------------------------------------------------------------------------
def make_ss2d_inputs(rng, batch, Di, H, W, N, use_D=True, use_bias=True, dtype=np.float64):
    L = H * W
    x = dict(x=rng.normal(size=(batch, Di, H, W)), delta=rng.normal(size=(batch, 4 * Di, L)),
             A=-np.exp(rng.normal(size=(4 * Di, N))), B=rng.normal(size=(batch, 4, N, L)),
             C=rng.normal(size=(batch, 4, N, L)), D=rng.normal(size=4 * Di) if use_D else None,
             delta_bias=rng.normal(scale=0.5, size=4 * Di) if use_bias else None)
    return {k: (None if v is None else v.astype(dtype)) for k, v in x.items()}


@pytest.mark.parametrize("H,W,N,use_D,use_bias", [(2, 3, 1, True, True), (3, 2, 2, False, True),
                                                  (1, 4, 1, True, False), (3, 1, 2, False, False)])
def test_ss2d_scan_vs_torch_autograd(rng, H, W, N, use_D, use_bias):
    x = make_ss2d_inputs(rng, 2, 2, H, W, N, use_D, use_bias)
    y, cache = ss2d_scan_fwd(**x, delta_softplus=True)
    assert y.shape == (2, 2, H, W)
    dy = rng.normal(size=y.shape)
    t = to_torch(x)
    y_t = torch_ss2d_scan(**t, delta_softplus=True)
    y_t.backward(torch.tensor(dy))
    assert_close(y, y_t.detach().numpy(), F64, "autograd", "y")
    grads = ss2d_scan_bwd(dy, cache)
    assert_all_close(grads, grads_of(t), F64, "autograd")


def test_ss2d_scan_finite_differences(rng):
    x = make_ss2d_inputs(rng, 1, 2, 2, 3, 2)
    y, cache = ss2d_scan_fwd(**x, delta_softplus=True)
    dy = rng.normal(size=y.shape)
    grads = ss2d_scan_bwd(dy, cache)
    for name in x:
        fd = numerical_vjp(lambda: ss2d_scan_fwd(**x, delta_softplus=True)[0], x[name], dy)
        assert_close(grads[name], fd, F64, "finite_diff", name)


def test_ss2d_scan_errors(rng):
    x = make_ss2d_inputs(rng, 1, 2, 2, 3, 1)
    with pytest.raises(ValueError, match=r"\bx must have 4 dimensions"):
        ss2d_scan_fwd(**dict(x, x=x["x"][0]))
    with pytest.raises(ValueError, match=r"\bdelta must have shape \(1, 8, 6\)"):
        ss2d_scan_fwd(**dict(x, delta=x["delta"][:, :4]))
    with pytest.raises(ValueError, match=r"\bB must have shape \(1, 4, \*, 6\)"):
        ss2d_scan_fwd(**dict(x, B=x["B"][:, :2]))
    with pytest.raises(TypeError, match=r"\bdelta has dtype float32"):
        ss2d_scan_fwd(**dict(x, delta=x["delta"].astype(np.float32)))
    y, cache = ss2d_scan_fwd(**x)
    with pytest.raises(ValueError, match=r"\bdy must have shape"):
        ss2d_scan_bwd(y[..., :2], cache)


# ------------------------------------------------------------------------------------------
# forward_ssm
# ------------------------------------------------------------------------------------------
def make_ssm_params(rng, Di, N, R, dtype=np.float64):
    K = 4
    p = {
        "x_proj_weight": rng.normal(scale=0.5, size=(K * (R + 2 * N), Di, 1)),
        "dt_projs_weight": rng.normal(scale=0.7, size=(K, Di, R)),
        "dt_projs_bias": rng.normal(scale=0.5, size=(K, Di)),
        "A_logs": rng.normal(scale=0.5, size=(K * Di, N)),
        "Ds": rng.normal(size=(K * Di,)),
        "out_norm.weight": rng.normal(size=(Di,)),
        "out_norm.bias": rng.normal(size=(Di,)),
    }
    return {k: v.astype(dtype) for k, v in p.items()}


@pytest.mark.parametrize("Di,H,W,N,R", [(3, 2, 3, 1, 1), (2, 3, 2, 2, 2), (2, 1, 4, 1, 2)])
def test_forward_ssm_vs_torch_autograd(rng, Di, H, W, N, R):
    u = rng.normal(size=(2, Di, H, W))
    p = make_ssm_params(rng, Di, N, R)
    out, cache = forward_ssm_fwd(u, p, d_state=N, dt_rank=R)
    dout = rng.normal(size=out.shape)
    ut, pt = torch.tensor(u, requires_grad=True), to_torch(p)
    out_t, y_t = torch_forward_ssm(ut, pt, N, R)
    out_t.backward(torch.tensor(dout))
    assert_close(out, out_t.detach().numpy(), F64, "autograd", "out")
    assert_close(cache["scan_out"], y_t.detach().numpy(), F64, "autograd", "scan_out")
    grads = forward_ssm_bwd(dout, cache)
    assert set(grads) == {"u", *FORWARD_SSM_PARAM_KEYS}
    assert_all_close(grads, {"u": ut.grad.numpy(), **grads_of(pt)}, F64, "autograd")


def test_forward_ssm_finite_differences(rng):
    Di, H, W, N, R = 2, 2, 3, 2, 1
    u = rng.normal(size=(1, Di, H, W))
    p = make_ssm_params(rng, Di, N, R)
    out, cache = forward_ssm_fwd(u, p, d_state=N, dt_rank=R)
    dout = rng.normal(size=out.shape)
    grads = forward_ssm_bwd(dout, cache)

    def f():
        return forward_ssm_fwd(u, p, d_state=N, dt_rank=R)[0]

    assert_close(grads["u"], numerical_vjp(f, u, dout), F64, "finite_diff", "u")
    for key in FORWARD_SSM_PARAM_KEYS:
        assert_close(grads[key], numerical_vjp(f, p[key], dout), F64, "finite_diff", key)


def test_forward_ssm_float32(rng):
    Di, H, W, N, R = 3, 3, 4, 1, 1
    u = rng.normal(size=(1, Di, H, W))
    p = make_ssm_params(rng, Di, N, R)
    out64, c64 = forward_ssm_fwd(u, p, d_state=N, dt_rank=R)
    out32, c32 = forward_ssm_fwd(u.astype(np.float32), {k: v.astype(np.float32) for k, v in p.items()},
                                 d_state=N, dt_rank=R)
    assert out32.dtype == np.float32
    assert_close(out32, out64, "float32", "kernel", "out")
    dout = rng.normal(size=out64.shape)
    g32 = forward_ssm_bwd(dout.astype(np.float32), c32)
    g64 = forward_ssm_bwd(dout, c64)
    for k in g64:
        assert g32[k].dtype == np.float32, k
        assert_close(g32[k], g64[k], "float32", "kernel", k)


def test_forward_ssm_errors(rng):
    Di, N, R = 2, 1, 1
    u = rng.normal(size=(1, Di, 2, 2))
    p = make_ssm_params(rng, Di, N, R)
    with pytest.raises(ValueError, match=r"missing keys \['Ds'\]"):
        forward_ssm_fwd(u, {k: v for k, v in p.items() if k != "Ds"}, d_state=N, dt_rank=R)
    with pytest.raises(ValueError, match=r"x_proj_weight.*must have shape \(20, 2, 1\)"):
        forward_ssm_fwd(u, p, d_state=N + 1, dt_rank=R)
    with pytest.raises(ValueError, match=r"A_logs.*must have shape"):
        forward_ssm_fwd(u, dict(p, A_logs=p["A_logs"][:-1]), d_state=N, dt_rank=R)
    with pytest.raises(TypeError, match=r"Ds.*must have dtype float64"):
        forward_ssm_fwd(u, dict(p, Ds=p["Ds"].astype(np.float32)), d_state=N, dt_rank=R)
    with pytest.raises(ValueError, match=r"\bu must have 4 dimensions"):
        forward_ssm_fwd(u[0], p, d_state=N, dt_rank=R)
