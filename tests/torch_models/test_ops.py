"""sparx_ref.torch_models.ops: the op dispatch layer of the twins.

Layers of checks:
1. The plain-torch forms agree with the NumPy oracle (float64).
2. The autograd Functions, with the NumPy oracle standing in as a kernel backend (a fake
   registry): ``gradcheck`` in float64, non-contiguous inputs, parameter gradients. This
   tests the plumbing (conversions, gradient order, None inputs) independently of any kernel.
3. The real registered kernels on the backends present here: ``numba_cpu`` under
   ``gradcheck`` (float64), ``numba_cuda`` under the CUDA simulator on tiny shapes (forward and
   backward vs the torch form; gradcheck would need thousands of simulated launches), and on
   a GPU machine the CUDA backends with CUDA tensors.
4. Errors: unknown backend, missing runtime, wrong device, dtype mismatch.
"""
from __future__ import annotations


import pytest
import torch

from sparx_ref import kernels
from sparx_ref.kernels import KernelUnavailable
from sparx_ref.ref import dmca as ref_dmca
from sparx_ref.ref import layers as ref_layers
from sparx_ref.ref import ss2d as ref_ss2d
from sparx_ref.ref import window_attention as ref_wa
from sparx_ref.testing import assert_close
from sparx_ref.torch_models import ops

OPS = tuple(ops.KERNEL_OPS)
GPU = torch.cuda.is_available()


# ----------------------------------------------------------------------------- helpers
def t(rng, *shape, dtype=torch.float64, device="cpu", grad=True):
    x = torch.from_numpy(rng.standard_normal(shape)).to(dtype=dtype, device=device)
    return x.requires_grad_(grad)


def op_inputs(op, rng, dtype=torch.float64, device="cpu", tiny=False):
    """(args, kwargs) for ``ops.<op>`` with fresh random inputs; small shapes."""
    b, Di, H, W, N = (1, 2, 2, 3, 2) if tiny else (2, 3, 3, 4, 2)
    L, K = H * W, 4
    mk = lambda *s, grad=True: t(rng, *s, dtype=dtype, device=device, grad=grad)  # noqa: E731
    if op == "selective_scan":
        A = (-torch.exp(mk(K * Di, N, grad=False))).detach().requires_grad_(True)
        return (mk(b, K * Di, L), mk(b, K * Di, L), A, mk(b, K, N, L), mk(b, K, N, L), mk(K * Di),
                mk(K * Di)), {"delta_softplus": True}
    if op == "ss2d_scan":
        A = (-torch.exp(mk(K * Di, N, grad=False))).detach().requires_grad_(True)
        return (mk(b, Di, H, W), mk(b, K * Di, L), A, mk(b, K, N, L), mk(b, K, N, L), mk(K * Di),
                mk(K * Di)), {"delta_softplus": True}
    if op == "cross_scan":
        return (mk(b, Di, H, W),), {}
    if op == "cross_merge":
        return (mk(b, K, Di, L), H, W), {}
    if op == "window_attention":
        Bw, heads, Nt, hd, nW = (2, 1, 4, 4, 2) if tiny else (4, 2, 4, 3, 2)
        mask = torch.where(torch.from_numpy(rng.random((nW, Nt, Nt))) > 0.6, -100.0, 0.0).to(dtype=dtype,
                                                                                             device=device)
        return (mk(Bw, heads, Nt, hd), mk(Bw, heads, Nt, hd), mk(Bw, heads, Nt, hd), mk(heads, Nt, Nt),
                mask, 0.7), {}
    if op == "dmca_attention":
        Bq, C, Ls, Lv, G = (1, 4, 3, 5, 2) if tiny else (2, 8, 4, 6, 2)
        return (mk(Bq, C, Ls), mk(Bq, C, Ls), mk(Bq, C, Lv), G), {}
    if op == "depthwise_conv2d":
        kh, kw = (3, 3) if tiny else (3, 5)
        return (mk(b, Di, H, W), mk(Di, 1, kh, kw), mk(Di)), {}
    if op == "group_norm":   # two groups of Di channels, x off zero mean
        x = (3.0 + mk(b, 2 * Di, H, W, grad=False)).detach().requires_grad_(True)
        return (x, mk(2 * Di), mk(2 * Di), 2), {}
    raise KeyError(op)


