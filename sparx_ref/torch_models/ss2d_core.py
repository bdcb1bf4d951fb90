"""SparX-Mamba's SSM core as one autograd node on a kernel backend.

    y = ss2d_core(u, x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias, backend="cupy")

is the part of ``SparXSS2D.forward_ssm`` between the activation and ``out_norm`` (spec §8), with
K = 4 scan directions, R = dt rank, N = state size, Di channels and L = H*W:

    xs          = cross_scan(u)                                  (B, K, Di, L)
    x_dbl[:, k] = x_proj[k] @ xs[:, k]                           (B, K, R+2N, L)
    dts, Bs, Cs = split(x_dbl, [R, N, N], dim=2)
    delta[:, k] = dt_projs_weight[k] @ dts[:, k]                 (B, K*Di, L)
    y           = cross_merge(selective_scan(xs, delta, -exp(A_logs), Bs, Cs, Ds,
                                             dt_projs_bias, delta_softplus=True))   (B, Di, H, W)

with x_proj = x_proj_weight viewed as (K, R+2N, Di). Shapes of the parameters (the released
state_dict): x_proj_weight (K*(R+2N), Di, 1), dt_projs_weight (K, Di, R), A_logs (K*Di, N),
Ds (K*Di,), dt_projs_bias (K, Di).

Where a backend has the fused 2-D scan and the cross-scan kernels, :class:`SS2DCoreFn` runs all of
it in one ``torch.autograd.Function`` with the backward written out below. Op by op, autograd
would record about 17 nodes per block (views, the matmuls, the split, the copies, ``-exp``), and a
training step of SparX-Mamba-T on a GPU is host-bound: each node costs tens of microseconds in
PyTorch's backward engine, for well under that of GPU work at the small maps. Elsewhere (and on
"torch") the core runs op by op in the released order
(:func:`sparx_ref.torch_models.common.ss2d_core_released`).

Two choices inside the Function, each giving the same products as the released order:

- **Project before cross-scanning.** Direction k's projection at scan step l is x_proj[k] @ u at
  the map position direction k reads at l. So u is projected once with all K matrices
  (K*(R+2N) channels, 32 at SparX-Mamba-T's stage 0 against Di = 192) and that small map is
  cross-scanned; direction k's copy of the projections by x_proj[k] is x_dbl[:, k] (a diagonal over
  the two K axes). The (B, K, Di, L) copy of u and its gradient are never formed; the fused
  2-D scan reads u itself.
- **The projection is a ``bmm``** against the weight expanded over the batch (a stride-0 view):
  a plain matmul of a matrix with a batch folds the batch into rows, which transposes u into a
  (B, L, Di) copy.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels._scan_common import K_DIRECTIONS, check_dtype
from . import ops as _ops
from .common import ss2d_core_released

_SCAN_INPUTS = ("x", "delta", "A", "B", "C", "D", "delta_bias")


# =========================================================================================
# shapes
# =========================================================================================
def ss2d_core_dims(u, x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias):
    """Check the shapes of :func:`ss2d_core`'s arguments; return (B, Di, H, W, R, N)."""
    K = K_DIRECTIONS
    for name, t, rank in (("u", u, 4), ("x_proj_weight", x_proj_weight, 3), ("dt_projs_weight", dt_projs_weight, 3),
                          ("A_logs", A_logs, 2), ("Ds", Ds, 1), ("dt_projs_bias", dt_projs_bias, 2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ss2d_core: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"ss2d_core: {name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    B, Di, H, W = (int(s) for s in u.shape)
    if min(B, Di, H, W) < 1:
        raise ValueError(f"ss2d_core: u must have a non-empty shape (B, Di, H, W), got {tuple(u.shape)}")
    R = int(dt_projs_weight.shape[2])
    N = int(A_logs.shape[1])
    expected = {"dt_projs_weight": (K, Di, R), "A_logs": (K * Di, N), "x_proj_weight": (K * (R + 2 * N), Di, 1),
                "Ds": (K * Di,), "dt_projs_bias": (K, Di)}
    given = {"dt_projs_weight": dt_projs_weight, "A_logs": A_logs, "x_proj_weight": x_proj_weight, "Ds": Ds,
             "dt_projs_bias": dt_projs_bias}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"ss2d_core: {name} must have shape {shape} (K={K}, Di={Di} from u, R={R} from "
                             f"dt_projs_weight, N={N} from A_logs), got {tuple(given[name].shape)}")
    return B, Di, H, W, R, N


# =========================================================================================
# the kernels the Function calls, per backend: tensors in, tensors out, no autograd
# =========================================================================================
class _PlannedKernels:
    """CuPy launch plans replayed on tensors (see :func:`.ops._run_plan`)."""

    def __init__(self, device):
        self.device = device

    def cross_scan(self, x):
        """x (B, C, H, W) -> (B, K, C, H*W)."""
        return _ops._run_plan(_ops._planner("cross_scan", "cupy", 0)(tuple(x.shape)), self.device, x=x)["xs"]

    def cross_scan_adjoint(self, dxs, dims):
        """dxs (B, K, C, H*W) -> (B, C, H, W) = dims: the cross-merge."""
        return _ops._run_plan(_ops._planner("cross_scan", "cupy", 1)(dims), self.device, ys=dxs)["y"]

    def scan(self, x, delta, A, B, C, D, delta_bias):
        """The fused 2-D scan forward -> (y (batch, Di, H, W), what :meth:`scan_backward` needs)."""
        named = dict(zip(_SCAN_INPUTS, (x, delta, A, B, C, D, delta_bias)))
        plan = _ops._ss2d_fwd_plan(named, True)
        if plan is None:           # maps too large for the "quad" forward: the kernels' array path
            return _ArrayKernels("cupy", self.device).scan(x, delta, A, B, C, D, delta_bias)
        return _ops._run_plan(plan, self.device, **named)["y"], (self, named)

    def scan_backward(self, dy, named):
        """-> {"x", "delta", "A", "B", "C", "D", "delta_bias"}: the gradients of the scan's inputs."""
        g = _ops._run_plan(_ops._ss2d_bwd_plan(named, True), self.device, dy=dy, **named)
        return {name: g.get("d" + name) for name in _SCAN_INPUTS}


class _ArrayKernels:
    """A backend's registered array functions (:class:`.ops._Runtime` converts the tensors)."""

    def __init__(self, backend, device):
        self.backend = backend
        self.rt = _ops._Runtime(backend, device)

    def cross_scan(self, x):
        with self.rt.launch():
            return self.rt.unwrap(_ops._kernel("cross_scan", self.backend, 0)(self.rt.wrap(x)))

    def cross_scan_adjoint(self, dxs, dims):
        with self.rt.launch():
            return self.rt.unwrap(_ops._kernel("cross_scan", self.backend, 1)(self.rt.wrap(dxs), dims[2], dims[3]))

    def scan(self, x, delta, A, B, C, D, delta_bias):
        rt = self.rt
        with rt.launch():
            y, cache = _ops._kernel("ss2d_scan", self.backend, 0)(
                *[rt.wrap(t) for t in (x, delta, A, B, C, D, delta_bias)], delta_softplus=True)
        return rt.unwrap(y), (self, cache)

    def scan_backward(self, dy, cache):
        rt = self.rt
        with rt.launch():
            g = _ops._kernel("ss2d_scan", self.backend, 1)(rt.wrap(dy), cache)
        return {name: rt.unwrap(g.get(name)) for name in _SCAN_INPUTS}


# =========================================================================================
# the Function
# =========================================================================================
class SS2DCoreFn(torch.autograd.Function):
    """:func:`ss2d_core` in one node; ``kernels`` is a :class:`_PlannedKernels` or :class:`_ArrayKernels`."""

    @staticmethod
    def forward(ctx, kernels, u, x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias):
        B, Di, H, W = u.shape
        K, R, N, L = K_DIRECTIONS, dt_projs_weight.shape[2], A_logs.shape[1], H * W
        CH = R + 2 * N                                           # projections per direction
        u = u.contiguous()
        proj_w = x_proj_weight.reshape(K * CH, Di)
        proj = torch.bmm(proj_w.expand(B, -1, -1), u.view(B, Di, L))                  # (B, K*CH, L)
        xs_proj = kernels.cross_scan(proj.view(B, K * CH, H, W))                      # (B, K, K*CH, L)
        # direction k's copy of direction k's projections: the diagonal over the two K axes
        x_dbl = xs_proj.view(B, K, K, CH, L).diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2).contiguous()  # (B, K, CH, L)
        dts = x_dbl[:, :, :R]                                                         # (B, K, R, L)
        delta = torch.matmul(dt_projs_weight, dts).view(B, K * Di, L)                 # (B, K*Di, L)
        A = -torch.exp(A_logs)                                                        # (K*Di, N)
        y, state = kernels.scan(u, delta, A, x_dbl[:, :, R:R + N].contiguous(), x_dbl[:, :, R + N:].contiguous(),
                                Ds.contiguous(), dt_projs_bias.reshape(K * Di))
        ctx.save_for_backward(u, x_proj_weight, dt_projs_weight)
        ctx.x_dbl, ctx.A, ctx.state = x_dbl, A, state      # intermediates: kept on ctx
        return y

    @staticmethod
    def backward(ctx, dy):
        u, x_proj_weight, dt_projs_weight = ctx.saved_tensors
        x_dbl, A, (kernels, state) = ctx.x_dbl, ctx.A, ctx.state
        B, Di, H, W = u.shape
        K, R, N, L = K_DIRECTIONS, dt_projs_weight.shape[2], A.shape[1], H * W
        CH = R + 2 * N
        g = kernels.scan_backward(dy.contiguous(), state)
        # A = -exp(A_logs): dA/dA_logs = -exp(A_logs) = A
        dA_logs = g["A"] * A
        # delta[:, k] = dt_projs_weight[k] @ dts[:, k]
        ddelta = g["delta"].view(B, K, Di, L)
        dts = x_dbl[:, :, :R]
        d_dt_w = torch.matmul(ddelta, dts.transpose(-1, -2)).sum(0)                    # (K, Di, R)
        d_dts = torch.matmul(dt_projs_weight.transpose(-1, -2), ddelta)               # (B, K, R, L)
        dx_dbl = torch.cat([d_dts, g["B"], g["C"]], dim=2)                            # (B, K, CH, L)
        # the diagonal's adjoint puts direction k's gradient in block (k, k) of zeros; the
        # cross-scan's adjoint (the cross-merge) takes it back to the projected map
        dxs_proj = x_dbl.new_zeros(B, K, K, CH, L)
        dxs_proj.diagonal(dim1=1, dim2=2).copy_(dx_dbl.permute(0, 2, 3, 1))
        dproj = kernels.cross_scan_adjoint(dxs_proj.view(B, K, K * CH, L), (B, K * CH, H, W)).view(B, K * CH, L)
        # proj = proj_w @ u per sample: d proj_w = sum_b dproj_b u_b^T; du = scan's du + proj_w^T dproj
        proj_w = x_proj_weight.reshape(K * CH, Di)
        d_proj_w = torch.bmm(dproj, u.view(B, Di, L).transpose(1, 2)).sum(0)           # (K*CH, Di)
        du = g["x"].view(B, Di, L).baddbmm(proj_w.t().expand(B, -1, -1), dproj)       # (B, Di, L)
        grads = (du.view(B, Di, H, W), d_proj_w.view_as(x_proj_weight), d_dt_w, dA_logs, g["D"],
                 g["delta_bias"].view(K, Di))
        return _ops.needed_grads(ctx, grads, leading=1)


