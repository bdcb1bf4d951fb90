"""PyTorch twin of SparX-Swin: **the project's reconstruction**, not the authors' code.

The SparX paper's SparX-Swin is not released; this is our reading (docs/spec/sparx_swin.md),
the released SparX-Mamba ganglion mechanism transplanted onto the original Swin Transformer.
The twin mirrors :mod:`sparx_ref.models.sparx_swin` (the NumPy model, whose docstring
explains the construction) key for key: Swin's modules and keys
(:mod:`sparx_ref.torch_models.swin`), ganglion blocks chosen by the one wiring function
(:func:`sparx_ref.models.wiring.ganglion_plan`, through
:func:`sparx_ref.models.sparx_swin.resolve_config`), and in a ganglion block
``attn(DMCA(norm1(x), shortcut))`` with the shared torch DMCA module
(:class:`sparx_ref.torch_models.dmca.DMCA`, ``norm="layer"``, ``out_channels = d``) under
``layers.{s}.blocks.{i}.dmca.*``. The DMCA layers get SparX-Mamba's released init (conv
weights trunc-normal std .02, biases 0, norms 1/0); the rest keeps Swin's.

With ``dense_config=configs.NO_GANGLION`` it is exactly the Swin twin (same keys, same
arithmetic, bit for bit on the same weights).
"""
from __future__ import annotations

import torch

from ..models import sparx_swin as np_sparx_swin
from ..models.wiring import STAGE_INPUT, source_name
from . import ops, swin
from .common import released_init_
from .dmca import DMCA


def tokens_to_image(t, H: int, W: int):
    """(B, H*W, C) row-major tokens -> (B, C, H, W)."""
    B, _, C = t.shape
    return t.transpose(1, 2).reshape(B, C, H, W)


def image_to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C) row-major tokens."""
    return x.flatten(2).transpose(1, 2)


class SparXSwinBlock(swin.SwinTransformerBlock):
    """A Swin block; when ``plan.ganglion`` its window attention reads
    ``DMCA(norm1(x), concat(shortcut))`` (our reconstruction)."""

    def __init__(self, *args, plan, sr_ratio, kernel_backend="torch", **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        if plan.ganglion:
            self.dmca = DMCA(self.dim, plan.shortcut_channels, sr_ratio, self.dim, norm="layer",
                             kernel_backend=kernel_backend)
            self.dmca.apply(released_init_)

    def mix_input(self, u, shortcut):
        if not self.plan.ganglion:
            return u
        H, W = self.input_resolution
        sc = torch.cat(list(shortcut), dim=-1)                       # (B, L, c), plan order
        return image_to_tokens(self.dmca(tokens_to_image(u, H, W), tokens_to_image(sc, H, W)))

    def forward(self, x, shortcut=None, rec=None, name=""):
        if self.plan.ganglion:
            self.dmca.record = rec is not None
        out = super().forward(x, shortcut, rec, name)
        if rec is not None and self.plan.ganglion:
            for key in np_sparx_swin.DMCA_RECORDED:
                rec[f"{name}.dmca.{key}"] = self.dmca.extras[key]
        return out


class SparXBasicLayer(swin.BasicLayer):
    """A Swin stage whose ganglion blocks receive the outputs named by the wiring plan."""

    block_class = SparXSwinBlock

    def make_block(self, stage, cfg, j, drop_path):
        return super().make_block(stage, cfg, j, drop_path, plan=cfg["plan"][self.stage_index][j],
                                  sr_ratio=cfg["sr_ratio"][self.stage_index],
                                  kernel_backend=cfg.get("kernel_backend", "torch"))

    def run_blocks(self, x, rec=None):
        outputs = {STAGE_INPUT: x}
        for j, block in enumerate(self.blocks):
            shortcut = [outputs[n] for n in block.plan.sources] if block.plan.ganglion else None
            x = block(x, shortcut, rec, f"layers.{self.stage_index}.blocks.{j}")
            outputs[source_name(self.stage_index, j)] = x
        return x


class SparXSwin(swin.SwinTransformer):
    """SparX-Swin (our reconstruction, docs/spec/sparx_swin.md); the Swin twin's API."""

    layer_class = SparXBasicLayer


def build(name: str, dtype=None, seed=None, kernel_backend: str = "torch", **overrides):
    """Build ``sparx_swin_t | sparx_swin_s | sparx_swin_b | sparx_swin`` (the project's
    reconstruction). Keywords: Swin's released ones plus ``sr_ratio`` and ``dense_config``;
    ``dtype``, ``seed`` (torch seed for the init; the global RNG is left untouched) and
    ``kernel_backend`` (window and DMCA attention, :mod:`sparx_ref.torch_models.ops`) are extra."""
    cfg = np_sparx_swin.resolve_config(name, overrides)
    cfg["kernel_backend"] = kernel_backend
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = SparXSwin(**cfg)
    ops.set_kernel_backend(model, kernel_backend)  # window attention and DMCA
    if dtype is not None:
        model = model.to(swin._torch_dtype(dtype))
    return model.eval()


__all__ = ["SparXSwin", "SparXSwinBlock", "SparXBasicLayer", "build"]
