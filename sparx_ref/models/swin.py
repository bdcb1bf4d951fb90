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

from .._validate import as_float_array, check_divisible, check_shape
from ..ref import layers as L
from ..ref import window_attention as wa
from . import configs
from .layers import GELU, Conv2d, LayerNorm, Linear
from .nn import Module

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




# ---------------------------------------------------------------------------------------
# Stochastic depth (identity in eval mode or at rate 0)
# ---------------------------------------------------------------------------------------
class DropPath(Module):
    """timm's ``DropPath``: in training, drop a sample's whole branch with probability p and
    scale the kept ones by 1/(1-p); backward applies the same per-sample factor. No state."""

    def __init__(self, p: float, rng: np.random.Generator):
        super().__init__()
        self.p, self.rng = float(p), rng

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._cache = None
            return x
        keep = (self.rng.random((x.shape[0],) + (1,) * (x.ndim - 1)) >= self.p).astype(x.dtype)
        self._cache = keep / x.dtype.type(1.0 - self.p)
        return x * self._cache

    def backward(self, dout):
        return dout if self._cache is None else dout * self._cache


# ---------------------------------------------------------------------------------------
# Modules (registration order = the released state_dict order)
# ---------------------------------------------------------------------------------------
class WindowAttention(Module):
    """The released ``WindowAttention`` as a state holder for :func:`window_msa_fwd` (spec §8).

    Own entries, in the released order: ``relative_position_bias_table ((2M-1)^2, nH)``,
    buffer ``relative_position_index (N, N)`` int64, ``qkv.weight (3C, C)``, ``qkv.bias (3C,)``,
    ``proj.weight (C, C)``, ``proj.bias (C,)`` (dotted names: the functional op takes them as
    one dict). Init: table and Linear weights trunc-normal std .02, biases 0.
    """

    PARAM_KEYS = wa.WINDOW_MSA_PARAM_KEYS

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, *, dtype, rng):
        super().__init__()
        if not qkv_bias:
            raise NotImplementedError("qkv_bias=False is not supported by the NumPy Swin (the released "
                                      "models all use qkv_bias=True)")
        if qk_scale is not None:
            raise NotImplementedError("qk_scale is not supported by the NumPy Swin (the released models "
                                      "use the default head_dim ** -0.5)")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        M = window_size
        self.add_param("relative_position_bias_table", L.trunc_normal(rng, ((2 * M - 1) ** 2, num_heads),
                                                                      std=0.02, dtype=dtype))
        self.add_buffer("relative_position_index", wa.relative_position_index(M))
        self.add_param("qkv.weight", L.trunc_normal(rng, (3 * dim, dim), std=0.02, dtype=dtype))
        self.add_param("qkv.bias", np.zeros(3 * dim, dtype=dtype))
        self.add_param("proj.weight", L.trunc_normal(rng, (dim, dim), std=0.02, dtype=dtype))
        self.add_param("proj.bias", np.zeros(dim, dtype=dtype))

    def params(self) -> dict:
        """The arrays :func:`window_msa_fwd` takes, including the (loaded) index buffer."""
        out = {k: self._params[k] for k in self.PARAM_KEYS}
        out["relative_position_index"] = self._buffers["relative_position_index"]
        return out


class Mlp(Module):
    """fc1 (C -> hidden) -> exact GELU -> fc2 (hidden -> C); the released Dropouts are
    identities (drop_rate 0, the only rate the NumPy model builds)."""

    def __init__(self, dim, hidden, *, dtype, rng):
        super().__init__()
        self.fc1 = Linear(dim, hidden, dtype=dtype, rng=rng)
        self.act = GELU()
        self.fc2 = Linear(hidden, dim, dtype=dtype, rng=rng)

    def forward(self, x):
        return self.fc2.forward(self.act.forward(self.fc1.forward(x)))

    def backward(self, dout):
        return self.fc1.backward(self.act.backward(self.fc2.backward(dout)))


