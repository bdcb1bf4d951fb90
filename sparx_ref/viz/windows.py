"""Swin's shifted windows: the nine mask regions and the resulting -100 mask.

After the cyclic shift (roll by -s on H and W), the bottom and right bands of the grid hold
pixels that were far apart before the shift. Cells are labelled by (row band, column band)
in the *shifted* frame, bands ``[0, H-M), [H-M, H-s), [H-s, H)``: nine labels. Inside a
window, a query may only attend to keys with its own label; other pairs get -100 in
``sparx_ref.ref.window_attention.shifted_window_mask``.
"""
from __future__ import annotations

import numpy as np

from ._common import finish, new_figure

__all__ = ["region_labels", "mask_from_labels", "shifted_window_regions"]


def region_labels(H: int, W: int, M: int, shift: int) -> np.ndarray:
    """(H, W) int labels 0..8 = 3 * row_band + col_band in the shifted frame (the drawing's
    view of the rule; :func:`mask_from_labels` rebuilds the op's mask from it for checking)."""
    if not (0 < shift < M <= min(H, W)):
        raise ValueError(f"need 0 < shift < M <= min(H, W), got H={H}, W={W}, M={M}, shift={shift}")

    def bands(size):
        edges = np.array([size - M, size - shift])
        return np.searchsorted(edges, np.arange(size), side="right")

    return 3 * bands(H)[:, None] + bands(W)[None, :]


def mask_from_labels(labels: np.ndarray, M: int) -> np.ndarray:
    """(nW, N, N) mask, -100 where two cells of a window carry different labels, else 0."""
    from ..ref.window_attention import window_partition
    win = window_partition(labels[None, :, :, None].astype(np.float64), M)[:, :, 0]
    return np.where(win[:, None, :] != win[:, :, None], -100.0, 0.0)


def shifted_window_regions(H: int, W: int, M: int, shift: int, window=None, save=None):
    """Three panels: the nine regions with the window grid, the mask of one window (default:
    the bottom-right one, which meets all four kinds of region) and the original position
    of every cell (where the roll brought it from)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle
    from ..ref.window_attention import shifted_window_mask

    labels = region_labels(H, W, M, shift)
    mask = shifted_window_mask(H, W, M, shift)
    nW = (H // M) * (W // M)
    window = nW - 1 if window is None else window
    fig, axes = new_figure(11, 3.8, ncols=3)
    cmap = ListedColormap(["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                           "#edc948", "#b07aa1", "#ff9da7", "#9c755f"])
    ax = axes[0, 0]
    ax.imshow(labels, cmap=cmap, vmin=-0.5, vmax=8.5)
    for r in range(H):
        for c in range(W):
            ax.text(c, r, str(labels[r, c]), ha="center", va="center", fontsize=5 if H > 12 else 7,
                    color="white")
    for b in range(0, H + 1, M):
        ax.axhline(b - 0.5, color="k", lw=2)
    for b in range(0, W + 1, M):
        ax.axvline(b - 0.5, color="k", lw=2)
    wr, wc = divmod(window, W // M)
    ax.add_patch(Rectangle((wc * M - 0.5, wr * M - 0.5), M, M, fill=False, edgecolor="cyan", lw=3))
    ax.set_title(f"9 regions in the shifted frame\n(H={H}, W={W}, M={M}, shift={shift}; black = windows)",
                 fontsize=8)
    ax = axes[0, 1]
    ax.imshow(mask[window], cmap="gray_r", vmin=-100, vmax=0)
    ax.set_title(f"attn_mask of window {window} (cyan): black = -100", fontsize=8)
    ax.set_xlabel("key token", fontsize=7)
    ax.set_ylabel("query token", fontsize=7)
    ax = axes[0, 2]
    rows = (np.arange(H)[:, None] + shift) % H
    cols = (np.arange(W)[None, :] + shift) % W
    ax.imshow(rows * W + cols, cmap="twilight")
    for b in range(0, H + 1, M):
        ax.axhline(b - 0.5, color="k", lw=2)
    for b in range(0, W + 1, M):
        ax.axvline(b - 0.5, color="k", lw=2)
    ax.set_title("where each cell came from before the roll\n(original flat index, colour)", fontsize=8)
    for a in axes[0]:
        a.tick_params(labelsize=6)
    return finish(fig, save)
