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
# # Lesson 6 — Feature flow through the ganglion layers
#
# We train a small SparX-Mamba (the PyTorch twin, `sparx_ref.torch_models`) on a synthetic
# 10-class dataset in a couple of minutes on a laptop CPU, check its accuracy on held-out
# images, and then **measure** how much each earlier layer contributes to each ganglion
# layer.
#
# Everything needed lives in the package, so the demo and the tests reuse it:
# `sparx_ref.data.synthetic` (the generator and the training recipe) and
# `sparx_ref.viz.flow` (the measurements).

# %%
import numpy as np
import torch
from matplotlib.figure import Figure

from sparx_ref import viz
from sparx_ref.data import synthetic
from sparx_ref.viz import flow

train, test = synthetic.make_dataset()                    # 6,000 train + 1,500 held-out, seed 0
print(f"{len(train)} training and {len(test)} held-out images of {train.images.shape[1:]}")
assert len(train) >= 5000 and len(test) >= 1000

# %% [markdown]
# ## 1. The data
#
# Ten classes, several of which contain the *same parts* arranged differently ("bar left
# of dot" vs "dot left of bar", triangles up vs down, stripes horizontal vs vertical, "+" vs
# "x", ring vs disk), with random colours, positions, sizes, gradients and noise.

# %%
fig = Figure(figsize=(10, 2.4), layout="constrained")
axes = fig.subplots(2, 10)
for c in range(10):
    for r in range(2):
        image = train.images[np.nonzero(train.labels == c)[0][r]]
        axes[r, c].imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
        axes[r, c].axis("off")
    axes[0, c].set_title(synthetic.CLASS_NAMES[c].replace("_", " "), fontsize=6)
fig

# %% [markdown]
# ## 2. Train a small SparX-Mamba
#
# Widths 16-32-48-64, depths 1-2-3-1, 335k parameters; the released wiring rule with
# `dense_step [1, 1, 2, 1]`, `dense_start [100, 1, 0, 0]` puts ganglion layers in stages
# 1-3 (the plan is drawn below). Recipe: 4 epochs, AdamW, one-cycle cosine schedule, small
# random translations (`synthetic.train_small_sparx_mamba`). It trains on **one** thread:
# for tensors this small a second thread barely helps, and the second core is free for
# whatever else runs (the other lessons, under `make test`). The budget is 3 minutes on
# 2 cores; we check it as CPU time (at most 2 x 180 s), which does not depend on what else
# the machine is doing.

# %%
print(synthetic.SMALL_SPARX_MAMBA)
result = synthetic.train_small_sparx_mamba(train, test, threads=1)
for h in result.history:
    print(f"epoch {h['epoch']}: loss {h['loss']:.3f}, train accuracy {h['train_acc']:.3f}, {h['seconds']:.0f} s")
print(f"held-out accuracy {result.test_accuracy:.4f}; training took {result.seconds:.0f} s wall, "
      f"{result.cpu_seconds:.0f} s CPU on {result.threads} threads")
assert result.test_accuracy >= 0.90, "the lesson promises >= 90% on images not used for training"
assert result.cpu_seconds <= 2 * 180, "3 minutes on 2 cores"
model = result.model.eval()

# %%
viz.connectivity_diagram(model.plan, title="the small model's sparse cross-layer connections")

# %% [markdown]
# ## 3. Contributions by ablation
#
# For each ganglion layer and each of its sources, zero that source's channels in the
# concatenated shortcut and measure the relative change of the layer's output (the token
# mixer's output, the only part of the block that reads the shortcut), averaged over 500
# held-out images:
#
# $$\text{contribution}(\text{source}) = \operatorname{mean}_b \frac{\lVert o_b^{\text{ablated}} - o_b\rVert}{\lVert o_b\rVert}.$$
#
# (Zeroing a source also shifts `d_norm`'s statistics, one GroupNorm over the whole
# concatenation: the measurement is the full effect of removing the source.)

