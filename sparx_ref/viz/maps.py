"""Heat maps: DMCA channel attention, the scan seen as attention, feature maps.

- :func:`dmca_attention_maps`: the ganglion layer's grouped channel attention, one g x g
  map per group (``cache["attn"]`` of :func:`sparx_ref.ref.dmca.dmca_attention_fwd`, or a
  model's recorded ``layers.{s}.blocks.{i}.op.attn``).
- :func:`scan_orders`: the four SS2D scan orders drawn as paths on an H x W grid.
- :func:`scan_attention_maps`: the selective scan's materialised matrix
  (:func:`sparx_ref.ref.scan.scan_matrix`) read as attention: for one query pixel, how much
  each pixel of the image contributes to its output, per scan direction and merged.
- :func:`feature_maps`: rows of channel-mean feature maps (e.g. sources vs the aggregated
  input of a ganglion layer).

The pixel order of each scan direction comes from :func:`sparx_ref.ref.ss2d.cross_scan`
applied to an image of pixel indices, so the figures use the same op as the model.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ._common import finish, new_figure, to_numpy

__all__ = ["scan_pixel_order", "dmca_attention_maps", "scan_orders", "scan_attention_maps",
           "query_attention", "feature_maps"]

DIRECTION_NAMES = ("0: row-major", "1: column-major", "2: row-major reversed", "3: column-major reversed")


def scan_pixel_order(H: int, W: int) -> np.ndarray:
    """order (4, H*W): ``order[k, t]`` = flat pixel index ``h*W + w`` read at step t of direction k.

    Computed by cross-scanning an image whose pixel values are their own indices.
    """
    from ..ref.ss2d import cross_scan
    index_image = np.arange(H * W, dtype=np.float64).reshape(1, 1, H, W)
    order = cross_scan(index_image)[0, :, 0, :]                   # (4, L)
    return np.rint(order).astype(np.int64)


def dmca_attention_maps(attn, image_index: int = 0, title="DMCA channel attention (softmax over channels)",
                        save=None):
    """Heat maps of a ganglion layer's channel attention.

    attn: (B, groups, g, g) or (groups, g, g); entry [j, i, i'] is how much channel i' of
    group j (a key/value *channel*, not a source or a pixel) contributes to channel i.
    Each row sums to 1.
    """
    attn = to_numpy(attn)
    if attn.ndim == 4:
        attn = attn[image_index]
    if attn.ndim != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"attn must be (B, groups, g, g) or (groups, g, g), got shape {attn.shape}")
    groups, g, _ = attn.shape
    fig, axes = new_figure(2.3 * groups + 0.6, 2.6, ncols=groups)
    for j in range(groups):
        ax = axes[0, j]
        im = ax.imshow(attn[j], cmap="viridis", vmin=0.0, vmax=float(attn.max()))
        ax.set_title(f"group {j} (channels {j * g}..{(j + 1) * g - 1})", fontsize=8)
        ax.set_xlabel("key channel", fontsize=7)
        if j == 0:
            ax.set_ylabel("query channel", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return finish(fig, save)


def scan_orders(H: int, W: int, save=None):
    """Draw the four cross-scan orders on an H x W grid (arrows follow the scan; start = dot)."""
    order = scan_pixel_order(H, W)
    fig, axes = new_figure(2.4 * 4, 2.6 * H / max(W, 1) + 0.4, ncols=4)
    for k in range(4):
        ax = axes[0, k]
        rows, cols = np.divmod(order[k], W)
        ax.plot(cols, rows, "-", color="#bbbbbb", lw=1, zorder=1)
        ax.quiver(cols[:-1], rows[:-1], np.diff(cols), np.diff(rows), np.arange(H * W - 1),
                  cmap="plasma", angles="xy", scale_units="xy", scale=1, width=0.012, zorder=2)
        ax.scatter([cols[0]], [rows[0]], s=50, color="k", zorder=3)
        if H * W <= 36:
            for t, (r, c) in enumerate(zip(rows, cols)):
                ax.text(c + 0.12, r - 0.12, str(t), fontsize=6, color="#333333")
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_xticks(range(W))
        ax.set_yticks(range(H))
        ax.tick_params(labelsize=6)
        ax.set_title(f"direction {DIRECTION_NAMES[k]}", fontsize=8)
    return finish(fig, save)


def query_attention(matrices, H: int, W: int, query) -> np.ndarray:
    """Per direction, how much each pixel contributes to the output at ``query``.

    matrices: (4, L, L), direction k's scan matrix in *scan order* ([t, s]: output step t,
    input step s). query: (h, w). Returns (4, H, W): entry [k, h', w'] = M_k[t_q, s] where
    t_q is the query's step and s the step of pixel (h', w') in direction k.
    """
    matrices = to_numpy(matrices)
    L = H * W
    if matrices.shape != (4, L, L):
        raise ValueError(f"matrices must be (4, {L}, {L}) for a {H}x{W} map, got {matrices.shape}")
    qh, qw = query
    if not (0 <= qh < H and 0 <= qw < W):
        raise ValueError(f"query must lie in the {H}x{W} grid, got {query}")
    order = scan_pixel_order(H, W)                                 # step -> pixel
    maps = np.zeros((4, L), dtype=np.float64)
    for k in range(4):
        t_q = int(np.nonzero(order[k] == qh * W + qw)[0][0])
        maps[k, order[k]] = matrices[k, t_q, :]
    return maps.reshape(4, H, W)


def scan_attention_maps(matrices, H: int, W: int, query, image=None, save=None,
                        title="the scan as attention: weight of each pixel on the query's output"):
    """Draw :func:`query_attention` for the four directions, their sum (what cross-merge
    adds up) and, optionally, the image (channels-first (3, H, W) or (H, W)) with the query.

    Returns the Figure; the maps are in ``fig.query_maps`` ((4, H, W)) for checks.
    """
    maps = query_attention(matrices, H, W, query)
    panels = 5 + (image is not None)
    fig, axes = new_figure(2.2 * panels, 2.5, ncols=panels)
    col = 0
    if image is not None:
        img = to_numpy(image)
        if img.ndim == 3:
            img = np.clip(np.moveaxis(img, 0, -1), 0, 1)
        axes[0, 0].imshow(img, cmap=None if img.ndim == 3 else "gray")
        axes[0, 0].set_title("image", fontsize=8)
        col = 1
    from matplotlib.colors import LogNorm
    vmax = float(np.abs(maps).max()) or 1.0
    panels_data = [(maps[k], f"direction {DIRECTION_NAMES[k]}") for k in range(4)]
    panels_data.append((maps.sum(0), "merged (sum of 4)"))
    for j, (m, name) in enumerate(panels_data):
        ax = axes[0, col + j]
        top = vmax if j < 4 else (float(np.abs(m).max()) or 1.0)
        # log colour scale over 4 decades: the decay along each path stays visible
        im = ax.imshow(np.maximum(np.abs(m), top * 1e-4), cmap="magma", norm=LogNorm(vmin=top * 1e-4, vmax=top))
        ax.set_title(name, fontsize=8)
    fig.colorbar(im, ax=axes[0, -1], shrink=0.8, label="|weight| (log)")
    for ax in axes[0]:
        ax.scatter([query[1]], [query[0]], marker="x", color="cyan", s=40)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.query_maps = maps
    return finish(fig, save)


def feature_maps(rows: Mapping[str, object], image_index: int = 0, max_cols: int = 8,
                 title=None, save=None):
    """Rows of feature maps: for each named tensor (B, C, H, W) or (C, H, W), the channel
    mean of |x| followed by its ``max_cols - 1`` most active channels (by mean |x|)."""
    names = list(rows)
    fig, axes = new_figure(1.3 * max_cols + 1.2, 1.35 * len(names) + 0.5, nrows=len(names), ncols=max_cols)
    for r, name in enumerate(names):
        x = to_numpy(rows[name])
        if x.ndim == 4:
            x = x[image_index]
        if x.ndim != 3:
            raise ValueError(f"rows[{name!r}] must be (B, C, H, W) or (C, H, W), got {x.shape}")
        activity = np.abs(x).mean(axis=(1, 2))
        top = np.argsort(activity)[::-1][:max_cols - 1]
        panels = [(np.abs(x).mean(0), "mean |x|")] + [(x[c], f"ch {c}") for c in top]
        for c in range(max_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(panels):
                m, label = panels[c]
                ax.imshow(m, cmap="viridis" if c == 0 else "RdBu_r",
                          **({} if c == 0 else dict(vmin=-np.abs(m).max(), vmax=np.abs(m).max())))
                ax.set_title(label, fontsize=6)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return finish(fig, save)
