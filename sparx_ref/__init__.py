"""sparx_ref: the reference implementation of SparX (Lou, Fu, Yu; AAAI 2025, arXiv 2409.09649).

- ``sparx_ref.ref``:          pure-NumPy ops, forward ``(out, cache)`` + hand-derived backward.
- ``sparx_ref.models``:       whole NumPy models (``sparx_ref.build_model``).
- ``sparx_ref.torch_models``: the PyTorch twins with the released state_dict keys.
- ``sparx_ref.kernels``:      Numba CPU / Numba-CUDA / CuPy kernels, one registry.
- ``sparx_ref.viz``, ``sparx_ref.data``: figures and the synthetic teaching dataset.

Heavy pieces are imported lazily, so ``import sparx_ref`` needs only NumPy and SciPy.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute", imported on first use
_LAZY = {
    "build_model": "sparx_ref.models:build_model",
    "load_checkpoint": "sparx_ref.checkpoint:load_checkpoint",
    "check": "sparx_ref.check:check",
    "tolerance": "sparx_ref.tolerances:tolerance",
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sparx_ref' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