# %%
held_out = torch.from_numpy(synthetic.normalize(test.images[:500]))
measured = flow.ablation_contributions(model, held_out)
contributions, block_level = measured["op"], measured["block"]
shares = flow.d_proj_weight_shares(model)
print(f"{'ganglion layer':>18s}  {'source':>12s}  {'op change':>9s}  {'block change':>12s}  {'d_proj |W|^2 share':>18s}")
for (stage, idx), per_source in contributions.items():
    for source, value in per_source.items():
        print(f"{f'layers.{stage}.blocks.{idx}':>18s}  {source:>12s}  {value:9.3f}  "
              f"{block_level[(stage, idx)][source]:12.3f}  {shares[(stage, idx)][source]:18.3f}")

for (stage, idx), per_source in contributions.items():
    assert set(per_source) == set(model.plan[stage][idx].sources)
    assert all(v > 1e-3 for v in per_source.values()), "every source measurably changes its ganglion layer"
    # the residual path dilutes the change at the block's output
    assert all(block_level[(stage, idx)][s] < v for s, v in per_source.items())
    assert abs(sum(shares[(stage, idx)].values()) - 1.0) < 1e-6

# %% [markdown]
# The weight-norm share is a static proxy: a source whose columns of `d_proj`'s 1x1 conv
# are large *could* matter more. The ablation measures what the trained layer actually
# does with the data, so the two need not agree.
#
# ## 4. The feature-flow graph
#
# The connectivity diagram again, with each arc as wide as the measured contribution.

# %%
viz.feature_flow_graph(model.plan, contributions,
                       title="small SparX-Mamba: relative change of each ganglion layer when a source is removed")

# %% [markdown]
# ## 5. DMCA attention mixes channels, not sources
#
# Each ganglion layer's DMCA attention is a $g\times g$ map per group over **channels of the
# projected concatenation**. `d_proj` has already mixed every source into every one of
# those channels, so a row of the attention map cannot be read as "how much of layer X";
# that is what the ablation above is for.

# %%
model.record = True
with torch.no_grad():
    model(held_out[:8])
model.record = False
stage, idx = max(contributions, key=lambda k: len(contributions[k]))   # the layer with most sources
attn = model.recorded[f"layers.{stage}.blocks.{idx}.op.attn"]
g = model.plan[stage][idx].dim // 4
assert tuple(attn.shape) == (8, 4, g, g)
assert torch.allclose(attn.sum(-1), torch.ones(())), "rows are softmaxes over channels"
viz.dmca_attention_maps(attn, title=f"layers.{stage}.blocks.{idx}: DMCA attention over channels (image 0)")

# %% [markdown]
# ## 6. Source vs aggregated feature maps
#
# At 32x32 the deep maps are tiny (stage 1 is 4x4), so we look at a 4x4 mosaic of held-out
# images (128x128: the network is convolutional and scans any size). For the stage-1
# ganglion layer: its sources (the stage input and block 0's output), the `d_proj` output
# that aggregates them, and the fused input of its SSM.

# %%
mosaic = test.images[:16].reshape(4, 4, 3, 32, 32).transpose(2, 0, 3, 1, 4).reshape(1, 3, 128, 128)
rows = flow.source_feature_maps(model, torch.from_numpy(synthetic.normalize(mosaic)), stage=1, idx=1)
assert [name for name in rows][:2] == ["source stage_input", "source s1.l0"]
assert rows["d_proj (aggregated)"].shape[1:] == rows["source s1.l0"].shape[1:] == (16, 16)
fig = Figure(figsize=(3, 3), layout="constrained")
fig.subplots().imshow(np.clip(mosaic[0].transpose(1, 2, 0), 0, 1))
fig

# %%
viz.feature_maps(rows, title="layers.1.blocks.1: sources (rows 1-2) and what the ganglion layer makes of them")

# %% [markdown]
# ## Summary
#
# - A 335k-parameter SparX-Mamba learns the spatial-context task to >= 90% held-out accuracy
#   in minutes on a CPU.
# - Ablation measures each source's real contribution to a ganglion layer; the weight-norm
#   share of `d_proj` is only a proxy.
# - DMCA attends over channels of the aggregated features, not over sources.
