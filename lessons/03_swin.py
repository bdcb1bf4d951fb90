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
# # Lesson 3 — Swin: windows, relative position bias, shifted windows
#
# SparX's second family is built on the Swin Transformer. Swin computes self-attention
# inside non-overlapping $M\times M$ windows (cost linear in the image size) and alternates
# plain and **shifted** windows so information crosses window borders. In this lesson:
#
# 1. window partition and its inverse,
# 2. the relative position bias: a small table indexed by the displacement between tokens,
# 3. the cyclic shift, the nine regions and the -100 attention mask,
# 4. the bias gradient: a scatter-add into the table.
#
# All operations are the oracle's (`sparx_ref.ref.window_attention`), mirrored from
# microsoft/Swin-Transformer.

# %%
import numpy as np
from matplotlib.figure import Figure

from sparx_ref import viz
from sparx_ref.ref import window_attention as wa
from sparx_ref.testing import numerical_vjp, rel_err
from sparx_ref.tolerances import tolerance

rng = np.random.default_rng(0)
TWO_VIEWS = tolerance("float64", "two_views")

# %% [markdown]
# ## 1. Window partition
#
# Tokens live on an $H\times W$ grid with channels last, `(B, H, W, C)`. `window_partition`
# cuts it into $n_W = (H/M)(W/M)$ windows of $N = M^2$ tokens, windows ordered batch-major,
# then window rows, then window columns; inside a window tokens are row-major.

