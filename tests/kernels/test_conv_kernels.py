"""Depthwise convolution kernels vs the reference op (issue 7: the twins' hottest PyTorch op).

Every registered version of ``depthwise_conv2d_fwd/bwd`` for the GPU backends runs on
hypothesis-drawn shapes (kernel sizes 1, 3, 5, 7 and mixed, with and without bias, maps whose
width is not a multiple of the strip, a single row or column) and is compared output by output
and gradient by gradient with the float64 reference op on the same (rounded) inputs, at
``tolerance(dtype, "kernel")``. The filter and bias gradients are sums over the whole batch
whose terms cancel, so they are judged relative to the same sums over absolute values
(:func:`sparx_ref.testing.rel_err_scaled`). Every buffer a kernel allocates is NaN-filled
first, so an element it never writes fails the comparison.

Without a GPU the ``numba_cuda`` kernels run under the CUDA simulator on tiny shapes; ``cupy``
kernels skip with the reason. On a GPU (``scripts/gpu-check``) the same tests draw from the
full ranges, plus a SparX-sized map whose backward splits the batch into several slices.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref.kernels import registry
from sparx_ref.ref import layers as ref_layers
from sparx_ref.testing import assert_close, assert_close_scaled

from ._devices import OpPairDevice, ladder_params

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
BACKENDS = ("numba_cuda", "cupy")
OPS = ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd")
EXAMPLES = 4 if SIM else 25


def _versions():
    return ladder_params(OPS, BACKENDS)


@pytest.fixture
def device(monkeypatch):
    """backend -> the conv module with NaN-filled allocations and the registry's kernels."""
    return lambda backend: OpPairDevice(backend, "conv", OPS, monkeypatch)


def _host(a):
    return None if a is None else (a.get() if hasattr(a, "get") else a.copy_to_host())


def _check(dev, version, x, weight, bias, dout, dtype):
    fwd, bwd = dev.kernels(version)
    x, weight, dout = x.astype(dtype), weight.astype(dtype), dout.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    ref_out, ref_cache = ref_layers.depthwise_conv2d_fwd(f64(x), f64(weight), f64(bias))
    ref_grads = ref_layers.depthwise_conv2d_bwd(f64(dout), ref_cache)
    # the scale of each batch sum's rounding error: the same sums over |x| and |dout|
    _, abs_cache = ref_layers.depthwise_conv2d_fwd(np.abs(f64(x)), np.abs(f64(weight)), f64(bias))
    scales = ref_layers.depthwise_conv2d_bwd(np.abs(f64(dout)), abs_cache)

    out, cache = fwd(dev.put(x), dev.put(weight), None if bias is None else dev.put(bias))
    grads = bwd(dev.put(dout), cache)
    assert _host(out).dtype == dtype and _host(grads["x"]).dtype == dtype
    assert_close(_host(out), ref_out, dtype, "kernel", name=f"{version} out")
    assert sorted(grads) == ["bias", "weight", "x"]
    assert_close(_host(grads["x"]), ref_grads["x"], dtype, "kernel", name=f"{version} dx")
    assert _host(grads["weight"]).shape == weight.shape
    assert_close_scaled(_host(grads["weight"]), ref_grads["weight"], scales["weight"], dtype, "kernel",
                        name=f"{version} dweight")
    if bias is None:
        assert grads["bias"] is None
    else:
        assert_close_scaled(_host(grads["bias"]), ref_grads["bias"], scales["bias"], dtype, "kernel",
                            name=f"{version} dbias")
    return grads


def _case(rng, B, C, H, W, kh, kw, with_bias):
    f = lambda *s: rng.standard_normal(s)  # noqa: E731
    return f(B, C, H, W), f(C, 1, kh, kw), (f(C) if with_bias else None), f(B, C, H, W)


if SIM:
    _B, _C, _H, _W = st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 9)
else:
    _B, _C, _H, _W = st.integers(1, 5), st.integers(1, 40), st.integers(1, 30), st.integers(1, 30)
_K = st.sampled_from([1, 3, 5, 7])


