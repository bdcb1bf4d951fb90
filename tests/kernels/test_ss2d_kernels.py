"""The "quad" 2-D scan forward (sparx_ref/kernels/{numba_cuda,cupy}/ss2d.py) against the reference.

tests/kernels/test_scan_kernels.py already runs every registered ss2d_scan_fwd version (so
"quad" too) on its shared cases; here the shapes that stress this kernel's own indexing:
1x1, 1xW and Hx1 maps, odd non-square maps, L not a multiple of a round and several rounds,
N = 2, no D / no bias, the float4 and the scalar load paths of the CUDA C, determinism of the
two-accumulator merge, and the shared-memory fallback. Outputs are NaN-poisoned; float32 vs the
float64 reference at tolerance("float32", "kernel").

- numba_cuda: under the CUDA simulator (CI; ITEMS = 2 there: 64-step rounds) or on a GPU.
- cupy: on a GPU, else the CUDA C itself on the CPU stand-in of test_scan_kernels.py (every
  CUDA thread a std::thread).
"""
import numpy as np
import pytest

from sparx_ref import kernels
from sparx_ref.kernels._scan_common import poison_outputs
from sparx_ref.ref import ss2d as ref_ss2d
from sparx_ref.testing import _to_numpy, assert_close
from tests.kernels.test_scan_kernels import cuda_c_on_cpu, f64, map_inputs, to_backend

F32 = np.float32


def case(H, W, *, N=1, Di=2, batch=1, regime="normal", has_D=True, has_bias=True, seed=0):
    return dict(batch=batch, Di=Di, H=H, W=W, N=N, regime=regime, has_D=has_D, has_bias=has_bias,
                seed=seed or H * 100 + W)


# (H, W) and what each case is for; a round is 32 * ITEMS steps: 64 in the simulator and for
# L <= 64 (ITEMS = 2), else 128 (ITEMS = 4, float4 loads in the CUDA C when L % 4 == 0)
CASES = [
    pytest.param(case(1, 1, regime="wide", has_D=False, has_bias=False), id="1x1"),
    pytest.param(case(1, 9, Di=1), id="1x9-row"),
    pytest.param(case(10, 1, Di=1, regime="near_one"), id="10x1-column"),
    pytest.param(case(5, 7, N=2), id="5x7-N2"),
    pytest.param(case(9, 8, Di=1, regime="wide"), id="9x8-two-rounds"),       # L = 72 (sim: 64 + 8)
    pytest.param(case(11, 13, Di=1, batch=2, has_bias=False), id="11x13-b2"),  # L = 143 > 128
    pytest.param(case(2, 70, Di=1), id="2x70-rows-wider-than-a-sim-round"),
]


def check_quad(fn, backend, c, label):
    args, softplus, _ = map_inputs(c)
    ref, _ = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
    with poison_outputs():
        y, cache = fn(*[to_backend(backend, a) for a in args], delta_softplus=softplus)
    assert_close(y, ref, F32, "kernel", f"{label} {c}")
    assert cache["shape"] == (c["batch"], c["Di"], c["H"], c["W"], c["N"])
    return _to_numpy(y)


# ---------------------------------------------------------------------------------------
# numba_cuda (simulator in CI)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def numba_quad():
    missing = kernels.runtime_missing("numba_cuda")
    if missing:
        pytest.skip(missing)
    return kernels.get("ss2d_scan_fwd", "numba_cuda", "quad")


@pytest.mark.parametrize("c", CASES)
def test_numba_cuda_quad_matches_reference(numba_quad, c):
    check_quad(numba_quad, "numba_cuda", c, "numba_cuda/quad")


def test_numba_cuda_quad_vector_loads_of_four_steps_per_lane(numba_quad, monkeypatch):
    """ITEMS = 4 (the GPU's rounds of 128 steps; the simulator's default is 2): 16-byte loads of
    delta/B/C when L % 4 == 0 (12x12, 16x9), scalar loads otherwise (9x9)."""
    from sparx_ref.kernels.numba_cuda import ss2d as mod
    monkeypatch.setattr(mod, "QUAD_ITEMS", 4)
    built, build = [], mod._build
    monkeypatch.setattr(mod, "_build", lambda *key: built.append(key) or build(*key))
    for H, W in ((12, 12), (16, 9), (9, 9)):
        check_quad(numba_quad, "numba_cuda", case(H, W, Di=1), f"numba_cuda/quad ITEMS=4 {H}x{W}")
    assert built == [(1, 4, True), (1, 4, True), (1, 4, False)]


