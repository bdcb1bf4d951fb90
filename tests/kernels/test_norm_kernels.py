"""Group normalisation kernels vs the reference op (issue 7: SparX-Mamba's ~50 GroupNorm(1, C)
calls a forward).

Every registered version of ``group_norm_fwd/bwd`` for the GPU backends runs on
hypothesis-drawn shapes (one or several groups, maps smaller than a warp and larger than the
unrolled loops, with and without weight and bias, data far from zero mean) and is compared with
the float64 reference op on the same (rounded) inputs at ``tolerance(dtype, "kernel")``. The
weight and bias gradients are sums over the batch whose terms cancel, so they are judged
relative to the same sums over absolute values (:func:`sparx_ref.testing.rel_err_scaled`).
Every buffer a kernel allocates is NaN-filled first, so an element it never writes fails.

Without a GPU the CuPy kernels' CUDA C runs on the CPU (g++ and one std::thread per CUDA thread,
:func:`tests.kernels.test_scan_kernels.cuda_c_on_cpu`) through the same launch plans, in
float32; the GPU tests run on a GPU (``scripts/gpu-check``).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref.kernels import registry
from sparx_ref.kernels._norm_common import group_norm_dims
from sparx_ref.ref import layers as ref_layers
from sparx_ref.testing import assert_close, assert_close_scaled
from sparx_ref._validate import check_shape

from ._devices import OpPairDevice, ladder_params

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
OPS = ("group_norm_fwd", "group_norm_bwd")
BACKENDS = tuple(b for b in ("numba_cuda", "cupy") if registry.entries(OPS[0], b))
EXAMPLES = 4 if SIM else 25


@pytest.fixture
def device(monkeypatch):
    """backend -> the norm module with NaN-filled allocations and the registry's kernels."""
    return lambda backend: OpPairDevice(backend, "norm", OPS, monkeypatch)


def _host(a):
    return None if a is None else (a.get() if hasattr(a, "get") else a.copy_to_host())


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def reference(x, weight, bias, G, dout, eps=1e-5):
    """float64 reference out and gradients, and the scales of the weight/bias batch sums."""
    out, cache = ref_layers.group_norm_fwd(_f64(x), _f64(weight), _f64(bias), G, eps)
    grads = ref_layers.group_norm_bwd(_f64(dout), cache)
    xhat = np.abs(cache["xhat"])
    red = (0,) + tuple(range(2, x.ndim))
    scales = {"weight": (np.abs(_f64(dout)) * xhat).sum(axis=red), "bias": np.abs(_f64(dout)).sum(axis=red)}
    return out, grads, scales


def check_against_reference(got_out, got, x, weight, bias, G, dout, dtype, name):
    """Assert a kernel's out and gradients (NumPy) match the float64 reference."""
    ref_out, ref_grads, scales = reference(x, weight, bias, G, dout)
    assert got_out.dtype == dtype and got["x"].dtype == dtype
    assert_close(got_out, ref_out, dtype, "kernel", name=f"{name} out")
    assert_close(got["x"], ref_grads["x"], dtype, "kernel", name=f"{name} dx")
    for key, present in (("weight", weight is not None), ("bias", bias is not None)):
        if not present:
            assert got[key] is None, key
            continue
        assert got[key].shape == (x.shape[1],)
        assert_close_scaled(got[key], ref_grads[key], scales[key], dtype, "kernel", name=f"{name} d{key}")


def case(rng, shape, G, with_weight=True, with_bias=True, offset=3.0):
    """x far from zero mean (offset, a per-channel spread), weight, bias and dout."""
    C = shape[1]
    x = offset + rng.standard_normal(shape) * (1 + rng.random((1, C) + (1,) * (len(shape) - 2)))
    weight = 1 + 0.5 * rng.standard_normal(C) if with_weight else None
    bias = rng.standard_normal(C) if with_bias else None
    return x, weight, bias, G, rng.standard_normal(shape)


def _run(dev, version, x, weight, bias, G, dout, dtype):
    fwd, bwd = dev.kernels(version)
    put = lambda a: None if a is None else dev.put(np.asarray(a, dtype=dtype))  # noqa: E731
    out, cache = fwd(put(x), put(weight), put(bias), G)
    grads = bwd(put(dout), cache)
    return _host(out), {k: _host(v) for k, v in grads.items()}


