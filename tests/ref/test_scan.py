"""Tests of sparx_ref.ref.scan: the selective scan, its backward and its three views.

Oracles: float64 finite differences, PyTorch float64 autograd of a plain loop written here,
the sequential / chunked / materialised views against each other, and error messages.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparx_ref.ref.scan import (scan_matrix, selective_scan, selective_scan_bwd,
                                selective_scan_chunked, selective_scan_fwd,
                                selective_scan_materialized)
from sparx_ref.testing import assert_all_close, assert_close, numerical_vjp

KEYS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


# ------------------------------------------------------------------------------------------
# an independent PyTorch implementation: the recurrence written as a plain loop
# ------------------------------------------------------------------------------------------
def torch_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> + D u_t, one step at a time."""
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    h = torch.zeros(batch, KD, N, dtype=u.dtype)
    ys = []
    for t in range(L):
        for_channels = []
        for c in range(KD):
            k = c // (KD // K)
            h_c = torch.exp(dt[:, c, t, None] * A[c]) * h[:, c] + dt[:, c, t, None] * B[:, k, :, t] * u[:, c, t, None]
            for_channels.append(h_c)
        h = torch.stack(for_channels, dim=1)
        y_t = torch.stack([(h[:, c] * C[:, c // (KD // K), :, t]).sum(-1) for c in range(KD)], dim=1)
        ys.append(y_t)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    return y


def make_inputs(rng, batch, K, Dg, N, L, use_D=True, use_bias=True, dtype=np.float64,
                a_scale=None, positive_delta=False):
    """Random scan inputs; A < 0 (a_scale sets its size), delta > 0 if positive_delta."""
    KD = K * Dg
    delta = rng.normal(size=(batch, KD, L))
    if positive_delta:
        delta = rng.uniform(0.05, 1.5, size=(batch, KD, L))
    A = -np.exp(rng.normal(size=(KD, N))) if a_scale is None else -a_scale * rng.uniform(0.5, 1.5, size=(KD, N))
    x = dict(u=rng.normal(size=(batch, KD, L)), delta=delta, A=A,
             B=rng.normal(size=(batch, K, N, L)), C=rng.normal(size=(batch, K, N, L)),
             D=rng.normal(size=KD) if use_D else None,
             delta_bias=rng.normal(scale=0.5, size=KD) if use_bias else None)
    return {k: (None if v is None else v.astype(dtype)) for k, v in x.items()}


def torch_reference(inputs, softplus, dy):
    """Output and autograd gradients of the torch loop, in float64."""
    t = {k: (None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True))
         for k, v in inputs.items()}
    y = torch_selective_scan(**t, delta_softplus=softplus)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), {k: (None if v is None else v.grad.numpy()) for k, v in t.items()}


# ------------------------------------------------------------------------------------------
# layer 2: vs torch float64 autograd
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,Dg,N", [(1, 3, 1), (2, 2, 3), (4, 1, 1), (4, 2, 3), (1, 2, 3)])
@pytest.mark.parametrize("use_D,use_bias,softplus", [(True, True, True), (False, False, False),
                                                     (True, False, True), (False, True, False),
                                                     (False, True, True)])
def test_matches_torch_autograd(rng, K, Dg, N, use_D, use_bias, softplus):
    x = make_inputs(rng, 2, K, Dg, N, 7, use_D, use_bias, positive_delta=not softplus)
    y, cache = selective_scan_fwd(**x, delta_softplus=softplus)
    dy = rng.normal(size=y.shape)
    y_ref, g_ref = torch_reference(x, softplus, dy)
    assert_close(y, y_ref, "float64", "autograd", "y")
    grads = selective_scan_bwd(dy, cache)
    assert set(grads) == set(KEYS)
    assert_all_close(grads, g_ref, "float64", "autograd")


def test_softplus_threshold_region_matches_torch(rng):
    # delta + bias straddles PyTorch's threshold 20 (identity above it)
    x = make_inputs(rng, 1, 2, 2, 2, 6, positive_delta=True)
    x["delta"] = x["delta"] + np.array([19.5, 20.5, 19.9, 25.0])[None, :, None] - 0.6
    x["A"] = -rng.uniform(0.01, 0.1, size=x["A"].shape)  # keep exp(dt A) away from 0
    y, cache = selective_scan_fwd(**x, delta_softplus=True)
    dy = rng.normal(size=y.shape)
    y_ref, g_ref = torch_reference(x, True, dy)
    assert_close(y, y_ref, "float64", "autograd", "y")
    assert_all_close(selective_scan_bwd(dy, cache), g_ref, "float64", "autograd")


# ------------------------------------------------------------------------------------------
# layer 1: vs finite differences
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,Dg,N,softplus", [(2, 2, 2, True), (1, 2, 1, False), (4, 1, 3, True)])
def test_backward_finite_differences(rng, K, Dg, N, softplus):
    x = make_inputs(rng, 2, K, Dg, N, 5, positive_delta=not softplus)
    y, cache = selective_scan_fwd(**x, delta_softplus=softplus)
    dy = rng.normal(size=y.shape)
    grads = selective_scan_bwd(dy, cache)

    def f():
        return selective_scan(**x, delta_softplus=softplus)

    for name in KEYS:
        fd = numerical_vjp(f, x[name], dy)
        assert_close(grads[name], fd, "float64", "finite_diff", name)


def test_none_inputs_give_none_grads(rng):
    x = make_inputs(rng, 1, 2, 1, 1, 4, use_D=False, use_bias=False, positive_delta=True)
    y, cache = selective_scan_fwd(**x)
    g = selective_scan_bwd(rng.normal(size=y.shape), cache)
    assert g["D"] is None and g["delta_bias"] is None
    assert all(g[k].shape == x[k].shape for k in ("u", "delta", "A", "B", "C"))


def test_strong_decay_stays_finite(rng):
    # exp(cumsum(delta*A)) underflows to 0 after a few steps: a ratio of cumulative exps would
    # give 0/0; every view and the backward must stay finite and agree with torch.
    x = make_inputs(rng, 1, 2, 1, 2, 60, a_scale=60.0, positive_delta=True)
    y, cache = selective_scan_fwd(**x, delta_softplus=True)
    dy = rng.normal(size=y.shape)
    y_ref, g_ref = torch_reference(x, True, dy)
    assert_close(y, y_ref, "float64", "autograd", "y")
    assert_all_close(selective_scan_bwd(dy, cache), g_ref, "float64", "autograd")
    M = scan_matrix(x["delta"], x["A"], x["B"], x["C"], x["delta_bias"], True)
    assert np.all(np.isfinite(M))
    assert_close(selective_scan_chunked(**x, delta_softplus=True, chunk_size=16), y, "float64", "two_views", "chunked")
    assert_close(selective_scan_materialized(**x, delta_softplus=True), y, "float64", "two_views", "materialized")


# ------------------------------------------------------------------------------------------
# layer 3: the three views agree
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,chunk_size", [(1, 1), (1, 8), (13, 4), (16, 16), (20, 7), (9, 64)])
@pytest.mark.parametrize("softplus", [True, False])
def test_views_agree(rng, L, chunk_size, softplus):
    x = make_inputs(rng, 2, 2, 2, 3, L, positive_delta=not softplus)
    y = selective_scan(**x, delta_softplus=softplus)
    assert_close(selective_scan_chunked(**x, delta_softplus=softplus, chunk_size=chunk_size), y,
                 "float64", "two_views", "chunked")
    assert_close(selective_scan_materialized(**x, delta_softplus=softplus), y,
                 "float64", "two_views", "materialized")


@pytest.mark.parametrize("N", [1, 2])
def test_views_agree_gates_near_one_long_sequence(rng, N):
    # delta*A ~ -1e-4: the state barely decays, so it carries information over all 2000 steps
    L = 2000
    x = make_inputs(rng, 1, 2, 1, N, L, a_scale=1e-4, positive_delta=True)
    y = selective_scan(**x, delta_softplus=True)
    assert_close(selective_scan_chunked(**x, delta_softplus=True, chunk_size=128), y,
                 "float64", "two_views", "chunked")
    assert_close(selective_scan_materialized(**x, delta_softplus=True), y,
                 "float64", "two_views", "materialized")
    # the early inputs still matter at the end: the gates are near 1, not near 0
    x2 = {k: (None if v is None else v.copy()) for k, v in x.items()}
    x2["u"][:, :, 0] += 1.0
    assert np.all(np.abs(selective_scan(**x2, delta_softplus=True)[:, :, -1] - y[:, :, -1]) > 1e-3)


def test_scan_matrix_structure(rng):
    x = make_inputs(rng, 2, 2, 2, 2, 9, positive_delta=True)
    M = scan_matrix(x["delta"], x["A"], x["B"], x["C"], x["delta_bias"], delta_softplus=True)
    assert M.shape == (2, 4, 9, 9)
    assert np.all(np.triu(M, k=1) == 0)
    # column s of M is the response to a unit impulse at time s (with D = 0)
    s = 3
    u = np.zeros((2, 4, 9))
    u[:, :, s] = 1.0
    y = selective_scan(u, x["delta"], x["A"], x["B"], x["C"], None, x["delta_bias"], True)
    assert_close(M[..., s], y, "float64", "two_views", "impulse response")
    # the diagonal is C_t . delta'_t B_t (no decay)
    dt = np.logaddexp(0.0, x["delta"] + x["delta_bias"][:, None])
    Bx, Cx = np.repeat(x["B"], 2, axis=1), np.repeat(x["C"], 2, axis=1)
    assert_close(np.diagonal(M, axis1=-2, axis2=-1), dt * (Bx * Cx).sum(2), "float64", "two_views", "diag")


@settings(max_examples=10)
@given(batch=st.integers(1, 2), K=st.sampled_from([1, 2, 4]), Dg=st.integers(1, 3),
       N=st.integers(1, 3), L=st.integers(1, 24), chunk=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_views_agree_hypothesis(batch, K, Dg, N, L, chunk, seed):
    x = make_inputs(np.random.default_rng(seed), batch, K, Dg, N, L)
    y = selective_scan(**x, delta_softplus=True)
    assert_close(selective_scan_chunked(**x, delta_softplus=True, chunk_size=chunk), y,
                 "float64", "two_views", "chunked")
    assert_close(selective_scan_materialized(**x, delta_softplus=True), y,
                 "float64", "two_views", "materialized")


# ------------------------------------------------------------------------------------------
# dtypes and errors
# ------------------------------------------------------------------------------------------
def test_float32_accepted(rng):
    x64 = make_inputs(rng, 2, 2, 3, 2, 40)
    x32 = {k: v.astype(np.float32) for k, v in x64.items()}
    y32, c32 = selective_scan_fwd(**x32, delta_softplus=True)
    y64, c64 = selective_scan_fwd(**x64, delta_softplus=True)
    assert y32.dtype == np.float32
    assert_close(y32, y64, "float32", "kernel", "y float32")
    dy = rng.normal(size=y64.shape)
    g32 = selective_scan_bwd(dy.astype(np.float32), c32)
    g64 = selective_scan_bwd(dy, c64)
    for k in KEYS:
        assert g32[k].dtype == np.float32, k
        assert_close(g32[k], g64[k], "float32", "kernel", k)
    for view in (selective_scan_chunked, selective_scan_materialized):
        out = view(**x32, delta_softplus=True)
        assert out.dtype == np.float32
        assert_close(out, y64, "float32", "kernel", view.__name__)


def _good(rng):
    return make_inputs(rng, 2, 2, 2, 3, 5)


@pytest.mark.parametrize("fn", [selective_scan_fwd, selective_scan_chunked, selective_scan_materialized])
@pytest.mark.parametrize("name,bad,match", [
    ("u", lambda x: x["u"][0], r"\bu must have 3 dimensions"),
    ("delta", lambda x: x["delta"][:, :, :-1], r"\bdelta must have shape"),
    ("B", lambda x: x["B"][..., None], r"\bB must have 4 dimensions"),
    ("A", lambda x: x["A"][:-1], r"\bA must have shape"),
    ("A", lambda x: x["A"][:, 0], r"\bA must have 2 dimensions"),
    ("C", lambda x: x["C"][:, :, :-1], r"\bC must have shape"),
    ("D", lambda x: x["D"][:-1], r"\bD must have shape"),
    ("delta_bias", lambda x: x["delta_bias"][None], r"delta_bias must have 1 dimensions"),
    ("u", lambda x: list(x["u"]), r"\bu must be a numpy.ndarray"),
])
def test_bad_input_names_the_argument(rng, fn, name, bad, match):
    x = _good(rng)
    x[name] = bad(x)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(**x)


def test_groups_must_divide_channels(rng):
    x = make_inputs(rng, 1, 3, 1, 1, 4)  # KD = 3
    x["B"] = rng.normal(size=(1, 2, 1, 4))
    x["C"] = rng.normal(size=(1, 2, 1, 4))
    with pytest.raises(ValueError, match=r"KD.*divisible by.*B\.shape\[1\]"):
        selective_scan_fwd(**x)


def test_mixed_dtypes_rejected(rng):
    x = _good(rng)
    x["C"] = x["C"].astype(np.float32)
    with pytest.raises(TypeError, match=r"\bC has dtype float32"):
        selective_scan_fwd(**x)
    x = _good(rng)
    y, cache = selective_scan_fwd(**x)
    with pytest.raises(TypeError, match=r"\bdy must have dtype float64"):
        selective_scan_bwd(y.astype(np.float32), cache)
    with pytest.raises(ValueError, match=r"\bdy must have shape"):
        selective_scan_bwd(y[:, :, 1:], cache)


def test_chunk_size_validated(rng):
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(**_good(rng), chunk_size=0)

