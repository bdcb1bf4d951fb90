"""The selective scan (Mamba's S6 recurrence), forward and hand-derived backward.

Three independent views of one function, for learners and as oracles for each other:

- :func:`selective_scan_fwd` / :func:`selective_scan_bwd`: the sequential recurrence, one
  step per time index (the loop runs over L only; batch, channels and state are vectorised).
- :func:`selective_scan_chunked`: the sequence cut into chunks; inside a chunk the output is
  a small matrix product built from segment sums, and the state is carried across chunks
  (the "state passing" view of Mamba-2's SSD algorithm).
- :func:`selective_scan_materialized`: the whole map ``u -> y`` written as one lower-triangular
  ``L x L`` matrix per channel (:func:`scan_matrix`), so ``y = M u + D u``.

Notation (mamba-ssm's ``selective_scan_ref`` with grouped B/C, as VMamba calls it):

- ``u``, ``delta``: ``(batch, KD, L)``; ``KD = K * Dg`` channels in ``K`` groups of ``Dg``.
- ``A``: ``(KD, N)``, the (negative) diagonal state matrix of every channel, ``N = d_state``.
- ``B``, ``C``: ``(batch, K, N, L)``; channel ``c`` uses group ``c // Dg`` (input-dependent,
  shared by the ``Dg`` channels of a group; in SS2D a group is a scan direction).
- ``D``, ``delta_bias``: ``(KD,)`` or None.

Equations, per channel ``c`` (group ``k = c // Dg``) and state index ``n``::

    delta'_t = softplus(delta_t + delta_bias)   if delta_softplus   (PyTorch softplus, threshold 20)
             = delta_t + delta_bias             otherwise
    h_t[n]   = exp(delta'_t A[n]) h_{t-1}[n] + delta'_t B_t[n] u_t,     h_0 = 0
    y_t      = sum_n C_t[n] h_t[n] + D u_t

Everything is computed in the input dtype (float64, the oracle dtype, or float32).
Upstream: ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` (the same maths with
B, C of shape (batch, G, N, L)), and the CUDA kernel ``selective_scan_cuda`` used by VMamba.
"""
from __future__ import annotations

import numpy as np

from .._validate import as_float_array, check_divisible, check_same_dtype, check_shape
from .layers import softplus_bwd as _softplus_bwd, softplus_fwd as _softplus_fwd

__all__ = [
    "selective_scan_fwd",
    "selective_scan_bwd",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_materialized",
    "scan_matrix",
]


