"""Small helpers shared by the figure functions.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never with
pyplot's global state: no window opens, nothing leaks between calls, saving renders with
the Agg canvas, and a notebook still displays the returned Figure inline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplot_kw):
    """A Figure with an (nrows, ncols) grid of axes; returns (fig, axes as a 2-D array)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def finish(fig, save=None, dpi: int = 120):
    """Save the figure if ``save`` is a path (folders are created); return the figure."""
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def to_numpy(a) -> np.ndarray:
    """A torch tensor (any device), CuPy array or array-like -> NumPy array."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    elif hasattr(a, "get") and hasattr(a, "__cuda_array_interface__"):
        a = a.get()
    return np.asarray(a)
