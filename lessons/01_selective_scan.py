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
# # Lesson 1 — The selective scan
#
# SparX-Mamba's token mixer is VMamba's SS2D, and the heart of SS2D is Mamba's **selective
# scan** (the "S6" recurrence). In this lesson we
#
# 1. write down the continuous state-space model and its discretisation,
# 2. run the recurrence by hand and check it against the oracle
#    `sparx_ref.ref.scan.selective_scan_fwd`,
# 3. see three *views* of the same function (sequential, chunked, one big matrix) agree,
# 4. derive the backward pass by hand and check it numerically,
# 5. look at what happens when the gates are near 1 (long memory).
#
# Every claim is checked by an `assert`: if the notebook runs to the end, the claims hold.

# %%
import numpy as np
from matplotlib.figure import Figure

from sparx_ref.ref import scan
from sparx_ref.testing import numerical_vjp, rel_err
from sparx_ref.tolerances import tolerance

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. From a continuous system to a recurrence
#
# A linear state-space model maps an input signal $u(t)$ to an output $y(t)$ through a
# hidden state $h(t) \in \mathbb{R}^N$:
#
# $$h'(t) = A\,h(t) + B\,u(t), \qquad y(t) = C\,h(t) + D\,u(t).$$
#
# Mamba uses a diagonal, negative $A$ (so every state component decays). Sampling with step
# $\Delta$ and holding $u$ constant over the step (zero-order hold) gives, per state index
# $n$,
#
# $$h_t = \underbrace{e^{\Delta A}}_{\bar A}\, h_{t-1} + \underbrace{\frac{e^{\Delta A} - 1}{A}\, B}_{\bar B}\, u_t .$$
#
# Mamba keeps the exact $\bar A = e^{\Delta A}$ but simplifies $\bar B \approx \Delta B$ (the
# first-order term). **Selective** means $\Delta$, $B$ and $C$ depend on the input: each time
# step $t$ has its own $\Delta_t$, $B_t$, $C_t$. The scan computes
#
# $$h_t = e^{\Delta_t A} \odot h_{t-1} + \Delta_t B_t u_t, \qquad y_t = \langle C_t, h_t\rangle + D u_t .$$
#
# Let us check that $\Delta B$ is the small-step limit of the exact $\bar B$.

# %%
A_scalar = -1.7
for dt in (1e-1, 1e-2, 1e-3):
    exact = (np.exp(dt * A_scalar) - 1) / A_scalar       # B-bar / B
    print(f"delta={dt:g}:  exact {exact:.6e}   delta {dt:.6e}   rel. diff {abs(exact - dt) / exact:.2e}")
    assert abs(exact - dt) / exact < abs(A_scalar) * dt  # first-order agreement

# %% [markdown]
# ## 2. The recurrence by hand vs the oracle
#
# The oracle's layout (mamba-ssm / VMamba): `u, delta (batch, KD, L)`, `A (KD, N)`,
# `B, C (batch, K, N, L)` shared by groups of `KD // K` channels (in SS2D a group is one scan
# direction), `D (KD,)`. With `delta_softplus=True` the step is
# $\Delta_t = \mathrm{softplus}(\delta_t + \text{delta\_bias})$, which keeps it positive.

# %%
batch, K, Dg, N, L = 2, 2, 3, 4, 24
KD = K * Dg
u = rng.standard_normal((batch, KD, L))
delta = rng.standard_normal((batch, KD, L)) * 0.5
A = -np.exp(rng.standard_normal((KD, N)) * 0.5)          # negative real diagonal
B = rng.standard_normal((batch, K, N, L))
C = rng.standard_normal((batch, K, N, L))
D = rng.standard_normal(KD)
delta_bias = rng.standard_normal(KD) * 0.3


def softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def scan_by_hand(u, delta, A, B, C, D, delta_bias):
    """Five lines of maths: one channel at a time, one step at a time."""
    y = np.zeros_like(u)
    for b in range(u.shape[0]):
        for c in range(u.shape[1]):
            g = c // (u.shape[1] // B.shape[1])                # the B/C group of channel c
            h = np.zeros(A.shape[1])
            for t in range(u.shape[2]):
                dt = softplus(delta[b, c, t] + delta_bias[c])
                h = np.exp(dt * A[c]) * h + dt * B[b, g, :, t] * u[b, c, t]
                y[b, c, t] = C[b, g, :, t] @ h + D[c] * u[b, c, t]
    return y


