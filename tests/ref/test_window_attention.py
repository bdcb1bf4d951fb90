"""Tests for sparx_ref/ref/window_attention.py (Swin window attention and its data movement).

Oracles: finite differences, torch float64 autograd, an independent full-map attention view,
hypothesis properties, and the released code's buffers/activations in the golden file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparx_ref.ref import window_attention as wa
from sparx_ref.testing import assert_close, numerical_vjp

F64 = np.float64
F64N = "float64"  # tolerance() wants a dtype name


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _t(a, grad=False):
    return torch.tensor(a, requires_grad=grad)


def _random_core_inputs(rng, B, nW, heads, N, hd, dtype=F64, with_mask=True, M=None):
    Bw = B * nW
    q, k, v = (rng.standard_normal((Bw, heads, N, hd)).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((heads, N, N)).astype(dtype)
    mask = None
    if with_mask:
        # a random 0/-100 mask, symmetric with a zero diagonal like the real one
        m = rng.random((nW, N, N)) < 0.4
        m = m | m.transpose(0, 2, 1)
        m[:, np.arange(N), np.arange(N)] = False
        mask = np.where(m, -100.0, 0.0).astype(dtype)
    return q, k, v, bias, mask


def _torch_core(q, k, v, bias, mask, scale):
    """Window attention written the released way (WindowAttention.forward) in torch."""
    Bw, heads, N, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(Bw // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    probs = attn.softmax(dim=-1)
    return probs @ v, probs


# ---------------------------------------------------------------------------------------
# the attention core
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_window_attention_bwd_vs_finite_differences(rng, with_mask):
    q, k, v, bias, mask = _random_core_inputs(rng, B=2, nW=2, heads=2, N=4, hd=3, with_mask=with_mask)
    out, cache = wa.window_attention_fwd(q, k, v, bias, mask)
    dout = rng.standard_normal(out.shape)
    grads = wa.window_attention_bwd(dout, cache)
    assert set(grads) == {"q", "k", "v", "bias"}
    inputs = {"q": q, "k": k, "v": v, "bias": bias}
    for name, arr in inputs.items():
        num = numerical_vjp(lambda: wa.window_attention_fwd(q, k, v, bias, mask)[0], arr, dout)
        assert_close(grads[name], num, F64N, "finite_diff", name)


@pytest.mark.parametrize("B,nW,heads,N,hd,with_mask,scale", [
    (1, 1, 1, 4, 2, False, None),
    (2, 3, 2, 9, 4, True, None),
    (3, 2, 4, 16, 5, True, 0.37),
    (2, 4, 3, 4, 8, False, None),
])
def test_window_attention_vs_torch_autograd(rng, B, nW, heads, N, hd, with_mask, scale):
    q, k, v, bias, mask = _random_core_inputs(rng, B, nW, heads, N, hd, with_mask=with_mask)
    out, cache = wa.window_attention_fwd(q, k, v, bias, mask, scale=scale)
    dout = rng.standard_normal(out.shape)
    grads = wa.window_attention_bwd(dout, cache)

    tq, tk, tv, tb = (_t(a, True) for a in (q, k, v, bias))
    tmask = None if mask is None else _t(mask)
    tout, tprobs = _torch_core(tq, tk, tv, tb, tmask, hd ** -0.5 if scale is None else scale)
    (tout * _t(dout)).sum().backward()
    assert_close(out, tout, F64N, "autograd", "out")
    assert_close(cache["probs"], tprobs, F64N, "autograd", "probs")
    for name, t in zip("q k v bias".split(), (tq, tk, tv, tb)):
        assert_close(grads[name], t.grad, F64N, "autograd", name)


def test_window_attention_float32_vs_torch(rng):
    q, k, v, bias, mask = _random_core_inputs(rng, 2, 2, 2, 9, 4, dtype=np.float32)
    out, cache = wa.window_attention_fwd(q, k, v, bias, mask)
    assert out.dtype == np.float32 and cache["probs"].dtype == np.float32
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = wa.window_attention_bwd(dout, cache)
    assert all(g.dtype == np.float32 for g in grads.values())
    tq, tk, tv, tb = (_t(a.astype(F64), True) for a in (q, k, v, bias))
    tout, _ = _torch_core(tq, tk, tv, tb, _t(mask.astype(F64)), 4 ** -0.5)
    (tout * _t(dout.astype(F64))).sum().backward()
    assert_close(out, tout, "float32", "autograd", "out")
    for name, t in zip("q k v bias".split(), (tq, tk, tv, tb)):
        assert_close(grads[name], t.grad, "float32", "autograd", name)


def test_mask_is_applied_per_window_batch_major(rng):
    """mask[w] must hit windows b*nW + w: compare with running each window on its own."""
    B, nW, heads, N, hd = 3, 2, 2, 4, 3
    q, k, v, bias, mask = _random_core_inputs(rng, B, nW, heads, N, hd)
    assert not np.array_equal(mask[0], mask[1])
    out, _ = wa.window_attention_fwd(q, k, v, bias, mask)
    for b in range(B):
        for w in range(nW):
            i = b * nW + w
            one, _ = wa.window_attention_fwd(q[i:i + 1], k[i:i + 1], v[i:i + 1], bias + mask[w])
            np.testing.assert_array_equal(out[i], one[0])


# ---------------------------------------------------------------------------------------
# relative position index and bias
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", range(1, 9))
def test_relative_position_index_brute_force(M):
    index = wa.relative_position_index(M)
    assert index.dtype == np.int64 and index.shape == (M * M, M * M)
    expected = np.empty((M * M, M * M), dtype=np.int64)
    for i in range(M * M):
        for j in range(M * M):
            yi, xi, yj, xj = i // M, i % M, j // M, j % M
            expected[i, j] = (yi - yj + M - 1) * (2 * M - 1) + (xi - xj + M - 1)
    np.testing.assert_array_equal(index, expected)
    assert set(np.unique(index)) == set(range((2 * M - 1) ** 2))   # every table row is used


def test_relative_position_bias_bwd_vs_finite_differences(rng):
    M, heads = 3, 2
    table = rng.standard_normal(((2 * M - 1) ** 2, heads))
    index = wa.relative_position_index(M)
    bias, cache = wa.relative_position_bias_fwd(table, index)
    dbias = rng.standard_normal(bias.shape)
    got = wa.relative_position_bias_bwd(dbias, cache)
    assert set(got) == {"table"}
    num = numerical_vjp(lambda: wa.relative_position_bias_fwd(table, index)[0], table, dbias)
    assert_close(got["table"], num, F64N, "finite_diff", "table")


@pytest.mark.parametrize("M,heads", [(2, 1), (4, 3), (7, 2)])
def test_relative_position_bias_vs_torch(rng, M, heads):
    table = rng.standard_normal(((2 * M - 1) ** 2, heads))
    index = wa.relative_position_index(M)
    bias, cache = wa.relative_position_bias_fwd(table, index)
    dbias = rng.standard_normal(bias.shape)
    ttable = _t(table, True)
    N = M * M
    tbias = ttable[torch.from_numpy(index).view(-1)].view(N, N, -1).permute(2, 0, 1)
    (tbias * _t(dbias)).sum().backward()
    np.testing.assert_array_equal(bias, tbias.detach().numpy())
    assert_close(wa.relative_position_bias_bwd(dbias, cache)["table"], ttable.grad, F64N, "autograd", "table")
    # the centre row (offset 0) collects all N diagonal pairs: a non-accumulating scatter fails here
    centre = (M - 1) * (2 * M - 1) + (M - 1)
    np.testing.assert_allclose(wa.relative_position_bias_bwd(dbias, cache)["table"][centre],
                               np.einsum("hii->h", dbias), rtol=1e-13)


# ---------------------------------------------------------------------------------------
# shifted-window mask
# ---------------------------------------------------------------------------------------
def test_golden_buffers(data_dir):
    z = np.load(data_dir / "golden_swin_mini_b.npz")
    got = wa.shifted_window_mask(14, 14, 7, 3, dtype=np.float32)
    ref = z["sd.layers.0.blocks.1.attn_mask"]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    index_keys = [k for k in z.files if k.endswith("relative_position_index")]
    assert len(index_keys) == 4
    for key in index_keys:
        np.testing.assert_array_equal(wa.relative_position_index(7), z[key])
        assert z[key].dtype == np.int64


def test_golden_window_attention(data_dir):
    """The core plus the qkv/proj matmuls reproduce the released probs and outputs."""
    z = np.load(data_dir / "golden_swin_mini_b.npz")
    for stage, blk, H, shift in [(0, 0, 14, 0), (0, 1, 14, 3), (1, 0, 7, 0), (1, 1, 7, 0)]:
        p = f"layers.{stage}.blocks.{blk}"
        sd = {k[len(f"sd.{p}.attn."):]: z[k].astype(F64) for k in z.files if k.startswith(f"sd.{p}.attn.")}
        x = z[f"act.{p}.attn_in"]
        Bw, N, C = x.shape
        heads, hd = 2, C // 2
        t = (x @ sd["qkv.weight"].T + sd["qkv.bias"]).reshape(Bw, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        bias, _ = wa.relative_position_bias_fwd(sd["relative_position_bias_table"], wa.relative_position_index(7))
        mask = wa.shifted_window_mask(H, H, 7, shift) if shift else None
        out, cache = wa.window_attention_fwd(t[0], t[1], t[2], bias, mask)
        out = out.transpose(0, 2, 1, 3).reshape(Bw, N, C) @ sd["proj.weight"].T + sd["proj.bias"]
        assert_close(cache["probs"], z[f"act.{p}.attn_probs"], F64N, "golden_out", p + ".attn_probs")
        assert_close(out, z[f"act.{p}.attn"], F64N, "golden_out", p + ".attn")


def test_swin_t_stage0_mask_bands():
    """56x56, M=7, s=3 (spec section 7): edge windows split 4 + 3, interior windows unmasked."""
    H = W = 56
    M, s = 7, 3
    mask = wa.shifted_window_mask(H, W, M, s)
    nWc = W // M
    assert mask.shape == (64, 49, 49)
    band = (np.arange(M) >= 4).astype(int)                   # in-window band: rows 0-3 | 4-6
    for w in range(64):
        wr, wc = divmod(w, nWc)
        row_band = band if wr == H // M - 1 else np.zeros(M, int)
        col_band = band if wc == nWc - 1 else np.zeros(M, int)
        label = (3 * row_band[:, None] + col_band[None, :]).reshape(-1)
        expected = np.where(label[None, :] != label[:, None], -100.0, 0.0)
        np.testing.assert_array_equal(mask[w], expected, err_msg=f"window {w}")
    assert sum(bool(np.any(m)) for m in mask) == 15          # last window row + last column


@settings(max_examples=20)
@given(M=st.integers(1, 8), nh=st.integers(1, 4), nw=st.integers(1, 4), data=st.data())
def test_mask_properties(M, nh, nw, data):
    H, W = nh * M, nw * M
    s = data.draw(st.integers(0, M - 1))
    mask = wa.shifted_window_mask(H, W, M, s)
    assert mask.shape == (nh * nw, M * M, M * M) and mask.dtype == F64
    assert set(np.unique(mask)) <= {0.0, -100.0}
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
    assert np.all(mask[:, np.arange(M * M), np.arange(M * M)] == 0)
    if s == 0:
        assert not np.any(mask)
    for w in range(nh * nw):
        wr, wc = divmod(w, nw)
        if wr < nh - 1 and wc < nw - 1:
            assert not np.any(mask[w]), f"interior window {w} is masked"
    if s > 0:
        # the bottom-right window holds 4 regions of sizes (M-s)^2, (M-s)s, s(M-s), s^2
        allowed_per_query = (mask[-1] == 0).sum(axis=1)
        sizes = {(M - s) * (M - s), (M - s) * s, s * s}
        assert set(allowed_per_query) == sizes


# ---------------------------------------------------------------------------------------
# data movement: round trips, adjoints, explicit positions
# ---------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(B=st.integers(1, 3), M=st.integers(1, 8), nh=st.integers(1, 3), nw=st.integers(1, 3),
       C=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_partition_reverse(B, M, nh, nw, C, seed):
    rng = np.random.default_rng(seed)
    H, W = nh * M, nw * M
    x = rng.standard_normal((B, H, W, C))
    win = wa.window_partition(x, M)
    assert win.shape == (B * nh * nw, M * M, C)
    np.testing.assert_array_equal(wa.window_reverse(win, M, H, W), x)
    # explicit positions (spec section 6): window b*nW + wr*nw + wc, token r*M + c
    b, wr, wc, r, c = (int(rng.integers(n)) for n in (B, nh, nw, M, M))
    np.testing.assert_array_equal(win[b * nh * nw + wr * nw + wc, r * M + c], x[b, wr * M + r, wc * M + c])
    # adjoint identity: <partition(x), y> == <x, reverse(y)>
    y = rng.standard_normal(win.shape)
    assert np.isclose(np.sum(win * y), np.sum(x * wa.window_reverse(y, M, H, W)), rtol=1e-12, atol=0)


@settings(max_examples=20)
@given(B=st.integers(1, 2), H=st.integers(1, 9), W=st.integers(1, 9), s=st.integers(-10, 10),
       seed=st.integers(0, 2**31))
def test_cyclic_shift(B, H, W, s, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, 2))
    y = wa.cyclic_shift(x, s)
    np.testing.assert_array_equal(wa.cyclic_shift(y, -s), x)
    i, j = int(rng.integers(H)), int(rng.integers(W))
    np.testing.assert_array_equal(y[:, i, j], x[:, (i + s) % H, (j + s) % W])
    np.testing.assert_array_equal(y, torch.roll(torch.from_numpy(x), (-s, -s), dims=(1, 2)).numpy())
    z = rng.standard_normal(x.shape)
    assert np.isclose(np.sum(y * z), np.sum(x * wa.cyclic_shift(z, -s)), rtol=1e-12, atol=0)


@settings(max_examples=20)
@given(B=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4), C=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_patch_merge_gather_scatter(B, h, w, C, seed):
    rng = np.random.default_rng(seed)
    H, W = 2 * h, 2 * w
    x = rng.standard_normal((B, H * W, C))
    y = wa.patch_merge_gather(x, H, W)
    assert y.shape == (B, h * w, 4 * C)
    grid = x.reshape(B, H, W, C)
    # the released torch.cat([x0, x1, x2, x3]) with x1 = odd row, even col
    ref = np.concatenate([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2],
                          grid[:, 1::2, 1::2]], axis=-1).reshape(B, h * w, 4 * C)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(wa.patch_merge_scatter(y, H, W), x)
    g = rng.standard_normal(y.shape)
    assert np.isclose(np.sum(y * g), np.sum(x * wa.patch_merge_scatter(g, H, W)), rtol=1e-12, atol=0)


def test_patch_merge_order_explicit():
    x = np.arange(2 * 4 * 1, dtype=F64).reshape(1, 8, 1)         # H=2, W=4, token id = value
    y = wa.patch_merge_gather(x, 2, 4)
    # cell (0,0): tokens (0,0)=0, (1,0)=4, (0,1)=1, (1,1)=5 ; cell (0,1): 2, 6, 3, 7
    np.testing.assert_array_equal(y[0], [[0, 4, 1, 5], [2, 6, 3, 7]])


# ---------------------------------------------------------------------------------------
# two views: windowed attention == attention over the whole map restricted to neighbours
# ---------------------------------------------------------------------------------------
def full_map_attention(q, k, v, table, H, W, M, s, scale):
    """Attention over all H*W tokens of each image, in the ORIGINAL frame, computed from token
    coordinates only (no partition, roll, index buffer or -100 mask).

    Token p at (y, x) sits at ((y - s) % H, (x - s) % W) in the shifted frame. Query p may see
    key t iff both lie in the same shifted-frame window AND their shifted-frame offset equals
    their true offset (no wrap-around): i.e. t is a real spatial neighbour. Disallowed pairs
    get probability exactly 0 (-inf logits). The bias comes from the table row of the offset.
    q, k, v: (B, heads, L, hd) in original token order. Returns (B, heads, L, hd).
    """
    L = H * W
    y, x = np.divmod(np.arange(L), W)
    ys, xs = (y - s) % H, (x - s) % W
    same_window = ((ys[:, None] // M) == (ys[None, :] // M)) & ((xs[:, None] // M) == (xs[None, :] // M))
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    no_wrap = (dy == y[:, None] - y[None, :]) & (dx == x[:, None] - x[None, :])
    allowed = same_window & no_wrap
    row = np.where(allowed, (dy + M - 1) * (2 * M - 1) + (dx + M - 1), 0)
    bias = table[row].transpose(2, 0, 1)                          # (heads, L, L)
    logits = np.einsum("bhpd,bhtd->bhpt", q * scale, k) + bias
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhpt,bhtd->bhpd", probs, v)


def _windowed_attention_on_map(q, k, v, table, H, W, M, s, scale):
    """The Swin path through the ops under test: shift, partition, core, reverse, un-shift."""
    B, heads, L, hd = q.shape

    def to_windows(a):                                            # (B, heads, L, hd) -> (Bw, heads, N, hd)
        grid = a.transpose(0, 2, 1, 3).reshape(B, H, W, heads * hd)
        win = wa.window_partition(wa.cyclic_shift(grid, s), M)
        return win.reshape(-1, M * M, heads, hd).transpose(0, 2, 1, 3)

    bias, _ = wa.relative_position_bias_fwd(table, wa.relative_position_index(M))
    mask = wa.shifted_window_mask(H, W, M, s) if s else None
    out, _ = wa.window_attention_fwd(to_windows(q), to_windows(k), to_windows(v), bias, mask, scale)
    out = out.transpose(0, 2, 1, 3).reshape(-1, M * M, heads * hd)
    grid = wa.cyclic_shift(wa.window_reverse(out, M, H, W), -s)
    return grid.reshape(B, L, heads, hd).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("B,H,W,M,s,heads,hd", [
    (2, 4, 6, 2, 1, 2, 3),
    (1, 6, 9, 3, 1, 1, 4),
    (2, 8, 4, 4, 2, 3, 2),
    (1, 10, 15, 5, 2, 2, 3),
    (1, 8, 8, 4, 0, 2, 3),
])
def test_two_views_window_vs_full_map(rng, B, H, W, M, s, heads, hd):
    L = H * W
    q, k, v = (rng.standard_normal((B, heads, L, hd)) for _ in range(3))
    table = rng.standard_normal(((2 * M - 1) ** 2, heads))
    got = _windowed_attention_on_map(q, k, v, table, H, W, M, s, hd ** -0.5)
    ref = full_map_attention(q, k, v, table, H, W, M, s, hd ** -0.5)
    assert_close(got, ref, F64N, "two_views", "windowed vs full-map attention")


# ---------------------------------------------------------------------------------------
# errors name the argument
# ---------------------------------------------------------------------------------------
def test_errors(rng):
    q, k, v, bias, mask = _random_core_inputs(rng, 2, 2, 2, 4, 3)
    with pytest.raises(TypeError, match="k"):
        wa.window_attention_fwd(q, k.astype(np.float32), v, bias)
    with pytest.raises(ValueError, match="bias"):
        wa.window_attention_fwd(q, k, v, bias[:1])
    with pytest.raises(ValueError, match="v"):
        wa.window_attention_fwd(q, k, v[:, :, :3], bias)
    with pytest.raises(ValueError, match="Bw"):
        wa.window_attention_fwd(q[:3], k[:3], v[:3], bias, mask)
    with pytest.raises(ValueError, match="mask"):
        wa.window_attention_fwd(q, k, v, bias, mask[:, :3])
    with pytest.raises(TypeError, match="q"):
        wa.window_attention_fwd(q.astype(np.int64), k, v, bias)
    with pytest.raises(ValueError, match="W"):
        wa.window_partition(np.zeros((1, 4, 6, 1)), 4)
    with pytest.raises(ValueError, match="H"):
        wa.window_partition(np.zeros((1, 6, 4, 1)), 4)
    with pytest.raises(ValueError, match="x"):
        wa.window_partition(np.zeros((4, 6, 1)), 2)
    with pytest.raises(ValueError, match="windows"):
        wa.window_reverse(np.zeros((3, 4, 1)), 2, 4, 4)
    with pytest.raises(ValueError, match="shift_size"):
        wa.shifted_window_mask(8, 8, 4, 4)
    with pytest.raises(ValueError, match="shift_size"):
        wa.shifted_window_mask(8, 8, 4, -1)
    with pytest.raises(ValueError, match="H"):
        wa.shifted_window_mask(6, 8, 4, 2)
    with pytest.raises(ValueError, match="H"):
        wa.patch_merge_gather(np.zeros((1, 12, 2)), 3, 4)
    with pytest.raises(ValueError, match="W"):
        wa.patch_merge_gather(np.zeros((1, 12, 2)), 4, 3)
    with pytest.raises(ValueError, match="x"):
        wa.patch_merge_gather(np.zeros((1, 12, 2)), 4, 4)
    with pytest.raises(ValueError, match="index"):
        wa.relative_position_bias_fwd(np.zeros((9, 2)), wa.relative_position_index(3))
    with pytest.raises(TypeError, match="shift"):
        wa.cyclic_shift(np.zeros((1, 2, 2, 1)), 1.5)
    with pytest.raises(TypeError, match="M"):
        wa.relative_position_index(2.0)
    _, cache = wa.window_attention_fwd(q, k, v, bias)
    with pytest.raises(ValueError, match="dout"):
        wa.window_attention_bwd(np.zeros((2, 2, 2, 2)), cache)


# ---------------------------------------------------------------------------------------
# the whole (S)W-MSA branch
# ---------------------------------------------------------------------------------------
def _random_msa_params(rng, C, heads, M, dtype=F64):
    return {
        "qkv.weight": (rng.standard_normal((3 * C, C)) / np.sqrt(C)).astype(dtype),
        "qkv.bias": (0.3 * rng.standard_normal(3 * C)).astype(dtype),
        "proj.weight": (rng.standard_normal((C, C)) / np.sqrt(C)).astype(dtype),
        "proj.bias": (0.3 * rng.standard_normal(C)).astype(dtype),
        "relative_position_bias_table": (0.5 * rng.standard_normal(((2 * M - 1) ** 2, heads))).astype(dtype),
    }


def _torch_swin_mask(H, W, M, s):
    """attn_mask built the released way: slice-labelled image, partition, pairwise difference."""
    img = torch.zeros(1, H, W, 1, dtype=torch.float64)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _torch_partition(img, M).view(-1, M * M)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _torch_partition(x, M):
    B, H, W, C = x.shape
    return x.view(B, H // M, M, W // M, M, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, M * M, C)


def _torch_reverse(win, M, H, W):
    B = win.shape[0] // ((H // M) * (W // M))
    return win.view(B, H // M, W // M, M, M, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def _torch_window_msa(x, p, H, W, heads, M, s):
    """The released SwinTransformerBlock attention branch, written from the spec in torch."""
    B, L, C = x.shape
    hd, N = C // heads, M * M
    grid = x.view(B, H, W, C)
    if s > 0:
        grid = torch.roll(grid, shifts=(-s, -s), dims=(1, 2))
    xw = _torch_partition(grid, M)
    Bw = xw.shape[0]
    qkv = torch.nn.functional.linear(xw, p["qkv.weight"], p["qkv.bias"])
    q, k, v = qkv.reshape(Bw, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    index = torch.from_numpy(wa.relative_position_index(M))
    bias = p["relative_position_bias_table"][index.view(-1)].view(N, N, -1).permute(2, 0, 1)
    mask = _torch_swin_mask(H, W, M, s) if s > 0 else None
    o, probs = _torch_core(q, k, v, bias, mask, hd ** -0.5)
    o = torch.nn.functional.linear(o.transpose(1, 2).reshape(Bw, N, C), p["proj.weight"], p["proj.bias"])
    grid = _torch_reverse(o, M, H, W)
    if s > 0:
        grid = torch.roll(grid, shifts=(s, s), dims=(1, 2))
    return grid.reshape(B, L, C), probs


def test_window_msa_bwd_vs_finite_differences(rng):
    B, H, W, M, s, heads, C = 2, 4, 6, 2, 1, 2, 4
    params = _random_msa_params(rng, C, heads, M)
    x = rng.standard_normal((B, H * W, C))
    kw = dict(H=H, W=W, num_heads=heads, window_size=M, shift_size=s)
    out, cache = wa.window_msa_fwd(x, params, **kw)
    dout = rng.standard_normal(out.shape)
    grads = wa.window_msa_bwd(dout, cache)
    assert set(grads) == {"x", *wa.WINDOW_MSA_PARAM_KEYS}
    for name, arr in [("x", x), *params.items()]:
        num = numerical_vjp(lambda: wa.window_msa_fwd(x, params, **kw)[0], arr, dout)
        assert_close(grads[name], num, F64N, "finite_diff", name)


@pytest.mark.parametrize("B,H,W,M,s,heads,C", [
    (1, 2, 2, 2, 0, 1, 2),
    (2, 4, 6, 2, 1, 2, 4),
    (2, 6, 9, 3, 1, 3, 6),
    (1, 8, 4, 4, 2, 4, 8),
    (1, 10, 5, 5, 2, 2, 6),
    (1, 6, 12, 6, 3, 3, 9),
    (2, 7, 14, 7, 3, 2, 4),
    (1, 8, 16, 8, 4, 1, 3),
    (2, 8, 8, 4, 0, 2, 4),
])
def test_window_msa_vs_torch_autograd(rng, B, H, W, M, s, heads, C):
    params = _random_msa_params(rng, C, heads, M)
    x = rng.standard_normal((B, H * W, C))
    out, cache = wa.window_msa_fwd(x, params, H=H, W=W, num_heads=heads, window_size=M, shift_size=s)
    dout = rng.standard_normal(out.shape)
    grads = wa.window_msa_bwd(dout, cache)

    tx = _t(x, True)
    tp = {k: _t(v, True) for k, v in params.items()}
    tout, tprobs = _torch_window_msa(tx, tp, H, W, heads, M, s)
    (tout * _t(dout)).sum().backward()
    assert_close(out, tout, F64N, "autograd", "out")
    assert_close(cache["probs"], tprobs, F64N, "autograd", "probs")
    assert_close(grads["x"], tx.grad, F64N, "autograd", "x")
    for k, t in tp.items():
        assert_close(grads[k], t.grad, F64N, "autograd", k)


def test_window_msa_float32(rng):
    B, H, W, M, s, heads, C = 2, 4, 8, 4, 2, 2, 6
    params = _random_msa_params(rng, C, heads, M, dtype=np.float32)
    x = rng.standard_normal((B, H * W, C)).astype(np.float32)
    out, cache = wa.window_msa_fwd(x, params, H=H, W=W, num_heads=heads, window_size=M, shift_size=s)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = wa.window_msa_bwd(dout, cache)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    tx = _t(x.astype(F64), True)
    tp = {k: _t(v.astype(F64), True) for k, v in params.items()}
    tout, _ = _torch_window_msa(tx, tp, H, W, heads, M, s)
    (tout * _t(dout.astype(F64))).sum().backward()
    assert_close(out, tout, "float32", "autograd", "out")
    assert_close(grads["x"], tx.grad, "float32", "autograd", "x")
    for k, t in tp.items():
        assert_close(grads[k], t.grad, "float32", "autograd", k)


@pytest.mark.parametrize("B,H,W,M,s,heads,C", [
    (2, 4, 6, 2, 1, 2, 4),
    (1, 6, 9, 3, 2, 3, 6),
    (1, 8, 12, 4, 2, 2, 4),
])
def test_two_views_window_msa_vs_full_map(rng, B, H, W, M, s, heads, C):
    """window_msa_fwd == plain matmuls + attention over the whole map restricted to real
    neighbours in the same shifted window (exact zero probabilities elsewhere)."""
    params = _random_msa_params(rng, C, heads, M)
    x = rng.standard_normal((B, H * W, C))
    got, _ = wa.window_msa_fwd(x, params, H=H, W=W, num_heads=heads, window_size=M, shift_size=s)
    hd = C // heads
    t = (x @ params["qkv.weight"].T + params["qkv.bias"]).reshape(B, H * W, 3, heads, hd)
    q, k, v = t.transpose(2, 0, 3, 1, 4)                                   # (B, heads, L, hd)
    o = full_map_attention(q, k, v, params["relative_position_bias_table"], H, W, M, s, hd ** -0.5)
    ref = o.transpose(0, 2, 1, 3).reshape(B, H * W, C) @ params["proj.weight"].T + params["proj.bias"]
    assert_close(got, ref, F64N, "two_views", "window_msa vs full-map attention")


def test_window_msa_golden(data_dir):
    """Feed the released attention input back (un-partitioned, un-shifted) and reproduce the
    released attn_in, attention maps and WindowAttention outputs of every block."""
    z = np.load(data_dir / "golden_swin_mini_b.npz")
    for stage, blk, H, shift in [(0, 0, 14, 0), (0, 1, 14, 3), (1, 0, 7, 0), (1, 1, 7, 0)]:
        p = f"layers.{stage}.blocks.{blk}"
        pre = f"sd.{p}.attn."
        params = {k[len(pre):]: z[k].astype(F64) for k in z.files
                  if k.startswith(pre) and not k.endswith("relative_position_index")}
        attn_in = z[f"act.{p}.attn_in"]
        C = attn_in.shape[-1]
        x = wa.cyclic_shift(wa.window_reverse(attn_in, 7, H, H), -shift).reshape(2, H * H, C)
        mask = z[f"sd.{p}.attn_mask"].astype(F64) if shift else None
        for given_mask in (None, mask):
            out, cache = wa.window_msa_fwd(x, params, H=H, W=H, num_heads=2, window_size=7,
                                           shift_size=shift, mask=given_mask)
            np.testing.assert_array_equal(cache["attn_in"], attn_in)
            assert_close(cache["probs"], z[f"act.{p}.attn_probs"], F64N, "golden_out", p + ".attn_probs")
            assert_close(cache["attn_out"], z[f"act.{p}.attn"], F64N, "golden_out", p + ".attn")
        # the branch output is the released 'mid' minus the shortcut (the block input)
        block_in = z[{(0, 0): "act.patch_embed", (0, 1): "act.layers.0.blocks.0",
                      (1, 0): "act.layers.0.downsample", (1, 1): "act.layers.1.blocks.0"}[(stage, blk)]]
        assert_close(out, z[f"act.{p}.mid"] - block_in, F64N, "golden_out", p + " branch output")


def test_window_msa_errors(rng):
    C, heads, M = 4, 2, 2
    params = _random_msa_params(rng, C, heads, M)
    x = rng.standard_normal((1, 4 * 6, C))
    kw = dict(H=4, W=6, num_heads=heads, window_size=M, shift_size=1)
    wa.window_msa_fwd(x, params, **kw)
    with pytest.raises(ValueError, match="shift_size"):
        wa.window_msa_fwd(x, params, **{**kw, "shift_size": 2})
    with pytest.raises(ValueError, match="W"):
        wa.window_msa_fwd(rng.standard_normal((1, 4 * 5, C)), params, **{**kw, "W": 5})
    with pytest.raises(ValueError, match="x"):
        wa.window_msa_fwd(x, params, **{**kw, "H": 2})
    with pytest.raises(ValueError, match="num_heads"):
        wa.window_msa_fwd(x, params, **{**kw, "num_heads": 3})
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        wa.window_msa_fwd(x, params, **{**kw, "window_size": 1, "shift_size": 0})
    with pytest.raises(ValueError, match="missing keys \\['proj.bias'\\]"):
        wa.window_msa_fwd(x, {k: v for k, v in params.items() if k != "proj.bias"}, **kw)
    with pytest.raises(ValueError, match="unexpected keys \\['qkv.weights'\\]"):
        wa.window_msa_fwd(x, {**params, "qkv.weights": params["qkv.weight"]}, **kw)
    with pytest.raises(ValueError, match="qkv.weight"):
        wa.window_msa_fwd(x, {**params, "qkv.weight": params["qkv.weight"][:, :3]}, **kw)
    with pytest.raises(TypeError, match="proj.weight"):
        wa.window_msa_fwd(x, {**params, "proj.weight": params["proj.weight"].astype(np.float32)}, **kw)
    with pytest.raises(ValueError, match="mask"):
        wa.window_msa_fwd(x, params, **kw, mask=np.zeros((2, 4, 4)))
