"""Whole twins on every kernel backend: same logits, input gradient and parameter gradients.

For each family a small model is built with ``kernel_backend="torch"`` and with each other
backend usable here, given the same (randomised) weights and input, and compared within
``tolerance(dtype, "backend")``:

- with the real kernels: ``numba_cpu`` on CPU (float32); on a GPU machine ``numba_cuda`` and
  ``cupy`` on CUDA tensors (float32). The CUDA simulator is far too slow for whole models; the
  Functions are tested under it in test_ops.py.
- with the NumPy oracle standing in as the kernels of every op (float64): checks the wiring
  of all three families through the dispatch layer, including the attention ops that have
  no CPU kernel.
"""
from __future__ import annotations

import pytest
import torch

from sparx_ref import kernels
from sparx_ref.kernels import KernelUnavailable
from sparx_ref.testing import assert_close
from sparx_ref.torch_models import build_model, ops

from tests.torch_models._oracle import oracle_registry

NO_CROSS = [False] * 4
FAMILIES = {
    # name: (build kwargs, input shape); each has ganglion layers (DMCA) where the family has them
    "sparx_mamba": (dict(depths=[1, 1, 2, 1], dims=[8, 12, 16, 20], num_classes=4, ssm_d_state=2,
                         dense_config=dict(dense_step=[1, 1, 1, 1], dense_start=[100, 0, 0, 0],
                                           max_dense_depth=[100, 1, 1, 1], cross_stage=NO_CROSS)),
                    (2, 3, 32, 32)),
    "swin": (dict(img_size=32, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=4, num_classes=4),
             (2, 3, 32, 32)),
    "sparx_swin": (dict(img_size=32, embed_dim=8, depths=[1, 3], num_heads=[2, 2], window_size=4,
                        num_classes=3, sr_ratio=[1, 2],
                        dense_config=dict(dense_step=[1, 1], dense_start=[100, 1], max_dense_depth=[100, 100],
                                          cross_stage=[False, False])),
                   (2, 3, 32, 32)),
}
FAMILY_OPS = {"sparx_mamba": ("selective_scan", "cross_scan", "cross_merge", "dmca_attention"),
              "swin": ("window_attention",), "sparx_swin": ("window_attention", "dmca_attention")}


def run_model(family, backend, state, x, dlogits, dtype, device):
    """logits, dx and {param name: grad} of ``family`` on ``backend`` with weights ``state``."""
    kwargs, _ = FAMILIES[family]
    model = build_model(family, kernel_backend=backend, **kwargs).to(device=device, dtype=dtype).eval()
    model.load_state_dict(state)
    xt = x.to(device=device, dtype=dtype).requires_grad_(True)
    logits = model(xt)
    (logits * dlogits.to(device=device, dtype=dtype)).sum().backward()
    return logits, xt.grad, {n: p.grad for n, p in model.named_parameters()}


def compare_backends(family, backend, dtype, device, rng):
    kwargs, shape = FAMILIES[family]
    torch.manual_seed(int(rng.integers(2 ** 31)))
    base = build_model(family, **kwargs).to(dtype=dtype)
    state = base.state_dict()
    for name, value in state.items():       # move away from the init (LayerScale 1, biases 0, ...)
        if value.is_floating_point() and "running" not in name and "attn_mask" not in name:
            value.add_(0.1 * torch.from_numpy(rng.standard_normal(tuple(value.shape))).to(dtype))
    x = torch.from_numpy(rng.standard_normal(shape))
    n_classes = kwargs["num_classes"]
    dlogits = torch.from_numpy(rng.standard_normal((shape[0], n_classes)))
    ref = run_model(family, "torch", state, x, dlogits, dtype, device)
    got = run_model(family, backend, state, x, dlogits, dtype, device)
    assert_close(got[0], ref[0], dtype, "backend", f"{family}/{backend} logits")
    assert_close(got[1], ref[1], dtype, "backend", f"{family}/{backend} dx")
    assert list(got[2]) == list(ref[2])
    for name in ref[2]:
        assert got[2][name] is not None, name
        assert_close(got[2][name], ref[2][name], dtype, "backend", f"{family}/{backend} grad {name}")