def first(result):
    """The differentiable output (attention ops also return their maps)."""
    return result[0] if isinstance(result, tuple) else result


def run(op, args, kwargs, backend):
    return getattr(ops, op)(*args, backend=backend, **kwargs)


def grads_of(op, args, kwargs, backend, dout):
    out = first(run(op, args, kwargs, backend))
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return out, torch.autograd.grad((out * dout).sum(), leaves)


def as_leaves(args, dtype):
    """Fresh leaf copies of the tensor arguments in ``dtype`` (same values, same requires_grad)."""
    return [a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args]


def as_function_of_leaves(op, args, kwargs, backend):
    """(f, leaves): f(*leaves) = the differentiable output of ``ops.<op>`` on ``backend`` with
    the tensor arguments that require grad replaced by f's arguments (for gradcheck)."""
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*xs):
        full = list(args)
        for i, x in zip(where, xs):
            full[i] = x
        return first(run(op, full, kwargs, backend))
    return f, [args[i] for i in where]


def gradcheck_float64(f, leaves):
    return torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def compare_with_torch(op, args, kwargs, backend, rng, kind):
    """``backend`` on ``args`` vs the torch form on the same values in float64: outputs, maps
    and every input gradient, each within tolerance(dtype of args, kind)."""
    dtype = args[0].dtype
    got_args, ref_args = as_leaves(args, dtype), as_leaves(args, torch.float64)
    got, ref = run(op, got_args, kwargs, backend), run(op, ref_args, kwargs, "torch")
    for g, r, name in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,),
                          ("out", "maps")):
        assert g.shape == r.shape and g.dtype == dtype and g.device == r.device, name
        assert_close(g, r, dtype, kind, f"{op}.{name}")
    dout = torch.from_numpy(rng.standard_normal(first(ref).shape)).to(first(ref).device)
    _, g_got = grads_of(op, got_args, kwargs, backend, dout.to(dtype))
    _, g_ref = grads_of(op, ref_args, kwargs, "torch", dout)
    assert len(g_got) == len(g_ref) > 0
    for i, (g, r) in enumerate(zip(g_got, g_ref)):
        assert g.dtype == dtype
        assert_close(g, r, dtype, kind, f"{op}.grad[{i}]")


# ------------------------------------------------------------- 1. torch forms vs oracle
def test_torch_forms_match_oracle(rng):
    args, kw = op_inputs("ss2d_scan", rng)
    np_args = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args]
    y_ref, _ = ref_ss2d.ss2d_scan_fwd(*np_args, **kw)
    assert_close(ops.ss2d_scan(*args, **kw), y_ref, "float64", "autograd", "ss2d_scan")

    args, _ = op_inputs("window_attention", rng)
    np_args = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args]
    out_ref, cache = ref_wa.window_attention_fwd(*np_args)
    out, probs = ops.window_attention(*args)
    assert_close(out, out_ref, "float64", "autograd", "window out")
    assert_close(probs, cache["probs"], "float64", "autograd", "window probs")

    args, _ = op_inputs("dmca_attention", rng)
    np_args = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args]
    out_ref, cache = ref_dmca.dmca_attention_fwd(*np_args)
    out, attn = ops.dmca_attention(*args)
    assert_close(out, out_ref, "float64", "autograd", "dmca out")
    assert_close(attn, cache["attn"], "float64", "autograd", "dmca attn")

    args, _ = op_inputs("depthwise_conv2d", rng)
    np_args = [a.detach().numpy() for a in args]
    out_ref, _ = ref_layers.depthwise_conv2d_fwd(*np_args)
    assert_close(ops.depthwise_conv2d(*args), out_ref, "float64", "autograd", "depthwise out")

    args, _ = op_inputs("group_norm", rng)
    np_args = [a.detach().numpy() if isinstance(a, torch.Tensor) else a for a in args]
    out_ref, _ = ref_layers.group_norm_fwd(*np_args)
    assert_close(ops.group_norm(*args), out_ref, "float64", "autograd", "group norm out")


