"""Swin (shifted-)window attention in NumPy, with hand-derived backward passes.

Mirrors microsoft/Swin-Transformer ``models/swin_transformer.py``: ``window_partition``,
``window_reverse``, ``WindowAttention.forward``, the shift/partition/reverse/un-shift part of
``SwinTransformerBlock.forward``, the ``attn_mask`` and ``relative_position_index`` buffers
and the 2x2 gather of ``PatchMerging`` (spec ``docs/spec/swin.md`` sections 5-9 and 13).

Notation (spec): ``B`` batch, ``H, W`` token grid, ``C`` width, ``heads`` = nH, ``hd = C/heads``
head width, ``M`` window side actually used, ``N = M*M`` tokens per window,
``nW = (H/M)*(W/M)`` windows per image, ``Bw = B*nW`` windows in a batch, ``s`` the shift.

Layouts (spec sections 2 and 6):

- tokens ``(B, H*W, C)``, token index ``h*W + w`` (row-major); grids ``(B, H, W, C)``;
- windows ``(Bw, N, C)``: window index ``b*nW + wr*(W/M) + wc`` (batch-major, then window
  rows, then window columns), in-window token index ``r*M + c``.

Kinds of functions:

- ``*_fwd`` returns ``(out, cache)`` and ``*_bwd(dout, cache)`` returns a dict of gradients;
- pure data-movement ops (partition, reverse, shift, patch-merge gather) return the array and
  their backward is the adjoint op named in their docstring;
- buffer builders (``relative_position_index``, ``shifted_window_mask``) are constants and
  receive no gradient.
"""
from __future__ import annotations

import numbers

import numpy as np

from .._validate import as_float_array, check_divisible, check_same_dtype, check_shape
from .layers import linear_bwd, linear_fwd

__all__ = [
    "window_attention_fwd", "window_attention_bwd",
    "window_partition", "window_reverse", "cyclic_shift",
    "relative_position_index", "relative_position_bias_fwd", "relative_position_bias_bwd",
    "shifted_window_mask", "patch_merge_gather", "patch_merge_scatter",
    "window_msa_fwd", "window_msa_bwd", "WINDOW_MSA_PARAM_KEYS",
]

MASK_VALUE = -100.0  # the released code's value; not -inf (spec section 7)


