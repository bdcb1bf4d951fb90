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
# # Lesson 4 — SparX: ganglion layers and sparse cross-layer connections
#
# SparX (Lou, Fu, Yu; AAAI 2025) adds **sparse cross-layer connections** to a hierarchical
# backbone. A few blocks of each stage, the **ganglion layers**, receive the outputs of
# several earlier blocks (concatenated along channels) and fuse them into their token mixer
# with a *dynamic multi-layer channel aggregator* (DMCA). Ordinary blocks ("normal layers")
# receive nothing extra. In this lesson:
#
# 1. the wiring rule (`dense_step`, `dense_start`, `max_dense_depth`) and a literal replay
#    of the released code's list bookkeeping,
# 2. connectivity diagrams of SparX-Mamba T, S and B,
# 3. DMCA's grouped **channel** attention,
# 4. what sparsity buys: channels read per layer and FLOPs, dense vs sparse.

# %%
import numpy as np

from sparx_ref import viz
from sparx_ref.models import configs
from sparx_ref.models.wiring import STAGE_INPUT, dense_indices, ganglion_plan, source_name
from sparx_ref.ref import dmca
from sparx_ref.testing import rel_err
from sparx_ref.tolerances import tolerance

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The wiring rule
#
# Per stage, the ganglion indices are counted **from the end of the stage**: start at
# `depth - 1`, step down by `dense_step`, keep indices `>= dense_start`. So the last block of
# a stage is always a ganglion layer (when `depth - 1 >= dense_start`). A ganglion layer's
# shortcut is, in concatenation order:
#
# - the **stage input** (the previous stage's downsampled output), only for the first
#   ganglion layer of the stage;
# - the outputs of the **normal layers since the previous ganglion layer**;
# - the outputs of the last `max_dense_depth` **earlier ganglion layers**.
#
# `sparx_ref.models.wiring.ganglion_plan` is the one function that answers this; the NumPy
# model, the PyTorch twin, SparX-Swin and the figures all call it.

# %%
for name, cfg in configs.SPARX_MAMBA_VARIANTS.items():
    dc = cfg["dense_config"]
    idx = [dense_indices(d, st, s0) for d, st, s0 in zip(cfg["depths"], dc["dense_step"], dc["dense_start"])]
    print(f"{name}: depths {cfg['depths']}, ganglion indices {idx}")
plan_t = viz.plan_for("sparx_mamba_t")
assert [[b.idx for b in stage if b.ganglion] for stage in plan_t] == [[], [1], [0, 2, 4, 6], [0, 1]]

for stage in plan_t:
    for b in stage:
        if b.ganglion:
            print(f"  T layers.{b.stage}.blocks.{b.idx} <- {list(b.sources)}  ({b.shortcut_channels} channels)")

# %% [markdown]
# The released code does not have a plan: it keeps two Python lists while it runs, `inner`
# and `cross`, and passes `inner + cross` to each ganglion layer. Replaying that bookkeeping
# literally (names instead of tensors) must give the same plan: **two views agree**. S is
# the interesting case: its stage 2 layer 13 has lost `s2.l1` to the `max_dense_depth = 3`
# cap.

# %%
def replay_released(depths, dense_config):
    """The released layer_forward's list bookkeeping, with names instead of tensors."""
    received = {}
    for stage, depth in enumerate(depths):
        step, start = dense_config["dense_step"][stage], dense_config["dense_start"][stage]
        cap = dense_config["max_dense_depth"][stage]
        dense_idx = list(reversed(range(depth - 1, start - 1, -step)))
        inner, cross = [], []
        if stage > 0:
            inner.append(STAGE_INPUT)
        for idx in range(depth):
            if idx in dense_idx:
                shortcut = inner          # the same list object...
                shortcut.extend(cross)    # ...extended in place, as in the released code
                received[(stage, idx)] = list(shortcut)
                cross.append(source_name(stage, idx))
                inner = []
            else:
                inner.append(source_name(stage, idx))
            if len(cross) > cap:
                cross = cross[-cap:]
    return received


for name, cfg in configs.SPARX_MAMBA_VARIANTS.items():
    plan = ganglion_plan(cfg["depths"], cfg["dims"], cfg["dense_config"])
    from_plan = {(b.stage, b.idx): list(b.sources) for stage in plan for b in stage if b.ganglion}
    assert from_plan == replay_released(cfg["depths"], cfg["dense_config"]), name
plan_s = viz.plan_for("sparx_mamba_s")
assert list(plan_s[2][13].sources) == ["s2.l11", "s2.l12", "s2.l4", "s2.l7", "s2.l10"]
print("plan == literal replay for T, S and B; S layers.2.blocks.13 <-", list(plan_s[2][13].sources))

# %% [markdown]
# ## 2. Connectivity diagrams
#
# Orange squares are ganglion layers, grey circles normal layers, green diamonds the stage
# inputs; arcs are the sparse cross-layer connections.

# %%
viz.connectivity_diagrams(("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"))