class SwinTransformerBlock(Module):
    """Pre-norm Swin block on tokens x (B, H*W, C) (spec §5)::

        x = x + drop_path((S)W-MSA(mix_input(norm1(x))))
        x = x + drop_path(mlp(norm2(x)))

    ``window_size`` / ``shift_size`` are the values after the shrink rule. State order:
    ``attn_mask`` (buffer, only if shift > 0), ``norm1``, ``attn``, ``norm2``, ``mlp``.
    ``mix_input(u, shortcut)`` / ``mix_input_backward(du)`` are the hook SparX-Swin
    overrides (identity here). ``backward(dout)`` returns ``(dx, dshortcut)``.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0, *, dtype, rng):
        super().__init__()
        if attn_drop:
            raise NotImplementedError("attn_drop_rate > 0 is not supported by the NumPy Swin")
        if drop:
            raise NotImplementedError("drop_rate > 0 is not supported by the NumPy Swin")
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.dim, self.num_heads = dim, num_heads
        self.H, self.W = input_resolution
        self.window_size, self.shift_size = window_size, shift_size
        if shift_size > 0:
            self.add_buffer("attn_mask", wa.shifted_window_mask(self.H, self.W, window_size, shift_size,
                                                                dtype=dtype))
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, dtype=dtype, rng=rng)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rng=rng)
        # stateless children (no state_dict entries): one per residual branch
        self.drop_path1 = DropPath(drop_path, rng)
        self.drop_path2 = DropPath(drop_path, rng)

    # -- the SparX-Swin hook --------------------------------------------------------------
    def mix_input(self, u, shortcut):
        """norm1(x) (B, L, C) -> the window attention's input (B, L, C). Identity in Swin."""
        return u

    def mix_input_backward(self, du):
        """Backward of :meth:`mix_input`: returns (d norm1(x), d shortcut or None)."""
        return du, None

    # -- computation ----------------------------------------------------------------------
    def forward(self, x, shortcut=None, rec=None, name=""):
        B, Ltok, C = x.shape
        if (Ltok, C) != (self.H * self.W, self.dim):
            raise ValueError(f"{name or 'block'}: x must have shape (B, {self.H * self.W}, {self.dim}), "
                             f"got {x.shape}")
        u = self.mix_input(self.norm1.forward(x), shortcut)
        y, msa_cache = wa.window_msa_fwd(u, self.attn.params(), H=self.H, W=self.W, num_heads=self.num_heads,
                                         window_size=self.window_size, shift_size=self.shift_size,
                                         mask=self._buffers.get("attn_mask"))
        self._cache = msa_cache
        mid = x + self.drop_path1.forward(y)
        out = mid + self.drop_path2.forward(self.mlp.forward(self.norm2.forward(mid)))
        if rec is not None:
            rec[name + ".attn_probs"] = msa_cache["probs"]         # golden act.* order
            rec[name + ".attn_in"] = msa_cache["attn_in"]
            rec[name + ".attn"] = msa_cache["attn_out"]
            rec[name + ".mid"] = mid
            rec[name] = out
        return out

    def backward(self, dout):
        dmid = dout + self.norm2.backward(self.mlp.backward(self.drop_path2.backward(dout)))
        g = wa.window_msa_bwd(self.drop_path1.backward(dmid), self._cache)
        for key in WindowAttention.PARAM_KEYS:
            self.attn.accumulate_grad(key, g[key])
        du, dshortcut = self.mix_input_backward(g["x"])
        return dmid + self.norm1.backward(du), dshortcut