@pytest.mark.parametrize("backend,version", _versions())
@settings(max_examples=EXAMPLES, deadline=None)
@given(B=_B, C=_C, H=_H, W=_W, kh=_K, kw=_K, with_bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_depthwise_conv_matches_reference(device, backend, version, B, C, H, W, kh, kw, with_bias, dtype, seed):
    dev = device(backend)
    _check(dev, version, *_case(np.random.default_rng(seed), B, C, H, W, kh, kw, with_bias), dtype)


@pytest.mark.parametrize("backend,version", _versions())
@pytest.mark.parametrize("k", [1, 3, 5])
def test_depthwise_conv_sparx_sized_map(device, backend, version, k, rng):
    """The shapes the twins meet (56x56 maps; 14 and 7 are not multiples of the 4-wide strip),
    with a batch large enough that the strip backward splits it into several slices."""
    dev = device(backend)
    if SIM:
        pytest.skip("a 56x56 map takes minutes under the CUDA simulator; the drawn shapes cover the logic")
    for B, C, H in ((6, 48, 56), (9, 96, 14), (3, 300, 7)):
        _check(dev, version, *_case(rng, B, C, H, H, k, k, True), np.float32)


@pytest.mark.parametrize("backend,version", _versions())
def test_depthwise_conv_backward_is_deterministic(device, backend, version, rng):
    """No atomics: two backward calls give the same bits (filter sums added in a fixed order)."""
    dev = device(backend)
    x, weight, bias, dout = _case(rng, 2 if SIM else 16, 2 if SIM else 64, 5 if SIM else 28, 7 if SIM else 28,
                                  3, 3, True)
    fwd, bwd = dev.kernels(version)
    _, cache = fwd(dev.put(x.astype(np.float32)), dev.put(weight.astype(np.float32)),
                   dev.put(bias.astype(np.float32)))
    d = dev.put(dout.astype(np.float32))
    first, second = bwd(d, cache), bwd(d, cache)
    for key in ("x", "weight", "bias"):
        np.testing.assert_array_equal(_host(first[key]), _host(second[key]), err_msg=key)


@pytest.mark.parametrize("backend,version", _versions())
def test_depthwise_conv_empty_batch(device, backend, version, rng):
    """An empty batch gives an empty output and zero filter/bias gradients, as the reference;
    no channels is refused by both, naming x."""
    dev = device(backend)
    _check(dev, version, *_case(rng, 0, 3, 4, 5, 3, 3, True), np.float32)
    x, w, _, _ = _case(rng, 2, 0, 4, 5, 3, 3, False)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        ref_layers.depthwise_conv2d_fwd(x, w)
    fwd, _ = dev.kernels(version)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        fwd(dev.put(x.astype(np.float32)), dev.put(w.astype(np.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_depthwise_conv_rejects_bad_input_naming_the_argument(device, backend, rng):
    dev = device(backend)
    fwd, bwd = dev.kernels(registry.versions(OPS[0], backend)[-1])
    x = dev.put(rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    w3 = dev.put(rng.standard_normal((3, 1, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="odd"):
        fwd(x, dev.put(np.zeros((3, 1, 2, 2), np.float32)))
    with pytest.raises(ValueError, match="at most 7"):
        fwd(x, dev.put(np.zeros((3, 1, 9, 9), np.float32)))
    with pytest.raises(ValueError, match="weight"):
        fwd(x, dev.put(np.zeros((4, 1, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="bias"):
        fwd(x, w3, dev.put(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        fwd(dev.put(np.zeros((3, 4, 4), np.float32)), w3)
    with pytest.raises(TypeError, match="dtype"):
        fwd(x, dev.put(np.zeros((3, 1, 3, 3), np.float64)))
    with pytest.raises(TypeError):
        fwd(dev.put(np.zeros((1, 3, 4, 4), np.int32)), w3)
    with pytest.raises(TypeError):
        fwd(np.zeros((1, 3, 4, 4), np.float32), w3)       # a host array: never copied silently
    _, cache = fwd(x, w3)
    with pytest.raises(ValueError, match="dout"):
        bwd(dev.put(np.zeros((1, 3, 4, 5), np.float32)), cache)
    with pytest.raises(TypeError, match="dout"):
        bwd(dev.put(np.zeros((1, 3, 4, 4), np.float64)), cache)


# ------------------------------------------------------------ CuPy's CUDA C on the CPU
@pytest.fixture(scope="module")
def emulated_conv(tmp_path_factory):
    """sparx_ref.kernels.cupy.conv with its CUDA C built by g++ (float32, std::thread per thread)."""
    from tests.kernels.test_scan_kernels import emulated_cupy_module
    with emulated_cupy_module("conv", tmp_path_factory) as module:
        yield module


@pytest.mark.parametrize("version", ["naive", "strip"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape,k,with_bias", [((3, 2, 5, 7), 3, True), ((2, 3, 4, 9), 5, False)])
def test_cupy_conv_plans_on_cpu_emulation(emulated_conv, monkeypatch, version, residual, shape, k, with_bias, rng):
    """The CuPy plans the twins replay (launch geometry, buffer wiring, the CUDA C), including the
    ``residual`` form (x + conv(x), and dout added into dx), against the float64 reference."""
    from sparx_ref.kernels.cupy._plan import cupy_address, run
    monkeypatch.setattr(emulated_conv, "_sm_count", lambda: 2)       # several batch slices
    B, C, H, W = shape
    x, weight, bias, dout = (None if a is None else a.astype(np.float32)
                             for a in _case(rng, B, C, H, W, k, k, with_bias))
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    ref_out, cache = ref_layers.depthwise_conv2d_fwd(f64(x), f64(weight), f64(bias))
    ref = ref_layers.depthwise_conv2d_bwd(f64(dout), cache)
    if residual:
        ref_out, ref["x"] = ref_out + f64(x), ref["x"] + f64(dout)
    dims, nan = (B, C, H, W, k, k), (lambda s, dtype: np.full(s, np.nan, dtype))
    w2 = weight.reshape(C, k * k)
    out = run(emulated_conv.fwd_plan(version, dims, np.float32, with_bias, residual),
              {"x": x, "weight": w2, "bias": bias}, nan, np.zeros, cupy_address)["out"]
    g = run(emulated_conv.bwd_plan(version, dims, np.float32, with_bias, residual),
            {"x": x, "weight": w2, "dout": dout}, nan, np.zeros, cupy_address)
    assert_close(out, ref_out, np.float32, "kernel", name="out")
    assert_close(g["dx"], ref["x"], np.float32, "kernel", name="dx")
    assert_close(g["dweight"], ref["weight"], np.float32, "kernel", name="dweight")
    if with_bias:
        assert_close(g["dbias"], ref["bias"], np.float32, "kernel", name="dbias")
