"""Checkpoint I/O: released .pth files, .npz (and .safetensors when installed) <-> NumPy arrays.

    state = sparx_ref.load_checkpoint("sparx_mamba_tiny_in1k.pth")   # dict name -> np.ndarray
    numpy_model.load_state_dict(state)                                # NumPy model
    twin.load_state_dict(to_torch_state_dict(state))                  # PyTorch twin

``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects. The usual wrappers ``{"model": ...}``,
``{"state_dict": ...}`` (and ``{"module.": ...}`` prefixes left by DataParallel) are unwrapped.
timm-layout Swin checkpoints are converted to the original Swin layout by the hook in
:mod:`sparx_ref.models.swin` when that module provides it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
SUFFIXES = (".pth", ".pt", ".bin", ".npz", ".safetensors")


def _is_array_like(v) -> bool:
    return isinstance(v, np.ndarray) or hasattr(v, "detach") or np.isscalar(v)


def unwrap_state_dict(obj) -> Mapping:
    """Return the flat name -> tensor mapping inside a checkpoint object.

    Descends through {"model": ...}, {"state_dict": ...} (and similar) wrappers until every
    value is a tensor or array, then strips a common "module." prefix (DataParallel).
    """
    seen = 0
    while isinstance(obj, Mapping) and not all(_is_array_like(v) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if key is None or seen > 4:
            found = {k: type(v).__name__ for k, v in obj.items()}
            raise ValueError(f"cannot find a state_dict in this checkpoint: top-level entries "
                             f"{found}; expected tensors, or a {list(WRAPPER_KEYS)} wrapper")
        obj, seen = obj[key], seen + 1
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must hold a mapping of name -> tensor, got "
                         f"{type(obj).__name__}")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return obj


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def to_numpy_state_dict(state: Mapping) -> "OrderedDict[str, np.ndarray]":
    """Any name -> tensor/array mapping (torch state_dict included) -> name -> np.ndarray."""
    return OrderedDict((k, _to_numpy(v)) for k, v in unwrap_state_dict(state).items())


def to_torch_state_dict(state: Mapping, dtype=None) -> "OrderedDict":
    """name -> np.ndarray (a NumPy model's state_dict) -> name -> torch.Tensor.

    Floating arrays are cast to ``dtype`` (a torch dtype) when given; integer buffers
    (``num_batches_tracked``) stay int64.
    """
    import torch

    out = OrderedDict()
    for k, v in state.items():
        t = torch.as_tensor(np.array(_to_numpy(v), copy=True))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t
    return out


def _convert_layout(state: "OrderedDict[str, np.ndarray]") -> "OrderedDict[str, np.ndarray]":
    """Convert timm-layout Swin checkpoints to the original Swin layout (hook by the Swin model)."""
    try:
        from .models.swin import convert_timm_swin_state_dict, is_timm_swin_state_dict
    except ImportError:
        return state
    if is_timm_swin_state_dict(state):
        return OrderedDict(convert_timm_swin_state_dict(state))
    return state


def load_checkpoint(path, convert: bool = True) -> "OrderedDict[str, np.ndarray]":
    """Read a checkpoint file into name -> np.ndarray (torch's key order kept).

    .pth/.pt/.bin: ``torch.load(map_location="cpu", weights_only=True)``; .npz: ``np.load``
    (no pickles); .safetensors: needs the ``safetensors`` package. ``convert`` applies the
    timm-Swin layout hook.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) (only "
                             f"tensors and plain containers are accepted): {err}") from err
        state = to_numpy_state_dict(obj)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            state = to_numpy_state_dict(OrderedDict((k, data[k]) for k in data.files))
    elif suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(f"{path}: reading .safetensors needs the 'safetensors' package "
                              f"(pip install safetensors)") from err
        state = to_numpy_state_dict(OrderedDict(load_file(str(path))))
    else:
        raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; expected one of {SUFFIXES}")
    return _convert_layout(state) if convert else state


def save_checkpoint(state: Mapping, path) -> Path:
    """Write name -> array/tensor to ``path`` (.pth via torch.save of tensors, .npz, or
    .safetensors), in the mapping's order. Returns the path."""
    path = Path(path)
    state = to_numpy_state_dict(state)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin"):
        import torch

        torch.save(to_torch_state_dict(state), path)
    elif suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, **state)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    else:
        raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; expected one of {SUFFIXES}")
    return path
