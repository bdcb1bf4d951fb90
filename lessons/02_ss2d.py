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
# # Lesson 2 — SS2D: scanning an image in four directions
#
# A selective scan (lesson 1) reads a **sequence**. An image is 2-D, so VMamba's SS2D (and
# SparX-Mamba's token mixer) reads it as four sequences, the *cross scan*, runs the scan on
# each, and adds the four results back onto the pixel grid, the *cross merge*. In this
# lesson we
#
# 1. draw the four scan orders on a grid,
# 2. check that cross-merge is the adjoint (transpose) of cross-scan,
# 3. check that SS2D is exactly "cross-scan, scan, cross-merge",
# 4. read the scan's materialised matrix as an **attention map**: for one pixel of a real
#    (synthetic) image, how much every other pixel contributes to its output, per direction.

# %%
import numpy as np

from sparx_ref import viz
from sparx_ref.data.synthetic import CLASS_NAMES, generate
from sparx_ref.ref import scan, ss2d
from sparx_ref.testing import rel_err
from sparx_ref.tolerances import tolerance

rng = np.random.default_rng(0)
TWO_VIEWS = tolerance("float64", "two_views")

# %% [markdown]
# ## 1. The four scan orders
#
# Direction 0 reads row by row (index $hW + w$), direction 1 column by column (index
# $wH + h$, the transposed map), directions 2 and 3 are 0 and 1 backwards. A pixel's output
# in direction 0 depends on everything above it and to its left in the same row; the four
# directions together let every pixel see the whole image.
#
# The figure is drawn from `ss2d.cross_scan` itself: we cross-scan an image whose pixel
# values are their own indices, so each direction's sequence *is* its pixel order.

