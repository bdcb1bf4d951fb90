"""Resolve a SparX-Mamba name + keyword overrides into one explicit configuration.

Shared by the NumPy model (:mod:`sparx_ref.models.sparx_mamba`) and the PyTorch twin
(:mod:`sparx_ref.torch_models.sparx_mamba`) so both accept exactly the same keywords: the
released ``SparXMamba`` class's names (docs/spec/sparx_mamba.md §1). Variant tables come from
:mod:`sparx_ref.models.configs`; the wiring (which blocks are ganglion layers and what they
receive) from :func:`sparx_ref.models.wiring.ganglion_plan`.
"""
from __future__ import annotations

import copy
import math

from . import configs
from .wiring import ganglion_plan

FAMILY = "sparx_mamba"
PER_STAGE = ("ssm_ratio", "mlp_ratio", "ls_init_value", "sr_ratio")
DENSE_KEYS = ("dense_step", "dense_start", "max_dense_depth", "cross_stage")
# released keywords accepted only at their released value (the alternatives are not built)
FIXED = {"ssm_init": "v0", "ssm_drop_rate": 0.0, "mlp_drop_rate": 0.0}


def resolve_config(name: str, **overrides) -> dict:
    """Return the full keyword set for ``name`` ("sparx_mamba", "sparx_mamba_t/s/b").

    Per-stage values (ssm_ratio, mlp_ratio, ls_init_value, sr_ratio and every dense_config
    entry) are lists with one entry per stage, as in the released class; ``dims`` may be an int
    (``dims * 2**i``). Adds the derived keys ``plan`` (the wiring plan), ``dt_ranks`` and
    ``drop_path`` (per block, linearly increasing). Unknown keywords raise TypeError.
    """
    if name == FAMILY:
        cfg = copy.deepcopy(configs.SPARX_MAMBA_DEFAULTS)
    elif name in configs.SPARX_MAMBA_VARIANTS:
        cfg = copy.deepcopy(configs.SPARX_MAMBA_DEFAULTS)
        cfg.update(copy.deepcopy(configs.SPARX_MAMBA_VARIANTS[name]))
    else:
        raise ValueError(f"unknown SparX-Mamba name {name!r}; expected 'sparx_mamba' or one of "
                         f"{sorted(configs.SPARX_MAMBA_VARIANTS)}")
    for key, value in overrides.items():
        if key in FIXED:
            if value != FIXED[key]:
                raise ValueError(f"{key}={value!r} is not supported; only the released "
                                 f"{FIXED[key]!r} is built")
            continue
        if key not in cfg:
            raise TypeError(f"unexpected keyword {key!r} for {name}; accepted: "
                            f"{sorted(cfg) + sorted(FIXED)}")
        cfg[key] = copy.deepcopy(value)

    depths = [int(d) for d in cfg["depths"]]
    num_stages = len(depths)
    dims = cfg["dims"]
    if isinstance(dims, int):
        dims = [int(dims * 2 ** i) for i in range(num_stages)]
    dims = [int(d) for d in dims]
    if len(dims) != num_stages:
        raise ValueError(f"dims must have one entry per stage ({num_stages}), got {dims}")
    cfg["depths"], cfg["dims"] = depths, dims
    for key in PER_STAGE:
        value = cfg[key]
        if not isinstance(value, (list, tuple)) or len(value) < num_stages:
            raise ValueError(f"{key} must be a list with one entry per stage ({num_stages}), "
                             f"got {value!r}")
        cfg[key] = list(value)[:num_stages]
    dense = cfg["dense_config"]
    if not isinstance(dense, dict) or any(k not in dense for k in DENSE_KEYS[:3]):
        raise ValueError(f"dense_config must be a dict with keys {DENSE_KEYS}, got {dense!r}")
    dense = {k: list(dense.get(k, [False] * num_stages))[:num_stages] for k in DENSE_KEYS}
    cfg["dense_config"] = dense
    if cfg["stem_type"] not in ("v1", "v2"):
        raise ValueError(f"stem_type must be 'v1' or 'v2', got {cfg['stem_type']!r}")
    if dims[0] % 2:
        raise ValueError(f"dims[0] must be even (the stem's first conv has dims[0]//2 channels), "
                         f"got {dims[0]}")

    cfg["plan"] = ganglion_plan(depths, dims, dense)
    for stage in cfg["plan"]:
        for block in stage:
            if block.ganglion and block.dim % 4:
                raise ValueError(f"layers.{block.stage}.blocks.{block.idx} is a ganglion layer; "
                                 f"its channel attention needs dims[{block.stage}] divisible by "
                                 f"4, got {block.dim}")
    rank = cfg["ssm_dt_rank"]
    cfg["dt_ranks"] = [math.ceil(d / 16) if rank == "auto" else int(rank) for d in dims]
    total = sum(depths)
    rate = float(cfg["drop_path_rate"])
    dpr = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]  # torch.linspace
    starts = [sum(depths[:s]) for s in range(num_stages)]
    cfg["drop_path"] = [dpr[starts[s]:starts[s] + depths[s]] for s in range(num_stages)]
    return cfg


def pretrained_cfg(name: str) -> dict:
    """Released preprocessing (and checkpoint URL) of a variant; {} for the generic name."""
    return copy.deepcopy(configs.SPARX_MAMBA_RELEASE.get(name, {}))
