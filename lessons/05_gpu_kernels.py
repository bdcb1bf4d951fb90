# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 5 — From a NumPy loop to GPU kernels
#
# The selective scan is sequential along the sequence but independent across rows
# (batch x channels). We write it as Numba-CUDA kernels in three steps and check each one
# against the NumPy oracle:
#
# 1. **naive**: one thread per row, walking the row; neighbouring threads read addresses
#    $L$ apart (*uncoalesced*);
# 2. **coalesced**: the same thread-per-row plan on a time-major layout, so at every step
#    the threads of a warp read consecutive addresses;
# 3. **fused**: SS2D's cross-scan, softplus, scan and cross-merge in one kernel that reads the
#    2-D map directly by index arithmetic and writes each output once.
#
# Then we run the project's registered kernels (`sparx_ref.kernels`: naive, warp-shuffle,
# composed and fused SS2D) through the same checks.
#
# Without a GPU the kernels run in Numba's **CUDA simulator** (every CUDA thread becomes a
# Python thread, so shapes are tiny and nothing is timed); on a CUDA machine the very same
# cells run on the GPU and print timings.

# %%
import os
import shutil

# Choose the simulator before Numba is imported: on when no NVIDIA driver is visible.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if shutil.which("nvidia-smi") else "1")
SIMULATOR = os.environ["NUMBA_ENABLE_CUDASIM"] not in ("", "0")

import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

from sparx_ref import kernels  # noqa: E402
from sparx_ref.ref import scan, ss2d  # noqa: E402
from sparx_ref.testing import rel_err  # noqa: E402
from sparx_ref.tolerances import tolerance  # noqa: E402

# small grids are fine for a lesson; silence Numba's occupancy hints
warnings.filterwarnings("ignore", message=".*under-utilization.*")
ON_GPU = (not SIMULATOR) and cuda.is_available()
if ON_GPU:
    name = cuda.get_current_device().name
    print("running on the GPU:", name.decode() if isinstance(name, bytes) else name)
else:
    print("running on the CUDA simulator")
assert ON_GPU or SIMULATOR
KERNEL_TOL = tolerance("float32", "kernel")
rng = np.random.default_rng(0)

# %% [markdown]
# ## The problem and the oracle
#
# Rows $r = (b, c)$, with $d_\text{state} = 1$ as in SparX-Mamba, and $B$, $C$ shared by the
# $D_g$ channels of a group (in SS2D, a group is a scan direction):
#
# $$h_t = e^{\Delta_t A_c} h_{t-1} + \Delta_t B_{g,t} u_t, \qquad y_t = C_{g,t} h_t + D_c u_t .$$
#
# Kernels compute in float32; the oracle runs in float64 on the same (float32-rounded)
# inputs, so the error we measure is the kernel's own.

# %%
if ON_GPU:
    batch, K, Dg, L = 32, 4, 384, 512          # 49,152 rows of 512 steps: enough warps to fill the GPU
else:
    batch, K, Dg, L = 1, 2, 16, 24              # 32 rows: 32 simulated threads
KD = K * Dg
f32 = np.float32
u = rng.standard_normal((batch, KD, L)).astype(f32)
dt = np.exp(rng.standard_normal((batch, KD, L)) * 0.5 - 2.0).astype(f32)    # positive steps
A = -np.exp(rng.standard_normal((KD, 1)) * 0.3).astype(f32)                 # (KD, N=1)
B = rng.standard_normal((batch, K, 1, L)).astype(f32)
C = rng.standard_normal((batch, K, 1, L)).astype(f32)
D = rng.standard_normal(KD).astype(f32)

y_ref, _ = scan.selective_scan_fwd(*(a.astype(np.float64) for a in (u, dt, A, B, C, D)))
print(f"rows = batch x channels = {batch * KD}, L = {L}")


