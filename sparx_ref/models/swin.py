"""The original Swin Transformer (v1) as a NumPy model with a hand-written backward.

Mirrors microsoft/Swin-Transformer ``models/swin_transformer.py`` (``SwinTransformer``) with
the ``swin_{tiny,small,base}_patch4_window7_224`` configs: same keyword names, same
state_dict keys, order and shapes (``tests/data/official_keys_swin_*.json``), same
arithmetic in float64 (docs/spec/swin.md is the contract; section numbers below refer to it).

Layout: tokens ``(B, L, C)`` with ``L = H*W`` row-major between modules (§2). Notation:
``M`` the window side actually used by a block (after the shrink rule, §4), ``N = M*M``,
``nW`` windows per image, ``s`` the shift.

This module is importable without PyTorch: the checkpoint loader calls
:func:`is_timm_swin_state_dict` and :func:`convert_timm_swin_state_dict` from here, and
the PyTorch twin (:mod:`sparx_ref.torch_models.swin`) reads its configuration and stage
geometry from :func:`resolve_config` and :func:`stage_geometry`.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

from .._validate import check_divisible
from . import configs

SWIN_NAMES = ("swin", "swin_t", "swin_s", "swin_b")
# keyword arguments of the released class that do not change the arithmetic here
_ACCEPTED_NOOPS = ("use_checkpoint", "fused_window_process", "norm_layer")


def _pair(value, name):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or an (H, W) pair of ints, got {value!r}")


def resolve_config(name: str, overrides: dict, defaults: dict | None = None,
                   variants: dict | None = None, names=SWIN_NAMES) -> dict:
    """Merge the variant table (``configs.SWIN_VARIANTS``) and the released class's
    defaults with ``overrides`` (released keyword names) and validate the result.

    ``name`` "swin" means the class defaults (Swin-T sizes). Returns a new dict with
    ``img_size`` and ``patch_size`` as (H, W) pairs and lists for depths / num_heads.
    """
    defaults = configs.SWIN_DEFAULTS if defaults is None else defaults
    variants = configs.SWIN_VARIANTS if variants is None else variants
    if name not in names:
        raise ValueError(f"unknown model name {name!r}; expected one of {names}")
    cfg = dict(defaults)
    cfg.update(variants.get(name, {}))
    unknown = sorted(set(overrides) - set(cfg) - set(_ACCEPTED_NOOPS))
    if unknown:
        raise TypeError(f"{name}: unknown keyword argument(s) {unknown}; accepted: {sorted(cfg)}")
    for k in _ACCEPTED_NOOPS:
        overrides = dict(overrides)
        value = overrides.pop(k, None)
        if k == "norm_layer" and value not in (None, "LayerNorm") and getattr(value, "__name__", "") != "LayerNorm":
            raise ValueError(f"norm_layer must be LayerNorm (the only norm of the released models), got {value!r}")
    cfg.update(overrides)
    cfg["img_size"] = _pair(cfg["img_size"], "img_size")
    cfg["patch_size"] = _pair(cfg["patch_size"], "patch_size")
    cfg["depths"] = [int(d) for d in cfg["depths"]]
    cfg["num_heads"] = [int(h) for h in cfg["num_heads"]]
    if len(cfg["depths"]) == 0 or len(cfg["depths"]) != len(cfg["num_heads"]):
        raise ValueError(f"depths {cfg['depths']} and num_heads {cfg['num_heads']} must be non-empty "
                         f"lists of the same length (one entry per stage)")
    if any(d < 1 for d in cfg["depths"]):
        raise ValueError(f"every stage needs at least one block, got depths={cfg['depths']}")
    for key in ("embed_dim", "window_size", "in_chans", "num_classes"):
        cfg[key] = int(cfg[key])
    if cfg["window_size"] < 1 or cfg["embed_dim"] < 1 or cfg["in_chans"] < 1 or cfg["num_classes"] < 0:
        raise ValueError(f"window_size, embed_dim and in_chans must be >= 1 and num_classes >= 0, got "
                         f"{cfg['window_size']}, {cfg['embed_dim']}, {cfg['in_chans']}, {cfg['num_classes']}")
    for i, heads in enumerate(cfg["num_heads"]):
        check_divisible(f"stage {i} width (embed_dim * 2**{i})", cfg["embed_dim"] * 2 ** i, heads,
                        f"num_heads[{i}]")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not 0.0 <= float(cfg[key]) < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {cfg[key]}")
    return cfg


def stage_geometry(cfg: dict) -> list[dict]:
    """Per stage: width, heads, token grid and each block's (window, shift) after the
    shrink rule (spec swin.md §4), validated so that the forward pass cannot fail.

    Returns a list of dicts ``dim, num_heads, H, W, blocks=[(M, shift), ...], downsample``.
    Raises ValueError naming the stage when a side is not divisible by its window or a
    pre-merge side is odd (the released code would die in the forward pass).
    """
    H = cfg["img_size"][0] // cfg["patch_size"][0]
    W = cfg["img_size"][1] // cfg["patch_size"][1]
    if H < 1 or W < 1:
        raise ValueError(f"img_size {cfg['img_size']} is smaller than patch_size {cfg['patch_size']}")
    num_stages = len(cfg["depths"])
    stages = []
    for i in range(num_stages):
        Hi, Wi = H // 2 ** i, W // 2 ** i
        if Hi < 1 or Wi < 1:
            raise ValueError(f"stage {i} has an empty token grid ({Hi} x {Wi}): img_size {cfg['img_size']} "
                             f"is too small for {num_stages} stages")
        blocks = []
        for j in range(cfg["depths"][i]):
            M = cfg["window_size"]
            shift = 0 if j % 2 == 0 else M // 2
            if min(Hi, Wi) <= M:  # shrink rule: `<=` and min(H, W)
                shift, M = 0, min(Hi, Wi)
            if Hi % M or Wi % M:
                raise ValueError(f"stage {i}: token grid {Hi} x {Wi} is not divisible by its window {M} "
                                 f"(img_size {cfg['img_size']}, patch_size {cfg['patch_size']}, "
                                 f"window_size {cfg['window_size']})")
            blocks.append((M, shift))
        downsample = i < num_stages - 1
        if downsample and (Hi % 2 or Wi % 2):
            raise ValueError(f"stage {i}: PatchMerging needs an even token grid, got {Hi} x {Wi} "
                             f"(img_size {cfg['img_size']})")
        stages.append(dict(dim=cfg["embed_dim"] * 2 ** i, num_heads=cfg["num_heads"][i], H=Hi, W=Wi,
                           blocks=blocks, downsample=downsample))
    return stages


def drop_path_rates(cfg: dict) -> list[list[float]]:
    """Stochastic-depth rate of every block: linspace(0, drop_path_rate, sum(depths)) in
    global block order, split per stage (spec swin.md §11)."""
    rates = np.linspace(0.0, float(cfg["drop_path_rate"]), sum(cfg["depths"])).tolist()
    out, start = [], 0
    for d in cfg["depths"]:
        out.append(rates[start:start + d])
        start += d
    return out