class PatchMerging(Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): 2x2 gather in the order (0,0), (1,0), (0,1), (1,1),
    LayerNorm(4C), Linear(4C -> 2C) without bias (spec §9). ``reduction`` is registered
    before ``norm`` (released state_dict order)."""

    def __init__(self, input_resolution, dim, *, dtype, rng):
        super().__init__()
        self.H, self.W = input_resolution
        self.dim = dim
        self.reduction = Linear(4 * dim, 2 * dim, bias=False, dtype=dtype, rng=rng)
        self.norm = LayerNorm(4 * dim, dtype=dtype)

    def forward(self, x):
        return self.reduction.forward(self.norm.forward(wa.patch_merge_gather(x, self.H, self.W)))

    def backward(self, dout):
        return wa.patch_merge_scatter(self.norm.backward(self.reduction.backward(dout)), self.H, self.W)


class ModuleList(Module):
    """Children "0", "1", ... (``nn.ModuleList``); iterable."""

    def __init__(self, modules):
        super().__init__()
        for i, m in enumerate(modules):
            self.add_child(str(i), m)

    def __iter__(self):
        return iter(self._children.values())

    def __len__(self):
        return len(self._children)

    def __getitem__(self, i):
        return self._children[str(i)]


class BasicLayer(Module):
    """One stage: ``blocks`` (depth Swin blocks) then ``downsample`` (PatchMerging) except
    in the last stage."""

    def __init__(self, stage: dict, cfg: dict, drop_path: list, stage_index: int, *, dtype, rng):
        super().__init__()
        self.stage_index = stage_index
        self.blocks = ModuleList([self.make_block(stage, cfg, j, drop_path[j], dtype=dtype, rng=rng)
                                  for j in range(len(stage["blocks"]))])
        if stage["downsample"]:
            self.downsample = PatchMerging((stage["H"], stage["W"]), stage["dim"], dtype=dtype, rng=rng)
        else:
            object.__setattr__(self, "downsample", None)

    block_class = SwinTransformerBlock

    def make_block(self, stage: dict, cfg: dict, j: int, drop_path: float, *, dtype, rng, **extra) -> Module:
        """Block ``j`` of this stage (window and shift after the shrink rule); ``extra``
        keywords go to ``block_class`` (SparX-Swin passes its wiring)."""
        M, shift = stage["blocks"][j]
        return self.block_class(stage["dim"], (stage["H"], stage["W"]), stage["num_heads"], M, shift,
                                cfg["mlp_ratio"], cfg["qkv_bias"], cfg["qk_scale"], cfg["drop_rate"],
                                cfg["attn_drop_rate"], drop_path, dtype=dtype, rng=rng, **extra)

    def run_blocks(self, x, rec=None):
        """The stage's blocks in sequence (SparX-Swin overrides this with its wiring)."""
        for j, block in enumerate(self.blocks):
            x = block.forward(x, None, rec, f"layers.{self.stage_index}.blocks.{j}")
        return x

    def backward_blocks(self, dout):
        for block in reversed(list(self.blocks)):
            dout, _ = block.backward(dout)
        return dout

    def forward(self, x, rec=None):
        x = self.run_blocks(x, rec)
        if self.downsample is not None:
            x = self.downsample.forward(x)
            if rec is not None:
                rec[f"layers.{self.stage_index}.downsample"] = x
        return x

    def backward(self, dout):
        if self.downsample is not None:
            dout = self.downsample.backward(dout)
        return self.backward_blocks(dout)


class PatchEmbed(Module):
    """Conv2d(in_chans -> C0, kernel = stride = patch, PyTorch default init) -> tokens
    (B, H0*W0, C0) row-major -> LayerNorm(C0) if patch_norm (spec §3)."""

    def __init__(self, cfg: dict, *, dtype, rng):
        super().__init__()
        p = cfg["patch_size"]
        self.proj = Conv2d(cfg["in_chans"], cfg["embed_dim"], p, stride=p, dtype=dtype, rng=rng,
                           init="torch_default")
        if cfg["patch_norm"]:
            self.norm = LayerNorm(cfg["embed_dim"], dtype=dtype)
        else:
            object.__setattr__(self, "norm", None)

    def forward(self, x):
        y = self.proj.forward(x)                                   # (B, C0, H0, W0)
        self._cache = y.shape
        tokens = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1)
        return self.norm.forward(tokens) if self.norm is not None else tokens

    def backward(self, dout):
        if self.norm is not None:
            dout = self.norm.backward(dout)
        return self.proj.backward(np.ascontiguousarray(dout.transpose(0, 2, 1)).reshape(self._cache))


