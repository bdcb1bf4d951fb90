"""Whole NumPy models built from the reference ops.

``build_model(name, **overrides)`` dispatches on the family name; each family module has a
``build(name, **overrides)``.
"""
from __future__ import annotations

import importlib

# name prefix -> module holding build(name, **overrides); longest prefix wins
_FAMILIES = {
    "sparx_mamba": "sparx_ref.models.sparx_mamba",
    "swin": "sparx_ref.models.swin",
    "sparx_swin": "sparx_ref.models.sparx_swin",
}
MODEL_NAMES = ("sparx_mamba", "sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b",
               "swin", "swin_t", "swin_s", "swin_b",
               "sparx_swin", "sparx_swin_t", "sparx_swin_s", "sparx_swin_b")


def family_of(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
    return max((f for f in _FAMILIES if name == f or name.startswith(f + "_")), key=len)


def build_model(name: str, **overrides):
    """Build a NumPy model: 'sparx_mamba[_t|_s|_b]', 'swin[_t|_s|_b]', 'sparx_swin[_t|_s|_b]'."""
    module = importlib.import_module(_FAMILIES[family_of(name)])
    return module.build(name, **overrides)