# %%
H, W, M = 8, 12, 4
grid = np.arange(H * W, dtype=np.float64).reshape(1, H, W, 1)     # each token holds its index
windows = wa.window_partition(grid, M)                             # (nW, N, 1)
nW, N = (H // M) * (W // M), M * M
assert windows.shape == (nW, N, 1)
# window 1 is the second window of the first window row: rows 0..3, columns 4..7
assert np.array_equal(windows[1, :, 0].reshape(M, M), grid[0, :M, M:2 * M, 0])
# reverse is the exact inverse
assert np.array_equal(wa.window_reverse(windows, M, H, W), grid)

fig = Figure(figsize=(9, 2.6), layout="constrained")
axes = fig.subplots(1, 2)
window_id = np.zeros((H, W))
for w in range(nW):
    r, c = divmod(w, W // M)
    window_id[r * M:(r + 1) * M, c * M:(c + 1) * M] = w
axes[0].imshow(window_id, cmap="tab10")
for w in range(nW):
    r, c = divmod(w, W // M)
    axes[0].text(c * M + M / 2 - 0.5, r * M + M / 2 - 0.5, f"window {w}", ha="center", color="w")
axes[0].set_title(f"{H}x{W} grid, M={M}: {nW} windows")
axes[1].imshow(windows[:, :, 0], aspect="auto", cmap="viridis")
axes[1].set_xlabel("token inside the window (r*M + c)")
axes[1].set_ylabel("window")
axes[1].set_title("window_partition: each row is one window (colour = original index)")
fig

# %% [markdown]
# ## 2. Relative position bias
#
# Inside a window, the attention logit of query $i$ and key $j$ gets a learned bias that
# depends only on their **displacement** $(\Delta y, \Delta x) = (y_i - y_j, x_i - x_j)$, each
# in $[-(M-1), M-1]$: a table of $(2M-1)^2$ rows (one column per head), read through the
# constant `relative_position_index` buffer.

# %%
Mb = 3
index = wa.relative_position_index(Mb)                            # (N, N) int
Nb = Mb * Mb
ys, xs = np.divmod(np.arange(Nb), Mb)
displacement = [(ys[i] - ys[j], xs[i] - xs[j]) for i in range(Nb) for j in range(Nb)]
flat = index.reshape(-1)
# same displacement <=> same table row
for a in range(Nb * Nb):
    for b in range(Nb * Nb):
        assert (flat[a] == flat[b]) == (displacement[a] == displacement[b])
assert set(flat.tolist()) == set(range((2 * Mb - 1) ** 2))
print("relative_position_index for M = 3:\n", index)

heads = 2
table = rng.standard_normal(((2 * Mb - 1) ** 2, heads))
bias, bias_cache = wa.relative_position_bias_fwd(table, index)    # (heads, N, N)
assert np.array_equal(bias[1], table[index, 1])

# %% [markdown]
# ## 3. Shifted windows and the -100 mask
#
# Odd blocks roll the grid by $-s$ (with $s = \lfloor M/2\rfloor$) along H and W before
# partitioning, so the new windows straddle the old borders. The roll wraps the bottom and
# right bands around: a window at the edge then holds tokens that were far apart in the
# image. Labelling every cell in the shifted frame by its row band
# ($[0, H-M)$, $[H-M, H-s)$, $[H-s, H)$) and column band gives **nine regions**; attention
# between tokens of different regions is blocked by adding -100 to their logit.

# %%
Hs, Ws, Ms, shift = 8, 8, 4, 2
viz.shifted_window_regions(Hs, Ws, Ms, shift)

# %%
mask = wa.shifted_window_mask(Hs, Ws, Ms, shift)                   # (nW, N, N) of 0 / -100
labels = viz.region_labels(Hs, Ws, Ms, shift)
assert len(np.unique(labels)) == 9
assert np.array_equal(viz.mask_from_labels(labels, Ms), mask)      # the figure's labels give the op's mask
assert np.all(mask[0] == 0), "the top-left window is not affected by the roll"
assert np.array_equal(mask, mask.transpose(0, 2, 1)), "the mask is symmetric"
assert set(np.unique(mask)) == {0.0, -100.0}

# the cyclic shift is a roll; its adjoint (and inverse) is the roll back
x = rng.standard_normal((2, Hs, Ws, 3))
assert np.array_equal(wa.cyclic_shift(wa.cyclic_shift(x, shift), -shift), x)
assert np.array_equal(wa.cyclic_shift(x, shift)[:, 0, 0], x[:, shift, shift])

# %% [markdown]
# **Two views.** With the mask, attention in a shifted window equals plain attention run
# separately on each region of that window (the masked weights are $e^{-100}\approx 4\cdot
# 10^{-44}$ of the others: not exactly zero, which is why the released code's -100, not
# $-\infty$, is what the oracle reproduces).

# %%
hd = 4
nWs, Ns = mask.shape[0], Ms * Ms
q, k, v = (rng.standard_normal((nWs, heads, Ns, hd)) for _ in range(3))
table_s = rng.standard_normal(((2 * Ms - 1) ** 2, heads))
bias_s, _ = wa.relative_position_bias_fwd(table_s, wa.relative_position_index(Ms))
out, cache = wa.window_attention_fwd(q, k, v, bias_s, mask)

win_labels = wa.window_partition(labels[None, :, :, None].astype(float), Ms)[:, :, 0]   # (nW, N)
by_region = np.zeros_like(out)
scale = hd ** -0.5
for w in range(nWs):
    for lab in np.unique(win_labels[w]):
        sel = np.nonzero(win_labels[w] == lab)[0]
        logits = scale * q[w][:, sel] @ k[w][:, sel].transpose(0, 2, 1) + bias_s[:, sel][:, :, sel]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        by_region[w][:, sel] = p @ v[w][:, sel]
err = rel_err(out, by_region)
print("masked window attention vs attention per region:", err)
assert err <= TWO_VIEWS
blocked = cache["probs"][np.broadcast_to(mask[:, None] < 0, cache["probs"].shape)]
print("largest attention weight across regions:", blocked.max())
assert blocked.max() < 1e-40

# %% [markdown]
# ## 4. The bias gradient is a scatter-add
#
# Every pair $(i, j)$ with the same displacement reads the same table row, so the gradient
# of that row is the **sum** of the gradients of all those bias entries:
#
# $$\frac{\partial \mathcal L}{\partial\, \text{table}[r, h]} = \sum_{(i,j):\ \text{index}[i,j] = r} \frac{\partial \mathcal L}{\partial\, \text{bias}[h, i, j]} .$$
#
# In NumPy that is `np.add.at` (a plain fancy assignment `dtable[index] = dbias` would keep
# only one of the duplicates). With all-ones upstream gradients, row $r$ receives the
# number of pairs at its displacement, $(M-|\Delta y|)(M-|\Delta x|)$.

# %%
dbias = np.ones((heads, Nb, Nb))
dtable = wa.relative_position_bias_bwd(dbias, bias_cache)["table"]
dys, dxs = np.divmod(np.arange((2 * Mb - 1) ** 2), 2 * Mb - 1)
counts = (Mb - np.abs(dys - (Mb - 1))) * (Mb - np.abs(dxs - (Mb - 1)))
assert np.array_equal(dtable[:, 0], counts)
print("pairs per displacement (M = 3), laid out as a (2M-1) x (2M-1) grid:\n", counts.reshape(5, 5))

# the wrong way loses gradient
wrong = np.zeros_like(dtable)
wrong[index.reshape(-1)] = dbias.reshape(heads, -1).T
assert wrong.sum() < dtable.sum()

# and the whole chain (bias -> masked window attention) against finite differences
dout = rng.standard_normal(out.shape)
index_s = wa.relative_position_index(Ms)


def attention_of_table():
    b, _ = wa.relative_position_bias_fwd(table_s, index_s)
    return wa.window_attention_fwd(q, k, v, b, mask)[0]


_, bcache = wa.relative_position_bias_fwd(table_s, index_s)
dbias_s = wa.window_attention_bwd(dout, cache)["bias"]
dtable_s = wa.relative_position_bias_bwd(dbias_s, bcache)["table"]
numeric = numerical_vjp(attention_of_table, table_s, dout)
err = rel_err(dtable_s, numeric)
print("d table: scatter-add backward vs finite differences", err)
assert err <= tolerance("float64", "finite_diff")

# %% [markdown]
# ## Summary
#
# - Windows make attention local and cheap; partition/reverse are pure reshapes.
# - The relative position bias is one table row per displacement, gathered by a constant index.
# - Shifted windows plus the -100 mask equal attention restricted to each of the nine regions.
# - The gradient of a gather is a scatter-add.