# %% [markdown]
# ## 3. DMCA: attention across channels
#
# Inside a ganglion layer's token mixer (spec `docs/spec/sparx_mamba.md` §7):
#
# 1. the concatenated shortcut (width $c$) is normalised jointly and projected by `d_proj`
#    to $2d$ channels: the first $d$ feed the keys, the last $d$ the values;
# 2. the queries come from the block's own (normed) input $x$;
# 3. q and k are spatially reduced (stride `sr_ratio`), v keeps full resolution;
# 4. **channel attention** in 4 groups: the *tokens are channels*, the feature axis is the
#    reduced spatial positions. Per image and group, with $g = d/4$ channels,
#    $A = \mathrm{softmax}(q k^\top / \sqrt{s_H s_W}) \in \mathbb{R}^{g\times g}$ and the
#    output is $A v$;
# 5. $x$, the attention output and $v$ are concatenated, channel-shuffled and fused by a
#    grouped 1x1 conv into the SSM's input.
#
# Because `d_proj` has already mixed all sources into every channel, **DMCA's attention mixes
# channels, not sources**: a row of $A$ says which *projected* channels a query channel
# reads, not which earlier layer.

# %%
B_, d, H, W, sr = 2, 16, 8, 8, 2
Ls = (H // sr) * (W // sr)
q = rng.standard_normal((B_, d, Ls))
k = rng.standard_normal((B_, d, Ls))
v = rng.standard_normal((B_, d, H * W))
out, cache = dmca.dmca_attention_fwd(q, k, v)
attn = cache["attn"]                                                 # (B, 4, g, g)
g = d // 4
assert attn.shape == (B_, 4, g, g)
assert np.allclose(attn.sum(-1), 1.0), "each row is a softmax over the channels of its group"
# by hand for image 1, group 2
qj, kj, vj = (a[1, 2 * g:3 * g] for a in (q, k, v))
scores = qj @ kj.T / np.sqrt(Ls)
A = np.exp(scores - scores.max(1, keepdims=True))
A /= A.sum(1, keepdims=True)
assert rel_err(attn[1, 2], A) <= tolerance("float64", "two_views")
assert rel_err(out[1, 2 * g:3 * g], A @ vj) <= tolerance("float64", "two_views")
# channels of different groups never mix
v2 = v.copy()
v2[:, :g] += 1.0                                                      # change group 0 only
out2, _ = dmca.dmca_attention_fwd(q, k, v2)
assert np.array_equal(out2[:, g:], out[:, g:])

# %% [markdown]
# The whole input path of a ganglion layer (`dmca_fwd`, released initialisation) on a
# shortcut made of three sources:

# %%
c = 3 * d
params = dmca.dmca_init_params(d, c, sr, 2 * d, rng)
x_in = rng.standard_normal((B_, d, H, W))
shortcut = rng.standard_normal((B_, c, H, W))
fused, cache_full = dmca.dmca_fwd(x_in, shortcut, params, sr_ratio=sr, out_channels=2 * d)
print("x", x_in.shape, "+ shortcut", shortcut.shape, "-> fused SSM input", fused.shape)
assert fused.shape == (B_, 2 * d, H, W)
assert cache_full["attn"].shape == (B_, 4, g, g)
viz.dmca_attention_maps(cache_full["attn"], title="DMCA attention at initialisation (image 0)")

# %% [markdown]
# ## 4. What sparsity buys
#
# Compare the released sparse pattern with a **dense** one built by the same rule where
# every block of stages 1-3 is a ganglion layer and nothing is capped
# (`dense_step 1, dense_start 0, max_dense_depth 100`): block $i$ then reads all $i$ blocks
# before it, like DenseNet. The cost that grows with the shortcut width $c$ is `d_proj`:
# a depthwise 3x3 on $c$ channels and a 1x1 from $c$ to $2d$, i.e. $(9 + 2d)\,c\,HW$
# multiply-adds.

# %%
for name in ("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"):
    cost = viz.cross_layer_cost(name)
    ratio = cost["dense_total_flops"] / cost["sparse_total_flops"]
    print(f"{name}: cross-layer d_proj {cost['sparse_total_flops'] / 1e9:.2f} GFLOPs sparse vs "
          f"{cost['dense_total_flops'] / 1e9:.2f} dense ({ratio:.1f}x); largest shortcut "
          f"{max(cost['sparse_channels'])} vs {max(cost['dense_channels'])} channels")
    assert cost["sparse_total_flops"] < cost["dense_total_flops"]
    assert max(cost["sparse_channels"]) <= max(cost["dense_channels"])
# the deeper the stage, the more sparsity saves: S and B save far more than T
assert viz.cross_layer_cost("sparx_mamba_b")["dense_total_flops"] > \
    4 * viz.cross_layer_cost("sparx_mamba_b")["sparse_total_flops"]
viz.cost_plot(("sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"))

# %% [markdown]
# With `max_dense_depth = 3`, a ganglion layer of S or B reads at most 5 sources, however
# deep the stage: the cost per layer stays flat, where dense connections grow linearly
# with depth (and their total quadratically).
#
# ## Summary
#
# - One rule, counted from the end of each stage, picks the ganglion layers and their
#   sources; the plan equals a literal replay of the released bookkeeping.
# - DMCA attends over channels (in 4 groups), with queries from the block input and
#   keys/values from the projected concatenation of earlier outputs.
# - Sparse connections keep each ganglion layer's input width bounded.