def test_numba_cuda_quad_falls_back_to_composed_above_the_shared_limit(numba_quad, monkeypatch):
    from sparx_ref.kernels.numba_cuda import ss2d as mod
    monkeypatch.setattr(mod, "SHARED_LIMIT", 8)    # no map fits: the composed path runs
    calls = []
    composed = mod.ss2d_scan_fwd_composed
    monkeypatch.setattr(mod, "ss2d_scan_fwd_composed", lambda *a, **k: calls.append(1) or composed(*a, **k))
    check_quad(numba_quad, "numba_cuda", case(1, 1, Di=1), "numba_cuda/quad (fallback)")
    assert calls == [1]


def test_backward_accepts_the_quad_cache(numba_quad):
    """The cache is the inputs: the registered default backward runs on it."""
    c = case(1, 1, Di=1)
    args, softplus, rng = map_inputs(c)
    with poison_outputs():
        _, cache = numba_quad(*[to_backend("numba_cuda", a) for a in args], delta_softplus=softplus)
    assert set(cache) >= {"u", "delta", "A", "B", "C", "D", "delta_bias", "delta_softplus", "shape"}
    y_ref, c_ref = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
    dy = rng.standard_normal(y_ref.shape).astype(F32)
    with poison_outputs():
        got = kernels.get("ss2d_scan_bwd", "numba_cuda")(to_backend("numba_cuda", dy), cache)
    want = ref_ss2d.ss2d_scan_bwd(dy.astype(np.float64), c_ref)
    assert_close(got["x"], want["x"], F32, "kernel", "dx from the quad cache")


# ---------------------------------------------------------------------------------------
# cupy: real GPU, else the CUDA C on the CPU stand-in
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cupy_quad(tmp_path_factory):
    """sparx_ref.kernels.cupy.ss2d, on the GPU if there is one, else with the CPU stand-in for
    CuPy of test_scan_kernels.py (:func:`cuda_c_on_cpu`)."""
    from sparx_ref.kernels.cupy import ss2d as mod
    if kernels.runtime_missing("cupy") is None:
        yield mod, "cupy"
        return
    with cuda_c_on_cpu(mod, tmp_path_factory.mktemp("ss2d_emu")):
        yield mod, "numpy"


def _cupy_args(kind, arrays):
    return arrays if kind == "numpy" else [to_backend("cupy", a) for a in arrays]


@pytest.mark.parametrize("c", CASES + [
    pytest.param(case(8, 10, Di=1), id="8x10-float4"),               # L = 80: float4 path, 1 round
    pytest.param(case(12, 11, Di=1, N=2, regime="wide"), id="12x11-float4-two-rounds-N2"),
    pytest.param(case(2, 150, Di=1, has_D=False), id="2x150-rows-wider-than-a-round"),
    pytest.param(case(150, 2, Di=1, regime="near_one"), id="150x2-columns-longer-than-a-round"),
])
def test_cupy_quad_matches_reference(cupy_quad, c):
    mod, kind = cupy_quad
    args, softplus, _ = map_inputs(c)
    ref, _ = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
    with poison_outputs():
        y, _ = mod.ss2d_scan_fwd_quad(*_cupy_args(kind, args), delta_softplus=softplus)
    assert_close(y, ref, F32, "kernel", f"cupy/quad ({kind}) {c}")


def test_cupy_quad_scalar_and_float4_paths_agree_and_are_deterministic(cupy_quad):
    """On an aligned map (L % 4 == 0) the float4 and the scalar loads give the same bits, and two
    runs give the same bits (the warps' atomics arrive in any order)."""
    mod, kind = cupy_quad
    c = case(12, 11, Di=2, seed=77)
    args, softplus, _ = map_inputs(c)
    dev = _cupy_args(kind, args)
    runs = []
    for vec in (True, True, False):
        mod._ALLOW_VEC["on"] = vec
        try:
            with poison_outputs():
                runs.append(_to_numpy(mod.ss2d_scan_fwd_quad(*dev, delta_softplus=softplus)[0]))
        finally:
            mod._ALLOW_VEC["on"] = True
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])
    ref, _ = ref_ss2d.ss2d_scan_fwd(*f64(args), delta_softplus=softplus)
    assert_close(runs[0], ref, F32, "kernel", "cupy/quad")


def test_two_addend_merge_is_order_independent_bitwise():
    """The merge's claim, on the values where it could fail: (0 + a) + b == (0 + b) + a in float32
    bitwise, signed zeros, infinities and subnormals included."""
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 3.4e38, -3.4e38, np.inf, -np.inf,
                        0.1, -0.30000001], dtype=F32)
    rng = np.random.default_rng(3)
    vals = np.concatenate([special, rng.standard_normal(200).astype(F32)])
    a, b = np.meshgrid(vals, vals)
    zero = np.zeros_like(a)
    with np.errstate(invalid="ignore", over="ignore"):
        one = (zero + a) + b
        two = (zero + b) + a
    both_nan = np.isnan(one) & np.isnan(two)
    assert np.array_equal(one.view(np.uint32)[~both_nan], two.view(np.uint32)[~both_nan])