# --------------------------------------------------------------------------------------
# small validation helpers
# --------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_array(name: str, x, ndim: int) -> np.ndarray:
    """Any-dtype ndarray of a given rank (data-movement ops also move integer label grids)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape} ({x.ndim} dimensions)")
    return x


def _check_grid_windows(H: int, W: int, M: int) -> None:
    check_divisible("H", H, M, "window_size M")
    check_divisible("W", W, M, "window_size M")


def _check_shift(shift: int, M: int) -> int:
    shift = _check_int("shift_size", shift)
    if not 0 <= shift < M:
        raise ValueError(f"shift_size must be in [0, window_size={M}), got {shift}")
    return shift


# --------------------------------------------------------------------------------------
# the attention core
# --------------------------------------------------------------------------------------
def window_attention_fwd(q, k, v, bias, mask=None, scale=None):
    """Multi-head attention inside every window, with relative-position bias and shift mask.

    Mirrors ``WindowAttention.forward`` from ``q, k, v`` on (after the qkv Linear).

    Args:
        q, k, v: ``(Bw, heads, N, hd)``, ``Bw = B*nW`` windows in batch-major order.
        bias: ``(heads, N, N)``, the gathered relative-position bias (see
            :func:`relative_position_bias_fwd`), the same for every window; [query, key].
        mask: ``(nW, N, N)`` of 0 / -100 (:func:`shifted_window_mask`) or None. It is added
            through the view ``(B, nW, heads, N, N)``: window ``b*nW + w`` gets ``mask[w]``.
        scale: multiplies ``q``; default ``hd ** -0.5``.

    Equations (per window and head)::

        A = (scale * q) k^T + bias (+ mask[w])      (N, N), [query i, key j]
        P = softmax_j(A)
        out = P v                                   (N, hd)

    Returns:
        ``out`` ``(Bw, heads, N, hd)`` and ``cache`` with ``cache["probs"]`` = P
        ``(Bw, heads, N, N)``.
    """
    q = as_float_array("q", q, ndim=4)
    dtype = q.dtype
    k = as_float_array("k", k, ndim=4)
    v = as_float_array("v", v, ndim=4)
    bias = as_float_array("bias", bias, ndim=3)
    if mask is not None:
        mask = as_float_array("mask", mask, ndim=3)
    check_same_dtype(q=q, k=k, v=v, bias=bias, mask=mask)
    Bw, heads, N, hd = q.shape
    check_shape("k", k, (Bw, heads, N, hd))
    check_shape("v", v, (Bw, heads, N, hd))
    check_shape("bias", bias, (heads, N, N))
    if mask is not None:
        nW = mask.shape[0]
        check_shape("mask", mask, (nW, N, N))
        check_divisible("Bw (q.shape[0])", Bw, nW, "nW (mask.shape[0])")
    if scale is None:
        scale = hd ** -0.5
    scale = float(scale)

    q_scaled = q * dtype.type(scale)
    logits = np.matmul(q_scaled, k.swapaxes(-1, -2))          # (Bw, heads, N, N)
    logits += bias                                            # broadcast over windows
    if mask is not None:
        # (Bw, heads, N, N) viewed as (B, nW, heads, N, N): mask[w] for every image b
        logits.reshape(Bw // nW, nW, heads, N, N)[...] += mask[None, :, None, :, :]
    logits -= logits.max(axis=-1, keepdims=True)              # stable softmax over keys
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.matmul(probs, v)                                 # (Bw, heads, N, hd)
    cache = {"q_scaled": q_scaled, "k": k, "v": v, "probs": probs, "scale": scale}
    return out, cache


def window_attention_bwd(dout, cache):
    """Backward of :func:`window_attention_fwd`.

    With ``dP = dout v^T`` the softmax backward is ``dA = P * (dP - sum_j(dP * P))``; then
    ``dq = scale * dA k``, ``dk = dA^T (scale * q)``, ``dv = P^T dout`` and
    ``dbias = sum over windows of dA``. The mask is a constant (no gradient).

    Args:
        dout: ``(Bw, heads, N, hd)``.

    Returns:
        ``{"q", "k", "v"}`` each ``(Bw, heads, N, hd)`` and ``"bias"`` ``(heads, N, N)``.
    """
    probs, v, k, q_scaled = cache["probs"], cache["v"], cache["k"], cache["q_scaled"]
    dout = as_float_array("dout", dout, ndim=4, dtype=v.dtype)
    check_shape("dout", dout, v.shape)
    dv = np.matmul(probs.swapaxes(-1, -2), dout)
    dprobs = np.matmul(dout, v.swapaxes(-1, -2))
    dlogits = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True))
    dq = np.matmul(dlogits, k) * v.dtype.type(cache["scale"])
    dk = np.matmul(dlogits.swapaxes(-1, -2), q_scaled)
    dbias = dlogits.sum(axis=0)
    return {"q": dq, "k": dk, "v": dv, "bias": dbias}


# --------------------------------------------------------------------------------------
# data movement: partition / reverse / cyclic shift / patch-merge gather
# --------------------------------------------------------------------------------------
def window_partition(x, M):
    """Cut a grid into non-overlapping ``M x M`` windows (mirrors ``window_partition``).

    Args:
        x: ``(B, H, W, C)``, any dtype; H and W divisible by M.
        M: window side.

    Returns:
        ``(B*nW, M*M, C)`` with window index ``b*nW + wr*(W/M) + wc`` and token index
        ``r*M + c``. Adjoint (and inverse): :func:`window_reverse`.
    """
    x = _check_array("x", x, 4)
    M = _check_int("M", M, minimum=1)
    B, H, W, C = x.shape
    _check_grid_windows(H, W, M)
    x = x.reshape(B, H // M, M, W // M, M, C)                 # (B, wr, r, wc, c, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)                         # (B, wr, wc, r, c, C)
    return np.ascontiguousarray(x).reshape(B * (H // M) * (W // M), M * M, C)


def window_reverse(windows, M, H, W):
    """Inverse (and adjoint) of :func:`window_partition` (mirrors ``window_reverse``).

    Args:
        windows: ``(B*nW, M*M, C)``; H, W: the grid, divisible by M.

    Returns:
        ``(B, H, W, C)``.
    """
    windows = _check_array("windows", windows, 3)
    M = _check_int("M", M, minimum=1)
    H = _check_int("H", H, minimum=1)
    W = _check_int("W", W, minimum=1)
    _check_grid_windows(H, W, M)
    Bw, N, C = windows.shape
    nW = (H // M) * (W // M)
    if N != M * M:
        raise ValueError(f"windows must have M*M={M * M} tokens per window (axis 1), got shape {windows.shape}")
    check_divisible("windows.shape[0]", Bw, nW, "nW = (H/M)*(W/M)")
    x = windows.reshape(Bw // nW, H // M, W // M, M, M, C)   # (B, wr, wc, r, c, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)                         # (B, wr, r, wc, c, C)
    return np.ascontiguousarray(x).reshape(Bw // nW, H, W, C)


def cyclic_shift(x, shift):
    """Roll a grid by ``-shift`` along H and W (``torch.roll(x, (-s, -s), dims=(1, 2))``).

    ``out[:, i, j] = x[:, (i + shift) % H, (j + shift) % W]``: content moves up and left.
    The Swin block calls it with ``+s`` before attention and ``-s`` after (spec section 5).

    Args:
        x: ``(B, H, W, C)``, any dtype; shift: any int (negative rolls the other way).

    Returns:
        ``(B, H, W, C)``. Adjoint (and inverse): ``cyclic_shift(., -shift)``.
    """
    x = _check_array("x", x, 4)
    shift = _check_int("shift", shift)
    if shift == 0:
        return x.copy()
    return np.roll(x, (-shift, -shift), axis=(1, 2))


def patch_merge_gather(x, H, W):
    """PatchMerging's 2x2 gather (before its LayerNorm and reduction), spec section 9.

    Output cell ``(i, j)`` concatenates ``x[2i, 2j], x[2i+1, 2j], x[2i, 2j+1], x[2i+1, 2j+1]``:
    order (0,0), (1,0), (0,1), (1,1), the row offset changing first.

    Args:
        x: ``(B, H*W, C)`` tokens; H and W even.

    Returns:
        ``(B, (H/2)*(W/2), 4C)``, row-major over ``(i, j)``. Adjoint (and inverse):
        :func:`patch_merge_scatter`.
    """
    x = _check_array("x", x, 3)
    H = _check_int("H", H, minimum=1)
    W = _check_int("W", W, minimum=1)
    check_divisible("H", H, 2, "2 (patch merging)")
    check_divisible("W", W, 2, "2 (patch merging)")
    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"x must have H*W={H * W} tokens (axis 1) for H={H}, W={W}, got shape {x.shape}")
    x = x.reshape(B, H // 2, 2, W // 2, 2, C)                 # (B, i, dy, j, dx, C)
    x = x.transpose(0, 1, 3, 4, 2, 5)                         # (B, i, j, dx, dy, C): dy fastest
    return np.ascontiguousarray(x).reshape(B, (H // 2) * (W // 2), 4 * C)


def patch_merge_scatter(y, H, W):
    """Adjoint (and inverse) of :func:`patch_merge_gather`: ``(B, H/2*W/2, 4C) -> (B, H*W, C)``.

    Each channel block goes back to its (row, col) parity: block ``dx*2 + dy`` to
    ``(2i + dy, 2j + dx)``.
    """
    y = _check_array("y", y, 3)
    H = _check_int("H", H, minimum=1)
    W = _check_int("W", W, minimum=1)
    check_divisible("H", H, 2, "2 (patch merging)")
    check_divisible("W", W, 2, "2 (patch merging)")
    B, L4, C4 = y.shape
    if L4 != (H // 2) * (W // 2):
        raise ValueError(f"y must have (H/2)*(W/2)={(H // 2) * (W // 2)} tokens (axis 1), got shape {y.shape}")
    check_divisible("y.shape[2]", C4, 4, "4 (four neighbours)")
    C = C4 // 4
    y = y.reshape(B, H // 2, W // 2, 2, 2, C)                 # (B, i, j, dx, dy, C)
    y = y.transpose(0, 1, 4, 2, 3, 5)                         # (B, i, dy, j, dx, C)
    return np.ascontiguousarray(y).reshape(B, H * W, C)


# --------------------------------------------------------------------------------------
# buffers and the relative-position bias
# --------------------------------------------------------------------------------------
def relative_position_index(M):
    """The ``relative_position_index`` buffer, ``(N, N)`` int64 with ``N = M*M``.

    Token ``t`` sits at ``(y, x) = (t // M, t % M)``; for query ``i`` and key ``j``::

        index[i, j] = (y_i - y_j + M - 1) * (2M - 1) + (x_i - x_j + M - 1)

    (query minus key, row offset major), with values in ``[0, (2M-1)^2)``.
    """
    M = _check_int("M", M, minimum=1)
    ys, xs = np.divmod(np.arange(M * M, dtype=np.int64), M)
    dy = ys[:, None] - ys[None, :] + (M - 1)
    dx = xs[:, None] - xs[None, :] + (M - 1)
    return dy * (2 * M - 1) + dx


def relative_position_bias_fwd(table, index):
    """Gather the bias ``bias[h, i, j] = table[index[i, j], h]``.

    Args:
        table: ``((2M-1)^2, heads)`` float, ``relative_position_bias_table``.
        index: ``(N, N)`` integer, values in ``[0, table.shape[0])``.

    Returns:
        ``bias`` ``(heads, N, N)`` and a cache for :func:`relative_position_bias_bwd`.
    """
    table = as_float_array("table", table, ndim=2)
    index = _check_array("index", index, 2)
    if not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"index must have an integer dtype, got {index.dtype}")
    N = index.shape[0]
    check_shape("index", index, (N, N))
    rows = table.shape[0]
    if index.size and (index.min() < 0 or index.max() >= rows):
        raise ValueError(f"index values must lie in [0, table.shape[0]={rows}), "
                         f"got min {index.min()} and max {index.max()}")
    bias = np.ascontiguousarray(table[index].transpose(2, 0, 1))  # (N, N, heads) -> (heads, N, N)
    return bias, {"index": index, "table_shape": table.shape, "dtype": table.dtype}


def relative_position_bias_bwd(dbias, cache):
    """Scatter-add the bias gradient back into the table rows.

    ``dtable[r, h] = sum over (i, j) with index[i, j] == r of dbias[h, i, j]``. Many pairs
    share a row, so this must accumulate (``np.add.at``); fancy assignment would drop
    duplicates.

    Returns:
        ``{"table": ((2M-1)^2, heads)}``.
    """
    index = cache["index"]
    rows, heads = cache["table_shape"]
    N = index.shape[0]
    dbias = as_float_array("dbias", dbias, ndim=3, dtype=cache["dtype"])
    check_shape("dbias", dbias, (heads, N, N))
    dtable = np.zeros((rows, heads), dtype=dbias.dtype)
    np.add.at(dtable, index.reshape(-1), dbias.reshape(heads, N * N).T)
    return {"table": dtable}


def shifted_window_mask(H, W, M, shift, dtype=np.float64):
    """The ``attn_mask`` buffer of a shifted block, ``(nW, N, N)`` of 0.0 / -100.0.

    Cells of the H x W grid are labelled *in the shifted frame* (labels are never rolled):
    row bands ``[0, H-M), [H-M, H-s), [H-s, H)``, column bands likewise with W, label
    ``3*row_band + col_band``. After :func:`window_partition` of the labels,
    ``mask[w, i, j] = -100`` where ``label[w, j] != label[w, i]``, else 0 ([query i, key j]).
    ``shift == 0`` gives all zeros (the released code then uses no mask at all).

    Args:
        H, W: grid, divisible by M; M: window side; shift: in ``[0, M)``; dtype: float dtype.
    """
    H = _check_int("H", H, minimum=1)
    W = _check_int("W", W, minimum=1)
    M = _check_int("M", M, minimum=1)
    _check_grid_windows(H, W, M)
    shift = _check_shift(shift, M)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    nW, N = (H // M) * (W // M), M * M
    if shift == 0:
        return np.zeros((nW, N, N), dtype=dtype)

    def bands(size):  # band number of every row (or column) in the shifted frame
        band = np.zeros(size, dtype=np.int64)
        band[size - M:size - shift] = 1
        band[size - shift:] = 2
        return band

    labels = 3 * bands(H)[:, None] + bands(W)[None, :]        # (H, W), 0..8
    win_labels = window_partition(labels[None, :, :, None], M)[:, :, 0]   # (nW, N)
    differ = win_labels[:, None, :] != win_labels[:, :, None]  # [w, i, j]: label_j != label_i
    return np.where(differ, dtype.type(MASK_VALUE), dtype.type(0.0))


# --------------------------------------------------------------------------------------
# the whole (S)W-MSA branch of a Swin block
# --------------------------------------------------------------------------------------
WINDOW_MSA_PARAM_KEYS = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                         "relative_position_bias_table")


def window_msa_fwd(x, params, *, H, W, num_heads, window_size, shift_size, mask=None):
    """The (shifted-)window attention branch of ``SwinTransformerBlock`` (spec sections 5-8).

    From ``norm1(x)`` to the branch output, before drop-path and the residual add::

        u  = cyclic_shift(x as (B, H, W, C), s)          roll by -s (skipped when s = 0)
        X  = window_partition(u, M)                      (Bw, N, C)      cache["attn_in"]
        T  = X qkv.weight^T + qkv.bias                   (Bw, N, 3C): q | k | v, head-major inside
        O  = window_attention(q, k, v, bias, mask)       scale hd^-0.5 on q (after its bias)
        Y  = concat_heads(O) proj.weight^T + proj.bias   (Bw, N, C)      cache["attn_out"]
        out = cyclic_shift(window_reverse(Y), -s)        roll by +s, as (B, H*W, C)

    with ``bias[h, i, j] = table[relative_position_index(M)[i, j], h]``.

    Args:
        x: ``(B, H*W, C)`` tokens (row-major), the output of norm1.
        params: mapping with the released names relative to ``attn``: ``"qkv.weight"``
            ``(3C, C)``, ``"qkv.bias"`` ``(3C,)``, ``"proj.weight"`` ``(C, C)``, ``"proj.bias"``
            ``(C,)``, ``"relative_position_bias_table"`` ``((2M-1)^2, num_heads)``; an optional
            ``"relative_position_index"`` buffer ``(N, N)`` is used instead of the computed
            one when given. Any other key is an error.
        H, W: the token grid, divisible by ``window_size``.
        num_heads: divides C.
        window_size: the window side M *actually used* (the caller applies the shrink rule
            of spec section 4).
        shift_size: s in ``[0, M)``.
        mask: ``(nW, N, N)`` ``attn_mask`` buffer; when None and ``s > 0`` it is built with
            :func:`shifted_window_mask`; when None and ``s == 0`` no mask is added.

    Returns:
        ``out`` ``(B, H*W, C)`` and ``cache`` with ``"probs"`` ``(Bw, heads, N, N)``,
        ``"attn_in"`` ``(Bw, N, C)`` (golden ``act.*.attn_in``), ``"attn_core"`` ``(Bw, N, C)``
        (heads concatenated, before proj) and ``"attn_out"`` ``(Bw, N, C)`` (after proj, window
        layout, shifted frame: golden ``act.*.attn``).
    """
    x = as_float_array("x", x, ndim=3)
    H = _check_int("H", H, minimum=1)
    W = _check_int("W", W, minimum=1)
    num_heads = _check_int("num_heads", num_heads, minimum=1)
    M = _check_int("window_size", window_size, minimum=1)
    _check_grid_windows(H, W, M)
    s = _check_shift(shift_size, M)
    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"x must have H*W={H * W} tokens (axis 1) for H={H}, W={W}, got shape {x.shape}")
    check_divisible("C (x.shape[2])", C, num_heads, "num_heads")
    hd, N = C // num_heads, M * M

    unknown = sorted(set(params) - set(WINDOW_MSA_PARAM_KEYS) - {"relative_position_index"})
    missing = [k for k in WINDOW_MSA_PARAM_KEYS if k not in params]
    if unknown or missing:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {unknown}; "
                         f"expected {list(WINDOW_MSA_PARAM_KEYS)} (+ optional 'relative_position_index')")
    table = as_float_array("params['relative_position_bias_table']",
                           params["relative_position_bias_table"], ndim=2, dtype=x.dtype)
    check_shape("params['relative_position_bias_table']", table, ((2 * M - 1) ** 2, num_heads))
    for key, shape in (("qkv.weight", (3 * C, C)), ("qkv.bias", (3 * C,)),
                       ("proj.weight", (C, C)), ("proj.bias", (C,))):
        as_float_array(f"params['{key}']", params[key], ndim=len(shape), dtype=x.dtype)
        check_shape(f"params['{key}']", params[key], shape)
    index = params.get("relative_position_index")
    if index is None:
        index = relative_position_index(M)
    else:
        index = _check_array("params['relative_position_index']", index, 2)
        check_shape("params['relative_position_index']", index, (N, N))
    if mask is None and s > 0:
        mask = shifted_window_mask(H, W, M, s, dtype=x.dtype)
    elif mask is not None:
        mask = as_float_array("mask", mask, ndim=3, dtype=x.dtype)
        check_shape("mask", mask, ((H // M) * (W // M), N, N))

    grid = cyclic_shift(x.reshape(B, H, W, C), s)
    attn_in = window_partition(grid, M)                               # (Bw, N, C)
    Bw = attn_in.shape[0]
    qkv, qkv_cache = linear_fwd(attn_in, params["qkv.weight"], params["qkv.bias"])
    q, k, v = qkv.reshape(Bw, N, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)   # each (Bw, heads, N, hd)
    bias, bias_cache = relative_position_bias_fwd(table, index)
    core, core_cache = window_attention_fwd(q, k, v, bias, mask)      # scale hd^-0.5 on q
    attn_core = np.ascontiguousarray(core.transpose(0, 2, 1, 3)).reshape(Bw, N, C)
    attn_out, proj_cache = linear_fwd(attn_core, params["proj.weight"], params["proj.bias"])
    out = cyclic_shift(window_reverse(attn_out, M, H, W), -s).reshape(B, L, C)
    cache = {
        "probs": core_cache["probs"], "attn_in": attn_in, "attn_core": attn_core,
        "attn_out": attn_out, "qkv_cache": qkv_cache, "bias_cache": bias_cache,
        "core_cache": core_cache, "proj_cache": proj_cache,
        "geometry": (B, H, W, C, num_heads, M, s),
    }
    return out, cache


def window_msa_bwd(dout, cache):
    """Backward of :func:`window_msa_fwd`: every forward step's adjoint in reverse order.

    Args:
        dout: ``(B, H*W, C)``.

    Returns:
        ``{"x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
        "relative_position_bias_table"}`` (no entry for the index or mask buffers).
    """
    B, H, W, C, num_heads, M, s = cache["geometry"]
    dout = as_float_array("dout", dout, ndim=3, dtype=cache["attn_in"].dtype)
    check_shape("dout", dout, (B, H * W, C))
    hd, N = C // num_heads, M * M
    # adjoint of "reverse then roll by +s" = "roll by -s then partition"
    d_attn_out = window_partition(cyclic_shift(dout.reshape(B, H, W, C), s), M)
    Bw = d_attn_out.shape[0]
    g_proj = linear_bwd(d_attn_out, cache["proj_cache"])
    d_core = g_proj["x"].reshape(Bw, N, num_heads, hd).transpose(0, 2, 1, 3)
    g_core = window_attention_bwd(d_core, cache["core_cache"])
    g_table = relative_position_bias_bwd(g_core["bias"], cache["bias_cache"])
    d_qkv = np.stack([g_core["q"], g_core["k"], g_core["v"]])        # (3, Bw, heads, N, hd)
    d_qkv = np.ascontiguousarray(d_qkv.transpose(1, 3, 0, 2, 4)).reshape(Bw, N, 3 * C)
    g_qkv = linear_bwd(d_qkv, cache["qkv_cache"])
    # adjoint of "roll by -s then partition" = "reverse then roll by +s"
    dx = cyclic_shift(window_reverse(g_qkv["x"], M, H, W), -s).reshape(B, H * W, C)
    return {
        "x": dx,
        "qkv.weight": g_qkv["weight"], "qkv.bias": g_qkv["bias"],
        "proj.weight": g_proj["weight"], "proj.bias": g_proj["bias"],
        "relative_position_bias_table": g_table["table"],
    }
