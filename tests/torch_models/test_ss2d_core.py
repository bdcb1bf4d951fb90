"""sparx_ref.torch_models.ss2d_core: SparX-Mamba's SSM core in one autograd node.

The Function (projection before the cross-scan, the diagonal, the dt projection, -exp(A_logs),
the fused 2-D scan, and a hand-written backward of all of it) must give the released order's
values and gradients (:func:`common.ss2d_core_released` with the plain-torch forms):
- with the NumPy oracle standing in as the kernels: ``gradcheck`` in float64, and agreement;
- with numba_cpu's kernels on the CPU in float64;
- on a GPU machine, numba_cuda and cupy in float32 (cupy through launch plans).
"""
from __future__ import annotations

import pytest
import torch

from sparx_ref import kernels
from sparx_ref.testing import assert_close
from sparx_ref.torch_models import ops
from sparx_ref.torch_models.ss2d_core import SS2DCoreFn, fuses, ss2d_core

K = 4
NAMES = ("u", "x_proj_weight", "dt_projs_weight", "A_logs", "Ds", "dt_projs_bias")


def core_inputs(rng, B=2, Di=3, H=3, W=4, R=2, N=2, dtype=torch.float64, device="cpu"):
    """u and the five parameters, at the scale of the released initialisation."""
    def mk(scale, *shape):
        x = torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype=dtype, device=device)
        return x.requires_grad_(True)
    return (mk(1.0, B, Di, H, W), mk(Di ** -0.5, K * (R + 2 * N), Di, 1), mk(R ** -0.5, K, Di, R),
            mk(0.3, K * Di, N), mk(1.0, K * Di), mk(0.5, K, Di))


def value_and_grads(args, backend, dout):
    y = ss2d_core(*args, backend=backend)
    return y, torch.autograd.grad((y * dout).sum(), args)


def check_against_released(args, backend, dtype_name, kind):
    dout = torch.randn_like(args[0])
    y_ref, g_ref = value_and_grads(args, "torch", dout)
    y, g = value_and_grads(args, backend, dout)
    assert type(y.grad_fn) is SS2DCoreFn._backward_cls, type(y.grad_fn).__name__
    assert_close(y, y_ref, dtype_name, kind, "y")
    for name, got, ref in zip(NAMES, g, g_ref):
        assert_close(got, ref, dtype_name, kind, f"d{name}")


def test_oracle_gradcheck_float64(rng, oracle_backend):
    args = core_inputs(rng, B=1, Di=2, H=2, W=3, R=1, N=1)
    assert fuses(oracle_backend)
    assert torch.autograd.gradcheck(lambda *a: ss2d_core(*a, backend=oracle_backend), args)


@pytest.mark.parametrize("shape", [dict(), dict(B=1, Di=2, H=1, W=5, R=1, N=1), dict(H=4, W=4, N=3)])
def test_oracle_matches_released_order(rng, oracle_backend, shape):
    check_against_released(core_inputs(rng, **shape), oracle_backend, "float64", "backend")


def test_numba_cpu_matches_released_order_float64(rng):
    if kernels.runtime_missing("numba_cpu") or not fuses("numba_cpu"):
        pytest.skip("numba_cpu has no fused 2-D scan here")
    check_against_released(core_inputs(rng), "numba_cpu", "float64", "backend")


def test_frozen_parameters_get_no_gradient(rng, oracle_backend):
    args = list(core_inputs(rng))
    args[2] = args[2].detach()                          # dt_projs_weight frozen
    y = ss2d_core(*args, backend=oracle_backend)
    grads = torch.autograd.grad(y.sum(), [a for a in args if a.requires_grad])
    assert len(grads) == 5 and all(g is not None for g in grads)


def test_backend_without_fused_kernels_runs_the_released_order(rng):
    args = core_inputs(rng)
    y = ss2d_core(*args, backend="torch")
    assert type(y.grad_fn).__name__ != SS2DCoreFn._backward_cls.__name__


@pytest.mark.parametrize("index,bad,message", [
    (0, (2, 3, 3), "u must have 4 dimensions"),
    (1, (K * 5, 3, 1), r"x_proj_weight must have shape \(24, 3, 1\)"),
    (2, (K, 4, 2), r"dt_projs_weight must have shape \(4, 3, 2\)"),
    (3, (K * 3, 2, 1), "A_logs must have 2 dimensions"),
    (4, (K * 3 + 1,), r"Ds must have shape \(12,\)"),
    (5, (K * 3,), "dt_projs_bias must have 2 dimensions"),
])
def test_shape_errors_name_the_argument(rng, index, bad, message):
    args = list(core_inputs(rng))
    args[index] = torch.zeros(bad, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        ss2d_core(*args, backend="torch")


def test_not_a_tensor(rng):
    args = list(core_inputs(rng))
    args[4] = args[4].detach().numpy()
    with pytest.raises(TypeError, match="Ds must be a torch.Tensor"):
        ss2d_core(*args, backend="torch")


# ------------------------------------------------------------------------------ GPU
GPU_BACKENDS = ("numba_cuda", "cupy")


def gpu_ready(backend):
    if not torch.cuda.is_available() or ops._cudasim():
        pytest.skip("needs a GPU (simulator off)")
    if kernels.runtime_missing(backend) or not fuses(backend):
        pytest.skip(f"{backend} has no fused 2-D scan here")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [dict(B=2, Di=8, H=7, W=9, R=2, N=1), dict(B=3, Di=16, H=14, W=14, R=3, N=2)])
def test_gpu_matches_released_order_float32(rng, backend, shape):
    gpu_ready(backend)
    check_against_released(core_inputs(rng, dtype=torch.float32, device="cuda", **shape), backend, "float32", "backend")


def test_cupy_runs_launch_plans(rng):
    gpu_ready("cupy")
    if not ops.uses_plans("ss2d_scan", "cupy"):
        pytest.skip("cupy's 2-D scan has no launch plan here")
    args = core_inputs(rng, dtype=torch.float32, device="cuda")
    ss2d_core(*args, backend="cupy").sum().backward()
    assert not ops._CUPY_BLOCKS, "nothing may go through the CuPy-array bridge"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_float64_is_refused_clearly(rng, backend):
    """The GPU 2-D scans are float32 kernels (float64 is checked through the oracle above)."""
    gpu_ready(backend)
    with pytest.raises(TypeError, match=f"backend '{backend}' scan kernels support float32"):
        ss2d_core(*core_inputs(rng, device="cuda"), backend=backend)