# ----------------------------------------------------------------------------------------
# input checking and the shared preamble of all three views
# ----------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, delta_bias, u_name="u"):
    """Validate the scan inputs; return (batch, KD, L, K, N, dtype)."""
    u = as_float_array(u_name, u, ndim=3)
    delta = as_float_array("delta", delta, ndim=3)
    A = as_float_array("A", A, ndim=2)
    B = as_float_array("B", B, ndim=4)
    C = as_float_array("C", C, ndim=4)
    if D is not None:
        D = as_float_array("D", D, ndim=1)
    if delta_bias is not None:
        delta_bias = as_float_array("delta_bias", delta_bias, ndim=1)
    arrays = {u_name: u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    dtype = check_same_dtype(**arrays)
    batch, KD, L = u.shape
    if L < 1 or KD < 1 or batch < 1:
        raise ValueError(f"{u_name} must have a non-empty shape (batch, KD, L), got {u.shape}")
    check_shape("delta", delta, (batch, KD, L))
    N = A.shape[1]
    check_shape("A", A, (KD, None))
    if N < 1:
        raise ValueError(f"A must have shape (KD, N) with N >= 1, got {A.shape}")
    K = B.shape[1]
    if K < 1:
        raise ValueError(f"B must have shape (batch, K, N, L) with K >= 1, got {B.shape}")
    check_shape("B", B, (batch, K, N, L))
    check_divisible(f"{u_name}.shape[1] (KD)", KD, K, "B.shape[1] (K, the number of B/C groups)")
    check_shape("C", C, (batch, K, N, L))
    if D is not None:
        check_shape("D", D, (KD,))
    if delta_bias is not None:
        check_shape("delta_bias", delta_bias, (KD,))
    return batch, KD, L, K, N, dtype


def _effective_delta(delta, delta_bias, delta_softplus):
    """delta' = softplus(delta + bias) or delta + bias; also returns the softplus cache (or None).

    softplus is the shared ``layers.softplus_fwd`` (PyTorch's: beta 1, identity above 20)."""
    z = delta if delta_bias is None else delta + delta_bias[:, None]
    if not delta_softplus:
        return z, None
    return _softplus_fwd(z)


def _expand_groups(BC: np.ndarray, KD: int) -> np.ndarray:
    """(batch, K, N, L) -> (batch, KD, N, L): channel c reads group c // (KD // K)."""
    batch, K, N, L = BC.shape
    return np.repeat(BC, KD // K, axis=1)


# ----------------------------------------------------------------------------------------
# view 1: the sequential recurrence (forward + hand-derived backward)
# ----------------------------------------------------------------------------------------
def selective_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan, sequential form. Returns ``(y, cache)``.

    Shapes: ``u, delta (batch, KD, L)``, ``A (KD, N)``, ``B, C (batch, K, N, L)`` with K dividing
    KD (channel c uses group ``c // (KD // K)``), ``D, delta_bias (KD,)`` or None;
    ``y (batch, KD, L)`` in the input dtype. Equations in the module docstring.

    Internally every per-step tensor is laid out time-major, ``(L, batch, K, Dg, N)``, so the
    one Python loop (over t) touches contiguous slices; the gates ``exp(delta' A)`` and the
    inputs ``delta' B u`` are computed for all t at once before the loop.
    Mirrors ``selective_scan_ref`` of mamba-ssm (grouped B/C).
    """
    batch, KD, L, K, N, dtype = _check_inputs(u, delta, A, B, C, D, delta_bias)
    Dg = KD // K
    dt, softplus_cache = _effective_delta(delta, delta_bias, delta_softplus)   # (batch, KD, L)

    # time-major views: (L, batch, K, Dg) and (L, batch, K, 1, N)
    dt_t = np.ascontiguousarray(np.moveaxis(dt.reshape(batch, K, Dg, L), -1, 0))
    u_t = np.ascontiguousarray(np.moveaxis(u.reshape(batch, K, Dg, L), -1, 0))
    B_t = np.ascontiguousarray(np.moveaxis(B, -1, 0))[:, :, :, None, :]
    C_t = np.ascontiguousarray(np.moveaxis(C, -1, 0))[:, :, :, None, :]
    A_g = A.reshape(K, Dg, N)

    gate = np.exp(dt_t[..., None] * A_g)                                  # (L, batch, K, Dg, N)
    H = (dt_t * u_t)[..., None] * B_t                                     # delta' B u, then h
    for t in range(1, L):                                                 # h_t = gate_t h_{t-1} + dBu_t
        H[t] += gate[t] * H[t - 1]

    y_t = (H * C_t).sum(-1)                                               # <C_t, h_t>  (L, b, K, Dg)
    y = np.moveaxis(y_t, 0, -1).reshape(batch, KD, L)
    if D is not None:
        y = y + D[:, None] * u
    y = y.astype(dtype, copy=False)
    cache = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias,
                 softplus_cache=softplus_cache, dt_t=dt_t, u_t=u_t, gate=gate, H=H,
                 shape=(batch, KD, L, K, N))
    return y, cache


def selective_scan_bwd(dy, cache):
    """Backward of :func:`selective_scan_fwd`: ``dy (batch, KD, L)`` -> dict of gradients.

    Keys ``"u", "delta", "A", "B", "C", "D", "delta_bias"`` (None for inputs given as None).

    Adjoint recurrence, run backwards in time, with ``g_t = dLoss/dh_t`` (the *total*
    gradient of the state, which reaches h_t through y_t and through h_{t+1})::

        g_{L-1} = dy_{L-1} C_{L-1}
        g_t     = dy_t C_t + gate_{t+1} g_{t+1}

    then, all t at once (``gate_t = exp(delta'_t A)``, ``h_{-1} = 0``)::

        dlog_gate_t = g_t h_{t-1} gate_t                  (gradient of delta'_t A)
        ddelta'_t   = sum_n dlog_gate_t A + sum_n g_t B_t u_t
        dA          = sum_{batch,t} dlog_gate_t delta'_t
        du_t        = sum_n g_t delta'_t B_t + D dy_t
        dB_t        = sum_{channels of the group} g_t delta'_t u_t
        dC_t        = sum_{channels of the group} dy_t h_t
        ddelta      = ddelta' * softplus'(delta + bias)   (or ddelta' without softplus)
        ddelta_bias = sum_{batch,t} ddelta,   dD = sum_{batch,t} dy u

    No cumulative products are ever divided out.
    """
    batch, KD, L, K, N = cache["shape"]
    Dg = KD // K
    u, A, B, C, D = cache["u"], cache["A"], cache["B"], cache["C"], cache["D"]
    dy = as_float_array("dy", dy, ndim=3, dtype=u.dtype)
    check_shape("dy", dy, (batch, KD, L))
    dt_t, u_t, gate, H = cache["dt_t"], cache["u_t"], cache["gate"], cache["H"]

    dy_t = np.ascontiguousarray(np.moveaxis(dy.reshape(batch, K, Dg, L), -1, 0))   # (L, b, K, Dg)
    B_t = np.ascontiguousarray(np.moveaxis(B, -1, 0))[:, :, :, None, :]            # (L, b, K, 1, N)
    C_t = np.ascontiguousarray(np.moveaxis(C, -1, 0))[:, :, :, None, :]

    G = dy_t[..., None] * C_t                                             # dy_t C_t, then g_t
    for t in range(L - 2, -1, -1):
        G[t] += gate[t + 1] * G[t + 1]

    H_prev = np.empty_like(H)                                             # h_{t-1}, h_{-1} = 0
    H_prev[0] = 0
    H_prev[1:] = H[:-1]
    dlog_gate = G * H_prev * gate                                         # (L, b, K, Dg, N)
    A_g = A.reshape(K, Dg, N)
    GB = G * B_t                                                          # g_t B_t
    ddt_t = np.einsum("tbkdn,kdn->tbkd", dlog_gate, A_g) + GB.sum(-1) * u_t
    dA = np.einsum("tbkdn,tbkd->kdn", dlog_gate, dt_t).reshape(KD, N)
    du_t = GB.sum(-1) * dt_t
    dB_t = np.einsum("tbkdn,tbkd->tbkn", G, dt_t * u_t)
    dC_t = np.einsum("tbkdn,tbkd->tbkn", H, dy_t)

    def channel_major(x_t):  # (L, b, K, Dg) -> (b, KD, L)
        return np.moveaxis(x_t, 0, -1).reshape(batch, KD, L)

    du = channel_major(du_t)
    ddt = channel_major(ddt_t)
    dB = np.moveaxis(dB_t, 0, -1)
    dC = np.moveaxis(dC_t, 0, -1)
    dD = None
    if D is not None:
        du = du + D[:, None] * dy
        dD = np.einsum("bcl,bcl->c", dy, u)
    sp = cache["softplus_cache"]
    ddelta = ddt if sp is None else _softplus_bwd(ddt, sp)["x"]
    ddelta_bias = None if cache["delta_bias"] is None else ddelta.sum(axis=(0, 2))
    dtype = u.dtype
    out = {"u": du, "delta": ddelta, "A": dA, "B": dB, "C": dC, "D": dD, "delta_bias": ddelta_bias}
    return {k: (None if v is None else np.ascontiguousarray(v, dtype=dtype)) for k, v in out.items()}


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Convenience: the output of :func:`selective_scan_fwd` only."""
    return selective_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)[0]


# ----------------------------------------------------------------------------------------
# view 2: chunked (segment sums inside a chunk, state passed between chunks)
# ----------------------------------------------------------------------------------------
def selective_scan_chunked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                           chunk_size=64):
    """Selective scan computed chunk by chunk; returns ``y (batch, KD, L)``.

    Same inputs and result as :func:`selective_scan_fwd`. Cut L into chunks of
    ``chunk_size`` (the last may be shorter). With ``a_t = delta'_t A`` (per channel and n),
    ``S_t`` its cumulative sum *inside the chunk* and ``h_in`` the state entering the chunk::

        h_t = exp(S_t) h_in + sum_{s <= t in chunk} exp(S_t - S_s) delta'_s B_s u_s
        y_t = <C_t, h_t> + D u_t

    The exponent ``S_t - S_s`` (a segment sum of a over (s, t]) is formed only where
    ``s <= t`` and is <= 0, so nothing overflows; no ratio of cumulative exps is taken.
    The chunk's last state becomes the next chunk's ``h_in``.
    """
    batch, KD, L, K, N, dtype = _check_inputs(u, delta, A, B, C, D, delta_bias)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dt, _ = _effective_delta(delta, delta_bias, delta_softplus)
    Bx = _expand_groups(B, KD)                                            # (b, KD, N, L)
    Cx = _expand_groups(C, KD)
    y = np.empty((batch, KD, L), dtype=dtype)
    h = np.zeros((batch, KD, N), dtype=dtype)
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        Q = stop - start
        dt_c, u_c = dt[:, :, start:stop], u[:, :, start:stop]              # (b, KD, Q)
        a = dt_c[:, :, None, :] * A[None, :, :, None]                       # (b, KD, N, Q)
        S = np.cumsum(a, axis=-1)
        causal = np.tril(np.ones((Q, Q), dtype=bool))                      # [t, s]: s <= t
        seg = np.where(causal, S[..., :, None] - S[..., None, :], 0.0)    # (b, KD, N, Q, Q)
        decay = np.where(causal, np.exp(seg), 0.0)
        x_in = dt_c[:, :, None, :] * Bx[..., start:stop] * u_c[:, :, None, :]   # delta' B u (b, KD, N, Q)
        H_c = np.einsum("bcnts,bcns->bcnt", decay, x_in) + np.exp(S) * h[..., None]
        y[:, :, start:stop] = np.einsum("bcnt,bcnt->bct", Cx[..., start:stop], H_c)
        h = H_c[..., -1]
    if D is not None:
        y = y + D[:, None] * u
    return y.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------
# view 3: the materialised L x L matrix
# ----------------------------------------------------------------------------------------
def _segment_sum(a: np.ndarray) -> np.ndarray:
    """Segment sums ``seg[..., t, s] = sum_{r in (s, t]} a[..., r]`` for ``s <= t``; 0 elsewhere.

    a: (..., L) -> (..., L, L). Built by a cumulative sum down each column of a masked copy of
    ``a`` (Mamba-2's stable segsum), so every entry is a sum of the few terms it needs rather
    than a difference of two long prefix sums.
    """
    L = a.shape[-1]
    strictly_below = np.tril(np.ones((L, L), dtype=bool), k=-1)          # [t, s]: r = t > s
    terms = np.where(strictly_below, a[..., :, None], 0.0)                # terms[t, s] = a_t if t > s
    return np.cumsum(terms, axis=-2)                                      # 0 above the diagonal


def scan_matrix(delta, A, B, C, delta_bias=None, delta_softplus=False):
    """The scan as a matrix: ``M (batch, KD, L, L)`` with, for ``s <= t``::

        M[t, s] = sum_n C_t[n] exp(sum_{r in (s, t]} delta'_r A[n]) delta'_s B_s[n]

    and 0 above the diagonal, so that ``y = M u + D u`` (per channel, ``y[t] = sum_s M[t, s] u[s]``).
    Shapes as in :func:`selective_scan_fwd` (delta (batch, KD, L), A (KD, N), B, C
    (batch, K, N, L)). The exponent is a segment sum (:func:`_segment_sum`), always <= 0 for A <= 0.
    """
    delta = as_float_array("delta", delta, ndim=3)
    batch, KD, L = delta.shape
    _check_inputs(delta, delta, A, B, C, None, delta_bias, u_name="delta")
    dt, _ = _effective_delta(delta, delta_bias, delta_softplus)
    Bx = _expand_groups(B, KD)                                            # (b, KD, N, L)
    Cx = _expand_groups(C, KD)
    a = dt[:, :, None, :] * A[None, :, :, None]                           # (b, KD, N, L)
    causal = np.tril(np.ones((L, L), dtype=bool))
    decay = np.where(causal, np.exp(_segment_sum(a)), 0.0)                # (b, KD, N, L, L)
    M = np.einsum("bcnt,bcnts,bcns->bcts", Cx, decay, dt[:, :, None, :] * Bx)
    return M.astype(delta.dtype, copy=False)


def selective_scan_materialized(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Selective scan as ``y = M u + D u`` with ``M = scan_matrix(...)``; returns ``y (batch, KD, L)``.

    O(L^2) memory and time: for teaching and for checking the other views on short and
    medium sequences only.
    """
    batch, KD, L, K, N, dtype = _check_inputs(u, delta, A, B, C, D, delta_bias)
    M = scan_matrix(delta, A, B, C, delta_bias, delta_softplus)
    y = np.einsum("bcts,bcs->bct", M, u)
    if D is not None:
        y = y + D[:, None] * u
    return y.astype(dtype, copy=False)
