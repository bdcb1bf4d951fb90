"""SparX-Mamba T/S/B in plain PyTorch: the twin of the released model (LMMMEng/SparX).

Same modules, state_dict keys, shapes, order and arithmetic as the authors' ``SparXMamba``
(docs/spec/sparx_mamba.md), with the CUDA selective scan and the Triton cross scan/merge
replaced by plain PyTorch (see :mod:`sparx_ref.torch_models.common`), so it runs on CPU and
GPU without compiling anything and released checkpoints load with ``strict=True``.

    model = build("sparx_mamba_t")                 # released init, eval() not implied
    model = build("sparx_mamba", depths=[1, 1, 2, 1], dims=[8, 12, 16, 20], num_classes=10)
    model.record = True; logits = model(x); model.recorded["layers.2.blocks.0.op.attn"]

The wiring (which blocks are ganglion layers and what they receive) comes from
:func:`sparx_ref.models.wiring.ganglion_plan`.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch.nn as nn

from ..models.sparx_mamba_config import pretrained_cfg, resolve_config
from ..models.wiring import STAGE_INPUT
from .common import (DepthwiseConv2d, DropPath, GroupNorm1, LayerScale, get_kernels, released_init_,
                     ss2d_core_released)
from .dmca import add_dmca_layers, dmca_forward


class Mlp(nn.Module):
    """fc1 (1x1) -> h + dwconv3x3(h) -> GELU -> fc2 (1x1)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.dwconv = DepthwiseConv2d(hidden, 3)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)

    def forward(self, x):
        h = self.fc1(x)
        h = self.dwconv(h, residual=True)                   # h + dwconv(h)
        return self.fc2(self.act(h))


def _dt_proj_init(dt_rank, d_inner, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
    """Released ``dt_init``: weight ~ U(+-R^-0.5); bias = softplus^-1(dt), dt log-uniform."""
    weight = torch.empty(d_inner, dt_rank).uniform_(-dt_rank ** -0.5, dt_rank ** -0.5)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_init_floor)
    bias = dt + torch.log(-torch.expm1(-dt))
    return weight, bias


class SparXSS2D(nn.Module):
    """The token mixer: [DMCA for ganglion layers | in_proj] -> dwconv -> SiLU -> SSM -> out_proj."""

    K = 4  # scan directions

    def __init__(self, d_model, d_state=1, ssm_ratio=2.0, dt_rank=None, d_conv=5, plan=None,
                 sr_ratio=1, kernels=None):
        super().__init__()
        d_inner = int(d_model * ssm_ratio)
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, d_state, dt_rank, d_conv
        self.kernels = kernels or get_kernels("torch")
        self.is_cross_layer = bool(plan is not None and plan.ganglion)
        K = self.K
        # raw parameters first (they come first in the released state_dict)
        x_proj = torch.empty(K, dt_rank + 2 * d_state, d_inner)
        bound = 1.0 / math.sqrt(d_inner)  # nn.Linear default (kaiming_uniform a=sqrt(5))
        x_proj.uniform_(-bound, bound)
        self.x_proj_weight = nn.Parameter(x_proj.reshape(-1, d_inner, 1))
        w, b = zip(*[_dt_proj_init(dt_rank, d_inner) for _ in range(K)])
        self.dt_projs_weight = nn.Parameter(torch.stack(w))        # (K, Di, R)
        self.dt_projs_bias = nn.Parameter(torch.stack(b))          # (K, Di)
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
        self.A_logs = nn.Parameter(a_log.repeat(K * d_inner, 1))   # (K*Di, N)
        self.Ds = nn.Parameter(torch.ones(K * d_inner))            # (K*Di,)
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        if self.is_cross_layer:
            add_dmca_layers(self, d_model, plan.shortcut_channels, sr_ratio, d_inner, norm="group")
        else:
            self.in_proj = nn.Conv2d(d_model, d_inner, kernel_size=1)
        if d_conv > 1:
            self.conv2d = (DepthwiseConv2d(d_inner, d_conv) if d_conv % 2 else  # even: not "same"
                           nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                     groups=d_inner))
        self.act = nn.SiLU()
        self.out_norm = GroupNorm1(d_inner)
        self.out_proj = nn.Conv2d(d_inner, d_model, kernel_size=1)
        self.extras = {}

    def forward_ssm(self, u):
        """u: (B, Di, H, W) -> out_norm(cross_merge(selective_scan(cross_scan(u)))) (spec §8).
        The core runs op by op in the released order (:func:`.common.ss2d_core_released`) or, on
        kernel backends, in one autograd node (:func:`.ss2d_core.ss2d_core`)."""
        core = self.kernels.ss2d_core or functools.partial(ss2d_core_released, self.kernels)
        y = core(u, self.x_proj_weight, self.dt_projs_weight, self.A_logs, self.Ds, self.dt_projs_bias)
        return self.out_norm(y)

    def forward(self, x, shortcut=None, record=False):
        extras = {}
        if self.is_cross_layer:
            x, extras = dmca_forward(self, x, shortcut, self.kernels)
        else:
            x = self.in_proj(x)
        if self.d_conv > 1:
            x = self.conv2d(x)
        y = self.forward_ssm(self.act(x))
        out = self.out_proj(y)
        if record:
            extras = dict(extras, ssm_out=y)
            self.extras = {k: v.detach() for k, v in extras.items()}
        return out