def _rounded(dtype, *arrays):
    return [None if a is None else np.asarray(a, dtype=dtype) for a in arrays]


if SIM:
    _B, _P, _G, _H, _W = st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 7)
else:
    _B, _P, _G, _H, _W = st.integers(1, 5), st.integers(1, 40), st.integers(1, 4), st.integers(1, 40), st.integers(1, 40)


@pytest.mark.parametrize("backend,version", ladder_params(OPS, BACKENDS))
@settings(max_examples=EXAMPLES, deadline=None)
@given(B=_B, P=_P, G=_G, H=_H, W=_W, with_weight=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_group_norm_matches_reference(device, backend, version, B, P, G, H, W, with_weight, with_bias, dtype, seed):
    dev = device(backend)
    x, weight, bias, G, dout = case(np.random.default_rng(seed), (B, G * P, H, W), G, with_weight, with_bias)
    x, weight, bias, dout = _rounded(dtype, x, weight, bias, dout)
    out, grads = _run(dev, version, x, weight, bias, G, dout, dtype)
    check_against_reference(out, grads, x, weight, bias, G, dout, dtype, f"{backend}-{version}")


@pytest.mark.parametrize("backend,version", ladder_params(OPS, BACKENDS))
@pytest.mark.parametrize("shape", [(4, 96, 56, 56), (3, 768, 7, 7), (2, 5, 3, 2, 4)], ids=["stage0", "stage3", "3d"])
def test_group_norm_sparx_sized(device, backend, version, shape, rng):
    """SparX-Mamba's GroupNorm(1, C) at its first and last stages (fewer samples), and a map with
    two spatial axes flattened into one."""
    if SIM:
        pytest.skip("too large for the CUDA simulator")
    dev = device(backend)
    x, weight, bias, G, dout = _rounded(np.float32, *case(rng, shape, 1)[:3]) + [1] + _rounded(
        np.float32, case(rng, shape, 1)[4])
    out, grads = _run(dev, version, x, weight, bias, G, dout, np.float32)
    check_against_reference(out, grads, x, weight, bias, G, dout, np.float32, f"{backend}-{version}")


@pytest.mark.parametrize("backend,version", ladder_params(OPS, BACKENDS))
def test_group_norm_empty_batch_and_determinism(device, backend, version, rng):
    dev = device(backend)
    fwd, bwd = dev.kernels(version)
    x = np.zeros((0, 6, 3, 3), np.float32)
    out, cache = fwd(dev.put(x), dev.put(np.ones(6, np.float32)), dev.put(np.zeros(6, np.float32)), 2)
    assert _host(out).shape == x.shape
    g = bwd(dev.put(x), cache)
    assert _host(g["x"]).shape == x.shape
    np.testing.assert_array_equal(_host(g["weight"]), 0)
    np.testing.assert_array_equal(_host(g["bias"]), 0)
    shape = (3, 8, 9, 11) if SIM else (6, 64, 30, 30)
    x, weight, bias, G, dout = case(rng, shape, 2)
    x, weight, bias, dout = _rounded(np.float32, x, weight, bias, dout)
    first = _run(dev, version, x, weight, bias, G, dout, np.float32)
    second = _run(dev, version, x, weight, bias, G, dout, np.float32)
    np.testing.assert_array_equal(first[0], second[0])
    for k in ("x", "weight", "bias"):
        np.testing.assert_array_equal(first[1][k], second[1][k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_bad_input_names_the_argument(device, backend):
    dev = device(backend)
    fwd, bwd = dev.kernels(None)
    x = dev.put(np.zeros((2, 6, 3, 3), np.float32))
    with pytest.raises(TypeError, match="x must be"):
        fwd(np.zeros((2, 6, 3, 3), np.float32), None, None, 1)
    with pytest.raises(ValueError, match="num_groups"):
        fwd(x, None, None, 4)
    with pytest.raises(ValueError, match="weight"):
        fwd(x, dev.put(np.ones(5, np.float32)), None, 1)
    with pytest.raises(TypeError, match="dtype"):
        fwd(x, dev.put(np.ones(6, np.float64)), None, 1)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        fwd(dev.put(np.zeros((2, 6), np.float32)), None, None, 1)
    _, cache = fwd(x, None, None, 2)
    with pytest.raises(ValueError, match="dout"):
        bwd(dev.put(np.zeros((2, 6, 3, 4), np.float32)), cache)
    with pytest.raises(TypeError, match="dout"):
        bwd(dev.put(np.zeros((2, 6, 3, 3), np.float64)), cache)


# ------------------------------------------------------------------- host rules (no GPU)
@pytest.mark.parametrize("shape,G,weight,message", [
    ((2, 6), 1, None, "at least 3 dimensions"),
    ((2, 0, 3, 3), 1, None, "at least one channel"),
    ((2, 6, 0, 3), 1, None, "spatial position"),
    ((2, 6, 3, 3), 4, None, "must divide"),
    ((2, 6, 3, 3), 0, None, "positive integer"),
    ((2, 6, 3, 3), True, None, "positive integer"),
    ((2, 6, 3, 3), 1, (5,), "weight"),
])
def test_group_norm_dims_refuses_bad_shapes(shape, G, weight, message):
    x = np.zeros(shape, np.float32)
    w = None if weight is None else np.zeros(weight, np.float32)
    with pytest.raises(ValueError, match=message):
        group_norm_dims(x, w, None, G, check_shape)


def test_group_norm_dims_flattens_the_spatial_axes():
    assert group_norm_dims(np.zeros((0, 6, 3, 2, 4)), np.zeros(6), None, 3, check_shape) == (0, 6, 24, 3)


# ------------------------------------------------------------ CuPy's CUDA C on the CPU
@pytest.fixture(scope="module")
def emulated_norm(tmp_path_factory):
    """sparx_ref.kernels.cupy.norm with its CUDA C built by g++ (float32, std::thread per thread)."""
    from tests.kernels.test_scan_kernels import emulated_cupy_module
    with emulated_cupy_module("norm", tmp_path_factory) as module:
        yield module


@pytest.mark.parametrize("shape,G,with_weight,with_bias", [
    ((2, 3, 5, 7), 1, True, True),          # S = 35: the unrolled loop's tail only
    ((1, 4, 13, 11), 2, True, False),       # S = 143: one unrolled round of 128, then the tail
    ((2, 300, 1, 3), 1, False, True),       # P = 300 planes a row: two per thread in gn_row_stats
    ((1, 9, 2, 2), 3, False, False),        # 9 planes: a second block of the plane kernels
], ids=["tail", "unrolled", "wide-row", "no-affine"])
def test_cupy_group_norm_plans_on_cpu_emulation(emulated_norm, shape, G, with_weight, with_bias, rng):
    """The CuPy plans (launch geometry, buffer wiring, the CUDA C) against the reference."""
    from sparx_ref.kernels.cupy._plan import cupy_address, run
    x, weight, bias, G, dout = case(rng, shape, G, with_weight, with_bias)
    x, weight, bias, dout = _rounded(np.float32, x, weight, bias, dout)
    B, C, S, G = dims = group_norm_dims(x, weight, bias, G, check_shape)
    nan = lambda s, dtype: np.full(s, np.nan, dtype)  # noqa: E731
    fwd = run(emulated_norm.fwd_plan(dims, np.float32, with_weight, with_bias, 1e-5),
              {"x": x.reshape(B, C, S), "weight": weight, "bias": bias}, nan, np.zeros, cupy_address)
    bwd = run(emulated_norm.bwd_plan(dims, np.float32, with_weight, with_bias),
              {"x": x.reshape(B, C, S), "weight": weight, "stats": fwd["stats"], "dout": dout.reshape(B, C, S)}, nan, np.zeros, cupy_address)
    grads = {"x": bwd["dx"].reshape(shape), "weight": bwd.get("dweight"), "bias": bwd.get("dbias")}
    check_against_reference(fwd["out"].reshape(shape), grads, x, weight, bias, G, dout, np.float32, "emulated")
