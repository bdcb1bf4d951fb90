"""``sparx-ref check``: the correctness oracle for other implementations.

Find out whether your own selective scan, cross scan, window attention, DMCA attention, or
whole SparX-Mamba / Swin / SparX-Swin is right, and if not, where it first goes wrong.

- :func:`write_golden` (``sparx-ref golden``): reference inputs, outputs and gradients as
  ``golden.npz`` + ``manifest.json``.
- :func:`check_golden` (``sparx-ref check``): compare a results file with a golden directory.
- :func:`check`: compute the oracle on your inputs and compare your outputs (and gradients).
- :func:`check_torch_module`: load the oracle's weights into your PyTorch model, hook the
  modules named like the released ones and compare block by block.

Every comparison returns a :class:`Report` (per-tensor rows: max abs and relative error,
index of the worst element, pass/fail; ``.passed``, ``.first_divergence``).
"""
from __future__ import annotations

from .golden import (check, check_golden, golden_inputs, load_golden, oracle_results,
                     write_golden)
from .cli import main
from .report import Report, Row

__all__ = ["check", "check_golden", "check_torch_module", "torch_results", "write_golden", "load_golden",
           "golden_inputs", "oracle_results", "main", "Report", "Row"]


def __getattr__(name):
    if name in ("check_torch_module", "torch_results"):      # import torch only when asked for
        from . import torch_module
        return getattr(torch_module, name)
    raise AttributeError(f"module 'sparx_ref.check' has no attribute {name!r}")


# ``sparx_ref.check`` is both this package and, lazily, the function :func:`check` (see
# ``sparx_ref/__init__.py``). Once the package is imported, Python binds the attribute
# ``sparx_ref.check`` to the module, so the module itself is made callable: ``sparx_ref.check(
# name, inputs, outputs, ...)`` calls :func:`check` either way.
class _CallableModule(__import__("types").ModuleType):
    def __call__(self, *args, **kwargs):
        return check(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