# %%
H, W = 4, 5                                   # non-square on purpose
order = viz.scan_pixel_order(H, W)            # (4, L): pixel index read at each step
L = H * W
rows, cols = np.divmod(np.arange(L), W)
assert np.array_equal(order[0], np.arange(L))                              # row-major
assert np.array_equal(order[1], (np.arange(L) % H) * W + np.arange(L) // H)  # column-major
assert np.array_equal(order[2], order[0][::-1]) and np.array_equal(order[3], order[1][::-1])
viz.scan_orders(H, W)

# %% [markdown]
# ## 2. Cross-merge is the adjoint of cross-scan
#
# Cross-scan is a linear map $S: \mathbb{R}^{C\times H\times W} \to \mathbb{R}^{4\times C\times L}$
# that only copies numbers. Its adjoint $S^\top$ adds every copy back to the pixel it came
# from, which is exactly what cross-merge does. So for any $x$ and $y$,
# $\langle S^\top y, x\rangle = \langle y, S x\rangle$. That is also why the backward of the
# cross-scan is a cross-merge (and vice versa): the gradient of a linear map is its adjoint.

# %%
for trial in range(5):
    B_, C_, H_, W_ = (int(v) for v in rng.integers(1, [4, 5, 7, 7]))
    x = rng.standard_normal((B_, C_, H_, W_))
    y = rng.standard_normal((B_, 4, C_, H_ * W_))
    lhs = np.sum(ss2d.cross_merge(y, H_, W_) * x)
    rhs = np.sum(y * ss2d.cross_scan(x))
    print(f"shape {(B_, C_, H_, W_)}: <merge(y), x> = {lhs:+.12f}   <y, scan(x)> = {rhs:+.12f}")
    assert abs(lhs - rhs) <= TWO_VIEWS * max(1.0, abs(rhs))

# every pixel is read exactly four times, so merge(scan(x)) = 4 x
x = rng.standard_normal((2, 3, H, W))
assert rel_err(ss2d.cross_merge(ss2d.cross_scan(x), H, W), 4 * x) == 0.0

# %% [markdown]
# ## 3. SS2D = cross-scan, selective scan, cross-merge
#
# `ss2d_scan_fwd(x, delta, A, B, C, D)` runs channel $kD_i + c$ = "channel c read in
# direction k". Each direction has its own $B$, $C$ (shared by its channels) and its own
# $\Delta$, $A$, $D$ per channel. Composing the three pieces by hand gives the same output:

# %%
batch, Di, N = 2, 3, 2
x = rng.standard_normal((batch, Di, H, W))
delta = rng.standard_normal((batch, 4 * Di, L)) * 0.5
A = -np.exp(rng.standard_normal((4 * Di, N)) * 0.3)
B = rng.standard_normal((batch, 4, N, L))
C = rng.standard_normal((batch, 4, N, L))
D = rng.standard_normal(4 * Di)
y_ss2d, _ = ss2d.ss2d_scan_fwd(x, delta, A, B, C, D, delta_softplus=True)
ys = scan.selective_scan(ss2d.cross_scan(x).reshape(batch, 4 * Di, L), delta, A, B, C, D,
                         delta_softplus=True)
y_by_hand = ss2d.cross_merge(ys.reshape(batch, 4, Di, L), H, W)
assert rel_err(y_ss2d, y_by_hand) <= TWO_VIEWS
print("ss2d_scan_fwd == cross_merge(scan(cross_scan(x))):", rel_err(y_ss2d, y_by_hand))

# %% [markdown]
# ## 4. The scan as attention, on an image
#
# Lesson 1 showed that a scan is multiplication by a lower-triangular matrix $M$ (per
# channel): $y_t = \sum_{s\le t} M[t,s]\,u_s$. For SS2D, direction $k$ has its own $M_k$ in
# its own order, and the merge adds them up. So the output at pixel $q$ is
#
# $$y_q = \sum_k \sum_{p} M_k[t_k(q), t_k(p)]\; x_p$$
#
# where $t_k(p)$ is the step at which direction $k$ reads pixel $p$. The map
# $p \mapsto M_k[t_k(q), t_k(p)]$ is an "attention map" of pixel $q$ in direction $k$.
#
# The scan is **selective**: $\Delta$ depends on the input. A large $\Delta_t$ (times a
# negative $A$) makes the gate $e^{\Delta_t A}$ small, so the state *forgets* what came
# before. Here we make $\Delta$ large on the edges of a shape (a hand-made selectivity,
# in a trained model `x_proj` learns it), so each pixel's memory is reset when a scan path
# crosses an edge: a pixel inside the disk attends to the disk.

# %%
data = generate(4, seed=5, size=24)
index = int(np.nonzero(data.labels == CLASS_NAMES.index("disk"))[0][0])
image = data.images[index].astype(np.float64)                   # (3, 24, 24)
Hi, Wi = image.shape[1:]
Li = Hi * Wi
gray = image.mean(0)
# edge strength: gradient magnitude of a lightly smoothed image
smooth = (gray + np.roll(gray, 1, 0) + np.roll(gray, -1, 0) + np.roll(gray, 1, 1) + np.roll(gray, -1, 1)) / 5
edges = np.hypot(np.diff(smooth, axis=0, append=smooth[-1:]), np.diff(smooth, axis=1, append=smooth[:, -1:]))
edges = edges / edges.max()

# one channel (Di = 1) read in 4 directions; delta follows the edges, in each direction's order
x_img = gray[None, None]                                        # (1, 1, H, W)
delta_img = ss2d.cross_scan((0.05 + 6.0 * edges)[None, None]).reshape(1, 4, Li)
A_img = -np.ones((4, 1))
B_img = np.ones((1, 4, 1, Li))
C_img = np.ones((1, 4, 1, Li))
M_img = scan.scan_matrix(delta_img, A_img, B_img, C_img)[0]      # (4, L, L)

# the disk's centre (brightest contrast with the background) as the query
ys_, xs_ = np.nonzero(np.abs(gray - np.median(gray)) > 0.5 * np.abs(gray - np.median(gray)).max())
query = (int(np.round(ys_.mean())), int(np.round(xs_.mean())))
fig = viz.scan_attention_maps(M_img, Hi, Wi, query, image=image)
maps = fig.query_maps                                           # (4, H, W)
fig

# %% [markdown]
# Two checks: the maps really are the scan (weighting the image by the merged map gives
# the SS2D output at the query), and the selectivity works (most of the attention stays
# inside the shape).

# %%
y_img, _ = ss2d.ss2d_scan_fwd(x_img, delta_img, A_img, B_img, C_img)
y_from_maps = np.sum(maps.sum(0) * gray)
print(f"SS2D output at the query {y_img[0, 0][query]:.10f}, from the attention maps {y_from_maps:.10f}")
assert abs(y_img[0, 0][query] - y_from_maps) <= TWO_VIEWS * abs(y_from_maps)

inside = np.zeros((Hi, Wi), dtype=bool)
inside[ys_, xs_] = True
share_inside = maps.sum(0)[inside].sum() / maps.sum()
print(f"share of the attention mass on the shape: {share_inside:.2f} "
      f"(the shape covers {inside.mean():.2f} of the image)")
assert share_inside > 0.8 and inside.mean() < 0.5

# without selectivity (constant delta) the same pixel attends along its whole scan paths
M_flat = scan.scan_matrix(np.full_like(delta_img, 0.05), A_img, B_img, C_img)[0]
maps_flat = viz.query_attention(M_flat, Hi, Wi, query)
share_flat = maps_flat.sum(0)[inside].sum() / maps_flat.sum()
print(f"with a constant delta the share is {share_flat:.2f}")
assert share_flat < share_inside

# %% [markdown]
# ## Summary
#
# - SS2D reads a map in four orders (row, column, and both reversed); cross-merge, the
#   adjoint of cross-scan, adds the four results back.
# - Each direction's scan is a causal, decaying attention along its own path; the merged
#   map is what a pixel "sees".
# - Input-dependent $\Delta$ makes the attention selective: the memory resets where $\Delta$
#   is large.
