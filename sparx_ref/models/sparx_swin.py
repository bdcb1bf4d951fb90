"""SparX-Swin as a NumPy model with a hand-written backward: **the project's reconstruction**.

The SparX paper reports a SparX-Swin family but its code and configuration are not released.
What is built here is *our reading* (docs/spec/sparx_swin.md), not the authors' model: the
released SparX-Mamba mechanism transplanted onto the original Swin Transformer as literally
as possible.

- Everything of Swin stays (:mod:`sparx_ref.models.swin`): patch embedding, stages,
  PatchMerging, shifted windows, relative position bias, the -100 mask, LayerNorm, MLP, head
  and all their keys.
- Ganglion layers and what they receive come from the one wiring function
  :func:`sparx_ref.models.wiring.ganglion_plan` (the SparX-Mamba rule: the stage input, the
  normal-layer outputs since the previous ganglion layer and the last ``max_dense_depth``
  ganglion outputs, concatenated along channels in that order).
- A ganglion block replaces ``attn(norm1(x))`` by ``attn(DMCA(norm1(x), shortcut))``: DMCA
  is the SparX-Mamba ganglion input path (:class:`sparx_ref.models.dmca.DMCA`) with
  ``norm="layer"`` (LayerNorm over channels per token) and ``out_channels = d`` (fused to
  ``3*floor(d/3)`` channels, then padded to ``d``). Its parameters live under
  ``layers.{s}.blocks.{i}.dmca.*``, after the block's ``mlp.*``. Tokens ``(B, L, C)`` are
  viewed as ``(B, C, H, W)`` for DMCA and back.
- With no ganglion layers (``dense_config=configs.NO_GANGLION``) the model *is* Swin: same
  keys, same arithmetic, bit for bit.

Extra keywords beyond Swin's: ``sr_ratio`` (per stage, the DMCA spatial reduction) and
``dense_config`` (``dense_step``, ``dense_start``, ``max_dense_depth``, ``cross_stage``, one
entry per stage; a partial dict updates the variant's).

Recording (``model.record = True``) adds, per ganglion block, ``layers.{s}.blocks.{i}.dmca.attn``
(B, 4, d/4, d/4), ``.dmca.d_proj`` (B, 2d, H, W) and ``.dmca.in_proj_padded`` (B, d, H, W) to
Swin's keys.
"""
from __future__ import annotations

import copy

import numpy as np

from . import configs
from . import swin
from .dmca import DMCA
from .wiring import STAGE_INPUT, ganglion_plan, source_name

SPARX_SWIN_NAMES = ("sparx_swin", "sparx_swin_t", "sparx_swin_s", "sparx_swin_b")
DENSE_KEYS = ("dense_step", "dense_start", "max_dense_depth", "cross_stage")
DMCA_RECORDED = ("attn", "d_proj", "in_proj_padded")   # recorded per ganglion block, in this order


def resolve_config(name: str, overrides: dict) -> dict:
    """Swin's configuration (:func:`sparx_ref.models.swin.resolve_config`) plus ``sr_ratio``,
    ``dense_config`` and the derived ``plan`` (``plan[stage][idx] -> wiring.BlockPlan``).

    Shared by the NumPy model and the PyTorch twin (:mod:`sparx_ref.torch_models.sparx_swin`).
    """
    overrides = dict(overrides)
    given_dense = dict(overrides.pop("dense_config", None) or {})

    def without_dense(table):
        return {k: v for k, v in table.items() if k != "dense_config"}

    cfg = swin.resolve_config(name, overrides, defaults=without_dense(configs.SPARX_SWIN_DEFAULTS),
                              variants={n: without_dense(v) for n, v in configs.SPARX_SWIN_VARIANTS.items()},
                              names=SPARX_SWIN_NAMES)
    unknown = sorted(set(given_dense) - set(DENSE_KEYS))
    if unknown:
        raise TypeError(f"dense_config: unknown key(s) {unknown}; accepted: {list(DENSE_KEYS)}")
    dense = copy.deepcopy(configs.SPARX_SWIN_VARIANTS.get(name, configs.SPARX_SWIN_DEFAULTS)["dense_config"])
    dense.update(copy.deepcopy(given_dense))
    num_stages = len(cfg["depths"])
    if "cross_stage" not in given_dense and not any(dense.get("cross_stage", [])):
        dense["cross_stage"] = [False] * num_stages   # all False (released), sized to the stages
    cfg["dense_config"] = dense
    sr = cfg["sr_ratio"]
    if isinstance(sr, (int, np.integer)):
        sr = [int(sr)] * num_stages
    sr = [int(r) for r in sr]
    if len(sr) != num_stages or any(r < 1 for r in sr):
        raise ValueError(f"sr_ratio must be a list of {num_stages} ints >= 1 (one per stage), got {cfg['sr_ratio']}")
    cfg["sr_ratio"] = sr
    dims = [cfg["embed_dim"] * 2 ** i for i in range(num_stages)]
    cfg["plan"] = ganglion_plan(cfg["depths"], dims, dense)
    for stage in cfg["plan"]:
        for block in stage:
            if block.ganglion and block.dim % 4:
                raise ValueError(f"layers.{block.stage}.blocks.{block.idx} is a ganglion layer: its width "
                                 f"{block.dim} must be divisible by 4 (DMCA attends in 4 channel groups)")
    return cfg


