"""SparX-Mamba T/S/B as a pure-NumPy model with a hand-written backward pass.

The same network as the authors' ``SparXMamba`` (LMMMEng/SparX ``models/sparx_mamba.py``;
contract: docs/spec/sparx_mamba.md), built from the reference ops of :mod:`sparx_ref.ref`
on the :class:`~sparx_ref.models.nn.Module` base, with the released state_dict keys, so a
released checkpoint loads key for key::

    model = sparx_ref.build_model("sparx_mamba_t")          # released init, float64
    model.load_state_dict(sparx_ref.load_checkpoint("sparx_mamba_tiny_in1k.pth"))
    model.eval()
    logits = model.forward(x)                                # x: (B, 3, H, W)
    dx = model.backward(dlogits)                             # fills model.grads
    feats = model.forward_features(x)                        # the 4 stage outputs

``model.record = True`` keeps every block output and every ganglion layer's attention maps
in ``model.recorded`` (keys as in the golden file: "patch_embed", "layers.{s}.blocks.{i}",
"layers.{s}.blocks.{i}.op", ".op.ssm_out", ".op.d_proj", ".op.attn", ".op.in_proj_padded",
"layers.{s}.out").

Shapes: d = stage width, Di = 2d (ssm_ratio 2), N = ssm_d_state, R = dt rank = ceil(d/16),
K = 4 scan directions. Which blocks are ganglion layers and which earlier outputs they receive
comes from :func:`sparx_ref.models.wiring.ganglion_plan` (through the config resolver).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..ref import layers as L
from ..ref import ss2d
from .dmca import DMCA
from .layers import GELU, BatchNorm2d, Conv2d, GroupNorm, Linear, SiLU
from .nn import Module, Sequential
from .sparx_mamba_config import pretrained_cfg, resolve_config
from .wiring import STAGE_INPUT

__all__ = ["SparXMamba", "SparXVSSBlock", "SparXSS2D", "build"]


class LayerScale(Module):
    """Per-channel ``w * x + b`` (the released depthwise 1x1 conv). weight (d, 1, 1, 1), bias (d,)."""

    def __init__(self, dim, init_value, *, dtype):
        super().__init__()
        self.add_param("weight", np.full((dim, 1, 1, 1), init_value, dtype=dtype))
        self.add_param("bias", np.zeros(dim, dtype=dtype))

    def forward(self, x):
        self._cache = x
        return x * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)

    def backward(self, dout):
        x = self._cache
        self.accumulate_grad("weight", np.einsum("bchw,bchw->c", dout, x).reshape(-1, 1, 1, 1))
        self.accumulate_grad("bias", dout.sum(axis=(0, 2, 3)))
        return dout * self.weight.reshape(1, -1, 1, 1)


class DropPath(Module):
    """Stochastic depth per sample (timm's rule); identity in eval mode or at rate 0."""

    def __init__(self, drop_prob, rng):
        super().__init__()
        self.drop_prob, self.rng = float(drop_prob), rng

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            self._cache = None
            return x
        keep = 1.0 - self.drop_prob
        mask = (self.rng.random(x.shape[0]) < keep).astype(x.dtype).reshape(-1, 1, 1, 1) / keep
        self._cache = mask
        return x * mask

    def backward(self, dout):
        return dout if self._cache is None else dout * self._cache


class Mlp(Module):
    """fc1 (1x1) -> h + dwconv3x3(h) -> GELU -> fc2 (1x1). x: (B, d, H, W)."""

    def __init__(self, dim, hidden, *, dtype, rng):
        super().__init__()
        self.fc1 = Conv2d(dim, hidden, 1, dtype=dtype, rng=rng)
        self.dwconv = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, dtype=dtype, rng=rng)
        self.act = GELU()
        self.fc2 = Conv2d(hidden, dim, 1, dtype=dtype, rng=rng)

    def forward(self, x):
        h = self.fc1.forward(x)
        h = h + self.dwconv.forward(h)
        return self.fc2.forward(self.act.forward(h))

    def backward(self, dout):
        dh = self.act.backward(self.fc2.backward(dout))
        dh = dh + self.dwconv.backward(dh)
        return self.fc1.backward(dh)