y_hand = scan_by_hand(u, delta, A, B, C, D, delta_bias)
y_ref, cache = scan.selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
err = rel_err(y_ref, y_hand)
print("hand-written loop vs oracle: relative error", err)
assert err <= tolerance("float64", "two_views")

# %% [markdown]
# ## 3. Three views of one function
#
# **Sequential** (above): one step at a time, $O(L)$ steps.
#
# **Materialised matrix**: unroll the recurrence. With $a_r = \Delta_r A$,
#
# $$y_t = \sum_{s \le t} \underbrace{\sum_n C_t[n]\, e^{\sum_{r=s+1}^{t} a_r[n]}\, \Delta_s B_s[n]}_{M[t, s]}\; u_s + D u_t ,$$
#
# so the scan is multiplication by a lower-triangular $L\times L$ matrix $M$ per channel:
# attention-like, with a causal mask and a decay instead of a softmax. The exponent is a
# *segment sum* $\sum_{r\in(s,t]} a_r \le 0$, computed directly (never as a ratio of two
# cumulative exponentials, which underflows).
#
# **Chunked**: cut $L$ into chunks; inside a chunk use the matrix form, and pass the state
# $h$ from one chunk to the next (the "state passing" of Mamba-2's SSD algorithm). Any chunk
# size gives the same answer.

# %%
y_mat = scan.selective_scan_materialized(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
errors = {"materialised": rel_err(y_mat, y_ref)}
for chunk in (1, 5, 8, 24, 100):
    y_chunk = scan.selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus=True,
                                          chunk_size=chunk)
    errors[f"chunked, chunk {chunk}"] = rel_err(y_chunk, y_ref)
for name, e in errors.items():
    print(f"{name:>20s} vs sequential: {e:.2e}")
assert max(errors.values()) <= tolerance("float64", "two_views")

M = scan.scan_matrix(delta, A, B, C, delta_bias, delta_softplus=True)   # (batch, KD, L, L)
assert M.shape == (batch, KD, L, L)
assert np.all(np.triu(M[0, 0], k=1) == 0), "M is causal: zero above the diagonal"
assert rel_err(np.einsum("bcts,bcs->bct", M, u) + D[:, None] * u, y_ref) <= tolerance("float64", "two_views")

fig = Figure(figsize=(8, 3.2), layout="constrained")
axes = fig.subplots(1, 2)
im = axes[0].imshow(M[0, 0], cmap="RdBu_r", vmin=-np.abs(M[0, 0]).max(), vmax=np.abs(M[0, 0]).max())
axes[0].set_title("M[t, s] of one channel (lower triangular)")
axes[0].set_xlabel("input step s")
axes[0].set_ylabel("output step t")
fig.colorbar(im, ax=axes[0])
axes[1].plot(np.abs(M[0, 0, -1]), "o-")
axes[1].set_yscale("log")
axes[1].set_title("|M[L-1, s]|: how far back the last output looks")
axes[1].set_xlabel("s")
fig

# %% [markdown]
# ## 4. The backward pass, by hand
#
# Given $\partial \mathcal{L}/\partial y_t = \bar y_t$, run the recurrence **backwards**.
# The state $h_t$ influences $y_t$ directly and $h_{t+1}$ through the decay, so
#
# $$\bar h_t = C_t\,\bar y_t + e^{\Delta_{t+1} A} \odot \bar h_{t+1}, \qquad \bar h_{L} = 0 .$$
#
# Then every input of step $t$ reads its gradient off $\bar h_t$:
#
# $$\bar u_t = \langle \Delta_t B_t, \bar h_t\rangle + D\,\bar y_t, \qquad
# \bar C_t = \bar y_t\, h_t, \qquad \bar B_t = \Delta_t u_t\, \bar h_t,$$
# $$\bar\Delta_t = \langle \bar h_t,\; A\, e^{\Delta_t A} h_{t-1} + B_t u_t \rangle, \qquad
# \bar A = \sum_t \bar h_t \odot \Delta_t\, e^{\Delta_t A} h_{t-1}.$$
#
# (Then the chain rule through the softplus for $\delta$ and delta_bias, and sums over the
# channels of a group for B and C.) We write it for one channel, without softplus, and check
# it three ways: against the oracle's `selective_scan_bwd`, and against central finite
# differences.