def tokens_to_image(t: np.ndarray, H: int, W: int) -> np.ndarray:
    """(B, H*W, C) row-major tokens -> (B, C, H, W)."""
    B, _, C = t.shape
    return np.ascontiguousarray(t.transpose(0, 2, 1)).reshape(B, C, H, W)


def image_to_tokens(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H*W, C) row-major tokens (the adjoint of :func:`tokens_to_image`)."""
    B, C, H, W = x.shape
    return np.ascontiguousarray(x.reshape(B, C, H * W).transpose(0, 2, 1))


class SparXSwinBlock(swin.SwinTransformerBlock):
    """A Swin block that, when ``plan.ganglion``, feeds its window attention with
    ``DMCA(norm1(x), concat(shortcut))`` (our reconstruction; see the module docstring).
    A normal block is exactly :class:`sparx_ref.models.swin.SwinTransformerBlock`."""

    def __init__(self, *args, plan, sr_ratio, dtype, rng, **kwargs):
        super().__init__(*args, dtype=dtype, rng=rng, **kwargs)
        object.__setattr__(self, "plan", plan)
        if plan.ganglion:
            self.dmca = DMCA(self.dim, plan.shortcut_channels, sr_ratio, self.dim, norm="layer",
                             dtype=dtype, rng=rng)

    def mix_input(self, u, shortcut):
        if not self.plan.ganglion:
            return u
        sc = np.concatenate(shortcut, axis=-1)                       # (B, L, c), sources in plan order
        out = self.dmca.forward(tokens_to_image(u, self.H, self.W), tokens_to_image(sc, self.H, self.W))
        return image_to_tokens(out)                                  # (B, L, d)

    def mix_input_backward(self, du):
        if not self.plan.ganglion:
            return du, None
        dx_img, dsc_img = self.dmca.backward(tokens_to_image(du, self.H, self.W))
        return image_to_tokens(dx_img), image_to_tokens(dsc_img)

    def forward(self, x, shortcut=None, rec=None, name=""):
        out = super().forward(x, shortcut, rec, name)
        if rec is not None and self.plan.ganglion:
            for key in DMCA_RECORDED:
                rec[f"{name}.dmca.{key}"] = self.dmca.recorded[key]
        return out


class SparXBasicLayer(swin.BasicLayer):
    """A Swin stage whose blocks are wired by the plan: block ``i``'s shortcut is the list of
    its ``plan.sources`` (the stage input ``x`` and earlier block outputs of this stage)."""

    block_class = SparXSwinBlock

    def make_block(self, stage, cfg, j, drop_path, *, dtype, rng):
        return super().make_block(stage, cfg, j, drop_path, dtype=dtype, rng=rng,
                                  plan=cfg["plan"][self.stage_index][j],
                                  sr_ratio=cfg["sr_ratio"][self.stage_index])

    def run_blocks(self, x, rec=None):
        outputs = {STAGE_INPUT: x}
        for j, block in enumerate(self.blocks):
            shortcut = [outputs[n] for n in block.plan.sources] if block.plan.ganglion else None
            x = block.forward(x, shortcut, rec, f"layers.{self.stage_index}.blocks.{j}")
            outputs[source_name(self.stage_index, j)] = x
        return x

    def backward_blocks(self, dout):
        # d_outputs[name]: gradient reaching a source through later ganglion shortcuts
        d_outputs: dict = {}
        blocks = list(self.blocks)
        for j in reversed(range(len(blocks))):
            name = source_name(self.stage_index, j)
            if name in d_outputs:
                dout = dout + d_outputs.pop(name)
            dout, dshortcut = blocks[j].backward(dout)
            if dshortcut is not None:
                plan = blocks[j].plan
                start = 0
                for src, width in zip(plan.sources, plan.source_channels):
                    g = dshortcut[..., start:start + width]
                    d_outputs[src] = d_outputs[src] + g if src in d_outputs else g
                    start += width
        if STAGE_INPUT in d_outputs:
            dout = dout + d_outputs.pop(STAGE_INPUT)
        if d_outputs:  # cannot happen for a valid plan
            raise RuntimeError(f"gradients left for unknown sources {sorted(d_outputs)}")
        return dout


class SparXSwin(swin.SwinTransformer):
    """SparX-Swin (our reconstruction, docs/spec/sparx_swin.md): Swin with ganglion layers.
    Same model API as :class:`sparx_ref.models.swin.SwinTransformer`."""

    layer_class = SparXBasicLayer


def build(name: str, dtype=np.float64, seed=0, **overrides) -> SparXSwin:
    """Build ``sparx_swin_t | sparx_swin_s | sparx_swin_b | sparx_swin`` (NumPy; the project's
    reconstruction, not the authors' code). Keywords: Swin's released ones plus ``sr_ratio``
    and ``dense_config``; ``dtype`` (float64 default) and ``seed`` (init RNG) are extra."""
    return SparXSwin(resolve_config(name, overrides), dtype=dtype, seed=seed)
