"""Whole models for ``sparx-ref golden`` / ``sparx-ref check``: mini configurations, test weights
and the NumPy oracle run that records every block.

Names: a family name (``sparx_mamba``, ``swin``, ``sparx_swin``) means its *mini*
configuration below (small enough for a golden file with gradients); a variant name
(``sparx_mamba_t``, ``swin_b``, ...) means the full-size released configuration (224 x 224,
forward only unless gradients are asked for).

Test weights: the released initialisation leaves many tensors trivial (biases 0, norms 1/0,
BatchNorm running stats 0/1, A_logs = log(1..N)), which would hide bugs. Every parameter and
BatchNorm running statistic is therefore redrawn (:func:`random_weights`) so that activations
stay O(1) through the whole network, and rounded to float32 values so one set of weights
serves float32 and float64 implementations alike.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np

from ..models import MODEL_NAMES, build_model, family_of

FAMILIES = ("sparx_mamba", "swin", "sparx_swin")

# Mini configurations: every mechanism of the full models at a tiny size.
MINI_CONFIGS = {
    # the configuration of tests/data/golden_mini_a (released code): 4 stages, stage 2 with
    # the T dense pattern (ganglion layers 0, 2, 4, 6), channel padding in stages 2-3 (Di=40)
    "sparx_mamba": dict(depths=[2, 2, 7, 2], dims=[8, 12, 20, 20], num_classes=10,
                        input_shape=[2, 3, 64, 64]),
    # the configuration of tests/data/golden_swin_mini_b: stage 0 14x14 with shifted windows
    # in block 1, stage 1 7x7 (one window, no shift)
    "swin": dict(img_size=56, patch_size=4, embed_dim=12, depths=[2, 2], num_heads=[2, 2],
                 window_size=7, num_classes=10, input_shape=[2, 3, 56, 56]),
    # Swin's mini plus two ganglion layers in stage 1 (blocks 1 and 3, two sources each)
    "sparx_swin": dict(img_size=56, patch_size=4, embed_dim=12, depths=[2, 4], num_heads=[2, 2],
                       window_size=7, num_classes=10, sr_ratio=[4, 2],
                       dense_config=dict(dense_step=[1, 2], dense_start=[100, 0],
                                         max_dense_depth=[100, 3], cross_stage=[False, False]),
                       input_shape=[2, 3, 56, 56]),
}
FULL_INPUT_SHAPE = [1, 3, 224, 224]

# Activations every implementation must provide (outputs of released modules); the others
# (attention maps, sub-block tensors) are compared when present.
_REQUIRED_ACT = re.compile(r"^(patch_embed|layers\.\d+\.(blocks\.\d+|out|downsample))$")


def is_model(name: str) -> bool:
    return name in MODEL_NAMES


def required_activation(name: str) -> bool:
    """True for block-level activations (``patch_embed``, ``layers.{s}.blocks.{i}``,
    ``layers.{s}.out`` / ``layers.{s}.downsample``): a result file must have them."""
    return bool(_REQUIRED_ACT.match(name))


def model_config(name: str, overrides: dict | None = None) -> dict:
    """Mini (family name) or released (variant name) configuration + ``overrides``; includes
    ``input_shape`` [B, C, H, W]."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    if name in MINI_CONFIGS:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MINI_CONFIGS[name].items()}
    else:
        cfg = dict(input_shape=list(FULL_INPUT_SHAPE))
    cfg.update(overrides or {})
    return cfg


def build_oracle(name: str, config: dict, seed: int = 0):
    """The NumPy model (float64, eval mode) with :func:`random_weights` drawn from ``seed``."""
    kwargs = {k: v for k, v in config.items() if k != "input_shape"}
    model = build_model(name, dtype=np.float64, seed=seed, **kwargs)
    model.eval()
    model.load_state_dict(random_weights(model, np.random.default_rng(seed)))
    return model