# %%
def one_channel_fwd(u, dt, A, B, C, D):
    """u, dt (L,), A (N,), B, C (N, L), D scalar -> y (L,), states (L+1, N)."""
    L, N = u.shape[0], A.shape[0]
    h = np.zeros((L + 1, N))                                       # h[0] = 0, h[t+1] = state after step t
    y = np.zeros(L)
    for t in range(L):
        h[t + 1] = np.exp(dt[t] * A) * h[t] + dt[t] * B[:, t] * u[t]
        y[t] = C[:, t] @ h[t + 1] + D * u[t]
    return y, h


def one_channel_bwd(dy, u, dt, A, B, C, D, h):
    L, N = u.shape[0], A.shape[0]
    grads = {k: np.zeros_like(v) for k, v in dict(u=u, dt=dt, A=A, B=B, C=C).items()}
    grads["D"] = float(dy @ u)
    dh = np.zeros(N)
    for t in reversed(range(L)):
        dh = C[:, t] * dy[t] + dh                                  # dh now holds d loss / d h_t
        decay = np.exp(dt[t] * A)
        grads["C"][:, t] = dy[t] * h[t + 1]
        grads["u"][t] = dt[t] * B[:, t] @ dh + D * dy[t]
        grads["B"][:, t] = dt[t] * u[t] * dh
        grads["dt"][t] = dh @ (A * decay * h[t] + B[:, t] * u[t])
        grads["A"] += dh * dt[t] * decay * h[t]
        dh = decay * dh                                            # carried to step t-1
    return grads


L1, N1 = 12, 3
u1 = rng.standard_normal(L1)
dt1 = np.exp(rng.standard_normal(L1) * 0.5) * 0.3
A1 = -np.exp(rng.standard_normal(N1) * 0.5)
B1 = rng.standard_normal((N1, L1))
C1 = rng.standard_normal((N1, L1))
D1 = 0.7
dy1 = rng.standard_normal(L1)

y1, h1 = one_channel_fwd(u1, dt1, A1, B1, C1, D1)
by_hand = one_channel_bwd(dy1, u1, dt1, A1, B1, C1, D1, h1)

# the oracle on the same problem (batch 1, one channel, one group, no softplus)
y1_ref, cache1 = scan.selective_scan_fwd(u1[None, None], dt1[None, None], A1[None], B1[None, None],
                                         C1[None, None], np.array([D1]))
oracle = scan.selective_scan_bwd(dy1[None, None], cache1)
assert rel_err(y1, y1_ref[0, 0]) <= tolerance("float64", "two_views")
pairs = {"u": (by_hand["u"], oracle["u"][0, 0]), "dt": (by_hand["dt"], oracle["delta"][0, 0]),
         "A": (by_hand["A"], oracle["A"][0]), "B": (by_hand["B"], oracle["B"][0, 0]),
         "C": (by_hand["C"], oracle["C"][0, 0]), "D": (np.array([by_hand["D"]]), oracle["D"])}
for name, (mine, theirs) in pairs.items():
    e = rel_err(mine, theirs)
    print(f"d{name}: by hand vs oracle {e:.1e}")
    assert e <= tolerance("float64", "two_views")

# finite differences of sum(y * dy) with respect to each input
for name, x in dict(u=u1, dt=dt1, A=A1, B=B1, C=C1).items():
    numeric = numerical_vjp(lambda: one_channel_fwd(u1, dt1, A1, B1, C1, D1)[0], x, dy1)
    e = rel_err(by_hand[name], numeric)
    print(f"d{name}: by hand vs finite differences {e:.1e}")
    assert e <= tolerance("float64", "finite_diff")

# %% [markdown]
# The oracle's full backward (all channels, groups, softplus, delta_bias) passes the same
# finite-difference check; here on the small problem of section 2, for `delta` and `B`:

# %%
# contiguous copies: finite differences perturb the arrays in place
small = dict(u=u[:1, :, :6].copy(), delta=delta[:1, :, :6].copy(), B=B[:1, :, :, :6].copy(),
             C=C[:1, :, :, :6].copy())


def f_small():
    return scan.selective_scan_fwd(small["u"], small["delta"], A, small["B"], small["C"], D, delta_bias,
                                   delta_softplus=True)[0]


dy_small = rng.standard_normal((1, KD, 6))
g_small = scan.selective_scan_bwd(dy_small, scan.selective_scan_fwd(
    small["u"], small["delta"], A, small["B"], small["C"], D, delta_bias, delta_softplus=True)[1])
for name in ("delta", "B"):
    e = rel_err(g_small[name], numerical_vjp(f_small, small[name], dy_small))
    print(f"oracle d{name} vs finite differences: {e:.1e}")
    assert e <= tolerance("float64", "finite_diff")

