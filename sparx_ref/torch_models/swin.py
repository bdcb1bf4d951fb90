"""PyTorch twin of the original Swin Transformer (v1).

Plain ``torch.nn`` modules with the released class's keyword names and state_dict keys
(microsoft/Swin-Transformer ``models/swin_transformer.py``; contract: docs/spec/swin.md,
``tests/data/official_keys_swin_*.json``), so released checkpoints load strictly. It is the
autograd oracle for :mod:`sparx_ref.models.swin` (the NumPy model with a hand-written
backward) and the fast CPU path of the benchmarks. The configuration and the stage geometry
(the window-shrink rule) come from :mod:`sparx_ref.models.swin`, so both implementations read
one set of facts. The relative index and the shift mask are rebuilt here in torch,
independently of the NumPy ops, so the twin stays an independent check of them.

Tokens are ``(B, L, C)`` with ``L = H*W`` row-major between modules; blocks view them as
``(B, H, W, C)``. ``M`` is a block's window side after the shrink rule, ``N = M*M``.

``model.record = True`` makes the next forward fill ``model.recorded`` (an OrderedDict of
detached tensors) under the golden file's ``act.*`` names: ``patch_embed``,
``layers.{s}.blocks.{i}.attn_in`` / ``.attn_probs`` / ``.attn`` / ``.mid``,
``layers.{s}.blocks.{i}``, ``layers.{s}.downsample``, ``norm``, ``pooled``.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import swin as np_swin
from .common import DropPath
from . import ops


# ---------------------------------------------------------------------------------------
# Pure functions (spec §6 - §8)
# ---------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, M: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, M*M, C); window index b*nW + row*(W/M) + col (batch-major)."""
    B, H, W, C = x.shape
    x = x.view(B, H // M, M, W // M, M, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, M * M, C)


def window_reverse(windows: torch.Tensor, M: int, H: int, W: int) -> torch.Tensor:
    """(B*nW, M*M, C) -> (B, H, W, C), the exact inverse of :func:`window_partition`."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // M) * (W // M))
    x = windows.view(B, H // M, W // M, M, M, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(M: int) -> torch.Tensor:
    """(N, N) int64: index[i, j] = (y_i - y_j + M - 1) * (2M - 1) + (x_i - x_j + M - 1)
    for tokens t = y*M + x (query minus key, row offset major; spec §8)."""
    ys, xs = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    y, x = ys.flatten(), xs.flatten()
    dy = y[:, None] - y[None, :] + M - 1
    dx = x[:, None] - x[None, :] + M - 1
    return (dy * (2 * M - 1) + dx).to(torch.int64)


def shifted_window_mask(H: int, W: int, M: int, shift: int) -> torch.Tensor:
    """(nW, N, N) float32 of 0 / -100: -100 where query and key come from different
    regions of the cyclically shifted grid (labels in the shifted frame; spec §7)."""
    def bands(n):
        band = torch.zeros(n, dtype=torch.int64)
        band[n - M:n - shift] = 1
        band[n - shift:] = 2
        return band
    labels = (3 * bands(H)[:, None] + bands(W)[None, :]).to(torch.float32)   # (H, W)
    windows = window_partition(labels[None, :, :, None], M)[..., 0]          # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


# ---------------------------------------------------------------------------------------
# Modules, registered in the released order so state_dict keys and order match
# ---------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 (C -> hidden) -> exact GELU -> Dropout -> fc2 (hidden -> C) -> Dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """W-MSA with relative position bias on windows X (B', N, C), B' = B*nW (spec §8):
    softmax(scale*q k^T + bias [+ mask]) v, heads concatenated, then proj."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale=None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        M = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * M - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(M))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_backend = "torch"  # the attention core's backend (ops.set_kernel_backend)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-2.0, b=2.0)

    def forward(self, x, mask=None, rec=None, name=""):
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, -1).permute(2, 0, 1)                      # (nH, N, N)
        # softmax(scale q k^T + bias [+ mask]) v, q, k, v (B', nH, N, d), on the model's backend
        out, probs = ops.window_attention(qkv[0], qkv[1], qkv[2], bias, mask, self.scale,
                                          backend=self.kernel_backend, attn_drop=self.attn_drop)
        if rec is not None:
            rec[name + ".attn_probs"] = probs.detach()
        out = out.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block (spec §5): x + (S)W-MSA(norm1(x)), then x + MLP(norm2(x)).

    ``window_size`` and ``shift_size`` are the values *after* the shrink rule.
    ``mix_input(u, shortcut)`` is the hook SparX-Swin overrides (it maps norm1(x) before
    the window attention); here it returns ``u`` unchanged.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        self.window_size, self.shift_size = window_size, shift_size
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        H, W = self.input_resolution
        mask = shifted_window_mask(H, W, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)

    def mix_input(self, u, shortcut):
        """norm1(x) (B, L, C) -> the window attention's input (B, L, C). Identity in Swin."""
        return u

    def forward(self, x, shortcut=None, rec=None, name=""):
        H, W = self.input_resolution
        B, L, C = x.shape
        M, s = self.window_size, self.shift_size
        u = self.mix_input(self.norm1(x), shortcut).view(B, H, W, C)
        if s > 0:
            u = torch.roll(u, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(u, M)                                  # (B*nW, N, C)
        attn = self.attn(windows, self.attn_mask, rec, name)
        y = window_reverse(attn, M, H, W)
        if s > 0:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(y.reshape(B, L, C))
        if rec is not None:
            rec[name + ".attn_in"] = windows.detach()
            rec[name + ".attn"] = attn.detach()
            rec[name + ".mid"] = x.detach()
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if rec is not None:
            rec[name] = x.detach()
        return x


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): gather 2x2 neighbours in the order (0,0), (1,0),
    (0,1), (1,1), LayerNorm(4C), Linear(4C -> 2C) without bias (spec §9). ``reduction`` is
    registered before ``norm``, as in the released state_dict."""

    def __init__(self, input_resolution, dim):
        super().__init__()
        self.input_resolution, self.dim = tuple(input_resolution), dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        H, W = self.input_resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One stage: ``blocks`` then (except in the last stage) ``downsample``."""

    def __init__(self, stage: dict, cfg: dict, drop_path: list, stage_index: int):
        super().__init__()
        self.stage_index = stage_index
        self.blocks = nn.ModuleList([self.make_block(stage, cfg, j, drop_path[j])
                                     for j in range(len(stage["blocks"]))])
        self.downsample = PatchMerging((stage["H"], stage["W"]), stage["dim"]) if stage["downsample"] else None

    block_class = SwinTransformerBlock

    def make_block(self, stage: dict, cfg: dict, j: int, drop_path: float, **extra) -> nn.Module:
        """Block ``j`` (window and shift after the shrink rule); ``extra`` goes to ``block_class``."""
        M, shift = stage["blocks"][j]
        return self.block_class(stage["dim"], (stage["H"], stage["W"]), stage["num_heads"], M, shift,
                                cfg["mlp_ratio"], cfg["qkv_bias"], cfg["qk_scale"], cfg["drop_rate"],
                                cfg["attn_drop_rate"], drop_path, **extra)

    def run_blocks(self, x, rec=None):
        """The stage's blocks in sequence (SparX-Swin overrides this with its wiring)."""
        for j, block in enumerate(self.blocks):
            x = block(x, None, rec, f"layers.{self.stage_index}.blocks.{j}")
        return x

    def forward(self, x, rec=None):
        x = self.run_blocks(x, rec)
        if self.downsample is not None:
            x = self.downsample(x)
            if rec is not None:
                rec[f"layers.{self.stage_index}.downsample"] = x.detach()
        return x


class PatchEmbed(nn.Module):
    """Conv2d(in_chans -> C0, kernel = stride = patch) -> tokens (B, H0*W0, C0) -> LayerNorm."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.img_size, self.patch_size = cfg["img_size"], cfg["patch_size"]
        self.proj = nn.Conv2d(cfg["in_chans"], cfg["embed_dim"], cfg["patch_size"], cfg["patch_size"])
        self.norm = nn.LayerNorm(cfg["embed_dim"]) if cfg["patch_norm"] else None

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


def _init_weights(m: nn.Module) -> None:
    """The released ``_init_weights``: Linear trunc-normal std .02 (cut-offs +-2), bias 0;
    LayerNorm weight 1, bias 0. The patch Conv2d keeps PyTorch's default (spec §11)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinTransformer(nn.Module):
    """The original Swin Transformer classifier (spec §1 - §12), released keyword names.

    ``forward(x)`` (B, in_chans, H, W) with (H, W) == img_size -> logits (B, num_classes).
    ``forward_features(x)`` -> list of the stage outputs (each BasicLayer's output,
    after its PatchMerging, as (B, L, C) tokens).
    """

    layer_class = BasicLayer

    def __init__(self, **cfg):
        super().__init__()
        self.cfg = cfg
        self.geometry = np_swin.stage_geometry(cfg)
        self.num_layers = len(cfg["depths"])
        self.num_features = cfg["embed_dim"] * 2 ** (self.num_layers - 1)
        self.record, self.recorded = False, OrderedDict()
        self.patch_embed = PatchEmbed(cfg)
        if cfg["ape"]:
            L0 = self.geometry[0]["H"] * self.geometry[0]["W"]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, L0, cfg["embed_dim"]))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02, a=-2.0, b=2.0)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(cfg["drop_rate"])
        rates = np_swin.drop_path_rates(cfg)
        self.layers = nn.ModuleList([self.layer_class(stage, cfg, rates[i], i)
                                     for i, stage in enumerate(self.geometry)])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, cfg["num_classes"]) if cfg["num_classes"] > 0 else nn.Identity()
        self.apply(_init_weights)

    # -- checkpoints ---------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like torch's, but relative_position_index / attn_mask buffers missing from the
        checkpoint are rebuilt (kept from construction), as the official loader does."""
        state = OrderedDict(state_dict)
        for key, value in super().state_dict().items():
            if key not in state and key.endswith(("relative_position_index", "attn_mask")):
                state[key] = value
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- forward -------------------------------------------------------------------------
    def _check_input(self, x):
        expected = (self.cfg["in_chans"],) + tuple(self.cfg["img_size"])
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                             f"(img_size is fixed at construction), got {tuple(x.shape)}")

    def forward_features(self, x):
        """List of the stage outputs, (B, L_s, C_s) tokens (after each PatchMerging).
        Fills ``recorded`` if ``record``."""
        self._check_input(x)
        rec = OrderedDict() if self.record else None
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        if rec is not None:
            rec["patch_embed"] = x.detach()
        outs = []
        for layer in self.layers:
            x = layer(x, rec)
            outs.append(x)
        self.recorded = rec if rec is not None else OrderedDict()
        return outs

    def forward(self, x):
        x = self.norm(self.forward_features(x)[-1])
        pooled = x.mean(dim=1)
        if self.record:
            self.recorded["norm"] = x.detach()
            self.recorded["pooled"] = pooled.detach()
        return self.head(pooled)


def _torch_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]


def build(name: str, dtype=None, seed=None, kernel_backend: str = "torch", **overrides):
    """Build ``swin_t | swin_s | swin_b | swin`` with the released keyword names as overrides.

    ``dtype`` (torch or NumPy dtype, default float32), ``seed`` (torch seed for the
    released init; the global RNG is left untouched) and ``kernel_backend`` (the window
    attention's backend, :mod:`sparx_ref.torch_models.ops`) are extra keywords.
    """
    cfg = np_swin.resolve_config(name, overrides)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = SwinTransformer(**cfg)
    ops.set_kernel_backend(model, kernel_backend)
    if dtype is not None:
        model = model.to(_torch_dtype(dtype))
    return model.eval()