def timed(fn, repeat=3):
    """(result, best seconds); on the GPU synchronise around each call."""
    best, out = float("inf"), None
    for _ in range(repeat if ON_GPU else 1):
        cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


timings = {}
_, timings["numpy oracle (float64)"] = timed(lambda: scan.selective_scan_fwd(
    *(a.astype(np.float64) for a in (u, dt, A, B, C, D))))

# %% [markdown]
# ## 1. Naive: one thread per row
#
# Thread $r$ walks its own row. At step $t$, thread $r$ reads `u[r, t]` and thread $r+1$
# reads `u[r+1, t]`, $L$ floats further: a warp's 32 loads touch 32 different memory
# segments. This is correct and simple, and wastes most of the memory bandwidth.

# %%
@cuda.jit
def scan_naive(u, dt, A, B, C, D, y, Dg):
    """u, dt, y: (rows, L) row-major; A, D: (KD,); B, C: (batch*K, L)."""
    r = cuda.grid(1)
    rows, L = u.shape
    if r >= rows:
        return
    KD = A.shape[0]
    b, c = r // KD, r % KD
    g = b * (KD // Dg) + c // Dg                  # the B/C row of this channel's group
    a = A[c]
    h = 0.0
    for t in range(L):
        d = dt[r, t]
        h = math.exp(d * a) * h + d * B[g, t] * u[r, t]
        y[r, t] = C[g, t] * h + D[c] * u[r, t]


rows = batch * KD
threads = 32 if not ON_GPU else 128
d_u, d_dt = cuda.to_device(u.reshape(rows, L)), cuda.to_device(dt.reshape(rows, L))
d_A, d_D = cuda.to_device(A[:, 0].copy()), cuda.to_device(D)
d_B, d_C = cuda.to_device(B.reshape(batch * K, L)), cuda.to_device(C.reshape(batch * K, L))
d_y = cuda.to_device(np.full((rows, L), np.nan, f32))      # NaN: an unwritten element fails


def run_naive():
    scan_naive[(rows + threads - 1) // threads, threads](d_u, d_dt, d_A, d_B, d_C, d_D, d_y, Dg)


_, timings["naive (row-major)"] = timed(run_naive)
y_naive = d_y.copy_to_host().reshape(batch, KD, L)
err = rel_err(y_naive, y_ref)
print("naive kernel vs oracle:", err)
assert err <= KERNEL_TOL

# %% [markdown]
# ## 2. Coalesced: time-major layout
#
# Same plan, different layout: store the arrays as `(L, rows)`. At step $t$ the threads of
# a warp now read `u[t, r], u[t, r+1], ...`: consecutive addresses, one memory transaction
# per warp. B and C, `(L, batch*K)`, are read by all threads of a group at the same address
# (a broadcast). The arithmetic is unchanged; only the indexing moved.

# %%
@cuda.jit
def scan_coalesced(u_t, dt_t, A, B_t, C_t, D, y_t, Dg):
    """u_t, dt_t, y_t: (L, rows) time-major; B_t, C_t: (L, batch*K)."""
    r = cuda.grid(1)
    L, rows = u_t.shape
    if r >= rows:
        return
    KD = A.shape[0]
    b, c = r // KD, r % KD
    g = b * (KD // Dg) + c // Dg
    a = A[c]
    h = 0.0
    for t in range(L):
        d = dt_t[t, r]
        x = u_t[t, r]
        h = math.exp(d * a) * h + d * B_t[t, g] * x
        y_t[t, r] = C_t[t, g] * h + D[c] * x


d_ut = cuda.to_device(np.ascontiguousarray(u.reshape(rows, L).T))
d_dtt = cuda.to_device(np.ascontiguousarray(dt.reshape(rows, L).T))
d_Bt = cuda.to_device(np.ascontiguousarray(B.reshape(batch * K, L).T))
d_Ct = cuda.to_device(np.ascontiguousarray(C.reshape(batch * K, L).T))
d_yt = cuda.to_device(np.full((L, rows), np.nan, f32))


def run_coalesced():
    scan_coalesced[(rows + threads - 1) // threads, threads](d_ut, d_dtt, d_A, d_Bt, d_Ct, d_D, d_yt, Dg)


_, timings["coalesced (time-major)"] = timed(run_coalesced)
y_coal = d_yt.copy_to_host().T.reshape(batch, KD, L)
err = rel_err(y_coal, y_ref)
print("coalesced kernel vs oracle:", err)
assert err <= KERNEL_TOL
assert rel_err(y_coal, y_naive) <= KERNEL_TOL       # same arithmetic, same order

# %% [markdown]
# ## 3. Fused SS2D: no cross-scan copy, one write per output
#
# SS2D composes three passes: `cross_scan` (copy the map four times), the scan, and
# `cross_merge` (read four sequences, add them). A fused kernel reads the map **in scan
# order by index arithmetic** (direction 0 at step $t$ reads pixel $t$; direction 1 reads
# $(t \bmod H)\,W + \lfloor t/H\rfloor$; 2 and 3 read the same backwards), applies the
# softplus of `delta + delta_bias` on the fly, and adds each direction's output straight
# into $y$. One thread owns one (batch, channel) and all its pixels, so the four additions
# happen in a fixed order (0, 1, 2, 3, as in `cross_merge`) without atomics. The map is kept
# channels-last (`(H*W, rows)`) so the threads of a warp stay coalesced.

# %%
@cuda.jit(device=True, inline=True)
def pixel_of(k, t, H, W):
    """Flat pixel index read at step t of scan direction k."""
    L = H * W
    if k >= 2:
        t = L - 1 - t
    if k % 2 == 0:
        return t
    return (t % H) * W + t // H


@cuda.jit
def ss2d_fused(x_cl, delta, A, B, C, D, bias, y_cl, H, W):
    """x_cl, y_cl: (H*W, batch*Di) channels-last; delta: (batch, 4*Di, L) in scan order;
    A (4*Di,), D, bias (4*Di,); B, C: (batch, 4, L). softplus(delta + bias) inside."""
    r = cuda.grid(1)
    L, rows = x_cl.shape
    if r >= rows:
        return
    Di = A.shape[0] // 4
    b, c = r // Di, r % Di
    for t in range(L):
        y_cl[pixel_of(0, t, H, W), r] = 0.0
    for k in range(4):
        ch = k * Di + c
        a = A[ch]
        h = 0.0
        for t in range(L):
            p = pixel_of(k, t, H, W)
            z = delta[b, ch, t] + bias[ch]
            d = z if z > 20.0 else math.log1p(math.exp(z))        # softplus, threshold 20
            xv = x_cl[p, r]
            h = math.exp(d * a) * h + d * B[b, k, t] * xv
            y_cl[p, r] += C[b, k, t] * h + D[ch] * xv


if ON_GPU:
    bs, Di, Hm, Wm = 2, 96, 28, 28
else:
    bs, Di, Hm, Wm = 1, 8, 4, 5              # non-square on purpose
Lm = Hm * Wm
xm = rng.standard_normal((bs, Di, Hm, Wm)).astype(f32)
deltam = (rng.standard_normal((bs, 4 * Di, Lm)) * 0.5 - 1.0).astype(f32)
Am = -np.exp(rng.standard_normal((4 * Di, 1)) * 0.3).astype(f32)
Bm = rng.standard_normal((bs, 4, 1, Lm)).astype(f32)
Cm = rng.standard_normal((bs, 4, 1, Lm)).astype(f32)
Dm = rng.standard_normal(4 * Di).astype(f32)
biasm = (rng.standard_normal(4 * Di) * 0.3).astype(f32)
ym_ref, _ = ss2d.ss2d_scan_fwd(*(a.astype(np.float64) for a in (xm, deltam, Am, Bm, Cm, Dm, biasm)),
                               delta_softplus=True)

rows_m = bs * Di
d_x = cuda.to_device(np.ascontiguousarray(xm.reshape(rows_m, Lm).T))
d_ycl = cuda.to_device(np.full((Lm, rows_m), np.nan, f32))
fused_args = (d_x, cuda.to_device(deltam), cuda.to_device(Am[:, 0].copy()), cuda.to_device(Bm[:, :, 0].copy()),
              cuda.to_device(Cm[:, :, 0].copy()), cuda.to_device(Dm), cuda.to_device(biasm), d_ycl, Hm, Wm)
tm = 32 if not ON_GPU else 128


def run_fused():
    ss2d_fused[(rows_m + tm - 1) // tm, tm](*fused_args)


_, timings["ss2d fused (lesson)"] = timed(run_fused)
ym = d_ycl.copy_to_host().T.reshape(bs, Di, Hm, Wm)
err = rel_err(ym, ym_ref)
print("fused SS2D kernel vs oracle:", err)
assert err <= KERNEL_TOL

# %% [markdown]
# ## 4. The project's kernels, through the registry
#
# `sparx_ref.kernels` keeps a ladder of versions per operation, each with a one-line idea.
# The registered scan goes further than ours in two steps. `warp`: **one warp per row**, the
# 32 lanes handle 32 consecutive steps and combine them with a warp-shuffle scan of the pairs
# $(e^{\Delta A}, \Delta B u)$ (the recurrence is associative), carrying the state from one
# 32-step chunk to the next. `vec` (the default): each lane holds 4 consecutive steps, loads
# them with one 16-byte load per tensor, composes its 4 steps itself, and the warp scan runs
# once per 4 steps: a quarter of the shuffles and load instructions (on an H100: 65% -> 83%
# of the memory-bandwidth floor at L = 3136). The SS2D ladder ends with `quad`: 4 warps per
# (image, channel), one per direction, reading the map from shared memory. Every version
# passes the same oracle check.

# %%
from sparx_ref.kernels import registry  # noqa: E402

for entry in registry.entries("selective_scan_fwd", "numba_cuda") + registry.entries("ss2d_scan_fwd", "numba_cuda"):
    print(f"{entry.op:>20s} {entry.version:>9s}{' (default)' if entry.default else '':>11s}: {entry.idea}")

scan_inputs = [cuda.to_device(a) for a in (u, dt, A, B, C, D)]          # copied once, not timed
for version in registry.versions("selective_scan_fwd", "numba_cuda"):
    fn = kernels.get("selective_scan_fwd", "numba_cuda", version)
    (y_k, _), seconds = timed(lambda: fn(*scan_inputs))
    timings[f"registered scan '{version}'"] = seconds
    y_k = y_k.copy_to_host() if hasattr(y_k, "copy_to_host") else np.asarray(y_k)
    err = rel_err(y_k, y_ref)
    print(f"registered selective_scan_fwd '{version}' vs oracle: {err:.1e}")
    assert err <= KERNEL_TOL

ss2d_inputs = [cuda.to_device(a) for a in (xm, deltam, Am, Bm, Cm, Dm, biasm)]
for version in registry.versions("ss2d_scan_fwd", "numba_cuda"):
    fn = kernels.get("ss2d_scan_fwd", "numba_cuda", version)
    (y_k, _), seconds = timed(lambda: fn(*ss2d_inputs, delta_softplus=True))
    timings[f"registered ss2d '{version}'"] = seconds
    y_k = y_k.copy_to_host() if hasattr(y_k, "copy_to_host") else np.asarray(y_k)
    err = rel_err(y_k, ym_ref)
    print(f"registered ss2d_scan_fwd '{version}' vs oracle: {err:.1e}")
    assert err <= KERNEL_TOL

# %% [markdown]
# ## 5. Reuse in registers: the depthwise convolution
#
# Not every hot op of a twin is a scan. SparX-Mamba runs about fifty depthwise "same"
# convolutions a forward (3x3 and 5x5 filters, one per channel), and PyTorch's float32
# backward for them was the largest single item of a training step. The op is
#
# $$\text{out}_{b,c,h,w} = \text{bias}_c + \sum_{i,j} w_{c,i,j}\,
#   x_{b,c,\,h+i-p_h,\,w+j-p_w}, \qquad p_h = k_h/2,\ p_w = k_w/2 \text{ (zero outside)}.$$
#
# Two facts shape its kernels. First, its input gradient is the *same* correlation with the
# filter turned 180 degrees (because $k_h - 1 = 2p_h$), so one forward kernel serves both.
# Second, a thread that computes one output reads $k_h k_w$ inputs, most of which its
# neighbours read too. The `strip` rung gives each thread $V = 4$ neighbouring outputs of one
# row: it loads each of the $k_h$ input rows it needs once ($V + k_w - 1$ values, into
# registers) and reuses them for all four outputs. Its backward is one pass per (channel,
# slice of the batch) that writes $dx$ and adds $dy \cdot x$ into $k_h k_w + 1$ register sums
# (the filter taps and the bias), then sums the slices in a fixed order (no atomics).

# %%
from sparx_ref.ref import layers  # noqa: E402

xc = rng.standard_normal((2, 3, 6, 7))
wc = rng.standard_normal((3, 1, 3, 5))
bc = rng.standard_normal(3)
dyc = rng.standard_normal((2, 3, 6, 7))
out_ref, conv_cache = layers.depthwise_conv2d_fwd(xc, wc, bc)
grads_ref = layers.depthwise_conv2d_bwd(dyc, conv_cache)

# the adjoint: dx is dy correlated with the filter turned 180 degrees (and no bias)
dx_flipped, _ = layers.depthwise_conv2d_fwd(dyc, wc[:, :, ::-1, ::-1].copy())
err = rel_err(dx_flipped, grads_ref["x"])
print(f"dx == flipped-filter correlation of dy: {err:.1e}")
assert err <= tolerance("float64", "two_views")

for k in (3, 5):
    naive_loads, strip_loads = k * k, k * (4 + k - 1) / 4
    print(f"{k}x{k} filter: {naive_loads} loads per output one thread per output, "
          f"{strip_loads:.1f} with 4 outputs per thread")

conv_inputs = [cuda.to_device(a.astype(f32)) for a in (xc, wc, bc)]
for version in registry.versions("depthwise_conv2d_fwd", "numba_cuda"):
    fwd = kernels.get("depthwise_conv2d_fwd", "numba_cuda", version)
    bwd = kernels.get("depthwise_conv2d_bwd", "numba_cuda", version)
    out_k, cache_k = fwd(*conv_inputs)
    grads_k = bwd(cuda.to_device(dyc.astype(f32)), cache_k)
    errs = [rel_err(out_k.copy_to_host(), out_ref)] + [
        rel_err(grads_k[n].copy_to_host(), grads_ref[n]) for n in ("x", "weight", "bias")]
    print(f"registered depthwise conv '{version}' vs oracle (out, dx, dweight, dbias): "
          + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= KERNEL_TOL

# %% [markdown]
# On an H200 (2026-11-27, `benchmarks/RESULTS.md`) the `strip` kernels run 2.6-2.7x faster
# than PyTorch's float32 depthwise convolution forward and 3.3-4.0x forward+backward on
# SparX-Mamba-T's large maps; over all of one training step's shapes, 13.4 ms against 43.4 ms.
#
# The model adds each of these convolutions to its own input twice a block (`x + pos_embed(x)`,
# and `h + dwconv(h)` in the MLP). A thread of the strip kernel already holds the input row of
# its outputs in registers, and the backward's thread holds dout at its outputs. So the kernels
# take a `residual` flag and write conv(x) + x, and dx + dout, themselves. That removes a full
# read-read-write pass over the map each way: 2.8 ms of GPU time a training step on an H100.

# %% [markdown]
# ## 6. When the GPU waits for Python: launch plans
#
# A small kernel runs for tens of microseconds, and a SparX-Mamba-T training step makes about
# 140 calls of them. If each call spends hundreds of microseconds in Python (checking shapes,
# picking a grid and a compiled module, wrapping tensors as CuPy arrays, allocating), the GPU
# sits idle between kernels: the step is *host-bound*, and a faster kernel changes nothing.
#
# Most of that work depends only on the shapes. So the CuPy wrappers split it off into a
# **plan** (`sparx_ref.kernels.cupy._plan`): the buffers a call allocates and the launches it
# makes, where every pointer argument is a buffer *name*. A plan is built once per shape;
# running it allocates the buffers and replaces each name with a device address. The PyTorch
# twins run the same plans with `torch.empty` buffers and `Tensor.data_ptr()` addresses, so no
# CuPy array is ever built. Below, a plan drives a stand-in "kernel" that records its launches
# (no GPU needed), with NumPy arrays playing the buffers.

# %%
from sparx_ref.kernels.cupy._plan import Launch, Plan, run as run_plan

launched = []


def recording_kernel(grid, block, args, shared_mem=0):
    launched.append((grid, block, args))


def address(a):
    return a.__array_interface__["data"][0]


# y = a * x + b in two launches through a scratch buffer "ax"
demo_plan = Plan(np.dtype(np.float32), (("ax", (4,)), ("y", (4,))),
                 (Launch(recording_kernel, (1,), (32,), ("x", "ax", np.float32(2.0))),
                  Launch(recording_kernel, (1,), (32,), ("ax", "y", np.float32(1.0)))))
for call in range(2):
    x_call = np.full(4, call, np.float32)
    bufs = run_plan(demo_plan, {"x": x_call}, np.empty, np.zeros, address)
    first, second = launched[-2:]
    assert first[2][0] == address(x_call) and first[2][1] == address(bufs["ax"])
    assert second[2][:2] == (address(bufs["ax"]), address(bufs["y"]))
    print(f"call {call}: launch 1 args {first[2][:2]} + {first[2][2]!r}, launch 2 args {second[2][:2]}")

# %% [markdown]
# Same launches, new addresses each call; nothing else is decided twice. On an H200 this took
# a small depthwise convolution's forward+backward from 784 us of host time to 256 us
# (PyTorch's own convolution: 213 us), and a SparX-Mamba-T training step from host-bound to
# within about 15% of its GPU time (`benchmarks/RESULTS.md`, "Whole models").

# %% [markdown]
# Two refinements followed. A call's scratch buffers (partial sums, transposed copies) share
# one allocation, each at an aligned offset (`Plan.scratch`). And the twins launch with the
# driver's `cuLaunchKernel`: each launch's arguments are packed in C storage once, and a call
# only writes the new addresses into it (`DriverLaunches`).
#
# The last refinement is on PyTorch's side of the line. Autograd records one node per
# operation, and its backward engine spends tens of microseconds on each. SparX-Mamba's SSM core
# (the projection, the cross-scan of the projections, the dt projection, `-exp(A_logs)` and the
# 2-D scan) was about 17 nodes per block. On kernel backends it is now one
# `torch.autograd.Function` whose backward is written out by hand
# (`sparx_ref/torch_models/ss2d_core.py`): the scan kernel's backward, then the adjoint of each
# product in reverse order. That is 1468 nodes a training step down to 1143. The hand-written
# backward is checked the way every op here is: `gradcheck` in float64 with the NumPy oracle
# standing in as the kernels, and agreement with the released order of operations.
#
# Two lessons about *measuring* such a step. First, time steps back to back, as a training loop
# runs them, with one synchronisation after the last: synchronising after every step charges
# each step with the GPU work still queued when the host finished it, while in a real loop the
# host is already queueing the next step. On an H100 that alone read 506 img/s instead of 578
# for the same code. Second, a plan holds kernels loaded on one device, so plans are cached per
# device (`Plan.for_device`): a model on `cuda:1` must not launch the kernels loaded for `cuda:0`.

# %% [markdown]
# ## 7. Statistics with too few rows: group normalisation
#
# SparX-Mamba normalises with `GroupNorm(1, C)`: per sample, over all of $(C, H, W)$. PyTorch
# computes those statistics with one block per (sample, group), which is 64 blocks at batch
# 64, on a card with 132 multiprocessors: most of the GPU waits. Our kernels split a sample
# into its $C$ *planes* of $S = HW$ values, give each plane a warp, and then combine.
#
# The combination has to be exact and stable. Each plane gives its mean $m_p$ and its sum of
# squared deviations $M_p = \sum (x - m_p)^2$ (two passes over the plane). For parts of equal
# count $S$, Chan et al.'s formula gives the sample's
#
# $$m = \frac{1}{P}\sum_p m_p, \qquad M = \sum_p M_p + S \sum_p (m_p - m)^2,
#   \qquad \text{var} = M / (PS).$$
#
# The shortcut $E[x^2] - E[x]^2$ is *not* used. It cancels catastrophically when the data
# sit far from zero, as the float32 check below shows.

# %%
x_gn = (1000.0 + rng.standard_normal((6, 50))).astype(f32)    # 6 planes of 50 values, far from 0
S_gn, P_gn = x_gn.shape[1], x_gn.shape[0]
m_p = x_gn.mean(axis=1, dtype=f32)
M_p = ((x_gn - m_p[:, None]) ** 2).sum(axis=1, dtype=f32)
m_all = m_p.mean(dtype=f32)
var_chan = (M_p.sum(dtype=f32) + f32(S_gn) * ((m_p - m_all) ** 2).sum(dtype=f32)) / f32(P_gn * S_gn)
var_shortcut = (x_gn.astype(f32) ** 2).mean(dtype=f32) - x_gn.mean(dtype=f32) ** 2
var_exact = x_gn.astype(np.float64).var()
err_chan, err_short = abs(var_chan - var_exact) / var_exact, abs(var_shortcut - var_exact) / var_exact
print(f"float32 variance of data near 1000: planes + Chan {err_chan:.1e}, E[x^2]-E[x]^2 {err_short:.1e}")
assert err_chan < 1e-4 < err_short

# %% [markdown]
# The backward uses the same planes. With $g = dy \cdot w_c$ and $\hat{x} = (x - m)\,
# \text{rstd}$, $dx = \text{rstd}\,(g - \overline{g} - \hat{x}\,\overline{g\hat{x}})$, where the bars
# are means over the sample. A warp per plane sums $dy$ and $dy\,\hat{x}$. Those plane sums
# then give the weight and bias gradients (added over the batch in a fixed order) and, weighted
# by $w_c$, the two means. Below, the oracle's backward is rebuilt from per-plane sums in float64.

# %%
xg, wg, bg, dyg = (rng.standard_normal(s) for s in ((2, 4, 3, 5), (4,), (4,), (2, 4, 3, 5)))
out_gn, gn_cache = layers.group_norm_fwd(xg, wg, bg, 1)
grads_gn = layers.group_norm_bwd(dyg, gn_cache)
xhat = gn_cache["xhat"].reshape(2, 4, 15)
rstd = gn_cache["rstd"].reshape(2, 1, 1)
sum_dy = dyg.reshape(2, 4, 15).sum(axis=2)                     # (sample, channel): one warp each
sum_dy_xhat = (dyg.reshape(2, 4, 15) * xhat).sum(axis=2)
n = 4 * 15
mean_g = (wg * sum_dy).sum(axis=1)[:, None, None] / n
mean_g_xhat = (wg * sum_dy_xhat).sum(axis=1)[:, None, None] / n
dx_planes = rstd * (dyg.reshape(2, 4, 15) * wg[None, :, None] - mean_g - xhat * mean_g_xhat)
errs = [rel_err(dx_planes.reshape(xg.shape), grads_gn["x"]), rel_err(sum_dy_xhat.sum(axis=0), grads_gn["weight"]),
        rel_err(sum_dy.sum(axis=0), grads_gn["bias"])]
print("group norm backward from plane sums vs oracle (dx, dweight, dbias): " + ", ".join(f"{e:.1e}" for e in errs))
assert max(errs) <= tolerance("float64", "two_views")

# %% [markdown]
# On an H100 (2026-11-27, `benchmarks/RESULTS.md`, "Group normalisation kernels") the planes
# run the forward at 19-41% of the copy floor at SparX-Mamba-T's large maps, against 12-16%
# for PyTorch. In a training step they take about 6 ms of GPU time, against PyTorch's 11 ms.
# At the small maps the call's host time dominates, and there PyTorch's own call is cheaper.

# %% [markdown]
# ## Timings
#
# Under the simulator, times measure Python threads, not a GPU: they are not printed. On a
# GPU the scan rows above are (batch 32, 1,536 channels, L = 512) and the SS2D rows a
# 28x28 map with 2 x 96 channels; inputs are on the device before timing, and the best of
# three calls is shown (the first call compiles). The NumPy row is the float64 oracle on
# the CPU, for scale.
#
# (GPU machines with NumPy 2.5: numba-cuda 0.30 cannot compile kernels there, because
# `np.row_stack` was removed; install NumPy 2.4.x next to it.)

# %%
if ON_GPU:
    scan_bytes = 3 * u.nbytes + B.nbytes + C.nbytes            # read u, delta, B, C; write y
    ss2d_bytes = 2 * xm.nbytes + deltam.nbytes + Bm.nbytes + Cm.nbytes
    for name, seconds in timings.items():
        moved = ss2d_bytes if "ss2d" in name else scan_bytes
        print(f"{name:>32s}: {seconds * 1e3:9.3f} ms   {moved / seconds / 1e9:8.1f} GB/s effective")
else:
    print("CUDA simulator: correctness only (timings of simulated threads mean nothing).")

# %% [markdown]
# ## Summary
#
# - The naive thread-per-row kernel is a line-by-line port of the NumPy loop.
# - Coalescing is a layout decision: time-major arrays make each step's loads contiguous.
# - Fusion removes whole passes through memory: the fused SS2D reads the map in scan order
#   by index arithmetic and writes every output once.
# - Reuse beats re-reading: the depthwise `strip` kernel loads each input row once per four
#   outputs, and its backward gets the input gradient from the forward kernel itself (the
#   convolution's adjoint is the flipped filter).
# - A fast kernel needs a cheap call: plans decide grids, modules and buffers once per shape,
#   so a call only allocates and launches.
# - Too few rows starve a GPU: per-sample statistics split into per-plane ones (a warp each)
#   and combined exactly (Chan's formula), never through $E[x^2] - E[x]^2$.
# - Every version, ours and the registered ones, is checked against the float64 oracle with
#   the kernel tolerance of `sparx_ref.tolerances`.
# - A Numba trap worth knowing: Numba types integer indices as signed 64-bit and, for every
#   access it cannot prove non-negative, emits Python's negative-index wrap-around (`a[-1]`)
#   check. In index-heavy kernels that is most of the code: the registry's `tiled_unsigned` and
#   `static_unsigned` rungs compute their indices in `np.uint64` (every literal too: Numba types
#   `uint64 op int64` as float64), and run 2.4-3.4x faster than the same kernels with signed
#   indices (`cuda.compile_ptx` shows it without a GPU: count the `shr.s64` sign tests).