def test_torch_backend_is_plain_autograd(rng):
    """kernel_backend='torch' never enters an autograd Function."""
    args, kw = op_inputs("selective_scan", rng)
    y = ops.selective_scan(*args, **kw)
    assert "SelectiveScanFn" not in type(y.grad_fn).__name__
    assert set(ops.describe("torch").values()) == {"torch"}


# --------------------------------------------- 2. Functions over the oracle (plumbing)
@pytest.mark.parametrize("op", OPS)
def test_functions_gradcheck_with_oracle_kernels(op, rng, oracle_backend):
    args, kw = op_inputs(op, rng, tiny=True)
    assert gradcheck_float64(*as_function_of_leaves(op, args, kw, oracle_backend))
    # the Function really ran (not the torch fallback)
    assert type(first(run(op, args, kw, oracle_backend)).grad_fn).__name__.endswith("FnBackward")


@pytest.mark.parametrize("op", OPS)
def test_functions_match_torch_forms_with_oracle(op, rng, oracle_backend):
    args, kw = op_inputs(op, rng)
    compare_with_torch(op, args, kw, oracle_backend, rng, "autograd")


def test_noncontiguous_inputs_and_partial_grads(rng, oracle_backend):
    args, kw = op_inputs("selective_scan", rng)
    u, delta, A, B, C, D, bias = args
    # u as a transposed view, B as a strided slice, D and delta_bias absent, A without grad
    u_t = u.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    B2 = torch.cat([B.detach(), B.detach()], dim=-1)[..., ::2].requires_grad_(False)
    assert not u_t.is_contiguous() and not B2.is_contiguous()
    A0 = A.detach()
    y_ref = ops.selective_scan(u_t, delta, A0, B2, C, None, None, False)
    y = ops.selective_scan(u_t, delta, A0, B2, C, None, None, False, backend=oracle_backend)
    assert_close(y, y_ref, "float64", "autograd", "y")
    dout = torch.from_numpy(rng.standard_normal(y.shape)).expand_as(y)   # non-contiguous grad too
    dout = dout.transpose(1, 2).contiguous().transpose(1, 2)
    g = torch.autograd.grad((y * dout).sum(), (u_t, delta, C))
    g_ref = torch.autograd.grad((y_ref * dout).sum(), (u_t, delta, C))
    for a, b, n in zip(g, g_ref, ("u", "delta", "C")):
        assert_close(a, b, "float64", "autograd", n)


def test_maps_carry_no_gradient(rng, oracle_backend):
    args, _ = op_inputs("dmca_attention", rng)
    out, attn = ops.dmca_attention(*args, backend=oracle_backend)
    assert out.requires_grad and not attn.requires_grad


def test_set_kernel_backend_switches_every_table(oracle_backend):
    from sparx_ref.torch_models import build_model
    model = build_model("sparx_mamba", depths=[1, 1, 2, 1], dims=[8, 12, 16, 20], num_classes=3)
    ops.set_kernel_backend(model, oracle_backend)
    tables = [m.kernels for m in model.modules() if hasattr(m, "kernels")]
    assert tables and all(k.name == oracle_backend for k in tables)
    with pytest.raises(ValueError, match="kernel_backend"):
        ops.set_kernel_backend(model, "triton")


# ----------------------------------------------------- 3. the real registered kernels
def present(backend):
    """The ops whose kernels are registered for ``backend``, if its runtime is here."""
    if kernels.runtime_missing(backend):
        return []
    return [op for op in OPS if ops.uses_kernel(op, backend)]


@pytest.mark.parametrize("op", OPS)
def test_numba_cpu_gradcheck_float64(op, rng):
    if op not in present("numba_cpu"):
        pytest.skip(f"no numba_cpu kernel registered for {op}")
    args, kw = op_inputs(op, rng, tiny=True)
    assert gradcheck_float64(*as_function_of_leaves(op, args, kw, "numba_cpu"))