class SparXVSSBlock(nn.Module):
    """x += pos_embed(x); x = LS1(x) + op(GN(x), sc); x = LS2(x) + mlp(GN2(x))."""

    def __init__(self, dim, plan, d_state, ssm_ratio, dt_rank, d_conv, mlp_ratio, ls_init_value,
                 sr_ratio, drop_path, kernels):
        super().__init__()
        self.plan = plan
        self.pos_embed = DepthwiseConv2d(dim, 3)
        self.norm = GroupNorm1(dim)
        self.op = SparXSS2D(dim, d_state, ssm_ratio, dt_rank, d_conv, plan, sr_ratio, kernels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if ls_init_value is not None:
            self.layerscale_1 = LayerScale(dim, ls_init_value)
            self.layerscale_2 = LayerScale(dim, ls_init_value)
        else:
            self.layerscale_1 = nn.Identity()
            self.layerscale_2 = nn.Identity()

    def forward(self, x, shortcut=None, record=False):
        if isinstance(shortcut, (list, tuple)):
            shortcut = torch.cat(shortcut, dim=1)
        x = self.pos_embed(x, residual=True)                # x + pos_embed(x)
        op_out = self.op(self.norm(x), shortcut, record=record)
        if record:
            self.op.extras["op"] = op_out.detach()
        x = self.layerscale_1(x) + self.drop_path(op_out)
        x = self.layerscale_2(x) + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SparXMamba(nn.Module):
    """The released SparXMamba: stem, 4 stages of SparXVSSBlocks (+ downsample), classifier."""

    def __init__(self, cfg: dict, kernel_backend: str = "torch"):
        super().__init__()
        self.cfg = cfg
        self.kernels = get_kernels(kernel_backend)
        self.plan = cfg["plan"]
        dims, d0 = cfg["dims"], cfg["dims"][0]
        self.num_classes = cfg["num_classes"]
        self.num_features = dims[-1]
        stem = [nn.Conv2d(cfg["in_chans"], d0 // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(d0 // 2), nn.GELU()]
        if cfg["stem_type"] == "v2":
            stem += [nn.Conv2d(d0 // 2, d0 // 2, 3, stride=1, padding=1, bias=False),
                     nn.BatchNorm2d(d0 // 2), nn.GELU()]
        stem += [nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(d0)]
        self.patch_embed = nn.Sequential(*stem)
        self.layers = nn.ModuleList()
        for s, stage_plan in enumerate(self.plan):
            blocks = [SparXVSSBlock(dims[s], bp, cfg["ssm_d_state"], cfg["ssm_ratio"][s],
                                    cfg["dt_ranks"][s], cfg["ssm_conv"], cfg["mlp_ratio"][s],
                                    cfg["ls_init_value"][s], cfg["sr_ratio"][s],
                                    cfg["drop_path"][s][i], self.kernels)
                      for i, bp in enumerate(stage_plan)]
            downsample = (nn.Sequential(nn.Conv2d(dims[s], dims[s + 1], 3, stride=2, padding=1,
                                                  bias=False), nn.BatchNorm2d(dims[s + 1]))
                          if s < len(self.plan) - 1 else nn.Identity())
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks),
                                                         downsample=downsample)))
        self.classifier = nn.Sequential(GroupNorm1(self.num_features), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(1), nn.Linear(self.num_features, self.num_classes))
        self.apply(released_init_)
        if kernel_backend != "torch":   # the depthwise convs too
            from .ops import set_kernel_backend
            set_kernel_backend(self, kernel_backend)
        self.record = False
        self.recorded = OrderedDict()

    def _keep(self, name, tensor):
        if self.record:
            self.recorded[name] = tensor.detach()

    def forward_features(self, x):
        """x: (B, in_chans, H, W) -> list of the stage outputs (after each downsample)."""
        self.recorded = OrderedDict()
        x = self.patch_embed(x)
        self._keep("patch_embed", x)
        outs = []
        stage_input = None
        for s, (layer, stage_plan) in enumerate(zip(self.layers, self.plan)):
            named = {} if stage_input is None else {STAGE_INPUT: stage_input}
            for block, bp in zip(layer.blocks, stage_plan):
                shortcut = [named[src] for src in bp.sources] if bp.ganglion else None
                x = block(x, shortcut, record=self.record)
                named[bp.name] = x
                if self.record:
                    pre = f"layers.{s}.blocks.{bp.idx}"
                    for key in ("d_proj", "attn", "in_proj_padded", "ssm_out", "op"):
                        if key in block.op.extras:
                            self._keep(f"{pre}.op.{key}" if key != "op" else f"{pre}.op",
                                       block.op.extras[key])
                    self._keep(pre, x)
            x = layer.downsample(x)
            self._keep(f"layers.{s}.out", x)
            outs.append(x)
            stage_input = x
        return outs

    def forward_head(self, x):
        return self.classifier(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x)[-1])


def build(name: str = "sparx_mamba", *, pretrained: bool = False, kernel_backend: str = "torch",
          **overrides) -> SparXMamba:
    """Build the twin: ``name`` in "sparx_mamba", "sparx_mamba_t", "sparx_mamba_s", "sparx_mamba_b"
    with the released keyword names as overrides. ``pretrained=True`` downloads the released
    checkpoint (variants only; needs network) and loads it strictly.
    """
    cfg = resolve_config(name, **overrides)
    model = SparXMamba(cfg, kernel_backend=kernel_backend)
    model.pretrained_cfg = pretrained_cfg(name)
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        load_pretrained(model, name)
    return model


def load_pretrained(model: nn.Module, name: str) -> None:
    """Download (torch.hub cache) and strictly load the released weights of ``name``."""
    url = pretrained_cfg(name).get("url")
    if not url:
        raise ValueError(f"no released checkpoint for {name!r}; pretrained=True needs one of "
                         f"'sparx_mamba_t', 'sparx_mamba_s', 'sparx_mamba_b'")
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False,
                                                   weights_only=True)
    except Exception as err:  # URLError, HTTPError, socket errors, ...
        raise RuntimeError(
            f"could not download the released {name} weights from {url} ({type(err).__name__}: "
            f"{err}). Are you offline? Download the file elsewhere and load it with "
            f"sparx_ref.load_checkpoint(path) + model.load_state_dict(...)") from err
    from ..checkpoint import unwrap_state_dict
    model.load_state_dict(unwrap_state_dict(state), strict=True)