class SparXSS2D(Module):
    """The token mixer (spec §6-§8).

    Normal block: ``in_proj (1x1 d->Di) -> conv2d (dw 5x5) -> SiLU -> forward_ssm -> out_proj``.
    Ganglion block: ``in_proj`` is replaced by the DMCA path (transparent child, keys
    d_norm.*, d_proj.*, q.*, k.*, v.*, in_proj.*) fed with the block's shortcut.
    Raw parameters (first in the state_dict): x_proj_weight (K(R+2N), Di, 1),
    dt_projs_weight (K, Di, R), dt_projs_bias (K, Di), A_logs (K Di, N), Ds (K Di,).
    """

    K = 4

    def __init__(self, d_model, d_state, ssm_ratio, dt_rank, d_conv, plan, sr_ratio, *, dtype, rng):
        super().__init__()
        Di = int(d_model * ssm_ratio)
        K, R, N = self.K, int(dt_rank), int(d_state)
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = Di, N, R, d_conv
        self.is_cross_layer = bool(plan.ganglion)
        # raw parameters, released init (spec §10): x_proj like nn.Linear's default,
        # dt_projs from dt_init, A = -1..-N, D = 1
        bound = 1.0 / math.sqrt(Di)
        self.add_param("x_proj_weight", rng.uniform(-bound, bound, (K * (R + 2 * N), Di, 1)).astype(dtype))
        self.add_param("dt_projs_weight", rng.uniform(-R ** -0.5, R ** -0.5, (K, Di, R)).astype(dtype))
        dt = np.exp(rng.random((K, Di)) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = np.maximum(dt, 1e-4)
        self.add_param("dt_projs_bias", (dt + np.log(-np.expm1(-dt))).astype(dtype))
        self.add_param("A_logs", np.tile(np.log(np.arange(1, N + 1, dtype=np.float64)), (K * Di, 1)).astype(dtype))
        self.add_param("Ds", np.ones(K * Di, dtype=dtype))
        if self.is_cross_layer:
            # transparent child: its keys sit directly under op. (d_norm.weight, ...)
            dmca = DMCA(d_model, plan.shortcut_channels, sr_ratio, Di, norm="group", dtype=dtype,
                        rng=rng)
            object.__setattr__(self, "dmca", self.add_child("", dmca))
        else:
            self.in_proj = Conv2d(d_model, Di, 1, dtype=dtype, rng=rng)
        self.conv2d = (Conv2d(Di, Di, d_conv, padding=(d_conv - 1) // 2, groups=Di, dtype=dtype, rng=rng)
                       if d_conv > 1 else None)
        self.act = SiLU()
        self.out_norm = GroupNorm(1, Di, dtype=dtype)
        self.out_proj = Conv2d(Di, d_model, 1, dtype=dtype, rng=rng)
        self.recorded = OrderedDict()

    def _ssm_params(self):
        p = {k: self._params[k] for k in ss2d.FORWARD_SSM_PARAM_KEYS[:5]}
        p["out_norm.weight"], p["out_norm.bias"] = self.out_norm.weight, self.out_norm.bias
        return p

    def forward(self, x, shortcut=None):
        """x: (B, d, H, W) the normed block input; shortcut: (B, c, H, W) or None -> (B, d, H, W)."""
        if self.is_cross_layer:
            if shortcut is None:
                raise ValueError("a ganglion layer needs its shortcut (got None)")
            z = self.dmca.forward(x, shortcut)                 # (B, Di, H, W)
        else:
            z = self.in_proj.forward(x)                        # (B, Di, H, W)
        if self.conv2d is not None:
            z = self.conv2d.forward(z)
        y, self._cache = ss2d.forward_ssm_fwd(self.act.forward(z), self._ssm_params(),
                                              d_state=self.d_state, dt_rank=self.dt_rank)
        out = self.out_proj.forward(y)
        rec = self.dmca.recorded if self.is_cross_layer else {}
        self.recorded = OrderedDict((k, rec[k]) for k in ("d_proj", "attn", "in_proj_padded") if k in rec)
        self.recorded["ssm_out"] = y
        return out

    def backward(self, dout):
        """dout: (B, d, H, W) -> (dx, dshortcut or None); parameter grads accumulated."""
        g = ss2d.forward_ssm_bwd(self.out_proj.backward(dout), self._cache)
        for key in ss2d.FORWARD_SSM_PARAM_KEYS[:5]:
            self.accumulate_grad(key, g[key])
        self.out_norm.accumulate_grad("weight", g["out_norm.weight"])
        self.out_norm.accumulate_grad("bias", g["out_norm.bias"])
        dz = self.act.backward(g["u"])
        if self.conv2d is not None:
            dz = self.conv2d.backward(dz)
        if self.is_cross_layer:
            return self.dmca.backward(dz)
        return self.in_proj.backward(dz), None


class SparXVSSBlock(Module):
    """x += pos_embed(x); x = LS1(x) + op(GN(x), sc); x = LS2(x) + mlp(GN2(x)) (spec §5)."""

    def __init__(self, dim, plan, cfg, stage, *, dtype, rng):
        super().__init__()
        self.plan = plan
        self.pos_embed = Conv2d(dim, dim, 3, padding=1, groups=dim, dtype=dtype, rng=rng)
        self.norm = GroupNorm(1, dim, dtype=dtype)
        self.op = SparXSS2D(dim, cfg["ssm_d_state"], cfg["ssm_ratio"][stage], cfg["dt_ranks"][stage],
                            cfg["ssm_conv"], plan, cfg["sr_ratio"][stage], dtype=dtype, rng=rng)
        self.norm2 = GroupNorm(1, dim, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * cfg["mlp_ratio"][stage]), dtype=dtype, rng=rng)
        ls = cfg["ls_init_value"][stage]
        self.layerscale_1 = self.add_child("layerscale_1", None if ls is None else LayerScale(dim, ls, dtype=dtype))
        self.layerscale_2 = self.add_child("layerscale_2", None if ls is None else LayerScale(dim, ls, dtype=dtype))
        rate = cfg["drop_path"][stage][plan.idx]
        self.drop_path_1 = DropPath(rate, rng)
        self.drop_path_2 = DropPath(rate, rng)

    def forward(self, x, shortcut=None):
        x = x + self.pos_embed.forward(x)
        op_out = self.op.forward(self.norm.forward(x), shortcut)
        self.op.recorded["op"] = op_out
        skip = x if self.layerscale_1 is None else self.layerscale_1.forward(x)
        x = skip + self.drop_path_1.forward(op_out)
        skip = x if self.layerscale_2 is None else self.layerscale_2.forward(x)
        return skip + self.drop_path_2.forward(self.mlp.forward(self.norm2.forward(x)))

    def backward(self, dout):
        """dout: (B, d, H, W) -> (dx, dshortcut or None)."""
        dn2 = self.mlp.backward(self.drop_path_2.backward(dout))
        dx = (dout if self.layerscale_2 is None else self.layerscale_2.backward(dout))
        dx = dx + self.norm2.backward(dn2)
        dn1, dshortcut = self.op.backward(self.drop_path_1.backward(dx))
        dx = (dx if self.layerscale_1 is None else self.layerscale_1.backward(dx))
        dx = dx + self.norm.backward(dn1)
        return dx + self.pos_embed.backward(dx), dshortcut


class Stage(Module):
    """``layers.{s}``: ``blocks`` (Sequential of SparXVSSBlock) and ``downsample``
    (conv3x3 s2 + BN, or nothing in the last stage)."""

    def __init__(self, blocks, downsample):
        super().__init__()
        self.blocks = Sequential(*blocks)
        self.downsample = self.add_child("downsample", downsample)


class SparXMamba(Module):
    """The whole network: stem (patch_embed), stages (layers), classifier (spec §3, §4, §9)."""

    def __init__(self, cfg, *, dtype=np.float64, seed=0):
        super().__init__()
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        rng = np.random.default_rng(seed)
        self.cfg, self.plan, self.dtype = cfg, cfg["plan"], dtype
        dims, d0 = cfg["dims"], cfg["dims"][0]
        self.num_classes, self.num_features = cfg["num_classes"], dims[-1]
        kw = dict(dtype=dtype, rng=rng)
        stem = [Conv2d(cfg["in_chans"], d0 // 2, 3, stride=2, padding=1, bias=False, **kw),
                BatchNorm2d(d0 // 2, dtype=dtype), GELU()]
        if cfg["stem_type"] == "v2":
            stem += [Conv2d(d0 // 2, d0 // 2, 3, padding=1, bias=False, **kw),
                     BatchNorm2d(d0 // 2, dtype=dtype), GELU()]
        stem += [Conv2d(d0 // 2, d0, 3, stride=2, padding=1, bias=False, **kw), BatchNorm2d(d0, dtype=dtype)]
        self.patch_embed = Sequential(*stem)
        stages = []
        for s, stage_plan in enumerate(self.plan):
            blocks = [SparXVSSBlock(dims[s], bp, cfg, s, **kw) for bp in stage_plan]
            down = (Sequential(Conv2d(dims[s], dims[s + 1], 3, stride=2, padding=1, bias=False, **kw),
                               BatchNorm2d(dims[s + 1], dtype=dtype))
                    if s < len(self.plan) - 1 else None)
            stages.append(Stage(blocks, down))
        self.layers = Sequential(*stages)
        # classifier.0 = GroupNorm, .1 = avg pool, .2 = flatten (no keys), .3 = Linear
        self.classifier = Sequential(GroupNorm(1, self.num_features, dtype=dtype), None, None,
                                     Linear(self.num_features, self.num_classes, **kw))
        self.record = False
        self.recorded = OrderedDict()
        self.pretrained_cfg = {}

    # -- helpers ---------------------------------------------------------------------------
    def _stages(self):
        return [self.layers._children[str(s)] for s in range(len(self.plan))]

    def _check_input(self, x):
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != self.cfg["in_chans"]:
            raise ValueError(f"x must have shape (B, {self.cfg['in_chans']}, H, W), got {x.shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the model is {self.dtype}; cast one of "
                            f"them (x.astype(...) or model.astype(...))")
        return x

    def astype(self, dtype):
        super().astype(dtype)
        self.dtype = np.dtype(dtype)
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward_features(self, x):
        """x: (B, in_chans, H, W) -> list of the stage outputs (after each downsample)."""
        x = self._check_input(x)
        rec = OrderedDict()
        x = self.patch_embed.forward(x)
        if self.record:
            rec["patch_embed"] = x
        outs = []
        stage_input = None
        for s, (stage, stage_plan) in enumerate(zip(self._stages(), self.plan)):
            named = {} if stage_input is None else {STAGE_INPUT: stage_input}
            for block, bp in zip(stage.blocks._run_order, stage_plan):
                shortcut = None
                if bp.ganglion:
                    parts = [named[src] for src in bp.sources]
                    shortcut = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
                x = block.forward(x, shortcut)
                named[bp.name] = x
                if self.record:
                    pre = f"layers.{s}.blocks.{bp.idx}"
                    for key, value in block.op.recorded.items():
                        rec[f"{pre}.op" if key == "op" else f"{pre}.op.{key}"] = value
                    rec[pre] = x
            if stage.downsample is not None:
                x = stage.downsample.forward(x)
            if self.record:
                rec[f"layers.{s}.out"] = x
            outs.append(x)
            stage_input = x
        self.recorded = rec
        self._num_stage_outputs = len(outs)
        return outs

    def forward(self, x):
        """x: (B, in_chans, H, W) -> logits (B, num_classes)."""
        feat = self.forward_features(x)[-1]
        norm, head = self.classifier._children["0"], self.classifier._children["3"]
        pooled, self._pool_cache = L.global_avg_pool_fwd(norm.forward(feat))
        return head.forward(pooled)

    # -- backward --------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits: (B, num_classes) -> dx (B, in_chans, H, W); parameter gradients are
        accumulated into ``model.grads`` (call ``zero_grad()`` between steps)."""
        norm, head = self.classifier._children["0"], self.classifier._children["3"]
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        dfeat = norm.backward(L.global_avg_pool_bwd(head.backward(dlogits), self._pool_cache)["x"])
        douts = [None] * self._num_stage_outputs
        douts[-1] = dfeat
        return self.backward_features(douts)

    def backward_features(self, douts):
        """Backward of :meth:`forward_features`: ``douts`` is a list with the gradient of each
        stage output (None for no gradient) -> dx."""
        stages = self._stages()
        if len(douts) != len(stages):
            raise ValueError(f"douts must have one entry per stage ({len(stages)}), got {len(douts)}")
        carry = None  # gradient w.r.t. the next stage's input (= this stage's output)
        for s in range(len(stages) - 1, -1, -1):
            stage, stage_plan = stages[s], self.plan[s]
            g = douts[s]
            if carry is not None:
                g = carry if g is None else g + carry
            if g is None:
                raise ValueError("backward_features needs a gradient for at least the last stage "
                                 "that was used")
            if stage.downsample is not None:
                g = stage.downsample.backward(g)
            named_grads = {}       # gradients reaching earlier outputs through shortcuts
            dx = g
            for block, bp in zip(reversed(stage.blocks._run_order), reversed(stage_plan)):
                if bp.name in named_grads:
                    dx = dx + named_grads.pop(bp.name)
                dx, dshortcut = block.backward(dx)
                if bp.ganglion:
                    for src, part in zip(bp.sources,
                                         np.split(dshortcut, len(bp.sources), axis=1)):
                        named_grads[src] = named_grads[src] + part if src in named_grads else part
            if STAGE_INPUT in named_grads:
                dx = dx + named_grads.pop(STAGE_INPUT)
            carry = dx
        return self.patch_embed.backward(carry)


def build(name: str = "sparx_mamba", *, dtype=np.float64, seed=0, pretrained=False,
          **overrides) -> SparXMamba:
    """Build the NumPy model: ``name`` in "sparx_mamba", "sparx_mamba_t/s/b"; overrides use the
    released keyword names; ``dtype`` float64 (default) or float32; ``seed`` for the released
    random init. ``pretrained=True`` downloads the released weights (needs torch and network)."""
    cfg = resolve_config(name, **overrides)
    model = SparXMamba(cfg, dtype=dtype, seed=seed)
    model.pretrained_cfg = pretrained_cfg(name)
    if pretrained:
        from ..torch_models.sparx_mamba import build as build_twin
        from ..checkpoint import to_numpy_state_dict

        model.load_state_dict(to_numpy_state_dict(build_twin(name, pretrained=True).state_dict()))
    return model
