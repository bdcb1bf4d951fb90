"""A minimal NumPy module system for whole models with a hand-written backward.

A :class:`Module` owns parameters, buffers and child modules, in registration order,
and flattens them into a state_dict in PyTorch's order (own entries in registration
order, then children depth-first), so released checkpoints map key for key. Register a
module's parameters before its buffers, as PyTorch lists them.

Own entries may have dotted names (``"d_proj.1.running_mean"``): a functional op whose
parameters are a dict keyed by released names (``sparx_ref.ref.dmca.dmca_fwd``) is
wrapped by a module that registers those names as they are. A child registered under
the empty name ``""`` is *transparent*: its keys get no extra prefix. Together these let
``op.d_norm.*``, ``op.d_proj.*``, ... sit between ``op.Ds`` and ``op.conv2d.*`` exactly as
in the released state_dict.

Conventions every module follows:
- ``forward(*inputs)`` computes the output and keeps what backward needs in ``self._cache``
  (one call in flight per module: a module used twice in one forward would need two
  instances).
- ``backward(dout)`` returns the gradient of the forward's input(s) and **accumulates**
  parameter gradients into ``self._grads[name]`` (``zero_grad()`` clears them).
- ``self.training`` switches BatchNorm between batch and running statistics.

Leaf modules (Conv2d, BatchNorm2d, GroupNorm, LayerNorm, Linear, GELU, ...) wrap the
functional ops of :mod:`sparx_ref.ref.layers`; see :mod:`sparx_ref.models.layers`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Mapping

import numpy as np


class Module:
    """Base class: parameters, buffers, children, state_dict, grads, train/eval."""

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_order", [])  # own entry names, registration order
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "training", False)

    # -- registration -------------------------------------------------------------------
    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        self._params[name] = np.asarray(value)
        self._order.append(name)
        return self._params[name]

    def add_buffer(self, name: str, value: np.ndarray) -> np.ndarray:
        self._buffers[name] = np.asarray(value)
        self._order.append(name)
        return self._buffers[name]

    def add_child(self, name: str, module: "Module | None") -> "Module | None":
        """Register a child; None registers nothing but still *uses up* an index name
        (like torch's Identity at index 0 of a Sequential, the key simply never appears)."""
        if module is not None:
            self._children[name] = module
        return module

    def __getattr__(self, name):
        for store in ("_params", "_buffers", "_children"):
            d = self.__dict__.get(store)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._children[name] = value
        elif name in self.__dict__.get("_params", {}):
            self._params[name] = value
        elif name in self.__dict__.get("_buffers", {}):
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    # -- traversal -----------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix and name else (prefix or name))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for mod_name, mod in self.named_modules(prefix):
            for n, p in mod._params.items():
                yield (f"{mod_name}.{n}" if mod_name else n), p

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and buffers under their PyTorch names, in PyTorch's order."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for mod_name, mod in self.named_modules():
            pre = f"{mod_name}." if mod_name else ""
            for n in mod._order:
                out[pre + n] = mod._params[n] if n in mod._params else mod._buffers[n]
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> dict:
        """Copy arrays into parameters and buffers (cast to each one's current dtype).

        With strict=True, any missing, unexpected or misshapen key raises a ValueError that
        lists all of them. Returns {"missing": [...], "unexpected": [...]}.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        misshapen = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(np.shape(state[k]))}"
                     for k in own if k in state and tuple(np.shape(state[k])) != tuple(own[k].shape)]
        if misshapen or (strict and (missing or unexpected)):
            raise ValueError("load_state_dict failed:"
                             + (f"\n  missing keys: {missing}" if missing else "")
                             + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                             + (f"\n  misshapen keys: {misshapen}" if misshapen else ""))
        for mod_name, mod in self.named_modules():
            pre = f"{mod_name}." if mod_name else ""
            for store in (mod._params, mod._buffers):
                for n in store:
                    if pre + n in state:
                        src = np.asarray(state[pre + n])
                        store[n] = src.astype(store[n].dtype, copy=True)
        return {"missing": missing, "unexpected": unexpected}

    def num_parameters(self) -> int:
        """Number of trainable scalars (buffers such as BN running stats excluded)."""
        return int(sum(p.size for _, p in self.named_parameters()))

    # -- gradients -----------------------------------------------------------------------
    def accumulate_grad(self, name: str, g: np.ndarray) -> None:
        if name not in self._params:
            raise KeyError(f"{type(self).__name__} has no parameter {name!r}")
        if name in self._grads:
            self._grads[name] = self._grads[name] + g
        else:
            self._grads[name] = np.array(g, dtype=self._params[name].dtype, copy=True)

    @property
    def grads(self) -> "OrderedDict[str, np.ndarray]":
        """Accumulated gradients keyed by full parameter name (zeros where none flowed)."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for mod_name, mod in self.named_modules():
            pre = f"{mod_name}." if mod_name else ""
            for n, p in mod._params.items():
                out[pre + n] = mod._grads.get(n, np.zeros_like(p))
        return out

    def zero_grad(self) -> None:
        for _, mod in self.named_modules():
            mod._grads.clear()

    # -- modes and dtype -----------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for _, mod in self.named_modules():
            object.__setattr__(mod, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def astype(self, dtype) -> "Module":
        """Cast every floating parameter and buffer to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        for _, mod in self.named_modules():
            for store in (mod._params, mod._buffers):
                for n, v in store.items():
                    if np.issubdtype(v.dtype, np.floating):
                        store[n] = v.astype(dtype)
        return self

    # -- computation ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class Sequential(Module):
    """Children named "0", "1", ...; ``None`` entries keep their index but register nothing
    (PyTorch's Identity placeholder), so keys like ``q.1.weight`` come out right."""

    def __init__(self, *modules: "Module | None"):
        super().__init__()
        self._run_order = []
        for i, m in enumerate(modules):
            self.add_child(str(i), m)
            if m is not None:
                self._run_order.append(m)

    def forward(self, x):
        for m in self._run_order:
            x = m.forward(x)
        return x

    def backward(self, dout):
        for m in reversed(self._run_order):
            dout = m.backward(dout)
        return dout