# =========================================================================================
# the entry point
# =========================================================================================
def fuses(backend: str) -> bool:
    """True if :func:`ss2d_core` runs as one :class:`SS2DCoreFn` on ``backend``."""
    return _ops.uses_kernel("ss2d_scan", backend) and _ops.uses_kernel("cross_scan", backend)


def ss2d_core(u, x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias, *, backend="torch"):
    """SparX-Mamba's SSM core (see the module docstring): u (B, Di, H, W) -> y (B, Di, H, W)."""
    _ops.check_backend(backend)
    params = (x_proj_weight, dt_projs_weight, A_logs, Ds, dt_projs_bias)
    ss2d_core_dims(u, *params)
    if not fuses(backend):
        return ss2d_core_released(_ops.kernel_table(backend), u, *params)
    device = _ops._check_tensors("ss2d_scan", backend, dict(u=u, x_proj_weight=x_proj_weight,
                                                             dt_projs_weight=dt_projs_weight, A_logs=A_logs, Ds=Ds,
                                                             dt_projs_bias=dt_projs_bias))
    if _ops.uses_plans("ss2d_scan", backend) and _ops.uses_plans("cross_scan", backend):
        check_dtype(u.dtype, (np.float32,), backend)
        kernels = _PlannedKernels(device)
    else:
        kernels = _ArrayKernels(backend, device)
    return SS2DCoreFn.apply(kernels, u, *params)


__all__ = ["ss2d_core", "ss2d_core_dims", "SS2DCoreFn", "fuses"]