def real_cases():
    cases = [(f, "numba_cpu", "cpu") for f in FAMILIES]
    if torch.cuda.is_available() and not ops._cudasim():
        cases += [(f, b, "cuda") for b in ("numba_cuda", "cupy") for f in FAMILIES]
    return cases


@pytest.mark.parametrize("family,backend,device", real_cases())
def test_real_kernels_match_torch_float32(family, backend, device, rng):
    missing = kernels.runtime_missing(backend)
    if missing:
        pytest.skip(missing)
    used = [op for op in FAMILY_OPS[family] if ops.uses_kernel(op, backend)]
    if not used:
        pytest.skip(f"no {backend} kernel for {FAMILY_OPS[family]}: {family} would run its torch forms")
    compare_backends(family, backend, torch.float32, device, rng)


@pytest.mark.parametrize("family,backend", [(f, b) for b in ("numba_cuda", "cupy") for f in FAMILIES])
def test_gpu_kernels_on_a_device_that_is_not_the_current_one(family, backend, rng):
    """A model on cuda:1 while cuda:0 stays current (one process, several GPUs) gives what the
    same model gives on cuda:0: the kernels run on the tensors' device. cuda:0 runs first, so the
    kernels and CuPy launch plans built there are in the caches when cuda:1 asks for them."""
    if not torch.cuda.is_available() or ops._cudasim() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (simulator off)")
    if backend == "numba_cuda":
        # this check passed for all three families (2x H200, 2026-11-27 16:17 UTC), but numba-cuda
        # then aborted the process at interpreter exit ("double free or corruption" in its
        # module_unload finaliser for the second device), which would fail the whole GPU run
        pytest.skip("numba-cuda aborts at interpreter exit after loading kernels on two devices")
    missing = kernels.runtime_missing(backend)
    if missing:
        pytest.skip(missing)
    if not any(ops.uses_kernel(op, backend) for op in FAMILY_OPS[family]):
        pytest.skip(f"no {backend} kernel for {FAMILY_OPS[family]}")
    kwargs, shape = FAMILIES[family]
    torch.manual_seed(int(rng.integers(2 ** 31)))
    state = build_model(family, **kwargs).state_dict()
    x = torch.from_numpy(rng.standard_normal(shape))
    dlogits = torch.from_numpy(rng.standard_normal((shape[0], kwargs["num_classes"])))
    torch.cuda.set_device(0)
    on0 = run_model(family, backend, state, x, dlogits, torch.float32, "cuda:0")
    on1 = run_model(family, backend, state, x, dlogits, torch.float32, "cuda:1")
    assert torch.cuda.current_device() == 0, "the current device is left as it was"
    assert on1[0].device == torch.device("cuda:1")
    assert_close(on1[0].cpu(), on0[0].cpu(), torch.float32, "backend", f"{family}/{backend} logits, cuda:1 vs cuda:0")
    assert_close(on1[1].cpu(), on0[1].cpu(), torch.float32, "backend", f"{family}/{backend} dx, cuda:1 vs cuda:0")
    for name, grad in on0[2].items():
        assert_close(on1[2][name].cpu(), grad.cpu(), torch.float32, "backend", f"{family}/{backend} grad {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_as_kernels_float64(family, rng, monkeypatch):
    """Every hot op of the family goes through an autograd Function (the NumPy oracle as the
    kernel): same logits and gradients as plain torch to float64 rounding."""
    monkeypatch.setattr(ops, "_kernels", oracle_registry())
    assert all(ops.uses_kernel(op, "numba_cpu") for op in FAMILY_OPS[family])
    compare_backends(family, "numba_cpu", torch.float64, "cpu", rng)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_kernel_backend_errors(family):
    kwargs, shape = FAMILIES[family]
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        build_model(family, kernel_backend="triton", **kwargs)
    gpu = [b for b in ("cupy", "numba_cuda") if kernels.runtime_missing(b)
           and any(ops.uses_kernel(op, b) for op in FAMILY_OPS[family])]
    if not gpu:
        pytest.skip("every GPU runtime is present here")
    model = build_model(family, kernel_backend=gpu[0], **kwargs)       # builds anywhere...
    with pytest.raises(KernelUnavailable, match=f"kernel_backend='{gpu[0]}'"):
        model(torch.randn(shape))                                          # ...fails on use, clearly
