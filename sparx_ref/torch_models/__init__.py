"""The PyTorch twins: plain PyTorch ``nn.Module``s with the released state_dict keys.

Named ``torch_models`` so it never shadows ``torch``. ``build_model(name, **overrides)``
mirrors :func:`sparx_ref.build_model`.
"""
from __future__ import annotations

import importlib

from ..models import MODEL_NAMES, family_of  # noqa: F401  (one list of names)

_FAMILIES = {
    "sparx_mamba": "sparx_ref.torch_models.sparx_mamba",
    "swin": "sparx_ref.torch_models.swin",
    "sparx_swin": "sparx_ref.torch_models.sparx_swin",
}


def build_model(name: str, **overrides):
    """Build a PyTorch twin: 'sparx_mamba[_t|_s|_b]', 'swin[_t|_s|_b]', 'sparx_swin[_t|_s|_b]'."""
    module = importlib.import_module(_FAMILIES[family_of(name)])
    return module.build(name, **overrides)