class SwinTransformer(Module):
    """The original Swin Transformer classifier as a NumPy model (spec §1 - §12).

    Model API (shared with the SparX-Mamba NumPy model): ``forward(x)`` (B, in_chans, H, W),
    (H, W) == img_size -> logits (B, num_classes); ``backward(dlogits)`` -> dx, accumulating
    parameter gradients into ``grads`` (``zero_grad()`` clears them); ``forward_features(x)``
    -> list of the stage outputs (each BasicLayer's output, after its PatchMerging,
    (B, L_s, C_s) tokens) and ``backward_features(douts)``; ``state_dict`` /
    ``load_state_dict`` (released keys; missing relative_position_index / attn_mask buffers
    are rebuilt) / ``num_parameters`` / ``train`` / ``eval`` / ``astype``; ``record = True``
    fills ``recorded`` under the golden file's ``act.*`` names.
    """

    layer_class = BasicLayer

    def __init__(self, cfg: dict, *, dtype=np.float64, seed=0):
        super().__init__()
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        object.__setattr__(self, "cfg", cfg)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "geometry", stage_geometry(cfg))
        self.num_layers = len(cfg["depths"])
        self.num_features = cfg["embed_dim"] * 2 ** (self.num_layers - 1)
        self.record, self.recorded = False, OrderedDict()
        if cfg["ape"]:
            L0 = self.geometry[0]["H"] * self.geometry[0]["W"]
            self.add_param("absolute_pos_embed", L.trunc_normal(rng, (1, L0, cfg["embed_dim"]), std=0.02,
                                                                dtype=dtype))
        if cfg["drop_rate"]:
            raise NotImplementedError("drop_rate > 0 is not supported by the NumPy Swin")
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rng=rng)
        rates = drop_path_rates(cfg)
        self.layers = ModuleList([self.layer_class(stage, cfg, rates[i], i, dtype=dtype, rng=rng)
                                  for i, stage in enumerate(self.geometry)])
        self.norm = LayerNorm(self.num_features, dtype=dtype)
        if cfg["num_classes"] > 0:
            self.head = Linear(self.num_features, cfg["num_classes"], dtype=dtype, rng=rng)
        else:
            object.__setattr__(self, "head", None)

    # -- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state, strict: bool = True) -> dict:
        """Released keys; relative_position_index / attn_mask buffers missing from ``state``
        are rebuilt (kept from construction), as the official loader does (spec §12)."""
        state = dict(state)
        for key, value in self.state_dict().items():
            if key not in state and key.endswith(("relative_position_index", "attn_mask")):
                state[key] = value
        return super().load_state_dict(state, strict=strict)

    # -- forward / backward ---------------------------------------------------------------
    def _check_input(self, x):
        x = as_float_array("x", x, ndim=4)
        if x.dtype != self.dtype:
            raise TypeError(f"x must have the model's dtype {self.dtype}, got {x.dtype} (use model.astype)")
        check_shape("x", x, (None, self.cfg["in_chans"]) + tuple(self.cfg["img_size"]))
        return x

    def astype(self, dtype) -> "SwinTransformer":
        """Cast every float parameter and buffer; inputs must then have this dtype."""
        super().astype(dtype)
        object.__setattr__(self, "dtype", np.dtype(dtype))
        return self

    def forward_features(self, x):
        """x (B, in_chans, H, W) -> list of the stage outputs, (B, L_s, C_s) tokens (each
        BasicLayer's output, after its PatchMerging). Fills ``recorded`` if ``record``."""
        x = self._check_input(x)
        rec = OrderedDict() if self.record else None
        t = self.patch_embed.forward(x)
        if "absolute_pos_embed" in self._params:
            t = t + self.absolute_pos_embed
        if rec is not None:
            rec["patch_embed"] = t
        outs = []
        for layer in self.layers:
            t = layer.forward(t, rec)
            outs.append(t)
        self.recorded = rec if rec is not None else OrderedDict()
        object.__setattr__(self, "_stage_shapes", [o.shape for o in outs])
        return outs

    def forward(self, x):
        """x (B, in_chans, H, W) -> logits (B, num_classes): stages, final LayerNorm, mean
        over tokens, head."""
        t = self.norm.forward(self.forward_features(x)[-1])
        pooled = t.mean(axis=1)                                    # AdaptiveAvgPool1d(1) over tokens
        if self.record:
            self.recorded["norm"] = t
            self.recorded["pooled"] = pooled
        logits = self.head.forward(pooled) if self.head is not None else pooled
        self._cache = (t.shape, logits.shape)
        return logits

    def backward(self, dlogits):
        """Gradient of ``sum(logits * dlogits)``: returns dx (B, in_chans, H, W); parameter
        gradients are *accumulated* into ``grads`` (call ``zero_grad()`` between steps)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        (B, Ltok, C), logits_shape = self._cache
        dlogits = as_float_array("dlogits", dlogits, ndim=2, dtype=self.dtype)
        check_shape("dlogits", dlogits, logits_shape)
        dpooled = self.head.backward(dlogits) if self.head is not None else dlogits
        dt = self.norm.backward(np.broadcast_to(dpooled[:, None, :] / Ltok, (B, Ltok, C)).copy())
        return self.backward_features([None] * (len(self.layers) - 1) + [dt])

    def backward_features(self, douts):
        """Backward of :meth:`forward_features`: ``douts`` holds the gradient of each stage
        output (None for none) -> dx; parameter gradients are accumulated."""
        if len(douts) != len(self.layers):
            raise ValueError(f"douts must have one entry per stage ({len(self.layers)}), got {len(douts)}")
        carry = None   # gradient of the next stage's input = this stage's output
        for s in reversed(range(len(self.layers))):
            g = douts[s]
            if g is not None:
                g = as_float_array(f"douts[{s}]", g, ndim=3, dtype=self.dtype)
                check_shape(f"douts[{s}]", g, self._stage_shapes[s])
                g = g if carry is None else g + carry
            else:
                g = carry if carry is not None else np.zeros(self._stage_shapes[s], dtype=self.dtype)
            carry = self.layers[s].backward(g)
        if "absolute_pos_embed" in self._params:
            self.accumulate_grad("absolute_pos_embed", carry.sum(axis=0, keepdims=True))
        return self.patch_embed.backward(carry)


def build(name: str, dtype=np.float64, seed=0, **overrides) -> SwinTransformer:
    """Build ``swin_t | swin_s | swin_b | swin`` (NumPy) with the released keyword names as
    overrides; ``dtype`` (float64 default) and ``seed`` (init RNG) are extra keywords."""
    return SwinTransformer(resolve_config(name, overrides), dtype=dtype, seed=seed)


# ---------------------------------------------------------------------------------------
# timm checkpoints
# ---------------------------------------------------------------------------------------
_LAYERS_UNDERSCORE = re.compile(r"^layers_(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def _unwrap(state):
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return state


def _timm_downsample_layout(keys) -> bool:
    """True when the last stage holds a PatchMerging (timm >= 0.9 puts it at the start of
    stages 1..S-1; the released code at the end of stages 0..S-2)."""
    keys = [_LAYERS_UNDERSCORE.sub(lambda m: f"layers.{m.group(1)}.", k) for k in keys]
    downsample_stages = {int(m.group(1)) for k in keys if (m := _DOWNSAMPLE.match(k))}
    stages = {int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))}
    return bool(downsample_stages) and max(stages) in downsample_stages


def is_timm_swin_state_dict(state) -> bool:
    """True for a Swin state dict in timm's (>= 0.9) layout, which needs
    :func:`convert_timm_swin_state_dict`: classifier under ``head.fc.*``, PatchMerging stored
    at the start of the *next* stage (``layers.{i+1}.downsample.*``), or ``layers_{i}.``
    module names. The released layout (and timm's older, identical one) gives False."""
    state = _unwrap(state)
    keys = list(state)
    if not any(k.endswith("relative_position_bias_table") for k in keys):
        return False
    return (any(_LAYERS_UNDERSCORE.match(k) for k in keys) or "head.fc.weight" in state
            or _timm_downsample_layout(keys))


def _released_sort_key(key: str):
    """Order keys as the released state_dict does: absolute_pos_embed, patch_embed, layers
    (blocks before the downsample), norm, head; ties keep their order (stable sort)."""
    m = _LAYER_KEY.match(key)
    if key.startswith("absolute_pos_embed"):
        return (0, 0, 0)
    if key.startswith("patch_embed."):
        return (1, 0, 0)
    if m:
        return (2, int(m.group(1)), 1 if ".downsample." in key else 0)
    if key.startswith("norm."):
        return (3, 0, 0)
    return (4, 0, 0)


def convert_timm_swin_state_dict(state) -> "OrderedDict":
    """timm's ``swin_*_patch4_window7_224`` layout -> the released one (values untouched).

    - ``layers_{i}.`` -> ``layers.{i}.`` (feature-extraction wrappers);
    - ``layers.{i}.downsample.*`` -> ``layers.{i-1}.downsample.*`` when the last stage holds
      a PatchMerging (timm >= 0.9 runs it at the start of the next stage; same tensors, and
      its 2x2 gather has the released order);
    - ``head.fc.*`` -> ``head.*``;
    - ``relative_position_index`` / ``attn_mask`` entries are dropped: the models rebuild
      them (recent timm does not save them).
    A checkpoint wrapped as {"model": ...} or {"state_dict": ...} is unwrapped. Keys come
    out in the released order. Works on NumPy arrays and torch tensors alike (no torch import).
    """
    state = _unwrap(state)
    shift_downsample = _timm_downsample_layout(list(state))
    out = []
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        key = _LAYERS_UNDERSCORE.sub(lambda m: f"layers.{m.group(1)}.", key)
        m = _DOWNSAMPLE.match(key)
        if shift_downsample and m:
            key = f"layers.{int(m.group(1)) - 1}.downsample." + key[m.end():]
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out.append((key, value))
    return OrderedDict(sorted(out, key=lambda kv: _released_sort_key(kv[0])))