def test_numba_cpu_float32_matches_torch(rng):
    """float32 through the Functions (the whole-model tests in test_backends.py cover the rest)."""
    if "selective_scan" not in present("numba_cpu"):
        pytest.skip("no numba_cpu scan kernel registered")
    args, kw = op_inputs("selective_scan", rng, dtype=torch.float32)
    compare_with_torch("selective_scan", args, kw, "numba_cpu", rng, "kernel")


@pytest.mark.parametrize("op", OPS)
def test_numba_cuda_functions(op, rng):
    """CUDA simulator (CPU tensors, tiny shapes) or a GPU (CUDA tensors)."""
    if op not in present("numba_cuda"):
        pytest.skip(f"no usable numba_cuda kernel for {op}")
    if op == "ss2d_scan" and ops._cudasim():
        pytest.skip("fused ss2d under the simulator takes ~15 s; its Function shares every line of "
                    "plumbing with selective_scan's, and tests/kernels checks the kernel itself")
    device = "cpu" if ops._cudasim() else "cuda"
    args, kw = op_inputs(op, rng, device=device, dtype=torch.float32, tiny=True)   # scan kernels: float32 only
    compare_with_torch(op, args, kw, "numba_cuda", rng, "kernel")


@pytest.mark.parametrize("op", OPS)
def test_cupy_functions(op, rng):
    if not GPU or op not in present("cupy"):
        pytest.skip(f"no usable cupy kernel for {op} (needs a GPU)")
    args, kw = op_inputs(op, rng, device="cuda", dtype=torch.float32)
    compare_with_torch(op, args, kw, "cupy", rng, "kernel")


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_functions_gradcheck_float64(backend, op, rng):
    """``gradcheck`` in float64 on CUDA tensors, for every op whose kernels take float64 (the
    scan kernels are float32 only and say so with a TypeError)."""
    if op not in present(backend) or ops._cudasim():
        pytest.skip(f"no usable {backend} kernel for {op}")
    args, kw = op_inputs(op, rng, device="cuda", tiny=True)
    f, leaves = as_function_of_leaves(op, args, kw, backend)
    try:
        f(*leaves)
    except TypeError as err:
        if "float32" not in str(err):
            raise
        pytest.skip(f"{backend} {op} kernels are float32 only ({err})")
    assert gradcheck_float64(f, leaves)
    assert type(f(*leaves).grad_fn).__name__.endswith("FnBackward")


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_cupy_results_are_views_of_torch_memory_that_outlive_the_call(rng):
    """The CuPy bridge: inputs are viewed in place, results are views of tensors from PyTorch's
    allocator, and they stay valid (and unshared) after CuPy lets go and PyTorch reallocates."""
    if "selective_scan" not in present("cupy") or ops.uses_plans("selective_scan", "cupy"):
        pytest.skip("cupy not usable here, or selective_scan no longer goes through the bridge")
    import cupy
    x = torch.randn(2, 8, 9, 9, device="cuda")
    rt = ops._Runtime("cupy", x.device)
    view = rt.wrap(x)
    assert isinstance(view, cupy.ndarray) and view.data.ptr == x.data_ptr()
    args, kw = op_inputs("selective_scan", rng, device="cuda", dtype=torch.float32)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    outs = [ops.selective_scan(*args, **kw, backend="cupy") for _ in range(3)]
    ref = ops.selective_scan(*args, **kw)
    assert len({o.data_ptr() for o in outs}) == 3
    assert not ops._CUPY_BLOCKS, "CuPy's arrays are gone, so no block may stay registered"
    churn = [torch.full(ref.shape, float("nan"), device="cuda") for _ in range(8)]   # reuse freed memory
    for o in outs:
        assert_close(o, ref, "float32", "kernel", "result after reallocation")
    del churn


def residual_case(rng, dtype, device):
    x, w, b = t(rng, 2, 3, 5, 6, dtype=dtype, device=device), t(rng, 3, 1, 3, 3, dtype=dtype, device=device), \
        t(rng, 3, dtype=dtype, device=device)
    return x, w, b