def _fan_in(shape) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def random_weights(model, rng) -> "OrderedDict[str, np.ndarray]":
    """A full state_dict of non-trivial test weights for ``model`` (float32-exact float64).

    conv/linear weights ~ N(0, 1/fan_in) (depthwise convs and the residual ``pos_embed`` /
    ``mlp.dwconv`` at 0.2 of that scale), biases ~ N(0, 0.1^2), norm weights ~ N(1, 0.2^2),
    LayerScale ~ N(1, 0.1^2), BatchNorm running_mean ~ N(0, 0.2^2), running_var ~ U(0.5, 1.5),
    SSM: x_proj_weight ~ N(0, 1/Di), dt_projs_weight ~ U(-1, 1)/sqrt(R), dt_projs_bias =
    softplus^-1(logU(0.01, 0.5)), A_logs ~ U(-0.5, 1), Ds ~ U(0.5, 1.5); relative position
    bias tables ~ N(0, 0.5^2). Integer and constant buffers (num_batches_tracked,
    relative_position_index, attn_mask) are kept.
    """
    params = set(dict(model.named_parameters()))
    state = OrderedDict()
    for key, value in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        shape = value.shape
        if value.dtype.kind != "f" or (key not in params and leaf not in ("running_mean", "running_var")):
            state[key] = value.copy()
            continue
        if leaf == "running_mean":
            new = rng.normal(0.0, 0.2, shape)
        elif leaf == "running_var":
            new = rng.uniform(0.5, 1.5, shape)
        elif leaf == "x_proj_weight":
            new = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape)
        elif leaf == "dt_projs_weight":
            new = rng.uniform(-1.0, 1.0, shape) / math.sqrt(shape[2])
        elif leaf == "dt_projs_bias":
            dt = np.exp(rng.uniform(math.log(0.01), math.log(0.5), shape))
            new = dt + np.log(-np.expm1(-dt))
        elif leaf == "A_logs":
            new = rng.uniform(-0.5, 1.0, shape)
        elif leaf == "Ds":
            new = rng.uniform(0.5, 1.5, shape)
        elif leaf == "relative_position_bias_table":
            new = rng.normal(0.0, 0.5, shape)
        elif "layerscale" in key:
            new = rng.normal(1.0, 0.1, shape) if leaf == "weight" else rng.normal(0.0, 0.1, shape)
        elif leaf == "bias":
            new = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1:                                   # norm weights
            new = rng.normal(1.0, 0.2, shape)
        else:                                                   # conv / linear weights
            scale = 1.0 / math.sqrt(_fan_in(shape))
            if len(shape) == 4 and shape[1] == 1 and ("pos_embed" in key or "dwconv" in key):
                scale *= 0.2                                    # residual depthwise convs
            new = rng.normal(0.0, scale, shape)
        state[key] = new.astype(np.float32).astype(value.dtype)
    return state


# Inside a block, the order in which the recorded tensors are computed (the models record a few
# of them out of that order, e.g. the DMCA maps after the block output in SparX-Swin).
_BLOCK_STEPS = ("dmca.d_proj", "dmca.attn", "dmca.in_proj_padded",            # SparX-Swin ganglion
                "op.d_proj", "op.attn", "op.in_proj_padded", "op.ssm_out", "op",  # SparX-Mamba
                "attn_in", "attn_probs", "attn", "mid")                          # (S)W-MSA
_BLOCK_KEY = re.compile(r"^(layers\.\d+\.blocks\.\d+)(?:\.(.+))?$")


def forward_order(recorded: "OrderedDict") -> "OrderedDict":
    """Recorded activations in computation order: blocks in the order they ran, and inside a
    block its steps as in ``_BLOCK_STEPS`` (unknown ones after them), the block output last."""
    groups = OrderedDict()
    for key in recorded:
        m = _BLOCK_KEY.match(key)
        groups.setdefault(m.group(1) if m else key, []).append(key)

    def rank(key):
        sub = _BLOCK_KEY.match(key).group(2) if _BLOCK_KEY.match(key) else None
        if sub is None:
            return len(_BLOCK_STEPS) + 1                      # the block output (or a non-block key)
        return _BLOCK_STEPS.index(sub) if sub in _BLOCK_STEPS else len(_BLOCK_STEPS)

    return OrderedDict((k, recorded[k]) for keys in groups.values() for k in sorted(keys, key=rank))


def run_oracle(model, x: np.ndarray, cotangent: np.ndarray | None):
    """Forward (recording every block) and, with a cotangent, backward of the NumPy model.

    Returns (logits, activations OrderedDict in forward order, grads or None) where grads
    has ``"x"`` and every parameter name.
    """
    model.record = True
    logits = model.forward(x)
    acts = forward_order(model.recorded)
    model.record = False
    if cotangent is None:
        return logits, acts, None
    if hasattr(model, "zero_grad"):
        model.zero_grad()
    dx = model.backward(cotangent)
    grads = OrderedDict(x=dx)
    grads.update(model.grads)
    return logits, acts, grads


__all__ = ["FAMILIES", "MINI_CONFIGS", "is_model", "model_config", "build_oracle", "random_weights",
           "run_oracle", "forward_order", "required_activation", "family_of"]