# %% [markdown]
# ## 5. Gates near 1: long memory, and why the formulas must be stable
#
# The "gate" of step $t$ is $\bar A_t = e^{\Delta_t A} \in (0, 1)$. When $\Delta_t A \to 0$ the
# gate tends to 1: the state forgets nothing, and $h_t$ becomes a plain running sum of
# $\Delta_s B_s u_s$. When $\Delta_t A$ is very negative the gate tends to 0 and only the
# current input matters.
#
# A tempting shortcut for the matrix view is $e^{\sum_{r\le t} a_r} / e^{\sum_{r\le s} a_r}$
# (a ratio of cumulative products). With strong decay over a long sequence both factors
# underflow to 0 and the ratio is `0/0 = nan`, although every true entry is an ordinary
# number. The segment sum used by the oracle never forms those factors.

# %%
L2 = 400
u2 = rng.standard_normal((1, 1, L2))
B2 = rng.standard_normal((1, 1, 1, L2))
C2 = np.ones((1, 1, 1, L2))
A2 = np.array([[-1.0]])

# gates near 1: delta * A = -1e-9 -> the scan is (almost exactly) a cumulative sum of delta B u
tiny = np.full((1, 1, L2), 1e-9)
y_tiny = scan.selective_scan(u2, tiny, A2, B2, C2)
running_sum = np.cumsum(1e-9 * B2[0, 0, 0] * u2[0, 0])
assert rel_err(y_tiny[0, 0], running_sum) < 1e-6
print("gates near 1: y equals the running sum of delta*B*u (rel. err",
      f"{rel_err(y_tiny[0, 0], running_sum):.1e})")

# strong decay: delta * A = -5 per step; after 400 steps exp(-2000) underflows
strong = np.full((1, 1, L2), 5.0)
M_stable = scan.scan_matrix(strong, A2, B2, C2)[0, 0]
cum = np.exp(np.cumsum(strong[0, 0] * A2[0, 0]))                    # underflows to 0.0
with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    M_naive = np.tril(np.outer(cum, 1 / cum)) * (strong[0, 0] * B2[0, 0, 0])[None, :]
print("naive ratio of cumulative exps: finite entries?", bool(np.all(np.isfinite(M_naive))))
print("segment-sum matrix:             finite entries?", bool(np.all(np.isfinite(M_stable))))
assert not np.all(np.isfinite(M_naive))
assert np.all(np.isfinite(M_stable))
# and the stable matrix still agrees with the sequential scan
assert rel_err(M_stable @ u2[0, 0], scan.selective_scan(u2, strong, A2, B2, C2)[0, 0]) \
    <= tolerance("float64", "two_views")

# %% [markdown]
# **In float32**, gates near 1 are where the kernels are most fragile: `exp(delta*A)` rounds
# to exactly 1.0 once $|\Delta A| < 2^{-24}$, and a long sum accumulates rounding error. The
# oracle accepts float32 too, so we can measure the effect against float64:

# %%
gate_logs = [-1e-2, -1e-4, -1e-6, -1e-8]
L3 = 2048
u3 = rng.standard_normal((1, 1, L3))
B3 = rng.standard_normal((1, 1, 1, L3))
C3 = rng.standard_normal((1, 1, 1, L3))
errs32 = []
for a in gate_logs:
    dt3 = np.full((1, 1, L3), 1.0)
    A3 = np.array([[a]])
    y64 = scan.selective_scan(u3, dt3, A3, B3, C3)
    y32 = scan.selective_scan(*(x.astype(np.float32) for x in (u3, dt3, A3, B3, C3)))
    assert y32.dtype == np.float32
    errs32.append(rel_err(y32, y64))
    print(f"delta*A = {a:g}: float32 vs float64 relative error {errs32[-1]:.1e}")
assert max(errs32) < 1e-4, "float32 stays usable even with gates near 1 at L = 2048"

# %% [markdown]
# ## Summary
#
# - The selective scan is a linear recurrence with input-dependent step $\Delta_t$ and
#   projections $B_t$, $C_t$; $e^{\Delta A}$ is the gate.
# - Sequential, chunked and materialised views agree to float64 round-off; the matrix view
#   shows the scan as causal, decaying "attention".
# - The backward is the same recurrence run in reverse; our 15-line derivation matches the
#   oracle and finite differences.
# - Segment sums keep the matrix view finite where ratios of cumulative exponentials fail.