def check_residual(x, w, b, backend, dtype_name, kind):
    """depthwise_conv2d(residual=True) on ``backend`` against x + the torch form's convolution."""
    got = ops.depthwise_conv2d(x, w, b, residual=True, backend=backend)
    ref = x + ops.depthwise_conv2d(x, w, b)
    assert_close(got, ref, dtype_name, kind, "x + conv(x)")
    dout = torch.randn_like(ref)
    for name, g, r in zip("xwb", torch.autograd.grad((got * dout).sum(), (x, w, b)),
                          torch.autograd.grad((ref * dout).sum(), (x, w, b))):
        assert_close(g, r, dtype_name, kind, f"d{name}")


def test_residual_depthwise_conv_cpu(rng, oracle_backend):
    """x + conv(x) in one call: on torch, and through the kernels' Function (the oracle as kernels,
    gradcheck in float64)."""
    x, w, b = residual_case(rng, torch.float64, "cpu")
    check_residual(x, w, b, "torch", "float64", "two_views")
    check_residual(x, w, b, oracle_backend, "float64", "backend")
    assert torch.autograd.gradcheck(
        lambda *a: ops.depthwise_conv2d(*a, residual=True, backend=oracle_backend), (x, w, b))


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_residual_depthwise_conv_gpu(rng, backend):
    """On CuPy the sum is made inside the planned kernels, forward and backward."""
    if "depthwise_conv2d" not in present(backend) or ops._cudasim():
        pytest.skip(f"{backend} not usable here")
    x, w, b = residual_case(rng, torch.float32, "cuda")
    check_residual(x, w, b, backend, "float32", "backend")


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("op", ["depthwise_conv2d", "ss2d_scan", "dmca_attention", "cross_scan", "cross_merge",
                                "group_norm"])
def test_cupy_twin_ops_run_launch_plans(op, rng):
    """The ops a SparX-Mamba step calls ~140 times replay CuPy launch plans on tensors (no CuPy
    arrays, tens of microseconds of host time): their autograd node is a Planned Function and
    nothing went through the CuPy-array bridge."""
    if op not in present("cupy"):
        pytest.skip("cupy not usable here")
    assert ops.uses_plans(op, "cupy")
    args, kw = op_inputs(op, rng, device="cuda", dtype=torch.float32)
    out = first(run(op, as_leaves(args, torch.float32), kw, "cupy"))
    assert type(out.grad_fn).__name__.startswith("Planned"), type(out.grad_fn).__name__
    assert not ops._CUPY_BLOCKS


@pytest.mark.skipif(not GPU, reason="needs a GPU")
def test_cupy_plans_launch_from_a_new_thread(rng):
    """A thread that has made no CUDA runtime call has no current context (PyTorch's autograd
    worker for device 0 is one): the plans' driver launches must still run there, with the same
    result as on the main thread (the backward included)."""
    import threading
    if "group_norm" not in present("cupy") or ops._cudasim():
        pytest.skip("cupy not usable here")
    x, w, b = (t(rng, *shape, dtype=torch.float32, device="cuda") for shape in ((2, 8, 5, 5), (8,), (8,)))

    def forward_backward():
        out = ops.group_norm(x, w, b, 2, 1e-5, backend="cupy")
        return (out.detach(),) + torch.autograd.grad((out * out).sum(), (x, w, b))
    ref = forward_backward()
    got, errors = [], []

    def in_thread():
        try:
            got.append(forward_backward())
            torch.cuda.synchronize()
        except Exception as err:        # surfaced below, in the test's own thread
            errors.append(err)
    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    for name, a, r in zip(("out", "dx", "dweight", "dbias"), got[0], ref):
        assert torch.equal(a, r), f"{name} differs when run from a new thread"


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["numba_cuda", "cupy"])
def test_gpu_functions_follow_the_current_stream(backend, rng):
    if "dmca_attention" not in present(backend) or ops._cudasim():
        pytest.skip(f"{backend} not usable here")
    args, _ = op_inputs("dmca_attention", rng, device="cuda", dtype=torch.float32)
    ref = ops.dmca_attention(*args)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.dmca_attention(*args, backend=backend)[0]
        got = got * 1.0                         # consumed on the side stream
    torch.cuda.current_stream().wait_stream(side)
    assert_close(got, ref, "float32", "backend", "side-stream output")


# ------------------------------------------------------------------------- 4. errors
def test_unknown_backend():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        ops.cross_scan(x, backend="cuda")


def test_missing_runtime_names_backend_and_op(rng):
    missing = [b for b in ("cupy", "numba_cuda") if kernels.runtime_missing(b) and present_any(b)]
    if not missing:
        pytest.skip("every registered backend's runtime is present here")
    backend = missing[0]
    op = next(op for op in OPS if ops.uses_kernel(op, backend))
    args, kw = op_inputs(op, rng)
    with pytest.raises(KernelUnavailable, match=f"{op} with kernel_backend='{backend}'"):
        run(op, args, kw, backend)


def present_any(backend):
    return any(ops.uses_kernel(op, backend) for op in OPS)


def test_wrong_device(rng, oracle_backend, monkeypatch):
    q, k, v, groups = op_inputs("dmca_attention", rng)[0]
    with pytest.raises(ValueError, match="needs CPU tensors, got q on meta"):
        ops.dmca_attention(q.to("meta"), k.to("meta"), v.to("meta"), groups, backend=oracle_backend)
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        ops.dmca_attention(q, k, v.to("meta"), groups, backend=oracle_backend)
    if present_any("numba_cuda") or present_any("cupy"):
        gpu_backend = "cupy" if present_any("cupy") else "numba_cuda"
        monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")      # CPU tensors are a simulator-only path
        op = next(op for op in OPS if ops.uses_kernel(op, gpu_backend))
        args, kw = op_inputs(op, rng)
        with pytest.raises(ValueError, match=f"kernel_backend='{gpu_backend}' needs CUDA tensors"):
            run(op, args, kw, gpu_backend)


def test_dtype_errors(rng, oracle_backend):
    q, k, v, groups = op_inputs("dmca_attention", rng)[0]
    with pytest.raises(TypeError, match="k has dtype torch.float32 but q has torch.float64"):
        ops.dmca_attention(q, k.float(), v, groups, backend=oracle_backend)
    with pytest.raises(TypeError, match="must be float32 or float64, got torch.float16"):
        ops.dmca_attention(q.half(), k.half(), v.half(), groups, backend=oracle_backend)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.dmca_attention(q.detach().numpy(), k, v, groups, backend=oracle_backend)


def test_group_norm_on_kernels_needs_a_spatial_axis(oracle_backend):
    x, w = torch.zeros(2, 4), torch.ones(4)
    assert ops.group_norm(x, w, None, 2).shape == (2, 4)            # the torch form takes (B, C)
    with pytest.raises(ValueError, match="group_norm: .* at least one spatial axis, got shape \\(2, 4\\)"):
        ops.group_norm(x, w, None, 2, backend=oracle_backend)


def test_attention_dropout_refused_on_kernels(rng, oracle_backend):
    args, _ = op_inputs("window_attention", rng)
    drop = torch.nn.Dropout(0.5).train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        ops.window_attention(*args, backend=oracle_backend, attn_drop=drop)
    ops.window_attention(*args, backend=oracle_backend, attn_drop=drop.eval())   # inactive: fine


def test_describe_lists_every_op_per_backend():
    for backend in ops.BACKENDS:
        d = ops.describe(backend)
        assert list(d) == list(OPS)
        for op, what in d.items():
            assert (what == "torch") == (not ops.uses_kernel(op, backend))


def test_launch_plans_refuse_tensors_of_another_dtype():
    """A CuPy plan's kernels read memory as the plan's dtype: a tensor of another dtype is refused
    before anything is launched, never reinterpreted."""
    import numpy as np

    from sparx_ref.kernels.cupy._plan import Launch, Plan

    def kernel(*args, **kwargs):
        raise AssertionError("nothing may be launched")
    plan = Plan(np.dtype(np.float32), (("y", (2,)),), (Launch(kernel, (1,), (1,), ("x", "y")),))
    with pytest.raises(TypeError, match="x has dtype torch.float64.*float32"):
        ops._run_plan(plan, torch.device("cpu"), x=torch.zeros(2, dtype=torch.float64))
